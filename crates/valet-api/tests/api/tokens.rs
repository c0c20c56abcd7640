//! `/v1/tokens` and what a token may hand out: never more than its maker
//! holds, never shown again after creation, never changed once revoked;
//! and every authorised call is audited and touches `last_used_at`.

use serde_json::json;
use valet_core::ScopeSet;

use crate::support::{Api, Requests, eventually, scopes};

#[tokio::test]
async fn tokens_never_exceed_their_makers_scopes() {
    let api = Api::start();
    let ada = api.user("ada");
    let maker = api.token(&ada, scopes("user:read user:write blob:read"));
    let r = api
        .post("/v1/tokens")
        .token(&maker)
        .json(&json!({"name": "wider", "scopes": ["blob:read", "blob:write"]}))
        .send()
        .await;
    assert_eq!(
        r.error_required(),
        (403, "missing_scope".into(), Some("blob:write".into()))
    );
    let r = api
        .post("/v1/tokens")
        .token(&maker)
        .json(&json!({"name": "narrower", "scopes": ["blob:read"]}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let new_token = created["token"].as_str().expect("token shown once");
    let new_id = created["id"].as_str().expect("id");
    assert_eq!(created["scopes"], json!(["blob:read"]));
    // Widening an existing token is capped the same way.
    let r = api
        .patch(&format!("/v1/tokens/{new_id}"))
        .token(&maker)
        .json(&json!({"scopes": ["email:write"]}))
        .send()
        .await;
    assert_eq!(r.error().1, "missing_scope");
    // The new token works within its scope, and listing never shows tokens.
    assert_eq!(
        api.get("/v1/blob").token(new_token).send().await.status,
        200
    );
    let list = api.get("/v1/tokens").token(&maker).send().await.text();
    assert!(!list.contains(new_token) && !list.contains(&maker));
    let one = api
        .get(&format!("/v1/tokens/{new_id}"))
        .token(&maker)
        .send()
        .await
        .json();
    assert!(one.get("token").is_none(), "{one}");
    // A val cannot be given scopes its creator lacks.
    let val_maker = api.token(&ada, scopes("val:write blob:read"));
    let r = api
        .post("/v1/vals")
        .token(&val_maker)
        .json(&json!({"name": "esc", "type": "script", "code": "1", "scopes": ["user:write"]}))
        .send()
        .await;
    assert_eq!(r.error_required().2.as_deref(), Some("user:write"));
}

#[tokio::test]
async fn expiry_must_be_a_future_date_and_revoked_tokens_stay_revoked() {
    let (api, _, admin) = Api::with_user("ada");
    for expires_at in ["tomorrow", "2001-01-01T00:00:00Z"] {
        let r = api
            .post("/v1/tokens")
            .token(&admin)
            .json(&json!({"name": "x", "scopes": [], "expires_at": expires_at}))
            .send()
            .await;
        assert_eq!(r.status, 400, "{expires_at}: {}", r.text());
    }
    let r = api
        .post("/v1/tokens")
        .token(&admin)
        .json(&json!({"name": "later", "scopes": [], "expires_at": "2999-01-01T00:00:00Z"}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["expires_at"], "2999-01-01T00:00:00.000Z");
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/tokens/{id}");
    let r = api.delete(&path).token(&admin).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revoked_reason"], "by its owner");
    for body in [
        json!({"name": "revived", "scopes": ["blob:read"]}),
        json!({"name": "revived"}),
        json!({"scopes": ["blob:read"]}),
        json!({}),
    ] {
        let r = api.patch(&path).token(&admin).json(&body).send().await;
        assert_eq!(r.error(), (409, "conflict".into()), "{body}");
    }
    let after = api.get(&path).token(&admin).send().await.json();
    assert_eq!(
        (after["name"].as_str(), after["scopes"].clone()),
        (Some("later"), json!([]))
    );
}

#[tokio::test]
async fn every_authorised_call_is_audited_and_touches_last_used() {
    let api = Api::start();
    let ada = api.user("ada");
    let (id, token) = api.token_record(&ada, ScopeSet::all(), None);
    let before = api.store.audit_count().expect("count");
    for _ in 0..3 {
        assert_eq!(api.get("/v1/me").token(&token).send().await.status, 200);
    }
    // Refused calls are not audited.
    let reader = api.token(&ada, scopes("user:read"));
    assert_eq!(api.get("/v1/blob").token(&reader).send().await.status, 403);
    assert_eq!(api.store.audit_count().expect("count"), before + 3);
    let path = format!("/v1/tokens/{id}");
    let record = eventually(
        || async { api.get(&path).token(&token).send().await.json() },
        |t| !t["last_used_at"].is_null(),
    )
    .await;
    assert!(!record["last_used_at"].is_null(), "{record}");
}
