//! The control-plane store on one of two backends: one SQLite database in
//! WAL mode (one writer connection, a small pool of readers) under the
//! data dir, the embedded default; or a PostgreSQL database that any
//! number of valet nodes share (`--database postgres://...`).
//!
//! Store modules speak to either through [`Sql`] (`db_read`, `db_write`);
//! the raw SQLite connections (`read`, `write`) remain for the code that
//! exists only beside the SQLite control plane (the file blob store).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::audit::AuditSink;
use crate::blob_objects::BlobObjects;
use crate::blobs::BlobStore;
use crate::pg;
use crate::sql::Sql;
use crate::token_cache::TokenCache;
use crate::user_sqlite::UserDatabases;
use crate::val_cache::ValCache;
use crate::{StoreError, schema, schema_pg};

const DB_FILE: &str = "valet.db";
const MAX_IDLE_READERS: usize = 8;
/// PostgreSQL connections one node opens at most.
const DEFAULT_PG_POOL: usize = 16;

/// Where the store keeps things.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Per-node files: the SQLite control plane (when no `database` is
    /// given), blobs on disk, users' SQLite databases.
    pub data_dir: PathBuf,
    /// `postgres://user:password@host:port/dbname`: the shared control
    /// plane of a cluster. `None`: SQLite under `data_dir`.
    pub database: Option<String>,
    /// PostgreSQL connections this process opens at most.
    pub pool_size: usize,
    /// `s3://bucket[/prefix]`: blobs on S3-compatible storage (endpoint,
    /// region and credentials from the usual AWS environment variables).
    /// `None`: files under `data_dir` (on this node only).
    pub blob_store: Option<String>,
}

impl StoreOptions {
    /// The embedded default: everything under `data_dir`.
    pub fn local(data_dir: &Path) -> StoreOptions {
        StoreOptions {
            data_dir: data_dir.to_owned(),
            database: None,
            pool_size: DEFAULT_PG_POOL,
            blob_store: None,
        }
    }
}

/// Cheap to clone; all clones share the same connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    data_dir: PathBuf,
    backend: Backend,
    /// This process's node id in a cluster, set once when it joins.
    node_id: std::sync::OnceLock<String>,
    /// The URL other nodes reach this node's API at, set once when it
    /// joins; its heartbeats register it.
    node_address: std::sync::OnceLock<String>,
    audit: AuditSink,
    blobs: BlobStore,
    /// Blobs as objects, indexed in the control plane: with a blob store
    /// URL, or beside PostgreSQL. `None`: files indexed in SQLite.
    objects: Option<BlobObjects>,
    user_dbs: UserDatabases,
    /// Token records cached in memory, emptied after every write
    /// transaction that changed a token (SQLite: also by the writer's
    /// update hook) and, on PostgreSQL, by the listener when another node
    /// changes one (see [`TokenCache`]).
    tokens: Arc<TokenCache>,
    pub(crate) vals: Arc<ValCache>,
}

/// The connections of one backend.
pub(crate) enum Backend {
    Sqlite(Lite),
    Postgres(pg::Pool),
}

pub(crate) struct Lite {
    path: PathBuf,
    /// SQLite allows one writer at a time anyway; a std `Mutex` serialises
    /// writers in-process instead of making them spin on `SQLITE_BUSY`. It
    /// is only ever locked inside blocking code, never across an `.await`.
    writer: Mutex<Connection>,
    /// Idle read connections. WAL lets readers run beside the writer.
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.backend {
            Backend::Sqlite(_) => write!(f, "Store({})", self.inner.data_dir.display()),
            Backend::Postgres(pool) => write!(
                f,
                "Store(postgres {:?}/{:?}, {})",
                pool.config().get_hosts(),
                pool.config().get_dbname(),
                self.inner.data_dir.display()
            ),
        }
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(None, "synchronous", "normal")?;
    conn.pragma_update(None, "foreign_keys", "on")?;
    // Closing the last connection would checkpoint the WAL and fsync it,
    // which is most of a short-lived `valet run`'s exit; the WAL is
    // checkpointed while writing (every 1000 pages) and on the next open
    // instead. Durability is the same: the WAL is the database.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    Ok(conn)
}

impl Lite {
    fn open(path: &Path) -> Result<Lite, StoreError> {
        Ok(Lite {
            path: path.to_owned(),
            writer: Mutex::new(open_connection(path)?),
            readers: Mutex::new(Vec::new()),
        })
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.writer
            .lock()
            .map_err(|_| StoreError::Corrupt("writer lock poisoned".into()))
    }

    fn reading<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.readers.lock().ok().and_then(|mut r| r.pop());
        let conn = match pooled {
            Some(conn) => conn,
            None => open_connection(&self.path)?,
        };
        let result = f(&conn);
        if let Ok(mut readers) = self.readers.lock()
            && readers.len() < MAX_IDLE_READERS
        {
            readers.push(conn);
        }
        result
    }
}

impl Backend {
    /// A second set of connections to the same database, for a thread
    /// that writes on its own (the audit sink).
    fn sibling(&self) -> Result<Backend, StoreError> {
        Ok(match self {
            Backend::Sqlite(lite) => Backend::Sqlite(Lite::open(&lite.path)?),
            Backend::Postgres(pool) => Backend::Postgres(pg::Pool::from_config(pool.config(), 1)),
        })
    }

    /// Runs `f` for reading (SQLite: a reader; PostgreSQL: no transaction).
    pub(crate) fn read<T: Send>(
        &self,
        f: impl FnOnce(&mut Sql<'_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        match self {
            Backend::Sqlite(lite) => lite.reading(|c| f(&mut Sql::sqlite(c))),
            Backend::Postgres(pool) => pool.with(|conn| conn.read(f)),
        }
    }

    /// Runs `f` in one transaction, committed only when it succeeds.
    pub(crate) fn transact<T: Send>(
        &self,
        f: impl FnOnce(&mut Sql<'_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        self.transact_then(f, || {})
    }

    /// As [`Backend::transact`], then `after` once the transaction has
    /// committed or rolled back, while SQLite's writer is still held: no
    /// other transaction (and none of its update hooks) runs in between.
    pub(crate) fn transact_then<T: Send>(
        &self,
        f: impl FnOnce(&mut Sql<'_>) -> Result<T, StoreError> + Send,
        after: impl FnOnce(),
    ) -> Result<T, StoreError> {
        match self {
            Backend::Sqlite(lite) => {
                let mut conn = lite.writer()?;
                let out = (|| {
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let out = f(&mut Sql::sqlite(&tx))?;
                    tx.commit()?;
                    Ok(out)
                })();
                after();
                out
            }
            Backend::Postgres(pool) => {
                let out = pool.with(|conn| conn.transact(f));
                after();
                out
            }
        }
    }
}

impl Store {
    /// Opens (creating if needed) the data dir and its SQLite database, and
    /// runs the migrations: the embedded default.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(&StoreOptions::local(data_dir))
    }

    /// Opens the store `options` describe and runs the migrations.
    pub fn open_with(options: &StoreOptions) -> Result<Store, StoreError> {
        let data_dir = &options.data_dir;
        std::fs::create_dir_all(data_dir)?;
        restrict_permissions(data_dir);
        let tokens = Arc::new(TokenCache::default());
        // Vals are cached on one machine only: on PostgreSQL other nodes
        // change them.
        let vals = Arc::new(ValCache::new(options.database.is_none()));
        let backend = match &options.database {
            None => {
                let lite = Lite::open(&data_dir.join(DB_FILE))?;
                let mut writer = lite.writer()?;
                schema::run(&mut writer)?;
                let hook = tokens.clone();
                let val_hook = vals.clone();
                writer.update_hook(Some(
                    move |_: rusqlite::hooks::Action, _: &str, table: &str, _: i64| match table {
                        "api_tokens" => hook.changing(),
                        "vals" | "users" => val_hook.changing(),
                        _ => {}
                    },
                ));
                drop(writer);
                Backend::Sqlite(lite)
            }
            Some(url) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(StoreError::Invalid(
                        "invalid --database: use postgres://user:password@host:port/dbname".into(),
                    ));
                }
                let pool = pg::Pool::new(url, options.pool_size)?;
                schema_pg::run(&pool)?;
                Backend::Postgres(pool)
            }
        };
        let audit = AuditSink::start(backend.sibling()?)?;
        let objects = match (&options.blob_store, &backend) {
            (Some(url), _) => Some(BlobObjects::s3(url)?),
            (None, Backend::Postgres(_)) => Some(BlobObjects::local(&data_dir.join("objects"))?),
            (None, Backend::Sqlite(_)) => None,
        };
        let (blobs, alone) = BlobStore::new(data_dir.join("blobs"))?;
        if alone {
            // No other process has the data dir open, so no write is in
            // flight: whatever the index does not point to is left over
            // from a crash. (Blobs as objects have no files here to sweep.)
            if let (Backend::Sqlite(lite), None) = (&backend, &objects) {
                blobs.sweep_orphans(&*lite.writer()?)?;
            }
            blobs.share()?;
        }
        let user_dbs = UserDatabases::new(data_dir.join("sqlite"))?;
        Ok(Store {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_owned(),
                backend,
                node_id: std::sync::OnceLock::new(),
                node_address: std::sync::OnceLock::new(),
                audit,
                blobs,
                objects,
                user_dbs,
                tokens,
                vals,
            }),
        })
    }

    /// Vals cached by name (see `val_cache.rs`).
    pub(crate) fn val_cache(&self) -> &ValCache {
        &self.inner.vals
    }

    /// API token records cached in memory (see [`TokenCache`]).
    pub fn token_cache(&self) -> &TokenCache {
        &self.inner.tokens
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The SQLite control-plane file (also where it would be when the
    /// control plane is on PostgreSQL).
    pub fn db_path(&self) -> PathBuf {
        self.inner.data_dir.join(DB_FILE)
    }

    /// Whether the control plane is PostgreSQL (a cluster) rather than the
    /// embedded SQLite file.
    pub fn is_shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Postgres(_))
    }

    /// Names this process's node: its runs are recorded as its own, and
    /// are marked lost if its lease runs out. Set once; later calls are
    /// ignored.
    pub fn set_node_id(&self, node_id: &str) {
        let _ = self.inner.node_id.set(node_id.to_owned());
    }

    pub fn node_id(&self) -> Option<&str> {
        self.inner.node_id.get().map(String::as_str)
    }

    /// Names the URL other nodes reach this node's API at (where they
    /// forward the sqlite calls of users whose home it is). Set once;
    /// later calls are ignored.
    pub fn set_node_address(&self, address: &str) {
        let _ = self.inner.node_address.set(address.to_owned());
    }

    pub fn node_address(&self) -> Option<&str> {
        self.inner.node_address.get().map(String::as_str)
    }

    /// A PostgreSQL connection outside the pool, for a thread that holds
    /// one for long (LISTEN).
    pub(crate) fn dedicated_pg_connection(&self) -> Result<pg::Conn, StoreError> {
        match &self.inner.backend {
            Backend::Postgres(pool) => {
                let mut config = pool.config().clone();
                // Named, so an operator (and a test) can tell it apart;
                // a peer that vanished fails its next round trip within
                // seconds instead of TCP's minutes.
                config
                    .application_name("valet listen")
                    .tcp_user_timeout(Duration::from_secs(5))
                    .keepalives_idle(Duration::from_secs(5));
                pg::off_async(|| pg::Conn::connect(&config))
            }
            Backend::Sqlite(_) => Err(StoreError::Invalid(
                "only the PostgreSQL control plane has notifications".into(),
            )),
        }
    }

    pub fn audit(&self) -> &AuditSink {
        &self.inner.audit
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    pub(crate) fn blob_objects(&self) -> Option<&BlobObjects> {
        self.inner.objects.as_ref()
    }

    pub fn user_dbs(&self) -> &UserDatabases {
        &self.inner.user_dbs
    }

    /// Reads through either backend.
    pub(crate) fn db_read<T: Send>(
        &self,
        f: impl FnOnce(&mut Sql<'_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        self.inner.backend.read(f)
    }

    /// Writes through either backend, in one transaction.
    pub(crate) fn db_write<T: Send>(
        &self,
        f: impl FnOnce(&mut Sql<'_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        let tokens_changed = std::sync::atomic::AtomicBool::new(false);
        self.inner.backend.transact_then(
            |sql| {
                let out = f(sql);
                tokens_changed.store(sql.tokens_changed(), Ordering::Relaxed);
                out
            },
            // Only after the commit (or rollback) can no reader see the old
            // row any more: the caches are emptied then, not inside, and
            // before the writer is free (another transaction's change
            // marked now is not this one's to settle).
            || {
                self.inner
                    .tokens
                    .settle(tokens_changed.load(Ordering::Relaxed));
                self.inner.vals.settle();
            },
        )
    }

    fn lite(&self) -> Result<&Lite, StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(lite) => Ok(lite),
            Backend::Postgres(_) => Err(StoreError::Invalid(
                "this needs the SQLite control plane, and the store is on PostgreSQL".into(),
            )),
        }
    }

    /// Runs `f` with the SQLite writer connection (SQLite backend only).
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut writer = self.lite()?.writer()?;
        let out = f(&mut writer);
        // Before the writer is free, as in `db_write`.
        self.inner.tokens.settle(false);
        self.inner.vals.settle();
        drop(writer);
        out
    }

    /// Runs `f` with a SQLite read connection (SQLite backend only).
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.lite()?.reading(f)
    }

    /// `PRAGMA integrity_check` of the control-plane database plus the
    /// disagreements between the blob index and the files. Empty when all
    /// is well.
    pub fn integrity_problems(&self) -> Result<Vec<String>, StoreError> {
        if self.is_shared() {
            // PostgreSQL checks its own pages; the objects have no index
            // of files on this node to disagree with.
            return Ok(Vec::new());
        }
        let mut problems: Vec<String> = self.read(|c| {
            let mut stmt = c.prepare("PRAGMA integrity_check")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            Ok(rows
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|row| row != "ok")
                .collect())
        })?;
        problems.extend(self.blob_index_problems()?);
        Ok(problems)
    }

    /// Runs blocking store work on tokio's blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio_spawn_blocking(move || pg::blocking_allowed(|| f(&store))).await
    }

    /// Waits until every audit event handed in so far is on disk.
    pub fn flush_audit(&self) {
        self.inner.audit.flush();
    }
}

async fn tokio_spawn_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Join(e.to_string())),
    }
}

#[cfg(unix)]
fn restrict_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The data dir holds signing keys and everyone's data: owner only.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Backends;

    #[test]
    fn migrations_from_empty_and_reopen_is_a_no_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let version: usize = store
            .read(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .expect("version");
        assert_eq!(version, schema::latest());
        store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.user_by_name("ada").expect("lookup").is_some());
    }

    #[test]
    fn postgres_migrations_apply_once_and_reopen_keeps_data() {
        let url = valet_testkit::database();
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions {
            database: Some(url),
            ..StoreOptions::local(dir.path())
        };
        let store = Store::open_with(&options).expect("open");
        assert!(store.is_shared());
        let version: i64 = store
            .db_read(|sql| {
                sql.query_one("SELECT MAX(version) FROM schema_migrations", &[])?
                    .get(0)
            })
            .expect("version");
        assert_eq!(version as usize, schema_pg::latest());
        store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        drop(store);
        let store = Store::open_with(&options).expect("reopen");
        assert!(store.user_by_name("ada").expect("lookup").is_some());
        assert!(
            !store.db_path().exists(),
            "no SQLite file beside PostgreSQL"
        );
    }

    #[test]
    fn two_writers_at_once_do_not_lose_rows() {
        for backend in Backends::all() {
            let a = backend.open();
            // A second Store on the same database: a second process, in effect.
            let b = backend.open();
            let user = a.create_user("ada", "ada@example.com", None).expect("user");
            let threads: Vec<_> = [a, b]
                .into_iter()
                .enumerate()
                .map(|(n, store)| {
                    let user_id = user.id.clone();
                    std::thread::spawn(move || {
                        for i in 0..100 {
                            store
                                .create_token(
                                    &valet_core::Granted::for_operator(&user_id),
                                    &format!("t{n}-{i}"),
                                    valet_core::TokenScopes::Scoped(
                                        valet_core::ScopeSet::default_val(),
                                    ),
                                    None,
                                )
                                .expect("create");
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("thread");
            }
            let store = backend.open();
            assert_eq!(
                store
                    .list_tokens(&valet_core::Granted::for_operator(&user.id))
                    .expect("list")
                    .len(),
                200,
                "{backend:?}"
            );
        }
    }
}
