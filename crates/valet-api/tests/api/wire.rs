//! The JSON of every resource, byte for byte (ids, times and token secrets
//! replaced by placeholders): the wire format is written in valet-api's
//! routes, and these pin it, key order included, so moving a shape never
//! changes what a client reads.

use serde_json::json;
use valet_core::Scope;
use valet_store::{NewRun, Outcome};

use crate::support::{Api, Reply, Requests};

/// The body with every id (`usr_…`, `val_…`, `tok_…`, `run_…`), ISO time
/// and token secret (`vlt_…`) replaced by `<id>`, `<time>` and `<token>`.
fn redacted(reply: &Reply) -> String {
    let text = reply.text();
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let is_time = |s: &[u8]| {
        s.len() >= 24
            && s[..24].iter().enumerate().all(|(k, b)| match k {
                4 | 7 => *b == b'-',
                10 => *b == b'T',
                13 | 16 => *b == b':',
                19 => *b == b'.',
                23 => *b == b'Z',
                _ => b.is_ascii_digit(),
            })
    };
    while i < bytes.len() {
        let rest = &bytes[i..];
        let id_prefix = ["usr_", "val_", "tok_", "run_"]
            .iter()
            .any(|p| rest.starts_with(p.as_bytes()));
        if id_prefix && rest.len() >= 36 && rest[4..36].iter().all(u8::is_ascii_hexdigit) {
            out.push_str("<id>");
            i += 36;
        } else if rest.starts_with(b"vlt_") && rest.len() >= 42 {
            out.push_str("<token>");
            i += 42;
        } else if is_time(rest) {
            out.push_str("<time>");
            i += 24;
        } else {
            let c = text[i..].chars().next().unwrap_or_default();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

#[tokio::test]
async fn me_blobs_and_tokens_keep_their_json() {
    let (api, _, token) = Api::with_user("ada");
    let r = api.get("/v1/me").token(&token).send().await;
    assert_eq!(
        redacted(&r),
        r#"{"bio":null,"email":"ada@example.com","id":"<id>","links":{"self":"http://127.0.0.1:7070/v1/me"},"profileImageUrl":null,"tier":"pro","type":"user","url":"http://127.0.0.1:7070/vals","username":"ada"}"#
    );

    let r = api
        .post("/v1/blob/a%2Fb")
        .token(&token)
        .body("xyz")
        .send()
        .await;
    assert_eq!(r.status, 201);
    let r = api.get("/v1/blob?prefix=a").token(&token).send().await;
    assert_eq!(
        redacted(&r),
        r#"[{"key":"a/b","size":3,"lastModified":"<time>"}]"#
    );

    let r = api
        .post("/v1/tokens")
        .token(&token)
        .json(&json!({"name": "ci", "scopes": ["blob:read"], "expires_at": "2999-01-01T00:00:00Z"}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap_or_default().to_owned();
    let hint = r.json()["hint"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        redacted(&r),
        format!(
            r#"{{"created_at":"<time>","expires_at":"<time>","hint":"{hint}","id":"<id>","last_used_at":null,"leak_url":null,"legacy":false,"migration_state":null,"name":"ci","revoked_at":null,"revoked_reason":null,"scopes":["blob:read"],"token":"<token>"}}"#
        )
    );
    let r = api
        .patch(&format!("/v1/tokens/{id}"))
        .token(&token)
        .json(&json!({"name": "ci2"}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api
        .request(axum::http::Method::DELETE, &format!("/v1/tokens/{id}"))
        .token(&token)
        .send()
        .await;
    assert_eq!(
        redacted(&r),
        format!(
            r#"{{"created_at":"<time>","expires_at":"<time>","hint":"{hint}","id":"<id>","last_used_at":null,"leak_url":null,"legacy":false,"migration_state":null,"name":"ci2","revoked_at":"<time>","revoked_reason":"by its owner","scopes":["blob:read"]}}"#
        )
    );
}

#[tokio::test]
async fn sqlite_results_keep_the_std_shape() {
    let (api, _, token) = Api::with_user("ada");
    let execute = |statement: serde_json::Value| {
        api.post("/v1/sqlite/execute")
            .token(&token)
            .json(&json!({ "statement": statement }))
            .send()
    };
    let r = execute(json!(
        "CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)"
    ))
    .await;
    assert_eq!(
        r.text(),
        r#"{"columns":[],"columnTypes":[],"rows":[],"rowsAffected":0,"lastInsertRowid":0}"#
    );
    let r = execute(json!({"sql": "INSERT INTO t VALUES (?, ?, ?, ?, ?)", "args": [7, 2.5, "x", {"base64": "AAE="}, null]})).await;
    assert_eq!(
        r.text(),
        r#"{"columns":[],"columnTypes":[],"rows":[],"rowsAffected":1,"lastInsertRowid":1}"#
    );
    let r = execute(
        json!({"sql": "INSERT INTO t (i, s) VALUES (:i, $s)", "args": {"i": true, "s": "ü"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = execute(json!("SELECT i, r, s, b, n, 1e999 AS inf FROM t")).await;
    assert_eq!(
        r.text(),
        r#"{"columns":["i","r","s","b","n","inf"],"columnTypes":["INTEGER","REAL","TEXT","BLOB","",""],"rows":[[7,2.5,"x",{"base64":"AAE="},null,null],[1,null,"ü",null,null,null]],"rowsAffected":0,"lastInsertRowid":null}"#
    );
    let r = api
        .post("/v1/sqlite/batch")
        .token(&token)
        .json(&json!({"statements": ["SELECT 1 AS one", {"sql": "SELECT ? AS two", "args": [2]}], "mode": "read"}))
        .send()
        .await;
    assert_eq!(
        r.text(),
        r#"[{"columns":["one"],"columnTypes":[""],"rows":[[1]],"rowsAffected":0,"lastInsertRowid":null},{"columns":["two"],"columnTypes":[""],"rows":[[2]],"rowsAffected":0,"lastInsertRowid":null}]"#
    );
    // Bodies that do not parse keep their messages too.
    let r = execute(json!(1)).await;
    assert_eq!(
        r.text(),
        r#"{"error":{"code":"invalid_body","message":"Failed to deserialize the JSON body into the target type: statement: data did not match any variant of untagged enum SqlStatement at line 1 column 15"}}"#
    );
    let r = api
        .post("/v1/sqlite/batch")
        .token(&token)
        .json(&json!({"statements": ["SELECT 1"], "mode": "sideways"}))
        .send()
        .await;
    assert_eq!(
        r.text(),
        r#"{"error":{"code":"invalid_body","message":"Failed to deserialize the JSON body into the target type: mode: unknown variant `sideways`, expected one of `write`, `read`, `deferred` at line 1 column 18"}}"#
    );
    let r = execute(json!({"sql": "SELECT ?", "args": [[1]]})).await;
    assert_eq!(
        r.text(),
        r#"{"error":{"code":"sqlite_error","message":"unsupported argument [1]: use null, a number, a string, a boolean or {\"base64\": ...}"}}"#
    );
}

#[tokio::test]
async fn the_outbox_keeps_its_json() {
    let (api, _, token) = Api::with_user("ada");
    let r = api
        .post("/v1/email")
        .token(&token)
        .json(&json!({
            "to": ["b@example.com", {"email": "c@example.com", "name": "C"}],
            "subject": "Hi",
            "html": "<p>hi</p>",
            "replyTo": "r@example.com",
            "headers": {"X-Val": "demo"},
            "attachments": [
                {"filename": "a.txt", "content": "eA==", "type": "text/plain"},
                {"filename": "b.bin", "content": "eQ==", "disposition": "inline"}
            ]
        }))
        .send()
        .await;
    assert_eq!(
        r.text(),
        r#"{"id":1,"message":"Email accepted to be sent","status":"queued"}"#
    );
    let entry = r#"{"id":1,"status":"queued","attempts":0,"last_error":null,"created_at":"<time>","sent_at":null,"message":{"from":"\"ada via valet\" <valet@valet.localhost>","to":["b@example.com","\"C\" <c@example.com>"],"cc":[],"bcc":[],"replyTo":["r@example.com"],"subject":"Hi","text":null,"html":"<p>hi</p>","headers":{"X-Val":"demo"},"attachments":[{"filename":"a.txt","content":"eA==","type":"text/plain"},{"filename":"b.bin","content":"eQ==","disposition":"inline"}]}}"#;
    let r = api.get("/v1/email/1").token(&token).send().await;
    assert_eq!(redacted(&r), entry);
    let r = api.get("/v1/email").token(&token).send().await;
    assert_eq!(redacted(&r), format!("[{entry}]"));
    let r = api
        .post("/v1/email")
        .token(&token)
        .json(&json!({"text": "x", "attachments": [1]}))
        .send()
        .await;
    assert_eq!(
        r.text(),
        r#"{"error":{"code":"invalid_body","message":"Failed to deserialize the JSON body into the target type: attachments[0]: invalid type: integer `1`, expected struct Attachment at line 1 column 17"}}"#
    );
}

#[tokio::test]
async fn vals_runs_and_scope_requests_keep_their_json() {
    let (api, user, token) = Api::with_user("ada");
    let r = api
        .post("/v1/vals")
        .token(&token)
        .json(&json!({"name": "tick", "type": "cron", "code": "x", "scopes": ["blob:read"], "env": {"K": "v"}, "schedule": "*/5 * * * *"}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let val = r.json()["id"].as_str().unwrap_or_default().to_owned();
    let shape = r#"{"code":"x","created_at":"<time>","env":{"K":"********"},"id":"<id>","last_run_at":null,"name":"tick","schedule":"*/5 * * * *","scopes":["blob:read"],"timeout_ms":30000,"type":"cron","updated_at":"<time>"}"#;
    assert_eq!(redacted(&r), shape);
    let r = api
        .get(&format!("/v1/vals/{val}"))
        .token(&token)
        .send()
        .await;
    assert_eq!(redacted(&r), shape);
    let r = api
        .patch(&format!("/v1/vals/{val}"))
        .token(&token)
        .json(&json!({"type": "script", "schedule": null}))
        .send()
        .await;
    assert_eq!(
        redacted(&r),
        shape
            .replace(r#""schedule":"*/5 * * * *""#, r#""schedule":null"#)
            .replace(r#""type":"cron""#, r#""type":"script""#)
    );
    let r = api
        .post("/v1/vals")
        .token(&token)
        .json(&json!({"name": "bad", "type": "daily", "code": "x"}))
        .send()
        .await;
    assert_eq!(
        r.text(),
        r#"{"error":{"code":"invalid_body","message":"Failed to deserialize the JSON body into the target type: type: unknown variant `daily`, expected one of `http`, `script`, `cron` at line 1 column 39"}}"#
    );

    // A bad schedule is refused with `Schedule::parse`'s words, a cron val
    // without one with the store's.
    for (body, message) in [
        (
            json!({"name": "c2", "type": "cron", "code": "x", "schedule": "* * *"}),
            "invalid schedule '* * *': 3 fields, expected 5 or 6 (use cron syntax, e.g. '*/5 * * * *')",
        ),
        (
            json!({"name": "c2", "type": "cron", "code": "x"}),
            "a cron val needs a schedule (use cron syntax, e.g. '*/5 * * * *')",
        ),
    ] {
        let r = api.post("/v1/vals").token(&token).json(&body).send().await;
        assert_eq!(r.status, 422);
        assert_eq!(
            r.json(),
            json!({"error": {"code": "invalid", "message": message}})
        );
    }
    let r = api
        .patch(&format!("/v1/vals/{val}"))
        .token(&token)
        .json(&json!({"type": "cron"}))
        .send()
        .await;
    assert_eq!(r.error(), (422, "invalid".into()), "{}", r.text());

    api.store
        .record_scope_request(&val, Scope::EMAIL_WRITE, "/v1/email")
        .expect("request");
    let r = api
        .get(&format!("/v1/vals/{val}/scope-requests"))
        .token(&token)
        .send()
        .await;
    assert_eq!(
        redacted(&r),
        r#"[{"scope":"email:write","state":"pending","first_at":"<time>","last_at":"<time>","count":1,"sample_route":"/v1/email"}]"#
    );

    let (done, running) = (valet_store::new_id("run"), valet_store::new_id("run"));
    for id in [&done, &running] {
        api.store
            .insert_run(&NewRun {
                id,
                user_id: &user.id,
                val_id: Some(&val),
                trigger: "api",
                scopes: valet_core::ScopeSet::EMPTY.with(Scope::BLOB_READ),
                started_at: 1_700_000_000_000,
                deadline: 1_700_000_030_000,
            })
            .expect("run");
    }
    api.store
        .finish_run(&done, Outcome::TimedOut, "ran out of time", "a log\n")
        .expect("finish");
    let r = api
        .get(&format!("/v1/runs/{running}"))
        .token(&token)
        .send()
        .await;
    assert_eq!(
        redacted(&r),
        r#"{"id":"<id>","val_id":"<id>","trigger":"api","scopes":["blob:read"],"outcome":"running","started_at":"<time>","ended_at":null,"duration_ms":null,"exit_detail":null,"logs":""}"#
    );
    let r = api
        .get(&format!("/v1/vals/{val}/runs"))
        .token(&token)
        .send()
        .await;
    let list = redacted(&r);
    assert!(list.starts_with('[') && list.contains(r#"{"id":"<id>","val_id":"<id>","trigger":"api","scopes":["blob:read"],"outcome":"timed_out","started_at":"<time>","ended_at":"<time>","duration_ms":"#), "{list}");
    assert!(
        list.contains(r#","exit_detail":"ran out of time","logs":"a log\n"}"#),
        "{list}"
    );
}
