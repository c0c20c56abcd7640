//! Browser sessions (stored by hash, so a database leak is not a login)
//! and server secrets such as the cookie-signing key.

use sha2::{Digest, Sha256};

use crate::sql::args;
use crate::{Store, StoreError, time};

#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    pub csrf: String,
    pub expires_at: i64,
}

fn hash(id: &str) -> Vec<u8> {
    Sha256::digest(id.as_bytes()).to_vec()
}

impl Store {
    pub fn create_session(
        &self,
        id: &str,
        user_id: &str,
        csrf: &str,
        ttl_ms: i64,
    ) -> Result<(), StoreError> {
        let now = time::now_ms();
        self.db_write(|sql| {
            sql.execute("DELETE FROM sessions WHERE expires_at < ?1", args![now])?;
            sql.execute(
                "INSERT INTO sessions (id_hash, user_id, csrf, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                args![hash(id), user_id, csrf, now, now + ttl_ms],
            )?;
            Ok(())
        })
    }

    /// A live session by id.
    pub fn session(&self, id: &str) -> Result<Option<Session>, StoreError> {
        let now = time::now_ms();
        self.db_read(|sql| {
            sql.query_opt(
                "SELECT user_id, csrf, expires_at FROM sessions WHERE id_hash = ?1 AND expires_at > ?2",
                args![hash(id), now],
            )?
            .map(|r| Ok(Session { user_id: r.get(0)?, csrf: r.get(1)?, expires_at: r.get(2)? }))
            .transpose()
        })
    }

    pub fn delete_session(&self, id: &str) -> Result<(), StoreError> {
        self.db_write(|sql| {
            sql.execute("DELETE FROM sessions WHERE id_hash = ?1", args![hash(id)])?;
            Ok(())
        })
    }

    /// A 32-byte secret by name, created from the OS RNG on first use.
    pub fn server_secret(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.db_write(|sql| {
            // Nodes starting together must agree on one secret.
            sql.lock("valet server secrets")?;
            if let Some(row) = sql.query_opt(
                "SELECT value FROM server_secrets WHERE name = ?1",
                args![name],
            )? {
                return row.get(0);
            }
            let mut secret = vec![0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|e| StoreError::Invalid(format!("no randomness: {e}")))?;
            sql.execute(
                "INSERT INTO server_secrets (name, value) VALUES (?1, ?2)",
                args![name, secret],
            )?;
            Ok(secret)
        })
    }
}
