//! Run keys at the API: a key registered in `LiveRuns` for channel A works
//! only through A's channel app, is refused (`run_key_elsewhere`) through
//! another channel or valet's own origin, and dies (`run_ended`) with its
//! run. The channel app serves `/v1` and nothing else.

use serde_json::json;
use valet_core::{KeyRing, MintRequest, Scope, ScopeSet, SigningKey};

use crate::support::{Api, Client, Requests, eventually, scopes};

/// A run of ada's val `job`, live on channel A with `granted`.
struct Running {
    api: Api,
    ada: valet_store::User,
    val: valet_store::Val,
    key: String,
    run: valet_core::live_runs::LiveRunGuard,
    /// Channel A's app: what the run's process reaches.
    a: Client,
}

fn running(granted: ScopeSet) -> Running {
    let api = Api::start();
    let ada = api.user("ada");
    let val = api.val(&ada, "job");
    let (key, run) = api.live_run(&ada, &val, granted, "A");
    let a = api.channel("A");
    Running {
        api,
        ada,
        val,
        key,
        run,
        a,
    }
}

#[tokio::test]
async fn a_run_key_works_only_through_its_own_channel_and_dies_with_its_run() {
    let Running {
        api, key, run, a, ..
    } = running(ScopeSet::default_val());
    let b = api.channel("B");

    let r = a.get("/v1/me").token(&key).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["username"], "ada");
    let r = a.post("/v1/blob/k").token(&key).body("v").send().await;
    assert_eq!(r.status, 201, "{}", r.text());
    for (through, reply) in [
        ("channel B", b.get("/v1/me").token(&key).send().await),
        ("valet's origin", api.get("/v1/me").token(&key).send().await),
    ] {
        assert_eq!(
            reply.error(),
            (401, "run_key_elsewhere".into()),
            "through {through}"
        );
    }
    // Nothing was written through the other doors.
    let r = b.post("/v1/blob/k").token(&key).body("b").send().await;
    assert_eq!(r.status, 401);
    assert_eq!(a.get("/v1/blob/k").token(&key).send().await.text(), "v");

    drop(run);
    for (through, reply) in [
        ("channel A", a.get("/v1/me").token(&key).send().await),
        ("channel B", b.get("/v1/me").token(&key).send().await),
        ("valet's origin", api.get("/v1/me").token(&key).send().await),
    ] {
        assert_eq!(
            reply.error(),
            (401, "run_ended".into()),
            "through {through} after the run"
        );
    }
}

#[tokio::test]
async fn keys_that_no_run_holds_are_invalid() {
    let Running {
        ada,
        val,
        a,
        run: _run,
        ..
    } = running(ScopeSet::default_val());
    // A well-formed key signed by another server's ring.
    let stranger = KeyRing::new(SigningKey::generate().expect("key")).expect("ring");
    let now = (valet_store::time::now_ms() / 1000) as u64;
    let forged = stranger
        .mint(&MintRequest {
            user_id: &ada.id,
            val_id: Some(&val.id),
            run_id: "run_forged",
            scopes: ScopeSet::all(),
            start: now,
            deadline: now + 600,
        })
        .expect("mint");
    for key in [forged.as_str(), "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "x"] {
        let r = a.get("/v1/me").token(key).send().await;
        assert_eq!(r.error(), (401, "invalid_token".into()), "{key}");
    }
}

#[tokio::test]
async fn a_run_refused_a_scope_asks_its_owner_for_it() {
    let (api, ada, owner) = Api::with_user("ada");
    let val = api.val(&ada, "job");
    let (key, _run) = api.live_run(&ada, &val, scopes("blob:read"), "A");
    let a = api.channel("A");
    let r = a.post("/v1/blob/k").token(&key).body("v").send().await;
    assert_eq!(
        r.error_required(),
        (403, "missing_scope".into(), Some("blob:write".into()))
    );
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("settings page"), "{message}");
    let path = format!("/v1/vals/{}/scope-requests", val.id);
    let requests = eventually(
        || async { api.get(&path).token(&owner).send().await.json() },
        |r| r.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    assert_eq!(requests[0]["scope"], "blob:write", "{requests}");
    // Allowing it widens the val, not the live run.
    let r = api
        .post(&format!("{path}/blob:write/allow"))
        .token(&owner)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["scopes"]
            .as_array()
            .is_some_and(|s| s.contains(&json!(Scope::BLOB_WRITE.to_string())))
    );
    let r = a.post("/v1/blob/k").token(&key).body("v").send().await;
    assert_eq!(
        r.error().0,
        403,
        "a live run keeps the scopes it started with"
    );
}

#[tokio::test]
async fn the_channel_app_serves_the_api_and_nothing_else() {
    let Running {
        api,
        key,
        a,
        run: _run,
        ..
    } = running(ScopeSet::default_val());
    for path in [
        "/login",
        "/settings/tokens",
        "/vals",
        "/.well-known/jwks.json",
        "/",
    ] {
        let r = a.get(path).token(&key).send().await;
        assert_eq!(r.error(), (404, "not_found".into()), "GET {path}");
    }
    for path in ["/login", "/v1/secret-scanning/verify"] {
        let r = a
            .post(path)
            .header(
                axum::http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body("username=ada&password=wrong")
            .send()
            .await;
        assert_eq!(r.error(), (404, "not_found".into()), "POST {path}");
    }
    // The same paths exist on valet's own origin.
    assert_eq!(api.get("/login").send().await.status, 200);
    assert_eq!(api.get("/.well-known/jwks.json").send().await.status, 200);
}
