//! Users: the people (and their accounts) that own vals, tokens and data.

use serde::Serialize;

use crate::sql::{Row, args};
use crate::{Store, StoreError, new_id, time};

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub username: String,
    pub email: String,
    pub tier: String,
    #[serde(skip)]
    pub password_hash: Option<String>,
}

const COLUMNS: &str = "id, username, email, tier, password_hash";

fn from_row(row: &Row) -> Result<User, StoreError> {
    Ok(User {
        id: row.get(0)?,
        username: row.get(1)?,
        email: row.get(2)?,
        tier: row.get(3)?,
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

pub fn validate_email(email: &str) -> Result<(), StoreError> {
    let ok = email.len() <= 254
        && !email
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>' || c == ',')
        && email
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.contains('@'));
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
            tier: "free".to_owned(),
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
                    user.tier,
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

    pub fn set_tier(&self, user_id: &str, tier: &str) -> Result<(), StoreError> {
        self.db_write(|sql| {
            sql.execute(
                "UPDATE users SET tier = ?1 WHERE id = ?2",
                args![tier, user_id],
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
        for bad in ["a", "a@b", "a@b.io\r\nBcc: x@y.z", "<a@b.io>", "a@b@c.io"] {
            assert!(validate_email(bad).is_err(), "{bad}");
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
