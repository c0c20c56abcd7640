//! The boundary between the sqlite routes and a cluster: in a cluster each
//! user's SQLite database has one home node, and the API asks a
//! [`SqliteHomes`] (which `valet-server` implements) where a user's
//! statements run. On one machine there is none, and every database is
//! local, as before.

use std::sync::Arc;

use axum::http::StatusCode;
use valet_store::HomeFence;

use crate::forward::{ForwardKey, NonceLog};
use crate::{ApiError, BoxFuture};

/// Where a user's statements run now.
#[derive(Debug, Clone)]
pub enum HomePlace {
    /// On this node, under this hold.
    Here(HomeFence),
    /// On another node: forward them there.
    There(RemoteHome),
}

/// The home node of a user's database, when it is another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHome {
    pub node_id: String,
    /// Its API's base URL (`--node-address`).
    pub address: String,
    /// The fencing token it holds the home with.
    pub fence: i64,
    /// How long its lease had left when it was looked up: after that, if
    /// it stops answering, another node may take the home over.
    pub lease_left_ms: i64,
}

/// Why no node can execute a user's statements right now. Nothing was
/// executed; the caller may retry after `retry_after` seconds.
#[derive(Debug, Clone)]
pub struct HomeUnavailable {
    pub message: String,
    pub retry_after: u64,
    /// The home is elsewhere than the asker thought (a forward found it
    /// moved): locating it afresh may succeed at once.
    pub moved: bool,
}

impl From<HomeUnavailable> for ApiError {
    fn from(e: HomeUnavailable) -> ApiError {
        ApiError {
            retry_after: Some(e.retry_after.max(1)),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                if e.moved {
                    "sqlite_home_moved"
                } else {
                    "sqlite_home_unavailable"
                },
                e.message,
            )
        }
    }
}

/// Where users' databases live in a cluster.
pub trait SqliteHomes: Send + Sync {
    /// This node's id (a forward names the node it is for).
    fn node_id(&self) -> &str;

    /// Where `user_id`'s statements run now: here (this node is, or has
    /// just become, the home) or on the live home node. `fresh`: ask the
    /// control plane, not a remembered answer (a forward found the home
    /// moved or unreachable).
    fn locate<'a>(
        &'a self,
        user_id: &'a str,
        fresh: bool,
    ) -> BoxFuture<'a, Result<HomePlace, HomeUnavailable>>;

    /// A forward names this node as the home of `user_id` at `fence`: the
    /// hold to execute under, or why not (`moved` when this node is not
    /// that home, or holds it with another fence).
    fn hold<'a>(
        &'a self,
        user_id: &'a str,
        fence: i64,
    ) -> BoxFuture<'a, Result<HomeFence, HomeUnavailable>>;
}

/// What the sqlite routes need in a cluster: the homes, the key that signs
/// forwards between nodes (shared through the control plane), the nonces
/// of forwards already executed here, and a client to forward with.
pub struct SqliteCluster {
    pub(crate) homes: Arc<dyn SqliteHomes>,
    pub(crate) key: ForwardKey,
    pub(crate) nonces: NonceLog,
    pub(crate) client: reqwest::Client,
}

impl SqliteCluster {
    pub(crate) fn new(
        homes: Arc<dyn SqliteHomes>,
        key: ForwardKey,
        max_time: std::time::Duration,
    ) -> Result<SqliteCluster, reqwest::Error> {
        // A forward waits as long as the home may execute, and more.
        // Never redirected: a signed forward goes to the home it names.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(max_time + std::time::Duration::from_secs(10))
            .build()?;
        Ok(SqliteCluster {
            homes,
            key,
            nonces: NonceLog::default(),
            client,
        })
    }
}
