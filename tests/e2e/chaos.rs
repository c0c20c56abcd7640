//! Faults (issue #17): `valet serve` SIGKILLed under concurrent blob,
//! SQLite and run load, then restarted and checked (integrity, every
//! acknowledged write, the blob index against the files, no run left
//! `running`, no stray Deno); the overwrite case; a disk that fills up;
//! the SMTP relay down and back. Each test is bounded by counts and
//! generous deadlines, never by the machine's speed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use valet_core::{Granted, GrantedSet, ScopeSet, TokenScopes};
use valet_store::{BatchMode, BlobKey, NewVal, Outcome, SqlStatement, Store, ValKind};

use crate::support::{Options, Server, Smtp, free_port};

/// A `valet serve` child process on its own port.
struct Valet {
    child: Child,
    url: String,
    data_dir: PathBuf,
}

impl Valet {
    /// Starts `valet serve` on `data_dir` and waits until it answers.
    async fn start(data_dir: &Path, token: &str) -> Valet {
        let port = free_port();
        // Beside the data dir's parent, so a test's full disk cannot lose it.
        let log_path = std::env::temp_dir().join(format!("valet-chaos-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_valet"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--vals-listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start valet serve");
        let valet = Valet {
            child,
            url: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.to_owned(),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = client
                .get(format!("{}/v1/me", valet.url))
                .bearer_auth(token)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return valet;
            }
            assert!(Instant::now() < deadline, "valet serve did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, then waits until no Deno process of this data dir is left.
    async fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deno_processes_of(&self.data_dir);
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Deno processes outlived their valet: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "valet serve exited with {status}");
        assert!(deno_processes_of(&self.data_dir).is_empty());
    }
}

impl Drop for Valet {
    /// A failed assertion must not leave a server running behind the test.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes whose command line names `data_dir` (Deno runs get their
/// bootstrap from it), other than valet itself.
fn deno_processes_of(data_dir: &Path) -> Vec<String> {
    let needle = data_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (text.contains(&needle) && !text.contains(" serve ")).then_some(text)
        })
        .collect()
}

/// A data dir with a user, an all-scopes token and a script val that
/// writes a blob and a row; made with the store directly, before any
/// server runs.
struct Setup {
    user_id: String,
    token: String,
    val_id: String,
}

fn setup(data_dir: &Path) -> Setup {
    let store = Store::open(data_dir).expect("open");
    let user = store
        .create_user("ada", "ada@example.com", None)
        .expect("user");
    let (_, token) = store
        .create_token(
            &Granted::for_operator(&user.id),
            "chaos",
            TokenScopes::Scoped(ScopeSet::all()),
            None,
        )
        .expect("token");
    let val = store
        .create_val(
            &Granted::for_operator(&user.id),
            &GrantedSet::for_operator(&user.id, ScopeSet::all()),
            NewVal {
                name: "writer".into(),
                kind: ValKind::Script,
                code: r#"
import { blob } from "https://esm.town/v/std/blob";
import { sqlite } from "https://esm.town/v/std/sqlite";
await blob.set(`run-${crypto.randomUUID()}`, "x".repeat(4096));
await sqlite.execute("CREATE TABLE IF NOT EXISTS runs (at INTEGER)");
await sqlite.execute({ sql: "INSERT INTO runs VALUES (?)", args: [Date.now()] });
await new Promise((r) => setTimeout(r, 200));
"#
                .into(),
                scopes: ScopeSet::default_val(),
                env: Default::default(),
                timeout_ms: 10_000,
                schedule: None,
            },
        )
        .expect("val");
    Setup {
        user_id: user.id,
        token: token.expose().to_owned(),
        val_id: val.id,
    }
}

/// Writes a server acknowledged, to look for after the kill.
#[derive(Default)]
struct Acked {
    blobs: Mutex<HashMap<String, Vec<u8>>>,
    rows: Mutex<Vec<i64>>,
    count: AtomicUsize,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Blob, SQLite and run load until the server stops answering.
fn load(
    valet: &Valet,
    setup: &Setup,
    round: usize,
    acked: &Arc<Acked>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..2 {
        let (c, url, token, acked) = (
            client(),
            valet.url.clone(),
            setup.token.clone(),
            acked.clone(),
        );
        tasks.spawn(async move {
            for i in 0.. {
                let key = format!("r{round}-t{task}-{i}");
                let body = key.as_bytes().repeat(1 + (i * 131) % 2000);
                let Ok(r) = c
                    .post(format!("{url}/v1/blob/{key}"))
                    .bearer_auth(&token)
                    .body(body.clone())
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() != 201 {
                    return;
                }
                acked.blobs.lock().expect("lock").insert(key, body);
                acked.count.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    {
        let (c, url, token, acked) = (
            client(),
            valet.url.clone(),
            setup.token.clone(),
            acked.clone(),
        );
        tasks.spawn(async move {
            for i in 0.. {
                let v = (round * 1_000_000 + i) as i64;
                let statements = json!({"statements": [
                    "CREATE TABLE IF NOT EXISTS t (v INTEGER PRIMARY KEY)",
                    {"sql": "INSERT INTO t VALUES (?)", "args": [v]},
                ]});
                let Ok(r) = c
                    .post(format!("{url}/v1/sqlite/batch"))
                    .bearer_auth(&token)
                    .json(&statements)
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() != 200 {
                    return;
                }
                acked.rows.lock().expect("lock").push(v);
                acked.count.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    for _ in 0..2 {
        let (c, url, token, id) = (
            client(),
            valet.url.clone(),
            setup.token.clone(),
            setup.val_id.clone(),
        );
        tasks.spawn(async move {
            while c
                .post(format!("{url}/v1/vals/{id}/run"))
                .bearer_auth(&token)
                .send()
                .await
                .is_ok()
            {}
        });
    }
    tasks
}

/// Waits until `acked` grew by `n` since `from` (the server is under load).
async fn until_acked(acked: &Acked, from: usize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.count.load(Ordering::SeqCst) < from + n {
        assert!(Instant::now() < deadline, "the load made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn running_runs(store: &Store, user_id: &str, val_id: &str) -> Vec<String> {
    store
        .runs_of_val(&Granted::for_operator(user_id), val_id, 100_000)
        .expect("runs")
        .into_iter()
        .filter(|r| r.outcome == Outcome::Running)
        .map(|r| r.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let setup = setup(&data);
    let acked = Arc::new(Acked::default());
    for round in 0..3 {
        let valet = Valet::start(&data, &setup.token).await;
        let from = acked.count.load(Ordering::SeqCst);
        let mut tasks = load(&valet, &setup, round, &acked);
        // Kill at a different point of the load each round.
        until_acked(&acked, from, 20 + round * 37).await;
        valet.kill().await;
        while tasks.join_next().await.is_some() {}
    }
    let valet = Valet::start(&data, &setup.token).await;
    let store = Store::open(&data).expect("open beside the server");
    assert_eq!(
        store.integrity_problems().expect("check"),
        Vec::<String>::new()
    );
    let blobs = acked.blobs.lock().expect("lock").clone();
    assert!(blobs.len() >= 20);
    for (key, body) in &blobs {
        let k = BlobKey::parse(key).expect("key");
        let stored = store
            .blob_get(&Granted::for_operator(&setup.user_id), &k)
            .expect("get");
        assert_eq!(
            stored.as_deref(),
            Some(body.as_slice()),
            "acknowledged blob {key}"
        );
    }
    let rows = acked.rows.lock().expect("lock").clone();
    let (results, _) = store
        .user_dbs()
        .execute(
            &mut valet_store::HeldSqliteGrants::new(
                Some(Granted::for_operator(&setup.user_id)),
                None,
            )
            .expect("proof"),
            &[SqlStatement::Text("SELECT v FROM t".into())],
            BatchMode::Read,
        )
        .expect("select");
    let stored: std::collections::HashSet<i64> = results[0]
        .rows
        .iter()
        .filter_map(|r| match r[0] {
            valet_store::SqlValue::Integer(v) => Some(v),
            _ => None,
        })
        .collect();
    for v in &rows {
        assert!(stored.contains(v), "acknowledged row {v} is missing");
    }
    assert_eq!(
        running_runs(&store, &setup.user_id, &setup.val_id),
        Vec::<String>::new()
    );
    drop(store);
    valet.stop();
}

/// The overwrite case of the issue: four writers, each overwriting its ten
/// of forty keys with bodies up to 200 KB, killed several times. After each
/// restart every key reads a whole body whose size the index lists, the
/// last acknowledged one or the one in flight, and no file is outside the
/// index.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overwrites_killed_mid_write_keep_index_and_files_in_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let setup = setup(&data);
    // key -> (the body known to be stored, the body in flight), as
    // sequence numbers.
    let bodies: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    for round in 0..4u64 {
        let valet = Valet::start(&data, &setup.token).await;
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..4u64 {
            let (c, url, token, bodies, count) = (
                client(),
                valet.url.clone(),
                setup.token.clone(),
                bodies.clone(),
                count.clone(),
            );
            let start = round * 10_000_000 + writer * 1_000_000;
            tasks.spawn(async move {
                for n in 0u64.. {
                    let s = start + n;
                    let key = format!("k{}", writer * 10 + n % 10);
                    bodies
                        .lock()
                        .expect("lock")
                        .entry(key.clone())
                        .or_insert((u64::MAX, s))
                        .1 = s;
                    let Ok(r) = c
                        .post(format!("{url}/v1/blob/{key}"))
                        .bearer_auth(&token)
                        .body(body_for(s))
                        .send()
                        .await
                    else {
                        return;
                    };
                    if r.status() != 201 {
                        return;
                    }
                    bodies.lock().expect("lock").insert(key, (s, s));
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let from = count.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while count.load(Ordering::SeqCst) < from + 30 + round as usize * 17 {
            assert!(Instant::now() < deadline, "no progress");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        valet.kill().await;
        while tasks.join_next().await.is_some() {}

        // Reopening sweeps; then index and files agree.
        let store = Store::open(&data).expect("reopen");
        assert_eq!(
            store.integrity_problems().expect("check"),
            Vec::<String>::new(),
            "round {round}"
        );
        let listed: HashMap<String, u64> = store
            .blob_list(&Granted::for_operator(&setup.user_id), "k")
            .expect("list")
            .into_iter()
            .map(|m| (m.key, m.size))
            .collect();
        for (key, (stored, in_flight)) in bodies.lock().expect("lock").iter_mut() {
            let body = store
                .blob_get(
                    &Granted::for_operator(&setup.user_id),
                    &BlobKey::parse(key).expect("key"),
                )
                .expect("get");
            let Some(body) = body else {
                assert_eq!(*stored, u64::MAX, "{key}: an acknowledged key is missing");
                continue;
            };
            let s = seq_of(&body).unwrap_or_else(|| panic!("{key} holds a torn body"));
            assert!(
                s == *stored || s == *in_flight,
                "{key}: body {s}, acknowledged {stored}, in flight {in_flight}"
            );
            assert_eq!(
                listed.get(key),
                Some(&(body.len() as u64)),
                "{key}: listed size"
            );
            *stored = s;
            *in_flight = s;
        }
    }
}

/// A body that names its sequence number and length, up to 200 KB.
fn body_for(s: u64) -> Vec<u8> {
    let len = 16 + (s as usize * 7919) % (200 * 1024);
    let mut body = format!("{s:016}").into_bytes();
    body.resize(len, (s % 251) as u8);
    body
}

fn seq_of(body: &[u8]) -> Option<u64> {
    let s: u64 = std::str::from_utf8(body.get(..16)?).ok()?.parse().ok()?;
    (body_for(s) == body).then_some(s)
}

/// A tmpfs mounted for one test; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed: the disk-full test needs root (CI and the dev machines run as root)"
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_with_507_and_recovers_when_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = Tmpfs::mount(&dir.path().join("disk"), "24m");
    let data = mount.0.join("data");
    let setup = setup(&data);
    let valet = Valet::start(&data, &setup.token).await;
    let c = client();
    let put = |key: String, body: Vec<u8>| {
        let c = c.clone();
        let (url, token) = (valet.url.clone(), setup.token.clone());
        async move {
            c.post(format!("{url}/v1/blob/{key}"))
                .bearer_auth(&token)
                .body(body)
                .send()
                .await
                .expect("put")
        }
    };
    // Fill the disk with 1 MiB blobs until a write is refused.
    let mut stored = Vec::new();
    let refusal = loop {
        assert!(stored.len() < 64, "24 MiB never filled up");
        let key = format!("fill-{}", stored.len());
        let r = put(key.clone(), vec![b'f'; 1 << 20]).await;
        if r.status() != 201 {
            break r;
        }
        stored.push(key);
    };
    assert_eq!(refusal.status(), 507);
    let body: serde_json::Value = refusal.json().await.expect("json");
    assert_eq!(body["error"]["code"], "insufficient_storage", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("disk is full")),
        "{body}"
    );
    // SQLite writes are refused the same way once nothing fits.
    let big = json!({"statements": [
        "CREATE TABLE IF NOT EXISTS filler (b BLOB)",
        {"sql": "INSERT INTO filler VALUES (zeroblob(4000000))", "args": []},
    ]});
    let r = c
        .post(format!("{}/v1/sqlite/batch", valet.url))
        .bearer_auth(&setup.token)
        .json(&big)
        .send()
        .await
        .expect("sqlite");
    assert_eq!(r.status(), 507, "{:?}", r.text().await);
    // Reads keep working.
    for key in &stored {
        let r = c
            .get(format!("{}/v1/blob/{key}", valet.url))
            .bearer_auth(&setup.token)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.expect("body").len(), 1 << 20);
    }
    // Freed space is usable again (a few blobs' worth: the database's own
    // pages took some of the room while the disk was full).
    assert!(stored.len() > 8, "only {} blobs fitted", stored.len());
    for key in stored.iter().take(8) {
        let r = c
            .delete(format!("{}/v1/blob/{key}", valet.url))
            .bearer_auth(&setup.token)
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), 204);
    }
    assert_eq!(put("after".into(), vec![b'a'; 1 << 20]).await.status(), 201);
    valet.stop();
    let store = Store::open(&data).expect("reopen");
    assert_eq!(
        store.integrity_problems().expect("check"),
        Vec::<String>::new()
    );
    let listed = store
        .blob_list(&Granted::for_operator(&setup.user_id), "")
        .expect("list");
    assert_eq!(listed.len(), stored.len() - 8 + 1);
    drop(store);
    drop(mount);
}

/// A TCP relay in front of the SMTP server that can be taken down (every
/// connection is closed at once, before the greeting) and brought back.
struct Switch {
    port: u16,
    up: Arc<AtomicBool>,
}

impl Switch {
    async fn start(target: u16) -> Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Switch { port, up }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_queued_while_the_relay_is_down_arrives_once_when_it_is_back() {
    let smtp = Smtp::start();
    let switch = Switch::start(smtp.port).await;
    let server = Server::start_with(Options {
        smtp: Some(format!("smtp://127.0.0.1:{}", switch.port)),
        ..Options::default()
    })
    .await;
    let ada = server.user("ada");
    let token = server.token(&ada, ScopeSet::all());
    let send = |subject: String| {
        let (c, url, token) = (server.client.clone(), server.url.clone(), token.clone());
        async move {
            let r = c
                .post(format!("{url}/v1/email"))
                .bearer_auth(&token)
                .json(&json!({"subject": subject, "text": "body"}))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 202);
        }
    };
    for i in 0..2 {
        send(format!("before-{i}")).await;
    }
    assert_eq!(smtp.wait_for(2).await.len(), 2);

    switch.up.store(false, Ordering::SeqCst);
    for i in 0..4 {
        send(format!("during-{i}")).await;
    }
    // Every message sent during the outage failed at least once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let emails = server
            .store
            .list_emails(&Granted::for_operator(&ada.id), 100)
            .expect("list");
        let tried = emails
            .iter()
            .filter(|e| e.message.subject().starts_with("during-") && e.attempts >= 1)
            .count();
        if tried == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mailer never tried: {emails:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(smtp.messages().len(), 2, "nothing got through while down");

    switch.up.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    let emails = loop {
        let emails = server
            .store
            .list_emails(&Granted::for_operator(&ada.id), 100)
            .expect("list");
        if emails
            .iter()
            .all(|e| e.status == valet_store::OutboxStatus::Sent)
        {
            break emails;
        }
        assert!(Instant::now() < deadline, "not all sent: {emails:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(emails.len(), 6);
    let messages = smtp.messages();
    for subject in [
        "before-0", "before-1", "during-0", "during-1", "during-2", "during-3",
    ] {
        let copies = messages
            .iter()
            .filter(|m| {
                m.contains(&format!("Subject: {subject}\n"))
                    || m.contains(&format!("Subject: {subject}\r\n"))
            })
            .count();
        assert_eq!(copies, 1, "{subject} arrived {copies} times");
    }
    assert_eq!(messages.len(), 6);
    server.stop().await;
}
