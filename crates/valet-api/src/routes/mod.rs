//! The router: every route, its layers, and the JSON 404.

mod blob;
mod email;
mod http_trigger;
mod me;
mod runs;
mod sqlite;
mod sqlite_home;
mod tokens;
mod vals;
mod vals_v2;
mod well_known;

/// JSON shapes the CLI's `--json` and the conformance runner share with
/// the API.
pub mod shared_json {
    pub use super::runs::FinishedRunJson;
    pub use super::sqlite::sql_rows_json;
    pub use super::tokens::{MigrationSummaryJson, token_json};
}

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::{ApiError, AppState, error};

/// The `/v1` routes, shared by the pages' origin and every run's channel.
fn v1(max_body: usize) -> Router<AppState> {
    Router::new()
        .route("/v1/me", get(me::me))
        .route(
            "/v1/blob/{*key}",
            get(blob::get).post(blob::set).delete(blob::delete),
        )
        .route("/v1/sqlite/execute", post(sqlite::execute))
        .route("/v1/sqlite/batch", post(sqlite::batch))
        .route("/v1/email", post(email::send).get(email::list))
        .route("/v1/email/{id}", get(email::status))
        .route("/v1/vals", get(vals::list).post(vals::create))
        .route(
            "/v1/vals/{id}",
            get(vals::get).patch(vals::update).delete(vals::delete),
        )
        .route("/v1/vals/{id}/run", post(runs::run_val))
        .route("/v1/vals/{id}/runs", get(runs::list))
        .route("/v1/vals/{id}/scope-requests", get(vals::scope_requests))
        .route(
            "/v1/vals/{id}/scope-requests/{scope}/{decision}",
            post(vals::decide_scope_request),
        )
        .route("/v2/vals/{id}", get(vals_v2::get).delete(vals::delete))
        .route("/v1/runs/{id}", get(runs::get))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route(
            "/v1/tokens/{id}",
            get(tokens::get)
                .patch(tokens::update)
                .delete(tokens::revoke),
        )
        // The routes above take no query string: a parameter there is
        // refused, not ignored. Routes that take one are added below and
        // parse it strictly.
        .route_layer(middleware::from_fn(refuse_query))
        .route("/v1/blob", get(blob::list))
        .route("/v2/vals", get(vals_v2::list).post(vals_v2::create))
        .route("/v2/me/vals", get(vals_v2::list_mine))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(lenient_json))
        .layer(DefaultBodyLimit::max(max_body))
}

/// valet's own origin: `/v1`, `/.well-known/jwks.json`, secret scanning
/// and the pages. Never val content: http vals have an origin of their own
/// ([`vals_router`]).
pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    let mut api = v1(max_body)
        .route("/.well-known/jwks.json", get(well_known::jwks))
        .route(
            "/v1/secret-scanning/verify",
            post(crate::secret_scanning::verify).layer(DefaultBodyLimit::max(
                crate::secret_scanning::MAX_BODY_BYTES,
            )),
        );
    if state.sqlite_cluster.is_some() {
        // Forwards from other nodes to a user's home node: never on a
        // run's channel, and only in a cluster. A forward carries the
        // caller's body and a little more (its handler reads it only once
        // the request looks like a forward).
        api = api.merge(
            Router::new()
                .route(
                    "/internal/sqlite/execute",
                    post(sqlite_home::internal_execute),
                )
                .route("/internal/sqlite/batch", post(sqlite_home::internal_batch)),
        );
    }
    finish(
        api.merge(crate::pages::router()).fallback(not_found),
        state,
        AccessLog::Info,
    )
}

/// What a run reaches through its channel: `/v1` and nothing else (no
/// pages, no sign-in, no secret scanning). Requests carry the channel's
/// [`valet_core::ChannelId`], which the run key must match.
pub fn channel_router(state: AppState) -> Router {
    finish(
        v1(state.config.max_body_bytes).fallback(not_found),
        state,
        AccessLog::Info,
    )
}

/// The origin of http vals: `/{user}/{val}/…` on the vals listener, or
/// the whole path on `<user>-<val>.<vals domain>`.
pub fn vals_router(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    let trigger = Router::new()
        .fallback(http_trigger::handle)
        .layer(DefaultBodyLimit::max(max_body));
    // Every request here is a run with a record of its own (outcome,
    // timing, logs): the access line would say it again, on the hottest
    // path, so it is kept for debugging.
    finish(trigger, state, AccessLog::Debug)
}

/// The level of a router's line per response.
#[derive(Clone, Copy)]
enum AccessLog {
    Info,
    Debug,
}

fn finish(routes: Router<AppState>, state: AppState, access: AccessLog) -> Router {
    routes
        .layer(middleware::from_fn(error::jsonify_errors))
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            tracing::error!("a request handler panicked");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; the server log has the details")
                .into_response()
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |request: &Request| {
                    // The matched route, never the raw URI: URIs carry blob
                    // keys and, for careless clients, tokens.
                    let route = request
                        .extensions()
                        .get::<MatchedPath>()
                        .map(|p| p.as_str().to_owned())
                        .unwrap_or_else(|| "unmatched".into());
                    match access {
                        AccessLog::Info => tracing::info_span!("request", method = %request.method(), route, principal = tracing::field::Empty),
                        AccessLog::Debug => tracing::debug_span!("request", method = %request.method(), route, principal = tracing::field::Empty),
                    }
                })
                .on_response(move |response: &axum::response::Response, latency: Duration, _span: &tracing::Span| {
                    let (status, latency_us) = (response.status().as_u16(), latency.as_micros() as u64);
                    match access {
                        AccessLog::Info => tracing::info!(status, latency_us, "response"),
                        AccessLog::Debug => tracing::debug!(status, latency_us, "response"),
                    }
                }),
        )
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; docs/CONTRACTS.md lists the API",
    )
}

/// A 400 for a query string on a route that takes none.
async fn refuse_query(request: Request, next: middleware::Next) -> axum::response::Response {
    match request.uri().query() {
        Some(query) if !query.is_empty() => {
            ApiError::bad_request("this route takes no query parameters; remove the query string")
                .into_response()
        }
        _ => next.run(request).await,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Runs blocking store work and maps its error.
pub(crate) async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&valet_store::Store) -> Result<T, valet_store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(state.store.call(f).await?)
}

/// The URL of `path` on this server as people reach it (`--public-url`),
/// for the `links` and `url` fields the hosted API's answers carry.
pub(crate) fn public_link(state: &AppState, path: &str) -> String {
    format!("{}{path}", state.config.public_url.trim_end_matches('/'))
}

/// Lets the API's JSON bodies arrive without `Content-Type:
/// application/json`. The hosted std library (and vals that copy it) posts
/// `JSON.stringify(...)` with no content type, which `fetch` sends as
/// `text/plain;charset=UTF-8`; the hosted API reads such bodies as JSON, so
/// valet does too. Other types (forms, multipart) still get a 415 from
/// [`json_body`]. This is safe because the API authenticates only by the
/// `Authorization` header, never by cookie: a cross-site form that can send
/// `text/plain` without a preflight carries no credential here. Layered on
/// the API routes only, never on the pages (which take forms) or http vals.
async fn lenient_json(mut request: Request, next: Next) -> Response {
    let has_body = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    );
    let plain = match request.headers().get(header::CONTENT_TYPE) {
        None => true,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/plain")),
    };
    if has_body && plain {
        request.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    next.run(request).await
}

/// A JSON body, or a 4xx that names what is wrong with it. Handlers call
/// this after their scope check, so a caller without the scope learns
/// nothing about the body's shape. A body sent as `text/plain` or with no
/// content type is read as JSON ([`lenient_json`]).
pub(crate) fn json_body<T>(
    body: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    match body {
        Ok(axum::Json(body)) => Ok(body),
        Err(rejection) => {
            let (code, status) = match &rejection {
                axum::extract::rejection::JsonRejection::MissingJsonContentType(_) => {
                    ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
                }
                axum::extract::rejection::JsonRejection::JsonDataError(_) => {
                    ("invalid_body", StatusCode::UNPROCESSABLE_ENTITY)
                }
                axum::extract::rejection::JsonRejection::BytesRejection(_) => {
                    ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE)
                }
                _ => ("invalid_json", StatusCode::BAD_REQUEST),
            };
            Err(ApiError::new(status, code, rejection.body_text()))
        }
    }
}
