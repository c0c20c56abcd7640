//! A node of a cluster: several `valet serve` processes on one PostgreSQL
//! control plane. Each node holds a lease it renews by heartbeat and reaps
//! the nodes whose lease ran out (their runs become `lost`); claims queued
//! runs while it has free capacity; fires cron ticks (each exactly once in
//! the cluster); and hears the others through LISTEN/NOTIFY. http requests
//! are served by the node that receives them, as on one machine.
//!
//! Each user's SQLite database has one home node at a time (`homes.rs`):
//! the node holds it under its lease, with a fencing token, and the other
//! nodes forward that user's sqlite calls to it.
//!
//! Token checks go through each node's token cache; the listener here is
//! what keeps it honest: the store's `listen` empties the cache on every
//! token change any node makes, and on connecting and losing the
//! connection, and trusts entries for longer than a second only while the
//! connection answers (`valet_store::TokenCache`).

mod cron;
mod homes;
mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use valet_runtime::Supervisor;
use valet_store::{ClusterEvent, Store, StoreError};

pub use homes::NodeHomes;
pub use queue::ClusterRunner;

/// How a node takes part in its cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id; a fresh one when `None`.
    pub node_id: Option<String>,
    /// How long this node counts as alive after each heartbeat; after it,
    /// the others mark its runs lost. Heartbeats go every third of it.
    pub lease: Duration,
    /// Queued runs this node runs at once.
    pub capacity: usize,
    /// The URL the other nodes reach this node's API at (they forward the
    /// sqlite calls of users whose home it is). `None`: `http://` and the
    /// address the API listens on, which must then not be a wildcard.
    pub address: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            node_id: None,
            lease: Duration::from_secs(10),
            capacity: 8,
            address: None,
        }
    }
}

/// This process as a node of its cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    supervisor: Supervisor,
    node_id: String,
    config: ClusterConfig,
    waiters: queue::Waiters,
    /// Woken when any node queues a run.
    queued: Notify,
    /// Ends the LISTEN thread.
    stop_listening: Arc<AtomicBool>,
    /// The users' databases this node is the home of; told of each
    /// heartbeat.
    homes: Arc<NodeHomes>,
}

impl Cluster {
    /// Joins the cluster: names this node in the store and takes its lease.
    pub async fn join(
        store: Store,
        supervisor: Supervisor,
        config: ClusterConfig,
    ) -> Result<Cluster, StoreError> {
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| valet_store::new_id("node"));
        store.set_node_id(&node_id);
        if let Some(address) = &config.address {
            store.set_node_address(address);
        }
        let (id, lease) = (node_id.clone(), config.lease);
        let sent = Instant::now();
        let kept = store.call(move |s| s.heartbeat(&id, lease)).await?;
        // Homes held under this id in an earlier life are taken afresh,
        // with new fences.
        let id = node_id.clone();
        store.call(move |s| s.release_sqlite_homes(&id)).await?;
        let homes = Arc::new(NodeHomes::new(store.clone(), node_id.clone(), lease));
        homes.renewed(sent, kept);
        tracing::info!(node_id, lease = ?config.lease, capacity = config.capacity, address = config.address, "joined the cluster");
        Ok(Cluster {
            shared: Arc::new(Shared {
                store,
                supervisor,
                node_id,
                config,
                waiters: queue::Waiters::default(),
                queued: Notify::new(),
                stop_listening: Arc::new(AtomicBool::new(false)),
                homes,
            }),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// Where users' SQLite databases live, for the API.
    pub fn sqlite_homes(&self) -> Arc<NodeHomes> {
        self.shared.homes.clone()
    }

    /// The API's runner on this node: runs go through the queue.
    pub fn runner(&self) -> ClusterRunner {
        ClusterRunner::new(self.clone())
    }

    /// Starts the node's tasks (heartbeat and reaping, the queue worker,
    /// cron when `cron`, the listener); each ends when `shutdown` fires.
    pub fn spawn(&self, tasks: &mut JoinSet<()>, shutdown: &watch::Sender<bool>, cron: bool) {
        tasks.spawn(self.clone().heartbeats(shutdown.subscribe()));
        tasks.spawn(queue::work(self.clone(), shutdown.subscribe()));
        if cron {
            tasks.spawn(cron::run(self.clone(), shutdown.subscribe()));
        }
        let this = self.clone();
        tasks.spawn_blocking(move || this.listen());
        let (stop, mut rx) = (self.shared.stop_listening.clone(), shutdown.subscribe());
        tasks.spawn(async move {
            let _ = rx.changed().await;
            stop.store(true, Ordering::Relaxed);
        });
    }

    /// Leaves the cluster after the runs in flight have drained: the lease
    /// ends now rather than running out.
    pub async fn leave(&self) {
        let id = self.shared.node_id.clone();
        match self.shared.store.call(move |s| s.leave_cluster(&id)).await {
            Ok(0) => tracing::info!(node_id = self.shared.node_id, "left the cluster"),
            Ok(lost) => tracing::warn!(lost, "left the cluster with runs still going: marked lost"),
            Err(e) => {
                tracing::warn!(error = %e, "could not leave the cluster; its lease will run out")
            }
        }
    }

    /// Renews the lease every third of it and reaps nodes whose lease ran
    /// out, until `shutdown`.
    async fn heartbeats(self, mut shutdown: watch::Receiver<bool>) {
        let shared = &self.shared;
        let every = shared.config.lease / 3;
        loop {
            let (id, lease) = (shared.node_id.clone(), shared.config.lease);
            let sent = Instant::now();
            match shared.store.call(move |s| s.heartbeat(&id, lease)).await {
                Ok(kept) => {
                    shared.homes.renewed(sent, kept);
                    if !kept {
                        tracing::error!(
                            node_id = shared.node_id,
                            "this node's lease had run out (its users' SQLite homes were released; if survivors noticed, its runs were marked lost); it holds a new lease now"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
            match shared.store.call(|s| s.reap_dead_nodes()).await {
                Ok(dead) => {
                    for node in dead {
                        tracing::warn!(
                            node_id = node.node_id,
                            lost_runs = node.lost_runs,
                            "a node stopped heartbeating: its runs are lost"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not reap dead nodes"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Hears the other nodes (on a blocking thread: the connection waits),
    /// reconnecting after a failure, until told to stop.
    fn listen(self) {
        let shared = &self.shared;
        while !shared.stop_listening.load(Ordering::Relaxed) {
            let result = shared
                .store
                .listen(&shared.stop_listening, |event| match event {
                    ClusterEvent::RunQueued => shared.queued.notify_one(),
                    ClusterEvent::RunDone(run_id) => shared.waiters.wake(&run_id),
                });
            if let Err(e) = result {
                tracing::warn!(error = %e, "lost the notification connection; reconnecting");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
