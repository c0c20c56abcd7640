//! Tenant isolation: one user's token never reads, lists, changes or
//! deletes another user's blobs, database, vals, emails or tokens, and
//! other users' objects answer 404, not 403.

use serde_json::json;
use valet_core::ScopeSet;

use crate::support::{Api, Requests};

#[tokio::test]
async fn users_never_see_each_others_data() {
    let api = Api::start();
    let ada = api.user("ada");
    let bob = api.user("bob");
    let ada_token = api.token(&ada, ScopeSet::all());
    let bob_token = api.token(&bob, ScopeSet::all());
    let as_ada = |r: crate::support::Call| r.token(&ada_token);
    let as_bob = |r: crate::support::Call| r.token(&bob_token);

    // Ada's things.
    let r = as_ada(api.post("/v1/blob/secret").body("ada's"))
        .send()
        .await;
    assert_eq!(r.status, 201);
    let r = as_ada(api.post("/v1/sqlite/execute"))
        .json(&json!({"statement": "CREATE TABLE private (x)"}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let val = as_ada(api.post("/v1/vals"))
        .json(&json!({"name": "mine", "type": "script", "code": "1"}))
        .send()
        .await
        .json();
    let val_id = val["id"].as_str().expect("id");
    let email = as_ada(api.post("/v1/email"))
        .json(&json!({"text": "to myself"}))
        .send()
        .await
        .json();
    let email_id = email["id"].as_i64().expect("id");
    let ada_tokens = as_ada(api.get("/v1/tokens")).send().await.json();
    let ada_token_id = ada_tokens[0]["id"].as_str().expect("id");

    // Bob: blobs.
    assert_eq!(as_bob(api.get("/v1/blob/secret")).send().await.status, 404);
    assert_eq!(as_bob(api.get("/v1/blob")).send().await.json(), json!([]));
    let r = as_bob(api.post("/v1/blob/secret").body("bob's"))
        .send()
        .await;
    assert_eq!(r.status, 201, "bob's own blob of that name");
    let r = as_bob(api.delete("/v1/blob/secret")).send().await;
    assert_eq!(r.status, 204);
    let still = as_ada(api.get("/v1/blob/secret")).send().await.text();
    assert_eq!(still, "ada's");
    // Bob: database.
    let r = as_bob(api.post("/v1/sqlite/execute"))
        .json(&json!({"statement": "SELECT * FROM private"}))
        .send()
        .await;
    assert_eq!(r.error(), (400, "sqlite_error".into()));
    // Bob: vals, runs, emails and tokens are 404, not 403.
    for path in [
        format!("/v1/vals/{val_id}"),
        format!("/v1/vals/{val_id}/runs"),
        format!("/v1/vals/{val_id}/scope-requests"),
        format!("/v2/vals/{val_id}"),
        format!("/v1/email/{email_id}"),
        format!("/v1/tokens/{ada_token_id}"),
    ] {
        let r = as_bob(api.get(&path)).send().await;
        assert_eq!(r.error(), (404, "not_found".into()), "{path}");
    }
    let r = as_bob(api.patch(&format!("/v1/vals/{val_id}")))
        .json(&json!({"code": "export default () => 'bob'"}))
        .send()
        .await;
    assert_eq!(r.status, 404, "PATCH val: {}", r.text());
    let r = as_bob(api.patch(&format!("/v1/tokens/{ada_token_id}")))
        .json(&json!({"scopes": []}))
        .send()
        .await;
    assert_eq!(r.status, 404, "PATCH token: {}", r.text());
    for path in [
        format!("/v1/vals/{val_id}"),
        format!("/v2/vals/{val_id}"),
        format!("/v1/tokens/{ada_token_id}"),
    ] {
        let r = as_bob(api.delete(&path)).send().await;
        assert_eq!(r.status, 404, "DELETE {path}");
    }
    assert_eq!(as_bob(api.get("/v1/vals")).send().await.json(), json!([]));
    assert_eq!(
        as_bob(api.get("/v2/me/vals")).send().await.json()["data"],
        json!([])
    );
    assert_eq!(as_bob(api.get("/v1/email")).send().await.json(), json!([]));
    // Ada's things are intact.
    let r = as_ada(api.get(&format!("/v1/vals/{val_id}"))).send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["code"], "1", "bob's edit did not land");
    let r = as_ada(api.get("/v1/me")).send().await;
    assert_eq!(r.status, 200, "ada's token was not revoked by bob");
    let r = as_ada(api.get(&format!("/v1/tokens/{ada_token_id}")))
        .send()
        .await;
    assert_ne!(r.json()["scopes"], json!([]), "bob did not re-scope it");
}
