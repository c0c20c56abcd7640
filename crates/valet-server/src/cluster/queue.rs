//! Runs through the cluster's queue: the API's runner queues a run and
//! waits for its end (told by NOTIFY, checked by a slow poll as well); the
//! worker claims queued runs while this node has free capacity and runs
//! each under the id it was queued with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinSet;
use valet_api::{BoxFuture, RunRefused, RunSummary, Runner};
use valet_runtime::RunSpec;
use valet_store::{ClaimedRun, Outcome, Val};

use super::Cluster;
use crate::SupervisorRunner;

/// How long a queued run may wait for a node before the caller is told
/// the cluster is busy.
const QUEUE_WAIT: Duration = Duration::from_secs(30);
/// How often a waiter or the worker looks again without being told.
const POLL: Duration = Duration::from_millis(500);

/// Callers waiting for runs to end, by run id.
#[derive(Default)]
pub(super) struct Waiters {
    /// A std `Mutex`: held for a map update, never across an `.await`.
    map: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

impl Waiters {
    fn register(&self, run_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.map.lock() {
            map.insert(run_id.to_owned(), tx);
        }
        rx
    }

    pub(super) fn wake(&self, run_id: &str) {
        let waiter = self.map.lock().ok().and_then(|mut m| m.remove(run_id));
        if let Some(tx) = waiter {
            let _ = tx.send(());
        }
    }

    fn forget(&self, run_id: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(run_id);
        }
    }
}

/// The API's [`Runner`] on a cluster node: script and cron runs go
/// through the queue (any node may run them); http vals run here.
#[derive(Clone)]
pub struct ClusterRunner {
    cluster: Cluster,
    local: SupervisorRunner,
}

impl ClusterRunner {
    pub(super) fn new(cluster: Cluster) -> ClusterRunner {
        let local = SupervisorRunner(cluster.shared.supervisor.clone());
        ClusterRunner { cluster, local }
    }

    async fn queue_and_wait(
        &self,
        val: Val,
        trigger: &'static str,
    ) -> Result<RunSummary, RunRefused> {
        let shared = &self.cluster.shared;
        let run_id = valet_store::new_id("run");
        let mut done = shared.waiters.register(&run_id);
        // However this call ends (a dropped request, too), stop waiting.
        struct Forget<'a>(&'a Waiters, &'a str);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.forget(self.1);
            }
        }
        let _forget = Forget(&shared.waiters, &run_id);
        let failed = |e: valet_store::StoreError| RunRefused::Failed(e.to_string());
        let (id, user, val_id) = (run_id.clone(), val.user_id.clone(), val.id.clone());
        shared
            .store
            .call(move |s| s.enqueue_run(&id, &user, &val_id, trigger))
            .await
            .map_err(failed)?;
        let began = Instant::now();
        let limit = QUEUE_WAIT + Duration::from_millis(val.timeout_ms.max(0) as u64) + POLL * 20;
        let mut told = false;
        loop {
            let id = run_id.clone();
            let record = shared
                .store
                .call(move |s| s.run_by_id(&id))
                .await
                .map_err(failed)?;
            match record {
                Some(run) if run.outcome != Outcome::Running => {
                    return Ok(RunSummary {
                        run_id: run.id,
                        outcome: run.outcome,
                        logs: run.logs,
                        duration_ms: run.duration_ms.unwrap_or(0).max(0) as u64,
                    });
                }
                None if began.elapsed() > QUEUE_WAIT => {
                    let id = run_id.clone();
                    if shared
                        .store
                        .call(move |s| s.cancel_queued_run(&id))
                        .await
                        .map_err(failed)?
                    {
                        return Err(RunRefused::Busy {
                            message: format!(
                                "no node of the cluster had room for the run within {} s",
                                QUEUE_WAIT.as_secs()
                            ),
                            retry_after: 5,
                        });
                    }
                }
                _ if began.elapsed() > limit => {
                    return Err(RunRefused::Failed(format!(
                        "run {run_id} did not end within {limit:?}"
                    )));
                }
                _ => {}
            }
            tokio::select! {
                _ = &mut done, if !told => told = true,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

impl Runner for ClusterRunner {
    fn run_val(
        &self,
        val: Val,
        trigger: &'static str,
    ) -> BoxFuture<'_, Result<RunSummary, RunRefused>> {
        Box::pin(self.queue_and_wait(val, trigger))
    }

    fn serve_http(&self, val: Val, request: Request<Body>) -> BoxFuture<'_, Response<Body>> {
        self.local.serve_http(val, request)
    }
}

/// Claims queued runs while this node has room, and runs them, until
/// `shutdown`; then lets the runs in flight end.
pub(super) async fn work(cluster: Cluster, mut shutdown: watch::Receiver<bool>) {
    let shared = &cluster.shared;
    let room = Arc::new(Semaphore::new(shared.config.capacity));
    let mut running = JoinSet::new();
    loop {
        let free = room.available_permits();
        if free > 0 {
            let node = shared.node_id.clone();
            match shared.store.call(move |s| s.claim_runs(&node, free)).await {
                Ok(claimed) => {
                    for run in claimed {
                        let Ok(permit) = room.clone().try_acquire_owned() else {
                            break;
                        };
                        let cluster = cluster.clone();
                        running.spawn(async move {
                            run_claimed(&cluster, run).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not claim queued runs"),
            }
        }
        tokio::select! {
            _ = shared.queued.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    while running.join_next().await.is_some() {}
}

/// Runs a claimed run; one that cannot start ends `failed` with the reason.
async fn run_claimed(cluster: &Cluster, run: ClaimedRun) {
    let shared = &cluster.shared;
    let val_id = run.val_id.clone();
    let why = match shared.store.call(move |s| s.val_by_id(&val_id)).await {
        Ok(Some(val)) => {
            let trigger = if run.trigger == "cron" { "cron" } else { "api" };
            match shared
                .supervisor
                .run_as(run.run_id.clone(), RunSpec::for_val(&val, trigger))
                .await
            {
                Ok(_) => return,
                Err(e) => format!("the run could not start: {e}"),
            }
        }
        Ok(None) => "the val was deleted before its run started".to_owned(),
        Err(e) => format!("the val could not be read: {e}"),
    };
    tracing::warn!(
        run_id = run.run_id,
        why,
        "a claimed run ended before it started"
    );
    let id = run.run_id.clone();
    if let Err(e) = shared
        .store
        .call(move |s| s.finish_run(&id, Outcome::Failed, &why, ""))
        .await
    {
        tracing::error!(run_id = run.run_id, error = %e, "could not record a failed start");
    }
}
