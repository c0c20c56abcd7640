//! The store's one error type.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
