//! The scheduler of cron vals: each tick, every cron val whose next time
//! has come is run, never two runs of one val at once. After downtime a
//! val runs once, not once per missed slot.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use valet_store::{Store, time};

use crate::supervisor::{RunSpec, Supervisor};

pub struct Scheduler {
    store: Store,
    supervisor: Supervisor,
    /// Vals with a run in flight. A std `Mutex`: held for a set update only.
    running: Arc<Mutex<HashSet<String>>>,
}

impl Scheduler {
    pub fn new(store: Store, supervisor: Supervisor) -> Scheduler {
        Scheduler {
            store,
            supervisor,
            running: Arc::default(),
        }
    }

    /// Ticks every `every` until `shutdown` changes.
    pub async fn run(self, every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            if let Err(e) = self.tick(&mut tasks).await {
                tracing::warn!(error = %e, "cron tick failed");
            }
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => break,
            }
        }
        // Let runs in flight finish; each is bounded by its own timeout.
        while tasks.join_next().await.is_some() {}
    }

    async fn tick(
        &self,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<(), valet_store::StoreError> {
        let vals = self.store.call(|s| s.cron_vals()).await?;
        let now = time::now_ms();
        for val in vals {
            // A stored schedule that no longer parses reads as none (the
            // store warns): such a val waits for a new schedule.
            let Some(schedule) = &val.schedule else {
                continue;
            };
            let since = val
                .last_run_at
                .unwrap_or(val.updated_at.max(val.created_at));
            let due = schedule.next_after(since).is_some_and(|next| next <= now);
            if !due {
                continue;
            }
            let claimed = self
                .running
                .lock()
                .map(|mut r| r.insert(val.id.clone()))
                .unwrap_or(false);
            if !claimed {
                continue;
            }
            let supervisor = self.supervisor.clone();
            let running = self.running.clone();
            tasks.spawn(async move {
                let id = val.id.clone();
                if let Err(e) = supervisor.run(RunSpec::for_val(&val, "cron")).await {
                    tracing::error!(val_id = id, error = %e, "cron run could not start");
                }
                if let Ok(mut r) = running.lock() {
                    r.remove(&id);
                }
            });
        }
        Ok(())
    }
}
