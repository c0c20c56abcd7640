//! Warm processes: started ahead of time through the one launch path (no
//! val, no key, no env), waiting for a claim. A run takes one; a thread of
//! the pool's own starts the replacement off the request path, never under
//! a lock. Starting a process blocks its thread until Deno has exec'd (a
//! few milliseconds, Landlock's rules included): on a runtime worker that
//! held up whatever else waited on that worker, such as the answer of the
//! run that had just ended. The thread lives as long as the pool: a
//! child's parent-death signal fires when the thread that forked it exits
//! (which is also why it is not the blocking pool, whose threads exit when
//! idle).
//!
//! A start forks valet, and a fork stalls all of valet for a moment: it
//! holds the memory map while it copies it and leaves every page
//! write-protected, so each thread's next write to a page faults. So a
//! replacement for a process whose run just ended starts a little later,
//! once that run's answer has left ([`REFILL_GRACE`]); only an empty pool
//! refills at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::launcher::{Launcher, Started};

/// How long a refill waits after the run that took a process has ended.
const REFILL_GRACE: Duration = Duration::from_millis(5);

pub struct WarmPool {
    size: usize,
    /// A std `Mutex`: held to push or pop, never across an `.await`.
    ready: Mutex<VecDeque<Started>>,
    wake: Arc<Notify>,
    /// Notified each time a process is added.
    added: Notify,
    /// Set by [`WarmPool::close`]: the refilling thread ends.
    closed: AtomicBool,
}

impl WarmPool {
    /// `refill: false` starts `size` processes once, at once on the
    /// calling thread (which must outlive them), and no more: `valet run`,
    /// whose one run takes the process started with valet.
    pub fn new(launcher: Arc<Launcher>, size: usize, refill: bool) -> Arc<WarmPool> {
        let pool = Arc::new(WarmPool {
            size,
            ready: Mutex::default(),
            wake: Arc::new(Notify::new()),
            added: Notify::new(),
            closed: AtomicBool::new(false),
        });
        if !refill {
            for _ in 0..size {
                match launcher.start(&[]) {
                    Ok(started) => pool.push(started),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not start a process ahead; the run starts it")
                    }
                }
            }
        } else if size > 0 {
            // Its processes' sockets and tasks belong to this runtime.
            let runtime = tokio::runtime::Handle::current();
            let weak = Arc::downgrade(&pool);
            let thread = std::thread::Builder::new()
                .name("valet-warm-pool".into())
                .spawn(move || runtime.block_on(refill_loop(weak, launcher)));
            if let Err(e) = thread {
                tracing::error!(error = %e, "could not start the warm pool's thread; runs start cold");
            }
        }
        pool
    }

    /// A live warm process, if one is ready. The pool starts replacements
    /// at once only when it is empty; otherwise when the run that took one
    /// ends ([`WarmPool::refill`]), so that starting a Deno does not take
    /// the CPU from the run it would serve.
    pub fn take(&self) -> Option<Started> {
        let (taken, left) = {
            let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            let mut taken = None;
            while let Some(mut started) = ready.pop_front() {
                if !started.process.has_exited() {
                    taken = Some(started);
                    break;
                }
            }
            (taken, ready.len())
        };
        if left == 0 {
            self.wake.notify_one();
        }
        taken
    }

    /// Starts replacements for the processes taken (a run has ended, or a
    /// hot process is up).
    pub fn refill(&self) {
        self.wake.notify_one();
    }

    /// A live warm process, waiting up to `limit` for one when the pool
    /// is still starting them (the first run of a `valet run`, whose
    /// process started while valet itself was starting).
    pub async fn take_waiting(&self, limit: std::time::Duration) -> Option<Started> {
        if self.size == 0 {
            return None;
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let added = self.added.notified();
            if let Some(started) = self.take() {
                return Some(started);
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return None;
            }
        }
    }

    fn push(&self, started: Started) {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(started);
        self.added.notify_waiters();
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Stops refilling and ends every waiting process.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
        if let Ok(mut ready) = self.ready.lock() {
            ready.clear();
        }
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        self.close();
    }
}

async fn refill_loop(pool: std::sync::Weak<WarmPool>, launcher: Arc<Launcher>) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = pool.upgrade() else { return };
        if strong.closed.load(Ordering::Acquire) {
            return;
        }
        if strong.len() >= strong.size {
            // Not holding the pool while waiting: a pool nobody else holds
            // is dropped (and its processes with it).
            let wake = strong.wake.clone();
            drop(strong);
            wake.notified().await;
            continue;
        }
        // Only this thread adds to the pool: one found empty here is one a
        // run has just emptied, and does not wait.
        let empty = strong.len() == 0;
        drop(strong);
        if !empty {
            // A plain sleep, like the backoff below.
            std::thread::sleep(REFILL_GRACE);
        }
        // Started from this thread (see the module's note).
        match launcher.start(&[]) {
            Ok(process) => {
                failures = 0;
                let Some(strong) = pool.upgrade() else { return };
                strong.push(process);
            }
            Err(e) => {
                // Retried with backoff: the pool never stays short for long.
                failures += 1;
                tracing::warn!(error = %e, failures, "could not start a warm process; retrying");
                // A plain sleep: the thread is the pool's own, and its
                // runtime's timers may be gone while it shuts down.
                std::thread::sleep(Duration::from_millis(50 << failures.min(6)));
            }
        }
    }
}
