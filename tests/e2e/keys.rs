//! Key rotation end to end (issue #11, item 11): `valet keys rotate` in
//! another process; the running server reads the ring back, signs new
//! runs with the new key, and still verifies the tokens of runs signed
//! with the old one; the JWKS shows both.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use valet_core::ScopeSet;
use valet_store::{NewVal, ValKind};

use crate::support::{Options, Server, eventually};

/// Records the kid of its own token, waits for the blob `go`, then writes
/// `done-<name>` with the same token.
const WAITER: &str = r#"
import { blob } from "https://esm.town/v/std/blob";
const name = Deno.env.get("NAME");
const header = Deno.env.get("valtown").split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
await blob.set(`kid-${name}`, JSON.parse(atob(header)).kid);
if (name === "waiter") {
  for (let i = 0; i < 600; i++) {
    try { await blob.get("go"); break; } catch { await new Promise((r) => setTimeout(r, 50)); }
  }
}
await blob.set(`done-${name}`, "ok");
"#;

fn val(server: &Server, user: &valet_store::User, name: &str) -> valet_store::Val {
    server
        .store
        .create_val(
            &valet_core::Granted::for_operator(&user.id),
            &valet_core::GrantedSet::for_operator(&user.id, ScopeSet::all()),
            NewVal {
                name: name.into(),
                kind: ValKind::Script,
                code: WAITER.into(),
                scopes: ScopeSet::default_val(),
                env: BTreeMap::from([("NAME".to_owned(), name.to_owned())]),
                timeout_ms: 60_000,
                schedule: None,
            },
        )
        .expect("val")
}

async fn blob(server: &Server, token: &str, key: &str) -> Option<String> {
    let r = server
        .client
        .get(format!("{}/v1/blob/{key}", server.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("get");
    if r.status() == 200 {
        Some(r.text().await.expect("text"))
    } else {
        None
    }
}

async fn jwks_kids(server: &Server) -> Vec<String> {
    let jwks: serde_json::Value = server
        .client
        .get(format!("{}/.well-known/jwks.json", server.url))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_reaches_the_running_server_and_old_tokens_keep_working() {
    let server = Server::start_with(Options {
        key_refresh: Some(Duration::from_millis(200)),
        ..Options::default()
    })
    .await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let waiter = val(&server, &ada, "waiter");
    let fresh = val(&server, &ada, "fresh");
    let old_kids = jwks_kids(&server).await;
    assert_eq!(old_kids.len(), 1);

    // A run signed with the old key, waiting.
    let run = {
        let (client, url, token, id) = (
            server.client.clone(),
            server.url.clone(),
            token.clone(),
            waiter.id.clone(),
        );
        tokio::spawn(async move {
            client
                .post(format!("{url}/v1/vals/{id}/run"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("run")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        })
    };
    let waiter_kid = eventually(|| blob(&server, &token, "kid-waiter"), Option::is_some).await;
    assert_eq!(waiter_kid.as_deref(), Some(old_kids[0].as_str()));

    // Another process rotates.
    let out = Command::new(env!("CARGO_BIN_EXE_valet"))
        .arg("--data-dir")
        .arg(server.data_dir())
        .args(["keys", "rotate"])
        .output()
        .expect("valet keys rotate");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_kid = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("new signing key "))
        .expect("the new kid")
        .to_owned();
    assert_ne!(new_kid, old_kids[0]);
    assert!(stdout.contains("retiring"), "{stdout}");

    // The server picks it up: the JWKS shows both keys.
    let kids = eventually(|| jwks_kids(&server), |k| k.len() == 2).await;
    assert!(
        kids.contains(&new_kid) && kids.contains(&old_kids[0]),
        "{kids:?}"
    );

    // The old run's token still verifies after the rotation.
    let put = server
        .client
        .post(format!("{}/v1/blob/go", server.url))
        .bearer_auth(&token)
        .body("1")
        .send()
        .await
        .expect("go");
    assert_eq!(put.status(), 201);
    let summary = run.await.expect("run task");
    assert_eq!(summary["outcome"], "succeeded", "{summary}");
    assert_eq!(
        blob(&server, &token, "done-waiter").await.as_deref(),
        Some("ok")
    );

    // A new run is signed with the new key.
    let r: serde_json::Value = server
        .client
        .post(format!("{}/v1/vals/{}/run", server.url, fresh.id))
        .bearer_auth(&token)
        .send()
        .await
        .expect("run")
        .json()
        .await
        .expect("json");
    assert_eq!(r["outcome"], "succeeded", "{r}");
    assert_eq!(
        blob(&server, &token, "kid-fresh").await.as_deref(),
        Some(new_kid.as_str())
    );
    server.stop().await;
}
