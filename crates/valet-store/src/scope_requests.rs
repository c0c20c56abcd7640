//! Scope requests, the iOS-style opt-in: a run refused for a missing scope
//! leaves a request on its val, which the owner can allow or deny.

use valet_core::grant::{ValScope, ValWrite};
use valet_core::{Granted, GrantedSet, Scope};

use crate::sql::args;
use crate::{Store, StoreError, time};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeRequestState {
    Pending,
    Allowed,
    Denied,
}

impl ScopeRequestState {
    /// The word stored in the `state` column (and shown by the API).
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeRequestState::Pending => "pending",
            ScopeRequestState::Allowed => "allowed",
            ScopeRequestState::Denied => "denied",
        }
    }

    fn parse(s: &str) -> ScopeRequestState {
        match s {
            "allowed" => ScopeRequestState::Allowed,
            "denied" => ScopeRequestState::Denied,
            _ => ScopeRequestState::Pending,
        }
    }
}

/// A scope request as stored. Times are unix milliseconds.
#[derive(Debug, Clone)]
pub struct ScopeRequest {
    pub scope: Scope,
    pub state: ScopeRequestState,
    pub first_at: i64,
    pub last_at: i64,
    pub count: i64,
    pub sample_route: String,
}

impl Store {
    /// Notes that a run of `val_id` was refused `scope`. A denied request
    /// stays denied (silenced) but keeps counting.
    pub fn record_scope_request(
        &self,
        val_id: &str,
        scope: Scope,
        route: &str,
    ) -> Result<(), StoreError> {
        let now = time::now_ms();
        self.db_write(|sql| {
            sql.execute(
                "INSERT INTO scope_requests (val_id, scope, first_at, last_at, count, sample_route)
                 VALUES (?1, ?2, ?3, ?3, 1, ?4)
                 ON CONFLICT(val_id, scope) DO UPDATE SET last_at = excluded.last_at,
                     count = scope_requests.count + 1,
                     state = CASE WHEN scope_requests.state = 'allowed' THEN 'pending'
                                  ELSE scope_requests.state END",
                args![val_id, scope.to_string(), now, route],
            )?;
            Ok(())
        })
    }

    /// The requests left on a val of the grant's user (none for anyone
    /// else's val).
    pub fn scope_requests<S: ValScope>(
        &self,
        grant: &Granted<S>,
        val_id: &str,
    ) -> Result<Vec<ScopeRequest>, StoreError> {
        self.db_read(|sql| {
            let rows = sql.query(
                "SELECT r.scope, r.state, r.first_at, r.last_at, r.count, r.sample_route
                 FROM scope_requests r JOIN vals v ON v.id = r.val_id
                 WHERE r.val_id = ?1 AND v.user_id = ?2 ORDER BY r.last_at DESC",
                args![val_id, grant.user_id()],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let scope: String = r.get(0)?;
                let state: String = r.get(1)?;
                out.push(ScopeRequest {
                    scope: scope.parse()?,
                    state: ScopeRequestState::parse(&state),
                    first_at: r.get(2)?,
                    last_at: r.get(3)?,
                    count: r.get(4)?,
                    sample_route: r.get(5)?,
                });
            }
            Ok(out)
        })
    }

    /// Allows (adding the scope to the val) or denies a request, in one
    /// transaction. Allowing hands the val's runs the scope, so `cover`
    /// must prove that the caller holds it.
    pub fn decide_scope_request(
        &self,
        grant: &Granted<ValWrite>,
        cover: &GrantedSet,
        val_id: &str,
        scope: Scope,
        allow: bool,
    ) -> Result<(), StoreError> {
        if allow && (cover.user_id() != grant.user_id() || !cover.scopes().contains(scope)) {
            return Err(StoreError::ScopeNotHeld(scope));
        }
        let user_id = grant.user_id();
        self.db_write(|sql| {
            // The val's scopes are read inside the transaction that writes
            // them, so a concurrent edit of the val is not lost.
            let lock = sql.for_update();
            let scopes: String = sql
                .query_opt(
                    &format!("SELECT scopes FROM vals WHERE id = ?1 AND user_id = ?2{lock}"),
                    args![val_id, user_id],
                )?
                .ok_or_else(|| StoreError::NotFound(format!("val '{val_id}'")))?
                .get(0)?;
            let scopes = valet_core::ScopeSet::parse(&scopes)?;
            let n = sql.execute(
                "UPDATE scope_requests SET state = ?1 WHERE val_id = ?2 AND scope = ?3",
                args![
                    if allow { "allowed" } else { "denied" },
                    val_id,
                    scope.to_string()
                ],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!(
                    "scope request '{scope}' on val '{val_id}'"
                )));
            }
            if allow {
                sql.execute(
                    "UPDATE vals SET scopes = ?1, updated_at = ?2 WHERE id = ?3",
                    args![scopes.with(scope).to_claim(), time::now_ms(), val_id],
                )?;
            }
            Ok(())
        })
    }
}
