//! Soak: a few minutes of mixed load against a real `valet serve` (blob
//! put/get/list/delete, SQLite, stored runs, http vals, the JWKS), printing
//! per interval the requests, errors, p50/p99, and valet's RSS, open file
//! descriptors and Deno processes, so drift shows. Loopback only; bounded
//! by `VALET_SOAK_SECS` (default 180) and stops by itself. `just soak`,
//! and part of `just bench`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, percentile};

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use valet_core::{Granted, GrantedSet, ScopeSet, TokenScopes};
use valet_store::{NewVal, Store, ValKind};

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Processes other than valet whose command line names the data dir: the
/// Deno runs and warm processes.
fn deno_processes(data_dir: &Path, valet: u32) -> usize {
    let needle = data_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy() != valet.to_string())
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                })
                .count()
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Window {
    latencies: Mutex<Vec<Duration>>,
    errors: AtomicU64,
}

fn main() {
    let total = env_secs("VALET_SOAK_SECS", 180);
    let interval = env_secs("VALET_SOAK_INTERVAL_SECS", 60);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(&data).unwrap();
    let user = store.create_user("soak", "soak@example.com", None).unwrap();
    let (_, token) = store
        .create_token(
            &Granted::for_operator(&user.id),
            "soak",
            TokenScopes::Scoped(ScopeSet::all()),
            None,
        )
        .unwrap();
    let token = token.expose().to_owned();
    let new_val = |name: &str, kind, code: &str| NewVal {
        name: name.into(),
        kind,
        code: code.into(),
        scopes: ScopeSet::default_val(),
        env: Default::default(),
        timeout_ms: 10_000,
        schedule: None,
    };
    let script = store
        .create_val(
            &Granted::for_operator(&user.id),
            &GrantedSet::for_operator(&user.id, ScopeSet::all()),
            new_val(
                "script",
                ValKind::Script,
                "import { blob } from 'https://esm.town/v/std/blob';\nawait blob.set('from-run', String(Date.now()));",
            ),
        )
        .unwrap();
    store
        .create_val(
            &Granted::for_operator(&user.id),
            &GrantedSet::for_operator(&user.id, ScopeSet::all()),
            new_val(
                "hello",
                ValKind::Http,
                "export default (req: Request) => new Response('hello ' + new URL(req.url).pathname);",
            ),
        )
        .unwrap();
    drop(store);

    let port = free_port();
    let vals_port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_valet"))
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--vals-listen", &format!("127.0.0.1:{vals_port}")])
        .env("VALET_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start valet serve (cargo bench builds it)");
    let pid = child.id();
    let url = format!("http://127.0.0.1:{port}");
    let vals_url = format!("http://127.0.0.1:{vals_port}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let ready = Instant::now() + Duration::from_secs(60);
        while !client
            .get(format!("{url}/.well-known/jwks.json"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(Instant::now() < ready, "valet serve did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "\n## Soak: {}s of mixed load, 8 clients (blob, SQLite, runs, http vals, JWKS)\n",
            total.as_secs()
        );
        println!("| minute | requests | errors | p50 | p99 | valet RSS | fds | Deno processes |");
        println!("|---|---|---|---|---|---|---|---|");
        let stop = Arc::new(AtomicBool::new(false));
        let window = Arc::new(Mutex::new(Arc::new(Window::default())));
        let mut clients = Vec::new();
        for n in 0..8u64 {
            let (client, url, token, stop, window, script) = (
                client.clone(),
                url.clone(),
                token.clone(),
                stop.clone(),
                window.clone(),
                script.id.clone(),
            );
            let vals_url = vals_url.clone();
            clients.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let key = format!("c{n}-{}", i % 50);
                    let request = match i % 20 {
                        0..=4 => client
                            .post(format!("{url}/v1/blob/{key}"))
                            .bearer_auth(&token)
                            .body(vec![b'x'; 1 + (i as usize * 37) % 8192]),
                        5..=9 => client
                            .get(format!("{url}/v1/blob/{key}"))
                            .bearer_auth(&token),
                        10 => client
                            .get(format!("{url}/v1/blob?prefix=c{n}-"))
                            .bearer_auth(&token),
                        11 => client
                            .delete(format!("{url}/v1/blob/{key}"))
                            .bearer_auth(&token),
                        12..=14 => client
                            .post(format!("{url}/v1/sqlite/batch"))
                            .bearer_auth(&token)
                            .json(&json!({"statements": [
                                "CREATE TABLE IF NOT EXISTS soak (n INTEGER, at INTEGER)",
                                {"sql": "INSERT INTO soak VALUES (?, ?)", "args": [n, i]},
                            ]})),
                        15 => client
                            .post(format!("{url}/v1/sqlite/execute"))
                            .bearer_auth(&token)
                            .json(&json!({"statement": "SELECT count(*) FROM soak"})),
                        16 if i % 60 == 16 => client
                            .post(format!("{url}/v1/vals/{script}/run"))
                            .bearer_auth(&token),
                        17 if i % 40 == 17 => client.get(format!("{vals_url}/soak/hello/p{n}")),
                        _ => client.get(format!("{url}/.well-known/jwks.json")),
                    };
                    let started = Instant::now();
                    let ok = match request.send().await {
                        // A GET of a key this client just deleted is a 404.
                        Ok(r) => r.status().is_success() || r.status() == 404,
                        Err(_) => false,
                    };
                    let current = window.lock().unwrap().clone();
                    if ok {
                        current.latencies.lock().unwrap().push(started.elapsed());
                    } else {
                        current.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let started = Instant::now();
        let mut minute = 0;
        let mut total_errors = 0;
        let mut rss = Vec::new();
        while started.elapsed() < total {
            tokio::time::sleep(interval.min(total.saturating_sub(started.elapsed()))).await;
            minute += 1;
            let done = std::mem::replace(&mut *window.lock().unwrap(), Arc::new(Window::default()));
            let mut lat = done.latencies.lock().unwrap().clone();
            lat.sort();
            let errors = done.errors.load(Ordering::Relaxed);
            total_errors += errors;
            let kib = status_kib(pid, "VmRSS:");
            rss.push(kib);
            println!(
                "| {minute} | {} | {errors} | {:.2} ms | {:.2} ms | {:.1} MiB | {} | {} |",
                lat.len() + errors as usize,
                percentile(&lat, 0.5).as_secs_f64() * 1000.0,
                percentile(&lat, 0.99).as_secs_f64() * 1000.0,
                kib as f64 / 1024.0,
                fds(pid),
                deno_processes(&data, pid),
            );
        }
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            c.await.unwrap();
        }
        println!(
            "\n{total_errors} errors; RSS first {:.1} MiB, last {:.1} MiB, peak {:.1} MiB (VmHWM).",
            rss.first().copied().unwrap_or(0) as f64 / 1024.0,
            rss.last().copied().unwrap_or(0) as f64 / 1024.0,
            status_kib(pid, "VmHWM:") as f64 / 1024.0,
        );
        assert_eq!(total_errors, 0, "requests failed during the soak");
    });
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "valet serve exited with {status}");
}
