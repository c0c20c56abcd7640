//! The harness: valet's API over a real SQLite store in a temp dir, driven
//! without a socket through `tower::ServiceExt::oneshot`, with a small
//! request builder (`api.get(path).token(t).send().await`) and a reply that
//! is read whole.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderName, HeaderValue, Method, Request, header};
use http_body_util::BodyExt;
use tower::ServiceExt;
use valet_api::{ApiConfig, AppState};
use valet_core::live_runs::LiveRunGuard;
use valet_core::{ChannelId, LiveRun, LiveRuns, MintRequest, ScopeSet, TokenScopes};
use valet_core::{Granted, GrantedSet};
use valet_store::{NewVal, Store, User, Val, ValKind};

/// A store in a temp dir and the state the API runs on. No runner: runs
/// are the end-to-end tests' business.
pub struct Api {
    dir: tempfile::TempDir,
    pub store: Store,
    pub state: AppState,
    app: Router,
}

impl Api {
    pub fn start() -> Api {
        Api::with_config(ApiConfig::default())
    }

    pub fn with_config(config: ApiConfig) -> Api {
        let dir = tempfile::tempdir().expect("tempdir");
        // `VALET_TEST_DATABASE=postgres`: a fresh database on the test
        // PostgreSQL, so the API suite runs on both control planes.
        let database = valet_testkit::database_from_env();
        let store = Store::open_with(&valet_store::StoreOptions {
            database,
            ..valet_store::StoreOptions::local(dir.path())
        })
        .expect("open store");
        let state = AppState::new(store.clone(), LiveRuns::new(), config).expect("state");
        let app = valet_api::app(state.clone());
        Api {
            dir,
            store,
            state,
            app,
        }
    }

    /// An API with one pro user, `name`, and a token of theirs with every
    /// scope.
    pub fn with_user(name: &str) -> (Api, User, String) {
        let api = Api::start();
        let user = api.user(name);
        let token = api.token(&user, ScopeSet::all());
        (api, user, token)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A user on the pro tier (may email anyone).
    pub fn user(&self, name: &str) -> User {
        let user = self.free_user(name);
        self.store
            .set_tier(&user.id, valet_store::Tier::Pro)
            .expect("tier");
        user
    }

    /// A user on the free tier (may email only themselves).
    pub fn free_user(&self, name: &str) -> User {
        self.store
            .create_user(name, &format!("{name}@example.com"), None)
            .expect("user")
    }

    /// A new API token of `user` with `scopes`.
    pub fn token(&self, user: &User, scopes: ScopeSet) -> String {
        self.token_record(user, scopes, None).1
    }

    /// A new API token, with its id, that expires at `expires_at` (ms).
    pub fn token_record(
        &self,
        user: &User,
        scopes: ScopeSet,
        expires_at: Option<i64>,
    ) -> (String, String) {
        let (record, token) = self
            .store
            .create_token(
                &Granted::for_operator(&user.id),
                "test",
                TokenScopes::Scoped(scopes),
                expires_at,
            )
            .expect("token");
        (record.id, token.expose().to_owned())
    }

    /// A script val of `user` with the default scopes.
    pub fn val(&self, user: &User, name: &str) -> Val {
        self.store
            .create_val(
                &Granted::for_operator(&user.id),
                &GrantedSet::for_operator(&user.id, ScopeSet::all()),
                NewVal {
                    name: name.into(),
                    kind: ValKind::Script,
                    code: "export default () => {}".into(),
                    scopes: ScopeSet::default_val(),
                    env: Default::default(),
                    timeout_ms: 5000,
                    schedule: None,
                },
            )
            .expect("val")
    }

    /// A run of `val` marked live on channel `channel`, as the supervisor
    /// marks one: its key (a JWT signed by this server's ring) is accepted
    /// until the guard is dropped.
    pub fn live_run(
        &self,
        user: &User,
        val: &Val,
        scopes: ScopeSet,
        channel: &str,
    ) -> (String, LiveRunGuard) {
        let run_id = valet_store::new_id("run");
        let now = (valet_store::time::now_ms() / 1000) as u64;
        let key = self
            .state
            .keys
            .mint(&MintRequest {
                user_id: &user.id,
                val_id: Some(&val.id),
                run_id: &run_id,
                scopes,
                start: now,
                deadline: now + 600,
            })
            .expect("mint");
        let guard = self.state.live_runs.begin(
            &key,
            LiveRun {
                run_id,
                user_id: user.id.clone(),
                val_id: Some(val.id.clone()),
                scopes,
                channel: ChannelId::new(channel),
            },
        );
        (key, guard)
    }

    /// What a run reaches through its channel `id`.
    pub fn channel(&self, id: &str) -> Client {
        Client(valet_api::channel_service(
            valet_api::channel_app(self.state.clone()),
            ChannelId::new(id),
        ))
    }
}

/// A scope set from its text (`"blob:read blob:write"`).
pub fn scopes(list: &str) -> ScopeSet {
    ScopeSet::parse(list).expect("scopes")
}

/// One of the API's routers, as something to send requests to.
pub struct Client(pub Router);

/// Starts requests; `get`, `post`, ... are shorthands of `request`.
pub trait Requests {
    fn request(&self, method: Method, path: &str) -> Call;

    fn get(&self, path: &str) -> Call {
        self.request(Method::GET, path)
    }

    fn post(&self, path: &str) -> Call {
        self.request(Method::POST, path)
    }

    fn patch(&self, path: &str) -> Call {
        self.request(Method::PATCH, path)
    }

    fn delete(&self, path: &str) -> Call {
        self.request(Method::DELETE, path)
    }
}

impl Requests for Api {
    fn request(&self, method: Method, path: &str) -> Call {
        Call::new(self.app.clone(), method, path)
    }
}

impl Requests for Client {
    fn request(&self, method: Method, path: &str) -> Call {
        Call::new(self.0.clone(), method, path)
    }
}

/// A request being built for one router.
pub struct Call {
    router: Router,
    request: axum::http::request::Builder,
    body: Body,
}

impl Call {
    fn new(router: Router, method: Method, path: &str) -> Call {
        Call {
            router,
            request: Request::builder().method(method).uri(path),
            body: Body::empty(),
        }
    }

    /// `Authorization: Bearer <token>`.
    pub fn token(self, token: &str) -> Call {
        self.header(header::AUTHORIZATION, format!("Bearer {token}"))
    }

    pub fn header<V>(mut self, name: HeaderName, value: V) -> Call
    where
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<axum::http::Error>,
    {
        self.request = self.request.header(name, value);
        self
    }

    /// A JSON body, with its content type.
    pub fn json(self, body: &serde_json::Value) -> Call {
        self.header(header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
    }

    /// A body as it is, with no content type.
    pub fn body(mut self, body: impl Into<Body>) -> Call {
        self.body = body.into();
        self
    }

    pub async fn send(self) -> Reply {
        let request = self.request.body(self.body).expect("request");
        let response = self.router.oneshot(request).await.expect("infallible");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply { status, body }
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `(status, error.code)` of a JSON error (the code is empty otherwise).
    pub fn error(&self) -> (u16, String) {
        let (status, code, _) = self.error_required();
        (status, code)
    }

    /// `(status, error.code, error.required)` of a JSON error.
    pub fn error_required(&self) -> (u16, String, Option<String>) {
        let body: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        (
            self.status,
            body["error"]["code"].as_str().unwrap_or("").to_owned(),
            body["error"]["required"].as_str().map(str::to_owned),
        )
    }
}

/// Polls `check` until `done` holds or 10 seconds pass; returns the last
/// value. For what happens off the request path (audit, scope requests).
pub async fn eventually<T, F, Fut>(mut check: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = check().await;
        if done(&value) || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
