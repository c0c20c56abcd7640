//! Every error is JSON with a code and a message: unknown routes, wrong
//! methods, bodies of the wrong type, shape or size.

use axum::http::header;
use serde_json::json;

use crate::support::{Api, Call, Requests};

#[tokio::test]
async fn errors_are_json_everywhere() {
    let (api, _, token) = Api::with_user("ada");
    let cases: Vec<(&str, Call, u16, &str)> = vec![
        ("an unknown route", api.get("/nope"), 404, "not_found"),
        (
            "an unknown /v1 route",
            api.get("/v1/nope").token(&token),
            404,
            "not_found",
        ),
        (
            "PUT on /v1/me",
            api.request(axum::http::Method::PUT, "/v1/me").token(&token),
            405,
            "method_not_allowed",
        ),
        (
            "a form body",
            api.post("/v1/vals")
                .token(&token)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            "broken JSON",
            api.post("/v1/vals")
                .token(&token)
                .header(header::CONTENT_TYPE, "application/json")
                .body("{"),
            400,
            "invalid_json",
        ),
        (
            "a field of the wrong type",
            api.post("/v1/vals").token(&token).json(&json!({"name": 1})),
            422,
            "invalid_body",
        ),
        (
            "an unknown field",
            api.post("/v1/tokens")
                .token(&token)
                .json(&json!({"name": "x", "scopes": [], "admin": true})),
            422,
            "invalid_body",
        ),
        (
            "an unknown scope",
            api.post("/v1/tokens")
                .token(&token)
                .json(&json!({"name": "x", "scopes": ["blob:delete"]})),
            422,
            "invalid_body",
        ),
        (
            "a blob over the body limit",
            api.post("/v1/blob/big")
                .token(&token)
                .body(vec![0u8; 11 << 20]),
            413,
            "payload_too_large",
        ),
        (
            "a JSON body over the body limit",
            api.post("/v1/sqlite/execute")
                .token(&token)
                .header(header::CONTENT_TYPE, "application/json")
                .body(format!(r#"{{"statement": "{}"}}"#, "x".repeat(11 << 20))),
            413,
            "payload_too_large",
        ),
        (
            "a bad scope in a decision",
            api.post("/v1/vals/val_x/scope-requests/blob:delete/allow")
                .token(&token),
            400,
            "invalid_request",
        ),
    ];
    for (what, call, status, code) in cases {
        let r = call.send().await;
        let body = r.json();
        assert_eq!(
            (r.status, body["error"]["code"].as_str().unwrap_or("")),
            (status, code),
            "{what}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }
    // The scope list error names the bad scope.
    let r = api
        .post("/v1/tokens")
        .token(&token)
        .json(&json!({"name": "x", "scopes": ["blob:delete"]}))
        .send()
        .await;
    assert!(r.text().contains("blob:delete"), "{}", r.text());
    let jwks = api.get("/.well-known/jwks.json").send().await.json();
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
}

/// The hosted std library posts JSON with no content type (or as
/// `text/plain`); the API reads such bodies as JSON.
#[tokio::test]
async fn json_bodies_need_no_json_content_type() {
    let (api, _, token) = Api::with_user("ada");
    let body = json!({"statement": "SELECT 1"}).to_string();
    let r = api
        .post("/v1/sqlite/execute")
        .token(&token)
        .body(body.clone())
        .send()
        .await;
    assert_eq!(r.status, 200, "no content type: {}", r.text());
    let r = api
        .post("/v1/sqlite/execute")
        .token(&token)
        .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
        .body(body)
        .send()
        .await;
    assert_eq!(r.status, 200, "text/plain: {}", r.text());
}
