//! Hot http vals: isolation between vals, requests and versions is tested,
//! not assumed.

use valet_core::{Granted, GrantedSet, ScopeSet};
use valet_store::{Outcome, RunRecord, ValKind, ValPatch};

use crate::runs::store_val;
use crate::support::Server;

const COUNTER: &str = r#"
import { blob } from "https://esm.town/v/std/blob";
const process = crypto.randomUUID();
let count = 0;
let previousKey: string | undefined;
export default async (req: Request) => {
  const url = new URL(req.url);
  count += 1;
  const key = Deno.env.get("valtown")!;
  if (url.pathname === "/die") Deno.exit(3);
  let previous = 0;
  if (previousKey) {
    const r = await fetch(`${Deno.env.get("VALTOWN_API_URL")}/v1/me`, { headers: { Authorization: `Bearer ${previousKey}` } });
    previous = r.status;
  }
  previousKey = key;
  await blob.set(`seen-${count}`, key.slice(-12));
  console.log("request", count);
  return Response.json({ process, count, key: key.slice(-12), previous, version: "VERSION" });
};
"#;

/// The latest runs of a val, once `done` holds of them (polled, with the
/// support module's generous deadline).
async fn runs_until(
    server: &Server,
    user_id: &str,
    val_id: &str,
    done: impl Fn(&Vec<RunRecord>) -> bool,
) -> Vec<RunRecord> {
    crate::support::eventually(
        || async {
            let (id, user) = (val_id.to_owned(), user_id.to_owned());
            server
                .store
                .call(move |s| s.runs_of_val(&Granted::for_operator(&user), &id, 10))
                .await
                .unwrap()
        },
        done,
    )
    .await
}

/// The runs of a val that has had one run, once that run has ended.
async fn runs_once_ended(server: &Server, user_id: &str, val_id: &str) -> Vec<RunRecord> {
    runs_until(server, user_id, val_id, |runs| {
        runs.len() == 1 && runs[0].outcome != Outcome::Running
    })
    .await
}

async fn get(server: &Server, path: &str) -> serde_json::Value {
    let r = server
        .client
        .get(format!("{}{path}", server.vals_url))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn requests_share_a_live_process_but_never_a_key() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let val = store_val(
        &server,
        &ada,
        "counter",
        ValKind::Http,
        &COUNTER.replace("VERSION", "one"),
        ScopeSet::default_val(),
    );
    let first = get(&server, "/ada/counter").await;
    let second = get(&server, "/ada/counter").await;
    // One live process keeps its module state...
    assert_eq!(first["process"], second["process"]);
    assert_eq!(second["count"], 2);
    // ...but each request has its own key, dead once its response ended.
    assert_ne!(first["key"], second["key"]);
    assert_eq!(
        second["previous"], 401,
        "the first request's key outlived its response"
    );
    assert_eq!(server.supervisor().hot_processes(), 1);

    // Each request is a run with its own record and its own logs.
    let runs = runs_until(&server, &ada.id, &val.id, |runs| {
        runs.iter()
            .filter(|r| r.outcome == Outcome::Succeeded)
            .count()
            == 2
    })
    .await;
    let finished: Vec<_> = runs
        .iter()
        .filter(|r| r.outcome == Outcome::Succeeded)
        .collect();
    assert_eq!(finished.len(), 2, "{runs:?}");
    for run in &finished {
        assert_eq!(run.logs.matches("request").count(), 1, "{}", run.logs);
    }

    // Another val never shares the process.
    store_val(
        &server,
        &ada,
        "other",
        ValKind::Http,
        &COUNTER.replace("VERSION", "other"),
        ScopeSet::default_val(),
    );
    let other = get(&server, "/ada/other").await;
    assert_ne!(other["process"], first["process"]);
    assert_eq!(other["count"], 1);

    // Changed code answers at once, from a new process.
    let (id, user) = (val.id.clone(), ada.id.clone());
    server
        .store
        .call(move |s| {
            s.update_val(
                &Granted::for_operator(&user),
                &GrantedSet::for_operator(&user, ScopeSet::all()),
                &id,
                ValPatch {
                    code: Some(COUNTER.replace("VERSION", "two")),
                    ..Default::default()
                },
            )
        })
        .await
        .unwrap();
    let changed = get(&server, "/ada/counter").await;
    assert_eq!(changed["version"], "two");
    assert_ne!(changed["process"], first["process"]);

    // A process that dies does not fail the next request: the request that
    // ended it gets a 5xx, the next one a fresh process.
    let r = server
        .client
        .get(format!("{}/ada/counter/die", server.vals_url))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    // Once it is gone (the other val's process lives on), the next request
    // gets a fresh one.
    let alive = crate::support::eventually(
        || async { server.supervisor().hot_processes() },
        |n| *n == 1,
    )
    .await;
    assert_eq!(alive, 1, "the process that exited is still counted");
    let after = get(&server, "/ada/counter").await;
    assert_ne!(after["process"], changed["process"]);
    assert_eq!(after["count"], 1);
    server.stop().await;
}

/// A hot request's key never travels in the request the val sees (a val
/// that passes its request on, to a server it proxies to, would hand the
/// key over unawares): the request names only its run. A request that
/// said nothing ends with its response, one that logged has its lines in
/// its own record, and the visitor sees none of the process's own headers.
#[tokio::test]
async fn a_request_carries_its_run_but_never_its_key() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let val = store_val(
        &server,
        &ada,
        "echo",
        ValKind::Http,
        r#"
let serveCalls = 0;
// A val cannot take the bootstrap's request handler by replacing Deno.serve.
Object.defineProperty(Deno, "serve", { value: () => { serveCalls += 1; } });
export default (req: Request) => {
  const path = new URL(req.url).pathname;
  // Many lines, every one of them in the run's record.
  if (path !== "/") for (let i = 0; i < (path === "/forged" ? 200 : 1); i++) console.log(`${path} request`);
  const body = { headers: Object.fromEntries(req.headers), key: Deno.env.get("valtown"), serveCalls };
  // A response that claims a quiet end (as one copied from an upstream might).
  const extra: Record<string, string> = path === "/forged" ? { "x-valet-quiet-end": "1" } : {};
  return Response.json(body, { headers: extra });
};
"#,
        ScopeSet::default_val(),
    );
    let mut runs_seen = Vec::new();
    for path in ["/ada/echo", "/ada/echo/loud", "/ada/echo/forged"] {
        let r = server
            .client
            .get(format!("{}{path}", server.vals_url))
            .header("x-visitor", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        for header in r.headers().keys() {
            assert!(
                !header.as_str().starts_with("x-valet"),
                "{header} reached the visitor"
            );
        }
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["serveCalls"], 0, "the val's Deno.serve was called");
        let key = answer["key"].as_str().expect("the request has its key");
        let headers = answer["headers"].as_object().expect("headers");
        assert_eq!(headers["x-visitor"], "1");
        for (name, value) in headers {
            let value = value.as_str().unwrap_or_default();
            assert!(
                !value.contains(key),
                "the key travelled in the request's {name} header"
            );
        }
        // The run it names is the key's own.
        let run = headers["x-valet-run"]
            .as_str()
            .expect("the request names its run");
        let claims = key.split('.').nth(1).expect("a JWT");
        use base64::Engine;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["jti"], run);
        runs_seen.push(run.to_owned());
    }
    let runs = runs_until(&server, &ada.id, &val.id, |runs| {
        runs.len() == 3 && runs.iter().all(|r| r.outcome == Outcome::Succeeded)
    })
    .await;
    let by_id = |id: &str| runs.iter().find(|r| r.id == id).expect("its run record");
    let quiet = by_id(&runs_seen[0]);
    assert_eq!(quiet.outcome, Outcome::Succeeded, "{quiet:?}");
    assert_eq!(quiet.logs, "", "{quiet:?}");
    let loud = by_id(&runs_seen[1]);
    assert_eq!(loud.outcome, Outcome::Succeeded, "{loud:?}");
    assert!(loud.logs.contains("/loud request"), "{loud:?}");
    // A response that only claimed a quiet end keeps its run's logs.
    let forged = by_id(&runs_seen[2]);
    assert_eq!(
        forged.logs.matches("/forged request").count(),
        200,
        "{forged:?}"
    );
    server.stop().await;
}

/// Keys signed ahead of their requests (by the supervisor's minting
/// thread) obey the rules of any other: each is live for its own request
/// only (the val's blob write with it succeeds, the previous request's is
/// refused), and none is given twice.
#[tokio::test]
async fn keys_signed_ahead_are_live_for_their_request_only() {
    let server = Server::start().await;
    let ada = server.user("ada");
    store_val(
        &server,
        &ada,
        "counter",
        ValKind::Http,
        &COUNTER.replace("VERSION", "one"),
        ScopeSet::default_val(),
    );
    let mut keys = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut count = 0;
    // Until a few requests took a key from the stock (the thread signs
    // when a core is free, so how many requests that takes varies).
    while server.supervisor().hot_keys_signed_ahead() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no request took a key signed ahead"
        );
        let answer = get(&server, "/ada/counter").await;
        count += 1;
        assert_eq!(answer["count"], count, "{answer}");
        if count > 1 {
            assert_eq!(
                answer["previous"], 401,
                "a key outlived its response: {answer}"
            );
        }
        assert!(
            keys.insert(answer["key"].clone()),
            "a key was given twice: {answer}"
        );
    }
    server.stop().await;
}

/// A response sent whole is recorded as answered, whether its body was
/// empty, known in length or streamed, and the connection it came over
/// serves the next request (hyper does not poll a body of known length
/// past its last frame: this once read as a visitor who went away, and
/// every request opened a new connection to the process).
#[tokio::test]
async fn whole_responses_are_answered_and_their_connection_is_reused() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let val = store_val(
        &server,
        &ada,
        "bodies",
        ValKind::Http,
        r#"export default (req: Request) => {
  const path = new URL(req.url).pathname;
  if (path.endsWith("/empty")) return new Response(null, { status: 204 });
  if (path.endsWith("/stream")) {
    return new Response(new ReadableStream({
      start(c) { c.enqueue(new TextEncoder().encode("a")); c.enqueue(new TextEncoder().encode("b")); c.close(); },
    }));
  }
  return new Response("hi");
};"#,
        ScopeSet::default_val(),
    );
    let paths = ["/sized", "/empty", "/stream", "/sized", "/empty", "/stream"];
    let before = server.supervisor().hot_connections_opened();
    for (i, path) in paths.iter().enumerate() {
        let r = server
            .client
            .get(format!("{}/ada/bodies{path}", server.vals_url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.bytes().await.unwrap();
        // The connection is given back before the run's end is recorded.
        runs_until(&server, &ada.id, &val.id, |runs| {
            runs.iter()
                .filter(|r| r.outcome != Outcome::Running)
                .count()
                == i + 1
        })
        .await;
    }
    let runs = runs_until(&server, &ada.id, &val.id, |runs| runs.len() == paths.len()).await;
    for run in &runs {
        assert_eq!(run.outcome, Outcome::Succeeded, "{run:?}");
        assert_eq!(run.exit_detail.as_deref(), Some("answered"), "{run:?}");
    }
    let opened = server.supervisor().hot_connections_opened() - before;
    assert_eq!(opened, 1, "each request opened a connection of its own");
    server.stop().await;
}

/// A visitor who hangs up before the answer leaves no run `running`: the
/// run ends (its key with it) and its end is recorded.
#[tokio::test]
async fn a_visitor_who_hangs_up_leaves_no_run_running() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let val = store_val(
        &server,
        &ada,
        "slow",
        ValKind::Http,
        // Never answers: only the visitor's hang-up (or the deadline) ends it.
        "export default () => new Promise(() => {});",
        ScopeSet::default_val(),
    );
    let visitor = {
        let (client, url) = (
            server.client.clone(),
            format!("{}/ada/slow", server.vals_url),
        );
        tokio::spawn(async move { client.get(url).send().await })
    };
    // Hangs up once the request is a running run, however long that took.
    runs_until(&server, &ada.id, &val.id, |runs| {
        runs.len() == 1 && runs[0].outcome == Outcome::Running
    })
    .await;
    visitor.abort();
    assert!(
        visitor.await.is_err(),
        "the visitor was meant to hang up first"
    );
    let runs = runs_once_ended(&server, &ada.id, &val.id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].outcome,
        Outcome::Failed,
        "{:?}",
        runs[0].exit_detail
    );
    assert_eq!(
        runs[0].exit_detail.as_deref(),
        Some("the visitor went away before the answer")
    );
    server.stop().await;
}

/// A response still streaming at its run's deadline is cut, and the client
/// sees a cut body, not a whole one; the run is `timed_out`.
#[tokio::test]
async fn a_response_streaming_past_its_deadline_is_cut_and_timed_out() {
    let server = Server::start().await;
    let ada = server.user("ada");
    let val = server
        .store
        .create_val(
            &Granted::for_operator(&ada.id),
            &GrantedSet::for_operator(&ada.id, ScopeSet::all()),
            valet_store::NewVal {
                name: "endless".into(),
                kind: ValKind::Http,
                code: r#"export default () => new Response(new ReadableStream({
                  async pull(c) { await new Promise((r) => setTimeout(r, 100)); c.enqueue(new TextEncoder().encode("tick;")); },
                }));"#
                    .into(),
                scopes: ScopeSet::default_val(),
                env: Default::default(),
                timeout_ms: 3_000,
                schedule: None,
            },
        )
        .unwrap();
    let response = server
        .client
        .get(format!("{}/ada/endless", server.vals_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await;
    assert!(body.is_err(), "the cut body read as whole: {body:?}");
    let runs = runs_once_ended(&server, &ada.id, &val.id).await;
    assert_eq!(
        runs[0].outcome,
        Outcome::TimedOut,
        "{:?}",
        runs[0].exit_detail
    );
    server.stop().await;
}

/// The same for a val served in a process of its own per request (`valet
/// dev`, a file's val): the visitor's hang-up does not cut the run short of
/// its end and its record.
#[tokio::test(flavor = "multi_thread")]
async fn a_visitor_who_hangs_up_on_a_one_shot_val_leaves_no_run_running() {
    let server = Server::start().await;
    let ada = server.user("ada");
    // Slow to start listening, so the visitor hangs up before it does.
    let code = "await new Promise((r) => setTimeout(r, 5000));\nexport default () => new Response('late');";
    let val = store_val(
        &server,
        &ada,
        "once",
        ValKind::Http,
        code,
        ScopeSet::default_val(),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("once.ts");
    std::fs::write(&file, code).unwrap();
    let mut spec = valet_runtime::RunSpec::for_val(&val, "http");
    spec.source = valet_runtime::Source::File(file);
    let request = axum::http::Request::builder()
        .uri("/")
        .body(axum::body::Body::empty())
        .unwrap();
    let supervisor = server.supervisor().clone();
    let visitor = tokio::spawn(async move { supervisor.serve_http(spec, request).await });
    // Hangs up once the request is a running run, however long that took.
    runs_until(&server, &ada.id, &val.id, |runs| {
        runs.len() == 1 && runs[0].outcome == Outcome::Running
    })
    .await;
    visitor.abort();
    assert!(
        visitor.await.is_err(),
        "the visitor was meant to hang up first"
    );
    let runs = runs_once_ended(&server, &ada.id, &val.id).await;
    assert_eq!(runs.len(), 1);
    assert_ne!(
        runs[0].outcome,
        Outcome::Running,
        "{:?}",
        runs[0].exit_detail
    );
    server.stop().await;
}
