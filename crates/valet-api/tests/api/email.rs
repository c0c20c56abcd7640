//! `POST /v1/email` on the API alone: a valid message is queued (delivery
//! over SMTP is the end-to-end tests' business), header injection and bad
//! addresses are refused before the outbox, and free accounts may email
//! only themselves.

use serde_json::json;
use valet_core::ScopeSet;

use crate::support::{Api, Requests};

#[tokio::test]
async fn messages_are_queued_and_header_injection_never_reaches_the_outbox() {
    let (api, _, token) = Api::with_user("ada");
    let r = api
        .post("/v1/email")
        .token(&token)
        .json(&json!({"subject": "Hello there", "text": "plain body", "cc": "cc@example.com", "headers": {"X-Val": "demo"}}))
        .send()
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let queued = r.json();
    assert_eq!(queued["status"], "queued");
    let id = queued["id"].as_i64().expect("id");
    let entry = api
        .get(&format!("/v1/email/{id}"))
        .token(&token)
        .send()
        .await
        .json();
    assert_eq!(entry["status"], "queued", "no mailer here: {entry}");
    assert_eq!(entry["message"]["to"], json!(["ada@example.com"]));
    assert_eq!(entry["message"]["cc"], json!(["cc@example.com"]));
    assert_eq!(entry["message"]["subject"], "Hello there");

    for body in [
        json!({"subject": "Hi\r\nBcc: victim@example.com", "text": "x"}),
        json!({"to": "a@example.com\r\nBcc: victim@example.com", "text": "x"}),
        json!({"headers": {"X-A": "b\r\nBcc: victim@example.com"}, "text": "x"}),
        json!({"replyTo": {"email": "r@example.com\nBcc: victim@example.com"}, "text": "x"}),
        json!({"to": "not an address", "text": "x"}),
    ] {
        let r = api.post("/v1/email").token(&token).json(&body).send().await;
        assert_eq!(r.error(), (400, "invalid_email".into()), "{body}");
    }
    // Refused messages never reach the outbox, so the mailer cannot send them.
    let outbox = api.get("/v1/email").token(&token).send().await.json();
    assert_eq!(outbox.as_array().map(Vec::len), Some(1), "{outbox}");
}

#[tokio::test]
async fn free_accounts_only_email_themselves() {
    let api = Api::start();
    let user = api.free_user("free");
    let token = api.token(&user, ScopeSet::all());
    let r = api
        .post("/v1/email")
        .token(&token)
        .json(&json!({"to": "someone@example.com", "text": "spam"}))
        .send()
        .await;
    assert_eq!(r.error(), (403, "recipient_not_allowed".into()));
    let r = api
        .post("/v1/email")
        .token(&token)
        .json(&json!({"text": "to myself"}))
        .send()
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let outbox = api.get("/v1/email").token(&token).send().await.json();
    assert_eq!(outbox.as_array().map(Vec::len), Some(1), "{outbox}");
}
