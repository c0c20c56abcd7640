//! Authentication and scope checks.
//!
//! [`Caller`] is the one extractor: it accepts an API token (`vlt_…`, looked
//! up by hash) or a run token (a JWT whose run must still be running). A
//! handler gets at the caller's user id only through a proof
//! ([`Granted`], [`GrantedSet`]) that valet-store's tenant calls demand, and
//! the only way to get one is a scope check here, which also records the
//! use in the audit log: a route that forgets its check does not compile,
//! and no check goes unrecorded. (`clippy.toml` forbids this crate to make
//! proofs anywhere else.)

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::StatusCode;
use axum::http::request::Parts;
use valet_core::grant::{SqliteRead, SqliteWrite};
use valet_core::{
    ApiToken, ChannelId, Granted, GrantedSet, LiveRunRefusal, Scope, ScopeKind, ScopeSet,
};
use valet_store::{AuditEvent, Principal, SqliteGrants, time};

use crate::{ApiError, AppState};

/// An authenticated caller, not yet checked for any scope. Its principal
/// and scopes are private: proofs are the way out.
#[derive(Clone)]
pub struct Caller {
    principal: Principal,
    scopes: ScopeSet,
    route: String,
    state: AppState,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Caller({:?}, {:?})", self.principal, self.scopes)
    }
}

impl Caller {
    /// Checks scope `S`: a proof, with its use recorded in the audit log,
    /// or a 403 naming the scope.
    pub fn require<S: ScopeKind>(&self) -> Result<Granted<S>, ApiError> {
        self.grant::<S>().ok_or_else(|| self.refuse(S::SCOPE))
    }

    /// Checks that the caller holds every scope of `wanted` (a token, a
    /// val's runs or a change to a val's code never gets more than its
    /// maker holds), recording each as used.
    pub fn require_all(&self, wanted: ScopeSet) -> Result<GrantedSet, ApiError> {
        #[expect(
            clippy::disallowed_methods,
            reason = "the scope check itself, audited below"
        )]
        let proof = GrantedSet::check(self.principal.user_id(), wanted, self.scopes)
            .map_err(ApiError::missing_scope)?;
        for scope in wanted.iter() {
            self.audit(scope);
        }
        Ok(proof)
    }

    /// The part of `wanted` the caller holds, as a proof: for a new val
    /// whose scopes the client cannot name (the hosted SDK's create), so
    /// it gets the defaults cut down to its maker's.
    pub fn require_within(&self, wanted: ScopeSet) -> Result<GrantedSet, ApiError> {
        self.require_all(wanted.intersect(self.scopes))
    }

    /// For the sqlite routes, whose needed access is known only as SQLite
    /// classifies each statement: a caller holding `sqlite:read` or
    /// `sqlite:write`, which hands the store one proof per access used,
    /// each through the audited check.
    pub fn require_sqlite(&self) -> Result<SqliteCaller, ApiError> {
        if self.scopes.contains(Scope::SQLITE_READ) || self.scopes.contains(Scope::SQLITE_WRITE) {
            Ok(SqliteCaller {
                caller: self.clone(),
            })
        } else {
            Err(self.refuse(Scope::SQLITE_READ))
        }
    }

    /// The caller a signed forward from another node vouches for (see
    /// `forward.rs`): the principal that node authenticated, with the
    /// sqlite scopes it holds there and no other. Its proofs are made (and
    /// audited, under `route`) here, as they would have been there.
    pub(crate) fn forwarded(
        state: &AppState,
        principal: Principal,
        scopes: ScopeSet,
        route: String,
    ) -> Caller {
        Caller {
            principal,
            scopes: scopes.intersect(sqlite_scopes()),
            route,
            state: state.clone(),
        }
    }

    /// The check behind every proof: audits what it grants.
    fn grant<S: ScopeKind>(&self) -> Option<Granted<S>> {
        #[expect(
            clippy::disallowed_methods,
            reason = "the scope check itself, audited below"
        )]
        let proof = Granted::<S>::check(self.principal.user_id(), self.scopes)?;
        self.audit(S::SCOPE);
        Some(proof)
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

    fn audit(&self, scope: Scope) {
        self.state.store.audit().record(AuditEvent {
            principal: self.principal.clone(),
            scope,
            route: self.route.clone(),
            at: time::now_ms(),
        });
    }
}

/// A caller with `sqlite:read` or `sqlite:write` (see
/// [`Caller::require_sqlite`]).
pub struct SqliteCaller {
    caller: Caller,
}

impl SqliteCaller {
    /// The 403 for an access the store found missing.
    pub fn refuse(&self, scope: Scope) -> ApiError {
        self.caller.refuse(scope)
    }

    /// Who calls, and which sqlite scopes it holds: what a forward to the
    /// user's home node carries (the home makes the proofs, and audits).
    pub(crate) fn forward_identity(&self) -> (&Principal, ScopeSet) {
        (
            &self.caller.principal,
            self.caller.scopes.intersect(sqlite_scopes()),
        )
    }
}

/// The scopes a forward may carry.
fn sqlite_scopes() -> ScopeSet {
    ScopeSet::EMPTY
        .with(Scope::SQLITE_READ)
        .with(Scope::SQLITE_WRITE)
}

impl SqliteGrants for SqliteCaller {
    fn owner(&self) -> &str {
        self.caller.principal.user_id()
    }

    fn read(&mut self) -> Option<Granted<SqliteRead>> {
        self.caller.grant()
    }

    fn write(&mut self) -> Option<Granted<SqliteWrite>> {
        self.caller.grant()
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let mut headers = parts
        .headers
        .get_all(axum::http::header::AUTHORIZATION)
        .iter();
    let header = headers.next().ok_or_else(|| {
        ApiError::unauthorized("missing_token", "send 'Authorization: Bearer <token>'")
    })?;
    // Two credentials in one request: whichever one a proxy or a framework
    // picks, the answer would depend on it. Refuse to guess.
    if headers.next().is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ambiguous_credentials",
            "send exactly one Authorization header",
        ));
    }
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
    // A cache hit costs a hash lookup; a miss reads the database (and
    // fills the cache).
    let cached = state.store.token_cache().get(&hash);
    let record = match cached {
        Some(record) => Some(record),
        None => state.store.call(move |s| s.token_by_hash(&hash)).await?,
    }
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
