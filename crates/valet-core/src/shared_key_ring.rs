//! The key ring as the server holds it: every part (the API's verifier,
//! the supervisor's minter, the JWKS) shares one handle, and a rotation
//! swaps the whole ring under it at once.

use std::sync::{Arc, RwLock};

use crate::{KeyRing, MintRequest, RunClaims, RunTokenError};

/// A cheap-to-clone handle on the current [`KeyRing`].
#[derive(Clone, Debug)]
pub struct SharedKeyRing {
    /// A std `RwLock` around an `Arc`: readers hold the lock only to clone
    /// the `Arc`, never while signing or verifying, and never across an
    /// `.await`, so a replacement waits for nothing slow.
    ring: Arc<RwLock<Arc<KeyRing>>>,
}

impl SharedKeyRing {
    pub fn new(ring: KeyRing) -> SharedKeyRing {
        SharedKeyRing {
            ring: Arc::new(RwLock::new(Arc::new(ring))),
        }
    }

    /// The ring as it is now.
    pub fn current(&self) -> Arc<KeyRing> {
        match self.ring.read() {
            Ok(ring) => ring.clone(),
            // A writer panicked mid-swap; the `Arc` inside is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `ring` in place of the current one (after a rotation).
    pub fn replace(&self, ring: KeyRing) {
        let ring = Arc::new(ring);
        match self.ring.write() {
            Ok(mut slot) => *slot = ring,
            Err(poisoned) => *poisoned.into_inner() = ring,
        }
    }

    pub fn mint(&self, grant: &MintRequest<'_>) -> Result<String, RunTokenError> {
        self.current().mint(grant)
    }

    pub fn verify(&self, token: &str, now: u64) -> Result<RunClaims, RunTokenError> {
        self.current().verify(token, now)
    }

    pub fn jwks(&self, now: u64) -> serde_json::Value {
        self.current().jwks(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ScopeSet, SigningKey};

    #[test]
    fn a_replaced_ring_signs_with_the_new_key_and_still_verifies_the_old() {
        let first = SigningKey::generate().expect("key");
        let first_kid = first.kid().to_owned();
        let shared = SharedKeyRing::new(KeyRing::new(first).expect("ring"));
        let clone = shared.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let request = MintRequest {
            user_id: "usr_1",
            val_id: None,
            run_id: "run_1",
            scopes: ScopeSet::default_val(),
            start: now,
            deadline: now + 60,
        };
        let old_token = shared.mint(&request).expect("mint");
        let rotated = (*shared.current())
            .clone()
            .rotate(SigningKey::generate().expect("key"), now + 120)
            .expect("rotate");
        clone.replace(rotated);
        assert_ne!(shared.current().current().kid(), first_kid);
        assert_eq!(shared.jwks(now)["keys"].as_array().map(Vec::len), Some(2));
        let new_token = shared.mint(&request).expect("mint");
        assert!(shared.verify(&new_token, now).is_ok());
        assert!(shared.verify(&old_token, now).is_ok());
        // Once the old key retires, its tokens are refused.
        assert!(matches!(
            shared.verify(&old_token, now + 121),
            Err(RunTokenError::UnknownKid(_))
        ));
    }
}
