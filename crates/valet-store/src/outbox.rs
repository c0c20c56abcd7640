//! The email outbox: every message is stored first, then delivered by the
//! mailer (when an SMTP relay is configured) with retries.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError, time};

/// An attachment as the std library sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub filename: String,
    /// Base64 content.
    pub content: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disposition: Option<String>,
}

/// A validated message: addresses are plain `local@domain` or
/// `Name <local@domain>`, and no field holds a CR or LF, so header
/// injection cannot happen downstream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmailMessage {
    pub from: String,
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    #[serde(default, rename = "replyTo")]
    pub reply_to: Vec<String>,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    Queued,
    Sent,
    Failed,
}

impl OutboxStatus {
    fn parse(s: &str) -> OutboxStatus {
        match s {
            "sent" => OutboxStatus::Sent,
            "failed" => OutboxStatus::Failed,
            _ => OutboxStatus::Queued,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OutboxEntry {
    pub id: i64,
    #[serde(skip)]
    pub user_id: String,
    pub status: OutboxStatus,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: String,
    pub sent_at: Option<String>,
    pub message: EmailMessage,
}

/// Delivery attempts before a message is marked failed. With the backoff
/// (2 s doubling up to 17 min) that is about four and a half hours: a
/// relay that is down for an afternoon loses nothing.
pub const MAX_ATTEMPTS: i64 = 24;

fn entry_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEntry> {
    let message: String = row.get(6)?;
    let message: EmailMessage = serde_json::from_str(&message).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let status: String = row.get(2)?;
    let created: i64 = row.get(5)?;
    let sent: Option<i64> = row.get(7)?;
    Ok(OutboxEntry {
        id: row.get(0)?,
        user_id: row.get(1)?,
        status: OutboxStatus::parse(&status),
        attempts: row.get(3)?,
        last_error: row.get(4)?,
        created_at: time::iso(created),
        sent_at: sent.map(time::iso),
        message,
    })
}

const COLUMNS: &str = "id, user_id, status, attempts, last_error, created_at, message, sent_at";

impl Store {
    pub fn enqueue_email(&self, user_id: &str, message: &EmailMessage) -> Result<i64, StoreError> {
        let json =
            serde_json::to_string(message).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.write(|c| enqueue_in(c, user_id, &json))
    }

    /// Messages due for a delivery attempt.
    pub fn due_emails(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE status = 'queued' AND next_attempt_at <= ?1
                 ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![time::now_ms(), limit as i64], entry_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn mark_email_sent(&self, id: i64) -> Result<(), StoreError> {
        self.write(|c| {
            c.execute(
                "UPDATE outbox SET status = 'sent', attempts = attempts + 1, sent_at = ?1, last_error = NULL WHERE id = ?2",
                params![time::now_ms(), id],
            )?;
            Ok(())
        })
    }

    /// Records a failed attempt; backs off exponentially and gives up after
    /// [`MAX_ATTEMPTS`].
    pub fn mark_email_attempt_failed(&self, id: i64, error: &str) -> Result<(), StoreError> {
        self.write(|c| {
            let attempts: i64 = c.query_row("SELECT attempts FROM outbox WHERE id = ?1", [id], |r| r.get(0))?;
            let attempts = attempts + 1;
            let status = if attempts >= MAX_ATTEMPTS { "failed" } else { "queued" };
            let backoff = 1000i64 << attempts.min(10);
            c.execute(
                "UPDATE outbox SET status = ?1, attempts = ?2, last_error = ?3, next_attempt_at = ?4 WHERE id = ?5",
                params![status, attempts, error, time::now_ms() + backoff, id],
            )?;
            Ok(())
        })
    }

    pub fn list_emails(&self, user_id: &str, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![user_id, limit as i64], entry_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn email_of_user(&self, user_id: &str, id: i64) -> Result<Option<OutboxEntry>, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                &format!("SELECT {COLUMNS} FROM outbox WHERE user_id = ?1 AND id = ?2"),
                params![user_id, id],
                entry_from_row,
            )
            .optional()?)
        })
    }
}

pub(crate) fn enqueue_in(
    c: &rusqlite::Connection,
    user_id: &str,
    json: &str,
) -> Result<i64, StoreError> {
    let now = time::now_ms();
    c.execute(
        "INSERT INTO outbox (user_id, message, next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?3)",
        params![user_id, json, now],
    )?;
    Ok(c.last_insert_rowid())
}
