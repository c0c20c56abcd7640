//! Run tokens: the valet key each run receives. An EdDSA (Ed25519) JWT whose
//! life is the run's life.
//!
//! Verification pins the algorithm to EdDSA, so neither `alg: none` nor an
//! HS256 token "signed" with our public key can pass. Keys rotate with
//! overlap: a retired key keeps verifying until the last token it signed
//! has expired.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::scope::{ScopeError, ScopeSet};

pub const ISSUER: &str = "valet";
pub const AUDIENCE: &str = "valet-api";
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// The claims of a run token (docs/CONTRACTS.md, "Run tokens").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunClaims {
    pub iss: String,
    pub aud: String,
    /// The user the run acts for.
    pub sub: String,
    /// The val being run; absent for an ad-hoc `valet run FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
    /// The run id.
    pub jti: String,
    /// Space-separated scopes.
    pub scope: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

impl RunClaims {
    pub fn scopes(&self) -> Result<ScopeSet, ScopeError> {
        ScopeSet::parse(&self.scope)
    }
}

/// What the supervisor asks to be minted for one run.
#[derive(Debug, Clone)]
pub struct MintRequest<'a> {
    pub user_id: &'a str,
    pub val_id: Option<&'a str>,
    pub run_id: &'a str,
    pub scopes: ScopeSet,
    /// Unix seconds when the run starts.
    pub start: u64,
    /// Unix seconds of the run's deadline (start + timeout).
    pub deadline: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunTokenError {
    #[error("run token has no key id (kid)")]
    MissingKid,
    #[error("run token names an unknown or retired signing key '{0}'")]
    UnknownKid(String),
    #[error("run token is invalid: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("run token carries an invalid scope: {0}")]
    Scope(#[from] ScopeError),
    #[error("could not read the system random number generator: {0}")]
    Random(String),
    #[error("signing key is malformed: {0}")]
    Key(String),
}

/// An Ed25519 key pair with its id. `Debug` prints the id only.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    secret: [u8; 32],
    public: [u8; 32],
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, RunTokenError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| RunTokenError::Random(e.to_string()))?;
        Ok(SigningKey::from_secret(secret))
    }

    pub fn from_secret(secret: [u8; 32]) -> SigningKey {
        let public = ed25519_dalek::SigningKey::from_bytes(&secret)
            .verifying_key()
            .to_bytes();
        SigningKey {
            kid: kid_of(&public),
            secret,
            public,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.secret
    }

    pub fn public_bytes(&self) -> &[u8; 32] {
        &self.public
    }

    #[cfg(test)]
    fn encoding_key(&self) -> Result<jsonwebtoken::EncodingKey, RunTokenError> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let der = ed25519_dalek::SigningKey::from_bytes(&self.secret)
            .to_pkcs8_der()
            .map_err(|e| RunTokenError::Key(e.to_string()))?;
        Ok(jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.kid)
    }
}

/// A key id derived from the public key, so the same key always has the same id.
fn kid_of(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// A public key that still verifies, and until when.
#[derive(Clone)]
struct VerifyKey {
    kid: String,
    public: [u8; 32],
    /// Unix seconds after which this key no longer verifies; `None` for the
    /// current key.
    retire_at: Option<u64>,
    decoding: DecodingKey,
}

/// The current signing key and the older keys that still verify.
#[derive(Clone)]
pub struct KeyRing {
    current: SigningKey,
    /// The current key, expanded once (deriving it is most of a signature's
    /// cost), and the JWT header it signs under, encoded once. It signs
    /// with AWS-LC's Ed25519 (9 µs a signature here, against 18.5 µs for
    /// ed25519-dalek, whose signatures are the same bytes: Ed25519 is
    /// deterministic); tokens are verified with jsonwebtoken's.
    signer: std::sync::Arc<aws_lc_rs::signature::Ed25519KeyPair>,
    header: String,
    verifying: Vec<VerifyKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.verifying.iter().map(|k| k.kid.as_str()).collect();
        write!(
            f,
            "KeyRing(current {}, verifying {kids:?})",
            self.current.kid
        )
    }
}

impl KeyRing {
    pub fn new(current: SigningKey) -> Result<KeyRing, RunTokenError> {
        let signer = aws_lc_rs::signature::Ed25519KeyPair::from_seed_and_public_key(
            &current.secret,
            &current.public,
        )
        .map_err(|e| {
            RunTokenError::Key(format!("the signing key is not a valid Ed25519 key: {e}"))
        })?;
        let signer = std::sync::Arc::new(signer);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(current.kid.clone());
        let header = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&header).map_err(|e| RunTokenError::Key(e.to_string()))?);
        let verifying = vec![VerifyKey {
            kid: current.kid.clone(),
            public: current.public,
            retire_at: None,
            decoding: DecodingKey::from_ed_der(&current.public),
        }];
        Ok(KeyRing {
            current,
            signer,
            header,
            verifying,
        })
    }

    /// Adds an older public key that verifies until `retire_at`.
    pub fn with_previous(mut self, public: [u8; 32], retire_at: u64) -> KeyRing {
        self.verifying.push(VerifyKey {
            kid: kid_of(&public),
            public,
            retire_at: Some(retire_at),
            decoding: DecodingKey::from_ed_der(&public),
        });
        self
    }

    /// Makes `next` the signing key. The old one keeps verifying until
    /// `retire_at`, which should be at least now + the longest run timeout.
    pub fn rotate(self, next: SigningKey, retire_at: u64) -> Result<KeyRing, RunTokenError> {
        let old_public = self.current.public;
        let mut ring = KeyRing::new(next)?;
        ring = ring.with_previous(old_public, retire_at);
        for key in self.verifying.into_iter().filter(|k| k.retire_at.is_some()) {
            ring.verifying.push(key);
        }
        Ok(ring)
    }

    pub fn current(&self) -> &SigningKey {
        &self.current
    }

    pub fn mint(&self, grant: &MintRequest<'_>) -> Result<String, RunTokenError> {
        let claims = RunClaims {
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            sub: grant.user_id.to_owned(),
            val: grant.val_id.map(str::to_owned),
            jti: grant.run_id.to_owned(),
            scope: grant.scopes.to_claim(),
            iat: grant.start,
            nbf: grant.start,
            exp: grant.deadline,
        };
        // A compact JWS (RFC 7515): header.claims.signature, each base64url.
        let mut token = self.header.clone();
        token.push('.');
        let claims = serde_json::to_vec(&claims).map_err(|e| RunTokenError::Key(e.to_string()))?;
        URL_SAFE_NO_PAD.encode_string(claims, &mut token);
        let signature = self.signer.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        Ok(token)
    }

    /// Verifies signature, algorithm, issuer, audience, `exp` and `nbf`
    /// (with [`LEEWAY_SECS`]) against the system clock; `now` (unix
    /// seconds) decides whether a retired key still counts.
    pub fn verify(&self, token: &str, now: u64) -> Result<RunClaims, RunTokenError> {
        let header = jsonwebtoken::decode_header(token)?;
        let kid = header.kid.ok_or(RunTokenError::MissingKid)?;
        let key = self
            .verifying
            .iter()
            .find(|k| k.kid == kid && k.retire_at.is_none_or(|at| now <= at))
            .ok_or_else(|| RunTokenError::UnknownKid(kid.clone()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub", "jti"]);
        let data = jsonwebtoken::decode::<RunClaims>(token, &key.decoding, &validation)?;
        data.claims.scopes()?;
        Ok(data.claims)
    }

    /// The public keys that still verify, as a JSON Web Key Set.
    pub fn jwks(&self, now: u64) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .verifying
            .iter()
            .filter(|k| k.retire_at.is_none_or(|at| now <= at))
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "alg": "EdDSA",
                    "use": "sig",
                    "kid": k.kid,
                    "x": URL_SAFE_NO_PAD.encode(k.public),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    fn ring() -> KeyRing {
        KeyRing::new(SigningKey::generate().expect("key")).expect("ring")
    }

    fn grant(start: u64, deadline: u64) -> MintRequest<'static> {
        MintRequest {
            user_id: "u1",
            val_id: Some("v1"),
            run_id: "r1",
            scopes: ScopeSet::default_val(),
            start,
            deadline,
        }
    }

    fn forge(header: &str, claims: &serde_json::Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    #[test]
    fn mint_then_verify() {
        let ring = ring();
        let t = now();
        let token = ring.mint(&grant(t, t + 30)).expect("mint");
        let claims = ring.verify(&token, t).expect("verify");
        assert_eq!(claims.sub, "u1");
        assert_eq!(claims.val.as_deref(), Some("v1"));
        assert_eq!(claims.jti, "r1");
        assert_eq!(claims.exp, t + 30);
        assert_eq!(claims.scopes().expect("scopes"), ScopeSet::default_val());
        let jwks = ring.jwks(t);
        assert_eq!(jwks["keys"][0]["kid"], ring.current().kid());
    }

    #[test]
    fn rejects_another_keys_signature() {
        let t = now();
        let token = ring().mint(&grant(t, t + 30)).expect("mint");
        assert!(matches!(
            ring().verify(&token, t),
            Err(RunTokenError::UnknownKid(_))
        ));
        // Same kid, different key: the signature must fail.
        let ring_a = ring();
        let other = ring();
        let forged_header =
            serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": ring_a.current().kid()});
        let real = other.mint(&grant(t, t + 30)).expect("mint");
        let parts: Vec<&str> = real.split('.').collect();
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(forged_header.to_string()),
            parts[1],
            parts[2]
        );
        assert!(matches!(
            ring_a.verify(&token, t),
            Err(RunTokenError::Invalid(_))
        ));
    }

    #[test]
    fn rejects_alg_none_and_hs256_with_the_public_key() {
        let ring = ring();
        let t = now();
        let kid = ring.current().kid().to_owned();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "u1", "jti": "r1",
            "scope": "val:write user:write", "iat": t, "nbf": t, "exp": t + 30
        });
        let none = forge(&format!(r#"{{"alg":"none","kid":"{kid}"}}"#), &claims, b"");
        assert!(ring.verify(&none, t).is_err());

        use hmac_sha256::sign;
        let header = format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#);
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mac = sign(ring.current().public_bytes(), signing_input.as_bytes());
        let hs = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac));
        assert!(ring.verify(&hs, t).is_err());
    }

    /// HMAC-SHA256 by hand for the forgery test, so the test does not
    /// depend on jsonwebtoken accepting an HS key for us.
    mod hmac_sha256 {
        use sha2::{Digest, Sha256};
        pub fn sign(key: &[u8], msg: &[u8]) -> Vec<u8> {
            let mut k = [0u8; 64];
            k[..key.len()].copy_from_slice(key);
            let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
            let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
            let inner = Sha256::new()
                .chain_update(&ipad)
                .chain_update(msg)
                .finalize();
            Sha256::new()
                .chain_update(&opad)
                .chain_update(inner)
                .finalize()
                .to_vec()
        }
    }

    #[test]
    fn rejects_expired_and_not_yet_valid() {
        let ring = ring();
        let t = now();
        let expired = ring.mint(&grant(t - 100, t - 10)).expect("mint");
        assert!(ring.verify(&expired, t).is_err());
        let within_leeway = ring.mint(&grant(t - 100, t - 2)).expect("mint");
        assert!(ring.verify(&within_leeway, t).is_ok());
        let future = ring.mint(&grant(t + 60, t + 120)).expect("mint");
        assert!(ring.verify(&future, t).is_err());
    }

    #[test]
    fn rejects_wrong_audience_or_issuer_and_unknown_kid() {
        let ring = ring();
        let t = now();
        let good = ring.mint(&grant(t, t + 30)).expect("mint");
        let parts: Vec<&str> = good.split('.').collect();
        for (field, value) in [("aud", "someone-else"), ("iss", "evil")] {
            let mut claims: serde_json::Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64"))
                    .expect("json");
            claims[field] = value.into();
            // Re-sign properly with the ring's own key so only the claim is wrong.
            let header = Header {
                kid: Some(ring.current().kid().to_owned()),
                ..Header::new(Algorithm::EdDSA)
            };
            let token = jsonwebtoken::encode(
                &header,
                &claims,
                &ring.current().encoding_key().expect("key"),
            )
            .expect("encode");
            assert!(ring.verify(&token, t).is_err(), "{field}");
        }
        let header = Header {
            kid: Some("nope".into()),
            ..Header::new(Algorithm::EdDSA)
        };
        let token = jsonwebtoken::encode(
            &header,
            &grant_claims(t),
            &ring.current().encoding_key().expect("key"),
        )
        .expect("enc");
        assert!(matches!(
            ring.verify(&token, t),
            Err(RunTokenError::UnknownKid(_))
        ));
        let header = Header::new(Algorithm::EdDSA);
        let token = jsonwebtoken::encode(
            &header,
            &grant_claims(t),
            &ring.current().encoding_key().expect("key"),
        )
        .expect("enc");
        assert!(matches!(
            ring.verify(&token, t),
            Err(RunTokenError::MissingKid)
        ));
    }

    fn grant_claims(t: u64) -> RunClaims {
        RunClaims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: "u1".into(),
            val: None,
            jti: "r1".into(),
            scope: "blob:read".into(),
            iat: t,
            nbf: t,
            exp: t + 30,
        }
    }

    #[test]
    fn rotation_keeps_old_tokens_until_retirement() {
        let t = now();
        let old_ring = ring();
        let old_token = old_ring.mint(&grant(t, t + 30)).expect("mint");
        let ring = old_ring
            .rotate(SigningKey::generate().expect("key"), t + 60)
            .expect("rotate");
        let new_token = ring.mint(&grant(t, t + 30)).expect("mint");
        assert!(
            ring.verify(&old_token, t).is_ok(),
            "old key verifies during overlap"
        );
        assert!(ring.verify(&new_token, t).is_ok());
        assert_eq!(ring.jwks(t)["keys"].as_array().map(Vec::len), Some(2));
        assert!(matches!(
            ring.verify(&old_token, t + 61),
            Err(RunTokenError::UnknownKid(_))
        ));
        assert_eq!(ring.jwks(t + 61)["keys"].as_array().map(Vec::len), Some(1));
    }
}
