//! The supervisor: runs each val in a fresh, locked-down Deno process (one
//! V8 isolate), with a run token limited to the val's scopes whose life is
//! the run's life.
//!
//! Only this crate builds Deno command lines or spawns processes.

mod cron;
mod deno;
mod egress;
mod executor;
mod files;
mod logs;
mod sandbox;
mod supervisor;

pub use cron::Scheduler;
pub use deno::{DENO_VERSION, find_deno};
pub use egress::EgressAllow;
pub use supervisor::{
    HttpRunError, RunBody, RunOutput, RunSpec, RuntimeConfig, Source, Supervisor,
};

/// Why the supervisor could not run a val (as opposed to the val failing).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    DenoNotFound(String),
    #[error("could not start the run: {0}")]
    Spawn(String),
    #[error("could not mint the run token: {0}")]
    Token(#[from] valet_core::RunTokenError),
    #[error(transparent)]
    Store(#[from] valet_store::StoreError),
    #[error("file system error preparing the run: {0}")]
    Io(#[from] std::io::Error),
}
