//! Test helpers: one test run against each control-plane backend, SQLite
//! in a temporary directory and a fresh database on the test PostgreSQL.

use crate::{Store, StoreOptions};

/// A control plane to open stores on; the same one each time `open` is
/// called, like two processes opening one database.
pub(crate) enum Backends {
    Sqlite(tempfile::TempDir),
    Postgres { url: String, dir: tempfile::TempDir },
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backends::Sqlite(_) => "sqlite",
            Backends::Postgres { .. } => "postgres",
        })
    }
}

impl Backends {
    /// Both backends, each empty.
    pub(crate) fn all() -> Vec<Backends> {
        vec![Backends::sqlite(), Backends::postgres()]
    }

    pub(crate) fn sqlite() -> Backends {
        Backends::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    pub(crate) fn postgres() -> Backends {
        Backends::Postgres {
            url: valet_testkit::database(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub(crate) fn open(&self) -> Store {
        match self {
            Backends::Sqlite(dir) => Store::open(dir.path()).expect("open sqlite"),
            Backends::Postgres { url, dir } => Store::open_with(&StoreOptions {
                database: Some(url.clone()),
                ..StoreOptions::local(dir.path())
            })
            .expect("open postgres"),
        }
    }
}
