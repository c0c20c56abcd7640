//! valet's HTTP API: the `/v1` routes the std shims call with a run's valet
//! key, behind one auth extractor and per-route scope checks.
//!
//! [`app`] builds the router from an [`AppState`] so tests can drive it on
//! any socket; [`serve`] runs it until the shutdown future resolves.

mod auth;
mod error;
pub mod pages;
mod routes;
mod runner;
pub mod secret_scanning;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use valet_core::{ChannelId, KeyRing, LiveRuns};
use valet_store::Store;

pub use auth::{Caller, SqliteCaller};
pub use error::ApiError;
pub use routes::tokens_json::token_json;
pub use runner::{BoxFuture, RunRefused, RunSummary, Runner, ValResponse};

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
    /// The run-token key ring. Rotation replaces the whole ring, so readers
    /// take a cheap `Arc` clone and never hold a lock while verifying.
    pub keys: Arc<KeyRing>,
    pub live_runs: LiveRuns,
    pub config: Arc<ApiConfig>,
    /// The supervisor, when this process runs vals (`valet serve`, `valet
    /// run`); absent in tests of the API alone.
    pub runner: Option<Arc<dyn Runner>>,
    pub github_keys: Arc<secret_scanning::GithubKeys>,
    pub login_limiter: Arc<pages::LoginLimiter>,
    /// The key that signs session cookies, read once at start.
    pub session_key: Arc<Vec<u8>>,
}

impl AppState {
    pub fn new(
        store: Store,
        live_runs: LiveRuns,
        config: ApiConfig,
    ) -> Result<AppState, valet_store::StoreError> {
        let keys = Arc::new(store.key_ring()?);
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
        })
    }

    pub fn with_runner(mut self, runner: Arc<dyn Runner>) -> AppState {
        self.runner = Some(runner);
        self
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

/// Serves `app(state)` on `listener` until `shutdown` resolves, then lets
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
