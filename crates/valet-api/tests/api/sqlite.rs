//! The user's SQLite database: reads need `sqlite:read`, writes (as SQLite
//! classifies them) `sqlite:write`; batches are atomic; ATTACH and
//! dangerous PRAGMAs are refused.

use serde_json::json;

use crate::support::{Api, Reply, Requests, scopes};

async fn execute(api: &Api, token: &str, statement: serde_json::Value) -> Reply {
    api.post("/v1/sqlite/execute")
        .token(token)
        .json(&json!({ "statement": statement }))
        .send()
        .await
}

#[tokio::test]
async fn sqlite_read_write_and_atomic_batches() {
    let api = Api::start();
    let ada = api.user("ada");
    let rw = api.token(&ada, scopes("sqlite:read sqlite:write"));
    let ro = api.token(&ada, scopes("sqlite:read"));
    let r = execute(
        &api,
        &rw,
        json!("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = execute(
        &api,
        &rw,
        json!({"sql": "INSERT INTO t (name) VALUES (?)", "args": ["x"]}),
    )
    .await
    .json();
    assert_eq!(r["rowsAffected"], 1);
    assert_eq!(r["lastInsertRowid"], 1);
    let r = execute(
        &api,
        &ro,
        json!({"sql": "SELECT id, name FROM t WHERE name = :name", "args": {"name": "x"}}),
    )
    .await
    .json();
    assert_eq!(r["columns"], json!(["id", "name"]));
    assert_eq!(r["columnTypes"], json!(["INTEGER", "TEXT"]));
    assert_eq!(r["rows"], json!([[1, "x"]]));
    for sql in [
        "INSERT INTO t (name) VALUES ('y')",
        "CREATE TABLE u (a)",
        "PRAGMA writable_schema = 1",
        "DROP TABLE t",
    ] {
        let r = execute(&api, &ro, json!(sql)).await;
        assert_eq!(
            r.error_required(),
            (403, "missing_scope".into(), Some("sqlite:write".into())),
            "{sql}"
        );
    }
    // A failing batch leaves no partial writes.
    let r = api
        .post("/v1/sqlite/batch")
        .token(&rw)
        .json(&json!({"statements": ["INSERT INTO t (name) VALUES ('a')", "INSERT INTO t (id, name) VALUES (1, 'dup')"], "mode": "write"}))
        .send()
        .await;
    assert_eq!(r.error(), (400, "sqlite_error".into()));
    let r = execute(&api, &ro, json!("SELECT count(*) FROM t"))
        .await
        .json();
    assert_eq!(r["rows"], json!([[1]]));
    // ATTACH, dangerous PRAGMAs and a syntax error are clear 400s.
    let outside = api.data_dir().join("escape.db");
    for sql in [
        format!("ATTACH DATABASE '{}' AS e", outside.display()),
        "PRAGMA journal_mode = delete".into(),
        "SELEC nonsense".into(),
    ] {
        let r = execute(&api, &rw, json!(sql)).await;
        assert_eq!(r.error(), (400, "sqlite_error".into()), "{sql}");
    }
    assert!(!outside.exists());
}
