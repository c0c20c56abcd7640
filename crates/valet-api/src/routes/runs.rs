//! Runs of a val: start one (`val:write`), list them and read their logs
//! (`val:read`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use valet_core::grant::{ValRead, ValWrite};
use valet_store::{RunRecord, ValKind};

use super::blocking;
use crate::{ApiError, AppState, Caller, RunSummary};

pub async fn run_val(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RunSummary>, ApiError> {
    let grant = caller.require::<ValWrite>()?;
    let val = blocking(&state, move |s| s.val_of_user(&grant, &id)).await?;
    if val.kind == ValKind::Http {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "wrong_val_type",
            "http vals run per request: call it on the vals origin (/{user}/{val} on --vals-listen) instead",
        ));
    }
    let runner = state.runner.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_runner",
            "this server does not run vals",
        )
    })?;
    let summary = runner
        .run_val(val, "api")
        .await
        .map_err(|refused| match refused {
            crate::RunRefused::Busy {
                message,
                retry_after,
            } => ApiError::busy(message, retry_after),
            crate::RunRefused::Failed(cause) => ApiError::internal(cause),
        })?;
    Ok(Json(summary))
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<RunRecord>>, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let runs = blocking(&state, move |s| {
        let val = s.val_of_user(&grant, &id)?;
        s.runs_of_val(&grant, &val.id, 50)
    })
    .await?;
    Ok(Json(runs))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RunRecord>, ApiError> {
    let grant = caller.require::<ValRead>()?;
    Ok(Json(
        blocking(&state, move |s| s.run_of_user(&grant, &id)).await?,
    ))
}
