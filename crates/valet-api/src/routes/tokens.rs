//! `/v1/tokens`: the caller's API tokens. A token can create or widen
//! tokens only within its own scopes, and only with `user:write`.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use valet_core::grant::{UserRead, UserWrite};
use valet_core::{ScopeSet, TokenScopes};
use valet_store::{HeldToken, MigrationSummary, TokenChange, TokenRecord, time};

use super::blocking;
use crate::{ApiError, AppState, Caller};

pub fn token_json(t: &TokenRecord) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "name": t.name,
        "hint": t.hint,
        "scopes": t.scopes.effective(),
        "legacy": t.scopes == TokenScopes::Legacy,
        "created_at": time::iso(t.created_at),
        "last_used_at": t.last_used_at.map(time::iso),
        "expires_at": t.expires_at.map(time::iso),
        "revoked_at": t.revoked_at.map(time::iso),
        "revoked_reason": t.revoked_reason,
        "leak_url": t.leak_url,
        "migration_state": t.migration_state.map(|m| m.as_str()),
    })
}

/// What a run of the scope migration did, as `valet migrate scopes
/// --json` prints it.
#[derive(Serialize)]
pub struct MigrationSummaryJson<'a> {
    dry_run: bool,
    migrated: u64,
    held: u64,
    previously_held: u64,
    already_scoped: u64,
    skipped_revoked: u64,
    skipped_expired: u64,
    owners_emailed: u64,
    batches: u64,
    interrupted: bool,
    held_tokens: Vec<HeldTokenJson<'a>>,
}

#[derive(Serialize)]
struct HeldTokenJson<'a> {
    id: &'a str,
    user_id: &'a str,
    name: &'a str,
    reason: &'a str,
    last_use: &'a str,
}

impl<'a> From<&'a MigrationSummary> for MigrationSummaryJson<'a> {
    fn from(s: &'a MigrationSummary) -> MigrationSummaryJson<'a> {
        let held = |t: &'a HeldToken| HeldTokenJson {
            id: &t.id,
            user_id: &t.user_id,
            name: &t.name,
            reason: &t.reason,
            last_use: &t.last_use,
        };
        MigrationSummaryJson {
            dry_run: s.dry_run,
            migrated: s.migrated,
            held: s.held,
            previously_held: s.previously_held,
            already_scoped: s.already_scoped,
            skipped_revoked: s.skipped_revoked,
            skipped_expired: s.skipped_expired,
            owners_emailed: s.owners_emailed,
            batches: s.batches,
            interrupted: s.interrupted,
            held_tokens: s.held_tokens.iter().map(held).collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    scopes: Option<ScopeSet>,
    expires_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    name: Option<String>,
    scopes: Option<ScopeSet>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let grant = caller.require::<UserRead>()?;
    let tokens = blocking(&state, move |s| s.list_tokens(&grant)).await?;
    Ok(Json(tokens.iter().map(token_json).collect()))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<UserRead>()?;
    let token = blocking(&state, move |s| s.token_of_user(&grant, &id)).await?;
    Ok(Json(token_json(&token)))
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let grant = caller.require::<UserWrite>()?;
    let body = super::json_body(body)?;
    let scopes = body.scopes.unwrap_or_else(ScopeSet::default_val);
    caller.require_all(scopes)?;
    let expires_at = match body.expires_at.as_deref() {
        None => None,
        Some(text) => {
            let at = time::parse(text).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "invalid expires_at '{text}': use ISO-8601, e.g. 2027-01-31T00:00:00Z"
                ))
            })?;
            if at <= time::now_ms() {
                return Err(ApiError::bad_request("expires_at is in the past"));
            }
            Some(at)
        }
    };
    let (record, token) = blocking(&state, move |s| {
        s.create_token(&grant, &body.name, TokenScopes::Scoped(scopes), expires_at)
    })
    .await?;
    let mut json = token_json(&record);
    json["token"] = token.expose().into();
    Ok((StatusCode::CREATED, Json(json)))
}

pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<UpdateBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<UserWrite>()?;
    let body = super::json_body(body)?;
    if let Some(scopes) = body.scopes {
        caller.require_all(scopes)?;
    }
    // The store refuses to change a revoked token (409 `conflict`).
    let change = TokenChange {
        name: body.name,
        scopes: body.scopes,
    };
    let token = blocking(&state, move |s| s.update_token(&grant, &id, change)).await?;
    Ok(Json(token_json(&token)))
}

pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<UserWrite>()?;
    let token = blocking(&state, move |s| s.revoke_token(&grant, &id, "by its owner")).await?;
    Ok(Json(token_json(&token)))
}
