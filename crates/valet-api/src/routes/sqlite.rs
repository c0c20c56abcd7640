//! `std/sqlite` routes on the caller's own database. SQLite decides whether
//! each statement reads or writes; the proofs the caller's scope checks
//! hand out decide whether it may.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use serde::Deserialize;
use valet_core::Scope;
use valet_store::{BatchMode, SqlResult, SqlStatement, StatementAccess};

use crate::{ApiError, AppState, Caller, SqliteCaller};

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
    mut grants: SqliteCaller,
    statements: Vec<SqlStatement>,
    mode: BatchMode,
) -> Result<Vec<SqlResult>, ApiError> {
    // The store asks `grants` for a proof of each access as SQLite
    // classifies the statements; each proof it gets is audited then.
    let (result, grants) = tokio::task::spawn_blocking(move || {
        let result = state
            .store
            .user_dbs()
            .execute(&mut grants, &statements, mode);
        (result, grants)
    })
    .await
    .map_err(ApiError::internal)?;
    match result {
        Ok((results, _)) => Ok(results),
        Err(valet_store::SqlError::Forbidden(access)) => {
            Err(grants.refuse(if access == StatementAccess::Write {
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
    let grants = caller.require_sqlite()?;
    let body = super::json_body(body)?;
    let mut results = run(state, grants, vec![body.statement], BatchMode::Deferred).await?;
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
    let grants = caller.require_sqlite()?;
    let body = super::json_body(body)?;
    Ok(Json(run(state, grants, body.statements, body.mode).await?))
}
