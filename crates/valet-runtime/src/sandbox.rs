//! The Deno command line of a run: every permission is spelled out, and
//! the environment is cleared down to what the run may see.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::egress::DENIED_RANGES;

/// Everything that decides a run's sandbox.
#[derive(Debug)]
pub struct SandboxSpec<'a> {
    pub deno: &'a Path,
    pub runtime_dir: &'a Path,
    pub deno_dir: &'a Path,
    pub entry: &'a Path,
    /// Unix sockets the run may use (API, http, egress).
    pub sockets: Vec<PathBuf>,
    /// Files the run may read besides (a warm process's val file).
    pub read_paths: Vec<PathBuf>,
    /// The injected variables: the run token, the API URL, the val's env.
    pub env: BTreeMap<String, String>,
    pub heap_mb: u64,
    pub config_json: String,
}

pub fn command(spec: &SandboxSpec<'_>) -> Command {
    let sockets: Vec<String> = spec
        .sockets
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let readable: Vec<String> = spec
        .sockets
        .iter()
        .chain(&spec.read_paths)
        .map(|p| p.display().to_string())
        .collect();
    let sockets = sockets.join(",");
    let env_names: Vec<&str> = spec.env.keys().map(String::as_str).collect();
    let mut cmd = Command::new(spec.deno);
    cmd.arg("run")
        .arg("--quiet")
        .arg("--no-prompt")
        .arg("--no-config")
        .arg("--no-lock")
        .arg(format!(
            "--import-map={}",
            spec.runtime_dir.join("import_map.json").display()
        ))
        .arg("--allow-net")
        .arg(format!("--deny-net={}", DENIED_RANGES.join(",")))
        .arg(format!("--allow-read={}", readable.join(",")))
        .arg(format!("--allow-write={sockets}"));
    // A bare `--allow-env` would allow every variable: with no names, no flag.
    if !env_names.is_empty() {
        cmd.arg(format!("--allow-env={}", env_names.join(",")));
    }
    cmd.arg("--deny-run")
        .arg("--deny-ffi")
        .arg("--deny-sys")
        .arg(format!("--v8-flags=--max-old-space-size={}", spec.heap_mb))
        .arg(spec.entry)
        .arg(&spec.config_json);
    cmd.env_clear();
    cmd.envs(&spec.env);
    // What Deno itself needs; the val cannot read these (not in --allow-env).
    cmd.env("DENO_DIR", spec.deno_dir);
    cmd.env("NO_COLOR", "1");
    cmd.env("DENO_NO_UPDATE_CHECK", "1");
    cmd.env("DENO_NO_PROMPT", "1");
    cmd.current_dir(spec.runtime_dir);
    cmd
}
