//! The store's one error type.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(#[from] postgres::Error),
    /// The database did not answer in time (every connection busy, or
    /// it is down); worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("file system error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("storage quota exceeded: {used} of {limit} bytes used")]
    QuotaExceeded { used: u64, limit: u64 },
    /// A change would hand on a scope its maker does not hold.
    #[error("this change needs the '{0}' scope, which the caller does not hold")]
    ScopeNotHeld(valet_core::Scope),
    /// The user's daily email allowance is used up.
    #[error("{0}")]
    EmailQuota(crate::outbox::QuotaExceeded),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("background task failed: {0}")]
    Join(String),
}

impl From<valet_core::ScopeError> for StoreError {
    fn from(e: valet_core::ScopeError) -> StoreError {
        StoreError::Corrupt(e.to_string())
    }
}

impl StoreError {
    /// Whether the database refused a row for breaking a uniqueness (or
    /// other) constraint.
    pub(crate) fn is_constraint_violation(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::ConstraintViolation
            }
            StoreError::Postgres(e) => e.code().is_some_and(|c| c.code().starts_with("23")),
            _ => false,
        }
    }
}
