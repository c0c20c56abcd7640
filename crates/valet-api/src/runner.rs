//! The boundary between the API and the supervisor. The API never spawns a
//! run itself: it asks a [`Runner`], which `valet-runtime` implements.

use std::future::Future;
use std::pin::Pin;

use axum::body::Body;
use axum::http::{Request, Response};
use valet_store::{Outcome, Val};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The result of a finished run (`routes/runs.rs` writes its JSON).
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: String,
    pub outcome: Outcome,
    pub logs: String,
    pub duration_ms: u64,
}

/// Marks a response that came from an http val, so error-shaping
/// middleware passes it through as the val wrote it.
#[derive(Debug, Clone, Copy)]
pub struct ValResponse;

/// Why a run could not be made (the val failing is a summary, not this).
#[derive(Debug, Clone)]
pub enum RunRefused {
    /// No run slot within the wait: retry after this many seconds.
    Busy { message: String, retry_after: u64 },
    /// Anything else; the detail is for the log.
    Failed(String),
}

pub trait Runner: Send + Sync {
    /// Runs a script or cron val to completion.
    fn run_val(
        &self,
        val: Val,
        trigger: &'static str,
    ) -> BoxFuture<'_, Result<RunSummary, RunRefused>>;

    /// Runs an http val for one request and streams its response back.
    fn serve_http(&self, val: Val, request: Request<Body>) -> BoxFuture<'_, Response<Body>>;
}
