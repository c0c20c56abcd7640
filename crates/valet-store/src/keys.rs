//! Signing keys of run tokens, persisted so that a restart keeps verifying
//! the tokens of runs that are still going.

use valet_core::{KeyRing, SigningKey};

use crate::sql::args;
use crate::vals::MAX_TIMEOUT_MS;
use crate::{Store, StoreError, time};

/// How long a retired key keeps verifying after a rotation: the longest a
/// run may last (its token's `exp`), plus time for every running server to
/// read the new ring back (`valet serve` does every 30 s) and slack.
pub const ROTATION_OVERLAP_MS: i64 = MAX_TIMEOUT_MS + 5 * 60_000;

/// One signing key as `valet keys list` shows it.
#[derive(Debug, Clone)]
pub struct SigningKeyInfo {
    pub kid: String,
    pub created_at: i64,
    /// `None` for the current key; otherwise when it stops verifying.
    pub retire_at: Option<i64>,
}

impl Store {
    /// The key ring: the current key (created on first use) plus retired
    /// keys whose overlap has not run out.
    pub fn key_ring(&self) -> Result<KeyRing, StoreError> {
        let now = time::now_ms();
        let keys: Vec<(Vec<u8>, Vec<u8>, Option<i64>)> = self.db_write(|sql| {
            // Nodes starting together must not each make a current key.
            sql.lock("valet signing keys")?;
            let has_current: bool = sql
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM signing_keys WHERE retire_at IS NULL)",
                    args![],
                )?
                .get(0)?;
            if !has_current {
                let key = SigningKey::generate().map_err(|e| StoreError::Invalid(e.to_string()))?;
                sql.execute(
                    "INSERT INTO signing_keys (kid, secret, public, created_at) VALUES (?1, ?2, ?3, ?4)",
                    args![key.kid(), &key.secret_bytes()[..], &key.public_bytes()[..], now],
                )?;
            }
            sql.query_map(
                "SELECT secret, public, retire_at FROM signing_keys
                 WHERE retire_at IS NULL OR retire_at > ?1 ORDER BY created_at DESC",
                args![now],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })?;
        let mut ring: Option<KeyRing> = None;
        let mut previous = Vec::new();
        for (secret, public, retire_at) in keys {
            match retire_at {
                None => {
                    let secret: [u8; 32] = secret.try_into().map_err(|_| {
                        StoreError::Corrupt("signing key has the wrong length".into())
                    })?;
                    ring = Some(
                        KeyRing::new(SigningKey::from_secret(secret))
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    );
                }
                Some(at) => {
                    let public: [u8; 32] = public.try_into().map_err(|_| {
                        StoreError::Corrupt("public key has the wrong length".into())
                    })?;
                    previous.push((public, (at / 1000) as u64));
                }
            }
        }
        let mut ring = ring.ok_or_else(|| StoreError::Corrupt("no current signing key".into()))?;
        for (public, at) in previous {
            ring = ring.with_previous(public, at);
        }
        Ok(ring)
    }

    /// The keys that still verify, newest first.
    pub fn signing_keys(&self) -> Result<Vec<SigningKeyInfo>, StoreError> {
        let now = time::now_ms();
        self.db_read(|sql| {
            sql.query_map(
                "SELECT kid, created_at, retire_at FROM signing_keys
                 WHERE retire_at IS NULL OR retire_at > ?1 ORDER BY created_at DESC, retire_at IS NULL DESC",
                args![now],
                |r| {
                    Ok(SigningKeyInfo {
                        kid: r.get(0)?,
                        created_at: r.get(1)?,
                        retire_at: r.get(2)?,
                    })
                },
            )
        })
    }

    /// Makes a new current key; the old one verifies for `overlap_ms` more
    /// ([`ROTATION_OVERLAP_MS`] outside tests).
    pub fn rotate_signing_key(&self, overlap_ms: i64) -> Result<KeyRing, StoreError> {
        let now = time::now_ms();
        let key = SigningKey::generate().map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.db_write(|sql| {
            sql.lock("valet signing keys")?;
            sql.execute(
                "UPDATE signing_keys SET retire_at = ?1 WHERE retire_at IS NULL",
                args![now + overlap_ms],
            )?;
            sql.execute(
                "INSERT INTO signing_keys (kid, secret, public, created_at) VALUES (?1, ?2, ?3, ?4)",
                args![key.kid(), &key.secret_bytes()[..], &key.public_bytes()[..], now],
            )?;
            Ok(())
        })?;
        self.key_ring()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ring_is_persisted_and_rotates_with_overlap() {
        for backend in crate::testing::Backends::all() {
            let store = backend.open();
            let first = store.key_ring().expect("ring");
            let again = backend.open().key_ring().expect("ring");
            assert_eq!(first.current().kid(), again.current().kid(), "{backend:?}");
            let rotated = store.rotate_signing_key(60_000).expect("rotate");
            assert_ne!(rotated.current().kid(), first.current().kid());
            let now = (time::now_ms() / 1000) as u64;
            assert_eq!(rotated.jwks(now)["keys"].as_array().map(Vec::len), Some(2));
        }
    }

    #[test]
    fn nodes_starting_together_share_one_current_key() {
        let backend = crate::testing::Backends::postgres();
        let stores: Vec<Store> = (0..4).map(|_| backend.open()).collect();
        let kids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = stores
                .iter()
                .map(|store| s.spawn(|| store.key_ring().expect("ring").current().kid().to_owned()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert!(kids.windows(2).all(|w| w[0] == w[1]), "{kids:?}");
    }
}
