//! Blob routes. The body is raw bytes both ways; keys arrive percent-encoded
//! in the path and are data, never paths.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use valet_core::grant::{BlobRead, BlobWrite};
use valet_store::{BlobKey, BlobMeta, time};

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

/// A blob in a list, as the hosted std reads it.
#[derive(Serialize)]
struct BlobJson<'a> {
    key: &'a str,
    size: u64,
    #[serde(rename = "lastModified")]
    last_modified: String,
}

impl<'a> From<&'a BlobMeta> for BlobJson<'a> {
    fn from(blob: &'a BlobMeta) -> BlobJson<'a> {
        BlobJson {
            key: &blob.key,
            size: blob.size,
            last_modified: time::iso(blob.last_modified),
        }
    }
}

fn key(raw: &str) -> Result<BlobKey, ApiError> {
    BlobKey::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let grant = caller.require::<BlobRead>()?;
    let blobs = blocking(&state, move |s| s.blob_list(&grant, &q.prefix)).await?;
    Ok(Json(blobs.iter().map(BlobJson::from).collect::<Vec<_>>()).into_response())
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
