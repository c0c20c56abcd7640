//! The supervisor: runs each val in a locked-down Deno process (one V8
//! isolate), started through one launch path with no val, no key and no
//! environment, confined by Deno's permissions and an OS layer under them,
//! with a valet key limited to the val's scopes whose life is the run's life.
//!
//! Only this crate builds Deno command lines or spawns processes.

mod channel;
mod control;
mod cron;
mod deno;
mod deno_cache;
mod egress;
mod executor;
mod files;
mod hot;
mod http;
mod key_stock;
mod launcher;
mod logs;
mod os_layer;
mod pool;
mod run_dir;
mod sandbox;
mod slots;
mod supervisor;

pub use channel::{ApiChannel, BoxFuture};
pub use cron::Scheduler;
pub use deno::{DENO_VERSION, find_deno};
pub use egress::EgressAllow;
pub use hot::HotLimits;
pub use http::{HttpRunError, RunBody};
pub use launcher::API_ORIGIN;
pub use os_layer::LayerReport;
pub use slots::{Busy, SlotLimits};
pub use supervisor::{Launching, RunOutput, RunSpec, RuntimeConfig, Source, Supervisor};

/// Why the supervisor could not run a val (as opposed to the val failing).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    DenoNotFound(String),
    #[error("could not start the run: {0}")]
    Spawn(String),
    #[error("no run slot: {0}")]
    Busy(#[from] Busy),
    #[error("could not mint the run token: {0}")]
    Token(#[from] valet_core::RunTokenError),
    #[error(transparent)]
    Store(#[from] valet_store::StoreError),
    #[error("file system error preparing the run: {0}")]
    Io(#[from] std::io::Error),
}
