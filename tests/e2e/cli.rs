//! The `valet` binary itself.

use std::process::Command;

use crate::support::{Http, Requests};

fn valet(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_valet"));
    cmd.arg("--data-dir").arg(data_dir);
    cmd
}

#[test]
fn token_create_prints_only_the_token_and_bad_scopes_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = valet(dir.path())
        .args(["user", "create", "ada", "--email", "ada@example.com"])
        .output()
        .expect("run");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let bad = valet(dir.path())
        .args([
            "token",
            "create",
            "--user",
            "ada",
            "--name",
            "ci",
            "--scopes",
            "blob:read blob:delete",
        ])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("invalid scope 'blob:delete'"), "{stderr}");
    assert!(bad.stdout.is_empty());

    let made = valet(dir.path())
        .args([
            "token",
            "create",
            "--user",
            "ada",
            "--name",
            "ci",
            "--scopes",
            "blob:read,sqlite:read",
            "--expires",
            "30d",
        ])
        .output()
        .expect("run");
    assert!(made.status.success());
    let token = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    assert!(valet_core::ApiToken::parse(&token).is_ok(), "{token:?}");

    let list = valet(dir.path())
        .args(["token", "list", "--user", "ada", "--json"])
        .output()
        .expect("run");
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    let tokens = list.as_array().expect("array");
    assert_eq!(tokens.len(), 1, "the bad create made nothing");
    assert_eq!(
        tokens[0]["scopes"],
        serde_json::json!(["blob:read", "sqlite:read"])
    );
    assert!(tokens[0]["expires_at"].is_string());
    let id = tokens[0]["id"].as_str().expect("id");

    let scoped = valet(dir.path())
        .args(["token", "scopes", id, "--set", "email:write"])
        .output()
        .expect("run");
    assert!(scoped.status.success());
    let revoked = valet(dir.path())
        .args(["token", "revoke", id, "--user", "ada"])
        .output()
        .expect("run");
    assert!(revoked.status.success());
    let list = valet(dir.path())
        .args(["token", "list", "--user", "ada", "--json"])
        .output()
        .expect("run");
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(list[0]["scopes"], serde_json::json!(["email:write"]));
    assert!(list[0]["revoked_at"].is_string());
    // A revoked token cannot be changed, from the command line either.
    let rescoped = valet(dir.path())
        .args(["token", "scopes", id, "--set", "blob:read"])
        .output()
        .expect("run");
    assert!(!rescoped.status.success());
    let stderr = String::from_utf8_lossy(&rescoped.stderr);
    assert!(
        stderr.contains("a revoked token cannot be changed"),
        "{stderr}"
    );
}

/// Issue #11, item 8: a tier and a schedule are parsed where the flags are
/// read, with the parser's own words, and a bad one creates nothing.
#[test]
fn tiers_and_schedules_are_parsed_at_the_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fail = |args: &[&str], needle: &str| {
        let out = valet(dir.path()).args(args).output().expect("run");
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    };
    fail(
        &[
            "user",
            "create",
            "ada",
            "--email",
            "a@example.com",
            "--tier",
            "gold",
        ],
        "invalid tier 'gold': use free or pro",
    );
    let ok = valet(dir.path())
        .args([
            "user",
            "create",
            "ada",
            "--email",
            "a@example.com",
            "--tier",
            "pro",
        ])
        .output()
        .expect("run");
    assert!(ok.status.success(), "the bad create made no user");
    let file = dir.path().join("tick.ts");
    std::fs::write(&file, "export default () => {}").expect("write");
    let file = file.to_string_lossy().into_owned();
    let create = [
        "val", "create", "--user", "ada", "--name", "tick", "--file", &file, "--type", "cron",
    ];
    fail(
        &[&create[..], &["--schedule", "* * *"]].concat(),
        "invalid schedule '* * *': 3 fields, expected 5 or 6",
    );
    fail(&create, "a cron val needs a schedule");
    let made = valet(dir.path())
        .args(create)
        .args(["--schedule", "*/5 * * * *"])
        .output()
        .expect("run");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

#[test]
fn valet_run_prints_logs_and_exit_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hello.ts");
    std::fs::write(&file, "import { blob } from 'https://esm.town/v/std/blob';\nawait blob.set('a', 'b');\nconsole.log('hi', await (await blob.get('a')).text());\n").expect("write");
    let out = valet(&dir.path().join("data"))
        .arg("run")
        .arg(&file)
        .arg("--json")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["outcome"], "succeeded");
    assert!(json["logs"].as_str().expect("logs").contains("hi b"));

    std::fs::write(&file, "throw new Error('nope')").expect("write");
    let out = valet(&dir.path().join("data"))
        .arg("run")
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nope"));
}

/// As root, valet gives runs a uid of their own: a file that uid cannot
/// reach is refused before the run, saying why, not with a bare
/// "permission denied" from inside it.
#[test]
fn a_file_the_runs_cannot_read_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let private = dir.path().join("private");
    std::fs::create_dir(&private).expect("mkdir");
    let file = private.join("hello.ts");
    std::fs::write(&file, "console.log('hi')").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let run = || {
        valet(&dir.path().join("data"))
            .arg("run")
            .arg(&file)
            .output()
            .expect("run")
    };
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        assert!(!out.status.success());
        assert!(
            stderr.contains("as uid ")
                && stderr.contains("cannot enter")
                && stderr.contains("private"),
            "{stderr}"
        );
        // Readable by them: it runs.
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let out = run();
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read it"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let out = valet(&dir.path().join("data"))
        .arg("run")
        .arg(&file)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hi"));
}

#[test]
fn a_missing_deno_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("x.ts");
    std::fs::write(&file, "1").expect("write");
    let out = valet(&dir.path().join("data"))
        .arg("run")
        .arg(&file)
        .env("VALET_DENO", "/nonexistent/deno")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("VALET_DENO"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Secrets never travel in logs: a full session of `valet serve` at debug
/// level (API calls with an API token, a run with its valet key, a failed
/// call with a bad token) leaves no token in the server's output.
#[test]
fn no_token_appears_in_the_servers_logs() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let ok = valet(&data)
        .args([
            "user",
            "create",
            "ada",
            "--email",
            "ada@example.com",
            "--tier",
            "pro",
        ])
        .output()
        .expect("user");
    assert!(ok.status.success());
    let token = String::from_utf8_lossy(
        &valet(&data)
            .args([
                "token",
                "create",
                "--user",
                "ada",
                "--name",
                "t",
                "--scopes",
                "val:read val:write blob:read blob:write",
            ])
            .output()
            .expect("token")
            .stdout,
    )
    .trim()
    .to_owned();
    let file = dir.path().join("leaky.ts");
    std::fs::write(&file, "import { blob } from 'https://esm.town/v/std/blob';\nawait blob.set('key', Deno.env.get('valtown')!);\nconsole.log(Deno.env.get('valtown'));\n").expect("write");
    let val = valet(&data)
        .args([
            "val", "create", "--user", "ada", "--name", "leaky", "--file",
        ])
        .arg(&file)
        .output()
        .expect("val");
    let val_id = String::from_utf8_lossy(&val.stdout).trim().to_owned();
    let port = crate::support::free_port();
    let mut server = valet(&data)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--vals-listen", "127.0.0.1:0"])
        .env("VALET_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let base = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let run_token = rt.block_on(async {
        let c = Http::new(base);
        for _ in 0..600 {
            if c.get("/.well-known/jwks.json").try_send().await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let r = c
            .post(&format!("/v1/vals/{val_id}/run"))
            .token(&token)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        c.get(&format!("/v1/blob?prefix={token}"))
            .token(&token)
            .send()
            .await;
        c.get("/v1/me").token(&format!("{token}x")).send().await;
        c.get("/v1/blob/key").token(&token).send().await.text()
    });
    assert!(run_token.starts_with("eyJ"));
    // SIGTERM: a graceful shutdown flushes the logs.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM);
    }
    let status = server.wait().expect("wait");
    assert!(status.success(), "graceful shutdown on SIGTERM");
    let mut logs = String::new();
    server
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("read");
    server
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut logs)
        .expect("read");
    assert!(
        logs.contains("response"),
        "debug logs were captured: {logs}"
    );
    assert!(!logs.contains(&token), "the API token leaked into the logs");
    assert!(
        !logs.contains(&token[4..30]),
        "part of the API token leaked into the logs"
    );
    assert!(
        !logs.contains(&run_token),
        "the run token leaked into the logs"
    );
    assert!(
        !logs.contains(&run_token[run_token.len() - 30..]),
        "the run token's signature leaked"
    );
}

#[test]
fn valet_dev_serves_an_http_val_from_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("handler.ts");
    std::fs::write(
        &file,
        "export default (req: Request) => new Response(`dev ${new URL(req.url).pathname}`);\n",
    )
    .expect("write");
    let port = crate::support::free_port();
    let mut dev = valet(&dir.path().join("data"))
        .arg("dev")
        .arg(&file)
        .args(["--port", &port.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dev");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let bodies = rt.block_on(async {
        let url = format!("http://127.0.0.1:{port}/hello");
        for _ in 0..600 {
            if let Ok(r) = reqwest::get(&url).await {
                let first = r.text().await.expect("text");
                let second = reqwest::get(format!("http://127.0.0.1:{port}/again"))
                    .await
                    .expect("get")
                    .text()
                    .await
                    .expect("text");
                return (first, second);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("valet dev did not start");
    });
    let _ = dev.kill();
    let _ = dev.wait();
    assert_eq!(bodies, ("dev /hello".to_owned(), "dev /again".to_owned()));
}
