//! A user's sqlite calls in a cluster: run on the user's home node. The
//! node that receives a call authenticates the caller and checks its
//! scopes, then runs it here when this node is the home, or forwards it,
//! signed, to the home node's `POST /internal/sqlite/{execute|batch}`,
//! which executes only signed, fresh, unreplayed forwards meant for it.
//!
//! Nothing is retried unless it surely did not run: a home that answers
//! "moved", or that could not be connected to, is looked up afresh once.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use valet_core::{Scope, ScopeSet};
use valet_store::{Principal, SqlError, time};

use super::sqlite::{Call, refusal, run};
use crate::forward::{self, FORWARD_TTL_MS, Forward, ForwardClaims, SIGNATURE_HEADER};
use crate::sqlite_homes::{HomePlace, RemoteHome, SqliteCluster};
use crate::{ApiError, AppState, Caller, SqliteCaller};

/// What became of a forward.
enum Sent {
    /// The home answered (success or the caller's error): pass it on.
    Answer(Response),
    /// Surely not executed (the home is elsewhere, or could not be
    /// reached): look the home up afresh and try once more.
    Retry(ApiError),
    /// Perhaps executed, perhaps not: tell the caller.
    Failed(ApiError),
}

/// Runs `call` on the home node of the caller's database.
pub(super) async fn through_home(
    state: AppState,
    mut grants: SqliteCaller,
    call: Call,
) -> Result<Response, ApiError> {
    let Some(cluster) = state.sqlite_cluster.clone() else {
        return Err(ApiError::internal("no sqlite cluster to forward through"));
    };
    let (statements, mode) = call.clone().into_statements()?;
    let user = valet_store::SqliteGrants::owner(&grants).to_owned();
    let mut fresh = false;
    let mut last_error = None;
    for _attempt in 0..2 {
        match cluster.homes.locate(&user, fresh).await? {
            HomePlace::Here(fence) => {
                let (result, back) =
                    run(state.clone(), grants, statements.clone(), mode, Some(fence)).await?;
                grants = back;
                match result {
                    Ok(results) => return call.respond(&results),
                    Err(SqlError::NotHome(detail)) => {
                        tracing::warn!(detail, "this node's hold on a user's database was stale");
                        last_error = Some(moved());
                    }
                    Err(e) => return Err(refusal(&grants, e)),
                }
            }
            HomePlace::There(home) => match send(&cluster, &grants, &call, &home).await {
                Sent::Answer(response) => return Ok(response),
                Sent::Retry(e) => last_error = Some(e),
                Sent::Failed(e) => return Err(e),
            },
        }
        fresh = true;
    }
    Err(last_error.unwrap_or_else(moved))
}

/// The 503 for a home that moved while it was called (nothing ran).
fn moved() -> ApiError {
    crate::sqlite_homes::HomeUnavailable {
        message:
            "this user's database moved to another node while it was called; nothing ran, retry"
                .into(),
        retry_after: 1,
        moved: true,
    }
    .into()
}

/// Forwards `call` to `home`, signed.
async fn send(
    cluster: &SqliteCluster,
    grants: &SqliteCaller,
    call: &Call,
    home: &RemoteHome,
) -> Sent {
    let (principal, scopes) = grants.forward_identity();
    let (token, run, val) = match principal {
        Principal::Token { token_id, .. } => (Some(token_id.clone()), None, None),
        Principal::Run { run_id, val_id, .. } => (None, Some(run_id.clone()), val_id.clone()),
    };
    let sealed = forward::nonce()
        .map_err(|e| ApiError::internal(format!("no randomness for a nonce: {e}")))
        .and_then(|nonce| {
            let forward = Forward {
                claims: ForwardClaims {
                    call: call.name().into(),
                    node: home.node_id.clone(),
                    user: principal.user_id().to_owned(),
                    token,
                    run,
                    val,
                    scopes: scopes.to_strings(),
                    fence: home.fence,
                    expires_ms: time::now_ms() + FORWARD_TTL_MS,
                    nonce,
                },
                request: call.to_json().map_err(ApiError::internal)?,
            };
            forward.seal(&cluster.key).map_err(ApiError::internal)
        });
    let (body, signature) = match sealed {
        Ok(sealed) => sealed,
        Err(e) => return Sent::Failed(e),
    };
    let url = format!(
        "{}/internal/sqlite/{}",
        home.address.trim_end_matches('/'),
        call.name()
    );
    let sent = cluster
        .client
        .post(url)
        .header(SIGNATURE_HEADER, signature)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) if e.is_connect() => {
            tracing::warn!(node = home.node_id, error = %e, "the home node of a user's database is unreachable");
            return Sent::Retry(
                crate::sqlite_homes::HomeUnavailable {
                    message: "the node that holds this user's database does not answer; until its lease runs out no other node may take it over, so nothing ran".into(),
                    retry_after: lease_seconds(home),
                    moved: false,
                }
                .into(),
            );
        }
        Err(e) if e.is_timeout() => {
            tracing::warn!(node = home.node_id, error = %e, "a forward to a home node timed out");
            return Sent::Failed(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "sqlite_home_timeout",
                "the node that holds this user's database did not answer in time; the statements may or may not have run",
            ));
        }
        Err(e) => {
            tracing::warn!(node = home.node_id, error = %e, "a forward to a home node failed");
            return Sent::Failed(broke_off());
        }
    };
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(node = home.node_id, error = %e, "a home node's answer broke off");
            return Sent::Failed(broke_off());
        }
    };
    if status == StatusCode::SERVICE_UNAVAILABLE && error_code(&body) == Some("sqlite_home_moved") {
        return Sent::Retry(moved());
    }
    let mut answer = Response::new(Body::from(body));
    *answer.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some(v) = content_type {
        answer.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    if let Some(v) = retry_after {
        answer.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Sent::Answer(answer)
}

/// A 502 for a forward whose connection broke after it was sent.
fn broke_off() -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "sqlite_home_failed",
        "the connection to the node that holds this user's database broke; the statements may or may not have run",
    )
}

/// Seconds until a home's lease runs out (at least one).
fn lease_seconds(home: &RemoteHome) -> u64 {
    (home.lease_left_ms.max(0) as u64).div_ceil(1000).max(1)
}

/// `error.code` of a JSON error body.
fn error_code(body: &[u8]) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Wrapper<'a> {
        #[serde(borrow)]
        error: Inner<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        code: &'a str,
    }
    serde_json::from_slice::<Wrapper<'_>>(body)
        .ok()
        .map(|w| w.error.code)
}

pub async fn internal_execute(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    internal(state, &headers, body, "execute").await
}

pub async fn internal_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    internal(state, &headers, body, "batch").await
}

/// The home node's side: a forward for `name`, checked, then executed
/// under this node's hold on the user's database.
async fn internal(
    state: AppState,
    headers: &HeaderMap,
    body: Body,
    name: &str,
) -> Result<Response, ApiError> {
    let Some(cluster) = state.sqlite_cluster.clone() else {
        return Err(ApiError::not_found("route"));
    };
    // A user's credentials never open this route, alone or beside a
    // signature.
    if headers.contains_key(header::AUTHORIZATION) {
        return Err(ApiError::unauthorized(
            "invalid_forward",
            "this route takes only signed forwards between valet nodes, never a token",
        ));
    }
    // Nothing is read of a request that is not even shaped like a forward
    // (a signature is 64 hex digits).
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
    if signature.is_none() {
        return Err(ApiError::unauthorized(
            "invalid_forward",
            "this route takes only signed forwards between valet nodes",
        ));
    }
    let limit = state.config.max_body_bytes.saturating_add(64 << 10);
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the forward's body is over the limit (or broke off)",
        )
    })?;
    let forward = forward::open(
        &cluster.key,
        &cluster.nonces,
        signature,
        &body,
        name,
        cluster.homes.node_id(),
        time::now_ms(),
    )?;
    let claims = forward.claims;
    let principal = match (claims.token, claims.run) {
        (Some(token_id), None) => Principal::Token {
            user_id: claims.user.clone(),
            token_id,
        },
        (None, Some(run_id)) => Principal::Run {
            user_id: claims.user.clone(),
            run_id,
            val_id: claims.val,
        },
        _ => {
            return Err(ApiError::bad_request(
                "a forward names either a token or a run",
            ));
        }
    };
    let mut scopes = ScopeSet::EMPTY;
    for scope in &claims.scopes {
        let scope: Scope = scope
            .parse()
            .map_err(|e| ApiError::bad_request(format!("a forward's scope: {e}")))?;
        scopes = scopes.with(scope);
    }
    let call = Call::from_json(name, forward.request)?;
    let grants =
        Caller::forwarded(&state, principal, scopes, call.route().to_owned()).require_sqlite()?;
    let (statements, mode) = call.clone().into_statements()?;
    let fence = cluster.homes.hold(&claims.user, claims.fence).await?;
    let (result, grants) = run(state, grants, statements, mode, Some(fence)).await?;
    match result {
        Ok(results) => call.respond(&results),
        Err(SqlError::NotHome(detail)) => {
            tracing::warn!(
                detail,
                "a forward found this node's hold on a user's database stale"
            );
            Err(moved())
        }
        Err(e) => Err(refusal(&grants, e)),
    }
}
