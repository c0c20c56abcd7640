//! This node's side of users' SQLite homes: which users' databases it is
//! the home of, when it may act as one, and where the others' homes are.
//!
//! A node may act as a home only while its lease surely holds by its own
//! clock: until the time it *sent* its last successful heartbeat plus the
//! lease (less a tenth, for clock rates). The database counts the lease
//! from when it *received* that heartbeat, which is later, so by the time
//! any other node may take a home over, this node has stopped acting as
//! one. After any gap in its lease (a heartbeat answered too late, or one
//! that found the node reaped) it forgets the homes it held and asks the
//! control plane again: each is either still its own (with its fence) or
//! gone to a node with a higher fence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use valet_api::{BoxFuture, HomePlace, HomeUnavailable, RemoteHome, SqliteHomes};
use valet_store::{HomeClaim, HomeFence, Store, StoreError};

/// The lease as this node sees it.
#[derive(Debug, Default)]
struct LeaseView {
    /// Until when this node may act as a home; `None` before its first
    /// heartbeat.
    valid_until: Option<Instant>,
    /// Grows at every gap in the lease: homes remembered under an older
    /// epoch are asked for again.
    epoch: u64,
}

impl LeaseView {
    /// A heartbeat sent at `sent` was answered at `arrived`; `kept` is
    /// false when the node had been reaped. Returns whether the lease had
    /// a gap (then homes held before must be asked for again).
    fn renewed(&mut self, sent: Instant, arrived: Instant, lease: Duration, kept: bool) -> bool {
        // The lease held throughout only if this answer came while the
        // last one still held: then the database renewed a live lease.
        let continuous = kept && self.valid_until.is_some_and(|until| arrived < until);
        if !continuous {
            self.epoch += 1;
        }
        self.valid_until = Some(sent + lease - lease / 10);
        !continuous
    }

    /// Until when this node may act as a home, and the epoch, at `now`.
    fn valid(&self, now: Instant) -> Option<(Instant, u64)> {
        self.valid_until
            .filter(|until| now < *until)
            .map(|until| (until, self.epoch))
    }
}

/// Where a user's database was found.
#[derive(Debug, Clone)]
enum Place {
    /// Here, with this fence, as of lease epoch `epoch`.
    Here {
        fence: i64,
        epoch: u64,
    },
    There(RemoteHome),
}

/// The homes of this node, and what it knows of the others'.
pub struct NodeHomes {
    store: Store,
    node_id: String,
    lease: Duration,
    /// A std `Mutex`: read and updated in a few instructions, never held
    /// across an `.await`.
    view: Mutex<LeaseView>,
    /// Users' databases by user id. A std `Mutex`, as `view`.
    places: Mutex<HashMap<String, Place>>,
}

impl NodeHomes {
    pub(super) fn new(store: Store, node_id: String, lease: Duration) -> NodeHomes {
        NodeHomes {
            store,
            node_id,
            lease,
            view: Mutex::new(LeaseView::default()),
            places: Mutex::new(HashMap::new()),
        }
    }

    /// A heartbeat sent at `sent` succeeded; `kept` is false when the
    /// node had been reaped (its homes released) and now has a new lease.
    pub(super) fn renewed(&self, sent: Instant, kept: bool) {
        let arrived = Instant::now();
        let Ok(mut view) = self.view.lock() else {
            return;
        };
        let first = view.valid_until.is_none();
        if view.renewed(sent, arrived, self.lease, kept) && !first {
            tracing::warn!(
                node_id = self.node_id,
                "this node's lease had a gap: it asks again which users' databases it holds"
            );
        }
    }

    /// Until when this node may act as a home, and the lease's epoch; or
    /// why it may not now.
    fn lease(&self) -> Result<(Instant, u64), HomeUnavailable> {
        let view = self
            .view
            .lock()
            .map_err(|_| unavailable("lock poisoned", 1))?;
        view.valid(Instant::now()).ok_or_else(|| HomeUnavailable {
            message: "this node cannot confirm its cluster lease (the control plane is slow or unreachable), so it may not serve users' databases; retry".into(),
            retry_after: 2,
            moved: false,
        })
    }

    fn remembered(&self, user_id: &str) -> Option<Place> {
        self.places.lock().ok()?.get(user_id).cloned()
    }

    fn remember(&self, user_id: &str, place: Place) {
        if let Ok(mut places) = self.places.lock() {
            places.insert(user_id.to_owned(), place);
        }
    }

    /// Asks the control plane, taking the home when it is free.
    async fn claim(&self, user_id: &str) -> Result<Place, HomeUnavailable> {
        let (_, epoch) = self.lease()?;
        let (user, node) = (user_id.to_owned(), self.node_id.clone());
        let claim = self
            .store
            .call(move |s| s.take_sqlite_home(&user, &node))
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => unavailable(
                    "this node's cluster lease has run out; it is renewing it, retry",
                    2,
                ),
                e => {
                    tracing::warn!(error = %e, "could not look up the home of a user's database");
                    unavailable(
                        "the cluster's control plane did not answer where this user's database is; retry",
                        2,
                    )
                }
            })?;
        let place = match claim {
            HomeClaim::Mine { fence } => {
                // Taken under the lease of `epoch`: good only if that lease
                // has had no gap since.
                let (_, now_epoch) = self.lease()?;
                if now_epoch != epoch {
                    return Err(unavailable("this node's lease had a gap; retry", 1));
                }
                Place::Here { fence, epoch }
            }
            HomeClaim::Elsewhere(home) => match (home.node_id, home.address) {
                (Some(node_id), Some(address)) => Place::There(RemoteHome {
                    node_id,
                    address,
                    fence: home.fence,
                    lease_left_ms: home.lease_left_ms,
                }),
                (node, _) => {
                    tracing::error!(
                        node = node.unwrap_or_default(),
                        "the home node of a user's database registered no address; give it --node-address"
                    );
                    return Err(unavailable(
                        "the node that holds this user's database cannot be reached; retry",
                        5,
                    ));
                }
            },
        };
        self.remember(user_id, place.clone());
        Ok(place)
    }
}

fn unavailable(message: &str, retry_after: u64) -> HomeUnavailable {
    HomeUnavailable {
        message: message.to_owned(),
        retry_after,
        moved: false,
    }
}

impl SqliteHomes for NodeHomes {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn locate<'a>(
        &'a self,
        user_id: &'a str,
        fresh: bool,
    ) -> BoxFuture<'a, Result<HomePlace, HomeUnavailable>> {
        Box::pin(async move {
            let (until, epoch) = self.lease()?;
            let known = if fresh {
                None
            } else {
                self.remembered(user_id)
            };
            let place = match known {
                Some(Place::Here { fence, epoch: e }) if e == epoch => Place::Here { fence, epoch },
                Some(Place::There(home)) => Place::There(home),
                _ => self.claim(user_id).await?,
            };
            Ok(match place {
                Place::Here { fence, .. } => HomePlace::Here(HomeFence {
                    token: fence,
                    valid_until: until,
                }),
                Place::There(home) => HomePlace::There(home),
            })
        })
    }

    fn hold<'a>(
        &'a self,
        user_id: &'a str,
        fence: i64,
    ) -> BoxFuture<'a, Result<HomeFence, HomeUnavailable>> {
        Box::pin(async move {
            let (until, epoch) = self.lease()?;
            let place = match self.remembered(user_id) {
                Some(Place::Here { fence, epoch: e }) if e == epoch => Place::Here { fence, epoch },
                _ => self.claim(user_id).await?,
            };
            match place {
                Place::Here { fence: held, .. } if held == fence => Ok(HomeFence {
                    token: fence,
                    valid_until: until,
                }),
                _ => Err(HomeUnavailable {
                    message: "this node does not hold this user's database (any more); nothing ran"
                        .into(),
                    retry_after: 1,
                    moved: true,
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_acts_only_within_its_lease_and_forgets_its_homes_after_a_gap() {
        let lease = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut view = LeaseView::default();
        assert_eq!(view.valid(t0), None, "no heartbeat yet");
        // Counted from the heartbeat's sending, less a tenth.
        view.renewed(t0, t0 + Duration::from_secs(1), lease, true);
        let (until, epoch) = view.valid(t0 + Duration::from_secs(1)).expect("valid");
        assert_eq!(until, t0 + Duration::from_secs(9));
        assert_eq!(view.valid(until), None, "not at its end");
        // Renewed while it held: the same epoch, so homes stay held.
        let t1 = t0 + Duration::from_secs(3);
        assert!(!view.renewed(t1, t1 + Duration::from_secs(5), lease, true));
        assert_eq!(
            view.valid(t1 + Duration::from_secs(5)).map(|v| v.1),
            Some(epoch)
        );
        // An answer that came after the lease it renewed ran out: a gap,
        // even though the database kept the node's row.
        let t2 = t1 + Duration::from_secs(8);
        assert!(view.renewed(t2, t2 + Duration::from_secs(2), lease, true));
        assert_eq!(
            view.valid(t2 + Duration::from_secs(2)).map(|v| v.1),
            Some(epoch + 1)
        );
        // Reaped (its row was gone): a gap, whenever the answer came.
        let t3 = t2 + Duration::from_secs(3);
        assert!(view.renewed(t3, t3, lease, false));
        assert_eq!(view.valid(t3).map(|v| v.1), Some(epoch + 2));
        // A heartbeat that takes longer than the lease leaves it expired.
        let t4 = t3 + Duration::from_secs(5);
        view.renewed(t4, t4 + Duration::from_secs(11), lease, true);
        assert_eq!(view.valid(t4 + Duration::from_secs(11)), None);
    }
}
