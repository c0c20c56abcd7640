//! Users' SQLite databases in a cluster (real `valet serve` processes on a
//! real PostgreSQL): each user's database lives on one home node and
//! answers through every node; a killed home is taken over only after its
//! lease runs out, with a higher fence; the internal forward route takes
//! only signed, fresh, unreplayed forwards.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use valet_api::forward::{FORWARD_TTL_MS, Forward, ForwardClaims, ForwardKey, SIGNATURE_HEADER};
use valet_core::{Granted, GrantedSet, ScopeSet, TokenScopes};
use valet_store::{NewVal, Store, StoreOptions, User, ValKind};

use crate::support::free_port;

/// One of these tests at a time: each starts several nodes, and the
/// machine has two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `valet serve` node with a known id, killed when dropped.
struct Node {
    child: Child,
    id: String,
    url: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Node {
    fn start(database: &str, id: &str, lease: &str, runs: usize) -> Node {
        let dir = tempfile::tempdir().expect("node dir");
        let port = free_port();
        let log = dir.path().join("node.log");
        let child = Command::new(env!("CARGO_BIN_EXE_valet"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--database", database, "serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--vals-listen", "127.0.0.1:0", "--node-id", id])
            .args(["--node-lease", lease, "--node-runs", &runs.to_string()])
            .args(["--warm-pool", "0"])
            .env("VALET_LOG", "warn,valet_server::cluster=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start valet serve");
        Node {
            child,
            id: id.to_owned(),
            url: format!("http://127.0.0.1:{port}"),
            log,
            dir,
        }
    }

    async fn ready(&mut self) {
        crate::support::wait_until_serving(&self.url, &mut self.child, &self.log).await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The user's database file, if this node has one.
    fn has_database(&self, user: &User) -> bool {
        self.dir
            .path()
            .join("data/sqlite")
            .join(format!("{}.sqlite3", user.id))
            .exists()
    }

    /// SIGKILL: no drain, no goodbye.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh database, a user with a sqlite token, and a store to look with.
struct Cluster {
    database: String,
    store: Store,
    user: User,
    token: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let database = valet_testkit::database();
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open_with(&StoreOptions {
            database: Some(database.clone()),
            ..StoreOptions::local(dir.path())
        })
        .expect("open the shared store");
        let user = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        let (_, token) = store
            .create_token(
                &Granted::for_operator(&user.id),
                "test",
                TokenScopes::Scoped(
                    ScopeSet::parse("sqlite:read sqlite:write val:read val:write").expect("scopes"),
                ),
                None,
            )
            .expect("token");
        Cluster {
            database,
            store,
            user,
            token: token.expose().to_owned(),
            _dir: dir,
        }
    }

    async fn nodes(&self, specs: &[(&str, usize)], lease: &str) -> Vec<Node> {
        let mut nodes: Vec<Node> = specs
            .iter()
            .map(|(id, runs)| Node::start(&self.database, id, lease, *runs))
            .collect();
        for node in &mut nodes {
            node.ready().await;
        }
        nodes
    }

    fn home(&self) -> valet_store::SqliteHome {
        self.store
            .sqlite_home(&self.user.id)
            .expect("read the home")
            .expect("a home")
    }
}

/// `POST {node}/v1/sqlite/{call}` with the user's token: status, JSON body
/// and Retry-After.
async fn sqlite(node: &str, token: &str, call: &str, body: Value) -> (u16, Value, Option<u64>) {
    let response = reqwest::Client::new()
        .post(format!("{node}/v1/sqlite/{call}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("sqlite request");
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status, response.json().await.unwrap_or(Value::Null), retry)
}

async fn rows(node: &str, token: &str, sql: &str) -> Value {
    let (status, body, _) = sqlite(node, token, "execute", json!({ "statement": sql })).await;
    assert_eq!(status, 200, "{sql} through {node}: {body}");
    body["rows"].clone()
}

const NOTES: &str = "SELECT body FROM notes ORDER BY id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_database_lives_on_one_node_and_answers_through_every_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::new();
    // a runs no queued runs, so the val's run below (and its key) is on
    // another node, whose calls are forwarded to a.
    let nodes = cluster
        .nodes(&[("node_a", 0), ("node_b", 2), ("node_c", 2)], "5s")
        .await;
    let (a, b, c) = (&nodes[0].url, &nodes[1].url, &nodes[2].url);
    let token = &cluster.token;
    let (status, body, _) = sqlite(
        a,
        token,
        "batch",
        json!({"statements": [
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
            {"sql": "INSERT INTO notes (body) VALUES (?)", "args": ["from a"]},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", nodes[0].log());
    assert_eq!(cluster.home().node_id.as_deref(), Some("node_a"));
    assert_eq!(rows(b, token, NOTES).await, json!([["from a"]]));
    assert_eq!(rows(c, token, NOTES).await, json!([["from a"]]));
    let (status, body, _) = sqlite(
        c,
        token,
        "execute",
        json!({"statement": {"sql": "INSERT INTO notes (body) VALUES (:b)", "args": {"b": "from c"}}}),
    )
    .await;
    assert_eq!((status, &body["rowsAffected"]), (200, &json!(1)), "{body}");
    assert_eq!(rows(a, token, NOTES).await, json!([["from a"], ["from c"]]));
    // A scope the caller lacks is refused by the home, as on one machine.
    let (_, read_only) = cluster
        .store
        .create_token(
            &Granted::for_operator(&cluster.user.id),
            "read only",
            TokenScopes::Scoped(ScopeSet::parse("sqlite:read").expect("scopes")),
            None,
        )
        .expect("token");
    let (status, body, _) = sqlite(
        b,
        read_only.expose(),
        "execute",
        json!({"statement": "DELETE FROM notes"}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["required"].as_str()),
        (403, Some("sqlite:write")),
        "{body}"
    );

    // A run's key is checked by the run's own node (not a), which forwards.
    let val = cluster
        .store
        .create_val(
            &Granted::for_operator(&cluster.user.id),
            &GrantedSet::for_operator(&cluster.user.id, ScopeSet::all()),
            NewVal {
                name: "note".into(),
                kind: ValKind::Script,
                code: r#"
import { sqlite } from "https://esm.town/v/std/sqlite";
const before = await sqlite.execute("SELECT count(*) FROM notes");
await sqlite.execute({ sql: "INSERT INTO notes (body) VALUES (?)", args: ["from a run"] });
console.log("notes before", before.rows[0][0]);
"#
                .into(),
                scopes: ScopeSet::parse("sqlite:read sqlite:write").expect("scopes"),
                env: BTreeMap::new(),
                timeout_ms: 30_000,
                schedule: None,
            },
        )
        .expect("val")
        .id;
    let out: Value = reqwest::Client::new()
        .post(format!("{b}/v1/vals/{val}/run"))
        .bearer_auth(token)
        .send()
        .await
        .expect("run")
        .json()
        .await
        .expect("run json");
    assert_eq!(out["outcome"], "succeeded", "{out}");
    assert!(
        out["logs"]
            .as_str()
            .unwrap_or_default()
            .contains("notes before 2"),
        "{out}"
    );
    let run_id = out["run_id"].as_str().expect("run id").to_owned();
    let run = cluster
        .store
        .run_by_id(&run_id)
        .expect("read")
        .expect("run");
    assert_ne!(run.node.as_deref(), Some("node_a"), "a runs no queued runs");
    assert_eq!(
        rows(a, token, NOTES).await,
        json!([["from a"], ["from c"], ["from a run"]])
    );
    // The home audited the run's forwarded calls under the run.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used = cluster
            .store
            .scopes_used_by_runs(std::slice::from_ref(&run_id))
            .expect("audit");
        if used == ScopeSet::parse("sqlite:read sqlite:write").expect("scopes") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run's sqlite use was not audited: {used:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let holders: Vec<&str> = nodes
        .iter()
        .filter(|n| n.has_database(&cluster.user))
        .map(|n| n.id.as_str())
        .collect();
    assert_eq!(
        holders,
        ["node_a"],
        "the database file is on its home alone"
    );

    // What a forward costs: a one-row SELECT through the home, and through
    // a node that forwards it there (sequential; a debug build prints these).
    let one_row = "SELECT body FROM notes WHERE id = 1";
    let mut p50 = Vec::new();
    for (label, node) in [("home", a), ("forwarded", b)] {
        for _ in 0..20 {
            rows(node, token, one_row).await;
        }
        let mut times = Vec::with_capacity(300);
        for _ in 0..300 {
            let began = Instant::now();
            rows(node, token, one_row).await;
            times.push(began.elapsed());
        }
        times.sort();
        p50.push(times[150]);
        eprintln!(
            "one-row SELECT through the {label} node: p50 {:?}, p90 {:?} (300 calls)",
            times[150], times[270]
        );
    }
    eprintln!("a forward adds {:?} at p50", p50[1].saturating_sub(p50[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_home_is_taken_over_only_after_its_lease_runs_out_with_a_higher_fence() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::new();
    // The lease is long enough that a survivor starved of CPU for a few
    // seconds is not taken for dead, and that at the kill most of the
    // killed node's lease is still to run.
    let mut nodes = cluster
        .nodes(&[("node_a", 1), ("node_b", 1), ("node_c", 1)], "6s")
        .await;
    let token = cluster.token.clone();
    let (b, c) = (nodes[1].url.clone(), nodes[2].url.clone());
    let (status, body, _) = sqlite(
        &nodes[0].url,
        &token,
        "execute",
        json!({"statement": "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let before = cluster.home();
    assert_eq!(before.node_id.as_deref(), Some("node_a"));
    rows(&b, &token, NOTES).await;

    nodes[0].kill();
    let killed = Instant::now();
    let probe = json!({"statement": "SELECT count(*) FROM sqlite_master WHERE name = 'notes'"});
    let (status, body, retry) = sqlite(&b, &token, "execute", probe.clone()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("sqlite_home_unavailable")),
        "right after the kill the lease still holds: {body}"
    );
    assert!(
        retry.is_some_and(|s| (1..=6).contains(&s)),
        "Retry-After {retry:?}"
    );
    // Until the lease runs out, every call is refused (never run
    // elsewhere); then a survivor takes the home over.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (refused, taken_after) = {
        let mut refused = 1;
        loop {
            let (status, body, retry) = sqlite(&b, &token, "execute", probe.clone()).await;
            if status == 200 {
                // The new home starts from the file on its own disk, which
                // has no table: on separate disks the old data is not here.
                assert_eq!(body["rows"], json!([[0]]), "{body}");
                break (refused, killed.elapsed());
            }
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (503, Some("sqlite_home_unavailable")),
                "{body}"
            );
            assert!(retry.is_some(), "a 503 says when to retry");
            refused += 1;
            assert!(Instant::now() < deadline, "no survivor ever took the home");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let after = cluster.home();
    assert_eq!(
        after.node_id.as_deref(),
        Some("node_b"),
        "the caller's node took it"
    );
    assert!(after.fence > before.fence, "{before:?} then {after:?}");
    // Through the other survivor: forwarded to the new home.
    let (status, body, _) = sqlite(
        &c,
        &token,
        "execute",
        json!({"statement": "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rows(&b, &token, NOTES).await, json!([]));
    assert!(nodes[1].has_database(&cluster.user) && !nodes[2].has_database(&cluster.user));
    eprintln!(
        "home killed: {refused} calls refused with 503, taken over {taken_after:?} after SIGKILL (lease 6 s), fence {} -> {}",
        before.fence, after.fence
    );
}

/// A forward of `statement` to `home` as a node would sign it.
fn forward(
    cluster: &Cluster,
    home: &valet_store::SqliteHome,
    statement: &str,
    expires_ms: i64,
) -> Forward {
    Forward {
        claims: ForwardClaims {
            call: "execute".into(),
            node: home.node_id.clone().expect("held"),
            user: cluster.user.id.clone(),
            token: Some("tok_made_up".into()),
            run: None,
            val: None,
            scopes: vec!["sqlite:read".into(), "sqlite:write".into()],
            fence: home.fence,
            expires_ms,
            nonce: valet_api::forward::nonce().expect("nonce"),
        },
        request: json!({ "statement": statement }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_route_takes_only_signed_fresh_forwards_and_never_a_token() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = Cluster::new();
    let nodes = cluster.nodes(&[("node_a", 1), ("node_b", 1)], "5s").await;
    let (a, b) = (&nodes[0].url, &nodes[1].url);
    let token = &cluster.token;
    rows(
        a,
        token,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
    )
    .await;
    let home = cluster.home();
    let key = ForwardKey::new(
        &cluster
            .store
            .server_secret("sqlite-forward")
            .expect("secret"),
    )
    .expect("key");
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>, signature: Option<String>, bearer: Option<&str>| {
        let mut request = client
            .post(format!("{a}/internal/sqlite/execute"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(signature) = signature {
            request = request.header(SIGNATURE_HEADER, signature);
        }
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.expect("post");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_owned(),
                body,
            )
        }
    };
    let insert = |what: &str| format!("INSERT INTO notes (body) VALUES ('{what}')");
    let now = valet_store::time::now_ms();

    let (body, _) = forward(&cluster, &home, &insert("unsigned"), now + FORWARD_TTL_MS)
        .seal(&key)
        .expect("seal");
    assert_eq!(post(body, None, None).await.0, 401, "unsigned");

    let forged = ForwardKey::new(b"not the cluster's secret").expect("key");
    let (body, signature) = forward(&cluster, &home, &insert("forged"), now + FORWARD_TTL_MS)
        .seal(&forged)
        .expect("seal");
    assert_eq!(
        post(body, Some(signature), None).await.0,
        401,
        "bad signature"
    );

    let (body, signature) = forward(&cluster, &home, &insert("expired"), now - 1_000)
        .seal(&key)
        .expect("seal");
    let (status, code, _) = post(body, Some(signature), None).await;
    assert_eq!((status, code.as_str()), (401, "invalid_forward"), "expired");

    // A user's API token, alone or beside a valid signature.
    let user_body = serde_json::to_vec(&json!({ "statement": insert("token") })).expect("json");
    assert_eq!(
        post(user_body, None, Some(token)).await.0,
        401,
        "a user's token"
    );
    let (body, signature) = forward(
        &cluster,
        &home,
        &insert("token and signature"),
        now + FORWARD_TTL_MS,
    )
    .seal(&key)
    .expect("seal");
    assert_eq!(
        post(body, Some(signature), Some(token)).await.0,
        401,
        "a token beside a signature"
    );

    // For another node, or with another fence: not executed here.
    let mut other = forward(&cluster, &home, &insert("for b"), now + FORWARD_TTL_MS);
    other.claims.node = "node_b".into();
    let (body, signature) = other.seal(&key).expect("seal");
    assert_eq!(
        post(body, Some(signature), None).await.0,
        401,
        "for another node"
    );
    let mut stale = forward(
        &cluster,
        &home,
        &insert("stale fence"),
        now + FORWARD_TTL_MS,
    );
    stale.claims.fence = home.fence + 1;
    let (body, signature) = stale.seal(&key).expect("seal");
    let (status, code, _) = post(body, Some(signature), None).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "sqlite_home_moved"),
        "another fence"
    );

    // A good forward runs once; its replay is refused.
    let (body, signature) = forward(&cluster, &home, &insert("signed"), now + FORWARD_TTL_MS)
        .seal(&key)
        .expect("seal");
    let (status, _, answer) = post(body.clone(), Some(signature.clone()), None).await;
    assert_eq!(status, 200, "{answer}");
    let (status, code, _) = post(body, Some(signature), None).await;
    assert_eq!(
        (status, code.as_str()),
        (401, "invalid_forward"),
        "replayed"
    );

    assert_eq!(rows(b, token, NOTES).await, json!([["signed"]]));

    // One machine has no internal route at all.
    let single = crate::support::Server::start().await;
    let response = single
        .client
        .post(format!("{}/internal/sqlite/execute", single.url))
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 404);
    single.stop().await;
}
