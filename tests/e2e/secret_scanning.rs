//! GitHub secret scanning end to end: a key server on loopback serving a
//! key pair this test made, signed reports, real revocation, real email.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::json;
use valet_core::{Granted, ScopeSet, TokenHash};

use crate::support::{Options, Server, Smtp, error_code};

struct KeyServer {
    url: String,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn key_server(kid: &str, key: &SigningKey) -> KeyServer {
    let pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    let document =
        json!({"public_keys": [{"key_identifier": kid, "key": pem, "is_current": true}]});
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    let app = axum::Router::new().route(
        "/keys",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let document = document.clone();
            async move { axum::Json(document) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/keys", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    KeyServer { url, fetches, task }
}

fn new_key() -> SigningKey {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("rng");
    SigningKey::from_slice(&bytes).expect("key")
}

fn sign(key: &SigningKey, body: &[u8]) -> String {
    let signature: Signature = key.sign(body);
    base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
}

async fn report(server: &Server, kid: &str, signature: &str, body: &str) -> reqwest::Response {
    server
        .client
        .post(format!("{}/v1/secret-scanning/verify", server.url))
        .header("GITHUB-PUBLIC-KEY-IDENTIFIER", kid)
        .header("github-public-key-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("post")
}

#[tokio::test(flavor = "multi_thread")]
async fn leaked_tokens_are_revoked_labelled_and_their_owners_told_once() {
    let key = new_key();
    let keys = key_server("kid-1", &key).await;
    let smtp = Smtp::start();
    let options = Options {
        smtp: Some(smtp.url()),
        github_keys_url: Some(keys.url.clone()),
        ..Default::default()
    };
    let server = Server::start_with(options).await;
    let ada = server.user("ada");
    let live = server.token(&ada, ScopeSet::all());
    let revoked = server.token(&ada, ScopeSet::all());
    let revoked_id = server
        .store
        .token_by_hash(&TokenHash::of(&revoked))
        .expect("q")
        .expect("found")
        .id;
    server
        .store
        .revoke_token(
            &Granted::for_operator(&ada.id),
            &revoked_id,
            "revoked by its owner",
        )
        .expect("revoke");
    let unknown = valet_core::ApiToken::generate()
        .expect("rng")
        .expose()
        .to_owned();
    let garbage = "vlt_thisisnotarealtokenbecausethechecksumfails";
    let body = json!([
        {"token": live, "type": "valet_api_token", "url": "https://github.com/o/r/blob/main/x.ts", "source": "commit"},
        {"token": revoked, "type": "valet_api_token", "url": "", "source": "Issue_Comment"},
        {"token": unknown, "type": "valet_api_token", "url": "https://x", "source": "SOMETHING_NEW"},
        {"token": garbage, "type": "valet_api_token", "url": "https://y", "source": "commit"},
    ])
    .to_string();

    let r = report(&server, "kid-1", &sign(&key, body.as_bytes()), &body).await;
    assert_eq!(r.status(), 200);
    let labels: serde_json::Value = r.json().await.expect("json");
    let expected: Vec<serde_json::Value> = [(&live, "true_positive"), (&revoked, "true_positive"), (&unknown, "false_positive"), (&garbage.to_owned(), "false_positive")]
        .iter()
        .map(|(t, l)| json!({"token_hash": TokenHash::of(t).to_hex(), "token_type": "valet_api_token", "label": l}))
        .collect();
    assert_eq!(labels, serde_json::Value::Array(expected));

    // The live token is dead, with the reason and the place.
    let (status, code, _) = error_code(
        server
            .client
            .get(format!("{}/v1/me", server.url))
            .bearer_auth(&live)
            .send()
            .await
            .expect("me"),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "token_revoked"));
    let record = server
        .store
        .token_by_hash(&TokenHash::of(&live))
        .expect("q")
        .expect("found");
    assert_eq!(record.revoked_reason.as_deref(), Some("leaked"));
    let events = server.store.token_events(&record.id).expect("events");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "leaked");
    assert!(
        events[0]
            .1
            .contains("https://github.com/o/r/blob/main/x.ts")
    );
    assert_eq!(
        record.leak_url.as_deref(),
        Some("https://github.com/o/r/blob/main/x.ts")
    );
    let previously = server
        .store
        .token_by_hash(&TokenHash::of(&revoked))
        .expect("q")
        .expect("found");
    assert_eq!(
        previously.revoked_reason.as_deref(),
        Some("revoked by its owner")
    );

    // Exactly one email, to the owner, naming the token and the place.
    let messages = smtp.wait_for(1).await;
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0].contains("To: ada@example.com"),
        "{}",
        messages[0]
    );
    assert!(messages[0].contains("https://github.com/o/r/blob/main/x.ts"));
    assert!(messages[0].contains("revoked"));

    // A replay (GitHub retries) changes nothing and sends nothing.
    let r = report(&server, "kid-1", &sign(&key, body.as_bytes()), &body).await;
    assert_eq!(r.json::<serde_json::Value>().await.expect("json"), labels);
    let outbox = server
        .store
        .list_emails(&valet_core::Granted::for_operator(&ada.id), 10)
        .expect("outbox");
    assert_eq!(outbox.len(), 1, "no second email queued");
    assert_eq!(smtp.messages().len(), 1, "no second email");
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1, "keys were cached");
    keys.task.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_signatures_unknown_keys_and_a_dead_key_server_revoke_nothing() {
    let key = new_key();
    let keys = key_server("kid-1", &key).await;
    let options = Options {
        github_keys_url: Some(keys.url.clone()),
        ..Default::default()
    };
    let server = Server::start_with(options).await;
    let ada = server.user("ada");
    let live = server.token(&ada, ScopeSet::all());
    let body = json!([{"token": live, "type": "t", "url": "u", "source": "commit"}]).to_string();
    let still_alive = || async {
        server
            .client
            .get(format!("{}/v1/me", server.url))
            .bearer_auth(&live)
            .send()
            .await
            .expect("me")
            .status()
            .as_u16()
    };

    // No signature headers at all.
    let r = server
        .client
        .post(format!("{}/v1/secret-scanning/verify", server.url))
        .body(body.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(error_code(r).await.0, 400);
    // Signed by another key.
    let (status, code, _) =
        error_code(report(&server, "kid-1", &sign(&new_key(), body.as_bytes()), &body).await).await;
    assert_eq!((status, code.as_str()), (401, "bad_signature"));
    // Signature of a different body.
    let (status, _, _) =
        error_code(report(&server, "kid-1", &sign(&key, b"[]"), &body).await).await;
    assert_eq!(status, 401);
    let fetches = keys.fetches.load(Ordering::SeqCst);
    // Unknown key id: 401, and no refetch so soon after the last fetch.
    let (status, code, _) =
        error_code(report(&server, "kid-unknown", &sign(&key, body.as_bytes()), &body).await).await;
    assert_eq!((status, code.as_str()), (401, "unknown_key"));
    assert_eq!(
        keys.fetches.load(Ordering::SeqCst),
        fetches,
        "at most one fetch per interval"
    );
    assert_eq!(still_alive().await, 200);

    // A key server that is down: 503 and nothing revoked.
    keys.task.abort();
    let _ = keys.task.await;
    let options = Options {
        github_keys_url: Some(keys.url.clone()),
        ..Default::default()
    };
    let fresh = Server::start_with(options).await;
    let bob = fresh.user("bob");
    let bobs = fresh.token(&bob, ScopeSet::all());
    let body = json!([{"token": bobs, "type": "t", "url": "u", "source": "commit"}]).to_string();
    let (status, code, _) =
        error_code(report(&fresh, "kid-1", &sign(&key, body.as_bytes()), &body).await).await;
    assert_eq!((status, code.as_str()), (503, "keys_unavailable"));
    let r = fresh
        .client
        .get(format!("{}/v1/me", fresh.url))
        .bearer_auth(&bobs)
        .send()
        .await
        .expect("me");
    assert_eq!(r.status(), 200, "nothing was revoked");
    fresh.stop().await;
    server.stop().await;
}

#[test]
fn operators_can_report_a_leak_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let valet = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_valet"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .expect("run")
    };
    assert!(
        valet(&["user", "create", "ada", "--email", "ada@example.com"])
            .status
            .success()
    );
    let token = String::from_utf8_lossy(
        &valet(&["token", "create", "--user", "ada", "--name", "ci"]).stdout,
    )
    .trim()
    .to_owned();
    let out = valet(&[
        "token",
        "revoke-leaked",
        "--token",
        &token,
        "--url",
        "https://pastebin.example/x",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = valet(&[
        "token",
        "revoke-leaked",
        "--token",
        &token,
        "--url",
        "https://pastebin.example/x",
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already revoked"));
    let list: serde_json::Value =
        serde_json::from_slice(&valet(&["token", "list", "--user", "ada", "--json"]).stdout)
            .expect("json");
    assert_eq!(list[0]["revoked_reason"], "leaked");
    assert_eq!(list[0]["leak_url"], "https://pastebin.example/x");
    let store = valet_store::Store::open(dir.path()).expect("store");
    let user = store.user_by_name("ada").expect("q").expect("ada");
    assert_eq!(
        store
            .list_emails(&Granted::for_operator(&user.id), 10)
            .expect("emails")
            .len(),
        1,
        "one email queued"
    );
    let not_ours = valet(&["token", "revoke-leaked", "--token", "vlt_nope"]);
    assert!(!not_ours.status.success());
}

/// Issue 13, finding 8: with the key cache cold, every unsigned request
/// with a made-up key id used to trigger its own fetch of GitHub's keys.
#[tokio::test(flavor = "multi_thread")]
async fn made_up_key_ids_on_a_cold_cache_cause_one_fetch_in_total() {
    let key = new_key();
    let keys = key_server("kid-1", &key).await;
    let server = Server::start_with(Options {
        github_keys_url: Some(keys.url.clone()),
        ..Default::default()
    })
    .await;
    // All at once: the first fetch is still in flight when most arrive.
    let requests: Vec<_> = (0..30)
        .map(|i| {
            let (client, url) = (server.client.clone(), server.url.clone());
            tokio::spawn(async move {
                let r = client
                    .post(format!("{url}/v1/secret-scanning/verify"))
                    .header("github-public-key-identifier", format!("made-up-{i}"))
                    .header("github-public-key-signature", "bm90IGEgc2lnbmF0dXJl")
                    .body("[]")
                    .send()
                    .await
                    .expect("post");
                error_code(r).await
            })
        })
        .collect();
    for request in requests {
        let (status, code, _) = request.await.expect("request task");
        assert_eq!((status, code.as_str()), (401, "unknown_key"));
    }
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1, "one fetch in total");
    // A real report verifies with the keys that one fetch brought.
    let body = "[]";
    let r = report(&server, "kid-1", &sign(&key, body.as_bytes()), body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1);
    server.stop().await;
}
