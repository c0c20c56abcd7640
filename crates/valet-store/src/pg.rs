//! The PostgreSQL side of the control plane: a small pool of synchronous
//! connections (the `postgres` crate), each with its prepared statements,
//! and the binding of [`crate::sql`]'s values to PostgreSQL's types.
//!
//! The `postgres` crate drives each connection with a runtime of its own,
//! which must never block (or be dropped) on a thread that is running
//! async tasks. [`Store::call`](crate::Store::call) runs store work on
//! tokio's blocking pool, where that is fine; work started anywhere else
//! inside a runtime (a sync call from an async function) moves to a thread
//! of its own for the duration, see [`off_async`].

use std::cell::Cell;
use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{GenericClient, NoTls, Statement};

use crate::StoreError;
use crate::sql::{Arg, ArgRef, Row, Sql, Value, to_postgres_placeholders};

/// How long a caller waits for a free connection before giving up.
const ACQUIRE_WAIT: Duration = Duration::from_secs(30);
/// How often a listening connection proves itself alive.
const PING_EVERY: Duration = Duration::from_millis(250);

thread_local! {
    /// Set while store work runs on tokio's blocking pool (or a thread of
    /// its own), where the `postgres` crate may block.
    static MAY_BLOCK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` marked as running where blocking is allowed.
pub(crate) fn blocking_allowed<T>(f: impl FnOnce() -> T) -> T {
    let before = MAY_BLOCK.with(|b| b.replace(true));
    let out = f();
    MAY_BLOCK.with(|b| b.set(before));
    out
}

/// Runs `f` where the `postgres` crate may block: here, unless this thread
/// is inside a tokio runtime's async context, else on a scoped thread.
pub(crate) fn off_async<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let may_block = MAY_BLOCK.with(Cell::get) || tokio::runtime::Handle::try_current().is_err();
    if may_block {
        return f();
    }
    std::thread::scope(|s| match s.spawn(|| blocking_allowed(f)).join() {
        Ok(out) => out,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// What [`Sql`] needs of a PostgreSQL connection or transaction.
pub(crate) trait Run {
    fn execute(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<u64, StoreError>;
    fn query(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<Vec<Row>, StoreError>;
    /// Runs statements separated by `;`, without arguments (migrations).
    fn batch(&mut self, sql: &str) -> Result<(), StoreError>;
}

/// A client (or a transaction) with its connection's statement cache.
struct Runner<'a, C: GenericClient> {
    client: &'a mut C,
    cache: &'a mut HashMap<String, Statement>,
}

impl<C: GenericClient> Runner<'_, C> {
    fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(stmt) = self.cache.get(sql) {
            return Ok(stmt.clone());
        }
        let stmt = self.client.prepare(&to_postgres_placeholders(sql))?;
        self.cache.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }
}

impl<C: GenericClient> Run for Runner<'_, C> {
    fn execute(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<u64, StoreError> {
        let stmt = self.statement(sql)?;
        let values: Vec<ArgRef<'_>> = args.iter().map(|a| a.arg()).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        Ok(self.client.execute(&stmt, &params)?)
    }

    fn query(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<Vec<Row>, StoreError> {
        let stmt = self.statement(sql)?;
        let values: Vec<ArgRef<'_>> = args.iter().map(|a| a.arg()).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        self.client.query(&stmt, &params)?.iter().map(row).collect()
    }

    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(self.client.batch_execute(sql)?)
    }
}

fn row(row: &postgres::Row) -> Result<Row, StoreError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => row
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                row.try_get::<_, Option<String>>(i)?.map(Value::Text)
            }
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Bytes),
            Type::VOID => None,
            ref other => {
                return Err(StoreError::Corrupt(format!(
                    "column '{}' has type {other}, which the store does not read",
                    column.name()
                )));
            }
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row::new(values))
}

impl ToSql for ArgRef<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match *self {
            ArgRef::Null => Ok(IsNull::Yes),
            ArgRef::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
                Type::BOOL => (i != 0).to_sql(ty, out),
                _ => Err(format!("an integer cannot be a {ty} argument").into()),
            },
            ArgRef::Text(s) if <&str as ToSql>::accepts(ty) => s.to_sql(ty, out),
            ArgRef::Bytes(b) if *ty == Type::BYTEA => b.to_sql(ty, out),
            _ => Err(format!("{self:?} cannot be a {ty} argument").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// One connection and the statements prepared on it.
pub(crate) struct Conn {
    client: postgres::Client,
    cache: HashMap<String, Statement>,
}

impl Conn {
    pub(crate) fn connect(config: &postgres::Config) -> Result<Conn, StoreError> {
        Ok(Conn {
            client: config.connect(NoTls)?,
            cache: HashMap::new(),
        })
    }

    /// Runs `f` outside a transaction (each statement commits alone).
    pub(crate) fn read<T>(
        &mut self,
        f: impl FnOnce(&mut Sql<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut runner = Runner {
            client: &mut self.client,
            cache: &mut self.cache,
        };
        f(&mut Sql::postgres(&mut runner))
    }

    /// Runs `f` in a transaction, committed when `f` succeeds and rolled
    /// back when it fails.
    pub(crate) fn transact<T>(
        &mut self,
        f: impl FnOnce(&mut Sql<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut tx = self.client.transaction()?;
        let out = {
            let mut runner = Runner {
                client: &mut tx,
                cache: &mut self.cache,
            };
            f(&mut Sql::postgres(&mut runner))
        };
        if out.is_ok() {
            tx.commit()?;
        }
        out
    }
}

impl Conn {
    /// LISTENs on `channels` and hands each notification (channel,
    /// payload) to `on` until `stop` is set, checking it at least every
    /// [`PING_EVERY`]. Every [`PING_EVERY`] it also proves the connection
    /// alive with a round trip, and calls `alive` with the time that round
    /// trip was sent once it came back and every notification received
    /// until then was handed on (the LISTEN itself is the first). Returns
    /// on a connection error.
    pub(crate) fn listen(
        &mut self,
        channels: &[&str],
        stop: &AtomicBool,
        mut alive: impl FnMut(Instant),
        mut on: impl FnMut(&str, &str),
    ) -> Result<(), StoreError> {
        use postgres::fallible_iterator::FallibleIterator;
        let listen: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
        let mut sent = Instant::now();
        self.client.batch_execute(&listen)?;
        while !stop.load(Ordering::Relaxed) {
            {
                // What arrived with the round trip's answer, without waiting.
                let mut pending = self.client.notifications();
                let mut iter = pending.iter();
                while let Some(n) = iter.next()? {
                    on(n.channel(), n.payload());
                }
            }
            alive(sent);
            let ping_at = Instant::now() + PING_EVERY;
            {
                let mut notifications = self.client.notifications();
                let mut iter = notifications.timeout_iter(PING_EVERY);
                while let Some(n) = iter.next()? {
                    on(n.channel(), n.payload());
                    if stop.load(Ordering::Relaxed) || Instant::now() >= ping_at {
                        break;
                    }
                }
            }
            sent = Instant::now();
            self.client.batch_execute("SELECT 1")?;
        }
        Ok(())
    }
}

/// A bounded pool of connections, opened on demand.
pub(crate) struct Pool {
    config: postgres::Config,
    max: usize,
    state: Mutex<PoolState>,
    /// Signalled when a connection is returned or closed. A std `Condvar`:
    /// the pool is only used from blocking code.
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    open: usize,
}

impl Pool {
    pub(crate) fn new(url: &str, max: usize) -> Result<Pool, StoreError> {
        let config: postgres::Config = url.parse().map_err(|e| {
            StoreError::Invalid(format!(
                "invalid database URL (use postgres://user:password@host:port/dbname): {e}"
            ))
        })?;
        Ok(Pool::from_config(&config, max))
    }

    /// Another pool on the same database.
    pub(crate) fn from_config(config: &postgres::Config, max: usize) -> Pool {
        Pool {
            config: config.clone(),
            max: max.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    pub(crate) fn config(&self) -> &postgres::Config {
        &self.config
    }

    /// Runs `f` with a connection of the pool.
    pub(crate) fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        off_async(|| {
            let mut conn = self.acquire()?;
            let out = f(&mut conn);
            self.release(conn);
            out
        })
    }

    fn acquire(&self) -> Result<Conn, StoreError> {
        let poisoned = || StoreError::Corrupt("database pool lock poisoned".into());
        let mut state = self.state.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(conn);
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return Conn::connect(&self.config).inspect_err(|_| {
                    if let Ok(mut state) = self.state.lock() {
                        state.open -= 1;
                    }
                    self.freed.notify_one();
                });
            }
            let (next, timeout) = self
                .freed
                .wait_timeout(state, ACQUIRE_WAIT)
                .map_err(|_| poisoned())?;
            if timeout.timed_out() && next.idle.is_empty() && next.open >= self.max {
                return Err(StoreError::Unavailable(format!(
                    "all {} database connections stayed busy for {ACQUIRE_WAIT:?}",
                    self.max
                )));
            }
            state = next;
        }
    }

    fn release(&self, conn: Conn) {
        if let Ok(mut state) = self.state.lock() {
            if conn.client.is_closed() {
                state.open -= 1;
            } else {
                state.idle.push(conn);
            }
        }
        self.freed.notify_one();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Each client owns a runtime, which must not be dropped inside an
        // async context: hand them to a thread when that is where we are.
        let idle = match self.state.get_mut() {
            Ok(state) => std::mem::take(&mut state.idle),
            Err(_) => return,
        };
        if !idle.is_empty() {
            off_async(move || drop(idle));
        }
    }
}
