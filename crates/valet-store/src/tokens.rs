//! API tokens as stored: only their SHA-256, never the token itself.

use valet_core::grant::{UserRead, UserScope, UserWrite};
use valet_core::{ApiToken, Granted, ScopeSet, TokenHash, TokenScopes};

use crate::sql::{Row, Sql, args};
use crate::{Store, StoreError, new_id, time};

/// Where a legacy token stands in the scope migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    /// Rewritten to the safe defaults.
    Migrated,
    /// Kept at full scopes because its owner uses `val:write`/`user:write`.
    Held,
    /// Held, then moved to the defaults after the grace period.
    Finished,
}

impl MigrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Migrated => "migrated",
            MigrationState::Held => "held",
            MigrationState::Finished => "finished",
        }
    }

    pub fn parse(s: &str) -> Option<MigrationState> {
        match s {
            "migrated" => Some(MigrationState::Migrated),
            "held" => Some(MigrationState::Held),
            "finished" => Some(MigrationState::Finished),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub hash: TokenHash,
    pub hint: String,
    pub scopes: TokenScopes,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
    pub leak_url: Option<String>,
    pub migration_state: Option<MigrationState>,
    pub migration_note: Option<String>,
}

impl TokenRecord {
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now_ms)
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    pub fn is_active(&self, now_ms: i64) -> bool {
        !self.is_revoked() && !self.is_expired(now_ms)
    }
}

/// A change to a token; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct TokenChange {
    pub name: Option<String>,
    pub scopes: Option<ScopeSet>,
}

pub(crate) const COLUMNS: &str = "id, user_id, name, hash, hint, scopes, created_at, last_used_at, \
     expires_at, revoked_at, revoked_reason, leak_url, migration_state, migration_note";

pub(crate) fn from_row(row: &Row) -> Result<TokenRecord, StoreError> {
    let hash: Vec<u8> = row.get(3)?;
    let hash: [u8; 32] = hash
        .try_into()
        .map_err(|_| StoreError::Corrupt("a token hash of the wrong length".into()))?;
    let scopes: Option<String> = row.get(5)?;
    let scopes = match scopes {
        None => TokenScopes::Legacy,
        Some(text) => TokenScopes::Scoped(ScopeSet::parse(&text)?),
    };
    let state: Option<String> = row.get(12)?;
    Ok(TokenRecord {
        id: row.get(0)?,
        user_id: row.get(1)?,
        name: row.get(2)?,
        hash: TokenHash::from_bytes(hash),
        hint: row.get(4)?,
        scopes,
        created_at: row.get(6)?,
        last_used_at: row.get(7)?,
        expires_at: row.get(8)?,
        revoked_at: row.get(9)?,
        revoked_reason: row.get(10)?,
        leak_url: row.get(11)?,
        migration_state: state.as_deref().and_then(MigrationState::parse),
        migration_note: row.get(13)?,
    })
}

pub(crate) fn scopes_column(scopes: TokenScopes) -> Option<String> {
    match scopes {
        TokenScopes::Legacy => None,
        TokenScopes::Scoped(set) => Some(set.to_claim()),
    }
}

/// Call in every transaction that changes an API token row (but the
/// audit's `last_used_at`, which authentication never reads): the token
/// caches of this process and, through a notification sent when the
/// transaction commits, of every listening node are emptied once it ends.
/// Inserting a token needs none: a cache holds records, never absences.
pub(crate) fn changed(sql: &mut Sql<'_>) -> Result<(), StoreError> {
    if sql.note_tokens_changed() {
        crate::cluster::notify(sql, crate::cluster::TOKENS, "")?;
    }
    Ok(())
}

pub fn validate_token_name(name: &str) -> Result<(), StoreError> {
    if name.trim().is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "invalid token name '{}': use 1-100 printable characters",
            name.escape_debug()
        )));
    }
    Ok(())
}

impl Store {
    /// Creates a token and returns it; this is the only time the token
    /// itself exists outside its owner's hands.
    pub fn create_token(
        &self,
        grant: &Granted<UserWrite>,
        name: &str,
        scopes: TokenScopes,
        expires_at: Option<i64>,
    ) -> Result<(TokenRecord, ApiToken), StoreError> {
        validate_token_name(name)?;
        let token = ApiToken::generate()
            .map_err(|e| StoreError::Invalid(format!("no randomness available: {e}")))?;
        let record = TokenRecord {
            id: new_id("tok"),
            user_id: grant.user_id().to_owned(),
            name: name.to_owned(),
            hash: token.hash(),
            hint: token.hint(),
            scopes,
            created_at: time::now_ms(),
            last_used_at: None,
            expires_at,
            revoked_at: None,
            revoked_reason: None,
            leak_url: None,
            migration_state: None,
            migration_note: None,
        };
        self.db_write(|sql| {
            sql.execute(
                "INSERT INTO api_tokens (id, user_id, name, hash, hint, scopes, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                args![
                    record.id,
                    record.user_id,
                    record.name,
                    &record.hash.as_bytes()[..],
                    record.hint,
                    scopes_column(scopes),
                    record.created_at,
                    record.expires_at
                ],
            )?;
            Ok(())
        })?;
        Ok((record, token))
    }

    /// Tokens of a user in creation order.
    pub fn list_tokens(&self, grant: &Granted<UserRead>) -> Result<Vec<TokenRecord>, StoreError> {
        self.db_read(|sql| {
            sql.query_map(
                &format!("SELECT {COLUMNS} FROM api_tokens WHERE user_id = ?1 ORDER BY seq"),
                args![grant.user_id()],
                from_row,
            )
        })
    }

    /// The token whose hash is `hash`, read from the database; the record
    /// is cached for the next request.
    pub fn token_by_hash(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.token_by_hash_then(hash, || {})
    }

    /// [`Store::token_by_hash`], with `before_fill` run between the read
    /// and the fill (where a concurrent change may land).
    pub(crate) fn token_by_hash_then(
        &self,
        hash: &TokenHash,
        before_fill: impl FnOnce(),
    ) -> Result<Option<TokenRecord>, StoreError> {
        // Before the read: a change that empties the cache after this
        // point keeps what the read returns out of it.
        let generation = self.token_cache().generation();
        let record = self.db_read(|sql| {
            let record = sql
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM api_tokens WHERE hash = ?1"),
                    args![&hash.as_bytes()[..]],
                )?
                .as_ref()
                .map(from_row)
                .transpose()?;
            // The index found the row by hash; compare again in constant time
            // so equality is never decided by a short-circuiting memcmp.
            Ok(record.filter(|r| r.hash.ct_eq(hash)))
        })?;
        before_fill();
        if let Some(record) = &record {
            self.token_cache().put(record, generation);
        }
        Ok(record)
    }

    /// A token of the grant's user; another user's token is "not found".
    pub fn token_of_user<S: UserScope>(
        &self,
        grant: &Granted<S>,
        id: &str,
    ) -> Result<TokenRecord, StoreError> {
        self.db_read(|sql| {
            sql.query_opt(
                &format!("SELECT {COLUMNS} FROM api_tokens WHERE id = ?1 AND user_id = ?2"),
                args![id, grant.user_id()],
            )?
            .as_ref()
            .map(from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("token '{id}'")))
        })
    }

    pub fn token_by_id(&self, id: &str) -> Result<TokenRecord, StoreError> {
        self.db_read(|sql| {
            sql.query_opt(
                &format!("SELECT {COLUMNS} FROM api_tokens WHERE id = ?1"),
                args![id],
            )?
            .as_ref()
            .map(from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("token '{id}'")))
        })
    }

    /// Renames a token and/or replaces its scopes, in one transaction.
    /// A revoked token cannot be changed, whoever asks (the API, the pages'
    /// scope form and "accept the safe defaults", the CLI): that is a
    /// conflict, and nothing is written.
    pub fn update_token(
        &self,
        grant: &Granted<UserWrite>,
        id: &str,
        change: TokenChange,
    ) -> Result<TokenRecord, StoreError> {
        if let Some(name) = &change.name {
            validate_token_name(name)?;
        }
        let user_id = grant.user_id();
        self.db_write(|sql| {
            let current = |sql: &mut crate::sql::Sql<'_>, lock: &str| {
                sql.query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM api_tokens WHERE id = ?1 AND user_id = ?2{lock}"
                    ),
                    args![id, user_id],
                )?
                .as_ref()
                .map(from_row)
                .transpose()?
                .ok_or_else(|| StoreError::NotFound(format!("token '{id}'")))
            };
            let lock = sql.for_update();
            if current(sql, lock)?.is_revoked() {
                return Err(StoreError::Conflict(format!(
                    "token '{id}' is revoked: a revoked token cannot be changed"
                )));
            }
            if let Some(name) = &change.name {
                sql.execute(
                    "UPDATE api_tokens SET name = ?1 WHERE id = ?2 AND user_id = ?3",
                    args![name, id, user_id],
                )?;
            }
            if let Some(scopes) = change.scopes {
                sql.execute(
                    "UPDATE api_tokens SET scopes = ?1,
                         migration_state = CASE WHEN migration_state = 'held' THEN 'finished' ELSE migration_state END
                     WHERE id = ?2 AND user_id = ?3",
                    args![scopes.to_claim(), id, user_id],
                )?;
            }
            changed(sql)?;
            current(sql, "")
        })
    }

    /// Replaces a token's scopes (see [`Store::update_token`]).
    pub fn set_token_scopes(
        &self,
        grant: &Granted<UserWrite>,
        id: &str,
        scopes: ScopeSet,
    ) -> Result<TokenRecord, StoreError> {
        self.update_token(
            grant,
            id,
            TokenChange {
                scopes: Some(scopes),
                ..TokenChange::default()
            },
        )
    }

    /// Revokes a token of `user_id`. Revoking twice keeps the first reason.
    pub fn revoke_token(
        &self,
        grant: &Granted<UserWrite>,
        id: &str,
        reason: &str,
    ) -> Result<TokenRecord, StoreError> {
        let user_id = grant.user_id();
        self.db_write(|sql| {
            let n = sql.execute(
                "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, ?1),
                     revoked_reason = COALESCE(revoked_reason, ?2)
                 WHERE id = ?3 AND user_id = ?4",
                args![time::now_ms(), reason, id, user_id],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("token '{id}'")));
            }
            changed(sql)
        })?;
        self.token_of_user(grant, id)
    }

    /// Notes something that happened to a token (not a scope use).
    pub fn record_token_event(
        &self,
        token_id: &str,
        kind: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.db_write(|sql| {
            sql.execute(
                "INSERT INTO token_events (token_id, kind, detail, at) VALUES (?1, ?2, ?3, ?4)",
                args![token_id, kind, detail, time::now_ms()],
            )?;
            Ok(())
        })
    }

    pub fn token_events(&self, token_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.db_read(|sql| {
            sql.query_map(
                "SELECT kind, detail FROM token_events WHERE token_id = ?1 ORDER BY id",
                args![token_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
    }

    /// Revokes a token reported as leaked. Returns the record and whether
    /// this call revoked it (false when it was revoked already), in one
    /// transaction so two concurrent reports cannot both claim it.
    pub fn revoke_leaked(
        &self,
        hash: &TokenHash,
        url: &str,
    ) -> Result<Option<(TokenRecord, bool)>, StoreError> {
        let revoked_now = self.db_write(|sql| {
            let n = sql.execute(
                "UPDATE api_tokens SET revoked_at = ?1, revoked_reason = 'leaked', leak_url = ?2
                 WHERE hash = ?3 AND revoked_at IS NULL",
                args![time::now_ms(), url, &hash.as_bytes()[..]],
            )?;
            if n == 1 {
                changed(sql)?;
            }
            Ok(n == 1)
        })?;
        Ok(self.token_by_hash(hash)?.map(|r| (r, revoked_now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Backends;

    fn write(user: &str) -> Granted<UserWrite> {
        Granted::for_operator(user)
    }

    fn store(backend: &Backends) -> (Store, String) {
        let store = backend.open();
        let user = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        (store, user.id)
    }

    #[test]
    fn tokens_are_stored_as_hashes_and_found_by_hash() {
        for backend in Backends::all() {
            let (store, user) = store(&backend);
            let (record, token) = store
                .create_token(
                    &write(&user),
                    "ci",
                    TokenScopes::Scoped(ScopeSet::default_val()),
                    None,
                )
                .expect("create");
            let found = store
                .token_by_hash(&token.hash())
                .expect("lookup")
                .expect("found");
            assert_eq!(found.id, record.id);
            assert_eq!(found.scopes, TokenScopes::Scoped(ScopeSet::default_val()));
            if let Backends::Sqlite(_) = backend {
                let raw = std::fs::read(store.db_path()).expect("read db");
                let needle = token.expose().as_bytes();
                assert!(
                    !raw.windows(needle.len()).any(|w| w == needle),
                    "token in plain text on disk"
                );
            }
        }
    }

    #[test]
    fn legacy_tokens_have_no_scope_list() {
        for backend in Backends::all() {
            let (store, user) = store(&backend);
            let (_, token) = store
                .create_token(&write(&user), "old", TokenScopes::Legacy, None)
                .expect("create");
            let found = store
                .token_by_hash(&token.hash())
                .expect("lookup")
                .expect("found");
            assert_eq!(found.scopes, TokenScopes::Legacy);
        }
    }

    #[test]
    fn other_users_tokens_are_not_found() {
        for backend in Backends::all() {
            let (store, user) = store(&backend);
            let bob = store
                .create_user("bob", "bob@example.com", None)
                .expect("bob");
            let (record, _) = store
                .create_token(
                    &write(&user),
                    "ci",
                    TokenScopes::Scoped(ScopeSet::EMPTY),
                    None,
                )
                .expect("create");
            assert!(matches!(
                store.revoke_token(&write(&bob.id), &record.id, "x"),
                Err(StoreError::NotFound(_))
            ));
            assert!(
                store
                    .token_of_user(&write(&user), &record.id)
                    .expect("own")
                    .revoked_at
                    .is_none()
            );
        }
    }

    #[test]
    fn a_revoked_token_cannot_be_changed() {
        for backend in Backends::all() {
            let (store, user) = store(&backend);
            let (record, _) = store
                .create_token(&write(&user), "old", TokenScopes::Legacy, None)
                .expect("create");
            let renamed = store
                .update_token(
                    &write(&user),
                    &record.id,
                    TokenChange {
                        name: Some("renamed".into()),
                        scopes: Some(ScopeSet::default_val()),
                    },
                )
                .expect("a live token changes");
            assert_eq!(renamed.name, "renamed");
            assert_eq!(renamed.scopes, TokenScopes::Scoped(ScopeSet::default_val()));
            store
                .revoke_token(&write(&user), &record.id, "by its owner")
                .expect("revoke");
            let changes = [
                TokenChange {
                    name: Some("revived".into()),
                    scopes: None,
                },
                TokenChange {
                    name: None,
                    scopes: Some(ScopeSet::all()),
                },
                TokenChange::default(),
            ];
            for change in changes {
                let err = store
                    .update_token(&write(&user), &record.id, change.clone())
                    .expect_err("revoked");
                assert!(
                    matches!(&err, StoreError::Conflict(m) if m.contains("a revoked token cannot be changed")),
                    "{change:?}: {err}"
                );
            }
            assert!(matches!(
                store.set_token_scopes(&write(&user), &record.id, ScopeSet::default_val()),
                Err(StoreError::Conflict(_))
            ));
            let after = store
                .token_of_user(&write(&user), &record.id)
                .expect("read");
            assert_eq!(after.name, "renamed");
            assert_eq!(after.scopes, TokenScopes::Scoped(ScopeSet::default_val()));
            // Another user's token is still "not found", not "revoked".
            let bob = store
                .create_user("bob", "bob@example.com", None)
                .expect("bob");
            assert!(matches!(
                store.update_token(&write(&bob.id), &record.id, TokenChange::default()),
                Err(StoreError::NotFound(_))
            ));
        }
    }

    #[test]
    fn revoke_leaked_is_idempotent() {
        for backend in Backends::all() {
            let (store, user) = store(&backend);
            let (_, token) = store
                .create_token(
                    &write(&user),
                    "ci",
                    TokenScopes::Scoped(ScopeSet::EMPTY),
                    None,
                )
                .expect("create");
            let (first, revoked) = store
                .revoke_leaked(&token.hash(), "https://x")
                .expect("r")
                .expect("some");
            assert!(revoked);
            assert_eq!(first.revoked_reason.as_deref(), Some("leaked"));
            let (_, again) = store
                .revoke_leaked(&token.hash(), "https://y")
                .expect("r")
                .expect("some");
            assert!(!again);
            let unknown = ApiToken::generate().expect("rng");
            assert!(
                store
                    .revoke_leaked(&unknown.hash(), "u")
                    .expect("r")
                    .is_none()
            );
        }
    }
}
