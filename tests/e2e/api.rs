//! The API with the whole host: email delivered by the mailer to a real
//! SMTP server. Everything the API answers on its own (scopes, auth,
//! isolation, blobs, SQLite, errors, run keys) is tested without a host or
//! Deno in crates/valet-api/tests/api/.

use serde_json::json;
use valet_core::ScopeSet;

use crate::support::{Requests, Server, Smtp};

#[tokio::test(flavor = "multi_thread")]
async fn email_reaches_a_real_smtp_server_and_header_injection_is_refused() {
    let smtp = Smtp::start();
    let server = Server::start_with(crate::support::Options {
        smtp: Some(smtp.url()),
        ..Default::default()
    })
    .await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let r = server
        .post("/v1/email")
        .token(&token)
        .json(&json!({"subject": "Hello there", "text": "plain body", "html": "<b>html body</b>", "cc": "cc@example.com", "replyTo": {"email": "reply@example.com", "name": "Re Ply"}, "headers": {"X-Val": "demo"}}))
        .send()
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_i64().expect("id");
    let messages = smtp.wait_for(1).await;
    assert_eq!(messages.len(), 1, "one message delivered");
    let m = &messages[0];
    for needle in [
        "Subject: Hello there",
        "To: ada@example.com",
        "Cc: cc@example.com",
        "X-Val: demo",
        "plain body",
        "Reply-To: \"Re Ply\" <reply@example.com>",
        "ada via valet",
    ] {
        assert!(m.contains(needle), "{needle} missing in:\n{m}");
    }
    // The status is visible with email:read.
    let path = format!("/v1/email/{id}");
    let status = crate::support::eventually(
        || async { server.get(&path).token(&token).send().await.json() },
        |s: &serde_json::Value| s["status"] == "sent",
    )
    .await;
    assert_eq!(status["status"], "sent");

    // The API refuses these before the outbox (crates/valet-api's email
    // tests try every field); here, with a mailer running, nothing else
    // reaches the SMTP server.
    for body in [
        json!({"subject": "Hi\r\nBcc: victim@example.com", "text": "x"}),
        json!({"to": "a@example.com\r\nBcc: victim@example.com", "text": "x"}),
        json!({"headers": {"X-A": "b\r\nBcc: victim@example.com"}, "text": "x"}),
        json!({"to": "not an address", "text": "x"}),
    ] {
        let r = server
            .post("/v1/email")
            .token(&token)
            .json(&body)
            .send()
            .await;
        assert_eq!(r.error(), (400, "invalid_email".into()), "{body}");
    }
    let outbox = server.get("/v1/email").token(&token).send().await.json();
    assert_eq!(
        outbox.as_array().map(Vec::len),
        Some(1),
        "nothing else was queued"
    );
    assert_eq!(smtp.messages().len(), 1, "nothing else was sent");
    server.stop().await;
}
