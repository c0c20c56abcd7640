//! Scope requests, the iOS-style opt-in: a run refused for a missing scope
//! leaves a request on its val, which the owner can allow or deny.

use rusqlite::{OptionalExtension, params};
use valet_core::grant::{ValScope, ValWrite};
use valet_core::{Granted, GrantedSet, Scope};

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
        self.write(|c| {
            c.execute(
                "INSERT INTO scope_requests (val_id, scope, first_at, last_at, count, sample_route)
                 VALUES (?1, ?2, ?3, ?3, 1, ?4)
                 ON CONFLICT(val_id, scope) DO UPDATE SET last_at = excluded.last_at, count = count + 1,
                     state = CASE WHEN state = 'allowed' THEN 'pending' ELSE state END",
                params![val_id, scope.to_string(), now, route],
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
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT r.scope, r.state, r.first_at, r.last_at, r.count, r.sample_route
                 FROM scope_requests r JOIN vals v ON v.id = r.val_id
                 WHERE r.val_id = ?1 AND v.user_id = ?2 ORDER BY r.last_at DESC",
            )?;
            let rows = stmt.query_map(params![val_id, grant.user_id()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (scope, state, first, last, count, route) = row?;
                out.push(ScopeRequest {
                    scope: scope.parse()?,
                    state: ScopeRequestState::parse(&state),
                    first_at: first,
                    last_at: last,
                    count,
                    sample_route: route,
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
        self.write(|c| {
            // The val's scopes are read inside the transaction that writes
            // them, so a concurrent edit of the val is not lost.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let scopes: String = tx
                .query_row(
                    "SELECT scopes FROM vals WHERE id = ?1 AND user_id = ?2",
                    params![val_id, user_id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("val '{val_id}'")))?;
            let scopes = valet_core::ScopeSet::parse(&scopes)?;
            let n = tx.execute(
                "UPDATE scope_requests SET state = ?1 WHERE val_id = ?2 AND scope = ?3",
                params![
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
                tx.execute(
                    "UPDATE vals SET scopes = ?1, updated_at = ?2 WHERE id = ?3",
                    params![scopes.with(scope).to_claim(), time::now_ms(), val_id],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }
}
