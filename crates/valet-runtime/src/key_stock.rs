//! Valet keys signed ahead of the hot requests that will carry them.
//!
//! An Ed25519 signature was the largest single cost of a hot request in
//! valet (about a sixth of its CPU at 10,000 requests a second). Every
//! request of one hot process has the same user, val, scopes and timeout,
//! so its key can be signed before it arrives: by one thread of the
//! supervisor's, at the lowest CPU priority, which gets the cores only in
//! the gaps the request pipeline leaves. A request takes a key from its
//! process's stock, or signs its own when the stock is empty, as before.
//!
//! What holds: a key in a stock is not live (the API refuses it) until a
//! request takes it and makes it live on its process's channel; it is given
//! to one request only; one older than [`MAX_AGE`] is thrown away, so a
//! key's `iat` is at most that much before its run began, and its `exp` is
//! that much later to match (the live-run set kills it when its run ends,
//! long before). The stock follows demand: its target doubles (up to
//! [`DEPTH`]) when a request finds it empty and halves when keys go stale
//! unused, so a quiet process costs nearly nothing. It is topped up by
//! whatever it lacks when the last top-up is done (never two asks at
//! once), so a busy process keeps the thread busy rather than waking it
//! per request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use valet_core::{MintRequest, RunTokenError, ScopeSet, SharedKeyRing};
use valet_store::{new_id, time};

/// How long a key may wait in a stock.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(1);

/// Keys one stock holds at most.
const DEPTH: usize = 64;

/// The smallest target of a stock.
const SHALLOW: usize = 2;

/// Who a key is for, and for how long: the same for every request of a
/// hot process.
#[derive(Debug, Clone)]
pub(crate) struct KeyGrant {
    pub user_id: String,
    pub val_id: Option<String>,
    pub scopes: ScopeSet,
    pub timeout: Duration,
}

impl KeyGrant {
    pub(crate) fn of(spec: &crate::supervisor::RunSpec) -> KeyGrant {
        KeyGrant {
            user_id: spec.user_id.clone(),
            val_id: spec.val_id.clone(),
            scopes: spec.scopes,
            timeout: spec.timeout,
        }
    }

    /// A key for `run_id` starting at `start_s` (unix seconds), dying by
    /// the clock `slack` after the run's own deadline.
    pub(crate) fn mint(
        &self,
        keys: &SharedKeyRing,
        run_id: &str,
        start_s: u64,
        slack: Duration,
    ) -> Result<String, RunTokenError> {
        let timeout_s = (self.timeout + slack).as_secs_f64().ceil() as u64;
        keys.mint(&MintRequest {
            user_id: &self.user_id,
            val_id: self.val_id.as_deref(),
            run_id,
            scopes: self.scopes.intersect(ScopeSet::all()),
            start: start_s,
            deadline: start_s + timeout_s.max(1),
        })
    }
}

/// A key signed ahead, with its run's id.
pub(crate) struct Minted {
    pub run_id: String,
    pub key: String,
    /// Whether it went down to its process when it was signed (so the
    /// request finds it there and need not send it).
    pub sent: bool,
    at: Instant,
}

/// Sends a key signed ahead down to its process (run id, key): false when
/// it could not (the process's queue is full, or it is gone).
pub(crate) type Deliver = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// One hot process's keys.
pub(crate) struct KeyStock {
    grant: KeyGrant,
    /// Each key goes down to the process as it is signed: not live yet
    /// (the API refuses it until a request takes it), it waits there for
    /// its request, which then needs no write of its own on the channel
    /// and no wait for one in the bootstrap.
    deliver: Option<Deliver>,
    keys: Mutex<VecDeque<Minted>>,
    /// How many keys it should hold, after recent demand.
    target: AtomicUsize,
    /// Keys asked of the minting thread and not made yet.
    wanted: AtomicUsize,
}

impl KeyStock {
    pub(crate) fn new(grant: KeyGrant, deliver: Option<Deliver>) -> Arc<KeyStock> {
        Arc::new(KeyStock {
            grant,
            deliver,
            keys: Mutex::default(),
            target: AtomicUsize::new(SHALLOW),
            wanted: AtomicUsize::new(0),
        })
    }

    /// A key signed less than [`MAX_AGE`] ago, if there is one; asks
    /// `minter` to top the stock up to its target.
    pub(crate) fn take(self: &Arc<KeyStock>, minter: &Minter) -> Option<Minted> {
        let (taken, stale, held) = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let mut taken = None;
            let mut stale = false;
            while let Some(minted) = keys.pop_front() {
                if minted.at.elapsed() < MAX_AGE {
                    taken = Some(minted);
                    break;
                }
                stale = true;
            }
            (taken, stale, keys.len())
        };
        let target = self.target.load(Ordering::Relaxed);
        // Keys gone stale say the stock is deeper than the demand, even
        // when none was left fresh: a process asked once a second must not
        // grow to the full depth and sign it all again each time.
        let target = match (&taken, stale) {
            (_, true) => (target / 2).max(SHALLOW),
            (None, false) => (target * 2).min(DEPTH),
            (Some(_), false) => target,
        };
        self.target.store(target, Ordering::Relaxed);
        if taken.is_some() {
            minter.taken.fetch_add(1, Ordering::Relaxed);
        }
        if held < target {
            minter.ask(self, target - held);
        }
        taken
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.lock().map(|k| k.len()).unwrap_or(0)
    }
}

/// The supervisor's minting thread, fed with stocks that want keys. It
/// ends when the supervisor (its [`Minter`]) is dropped.
pub(crate) struct Minter {
    queue: mpsc::Sender<Weak<KeyStock>>,
    /// Keys taken from stocks so far.
    taken: AtomicU64,
}

impl Minter {
    pub(crate) fn start(keys: SharedKeyRing) -> Minter {
        let (queue, asked) = mpsc::channel::<Weak<KeyStock>>();
        let thread = std::thread::Builder::new()
            .name("valet-key-mint".into())
            .spawn(move || {
                lowest_priority();
                while let Ok(stock) = asked.recv() {
                    if let Some(stock) = stock.upgrade() {
                        fill(&stock, &keys);
                    }
                }
            });
        if let Err(e) = thread {
            // Every request then signs its own key, as it would anyway.
            tracing::warn!(error = %e, "could not start the key minting thread");
        }
        Minter {
            queue,
            taken: AtomicU64::new(0),
        }
    }

    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Asks for `count` keys for `stock`, unless it has an ask not yet
    /// done (one wake of the thread per batch).
    fn ask(&self, stock: &Arc<KeyStock>, count: usize) {
        if count > 0
            && stock
                .wanted
                .compare_exchange(0, count, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let _ = self.queue.send(Arc::downgrade(stock));
        }
    }
}

/// Signs what `stock` asked for, up to [`DEPTH`].
fn fill(stock: &KeyStock, keys: &SharedKeyRing) {
    loop {
        let held = stock.keys.lock().map(|k| k.len()).unwrap_or(DEPTH);
        if held >= DEPTH {
            // Full: what was asked is moot. An ask after this queues anew.
            stock.wanted.store(0, Ordering::Release);
            return;
        }
        let run_id = new_id("run");
        let start_s = (time::now_ms() / 1000) as u64;
        match stock.grant.mint(keys, &run_id, start_s, MAX_AGE) {
            Ok(key) => {
                let sent = stock.deliver.as_ref().is_some_and(|d| d(&run_id, &key));
                let minted = Minted {
                    run_id,
                    key,
                    sent,
                    at: Instant::now(),
                };
                if let Ok(mut held) = stock.keys.lock() {
                    held.push_back(minted);
                }
            }
            Err(e) => {
                // The requests sign their own and report the same error.
                tracing::warn!(error = %e, "could not sign a key ahead");
                stock.wanted.store(0, Ordering::Release);
                return;
            }
        }
        if stock.wanted.fetch_sub(1, Ordering::AcqRel) <= 1 {
            return;
        }
    }
}

/// This thread runs only when nothing else wants the core.
#[allow(unsafe_code)]
fn lowest_priority() {
    // SAFETY: gettid and setpriority have no memory-safety preconditions;
    // on Linux a nice value belongs to the thread named.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use valet_core::{KeyRing, RunClaims, SigningKey};

    fn stock() -> (Arc<KeyStock>, SharedKeyRing) {
        let keys =
            SharedKeyRing::new(KeyRing::new(SigningKey::generate().expect("key")).expect("ring"));
        let stock = KeyStock::new(
            KeyGrant {
                user_id: "u1".into(),
                val_id: Some("v1".into()),
                scopes: ScopeSet::default_val(),
                timeout: Duration::from_secs(30),
            },
            None,
        );
        (stock, keys)
    }

    fn claims(keys: &SharedKeyRing, key: &str) -> RunClaims {
        let now = (time::now_ms() / 1000) as u64;
        keys.verify(key, now).expect("a key signed ahead verifies")
    }

    #[test]
    fn keys_signed_ahead_are_whole_distinct_and_given_once() {
        let (stock, keys) = stock();
        let minter = Minter::start(keys.clone());
        // The first take finds nothing and asks for two.
        assert!(stock.take(&minter).is_none());
        let mut seen = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.len() < 20 {
            assert!(Instant::now() < deadline, "the minting thread made no keys");
            match stock.take(&minter) {
                Some(minted) => {
                    let c = claims(&keys, &minted.key);
                    assert_eq!(c.jti, minted.run_id);
                    assert_eq!(c.sub, "u1");
                    assert_eq!(c.val.as_deref(), Some("v1"));
                    assert_eq!(c.scopes().expect("scopes"), ScopeSet::default_val());
                    // Its run's timeout plus the age it may have.
                    assert_eq!(c.exp - c.iat, 31);
                    assert!(seen.insert(minted.key), "a key was given twice");
                }
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    #[test]
    fn a_stock_fills_to_what_was_asked_and_no_further_than_its_depth() {
        let (stock, keys) = stock();
        let minter = Minter::start(keys.clone());
        // Nothing asked, nothing made.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stock.len(), 0);
        minter.ask(&stock, DEPTH * 2);
        // Asked while the first ask is being done: ignored.
        minter.ask(&stock, DEPTH * 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stock.wanted.load(Ordering::Acquire) > 0 {
            assert!(
                Instant::now() < deadline,
                "the minting thread did not finish"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(stock.len(), DEPTH);
    }

    /// A minter whose thread is gone: nothing is ever signed ahead.
    fn idle_minter() -> Minter {
        let (queue, _) = mpsc::channel();
        Minter {
            queue,
            taken: AtomicU64::new(0),
        }
    }

    fn fresh(key: &str) -> Minted {
        Minted {
            run_id: format!("run_{key}"),
            key: key.into(),
            sent: false,
            at: Instant::now(),
        }
    }

    #[test]
    fn a_stock_deepens_when_found_empty_and_shrinks_when_keys_go_stale() {
        let (stock, _) = stock();
        let minter = idle_minter();
        let target = || stock.target.load(Ordering::Relaxed);
        assert_eq!(target(), SHALLOW);
        for expected in [4, 8, 16, 32, 64, 64] {
            assert!(stock.take(&minter).is_none());
            assert_eq!(target(), expected);
        }
        // A fresh key taken: the target holds.
        stock.keys.lock().expect("lock").push_back(fresh("a"));
        assert_eq!(stock.take(&minter).map(|m| m.key).as_deref(), Some("a"));
        assert_eq!(target(), 64);
        // Behind a stale one: the target halves.
        let Some(at) = Instant::now().checked_sub(MAX_AGE) else {
            return; // A clock younger than MAX_AGE: nothing is that old.
        };
        let mut keys = stock.keys.lock().expect("lock");
        keys.push_back(Minted {
            at,
            ..fresh("stale")
        });
        keys.push_back(fresh("b"));
        drop(keys);
        assert_eq!(stock.take(&minter).map(|m| m.key).as_deref(), Some("b"));
        assert_eq!(target(), 32);
        assert_eq!(minter.taken(), 2);
        // Only stale ones left (a process asked about once a second): it
        // shrinks rather than grows.
        stock.keys.lock().expect("lock").push_back(Minted {
            at,
            ..fresh("stale")
        });
        assert!(stock.take(&minter).is_none());
        assert_eq!(target(), 16);
    }

    #[test]
    fn a_key_past_its_age_is_thrown_away() {
        let (stock, keys) = stock();
        let minter = Minter::start(keys.clone());
        let Some(at) = Instant::now().checked_sub(MAX_AGE) else {
            return; // A clock younger than MAX_AGE: nothing is that old.
        };
        let old = Minted {
            run_id: "run_old".into(),
            key: "stale".into(),
            sent: false,
            at,
        };
        stock.keys.lock().expect("lock").push_back(old);
        // Thrown away, and nothing newer was asked for before this take.
        assert!(stock.take(&minter).is_none());
    }

    /// Each key goes down to its process once, as it is signed, with its
    /// run's id; a key that could not be sent is marked so (its request
    /// sends it).
    #[test]
    fn keys_go_down_to_their_process_as_they_are_signed() {
        let keys =
            SharedKeyRing::new(KeyRing::new(SigningKey::generate().expect("key")).expect("ring"));
        let grant = KeyGrant {
            user_id: "u1".into(),
            val_id: Some("v1".into()),
            scopes: ScopeSet::default_val(),
            timeout: Duration::from_secs(30),
        };
        let sent = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let log = sent.clone();
        let accept = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let open = accept.clone();
        let deliver: Deliver = Box::new(move |run, key| {
            if !open.load(Ordering::SeqCst) {
                return false;
            }
            log.lock()
                .expect("lock")
                .push((run.to_owned(), key.to_owned()));
            true
        });
        let stock = KeyStock::new(grant, Some(deliver));
        let minter = Minter::start(keys);
        let deadline = Instant::now() + Duration::from_secs(10);
        let take = || loop {
            assert!(Instant::now() < deadline, "the minting thread made no keys");
            match stock.take(&minter) {
                Some(minted) => return minted,
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let minted = take();
        assert!(minted.sent);
        let down = sent.lock().expect("lock").clone();
        let once: Vec<_> = down
            .iter()
            .filter(|(run, _)| *run == minted.run_id)
            .collect();
        assert_eq!(once, [&(minted.run_id.clone(), minted.key.clone())]);
        // A process that takes no more: what is signed from now on is not
        // marked sent. (Keys signed before stay in the stock, sent.)
        accept.store(false, Ordering::SeqCst);
        let before = sent.lock().expect("lock").len();
        loop {
            let minted = take();
            if !minted.sent {
                assert!(
                    !sent
                        .lock()
                        .expect("lock")
                        .iter()
                        .any(|(run, _)| *run == minted.run_id)
                );
                break;
            }
        }
        assert_eq!(sent.lock().expect("lock").len(), before);
    }
}
