//! The email outbox: every message is stored first, then delivered by the
//! mailer (when an SMTP relay is configured) with retries.
//!
//! An [`EmailMessage`] can only be made by [`EmailMessage::new`], which
//! checks every address and header, and reading one back from the outbox
//! goes through the same check. Custom headers come from an allowlist:
//! nothing a val sends can replace From, Sender, the recipients,
//! Message-ID or the MIME structure. Each user's mail is held to a daily
//! quota of messages and bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use valet_core::Granted;
use valet_core::grant::{EmailRead, EmailWrite};

use crate::sql::{Dialect, Row, Sql, args};
use crate::{Store, StoreError, time};

/// The address valet's own mail comes from unless configured otherwise.
pub const DEFAULT_EMAIL_FROM: &str = "valet@valet.localhost";

/// Recipients (to, cc and bcc together) of one message.
pub const MAX_RECIPIENTS: usize = 50;

/// Custom headers of one message.
pub const MAX_HEADERS: usize = 32;

/// An attachment as the std library sends it.
///
/// Serde here (and on [`EmailDraft`] and [`EmailMessage`]) is the store's
/// own format: a queued message is kept as JSON in the outbox's `message`
/// column and read back through [`EmailMessage::new`]. The API's request
/// and response shapes are written in valet-api (`routes/email.rs`).
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

/// The parts of a message before they are checked. Addresses are
/// `local@domain` or `"Name" <local@domain>`. Serialized only as the
/// outbox's stored form (see [`Attachment`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EmailDraft {
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

/// A checked message: every address is a plain mailbox, no header-bound
/// field holds a CR, LF or NUL, custom headers come from the allowlist,
/// and attachments are base64. Stored in the outbox as the JSON of its
/// draft and read back through the same check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "EmailDraft", into = "EmailDraft")]
pub struct EmailMessage {
    draft: EmailDraft,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A custom header that valet sets itself or does not pass on.
    #[error("{0}")]
    HeaderNotAllowed(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> EmailError {
    EmailError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn single_line(field: &'static str, value: &str) -> Result<(), EmailError> {
    if value.contains(['\r', '\n', '\0']) {
        return Err(invalid(field, "must not contain line breaks"));
    }
    Ok(())
}

/// Checks `local@domain` or `"Name" <local@domain>`.
fn check_mailbox(field: &'static str, text: &str) -> Result<(), EmailError> {
    single_line(field, text)?;
    let address = match text.strip_suffix('>').and_then(|t| t.rsplit_once(" <")) {
        Some((name, address)) => {
            let inner = name
                .strip_prefix('"')
                .and_then(|n| n.strip_suffix('"'))
                .ok_or_else(|| invalid(field, format!("a name must be quoted in '{text}'")))?;
            if inner.is_empty() || inner.contains(['"', '<', '>', '\\']) {
                return Err(invalid(
                    field,
                    "a name must not be empty or contain quotes, backslashes or angle brackets",
                ));
            }
            address
        }
        None => text,
    };
    crate::users::validate_email(address).map_err(|e| invalid(field, e.to_string()))
}

/// Headers valet sets itself: a val may never set or replace them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "message-id",
    "subject",
    "date",
    "mime-version",
    "return-path",
];

/// Headers beyond `X-*` that a val may set (the hosted std passes custom
/// headers on; these are the ones mail to people uses).
const ALLOWED_HEADERS: &[&str] = &[
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-id",
    "in-reply-to",
    "references",
    "auto-submitted",
    "precedence",
];

/// Whether a val may set the header `name`; the error names it and says
/// what is allowed.
pub fn check_custom_header(name: &str) -> Result<(), EmailError> {
    let valid = !name.is_empty()
        && name.len() <= 76
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid {
        return Err(invalid(
            "headers",
            format!("invalid header name '{}'", name.escape_debug()),
        ));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("content-") {
        let how = match lower.as_str() {
            "reply-to" => " (use the replyTo field)",
            "to" | "cc" | "bcc" => " (use the to, cc and bcc fields)",
            "subject" => " (use the subject field)",
            _ => "",
        };
        return Err(EmailError::HeaderNotAllowed(format!(
            "header '{name}' is set by valet and cannot be overridden{how}"
        )));
    }
    if (lower.starts_with("x-") && lower.len() > 2) || ALLOWED_HEADERS.contains(&lower.as_str()) {
        return Ok(());
    }
    Err(EmailError::HeaderNotAllowed(format!(
        "header '{name}' is not allowed: use an X-* header or one of List-Unsubscribe, \
         List-Unsubscribe-Post, List-Id, In-Reply-To, References, Auto-Submitted, Precedence"
    )))
}

impl EmailMessage {
    /// Checks a draft; the only way to make a message.
    pub fn new(draft: EmailDraft) -> Result<EmailMessage, EmailError> {
        check_mailbox("from", &draft.from)?;
        if draft.to.is_empty() {
            return Err(invalid("to", "a message needs a recipient"));
        }
        for (field, list) in [
            ("to", &draft.to),
            ("cc", &draft.cc),
            ("bcc", &draft.bcc),
            ("replyTo", &draft.reply_to),
        ] {
            for address in list {
                check_mailbox(field, address)?;
            }
        }
        if draft.to.len() + draft.cc.len() + draft.bcc.len() > MAX_RECIPIENTS {
            return Err(invalid(
                "to",
                format!("at most {MAX_RECIPIENTS} recipients (to, cc and bcc together)"),
            ));
        }
        single_line("subject", &draft.subject)?;
        if draft.headers.len() > MAX_HEADERS {
            return Err(invalid(
                "headers",
                format!("at most {MAX_HEADERS} custom headers"),
            ));
        }
        for (name, value) in &draft.headers {
            single_line("headers", name)?;
            single_line("headers", value)?;
            check_custom_header(name)?;
        }
        for a in &draft.attachments {
            single_line("attachments", &a.filename)?;
            for text in [&a.content_type, &a.disposition].into_iter().flatten() {
                single_line("attachments", text)?;
            }
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &a.content)
                .map_err(|_| {
                    invalid(
                        "attachments",
                        format!("attachment '{}' is not base64", a.filename),
                    )
                })?;
        }
        Ok(EmailMessage { draft })
    }

    pub fn from(&self) -> &str {
        &self.draft.from
    }

    pub fn to(&self) -> &[String] {
        &self.draft.to
    }

    pub fn cc(&self) -> &[String] {
        &self.draft.cc
    }

    pub fn bcc(&self) -> &[String] {
        &self.draft.bcc
    }

    pub fn reply_to(&self) -> &[String] {
        &self.draft.reply_to
    }

    pub fn subject(&self) -> &str {
        &self.draft.subject
    }

    pub fn text(&self) -> Option<&str> {
        self.draft.text.as_deref()
    }

    pub fn html(&self) -> Option<&str> {
        self.draft.html.as_deref()
    }

    /// Custom headers, each allowed by [`check_custom_header`].
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.draft.headers
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.draft.attachments
    }
}

impl TryFrom<EmailDraft> for EmailMessage {
    type Error = EmailError;

    fn try_from(draft: EmailDraft) -> Result<EmailMessage, EmailError> {
        EmailMessage::new(draft)
    }
}

impl From<EmailMessage> for EmailDraft {
    fn from(message: EmailMessage) -> EmailDraft {
        message.draft
    }
}

/// A message valet itself sends to a user (a leak report, a migration
/// notice), from the configured sender address.
pub fn system_message(
    sender_name: &str,
    sender_address: &str,
    to: &str,
    subject: String,
    text: String,
) -> Result<EmailMessage, EmailError> {
    EmailMessage::new(EmailDraft {
        from: format!("\"{sender_name}\" <{sender_address}>"),
        to: vec![to.to_owned()],
        subject,
        text: Some(text),
        ..EmailDraft::default()
    })
}

/// How much mail one user may queue per day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmailQuota {
    pub messages_per_day: u64,
    pub bytes_per_day: u64,
}

impl Default for EmailQuota {
    fn default() -> EmailQuota {
        EmailQuota {
            messages_per_day: 100,
            bytes_per_day: 32 << 20,
        }
    }
}

/// The daily quota is used up; says when it resets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub what: String,
    pub resets_at_ms: i64,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let minutes = ((self.resets_at_ms - time::now_ms()).max(0) + 59_999) / 60_000;
        write!(
            f,
            "daily email quota reached: {}; it resets at {} (in {} h {} min)",
            self.what,
            time::iso(self.resets_at_ms),
            minutes / 60,
            minutes % 60
        )
    }
}

const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxStatus {
    Queued,
    Sent,
    Failed,
}

impl OutboxStatus {
    /// The word stored in the `status` column (and shown by the API).
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Queued => "queued",
            OutboxStatus::Sent => "sent",
            OutboxStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> OutboxStatus {
        match s {
            "sent" => OutboxStatus::Sent,
            "failed" => OutboxStatus::Failed,
            _ => OutboxStatus::Queued,
        }
    }
}

/// A queued message and how its delivery stands. Times are unix
/// milliseconds.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub id: i64,
    pub user_id: String,
    pub status: OutboxStatus,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub sent_at: Option<i64>,
    pub message: EmailMessage,
}

/// Delivery attempts before a message is marked failed. With the backoff
/// (2 s doubling up to 17 min) that is about four and a half hours: a
/// relay that is down for an afternoon loses nothing.
pub const MAX_ATTEMPTS: i64 = 24;

/// How long a node that took a message for delivery holds it before
/// another node may try it (when the first died mid-delivery, say).
const CLAIM_MS: i64 = 120_000;

/// A row, with its message checked: `Err` carries the id and why a stored
/// message no longer passes (written by an older valet, say).
type Checked = Result<OutboxEntry, (i64, String)>;

fn entry_from_row(row: &Row) -> Result<Checked, StoreError> {
    let id: i64 = row.get(0)?;
    let message: String = row.get(6)?;
    let message: EmailMessage = match serde_json::from_str(&message) {
        Ok(m) => m,
        Err(e) => return Ok(Err((id, e.to_string()))),
    };
    let status: String = row.get(2)?;
    let created: i64 = row.get(5)?;
    let sent: Option<i64> = row.get(7)?;
    Ok(Ok(OutboxEntry {
        id,
        user_id: row.get(1)?,
        status: OutboxStatus::parse(&status),
        attempts: row.get(3)?,
        last_error: row.get(4)?,
        created_at: created,
        sent_at: sent,
        message,
    }))
}

const COLUMNS: &str = "id, user_id, status, attempts, last_error, created_at, message, sent_at";

fn to_json(message: &EmailMessage) -> Result<String, StoreError> {
    serde_json::to_string(message).map_err(|e| StoreError::Invalid(e.to_string()))
}

impl Store {
    /// Queues a message a user sends, within their daily quota.
    pub fn enqueue_email(
        &self,
        grant: &Granted<EmailWrite>,
        message: &EmailMessage,
        quota: &EmailQuota,
    ) -> Result<i64, StoreError> {
        let json = to_json(message)?;
        let user_id = grant.user_id();
        let now = time::now_ms();
        let day_start = now - now.rem_euclid(DAY_MS);
        // The lock orders the check and the insert, so two sends at once
        // (on any node) cannot both take the last message of the day.
        self.db_write(|sql| {
            sql.lock(&format!("valet email quota {user_id}"))?;
            let row = sql.query_one(
                "SELECT COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM outbox
                 WHERE user_id = ?1 AND created_at >= ?2 AND system = 0",
                args![user_id, day_start],
            )?;
            let (count, bytes): (i64, i64) = (row.get(0)?, row.get(1)?);
            let over = if count as u64 >= quota.messages_per_day {
                Some(format!("{} messages per day", quota.messages_per_day))
            } else if bytes as u64 + json.len() as u64 > quota.bytes_per_day {
                Some(format!(
                    "{} bytes per day, {} used and this message is {}",
                    quota.bytes_per_day,
                    bytes,
                    json.len()
                ))
            } else {
                None
            };
            if let Some(what) = over {
                return Err(StoreError::EmailQuota(QuotaExceeded {
                    what,
                    resets_at_ms: day_start + DAY_MS,
                }));
            }
            enqueue_in(sql, user_id, &json, false)
        })
    }

    /// Queues mail valet itself sends to a user (a leak report): not
    /// counted against the user's quota.
    pub fn enqueue_system_email(
        &self,
        grant: &Granted<EmailWrite>,
        message: &EmailMessage,
    ) -> Result<i64, StoreError> {
        let json = to_json(message)?;
        self.db_write(|sql| enqueue_in(sql, grant.user_id(), &json, true))
    }

    /// Takes messages due for a delivery attempt: each is held for this
    /// caller (for [`CLAIM_MS`]) in the same transaction that reads it, so
    /// when several nodes deliver, each message goes to exactly one. A
    /// stored message that no longer passes the checks is marked failed
    /// rather than sent.
    pub fn due_emails(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let now = time::now_ms();
        self.db_write(|sql| {
            let skip_locked = match sql.dialect() {
                Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
                Dialect::Sqlite => "",
            };
            let rows: Vec<Checked> = sql.query_map(
                &format!(
                    "SELECT {COLUMNS} FROM outbox WHERE status = 'queued' AND next_attempt_at <= ?1
                     ORDER BY id LIMIT ?2{skip_locked}"
                ),
                args![now, limit as i64],
                entry_from_row,
            )?;
            let mut due = Vec::with_capacity(rows.len());
            for row in rows {
                match row {
                    Ok(entry) => {
                        sql.execute(
                            "UPDATE outbox SET next_attempt_at = ?1 WHERE id = ?2",
                            args![now + CLAIM_MS, entry.id],
                        )?;
                        due.push(entry);
                    }
                    Err((id, why)) => {
                        sql.execute(
                            "UPDATE outbox SET status = 'failed', last_error = ?1 WHERE id = ?2",
                            args![format!("refused: {why}"), id],
                        )?;
                    }
                }
            }
            Ok(due)
        })
    }

    pub fn mark_email_sent(&self, id: i64) -> Result<(), StoreError> {
        self.db_write(|sql| {
            sql.execute(
                "UPDATE outbox SET status = 'sent', attempts = attempts + 1, sent_at = ?1, last_error = NULL WHERE id = ?2",
                args![time::now_ms(), id],
            )?;
            Ok(())
        })
    }

    /// Records a failed attempt; backs off exponentially and gives up after
    /// [`MAX_ATTEMPTS`].
    pub fn mark_email_attempt_failed(&self, id: i64, error: &str) -> Result<(), StoreError> {
        self.db_write(|sql| {
            sql.lock(&format!("valet outbox {id}"))?;
            let attempts: i64 = sql
                .query_opt("SELECT attempts FROM outbox WHERE id = ?1", args![id])?
                .ok_or_else(|| StoreError::NotFound(format!("email {id}")))?
                .get(0)?;
            let attempts = attempts + 1;
            let status = if attempts >= MAX_ATTEMPTS { "failed" } else { "queued" };
            let backoff = 1000i64 << attempts.min(10);
            sql.execute(
                "UPDATE outbox SET status = ?1, attempts = ?2, last_error = ?3, next_attempt_at = ?4 WHERE id = ?5",
                args![status, attempts, error, time::now_ms() + backoff, id],
            )?;
            Ok(())
        })
    }

    /// The user's latest messages (any that no longer pass the checks are
    /// left out).
    pub fn list_emails(
        &self,
        grant: &Granted<EmailRead>,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows: Vec<Checked> = self.db_read(|sql| {
            sql.query_map(
                &format!(
                    "SELECT {COLUMNS} FROM outbox WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2"
                ),
                args![grant.user_id(), limit as i64],
                entry_from_row,
            )
        })?;
        Ok(rows.into_iter().filter_map(Result::ok).collect())
    }

    pub fn email_of_user(
        &self,
        grant: &Granted<EmailRead>,
        id: i64,
    ) -> Result<Option<OutboxEntry>, StoreError> {
        let row: Option<Checked> = self.db_read(|sql| {
            sql.query_opt(
                &format!("SELECT {COLUMNS} FROM outbox WHERE user_id = ?1 AND id = ?2"),
                args![grant.user_id(), id],
            )?
            .as_ref()
            .map(entry_from_row)
            .transpose()
        })?;
        row.transpose()
            .map_err(|(id, why)| StoreError::Corrupt(format!("email {id}: {why}")))
    }
}

pub(crate) fn enqueue_in(
    sql: &mut Sql<'_>,
    user_id: &str,
    json: &str,
    system: bool,
) -> Result<i64, StoreError> {
    let now = time::now_ms();
    sql.query_one(
        "INSERT INTO outbox (user_id, message, next_attempt_at, created_at, bytes, system)
         VALUES (?1, ?2, ?3, ?3, ?4, ?5) RETURNING id",
        args![user_id, json, now, json.len() as i64, system],
    )?
    .get(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft() -> EmailDraft {
        EmailDraft {
            from: "\"ada via valet\" <valet@valet.localhost>".into(),
            to: vec!["ada@example.com".into()],
            subject: "Hi".into(),
            text: Some("x".into()),
            ..EmailDraft::default()
        }
    }

    #[test]
    fn a_message_passes_the_checks_or_is_not_made() {
        assert!(EmailMessage::new(draft()).is_ok());
        type Change = fn(&mut EmailDraft);
        let cases: Vec<(Change, &str)> = vec![
            (|d| d.from = "PayPal <security@paypal.com>".into(), "from"),
            (|d| d.to = vec![], "to"),
            (|d| d.to = vec!["a@b.io\r\nBcc: x@y.z".into()], "to"),
            (|d| d.cc = vec!["\"A\"B\" <a@b.io>".into()], "cc"),
            (|d| d.subject = "Hi\nBcc: x@y.z".into(), "subject"),
            (
                |d| {
                    d.headers.insert("X-A".into(), "b\r\nBcc: x@y.z".into());
                },
                "headers",
            ),
            (
                |d| {
                    d.attachments.push(Attachment {
                        filename: "a".into(),
                        content: "not base64!".into(),
                        content_type: None,
                        disposition: None,
                    })
                },
                "attachments",
            ),
        ];
        for (change, field) in cases {
            let mut d = draft();
            change(&mut d);
            match EmailMessage::new(d) {
                Err(EmailError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn only_allowlisted_headers_and_never_the_senders_or_the_structure() {
        for name in [
            "From",
            "SENDER",
            "reply-to",
            "To",
            "Cc",
            "Bcc",
            "Message-ID",
            "Content-Type",
            "content-transfer-encoding",
            "MIME-Version",
            "Date",
            "Return-Path",
            "Received",
            "DKIM-Signature",
        ] {
            let mut d = draft();
            d.headers.insert(name.into(), "x".into());
            match EmailMessage::new(d) {
                Err(EmailError::HeaderNotAllowed(m)) => {
                    assert!(m.contains(&format!("'{name}'")), "{m}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        for name in ["X-Val", "x-priority", "List-Unsubscribe", "In-Reply-To"] {
            let mut d = draft();
            d.headers.insert(name.into(), "x".into());
            assert!(EmailMessage::new(d).is_ok(), "{name}");
        }
        assert!(matches!(
            check_custom_header("X-"),
            Err(EmailError::HeaderNotAllowed(_))
        ));
        assert!(matches!(
            check_custom_header("X A"),
            Err(EmailError::Invalid { .. })
        ));
    }

    #[test]
    fn reading_a_message_back_runs_the_same_checks() {
        let message = EmailMessage::new(draft()).expect("valid");
        let json = serde_json::to_string(&message).expect("json");
        assert_eq!(
            serde_json::from_str::<EmailMessage>(&json).expect("back"),
            message
        );
        let forged = json.replace("\"headers\":{}", "\"headers\":{\"From\":\"x@paypal.com\"}");
        assert!(serde_json::from_str::<EmailMessage>(&forged).is_err());
    }

    #[test]
    fn the_daily_quota_counts_messages_and_bytes_but_not_system_mail() {
        for backend in crate::testing::Backends::all() {
            daily_quota(&backend.open());
        }
    }

    fn daily_quota(store: &Store) {
        let user = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        let grant = Granted::for_operator(&user.id);
        let message = EmailMessage::new(draft()).expect("valid");
        let quota = EmailQuota {
            messages_per_day: 2,
            bytes_per_day: 1 << 20,
        };
        store
            .enqueue_email(&grant, &message, &quota)
            .expect("first");
        store
            .enqueue_system_email(&grant, &message)
            .expect("system mail is not counted");
        store
            .enqueue_email(&grant, &message, &quota)
            .expect("second");
        let Err(StoreError::EmailQuota(over)) = store.enqueue_email(&grant, &message, &quota)
        else {
            panic!("a third message must be refused");
        };
        assert_eq!(over.resets_at_ms % DAY_MS, 0, "resets at midnight UTC");
        assert!(over.resets_at_ms > time::now_ms());
        let text = over.to_string();
        assert!(
            text.contains("2 messages per day") && text.contains("resets at"),
            "{text}"
        );

        let mut big = draft();
        big.text = Some("x".repeat(600 << 10));
        let big = EmailMessage::new(big).expect("valid");
        let bytes = EmailQuota {
            messages_per_day: 100,
            bytes_per_day: 1 << 20,
        };
        let bob = store
            .create_user("bob", "bob@example.com", None)
            .expect("bob");
        let bob = Granted::for_operator(&bob.id);
        store.enqueue_email(&bob, &big, &bytes).expect("first big");
        let Err(StoreError::EmailQuota(over)) = store.enqueue_email(&bob, &big, &bytes) else {
            panic!("the second big message passes the byte quota");
        };
        assert!(over.what.contains("1048576 bytes per day"), "{}", over.what);
    }

    #[test]
    fn a_stored_message_that_no_longer_passes_is_failed_not_sent() {
        for backend in crate::testing::Backends::all() {
            let store = backend.open();
            let forged = r#"{"from":"x@valet.localhost","to":["a@b.io"],"headers":{"From":"ceo@paypal.com"}}"#;
            let good = to_json(&EmailMessage::new(draft()).expect("valid")).expect("json");
            let (bad_id, _) = store
                .db_write(|sql| {
                    Ok((
                        enqueue_in(sql, "usr_1", forged, false)?,
                        enqueue_in(sql, "usr_1", &good, false)?,
                    ))
                })
                .expect("seed");
            let due = store.due_emails(10).expect("due");
            assert_eq!(due.len(), 1, "only the valid message is due");
            let failed: (String, String) = store
                .db_read(|sql| {
                    let row = sql.query_one(
                        "SELECT status, last_error FROM outbox WHERE id = ?1",
                        args![bad_id],
                    )?;
                    Ok((row.get(0)?, row.get(1)?))
                })
                .expect("row");
            assert_eq!(failed.0, "failed");
            assert!(failed.1.contains("'From'"), "{}", failed.1);
        }
    }

    #[test]
    fn each_due_message_is_taken_by_one_node() {
        let backend = crate::testing::Backends::postgres();
        let store = backend.open();
        let good = to_json(&EmailMessage::new(draft()).expect("valid")).expect("json");
        store
            .db_write(|sql| {
                for _ in 0..40 {
                    enqueue_in(sql, "usr_1", &good, false)?;
                }
                Ok(())
            })
            .expect("seed");
        let nodes: Vec<Store> = (0..4).map(|_| backend.open()).collect();
        let mut taken: Vec<i64> = std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|node| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let batch = node.due_emails(3).expect("due");
                            if batch.is_empty() {
                                return mine;
                            }
                            mine.extend(batch.iter().map(|e| e.id));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        taken.sort_unstable();
        let before = taken.len();
        taken.dedup();
        assert_eq!(before, 40, "every message taken once: {taken:?}");
        assert_eq!(taken.len(), 40);
        assert!(
            store.due_emails(10).expect("due").is_empty(),
            "none left due"
        );
    }
}
