//! The run lifecycle: take a slot, take a started process (warm, or one
//! started now through the same launch path), record the run, mint its
//! valet key and make it live on the process's channel, send the claim,
//! wait, and end the run, which kills the key the same instant, however the
//! run ended.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use valet_core::live_runs::LiveRunGuard;
use valet_core::{ChannelId, LiveRun, LiveRuns, ScopeSet, SharedKeyRing};
use valet_store::{Outcome, RunEnd, RunStart, Store, Val, ValKind, new_id, time};

use crate::channel::ApiChannel;
use crate::control::ControlEvents;
use crate::deno_cache::DenoCache;
use crate::egress::{self, EgressAllow};
use crate::executor::{self, Exit, Process};
use crate::hot::{HotLimits, HotPool};
use crate::key_stock::{KeyGrant, Minter};
use crate::launcher::{self, API_ORIGIN, Launcher, Started};
use crate::os_layer::{LayerReport, OsLayer};
use crate::pool::WarmPool;
use crate::run_dir::{RunDir, RunRoot};
use crate::slots::{SlotLimits, SlotPermit, Slots};
use crate::{RuntimeError, deno, files};

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// V8 old-space cap per run, in MiB.
    pub heap_mb: u64,
    /// Whole-process memory cap per run (`RLIMIT_DATA`), in MiB. V8
    /// reserves about 500 MiB of it at start, whatever the val does.
    pub memory_mb: u64,
    /// Stored log bytes per run.
    pub max_log_bytes: usize,
    pub egress_allow: Vec<EgressAllow>,
    pub slots: SlotLimits,
    /// Where the supervisor's run root (`valet-<pid>`) is made. Kept
    /// short: Unix socket paths are limited to 108 bytes.
    pub run_parent: PathBuf,
    /// Processes kept started ahead of time (0: every run starts its own).
    pub warm_pool: usize,
    /// Whether the pool starts a replacement for each process taken.
    pub warm_pool_refill: bool,
    /// Deno's cache shared by runs (downloaded modules, npm packages);
    /// default `deno-cache` beside the runtime's files
    /// (`$TMPDIR/valet-runtime/deno-cache`). It must be valet's own and
    /// writable by no one else.
    pub deno_dir: Option<PathBuf>,
    /// The uid and gid runs get when valet runs as root.
    pub sandbox_uid: u32,
    /// Hot processes of http vals.
    pub hot: HotLimits,
    /// Directories every run process may read: for `valet run FILE` and
    /// `valet dev FILE`, the file's own, so warm processes can take it.
    pub extra_read: Vec<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            heap_mb: 128,
            memory_mb: 1024,
            max_log_bytes: 64 * 1024,
            egress_allow: Vec::new(),
            slots: SlotLimits::default(),
            run_parent: std::env::temp_dir(),
            warm_pool: 0,
            warm_pool_refill: true,
            deno_dir: None,
            // Not 65534 (`nobody`, which other daemons and NFS share: any
            // of them could reach the runs' directories and their shared
            // cache). 65533 is in the block Debian reserves and never
            // allocates, and inside the 65,536 uids a rootless container
            // maps.
            sandbox_uid: 65533,
            hot: HotLimits::default(),
            extra_read: Vec::new(),
        }
    }
}

/// Where a run's code comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A stored val's code.
    Code(String),
    /// A file on disk (`valet run FILE`, `valet dev FILE`); its relative
    /// imports work, so the process may read the file's directory.
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

/// A finished run. (`valet run --json` prints it through valet-api's
/// `FinishedRunJson`.)
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub run_id: String,
    pub outcome: Outcome,
    pub detail: String,
    pub logs: String,
    pub duration_ms: u64,
}

#[derive(Clone)]
pub struct Supervisor {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) keys: SharedKeyRing,
    pub(crate) live: LiveRuns,
    pub(crate) launcher: Arc<Launcher>,
    pub(crate) slots: Slots,
    pub(crate) pool: Arc<WarmPool>,
    pub(crate) hot: HotPool,
    /// Signs hot requests' keys ahead of them.
    pub(crate) minter: Minter,
    pub(crate) max_log_bytes: usize,
}

/// A run's id, its key (secret: never logged) and the guard that keeps
/// the key live.
pub(crate) struct OpenRun {
    pub run_id: String,
    pub key: String,
    pub guard: LiveRunGuard,
    pub row: RunRow,
}

/// A run's row, to be written.
pub(crate) struct RunRow {
    id: String,
    user_id: String,
    val_id: Option<String>,
    trigger: &'static str,
    scopes: ScopeSet,
    started_at: i64,
    deadline: i64,
}

/// A run between its claim and its end. Dropping it ends the key, kills
/// the process and removes its directory.
pub(crate) struct Active {
    pub run_id: String,
    // Field order is drop order: the key dies first, then the process,
    // its sockets, its directory.
    _guard: LiveRunGuard,
    pub process: Process,
    _tasks: JoinSet<()>,
    pub dir: RunDir,
    pub events: ControlEvents,
    pub began: Instant,
    pub deadline: Instant,
    pub timeout: Duration,
    _permit: SlotPermit,
}

/// The launch path and its warm processes, started before the store is
/// open: `valet run` starts its run's process first thing, and the store
/// opens while Deno starts. [`Supervisor::with`] takes it over.
pub struct Launching {
    launcher: Arc<Launcher>,
    pool: Arc<WarmPool>,
    config: RuntimeConfig,
}

impl Launching {
    pub fn start(
        channel: Arc<dyn ApiChannel>,
        config: RuntimeConfig,
    ) -> Result<Launching, RuntimeError> {
        let deno = deno::find_deno()?;
        let root = RunRoot::create(&config.run_parent)?;
        let runtime_dir = files::install_shared(root.path())?;
        // By default beside the runtime's files, in a directory that is
        // valet's own and writable by no one else (a fixed name in /tmp
        // could be made first by anyone, with what they like in it).
        let shared_cache = match &config.deno_dir {
            Some(dir) => dir.clone(),
            None => runtime_dir
                .parent()
                .unwrap_or(root.path())
                .join("deno-cache"),
        };
        // The run roots of supervisors that died: a thread of its own, so
        // the first run (`valet run`'s one) does not wait for it, and after
        // a crash there may be many.
        let parent = config.run_parent.clone();
        std::thread::spawn(move || crate::run_dir::sweep(&parent));
        let owner = OsLayer::runs_owner(config.sandbox_uid);
        let mut cache = DenoCache::open(&shared_cache, owner)?;
        if let Err(e) = cache.seed(&deno, &runtime_dir, || {
            launcher::seed_command(&deno, &runtime_dir, config.heap_mb)
        }) {
            tracing::warn!(error = %e, "every run analyses and transpiles the bootstrap again");
        }
        let os = OsLayer::new(
            &deno,
            &runtime_dir,
            cache.shared_dirs(),
            config.memory_mb,
            config.sandbox_uid,
        );
        let launcher = Arc::new(Launcher {
            deno,
            runtime_dir,
            cache,
            root,
            os,
            channel,
            egress_allow: config.egress_allow.clone(),
            deny_net: egress::denied_addresses(),
            heap_mb: config.heap_mb,
            max_log_bytes: config.max_log_bytes,
            extra_read: config.extra_read.clone(),
            preload_std: config.warm_pool_refill,
        });
        let pool = WarmPool::new(launcher.clone(), config.warm_pool, config.warm_pool_refill);
        Ok(Launching {
            launcher,
            pool,
            config,
        })
    }
}

impl Supervisor {
    pub fn new(
        store: Store,
        keys: SharedKeyRing,
        live: LiveRuns,
        channel: Arc<dyn ApiChannel>,
        config: RuntimeConfig,
    ) -> Result<Supervisor, RuntimeError> {
        Ok(Supervisor::with(
            Launching::start(channel, config)?,
            store,
            keys,
            live,
        ))
    }

    /// A supervisor over processes started before the store was opened.
    pub fn with(
        launching: Launching,
        store: Store,
        keys: SharedKeyRing,
        live: LiveRuns,
    ) -> Supervisor {
        let Launching {
            launcher,
            pool,
            config,
        } = launching;
        let inner = Arc::new(Inner {
            store,
            minter: Minter::start(keys.clone()),
            keys,
            live,
            launcher,
            slots: Slots::new(config.slots),
            pool,
            hot: HotPool::new(config.hot),
            max_log_bytes: config.max_log_bytes,
        });
        // Stops idle hot processes; ends with the supervisor.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.hot.reap();
            }
        });
        Supervisor { inner }
    }

    /// Which OS layer confines runs.
    pub fn os_layer(&self) -> LayerReport {
        self.inner.launcher.os.report()
    }

    /// Runs `program` exactly as confined as a run process (same OS layer,
    /// uid, limits, empty environment, a fresh run directory), to test the
    /// OS layer without needing a Deno bug.
    pub async fn run_confined(
        &self,
        program: &std::path::Path,
        args: &[String],
    ) -> Result<std::process::Output, RuntimeError> {
        let launcher = &self.inner.launcher;
        let dir = launcher.root.dir(launcher.os.owner())?;
        let confinement = launcher.os.confinement(dir.path(), &[])?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).env_clear().current_dir(dir.path());
        #[allow(unsafe_code)]
        // SAFETY: as for every run process: only async-signal-safe calls.
        unsafe {
            cmd.pre_exec(move || confinement.apply());
        }
        let output = cmd.output().await?;
        drop(dir);
        Ok(output)
    }

    /// The directory run processes live under.
    pub fn run_root(&self) -> &std::path::Path {
        self.inner.launcher.root.path()
    }

    /// The runtime's JavaScript (and the seed of Deno's cache).
    pub fn runtime_dir(&self) -> &std::path::Path {
        &self.inner.launcher.runtime_dir
    }

    /// Deno's cache shared by all runs (downloaded modules, npm packages).
    pub fn shared_deno_cache(&self) -> &std::path::Path {
        self.inner.launcher.cache.shared()
    }

    /// Hot processes of http vals alive right now.
    pub fn hot_processes(&self) -> usize {
        self.inner.hot.len()
    }

    /// Connections opened to hot processes so far (a busy val reuses its
    /// process's connections rather than open one per request).
    pub fn hot_connections_opened(&self) -> u64 {
        self.inner.hot.connections_opened()
    }

    /// Hot requests so far whose key was signed ahead of them.
    pub fn hot_keys_signed_ahead(&self) -> u64 {
        self.inner.minter.taken()
    }

    /// Warm processes ready right now.
    pub fn warm_ready(&self) -> usize {
        self.inner.pool.len()
    }

    /// Waits (up to `limit`) for runs in flight to end, then ends the warm
    /// processes.
    pub async fn drain(&self, limit: Duration) {
        self.inner.slots.drain(limit).await;
        self.inner.pool.close();
        self.inner.hot.clear();
        let launcher = &self.inner.launcher;
        launcher.root.remove();
    }

    /// A process for `spec`: a warm one when its code is stored, or one
    /// started now (on the blocking pool: a fork).
    async fn process_for(&self, spec: &RunSpec) -> Result<Started, RuntimeError> {
        let inner = &self.inner;
        let read = match &spec.source {
            Source::Code(_) => Vec::new(),
            Source::File(path) => {
                let dir = std::fs::canonicalize(path)?
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_default();
                vec![dir]
            }
        };
        // A warm process may take the run when it may read all the run
        // needs. A file's run (`valet run`, `valet dev`) waits for the one
        // already starting rather than starting a second; a stored val's
        // takes one only if it is ready (under a burst, starting more at
        // once beats waiting for the pool's one-at-a-time refill).
        let readable = read
            .iter()
            .all(|dir| inner.launcher.extra_read.iter().any(|r| dir.starts_with(r)));
        let warm = match (&spec.source, readable) {
            (Source::Code(_), _) => inner.pool.take(),
            (Source::File(_), true) => inner.pool.take_waiting(Duration::from_secs(5)).await,
            (Source::File(_), false) => None,
        };
        if let Some(started) = warm {
            return Ok(started);
        }
        // Forked from this task's runtime worker, never from the blocking
        // pool: a child's parent-death signal fires when the *thread* that
        // forked it exits, and idle blocking threads exit after seconds.
        inner.launcher.start(&read)
    }

    /// What every run does first, whatever triggered it: mint its key and
    /// make it live on the process's channel. Its row is written by
    /// [`Supervisor::record`] once its process is up (a failed start leaves
    /// no run behind).
    pub(crate) fn open_run(
        &self,
        spec: &RunSpec,
        channel: &ChannelId,
    ) -> Result<OpenRun, RuntimeError> {
        self.open_run_as(new_id("run"), spec, channel)
    }

    /// As [`Supervisor::open_run`], under a run id chosen before (a run
    /// claimed from a cluster's queue, whose row the claim made).
    fn open_run_as(
        &self,
        run_id: String,
        spec: &RunSpec,
        channel: &ChannelId,
    ) -> Result<OpenRun, RuntimeError> {
        let started_ms = time::now_ms();
        // The key dies at the run's deadline at the latest; the live-run
        // set kills it sooner when the run ends early.
        let key = KeyGrant::of(spec).mint(
            &self.inner.keys,
            &run_id,
            (started_ms / 1000) as u64,
            Duration::ZERO,
        )?;
        Ok(self.open_minted(run_id, key, spec, channel))
    }

    /// Makes a key minted for `run_id` live on `channel`: its run starts now.
    pub(crate) fn open_minted(
        &self,
        run_id: String,
        key: String,
        spec: &RunSpec,
        channel: &ChannelId,
    ) -> OpenRun {
        let inner = &self.inner;
        let started_ms = time::now_ms();
        let scopes = spec.scopes.intersect(ScopeSet::all());
        let guard = inner.live.begin(
            &key,
            LiveRun {
                run_id: run_id.clone(),
                user_id: spec.user_id.clone(),
                val_id: spec.val_id.clone(),
                scopes,
                channel: channel.clone(),
            },
        );
        let row = RunRow {
            id: run_id.clone(),
            user_id: spec.user_id.clone(),
            val_id: spec.val_id.clone(),
            trigger: spec.trigger,
            scopes,
            started_at: started_ms,
            deadline: started_ms + spec.timeout.as_millis() as i64,
        };
        OpenRun {
            run_id,
            key,
            guard,
            row,
        }
    }

    /// Queues a run's row for the store's writer (reads of runs wait for it).
    pub(crate) fn record(&self, row: RunRow) {
        self.inner.store.queue_run_start(RunStart {
            id: row.id,
            user_id: row.user_id,
            val_id: row.val_id,
            trigger: row.trigger.to_owned(),
            scopes: row.scopes,
            started_at: row.started_at,
            deadline: row.deadline,
        });
    }

    /// Queues a run's end; the receiver hears once it is written.
    pub(crate) fn record_end(
        &self,
        run_id: &str,
        outcome: Outcome,
        detail: &str,
        logs: String,
    ) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        self.inner.store.queue_run_end(RunEnd {
            id: run_id.to_owned(),
            outcome,
            detail: detail.to_owned(),
            logs,
            ended_at: time::now_ms(),
        })
    }

    /// Starts a run: a process, its record, its live key, its claim.
    pub(crate) async fn begin(
        &self,
        spec: &RunSpec,
        permit: SlotPermit,
    ) -> Result<Active, RuntimeError> {
        self.begin_as(new_id("run"), spec, permit).await
    }

    /// As [`Supervisor::begin`], under a run id chosen before.
    async fn begin_as(
        &self,
        run_id: String,
        spec: &RunSpec,
        permit: SlotPermit,
    ) -> Result<Active, RuntimeError> {
        let started = self.process_for(spec).await?;

        let OpenRun {
            run_id,
            key,
            guard,
            row,
        } = self.open_run_as(run_id, spec, &started.channel)?;
        self.record(row);

        let val_url = match &spec.source {
            Source::Code(code) => {
                let path = crate::launcher::write_val(&started.dir, code)?;
                launcher::file_url(&path)
            }
            Source::File(path) => launcher::file_url(&std::fs::canonicalize(path)?),
        };
        started.process.logs.add_secret(&key);
        let claim = serde_json::json!({
            "kind": spec.kind.as_str(),
            "valUrl": val_url,
            "env": run_env(spec, &key),
            "lastRunAt": spec.last_run_at.map(time::iso),
            "runId": run_id,
        });
        let Started {
            process,
            control,
            tasks,
            channel: _,
            dir,
        } = started;
        let events = control.claim(claim.to_string());
        let began = Instant::now();
        tracing::info!(
            run_id,
            kind = spec.kind.as_str(),
            trigger = spec.trigger,
            "run started"
        );
        Ok(Active {
            run_id,
            _guard: guard,
            process,
            _tasks: tasks,
            dir,
            events,
            began,
            deadline: began + spec.timeout,
            timeout: spec.timeout,
            _permit: permit,
        })
    }

    /// Ends the run: its key dies, then its record is written. The killed
    /// process is reaped (and its directory removed) behind the answer, its
    /// slot held until then.
    pub(crate) async fn finish(&self, active: Active, exit: Exit) -> RunOutput {
        let Active {
            run_id,
            _guard: guard,
            process,
            _tasks: tasks,
            dir,
            events,
            began,
            timeout,
            _permit: permit,
            ..
        } = active;
        let (outcome, detail) = executor::classify(exit, &events.now(), &run_id, timeout);
        let duration_ms = began.elapsed().as_millis() as u64;
        let logs = process.logs.finish();
        drop(guard);
        drop(tasks);
        tokio::spawn(async move {
            process.reap().await;
            drop(dir);
            drop(permit);
        });
        // Answered once the record is written: a caller that reads the run
        // next finds it ended.
        match self
            .record_end(&run_id, outcome, &detail, logs.clone())
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(run_id, error = %e, "could not record the end of a run"),
            Err(_) => tracing::error!(
                run_id,
                "the store closed before the end of a run was recorded"
            ),
        }
        // The replacement's start (a fork, then a Deno booting) competes
        // for the CPU: not before the run's end is written.
        self.inner.pool.refill();
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
        self.run_as(new_id("run"), spec).await
    }

    /// Runs a script or cron val to completion under `run_id`, an id given
    /// to it before it started (a cluster's queued run, whose record the
    /// claim made).
    pub async fn run_as(&self, run_id: String, spec: RunSpec) -> Result<RunOutput, RuntimeError> {
        let permit = self
            .inner
            .slots
            .acquire(&spec.user_id, None)
            .await
            .map_err(RuntimeError::Busy)?;
        let mut active = self.begin_as(run_id, &spec, permit).await?;
        // The run ends when its work has settled (the bootstrap says so
        // once Deno's event loop is empty) or its process exits, whichever
        // comes first.
        let mut events = active.events.clone();
        let settled = async move {
            if !events.wait_for(|r| r.done && r.settled).await {
                std::future::pending::<()>().await;
            }
        };
        let exit = active.process.wait(active.deadline, settled).await;
        Ok(self.finish(active, exit).await)
    }
}

/// The variables a run sees: its val's own, the valet key, the API URL.
/// They travel in the claim only, never in a process environment.
fn run_env(spec: &RunSpec, key: &str) -> BTreeMap<String, String> {
    let mut env = spec.env.clone();
    env.insert("valtown".into(), key.to_owned());
    env.insert("VAL_TOWN_API_KEY".into(), key.to_owned());
    env.insert("VALTOWN_API_URL".into(), API_ORIGIN.into());
    env
}

/// A hot process's variables: its val's own and the API URL. Each
/// request's key is added per request, inside the bootstrap.
pub(crate) fn run_env_without_key(spec: &RunSpec) -> BTreeMap<String, String> {
    let mut env = spec.env.clone();
    env.insert("VALTOWN_API_URL".into(), API_ORIGIN.into());
    env
}
