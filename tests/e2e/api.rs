//! The API over real HTTP: every route's scope, auth failures, tenant
//! isolation, blob keys, SQLite, email at a real SMTP server.

use reqwest::Method;
use serde_json::json;
use valet_core::{Granted, GrantedSet, Scope, ScopeSet, TokenScopes};

use crate::support::{Server, Smtp, error_code};

/// One call per route, with the scope it needs.
struct Route {
    method: Method,
    path: String,
    body: Option<serde_json::Value>,
    raw: Option<&'static str>,
    scope: Scope,
}

fn route(method: Method, path: impl Into<String>, scope: Scope) -> Route {
    Route {
        method,
        path: path.into(),
        body: None,
        raw: None,
        scope,
    }
}

async fn call(server: &Server, token: Option<&str>, r: &Route) -> reqwest::Response {
    let mut req = server
        .client
        .request(r.method.clone(), format!("{}{}", server.url, r.path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(body) = &r.body {
        req = req.json(body);
    }
    if let Some(raw) = r.raw {
        req = req.body(raw);
    }
    req.send().await.expect("request")
}

/// Builds the table against fresh objects for `user`, so every call can
/// succeed with the right scope.
async fn routes(server: &Server, user: &valet_store::User) -> Vec<Route> {
    let val = server
        .store
        .create_val(
            &Granted::for_operator(&user.id),
            &GrantedSet::for_operator(&user.id, ScopeSet::all()),
            valet_store::NewVal {
                name: format!("v{}", rand_suffix()),
                kind: valet_store::ValKind::Script,
                code: "export default () => {}".into(),
                scopes: ScopeSet::default_val(),
                env: Default::default(),
                timeout_ms: 5000,
                schedule: None,
            },
        )
        .expect("val");
    let (token, _) = server
        .store
        .create_token(
            &Granted::for_operator(&user.id),
            "target",
            TokenScopes::Scoped(ScopeSet::EMPTY),
            None,
        )
        .expect("token");
    server
        .store
        .blob_put(
            &Granted::for_operator(&user.id),
            &valet_store::BlobKey::parse("k").expect("key"),
            b"v",
            1 << 20,
        )
        .expect("blob");
    server
        .store
        .record_scope_request(&val.id, Scope::BLOB_WRITE, "test")
        .expect("request");
    let mut out = vec![
        route(Method::GET, "/v1/me", Scope::USER_READ),
        route(Method::GET, "/v1/blob?prefix=k", Scope::BLOB_READ),
        route(Method::GET, "/v1/blob/k", Scope::BLOB_READ),
        Route {
            raw: Some("data"),
            ..route(Method::POST, "/v1/blob/new", Scope::BLOB_WRITE)
        },
        route(Method::DELETE, "/v1/blob/k", Scope::BLOB_WRITE),
        Route {
            body: Some(json!({"statement": "SELECT 1"})),
            ..route(Method::POST, "/v1/sqlite/execute", Scope::SQLITE_READ)
        },
        Route {
            body: Some(json!({"statements": ["CREATE TABLE IF NOT EXISTS t (a)"]})),
            ..route(Method::POST, "/v1/sqlite/batch", Scope::SQLITE_WRITE)
        },
        Route {
            body: Some(json!({"subject": "s", "text": "t"})),
            ..route(Method::POST, "/v1/email", Scope::EMAIL_WRITE)
        },
        route(Method::GET, "/v1/email", Scope::EMAIL_READ),
        route(Method::GET, "/v1/vals", Scope::VAL_READ),
        Route {
            body: Some(
                json!({"name": format!("n{}", rand_suffix()), "type": "script", "code": "1", "scopes": []}),
            ),
            ..route(Method::POST, "/v1/vals", Scope::VAL_WRITE)
        },
        route(Method::GET, format!("/v1/vals/{}", val.id), Scope::VAL_READ),
        Route {
            body: Some(json!({"timeout_ms": 6000})),
            ..route(
                Method::PATCH,
                format!("/v1/vals/{}", val.id),
                Scope::VAL_WRITE,
            )
        },
        route(
            Method::GET,
            format!("/v1/vals/{}/runs", val.id),
            Scope::VAL_READ,
        ),
        route(
            Method::GET,
            format!("/v1/vals/{}/scope-requests", val.id),
            Scope::VAL_READ,
        ),
        route(
            Method::POST,
            format!("/v1/vals/{}/scope-requests/blob:write/deny", val.id),
            Scope::VAL_WRITE,
        ),
        route(Method::GET, "/v1/tokens", Scope::USER_READ),
        Route {
            body: Some(json!({"name": "new", "scopes": []})),
            ..route(Method::POST, "/v1/tokens", Scope::USER_WRITE)
        },
        route(
            Method::GET,
            format!("/v1/tokens/{}", token.id),
            Scope::USER_READ,
        ),
        Route {
            body: Some(json!({"scopes": []})),
            ..route(
                Method::PATCH,
                format!("/v1/tokens/{}", token.id),
                Scope::USER_WRITE,
            )
        },
        route(
            Method::DELETE,
            format!("/v1/tokens/{}", token.id),
            Scope::USER_WRITE,
        ),
    ];
    // Deleting the val last keeps the other val routes valid.
    out.push(route(
        Method::DELETE,
        format!("/v1/vals/{}", val.id),
        Scope::VAL_WRITE,
    ));
    out
}

fn rand_suffix() -> String {
    valet_store::new_id("x")[2..]
        .chars()
        .rev()
        .take(10)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_needs_its_scope_and_works_with_it() {
    let server = Server::start().await;
    let user = server.user("ada");
    for r in routes(&server, &user).await {
        let all_but = server.token(&user, ScopeSet::all().without(r.scope));
        let (status, code, required) = error_code(call(&server, Some(&all_but), &r).await).await;
        assert_eq!(
            (status, code.as_str(), required.as_deref()),
            (403, "missing_scope", Some(r.scope.to_string().as_str())),
            "{} {} without {}",
            r.method,
            r.path,
            r.scope
        );
    }
    // With only the one scope, each call succeeds (fresh objects).
    for r in routes(&server, &user).await {
        let only = server.token(&user, ScopeSet::EMPTY.with(r.scope));
        let response = call(&server, Some(&only), &r).await;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "{} {} with only {}: {status} {text}",
            r.method,
            r.path,
            r.scope
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_refuses_missing_bad_expired_and_revoked_tokens() {
    let server = Server::start().await;
    let user = server.user("ada");
    let garbage = "not-a-token".to_owned();
    let good = server.token(&user, ScopeSet::all());
    let mut bad_checksum = good.clone();
    let last = if good.ends_with('A') { "B" } else { "A" };
    bad_checksum.replace_range(good.len() - 1.., last);
    let (expired_record, expired) = server
        .store
        .create_token(
            &Granted::for_operator(&user.id),
            "old",
            TokenScopes::Scoped(ScopeSet::all()),
            Some(1),
        )
        .expect("expired token");
    let _ = expired_record;
    let revoked = server.token(&user, ScopeSet::all());
    let revoked_record = server
        .store
        .token_by_hash(&valet_core::TokenHash::of(&revoked))
        .expect("lookup")
        .expect("found");
    server
        .store
        .revoke_token(&Granted::for_operator(&user.id), &revoked_record.id, "test")
        .expect("revoke");
    let forged_jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
    let cases: Vec<(Option<&str>, &str)> = vec![
        (None, "missing_token"),
        (Some(&garbage), "invalid_token"),
        (Some(&bad_checksum), "invalid_token"),
        (Some(expired.expose()), "token_expired"),
        (Some(&revoked), "token_revoked"),
        (Some(forged_jwt), "invalid_token"),
    ];
    for r in routes(&server, &user).await {
        for (token, expected) in &cases {
            let (status, code, _) = error_code(call(&server, *token, &r).await).await;
            assert_eq!(
                (status, code.as_str()),
                (401, *expected),
                "{} {} with {expected}",
                r.method,
                r.path
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn users_never_see_each_others_data() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let bob = server.user("bob");
    let ada_token = server.token(&ada, ScopeSet::all());
    let bob_token = server.token(&bob, ScopeSet::all());
    let c = &server.client;
    let u = &server.url;
    c.post(format!("{u}/v1/blob/secret"))
        .bearer_auth(&ada_token)
        .body("ada's")
        .send()
        .await
        .expect("set");
    c.post(format!("{u}/v1/sqlite/execute"))
        .bearer_auth(&ada_token)
        .json(&json!({"statement": "CREATE TABLE private (x)"}))
        .send()
        .await
        .expect("create");
    let val: serde_json::Value = c
        .post(format!("{u}/v1/vals"))
        .bearer_auth(&ada_token)
        .json(&json!({"name": "mine", "type": "script", "code": "1"}))
        .send()
        .await
        .expect("val")
        .json()
        .await
        .expect("json");
    let val_id = val["id"].as_str().expect("id");
    let ada_tokens: serde_json::Value = c
        .get(format!("{u}/v1/tokens"))
        .bearer_auth(&ada_token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let ada_token_id = ada_tokens[0]["id"].as_str().expect("id");

    // Bob: blobs.
    let r = c
        .get(format!("{u}/v1/blob/secret"))
        .bearer_auth(&bob_token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    let list: serde_json::Value = c
        .get(format!("{u}/v1/blob"))
        .bearer_auth(&bob_token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list, json!([]));
    c.post(format!("{u}/v1/blob/secret"))
        .bearer_auth(&bob_token)
        .body("bob's")
        .send()
        .await
        .expect("set");
    c.delete(format!("{u}/v1/blob/secret"))
        .bearer_auth(&bob_token)
        .send()
        .await
        .expect("delete");
    let still = c
        .get(format!("{u}/v1/blob/secret"))
        .bearer_auth(&ada_token)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert_eq!(still, "ada's");
    // Bob: database.
    let (status, code, _) = error_code(
        c.post(format!("{u}/v1/sqlite/execute"))
            .bearer_auth(&bob_token)
            .json(&json!({"statement": "SELECT * FROM private"}))
            .send()
            .await
            .expect("select"),
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "sqlite_error"));
    // Bob: vals and tokens are 404, not 403.
    for path in [
        format!("/v1/vals/{val_id}"),
        format!("/v1/vals/{val_id}/runs"),
        format!("/v1/tokens/{ada_token_id}"),
    ] {
        let r = c
            .get(format!("{u}{path}"))
            .bearer_auth(&bob_token)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 404, "{path}");
    }
    for (method, path) in [
        (Method::DELETE, format!("/v1/vals/{val_id}")),
        (Method::DELETE, format!("/v1/tokens/{ada_token_id}")),
    ] {
        let r = c
            .request(method, format!("{u}{path}"))
            .bearer_auth(&bob_token)
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), 404, "{path}");
    }
    let vals: serde_json::Value = c
        .get(format!("{u}/v1/vals"))
        .bearer_auth(&bob_token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(vals, json!([]));
    // Ada's things are intact.
    let r = c
        .get(format!("{u}/v1/vals/{val_id}"))
        .bearer_auth(&ada_token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{u}/v1/me"))
        .bearer_auth(&ada_token)
        .send()
        .await
        .expect("me");
    assert_eq!(r.status(), 200, "ada's token was not revoked by bob");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_keys_are_data_and_stay_in_the_users_directory() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let c = &server.client;
    let long_ok = "k".repeat(512);
    let long_bad = "k".repeat(513);
    let cases = [
        ("a%2Fb", 201),
        ("..%2F..%2Fetc%2Fpasswd", 201),
        ("%2E%2E%2F%2E%2E", 201),
        ("dir/sub/key", 201),
        ("%C3%BCn%C3%AFc%C3%B8d%C3%A9", 201),
        ("nul%00byte", 400),
        (long_ok.as_str(), 201),
        (long_bad.as_str(), 400),
    ];
    for (key, expected) in cases {
        let r = c
            .post(format!("{}/v1/blob/{key}", server.url))
            .bearer_auth(&token)
            .body(key.to_owned())
            .send()
            .await
            .expect("set");
        assert_eq!(r.status().as_u16(), expected, "{key}");
        if expected == 201 {
            let body = c
                .get(format!("{}/v1/blob/{key}", server.url))
                .bearer_auth(&token)
                .send()
                .await
                .expect("get")
                .text()
                .await
                .expect("text");
            assert_eq!(body, key, "round trip of {key}");
        } else {
            let (_, code, _) = error_code(r).await;
            assert_eq!(code, "invalid_request");
        }
    }
    let list: Vec<serde_json::Value> = c
        .get(format!("{}/v1/blob?prefix=..", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let keys: Vec<&str> = list.iter().filter_map(|b| b["key"].as_str()).collect();
    assert_eq!(keys, vec!["../..", "../../etc/passwd"]);
    assert!(
        list[0]["lastModified"]
            .as_str()
            .expect("iso")
            .ends_with('Z')
    );
    // Nothing landed outside the user's directory.
    let blobs = server.data_dir().join("blobs");
    let top: Vec<_> = std::fs::read_dir(&blobs)
        .expect("blobs")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(top, vec![std::ffi::OsString::from(&ada.id)]);
    for entry in std::fs::read_dir(blobs.join(&ada.id)).expect("user dir") {
        let entry = entry.expect("entry");
        assert!(entry.file_type().expect("type").is_file());
    }
    assert!(!server.data_dir().join("etc").exists());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_quota_gives_413() {
    let server = Server::start_with(crate::support::Options {
        blob_quota: Some(1000),
        ..Default::default()
    })
    .await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let c = &server.client;
    let r = c
        .post(format!("{}/v1/blob/a", server.url))
        .bearer_auth(&token)
        .body(vec![0u8; 800])
        .send()
        .await
        .expect("set");
    assert_eq!(r.status(), 201);
    let r = c
        .post(format!("{}/v1/blob/b", server.url))
        .bearer_auth(&token)
        .body(vec![0u8; 800])
        .send()
        .await
        .expect("set");
    let (status, code, _) = error_code(r).await;
    assert_eq!((status, code.as_str()), (413, "quota_exceeded"));
    let r = c
        .get(format!("{}/v1/blob/b", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404, "nothing stored past the quota");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_read_write_and_atomic_batches() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let rw = server.token(
        &ada,
        ScopeSet::parse("sqlite:read sqlite:write").expect("scopes"),
    );
    let ro = server.token(&ada, ScopeSet::parse("sqlite:read").expect("scopes"));
    let c = &server.client;
    let exec = |token: &str, statement: serde_json::Value| {
        c.post(format!("{}/v1/sqlite/execute", server.url))
            .bearer_auth(token.to_owned())
            .json(&json!({"statement": statement}))
            .send()
    };
    let r = exec(
        &rw,
        json!("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)"),
    )
    .await
    .expect("create");
    assert_eq!(r.status(), 200);
    let r: serde_json::Value = exec(
        &rw,
        json!({"sql": "INSERT INTO t (name) VALUES (?)", "args": ["x"]}),
    )
    .await
    .expect("insert")
    .json()
    .await
    .expect("json");
    assert_eq!(r["rowsAffected"], 1);
    assert_eq!(r["lastInsertRowid"], 1);
    let r: serde_json::Value = exec(
        &ro,
        json!({"sql": "SELECT id, name FROM t WHERE name = :name", "args": {"name": "x"}}),
    )
    .await
    .expect("select")
    .json()
    .await
    .expect("json");
    assert_eq!(r["columns"], json!(["id", "name"]));
    assert_eq!(r["columnTypes"], json!(["INTEGER", "TEXT"]));
    assert_eq!(r["rows"], json!([[1, "x"]]));
    for sql in [
        "INSERT INTO t (name) VALUES ('y')",
        "CREATE TABLE u (a)",
        "PRAGMA writable_schema = 1",
        "DROP TABLE t",
    ] {
        let (status, code, required) =
            error_code(exec(&ro, json!(sql)).await.expect("write")).await;
        assert_eq!(
            (status, code.as_str(), required.as_deref()),
            (403, "missing_scope", Some("sqlite:write")),
            "{sql}"
        );
    }
    // A failing batch leaves no partial writes.
    let r = c.post(format!("{}/v1/sqlite/batch", server.url)).bearer_auth(&rw)
        .json(&json!({"statements": ["INSERT INTO t (name) VALUES ('a')", "INSERT INTO t (id, name) VALUES (1, 'dup')"], "mode": "write"}))
        .send().await.expect("batch");
    let (status, code, _) = error_code(r).await;
    assert_eq!((status, code.as_str()), (400, "sqlite_error"));
    let r: serde_json::Value = exec(&ro, json!("SELECT count(*) FROM t"))
        .await
        .expect("count")
        .json()
        .await
        .expect("json");
    assert_eq!(r["rows"], json!([[1]]));
    // ATTACH, dangerous PRAGMAs and a syntax error are clear 400s.
    let outside = server.data_dir().join("escape.db");
    for sql in [
        format!("ATTACH DATABASE '{}' AS e", outside.display()),
        "PRAGMA journal_mode = delete".into(),
        "SELEC nonsense".into(),
    ] {
        let (status, code, _) = error_code(exec(&rw, json!(sql)).await.expect("refused")).await;
        assert_eq!((status, code.as_str()), (400, "sqlite_error"), "{sql}");
    }
    assert!(!outside.exists());
    server.stop().await;
}

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
    let c = &server.client;
    let r = c.post(format!("{}/v1/email", server.url)).bearer_auth(&token)
        .json(&json!({"subject": "Hello there", "text": "plain body", "html": "<b>html body</b>", "cc": "cc@example.com", "replyTo": {"email": "reply@example.com", "name": "Re Ply"}, "headers": {"X-Val": "demo"}}))
        .send().await.expect("send");
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.expect("json")["id"]
        .as_i64()
        .expect("id");
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
    let status: serde_json::Value = crate::support::eventually(
        || async {
            c.get(format!("{}/v1/email/{id}", server.url))
                .bearer_auth(&token)
                .send()
                .await
                .expect("status")
                .json()
                .await
                .expect("json")
        },
        |s: &serde_json::Value| s["status"] == "sent",
    )
    .await;
    assert_eq!(status["status"], "sent");

    for body in [
        json!({"subject": "Hi\r\nBcc: victim@example.com", "text": "x"}),
        json!({"to": "a@example.com\r\nBcc: victim@example.com", "text": "x"}),
        json!({"headers": {"X-A": "b\r\nBcc: victim@example.com"}, "text": "x"}),
        json!({"to": "not an address", "text": "x"}),
    ] {
        let (status, code, _) = error_code(
            c.post(format!("{}/v1/email", server.url))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .expect("send"),
        )
        .await;
        assert_eq!((status, code.as_str()), (400, "invalid_email"), "{body}");
    }
    // Refused messages never reach the outbox, so nothing else can be sent.
    let outbox = server
        .store
        .list_emails(&valet_core::Granted::for_operator(&ada.id), 10)
        .expect("outbox");
    assert_eq!(outbox.len(), 1, "nothing else was queued");
    assert_eq!(smtp.messages().len(), 1, "nothing else was sent");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn free_accounts_only_email_themselves() {
    let server = Server::start().await;
    let user = server
        .store
        .create_user("free", "free@example.com", None)
        .expect("user");
    let token = server.token(&user, ScopeSet::all());
    let r = server
        .client
        .post(format!("{}/v1/email", server.url))
        .bearer_auth(&token)
        .json(&json!({"to": "someone@example.com", "text": "spam"}))
        .send()
        .await
        .expect("send");
    let (status, code, _) = error_code(r).await;
    assert_eq!((status, code.as_str()), (403, "recipient_not_allowed"));
    let r = server
        .client
        .post(format!("{}/v1/email", server.url))
        .bearer_auth(&token)
        .json(&json!({"text": "to myself"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_never_exceed_their_makers_scopes() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let maker = server.token(
        &ada,
        ScopeSet::parse("user:read user:write blob:read").expect("scopes"),
    );
    let c = &server.client;
    let r = c
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(&maker)
        .json(&json!({"name": "wider", "scopes": ["blob:read", "blob:write"]}))
        .send()
        .await
        .expect("create");
    let (status, code, required) = error_code(r).await;
    assert_eq!(
        (status, code.as_str(), required.as_deref()),
        (403, "missing_scope", Some("blob:write"))
    );
    let r = c
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(&maker)
        .json(&json!({"name": "narrower", "scopes": ["blob:read"]}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let created: serde_json::Value = r.json().await.expect("json");
    let new_token = created["token"].as_str().expect("token shown once");
    assert_eq!(created["scopes"], json!(["blob:read"]));
    // Widening an existing token is capped the same way.
    let r = c
        .patch(format!(
            "{}/v1/tokens/{}",
            server.url,
            created["id"].as_str().expect("id")
        ))
        .bearer_auth(&maker)
        .json(&json!({"scopes": ["email:write"]}))
        .send()
        .await
        .expect("patch");
    assert_eq!(error_code(r).await.1, "missing_scope");
    // The new token works within its scope, and listing never shows tokens.
    let r = c
        .get(format!("{}/v1/blob", server.url))
        .bearer_auth(new_token)
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 200);
    let list = c
        .get(format!("{}/v1/tokens", server.url))
        .bearer_auth(&maker)
        .send()
        .await
        .expect("list")
        .text()
        .await
        .expect("text");
    assert!(!list.contains(new_token) && !list.contains(&maker));
    // A val cannot be given scopes its creator lacks.
    let val_maker = server.token(
        &ada,
        ScopeSet::parse("val:write blob:read").expect("scopes"),
    );
    let r = c
        .post(format!("{}/v1/vals", server.url))
        .bearer_auth(&val_maker)
        .json(&json!({"name": "esc", "type": "script", "code": "1", "scopes": ["user:write"]}))
        .send()
        .await
        .expect("create");
    assert_eq!(error_code(r).await.2.as_deref(), Some("user:write"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_json_everywhere() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let c = &server.client;
    let cases = [
        (c.get(format!("{}/nope", server.url)), 404, "not_found"),
        (
            c.put(format!("{}/v1/me", server.url)).bearer_auth(&token),
            405,
            "method_not_allowed",
        ),
        (
            c.post(format!("{}/v1/vals", server.url))
                .bearer_auth(&token)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            c.post(format!("{}/v1/vals", server.url))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("{"),
            400,
            "invalid_json",
        ),
        (
            c.post(format!("{}/v1/vals", server.url))
                .bearer_auth(&token)
                .json(&json!({"name": 1})),
            422,
            "invalid_body",
        ),
        (
            c.post(format!("{}/v1/tokens", server.url))
                .bearer_auth(&token)
                .json(&json!({"name": "x", "scopes": ["blob:delete"]})),
            422,
            "invalid_body",
        ),
        (
            c.post(format!("{}/v1/blob/big", server.url))
                .bearer_auth(&token)
                .body(vec![0u8; 11 << 20]),
            413,
            "payload_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let r = request.send().await.expect("send");
        let got_status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.expect("a JSON body");
        assert_eq!(
            (got_status, body["error"]["code"].as_str().unwrap_or("")),
            (status, code),
            "{body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // The scope list error names the bad scope. (A fresh client: the server
    // closes a connection whose oversized body it refused.)
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/v1/tokens", server.url))
        .bearer_auth(&token)
        .json(&json!({"name": "x", "scopes": ["blob:delete"]}))
        .send()
        .await
        .expect("send");
    assert!(r.text().await.expect("text").contains("blob:delete"));
    let jwks: serde_json::Value = c
        .get(format!("{}/.well-known/jwks.json", server.url))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_authorised_call_is_audited_and_touches_last_used() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let before = server.store.audit_count().expect("count");
    for _ in 0..3 {
        server
            .client
            .get(format!("{}/v1/me", server.url))
            .bearer_auth(&token)
            .send()
            .await
            .expect("me");
    }
    assert_eq!(server.store.audit_count().expect("count"), before + 3);
    let record = server
        .store
        .token_by_hash(&valet_core::TokenHash::of(&token))
        .expect("lookup")
        .expect("found");
    assert!(record.last_used_at.is_some());
    server.stop().await;
}
