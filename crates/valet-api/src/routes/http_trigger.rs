//! `/x/{user}/{val}/…`: public endpoints of http vals, one run per request.
//! The val sees the path from `/`.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use valet_store::ValKind;

use super::blocking;
use crate::{ApiError, AppState};

pub async fn handle(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    request: Request<Body>,
) -> Response {
    match dispatch(state, params, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(
    state: AppState,
    params: HashMap<String, String>,
    request: Request<Body>,
) -> Result<Response, ApiError> {
    let (Some(username), Some(val_name)) =
        (params.get("user").cloned(), params.get("val").cloned())
    else {
        return Err(ApiError::not_found("val"));
    };
    let lookup_name = val_name.clone();
    let val = blocking(&state, move |s| {
        let Some(user) = s.user_by_name(&username)? else {
            return Ok(None);
        };
        s.val_by_name(&user.id, &lookup_name)
    })
    .await?
    .filter(|v| v.kind == ValKind::Http)
    .ok_or_else(|| ApiError::not_found(format!("http val '{val_name}'")))?;
    let runner = state.runner.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_runner",
            "this server does not run vals",
        )
    })?;

    // Strip `/x/{user}/{val}` so the val sees its own path from `/`.
    let (mut parts, body) = request.into_parts();
    let rest = params
        .get("rest")
        .map(|r| format!("/{r}"))
        .unwrap_or_else(|| "/".into());
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    };
    parts.uri = path_and_query
        .parse()
        .map_err(|_| ApiError::bad_request("the request path is not a valid URI"))?;
    Ok(runner
        .serve_http(val, Request::from_parts(parts, body))
        .await)
}
