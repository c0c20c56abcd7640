//! `POST /v1/email`: validate, store in the outbox, answer 202; the mailer
//! delivers. The message is an [`EmailMessage`], whose constructor refuses
//! line breaks in header-bound fields and any custom header that could
//! replace valet's own (From, Sender, the recipients, Message-ID,
//! Content-*). Each user's mail is held to a daily quota.
//!
//! The JSON of a message and of an outbox entry is written here; the
//! store keeps its own (stored) form of a message.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use valet_core::grant::{EmailRead, EmailWrite};
use valet_store::outbox_types::Attachment as StoredAttachment;
use valet_store::{EmailDraft, EmailError, EmailMessage, OutboxEntry, time};

use super::blocking;
use crate::{ApiError, AppState, Caller};

/// One address as the std library may send it.
#[derive(Deserialize)]
#[serde(untagged)]
enum Address {
    Plain(String),
    Named { email: String, name: Option<String> },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Addresses {
    One(Address),
    Many(Vec<Address>),
}

impl Addresses {
    fn into_vec(self) -> Vec<Address> {
        match self {
            Addresses::One(a) => vec![a],
            Addresses::Many(v) => v,
        }
    }
}

/// An attachment as the std library sends it, and as the outbox shows it.
/// (Named like the store's attachment because serde quotes the name to a
/// client whose attachment is not an object.)
#[derive(Deserialize, Serialize)]
struct Attachment {
    filename: String,
    /// Base64 content.
    content: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disposition: Option<String>,
}

impl From<Attachment> for StoredAttachment {
    fn from(a: Attachment) -> StoredAttachment {
        StoredAttachment {
            filename: a.filename,
            content: a.content,
            content_type: a.content_type,
            disposition: a.disposition,
        }
    }
}

impl From<&StoredAttachment> for Attachment {
    fn from(a: &StoredAttachment) -> Attachment {
        Attachment {
            filename: a.filename.clone(),
            content: a.content.clone(),
            content_type: a.content_type.clone(),
            disposition: a.disposition.clone(),
        }
    }
}

/// A queued message as `GET /v1/email[/{id}]` shows it.
#[derive(Serialize)]
struct MessageJson<'a> {
    from: &'a str,
    to: &'a [String],
    cc: &'a [String],
    bcc: &'a [String],
    #[serde(rename = "replyTo")]
    reply_to: &'a [String],
    subject: &'a str,
    text: Option<&'a str>,
    html: Option<&'a str>,
    headers: &'a BTreeMap<String, String>,
    attachments: Vec<Attachment>,
}

/// An outbox entry: the message and how its delivery stands.
#[derive(Serialize)]
struct OutboxJson<'a> {
    id: i64,
    status: &'static str,
    attempts: i64,
    last_error: Option<&'a str>,
    created_at: String,
    sent_at: Option<String>,
    message: MessageJson<'a>,
}

impl<'a> From<&'a OutboxEntry> for OutboxJson<'a> {
    fn from(e: &'a OutboxEntry) -> OutboxJson<'a> {
        let m = &e.message;
        OutboxJson {
            id: e.id,
            status: e.status.as_str(),
            attempts: e.attempts,
            last_error: e.last_error.as_deref(),
            created_at: time::iso(e.created_at),
            sent_at: e.sent_at.map(time::iso),
            message: MessageJson {
                from: m.from(),
                to: m.to(),
                cc: m.cc(),
                bcc: m.bcc(),
                reply_to: m.reply_to(),
                subject: m.subject(),
                text: m.text(),
                html: m.html(),
                headers: m.headers(),
                attachments: m.attachments().iter().map(Attachment::from).collect(),
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailBody {
    to: Option<Addresses>,
    from: Option<Address>,
    cc: Option<Addresses>,
    bcc: Option<Addresses>,
    #[serde(rename = "replyTo")]
    reply_to: Option<Addresses>,
    /// What the hosted std/email sends for `replyTo`.
    #[serde(rename = "replyToList")]
    reply_to_list: Option<Addresses>,
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    attachments: Vec<Attachment>,
}

fn no_newlines(field: &str, value: &str) -> Result<(), ApiError> {
    if value.contains(['\r', '\n', '\0']) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_email",
            format!("{field} must not contain line breaks"),
        ));
    }
    Ok(())
}

fn render(field: &str, address: Address) -> Result<String, ApiError> {
    let (email, name) = match address {
        Address::Plain(s) => match s.split_once('<') {
            Some((name, rest)) => (
                rest.trim_end().trim_end_matches('>').to_owned(),
                Some(name.trim().trim_matches('"').to_owned()),
            ),
            None => (s, None),
        },
        Address::Named { email, name } => (email, name),
    };
    no_newlines(field, &email)?;
    valet_store::validate_email(email.trim()).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_email",
            format!("{field}: {e}"),
        )
    })?;
    match name.filter(|n| !n.is_empty()) {
        Some(name) => {
            no_newlines(field, &name)?;
            if name.contains(['"', '<', '>']) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_email",
                    format!("{field}: a name must not contain quotes or angle brackets"),
                ));
            }
            Ok(format!("\"{name}\" <{}>", email.trim()))
        }
        None => Ok(email.trim().to_owned()),
    }
}

fn render_all(field: &str, list: Option<Addresses>) -> Result<Vec<String>, ApiError> {
    list.map(Addresses::into_vec)
        .unwrap_or_default()
        .into_iter()
        .map(|a| render(field, a))
        .collect()
}

/// The bare address of a rendered `"Name" <a@b>` or `a@b`.
fn bare(rendered: &str) -> &str {
    match rendered.rsplit_once('<') {
        Some((_, rest)) => rest.trim_end_matches('>'),
        None => rendered,
    }
}

fn refused(e: EmailError) -> ApiError {
    match e {
        EmailError::HeaderNotAllowed(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "header_not_allowed", m)
        }
        EmailError::Invalid { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_email", e.to_string())
        }
    }
}

/// What the hosted API answers, with valet's outbox id and status beside it.
const ACCEPTED: &str = "Email accepted to be sent";

pub async fn send(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<EmailBody>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let grant = caller.require::<EmailWrite>()?;
    let body = super::json_body(body)?;
    let user_id = grant.user_id().to_owned();
    let user = blocking(&state, move |s| s.user_by_id(&user_id))
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;

    let mut to = render_all("to", body.to)?;
    if to.is_empty() {
        to.push(user.email.clone());
    }
    let cc = render_all("cc", body.cc)?;
    let bcc = render_all("bcc", body.bcc)?;
    let mut reply_to = render_all("replyTo", body.reply_to)?;
    reply_to.extend(render_all("replyToList", body.reply_to_list)?);
    let recipients: Vec<&String> = to.iter().chain(&cc).chain(&bcc).collect();
    // Free accounts may only email themselves, so a leaked key cannot turn
    // valet into a spam relay.
    if !user.tier.may_email_anyone()
        && recipients
            .iter()
            .any(|r| !bare(r).eq_ignore_ascii_case(&user.email))
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "recipient_not_allowed",
            "this account can only send email to its own address",
        ));
    }
    // The address is always valet's; a val chooses only the display name.
    let from_name = match body.from {
        Some(Address::Named {
            name: Some(name), ..
        }) => Some(name),
        Some(Address::Plain(s)) => s
            .split_once('<')
            .map(|(n, _)| n.trim().trim_matches('"').to_owned()),
        _ => None,
    }
    .filter(|n| !n.is_empty())
    .unwrap_or_else(|| format!("{} via valet", user.username));
    let from = render(
        "from",
        Address::Named {
            email: state.config.email_from.clone(),
            name: Some(from_name),
        },
    )?;
    if body.text.is_none()
        && body.html.is_none()
        && body.attachments.is_empty()
        && body.subject.as_deref().is_none_or(str::is_empty)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_email",
            "an email needs a subject, text, html or an attachment",
        ));
    }
    // The hosted std's documented default.
    let subject = body
        .subject
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("Message from @{} on Val Town", user.username));
    let message = EmailMessage::new(EmailDraft {
        from,
        to,
        cc,
        bcc,
        reply_to,
        subject,
        text: body.text,
        html: body.html,
        headers: body.headers,
        attachments: body
            .attachments
            .into_iter()
            .map(StoredAttachment::from)
            .collect(),
    })
    .map_err(refused)?;
    let quota = state.config.email_quota;
    let id = blocking(&state, move |s| s.enqueue_email(&grant, &message, &quota)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "message": ACCEPTED, "id": id, "status": "queued" })),
    ))
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let grant = caller.require::<EmailRead>()?;
    let entries = blocking(&state, move |s| s.list_emails(&grant, 100)).await?;
    Ok(Json(entries.iter().map(OutboxJson::from).collect::<Vec<_>>()).into_response())
}

pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let grant = caller.require::<EmailRead>()?;
    let entry = blocking(&state, move |s| s.email_of_user(&grant, id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("email {id}")))?;
    Ok(Json(OutboxJson::from(&entry)).into_response())
}
