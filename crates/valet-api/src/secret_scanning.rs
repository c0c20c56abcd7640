//! GitHub secret scanning: GitHub POSTs tokens it found in public code;
//! valet checks GitHub's signature, revokes every live valet token among
//! them, emails each owner once, and labels every report.
//!
//! The signature is ECDSA P-256 / SHA-256 over the raw body, base64 DER, by
//! a key GitHub publishes at `keys_url`, cached for 30 minutes. Fetches are
//! one at a time and at most one per 10 seconds in total, whatever arrives:
//! a cold cache, a flood of made-up key ids, a key server that is down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};
use valet_core::TokenHash;
use valet_store::{LeakOutcome, report_leak};

use crate::{ApiError, AppState};

pub const GITHUB_KEYS_URL: &str = "https://api.github.com/meta/public_keys/secret_scanning";
const CACHE_FOR: Duration = Duration::from_secs(30 * 60);
const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(10);
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// GitHub's published keys, cached.
pub struct GithubKeys {
    url: String,
    client: reqwest::Client,
    /// A std `Mutex`: held to read or swap the map, never across the fetch.
    cache: Mutex<Cache>,
    /// Held across a fetch (so tokio's), making fetches one at a time:
    /// requests that arrive during a fetch wait for it and use its result.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, VerifyingKey>,
    /// When a fetch last succeeded: the keys are fresh for [`CACHE_FOR`].
    fetched_at: Option<Instant>,
    /// When a fetch was last started, whatever its result: the next one
    /// waits [`REFETCH_AT_MOST_EVERY`], so no stream of requests (cold
    /// cache, made-up key ids, a key server that is down) becomes a stream
    /// of requests to GitHub.
    attempted_at: Option<Instant>,
    /// Why the last fetch failed, while no keys were ever fetched.
    last_error: Option<KeysError>,
}

/// What the cache says about a key id without fetching.
enum Lookup {
    Found(VerifyingKey),
    /// Fresh keys, or a fetch too recent to repeat: answer from the cache.
    Settled(Option<VerifyingKey>, Option<KeysError>),
    /// A fetch may help.
    Fetch,
}

#[derive(Deserialize)]
struct KeysDocument {
    public_keys: Vec<PublishedKey>,
}

#[derive(Deserialize)]
struct PublishedKey {
    key_identifier: String,
    key: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KeysError {
    #[error("could not fetch GitHub's signing keys from {0}: {1}")]
    Fetch(String, String),
    #[error("GitHub's signing keys at {0} are malformed: {1}")]
    Malformed(String, String),
}

impl GithubKeys {
    pub fn new(url: impl Into<String>) -> GithubKeys {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent("valet-secret-scanning")
            .build()
            .unwrap_or_default();
        GithubKeys {
            url: url.into(),
            client,
            cache: Mutex::new(Cache::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The key for `kid`: from the cache, else after a fetch if one is
    /// allowed now.
    pub async fn key(&self, kid: &str) -> Result<Option<VerifyingKey>, KeysError> {
        match self.lookup(kid) {
            Lookup::Found(key) => return Ok(Some(key)),
            Lookup::Settled(key, error) => return settled(key, error),
            Lookup::Fetch => {}
        }
        let _one_at_a_time = self.fetching.lock().await;
        // A fetch that finished while this request waited counts too.
        match self.lookup(kid) {
            Lookup::Found(key) => return Ok(Some(key)),
            Lookup::Settled(key, error) => return settled(key, error),
            Lookup::Fetch => {}
        }
        if let Ok(mut cache) = self.cache.lock() {
            cache.attempted_at = Some(Instant::now());
        }
        let fetched = self.fetch().await;
        let Ok(mut cache) = self.cache.lock() else {
            return fetched.map(|keys| keys.get(kid).copied());
        };
        match fetched {
            Ok(keys) => {
                let key = keys.get(kid).copied();
                cache.keys = keys;
                cache.fetched_at = Some(Instant::now());
                cache.last_error = None;
                Ok(key)
            }
            Err(e) => {
                // Keys fetched before still verify (GitHub rotates with overlap).
                let key = cache.keys.get(kid).copied();
                if cache.keys.is_empty() {
                    cache.last_error = Some(e.clone());
                    return Err(e);
                }
                tracing::warn!(error = %e, "secret scanning: keeping the keys fetched before");
                Ok(key)
            }
        }
    }

    fn lookup(&self, kid: &str) -> Lookup {
        let Ok(cache) = self.cache.lock() else {
            return Lookup::Fetch;
        };
        let key = cache.keys.get(kid).copied();
        let fresh = cache.fetched_at.is_some_and(|t| t.elapsed() < CACHE_FOR);
        let recent = cache
            .attempted_at
            .is_some_and(|t| t.elapsed() < REFETCH_AT_MOST_EVERY);
        match key {
            Some(key) if fresh || recent => Lookup::Found(key),
            _ if recent => Lookup::Settled(key, cache.last_error.clone()),
            _ => Lookup::Fetch,
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, VerifyingKey>, KeysError> {
        let fetch_error = |e: reqwest::Error| KeysError::Fetch(self.url.clone(), e.to_string());
        let document: KeysDocument = self
            .client
            .get(&self.url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(fetch_error)?
            .json()
            .await
            .map_err(|e| KeysError::Malformed(self.url.clone(), e.to_string()))?;
        let mut keys = HashMap::new();
        for published in document.public_keys {
            let key = VerifyingKey::from_public_key_pem(&published.key).map_err(|e| {
                KeysError::Malformed(
                    self.url.clone(),
                    format!("key {}: {e}", published.key_identifier),
                )
            })?;
            keys.insert(published.key_identifier, key);
        }
        Ok(keys)
    }
}

/// The answer when no fetch is allowed: the key if cached, else the last
/// fetch's error when there never were keys, else "unknown key".
fn settled(
    key: Option<VerifyingKey>,
    error: Option<KeysError>,
) -> Result<Option<VerifyingKey>, KeysError> {
    match (key, error) {
        (Some(key), _) => Ok(Some(key)),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(None),
    }
}

/// Checks a base64 DER ECDSA P-256 signature over `body`.
pub fn verify_signature(key: &VerifyingKey, body: &[u8], signature_b64: &str) -> bool {
    let Ok(der) = base64::engine::general_purpose::STANDARD.decode(signature_b64.trim()) else {
        return false;
    };
    let Ok(signature) = Signature::from_der(&der) else {
        return false;
    };
    key.verify(body, &signature).is_ok()
}

/// One match GitHub reports.
#[derive(Debug, Deserialize)]
pub struct Match {
    pub token: String,
    #[serde(rename = "type", default)]
    pub token_type: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub source: String,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Label {
    pub token_hash: String,
    pub token_type: String,
    pub label: &'static str,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `POST /v1/secret-scanning/verify`.
pub async fn verify(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Vec<Label>>, ApiError> {
    let (Some(kid), Some(signature)) = (
        header(&headers, "github-public-key-identifier"),
        header(&headers, "github-public-key-signature"),
    ) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_signature",
            "send Github-Public-Key-Identifier and Github-Public-Key-Signature",
        ));
    };
    let key = state.github_keys.key(kid).await.map_err(|e| {
        tracing::error!(error = %e, "secret scanning: no signing keys");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "keys_unavailable",
            "GitHub's signing keys could not be fetched; retry later",
        )
    })?;
    let Some(key) = key else {
        return Err(ApiError::unauthorized(
            "unknown_key",
            "unknown GitHub public key identifier",
        ));
    };
    if !verify_signature(&key, &body, signature) {
        return Err(ApiError::unauthorized(
            "bad_signature",
            "the signature does not match the body",
        ));
    }
    let matches: Vec<Match> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected a JSON array of {{token, type, url, source}}: {e}"
        ))
    })?;
    let public_url = state.config.public_url.clone();
    let sender = state.config.email_from.clone();
    let labels = state
        .store
        .call(move |store| {
            let mut labels = Vec::with_capacity(matches.len());
            for m in matches {
                tracing::info!(
                    source = m.source.to_ascii_lowercase(),
                    "secret scanning report"
                );
                let outcome = report_leak(store, &m.token, &m.url, &sender, &public_url)?;
                labels.push(Label {
                    token_hash: TokenHash::of(&m.token).to_hex(),
                    token_type: m.token_type,
                    label: if outcome == LeakOutcome::NotOurs {
                        "false_positive"
                    } else {
                        "true_positive"
                    },
                });
            }
            Ok(labels)
        })
        .await?;
    Ok(Json(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_B64: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEYAGMWO8XgCamYKMJS6jc/qgvSlAdAjPuDPRcXU22YxgBrz+zoN19MzuRyW87qEt9/AmtoNP5GrobzUvQSyJFVw==";
    const BODY: &str = r#"[{"source":"commit","token":"some_token","type":"some_type","url":"https://example.com/base-repo-url/"}]"#;
    const SIGNATURE: &str = "MEQCIQDaMKqrGnE27S0kgMrEK0eYBmyG0LeZismAEz/BgZyt7AIfXt9fErtRS4XaeSt/AO1RtBY66YcAdjxji410VQV4xg==";

    fn key() -> VerifyingKey {
        let der = base64::engine::general_purpose::STANDARD
            .decode(KEY_B64)
            .expect("b64");
        VerifyingKey::from_public_key_der(&der).expect("spki")
    }

    #[test]
    fn githubs_published_test_vector_verifies() {
        assert_eq!(BODY.len(), 104);
        assert!(verify_signature(&key(), BODY.as_bytes(), SIGNATURE));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let with_newline = format!("{BODY}\n");
        assert!(!verify_signature(
            &key(),
            with_newline.as_bytes(),
            SIGNATURE
        ));
        let mut body = BODY.as_bytes().to_vec();
        body[10] ^= 1;
        assert!(!verify_signature(&key(), &body, SIGNATURE));
        let mut sig = base64::engine::general_purpose::STANDARD
            .decode(SIGNATURE)
            .expect("b64");
        let last = sig.len() - 1;
        sig[last] ^= 1;
        let sig = base64::engine::general_purpose::STANDARD.encode(sig);
        assert!(!verify_signature(&key(), BODY.as_bytes(), &sig));
        assert!(!verify_signature(&key(), BODY.as_bytes(), "not base64!"));
    }
}
