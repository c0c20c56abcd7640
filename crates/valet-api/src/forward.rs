//! Forwards between nodes: a user's sqlite call, already authenticated and
//! scope-checked by the node that received it, sent to the user's home
//! node on `POST /internal/sqlite/{execute|batch}`.
//!
//! The body is JSON, `{claims, request}`, signed as bytes with HMAC-SHA256
//! under a secret every node reads from the control plane; the signature
//! travels in the `Valet-Forward-Signature` header. The claims say who
//! called (their token or run), with which sqlite scopes, for which node,
//! user and fence, until when, and a nonce. The home node executes a
//! forward only once its signature checks out, it has not expired, it
//! names this node and route, and its nonce is new.

use std::collections::HashMap;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ApiError;

/// The header that carries a forward's signature (hex).
pub const SIGNATURE_HEADER: &str = "valet-forward-signature";
/// How long a forward is good for after it was signed. Nodes' wall clocks
/// must agree to well within this.
pub const FORWARD_TTL_MS: i64 = 30_000;
/// How long past its expiry a forward's nonce is remembered, so that a
/// receiver whose clock is behind still refuses a replay.
const NONCE_SLACK_MS: i64 = 60_000;

/// The secret forwards are signed with, ready to sign. `Debug` prints
/// nothing of it.
#[derive(Clone)]
pub struct ForwardKey {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for ForwardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwardKey(..)")
    }
}

impl ForwardKey {
    /// `None` for a secret HMAC cannot take (none: it takes any length).
    pub fn new(secret: &[u8]) -> Option<ForwardKey> {
        Some(ForwardKey {
            mac: Hmac::<Sha256>::new_from_slice(secret).ok()?,
        })
    }

    /// The signature of `body`, as the header carries it.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `signature` (hex) signs `body`, compared in constant time.
    fn verifies(&self, body: &[u8], signature: &str) -> bool {
        let Ok(bytes) = hex::decode(signature.trim()) else {
            return false;
        };
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.verify_slice(&bytes).is_ok()
    }
}

/// What a forward asserts. The forwarding node authenticated the caller
/// and checked that it holds `scopes`; the home node builds its proofs
/// from them (and audits each use as the forwarding node would have).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardClaims {
    /// Which internal route: `execute` or `batch`.
    pub call: String,
    /// The node this forward is for: the user's home.
    pub node: String,
    pub user: String,
    /// The API token that made the call, or else the run (and its val).
    pub token: Option<String>,
    pub run: Option<String>,
    pub val: Option<String>,
    /// The sqlite scopes the caller holds (`sqlite:read`, `sqlite:write`).
    pub scopes: Vec<String>,
    /// The fencing token the home node is expected to hold.
    pub fence: i64,
    /// Unix milliseconds after which the forward is refused.
    pub expires_ms: i64,
    /// Random, once per forward: a replay is refused.
    pub nonce: String,
}

/// A forward's body: the claims, and the request as the caller sent it
/// (the `/v1/sqlite/...` JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub claims: ForwardClaims,
    pub request: serde_json::Value,
}

impl Forward {
    /// The body to send and its signature.
    pub fn seal(&self, key: &ForwardKey) -> Result<(Vec<u8>, String), serde_json::Error> {
        let body = serde_json::to_vec(self)?;
        let signature = key.sign(&body);
        Ok((body, signature))
    }
}

/// A fresh nonce: 16 random bytes, hex.
pub fn nonce() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Nonces of forwards accepted here, each kept until well past its
/// forward's expiry (after which the forward is refused anyway).
#[derive(Default)]
pub struct NonceLog {
    /// A std `Mutex`: held for a lookup and an insert (and now and then a
    /// sweep of expired entries), never across an `.await`.
    seen: Mutex<Nonces>,
}

#[derive(Default)]
struct Nonces {
    /// Nonce -> when it may be forgotten (unix ms).
    until: HashMap<String, i64>,
    /// Sweep expired entries once the map is this large.
    sweep_at: usize,
}

impl NonceLog {
    /// Records `nonce`; false when it was seen before (a replay).
    fn first_use(&self, nonce: &str, expires_ms: i64, now_ms: i64) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        if seen.until.len() >= seen.sweep_at {
            seen.until.retain(|_, until| *until > now_ms);
            seen.sweep_at = (seen.until.len() * 2).max(1024);
        }
        if seen.until.contains_key(nonce) {
            return false;
        }
        seen.until
            .insert(nonce.to_owned(), expires_ms + NONCE_SLACK_MS);
        true
    }
}

/// A 401 for a forward that is not to be executed.
fn refused(message: &str) -> ApiError {
    ApiError::unauthorized(
        "invalid_forward",
        format!(
            "{message}; this route takes only signed forwards between valet nodes, never a token"
        ),
    )
}

/// Checks a forward for `call` addressed to `node`, and spends its nonce:
/// the forward to execute, or a 401 and nothing executed.
pub(crate) fn open(
    key: &ForwardKey,
    nonces: &NonceLog,
    signature: Option<&str>,
    body: &[u8],
    call: &str,
    node: &str,
    now_ms: i64,
) -> Result<Forward, ApiError> {
    let signature = signature.ok_or_else(|| refused("the forward is not signed"))?;
    if !key.verifies(body, signature) {
        return Err(refused("the forward's signature does not check out"));
    }
    let forward: Forward = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("a signed forward that does not parse: {e}")))?;
    let claims = &forward.claims;
    if claims.call != call || claims.node != node {
        return Err(refused(&format!(
            "the forward is for {} on node '{}', not {call} on this node",
            claims.call, claims.node
        )));
    }
    if now_ms > claims.expires_ms {
        return Err(refused("the forward has expired"));
    }
    if claims.expires_ms > now_ms + 2 * FORWARD_TTL_MS {
        return Err(refused("the forward expires too far in the future"));
    }
    if !nonces.first_use(&claims.nonce, claims.expires_ms, now_ms) {
        return Err(refused("the forward was replayed"));
    }
    Ok(forward)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(expires_ms: i64, nonce: &str) -> Forward {
        Forward {
            claims: ForwardClaims {
                call: "execute".into(),
                node: "node_a".into(),
                user: "usr_1".into(),
                token: Some("tok_1".into()),
                run: None,
                val: None,
                scopes: vec!["sqlite:read".into()],
                fence: 3,
                expires_ms,
                nonce: nonce.into(),
            },
            request: serde_json::json!({"statement": "SELECT 1"}),
        }
    }

    fn code(r: Result<Forward, ApiError>) -> String {
        match r {
            Ok(_) => "ok".into(),
            Err(e) => format!("{} {}", e.status.as_u16(), e.message),
        }
    }

    #[test]
    fn only_a_fresh_signed_forward_for_this_node_and_route_opens() {
        let key = ForwardKey::new(&[7; 32]).expect("key");
        let nonces = NonceLog::default();
        let now = 1_000_000;
        let (body, sig) = forward(now + 5_000, "n1").seal(&key).expect("seal");
        let open = |sig: Option<&str>, body: &[u8], call: &str, node: &str, now: i64| {
            code(super::open(&key, &nonces, sig, body, call, node, now))
        };
        assert!(open(None, &body, "execute", "node_a", now).contains("not signed"));
        let other = ForwardKey::new(&[8; 32]).expect("key").sign(&body);
        assert!(open(Some(&other), &body, "execute", "node_a", now).contains("does not check out"));
        assert!(open(Some("zz"), &body, "execute", "node_a", now).contains("does not check out"));
        let mut tampered = body.clone();
        let at = tampered.len() - 3;
        tampered[at] ^= 1;
        assert!(open(Some(&sig), &tampered, "execute", "node_a", now).starts_with("401"));
        assert!(open(Some(&sig), &body, "batch", "node_a", now).contains("not batch"));
        assert!(open(Some(&sig), &body, "execute", "node_b", now).contains("not execute"));
        assert!(open(Some(&sig), &body, "execute", "node_a", now + 6_000).contains("expired"));
        assert_eq!(open(Some(&sig), &body, "execute", "node_a", now), "ok");
        assert!(open(Some(&sig), &body, "execute", "node_a", now).contains("replayed"));
        let (far, far_sig) = forward(now + 10 * FORWARD_TTL_MS, "n2")
            .seal(&key)
            .expect("seal");
        assert!(open(Some(&far_sig), &far, "execute", "node_a", now).contains("too far"));
        assert_eq!(format!("{key:?}"), "ForwardKey(..)");
    }

    #[test]
    fn old_nonces_are_swept_but_never_before_their_forward_expires() {
        let log = NonceLog::default();
        for i in 0..1100 {
            assert!(log.first_use(&format!("old{i}"), 1_000, 0));
        }
        // Long after: a sweep drops the old ones, never the live ones.
        for i in 0..1000 {
            assert!(log.first_use(&format!("new{i}"), 500_000, 400_000));
        }
        assert!(!log.first_use("new0", 500_000, 400_001), "still remembered");
        let seen = log.seen.lock().expect("lock");
        assert!(seen.until.len() < 2100, "expired nonces were swept");
    }
}
