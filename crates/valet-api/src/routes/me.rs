//! `GET /v1/me`: the account behind the token.

use axum::Json;
use axum::extract::State;
use valet_core::grant::UserRead;

use super::blocking;
use crate::{ApiError, AppState, Caller};

pub async fn me(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = caller.require::<UserRead>()?;
    let user_id = grant.user_id().to_owned();
    let user = blocking(&state, move |s| s.user_by_id(&user_id))
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(Json(serde_json::json!({
        "id": user.id, "username": user.username, "email": user.email, "tier": user.tier,
    })))
}
