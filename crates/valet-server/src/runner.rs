//! The supervisor as the API's [`Runner`]: the API asks for runs, the
//! supervisor performs them, and this adapter turns one's types into the
//! other's.

use axum::body::Body;
use axum::http::{Request, Response};
use valet_api::{BoxFuture, RunRefused, RunSummary, Runner, ValResponse};
use valet_runtime::{HttpRunError, RunBody, RunSpec, RuntimeError, Supervisor};
use valet_store::Val;

/// Runs vals for the API.
#[derive(Clone)]
pub struct SupervisorRunner(pub Supervisor);

impl Runner for SupervisorRunner {
    fn run_val(
        &self,
        val: Val,
        trigger: &'static str,
    ) -> BoxFuture<'_, Result<RunSummary, RunRefused>> {
        Box::pin(async move {
            let out = self
                .0
                .run(RunSpec::for_val(&val, trigger))
                .await
                .map_err(|e| match e {
                    RuntimeError::Busy(busy) => RunRefused::Busy {
                        message: busy.0,
                        retry_after: busy.1,
                    },
                    e => RunRefused::Failed(e.to_string()),
                })?;
            Ok(RunSummary {
                run_id: out.run_id,
                outcome: out.outcome,
                logs: out.logs,
                duration_ms: out.duration_ms,
            })
        })
    }

    fn serve_http(&self, val: Val, request: Request<Body>) -> BoxFuture<'_, Response<Body>> {
        Box::pin(async move {
            http_response(
                self.0
                    .serve_http(RunSpec::for_val(&val, "http"), request)
                    .await,
            )
        })
    }
}

/// An http run's result as a response: the val's own, marked so the API's
/// error shaping leaves it alone, or a JSON error that says nothing internal.
pub fn http_response(result: Result<Response<RunBody>, HttpRunError>) -> Response<Body> {
    match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            parts.extensions.insert(ValResponse);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            let body = serde_json::json!({ "error": { "code": e.code, "message": e.message } });
            let mut response = Response::new(Body::from(body.to_string()));
            *response.status_mut() = e.status;
            if let Some(seconds) = e.retry_after {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, seconds.into());
            }
            response.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            response
        }
    }
}
