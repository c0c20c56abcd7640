//! The audit log: who (token or run) used which scope, on which route, when;
//! and the writer behind it, which also writes run records.
//!
//! Requests hand events to a channel and go on; one thread owns a
//! connection and writes them in batches, one transaction per batch, and
//! bumps `last_used_at` of the tokens involved. Runs' starts and ends go the
//! same way (in a transaction of their own per batch, so an audit failure
//! never loses a run's record): at thousands of http requests a second,
//! each a run, that turns two writes per request into a share of one.
//! Reads of runs wait for the run writes queued before them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use valet_core::Scope;

use crate::db::Backend;
use crate::runs::{RunEnd, RunStart};
use crate::sql::{Sql, args};
use crate::{Store, StoreError};

/// Who made an authorised call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Token {
        user_id: String,
        token_id: String,
    },
    Run {
        user_id: String,
        run_id: String,
        val_id: Option<String>,
    },
}

impl Principal {
    pub fn user_id(&self) -> &str {
        match self {
            Principal::Token { user_id, .. } | Principal::Run { user_id, .. } => user_id,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub principal: Principal,
    pub scope: Scope,
    pub route: String,
    pub at: i64,
}

enum Message {
    Event(AuditEvent),
    RunStart(RunStart, Option<String>),
    /// A run's end, and whoever waits for it to be written.
    RunEnd(RunEnd, Option<oneshot::Sender<Result<(), String>>>),
    Flush(SyncSender<()>),
}

/// The sending side; cheap to share.
pub struct AuditSink {
    /// `Sender` is `Send + Sync` since Rust 1.72, but we keep a `Mutex`
    /// around the `Option` so shutdown can take it and close the channel.
    tx: Mutex<Option<Sender<Message>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    failures: Arc<std::sync::atomic::AtomicU64>,
    /// Run writes queued and not yet written.
    pending_runs: Arc<AtomicUsize>,
    /// The writer, woken (unparked) by anyone who waits for it while it
    /// gathers a batch; others' messages do not wake it.
    writer: Option<std::thread::Thread>,
}

const MAX_BATCH: usize = 512;

/// How long a batch nobody waits for gathers more before it is written.
const GATHER: std::time::Duration = std::time::Duration::from_millis(5);

impl AuditSink {
    /// Starts the writer thread on `backend`, connections of its own.
    pub(crate) fn start(backend: Backend) -> Result<AuditSink, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let pending_runs = Arc::new(AtomicUsize::new(0));
        let worker_failures = failures.clone();
        let worker_pending = pending_runs.clone();
        let worker = std::thread::Builder::new()
            .name("valet-audit".into())
            .spawn(move || writer_loop(backend, rx, worker_failures, worker_pending))?;
        Ok(AuditSink {
            tx: Mutex::new(Some(tx)),
            writer: Some(worker.thread().clone()),
            worker: Mutex::new(Some(worker)),
            failures,
            pending_runs,
        })
    }

    fn send(&self, message: Message) -> bool {
        match self.tx.lock() {
            Ok(tx) => tx.as_ref().is_some_and(|tx| tx.send(message).is_ok()),
            Err(_) => false,
        }
    }

    /// Queues a run's start; never blocks on the disk.
    pub(crate) fn queue_run_start(&self, run: RunStart, node_id: Option<String>) {
        self.pending_runs.fetch_add(1, Ordering::SeqCst);
        if !self.send(Message::RunStart(run, node_id)) {
            self.pending_runs.fetch_sub(1, Ordering::SeqCst);
            tracing::error!("the store is closing: a run's start was not recorded");
        }
    }

    /// Queues a run's end and wakes the writer; the receiver hears once it
    /// is written.
    pub(crate) fn queue_run_end(&self, end: RunEnd) -> oneshot::Receiver<Result<(), String>> {
        let (done, written) = oneshot::channel();
        self.queue_end(end, Some(done));
        self.wake_writer();
        written
    }

    /// Queues a run's end that nobody waits for: written with the writer's
    /// next batch (which logs a failure).
    pub(crate) fn queue_run_end_detached(&self, end: RunEnd) {
        self.queue_end(end, None);
    }

    fn queue_end(&self, end: RunEnd, done: Option<oneshot::Sender<Result<(), String>>>) {
        self.pending_runs.fetch_add(1, Ordering::SeqCst);
        let run_id = end.id.clone();
        if !self.send(Message::RunEnd(end, done)) {
            self.pending_runs.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(run_id, "the store is closing: a run's end was not recorded");
        }
    }

    fn wake_writer(&self) {
        if let Some(writer) = &self.writer {
            writer.unpark();
        }
    }

    /// Blocks until the run writes queued before this call are written
    /// (at once when there are none).
    pub(crate) fn flush_runs(&self) {
        if self.pending_runs.load(Ordering::SeqCst) > 0 {
            self.flush();
        }
    }

    /// Queues an event; never blocks on the disk.
    pub fn record(&self, event: AuditEvent) {
        self.send(Message::Event(event));
    }

    /// Blocks until every event and run write queued before this call is
    /// written.
    pub fn flush(&self) {
        let (done_tx, done_rx) = sync_channel(1);
        if self.send(Message::Flush(done_tx)) {
            self.wake_writer();
            let _ = done_rx.recv();
        }
    }

    /// How many batches failed to write (logged each time).
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        // Close the channel, then wait for the writer to drain it.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        self.wake_writer();
        if let Ok(mut worker) = self.worker.lock()
            && let Some(worker) = worker.take()
        {
            let _ = worker.join();
        }
    }
}

fn writer_loop(
    backend: Backend,
    rx: Receiver<Message>,
    failures: Arc<std::sync::atomic::AtomicU64>,
    pending_runs: Arc<AtomicUsize>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut runs = Vec::new();
        let mut ended = Vec::new();
        let mut waiters = Vec::new();
        // Nobody waits for a batch of audit events or of runs' records
        // whose callers went on: such a batch waits a little for more, so
        // that a busy server writes one transaction where it would write
        // dozens. Anyone waiting (a flush, a run's end that is awaited)
        // has the batch written at once.
        let gather_until = std::time::Instant::now() + GATHER;
        let mut next = Some(first);
        loop {
            while let Some(message) = next {
                match message {
                    Message::Event(e) => batch.push(e),
                    Message::RunStart(run, node_id) => runs.push(RunWrite::Start(run, node_id)),
                    Message::RunEnd(end, done) => {
                        runs.push(RunWrite::End(end));
                        ended.push(done);
                    }
                    Message::Flush(done) => waiters.push(done),
                }
                next = if batch.len() + runs.len() < MAX_BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            let awaited =
                !waiters.is_empty() || ended.iter().flatten().any(|done| !done.is_closed());
            let left = gather_until.saturating_duration_since(std::time::Instant::now());
            if awaited || batch.len() + runs.len() >= MAX_BATCH || left.is_zero() {
                break;
            }
            // Parked rather than waiting on the channel, so that a busy
            // server's senders do not wake this thread once a message each;
            // a sender who waits unparks it.
            std::thread::park_timeout(left);
            next = rx.try_recv().ok();
        }
        if !runs.is_empty() {
            // Each run's row on its own savepoint: a row that cannot be
            // written (whatever a val made of its logs) costs no other run
            // its record.
            let written = backend
                .transact(|sql| Ok(write_runs(sql, &runs)))
                .unwrap_or_else(|e| vec![Err(e.to_string()); runs.len()]);
            let failed = written.iter().filter(|r| r.is_err()).count();
            if failed > 0 {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            pending_runs.fetch_sub(runs.len(), Ordering::SeqCst);
            let ends = runs
                .iter()
                .zip(written)
                .filter_map(|(run, result)| match run {
                    RunWrite::End(_) => Some(result),
                    RunWrite::Start(..) => None,
                });
            for (done, result) in ended.into_iter().zip(ends) {
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        }
        if !batch.is_empty()
            && let Err(e) = backend.transact(|sql| write_batch(sql, &batch))
        {
            failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, events = batch.len(), "could not write audit events");
        }
        for done in waiters {
            let _ = done.send(());
        }
    }
}

enum RunWrite {
    Start(RunStart, Option<String>),
    End(RunEnd),
}

/// Writes each run on a savepoint of its own; says how each write went.
/// A run that started and ended within the batch (most hot requests) is
/// written on one savepoint, and each val's last run time once per batch.
fn write_runs(sql: &mut Sql<'_>, runs: &[RunWrite]) -> Vec<Result<(), String>> {
    let ends: std::collections::HashMap<&str, usize> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, run)| match run {
            RunWrite::End(end) => Some((end.id.as_str(), i)),
            RunWrite::Start(..) => None,
        })
        .collect();
    let mut results: Vec<Option<Result<(), String>>> = vec![None; runs.len()];
    let mut touched: std::collections::HashMap<&str, i64> = Default::default();
    for (i, run) in runs.iter().enumerate() {
        if results[i].is_some() {
            continue; // written with its start
        }
        let (id, end) = match run {
            RunWrite::Start(start, _) => (
                start.id.as_str(),
                ends.get(start.id.as_str()).copied().filter(|&j| j > i),
            ),
            RunWrite::End(end) => (end.id.as_str(), None),
        };
        let mut writes: Vec<&RunWrite> = vec![run];
        writes.extend(end.map(|j| &runs[j]));
        let mut result = on_savepoint(sql, &writes);
        if let (Err(_), Some(j)) = (&result, end) {
            // Apart, so that an end that cannot be written (whatever a val
            // made of its logs) still leaves the run's start recorded.
            result = on_savepoint(sql, &[run]);
            let ended = on_savepoint(sql, &[&runs[j]]);
            if let Err(e) = &ended {
                tracing::error!(run_id = %id, error = %e, "could not write the end of a run's record");
            }
            results[j] = Some(ended);
        }
        match &result {
            Err(e) => tracing::error!(run_id = %id, error = %e, "could not write a run's record"),
            Ok(()) => {
                if let RunWrite::Start(start, _) = run
                    && let Some(val_id) = start.val_id.as_deref()
                {
                    let at = touched.entry(val_id).or_insert(start.started_at);
                    *at = (*at).max(start.started_at);
                }
            }
        }
        if let Some(j) = end
            && results[j].is_none()
        {
            results[j] = Some(result.clone());
        }
        results[i] = Some(result);
    }
    if !touched.is_empty() {
        let vals = sql.batch("SAVEPOINT valet_vals").and_then(|()| {
            touched
                .iter()
                .try_for_each(|(val_id, at)| crate::runs::touch_val(sql, val_id, *at))
        });
        let settled = match &vals {
            Ok(()) => sql.batch("RELEASE SAVEPOINT valet_vals"),
            Err(_) => sql.batch("ROLLBACK TO SAVEPOINT valet_vals; RELEASE SAVEPOINT valet_vals"),
        };
        if let Err(e) = vals.and(settled) {
            tracing::warn!(error = %e, "could not note vals' last run times");
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not written".into())))
        .collect()
}

/// `writes`, all or none, on a savepoint of their own.
fn on_savepoint(sql: &mut Sql<'_>, writes: &[&RunWrite]) -> Result<(), String> {
    let written = sql
        .command("SAVEPOINT valet_run")
        .and_then(|()| match writes {
            [RunWrite::Start(start, node_id), RunWrite::End(end)] if start.id == end.id => {
                let new = start.as_new();
                if crate::runs::write_whole_run(sql, &new, node_id.as_deref(), end)? {
                    Ok(())
                } else {
                    writes.iter().try_for_each(|run| write_one(sql, run))
                }
            }
            _ => writes.iter().try_for_each(|run| write_one(sql, run)),
        });
    let settled = match &written {
        Ok(()) => sql.command("RELEASE SAVEPOINT valet_run"),
        Err(_) => sql.batch("ROLLBACK TO SAVEPOINT valet_run; RELEASE SAVEPOINT valet_run"),
    };
    written.and(settled).map_err(|e| e.to_string())
}

fn write_one(sql: &mut Sql<'_>, run: &RunWrite) -> Result<(), StoreError> {
    match run {
        RunWrite::Start(start, node_id) => {
            crate::runs::write_run_row(sql, &start.as_new(), node_id.as_deref())
        }
        RunWrite::End(end) => crate::runs::write_end(sql, end),
    }
}

fn write_batch(sql: &mut Sql<'_>, batch: &[AuditEvent]) -> Result<(), StoreError> {
    for event in batch {
        let (token_id, run_id) = match &event.principal {
            Principal::Token { token_id, .. } => (Some(token_id.as_str()), None),
            Principal::Run { run_id, .. } => (None, Some(run_id.as_str())),
        };
        sql.execute(
            "INSERT INTO audit (user_id, token_id, run_id, scope, route, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            args![
                event.principal.user_id(),
                token_id,
                run_id,
                event.scope.to_string(),
                event.route,
                event.at
            ],
        )?;
        if let Some(token_id) = token_id {
            sql.execute(
                "UPDATE api_tokens SET last_used_at = ?1
                 WHERE id = ?2 AND (last_used_at IS NULL OR last_used_at < ?1)",
                args![event.at, token_id],
            )?;
        }
    }
    Ok(())
}

impl Store {
    /// Scopes used by a run, from the audit log.
    pub fn scopes_used_by_runs(
        &self,
        run_ids: &[String],
    ) -> Result<valet_core::ScopeSet, StoreError> {
        self.flush_audit();
        self.db_read(|sql| {
            let mut set = valet_core::ScopeSet::EMPTY;
            for run_id in run_ids {
                let scopes = sql.query_map(
                    "SELECT DISTINCT scope FROM audit WHERE run_id = ?1",
                    args![run_id],
                    |r| r.get::<String>(0),
                )?;
                for scope in scopes {
                    set = set.with(scope.parse()?);
                }
            }
            Ok(set)
        })
    }

    /// Inserts audit rows directly, for seeding a store in tests and
    /// benchmarks. Real requests go through [`AuditSink::record`].
    pub fn insert_audit_rows(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        self.db_write(|sql| write_batch(sql, events))
    }

    pub fn audit_count(&self) -> Result<u64, StoreError> {
        self.flush_audit();
        let count: i64 =
            self.db_read(|sql| sql.query_one("SELECT COUNT(*) FROM audit", args![])?.get(0))?;
        Ok(count as u64)
    }
}

#[cfg(test)]
mod tests {
    use valet_core::ScopeSet;

    use super::{RunWrite, write_runs};
    use crate::testing::Backends;
    use crate::{Outcome, RunEnd, RunStart, time};

    fn start(id: &str, user_id: &str, val_id: Option<&str>) -> RunStart {
        RunStart {
            id: id.into(),
            user_id: user_id.into(),
            val_id: val_id.map(str::to_owned),
            trigger: "api".into(),
            scopes: ScopeSet::EMPTY,
            started_at: time::now_ms(),
            deadline: time::now_ms() + 1000,
        }
    }

    fn end(id: &str, logs: &str) -> RunEnd {
        RunEnd {
            id: id.into(),
            outcome: Outcome::Succeeded,
            detail: "done".into(),
            logs: logs.into(),
            ended_at: time::now_ms(),
        }
    }

    /// A run whose row cannot be written (PostgreSQL refuses a NUL in
    /// text; a val deleted while its run starts) costs no other run its
    /// record, though they share the writer's batch.
    #[test]
    fn one_runs_unwritable_row_costs_no_other_run_its_record() {
        for backends in Backends::all() {
            let store = backends.open();
            let ada = store
                .create_user("ada", "ada@example.com", None)
                .expect("user");
            // One batch, as the writer writes it.
            let batch = [
                RunWrite::Start(start("run_a", &ada.id, None), None),
                RunWrite::Start(start("run_b", &ada.id, Some("val_gone")), None),
                RunWrite::Start(start("run_c", &ada.id, None), None),
                RunWrite::End(end("run_a", "bad \0 byte")),
                RunWrite::End(end("run_c", "fine")),
            ];
            let written = store
                .db_write(|sql| Ok(write_runs(sql, &batch)))
                .expect("the batch commits");
            let (a, c) = (written[3].clone(), written[4].clone());
            assert_eq!(c, Ok(()), "{backends:?}");
            let c = store
                .run_by_id("run_c")
                .expect("read")
                .expect("run_c recorded");
            assert_eq!(c.outcome, Outcome::Succeeded, "{backends:?}");
            assert_eq!(c.logs, "fine");
            let b = store
                .run_by_id("run_b")
                .expect("read")
                .expect("run_b recorded");
            assert_eq!(b.val_id, None, "{backends:?}: the gone val is not named");
            let stored_a = store
                .run_by_id("run_a")
                .expect("read")
                .expect("run_a started");
            match a {
                // SQLite takes a NUL in text.
                Ok(()) => assert_eq!(stored_a.outcome, Outcome::Succeeded, "{backends:?}"),
                Err(e) => {
                    assert!(matches!(backends, Backends::Postgres { .. }), "{e}");
                    assert_eq!(stored_a.outcome, Outcome::Running);
                }
            }
        }
    }

    /// Through the queue: a run's end is answered once written, and a
    /// read of runs waits for the writes queued before it.
    /// A run that starts and ends in one batch is written as one row; a run
    /// whose row was there already (claimed from a cluster's queue) gets
    /// its start and end as before, and a run already `lost` stays lost.
    #[test]
    fn a_run_ending_in_its_starts_batch_is_written_whole() {
        for backends in Backends::all() {
            let store = backends.open();
            let ada = store
                .create_user("ada", "ada@example.com", None)
                .expect("user");
            let begun = start("run_whole", &ada.id, None);
            let started_at = begun.started_at;
            store.queue_run_start(begun);
            let ended = store.queue_run_end(RunEnd {
                detail: "answered".into(),
                ..end("run_whole", "one line")
            });
            let run = store
                .run_by_id("run_whole")
                .expect("read")
                .expect("recorded");
            assert_eq!(run.outcome, Outcome::Succeeded);
            assert_eq!(run.logs, "one line");
            assert_eq!(run.exit_detail.as_deref(), Some("answered"));
            assert_eq!(run.started_at, started_at);
            assert!(run.ended_at.is_some_and(|at| at >= started_at));
            assert_eq!(ended.blocking_recv().expect("answered"), Ok(()));

            for (id, lost) in [("run_claimed", false), ("run_lost", true)] {
                let mut early = start(id, &ada.id, None);
                early.started_at -= 10_000;
                store.insert_run(&early.as_new()).expect("claimed row");
                if lost {
                    store
                        .finish_run(id, Outcome::Lost, "its node went away", "")
                        .expect("lost");
                }
                store.queue_run_start(start(id, &ada.id, None));
                let ended = store.queue_run_end(end(id, "late line"));
                assert_eq!(ended.blocking_recv().expect("answered"), Ok(()));
                let run = store.run_by_id(id).expect("read").expect("recorded");
                if lost {
                    assert_eq!(run.outcome, Outcome::Lost, "{run:?}");
                } else {
                    assert_eq!(
                        (run.outcome, run.logs.as_str()),
                        (Outcome::Succeeded, "late line")
                    );
                    assert!(
                        run.started_at > early.started_at,
                        "the actual start is recorded"
                    );
                }
            }
        }
    }

    #[test]
    fn queued_run_writes_are_read_back_in_order() {
        let backends = Backends::sqlite();
        let store = backends.open();
        let ada = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        store.queue_run_start(start("run_q", &ada.id, None));
        let ended = store.queue_run_end(end("run_q", "line"));
        // Not awaited: the read itself waits for the queue.
        let run = store.run_by_id("run_q").expect("read").expect("recorded");
        assert_eq!(
            (run.outcome, run.logs.as_str()),
            (Outcome::Succeeded, "line")
        );
        assert_eq!(ended.blocking_recv().expect("answered"), Ok(()));
    }
}
