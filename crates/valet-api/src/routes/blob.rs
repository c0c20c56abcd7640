//! Blob routes. The body is raw bytes both ways; keys arrive percent-encoded
//! in the path and are data, never paths.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use valet_core::grant::{BlobRead, BlobWrite};
use valet_store::{BlobKey, BlobMeta};

use super::blocking;
use crate::{ApiError, AppState, Caller};

/// The list's one parameter. Anything else (`?nope=1`, `?prefix[]=a`, a
/// repeated `prefix`) is a 400, never a broader list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    prefix: String,
}

fn key(raw: &str) -> Result<BlobKey, ApiError> {
    BlobKey::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<BlobMeta>>, ApiError> {
    let grant = caller.require::<BlobRead>()?;
    Ok(Json(
        blocking(&state, move |s| s.blob_list(&grant, &q.prefix)).await?,
    ))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let grant = caller.require::<BlobRead>()?;
    let key = key(&raw)?;
    let body = blocking(&state, move |s| s.blob_get(&grant, &key))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("blob '{raw}'")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

pub async fn set(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let grant = caller.require::<BlobWrite>()?;
    let key = key(&raw)?;
    let quota = state.config.blob_quota;
    blocking(&state, move |s| s.blob_put(&grant, &key, &body, quota)).await?;
    Ok(StatusCode::CREATED)
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let grant = caller.require::<BlobWrite>()?;
    let key = key(&raw)?;
    blocking(&state, move |s| s.blob_delete(&grant, &key)).await?;
    Ok(StatusCode::NO_CONTENT)
}
