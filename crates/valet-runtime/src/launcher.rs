//! The one launch path: every run process, cold or warm, is started the
//! same way, with no val, no key and an empty environment, in a private
//! directory with its sockets; the val arrives later in its claim.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::task::JoinSet;
use valet_core::ChannelId;

use crate::RuntimeError;
use crate::channel::ApiChannel;
use crate::control::Control;
use crate::deno_cache::DenoCache;
use crate::egress::{self, EgressAllow};
use crate::executor::{self, Process};
use crate::logs::LogBuffer;
use crate::os_layer::OsLayer;
use crate::run_dir::{RunDir, RunRoot};
use crate::sandbox::{self, SandboxSpec};

/// The origin a run sees as `VALTOWN_API_URL`. It resolves nowhere: the
/// bootstrap sends its requests down the run's API socket.
pub const API_ORIGIN: &str = "http://api.valet.internal";

/// Origins of the hosted platform's API that vals call by name; inside a
/// run they lead to valet too.
pub const HOSTED_API_ORIGINS: &[&str] = &["https://api.val.town"];

/// The file a stored val's code is written to, in its process's directory:
/// the only file of that directory the process may read (its cache, in
/// `deno/`, is Deno's own business, and links to modules others fetched).
pub const VAL_FILE: &str = "val.ts";

/// Writes a stored val's code into its process's directory, which is the
/// runs' uid's, after the process (and with it the directory's name, in
/// its command line) exists: a file or link another process of that uid
/// planted there is refused, never followed or overwritten.
pub fn write_val(dir: &RunDir, code: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(VAL_FILE);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&path)?;
    file.write_all(code.as_bytes())?;
    Ok(path)
}

/// Starts run processes.
pub struct Launcher {
    pub deno: PathBuf,
    pub runtime_dir: PathBuf,
    pub cache: DenoCache,
    pub root: RunRoot,
    pub os: OsLayer,
    pub channel: Arc<dyn ApiChannel>,
    pub egress_allow: Vec<EgressAllow>,
    pub deny_net: Vec<String>,
    pub heap_mb: u64,
    pub max_log_bytes: usize,
    /// Directories every process may read (`valet run`/`valet dev`: the
    /// file's own, so its relative imports load).
    pub extra_read: Vec<PathBuf>,
    /// Whether a process compiles the std shims while it waits for its
    /// claim: worth it for processes started well ahead of their run (a
    /// refilled pool), not for one whose run is already waiting.
    pub preload_std: bool,
}

/// A started process waiting for its claim, with everything it owns:
/// dropping it kills the process, stops its sockets and removes its
/// directory.
pub struct Started {
    // Field order is drop order: the process dies before its directory goes.
    pub process: Process,
    pub control: Control,
    /// The API channel, egress pipes and the control task.
    pub tasks: JoinSet<()>,
    pub channel: ChannelId,
    pub dir: RunDir,
}

impl Launcher {
    /// `read`: extra paths the process may read (for `valet run FILE`,
    /// the file's directory).
    pub fn start(&self, read: &[PathBuf]) -> Result<Started, RuntimeError> {
        let read: Vec<PathBuf> = self.extra_read.iter().chain(read).cloned().collect();
        let read = &read[..];
        let owner = self.os.owner();
        let dir = self.root.dir(owner)?;
        let channel = ChannelId::new(dir.name());
        let mut tasks = JoinSet::new();
        let control = Control::bind(dir.path(), owner, &mut tasks)?;

        let api_socket = dir.join("api.sock");
        let listener = UnixListener::bind(&api_socket)?;
        chown(&api_socket, owner)?;
        tasks.spawn(self.channel.serve(listener, channel.clone()));
        let mut sockets = vec![control.path().to_owned(), api_socket.clone()];
        let mut egress_routes = Vec::new();
        for (i, allow) in self.egress_allow.iter().enumerate() {
            let socket = dir.join(&format!("egress-{i}.sock"));
            egress::pipe(&socket, allow.clone(), &mut tasks)?;
            chown(&socket, owner)?;
            egress_routes.push(serde_json::json!({
                "origin": allow.origin(),
                "socket": socket,
                "alias": format!("egress-{i}.valet.internal"),
            }));
            sockets.push(socket);
        }
        let http_socket = dir.join("http.sock");
        sockets.push(http_socket.clone());
        let config = serde_json::json!({
            "api": { "origin": API_ORIGIN, "socket": api_socket, "aliases": HOSTED_API_ORIGINS },
            "egress": egress_routes,
            "control": control.path(),
            "httpSocket": http_socket,
            "preloadStd": self.preload_std,
        });
        let deno_dir = self.cache.for_run(dir.path(), owner)?;
        // npm packages, by either path Deno may name them (node's module
        // loading reads them with Deno's permissions).
        let mut read_paths = vec![
            dir.join(VAL_FILE),
            self.runtime_dir.clone(),
            self.cache.shared().join("npm"),
            deno_dir.join("npm"),
        ];
        read_paths.extend(read.iter().cloned());
        let command = sandbox::command(&SandboxSpec {
            deno: &self.deno,
            runtime_dir: &self.runtime_dir,
            deno_dir: &deno_dir,
            sockets,
            read_paths,
            deny_net: &self.deny_net,
            heap_mb: self.heap_mb,
            config_json: config.to_string(),
        });
        let confinement = self.os.confinement(dir.path(), read)?;
        let logs = LogBuffer::new(self.max_log_bytes, Vec::new());
        let process = executor::spawn(command.into(), confinement, logs).map_err(|e| {
            RuntimeError::Spawn(format!("could not start {}: {e}", self.deno.display()))
        })?;
        Ok(Started {
            process,
            control,
            tasks,
            channel,
            dir,
        })
    }
}

/// The bootstrap in seed mode (see `deno_cache`): the run processes' own
/// command line, so what it caches is what they look up, reading only the
/// runtime's files; it analyses and transpiles them, then exits.
pub fn seed_command(deno: &Path, runtime_dir: &Path, heap_mb: u64) -> std::process::Command {
    sandbox::command(&SandboxSpec {
        deno,
        runtime_dir,
        deno_dir: runtime_dir,
        sockets: Vec::new(),
        read_paths: vec![runtime_dir.to_owned()],
        deny_net: &[],
        heap_mb,
        config_json: serde_json::json!({ "seed": true }).to_string(),
    })
}

pub fn chown(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

/// `file://` URL of a path, for the bootstrap's dynamic import.
pub fn file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for c in path.display().to_string().chars() {
        match c {
            ' ' => url.push_str("%20"),
            '%' => url.push_str("%25"),
            '#' => url.push_str("%23"),
            '?' => url.push_str("%3F"),
            c => url.push(c),
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_dir::RunRoot;

    /// A link (or file) planted where the val's code goes, by a process of
    /// the runs' uid that read the directory's name from the command line,
    /// is refused: its target is never written.
    #[test]
    fn a_planted_val_file_is_never_followed_or_overwritten() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = RunRoot::create(tmp.path()).expect("root");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "secret").expect("write");
        let dir = root.dir(None).expect("dir");
        std::os::unix::fs::symlink(&victim, dir.join(VAL_FILE)).expect("link");
        assert!(write_val(&dir, "export default 1").is_err());
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "secret");
        // Where nothing was planted, the code is written.
        let clean = root.dir(None).expect("dir");
        let path = write_val(&clean, "export default 1").expect("write");
        assert_eq!(
            std::fs::read_to_string(path).expect("read"),
            "export default 1"
        );
    }
}
