//! The store's side of a cluster (the control plane on PostgreSQL): node
//! leases kept alive by heartbeats, the run queue that nodes claim from
//! with `FOR UPDATE SKIP LOCKED`, cron ticks recorded once per val and
//! slot, and notifications (LISTEN/NOTIFY) that wake the nodes.
//!
//! Lease times are the database's clock (`now()`), never a node's, so
//! nodes whose clocks disagree still agree on who is alive.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::sql::{Dialect, Sql, args};
use crate::{Store, StoreError, time};

/// A notification channel: a run was queued.
const QUEUED: &str = "valet_run_queued";
/// A notification channel: a run ended; the payload is its id.
pub(crate) const DONE: &str = "valet_run_done";
/// A notification channel: an API token changed (see `tokens::changed`).
pub(crate) const TOKENS: &str = "valet_token_changed";

/// What a node hears from the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A run was queued: a node with free capacity may claim it.
    RunQueued,
    /// A run ended (or was lost).
    RunDone(String),
}

/// A run a node took from the queue. Its run record exists already
/// (`running`, on this node); the node now starts it under `run_id`.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub run_id: String,
    pub user_id: String,
    pub val_id: String,
    pub trigger: String,
}

/// Runs of a node that stopped heartbeating, marked lost by a survivor.
#[derive(Debug, Clone)]
pub struct DeadNode {
    pub node_id: String,
    pub lost_runs: u64,
}

impl Store {
    fn require_shared(&self) -> Result<(), StoreError> {
        if self.is_shared() {
            Ok(())
        } else {
            Err(StoreError::Invalid(
                "cluster work needs the control plane on PostgreSQL (--database postgres://...)"
                    .into(),
            ))
        }
    }

    /// Takes (or renews) this node's lease: alive for `lease` from now,
    /// by the database's clock. Returns false when the lease had run out,
    /// by the database's clock (which a node's own cannot tell after, say,
    /// its machine was suspended): its users' SQLite homes are released
    /// (others may have taken them meanwhile) and, if survivors had already
    /// declared it dead, its runs are `lost`. The node is alive again from
    /// this call on.
    pub fn heartbeat(&self, node_id: &str, lease: Duration) -> Result<bool, StoreError> {
        self.require_shared()?;
        let lease_ms = lease.as_millis() as i64;
        let address = self.node_address().map(str::to_owned);
        self.db_write(|sql| {
            let renewed = sql.execute(
                "UPDATE nodes SET heartbeat_at = now(), lease_ms = ?2, address = ?3
                 WHERE id = ?1 AND heartbeat_at + lease_ms * interval '1 millisecond' >= now()",
                args![node_id, lease_ms, address],
            )?;
            if renewed == 1 {
                return Ok(true);
            }
            let lapsed = sql.execute(
                "UPDATE nodes SET heartbeat_at = now(), lease_ms = ?2, address = ?3 WHERE id = ?1",
                args![node_id, lease_ms, address],
            )?;
            if lapsed == 1 {
                crate::sqlite_homes::release_in(sql, node_id)?;
                return Ok(false);
            }
            sql.execute(
                "INSERT INTO nodes (id, started_at, heartbeat_at, lease_ms, address)
                 VALUES (?1, ?2, now(), ?3, ?4)",
                args![node_id, time::now_ms(), lease_ms, address],
            )?;
            Ok(false)
        })
    }

    /// Declares dead every node whose lease ran out, marks its runs
    /// still `running` as `lost` and releases its users' SQLite homes. Each dead node is reaped by exactly one
    /// survivor (the row lock of the `DELETE` decides).
    pub fn reap_dead_nodes(&self) -> Result<Vec<DeadNode>, StoreError> {
        self.require_shared()?;
        self.db_write(|sql| {
            let dead: Vec<String> = sql.query_map(
                "DELETE FROM nodes WHERE heartbeat_at < now() - lease_ms * interval '1 millisecond'
                 RETURNING id",
                args![],
                |r| r.get(0),
            )?;
            let mut out = Vec::with_capacity(dead.len());
            for node_id in dead {
                crate::sqlite_homes::release_in(sql, &node_id)?;
                let lost = mark_lost(
                    sql,
                    &node_id,
                    "its node stopped heartbeating during the run",
                )?;
                out.push(DeadNode {
                    node_id,
                    lost_runs: lost,
                });
            }
            Ok(out)
        })
    }

    /// A node leaving on purpose: its lease ends now, its users' SQLite
    /// homes are released, and any of its runs still `running` (none,
    /// after a drain) are `lost`.
    pub fn leave_cluster(&self, node_id: &str) -> Result<u64, StoreError> {
        self.require_shared()?;
        self.db_write(|sql| {
            sql.execute("DELETE FROM nodes WHERE id = ?1", args![node_id])?;
            crate::sqlite_homes::release_in(sql, node_id)?;
            mark_lost(sql, node_id, "its node shut down during the run")
        })
    }

    /// Nodes holding a live lease, by id.
    pub fn live_nodes(&self) -> Result<Vec<String>, StoreError> {
        self.require_shared()?;
        self.db_read(|sql| {
            sql.query_map(
                "SELECT id FROM nodes WHERE heartbeat_at >= now() - lease_ms * interval '1 millisecond'
                 ORDER BY id",
                args![],
                |r| r.get(0),
            )
        })
    }

    /// Queues a run of a stored val; any node may claim it.
    pub fn enqueue_run(
        &self,
        run_id: &str,
        user_id: &str,
        val_id: &str,
        trigger: &str,
    ) -> Result<(), StoreError> {
        self.require_shared()?;
        self.db_write(|sql| queue_in(sql, run_id, user_id, val_id, trigger))
    }

    /// Takes a run out of the queue before any node claimed it. False when
    /// a node has it already.
    pub fn cancel_queued_run(&self, run_id: &str) -> Result<bool, StoreError> {
        self.require_shared()?;
        self.db_write(|sql| {
            Ok(sql.execute("DELETE FROM run_queue WHERE id = ?1", args![run_id])? == 1)
        })
    }

    /// Claims up to `max` queued runs for `node_id`, oldest first. In the
    /// same transaction each leaves the queue and gets its run record
    /// (`running`, on this node), so a run is claimed by exactly one node
    /// and, from then on, either ends or is marked lost with its node.
    pub fn claim_runs(&self, node_id: &str, max: usize) -> Result<Vec<ClaimedRun>, StoreError> {
        self.require_shared()?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let now = time::now_ms();
        self.db_write(|sql| {
            let claimed: Vec<ClaimedRun> = sql.query_map(
                "DELETE FROM run_queue WHERE id IN (
                     SELECT id FROM run_queue ORDER BY enqueued_at, id LIMIT ?1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, user_id, val_id, trigger",
                args![max as i64],
                |r| {
                    Ok(ClaimedRun {
                        run_id: r.get(0)?,
                        user_id: r.get(1)?,
                        val_id: r.get(2)?,
                        trigger: r.get(3)?,
                    })
                },
            )?;
            for run in &claimed {
                let started = sql.execute(
                    "INSERT INTO runs (id, user_id, val_id, trigger, scopes, status, started_at, deadline, node_id)
                     SELECT ?1, ?2, v.id, ?3, v.scopes, 'running', ?4, ?4 + v.timeout_ms, ?5
                     FROM vals v WHERE v.id = ?6",
                    args![run.run_id, run.user_id, run.trigger, now, node_id, run.val_id],
                )?;
                if started == 0 {
                    // The val went while its run waited: the run ends here.
                    sql.execute(
                        "INSERT INTO runs (id, user_id, val_id, trigger, scopes, status, started_at,
                                           deadline, ended_at, exit_detail, node_id)
                         VALUES (?1, ?2, NULL, ?3, '', 'failed', ?4, ?4, ?4,
                                 'the val was deleted before its run started', ?5)",
                        args![run.run_id, run.user_id, run.trigger, now, node_id],
                    )?;
                    notify(sql, DONE, &run.run_id)?;
                }
            }
            Ok(claimed)
        })
    }

    /// Records the cron tick `slot` of a val and queues its run, once in
    /// the whole cluster: the first node to record `(val, slot)` fires it,
    /// every other finds it taken. A val with a run queued or running is
    /// not fired (never two runs of one val at once).
    pub fn fire_cron(
        &self,
        run_id: &str,
        user_id: &str,
        val_id: &str,
        slot: i64,
    ) -> Result<bool, StoreError> {
        self.require_shared()?;
        self.db_write(|sql| {
            let busy: bool = sql
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM run_queue WHERE val_id = ?1)
                         OR EXISTS (SELECT 1 FROM runs WHERE val_id = ?1 AND status = 'running')",
                    args![val_id],
                )?
                .get(0)?;
            if busy {
                return Ok(false);
            }
            let fired = sql.execute(
                "INSERT INTO cron_fires (val_id, slot, run_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT (val_id, slot) DO NOTHING",
                args![val_id, slot, run_id],
            )?;
            if fired == 0 {
                return Ok(false);
            }
            queue_in(sql, run_id, user_id, val_id, "cron")?;
            Ok(true)
        })
    }

    /// Listens for cluster notifications on a connection of its own and
    /// hands each to `on`, until `stop` is set (checked at least every
    /// quarter second). Returns on a connection error: call again to
    /// reconnect (notifications sent meanwhile are missed, so listeners
    /// also poll).
    ///
    /// Token changes are handled here, not handed on: each empties this
    /// store's token cache. While this runs and its connection answers,
    /// the cache trusts its entries for longer (see [`TokenCache`]); the
    /// cache is emptied when the connection is made and when it ends.
    ///
    /// [`TokenCache`]: crate::TokenCache
    pub fn listen(
        &self,
        stop: &Arc<AtomicBool>,
        mut on: impl FnMut(ClusterEvent) + Send,
    ) -> Result<(), StoreError> {
        self.require_shared()?;
        let mut conn = self.dedicated_pg_connection()?;
        let cache = self.token_cache();
        crate::pg::off_async(move || {
            let _gone = ListenerGone(cache);
            let mut connected = false;
            let alive = |sent| {
                if !std::mem::replace(&mut connected, true) {
                    cache.listener_connected();
                }
                cache.listener_alive(sent);
            };
            conn.listen(
                &[QUEUED, DONE, TOKENS],
                stop,
                alive,
                |channel, payload| match channel {
                    QUEUED => on(ClusterEvent::RunQueued),
                    DONE => on(ClusterEvent::RunDone(payload.to_owned())),
                    TOKENS => cache.clear(),
                    _ => {}
                },
            )
        })
    }
}

/// Tells the token cache that its listener stopped, however it stopped.
struct ListenerGone<'a>(&'a crate::TokenCache);

impl Drop for ListenerGone<'_> {
    fn drop(&mut self) {
        self.0.listener_gone();
    }
}

fn queue_in(
    sql: &mut Sql<'_>,
    run_id: &str,
    user_id: &str,
    val_id: &str,
    trigger: &str,
) -> Result<(), StoreError> {
    sql.execute(
        "INSERT INTO run_queue (id, user_id, val_id, trigger, enqueued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        args![run_id, user_id, val_id, trigger, time::now_ms()],
    )?;
    notify(sql, QUEUED, "")
}

/// Marks the runs of `node_id` still `running` as lost, and tells their
/// waiters.
fn mark_lost(sql: &mut Sql<'_>, node_id: &str, why: &str) -> Result<u64, StoreError> {
    let lost: Vec<String> = sql.query_map(
        "UPDATE runs SET status = 'lost', ended_at = ?1, exit_detail = ?2
         WHERE node_id = ?3 AND status = 'running' RETURNING id",
        args![time::now_ms(), why, node_id],
        |r| r.get(0),
    )?;
    for run_id in &lost {
        notify(sql, DONE, run_id)?;
    }
    Ok(lost.len() as u64)
}

/// Sends a notification when the transaction commits (PostgreSQL only;
/// SQLite has a single node, which needs no telling).
pub(crate) fn notify(sql: &mut Sql<'_>, channel: &str, payload: &str) -> Result<(), StoreError> {
    if sql.dialect() == Dialect::Postgres {
        sql.query("SELECT pg_notify(?1, ?2)", args![channel, payload])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Backends;
    use crate::{NewVal, Outcome, ValKind};
    use valet_core::{Granted, GrantedSet, ScopeSet};

    fn val(store: &Store) -> (String, String) {
        let user = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        let val = store
            .create_val(
                &Granted::for_operator(&user.id),
                &GrantedSet::for_operator(&user.id, ScopeSet::all()),
                NewVal {
                    name: "job".into(),
                    kind: ValKind::Script,
                    code: "".into(),
                    scopes: ScopeSet::EMPTY,
                    env: Default::default(),
                    timeout_ms: 1000,
                    schedule: None,
                },
            )
            .expect("val");
        (user.id, val.id)
    }

    #[test]
    fn each_queued_run_is_claimed_by_exactly_one_node() {
        let backend = Backends::postgres();
        let store = backend.open();
        let (user, val) = val(&store);
        for i in 0..60 {
            store
                .enqueue_run(&format!("run_{i:03}"), &user, &val, "api")
                .expect("queue");
        }
        let nodes: Vec<Store> = (0..3).map(|_| backend.open()).collect();
        let claims: Vec<(usize, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .enumerate()
                .map(|(n, node)| {
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        loop {
                            let batch = node.claim_runs(&format!("node_{n}"), 4).expect("claim");
                            if batch.is_empty() {
                                return mine;
                            }
                            mine.extend(batch.into_iter().map(|c| (n, c.run_id)));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        let mut ids: Vec<&String> = claims.iter().map(|(_, id)| id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!((claims.len(), ids.len()), (60, 60), "each run claimed once");
        for (n, id) in &claims {
            let run = store
                .run_by_id(id)
                .expect("read")
                .expect("a record per claim");
            assert_eq!(run.outcome, Outcome::Running);
            assert_eq!(run.node.as_deref(), Some(format!("node_{n}").as_str()));
        }
    }

    #[test]
    fn a_node_whose_lease_runs_out_has_its_runs_lost_once() {
        let backend = Backends::postgres();
        let store = backend.open();
        let (user, val) = val(&store);
        assert!(
            !store
                .heartbeat("dying", Duration::from_millis(200))
                .expect("join")
        );
        assert!(
            !store
                .heartbeat("alive", Duration::from_secs(60))
                .expect("join")
        );
        store
            .enqueue_run("run_a", &user, &val, "api")
            .expect("queue");
        store
            .enqueue_run("run_b", &user, &val, "api")
            .expect("queue");
        assert_eq!(store.claim_runs("dying", 1).expect("claim").len(), 1);
        assert_eq!(store.claim_runs("alive", 1).expect("claim").len(), 1);
        // The lease is the database's 200 ms; wait well past it.
        std::thread::sleep(Duration::from_millis(600));
        let survivors = [backend.open(), backend.open()];
        let reaped: Vec<DeadNode> = std::thread::scope(|s| {
            let hs: Vec<_> = survivors
                .iter()
                .map(|st| s.spawn(|| st.reap_dead_nodes().expect("reap")))
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        assert_eq!(
            reaped.len(),
            1,
            "reaped by exactly one survivor: {reaped:?}"
        );
        assert_eq!(
            (reaped[0].node_id.as_str(), reaped[0].lost_runs),
            ("dying", 1)
        );
        assert_eq!(store.live_nodes().expect("nodes"), vec!["alive".to_owned()]);
        let lost = store.run_by_id("run_a").expect("read").expect("run");
        assert_eq!(lost.outcome, Outcome::Lost);
        // A late finish does not turn a lost run into a success.
        store
            .finish_run("run_a", Outcome::Succeeded, "", "")
            .expect("finish");
        assert_eq!(
            store
                .run_by_id("run_a")
                .expect("read")
                .expect("run")
                .outcome,
            Outcome::Lost
        );
        assert_eq!(
            store
                .run_by_id("run_b")
                .expect("read")
                .expect("run")
                .outcome,
            Outcome::Running
        );
        // The dead node comes back: its heartbeat says it had been declared dead.
        assert!(
            !store
                .heartbeat("dying", Duration::from_secs(60))
                .expect("rejoin")
        );
        assert!(
            store
                .heartbeat("dying", Duration::from_secs(60))
                .expect("renew")
        );
    }

    #[test]
    fn a_cron_slot_fires_once_and_never_beside_a_running_run() {
        let backend = Backends::postgres();
        let nodes: Vec<Store> = (0..3).map(|_| backend.open()).collect();
        let (user, val) = val(&nodes[0]);
        let fired: usize = std::thread::scope(|s| {
            let hs: Vec<_> = nodes
                .iter()
                .enumerate()
                .map(|(n, node)| {
                    let (user, val) = (&user, &val);
                    s.spawn(move || {
                        node.fire_cron(&format!("run_{n}"), user, val, 1_000)
                            .expect("fire")
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| usize::from(h.join().expect("thread")))
                .sum()
        });
        assert_eq!(fired, 1, "one node fires the slot");
        // Queued (then running): the next slot waits.
        assert!(
            !nodes[1]
                .fire_cron("run_x", &user, &val, 2_000)
                .expect("fire")
        );
        let claimed = nodes[2].claim_runs("n2", 5).expect("claim");
        assert_eq!(claimed.len(), 1);
        assert!(
            !nodes[1]
                .fire_cron("run_y", &user, &val, 2_000)
                .expect("fire")
        );
        nodes[2]
            .finish_run(&claimed[0].run_id, Outcome::Succeeded, "", "")
            .expect("finish");
        assert!(
            nodes[1]
                .fire_cron("run_z", &user, &val, 2_000)
                .expect("fire")
        );
        assert!(
            !nodes[0]
                .fire_cron("run_w", &user, &val, 2_000)
                .expect("fire"),
            "slot taken"
        );
    }

    #[test]
    fn cluster_calls_need_postgres() {
        let store = Backends::sqlite().open();
        assert!(matches!(
            store.claim_runs("n", 1),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn listeners_hear_queued_and_finished_runs() {
        let backend = Backends::postgres();
        let store = backend.open();
        let (user, val) = val(&store);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let listener = {
            let (store, stop) = (backend.open(), stop.clone());
            std::thread::spawn(move || {
                store.listen(&stop, move |e| {
                    let _ = tx.send(e);
                })
            })
        };
        // The listener is up once it hears a run queued (retry until then).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut i = 0;
        loop {
            store
                .enqueue_run(&format!("probe_{i}"), &user, &val, "api")
                .expect("queue");
            i += 1;
            if rx.recv_timeout(Duration::from_millis(200)) == Ok(ClusterEvent::RunQueued) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no notification heard"
            );
        }
        let claimed = store.claim_runs("n", 100).expect("claim");
        store
            .finish_run(&claimed[0].run_id, Outcome::Succeeded, "", "")
            .expect("finish");
        let heard = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(10)).ok())
            .find(|e| matches!(e, ClusterEvent::RunDone(_)));
        assert_eq!(
            heard,
            Some(ClusterEvent::RunDone(claimed[0].run_id.clone()))
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        listener.join().expect("thread").expect("listen");
    }
}
