//! One process hosting valet: the API on a TCP listener, the supervisor
//! behind it, the cron scheduler and the mailer. `valet serve`, `valet run`
//! and `valet dev` all start one of these; tests do too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use valet_api::{ApiConfig, AppState};
use valet_core::LiveRuns;
use valet_store::Store;

use valet_runtime::{EgressAllow, RuntimeConfig, RuntimeError, Scheduler, Supervisor};

use crate::SupervisorRunner;
use crate::mailer::{self, SmtpRelay};

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub listen: SocketAddr,
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
    /// Deno processes kept warm for stored script and cron vals.
    pub warm_pool: usize,
    /// How often the signing keys are read back from the store, so a
    /// `valet keys rotate` reaches a running server (SIGHUP: at once).
    pub key_refresh: Duration,
}

impl HostConfig {
    pub fn new(listen: SocketAddr) -> HostConfig {
        HostConfig {
            listen,
            smtp: None,
            egress_allow: Vec::new(),
            cron: true,
            api: ApiConfig::default(),
            heap_mb: 128,
            deno_dir: None,
            recover_lost_runs: false,
            warm_pool: 0,
            key_refresh: crate::keys::REFRESH_EVERY,
        }
    }
}

pub struct Host {
    pub addr: SocketAddr,
    pub supervisor: Supervisor,
    pub store: Store,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
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
}

impl Host {
    pub async fn start(store: Store, config: HostConfig) -> Result<Host, HostError> {
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
        if config.recover_lost_runs {
            let lost = store.call(|s| s.mark_lost_runs()).await?;
            if lost > 0 {
                tracing::warn!(lost, "marked runs of a previous supervisor as lost");
            }
        }
        let live = LiveRuns::new();
        let mut api = config.api.clone();
        if api.public_url == ApiConfig::default().public_url {
            api.public_url = format!("http://{addr}");
        }
        let state = AppState::new(store.clone(), live.clone(), api)?;
        let mut runtime = RuntimeConfig::new(addr);
        runtime.egress_allow = config.egress_allow.clone();
        runtime.heap_mb = config.heap_mb;
        runtime.deno_dir = config.deno_dir.clone();
        runtime.warm_pool = config.warm_pool;
        let supervisor = Supervisor::new(store.clone(), state.keys.clone(), live, runtime)?;
        let state = state.with_runner(Arc::new(SupervisorRunner(supervisor.clone())));

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
        tasks.spawn(crate::keys::refresh(
            store.clone(),
            state.keys.clone(),
            config.key_refresh,
            shutdown.subscribe(),
        ));
        if config.cron {
            let scheduler = Scheduler::new(store.clone(), supervisor.clone());
            tasks.spawn(scheduler.run(Duration::from_secs(1), shutdown.subscribe()));
        }
        if let Some(url) = &config.smtp {
            let relay = SmtpRelay::parse(url).map_err(HostError::Smtp)?;
            tasks.spawn(mailer::run(store.clone(), relay, shutdown.subscribe()));
        }
        tracing::info!(%addr, "valet is listening");
        Ok(Host {
            addr,
            supervisor,
            store,
            state,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting requests, lets runs in flight end (bounded), and
    /// waits for every task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        self.supervisor.drain(Duration::from_secs(30)).await;
        while self.tasks.join_next().await.is_some() {}
        self.store.flush_audit();
    }
}
