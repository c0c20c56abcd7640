//! Run records: one row per run, with its outcome and its (bounded) logs.

use valet_core::grant::ValRead;
use valet_core::{Granted, ScopeSet};

use crate::sql::{Row, Sql, args};
use crate::{Store, StoreError, time};

/// How a run ended (docs/CONTRACTS.md, "Outcomes"), or that it has not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Oom,
    Killed,
    Lost,
}

impl Outcome {
    /// The word stored in the `status` column (and shown by the API).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Oom => "oom",
            Outcome::Killed => "killed",
            Outcome::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Outcome {
        match s {
            "running" => Outcome::Running,
            "succeeded" => Outcome::Succeeded,
            "failed" => Outcome::Failed,
            "timed_out" => Outcome::TimedOut,
            "oom" => Outcome::Oom,
            "killed" => Outcome::Killed,
            _ => Outcome::Lost,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewRun<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub val_id: Option<&'a str>,
    pub trigger: &'a str,
    pub scopes: ScopeSet,
    pub started_at: i64,
    pub deadline: i64,
}

/// A run as stored. Times are unix milliseconds.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: String,
    pub user_id: String,
    pub val_id: Option<String>,
    pub trigger: String,
    pub scopes: ScopeSet,
    pub outcome: Outcome,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub duration_ms: Option<i64>,
    pub exit_detail: Option<String>,
    pub logs: String,
    /// The node that ran it, in a cluster.
    pub node: Option<String>,
}

const COLUMNS: &str = "id, user_id, val_id, trigger, scopes, status, started_at, ended_at, exit_detail, logs, node_id";

fn from_row(row: &Row) -> Result<RunRecord, StoreError> {
    let scopes: String = row.get(4)?;
    let status: String = row.get(5)?;
    let started: i64 = row.get(6)?;
    let ended: Option<i64> = row.get(7)?;
    Ok(RunRecord {
        id: row.get(0)?,
        user_id: row.get(1)?,
        val_id: row.get(2)?,
        trigger: row.get(3)?,
        scopes: ScopeSet::parse(&scopes).unwrap_or_default(),
        outcome: Outcome::parse(&status),
        started_at: started,
        ended_at: ended,
        duration_ms: ended.map(|e| e - started),
        exit_detail: row.get(8)?,
        logs: row.get(9)?,
        node: row.get(10)?,
    })
}

/// A run's start, queued for the background writer (owned: it outlives
/// the caller).
#[derive(Debug, Clone)]
pub struct RunStart {
    pub id: String,
    pub user_id: String,
    pub val_id: Option<String>,
    pub trigger: String,
    pub scopes: ScopeSet,
    pub started_at: i64,
    pub deadline: i64,
}

/// A run's end, queued for the background writer.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub id: String,
    pub outcome: Outcome,
    pub detail: String,
    pub logs: String,
    pub ended_at: i64,
}

pub(crate) fn write_start(
    sql: &mut Sql<'_>,
    run: &NewRun<'_>,
    node_id: Option<&str>,
) -> Result<(), StoreError> {
    write_run_row(sql, run, node_id)?;
    if let Some(val_id) = run.val_id {
        touch_val(sql, val_id, run.started_at)?;
    }
    Ok(())
}

/// A val's last run started at `at` (unless a later one is known).
pub(crate) fn touch_val(sql: &mut Sql<'_>, val_id: &str, at: i64) -> Result<(), StoreError> {
    sql.execute(
        "UPDATE vals SET last_run_at = ?1 WHERE id = ?2 AND (last_run_at IS NULL OR last_run_at < ?1)",
        args![at, val_id],
    )?;
    Ok(())
}

/// The run's row as started, without touching its val.
pub(crate) fn write_run_row(
    sql: &mut Sql<'_>,
    run: &NewRun<'_>,
    node_id: Option<&str>,
) -> Result<(), StoreError> {
    // A val deleted while its run started keeps the run, without the val.
    sql.execute(
        "INSERT INTO runs (id, user_id, val_id, trigger, scopes, status, started_at, deadline, node_id)
         VALUES (?1, ?2, (SELECT id FROM vals WHERE id = ?3), ?4, ?5, 'running', ?6, ?7, ?8)
         ON CONFLICT (id) DO UPDATE SET scopes = excluded.scopes,
             started_at = excluded.started_at, deadline = excluded.deadline",
        args![run.id, run.user_id, run.val_id, run.trigger, run.scopes.to_claim(), run.started_at, run.deadline, node_id],
    )?;
    Ok(())
}

/// A run that started and ended within one batch of the writer (a hot
/// request, mostly): its row written whole, in one statement instead of an
/// insert and an update. False when a row was there already (a run claimed
/// from a cluster's queue): then [`write_run_row`] and [`write_end`] apply.
pub(crate) fn write_whole_run(
    sql: &mut Sql<'_>,
    run: &NewRun<'_>,
    node_id: Option<&str>,
    end: &RunEnd,
) -> Result<bool, StoreError> {
    let written = sql.execute(
        "INSERT INTO runs (id, user_id, val_id, trigger, scopes, status, started_at, deadline, node_id,
                           ended_at, exit_detail, logs)
         VALUES (?1, ?2, (SELECT id FROM vals WHERE id = ?3), ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (id) DO NOTHING",
        args![
            run.id,
            run.user_id,
            run.val_id,
            run.trigger,
            run.scopes.to_claim(),
            end.outcome.as_str(),
            run.started_at,
            run.deadline,
            node_id,
            end.ended_at,
            end.detail,
            end.logs
        ],
    )?;
    if written == 0 {
        return Ok(false);
    }
    crate::cluster::notify(sql, crate::cluster::DONE, &end.id)?;
    Ok(true)
}

/// A run already marked `lost` (its node's lease ran out while it ran)
/// stays lost: the cluster has told its waiters so, and a lost run is
/// never run again.
pub(crate) fn write_end(sql: &mut Sql<'_>, end: &RunEnd) -> Result<(), StoreError> {
    sql.execute(
        "UPDATE runs SET status = ?1, ended_at = ?2, exit_detail = ?3, logs = ?4
         WHERE id = ?5 AND status = 'running'",
        args![
            end.outcome.as_str(),
            end.ended_at,
            end.detail,
            end.logs,
            end.id
        ],
    )?;
    crate::cluster::notify(sql, crate::cluster::DONE, &end.id)
}

impl RunStart {
    pub(crate) fn as_new(&self) -> NewRun<'_> {
        NewRun {
            id: &self.id,
            user_id: &self.user_id,
            val_id: self.val_id.as_deref(),
            trigger: &self.trigger,
            scopes: self.scopes,
            started_at: self.started_at,
            deadline: self.deadline,
        }
    }
}

impl Store {
    /// Records a run as started. A run claimed from the cluster's queue
    /// has its record already (made by the claim): it gets the times and
    /// scopes of its actual start.
    pub fn insert_run(&self, run: &NewRun<'_>) -> Result<(), StoreError> {
        self.db_write(|sql| write_start(sql, run, self.node_id()))
    }

    /// Records how a run ended (see [`write_end`]).
    pub fn finish_run(
        &self,
        id: &str,
        outcome: Outcome,
        detail: &str,
        logs: &str,
    ) -> Result<(), StoreError> {
        let end = RunEnd {
            id: id.to_owned(),
            outcome,
            detail: detail.to_owned(),
            logs: logs.to_owned(),
            ended_at: time::now_ms(),
        };
        self.db_write(|sql| write_end(sql, &end))
    }

    /// Queues a run's start for the background writer (batched with other
    /// runs' rows and the audit log); reads of runs wait for it.
    pub fn queue_run_start(&self, run: RunStart) {
        self.audit()
            .queue_run_start(run, self.node_id().map(str::to_owned));
    }

    /// Queues a run's end for the background writer. The receiver hears
    /// once it is written (or why it could not be).
    pub fn queue_run_end(&self, end: RunEnd) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        self.audit().queue_run_end(end)
    }

    /// Queues a run's end that nobody waits for (a hot http request's,
    /// whose answer has left): written with the writer's next batch.
    pub fn queue_run_end_detached(&self, end: RunEnd) {
        self.audit().queue_run_end_detached(end)
    }

    /// A run by id, for the node waiting on it (no caller: the waiter
    /// queued it for a caller already checked).
    pub fn run_by_id(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        self.audit().flush_runs();
        self.db_read(|sql| {
            sql.query_opt(
                &format!("SELECT {COLUMNS} FROM runs WHERE id = ?1"),
                args![id],
            )?
            .as_ref()
            .map(from_row)
            .transpose()
        })
    }

    /// Runs left `running` by a supervisor that died: marks them `lost`.
    pub fn mark_lost_runs(&self) -> Result<usize, StoreError> {
        self.db_write(|sql| {
            Ok(sql.execute(
                "UPDATE runs SET status = 'lost', ended_at = ?1, exit_detail = 'the supervisor stopped during the run'
                 WHERE status = 'running'",
                args![time::now_ms()],
            )? as usize)
        })
    }

    /// A run of the grant's user; anyone else's is "not found".
    pub fn run_of_user(&self, grant: &Granted<ValRead>, id: &str) -> Result<RunRecord, StoreError> {
        self.audit().flush_runs();
        self.db_read(|sql| {
            sql.query_opt(
                &format!("SELECT {COLUMNS} FROM runs WHERE id = ?1 AND user_id = ?2"),
                args![id, grant.user_id()],
            )?
            .as_ref()
            .map(from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("run '{id}'")))
        })
    }

    /// The latest runs of a val of the grant's user (none of anyone else's).
    pub fn runs_of_val(
        &self,
        grant: &Granted<ValRead>,
        val_id: &str,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        self.audit().flush_runs();
        self.db_read(|sql| {
            sql.query_map(
                &format!(
                    "SELECT {COLUMNS} FROM runs WHERE val_id = ?1 AND user_id = ?3
                     ORDER BY started_at DESC, id DESC LIMIT ?2"
                ),
                args![val_id, limit as i64, grant.user_id()],
                from_row,
            )
        })
    }
}
