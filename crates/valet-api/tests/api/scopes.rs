//! Every `/v1` and `/v2` route against every kind of credential: refused
//! without its scope (403 naming it), served with only that scope, refused
//! with a missing, malformed, unknown, expired or revoked token (401), and
//! its body read only after the scope check.

use axum::http::{HeaderValue, Method, header};
use serde_json::json;
use valet_core::{ApiToken, Scope, ScopeSet};
use valet_store::User;

use crate::support::{Api, Call, Requests, eventually};

/// One call per route, with the scope it needs and what it answers to a
/// caller holding only that scope.
struct Route {
    method: Method,
    path: String,
    body: Body,
    scope: Scope,
    /// 0 for "any 2xx". Routes that need what this harness does not have
    /// (a runner, a run) answer a fixed error past the scope check.
    with_only: u16,
}

enum Body {
    None,
    Json(serde_json::Value),
    Raw(&'static str),
}

fn route(method: Method, path: impl Into<String>, scope: Scope) -> Route {
    Route {
        method,
        path: path.into(),
        body: Body::None,
        scope,
        with_only: 0,
    }
}

impl Route {
    fn json(self, body: serde_json::Value) -> Route {
        Route {
            body: Body::Json(body),
            ..self
        }
    }

    fn raw(self, body: &'static str) -> Route {
        Route {
            body: Body::Raw(body),
            ..self
        }
    }

    fn answers(self, status: u16) -> Route {
        Route {
            with_only: status,
            ..self
        }
    }

    fn call(&self, api: &Api) -> Call {
        let call = api.request(self.method.clone(), &self.path);
        match &self.body {
            Body::None => call,
            Body::Json(body) => call.json(body),
            Body::Raw(body) => call.body(*body),
        }
    }

    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Builds the table against fresh objects of `user`, so that every call
/// can succeed with the right scope. The val is deleted last.
async fn routes(api: &Api, user: &User) -> Vec<Route> {
    let suffix = valet_store::new_id("x")[2..]
        .chars()
        .rev()
        .take(10)
        .collect::<String>();
    let val = api.val(user, &format!("v{suffix}"));
    let doomed = api.val(user, &format!("d{suffix}"));
    let (target, _) = api.token_record(user, ScopeSet::EMPTY, None);
    let all = api.token(user, ScopeSet::all());
    let r = api.post("/v1/blob/k").token(&all).body("v").send().await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = api
        .post("/v1/email")
        .token(&all)
        .json(&json!({"subject": "s", "text": "t"}))
        .send()
        .await;
    let email = r.json()["id"].as_i64().expect("email id");
    ask_for_blob_write(api, user, &val, &all).await;
    let val_path = format!("/v1/vals/{}", val.id);
    let token_path = format!("/v1/tokens/{target}");
    vec![
        route(Method::GET, "/v1/me", Scope::USER_READ),
        route(Method::GET, "/v1/blob?prefix=k", Scope::BLOB_READ),
        route(Method::GET, "/v1/blob/k", Scope::BLOB_READ),
        route(Method::POST, "/v1/blob/new", Scope::BLOB_WRITE).raw("data"),
        route(Method::DELETE, "/v1/blob/k", Scope::BLOB_WRITE),
        route(Method::POST, "/v1/sqlite/execute", Scope::SQLITE_READ)
            .json(json!({"statement": "SELECT 1"})),
        route(Method::POST, "/v1/sqlite/batch", Scope::SQLITE_WRITE)
            .json(json!({"statements": ["CREATE TABLE IF NOT EXISTS t (a)"]})),
        route(Method::POST, "/v1/email", Scope::EMAIL_WRITE)
            .json(json!({"subject": "s", "text": "t"})),
        route(Method::GET, "/v1/email", Scope::EMAIL_READ),
        route(Method::GET, format!("/v1/email/{email}"), Scope::EMAIL_READ),
        route(Method::GET, "/v1/vals", Scope::VAL_READ),
        route(Method::POST, "/v1/vals", Scope::VAL_WRITE).json(
            json!({"name": format!("n{suffix}"), "type": "script", "code": "1", "scopes": []}),
        ),
        route(Method::GET, &val_path, Scope::VAL_READ),
        route(Method::PATCH, &val_path, Scope::VAL_WRITE).json(json!({"timeout_ms": 6000})),
        route(Method::GET, format!("{val_path}/runs"), Scope::VAL_READ),
        // Past the scope check a run needs a runner, which the API alone
        // does not have.
        route(Method::POST, format!("{val_path}/run"), Scope::VAL_WRITE).answers(503),
        route(
            Method::GET,
            format!("{val_path}/scope-requests"),
            Scope::VAL_READ,
        ),
        route(
            Method::POST,
            format!("{val_path}/scope-requests/blob:write/deny"),
            Scope::VAL_WRITE,
        ),
        // No run was ever made here: past the scope check, a 404.
        route(Method::GET, "/v1/runs/run_none", Scope::VAL_READ).answers(404),
        route(Method::GET, "/v2/vals", Scope::VAL_READ),
        route(Method::POST, "/v2/vals", Scope::VAL_WRITE)
            .json(json!({"name": format!("w{suffix}"), "privacy": "private"})),
        route(Method::GET, format!("/v2/vals/{}", val.id), Scope::VAL_READ),
        route(
            Method::DELETE,
            format!("/v2/vals/{}", doomed.id),
            Scope::VAL_WRITE,
        ),
        route(Method::GET, "/v2/me/vals", Scope::VAL_READ),
        route(Method::GET, "/v1/tokens", Scope::USER_READ),
        route(Method::POST, "/v1/tokens", Scope::USER_WRITE)
            .json(json!({"name": "new", "scopes": []})),
        route(Method::GET, &token_path, Scope::USER_READ),
        route(Method::PATCH, &token_path, Scope::USER_WRITE).json(json!({"scopes": []})),
        route(Method::DELETE, &token_path, Scope::USER_WRITE),
        route(Method::DELETE, &val_path, Scope::VAL_WRITE),
    ]
}

/// A run of `val` without `blob:write` tries a blob write: that leaves a
/// scope request for its owner to decide.
async fn ask_for_blob_write(api: &Api, user: &User, val: &valet_store::Val, all: &str) {
    let scopes = ScopeSet::all().without(Scope::BLOB_WRITE);
    let (key, _run) = api.live_run(user, val, scopes, "chan");
    let r = api
        .channel("chan")
        .post("/v1/blob/x")
        .token(&key)
        .body("x")
        .send()
        .await;
    assert_eq!(r.error(), (403, "missing_scope".into()));
    let path = format!("/v1/vals/{}/scope-requests", val.id);
    let requests = eventually(
        || async { api.get(&path).token(all).send().await.json() },
        |r| r.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    assert_eq!(requests[0]["scope"], "blob:write", "{requests}");
}

#[tokio::test]
async fn every_route_needs_its_scope_and_works_with_it() {
    let api = Api::start();
    let user = api.user("ada");
    for r in routes(&api, &user).await {
        let all_but = api.token(&user, ScopeSet::all().without(r.scope));
        let reply = r.call(&api).token(&all_but).send().await;
        let required = r.scope.to_string();
        assert_eq!(
            reply.error_required(),
            (403, "missing_scope".into(), Some(required)),
            "{} without {}",
            r.name(),
            r.scope
        );
    }
    // With only the one scope, each call gets past its check (fresh objects).
    for r in routes(&api, &user).await {
        let only = api.token(&user, ScopeSet::EMPTY.with(r.scope));
        let reply = r.call(&api).token(&only).send().await;
        let served = match r.with_only {
            0 => (200..300).contains(&reply.status),
            status => reply.status == status,
        };
        assert!(
            served,
            "{} with only {}: {} {}",
            r.name(),
            r.scope,
            reply.status,
            reply.text()
        );
    }
}

#[tokio::test]
async fn every_route_refuses_missing_malformed_unknown_expired_and_revoked_tokens() {
    let (api, user, good) = Api::with_user("ada");
    let mut bad_checksum = good.clone();
    let last = if good.ends_with('A') { "B" } else { "A" };
    bad_checksum.replace_range(good.len() - 1.., last);
    let (_, expired) = api.token_record(&user, ScopeSet::all(), Some(1));
    let (revoked_id, revoked) = api.token_record(&user, ScopeSet::all(), None);
    let r = api
        .delete(&format!("/v1/tokens/{revoked_id}"))
        .token(&good)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let unknown = ApiToken::generate().expect("token");
    let bearer = |token: &str| HeaderValue::from_str(&format!("Bearer {token}")).expect("header");
    let cases: Vec<(&str, Option<HeaderValue>, &str)> = vec![
        ("no header", None, "missing_token"),
        ("garbage", Some(bearer("not-a-token")), "invalid_token"),
        ("a short vlt_", Some(bearer("vlt_abc")), "invalid_token"),
        (
            "a bad checksum",
            Some(bearer(&bad_checksum)),
            "invalid_token",
        ),
        (
            "an unknown token",
            Some(bearer(unknown.expose())),
            "invalid_token",
        ),
        ("an expired token", Some(bearer(&expired)), "token_expired"),
        ("a revoked token", Some(bearer(&revoked)), "token_revoked"),
        (
            "an unsigned JWT",
            Some(bearer("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")),
            "invalid_token",
        ),
        (
            "the Basic scheme",
            Some(HeaderValue::from_static("Basic YWRhOnB3")),
            "invalid_token",
        ),
        (
            "a header that is not text",
            Some(HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("header")),
            "invalid_token",
        ),
        ("an empty bearer", Some(bearer("")), "invalid_token"),
    ];
    for r in routes(&api, &user).await {
        for (what, authorization, expected) in &cases {
            let mut call = r.call(&api);
            if let Some(value) = authorization {
                call = call.header(header::AUTHORIZATION, value.clone());
            }
            let reply = call.send().await;
            assert_eq!(
                reply.error(),
                (401, expected.to_string()),
                "{} with {what}",
                r.name()
            );
        }
    }
}

/// A caller without the scope learns nothing about the body's shape; one
/// with it is told what is wrong with a malformed body.
#[tokio::test]
async fn bodies_are_read_only_after_the_scope_check() {
    let (api, user, all) = Api::with_user("ada");
    for r in routes(&api, &user).await {
        if !matches!(r.body, Body::Json(_)) {
            continue;
        }
        let broken = || {
            api.request(r.method.clone(), &r.path)
                .header(header::CONTENT_TYPE, "application/json")
                .body("{")
        };
        // The SQLite routes take either SQLite scope (the statement decides
        // which it needs), so only a caller with neither is refused at once.
        let lacking = match r.path.starts_with("/v1/sqlite/") {
            true => ScopeSet::all()
                .without(Scope::SQLITE_READ)
                .without(Scope::SQLITE_WRITE),
            false => ScopeSet::all().without(r.scope),
        };
        let reply = broken().token(&api.token(&user, lacking)).send().await;
        assert_eq!(reply.error(), (403, "missing_scope".into()), "{}", r.name());
        let reply = broken().token(&all).send().await;
        assert_eq!(reply.error(), (400, "invalid_json".into()), "{}", r.name());
        let reply = api
            .request(r.method.clone(), &r.path)
            .token(&all)
            .json(&json!(42))
            .send()
            .await;
        assert_eq!(reply.error(), (422, "invalid_body".into()), "{}", r.name());
    }
}
