//! Each user's own SQLite database, behind `std/sqlite`.
//!
//! Whether a statement reads or writes is decided by SQLite itself
//! (`sqlite3_stmt_readonly`), never by looking at the SQL text. An
//! authorizer refuses ATTACH, DETACH, extension loading and the PRAGMAs that
//! could escape the file or corrupt it; a progress handler bounds the time
//! of a call and `max_page_count` bounds the size of the file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// What a statement needs: decided per statement by SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatementAccess {
    Read,
    Write,
}

/// Arguments of a statement, positional (`?`) or named (`:name`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(untagged)]
pub enum SqlArgs {
    #[default]
    None,
    Positional(Vec<serde_json::Value>),
    Named(BTreeMap<String, serde_json::Value>),
}

/// A statement as the std library sends it: a bare string or `{sql, args}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SqlStatement {
    Text(String),
    WithArgs {
        sql: String,
        #[serde(default)]
        args: SqlArgs,
    },
}

impl SqlStatement {
    fn parts(&self) -> (&str, &SqlArgs) {
        static NONE: SqlArgs = SqlArgs::None;
        match self {
            SqlStatement::Text(sql) => (sql, &NONE),
            SqlStatement::WithArgs { sql, args } => (sql, args),
        }
    }
}

/// The libsql result shape the hosted std returns.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SqlResult {
    pub columns: Vec<String>,
    #[serde(rename = "columnTypes")]
    pub column_types: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
    #[serde(rename = "rowsAffected")]
    pub rows_affected: u64,
    #[serde(rename = "lastInsertRowid")]
    pub last_insert_rowid: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The statement needs an access the caller lacks.
    #[error("statement needs sqlite:{} access", if *.0 == StatementAccess::Write { "write" } else { "read" })]
    Forbidden(StatementAccess),
    /// SQLite refused the statement (syntax, constraint, authorizer, ...).
    #[error("{0}")]
    Sql(String),
    #[error("statement took longer than {0:?} and was interrupted")]
    Timeout(Duration),
    #[error("database is full: the limit is {0} bytes")]
    Full(u64),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Limits for every user database.
#[derive(Debug, Clone, Copy)]
pub struct SqlLimits {
    pub max_bytes: u64,
    pub max_time: Duration,
    pub max_rows: usize,
}

impl Default for SqlLimits {
    fn default() -> SqlLimits {
        SqlLimits {
            max_bytes: 64 << 20,
            max_time: Duration::from_secs(5),
            max_rows: 10_000,
        }
    }
}

/// Batch transaction modes of the libsql client.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BatchMode {
    #[default]
    Write,
    Read,
    Deferred,
}

#[derive(Debug)]
pub struct UserDatabases {
    root: PathBuf,
    limits: SqlLimits,
}

/// PRAGMAs a val may run. Anything else is refused, for reading too.
const SAFE_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "foreign_keys",
    "user_version",
    "page_count",
    "page_size",
    "freelist_count",
    "integrity_check",
    "quick_check",
    "data_version",
    "collation_list",
    "function_list",
    "pragma_list",
    "compile_options",
];

/// Functions that reach outside the database or the process.
const FORBIDDEN_FUNCTIONS: &[&str] = &[
    "load_extension",
    "readfile",
    "writefile",
    "edit",
    "fts3_tokenizer",
];

fn authorize(ctx: AuthContext<'_>) -> Authorization {
    match ctx.action {
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Authorization::Deny,
        AuthAction::Pragma { pragma_name, .. } => {
            if SAFE_PRAGMAS.contains(&pragma_name.to_ascii_lowercase().as_str()) {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        AuthAction::Function { function_name } => {
            if FORBIDDEN_FUNCTIONS.contains(&function_name.to_ascii_lowercase().as_str()) {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        _ => Authorization::Allow,
    }
}

impl UserDatabases {
    pub(crate) fn new(root: PathBuf) -> Result<UserDatabases, StoreError> {
        std::fs::create_dir_all(&root)?;
        Ok(UserDatabases {
            root,
            limits: SqlLimits::default(),
        })
    }

    pub fn path(&self, user_id: &str) -> Result<PathBuf, StoreError> {
        if user_id.is_empty()
            || !user_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(StoreError::Invalid(format!("bad user id '{user_id}'")));
        }
        Ok(self.root.join(format!("{user_id}.sqlite3")))
    }

    fn open(&self, user_id: &str) -> Result<Connection, SqlError> {
        let conn = Connection::open_with_flags(
            self.path(user_id)?,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(StoreError::from)?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "wal")?;
            let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let max_pages = self.limits.max_bytes as i64 / page_size.max(512);
            conn.query_row(&format!("PRAGMA max_page_count = {max_pages}"), [], |_| {
                Ok(())
            })?;
            conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
            conn.set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA,
                false,
            )?;
            Ok(())
        };
        setup().map_err(StoreError::from)?;
        conn.authorizer(Some(authorize));
        Ok(conn)
    }

    /// Runs statements on `user_id`'s database in one transaction: all or
    /// nothing. `allowed` says which accesses the caller holds; the first
    /// statement needing another stops the batch and nothing is kept.
    /// Returns the results and the strongest access used.
    pub fn execute(
        &self,
        user_id: &str,
        statements: &[SqlStatement],
        mode: BatchMode,
        allowed: &[StatementAccess],
    ) -> Result<(Vec<SqlResult>, StatementAccess), SqlError> {
        match self.execute_in_transaction(user_id, statements, mode, allowed) {
            // SQLite says FULL both at `max_page_count` and when the disk
            // is out of room; only the first is the user's to fix.
            Err(SqlError::Full(limit)) if self.disk_is_the_limit(user_id, limit) => {
                Err(SqlError::Store(StoreError::DiskFull(
                    "no room left to grow the database".into(),
                )))
            }
            other => other,
        }
    }

    /// Whether the disk has less room than the user's database may still
    /// grow by: then the disk, not the size limit, stopped the write.
    fn disk_is_the_limit(&self, user_id: &str, limit: u64) -> bool {
        let Ok(path) = self.path(user_id) else {
            return false;
        };
        let used = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match rustix::fs::statvfs(&self.root) {
            Ok(fs) => fs.f_bavail.saturating_mul(fs.f_frsize) < limit.saturating_sub(used),
            Err(_) => false,
        }
    }

    fn execute_in_transaction(
        &self,
        user_id: &str,
        statements: &[SqlStatement],
        mode: BatchMode,
        allowed: &[StatementAccess],
    ) -> Result<(Vec<SqlResult>, StatementAccess), SqlError> {
        if statements.is_empty() {
            return Err(SqlError::Invalid("no statements given".into()));
        }
        let mut conn = self.open(user_id)?;
        let deadline = Instant::now() + self.limits.max_time;
        conn.progress_handler(1_000, Some(move || Instant::now() > deadline));

        let behavior = match mode {
            BatchMode::Write => rusqlite::TransactionBehavior::Immediate,
            BatchMode::Read | BatchMode::Deferred => rusqlite::TransactionBehavior::Deferred,
        };
        let limits = self.limits;
        let tx = conn
            .transaction_with_behavior(behavior)
            .map_err(|e| map_sql_error(e, limits))?;
        // SQLite classifies each statement as it comes (a later statement
        // may use a table an earlier one created). The first that needs an
        // access the caller lacks ends the batch, and dropping the
        // transaction rolls back everything before it.
        let mut strongest = StatementAccess::Read;
        let mut results = Vec::with_capacity(statements.len());
        for statement in statements {
            let access = classify(&tx, statement.parts().0)?;
            if !allowed.contains(&access) {
                return Err(SqlError::Forbidden(access));
            }
            if mode == BatchMode::Read && access == StatementAccess::Write {
                return Err(SqlError::Invalid(
                    "a batch in read mode cannot write".into(),
                ));
            }
            strongest = strongest.max(access);
            results.push(run_one(&tx, statement, limits)?);
        }
        tx.commit().map_err(|e| map_sql_error(e, limits))?;
        Ok((results, strongest))
    }
}

fn classify(conn: &Connection, sql: &str) -> Result<StatementAccess, SqlError> {
    // A PRAGMA that assigns (`PRAGMA user_version = 3`) changes the
    // database even where SQLite calls the statement read-only; it needs
    // write access before the authorizer even looks at it.
    let assigns_pragma = sql
        .trim_start()
        .get(..6)
        .is_some_and(|p| p.eq_ignore_ascii_case("pragma"))
        && sql.contains('=');
    if assigns_pragma {
        return Ok(StatementAccess::Write);
    }
    let stmt = conn
        .prepare(sql)
        .map_err(|e| map_sql_error(e, SqlLimits::default()))?;
    Ok(if stmt.readonly() {
        StatementAccess::Read
    } else {
        StatementAccess::Write
    })
}

fn map_sql_error(e: rusqlite::Error, limits: SqlLimits) -> SqlError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::OperationInterrupted =>
        {
            SqlError::Timeout(limits.max_time)
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            SqlError::Full(limits.max_bytes)
        }
        rusqlite::Error::SqliteFailure(_, Some(message)) => SqlError::Sql(message.clone()),
        rusqlite::Error::SqlInputError { msg, .. } => SqlError::Sql(msg.clone()),
        rusqlite::Error::MultipleStatement => {
            SqlError::Sql("one statement per entry: split it or use batch".into())
        }
        _ => SqlError::Sql(e.to_string()),
    }
}

fn json_to_value(v: &serde_json::Value) -> Result<Value, SqlError> {
    Ok(match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        serde_json::Value::Object(o) if o.len() == 1 && o.contains_key("base64") => {
            let text = o.get("base64").and_then(|b| b.as_str()).unwrap_or_default();
            Value::Blob(
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| SqlError::Invalid(format!("bad base64 blob argument: {e}")))?,
            )
        }
        other => {
            return Err(SqlError::Invalid(format!(
                "unsupported argument {other}: use null, a number, a string, a boolean or {{\"base64\": ...}}"
            )));
        }
    })
}

fn value_to_json(v: ValueRef<'_>) -> serde_json::Value {
    match v {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(f) => {
            serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into)
        }
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
        ValueRef::Blob(b) => {
            serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) })
        }
    }
}

fn run_one(
    conn: &Connection,
    statement: &SqlStatement,
    limits: SqlLimits,
) -> Result<SqlResult, SqlError> {
    let (sql, args) = statement.parts();
    let err = |e| map_sql_error(e, limits);
    let mut stmt = conn.prepare(sql).map_err(err)?;
    match args {
        SqlArgs::None => {}
        SqlArgs::Positional(values) => {
            if values.len() != stmt.parameter_count() {
                return Err(SqlError::Invalid(format!(
                    "statement has {} parameters but {} arguments were given",
                    stmt.parameter_count(),
                    values.len()
                )));
            }
            for (i, v) in values.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, json_to_value(v)?)
                    .map_err(err)?;
            }
        }
        SqlArgs::Named(map) => {
            for (name, v) in map {
                let found = [":", "@", "$"].iter().find_map(|p| {
                    let full = if name.starts_with([':', '@', '$']) {
                        name.clone()
                    } else {
                        format!("{p}{name}")
                    };
                    stmt.parameter_index(&full).ok().flatten()
                });
                let Some(index) = found else {
                    return Err(SqlError::Invalid(format!(
                        "statement has no parameter named '{name}'"
                    )));
                };
                stmt.raw_bind_parameter(index, json_to_value(v)?)
                    .map_err(err)?;
            }
        }
    }
    let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    let column_types: Vec<String> = stmt
        .columns()
        .iter()
        .map(|c| c.decl_type().unwrap_or("").to_owned())
        .collect();
    let mut rows_out = Vec::new();
    {
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next().map_err(err)? {
            if rows_out.len() >= limits.max_rows {
                return Err(SqlError::Invalid(format!(
                    "result has more than {} rows: add a LIMIT",
                    limits.max_rows
                )));
            }
            let mut out = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                out.push(value_to_json(row.get_ref(i).map_err(err)?));
            }
            rows_out.push(out);
        }
    }
    let readonly = stmt.readonly();
    let rows_affected = if readonly { 0 } else { conn.changes() };
    Ok(SqlResult {
        columns,
        column_types,
        rows: rows_out,
        rows_affected,
        last_insert_rowid: if readonly {
            None
        } else {
            Some(conn.last_insert_rowid())
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dbs() -> (tempfile::TempDir, UserDatabases) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dbs = UserDatabases::new(dir.path().join("sqlite")).expect("dbs");
        (dir, dbs)
    }

    fn st(sql: &str) -> SqlStatement {
        SqlStatement::Text(sql.into())
    }

    const RW: &[StatementAccess] = &[StatementAccess::Read, StatementAccess::Write];

    #[test]
    fn sqlite_decides_read_or_write() {
        let (_d, dbs) = dbs();
        let e = dbs.execute(
            "u1",
            &[st("CREATE TABLE t (a)")],
            BatchMode::Write,
            &[StatementAccess::Read],
        );
        assert!(matches!(
            e,
            Err(SqlError::Forbidden(StatementAccess::Write))
        ));
        dbs.execute(
            "u1",
            &[st("CREATE TABLE t (a INTEGER, b TEXT)")],
            BatchMode::Write,
            RW,
        )
        .expect("create");
        let (r, used) = dbs
            .execute(
                "u1",
                &[st("SELECT * FROM t")],
                BatchMode::Read,
                &[StatementAccess::Read],
            )
            .expect("select");
        assert_eq!(used, StatementAccess::Read);
        assert_eq!(r[0].column_types, vec!["INTEGER", "TEXT"]);
        for sql in [
            "INSERT INTO t VALUES (1, 'x')",
            "PRAGMA user_version = 3",
            "DELETE FROM t",
        ] {
            let e = dbs.execute("u1", &[st(sql)], BatchMode::Write, &[StatementAccess::Read]);
            assert!(
                matches!(e, Err(SqlError::Forbidden(StatementAccess::Write))),
                "{sql}"
            );
        }
    }

    #[test]
    fn dangerous_statements_are_refused() {
        let (dir, dbs) = dbs();
        let other = dir.path().join("other.db");
        for sql in [
            format!("ATTACH DATABASE '{}' AS o", other.display()),
            "PRAGMA writable_schema = 1".to_owned(),
            "PRAGMA journal_mode = off".to_owned(),
            "SELECT load_extension('x')".to_owned(),
        ] {
            let e = dbs.execute("u1", &[st(&sql)], BatchMode::Write, RW);
            assert!(matches!(e, Err(SqlError::Sql(_))), "{sql}: {e:?}");
        }
        assert!(!other.exists());
    }

    #[test]
    fn failing_batch_leaves_nothing_behind() {
        let (_d, dbs) = dbs();
        dbs.execute(
            "u1",
            &[st("CREATE TABLE t (a INTEGER PRIMARY KEY)")],
            BatchMode::Write,
            RW,
        )
        .expect("create");
        let batch = [
            st("INSERT INTO t VALUES (1)"),
            st("INSERT INTO t VALUES (1)"),
        ];
        assert!(dbs.execute("u1", &batch, BatchMode::Write, RW).is_err());
        let (r, _) = dbs
            .execute("u1", &[st("SELECT count(*) FROM t")], BatchMode::Read, RW)
            .expect("count");
        assert_eq!(r[0].rows[0][0], 0);
    }

    #[test]
    fn args_and_types() {
        let (_d, dbs) = dbs();
        dbs.execute(
            "u1",
            &[st("CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)")],
            BatchMode::Write,
            RW,
        )
        .expect("create");
        let insert: SqlStatement = serde_json::from_value(serde_json::json!({
            "sql": "INSERT INTO t VALUES (?, ?, ?, ?, ?)",
            "args": [1, 2.5, "x", {"base64": "AAE="}, null]
        }))
        .expect("json");
        let (r, _) = dbs
            .execute("u1", &[insert], BatchMode::Write, RW)
            .expect("insert");
        assert_eq!(r[0].rows_affected, 1);
        assert_eq!(r[0].last_insert_rowid, Some(1));
        let named: SqlStatement = serde_json::from_value(serde_json::json!({
            "sql": "SELECT i, r, s, b, n FROM t WHERE s = :s", "args": {"s": "x"}
        }))
        .expect("json");
        let (r, _) = dbs
            .execute("u1", &[named], BatchMode::Read, RW)
            .expect("select");
        assert_eq!(
            serde_json::to_value(&r[0].rows[0]).expect("json"),
            serde_json::json!([1, 2.5, "x", {"base64": "AAE="}, null])
        );
    }

    #[test]
    fn users_do_not_share_a_database() {
        let (_d, dbs) = dbs();
        dbs.execute("u1", &[st("CREATE TABLE secret (a)")], BatchMode::Write, RW)
            .expect("create");
        let e = dbs.execute("u2", &[st("SELECT * FROM secret")], BatchMode::Read, RW);
        assert!(matches!(e, Err(SqlError::Sql(m)) if m.contains("no such table")));
        assert!(dbs.path("../u1").is_err());
    }
}
