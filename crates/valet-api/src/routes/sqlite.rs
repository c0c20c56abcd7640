//! `std/sqlite` routes on the caller's own database. SQLite decides whether
//! each statement reads or writes; the caller's scopes decide whether it may.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use serde::Deserialize;
use valet_core::Scope;
use valet_store::{BatchMode, SqlResult, SqlStatement, StatementAccess};

use crate::{ApiError, AppState, Caller};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    statement: SqlStatement,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    statements: Vec<SqlStatement>,
    #[serde(default)]
    mode: BatchMode,
}

async fn run(
    state: AppState,
    caller: Caller,
    statements: Vec<SqlStatement>,
    mode: BatchMode,
) -> Result<Vec<SqlResult>, ApiError> {
    let grant = caller.require_any(&[Scope::SQLITE_READ, Scope::SQLITE_WRITE])?;
    let mut allowed = Vec::new();
    if caller.scopes().contains(Scope::SQLITE_READ) {
        allowed.push(StatementAccess::Read);
    }
    if caller.scopes().contains(Scope::SQLITE_WRITE) {
        allowed.push(StatementAccess::Write);
    }
    let result = tokio::task::spawn_blocking(move || {
        state
            .store
            .user_dbs()
            .execute(grant.user_id(), &statements, mode, &allowed)
    })
    .await
    .map_err(ApiError::internal)?;
    match result {
        Ok((results, used)) => {
            caller.audit(if used == StatementAccess::Write {
                Scope::SQLITE_WRITE
            } else {
                Scope::SQLITE_READ
            });
            Ok(results)
        }
        Err(valet_store::SqlError::Forbidden(access)) => {
            Err(caller.refuse(if access == StatementAccess::Write {
                Scope::SQLITE_WRITE
            } else {
                Scope::SQLITE_READ
            }))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn execute(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<ExecuteBody>, JsonRejection>,
) -> Result<Json<SqlResult>, ApiError> {
    caller.require_any(&[Scope::SQLITE_READ, Scope::SQLITE_WRITE])?;
    let body = super::json_body(body)?;
    let mut results = run(state, caller, vec![body.statement], BatchMode::Deferred).await?;
    results
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::internal("empty result"))
}

pub async fn batch(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<BatchBody>, JsonRejection>,
) -> Result<Json<Vec<SqlResult>>, ApiError> {
    caller.require_any(&[Scope::SQLITE_READ, Scope::SQLITE_WRITE])?;
    let body = super::json_body(body)?;
    Ok(Json(run(state, caller, body.statements, body.mode).await?))
}
