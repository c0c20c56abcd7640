//! valet's vocabulary: scopes, API tokens and run tokens (the valet key).
//!
//! This crate does no I/O. Randomness comes from the OS through `getrandom`,
//! and time is always passed in by the caller, so every rule here can be
//! tested with fixed inputs.

pub mod api_token;
pub mod grant;
pub mod live_runs;
pub mod password;
pub mod run_token;
pub mod schedule;
pub mod scope;
pub mod shared_key_ring;

pub use api_token::{ApiToken, TokenFormatError, TokenHash};
pub use grant::{Granted, GrantedSet, ScopeKind};
pub use live_runs::{ChannelId, LiveRun, LiveRunRefusal, LiveRuns};
pub use run_token::{KeyRing, MintRequest, RunClaims, RunTokenError, SigningKey};
pub use schedule::Schedule;
pub use scope::{Access, Resource, Scope, ScopeError, ScopeSet, TokenScopes};
pub use shared_key_ring::SharedKeyRing;
