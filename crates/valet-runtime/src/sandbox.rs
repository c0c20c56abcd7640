//! The Deno command line of every run process. Nothing on it comes from a
//! val or its owner: the entry is the bootstrap, the environment is cleared
//! down to what Deno itself needs, and the val, its env and its key arrive
//! later over the control channel. Every permission is spelled out.

use std::path::{Path, PathBuf};

use std::process::Command;

/// Everything that decides a run process's sandbox.
#[derive(Debug)]
pub struct SandboxSpec<'a> {
    pub deno: &'a Path,
    pub runtime_dir: &'a Path,
    /// The process's own view of Deno's cache (see `deno_cache`).
    pub deno_dir: &'a Path,
    /// Unix sockets the process may use (control, API, http, egress).
    pub sockets: Vec<PathBuf>,
    /// Files and directories the process may read besides (its val's file
    /// in the run's directory; npm packages in Deno's cache; for `valet
    /// run FILE`, the file's directory).
    pub read_paths: Vec<PathBuf>,
    /// Addresses denied besides the fixed ranges (this host's own IPv6
    /// addresses).
    pub deny_net: &'a [String],
    pub heap_mb: u64,
    /// The bootstrap's configuration: socket paths and origins, all
    /// chosen by valet.
    pub config_json: String,
}

/// The command of a run process (for the seed of Deno's cache, the same
/// line in seed mode).
pub fn command(spec: &SandboxSpec<'_>) -> Command {
    let join = |paths: &mut dyn Iterator<Item = &PathBuf>| {
        paths
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let readable = join(&mut spec.sockets.iter().chain(&spec.read_paths));
    let writable = join(&mut spec.sockets.iter());
    let mut cmd = Command::new(spec.deno);
    cmd.arg("run")
        .arg("--quiet")
        .arg("--no-prompt")
        .arg("--no-config")
        .arg("--no-lock")
        // Each run's val is a new file, so V8's code cache would never hit
        // for it and would only grow by an entry per run.
        .arg("--no-code-cache")
        .arg(format!(
            "--import-map={}",
            spec.runtime_dir.join("import_map.json").display()
        ))
        .arg("--allow-net")
        .arg(format!("--allow-read={readable}"));
    // (Deno refuses empty lists: nothing to deny or write, no flag.)
    if !spec.deny_net.is_empty() {
        cmd.arg(format!("--deny-net={}", spec.deny_net.join(",")));
    }
    if !writable.is_empty() {
        cmd.arg(format!("--allow-write={writable}"));
    }
    cmd
        // No --allow-env at all: the run's variables live in the
        // bootstrap's frozen view, never in the process environment.
        .arg("--deny-env")
        .arg("--deny-run")
        .arg("--deny-ffi")
        .arg("--deny-sys")
        .arg(format!("--v8-flags=--max-old-space-size={}", spec.heap_mb))
        .arg(spec.runtime_dir.join("bootstrap.ts"))
        .arg(&spec.config_json);
    cmd.env_clear();
    // What Deno itself needs. Fixed values: no val or owner decides them.
    cmd.env("DENO_DIR", spec.deno_dir);
    cmd.env("NO_COLOR", "1");
    cmd.env("DENO_NO_UPDATE_CHECK", "1");
    cmd.env("DENO_NO_PROMPT", "1");
    cmd.current_dir(spec.runtime_dir);
    cmd
}
