//! API token records cached in memory, so that authenticating a request
//! costs a hash lookup instead of a blocking-pool hop and a SQLite read.
//!
//! Correctness comes first: every change to the `api_tokens` table made
//! through this process's writer (revoke, re-scope, migration, leak report)
//! empties the cache at once, through SQLite's update hook on the writer
//! connection, so a revoked token is refused on the very next request.
//! Changes made by another process on the same data dir (`valet token
//! revoke` beside a running `valet serve`) are seen within [`TTL`]; expiry
//! is checked on every use, cached or not.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use valet_core::TokenHash;

use crate::TokenRecord;

/// How long a cached record is trusted without a look at the database.
pub const TTL: Duration = Duration::from_secs(1);
/// Entries kept at most; the cache empties when full.
const CAPACITY: usize = 10_000;

#[derive(Default)]
pub struct TokenCache {
    /// A std `Mutex`: held for a map operation only, never across an
    /// `.await` (and taken inside SQLite's update hook).
    entries: Mutex<HashMap<[u8; 32], (TokenRecord, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, hash: &TokenHash) -> Option<TokenRecord> {
        let entries = self.entries.lock().ok()?;
        let (record, at) = entries.get(hash.as_bytes())?;
        (at.elapsed() < TTL && record.hash.ct_eq(hash)).then(|| record.clone())
    }

    pub fn put(&self, record: &TokenRecord) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CAPACITY {
                entries.clear();
            }
            entries.insert(*record.hash.as_bytes(), (record.clone(), Instant::now()));
        }
    }

    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}
