//! `GET /v1/me`: the account behind the token, in the hosted API's shape
//! (what the SDK's `me.profile.retrieve()` returns).

use axum::Json;
use axum::extract::State;
use valet_core::grant::UserRead;

use super::{blocking, public_link};
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
    // valet has no profiles: no bio or picture, and the user's page is
    // their list of vals.
    Ok(Json(serde_json::json!({
        "id": user.id,
        "type": "user",
        "username": user.username,
        "email": user.email,
        "tier": user.tier.as_str(),
        "bio": null,
        "profileImageUrl": null,
        "url": public_link(&state, "/vals"),
        "links": { "self": public_link(&state, "/v1/me") },
    })))
}
