//! `/v1/vals`: a user's vals, and the scope requests their runs left. The
//! JSON of a val and of a scope request is written here.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use valet_core::grant::{ValRead, ValWrite};
use valet_core::{Schedule, Scope, ScopeSet};
use valet_store::{NewVal, ScopeRequest, Val, ValKind, ValPatch, time};

use super::blocking;
use crate::{ApiError, AppState, Caller};

pub const DEFAULT_TIMEOUT_MS: i64 = 30_000;

/// A val as the API shows it. Env values are write-only: only the names
/// come back.
pub fn val_json(val: &Val) -> serde_json::Value {
    let env: BTreeMap<&String, &str> = val.env.keys().map(|k| (k, "********")).collect();
    serde_json::json!({
        "id": val.id,
        "name": val.name,
        "type": val.kind.as_str(),
        "code": val.code,
        "scopes": val.scopes,
        "env": env,
        "timeout_ms": val.timeout_ms,
        "schedule": val.schedule.as_ref().map(Schedule::as_str),
        "created_at": time::iso(val.created_at),
        "updated_at": time::iso(val.updated_at),
        "last_run_at": val.last_run_at.map(time::iso),
    })
}

/// A scope request as `GET /v1/vals/{id}/scope-requests` lists it.
#[derive(Serialize)]
struct ScopeRequestJson<'a> {
    scope: Scope,
    state: &'static str,
    first_at: String,
    last_at: String,
    count: i64,
    sample_route: &'a str,
}

impl<'a> From<&'a ScopeRequest> for ScopeRequestJson<'a> {
    fn from(r: &'a ScopeRequest) -> ScopeRequestJson<'a> {
        ScopeRequestJson {
            scope: r.scope,
            state: r.state.as_str(),
            first_at: time::iso(r.first_at),
            last_at: time::iso(r.last_at),
            count: r.count,
            sample_route: &r.sample_route,
        }
    }
}

/// A val's `type` in a request body.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum KindJson {
    Http,
    Script,
    Cron,
}

impl From<KindJson> for ValKind {
    fn from(kind: KindJson) -> ValKind {
        match kind {
            KindJson::Http => ValKind::Http,
            KindJson::Script => ValKind::Script,
            KindJson::Cron => ValKind::Cron,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    #[serde(rename = "type")]
    kind: KindJson,
    code: String,
    scopes: Option<ScopeSet>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout_ms: Option<i64>,
    schedule: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<KindJson>,
    code: Option<String>,
    scopes: Option<ScopeSet>,
    env: Option<BTreeMap<String, String>>,
    timeout_ms: Option<i64>,
    #[serde(default, with = "double_option")]
    schedule: Option<Option<String>>,
}

/// Tells a missing field (leave as is) from an explicit `null` (clear).
mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Ok(Some(Option::deserialize(d)?))
    }
}

/// A schedule from a request body; a bad one is a 422 with
/// [`Schedule::parse`]'s message. (That a cron val needs one is the
/// store's rule.)
fn schedule(text: Option<String>) -> Result<Option<Schedule>, ApiError> {
    text.map(|t| Schedule::parse(&t))
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string()))
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let vals = blocking(&state, move |s| s.list_vals(&grant)).await?;
    Ok(Json(vals.iter().map(val_json).collect()))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let val = blocking(&state, move |s| s.val_of_user(&grant, &id)).await?;
    Ok(Json(val_json(&val)))
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let grant = caller.require::<ValWrite>()?;
    let body = super::json_body(body)?;
    let scopes = body.scopes.unwrap_or_else(ScopeSet::default_val);
    // A val's runs act for the caller: they may not get more than it holds.
    let cover = caller.require_all(scopes)?;
    let new = NewVal {
        name: body.name,
        kind: body.kind.into(),
        code: body.code,
        scopes,
        env: body.env,
        timeout_ms: body.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
        schedule: schedule(body.schedule)?,
    };
    let val = blocking(&state, move |s| s.create_val(&grant, &cover, new)).await?;
    Ok((StatusCode::CREATED, Json(val_json(&val))))
}

pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<UpdateBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<ValWrite>()?;
    let body = super::json_body(body)?;
    let lookup = (grant.clone(), id.clone());
    let current = blocking(&state, move |s| s.val_of_user(&lookup.0, &lookup.1)).await?;
    let mut patch = ValPatch {
        name: body.name,
        kind: body.kind.map(ValKind::from),
        code: body.code,
        scopes: body.scopes,
        env: body.env,
        timeout_ms: body.timeout_ms,
        schedule: None,
    };
    // New scopes are handed to the val's runs: the caller must hold them.
    // New code (or env, or type) runs with the scopes the val's runs hold:
    // the caller must hold those too, or a token with val:write alone could
    // rewrite a val that reads private blobs and secrets and run it.
    let mut needed = patch.scopes.unwrap_or(ScopeSet::EMPTY);
    if patch.changes_what_runs() {
        needed = needed.union(current.scopes);
    }
    let cover = caller.require_all(needed)?;
    patch.schedule = body.schedule.map(schedule).transpose()?;
    let val = blocking(&state, move |s| s.update_val(&grant, &cover, &id, patch)).await?;
    Ok(Json(val_json(&val)))
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let grant = caller.require::<ValWrite>()?;
    blocking(&state, move |s| s.delete_val(&grant, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn scope_requests(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let requests = blocking(&state, move |s| {
        let val = s.val_of_user(&grant, &id)?;
        s.scope_requests(&grant, &val.id)
    })
    .await?;
    Ok(Json(
        requests
            .iter()
            .map(ScopeRequestJson::from)
            .collect::<Vec<_>>(),
    )
    .into_response())
}

pub async fn decide_scope_request(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, scope, decision)): Path<(String, String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<ValWrite>()?;
    let scope: Scope = scope
        .parse()
        .map_err(|e: valet_core::ScopeError| ApiError::bad_request(e.to_string()))?;
    let allow = match decision.as_str() {
        "allow" => true,
        "deny" => false,
        other => {
            return Err(ApiError::not_found(format!(
                "decision '{other}' (use allow or deny)"
            )));
        }
    };
    // Allowing hands the val's runs this scope: the caller must hold it.
    let cover = caller.require_all(if allow {
        ScopeSet::EMPTY.with(scope)
    } else {
        ScopeSet::EMPTY
    })?;
    let val = blocking(&state, move |s| {
        s.decide_scope_request(&grant, &cover, &id, scope, allow)?;
        s.val_of_user(&grant, &id)
    })
    .await?;
    Ok(Json(val_json(&val)))
}
