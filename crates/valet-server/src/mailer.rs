//! Delivers the outbox through an SMTP relay with lettre, retrying with
//! backoff. Without a relay, messages stay in the outbox (visible under
//! `email:read` and in the logs of `valet serve`).

use std::time::Duration;

use base64::Engine;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use valet_store::{EmailMessage, Store};

/// An SMTP relay given as `smtp://host:port` (plain, for a local relay) or
/// `smtps://host:port` (implicit TLS is not built in: use a local relay).
#[derive(Debug, Clone)]
pub struct SmtpRelay {
    host: String,
    port: u16,
}

impl SmtpRelay {
    pub fn parse(url: &str) -> Result<SmtpRelay, String> {
        let rest = url
            .strip_prefix("smtp://")
            .ok_or_else(|| format!("invalid SMTP URL '{url}': use smtp://host:port"))?;
        let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .map_err(|_| format!("invalid port in SMTP URL '{url}'"))?,
            ),
            None => (rest, 25),
        };
        if host.is_empty() {
            return Err(format!("invalid SMTP URL '{url}': no host"));
        }
        Ok(SmtpRelay {
            host: host.to_owned(),
            port,
        })
    }
}

fn mailbox(text: &str) -> Result<Mailbox, String> {
    text.parse()
        .map_err(|e| format!("bad address '{text}': {e}"))
}

/// Builds the MIME message. Every field was checked when queued (and again
/// when read back); lettre encodes headers again, so nothing a val wrote can
/// add a header line, and a custom header is added only when it is on the
/// allowlist and valet has not set it: it never replaces From, Sender, the
/// recipients, Message-ID or the MIME headers.
pub fn build(message: &EmailMessage) -> Result<Message, String> {
    let mut builder = Message::builder()
        .from(mailbox(message.from())?)
        .subject(message.subject());
    for to in message.to() {
        builder = builder.to(mailbox(to)?);
    }
    for cc in message.cc() {
        builder = builder.cc(mailbox(cc)?);
    }
    for bcc in message.bcc() {
        builder = builder.bcc(mailbox(bcc)?);
    }
    for reply in message.reply_to() {
        builder = builder.reply_to(mailbox(reply)?);
    }
    let body = match (message.text(), message.html()) {
        (Some(text), Some(html)) => {
            MultiPart::alternative_plain_html(text.to_owned(), html.to_owned())
        }
        (None, Some(html)) => {
            MultiPart::alternative().singlepart(SinglePart::html(html.to_owned()))
        }
        (text, None) => MultiPart::mixed().singlepart(SinglePart::plain(
            text.map(str::to_owned).unwrap_or_default(),
        )),
    };
    let body = if message.attachments().is_empty() {
        body
    } else {
        let mut mixed = MultiPart::mixed().multipart(body);
        for a in message.attachments() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&a.content)
                .map_err(|e| format!("attachment '{}': {e}", a.filename))?;
            let content_type = ContentType::parse(
                a.content_type
                    .as_deref()
                    .unwrap_or("application/octet-stream"),
            )
            .map_err(|e| format!("attachment '{}': {e}", a.filename))?;
            mixed = mixed.singlepart(Attachment::new(a.filename.clone()).body(bytes, content_type));
        }
        mixed
    };
    let mut email = builder.multipart(body).map_err(|e| e.to_string())?;
    for (name, value) in message.headers() {
        valet_store::check_custom_header(name).map_err(|e| e.to_string())?;
        // `insert_raw` replaces a header of the same name: never let it.
        if email.headers().get_raw(name).is_some() {
            return Err(format!(
                "header '{name}' is set by valet and cannot be overridden"
            ));
        }
        let name = HeaderName::new_from_ascii(name.clone())
            .map_err(|e| format!("header '{name}': {e}"))?;
        email
            .headers_mut()
            .insert_raw(HeaderValue::new(name, value.clone()));
    }
    Ok(email)
}

/// Delivers due messages until `shutdown` fires.
pub async fn run(store: Store, relay: SmtpRelay, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let transport: AsyncSmtpTransport<Tokio1Executor> =
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&relay.host)
            .port(relay.port)
            .timeout(Some(Duration::from_secs(10)))
            .build();
    loop {
        if let Err(e) = deliver_due(&store, &transport).await {
            tracing::warn!(error = %e, "outbox delivery pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => break,
        }
    }
    // One last pass so a message queued just before shutdown is not left behind.
    let _ = deliver_due(&store, &transport).await;
}

async fn deliver_due(
    store: &Store,
    transport: &AsyncSmtpTransport<Tokio1Executor>,
) -> Result<(), valet_store::StoreError> {
    let due = store.call(|s| s.due_emails(20)).await?;
    for entry in due {
        let result = match build(&entry.message) {
            Ok(email) => transport
                .send(email)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let id = entry.id;
        match result {
            Ok(()) => {
                tracing::info!(email_id = id, "email delivered");
                store.call(move |s| s.mark_email_sent(id)).await?;
            }
            Err(e) => {
                tracing::warn!(email_id = id, error = %e, "email delivery failed; will retry");
                store
                    .call(move |s| s.mark_email_attempt_failed(id, &e))
                    .await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls() {
        assert!(SmtpRelay::parse("smtp://127.0.0.1:2525").is_ok());
        assert!(SmtpRelay::parse("http://x").is_err());
        assert!(SmtpRelay::parse("smtp://:25").is_err());
    }

    #[test]
    fn custom_headers_add_never_replace() {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("X-Val".to_owned(), "demo".to_owned());
        headers.insert(
            "List-Unsubscribe".to_owned(),
            "<https://example.com/u>".to_owned(),
        );
        let message = EmailMessage::new(valet_store::EmailDraft {
            from: "\"ada via valet\" <valet@valet.localhost>".into(),
            to: vec!["ada@example.com".into()],
            subject: "Hi".into(),
            text: Some("x".into()),
            headers,
            ..Default::default()
        })
        .expect("valid");
        let text = String::from_utf8(build(&message).expect("build").formatted()).expect("utf-8");
        let from: Vec<&str> = text.lines().filter(|l| l.starts_with("From:")).collect();
        assert_eq!(from, ["From: \"ada via valet\" <valet@valet.localhost>"]);
        assert!(text.contains("X-Val: demo"), "{text}");
        assert!(
            text.contains("List-Unsubscribe: <https://example.com/u>"),
            "{text}"
        );
        // A message carrying From as a custom header cannot even be made,
        // not from a draft and not from a stored row.
        let forged = r#"{"from":"valet@valet.localhost","to":["a@b.io"],"headers":{"From":"ceo@paypal.com"}}"#;
        assert!(serde_json::from_str::<EmailMessage>(forged).is_err());
    }
}
