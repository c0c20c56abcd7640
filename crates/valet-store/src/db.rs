//! The control-plane store: one SQLite database in WAL mode, one writer
//! connection and a small pool of readers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::audit::AuditSink;
use crate::blobs::BlobStore;
use crate::token_cache::TokenCache;
use crate::user_sqlite::UserDatabases;
use crate::{StoreError, schema};

const DB_FILE: &str = "valet.db";
const MAX_IDLE_READERS: usize = 8;

/// Cheap to clone; all clones share the same connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    data_dir: PathBuf,
    /// SQLite allows one writer at a time anyway; a std `Mutex` serialises
    /// writers in-process instead of making them spin on `SQLITE_BUSY`. It
    /// is only ever locked inside blocking code, never across an `.await`.
    writer: Mutex<Connection>,
    /// Idle read connections. WAL lets readers run beside the writer.
    readers: Mutex<Vec<Connection>>,
    audit: AuditSink,
    blobs: BlobStore,
    user_dbs: UserDatabases,
    /// Emptied by the writer's update hook on any change to `api_tokens`.
    tokens: Arc<TokenCache>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner.data_dir.display())
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

impl Store {
    /// Opens (creating if needed) the data dir and its database, and runs
    /// the migrations.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir)?;
        restrict_permissions(data_dir);
        let path = data_dir.join(DB_FILE);
        let mut writer = open_connection(&path)?;
        schema::run(&mut writer)?;
        let tokens = Arc::new(TokenCache::default());
        let hook = tokens.clone();
        writer.update_hook(Some(
            move |_: rusqlite::hooks::Action, _: &str, table: &str, _: i64| {
                if table == "api_tokens" {
                    hook.clear();
                }
            },
        ));
        let audit = AuditSink::start(open_connection(&path)?)?;
        let (blobs, alone) = BlobStore::new(data_dir.join("blobs"))?;
        if alone {
            // No other process has the data dir open, so no write is in
            // flight: whatever the index does not point to is left over
            // from a crash.
            blobs.sweep_orphans(&writer)?;
            blobs.share()?;
        }
        let user_dbs = UserDatabases::new(data_dir.join("sqlite"))?;
        Ok(Store {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_owned(),
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
                audit,
                blobs,
                user_dbs,
                tokens,
            }),
        })
    }

    /// API token records cached in memory (see [`TokenCache`]).
    pub fn token_cache(&self) -> &TokenCache {
        &self.inner.tokens
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    pub fn db_path(&self) -> PathBuf {
        self.inner.data_dir.join(DB_FILE)
    }

    pub fn audit(&self) -> &AuditSink {
        &self.inner.audit
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    pub fn user_dbs(&self) -> &UserDatabases {
        &self.inner.user_dbs
    }

    /// Runs `f` with the writer connection.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .inner
            .writer
            .lock()
            .map_err(|_| StoreError::Corrupt("writer lock poisoned".into()))?;
        f(&mut conn)
    }

    /// Runs `f` with a read connection from the pool.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.inner.readers.lock().ok().and_then(|mut r| r.pop());
        let conn = match pooled {
            Some(conn) => conn,
            None => open_connection(&self.db_path())?,
        };
        let result = f(&conn);
        if let Ok(mut readers) = self.inner.readers.lock()
            && readers.len() < MAX_IDLE_READERS
        {
            readers.push(conn);
        }
        result
    }

    /// `PRAGMA integrity_check` of the control-plane database plus the
    /// disagreements between the blob index and the files. Empty when all
    /// is well.
    pub fn integrity_problems(&self) -> Result<Vec<String>, StoreError> {
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
        tokio_spawn_blocking(move || f(&store)).await
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
    fn two_writers_at_once_do_not_lose_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Store::open(dir.path()).expect("open a");
        // A second Store on the same file: a second process, in effect.
        let b = Store::open(dir.path()).expect("open b");
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
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store
                .list_tokens(&valet_core::Granted::for_operator(&user.id))
                .expect("list")
                .len(),
            200
        );
    }
}
