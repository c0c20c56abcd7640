//! Each user's own SQLite database, behind `std/sqlite`.
//!
//! Whether a statement reads or writes is decided by SQLite itself
//! (`sqlite3_stmt_readonly`), never by looking at the SQL text. An
//! authorizer refuses ATTACH, DETACH, extension loading and the PRAGMAs that
//! could escape the file or corrupt it; a progress handler bounds the time
//! of a call and `max_page_count` bounds the size of the file. A result is
//! bounded while it is read: rows and bytes per request are counted as each
//! row arrives, and SQLite's own length limit stops a single value from
//! growing past the byte cap, so no request can make the server hold more
//! than the cap.
//!
//! Whether a caller may read or write comes from the proofs a
//! [`SqliteGrants`] hands out, asked for each access as SQLite classifies
//! the statements.
//!
//! In a cluster, the node that is a user's home executes with a
//! [`HomeFence`]: its fencing token, kept in the database file's header
//! (`application_id`, which no user statement may read or set), is checked
//! in the transaction that runs the statements, so a holder with a lower
//! token than one that has written the file is refused and writes nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags};
use valet_core::Granted;
use valet_core::grant::{SqliteRead, SqliteWrite};

use crate::StoreError;

/// Where [`UserDatabases::execute`] gets its proofs. It asks for an access
/// only when SQLite has classified a statement as needing it, and at most
/// once per request, so a request is granted (and, in the API, audited for)
/// exactly what it uses.
pub trait SqliteGrants {
    /// Whose database the proofs open.
    fn owner(&self) -> &str;
    /// Proof of `sqlite:read`, or `None` when the caller lacks it.
    fn read(&mut self) -> Option<Granted<SqliteRead>>;
    /// Proof of `sqlite:write`, or `None` when the caller lacks it.
    fn write(&mut self) -> Option<Granted<SqliteWrite>>;
}

/// Proofs made up front, for callers that act without a request (the
/// conformance runner, the CLI, tests).
#[derive(Debug, Clone)]
pub struct HeldSqliteGrants {
    owner: String,
    read: Option<Granted<SqliteRead>>,
    write: Option<Granted<SqliteWrite>>,
}

impl HeldSqliteGrants {
    /// `None` when there is no proof at all, or the two are for different
    /// users.
    pub fn new(
        read: Option<Granted<SqliteRead>>,
        write: Option<Granted<SqliteWrite>>,
    ) -> Option<HeldSqliteGrants> {
        let owner = match (&read, &write) {
            (Some(r), Some(w)) if r.user_id() != w.user_id() => return None,
            (Some(r), _) => r.user_id().to_owned(),
            (None, Some(w)) => w.user_id().to_owned(),
            (None, None) => return None,
        };
        Some(HeldSqliteGrants { owner, read, write })
    }
}

impl SqliteGrants for HeldSqliteGrants {
    fn owner(&self) -> &str {
        &self.owner
    }

    fn read(&mut self) -> Option<Granted<SqliteRead>> {
        self.read.clone()
    }

    fn write(&mut self) -> Option<Granted<SqliteWrite>> {
        self.write.clone()
    }
}

/// A home node's hold on a user's database: the fencing token it writes
/// under, and the instant its own lease may run out (by its own clock),
/// after which it must not write. No transaction commits after
/// `valid_until`; one still running then is interrupted and rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HomeFence {
    pub token: i64,
    pub valid_until: Instant,
}

/// What a statement needs: decided per statement by SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatementAccess {
    Read,
    Write,
}

/// A value bound to a statement or read from a row, in SQLite's own five
/// storage classes. (valet-api maps it to and from the std library's JSON.)
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// Arguments of a statement, positional (`?`) or named (`:name`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum SqlArgs {
    #[default]
    None,
    Positional(Vec<SqlValue>),
    Named(BTreeMap<String, SqlValue>),
}

/// A statement: SQL alone, or SQL with arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlStatement {
    Text(String),
    WithArgs { sql: String, args: SqlArgs },
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

/// What one statement returned: the parts of the libsql result the hosted
/// std reads (valet-api writes it in that shape).
#[derive(Debug, Clone, PartialEq)]
pub struct SqlResult {
    pub columns: Vec<String>,
    /// Declared types, `""` for an expression or an untyped column.
    pub column_types: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
    pub rows_affected: u64,
    /// `None` for a read-only statement.
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
    /// The result of a request would pass a cap; nothing of it was sent.
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Invalid(String),
    /// This node may not execute on the user's database (now): its hold
    /// is stale or its lease may have run out. Nothing was executed.
    #[error("{0}")]
    NotHome(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Limits for every user database.
#[derive(Debug, Clone, Copy)]
pub struct SqlLimits {
    /// Size of the database file.
    pub max_bytes: u64,
    /// Time of one request.
    pub max_time: Duration,
    /// Rows in the results of one request, over all its statements.
    pub max_rows: usize,
    /// Bytes in the results of one request (values as JSON, roughly), and
    /// the largest string or blob SQLite will build.
    pub max_result_bytes: usize,
}

impl Default for SqlLimits {
    fn default() -> SqlLimits {
        SqlLimits {
            max_bytes: 64 << 20,
            max_time: Duration::from_secs(5),
            max_rows: 10_000,
            max_result_bytes: 10 << 20,
        }
    }
}

/// What is left of a request's result caps.
struct Budget {
    rows: usize,
    bytes: usize,
    limits: SqlLimits,
}

impl Budget {
    fn new(limits: SqlLimits) -> Budget {
        Budget {
            rows: limits.max_rows,
            bytes: limits.max_result_bytes,
            limits,
        }
    }

    fn take_row(&mut self) -> Result<(), SqlError> {
        self.rows = self.rows.checked_sub(1).ok_or_else(|| {
            SqlError::TooLarge(format!(
                "the result has more than {} rows: add a LIMIT or read it in pages",
                self.limits.max_rows
            ))
        })?;
        Ok(())
    }

    fn take_bytes(&mut self, n: usize) -> Result<(), SqlError> {
        self.bytes = self
            .bytes
            .checked_sub(n)
            .ok_or_else(|| too_many_bytes(self.limits))?;
        Ok(())
    }
}

fn too_many_bytes(limits: SqlLimits) -> SqlError {
    SqlError::TooLarge(format!(
        "the result is larger than {} bytes: select fewer rows or columns, or add a LIMIT",
        limits.max_result_bytes
    ))
}

/// Batch transaction modes of the libsql client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
        UserDatabases::with_limits(root, SqlLimits::default())
    }

    pub(crate) fn with_limits(
        root: PathBuf,
        limits: SqlLimits,
    ) -> Result<UserDatabases, StoreError> {
        std::fs::create_dir_all(&root)?;
        Ok(UserDatabases { root, limits })
    }

    pub fn limits(&self) -> SqlLimits {
        self.limits
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
            // No string or blob (and no row) larger than a whole result:
            // `randomblob(250000000)` fails before SQLite allocates it.
            let length = i32::try_from(self.limits.max_result_bytes).unwrap_or(i32::MAX);
            conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH, length)?;
            Ok(())
        };
        setup().map_err(StoreError::from)?;
        conn.authorizer(Some(authorize));
        Ok(conn)
    }

    /// Runs statements on the database of `grants.owner()` in one
    /// transaction: all or nothing. Each statement's access comes from a
    /// proof `grants` hands out; the first statement needing an access it
    /// refuses stops the batch and nothing is kept. Returns the results and
    /// the strongest access used.
    pub fn execute(
        &self,
        grants: &mut dyn SqliteGrants,
        statements: &[SqlStatement],
        mode: BatchMode,
    ) -> Result<(Vec<SqlResult>, StatementAccess), SqlError> {
        self.execute_with(grants, statements, mode, None)
    }

    /// [`execute`](Self::execute) by a home node of a cluster, under its
    /// fence: refused with [`SqlError::NotHome`], nothing executed, when
    /// the file has been written with a higher fencing token, or when the
    /// statements cannot commit before `fence.valid_until`.
    pub fn execute_fenced(
        &self,
        grants: &mut dyn SqliteGrants,
        statements: &[SqlStatement],
        mode: BatchMode,
        fence: HomeFence,
    ) -> Result<(Vec<SqlResult>, StatementAccess), SqlError> {
        self.execute_with(grants, statements, mode, Some(fence))
    }

    fn execute_with(
        &self,
        grants: &mut dyn SqliteGrants,
        statements: &[SqlStatement],
        mode: BatchMode,
        fence: Option<HomeFence>,
    ) -> Result<(Vec<SqlResult>, StatementAccess), SqlError> {
        let owner = grants.owner().to_owned();
        match self.execute_in_transaction(grants, statements, mode, fence) {
            // SQLite says FULL both at `max_page_count` and when the disk
            // is out of room; only the first is the user's to fix.
            Err(SqlError::Full(limit)) if self.disk_is_the_limit(&owner, limit) => {
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
        grants: &mut dyn SqliteGrants,
        statements: &[SqlStatement],
        mode: BatchMode,
        fence: Option<HomeFence>,
    ) -> Result<(Vec<SqlResult>, StatementAccess), SqlError> {
        if statements.is_empty() {
            return Err(SqlError::Invalid("no statements given".into()));
        }
        let owner = grants.owner().to_owned();
        let mut conn = self.open(&owner)?;
        let limits = self.limits;
        // A home node stops at its lease's end if that comes first.
        let time_limit = Instant::now() + limits.max_time;
        let deadline = match fence {
            Some(f) if f.valid_until < time_limit => f.valid_until,
            _ => time_limit,
        };
        let lease_ends_first = deadline < time_limit;
        conn.progress_handler(1_000, Some(move || Instant::now() > deadline));
        let not_home = || {
            SqlError::NotHome(
                "this node's lease may run out before the statements end, so it stopped; retry"
                    .into(),
            )
        };
        let map_err = |e: rusqlite::Error| match map_sql_error(e, limits) {
            SqlError::Timeout(_) if lease_ends_first => not_home(),
            other => other,
        };

        let behavior = match mode {
            BatchMode::Write => rusqlite::TransactionBehavior::Immediate,
            BatchMode::Read | BatchMode::Deferred => rusqlite::TransactionBehavior::Deferred,
        };
        if let Some(fence) = fence {
            raise_fence(&mut conn, fence.token).map_err(|e| match e {
                SqlError::Timeout(_) if lease_ends_first => not_home(),
                other => other,
            })?;
        }
        let tx = conn.transaction_with_behavior(behavior).map_err(map_err)?;
        if let Some(fence) = fence {
            // In the statements' own transaction: a holder with a higher
            // token that writes after this read makes this transaction's
            // writes fail (SQLite's write lock, or a stale WAL snapshot).
            let stored = stored_fence(&tx).map_err(map_err)?;
            if stored != fence.token {
                return Err(stale_fence(fence.token, stored));
            }
        }
        // SQLite classifies each statement as it comes (a later statement
        // may use a table an earlier one created). The first that needs an
        // access the caller lacks ends the batch, and dropping the
        // transaction rolls back everything before it.
        let mut read: Option<Granted<SqliteRead>> = None;
        let mut write: Option<Granted<SqliteWrite>> = None;
        let mut strongest = StatementAccess::Read;
        let mut budget = Budget::new(limits);
        let mut results = Vec::with_capacity(statements.len());
        for statement in statements {
            let access = classify(&tx, statement.parts().0)?;
            let granted = match access {
                StatementAccess::Read => {
                    if read.is_none() {
                        read = grants.read();
                    }
                    read.as_ref().is_some_and(|g| g.user_id() == owner)
                }
                StatementAccess::Write => {
                    if write.is_none() {
                        write = grants.write();
                    }
                    write.as_ref().is_some_and(|g| g.user_id() == owner)
                }
            };
            if !granted {
                return Err(SqlError::Forbidden(access));
            }
            if mode == BatchMode::Read && access == StatementAccess::Write {
                return Err(SqlError::Invalid(
                    "a batch in read mode cannot write".into(),
                ));
            }
            strongest = strongest.max(access);
            results.push(run_one(&tx, statement, &mut budget).map_err(|e| match e {
                SqlError::Timeout(_) if lease_ends_first => not_home(),
                other => other,
            })?);
        }
        if fence.is_some_and(|f| Instant::now() >= f.valid_until) {
            return Err(not_home());
        }
        tx.commit().map_err(map_err)?;
        Ok((results, strongest))
    }
}

/// The fencing token stored in a user database's header (0: never
/// written by a home node).
fn stored_fence(conn: &Connection) -> Result<i64, rusqlite::Error> {
    // valet's own statement, not the user's: the authorizer (which refuses
    // this PRAGMA to users) is lifted for it alone.
    conn.authorizer(None::<fn(AuthContext<'_>) -> Authorization>);
    let stored = conn.query_row("PRAGMA application_id", [], |r| r.get::<_, i64>(0));
    conn.authorizer(Some(authorize));
    stored
}

/// Makes sure the file carries `token`: raises a lower stored token to it
/// (in a transaction of its own, under SQLite's write lock), and refuses
/// when the file carries a higher one. Most calls find it equal and
/// change nothing.
fn raise_fence(conn: &mut Connection, token: i64) -> Result<(), SqlError> {
    let limits = SqlLimits::default();
    // SQLite's header holds a 32-bit signed integer.
    if !(1..=i64::from(i32::MAX)).contains(&token) {
        return Err(SqlError::NotHome(format!(
            "fencing token {token} does not fit the database header; this user's home cannot be held"
        )));
    }
    let stored = stored_fence(conn).map_err(|e| map_sql_error(e, limits))?;
    if stored == token {
        return Ok(());
    }
    if stored > token {
        return Err(stale_fence(token, stored));
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| map_sql_error(e, limits))?;
    let stored = stored_fence(&tx).map_err(|e| map_sql_error(e, limits))?;
    if stored > token {
        return Err(stale_fence(token, stored));
    }
    tx.authorizer(None::<fn(AuthContext<'_>) -> Authorization>);
    let raised = tx.execute_batch(&format!("PRAGMA application_id = {token}"));
    tx.authorizer(Some(authorize));
    raised.map_err(|e| map_sql_error(e, limits))?;
    tx.commit().map_err(|e| map_sql_error(e, limits))
}

fn stale_fence(token: i64, stored: i64) -> SqlError {
    SqlError::NotHome(format!(
        "this node's hold on the database is stale (fencing token {token}; the database was written with {stored}); retry"
    ))
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
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::TooBig => {
            SqlError::TooLarge(format!(
                "a value would be larger than {} bytes, the most one result may hold",
                limits.max_result_bytes
            ))
        }
        rusqlite::Error::SqliteFailure(_, Some(message)) => SqlError::Sql(message.clone()),
        rusqlite::Error::SqlInputError { msg, .. } => SqlError::Sql(msg.clone()),
        rusqlite::Error::MultipleStatement => {
            SqlError::Sql("one statement per entry: split it or use batch".into())
        }
        _ => SqlError::Sql(e.to_string()),
    }
}

fn to_sqlite(v: &SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => Value::Integer(*i),
        SqlValue::Real(f) => Value::Real(*f),
        SqlValue::Text(t) => Value::Text(t.clone()),
        SqlValue::Blob(b) => Value::Blob(b.clone()),
    }
}

/// About what a value costs as JSON, counted before it is converted.
fn json_cost(v: ValueRef<'_>) -> usize {
    const OVERHEAD: usize = 8;
    OVERHEAD
        + match v {
            ValueRef::Null | ValueRef::Integer(_) | ValueRef::Real(_) => 16,
            ValueRef::Text(t) => t.len(),
            ValueRef::Blob(b) => b.len().div_ceil(3) * 4 + 12,
        }
}

fn from_sqlite(v: ValueRef<'_>) -> SqlValue {
    match v {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Integer(i),
        ValueRef::Real(f) => SqlValue::Real(f),
        ValueRef::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
    }
}

fn run_one(
    conn: &Connection,
    statement: &SqlStatement,
    budget: &mut Budget,
) -> Result<SqlResult, SqlError> {
    let limits = budget.limits;
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
                stmt.raw_bind_parameter(i + 1, to_sqlite(v)).map_err(err)?;
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
                stmt.raw_bind_parameter(index, to_sqlite(v)).map_err(err)?;
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
        // Row by row: each is counted against the request's caps before it
        // is kept, so an oversized result stops at the cap.
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next().map_err(err)? {
            budget.take_row()?;
            let mut out = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                let value = row.get_ref(i).map_err(err)?;
                budget.take_bytes(json_cost(value))?;
                out.push(from_sqlite(value));
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

    /// Proofs of read and write on `user`'s database.
    fn rw(user: &str) -> HeldSqliteGrants {
        HeldSqliteGrants::new(
            Some(Granted::for_operator(user)),
            Some(Granted::for_operator(user)),
        )
        .expect("grants")
    }

    fn read_only(user: &str) -> HeldSqliteGrants {
        HeldSqliteGrants::new(Some(Granted::for_operator(user)), None).expect("grants")
    }

    fn run(
        dbs: &UserDatabases,
        grants: HeldSqliteGrants,
        sql: &[SqlStatement],
        mode: BatchMode,
    ) -> Result<(Vec<SqlResult>, StatementAccess), SqlError> {
        let mut grants = grants;
        dbs.execute(&mut grants, sql, mode)
    }

    #[test]
    fn sqlite_decides_read_or_write() {
        let (_d, dbs) = dbs();
        let e = run(
            &dbs,
            read_only("u1"),
            &[st("CREATE TABLE t (a)")],
            BatchMode::Write,
        );
        assert!(matches!(
            e,
            Err(SqlError::Forbidden(StatementAccess::Write))
        ));
        run(
            &dbs,
            rw("u1"),
            &[st("CREATE TABLE t (a INTEGER, b TEXT)")],
            BatchMode::Write,
        )
        .expect("create");
        let (r, used) = run(
            &dbs,
            read_only("u1"),
            &[st("SELECT * FROM t")],
            BatchMode::Read,
        )
        .expect("select");
        assert_eq!(used, StatementAccess::Read);
        assert_eq!(r[0].column_types, vec!["INTEGER", "TEXT"]);
        for sql in [
            "INSERT INTO t VALUES (1, 'x')",
            "PRAGMA user_version = 3",
            "DELETE FROM t",
        ] {
            let e = run(&dbs, read_only("u1"), &[st(sql)], BatchMode::Write);
            assert!(
                matches!(e, Err(SqlError::Forbidden(StatementAccess::Write))),
                "{sql}"
            );
        }
    }

    /// Counts what it hands out, as the API's audit would.
    struct Counting {
        read: usize,
        write: usize,
        may_write: bool,
    }

    impl SqliteGrants for Counting {
        fn owner(&self) -> &str {
            "u1"
        }
        fn read(&mut self) -> Option<Granted<SqliteRead>> {
            self.read += 1;
            Some(Granted::for_operator("u1"))
        }
        fn write(&mut self) -> Option<Granted<SqliteWrite>> {
            self.write += 1;
            self.may_write.then(|| Granted::for_operator("u1"))
        }
    }

    #[test]
    fn proofs_are_asked_for_once_and_only_when_needed() {
        let (_d, dbs) = dbs();
        let mut grants = Counting {
            read: 0,
            write: 0,
            may_write: true,
        };
        dbs.execute(
            &mut grants,
            &[
                st("SELECT 1"),
                st("CREATE TABLE t (a)"),
                st("SELECT 2"),
                st("INSERT INTO t VALUES (1)"),
            ],
            BatchMode::Write,
        )
        .expect("batch");
        assert_eq!((grants.read, grants.write), (1, 1));
        let mut grants = Counting {
            read: 0,
            write: 0,
            may_write: false,
        };
        let (_, used) = dbs
            .execute(&mut grants, &[st("SELECT * FROM t")], BatchMode::Read)
            .expect("select");
        assert_eq!(used, StatementAccess::Read);
        assert_eq!(
            (grants.read, grants.write),
            (1, 0),
            "a read asks for no write"
        );
        // A proof for another user's database opens nothing.
        let mut other =
            HeldSqliteGrants::new(Some(Granted::for_operator("u2")), None).expect("grants");
        let e = dbs.execute(&mut other, &[st("SELECT * FROM t")], BatchMode::Read);
        assert!(matches!(e, Err(SqlError::Sql(m)) if m.contains("no such table")));
        assert!(
            HeldSqliteGrants::new(
                Some(Granted::for_operator("u1")),
                Some(Granted::for_operator("u2"))
            )
            .is_none()
        );
    }

    #[test]
    fn results_stop_at_the_caps_while_rows_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = SqlLimits {
            max_rows: 100,
            max_result_bytes: 64 << 10,
            ..SqlLimits::default()
        };
        let dbs = UserDatabases::with_limits(dir.path().join("sqlite"), limits).expect("dbs");
        // One value past the byte cap: SQLite refuses to build it at all.
        let e = run(
            &dbs,
            read_only("u1"),
            &[st(
                "SELECT randomblob(250000000) FROM (VALUES (1),(2),(3),(4))",
            )],
            BatchMode::Read,
        );
        assert!(
            matches!(&e, Err(SqlError::TooLarge(m)) if m.contains("65536 bytes")),
            "{e:?}"
        );
        // Values under the cap that add up past it.
        let e = run(
            &dbs,
            read_only("u1"),
            &[st(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
                 SELECT randomblob(4000) FROM n",
            )],
            BatchMode::Read,
        );
        assert!(
            matches!(&e, Err(SqlError::TooLarge(m)) if m.contains("larger than 65536 bytes")),
            "{e:?}"
        );
        // Rows over the cap, counted over the whole request.
        let fifty = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
                     SELECT i FROM n";
        run(
            &dbs,
            read_only("u1"),
            &[st(fifty), st(fifty)],
            BatchMode::Read,
        )
        .expect("100 rows fit");
        let e = run(
            &dbs,
            read_only("u1"),
            &[st(fifty), st(fifty), st("SELECT 1")],
            BatchMode::Read,
        );
        assert!(
            matches!(&e, Err(SqlError::TooLarge(m)) if m.contains("more than 100 rows")),
            "{e:?}"
        );
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
            let e = run(&dbs, rw("u1"), &[st(&sql)], BatchMode::Write);
            assert!(matches!(e, Err(SqlError::Sql(_))), "{sql}: {e:?}");
        }
        assert!(!other.exists());
    }

    #[test]
    fn failing_batch_leaves_nothing_behind() {
        let (_d, dbs) = dbs();
        run(
            &dbs,
            rw("u1"),
            &[st("CREATE TABLE t (a INTEGER PRIMARY KEY)")],
            BatchMode::Write,
        )
        .expect("create");
        let batch = [
            st("INSERT INTO t VALUES (1)"),
            st("INSERT INTO t VALUES (1)"),
        ];
        assert!(run(&dbs, rw("u1"), &batch, BatchMode::Write).is_err());
        let (r, _) = run(
            &dbs,
            rw("u1"),
            &[st("SELECT count(*) FROM t")],
            BatchMode::Read,
        )
        .expect("count");
        assert_eq!(r[0].rows[0][0], SqlValue::Integer(0));
    }

    #[test]
    fn args_and_types() {
        let (_d, dbs) = dbs();
        run(
            &dbs,
            rw("u1"),
            &[st("CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)")],
            BatchMode::Write,
        )
        .expect("create");
        let row = vec![
            SqlValue::Integer(1),
            SqlValue::Real(2.5),
            SqlValue::Text("x".into()),
            SqlValue::Blob(vec![0, 1]),
            SqlValue::Null,
        ];
        let insert = SqlStatement::WithArgs {
            sql: "INSERT INTO t VALUES (?, ?, ?, ?, ?)".into(),
            args: SqlArgs::Positional(row.clone()),
        };
        let (r, _) = run(&dbs, rw("u1"), &[insert], BatchMode::Write).expect("insert");
        assert_eq!(r[0].rows_affected, 1);
        assert_eq!(r[0].last_insert_rowid, Some(1));
        let named = SqlStatement::WithArgs {
            sql: "SELECT i, r, s, b, n FROM t WHERE s = :s".into(),
            args: SqlArgs::Named([("s".to_owned(), SqlValue::Text("x".into()))].into()),
        };
        let (r, _) = run(&dbs, rw("u1"), &[named], BatchMode::Read).expect("select");
        assert_eq!(r[0].rows[0], row);
        assert_eq!(
            r[0].column_types,
            ["INTEGER", "REAL", "TEXT", "BLOB", ""].map(String::from)
        );
    }

    fn fence(token: i64) -> HomeFence {
        HomeFence {
            token,
            valid_until: Instant::now() + Duration::from_secs(60),
        }
    }

    fn fenced(
        dbs: &UserDatabases,
        token: i64,
        sql: &[SqlStatement],
    ) -> Result<(Vec<SqlResult>, StatementAccess), SqlError> {
        dbs.execute_fenced(&mut rw("u1"), sql, BatchMode::Write, fence(token))
    }

    /// The bytes of a user's database file and its WAL.
    fn files(dbs: &UserDatabases, user: &str) -> (Vec<u8>, Vec<u8>) {
        let path = dbs.path(user).expect("path");
        let wal = path.with_extension("sqlite3-wal");
        (
            std::fs::read(&path).expect("db file"),
            std::fs::read(&wal).unwrap_or_default(),
        )
    }

    #[test]
    fn a_holder_with_a_stale_fence_cannot_execute_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Two nodes on one shared directory, each with its own handle.
        let old_home = UserDatabases::new(dir.path().join("sqlite")).expect("dbs");
        let new_home = UserDatabases::new(dir.path().join("sqlite")).expect("dbs");
        fenced(
            &old_home,
            4,
            &[
                st("CREATE TABLE t (a)"),
                st("INSERT INTO t VALUES ('by 4')"),
            ],
        )
        .expect("the first holder writes");
        fenced(&new_home, 5, &[st("INSERT INTO t VALUES ('by 5')")])
            .expect("a higher fence writes");
        let before = files(&old_home, "u1");
        for (sql, mode) in [
            ("INSERT INTO t VALUES ('by 4 again')", BatchMode::Write),
            ("DELETE FROM t", BatchMode::Deferred),
            ("SELECT * FROM t", BatchMode::Read),
        ] {
            let e = old_home.execute_fenced(&mut rw("u1"), &[st(sql)], mode, fence(4));
            assert!(
                matches!(&e, Err(SqlError::NotHome(m)) if m.contains("fencing token 4") && m.contains("written with 5")),
                "{sql}: {e:?}"
            );
        }
        assert_eq!(
            files(&old_home, "u1"),
            before,
            "the refused calls wrote nothing"
        );
        let (r, _) = fenced(&new_home, 5, &[st("SELECT a FROM t ORDER BY rowid")]).expect("read");
        assert_eq!(
            r[0].rows,
            vec![
                vec![SqlValue::Text("by 4".into())],
                vec![SqlValue::Text("by 5".into())]
            ]
        );
        // Without a fence (one machine), nothing is checked or written.
        run(
            &dbs_at(dir.path()),
            rw("u2"),
            &[st("CREATE TABLE x (a)")],
            BatchMode::Write,
        )
        .expect("unfenced");
        let conn = Connection::open(old_home.path("u2").expect("path")).expect("open");
        let id: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .expect("header");
        assert_eq!(id, 0, "an unfenced database carries no fence");
    }

    fn dbs_at(dir: &std::path::Path) -> UserDatabases {
        UserDatabases::new(dir.join("sqlite")).expect("dbs")
    }

    #[test]
    fn a_home_stops_when_its_lease_may_have_run_out() {
        let (_d, dbs) = dbs();
        fenced(&dbs, 1, &[st("CREATE TABLE t (a)")]).expect("create");
        let before = files(&dbs, "u1");
        let lapsed = HomeFence {
            token: 1,
            valid_until: Instant::now(),
        };
        let e = dbs.execute_fenced(
            &mut rw("u1"),
            &[st("INSERT INTO t VALUES (1)")],
            BatchMode::Write,
            lapsed,
        );
        assert!(
            matches!(&e, Err(SqlError::NotHome(m)) if m.contains("lease")),
            "{e:?}"
        );
        // A statement still running when the lease ends is interrupted.
        let soon = HomeFence {
            token: 1,
            valid_until: Instant::now() + Duration::from_millis(200),
        };
        let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)
                       INSERT INTO t SELECT i FROM n";
        let e = dbs.execute_fenced(&mut rw("u1"), &[st(endless)], BatchMode::Write, soon);
        assert!(
            matches!(&e, Err(SqlError::NotHome(m)) if m.contains("lease")),
            "{e:?}"
        );
        assert_eq!(files(&dbs, "u1").0, before.0, "nothing was committed");
        let (r, _) = fenced(&dbs, 1, &[st("SELECT count(*) FROM t")]).expect("count");
        assert_eq!(r[0].rows[0][0], SqlValue::Integer(0));
    }

    #[test]
    fn user_statements_can_neither_read_nor_set_the_fence() {
        let (_d, dbs) = dbs();
        fenced(&dbs, 7, &[st("CREATE TABLE t (a)")]).expect("create");
        for sql in [
            "PRAGMA application_id",
            "PRAGMA application_id = 99",
            "SELECT * FROM pragma_application_id()",
            "SELECT data FROM sqlite_dbpage WHERE pgno = 1",
        ] {
            let e = fenced(&dbs, 7, &[st(sql)]);
            assert!(matches!(&e, Err(SqlError::Sql(_))), "{sql}: {e:?}");
        }
        let e = fenced(&dbs, 6, &[st("SELECT 1")]);
        assert!(matches!(e, Err(SqlError::NotHome(_))), "{e:?}");
    }

    #[test]
    fn users_do_not_share_a_database() {
        let (_d, dbs) = dbs();
        run(
            &dbs,
            rw("u1"),
            &[st("CREATE TABLE secret (a)")],
            BatchMode::Write,
        )
        .expect("create");
        let e = run(
            &dbs,
            rw("u2"),
            &[st("SELECT * FROM secret")],
            BatchMode::Read,
        );
        assert!(matches!(e, Err(SqlError::Sql(m)) if m.contains("no such table")));
        assert!(dbs.path("../u1").is_err());
    }
}
