//! Blobs as objects: the bytes in an object store (S3-compatible storage
//! with `--blob-store s3://bucket[/prefix]`, or files on this node through
//! `object_store`'s local file system), the key, size and time in the
//! control-plane database's `blobs` table, so that quotas and prefix
//! listing are one query on either backend.
//!
//! Keys are data, never paths: each object is named by the SHA-256 of its
//! key under the user's id (`{prefix}/{user}/{sha256}`). Every write takes
//! a lock per user in the database, checks the quota, writes the object
//! and updates the index in one transaction: concurrent writers on any
//! node cannot pass the quota together, and the index never names an
//! object that was not written.

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use crate::blobs::{BlobKey, BlobMeta};
use crate::sql::{Row, args};
use crate::{Store, StoreError, time};

/// Where blob bytes go when they are not files beside the SQLite index.
pub(crate) struct BlobObjects {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// The object store's client is async; store calls are sync (on the
    /// blocking pool), so they drive it on a small runtime of their own
    /// (an `Option` only so that drop can shut it down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
    /// What the objects are in, for messages.
    described: String,
}

impl BlobObjects {
    /// `s3://bucket[/prefix]`, configured from the usual AWS environment
    /// variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP for a plain-http endpoint).
    pub(crate) fn s3(url: &str) -> Result<BlobObjects, StoreError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            StoreError::Invalid(format!(
                "invalid --blob-store '{url}': use s3://bucket or s3://bucket/prefix"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Invalid(format!(
                "invalid --blob-store '{url}': no bucket"
            )));
        }
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| StoreError::Invalid(format!("--blob-store {url}: {e}")))?;
        BlobObjects::new(Arc::new(s3), prefix.trim_matches('/'), url.to_owned())
    }

    /// Files under `root`, on this node only.
    pub(crate) fn local(root: &std::path::Path) -> Result<BlobObjects, StoreError> {
        std::fs::create_dir_all(root)?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(root)
            .map_err(|e| StoreError::Invalid(format!("blob directory {}: {e}", root.display())))?;
        BlobObjects::new(Arc::new(fs), "", root.display().to_string())
    }

    fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        described: String,
    ) -> Result<BlobObjects, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("valet-blobs")
            .enable_all()
            .build()?;
        Ok(BlobObjects {
            store,
            prefix: prefix.to_owned(),
            runtime: Some(runtime),
            described,
        })
    }

    fn path(&self, user_id: &str, key: &BlobKey) -> Result<ObjectPath, StoreError> {
        if user_id.is_empty()
            || !user_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(StoreError::Invalid(format!("bad user id '{user_id}'")));
        }
        let name = hex::encode(Sha256::digest(key.as_str().as_bytes()));
        Ok(if self.prefix.is_empty() {
            ObjectPath::from(format!("{user_id}/{name}"))
        } else {
            ObjectPath::from(format!("{}/{user_id}/{name}", self.prefix))
        })
    }

    /// Drives `f` to its end on the blob runtime, off any async context.
    fn run<T: Send>(
        &self,
        f: impl std::future::Future<Output = object_store::Result<T>> + Send,
    ) -> object_store::Result<T> {
        match &self.runtime {
            Some(runtime) => crate::pg::off_async(|| runtime.block_on(f)),
            None => Err(object_store::Error::Generic {
                store: "valet",
                source: "the blob store has shut down".into(),
            }),
        }
    }

    fn block_on<T: Send>(
        &self,
        f: impl std::future::Future<Output = object_store::Result<T>> + Send,
    ) -> Result<T, StoreError> {
        self.run(f).map_err(|e| self.error(e))
    }

    fn error(&self, e: object_store::Error) -> StoreError {
        StoreError::Io(std::io::Error::other(format!(
            "blob store {}: {e}",
            self.described
        )))
    }
}

impl Drop for BlobObjects {
    fn drop(&mut self) {
        // A runtime must not be dropped (waited for) in an async context.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Store {
    pub(crate) fn objects_put(
        &self,
        objects: &BlobObjects,
        user_id: &str,
        key: &BlobKey,
        body: &[u8],
        quota: u64,
    ) -> Result<(), StoreError> {
        let path = objects.path(user_id, key)?;
        let size = body.len() as u64;
        let payload = PutPayload::from(body.to_vec());
        self.db_write(|sql| {
            sql.lock(&format!("valet blobs {user_id}"))?;
            let row = sql.query_one(
                "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT),
                        (SELECT size FROM blobs WHERE user_id = ?1 AND key = ?2)
                 FROM blobs WHERE user_id = ?1",
                args![user_id, key.as_str().as_bytes()],
            )?;
            let (used, old): (i64, Option<i64>) = (row.get(0)?, row.get(1)?);
            let after = (used - old.unwrap_or(0)).max(0) as u64 + size;
            if after > quota {
                return Err(StoreError::QuotaExceeded {
                    used: used as u64,
                    limit: quota,
                });
            }
            objects.block_on(objects.store.put(&path, payload))?;
            sql.execute(
                "INSERT INTO blobs (user_id, key, size, modified_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id, key) DO UPDATE SET size = excluded.size,
                     modified_at = excluded.modified_at",
                args![
                    user_id,
                    key.as_str().as_bytes(),
                    size as i64,
                    time::now_ms()
                ],
            )?;
            Ok(())
        })
    }

    pub(crate) fn objects_get(
        &self,
        objects: &BlobObjects,
        user_id: &str,
        key: &BlobKey,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let path = objects.path(user_id, key)?;
        let found = objects.run(async {
            match objects.store.get(&path).await {
                Ok(got) => got.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        found.map_err(|e| objects.error(e))
    }

    pub(crate) fn objects_list(
        &self,
        user_id: &str,
        prefix: &str,
    ) -> Result<Vec<BlobMeta>, StoreError> {
        self.db_read(|sql| {
            sql.query_map(
                "SELECT key, size, modified_at FROM blobs
                 WHERE user_id = ?1 AND substr(key, 1, ?3) = ?2 ORDER BY key",
                args![user_id, prefix.as_bytes(), prefix.len() as i64],
                meta,
            )
        })
    }

    pub(crate) fn objects_delete(
        &self,
        objects: &BlobObjects,
        user_id: &str,
        key: &BlobKey,
    ) -> Result<bool, StoreError> {
        let path = objects.path(user_id, key)?;
        self.db_write(|sql| {
            sql.lock(&format!("valet blobs {user_id}"))?;
            let n = sql.execute(
                "DELETE FROM blobs WHERE user_id = ?1 AND key = ?2",
                args![user_id, key.as_str().as_bytes()],
            )?;
            let deleted = objects.run(objects.store.delete(&path));
            match deleted {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(objects.error(e)),
            }
            Ok(n > 0)
        })
    }

    pub(crate) fn objects_usage(&self, user_id: &str) -> Result<u64, StoreError> {
        let used: i64 = self.db_read(|sql| {
            sql.query_one(
                "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blobs WHERE user_id = ?1",
                args![user_id],
            )?
            .get(0)
        })?;
        Ok(used as u64)
    }
}

fn meta(row: &Row) -> Result<BlobMeta, StoreError> {
    let key: Vec<u8> = row.get(0)?;
    let size: i64 = row.get(1)?;
    let modified: i64 = row.get(2)?;
    Ok(BlobMeta {
        key: String::from_utf8_lossy(&key).into_owned(),
        size: size as u64,
        last_modified: modified,
    })
}

#[cfg(test)]
mod tests {
    use valet_core::Granted;

    use super::*;
    use crate::testing::Backends;

    #[test]
    fn keys_are_data_quota_holds_and_prefixes_list_beside_postgres() {
        let backend = Backends::postgres();
        let store = backend.open();
        assert!(store.blob_objects().is_some(), "objects beside PostgreSQL");
        let user = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        let (read, write) = (
            Granted::for_operator(&user.id),
            Granted::for_operator(&user.id),
        );
        for key in [
            "../../etc/passwd",
            "/abs",
            "a/b/c",
            "..",
            "ünï/çødé",
            &"k".repeat(512),
        ] {
            let k = BlobKey::parse(key).expect("key");
            store
                .blob_put(&write, &k, key.as_bytes(), 1 << 20)
                .expect("put");
            assert_eq!(
                store.blob_get(&read, &k).expect("get").as_deref(),
                Some(key.as_bytes())
            );
        }
        // A second node on the same database sees the index.
        let other = backend.open();
        assert_eq!(other.blob_list(&read, "a/").expect("list").len(), 1);
        assert_eq!(other.blob_list(&read, "").expect("list").len(), 6);
        let k = BlobKey::parse("q").expect("key");
        let used = store.blob_usage(&read).expect("usage");
        let err = store
            .blob_put(&write, &k, &[0; 100], used + 50)
            .expect_err("over quota");
        assert!(matches!(err, StoreError::QuotaExceeded { .. }));
        assert!(store.blob_get(&read, &k).expect("get").is_none());
        store
            .blob_put(&write, &k, &[0; 40], used + 50)
            .expect("within quota");
        assert!(store.blob_delete(&write, &k).expect("delete"));
        assert!(!store.blob_delete(&write, &k).expect("delete again"));
        assert_eq!(store.blob_usage(&read).expect("usage"), used);
    }
}
