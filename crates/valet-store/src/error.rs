//! The store's one error type.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(postgres::Error),
    /// The database did not answer in time (every connection busy, or
    /// it is down); worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("file system error: {0}")]
    Io(std::io::Error),
    /// The disk under the data dir has no room left (ENOSPC, or SQLite's
    /// `SQLITE_FULL`). Nothing of the write was kept; reads still work.
    #[error("the disk holding valet's data is full: {0}")]
    DiskFull(String),
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

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> StoreError {
        if e.kind() == std::io::ErrorKind::StorageFull
            || e.kind() == std::io::ErrorKind::QuotaExceeded
        {
            StoreError::DiskFull(e.to_string())
        } else {
            StoreError::Io(e)
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        match &e {
            // The control-plane database has no `max_page_count`, so FULL
            // there is always the disk.
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
                StoreError::DiskFull(e.to_string())
            }
            _ => StoreError::Sqlite(e),
        }
    }
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

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        match e.code() {
            Some(code) if *code == postgres::error::SqlState::DISK_FULL => {
                StoreError::DiskFull(e.to_string())
            }
            _ => StoreError::Postgres(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_is_disk_full_not_an_internal_error() {
        let enospc = std::io::Error::from_raw_os_error(28);
        assert!(matches!(StoreError::from(enospc), StoreError::DiskFull(_)));
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert!(matches!(StoreError::from(full), StoreError::DiskFull(_)));
        let other = std::io::Error::from_raw_os_error(13);
        assert!(matches!(StoreError::from(other), StoreError::Io(_)));
    }
}
