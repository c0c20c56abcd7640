//! One process hosting valet: the API and pages on one listener, http vals
//! on a listener (an origin) of their own, the supervisor behind both with
//! each run's API channel, the cron scheduler and the mailer. `valet serve`,
//! `valet run` and `valet dev` all start one of these; tests do too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use valet_api::{ApiConfig, AppState};
use valet_core::LiveRuns;
use valet_store::Store;

use valet_runtime::{
    ApiChannel, BoxFuture, EgressAllow, Launching, RuntimeConfig, RuntimeError, Scheduler,
    SlotLimits, Supervisor,
};

use crate::SupervisorRunner;
use crate::cluster::{Cluster, ClusterConfig};
use crate::mailer::{self, SmtpRelay};

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub listen: SocketAddr,
    /// The origin of http vals: never the pages' own.
    pub vals_listen: SocketAddr,
    pub smtp: Option<String>,
    pub egress_allow: Vec<EgressAllow>,
    pub cron: bool,
    pub api: ApiConfig,
    pub heap_mb: u64,
    pub deno_dir: Option<std::path::PathBuf>,
    /// Mark runs left `running` by a dead supervisor as `lost`. Only the
    /// long-lived server does this: a `valet run` beside a live `valet
    /// serve` on the same data dir must not declare the server's runs lost.
    pub recover_lost_runs: bool,
    /// Deno processes kept started ahead of time.
    pub warm_pool: usize,
    /// Whether a warm process taken is replaced (`valet run`: no).
    pub warm_pool_refill: bool,
    /// Directories every run process may read (`valet run`/`valet dev`:
    /// the file's own).
    pub extra_read: Vec<std::path::PathBuf>,
    /// Whole-process memory cap per run, in MiB.
    pub memory_mb: u64,
    pub slots: SlotLimits,
    /// Join the cluster of a shared store as a node (`valet serve`): run
    /// queued runs, fire cron, heartbeat. `None`: a process of its own
    /// (`valet run`, `valet dev`, tests), which runs its runs itself.
    pub cluster: Option<ClusterConfig>,
    /// How often the signing keys are read back from the store, so a
    /// `valet keys rotate` reaches a running server (SIGHUP: at once).
    pub key_refresh: Duration,
}

impl HostConfig {
    pub fn new(listen: SocketAddr) -> HostConfig {
        HostConfig {
            listen,
            vals_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            smtp: None,
            egress_allow: Vec::new(),
            cron: true,
            api: ApiConfig::default(),
            heap_mb: 128,
            deno_dir: None,
            recover_lost_runs: false,
            warm_pool: 0,
            warm_pool_refill: true,
            extra_read: Vec::new(),
            memory_mb: RuntimeConfig::default().memory_mb,
            slots: SlotLimits::default(),
            cluster: None,
            key_refresh: crate::keys::REFRESH_EVERY,
        }
    }
}

/// Serves `/v1` on a run's API socket, stamped with its channel.
struct Channel {
    /// Set once the supervisor exists (the app needs it as its runner, and
    /// the supervisor needs this channel); a warm process started before
    /// waits for it.
    app: watch::Receiver<Option<axum::Router>>,
}

impl ApiChannel for Channel {
    fn serve(
        &self,
        listener: tokio::net::UnixListener,
        channel: valet_core::ChannelId,
    ) -> BoxFuture<()> {
        let mut app = self.app.clone();
        Box::pin(async move {
            let Ok(app) = app.wait_for(Option::is_some).await.map(|a| a.clone()) else {
                return;
            };
            let Some(app) = app else { return };
            let app = valet_api::channel_service(app, channel);
            if let Err(e) = axum::serve(listener, app).await {
                tracing::debug!(error = %e, "a run's API channel stopped");
            }
        })
    }
}

pub struct Host {
    pub addr: SocketAddr,
    /// Where http vals answer: `http://{vals_addr}/{user}/{val}`.
    pub vals_addr: SocketAddr,
    pub supervisor: Supervisor,
    pub store: Store,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    /// The API served on run channels; cleared at shutdown, which breaks
    /// the cycle supervisor -> channel -> API -> supervisor.
    channel_app: watch::Sender<Option<axum::Router>>,
    tasks: JoinSet<()>,
    /// This process as a node of a cluster, when the store is shared.
    pub cluster: Option<Cluster>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "could not listen on {addr}: {source} (is another valet running? pick another --listen)"
    )]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] valet_store::StoreError),
    #[error("invalid --smtp: {0}")]
    Smtp(String),
    #[error(
        "the API listens on {0}, a wildcard address other nodes cannot reach: give --node-address, e.g. http://10.0.0.11:7070"
    )]
    NodeAddress(SocketAddr),
}

/// The URL the other nodes reach this node at: as configured, or the
/// address the API listens on.
fn node_address(node: &ClusterConfig, listening: SocketAddr) -> Result<String, HostError> {
    match &node.address {
        Some(address) => Ok(address.trim_end_matches('/').to_owned()),
        None if listening.ip().is_unspecified() => Err(HostError::NodeAddress(listening)),
        None => Ok(format!("http://{listening}")),
    }
}

impl Host {
    pub async fn start(store: Store, config: HostConfig) -> Result<Host, HostError> {
        Host::prepare(config)?.start(store).await
    }

    /// Starts the run processes the host keeps ready (the warm pool), before
    /// its store is open; [`Prepared::start`] opens the rest. `valet run`
    /// opens its store while its run's Deno starts.
    pub fn prepare(config: HostConfig) -> Result<Prepared, HostError> {
        let runtime = RuntimeConfig {
            egress_allow: config.egress_allow.clone(),
            heap_mb: config.heap_mb,
            memory_mb: config.memory_mb,
            deno_dir: config.deno_dir.clone(),
            warm_pool: config.warm_pool,
            warm_pool_refill: config.warm_pool_refill,
            extra_read: config.extra_read.clone(),
            slots: config.slots,
            ..RuntimeConfig::default()
        };
        let (channel_app, app) = watch::channel(None);
        let launching = Launching::start(Arc::new(Channel { app }), runtime)?;
        Ok(Prepared {
            config,
            launching,
            channel_app,
        })
    }
}

/// A host whose run processes are starting and whose store is not open yet.
pub struct Prepared {
    config: HostConfig,
    launching: Launching,
    channel_app: watch::Sender<Option<axum::Router>>,
}

impl Prepared {
    /// Opens the listeners and everything else on `store`.
    pub async fn start(self, store: Store) -> Result<Host, HostError> {
        let Prepared {
            config,
            launching,
            channel_app,
        } = self;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| HostError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| HostError::Listen {
            addr: config.listen,
            source,
        })?;
        let live = LiveRuns::new();
        let mut api = config.api.clone();
        if api.public_url == ApiConfig::default().public_url {
            api.public_url = format!("http://{addr}");
        }
        let state = AppState::new(store.clone(), live.clone(), api)?;
        let supervisor = Supervisor::with(launching, store.clone(), state.keys.clone(), live);
        // On a shared store, other nodes' runs are `running` too: lost runs
        // are found by their nodes' leases instead. (Before any run of this
        // supervisor: none starts until `start` returns.)
        if config.recover_lost_runs && !store.is_shared() {
            let lost = store.call(|s| s.mark_lost_runs()).await?;
            if lost > 0 {
                tracing::warn!(lost, "marked runs of a previous supervisor as lost");
            }
        }
        let cluster = match &config.cluster {
            Some(node) if store.is_shared() => {
                let mut node = node.clone();
                node.address = Some(node_address(&node, addr)?);
                Some(Cluster::join(store.clone(), supervisor.clone(), node).await?)
            }
            _ => None,
        };
        let runner: Arc<dyn valet_api::Runner> = match &cluster {
            Some(cluster) => Arc::new(cluster.runner()),
            None => Arc::new(SupervisorRunner(supervisor.clone())),
        };
        let mut state = state.with_runner(runner);
        if let Some(cluster) = &cluster {
            state = state.with_sqlite_homes(cluster.sqlite_homes())?;
        }
        channel_app.send_replace(Some(valet_api::channel_app(state.clone())));
        let layer = supervisor.os_layer();
        if layer.landlock_abi.is_none() {
            tracing::warn!(%layer, "runs are confined by Deno's permissions alone: this kernel has no Landlock");
        } else {
            tracing::info!(%layer, "runs are confined by Deno's permissions and the OS layer");
        }
        let vals_listener = TcpListener::bind(config.vals_listen)
            .await
            .map_err(|source| HostError::Listen {
                addr: config.vals_listen,
                source,
            })?;
        let vals_addr = vals_listener
            .local_addr()
            .map_err(|source| HostError::Listen {
                addr: config.vals_listen,
                source,
            })?;

        let (shutdown, _) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut rx = shutdown.subscribe();
        let server_state = state.clone();
        tasks.spawn(async move {
            let stop = async move {
                let _ = rx.changed().await;
            };
            if let Err(e) = valet_api::serve(listener, server_state, stop).await {
                tracing::error!(error = %e, "API server failed");
            }
        });
        let mut rx = shutdown.subscribe();
        let vals_app = valet_api::vals_app(state.clone());
        tasks.spawn(async move {
            let stop = async move {
                let _ = rx.changed().await;
            };
            let served = axum::serve(
                vals_listener,
                vals_app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stop)
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the vals listener failed");
            }
        });
        tasks.spawn(crate::keys::refresh(
            store.clone(),
            state.keys.clone(),
            config.key_refresh,
            shutdown.subscribe(),
        ));
        if let Some(cluster) = &cluster {
            cluster.spawn(&mut tasks, &shutdown, config.cron);
        } else if config.cron {
            let scheduler = Scheduler::new(store.clone(), supervisor.clone());
            tasks.spawn(scheduler.run(Duration::from_secs(1), shutdown.subscribe()));
        }
        if let Some(url) = &config.smtp {
            let relay = SmtpRelay::parse(url).map_err(HostError::Smtp)?;
            tasks.spawn(mailer::run(store.clone(), relay, shutdown.subscribe()));
        }
        tracing::info!(%addr, %vals_addr, "valet is listening");
        Ok(Host {
            addr,
            vals_addr,
            supervisor,
            store,
            state,
            shutdown,
            channel_app,
            tasks,
            cluster,
        })
    }
}

impl Host {
    /// Stops accepting requests, lets runs in flight end (bounded), and
    /// waits for every task.
    pub async fn shutdown(self) {
        self.shutdown_within(Duration::from_secs(30)).await;
    }

    /// As [`Host::shutdown`], waiting at most `limit` for runs in flight
    /// (and for killed processes to be torn down). `valet run` gives zero:
    /// its one run has ended, and its process is killed already.
    pub async fn shutdown_within(mut self, limit: Duration) {
        let _ = self.shutdown.send(true);
        self.supervisor.drain(limit).await;
        self.channel_app.send_replace(None);
        while self.tasks.join_next().await.is_some() {}
        if let Some(cluster) = &self.cluster {
            cluster.leave().await;
        }
        self.store.flush_audit();
    }
}
