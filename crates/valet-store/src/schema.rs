//! Versioned schema migrations of the control-plane database, run at open.
//!
//! Each entry is applied once, in order, inside one transaction together
//! with the bump of `PRAGMA user_version`, so a crash leaves either the old
//! schema or the new one.

use rusqlite::Connection;

use crate::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: the control plane.
    r#"
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        email TEXT NOT NULL,
        tier TEXT NOT NULL DEFAULT 'free',
        password_hash TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE api_tokens (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        hash BLOB NOT NULL UNIQUE,
        hint TEXT NOT NULL,
        scopes TEXT,               -- NULL: a legacy token made before scopes existed
        created_at INTEGER NOT NULL,
        last_used_at INTEGER,
        expires_at INTEGER,
        revoked_at INTEGER,
        revoked_reason TEXT,
        leak_url TEXT,
        migration_state TEXT,      -- NULL, 'migrated', 'held', 'finished'
        migration_note TEXT,
        old_scopes TEXT,           -- scopes before the migration, for --revert
        migration_emailed_at INTEGER
    );
    CREATE INDEX api_tokens_user ON api_tokens(user_id, seq);
    CREATE TABLE vals (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        code TEXT NOT NULL,
        scopes TEXT NOT NULL,
        env TEXT NOT NULL DEFAULT '{}',
        timeout_ms INTEGER NOT NULL,
        schedule TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_run_at INTEGER,
        UNIQUE(user_id, name)
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id),
        val_id TEXT REFERENCES vals(id) ON DELETE SET NULL,
        trigger TEXT NOT NULL,
        scopes TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        deadline INTEGER NOT NULL,
        ended_at INTEGER,
        exit_detail TEXT,
        logs TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX runs_val ON runs(val_id, started_at);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        user_id TEXT NOT NULL,
        token_id TEXT,
        run_id TEXT,
        scope TEXT NOT NULL,
        route TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX audit_token ON audit(token_id, scope, at);
    CREATE INDEX audit_run ON audit(run_id);
    CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        secret BLOB NOT NULL,
        public BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        retire_at INTEGER          -- NULL: the current key
    );
    CREATE TABLE scope_requests (
        val_id TEXT NOT NULL REFERENCES vals(id) ON DELETE CASCADE,
        scope TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        first_at INTEGER NOT NULL,
        last_at INTEGER NOT NULL,
        count INTEGER NOT NULL,
        sample_route TEXT NOT NULL,
        PRIMARY KEY (val_id, scope)
    );
    CREATE TABLE blobs (
        user_id TEXT NOT NULL,
        key BLOB NOT NULL,
        size INTEGER NOT NULL,
        modified_at INTEGER NOT NULL,
        PRIMARY KEY (user_id, key)
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        user_id TEXT NOT NULL,
        message TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'queued',
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        next_attempt_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        sent_at INTEGER
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    "#,
    // 2: events in a token's life that are not scope uses (a leak report).
    r#"
    CREATE TABLE token_events (
        id INTEGER PRIMARY KEY,
        token_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX token_events_token ON token_events(token_id, at);
    "#,
    // 3: browser sessions and server secrets.
    r#"
    CREATE TABLE sessions (
        id_hash BLOB PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        csrf TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE TABLE server_secrets (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    "#,
    // 4: the daily email quota: each message's size, whether valet itself
    // sent it (not counted), and an index to count a user's day.
    r#"
    ALTER TABLE outbox ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN system INTEGER NOT NULL DEFAULT 0;
    UPDATE outbox SET bytes = length(CAST(message AS BLOB));
    CREATE INDEX outbox_user_day ON outbox(user_id, created_at);
    "#,
    // 5: the file each blob row points to. NULL: a blob written before,
    // whose file is named by the SHA-256 of its key.
    r#"
    ALTER TABLE blobs ADD COLUMN file TEXT;
    "#,
    // 6: which node ran a run (always this one on SQLite; kept so that
    // both control planes share their statements).
    r#"
    ALTER TABLE runs ADD COLUMN node_id TEXT;
    "#,
];

/// Brings the schema up to date. A no-op on an up-to-date database.
pub fn run(conn: &mut Connection) -> Result<(), StoreError> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Invalid(format!(
            "the database has schema version {version}, newer than this valet ({}); upgrade valet",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
pub fn latest() -> usize {
    MIGRATIONS.len()
}
