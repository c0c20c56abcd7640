//! Test services on loopback for valet's tests: a real PostgreSQL started
//! from the system's binaries (Debian's `postgresql` package) in a
//! temporary directory, as the `postgres` user when the tests run as root,
//! and a real S3-compatible server ([`Moto`], moto in server mode from the
//! test venv).
//!
//! One server per test process ([`postgres`]), one fresh database per test
//! ([`database`]). The server is watched by a small shell loop that stops
//! it and removes its directory when the test process exits, however it
//! exits, so no test run leaves a PostgreSQL behind.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to start before the tests give up.
const START_WAIT: Duration = Duration::from_secs(60);

/// A PostgreSQL server on 127.0.0.1 with trust authentication for the
/// `postgres` role.
#[derive(Debug)]
pub struct Postgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    /// Stopped when dropped (a private server); the shared one lives as
    /// long as the test process and its watchdog stops it.
    stop_on_drop: bool,
}

static SHARED: OnceLock<Result<Postgres, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The test process's shared server, started on first use. Panics with
/// what to install when PostgreSQL is missing.
pub fn postgres() -> &'static Postgres {
    match SHARED.get_or_init(|| off_runtime(|| Postgres::start_inner(false))) {
        Ok(pg) => pg,
        Err(e) => panic!("{e}"),
    }
}

/// A fresh, empty database on the shared server: its URL.
pub fn database() -> String {
    postgres().fresh_database()
}

/// The control plane a single-node suite runs on, from
/// `VALET_TEST_DATABASE`: `None` for SQLite (unset or `sqlite`), a fresh
/// database's URL for `postgres`; so the same suite runs on both.
pub fn database_from_env() -> Option<String> {
    match std::env::var("VALET_TEST_DATABASE").as_deref() {
        Ok("postgres") => Some(database()),
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("VALET_TEST_DATABASE={other}: use sqlite or postgres"),
    }
}

/// Runs `f` on a thread of its own: the `postgres` crate's client blocks on
/// a runtime of its own, which panics inside an async test's runtime.
fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match std::thread::spawn(f).join() {
        Ok(out) => out,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

impl Postgres {
    /// A private server, stopped when the value is dropped.
    pub fn start() -> Result<Postgres, String> {
        Postgres::start_inner(true)
    }

    fn start_inner(stop_on_drop: bool) -> Result<Postgres, String> {
        let bin = find_bin_dir()?;
        let owner = if running_as_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("valet-pg-")
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory for PostgreSQL: {e}"))?
            .keep();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("cannot give {} to the postgres user: {e}", dir.display()))?;
        }
        let data = dir.join("data");
        let initdb = as_owner(Command::new(bin.join("initdb")), owner)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--no-instructions"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", bin.join("initdb").display()))?;
        if !initdb.status.success() {
            return Err(format!(
                "initdb failed ({}): {}",
                initdb.status,
                String::from_utf8_lossy(&initdb.stderr).trim()
            ));
        }
        let port = free_port()?;
        let pg = Postgres {
            port,
            dir: dir.clone(),
            bin: bin.clone(),
            owner,
            stop_on_drop,
        };
        // The watchdog: starts postgres, and stops it (and removes its
        // directory) once the test process or postgres itself is gone.
        let script = format!(
            r#"
            "$PGBIN/postgres" -D "$PGDIR/data" -h 127.0.0.1 -p "$PGPORT" -k "$PGDIR" \
                -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
                -c max_connections=300 -c shared_buffers=32MB \
                -c dynamic_shared_memory_type=mmap >"$PGDIR/postgres.log" 2>&1 &
            pg=$!
            while [ -d "/proc/$TESTPID" ] && kill -0 "$pg" 2>/dev/null; do sleep 0.2; done
            kill -QUIT "$pg" 2>/dev/null
            wait "$pg"
            {cleanup}
            "#,
            cleanup = if stop_on_drop {
                "rm -rf \"$PGDIR\""
            } else {
                "[ -d \"/proc/$TESTPID\" ] || rm -rf \"$PGDIR\""
            }
        );
        as_owner(Command::new("sh"), owner)
            .arg("-c")
            .arg(script)
            .env("PGBIN", &bin)
            .env("PGDIR", &dir)
            .env("PGPORT", port.to_string())
            .env("TESTPID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the PostgreSQL watchdog: {e}"))?;
        let deadline = Instant::now() + START_WAIT;
        loop {
            match postgres::Client::connect(&pg.url("postgres"), postgres::NoTls) {
                Ok(_) => return Ok(pg),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "PostgreSQL did not answer on port {port} within {START_WAIT:?}: {e}\n{}",
                        std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default()
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?connect_timeout=10",
            self.port
        )
    }

    /// Creates an empty database and returns its URL.
    pub fn fresh_database(&self) -> String {
        let name = format!(
            "valet_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let admin_url = self.url("postgres");
        let create = format!("CREATE DATABASE {name}");
        off_runtime(move || {
            let mut admin = postgres::Client::connect(&admin_url, postgres::NoTls)
                .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL: {e}"));
            admin
                .batch_execute(&create)
                .unwrap_or_else(|e| panic!("cannot create the test database: {e}"));
        });
        self.url(&name)
    }

    /// The server's log so far, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.stop_on_drop {
            return;
        }
        let _ = as_owner(Command::new(self.bin.join("pg_ctl")), self.owner)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate", "-w", "-t", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `cmd` as the PostgreSQL owner when the tests run as root
/// (PostgreSQL refuses to run as root).
fn as_owner(mut cmd: Command, owner: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", "/tmp");
    }
    cmd
}

/// Where `initdb`, `pg_ctl` and `postgres` are: `VALET_TEST_PG_BIN`, then
/// `PATH`, then the newest `/usr/lib/postgresql/N/bin` (Debian's layout,
/// which leaves them off `PATH`).
fn find_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("VALET_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in on_path {
        if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "the PostgreSQL tests need PostgreSQL's server binaries (initdb, postgres): run \
         `just test-deps`, or install Debian's postgresql package \
         (apt-get install postgresql), or set VALET_TEST_PG_BIN to their directory"
            .to_owned()
    })
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| {
            "the tests run as root, and PostgreSQL will not: they need a 'postgres' user \
             (Debian's postgresql package makes one; `just test-deps` installs it)"
                .to_owned()
        })
}

/// moto in server mode on 127.0.0.1 (an S3-compatible endpoint), from
/// `VALET_TEST_PYTHON` (the venv `just test-deps` makes), stopped on drop.
#[derive(Debug)]
pub struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Moto {
    pub fn start() -> Result<Moto, String> {
        let python = std::env::var_os("VALET_TEST_PYTHON").unwrap_or_else(|| "python3".into());
        let port = free_port()?;
        let mut child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start moto with {}: {e}; run `just test-deps` and set \
                     VALET_TEST_PYTHON to its venv's python (`just test` does both)",
                    PathBuf::from(&python).display()
                )
            })?;
        let deadline = Instant::now() + START_WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "moto did not start on port {port} with {}: run `just test-deps` and set \
                     VALET_TEST_PYTHON to its venv's python",
                    PathBuf::from(&python).display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Moto { child, port })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto takes an unsigned CreateBucket).
    pub fn create_bucket(&self, name: &str) -> Result<(), String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port))
            .map_err(|e| format!("cannot reach moto: {e}"))?;
        write!(
            stream,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .map_err(|e| format!("cannot talk to moto: {e}"))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| format!("no answer from moto: {e}"))?;
        if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
            Ok(())
        } else {
            Err(format!(
                "moto refused bucket {name}: {}",
                answer.lines().next().unwrap_or("")
            ))
        }
    }

    /// The environment a valet process needs to use this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_server_answers_and_is_gone_after_drop() {
        let pg = Postgres::start().expect("start");
        let dir = pg.dir.clone();
        let url = pg.fresh_database();
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        let row = client.query_one("SELECT 40 + 2", &[]).expect("query");
        assert_eq!(row.get::<_, i32>(0), 42);
        let user = client.query_one("SELECT current_user", &[]).expect("user");
        assert_eq!(user.get::<_, String>(0), "postgres");
        drop(client);
        drop(pg);
        let deadline = Instant::now() + Duration::from_secs(30);
        while dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!dir.exists(), "the server's directory outlived it");
    }

    #[test]
    fn databases_are_fresh_and_separate() {
        let a = database();
        let b = database();
        assert_ne!(a, b);
        let mut client = postgres::Client::connect(&a, postgres::NoTls).expect("connect");
        client
            .batch_execute("CREATE TABLE t (x int)")
            .expect("create in a");
        let mut other = postgres::Client::connect(&b, postgres::NoTls).expect("connect");
        assert!(other.batch_execute("SELECT * FROM t").is_err());
    }
}
