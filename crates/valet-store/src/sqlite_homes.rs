//! Which node is the home of each user's SQLite database (a cluster on
//! PostgreSQL): the one node that executes that user's `std/sqlite`
//! statements, while every other node forwards them to it.
//!
//! A home is held only while its node's lease is alive, by the database's
//! clock. Taking one is a transaction under a per-user lock: it is free
//! (never held, or its holder's lease ran out, or its holder was reaped
//! or left), and then the taker gets it with the fencing token bumped; or
//! a live node holds it, and the taker learns where. A user's row is never
//! deleted, so its fence only ever grows: each new holder writes with a
//! higher token than all before it, and the database file refuses a lower
//! one (`UserDatabases::execute_fenced`).

use crate::sql::{Sql, args};
use crate::{Store, StoreError};

/// Who holds a user's database, as [`Store::take_sqlite_home`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeClaim {
    /// The calling node is the home, writing with this fencing token.
    Mine { fence: i64 },
    /// Another node with a live lease is the home.
    Elsewhere(SqliteHome),
}

/// The home of one user's database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteHome {
    pub user_id: String,
    /// `None` when no node holds it (its last holder was reaped or left).
    pub node_id: Option<String>,
    /// Where the holder's API answers (`--node-address`), when it has a
    /// node and that node registered one.
    pub address: Option<String>,
    /// The holder's fencing token: it grows with every change of holder.
    pub fence: i64,
    /// How long the holder's lease has left by the database's clock;
    /// zero or less when it has run out (or the holder is gone).
    pub lease_left_ms: i64,
}

impl SqliteHome {
    /// Whether a node with a live lease holds it.
    pub fn is_held(&self) -> bool {
        self.node_id.is_some() && self.lease_left_ms > 0
    }
}

impl Store {
    /// Takes the home of `user_id`'s database for `node_id`, unless a node
    /// with a live lease holds it. `node_id` must hold a live lease itself
    /// (else [`StoreError::Conflict`]). Taking a home from anyone else (or
    /// from no one) bumps its fence; a node asking again for a home it
    /// holds gets its fence unchanged.
    pub fn take_sqlite_home(&self, user_id: &str, node_id: &str) -> Result<HomeClaim, StoreError> {
        self.require_shared_homes()?;
        self.db_write(|sql| {
            // One taker of a user's home at a time: the row may not exist
            // yet, so a row lock alone would not serialise two inserts.
            sql.lock(&format!("valet sqlite home {user_id}"))?;
            // The taker's own lease, checked at this very moment (not at
            // the transaction's start, which a wait for the lock precedes).
            let alive: bool = sql
                .query_opt(
                    "SELECT heartbeat_at + lease_ms * interval '1 millisecond' > clock_timestamp()
                     FROM nodes WHERE id = ?1",
                    args![node_id],
                )?
                .map(|r| r.get(0))
                .transpose()?
                .unwrap_or(false);
            if !alive {
                return Err(StoreError::Conflict(format!(
                    "node '{node_id}' holds no live lease, so it cannot be the home of a user's database"
                )));
            }
            match home_in(sql, user_id)? {
                None => {
                    sql.execute(
                        "INSERT INTO sqlite_homes (user_id, node_id, fence) VALUES (?1, ?2, 1)",
                        args![user_id, node_id],
                    )?;
                    Ok(HomeClaim::Mine { fence: 1 })
                }
                Some(home) if home.node_id.as_deref() == Some(node_id) => {
                    Ok(HomeClaim::Mine { fence: home.fence })
                }
                Some(home) if home.is_held() => Ok(HomeClaim::Elsewhere(home)),
                Some(_) => {
                    // Free: bump the fence from the row as it is now (a
                    // reap may have released it since it was read).
                    let fence: i64 = sql
                        .query_one(
                            "UPDATE sqlite_homes SET node_id = ?2, fence = fence + 1
                             WHERE user_id = ?1 RETURNING fence",
                            args![user_id, node_id],
                        )?
                        .get(0)?;
                    Ok(HomeClaim::Mine { fence })
                }
            }
        })
    }

    /// The home of `user_id`'s database as it stands, if it ever had one.
    pub fn sqlite_home(&self, user_id: &str) -> Result<Option<SqliteHome>, StoreError> {
        self.require_shared_homes()?;
        self.db_read(|sql| home_in(sql, user_id))
    }

    /// Releases every home `node_id` holds (a node starting again under
    /// the id of an earlier life: its homes are taken afresh, with new
    /// fences). Returns how many it held.
    pub fn release_sqlite_homes(&self, node_id: &str) -> Result<u64, StoreError> {
        self.require_shared_homes()?;
        self.db_write(|sql| release_in(sql, node_id))
    }

    fn require_shared_homes(&self) -> Result<(), StoreError> {
        if self.is_shared() {
            Ok(())
        } else {
            Err(StoreError::Invalid(
                "homes of users' databases need the control plane on PostgreSQL (--database postgres://...)"
                    .into(),
            ))
        }
    }
}

/// The home row of a user, with its holder's lease as of the transaction's
/// start (`now()`): an earlier time, so a holder never looks dead sooner
/// than it is.
fn home_in(sql: &mut Sql<'_>, user_id: &str) -> Result<Option<SqliteHome>, StoreError> {
    sql.query_opt(
        "SELECT h.user_id, h.node_id, n.address, h.fence,
                CAST(COALESCE(FLOOR(EXTRACT(EPOCH FROM
                    (n.heartbeat_at + n.lease_ms * interval '1 millisecond' - now())) * 1000), 0)
                    AS BIGINT)
         FROM sqlite_homes h LEFT JOIN nodes n ON n.id = h.node_id
         WHERE h.user_id = ?1",
        args![user_id],
    )?
    .map(|r| {
        Ok(SqliteHome {
            user_id: r.get(0)?,
            node_id: r.get(1)?,
            address: r.get(2)?,
            fence: r.get(3)?,
            lease_left_ms: r.get(4)?,
        })
    })
    .transpose()
}

/// Releases the homes of a node that was reaped or left, keeping their
/// fences (the next holder bumps them).
pub(crate) fn release_in(sql: &mut Sql<'_>, node_id: &str) -> Result<u64, StoreError> {
    sql.execute(
        "UPDATE sqlite_homes SET node_id = NULL WHERE node_id = ?1",
        args![node_id],
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::testing::Backends;

    fn mine(claim: HomeClaim) -> i64 {
        match claim {
            HomeClaim::Mine { fence } => fence,
            other => panic!("not mine: {other:?}"),
        }
    }

    #[test]
    fn a_home_moves_only_when_its_holder_is_gone_and_its_fence_only_grows() {
        let backend = Backends::postgres();
        let (a, b) = (backend.open(), backend.open());
        a.set_node_address("http://a.example:7070");
        a.heartbeat("a", Duration::from_millis(400)).expect("join");
        b.heartbeat("b", Duration::from_secs(60)).expect("join");
        assert_eq!(mine(a.take_sqlite_home("usr_1", "a").expect("take")), 1);
        assert_eq!(mine(a.take_sqlite_home("usr_1", "a").expect("again")), 1);
        match b.take_sqlite_home("usr_1", "b").expect("take") {
            HomeClaim::Elsewhere(home) => {
                assert_eq!(home.node_id.as_deref(), Some("a"));
                assert_eq!(home.address.as_deref(), Some("http://a.example:7070"));
                assert_eq!(home.fence, 1);
                assert!(home.lease_left_ms > 0 && home.lease_left_ms <= 400);
            }
            other => panic!("a holds it: {other:?}"),
        }
        // A node without a live lease cannot take a home at all.
        assert!(matches!(
            b.take_sqlite_home("usr_1", "ghost"),
            Err(StoreError::Conflict(_))
        ));
        // a's lease runs out (not yet reaped): b takes it with a higher fence.
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(mine(b.take_sqlite_home("usr_1", "b").expect("take")), 2);
        // a, back, finds b there (its own lease renewed, its claim gone).
        a.heartbeat("a", Duration::from_millis(400)).expect("renew");
        assert!(matches!(
            a.take_sqlite_home("usr_1", "a").expect("take"),
            HomeClaim::Elsewhere(_)
        ));
        // b leaves: the home is released, its fence kept, and bumped by the next.
        b.leave_cluster("b").expect("leave");
        let released = a.sqlite_home("usr_1").expect("read").expect("row");
        assert_eq!((released.node_id, released.fence), (None, 2));
        assert_eq!(mine(a.take_sqlite_home("usr_1", "a").expect("take")), 3);
        // a is reaped: released again, the fence kept.
        std::thread::sleep(Duration::from_millis(600));
        b.heartbeat("b", Duration::from_secs(60)).expect("rejoin");
        let reaped = b.reap_dead_nodes().expect("reap");
        assert_eq!(reaped.len(), 1);
        let home = b.sqlite_home("usr_1").expect("read").expect("row");
        assert_eq!((home.node_id.as_deref(), home.fence), (None, 3));
        assert!(!home.is_held());
        assert_eq!(mine(b.take_sqlite_home("usr_1", "b").expect("take")), 4);
        assert_eq!(b.release_sqlite_homes("b").expect("release"), 1);
    }

    #[test]
    fn homes_need_postgres() {
        let store = Backends::sqlite().open();
        assert!(matches!(
            store.take_sqlite_home("usr_1", "n"),
            Err(StoreError::Invalid(_))
        ));
    }

    /// One stretch of time in which a node held a user's home, by the
    /// node's own clock (the one it decides by whether it may act).
    #[derive(Debug, Clone)]
    struct Hold {
        node: usize,
        fence: i64,
        from: Instant,
        until: Instant,
    }

    /// A tiny deterministic generator, so each node's behaviour is the
    /// same from run to run (only the timing of the database differs).
    struct Dice(u64);

    impl Dice {
        fn roll(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A node as valet-server runs one: it may act as a home only until
    /// its own clock says its lease may have run out (the time it *sent*
    /// its last heartbeat, plus the lease, less a tenth), and after any
    /// gap in its lease it drops what it held and asks again.
    fn node(
        store: &Store,
        n: usize,
        users: &[String],
        lease: Duration,
        run_for: Duration,
    ) -> (HashMap<String, Vec<Hold>>, usize) {
        let id = format!("node_{n}");
        let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1));
        let mut valid_until: Option<Instant> = None;
        let mut held: HashMap<String, (i64, Instant)> = HashMap::new();
        let mut holds: HashMap<String, Vec<Hold>> = HashMap::new();
        let mut takes = 0;
        let end_all = |held: &mut HashMap<String, (i64, Instant)>,
                       holds: &mut HashMap<String, Vec<Hold>>,
                       at: Instant| {
            for (user, (fence, from)) in held.drain() {
                holds.entry(user).or_default().push(Hold {
                    node: n,
                    fence,
                    from,
                    until: at.max(from),
                });
            }
        };
        let began = Instant::now();
        let mut next_beat = began;
        while began.elapsed() < run_for {
            // Now and then (about once a second) the node freezes (a
            // pause, a partition) for longer than its lease: it neither
            // heartbeats nor acts.
            std::thread::sleep(Duration::from_millis(5));
            if dice.roll(150) == 0 {
                std::thread::sleep(lease * 2);
            }
            let now = Instant::now();
            if valid_until.is_none_or(|v| now >= v) {
                end_all(&mut held, &mut holds, valid_until.unwrap_or(now));
            }
            if now >= next_beat {
                let sent = Instant::now();
                let kept = store.heartbeat(&id, lease).expect("heartbeat");
                let arrived = Instant::now();
                let continuous = kept && valid_until.is_some_and(|v| arrived < v);
                if !continuous {
                    end_all(
                        &mut held,
                        &mut holds,
                        valid_until.unwrap_or(arrived).min(arrived),
                    );
                }
                valid_until = Some(sent + lease - lease / 10);
                next_beat = sent + lease / 3;
                store.reap_dead_nodes().expect("reap");
            }
            let Some(until) = valid_until.filter(|v| Instant::now() < *v) else {
                continue;
            };
            let user = &users[dice.roll(users.len() as u64) as usize];
            if held.contains_key(user) {
                continue;
            }
            match store.take_sqlite_home(user, &id) {
                Ok(HomeClaim::Mine { fence }) => {
                    // Held from the moment the answer is here, if the
                    // lease it was taken under still holds.
                    let from = Instant::now();
                    if valid_until == Some(until) && from < until {
                        held.insert(user.clone(), (fence, from));
                        takes += 1;
                    }
                }
                Ok(HomeClaim::Elsewhere(_)) | Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("take: {e}"),
            }
        }
        end_all(
            &mut held,
            &mut holds,
            valid_until.unwrap_or(Instant::now()).min(Instant::now()),
        );
        (holds, takes)
    }

    #[test]
    fn two_nodes_never_hold_the_same_user_database_lease_at_once() {
        let backend = Backends::postgres();
        let users: Vec<String> = (0..5).map(|i| format!("usr_{i}")).collect();
        let stores: Vec<Store> = (0..4).map(|_| backend.open()).collect();
        let lease = Duration::from_millis(300);
        let results: Vec<(HashMap<String, Vec<Hold>>, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(n, store)| {
                    let users = &users;
                    s.spawn(move || node(store, n, users, lease, Duration::from_secs(6)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("node thread"))
                .collect()
        });
        let mut changes = 0;
        for user in &users {
            let mut holds: Vec<Hold> = results
                .iter()
                .flat_map(|(h, _)| h.get(user).cloned().unwrap_or_default())
                .collect();
            holds.sort_by_key(|h| h.from);
            for pair in holds.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                assert!(
                    a.until <= b.from,
                    "{user}: node {} held it until {:?} after node {} took it: {a:?} {b:?}",
                    a.node,
                    a.until - b.from,
                    b.node
                );
                if a.node == b.node {
                    assert!(
                        b.fence >= a.fence,
                        "{user}: the fence went back: {a:?} {b:?}"
                    );
                } else {
                    assert!(
                        b.fence > a.fence,
                        "{user}: a new holder without a higher fence: {a:?} {b:?}"
                    );
                    changes += 1;
                }
            }
            let last = stores[0].sqlite_home(user).expect("read");
            if let (Some(home), Some(hold)) = (last, holds.last()) {
                assert!(home.fence >= hold.fence, "{user}: {home:?} {hold:?}");
            }
        }
        let takes: usize = results.iter().map(|(_, t)| t).sum();
        eprintln!(
            "{takes} takes, {changes} changes of holder over {} users",
            users.len()
        );
        assert!(
            changes >= users.len(),
            "too few changes of holder to prove anything: {changes}"
        );
    }
}
