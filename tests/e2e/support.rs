//! Test harness: a valet host on an ephemeral port with its own data dir,
//! users and tokens, and a real SMTP server (aiosmtpd) when asked.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use valet_core::{Granted, ScopeSet, TokenScopes};
use valet_runtime::EgressAllow;
use valet_server::{Host, HostConfig};
use valet_store::{Store, User};

pub struct Server {
    pub dir: tempfile::TempDir,
    pub host: Option<Host>,
    pub url: String,
    /// The origin of http vals: `{vals_url}/{user}/{val}`.
    pub vals_url: String,
    pub store: Store,
    pub client: reqwest::Client,
}

#[derive(Default)]
pub struct Options {
    pub smtp: Option<String>,
    pub egress_allow: Vec<EgressAllow>,
    pub blob_quota: Option<u64>,
    pub heap_mb: Option<u64>,
    pub github_keys_url: Option<String>,
    pub warm_pool: usize,
    pub slots: Option<valet_runtime::SlotLimits>,
    pub public_url: Option<String>,
    pub email_from: Option<String>,
    pub email_quota: Option<valet_store::EmailQuota>,
    pub key_refresh: Option<Duration>,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let mut config = HostConfig::new("127.0.0.1:0".parse().expect("addr"));
        config.cron = true;
        config.smtp = options.smtp;
        config.egress_allow = options.egress_allow;
        if let Some(q) = options.blob_quota {
            config.api.blob_quota = q;
        }
        if let Some(url) = options.github_keys_url {
            config.api.github_keys_url = url;
        }
        config.warm_pool = options.warm_pool;
        if let Some(slots) = options.slots {
            config.slots = slots;
        }
        if let Some(url) = options.public_url {
            config.api.public_url = url;
        }
        if let Some(from) = options.email_from {
            config.api.email_from = from;
        }
        if let Some(quota) = options.email_quota {
            config.api.email_quota = quota;
        }
        if let Some(every) = options.key_refresh {
            config.key_refresh = every;
        }
        if let Some(h) = options.heap_mb {
            config.heap_mb = h;
        }
        let host = Host::start(store.clone(), config)
            .await
            .expect("start host");
        let url = format!("http://{}", host.addr);
        let vals_url = format!("http://{}", host.vals_addr);
        Server {
            dir,
            host: Some(host),
            url,
            vals_url,
            store,
            client: reqwest::Client::new(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A user on the pro tier (may email anyone).
    pub fn user(&self, name: &str) -> User {
        let user = self
            .store
            .create_user(name, &format!("{name}@example.com"), None)
            .expect("user");
        self.store
            .set_tier(&user.id, valet_store::Tier::Pro)
            .expect("tier");
        user
    }

    pub fn token(&self, user: &User, scopes: ScopeSet) -> String {
        let (_, token) = self
            .store
            .create_token(
                &Granted::for_operator(&user.id),
                "test",
                TokenScopes::Scoped(scopes),
                None,
            )
            .expect("token");
        token.expose().to_owned()
    }

    pub fn supervisor(&self) -> &valet_runtime::Supervisor {
        &self.host.as_ref().expect("host").supervisor
    }

    pub async fn stop(mut self) {
        if let Some(host) = self.host.take() {
            host.shutdown().await;
        }
    }
}

/// Waits (a minute at most) until a `valet serve` started as `child`
/// answers HTTP at `url`; panics with its log if it exits or never does.
pub async fn wait_until_serving(url: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = reqwest::Client::new();
    loop {
        if client.get(format!("{url}/v1/me")).send().await.is_ok() {
            return;
        }
        let exited = child.try_wait().ok().flatten();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "node did not start ({exited:?}):\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The store of a test server: SQLite in `dir`, or, with
/// `VALET_TEST_DATABASE=postgres`, a fresh database on the test
/// PostgreSQL (so the single-node suites run on both backends).
pub fn open_store(dir: &Path) -> Store {
    let database = valet_testkit::database_from_env();
    Store::open_with(&valet_store::StoreOptions {
        database,
        ..valet_store::StoreOptions::local(dir)
    })
    .expect("open store")
}

/// Starts requests on a base URL; `get`, `post`, ... are shorthands of
/// `request`: `server.get("/v1/me").token(&t).send().await`.
pub trait Requests {
    fn request(&self, method: reqwest::Method, path: &str) -> Call;

    fn get(&self, path: &str) -> Call {
        self.request(reqwest::Method::GET, path)
    }

    fn post(&self, path: &str) -> Call {
        self.request(reqwest::Method::POST, path)
    }
}

impl Requests for Server {
    fn request(&self, method: reqwest::Method, path: &str) -> Call {
        Call(self.client.request(method, format!("{}{path}", self.url)))
    }
}

/// A base URL with its own client (one that does not follow redirects,
/// say, or a server the test started as a process).
pub struct Http {
    pub url: String,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(url: impl Into<String>) -> Http {
        Http {
            url: url.into(),
            client: reqwest::Client::new(),
        }
    }
}

impl Requests for Http {
    fn request(&self, method: reqwest::Method, path: &str) -> Call {
        Call(self.client.request(method, format!("{}{path}", self.url)))
    }
}

/// A request being built.
pub struct Call(pub reqwest::RequestBuilder);

impl Call {
    /// `Authorization: Bearer <token>`.
    pub fn token(self, token: &str) -> Call {
        Call(self.0.bearer_auth(token))
    }

    pub fn header(self, name: &str, value: &str) -> Call {
        Call(self.0.header(name, value))
    }

    pub fn json(self, body: &serde_json::Value) -> Call {
        Call(self.0.json(body))
    }

    /// A form body, `application/x-www-form-urlencoded`.
    pub fn form(self, fields: &[(&str, &str)]) -> Call {
        Call(self.0.form(fields))
    }

    /// Sends and reads the whole answer; panics if there is none.
    pub async fn send(self) -> Reply {
        self.try_send().await.expect("an answer")
    }

    /// Sends and reads the whole answer, or says why there is none.
    pub async fn try_send(self) -> reqwest::Result<Reply> {
        let response = self.0.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await?.to_vec();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
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
        let body: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
        (self.status, code)
    }

    /// The first `Set-Cookie` named `name`, as `name=value`.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .map(|v| v.split(';').next().unwrap_or_default().to_owned())
    }
}

/// Reads `{"error": {"code": ...}}` from a response.
pub async fn error_code(response: reqwest::Response) -> (u16, String, Option<String>) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
        body["error"]["required"].as_str().map(str::to_owned),
    )
}

/// A real SMTP server on loopback: aiosmtpd, writing each message into a
/// maildir. It runs on `VALET_TEST_PYTHON` (the venv `just test-deps`
/// makes, which `just test` exports), else on `python3` from PATH.
pub struct Smtp {
    child: Child,
    pub port: u16,
    maildir: tempfile::TempDir,
}

impl Smtp {
    pub fn start() -> Smtp {
        let maildir = tempfile::tempdir().expect("maildir");
        let port = free_port();
        let python = std::env::var_os("VALET_TEST_PYTHON").unwrap_or_else(|| "python3".into());
        let python = Path::new(&python);
        // Its output goes to a file, read back if it fails to start.
        let log_path = maildir.path().join("aiosmtpd.log");
        let log = std::fs::File::create(&log_path).expect("aiosmtpd log");
        let mut child = Command::new(python)
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(maildir.path().join("box"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run `just test-deps` and set VALET_TEST_PYTHON \
                     to its venv's python (`just test` does both)",
                    python.display()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "aiosmtpd did not start with {} ({}): {}\nrun `just test-deps` and set \
                     VALET_TEST_PYTHON to its venv's python (`just test` does both)",
                    python.display(),
                    exited.map_or("no answer in 30 s".to_owned(), |s| s.to_string()),
                    std::fs::read_to_string(&log_path)
                        .unwrap_or_default()
                        .trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Smtp {
            child,
            port,
            maildir,
        }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn messages(&self) -> Vec<String> {
        let dir: PathBuf = self.maildir.path().join("box").join("new");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
    }

    /// Waits until at least `n` messages arrived (or 30 seconds passed).
    pub async fn wait_for(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let messages = self.messages();
            if messages.len() >= n || Instant::now() > deadline {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `check` until it holds or 10 seconds pass; returns the last value.
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
