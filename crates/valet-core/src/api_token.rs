//! API tokens: `vlt_` + 32 base62 random characters + 6 base62 characters of
//! the CRC32 of the random part.
//!
//! The checksum is the trick GitHub's own tokens use: a secret scanner (or
//! our own leak endpoint) can tell a real token from noise without a
//! database lookup. Only the SHA-256 of a token is ever stored.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "vlt_";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// Length of a whole token: prefix, random part and checksum.
pub const TOKEN_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A whole API token. Its `Debug` shows only the last four characters, so
/// a token that ends up in a log line or a panic message says nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

/// Why a string is not an API token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("not a valet API token: it must start with 'vlt_'")]
    WrongPrefix,
    #[error("not a valet API token: it has {0} characters, expected {TOKEN_LEN}")]
    WrongLength(usize),
    #[error("not a valet API token: character {0} is not a letter or digit")]
    BadCharacter(usize),
    #[error("not a valet API token: the checksum does not match (a typo or a truncated copy?)")]
    BadChecksum,
}

impl ApiToken {
    /// A fresh token from the operating system's random number generator.
    pub fn generate() -> Result<ApiToken, getrandom::Error> {
        let mut random = String::with_capacity(RANDOM_LEN);
        // Rejection sampling keeps every character equally likely: 248 is
        // the largest multiple of 62 that fits in a byte.
        let mut buf = [0u8; 64];
        while random.len() < RANDOM_LEN {
            getrandom::fill(&mut buf)?;
            for b in buf {
                if b < 248 && random.len() < RANDOM_LEN {
                    random.push(BASE62[usize::from(b % 62)] as char);
                }
            }
        }
        Ok(ApiToken(format!("{PREFIX}{random}{}", checksum(&random))))
    }

    /// Checks shape, alphabet and checksum, in that order, and says which
    /// failed. Does not tell whether the token exists.
    pub fn parse(text: &str) -> Result<ApiToken, TokenFormatError> {
        let Some(rest) = text.strip_prefix(PREFIX) else {
            return Err(TokenFormatError::WrongPrefix);
        };
        if text.len() != TOKEN_LEN {
            return Err(TokenFormatError::WrongLength(text.chars().count()));
        }
        if let Some(pos) = rest.bytes().position(|b| !b.is_ascii_alphanumeric()) {
            return Err(TokenFormatError::BadCharacter(PREFIX.len() + pos + 1));
        }
        let (random, check) = rest.split_at(RANDOM_LEN);
        if checksum(random) != check {
            return Err(TokenFormatError::BadChecksum);
        }
        Ok(ApiToken(text.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }

    /// The last four characters, shown in lists so people can tell tokens
    /// apart. They are checksum characters, so they reveal no randomness.
    pub fn hint(&self) -> String {
        self.0[self.0.len() - 4..].to_owned()
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiToken(vlt_…{})", self.hint())
    }
}

/// Six base62 digits of the CRC32 of `random`, most significant first.
fn checksum(random: &str) -> String {
    let mut n = crc32fast::hash(random.as_bytes());
    let mut digits = [b'0'; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&digits).into_owned()
}

/// SHA-256 of a token: what the store keeps and looks tokens up by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> TokenHash {
        TokenHash(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// Comparison whose time does not depend on where the hashes differ.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_tokens_parse_and_look_right() {
        for _ in 0..100 {
            let token = ApiToken::generate().expect("rng");
            assert_eq!(token.expose().len(), TOKEN_LEN);
            assert!(token.expose().starts_with("vlt_"));
            assert_eq!(ApiToken::parse(token.expose()), Ok(token.clone()));
            assert_ne!(token.hash().to_hex(), token.expose());
            assert!(!format!("{token:?}").contains(&token.expose()[4..36]));
        }
    }

    #[test]
    fn parse_tells_what_is_wrong() {
        let token = ApiToken::generate().expect("rng");
        let text = token.expose();
        assert_eq!(
            ApiToken::parse("ghp_abc"),
            Err(TokenFormatError::WrongPrefix)
        );
        assert_eq!(
            ApiToken::parse(&text[..41]),
            Err(TokenFormatError::WrongLength(41))
        );
        let mut bad_char = text.to_owned();
        bad_char.replace_range(10..11, "-");
        assert_eq!(
            ApiToken::parse(&bad_char),
            Err(TokenFormatError::BadCharacter(11))
        );
        let mut bad_sum = text.to_owned();
        let last = if text.ends_with('0') { "1" } else { "0" };
        bad_sum.replace_range(41..42, last);
        assert_eq!(
            ApiToken::parse(&bad_sum),
            Err(TokenFormatError::BadChecksum)
        );
    }

    #[test]
    fn hash_comparison() {
        let a = ApiToken::generate().expect("rng");
        let b = ApiToken::generate().expect("rng");
        assert!(a.hash().ct_eq(&TokenHash::of(a.expose())));
        assert!(!a.hash().ct_eq(&b.hash()));
    }

    proptest! {
        /// Any one-character change is caught by the alphabet or the checksum.
        #[test]
        fn one_character_changes_are_caught(pos in 4usize..TOKEN_LEN, replacement in any::<char>()) {
            let token = ApiToken::generate().expect("rng");
            let mut chars: Vec<char> = token.expose().chars().collect();
            prop_assume!(chars[pos] != replacement);
            chars[pos] = replacement;
            let changed: String = chars.into_iter().collect();
            prop_assert!(ApiToken::parse(&changed).is_err());
        }
    }
}
