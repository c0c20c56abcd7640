//! The run lifecycle: mint the valet key, record the run, prepare its
//! private directory and sockets, spawn Deno, wait, and end the run — which
//! kills the token the same instant, however the run ended.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use valet_core::live_runs::LiveRunGuard;
use valet_core::{LiveRuns, MintRequest, ScopeSet, SharedKeyRing};
use valet_store::{NewRun, Outcome, Store, Val, ValKind, new_id, time};

use crate::egress::{self, EgressAllow, Target};
use crate::executor::{self, Exit, Process};
use crate::logs::LogBuffer;
use crate::sandbox::{self, SandboxSpec};
use crate::{RuntimeError, deno, files};

/// The origin a run sees as `VALTOWN_API_URL`. It resolves nowhere: the
/// bootstrap sends its requests down the run's API socket.
pub const API_ORIGIN: &str = "http://api.valet.internal";

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where the API listens; the run's API socket is piped here.
    pub api_addr: SocketAddr,
    /// V8 old-space cap per run, in MiB.
    pub heap_mb: u64,
    /// Stored log bytes per run.
    pub max_log_bytes: usize,
    pub egress_allow: Vec<EgressAllow>,
    pub max_concurrent_runs: usize,
    /// Parent of the per-run directories. Kept short: Unix socket paths
    /// are limited to 108 bytes.
    pub run_root: PathBuf,
    /// Deno processes kept started ahead of time for stored script and
    /// cron vals (0: every run starts cold).
    pub warm_pool: usize,
    /// Deno's module and transpile cache; default `<data dir>/deno-cache`.
    pub deno_dir: Option<PathBuf>,
}

impl RuntimeConfig {
    pub fn new(api_addr: SocketAddr) -> RuntimeConfig {
        RuntimeConfig {
            api_addr,
            heap_mb: 128,
            max_log_bytes: 64 * 1024,
            egress_allow: Vec::new(),
            max_concurrent_runs: 64,
            run_root: std::env::temp_dir().join(format!("valet-{}", std::process::id())),
            deno_dir: None,
            warm_pool: 0,
        }
    }
}

/// Where a run's code comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A stored val's code.
    Code(String),
    /// A file on disk (`valet run FILE`, `valet dev FILE`); its relative
    /// imports work.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct RunSpec {
    pub user_id: String,
    pub val_id: Option<String>,
    pub kind: ValKind,
    pub source: Source,
    pub scopes: ScopeSet,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub trigger: &'static str,
    pub last_run_at: Option<i64>,
}

impl RunSpec {
    pub fn for_val(val: &Val, trigger: &'static str) -> RunSpec {
        RunSpec {
            user_id: val.user_id.clone(),
            val_id: Some(val.id.clone()),
            kind: val.kind,
            source: Source::Code(val.code.clone()),
            scopes: val.scopes,
            env: val.env.clone(),
            timeout: Duration::from_millis(val.timeout_ms.max(1) as u64),
            trigger,
            last_run_at: val.last_run_at,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunOutput {
    pub run_id: String,
    pub outcome: Outcome,
    pub detail: String,
    pub logs: String,
    pub duration_ms: u64,
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    keys: SharedKeyRing,
    live: LiveRuns,
    deno: PathBuf,
    runtime_dir: PathBuf,
    deno_dir: PathBuf,
    config: RuntimeConfig,
    /// Bounds concurrent runs; a run holds a permit from spawn to reap.
    permits: Arc<Semaphore>,
    /// Warm processes waiting for a run. A std `Mutex`: held to push or
    /// pop, and to spawn a replacement (a fork and exec), never across an
    /// `.await`.
    warm: std::sync::Mutex<Vec<Warm>>,
}

/// A started Deno process waiting for its claim, with its directory and
/// its socket pipes. Dropping it kills the process (`kill_on_drop`).
struct Warm {
    dir: PathBuf,
    pipes: JoinSet<()>,
    process: Process,
}

/// A run between its start and its end. Dropping it ends the run's token
/// and stops its socket pipes.
struct Prepared {
    run_id: String,
    dir: PathBuf,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    _guard: LiveRunGuard,
    _pipes: JoinSet<()>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn file_url(path: &Path) -> String {
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

impl Supervisor {
    pub fn new(
        store: Store,
        keys: SharedKeyRing,
        live: LiveRuns,
        config: RuntimeConfig,
    ) -> Result<Supervisor, RuntimeError> {
        let deno = deno::find_deno()?;
        let runtime_dir = files::install(store.data_dir())?;
        let deno_dir = config
            .deno_dir
            .clone()
            .unwrap_or_else(|| store.data_dir().join("deno-cache"));
        std::fs::create_dir_all(&deno_dir)?;
        std::fs::create_dir_all(&config.run_root)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config.run_root, std::fs::Permissions::from_mode(0o700))?;
        }
        let permits = Arc::new(Semaphore::new(config.max_concurrent_runs.max(1)));
        let supervisor = Supervisor {
            inner: Arc::new(Inner {
                store,
                keys,
                live,
                deno,
                runtime_dir,
                deno_dir,
                config,
                permits,
                warm: std::sync::Mutex::new(Vec::new()),
            }),
        };
        supervisor.refill_warm();
        Ok(supervisor)
    }

    /// Waits (up to `limit`) for runs in flight to end.
    pub async fn drain(&self, limit: Duration) {
        let all = self.inner.config.max_concurrent_runs.max(1) as u32;
        let _ = tokio::time::timeout(limit, self.inner.permits.acquire_many(all)).await;
    }

    async fn prepare(&self, spec: &RunSpec) -> Result<(Prepared, Process), RuntimeError> {
        let inner = &self.inner;
        let permit = inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RuntimeError::Spawn("the supervisor is shutting down".into()))?;
        let run_id = new_id("run");
        let started_ms = time::now_ms();
        let start_s = (started_ms / 1000) as u64;
        let timeout_s = spec.timeout.as_secs_f64().ceil() as u64;
        // The token dies at the run's deadline at the latest; the live-run
        // check kills it sooner when the run ends early.
        let scopes = spec.scopes.intersect(ScopeSet::all());
        let token = inner.keys.mint(&MintRequest {
            user_id: &spec.user_id,
            val_id: spec.val_id.as_deref(),
            run_id: &run_id,
            scopes,
            start: start_s,
            deadline: start_s + timeout_s.max(1),
        })?;
        let (id, user_id, val_id) = (run_id.clone(), spec.user_id.clone(), spec.val_id.clone());
        let (trigger, deadline_ms) = (spec.trigger, started_ms + spec.timeout.as_millis() as i64);
        inner
            .store
            .call(move |s| {
                s.insert_run(&NewRun {
                    id: &id,
                    user_id: &user_id,
                    val_id: val_id.as_deref(),
                    trigger,
                    scopes,
                    started_at: started_ms,
                    deadline: deadline_ms,
                })
            })
            .await?;

        let guard = inner.live.begin(&run_id);
        // Warm processes take stored scripts and cron vals; npm packages
        // load from Deno's cache, which a warm process may not read.
        let warm = match (&spec.source, spec.kind) {
            (Source::Code(code), ValKind::Script | ValKind::Cron) if !code.contains("npm:") => {
                self.take_warm()
            }
            _ => None,
        };
        let started = Instant::now();
        let (dir, pipes, process) = match warm {
            Some(warm) => self.claim_warm(warm, spec, &token)?,
            None => self.launch_cold(spec, &run_id, &token)?,
        };
        self.refill_warm();
        tracing::info!(
            run_id,
            kind = spec.kind.as_str(),
            trigger = spec.trigger,
            "run started"
        );
        let prepared = Prepared {
            run_id,
            dir,
            started,
            deadline: started + spec.timeout,
            timeout: spec.timeout,
            _guard: guard,
            _pipes: pipes,
            _permit: permit,
        };
        Ok((prepared, process))
    }

    /// Binds a run's private sockets in `dir` (the API, each allowed egress
    /// address, and for http vals the val's own) and returns the pipes, the
    /// socket paths and the bootstrap's config.
    fn sockets(
        &self,
        dir: &Path,
        http: bool,
    ) -> Result<(JoinSet<()>, Vec<PathBuf>, serde_json::Value), RuntimeError> {
        let inner = &self.inner;
        let mut pipes = JoinSet::new();
        let api_socket = dir.join("api.sock");
        egress::pipe(&api_socket, Target::Addr(inner.config.api_addr), &mut pipes)?;
        let mut sockets = vec![api_socket.clone()];
        let mut egress_routes = Vec::new();
        for (i, allow) in inner.config.egress_allow.iter().enumerate() {
            let socket = dir.join(format!("egress-{i}.sock"));
            egress::pipe(
                &socket,
                Target::Host(allow.host.clone(), allow.port),
                &mut pipes,
            )?;
            egress_routes.push(serde_json::json!({
                "origin": allow.origin(),
                "socket": socket,
                "alias": format!("egress-{i}.valet.internal"),
            }));
            sockets.push(socket);
        }
        let http_socket = dir.join("http.sock");
        if http {
            sockets.push(http_socket.clone());
        }
        let config = serde_json::json!({
            "api": { "origin": API_ORIGIN, "socket": api_socket },
            "egress": egress_routes,
            "httpSocket": http_socket,
        });
        Ok((pipes, sockets, config))
    }

    /// The variables a run sees: its val's own, the valet key, the API URL.
    fn run_env(spec: &RunSpec, token: &str) -> BTreeMap<String, String> {
        let mut env = spec.env.clone();
        env.insert("valtown".into(), token.to_owned());
        env.insert("VAL_TOWN_API_KEY".into(), token.to_owned());
        env.insert("VALTOWN_API_URL".into(), API_ORIGIN.into());
        env
    }

    /// A fresh Deno process for this run alone.
    fn launch_cold(
        &self,
        spec: &RunSpec,
        run_id: &str,
        token: &str,
    ) -> Result<(PathBuf, JoinSet<()>, Process), RuntimeError> {
        let inner = &self.inner;
        let dir = inner.config.run_root.join(&run_id[run_id.len() - 16..]);
        std::fs::create_dir_all(&dir)?;
        let (pipes, sockets, mut config) = self.sockets(&dir, spec.kind == ValKind::Http)?;
        let val_path = match &spec.source {
            Source::Code(code) => {
                let path = dir.join("val.ts");
                std::fs::write(&path, code)?;
                path
            }
            Source::File(path) => std::fs::canonicalize(path)?,
        };
        let entry = dir.join("entry.ts");
        std::fs::write(
            &entry,
            format!(
                "import {{ start }} from {:?};\nimport * as val from {:?};\nawait start(val);\n",
                file_url(&inner.runtime_dir.join("bootstrap.ts")),
                file_url(&val_path),
            ),
        )?;
        let env = Self::run_env(spec, token);
        config["kind"] = spec.kind.as_str().into();
        config["lastRunAt"] = spec.last_run_at.map(time::iso).into();
        config["envNames"] = env.keys().cloned().collect::<Vec<_>>().into();
        let command = sandbox::command(&SandboxSpec {
            deno: &inner.deno,
            runtime_dir: &inner.runtime_dir,
            deno_dir: &inner.deno_dir,
            entry: &entry,
            sockets,
            read_paths: Vec::new(),
            env,
            heap_mb: inner.config.heap_mb,
            config_json: config.to_string(),
        });
        let logs = LogBuffer::new(inner.config.max_log_bytes, vec![token.to_owned()]);
        let process = executor::spawn(command, logs, false).map_err(|e| {
            RuntimeError::Spawn(format!("could not start {}: {e}", inner.deno.display()))
        })?;
        Ok((dir, pipes, process))
    }

    /// A Deno process started ahead of time, with the bootstrap loaded and
    /// no val, no key and no env: it waits on stdin for its claim.
    fn spawn_warm(&self) -> Result<Warm, RuntimeError> {
        let inner = &self.inner;
        let dir = inner
            .config
            .run_root
            .join(format!("warm-{}", &new_id("w")[2..18]));
        std::fs::create_dir_all(&dir)?;
        let (pipes, sockets, mut config) = self.sockets(&dir, false)?;
        let entry = dir.join("entry.ts");
        std::fs::write(
            &entry,
            format!(
                "import {{ warmMain }} from {:?};\nawait warmMain();\n",
                file_url(&inner.runtime_dir.join("bootstrap.ts")),
            ),
        )?;
        config["kind"] = "script".into();
        config["warm"] = true.into();
        config["envNames"] = serde_json::json!([]);
        let command = sandbox::command(&SandboxSpec {
            deno: &inner.deno,
            runtime_dir: &inner.runtime_dir,
            deno_dir: &inner.deno_dir,
            entry: &entry,
            sockets,
            // The val's code is written here at claim time and imported
            // dynamically, which (unlike a static import) needs read access
            // to it and to the std shims it imports.
            read_paths: vec![dir.join("val.ts"), inner.runtime_dir.clone()],
            env: BTreeMap::new(),
            heap_mb: inner.config.heap_mb,
            config_json: config.to_string(),
        });
        let logs = LogBuffer::new(inner.config.max_log_bytes, Vec::new());
        let process = executor::spawn(command, logs, true).map_err(|e| {
            RuntimeError::Spawn(format!("could not start {}: {e}", inner.deno.display()))
        })?;
        Ok(Warm {
            dir,
            pipes,
            process,
        })
    }

    fn take_warm(&self) -> Option<Warm> {
        let mut pool = self.inner.warm.lock().ok()?;
        while let Some(mut warm) = pool.pop() {
            if !warm.process.has_exited() {
                return Some(warm);
            }
            let _ = std::fs::remove_dir_all(&warm.dir);
        }
        None
    }

    /// Tops the pool of warm processes back up to its size.
    fn refill_warm(&self) {
        let want = self.inner.config.warm_pool;
        let Ok(mut pool) = self.inner.warm.lock() else {
            return;
        };
        while pool.len() < want {
            match self.spawn_warm() {
                Ok(warm) => pool.push(warm),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a warm process");
                    break;
                }
            }
        }
    }

    /// Hands a warm process its run: the val's code, its env and key.
    fn claim_warm(
        &self,
        mut warm: Warm,
        spec: &RunSpec,
        token: &str,
    ) -> Result<(PathBuf, JoinSet<()>, Process), RuntimeError> {
        let Source::Code(code) = &spec.source else {
            return Err(RuntimeError::Spawn("only stored code runs warm".into()));
        };
        let val_path = warm.dir.join("val.ts");
        std::fs::write(&val_path, code)?;
        warm.process.logs.add_secret(token);
        let claim = serde_json::json!({
            "kind": spec.kind.as_str(),
            "valUrl": file_url(&val_path),
            "env": Self::run_env(spec, token),
            "lastRunAt": spec.last_run_at.map(time::iso),
        });
        warm.process.send_claim(&claim.to_string())?;
        Ok((warm.dir, warm.pipes, warm.process))
    }

    /// Ends the run: the token dies with `prepared`, then the record is written.
    async fn finish(&self, prepared: Prepared, process: &Process, exit: Exit) -> RunOutput {
        let (outcome, detail) = executor::classify(exit, &process.logs, prepared.timeout);
        let duration_ms = prepared.started.elapsed().as_millis() as u64;
        let logs = process.logs.finish();
        let run_id = prepared.run_id.clone();
        drop(prepared);
        let (id, d, l) = (run_id.clone(), detail.clone(), logs.clone());
        if let Err(e) = self
            .inner
            .store
            .call(move |s| s.finish_run(&id, outcome, &d, &l))
            .await
        {
            tracing::error!(run_id, error = %e, "could not record the end of a run");
        }
        tracing::info!(run_id, outcome = outcome.as_str(), duration_ms, "run ended");
        RunOutput {
            run_id,
            outcome,
            detail,
            logs,
            duration_ms,
        }
    }

    /// Runs a script or cron val (or a file) to completion.
    pub async fn run(&self, spec: RunSpec) -> Result<RunOutput, RuntimeError> {
        let (prepared, mut process) = self.prepare(&spec).await?;
        let exit = process
            .wait(prepared.deadline, std::future::pending())
            .await;
        Ok(self.finish(prepared, &process, exit).await)
    }

    /// Runs an http val for one request, streaming its response back. The
    /// run ends when the response body has been sent (or at the deadline).
    pub async fn serve_http<B>(
        &self,
        spec: RunSpec,
        request: Request<B>,
    ) -> Result<Response<RunBody>, HttpRunError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let internal = |e: RuntimeError| {
            tracing::error!(error = %e, "could not start an http run");
            HttpRunError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "run_failed",
                message: "the val could not be started".to_owned(),
            }
        };
        let (prepared, mut process) = self.prepare(&spec).await.map_err(internal)?;
        let socket = prepared.dir.join("http.sock");
        let run_id = prepared.run_id.clone();

        // Wait for the val to listen, or to die trying.
        let stream = loop {
            if let Ok(stream) = tokio::net::UnixStream::connect(&socket).await {
                break Some(stream);
            }
            if Instant::now() >= prepared.deadline || process_exited(&mut process) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        };
        let Some(stream) = stream else {
            let exit = process
                .wait(prepared.deadline, std::future::ready(()))
                .await;
            let out = self.finish(prepared, &process, exit).await;
            return Err(HttpRunError {
                status: StatusCode::BAD_GATEWAY,
                code: "val_failed",
                message: format!(
                    "the val failed before answering ({}); its logs are at /v1/runs/{}",
                    out.detail, out.run_id
                ),
            });
        };

        let (done_tx, done_rx) = oneshot::channel::<()>();
        let supervisor = self.clone();
        let deadline = prepared.deadline;
        let reaper = tokio::spawn(async move {
            let stop = async {
                let _ = done_rx.await;
            };
            let exit = process.wait(deadline, stop).await;
            supervisor.finish(prepared, &process, exit).await;
        });

        let result = async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            sender.send_request(request).await
        }
        .await;
        match result {
            Ok(response) => {
                let (parts, incoming) = response.into_parts();
                let body = RunBody {
                    incoming,
                    _done: DoneGuard(Some(done_tx)),
                };
                Ok(Response::from_parts(parts, body))
            }
            Err(e) => {
                tracing::info!(run_id, error = %e, "an http val did not answer");
                let _ = done_tx.send(());
                let _ = reaper.await;
                Err(HttpRunError {
                    status: StatusCode::BAD_GATEWAY,
                    code: "val_failed",
                    message: format!("the val did not answer; its logs are at /v1/runs/{run_id}"),
                })
            }
        }
    }
}

/// Why an http run gave no response of the val's own.
#[derive(Debug, Clone)]
pub struct HttpRunError {
    pub status: StatusCode,
    /// A stable machine-readable code (`val_failed`, `run_failed`).
    pub code: &'static str,
    /// For the visitor: says nothing internal.
    pub message: String,
}

/// An http val's response body, streamed from its process. Dropping it
/// (the response was sent, or the client went away) ends the run.
pub struct RunBody {
    incoming: Incoming,
    _done: DoneGuard,
}

impl Body for RunBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.incoming).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.incoming.size_hint()
    }
}

fn process_exited(process: &mut Process) -> bool {
    process.has_exited()
}

/// Signals the reaper when the response body is finished or dropped.
struct DoneGuard(Option<oneshot::Sender<()>>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}
