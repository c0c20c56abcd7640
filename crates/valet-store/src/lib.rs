//! valet's persistence: the control-plane database (users, vals, tokens,
//! runs, audit, signing keys, scope requests, outbox) on SQLite or on a
//! PostgreSQL that several nodes share, the per-user blob store and the
//! per-user SQLite databases.
//!
//! Everything here is synchronous. Async callers go through
//! [`Store::call`], which runs the closure on tokio's blocking pool, so a
//! disk write never stalls an async worker.

mod audit;
mod blob_objects;
mod blobs;
mod cluster;
mod db;
mod error;
mod keys;
mod leaks;
mod outbox;
mod pg;
mod runs;
mod schema;
mod schema_pg;
mod scope_migration;
mod scope_requests;
mod sessions;
mod sql;
mod sqlite_homes;
#[cfg(test)]
mod testing;
pub mod time;
mod token_cache;
mod tokens;
mod user_sqlite;
mod users;
mod val_cache;
mod vals;

pub use audit::{AuditEvent, AuditSink, Principal};
pub use blobs::{BlobKey, BlobMeta, BlobStore};
pub use cluster::{ClaimedRun, ClusterEvent, DeadNode};
pub use db::{Store, StoreOptions};
pub use error::StoreError;
pub use keys::{ROTATION_OVERLAP_MS, SigningKeyInfo};
pub use leaks::{LeakOutcome, report_leak};
pub use outbox::{
    DEFAULT_EMAIL_FROM, EmailDraft, EmailError, EmailMessage, EmailQuota, OutboxEntry,
    OutboxStatus, QuotaExceeded, check_custom_header, system_message,
};
pub use scope_migration::{HeldToken, MigrationOptions, MigrationSummary};
pub use users::validate_email;
/// Types that make up an [`EmailMessage`].
pub mod outbox_types {
    pub use crate::outbox::Attachment;
}
pub use runs::{NewRun, Outcome, RunEnd, RunRecord, RunStart};
pub use scope_requests::{ScopeRequest, ScopeRequestState};
pub use sessions::Session;
pub use sqlite_homes::{HomeClaim, SqliteHome};
pub use token_cache::TokenCache;
pub use tokens::{MigrationState, TokenChange, TokenRecord};
pub use user_sqlite::{
    BatchMode, HeldSqliteGrants, HomeFence, SqlArgs, SqlError, SqlLimits, SqlResult, SqlStatement,
    SqlValue, SqliteGrants, StatementAccess, UserDatabases,
};
pub use users::{Tier, User};
pub use vals::{NewVal, Val, ValKind, ValPatch};

/// A fresh id with a readable prefix: `tok_0193…`. UUIDv7, so ids sort by
/// creation time.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
