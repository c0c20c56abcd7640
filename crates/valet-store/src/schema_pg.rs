//! Versioned schema migrations of the control plane on PostgreSQL, run at
//! open by whichever node opens the database first.
//!
//! Migration 1 is the SQLite schema as it stands after its own migrations
//! (same tables, same columns, `BIGINT` for integers and `BYTEA` for
//! blobs), so one statement text serves both backends. All pending
//! migrations apply in one transaction under an advisory lock, so nodes
//! starting together neither race nor see half a schema.

use crate::StoreError;
use crate::pg::Pool;
use crate::sql::args;

const MIGRATIONS: &[&str] = &[
    // 1: the control plane.
    r#"
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        email TEXT NOT NULL,
        tier TEXT NOT NULL DEFAULT 'free',
        password_hash TEXT,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE api_tokens (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        hash BYTEA NOT NULL UNIQUE,
        hint TEXT NOT NULL,
        scopes TEXT,
        created_at BIGINT NOT NULL,
        last_used_at BIGINT,
        expires_at BIGINT,
        revoked_at BIGINT,
        revoked_reason TEXT,
        leak_url TEXT,
        migration_state TEXT,
        migration_note TEXT,
        old_scopes TEXT,
        migration_emailed_at BIGINT
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
        timeout_ms BIGINT NOT NULL,
        schedule TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        last_run_at BIGINT,
        UNIQUE(user_id, name)
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id),
        val_id TEXT REFERENCES vals(id) ON DELETE SET NULL,
        trigger TEXT NOT NULL,
        scopes TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        deadline BIGINT NOT NULL,
        ended_at BIGINT,
        exit_detail TEXT,
        logs TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX runs_val ON runs(val_id, started_at);
    CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        user_id TEXT NOT NULL,
        token_id TEXT,
        run_id TEXT,
        scope TEXT NOT NULL,
        route TEXT NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE INDEX audit_token ON audit(token_id, scope, at);
    CREATE INDEX audit_run ON audit(run_id);
    CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        secret BYTEA NOT NULL,
        public BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        retire_at BIGINT
    );
    CREATE TABLE scope_requests (
        val_id TEXT NOT NULL REFERENCES vals(id) ON DELETE CASCADE,
        scope TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        first_at BIGINT NOT NULL,
        last_at BIGINT NOT NULL,
        count BIGINT NOT NULL,
        sample_route TEXT NOT NULL,
        PRIMARY KEY (val_id, scope)
    );
    CREATE TABLE blobs (
        user_id TEXT NOT NULL,
        key BYTEA NOT NULL,
        size BIGINT NOT NULL,
        modified_at BIGINT NOT NULL,
        PRIMARY KEY (user_id, key)
    );
    CREATE TABLE outbox (
        id BIGSERIAL PRIMARY KEY,
        user_id TEXT NOT NULL,
        message TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'queued',
        attempts BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        next_attempt_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        sent_at BIGINT,
        bytes BIGINT NOT NULL DEFAULT 0,
        system BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    CREATE INDEX outbox_user_day ON outbox(user_id, created_at);
    CREATE TABLE token_events (
        id BIGSERIAL PRIMARY KEY,
        token_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE INDEX token_events_token ON token_events(token_id, at);
    CREATE TABLE sessions (
        id_hash BYTEA PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        csrf TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE TABLE server_secrets (
        name TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    "#,
    // 2: a cluster of nodes: leases, the run queue, cron ticks, and which
    // node ran each run.
    r#"
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        started_at BIGINT NOT NULL,
        heartbeat_at TIMESTAMPTZ NOT NULL,
        lease_ms BIGINT NOT NULL
    );
    CREATE TABLE run_queue (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        val_id TEXT NOT NULL,
        trigger TEXT NOT NULL,
        enqueued_at BIGINT NOT NULL
    );
    CREATE INDEX run_queue_order ON run_queue(enqueued_at, id);
    CREATE INDEX run_queue_val ON run_queue(val_id);
    CREATE TABLE cron_fires (
        val_id TEXT NOT NULL,
        slot BIGINT NOT NULL,
        run_id TEXT NOT NULL,
        PRIMARY KEY (val_id, slot)
    );
    ALTER TABLE runs ADD COLUMN node_id TEXT;
    CREATE INDEX runs_running_node ON runs(node_id) WHERE status = 'running';
    CREATE INDEX runs_running_val ON runs(val_id) WHERE status = 'running';
    "#,
    // 3: each user's SQLite database has one home node at a time. A home
    // counts only while its node's lease is alive; `node_id` is NULL once
    // its node was reaped or left. `fence` only ever grows (it is never
    // deleted with its node), so a new holder always writes with a higher
    // token than every holder before it.
    r#"
    ALTER TABLE nodes ADD COLUMN address TEXT;
    CREATE TABLE sqlite_homes (
        user_id TEXT PRIMARY KEY,
        node_id TEXT,
        fence BIGINT NOT NULL
    );
    CREATE INDEX sqlite_homes_node ON sqlite_homes(node_id);
    "#,
];

/// Brings the schema up to date. A no-op on an up-to-date database.
pub(crate) fn run(pool: &Pool) -> Result<(), StoreError> {
    pool.with(|conn| {
        conn.transact(|sql| {
            sql.lock("valet schema migrations")?;
            sql.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version BIGINT PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
                args![],
            )?;
            let version: i64 = sql
                .query_one(
                    "SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) FROM schema_migrations",
                    args![],
                )?
                .get(0)?;
            let version = usize::try_from(version).unwrap_or(usize::MAX);
            if version > MIGRATIONS.len() {
                return Err(StoreError::Invalid(format!(
                    "the database has schema version {version}, newer than this valet ({}); upgrade valet",
                    MIGRATIONS.len()
                )));
            }
            for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
                sql.batch(migration)?;
                sql.execute(
                    "INSERT INTO schema_migrations (version) VALUES (?1)",
                    args![(i + 1) as i64],
                )?;
            }
            Ok(())
        })
    })
}

#[cfg(test)]
pub(crate) fn latest() -> usize {
    MIGRATIONS.len()
}
