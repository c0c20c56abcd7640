//! Users: the people (and their accounts) that own vals, tokens and data.

use std::fmt;
use std::str::FromStr;

use crate::sql::{Row, args};
use crate::{Store, StoreError, new_id, time};

/// What an account may do beyond the basics: a free account may email
/// only its own address, so a leaked key cannot make valet a spam relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tier {
    #[default]
    Free,
    Pro,
}

impl Tier {
    /// The word stored in the `tier` column (and shown by the API).
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
        }
    }

    /// Whether the account may email addresses other than its own.
    pub fn may_email_anyone(self) -> bool {
        self == Tier::Pro
    }
}

impl FromStr for Tier {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Tier, StoreError> {
        match s {
            "free" => Ok(Tier::Free),
            "pro" => Ok(Tier::Pro),
            _ => Err(StoreError::Invalid(format!(
                "invalid tier '{s}': use free or pro"
            ))),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub email: String,
    pub tier: Tier,
    pub password_hash: Option<String>,
}

const COLUMNS: &str = "id, username, email, tier, password_hash";

fn from_row(row: &Row) -> Result<User, StoreError> {
    let tier: String = row.get(3)?;
    Ok(User {
        id: row.get(0)?,
        username: row.get(1)?,
        email: row.get(2)?,
        tier: tier
            .parse()
            .map_err(|e: StoreError| StoreError::Corrupt(format!("users.tier: {e}")))?,
        password_hash: row.get(4)?,
    })
}

/// Usernames appear in URLs (`/{user}/{val}` on the vals origin, and
/// `<user>-<val>.<vals domain>`): keep them boring.
pub fn validate_username(name: &str) -> Result<(), StoreError> {
    let ok = (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid username '{name}': use 1-40 letters, digits, '-' or '_', starting with a letter or digit"
        )))
    }
}

/// A plain address, `local@domain`, in a form every mail relay takes:
/// the local part a dot-atom (letters, digits and ``!#$%&'*+/=?^_`{|}~-``,
/// dots only between them), the domain two or more labels of letters,
/// digits and inner hyphens. Anything else (quoted local parts, IP
/// literals, `a@b..c`) is refused here rather than failing at delivery.
/// (The fuzz target `email` holds this against the mailer's own parser.)
pub fn validate_email(email: &str) -> Result<(), StoreError> {
    let atom = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_alphanumeric() || "!#$%&'*+/=?^_`{|}~-".contains(c))
    };
    let label = |part: &str| {
        (1..=63).contains(&part.len())
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !part.starts_with('-')
            && !part.ends_with('-')
    };
    let ok = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            local.len() <= 64
                && local.split('.').all(atom)
                && domain.split('.').count() >= 2
                && domain.split('.').all(label)
                && !domain
                    .rsplit('.')
                    .next()
                    .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid email address '{}'",
            email.escape_debug()
        )))
    }
}

impl Store {
    pub fn create_user(
        &self,
        username: &str,
        email: &str,
        password_hash: Option<&str>,
    ) -> Result<User, StoreError> {
        validate_username(username)?;
        validate_email(email)?;
        let user = User {
            id: new_id("usr"),
            username: username.to_owned(),
            email: email.to_owned(),
            tier: Tier::Free,
            password_hash: password_hash.map(str::to_owned),
        };
        self.db_write(|sql| {
            let inserted = sql.execute(
                "INSERT INTO users (id, username, email, tier, password_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(username) DO NOTHING",
                args![
                    user.id,
                    user.username,
                    user.email,
                    user.tier.as_str(),
                    user.password_hash,
                    time::now_ms()
                ],
            )?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!(
                    "user '{username}' already exists"
                )));
            }
            Ok(())
        })?;
        Ok(user)
    }

    pub fn set_tier(&self, user_id: &str, tier: Tier) -> Result<(), StoreError> {
        self.db_write(|sql| {
            sql.execute(
                "UPDATE users SET tier = ?1 WHERE id = ?2",
                args![tier.as_str(), user_id],
            )?;
            Ok(())
        })
    }

    pub fn set_password_hash(&self, user_id: &str, hash: &str) -> Result<(), StoreError> {
        self.db_write(|sql| {
            sql.execute(
                "UPDATE users SET password_hash = ?1 WHERE id = ?2",
                args![hash, user_id],
            )?;
            Ok(())
        })
    }

    pub fn user_by_name(&self, username: &str) -> Result<Option<User>, StoreError> {
        self.db_read(|sql| {
            sql.query_opt(
                &format!("SELECT {COLUMNS} FROM users WHERE username = ?1"),
                args![username],
            )?
            .as_ref()
            .map(from_row)
            .transpose()
        })
    }

    pub fn user_by_id(&self, id: &str) -> Result<Option<User>, StoreError> {
        self.db_read(|sql| {
            sql.query_opt(
                &format!("SELECT {COLUMNS} FROM users WHERE id = ?1"),
                args![id],
            )?
            .as_ref()
            .map(from_row)
            .transpose()
        })
    }

    /// Looks a user up by name, failing with a message that says what to do.
    pub fn require_user(&self, username: &str) -> Result<User, StoreError> {
        self.user_by_name(username)?.ok_or_else(|| {
            StoreError::NotFound(format!(
                "user '{username}' (create it with `valet user create {username} --email ...`)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_and_emails_are_validated() {
        assert!(validate_username("ada-1").is_ok());
        for bad in ["", "-ada", "a/b", "a b", "ä"] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
        assert!(validate_email("a@b.io").is_ok());
        assert!(validate_email("first.last+tag@mail.example.co.uk").is_ok());
        // Found by the `email` fuzz target: accepted here, refused by the
        // mailer (issue #17).
        for bad in [
            "a@b..c",
            "a@.b",
            "a@b.",
            ".a@b.io",
            "a..b@b.io",
            "a@-b.io",
            "a@b.123",
        ] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
        for bad in ["a", "a@b", "a@b.io\r\nBcc: x@y.z", "<a@b.io>", "a@b@c.io"] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tiers_are_parsed_once_and_kept() {
        assert_eq!("pro".parse::<Tier>().ok(), Some(Tier::Pro));
        let err = "gold".parse::<Tier>().expect_err("gold");
        assert_eq!(err.to_string(), "invalid tier 'gold': use free or pro");
        for backend in crate::testing::Backends::all() {
            let store = backend.open();
            let user = store
                .create_user("ada", "ada@example.com", None)
                .expect("user");
            assert_eq!(user.tier, Tier::Free);
            store.set_tier(&user.id, Tier::Pro).expect("tier");
            let back = store.user_by_id(&user.id).expect("read").expect("found");
            assert_eq!(back.tier, Tier::Pro);
        }
    }

    #[test]
    fn duplicate_user_is_a_conflict() {
        for backend in crate::testing::Backends::all() {
            let store = backend.open();
            store
                .create_user("ada", "ada@example.com", None)
                .expect("first");
            let err = store
                .create_user("ada", "ada@example.com", None)
                .expect_err("second");
            assert!(err.to_string().contains("already exists"), "{backend:?}");
        }
    }
}
