//! System benchmarks that print tables: API latency under load (with the
//! share of auth), run overhead against bare `deno run`, and the scope
//! migration at 100,000 tokens. Run with `just bench` (release build).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{median, percentile, rss_of};

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use valet_core::{ApiToken, Granted, GrantedSet, Scope, ScopeSet, TokenScopes};
use valet_server::{Host, HostConfig};
use valet_store::{AuditEvent, BlobKey, MigrationOptions, Principal, Store, time};

async fn load(
    client: &reqwest::Client,
    make: Arc<dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync>,
    clients: usize,
    per_client: usize,
) -> (f64, Duration, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = client.clone();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let t = Instant::now();
                let r = make(&client).send().await.expect("send");
                assert!(r.status().is_success(), "{}", r.status());
                r.bytes().await.expect("body");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    all.sort();
    (
        all.len() as f64 / elapsed.as_secs_f64(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    )
}

async fn api_bench() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let user = store
        .create_user("bench", "bench@example.com", None)
        .unwrap();
    let (_, token) = store
        .create_token(
            &Granted::for_operator(&user.id),
            "bench",
            TokenScopes::Scoped(ScopeSet::all()),
            None,
        )
        .unwrap();
    store
        .blob_put(
            &Granted::for_operator(&user.id),
            &BlobKey::parse("k").unwrap(),
            &[7u8; 1024],
            u64::MAX,
        )
        .unwrap();
    let mut config = HostConfig::new("127.0.0.1:0".parse().unwrap());
    config.cron = false;
    let host = Host::start(store.clone(), config).await.unwrap();
    let base = format!("http://{}", host.addr);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let token = token.expose().to_owned();
    client
        .post(format!("{base}/v1/sqlite/execute"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"statement": "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"}))
        .send()
        .await
        .unwrap();
    client
        .post(format!("{base}/v1/sqlite/execute"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"statement": "INSERT INTO t VALUES (1, 'one')"}))
        .send()
        .await
        .unwrap();

    println!("\n## API under load (1 KiB blob GET, one-row SQLite SELECT; API token auth)\n");
    println!("| request | clients | requests/s | p50 | p99 |");
    println!("|---|---|---|---|---|");
    let (b, t) = (base.clone(), token.clone());
    let blob: Arc<dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync> =
        Arc::new(move |c| c.get(format!("{b}/v1/blob/k")).bearer_auth(&t));
    let (b, t) = (base.clone(), token.clone());
    let sql: Arc<dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync> = Arc::new(
        move |c| {
            c.post(format!("{b}/v1/sqlite/execute")).bearer_auth(&t)
            .json(&serde_json::json!({"statement": {"sql": "SELECT v FROM t WHERE id = ?", "args": [1]}}))
        },
    );
    let b = base.clone();
    let jwks: Arc<dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync> =
        Arc::new(move |c| c.get(format!("{b}/.well-known/jwks.json")));
    let mut blob_p50_1 = Duration::ZERO;
    let mut jwks_p50_1 = Duration::ZERO;
    for (name, make) in [
        ("GET /v1/blob/k", blob.clone()),
        ("POST /v1/sqlite/execute", sql.clone()),
        ("GET jwks (no auth)", jwks.clone()),
    ] {
        load(&client, make.clone(), 4, 200).await; // warm up
        for clients in [1, 32] {
            let per = if clients == 1 { 2000 } else { 200 };
            let (rps, p50, p99) = load(&client, make.clone(), clients, per).await;
            if clients == 1 && name.starts_with("GET /v1/blob") {
                blob_p50_1 = p50;
            }
            if clients == 1 && name.starts_with("GET jwks") {
                jwks_p50_1 = p50;
            }
            println!("| {name} | {clients} | {rps:.0} | {p50:.2?} | {p99:.2?} |");
        }
    }
    // Auth alone, as the extractor does it: parse, hash, and the cached
    // record (the database is read on a miss only).
    let n = 20_000;
    let started = Instant::now();
    for _ in 0..n {
        let parsed = ApiToken::parse(&token).unwrap();
        let hash = parsed.hash();
        match store.token_cache().get(&hash) {
            Some(record) => assert!(!record.is_revoked()),
            None => {
                store
                    .call(move |s| s.token_by_hash(&hash))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
    }
    let auth = started.elapsed() / n;
    println!(
        "\nAPI-token auth alone (parse + SHA-256 + cached record): {auth:.2?} per request, \
         {:.1}% of a 1-client blob GET (p50 {blob_p50_1:.2?}); an unauthenticated GET of the JWKS takes {jwks_p50_1:.2?}.",
        auth.as_secs_f64() * 100.0 / blob_p50_1.as_secs_f64()
    );
    host.shutdown().await;
}

async fn run_bench() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trivial.ts");
    std::fs::write(&file, "console.log('hello');\n").unwrap();
    let deno = valet_runtime::find_deno().unwrap();
    let valet = env!("CARGO_BIN_EXE_valet");
    let data = dir.path().join("data");
    let time_cmd = |cmd: &mut Command| {
        let t = Instant::now();
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed()
    };
    // Warm both caches once.
    time_cmd(Command::new(&deno).args(["run", "--quiet"]).arg(&file));
    time_cmd(
        Command::new(valet)
            .arg("--data-dir")
            .arg(&data)
            .arg("run")
            .arg(&file),
    );
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        bare.push(time_cmd(
            Command::new(&deno).args(["run", "--quiet"]).arg(&file),
        ));
        ours.push(time_cmd(
            Command::new(valet)
                .arg("--data-dir")
                .arg(&data)
                .arg("run")
                .arg(&file),
        ));
    }
    let (bare, ours) = (median(bare), median(ours));
    println!("\n## Run overhead (median of 15, same trivial file)\n");
    println!("| what | median | ratio |");
    println!("|---|---|---|");
    println!("| `deno run` (bare, no sandbox) | {bare:.1?} | 1.00 |");
    println!(
        "| `valet run` (new process: open store, start API, mint key, sandboxed run, record) | {ours:.1?} | {:.2} |",
        ours.as_secs_f64() / bare.as_secs_f64()
    );

    // In-process: the supervisor's own cost per run, without valet's process start.
    let store = Store::open(&dir.path().join("hosted")).unwrap();
    let user = store
        .create_user("bench", "bench@example.com", None)
        .unwrap();
    let mut config = HostConfig::new("127.0.0.1:0".parse().unwrap());
    config.cron = false;
    config.warm_pool = 2;
    let host = Host::start(store.clone(), config).await.unwrap();
    let spec = valet_runtime::RunSpec {
        user_id: user.id.clone(),
        val_id: None,
        kind: valet_store::ValKind::Script,
        source: valet_runtime::Source::File(file.clone()),
        scopes: ScopeSet::default_val(),
        env: Default::default(),
        timeout: Duration::from_secs(10),
        trigger: "bench",
        last_run_at: None,
    };
    host.supervisor.run(spec.clone()).await.unwrap();
    let mut warm = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        host.supervisor.run(spec.clone()).await.unwrap();
        warm.push(t.elapsed());
    }
    let warm = median(warm);
    println!(
        "| supervisor run in a running `valet serve`, cold | {warm:.1?} | {:.2} |",
        warm.as_secs_f64() / bare.as_secs_f64()
    );

    // The same code as a stored val: claimed by a warm process.
    let stored = store
        .create_val(
            &Granted::for_operator(&user.id),
            &GrantedSet::for_operator(&user.id, ScopeSet::all()),
            valet_store::NewVal {
                name: "trivial".into(),
                kind: valet_store::ValKind::Script,
                code: "console.log('hello');\n".into(),
                scopes: ScopeSet::default_val(),
                env: Default::default(),
                timeout_ms: 10_000,
                schedule: None,
            },
        )
        .unwrap();
    let warm_spec = valet_runtime::RunSpec::for_val(&stored, "bench");
    host.supervisor.run(warm_spec.clone()).await.unwrap();
    let mut hot = Vec::new();
    for _ in 0..15 {
        // Give the pool time to refill, as between real requests.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t = Instant::now();
        host.supervisor.run(warm_spec.clone()).await.unwrap();
        hot.push(t.elapsed());
    }
    let hot = median(hot);
    println!(
        "| supervisor run of a stored val, warm pool | {hot:.1?} | {:.2} |",
        hot.as_secs_f64() / bare.as_secs_f64()
    );

    // One http request through valet serve: a fresh run per request.
    let code = "export default (req: Request) => new Response('hi');\n";
    store
        .create_val(
            &Granted::for_operator(&user.id),
            &GrantedSet::for_operator(&user.id, ScopeSet::all()),
            valet_store::NewVal {
                name: "hello".into(),
                kind: valet_store::ValKind::Http,
                code: code.into(),
                scopes: ScopeSet::default_val(),
                env: Default::default(),
                timeout_ms: 10_000,
                schedule: None,
            },
        )
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{}/bench/hello", host.vals_addr);
    client.get(&url).send().await.unwrap();
    let mut http = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "hi");
        http.push(t.elapsed());
    }
    let http = median(http);
    println!(
        "| one http request through `valet serve` (fresh run) | {http:.1?} | {:.2} |",
        http.as_secs_f64() / bare.as_secs_f64()
    );
    host.shutdown().await;
}

async fn memory_bench() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let user = store
        .create_user("bench", "bench@example.com", None)
        .unwrap();
    let mut config = HostConfig::new("127.0.0.1:0".parse().unwrap());
    config.cron = false;
    let host = Host::start(store.clone(), config).await.unwrap();
    let file = dir.path().join("idle.ts");
    std::fs::write(&file, "import { blob } from 'https://esm.town/v/std/blob';\nawait blob.set('k', 'v');\nawait new Promise((r) => setTimeout(r, 4000));\n").unwrap();
    // Runs read it as their own uid when valet runs as root.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let concurrent = 24;
    let mut runs = Vec::new();
    for _ in 0..concurrent {
        let supervisor = host.supervisor.clone();
        let spec = valet_runtime::RunSpec {
            user_id: user.id.clone(),
            val_id: None,
            kind: valet_store::ValKind::Script,
            source: valet_runtime::Source::File(file.clone()),
            scopes: ScopeSet::default_val(),
            env: Default::default(),
            timeout: Duration::from_secs(20),
            trigger: "bench",
            last_run_at: None,
        };
        runs.push(tokio::spawn(
            async move { supervisor.run(spec).await.unwrap() },
        ));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rss = rss_of(&dir.path().display().to_string());
    for r in runs {
        let out = r.await.unwrap();
        assert_eq!(
            out.outcome,
            valet_store::Outcome::Succeeded,
            "{}: {}",
            out.detail,
            out.logs
        );
    }
    let total: u64 = rss.iter().sum();
    let per = total / rss.len().max(1) as u64;
    let mem_total_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    println!("\n## Memory per run\n");
    println!(
        "{} concurrent runs (each holding a blob call's worth of state, then idle): {} Deno processes seen, \
         {:.1} MiB RSS each on average, {:.0} MiB in all. At that size this machine ({:.1} GiB) holds about {} \
         idle runs in memory (the 64-run default limit and the 2 cores bind long before).",
        concurrent,
        rss.len(),
        per as f64 / 1024.0,
        total as f64 / 1024.0,
        mem_total_kib as f64 / 1024.0 / 1024.0,
        mem_total_kib / per.max(1)
    );
    host.shutdown().await;
}

fn max_rss_kib() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    #[allow(unsafe_code)]
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init().ru_maxrss
    }
}

fn migration_bench() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let tokens = 100_000;
    let audit_rows = 1_000_000;
    let seeding = Instant::now();
    let mut users = Vec::new();
    for u in 0..1000 {
        users.push(
            store
                .create_user(&format!("u{u}"), &format!("u{u}@example.com"), None)
                .unwrap()
                .id,
        );
    }
    let mut ids = Vec::with_capacity(tokens);
    for i in 0..tokens {
        let (t, _) = store
            .create_token(
                &Granted::for_operator(&users[i % users.len()]),
                "legacy",
                TokenScopes::Legacy,
                None,
            )
            .unwrap();
        ids.push((users[i % users.len()].clone(), t.id));
    }
    let now = time::now_ms();
    let mut batch = Vec::with_capacity(10_000);
    for r in 0..audit_rows {
        let (user, token) = &ids[r % tokens];
        // 1 token in 100 has written vals recently.
        let scope = if r % tokens % 100 == 0 && r < tokens {
            Scope::VAL_WRITE
        } else {
            Scope::BLOB_READ
        };
        batch.push(AuditEvent {
            principal: Principal::Token {
                user_id: user.clone(),
                token_id: token.clone(),
            },
            scope,
            route: "seed".into(),
            at: now - (r as i64 % 1000) * 60_000,
        });
        if batch.len() == 10_000 {
            store.insert_audit_rows(&batch).unwrap();
            batch.clear();
        }
    }
    let seeded = seeding.elapsed();
    let rss_before = max_rss_kib();
    let started = Instant::now();
    let summary = store
        .migrate_scopes(&MigrationOptions::default(), |_, _| {})
        .unwrap();
    let took = started.elapsed();
    println!("\n## Scope migration\n");
    println!(
        "{tokens} legacy tokens, {audit_rows} audit rows (seeded in {seeded:.1?}): migrated in {took:.2?}; peak RSS of the whole bench process {} MiB (before the migration: {} MiB).",
        max_rss_kib() / 1024,
        rss_before / 1024
    );
    println!("{}", summary.headline());
}

fn main() {
    // `cargo bench` passes --bench; any other argument filters by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wants = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let rt = tokio::runtime::Runtime::new().unwrap();
    if wants("api") {
        rt.block_on(api_bench());
    }
    if wants("run") {
        rt.block_on(run_bench());
    }
    if wants("memory") {
        rt.block_on(memory_bench());
    }
    if wants("migration") {
        migration_bench();
    }
}
