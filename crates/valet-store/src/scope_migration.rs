//! The scope migration: legacy tokens (no scope list, meaning "everything")
//! move to the safe defaults, except tokens whose audit shows `val:write` or
//! `user:write` in use: those are held at full scopes, flagged, and their
//! owners emailed once.
//!
//! Work goes in batches, one transaction each, ordered by a cursor, so a
//! crash loses at most the batch in flight and a re-run continues where the
//! last one stopped. Owners are emailed in a last phase, one transaction per
//! owner that both queues the email and marks the tokens as emailed: no
//! owner is emailed twice, and none is forgotten.

use std::collections::BTreeMap;

use valet_core::ScopeSet;

use crate::outbox::{DEFAULT_EMAIL_FROM, enqueue_in, system_message};
use crate::sql::{Sql, args};
use crate::{Store, StoreError, time, tokens};

/// What the migration does and how.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    pub dry_run: bool,
    /// How far back a use of `val:write`/`user:write` holds a token.
    pub window_ms: i64,
    pub batch_size: usize,
    /// Stop after this many batches, as a crash would (tests).
    pub stop_after_batches: Option<usize>,
    /// The server's URL, for links in the emails.
    pub public_url: String,
    /// The address the emails come from (valet's configured sender).
    pub email_from: String,
}

impl Default for MigrationOptions {
    fn default() -> MigrationOptions {
        MigrationOptions {
            dry_run: false,
            window_ms: 90 * 86_400_000,
            batch_size: 500,
            stop_after_batches: None,
            public_url: "http://127.0.0.1:7070".into(),
            email_from: DEFAULT_EMAIL_FROM.into(),
        }
    }
}

/// One token the migration held back, for the report.
#[derive(Debug, Clone)]
pub struct HeldToken {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub reason: String,
    pub last_use: String,
}

/// What a migration run did (or, dry, would do). `valet migrate scopes
/// --json` writes it out (valet-cli, `cmd/migrate.rs`).
#[derive(Debug, Clone, Default)]
pub struct MigrationSummary {
    pub dry_run: bool,
    /// Live legacy tokens moved to the safe defaults by this run.
    pub migrated: u64,
    /// Live legacy tokens held at full scopes by this run.
    pub held: u64,
    /// Held by an earlier run and still held.
    pub previously_held: u64,
    /// Tokens that already had a scope list (including earlier migrations).
    pub already_scoped: u64,
    pub skipped_revoked: u64,
    pub skipped_expired: u64,
    pub owners_emailed: u64,
    pub batches: u64,
    /// True when the run stopped early (`stop_after_batches`); re-run to finish.
    pub interrupted: bool,
    pub held_tokens: Vec<HeldToken>,
}

impl MigrationSummary {
    /// `migrated 9,900 of 10,000 legacy tokens (99.0%); held 100 (val:write in use)`.
    pub fn headline(&self) -> String {
        let live = self.migrated + self.held;
        let share = if live == 0 {
            100.0
        } else {
            self.migrated as f64 * 100.0 / live as f64
        };
        let verb = if self.dry_run {
            "would migrate"
        } else {
            "migrated"
        };
        let held = if self.dry_run { "would hold" } else { "held" };
        format!(
            "{verb} {} of {} legacy tokens ({share:.1}%); {held} {} (val:write or user:write in use); \
             already scoped {}; skipped {} revoked and {} expired; {} held earlier; {} owners emailed",
            thousands(self.migrated),
            thousands(live),
            thousands(self.held),
            thousands(self.already_scoped),
            thousands(self.skipped_revoked),
            thousands(self.skipped_expired),
            thousands(self.previously_held),
            thousands(self.owners_emailed),
        )
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Candidate {
    seq: i64,
    id: String,
    user_id: String,
    name: String,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
}

/// The last use of a risky scope by `token_id` since `since`, if any.
fn risky_use(
    sql: &mut Sql<'_>,
    token_id: &str,
    since: i64,
) -> Result<Option<(String, i64)>, StoreError> {
    sql.query_opt(
        "SELECT scope, at FROM audit WHERE token_id = ?1 AND scope IN ('val:write', 'user:write') AND at >= ?2
         ORDER BY at DESC LIMIT 1",
        args![token_id, since],
    )?
    .map(|r| Ok((r.get(0)?, r.get(1)?)))
    .transpose()
}

impl Store {
    /// Runs (or with `dry_run`, plans) the migration. `progress` is called
    /// after each batch with (tokens done, legacy tokens in all).
    pub fn migrate_scopes(
        &self,
        options: &MigrationOptions,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<MigrationSummary, StoreError> {
        let now = time::now_ms();
        let since = now - options.window_ms;
        let mut summary = MigrationSummary {
            dry_run: options.dry_run,
            ..Default::default()
        };
        let (total, already_scoped, previously_held) = self.db_read(|sql| {
            let r = sql.query_one(
                "SELECT
                    (SELECT COUNT(*) FROM api_tokens WHERE scopes IS NULL AND migration_state IS NULL),
                    (SELECT COUNT(*) FROM api_tokens WHERE scopes IS NOT NULL),
                    (SELECT COUNT(*) FROM api_tokens WHERE scopes IS NULL AND migration_state = 'held')",
                args![],
            )?;
            Ok((r.get::<i64>(0)? as u64, r.get::<i64>(1)? as u64, r.get::<i64>(2)? as u64))
        })?;
        summary.already_scoped = already_scoped;
        summary.previously_held = previously_held;
        let defaults = ScopeSet::default_val().to_claim();
        let mut cursor = 0i64;
        let mut done = 0u64;
        loop {
            if options
                .stop_after_batches
                .is_some_and(|n| summary.batches as usize >= n)
            {
                summary.interrupted = true;
                return Ok(summary);
            }
            let dry_run = options.dry_run;
            let mut batch = |tx: &mut Sql<'_>| -> Result<Option<i64>, StoreError> {
                let candidates: Vec<Candidate> = tx.query_map(
                    "SELECT seq, id, user_id, name, expires_at, revoked_at FROM api_tokens
                     WHERE scopes IS NULL AND migration_state IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2",
                    args![cursor, options.batch_size as i64],
                    |r| {
                        Ok(Candidate {
                            seq: r.get(0)?,
                            id: r.get(1)?,
                            user_id: r.get(2)?,
                            name: r.get(3)?,
                            expires_at: r.get(4)?,
                            revoked_at: r.get(5)?,
                        })
                    },
                )?;
                let Some(last) = candidates.last().map(|c| c.seq) else {
                    return Ok(None);
                };
                for t in &candidates {
                    if t.revoked_at.is_some() {
                        summary.skipped_revoked += 1;
                    } else if t.expires_at.is_some_and(|at| at <= now) {
                        summary.skipped_expired += 1;
                    } else if let Some((scope, at)) = risky_use(tx, &t.id, since)? {
                        summary.held += 1;
                        let reason = format!(
                            "{scope} used in the last {} days",
                            options.window_ms / 86_400_000
                        );
                        summary.held_tokens.push(HeldToken {
                            id: t.id.clone(),
                            user_id: t.user_id.clone(),
                            name: t.name.clone(),
                            reason: reason.clone(),
                            last_use: time::iso(at),
                        });
                        if !dry_run {
                            tx.execute(
                                "UPDATE api_tokens SET migration_state = 'held', migration_note = ?1 WHERE id = ?2",
                                args![format!("{reason}; last use {}", time::iso(at)), t.id],
                            )?;
                            tokens::changed(tx)?;
                        }
                    } else {
                        summary.migrated += 1;
                        if !dry_run {
                            tx.execute(
                                "UPDATE api_tokens SET scopes = ?1, old_scopes = 'legacy', migration_state = 'migrated',
                                     migration_note = 'moved to the safe defaults' WHERE id = ?2",
                                args![defaults, t.id],
                            )?;
                            tokens::changed(tx)?;
                        }
                    }
                }
                done += candidates.len() as u64;
                Ok(Some(last))
            };
            // A dry run only reads; a real batch is one transaction.
            let next = if dry_run {
                self.db_read(&mut batch)?
            } else {
                self.db_write(&mut batch)?
            };
            let Some(last) = next else { break };
            cursor = last;
            summary.batches += 1;
            progress(done, total);
        }
        if !options.dry_run {
            summary.owners_emailed = self.email_held_owners(options, false)?;
        }
        Ok(summary)
    }

    /// Emails each owner of held tokens not yet told, once: one
    /// transaction per owner queues the email and marks the tokens.
    fn email_held_owners(
        &self,
        options: &MigrationOptions,
        finished: bool,
    ) -> Result<u64, StoreError> {
        let state = if finished { "finished" } else { "held" };
        let pending: Vec<(String, String, String, String)> = self.db_read(|sql| {
            sql.query_map(
                "SELECT t.user_id, t.id, t.name, COALESCE(t.migration_note, '') FROM api_tokens t
                 WHERE t.migration_state = ?1 AND t.migration_emailed_at IS NULL ORDER BY t.user_id, t.seq",
                args![state],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
        })?;
        let mut by_owner: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
        for (user, id, name, note) in pending {
            by_owner.entry(user).or_default().push((id, name, note));
        }
        let mut emailed = 0;
        for (user_id, tokens) in by_owner {
            let Some(owner) = self.user_by_id(&user_id)? else {
                continue;
            };
            let list: Vec<String> = tokens
                .iter()
                .map(|(id, name, note)| format!("  - \"{name}\" ({id}): {note}"))
                .collect();
            let (subject, text) = if finished {
                (
                    "Your held valet API tokens now have the safe default scopes".to_owned(),
                    format!(
                        "Hello {},\n\nThese tokens were held at full access while you used val:write or user:write.\n\
                         The grace period is over, so they now have the safe default scopes (everything but\n\
                         val:write and user:write):\n\n{}\n\n\
                         If one of them needs val:write, create a new token that asks for it explicitly:\n  \
                         {}/settings/tokens\n",
                        owner.username,
                        list.join("\n"),
                        options.public_url
                    ),
                )
            } else {
                (
                    "Action needed: some of your valet API tokens keep full access for now"
                        .to_owned(),
                    format!(
                        "Hello {},\n\nvalet moved API tokens made before scopes existed to safe default scopes\n\
                         (everything but val:write and user:write). These tokens of yours were held back at\n\
                         full access because they were recently used to change vals or your account:\n\n{}\n\n\
                         To upgrade, either create a new token with val:write (or user:write) explicitly and\n\
                         retire the old one, or accept the safe defaults for it on {}/settings/tokens.\n\
                         Held tokens will be moved to the defaults after the grace period.\n",
                        owner.username,
                        list.join("\n"),
                        options.public_url
                    ),
                )
            };
            let message = system_message("valet", &options.email_from, &owner.email, subject, text)
                .map_err(|e| StoreError::Invalid(format!("the migration email: {e}")))?;
            let json =
                serde_json::to_string(&message).map_err(|e| StoreError::Invalid(e.to_string()))?;
            self.db_write(|sql| {
                enqueue_in(sql, &user_id, &json, true)?;
                for (id, _, _) in &tokens {
                    sql.execute(
                        "UPDATE api_tokens SET migration_emailed_at = ?1 WHERE id = ?2",
                        args![time::now_ms(), id],
                    )?;
                }
                tokens::changed(sql)
            })?;
            emailed += 1;
        }
        Ok(emailed)
    }

    /// Undoes the migration of one token: it becomes legacy again.
    pub fn revert_migration(&self, token_id: &str) -> Result<(), StoreError> {
        self.db_write(|sql| {
            let n = sql.execute(
                "UPDATE api_tokens SET scopes = NULL, old_scopes = NULL, migration_state = NULL,
                     migration_note = NULL, migration_emailed_at = NULL
                 WHERE id = ?1 AND old_scopes = 'legacy' AND migration_state IN ('migrated', 'finished')",
                args![token_id],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("migrated token '{token_id}'")));
            }
            tokens::changed(sql)
        })
    }

    /// After the grace period: held tokens whose owners did nothing move to
    /// the defaults, and their owners get a second email.
    pub fn finish_held(&self, options: &MigrationOptions) -> Result<u64, StoreError> {
        let defaults = ScopeSet::default_val().to_claim();
        let moved = self.db_write(|sql| {
            let moved = sql.execute(
                "UPDATE api_tokens SET scopes = ?1, old_scopes = 'legacy', migration_state = 'finished',
                     migration_note = 'moved to the safe defaults after the grace period', migration_emailed_at = NULL
                 WHERE scopes IS NULL AND migration_state = 'held' AND revoked_at IS NULL",
                args![defaults],
            )?;
            if moved > 0 {
                tokens::changed(sql)?;
            }
            Ok(moved)
        })?;
        self.email_held_owners(options, true)?;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditEvent, Principal};
    use valet_core::{Granted, Scope, TokenScopes};

    #[test]
    fn headline_reads_like_a_sentence() {
        let s = MigrationSummary {
            migrated: 9_900,
            held: 100,
            ..Default::default()
        };
        assert!(
            s.headline()
                .starts_with("migrated 9,900 of 10,000 legacy tokens (99.0%); held 100"),
            "{}",
            s.headline()
        );
    }

    #[test]
    fn held_and_migrated_and_revert() {
        for backend in crate::testing::Backends::all() {
            held_migrated_reverted(&backend.open());
        }
    }

    fn held_migrated_reverted(store: &Store) {
        let user = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        let (writer, _) = store
            .create_token(
                &Granted::for_operator(&user.id),
                "deploy",
                TokenScopes::Legacy,
                None,
            )
            .expect("t");
        let (reader, _) = store
            .create_token(
                &Granted::for_operator(&user.id),
                "read",
                TokenScopes::Legacy,
                None,
            )
            .expect("t");
        store
            .insert_audit_rows(&[AuditEvent {
                principal: Principal::Token {
                    user_id: user.id.clone(),
                    token_id: writer.id.clone(),
                },
                scope: Scope::VAL_WRITE,
                route: "POST /v1/vals".into(),
                at: time::now_ms(),
            }])
            .expect("audit");
        let options = MigrationOptions {
            email_from: "ops@valet.example".into(),
            ..MigrationOptions::default()
        };
        let summary = store.migrate_scopes(&options, |_, _| {}).expect("migrate");
        assert_eq!(
            (summary.migrated, summary.held, summary.owners_emailed),
            (1, 1, 1)
        );
        // The owner's email comes from the configured sender.
        let emails = store
            .list_emails(&Granted::for_operator(&user.id), 10)
            .expect("emails");
        assert_eq!(emails.len(), 1);
        assert_eq!(emails[0].message.from(), "\"valet\" <ops@valet.example>");
        assert_eq!(
            store.token_by_id(&reader.id).expect("t").scopes,
            TokenScopes::Scoped(ScopeSet::default_val())
        );
        assert_eq!(
            store.token_by_id(&writer.id).expect("t").scopes,
            TokenScopes::Legacy
        );
        store.revert_migration(&reader.id).expect("revert");
        assert_eq!(
            store.token_by_id(&reader.id).expect("t").scopes,
            TokenScopes::Legacy
        );
        assert!(
            store.revert_migration(&writer.id).is_err(),
            "a held token was not migrated"
        );
    }
}
