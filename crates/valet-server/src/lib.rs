//! valet composed: the API's listener, the supervisor behind it (as the
//! API's [`valet_api::Runner`]), the cron scheduler, the mailer, a
//! cluster node's tasks when the control plane is shared, and shutdown. `valet serve`, `valet run` and `valet dev` each start one
//! [`Host`]; the end-to-end tests and the conformance suite do too.

pub mod cluster;
mod host;
mod keys;
pub mod mailer;
mod runner;

pub use host::{Host, HostConfig, HostError, Prepared};
pub use runner::{SupervisorRunner, http_response};
