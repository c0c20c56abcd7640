//! What the control plane's backend costs a request: a real `valet serve`
//! on SQLite, on PostgreSQL with blobs as files on the node, and on
//! PostgreSQL with blobs on S3 (moto), side by side in one run. Prints a
//! one-client blob GET with API-token auth on each, with the token warm
//! in the node's cache and cold (its first use: the record is read from
//! the database), the token check alone in process (a database read
//! against a cache hit), and the parts a GET is made of. PostgreSQL and
//! moto come from `valet-testkit` (Debian's `postgresql` binaries, moto
//! from `VALET_TEST_PYTHON`); a backend whose server does not start is
//! skipped with the reason. `just bench`, release build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, median, percentile};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use valet_core::{ApiToken, Granted, ScopeSet, TokenScopes};
use valet_store::{Store, StoreOptions};

/// Requests per measured series.
const SAMPLES: usize = 2000;
/// Tokens used once each, for the cold series.
const COLD_TOKENS: usize = 400;
const BUCKET: &str = "valet-bench";

/// One way to run a node.
struct Backend {
    name: &'static str,
    database: Option<String>,
    blob_store: Option<String>,
    env: Vec<(&'static str, String)>,
}

/// A `valet serve` process, killed when dropped.
struct Node {
    child: Child,
    url: String,
}

impl Node {
    fn start(data: &Path, backend: &Backend) -> Node {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_valet"));
        cmd.arg("--data-dir").arg(data);
        if let Some(url) = &backend.database {
            cmd.args(["--database", url]);
        }
        if let Some(url) = &backend.blob_store {
            cmd.args(["--blob-store", url]);
        }
        let child = cmd
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--vals-listen", "127.0.0.1:0", "--warm-pool", "0"])
            .envs(backend.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("VALET_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start valet serve (cargo bench builds it)");
        Node {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client
            .get(format!("{}/.well-known/jwks.json", self.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(Instant::now() < deadline, "valet serve did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one backend measured.
struct Measured {
    name: &'static str,
    warm: Vec<Duration>,
    cold: Vec<Duration>,
    /// The token read from the database, in process: with the blocking
    /// pool hop (as a request pays it) and without.
    read_hop: Duration,
    read: Duration,
    /// Parse, SHA-256 and a cache hit: a warm check.
    cached: Duration,
}

async fn get(client: &reqwest::Client, url: &str, token: &str) -> Duration {
    let t = Instant::now();
    let r = client.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {url}");
    r.bytes().await.unwrap();
    t.elapsed()
}

async fn measure(backend: &Backend, client: &reqwest::Client) -> Measured {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Users and tokens go in through the store; with S3 the blob itself
    // goes in through the node (this process has no S3 settings).
    let store = Store::open_with(&StoreOptions {
        database: backend.database.clone(),
        ..StoreOptions::local(&data)
    })
    .unwrap();
    let user = store
        .create_user("bench", "bench@example.com", None)
        .unwrap();
    let token = |name: &str| {
        store
            .create_token(
                &Granted::for_operator(&user.id),
                name,
                TokenScopes::Scoped(ScopeSet::parse("blob:read blob:write").unwrap()),
                None,
            )
            .unwrap()
            .1
    };
    let warm_token = token("warm");
    let cold_tokens: Vec<ApiToken> = (0..COLD_TOKENS)
        .map(|i| token(&format!("cold{i}")))
        .collect();
    let node = Node::start(&data, backend);
    node.ready(client).await;
    let blob = format!("{}/v1/blob/k", node.url);
    let put = client
        .post(&blob)
        .bearer_auth(warm_token.expose())
        .body(vec![7u8; 1024])
        .send()
        .await
        .unwrap();
    assert!(
        put.status().is_success(),
        "{}: {}",
        backend.name,
        put.status()
    );
    for _ in 0..300 {
        get(client, &blob, warm_token.expose()).await;
    }
    let mut warm = Vec::with_capacity(SAMPLES);
    let mut cold = Vec::with_capacity(COLD_TOKENS);
    // Alternate, so drift on a busy machine hits both series alike.
    for (i, cold_token) in cold_tokens.iter().enumerate() {
        cold.push(get(client, &blob, cold_token.expose()).await);
        for _ in 0..SAMPLES / COLD_TOKENS {
            warm.push(get(client, &blob, warm_token.expose()).await);
        }
        if i % 100 == 99 {
            // Each request leaves an audit row; let them land.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(node);
    warm.sort();
    cold.sort();

    // The check alone, in this process.
    let hash = warm_token.hash();
    let mut read_hop = Vec::new();
    let mut read = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        store
            .call(move |s| s.token_by_hash(&hash))
            .await
            .unwrap()
            .unwrap();
        read_hop.push(t.elapsed());
    }
    // On a thread outside the runtime, where the store blocks in place
    // (inside it, a PostgreSQL call moves to a thread of its own).
    let blocking = store.clone();
    let read_sync = std::thread::spawn(move || {
        (0..500)
            .map(|_| {
                let t = Instant::now();
                blocking.token_by_hash(&hash).unwrap().unwrap();
                t.elapsed()
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    read.extend(read_sync);
    let text = warm_token.expose().to_owned();
    store.token_by_hash(&hash).unwrap();
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        let parsed = ApiToken::parse(&text).unwrap();
        // A cache entry lives a second without a listener: refill it
        // (rarely) rather than time a miss.
        if store.token_cache().get(&parsed.hash()).is_none() {
            store.token_by_hash(&parsed.hash()).unwrap();
        }
    }
    let cached = t.elapsed() / n;
    Measured {
        name: backend.name,
        warm,
        cold,
        read_hop: median(read_hop),
        read: median(read),
        cached,
    }
}

/// The stored object read straight from moto with `object_store` (the
/// crate valet's S3 blobs use), signed like valet's own requests: the floor
/// of a blob GET on S3.
async fn moto_get(
    client: &reqwest::Client,
    moto: &valet_testkit::Moto,
) -> Result<Duration, String> {
    use object_store::ObjectStoreExt;
    // Listing needs no signature on moto.
    let listing = client
        .get(format!("{}/{BUCKET}?list-type=2", moto.endpoint()))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let key = listing
        .split("<Key>")
        .nth(1)
        .and_then(|k| k.split("</Key>").next())
        .ok_or_else(|| format!("no object in the listing: {listing}"))?
        .to_owned();
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_bucket_name(BUCKET)
        .build()
        .map_err(|e| e.to_string())?;
    let path = object_store::path::Path::from(key);
    let mut times = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let got = s3.get(&path).await.map_err(|e| e.to_string())?;
        got.bytes().await.map_err(|e| e.to_string())?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

fn python() -> PathBuf {
    std::env::var_os("VALET_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let mut backends = vec![Backend {
        name: "SQLite, blobs as files",
        database: None,
        blob_store: None,
        env: Vec::new(),
    }];
    let mut skipped = Vec::new();
    // Both servers live until the end of main.
    let postgres = valet_testkit::Postgres::start();
    let moto = valet_testkit::Moto::start().and_then(|m| m.create_bucket(BUCKET).map(|()| m));
    match &postgres {
        Ok(pg) => {
            backends.push(Backend {
                name: "PostgreSQL, blobs as files",
                database: Some(pg.fresh_database()),
                blob_store: None,
                env: Vec::new(),
            });
            match &moto {
                Ok(moto) => backends.push(Backend {
                    name: "PostgreSQL, blobs on S3 (moto)",
                    database: Some(pg.fresh_database()),
                    blob_store: Some(format!("s3://{BUCKET}/bench")),
                    env: moto.env(),
                }),
                Err(e) => skipped.push(format!(
                    "PostgreSQL with S3: {e} (python: {})",
                    python().display()
                )),
            }
        }
        Err(e) => skipped.push(format!("PostgreSQL: {e}")),
    }
    let measured: Vec<Measured> = backends
        .iter()
        .map(|b| rt.block_on(measure(b, &client)))
        .collect();
    let moto_floor = moto
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|moto| rt.block_on(moto_get(&client, moto)));

    println!("\n## What the backend adds to a request (one client, loopback, 1 KiB blob)\n");
    println!(
        "| `valet serve` on | blob GET p50 (token cached) | p99 | blob GET p50 (token's first use) | token read on a miss (with the blocking-pool hop) | without the hop | cached check | miss / hit |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for m in &measured {
        println!(
            "| {} | {:.3?} | {:.3?} | {:.3?} | {:.1?} | {:.1?} | {:.2?} | {:.0}x |",
            m.name,
            percentile(&m.warm, 0.5),
            percentile(&m.warm, 0.99),
            percentile(&m.cold, 0.5),
            m.read_hop,
            m.read,
            m.cached,
            m.read_hop.as_secs_f64() / m.cached.as_secs_f64()
        );
    }
    if let Some(sqlite) = measured.first() {
        let base = percentile(&sqlite.warm, 0.5).as_secs_f64();
        println!();
        for m in measured.iter().skip(1) {
            let warm = percentile(&m.warm, 0.5).as_secs_f64();
            println!(
                "- {}: a blob GET is {:.2}x SQLite's ({:+.0} µs); a cold token adds {:+.0} µs to it",
                m.name,
                warm / base,
                (warm - base) * 1e6,
                (percentile(&m.cold, 0.5).as_secs_f64() - warm) * 1e6
            );
        }
    }
    match moto_floor {
        Ok(floor) => {
            println!(
                "- the object read straight from moto with object_store (signed, as valet reads it): {floor:.3?} median"
            )
        }
        Err(e) => println!("- moto's own GET not measured: {e}"),
    }
    for reason in &skipped {
        println!("- skipped {reason}");
    }
}
