//! `GET /.well-known/jwks.json`: the public keys that verify run tokens.

use axum::Json;
use axum::extract::State;

use crate::AppState;

pub async fn jwks(State(state): State<AppState>) -> Json<serde_json::Value> {
    let now = (valet_store::time::now_ms() / 1000) as u64;
    Json(state.keys.jwks(now))
}
