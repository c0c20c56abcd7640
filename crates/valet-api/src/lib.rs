//! valet's HTTP API: the `/v1` routes the std shims call with a run's valet
//! key, behind one auth extractor and per-route scope checks.
//!
//! [`app`] builds the router from an [`AppState`] so tests can drive it on
//! any socket; [`serve`] runs it until the shutdown future resolves.

mod auth;
mod error;
pub mod forward;
pub mod pages;
mod routes;
mod runner;
pub mod secret_scanning;
mod sqlite_homes;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use valet_core::{ChannelId, LiveRuns, SharedKeyRing};
use valet_store::Store;

pub use auth::{Caller, SqliteCaller};
pub use error::ApiError;
pub use routes::shared_json::{FinishedRunJson, MigrationSummaryJson, sql_rows_json, token_json};
pub use runner::{BoxFuture, RunRefused, RunSummary, Runner, ValResponse};
pub use sqlite_homes::{HomePlace, HomeUnavailable, RemoteHome, SqliteCluster, SqliteHomes};

/// Limits and settings of the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Bytes of blob storage per user.
    pub blob_quota: u64,
    /// Largest request body (a blob, an email with attachments).
    pub max_body_bytes: usize,
    /// The address valet sends email from: vals' mail (with the val's
    /// display name) and valet's own (leak reports).
    pub email_from: String,
    /// How much mail each user may send per day.
    pub email_quota: valet_store::EmailQuota,
    /// The URL people reach this server at, for links in messages.
    pub public_url: String,
    /// Where GitHub publishes its secret-scanning signing keys.
    pub github_keys_url: String,
    /// http vals answer on `<user>-<val>.<vals_domain>` (besides
    /// `/{user}/{val}` on the vals listener).
    pub vals_domain: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            blob_quota: 100 << 20,
            max_body_bytes: 10 << 20,
            email_from: valet_store::DEFAULT_EMAIL_FROM.into(),
            email_quota: valet_store::EmailQuota::default(),
            public_url: "http://127.0.0.1:7070".into(),
            github_keys_url: secret_scanning::GITHUB_KEYS_URL.into(),
            vals_domain: None,
        }
    }
}

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// The run-token key ring, shared with the supervisor that mints. A
    /// rotation (`valet keys rotate`, read back by the host's key refresh)
    /// replaces the whole ring; readers take a cheap `Arc` clone and never
    /// hold a lock while verifying.
    pub keys: SharedKeyRing,
    pub live_runs: LiveRuns,
    pub config: Arc<ApiConfig>,
    /// The supervisor, when this process runs vals (`valet serve`, `valet
    /// run`); absent in tests of the API alone.
    pub runner: Option<Arc<dyn Runner>>,
    pub github_keys: Arc<secret_scanning::GithubKeys>,
    pub login_limiter: Arc<pages::LoginLimiter>,
    /// The key that signs session cookies, read once at start.
    pub session_key: Arc<Vec<u8>>,
    /// In a cluster: where each user's SQLite database lives, and how
    /// calls are forwarded there. `None` on one machine: every user's
    /// database is a file here.
    pub sqlite_cluster: Option<Arc<SqliteCluster>>,
}

impl AppState {
    pub fn new(
        store: Store,
        live_runs: LiveRuns,
        config: ApiConfig,
    ) -> Result<AppState, valet_store::StoreError> {
        let keys = SharedKeyRing::new(store.key_ring()?);
        let session_key = Arc::new(store.server_secret("session-cookie")?);
        let github_keys = Arc::new(secret_scanning::GithubKeys::new(
            config.github_keys_url.clone(),
        ));
        Ok(AppState {
            store,
            keys,
            live_runs,
            config: Arc::new(config),
            runner: None,
            github_keys,
            login_limiter: Arc::default(),
            session_key,
            sqlite_cluster: None,
        })
    }

    pub fn with_runner(mut self, runner: Arc<dyn Runner>) -> AppState {
        self.runner = Some(runner);
        self
    }

    /// A node of a cluster: users' sqlite calls run on their home nodes,
    /// with forwards signed under a secret the nodes share through the
    /// control plane.
    pub fn with_sqlite_homes(
        mut self,
        homes: Arc<dyn SqliteHomes>,
    ) -> Result<AppState, valet_store::StoreError> {
        let secret = self.store.server_secret("sqlite-forward")?;
        let key = forward::ForwardKey::new(&secret).ok_or_else(|| {
            valet_store::StoreError::Corrupt("the forward signing secret is unusable".into())
        })?;
        let max_time = self.store.user_dbs().limits().max_time;
        let cluster = SqliteCluster::new(homes, key, max_time).map_err(|e| {
            valet_store::StoreError::Invalid(format!("cannot make the forwarding client: {e}"))
        })?;
        self.sqlite_cluster = Some(Arc::new(cluster));
        Ok(self)
    }
}

/// valet's own origin: `/v1`, `/.well-known/jwks.json`, secret scanning
/// and the pages. It never serves val content.
pub fn app(state: AppState) -> Router {
    routes::router(state)
}

/// A run's channel: `/v1` only. Serve it with the run's [`ChannelId`] as a
/// request extension (see [`channel_service`]).
pub fn channel_app(state: AppState) -> Router {
    routes::channel_router(state)
}

/// `channel_app` for one channel: every request it answers carries `channel`.
pub fn channel_service(app: Router, channel: ChannelId) -> Router {
    app.layer(axum::Extension(channel))
}

/// The origin of http vals (`--vals-listen`).
pub fn vals_app(state: AppState) -> Router {
    routes::vals_router(state)
}

/// The most bytes of a request line plus headers. Longer heads are
/// answered by hyper itself with 431 and no body (see ARCHITECTURE.md).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header lines in one request; more get hyper's 431.
pub const MAX_HEADERS: usize = 100;
/// How long a client may take to send a request's head before hyper
/// closes the connection (slow-loris clients hold no slot for long).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `app(state)` on `listener` until `shutdown` resolves, then lets
/// requests in flight finish.
///
/// HTTP/1 with hyper's limits set here, deliberately: what hyper refuses
/// before valet's router sees a request (a malformed head, a head over
/// [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`]) is answered by hyper, with an
/// empty body; everything the router answers is JSON.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let app = app(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let router = app.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let router = router.clone();
                async move {
                    // hyper enforces the head limit only when a head
                    // arrives in more than one read; enforce it always.
                    if head_bytes(&request) > MAX_HEAD_BYTES {
                        return Ok(ApiError::new(
                            axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "headers_too_large",
                            format!("the request line and headers exceed {MAX_HEAD_BYTES} bytes"),
                        )
                        .into_response());
                    }
                    tower::ServiceExt::oneshot(router, request).await
                }
            },
        );
        // No upgrades: valet speaks no WebSocket, and an upgradeable
        // connection cannot be watched for graceful shutdown.
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// The size of a request's line and headers as sent, near enough.
fn head_bytes<B>(request: &hyper::Request<B>) -> usize {
    let line = request.method().as_str().len() + request.uri().to_string().len() + 12;
    request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
}

/// An `accept` error: a client that gave up is nothing; anything else (out
/// of file descriptors) is logged and waited out, as `axum::serve` does.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in a second");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}
