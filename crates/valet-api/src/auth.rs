//! Authentication and scope checks.
//!
//! [`Caller`] is the one extractor: it accepts an API token (`vlt_…`, looked
//! up by hash) or a run token (a JWT whose run must still be running). A
//! handler gets at the caller's user id only through a [`Grant`], and the
//! only way to get a `Grant` is a scope check, so a route that forgets its
//! check does not compile.

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::request::Parts;
use valet_core::{ApiToken, ChannelId, LiveRunRefusal, Scope, ScopeSet};
use valet_store::{AuditEvent, Principal, time};

use crate::{ApiError, AppState};

/// An authenticated caller, not yet checked for any scope.
pub struct Caller {
    principal: Principal,
    scopes: ScopeSet,
    route: String,
    state: AppState,
}

/// Proof that the caller holds a scope. Carries the user id that store
/// calls need.
#[derive(Debug, Clone)]
pub struct Grant {
    user_id: String,
    scope: Scope,
}

impl Grant {
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Caller({:?}, {:?})", self.principal, self.scopes)
    }
}

impl Caller {
    pub fn scopes(&self) -> ScopeSet {
        self.scopes
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Checks one scope and records its use in the audit log.
    pub fn require(&self, scope: Scope) -> Result<Grant, ApiError> {
        let grant = self.check(scope)?;
        self.audit(scope);
        Ok(grant)
    }

    /// Checks that the caller holds at least one of `scopes` (the first is
    /// named when it holds none). Records nothing: the handler calls
    /// [`Caller::audit`] with the scope it ends up using.
    pub fn require_any(&self, scopes: &[Scope]) -> Result<Grant, ApiError> {
        match scopes.iter().find(|s| self.scopes.contains(**s)) {
            Some(scope) => Ok(Grant {
                user_id: self.principal.user_id().to_owned(),
                scope: *scope,
            }),
            None => Err(self.refuse(scopes.first().copied().unwrap_or(Scope::USER_READ))),
        }
    }

    /// Checks that `wanted` is within what the caller holds: a token never
    /// hands out more than its maker has.
    pub fn require_all(&self, wanted: ScopeSet) -> Result<(), ApiError> {
        match wanted.minus(self.scopes).iter().next() {
            Some(missing) => Err(ApiError::missing_scope(missing)),
            None => Ok(()),
        }
    }

    fn check(&self, scope: Scope) -> Result<Grant, ApiError> {
        if self.scopes.contains(scope) {
            Ok(Grant {
                user_id: self.principal.user_id().to_owned(),
                scope,
            })
        } else {
            Err(self.refuse(scope))
        }
    }

    /// A 403, and for a run of a val, a scope request its owner can allow.
    pub fn refuse(&self, scope: Scope) -> ApiError {
        if let Principal::Run {
            val_id: Some(val_id),
            ..
        } = &self.principal
        {
            let store = self.state.store.clone();
            let (val_id, route) = (val_id.clone(), self.route.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.record_scope_request(&val_id, scope, &route) {
                    tracing::warn!(error = %e, "could not record a scope request");
                }
            });
        }
        let mut error = ApiError::missing_scope(scope);
        if let Principal::Run {
            val_id: Some(_), ..
        } = &self.principal
        {
            error.message = format!(
                "this val's runs lack the '{scope}' scope; its owner can allow it on the val's settings page"
            );
        }
        error
    }

    pub fn audit(&self, scope: Scope) {
        self.state.store.audit().record(AuditEvent {
            principal: self.principal.clone(),
            scope,
            route: self.route.clone(),
            at: time::now_ms(),
        });
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized("missing_token", "send 'Authorization: Bearer <token>'")
        })?;
    let value = header.to_str().map_err(|_| {
        ApiError::unauthorized("invalid_token", "the Authorization header is not text")
    })?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized(
                "invalid_token",
                "use the Bearer scheme: 'Authorization: Bearer <token>'",
            )
        })?;
    Ok(token.trim())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(|p| format!("{} {}", parts.method, p.as_str()))
            .unwrap_or_else(|| parts.method.to_string());
        let token = bearer(parts)?;
        let (principal, scopes) = if token.starts_with(valet_core::api_token::PREFIX) {
            authenticate_api_token(state, token).await?
        } else {
            authenticate_run_token(state, parts.extensions.get::<ChannelId>(), token)?
        };
        tracing::Span::current().record(
            "principal",
            tracing::field::display(match principal {
                Principal::Token { .. } => "token",
                Principal::Run { .. } => "run",
            }),
        );
        Ok(Caller {
            principal,
            scopes,
            route,
            state: state.clone(),
        })
    }
}

async fn authenticate_api_token(
    state: &AppState,
    text: &str,
) -> Result<(Principal, ScopeSet), ApiError> {
    let token = ApiToken::parse(text)
        .map_err(|e| ApiError::unauthorized("invalid_token", e.to_string()))?;
    let hash = token.hash();
    let record = state
        .store
        .call(move |s| s.token_by_hash(&hash))
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid_token", "this token does not exist; create one with `valet token create` or on /settings/tokens"))?;
    if let Some(reason) = record
        .revoked_reason
        .as_deref()
        .filter(|_| record.is_revoked())
    {
        return Err(ApiError::unauthorized(
            "token_revoked",
            format!("this token was revoked ({reason}); create a new one"),
        ));
    }
    if record.is_expired(time::now_ms()) {
        return Err(ApiError::unauthorized(
            "token_expired",
            "this token has expired; create a new one",
        ));
    }
    let principal = Principal::Token {
        user_id: record.user_id,
        token_id: record.id,
    };
    Ok((principal, record.scopes.effective()))
}

fn authenticate_run_token(
    state: &AppState,
    channel: Option<&ChannelId>,
    token: &str,
) -> Result<(Principal, ScopeSet), ApiError> {
    match state.live_runs.authenticate(token, channel) {
        Ok(run) => Ok((
            Principal::Run {
                user_id: run.user_id,
                run_id: run.run_id,
                val_id: run.val_id,
            },
            run.scopes,
        )),
        Err(LiveRunRefusal::WrongChannel) => Err(ApiError::unauthorized(
            "run_key_elsewhere",
            "a run's valet key works only from inside its own run; use an API token from outside",
        )),
        Err(LiveRunRefusal::NotLive) => {
            // Not a live run's key: say why, from the signature and claims.
            let now = (time::now_ms() / 1000) as u64;
            match state.keys.verify(token, now) {
                Ok(_) => Err(ApiError::unauthorized(
                    "run_ended",
                    "this run token belongs to a run that has ended; run tokens live only as long as their run",
                )),
                Err(e) => Err(ApiError::unauthorized("invalid_token", e.to_string())),
            }
        }
    }
}
