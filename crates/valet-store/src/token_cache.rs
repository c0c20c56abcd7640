//! API token records cached in memory, so that authenticating a request
//! costs a hash lookup instead of a blocking-pool hop and a database read.
//!
//! Correctness comes first. Every change to a token (revoke, re-scope,
//! rename, migration, leak report) empties the cache of the process that
//! made it once its transaction has ended, and on PostgreSQL also sends a
//! notification in that transaction which empties the cache of every node
//! that is listening. Emptying starts a new *generation*: a record read
//! before it is not put into the cache after it (see
//! [`TokenCache::generation`]), so a read that raced with a revocation
//! cannot bring the old record back.
//!
//! How long an entry is trusted depends on whether this process hears the
//! others. A node whose notification connection has proven itself alive
//! within [`HEARD_LEASE`] keeps entries up to [`HEARD_TTL`]; anything else
//! (SQLite beside another process on the same data dir, a CLI command, a
//! node whose listener is down or stuck) keeps them only [`TTL`]. The
//! cache is emptied whenever the listener connects or is lost, since
//! notifications may have been missed meanwhile. Expiry is checked on
//! every use, cached or not, never at fill.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use valet_core::TokenHash;

use crate::TokenRecord;

/// How long a cached record is trusted when nothing tells this process
/// of changes made elsewhere.
pub const TTL: Duration = Duration::from_secs(1);
/// How long a cached record is trusted while this process hears every
/// change through its listener: a bound for changes made behind valet's
/// back (SQL typed into `psql`), not the path a revocation takes.
pub const HEARD_TTL: Duration = Duration::from_secs(60);
/// How long one successful round trip on the listener's connection counts
/// as proof that it hears every notification. The listener renews it
/// about four times as often.
pub const HEARD_LEASE: Duration = Duration::from_secs(1);
/// Entries kept at most; the cache empties when full.
const CAPACITY: usize = 10_000;

/// A point in the cache's history, taken before a database read; a record
/// read after it may be put only if the cache has not been emptied since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

#[derive(Default)]
pub struct TokenCache {
    /// A std `Mutex`: held for a map operation only, never across an
    /// `.await` or a database call (and taken inside SQLite's update hook).
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<[u8; 32], (TokenRecord, Instant)>,
    /// Bumped by every emptying.
    generation: u64,
    /// Until when the listener counts as hearing every notification.
    heard_until: Option<Instant>,
    /// SQLite's update hook saw a token change in a transaction that has
    /// not ended yet: empty the cache again once it has.
    pending: bool,
}

impl State {
    fn clear(&mut self) {
        self.entries.clear();
        self.generation += 1;
    }
}

impl TokenCache {
    /// The record of `hash`, if cached and still trusted. Expiry and
    /// revocation are the caller's to check.
    pub fn get(&self, hash: &TokenHash) -> Option<TokenRecord> {
        let state = self.state.lock().ok()?;
        let now = Instant::now();
        let ttl = if state.heard_until.is_some_and(|until| now < until) {
            HEARD_TTL
        } else {
            TTL
        };
        let (record, at) = state.entries.get(hash.as_bytes())?;
        (now.saturating_duration_since(*at) < ttl && record.hash.ct_eq(hash))
            .then(|| record.clone())
    }

    /// Take this before reading a record that [`TokenCache::put`] will
    /// cache.
    pub fn generation(&self) -> Generation {
        Generation(self.state.lock().map(|s| s.generation).unwrap_or(u64::MAX))
    }

    /// Caches `record`, read after `read_from` was taken, unless the cache
    /// has been emptied since: then the read may have seen the record as
    /// it was before the change that emptied it.
    pub fn put(&self, record: &TokenRecord, read_from: Generation) {
        if let Ok(mut state) = self.state.lock() {
            if state.generation != read_from.0 {
                return;
            }
            if state.entries.len() >= CAPACITY {
                state.entries.clear();
            }
            state
                .entries
                .insert(*record.hash.as_bytes(), (record.clone(), Instant::now()));
        }
    }

    /// Empties the cache: a token changed (or may have).
    pub fn clear(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.clear();
        }
    }

    /// SQLite's update hook: a token changed inside a transaction. Empty
    /// now, and again once the transaction has ended ([`Self::settle`]),
    /// since a reader may still see the old row until the commit.
    pub(crate) fn changing(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.clear();
            state.pending = true;
        }
    }

    /// A write transaction ended: empties the cache if it changed a token
    /// (`changed`, or seen by the update hook).
    pub(crate) fn settle(&self, changed: bool) {
        if let Ok(mut state) = self.state.lock()
            && (changed || state.pending)
        {
            state.clear();
            state.pending = false;
        }
    }

    /// The listener connected: whatever happened before may have gone
    /// unheard, so the cache starts empty.
    pub(crate) fn listener_connected(&self) {
        self.clear();
    }

    /// A round trip sent at `sent` on the listener's connection came back,
    /// and every notification received before it was handled.
    pub(crate) fn listener_alive(&self, sent: Instant) {
        if let Ok(mut state) = self.state.lock() {
            state.heard_until = Some(sent + HEARD_LEASE);
        }
    }

    /// The listener stopped (lost its connection, or was told to): empty,
    /// and trust entries for [`TTL`] only until it is back.
    pub(crate) fn listener_gone(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.clear();
            state.heard_until = None;
        }
    }

    /// Whether the listener currently counts as hearing every change.
    pub fn is_heard(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.heard_until.is_some_and(|until| Instant::now() < until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use valet_core::{ApiToken, TokenScopes};

    fn record() -> TokenRecord {
        let token = ApiToken::generate().expect("rng");
        TokenRecord {
            id: "tok_1".into(),
            user_id: "usr_1".into(),
            name: "ci".into(),
            hash: token.hash(),
            hint: token.hint(),
            scopes: TokenScopes::Legacy,
            created_at: 0,
            last_used_at: None,
            expires_at: None,
            revoked_at: None,
            revoked_reason: None,
            leak_url: None,
            migration_state: None,
            migration_note: None,
        }
    }

    #[test]
    fn a_record_read_before_an_emptying_is_not_cached_after_it() {
        let cache = TokenCache::default();
        let record = record();
        let before = cache.generation();
        cache.clear();
        cache.put(&record, before);
        assert!(cache.get(&record.hash).is_none(), "a stale read came back");
        let after = cache.generation();
        cache.put(&record, after);
        assert!(cache.get(&record.hash).is_some());
        // The update hook and the end of its transaction each start a new
        // generation.
        let emptyings: [fn(&TokenCache); 4] = [
            TokenCache::changing,
            |c| c.settle(true),
            TokenCache::listener_connected,
            TokenCache::listener_gone,
        ];
        for empty in emptyings {
            let from = cache.generation();
            empty(&cache);
            assert!(cache.get(&record.hash).is_none());
            cache.put(&record, from);
            assert!(cache.get(&record.hash).is_none());
            cache.put(&record, cache.generation());
            assert!(cache.get(&record.hash).is_some());
        }
    }

    #[test]
    fn settle_empties_only_after_a_change() {
        let cache = TokenCache::default();
        let record = record();
        cache.put(&record, cache.generation());
        cache.settle(false);
        assert!(cache.get(&record.hash).is_some());
        cache.changing();
        cache.put(&record, cache.generation());
        cache.settle(false);
        assert!(
            cache.get(&record.hash).is_none(),
            "the hook's change empties at the end"
        );
        cache.put(&record, cache.generation());
        cache.settle(false);
        assert!(cache.get(&record.hash).is_some(), "once");
    }

    #[test]
    fn entries_outlive_the_short_bound_only_while_the_listener_is_heard() {
        let cache = TokenCache::default();
        let record = record();
        assert!(!cache.is_heard());
        cache.listener_connected();
        cache.listener_alive(Instant::now() + Duration::from_secs(3600));
        assert!(cache.is_heard());
        cache.put(&record, cache.generation());
        // Age the entry past the short bound.
        if let Ok(mut state) = cache.state.lock()
            && let Some((_, at)) = state.entries.get_mut(record.hash.as_bytes())
        {
            *at -= TTL * 2;
        }
        assert!(cache.get(&record.hash).is_some(), "heard: kept");
        // The lease lapses (the listener is stuck): the short bound applies.
        cache.listener_alive(Instant::now() - HEARD_LEASE * 2);
        assert!(!cache.is_heard());
        assert!(cache.get(&record.hash).is_none(), "unheard: past TTL");
        // Lost: emptied at once, whatever the age.
        cache.listener_alive(Instant::now());
        cache.put(&record, cache.generation());
        cache.listener_gone();
        assert!(cache.get(&record.hash).is_none());
        assert!(!cache.is_heard());
    }
}

/// The cache beside a real database: a change through one store (one
/// node) empties the cache of another, a read racing a change does not
/// bring the old record back, and a listener that is gone or stuck leaves
/// entries the short bound only.
#[cfg(test)]
mod store_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    use super::*;
    use crate::testing::Backends;
    use crate::{AuditEvent, ClusterEvent, MigrationOptions, Principal, Store, StoreError};
    use valet_core::grant::UserWrite;
    use valet_core::{ApiToken, Granted, Scope, ScopeSet, TokenScopes};

    const DEADLINE: Duration = Duration::from_secs(30);

    fn write(user: &str) -> Granted<UserWrite> {
        Granted::for_operator(user)
    }

    fn token(store: &Store, user: &str, scopes: TokenScopes) -> (TokenRecord, ApiToken) {
        store
            .create_token(&write(user), "ci", scopes, None)
            .expect("token")
    }

    /// Polls `done` until it holds, failing after a generous deadline.
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A node's listener on a thread of its own.
    struct Listener {
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<Result<(), StoreError>>,
    }

    impl Listener {
        fn start(store: &Store, on: impl FnMut(ClusterEvent) + Send + 'static) -> Listener {
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (store, stop) = (store.clone(), stop.clone());
                std::thread::spawn(move || store.listen(&stop, on))
            };
            wait_until("the listener hears", || store.token_cache().is_heard());
            Listener { stop, thread }
        }

        fn stop(self) -> Result<(), StoreError> {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().expect("listener thread")
        }
    }

    #[test]
    fn a_read_that_races_a_change_does_not_refill_the_cache() {
        for backend in Backends::all() {
            let store = backend.open();
            let user = store
                .create_user("ada", "a@example.com", None)
                .expect("user");
            let (record, secret) = token(&store, &user.id, TokenScopes::Legacy);
            let hash = secret.hash();
            // The read sees the live token; the revocation commits before
            // the read's record reaches the cache.
            let read = store
                .token_by_hash_then(&hash, || {
                    store
                        .revoke_token(&write(&user.id), &record.id, "raced")
                        .expect("revoke");
                })
                .expect("read")
                .expect("found");
            assert!(!read.is_revoked(), "{backend:?}: the read came first");
            assert!(
                store.token_cache().get(&hash).is_none(),
                "{backend:?}: the stale read was cached"
            );
            let now = store.token_by_hash(&hash).expect("read").expect("found");
            assert!(now.is_revoked());
            assert!(
                store
                    .token_cache()
                    .get(&hash)
                    .is_some_and(|r| r.is_revoked())
            );
        }
        // Across nodes: the change comes through A, B's listener empties
        // B's cache between B's read and B's fill.
        let backend = Backends::postgres();
        let (a, b) = (backend.open(), backend.open());
        let user = a.create_user("ada", "a@example.com", None).expect("user");
        let (record, secret) = token(&a, &user.id, TokenScopes::Legacy);
        let hash = secret.hash();
        let listener = Listener::start(&b, |_| {});
        let read = b
            .token_by_hash_then(&hash, || {
                let before = b.token_cache().generation();
                a.revoke_token(&write(&user.id), &record.id, "raced")
                    .expect("revoke");
                wait_until("B hears the revocation", || {
                    b.token_cache().generation() != before
                });
            })
            .expect("read")
            .expect("found");
        assert!(!read.is_revoked());
        assert!(
            b.token_cache().get(&hash).is_none(),
            "B cached the stale read"
        );
        listener.stop().expect("listen");
    }

    #[test]
    fn every_change_through_one_node_empties_the_cache_of_a_listening_node() {
        let backend = Backends::postgres();
        let (a, b) = (backend.open(), backend.open());
        let user = a.create_user("ada", "a@example.com", None).expect("user");
        let scoped = || TokenScopes::Scoped(ScopeSet::default_val());
        let listener = Listener::start(&b, |_| {});
        // Each change, with the token it changes.
        let (held, held_secret) = token(&a, &user.id, TokenScopes::Legacy);
        let (moved, moved_secret) = token(&a, &user.id, TokenScopes::Legacy);
        a.insert_audit_rows(&[AuditEvent {
            principal: Principal::Token {
                user_id: user.id.clone(),
                token_id: held.id.clone(),
            },
            scope: "val:write".parse::<Scope>().expect("scope"),
            route: "PATCH /v1/vals/{id}".into(),
            at: crate::time::now_ms(),
        }])
        .expect("audit");
        let options = MigrationOptions::default();
        type Change<'a> = Box<dyn Fn() + 'a>;
        let (renamed, renamed_secret) = token(&a, &user.id, scoped());
        let (narrowed, narrowed_secret) = token(&a, &user.id, scoped());
        let (revoked, revoked_secret) = token(&a, &user.id, scoped());
        let (_, leaked_secret) = token(&a, &user.id, scoped());
        let changes: Vec<(&str, &ApiToken, Change<'_>)> = vec![
            (
                "rename",
                &renamed_secret,
                Box::new(|| {
                    a.update_token(
                        &write(&user.id),
                        &renamed.id,
                        crate::TokenChange {
                            name: Some("renamed".into()),
                            scopes: None,
                        },
                    )
                    .map(drop)
                    .expect("rename")
                }),
            ),
            (
                "re-scope",
                &narrowed_secret,
                Box::new(|| {
                    a.set_token_scopes(&write(&user.id), &narrowed.id, ScopeSet::EMPTY)
                        .map(drop)
                        .expect("re-scope")
                }),
            ),
            (
                "revoke",
                &revoked_secret,
                Box::new(|| {
                    a.revoke_token(&write(&user.id), &revoked.id, "by its owner")
                        .map(drop)
                        .expect("revoke")
                }),
            ),
            (
                "leak report",
                &leaked_secret,
                Box::new(|| {
                    a.revoke_leaked(&leaked_secret.hash(), "https://github.com/x")
                        .map(drop)
                        .expect("leak")
                }),
            ),
            (
                "scope migration",
                &moved_secret,
                Box::new(|| {
                    let summary = a.migrate_scopes(&options, |_, _| {}).expect("migrate");
                    assert_eq!((summary.migrated, summary.held), (1, 1), "{summary:?}");
                }),
            ),
            (
                "migration reverted",
                &moved_secret,
                Box::new(|| a.revert_migration(&moved.id).expect("revert")),
            ),
            (
                "held tokens finished",
                &held_secret,
                Box::new(|| {
                    assert_eq!(a.finish_held(&options).expect("finish"), 1);
                }),
            ),
        ];
        for (name, secret, change) in changes {
            let hash = secret.hash();
            // A late notification of the change before may empty the cache
            // while this read is under way (then it is rightly not cached):
            // read until it is.
            let mut before = None;
            wait_until(&format!("{name}: B caches it"), || {
                before = b.token_by_hash(&hash).expect("read");
                b.token_cache().get(&hash).is_some()
            });
            let before = before.expect("found");
            let generation = b.token_cache().generation();
            change();
            wait_until(&format!("{name}: B's cache emptied"), || {
                b.token_cache().generation() != generation
            });
            assert!(b.token_cache().get(&hash).is_none(), "{name}");
            let after = b.token_by_hash(&hash).expect("read").expect("found");
            assert!(
                (before.name.as_str(), before.scopes, before.revoked_at)
                    != (after.name.as_str(), after.scopes, after.revoked_at),
                "{name}: B reads the change"
            );
        }
        listener.stop().expect("listen");
        assert!(
            !b.token_cache().is_heard(),
            "a stopped listener is not heard"
        );
    }

    #[test]
    fn a_revocation_missed_by_a_dropped_listener_is_refused_within_the_bound() {
        let backend = Backends::postgres();
        let (a, b) = (backend.open(), backend.open());
        let user = a.create_user("ada", "a@example.com", None).expect("user");
        let (record, secret) = token(&a, &user.id, TokenScopes::Legacy);
        let hash = secret.hash();
        let listener = Listener::start(&b, |_| {});
        b.token_by_hash(&hash).expect("read").expect("found");
        // Drop B's notification connection from the server side.
        let Backends::Postgres { url, .. } = &backend else {
            unreachable!("a postgres backend")
        };
        let mut admin = postgres::Client::connect(url, postgres::NoTls).expect("admin");
        let killed = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'valet listen' AND datname = current_database()",
                &[],
            )
            .expect("terminate");
        assert_eq!(killed.len(), 1, "one listener connection");
        assert!(
            listener.thread.join().expect("thread").is_err(),
            "the listener saw it go"
        );
        assert!(!b.token_cache().is_heard());
        assert!(
            b.token_cache().get(&hash).is_none(),
            "emptied when the listener went"
        );
        // Filled while unheard, then revoked through A: nothing tells B.
        b.token_by_hash(&hash).expect("read").expect("found");
        let filled = Instant::now();
        a.revoke_token(&write(&user.id), &record.id, "while B was deaf")
            .expect("revoke");
        std::thread::sleep(TTL.saturating_sub(filled.elapsed()));
        assert!(
            b.token_cache().get(&hash).is_none(),
            "an unheard entry outlived {TTL:?}"
        );
        assert!(
            b.token_by_hash(&hash)
                .expect("read")
                .expect("found")
                .is_revoked()
        );
        // Back: the cache starts empty.
        b.token_cache().put(&record, b.token_cache().generation());
        let listener = Listener::start(&b, |_| {});
        assert!(b.token_cache().get(&hash).is_none(), "emptied on reconnect");
        listener.stop().expect("listen");
    }

    #[test]
    fn a_stuck_listener_stops_being_trusted_after_its_lease() {
        let backend = Backends::postgres();
        let (a, b) = (backend.open(), backend.open());
        let user = a.create_user("ada", "a@example.com", None).expect("user");
        let (record, secret) = token(&a, &user.id, TokenScopes::Legacy);
        let hash = secret.hash();
        let val = a
            .create_val(
                &Granted::for_operator(&user.id),
                &valet_core::GrantedSet::for_operator(&user.id, ScopeSet::all()),
                crate::NewVal {
                    name: "job".into(),
                    kind: crate::ValKind::Script,
                    code: "".into(),
                    scopes: ScopeSet::EMPTY,
                    env: Default::default(),
                    timeout_ms: 1000,
                    schedule: None,
                },
            )
            .expect("val");
        // The listener's thread blocks on the first run it hears of, as a
        // connection that stopped answering would leave it.
        let (stuck_tx, stuck_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let listener = Listener::start(&b, move |event| {
            if event == ClusterEvent::RunQueued {
                let _ = stuck_tx.send(Instant::now());
                let _ = release_rx.recv();
            }
        });
        b.token_by_hash(&hash).expect("read").expect("found");
        let filled = Instant::now();
        a.enqueue_run("run_1", &user.id, &val.id, "api")
            .expect("queue");
        let stuck = stuck_rx
            .recv_timeout(DEADLINE)
            .expect("the listener heard the run");
        a.revoke_token(&write(&user.id), &record.id, "while B was stuck")
            .expect("revoke");
        let trusted_until = (stuck + HEARD_LEASE).max(filled + TTL);
        std::thread::sleep(trusted_until.saturating_duration_since(Instant::now()));
        assert!(
            !b.token_cache().is_heard(),
            "a stuck listener's lease ran out"
        );
        assert!(
            b.token_cache().get(&hash).is_none(),
            "an entry outlived a stuck listener's lease"
        );
        release_tx.send(()).expect("release");
        listener.stop().expect("listen");
    }
}
