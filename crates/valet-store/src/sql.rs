//! One way to speak SQL to either control-plane backend (SQLite or
//! PostgreSQL): statements with `?1`-style placeholders, arguments and rows
//! as four plain kinds of value (null, integer, text, bytes).
//!
//! The schemas of both backends use only those kinds (`BIGINT`/`INTEGER`,
//! `TEXT`, `BYTEA`/`BLOB`), so one statement text serves both; the few
//! places where the dialects differ ask [`Sql::dialect`]. PostgreSQL sees
//! `$1` for `?1` (rewritten once per connection and statement, then
//! prepared and cached), SQLite sees the text as written.

use crate::StoreError;

/// Which database a statement runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A value read from a row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// A borrowed argument of a statement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ArgRef<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// Anything that can be bound as an argument.
pub(crate) trait Arg: Sync {
    fn arg(&self) -> ArgRef<'_>;
}

impl Arg for i64 {
    fn arg(&self) -> ArgRef<'_> {
        ArgRef::Int(*self)
    }
}

impl Arg for bool {
    fn arg(&self) -> ArgRef<'_> {
        ArgRef::Int(i64::from(*self))
    }
}

impl Arg for str {
    fn arg(&self) -> ArgRef<'_> {
        ArgRef::Text(self)
    }
}

impl Arg for String {
    fn arg(&self) -> ArgRef<'_> {
        ArgRef::Text(self)
    }
}

impl Arg for [u8] {
    fn arg(&self) -> ArgRef<'_> {
        ArgRef::Bytes(self)
    }
}

impl Arg for Vec<u8> {
    fn arg(&self) -> ArgRef<'_> {
        ArgRef::Bytes(self)
    }
}

impl<T: Arg + ?Sized> Arg for &T {
    fn arg(&self) -> ArgRef<'_> {
        (**self).arg()
    }
}

impl<T: Arg> Arg for Option<T> {
    fn arg(&self) -> ArgRef<'_> {
        match self {
            Some(v) => v.arg(),
            None => ArgRef::Null,
        }
    }
}

/// `args![a, b, c]`: the arguments of a statement, in placeholder order.
macro_rules! args {
    () => { &[] as &[&dyn $crate::sql::Arg] };
    ($($x:expr),+ $(,)?) => { &[$(&$x as &dyn $crate::sql::Arg),+] as &[&dyn $crate::sql::Arg] };
}
pub(crate) use args;

/// A row read back: its values in column order.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    values: Vec<Value>,
}

impl Row {
    pub(crate) fn new(values: Vec<Value>) -> Row {
        Row { values }
    }

    /// Column `i` as `T`; a missing column or a value of another kind is
    /// corrupt data (the schema decides both).
    pub(crate) fn get<T: FromValue>(&self, i: usize) -> Result<T, StoreError> {
        let value = self
            .values
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("no column {i} in a row")))?;
        T::from_value(value)
            .ok_or_else(|| StoreError::Corrupt(format!("column {i} holds {value:?}")))
    }
}

/// A Rust type a column converts into.
pub(crate) trait FromValue: Sized {
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(value: &Value) -> Option<i64> {
        match value {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Option<bool> {
        i64::from_value(value).map(|i| i != 0)
    }
}

impl FromValue for String {
    fn from_value(value: &Value) -> Option<String> {
        match value {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: &Value) -> Option<Vec<u8>> {
        match value {
            Value::Bytes(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value) -> Option<Option<T>> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// A connection (or a transaction on one) of either backend.
pub(crate) struct Sql<'a> {
    exec: Exec<'a>,
    /// This transaction changed an API token: the token caches must be
    /// emptied when it ends (see `tokens::changed`).
    tokens_changed: bool,
}

enum Exec<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(&'a mut dyn crate::pg::Run),
}

impl<'a> Sql<'a> {
    pub(crate) fn sqlite(conn: &'a rusqlite::Connection) -> Sql<'a> {
        Sql {
            exec: Exec::Sqlite(conn),
            tokens_changed: false,
        }
    }

    pub(crate) fn postgres(run: &'a mut dyn crate::pg::Run) -> Sql<'a> {
        Sql {
            exec: Exec::Postgres(run),
            tokens_changed: false,
        }
    }

    pub(crate) fn dialect(&self) -> Dialect {
        match self.exec {
            Exec::Sqlite(_) => Dialect::Sqlite,
            Exec::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Notes that this transaction changed an API token; true the first
    /// time.
    pub(crate) fn note_tokens_changed(&mut self) -> bool {
        !std::mem::replace(&mut self.tokens_changed, true)
    }

    pub(crate) fn tokens_changed(&self) -> bool {
        self.tokens_changed
    }

    /// What ends a `SELECT` of rows the transaction is about to update:
    /// `FOR UPDATE` on PostgreSQL (whose transactions read committed
    /// rows); nothing on SQLite, whose write transactions are immediate
    /// and so already exclusive.
    pub(crate) fn for_update(&self) -> &'static str {
        match self.dialect() {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    /// Runs a statement; returns the rows it changed.
    pub(crate) fn execute(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<u64, StoreError> {
        match &mut self.exec {
            Exec::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(args.iter().map(|a| a.arg())))? as u64)
            }
            Exec::Postgres(run) => run.execute(sql, args),
        }
    }

    /// Runs a query; returns every row.
    pub(crate) fn query(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<Vec<Row>, StoreError> {
        match &mut self.exec {
            Exec::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(sql)?;
                let columns = stmt.column_count();
                let mut rows =
                    stmt.query(rusqlite::params_from_iter(args.iter().map(|a| a.arg())))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let mut values = Vec::with_capacity(columns);
                    for i in 0..columns {
                        values.push(sqlite_value(row.get_ref(i)?)?);
                    }
                    out.push(Row::new(values));
                }
                Ok(out)
            }
            Exec::Postgres(run) => run.query(sql, args),
        }
    }

    /// Runs one statement without arguments or rows that runs often (a
    /// savepoint's, around each run record): prepared once on SQLite.
    pub(crate) fn command(&mut self, sql: &str) -> Result<(), StoreError> {
        match &mut self.exec {
            Exec::Sqlite(conn) => {
                conn.prepare_cached(sql)?.execute([])?;
                Ok(())
            }
            Exec::Postgres(run) => run.batch(sql),
        }
    }

    /// Runs statements separated by `;`, without arguments (migrations).
    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match &mut self.exec {
            Exec::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Exec::Postgres(run) => run.batch(sql),
        }
    }

    /// The first row of a query, if any.
    pub(crate) fn query_opt(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row of a query that always returns one (an aggregate).
    pub(crate) fn query_one(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<Row, StoreError> {
        self.query_opt(sql, args)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from: {sql}")))
    }

    /// Rows of a query, each made into a `T`.
    pub(crate) fn query_map<T>(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        from_row: impl Fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.query(sql, args)?.iter().map(from_row).collect()
    }

    /// Holds a lock named `name` until the transaction ends, for checks
    /// that must not interleave (a quota read and the insert it allows).
    /// SQLite needs none: its writes are already one at a time.
    pub(crate) fn lock(&mut self, name: &str) -> Result<(), StoreError> {
        match self.dialect() {
            Dialect::Sqlite => Ok(()),
            Dialect::Postgres => {
                self.query(
                    "SELECT pg_advisory_xact_lock(hashtextextended(?1, 0))",
                    args![name],
                )?;
                Ok(())
            }
        }
    }
}

fn sqlite_value(value: rusqlite::types::ValueRef<'_>) -> Result<Value, StoreError> {
    use rusqlite::types::ValueRef;
    Ok(match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Text(t) => Value::Text(
            String::from_utf8(t.to_vec())
                .map_err(|_| StoreError::Corrupt("text that is not UTF-8".into()))?,
        ),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
        ValueRef::Real(r) => {
            return Err(StoreError::Corrupt(format!(
                "a real number ({r}) where the schema has none"
            )));
        }
    })
}

impl rusqlite::ToSql for ArgRef<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            ArgRef::Null => ValueRef::Null,
            ArgRef::Int(i) => ValueRef::Integer(i),
            ArgRef::Text(t) => ValueRef::Text(t.as_bytes()),
            ArgRef::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

/// `?1` becomes `$1` (PostgreSQL's placeholders), outside quoted text.
pub(crate) fn to_postgres_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '?') if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('$');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_outside_quotes_only() {
        assert_eq!(
            to_postgres_placeholders("SELECT ?1, '?2', \"a?3\" WHERE x = ?12 AND y = ?"),
            "SELECT $1, '?2', \"a?3\" WHERE x = $12 AND y = ?"
        );
    }

    #[test]
    fn rows_convert_by_kind() {
        let row = Row::new(vec![
            Value::Int(1),
            Value::Null,
            Value::Text("a".into()),
            Value::Bytes(vec![1]),
        ]);
        assert_eq!(row.get::<i64>(0).expect("int"), 1);
        assert!(row.get::<bool>(0).expect("bool"));
        assert_eq!(row.get::<Option<String>>(1).expect("null"), None);
        assert_eq!(row.get::<String>(2).expect("text"), "a");
        assert_eq!(row.get::<Vec<u8>>(3).expect("bytes"), vec![1]);
        assert!(row.get::<String>(0).is_err(), "an int is not text");
        assert!(row.get::<i64>(9).is_err(), "no such column");
    }
}
