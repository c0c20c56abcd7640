//! Runs in real Deno processes: the valet key, the sandbox, the limits,
//! http vals.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use valet_core::{Granted, GrantedSet, ScopeSet};
use valet_runtime::{RunSpec, Source};
use valet_store::{NewVal, Outcome, User, ValKind};

use crate::support::{Server, Smtp, error_code};

pub(crate) fn spec(user: &User, code: &str, scopes: ScopeSet, timeout_ms: u64) -> RunSpec {
    RunSpec {
        user_id: user.id.clone(),
        val_id: None,
        kind: ValKind::Script,
        source: Source::Code(code.to_owned()),
        scopes,
        env: BTreeMap::new(),
        timeout: Duration::from_millis(timeout_ms),
        trigger: "test",
        last_run_at: None,
    }
}

pub(crate) fn store_val(
    server: &Server,
    user: &User,
    name: &str,
    kind: ValKind,
    code: &str,
    scopes: ScopeSet,
) -> valet_store::Val {
    server
        .store
        .create_val(
            &Granted::for_operator(&user.id),
            &GrantedSet::for_operator(&user.id, ScopeSet::all()),
            NewVal {
                name: name.into(),
                kind,
                code: code.into(),
                scopes,
                env: BTreeMap::new(),
                timeout_ms: 10_000,
                schedule: None,
            },
        )
        .expect("val")
}

const STD_DEMO: &str = r#"
import { blob } from "https://esm.town/v/std/blob";
import { sqlite } from "https://esm.town/v/std/sqlite";
import { email } from "https://esm.town/v/std/email";
await blob.setJSON("visits", { n: 1 });
const got = await blob.getJSON("visits");
await sqlite.execute("CREATE TABLE IF NOT EXISTS visits (n INTEGER)");
await sqlite.execute({ sql: "INSERT INTO visits VALUES (?)", args: [got.n] });
const rows = await sqlite.execute("SELECT n FROM visits");
await email({ subject: "visits", text: `n = ${rows.rows[0][0]}` });
console.log("done", got.n, rows.rows.length);
const res = await fetch(Deno.env.get("VALTOWN_API_URL") + "/v1/vals", {
  method: "POST",
  headers: { Authorization: `Bearer ${Deno.env.get("valtown")}`, "Content-Type": "application/json" },
  body: JSON.stringify({ name: "spawned", type: "script", code: "1" }),
});
const body = await res.json();
console.log("create val", res.status, body.error.code, body.error.required);
"#;

#[tokio::test(flavor = "multi_thread")]
async fn std_blob_sqlite_email_work_with_default_scopes_and_val_write_is_refused() {
    let smtp = Smtp::start();
    let server = Server::start_with(crate::support::Options {
        smtp: Some(smtp.url()),
        ..Default::default()
    })
    .await;
    let ada = server.user("ada");
    let val = store_val(
        &server,
        &ada,
        "demo",
        ValKind::Script,
        STD_DEMO,
        ScopeSet::default_val(),
    );
    let out = server
        .supervisor()
        .run(RunSpec::for_val(&val, "test"))
        .await
        .expect("run");
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(out.logs.contains("done 1 1"), "{}", out.logs);
    assert!(
        out.logs.contains("create val 403 missing_scope val:write"),
        "{}",
        out.logs
    );
    let messages = smtp.wait_for(1).await;
    assert!(messages.iter().any(|m| m.contains("n = 1")), "{messages:?}");
    assert!(
        server
            .store
            .val_by_name(&ada.id, "spawned")
            .expect("lookup")
            .is_none()
    );
    // The refusal left a scope request on the val.
    let requests = crate::support::eventually(
        || async {
            server
                .store
                .scope_requests(
                    &Granted::<valet_core::grant::ValRead>::for_operator(&val.user_id),
                    &val.id,
                )
                .expect("requests")
        },
        |r| !r.is_empty(),
    )
    .await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].scope, valet_core::Scope::VAL_WRITE);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_val_with_only_blob_read_cannot_set_and_the_error_names_the_scope() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let code = r#"
import { blob } from "https://esm.town/v/std/blob";
console.log("list ok", (await blob.list()).length);
try { await blob.set("k", "v"); console.log("set succeeded"); }
catch (e) { console.log("set refused:", e.message); }
"#;
    let out = server
        .supervisor()
        .run(spec(
            &ada,
            code,
            ScopeSet::parse("blob:read").expect("s"),
            10_000,
        ))
        .await
        .expect("run");
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(out.logs.contains("list ok 0"), "{}", out.logs);
    assert!(
        out.logs.contains("set refused: missing scope 'blob:write'"),
        "{}",
        out.logs
    );
    assert!(!out.logs.contains("set succeeded"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_run_token_dies_with_the_run_and_expires_at_the_deadline() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let code = r#"
import { blob } from "https://esm.town/v/std/blob";
await blob.set("key", Deno.env.get("valtown"));
console.log("my key is", Deno.env.get("valtown"));
"#;
    let before = valet_store::time::now_ms() / 1000;
    let out = server
        .supervisor()
        .run(spec(&ada, code, ScopeSet::default_val(), 7_000))
        .await
        .expect("run");
    let after = valet_store::time::now_ms() / 1000;
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(
        out.logs.contains("my key is [valet key]"),
        "the token is masked: {}",
        out.logs
    );
    let reader = server.token(&ada, ScopeSet::all());
    let token = server
        .client
        .get(format!("{}/v1/blob/key", server.url))
        .bearer_auth(&reader)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(token.starts_with("eyJ"), "{token}");
    assert!(!out.logs.contains(&token));
    // exp = start + timeout.
    let claims: serde_json::Value = {
        use base64::Engine;
        let payload = token.split('.').nth(1).expect("payload");
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .expect("b64"),
        )
        .expect("json")
    };
    let iat = claims["iat"].as_i64().expect("iat");
    assert!(
        (before..=after).contains(&iat),
        "iat {iat} vs the run's {before}..={after}"
    );
    assert_eq!(claims["exp"].as_i64().expect("exp") - iat, 7);
    assert_eq!(claims["scope"], ScopeSet::default_val().to_claim());
    // After the run, the token is dead even though exp is in the future.
    let (status, code, _) = error_code(
        server
            .client
            .get(format!("{}/v1/blob", server.url))
            .bearer_auth(&token)
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "run_ended"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_holds() {
    let server = Server::start().await;
    let ada = server.user("ada");
    // Neighbour ports of the API, on the API's own address.
    let api_port = server.host.as_ref().expect("host").addr.port();
    let neighbour = std::net::TcpListener::bind("127.0.0.1:0").expect("neighbour");
    let neighbour_port = neighbour.local_addr().expect("addr").port();
    let data_dir = server.data_dir().display().to_string();
    let code = format!(
        r#"
const attempts = {{
  readPasswd: () => Deno.readTextFile("/etc/passwd"),
  readDataDir: () => Deno.readDir("{data_dir}")[Symbol.asyncIterator]().next(),
  readDb: () => Deno.readFile("{data_dir}/valet.db"),
  writeTmp: () => Deno.writeTextFile("/tmp/valet-escape.txt", "x"),
  spawn: () => new Deno.Command("/bin/sh", {{ args: ["-c", "true"] }}).output(),
  ffi: () => Deno.dlopen("libc.so.6", {{}}),
  sys: () => Promise.resolve(Deno.hostname()),
  envSet: () => Promise.resolve(Deno.env.set("valtown", "forged")),
  envHome: () => Promise.resolve(Deno.env.get("HOME") ?? (() => {{ throw new Error("no HOME") }})()),
  apiPort: () => fetch("http://127.0.0.1:{api_port}/v1/me"),
  neighbour: () => Deno.connect({{ hostname: "127.0.0.1", port: {neighbour_port} }}),
  localhost: () => fetch("http://localhost:{api_port}/"),
  private10: () => Deno.connect({{ hostname: "10.0.0.1", port: 80 }}),
  metadata: () => fetch("http://169.254.169.254/latest/meta-data/"),
  listen: () => Promise.resolve(Deno.listen({{ port: 0 }})),
}};
for (const [name, attempt] of Object.entries(attempts)) {{
  try {{ await attempt(); console.log("ALLOWED", name); }}
  catch (e) {{ console.log("denied", name); }}
}}
console.log("env", JSON.stringify(Object.keys(Deno.env.toObject()).sort()));
console.log("valtown still", Deno.env.get("valtown") !== "forged");
"#
    );
    let mut run = spec(&ada, &code, ScopeSet::default_val(), 15_000);
    run.env.insert("MY_SETTING".into(), "1".into());
    let out = server.supervisor().run(run).await.expect("run");
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert!(!out.logs.contains("ALLOWED"), "{}", out.logs);
    assert_eq!(out.logs.matches("denied").count(), 15, "{}", out.logs);
    assert!(
        out.logs
            .contains(r#"env ["MY_SETTING","VALTOWN_API_URL","VAL_TOWN_API_KEY","valtown"]"#),
        "{}",
        out.logs
    );
    assert!(out.logs.contains("valtown still true"));
    assert!(!std::path::Path::new("/tmp/valet-escape.txt").exists());
    drop(neighbour);
    server.stop().await;
}

/// A script's run ends when its work has settled (the bootstrap says so
/// on its control channel), not when Deno has torn its process down: work
/// it left behind (a timer) still runs first.
#[tokio::test(flavor = "multi_thread")]
async fn a_script_ends_when_its_work_settles() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let code = "console.log('now'); setTimeout(() => console.log('later'), 50);";
    let out = server
        .supervisor()
        .run(spec(&ada, code, ScopeSet::EMPTY, 10_000))
        .await
        .expect("run");
    assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
    assert_eq!(out.detail, "its work settled", "{}", out.logs);
    assert!(
        out.logs.contains("now") && out.logs.contains("later"),
        "{}",
        out.logs
    );
    server.stop().await;
}

/// Processes whose command line mentions `needle`.
/// How long a run with a 1-second deadline may take in all: the deadline
/// plus generous slack for a loaded machine. A run its deadline failed to
/// end would spin on, so the slack costs a passing test nothing.
const ON_TIME: Duration = Duration::from_secs(6);

fn processes_matching(needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| String::from_utf8_lossy(cmd).contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_end_runs_on_time_and_leave_nothing_behind() {
    let server = Server::start_with(crate::support::Options {
        heap_mb: Some(64),
        ..Default::default()
    })
    .await;
    let ada = server.user("ada");
    let marker = server.data_dir().display().to_string();

    let started = Instant::now();
    let out = server
        .supervisor()
        .run(spec(&ada, "while (true) {}", ScopeSet::EMPTY, 1_000))
        .await
        .expect("run");
    let took = started.elapsed();
    assert_eq!(out.outcome, Outcome::TimedOut, "{}", out.logs);
    assert!(took < ON_TIME, "ended after {took:?}");

    // A growing promise storm: whether its deadline or the heap cap comes
    // first depends on the machine's speed; either way it ends in time.
    let started = Instant::now();
    let forks = "const spin = () => Promise.resolve().then(spin); spin(); spin();";
    let out = server
        .supervisor()
        .run(spec(&ada, forks, ScopeSet::EMPTY, 1_000))
        .await
        .expect("run");
    let took = started.elapsed();
    assert!(
        matches!(out.outcome, Outcome::TimedOut | Outcome::Oom),
        "{:?}: {}",
        out.outcome,
        out.logs
    );
    assert!(took < ON_TIME, "ended after {took:?}");

    let hog = "const a = []; while (true) { a.push(new Array(1e6).fill(Math.random())); }";
    let out = server
        .supervisor()
        .run(spec(&ada, hog, ScopeSet::EMPTY, 20_000))
        .await
        .expect("run");
    assert_eq!(out.outcome, Outcome::Oom, "{} / {}", out.detail, out.logs);

    let out = server
        .supervisor()
        .run(spec(
            &ada,
            "await Promise.reject(new Error('boom'))",
            ScopeSet::EMPTY,
            5_000,
        ))
        .await
        .expect("run");
    assert_eq!(out.outcome, Outcome::Failed);
    assert!(out.logs.contains("boom"), "{}", out.logs);

    // No Deno process of this server is left.
    let left =
        crate::support::eventually(|| async { processes_matching(&marker) }, |n| *n == 0).await;
    assert_eq!(left, 0, "a run outlived its end");
    let record = server
        .store
        .run_of_user(&Granted::for_operator(&ada.id), &out.run_id)
        .expect("record");
    assert_eq!(record.outcome, Outcome::Failed);
    assert!(record.ended_at.is_some());
    server.stop().await;
}

const HTTP_VAL: &str = r#"
export default async function (req: Request): Promise<Response> {
  const url = new URL(req.url);
  if (url.pathname === "/boom") throw new Error("kaboom");
  if (url.pathname === "/stream") {
    const body = new ReadableStream({
      async start(c) {
        for (let i = 0; i < 3; i++) { c.enqueue(new TextEncoder().encode(`chunk${i};`)); await new Promise(r => setTimeout(r, 20)); }
        c.close();
      },
    });
    return new Response(body, { headers: { "content-type": "text/plain" } });
  }
  const text = req.method === "POST" ? await req.text() : "";
  return Response.json(
    { who: "OWNER", method: req.method, path: url.pathname, q: url.searchParams.get("q"), h: req.headers.get("x-test"), body: text },
    { status: 201, headers: { "x-val": "yes" } },
  );
}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn http_vals_answer_through_their_url_and_users_do_not_collide() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let bob = server.user("bob");
    store_val(
        &server,
        &ada,
        "api",
        ValKind::Http,
        &HTTP_VAL.replace("OWNER", "ada"),
        ScopeSet::default_val(),
    );
    store_val(
        &server,
        &bob,
        "api",
        ValKind::Http,
        &HTTP_VAL.replace("OWNER", "bob"),
        ScopeSet::default_val(),
    );
    let c = &server.client;
    let r = c
        .post(format!("{}/ada/api/hello/world?q=1", server.vals_url))
        .header("x-test", "t")
        .body("payload")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-val"], "yes");
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        body,
        json!({"who": "ada", "method": "POST", "path": "/hello/world", "q": "1", "h": "t", "body": "payload"})
    );
    let body: serde_json::Value = c
        .get(format!("{}/bob/api", server.vals_url))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(body["who"], "bob");
    assert_eq!(body["path"], "/");
    let streamed = c
        .get(format!("{}/ada/api/stream", server.vals_url))
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("text");
    assert_eq!(streamed, "chunk0;chunk1;chunk2;");
    let r = c
        .get(format!("{}/ada/api/boom", server.vals_url))
        .send()
        .await
        .expect("boom");
    assert_eq!(r.status(), 500);
    let text = r.text().await.expect("text");
    assert!(
        !text.contains("kaboom"),
        "the stack stays in the logs: {text}"
    );
    let r = c
        .get(format!("{}/ada/missing", server.vals_url))
        .send()
        .await
        .expect("missing");
    assert_eq!(r.status(), 404);
    // Each request was its own run, with logs.
    let val = server
        .store
        .val_by_name(&ada.id, "api")
        .expect("lookup")
        .expect("val");
    let runs = crate::support::eventually(
        || async {
            server
                .store
                .runs_of_val(&Granted::for_operator(&val.user_id), &val.id, 10)
                .expect("runs")
        },
        |runs| runs.len() == 3 && runs.iter().all(|r| r.outcome != Outcome::Running),
    )
    .await;
    assert_eq!(runs.len(), 3);
    assert!(runs.iter().any(|r| r.logs.contains("kaboom")), "{runs:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scripts_run_through_the_api_and_cron_vals_get_last_run_at() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let val = store_val(
        &server,
        &ada,
        "hello",
        ValKind::Script,
        "export default () => console.log('hello from a script')",
        ScopeSet::default_val(),
    );
    let writer = server.token(&ada, ScopeSet::all());
    let r: serde_json::Value = server
        .client
        .post(format!("{}/v1/vals/{}/run", server.url, val.id))
        .bearer_auth(&writer)
        .send()
        .await
        .expect("run")
        .json()
        .await
        .expect("json");
    assert_eq!(r["outcome"], "succeeded", "{r}");
    assert!(
        r["logs"]
            .as_str()
            .expect("logs")
            .contains("hello from a script")
    );
    let run: serde_json::Value = server
        .client
        .get(format!(
            "{}/v1/runs/{}",
            server.url,
            r["run_id"].as_str().expect("id")
        ))
        .bearer_auth(&writer)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(run["outcome"], "succeeded");

    let cron = server
        .store
        .create_val(&Granted::for_operator(&ada.id), &GrantedSet::for_operator(&ada.id, ScopeSet::all()), NewVal {
            name: "tick".into(),
            kind: ValKind::Cron,
            code: "export default (i) => console.log('last', i.lastRunAt?.toISOString() ?? 'never')".into(),
            scopes: ScopeSet::default_val(),
            env: BTreeMap::new(),
            timeout_ms: 5_000,
            schedule: Some(valet_core::Schedule::parse("* * * * * *").expect("schedule")),
        })
        .expect("cron val");
    let deadline = Instant::now() + Duration::from_secs(15);
    let runs = loop {
        let runs = server
            .store
            .runs_of_val(&Granted::for_operator(&ada.id), &cron.id, 10)
            .expect("runs");
        if runs
            .iter()
            .filter(|r| r.outcome == Outcome::Succeeded)
            .count()
            >= 2
            || Instant::now() > deadline
        {
            break runs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let done: Vec<_> = runs
        .iter()
        .filter(|r| r.outcome == Outcome::Succeeded)
        .collect();
    assert!(done.len() >= 2, "{runs:?}");
    assert!(
        done.iter().any(|r| r.logs.contains("last never")),
        "{runs:?}"
    );
    assert!(done.iter().any(|r| r.logs.contains("last 20")), "{runs:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_allow_opens_exactly_one_address() {
    // A plain HTTP server on loopback, which runs may not reach by default.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().fallback(|| async { "hello from the allowed address" });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("other");
    let other_port = other.local_addr().expect("addr").port();
    let code = format!(
        r#"
for (const port of [{port}, {other_port}]) {{
  try {{ const r = await fetch(`http://127.0.0.1:${{port}}/x`); console.log("reached", port, await r.text()); }}
  catch (e) {{ console.log("denied", port); }}
}}
"#
    );
    let closed = Server::start().await;
    let ada = closed.user("ada");
    let out = closed
        .supervisor()
        .run(spec(&ada, &code, ScopeSet::EMPTY, 5_000))
        .await
        .expect("run");
    assert!(
        out.logs.contains(&format!("denied {port}"))
            && out.logs.contains(&format!("denied {other_port}")),
        "{}",
        out.logs
    );
    closed.stop().await;

    let allow: valet_runtime::EgressAllow = format!("127.0.0.1:{port}").parse().expect("addr");
    let open = Server::start_with(crate::support::Options {
        egress_allow: vec![allow],
        ..Default::default()
    })
    .await;
    let ada = open.user("ada");
    let out = open
        .supervisor()
        .run(spec(&ada, &code, ScopeSet::EMPTY, 5_000))
        .await
        .expect("run");
    assert!(
        out.logs
            .contains(&format!("reached {port} hello from the allowed address")),
        "{}",
        out.logs
    );
    assert!(
        out.logs.contains(&format!("denied {other_port}")),
        "only the one address: {}",
        out.logs
    );
    open.stop().await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_server_marks_interrupted_runs_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = valet_store::Store::open(dir.path()).expect("open");
    let user = store
        .create_user("ada", "ada@example.com", None)
        .expect("user");
    store
        .insert_run(&valet_store::NewRun {
            id: "run_interrupted",
            user_id: &user.id,
            val_id: None,
            trigger: "test",
            scopes: ScopeSet::EMPTY,
            started_at: valet_store::time::now_ms(),
            deadline: valet_store::time::now_ms() + 1000,
        })
        .expect("run");
    // A `valet run` host leaves other processes' runs alone...
    let mut config = valet_server::HostConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.cron = false;
    let host = valet_server::Host::start(store.clone(), config.clone())
        .await
        .expect("host");
    host.shutdown().await;
    assert_eq!(
        store
            .run_of_user(&Granted::for_operator(&user.id), "run_interrupted")
            .expect("run")
            .outcome,
        Outcome::Running
    );
    // ...the server marks them lost.
    config.recover_lost_runs = true;
    let host = valet_server::Host::start(store.clone(), config)
        .await
        .expect("host");
    host.shutdown().await;
    assert_eq!(
        store
            .run_of_user(&Granted::for_operator(&user.id), "run_interrupted")
            .expect("run")
            .outcome,
        Outcome::Lost
    );
}

/// Warm processes (started before their val is known) must behave exactly
/// like cold ones: the val's env only, a key that dies with the run, the
/// sandbox, limits, and a fresh process per run.
#[tokio::test(flavor = "multi_thread")]
async fn warm_runs_behave_like_cold_runs() {
    let server = Server::start_with(crate::support::Options {
        warm_pool: 2,
        ..Default::default()
    })
    .await;
    let ada = server.user("ada");
    let code = r#"
import { blob } from "https://esm.town/v/std/blob";
(globalThis as any).counter = ((globalThis as any).counter ?? 0) + 1;
await blob.set("key", Deno.env.get("valtown")!);
console.log("counter", (globalThis as any).counter, "token", Deno.env.get("valtown"));
console.log("env", JSON.stringify(Object.keys(Deno.env.toObject()).sort()), Deno.env.get("MODE"));
try { await Deno.readTextFile("/etc/passwd"); console.log("ALLOWED read"); } catch { console.log("denied read"); }
try { Deno.env.set("valtown", "x"); console.log("ALLOWED env"); } catch { console.log("denied env"); }
"#;
    let mut val = store_val(
        &server,
        &ada,
        "warm",
        ValKind::Script,
        code,
        ScopeSet::default_val(),
    );
    val.env.insert("MODE".into(), "warm".into());
    let reader = server.token(&ada, ScopeSet::all());
    for _ in 0..3 {
        let out = server
            .supervisor()
            .run(RunSpec::for_val(&val, "test"))
            .await
            .expect("run");
        assert_eq!(out.outcome, Outcome::Succeeded, "{}", out.logs);
        assert!(
            out.logs.contains("counter 1 token [valet key]"),
            "fresh process, masked key: {}",
            out.logs
        );
        assert!(
            out.logs
                .contains(r#"env ["MODE","VALTOWN_API_URL","VAL_TOWN_API_KEY","valtown"] warm"#),
            "{}",
            out.logs
        );
        assert!(
            out.logs.contains("denied read") && out.logs.contains("denied env"),
            "{}",
            out.logs
        );
        assert!(!out.logs.contains("ALLOWED"));
        let token = server
            .client
            .get(format!("{}/v1/blob/key", server.url))
            .bearer_auth(&reader)
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("text");
        let (status, code, _) = error_code(
            server
                .client
                .get(format!("{}/v1/me", server.url))
                .bearer_auth(&token)
                .send()
                .await
                .expect("me"),
        )
        .await;
        assert_eq!((status, code.as_str()), (401, "run_ended"));
    }
    let spin = store_val(
        &server,
        &ada,
        "spin",
        ValKind::Script,
        "while (true) {}",
        ScopeSet::EMPTY,
    );
    let spin = valet_store::Val {
        timeout_ms: 1_000,
        ..spin
    };
    let started = Instant::now();
    let out = server
        .supervisor()
        .run(RunSpec::for_val(&spin, "test"))
        .await
        .expect("run");
    assert_eq!(out.outcome, Outcome::TimedOut);
    assert!(started.elapsed() < ON_TIME);
    let broken = store_val(
        &server,
        &ada,
        "broken",
        ValKind::Script,
        "throw new Error('broken val')",
        ScopeSet::EMPTY,
    );
    let out = server
        .supervisor()
        .run(RunSpec::for_val(&broken, "test"))
        .await
        .expect("run");
    assert_eq!(out.outcome, Outcome::Failed);
    assert!(out.logs.contains("broken val"), "{}", out.logs);
    server.stop().await;
}
