//! The `valet` binary itself.

use std::process::Command;

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
