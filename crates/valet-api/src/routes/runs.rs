//! Runs of a val: start one (`val:write`), list them and read their logs
//! (`val:read`). The JSON of a run is written here and nowhere else.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use valet_core::ScopeSet;
use valet_core::grant::{ValRead, ValWrite};
use valet_store::{Outcome, RunRecord, ValKind, time};

use super::blocking;
use crate::{ApiError, AppState, Caller, RunSummary};

/// A stored run, as `GET /v1/runs/{id}` and `GET /v1/vals/{id}/runs` show it.
#[derive(Serialize)]
pub struct RunJson<'a> {
    id: &'a str,
    val_id: Option<&'a str>,
    trigger: &'a str,
    scopes: ScopeSet,
    outcome: &'static str,
    started_at: String,
    ended_at: Option<String>,
    duration_ms: Option<i64>,
    exit_detail: Option<&'a str>,
    logs: &'a str,
    /// The node that ran it, in a cluster (absent on a single node).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
}

impl<'a> From<&'a RunRecord> for RunJson<'a> {
    fn from(run: &'a RunRecord) -> RunJson<'a> {
        RunJson {
            id: &run.id,
            val_id: run.val_id.as_deref(),
            trigger: &run.trigger,
            scopes: run.scopes,
            outcome: run.outcome.as_str(),
            started_at: time::iso(run.started_at),
            ended_at: run.ended_at.map(time::iso),
            duration_ms: run.duration_ms,
            exit_detail: run.exit_detail.as_deref(),
            logs: &run.logs,
            node: run.node.as_deref(),
        }
    }
}

/// A finished run, as `POST /v1/vals/{id}/run` answers it and `valet run
/// --json` prints it (with `detail`, which the API leaves out).
#[derive(Serialize)]
pub struct FinishedRunJson<'a> {
    pub run_id: &'a str,
    #[serde(serialize_with = "outcome_name")]
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    pub logs: &'a str,
    pub duration_ms: u64,
}

fn outcome_name<S: serde::Serializer>(outcome: &Outcome, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(outcome.as_str())
}

impl<'a> From<&'a RunSummary> for FinishedRunJson<'a> {
    fn from(run: &'a RunSummary) -> FinishedRunJson<'a> {
        FinishedRunJson {
            run_id: &run.run_id,
            outcome: run.outcome,
            detail: None,
            logs: &run.logs,
            duration_ms: run.duration_ms,
        }
    }
}

pub async fn run_val(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
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
    Ok(Json(FinishedRunJson::from(&summary)).into_response())
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let runs = blocking(&state, move |s| {
        let val = s.val_of_user(&grant, &id)?;
        s.runs_of_val(&grant, &val.id, 50)
    })
    .await?;
    Ok(Json(runs.iter().map(RunJson::from).collect::<Vec<_>>()).into_response())
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let grant = caller.require::<ValRead>()?;
    let run = blocking(&state, move |s| s.run_of_user(&grant, &id)).await?;
    Ok(Json(RunJson::from(&run)).into_response())
}
