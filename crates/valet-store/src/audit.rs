//! The audit log: who (token or run) used which scope, on which route, when.
//!
//! Requests hand events to a channel and go on; one thread owns a
//! connection and writes them in batches, one transaction per batch, and
//! bumps `last_used_at` of the tokens involved. That keeps a disk write off
//! every request's critical path.

use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use valet_core::Scope;

use crate::db::Backend;
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
    Flush(SyncSender<()>),
}

/// The sending side; cheap to share.
pub struct AuditSink {
    /// `Sender` is `Send + Sync` since Rust 1.72, but we keep a `Mutex`
    /// around the `Option` so shutdown can take it and close the channel.
    tx: Mutex<Option<Sender<Message>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    failures: Arc<std::sync::atomic::AtomicU64>,
}

const MAX_BATCH: usize = 512;

impl AuditSink {
    /// Starts the writer thread on `backend`, connections of its own.
    pub(crate) fn start(backend: Backend) -> Result<AuditSink, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker_failures = failures.clone();
        let worker = std::thread::Builder::new()
            .name("valet-audit".into())
            .spawn(move || writer_loop(backend, rx, worker_failures))?;
        Ok(AuditSink {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            failures,
        })
    }

    /// Queues an event; never blocks on the disk.
    pub fn record(&self, event: AuditEvent) {
        if let Ok(tx) = self.tx.lock()
            && let Some(tx) = tx.as_ref()
        {
            let _ = tx.send(Message::Event(event));
        }
    }

    /// Blocks until every event queued before this call is written.
    pub fn flush(&self) {
        let (done_tx, done_rx) = sync_channel(1);
        let sent = match self.tx.lock() {
            Ok(tx) => tx
                .as_ref()
                .is_some_and(|tx| tx.send(Message::Flush(done_tx)).is_ok()),
            Err(_) => false,
        };
        if sent {
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
) {
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Event(e) => batch.push(e),
                Message::Flush(done) => waiters.push(done),
            }
            next = if batch.len() < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty()
            && let Err(e) = backend.transact(|sql| write_batch(sql, &batch))
        {
            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = %e, events = batch.len(), "could not write audit events");
        }
        for done in waiters {
            let _ = done.send(());
        }
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
