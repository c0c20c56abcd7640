//! `std/sqlite` routes on the caller's own database. SQLite decides whether
//! each statement reads or writes; the proofs the caller's scope checks
//! hand out decide whether it may.
//!
//! The std library's JSON is written here: statements as a bare string or
//! `{sql, args}`, values as JSON (a blob as `{"base64": ...}`), results as
//! `{columns, columnTypes, rows, rowsAffected, lastInsertRowid}`.
//!
//! In a cluster a call runs on the user's home node (`sqlite_home.rs`):
//! here when this node is the home, else forwarded, as the caller sent it.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use valet_core::Scope;
use valet_store::{BatchMode, HomeFence, SqlError, SqlResult, SqlValue, StatementAccess};

use crate::{ApiError, AppState, Caller, SqliteCaller};

/// A statement as the std library sends it: a bare string or `{sql,
/// args}`. (Named like the store's statement because serde quotes the
/// name to a client whose statement matches neither form.) Serialized
/// again only to forward it to the user's home node.
#[derive(Deserialize, Serialize, Clone)]
#[serde(untagged)]
enum SqlStatement {
    Text(String),
    WithArgs {
        sql: String,
        #[serde(default, skip_serializing_if = "SqlArgs::is_none")]
        args: SqlArgs,
    },
}

/// Arguments, positional (`?`) or named (`:name`).
#[derive(Deserialize, Serialize, Default, Clone)]
#[serde(untagged)]
enum SqlArgs {
    #[default]
    None,
    Positional(Vec<serde_json::Value>),
    Named(BTreeMap<String, serde_json::Value>),
}

impl SqlArgs {
    fn is_none(&self) -> bool {
        matches!(self, SqlArgs::None)
    }
}

/// Batch transaction modes of the libsql client.
#[derive(Deserialize, Serialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ModeBody {
    #[default]
    Write,
    Read,
    Deferred,
}

impl From<ModeBody> for BatchMode {
    fn from(mode: ModeBody) -> BatchMode {
        match mode {
            ModeBody::Write => BatchMode::Write,
            ModeBody::Read => BatchMode::Read,
            ModeBody::Deferred => BatchMode::Deferred,
        }
    }
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    statement: SqlStatement,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    statements: Vec<SqlStatement>,
    #[serde(default)]
    mode: ModeBody,
}

/// A JSON argument as a SQLite value: booleans are 0 and 1, a number
/// that is not an integer is a real, `{"base64": ...}` is a blob.
fn argument(v: &serde_json::Value) -> Result<SqlValue, SqlError> {
    Ok(match v {
        serde_json::Value::Null => SqlValue::Null,
        serde_json::Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => SqlValue::Text(s.clone()),
        serde_json::Value::Object(o) if o.len() == 1 && o.contains_key("base64") => {
            let text = o.get("base64").and_then(|b| b.as_str()).unwrap_or_default();
            SqlValue::Blob(
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

impl SqlStatement {
    /// The statement for the store, its arguments as SQLite values.
    fn into_statement(self) -> Result<valet_store::SqlStatement, SqlError> {
        use valet_store::SqlArgs as Args;
        Ok(match self {
            SqlStatement::Text(sql) => valet_store::SqlStatement::Text(sql),
            SqlStatement::WithArgs { sql, args } => valet_store::SqlStatement::WithArgs {
                sql,
                args: match args {
                    SqlArgs::None => Args::None,
                    SqlArgs::Positional(values) => {
                        Args::Positional(values.iter().map(argument).collect::<Result<_, _>>()?)
                    }
                    SqlArgs::Named(map) => Args::Named(
                        map.iter()
                            .map(|(name, v)| Ok((name.clone(), argument(v)?)))
                            .collect::<Result<_, SqlError>>()?,
                    ),
                },
            },
        })
    }
}

/// A value read from a row, as JSON: a real that JSON cannot hold (NaN,
/// infinity) is `null`, a blob is `{"base64": ...}`.
struct ValueJson<'a>(&'a SqlValue);

impl Serialize for ValueJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            SqlValue::Null => s.serialize_unit(),
            SqlValue::Integer(i) => s.serialize_i64(*i),
            SqlValue::Real(f) if f.is_finite() => s.serialize_f64(*f),
            SqlValue::Real(_) => s.serialize_unit(),
            SqlValue::Text(t) => s.serialize_str(t),
            SqlValue::Blob(b) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(
                    "base64",
                    &base64::engine::general_purpose::STANDARD.encode(b),
                )?;
                map.end()
            }
        }
    }
}

/// A row as a JSON array of values.
struct RowJson<'a>(&'a [SqlValue]);

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(ValueJson))
    }
}

/// Rows as a JSON array of rows.
struct RowsJson<'a>(&'a [Vec<SqlValue>]);

impl Serialize for RowsJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|row| RowJson(row)))
    }
}

/// The libsql result shape the hosted std returns.
#[derive(Serialize)]
struct ResultJson<'a> {
    columns: &'a [String],
    #[serde(rename = "columnTypes")]
    column_types: &'a [String],
    rows: RowsJson<'a>,
    #[serde(rename = "rowsAffected")]
    rows_affected: u64,
    #[serde(rename = "lastInsertRowid")]
    last_insert_rowid: Option<i64>,
}

impl<'a> From<&'a SqlResult> for ResultJson<'a> {
    fn from(r: &'a SqlResult) -> ResultJson<'a> {
        ResultJson {
            columns: &r.columns,
            column_types: &r.column_types,
            rows: RowsJson(&r.rows),
            rows_affected: r.rows_affected,
            last_insert_rowid: r.last_insert_rowid,
        }
    }
}

/// Rows as the API shows them, for the conformance runner's comparisons.
pub fn sql_rows_json(rows: &[Vec<SqlValue>]) -> serde_json::Value {
    serde_json::to_value(RowsJson(rows)).unwrap_or_default()
}

/// A sqlite call: what the caller sent to one of the two routes.
#[derive(Clone)]
pub(crate) enum Call {
    Execute(ExecuteBody),
    Batch(BatchBody),
}

impl Call {
    /// The route's last segment: `execute` or `batch`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Call::Execute(_) => "execute",
            Call::Batch(_) => "batch",
        }
    }

    /// The public route, as the audit log names it.
    pub(crate) fn route(&self) -> &'static str {
        match self {
            Call::Execute(_) => "POST /v1/sqlite/execute",
            Call::Batch(_) => "POST /v1/sqlite/batch",
        }
    }

    /// The body as the caller sent it (parsed), for a forward.
    pub(crate) fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Call::Execute(body) => serde_json::to_value(body),
            Call::Batch(body) => serde_json::to_value(body),
        }
    }

    /// The call a forward carries.
    pub(crate) fn from_json(name: &str, body: serde_json::Value) -> Result<Call, ApiError> {
        let invalid = |e: serde_json::Error| {
            ApiError::bad_request(format!("a forward's request does not parse: {e}"))
        };
        match name {
            "execute" => Ok(Call::Execute(
                serde_json::from_value(body).map_err(invalid)?,
            )),
            "batch" => Ok(Call::Batch(serde_json::from_value(body).map_err(invalid)?)),
            other => Err(ApiError::bad_request(format!("no sqlite call '{other}'"))),
        }
    }

    /// The statements for the store, and the transaction mode.
    pub(crate) fn into_statements(
        self,
    ) -> Result<(Vec<valet_store::SqlStatement>, BatchMode), SqlError> {
        let (statements, mode) = match self {
            Call::Execute(body) => (vec![body.statement], BatchMode::Deferred),
            Call::Batch(body) => (body.statements, body.mode.into()),
        };
        let statements = statements
            .into_iter()
            .map(SqlStatement::into_statement)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((statements, mode))
    }

    /// The answer: one result for `execute`, all of them for `batch`.
    pub(crate) fn respond(&self, results: &[SqlResult]) -> Result<Response, ApiError> {
        respond(matches!(self, Call::Execute(_)), results)
    }
}

/// One result (`execute`) or all of them (`batch`), as JSON.
fn respond(one: bool, results: &[SqlResult]) -> Result<Response, ApiError> {
    if one {
        let result = results
            .first()
            .ok_or_else(|| ApiError::internal("empty result"))?;
        Ok(Json(ResultJson::from(result)).into_response())
    } else {
        Ok(Json(results.iter().map(ResultJson::from).collect::<Vec<_>>()).into_response())
    }
}

/// Runs statements on this node's copy of the caller's database (under
/// `fence` when this node is the user's home in a cluster). The grants
/// come back with the result, for a refusal or a retry.
pub(crate) async fn run(
    state: AppState,
    mut grants: SqliteCaller,
    statements: Vec<valet_store::SqlStatement>,
    mode: BatchMode,
    fence: Option<HomeFence>,
) -> Result<(Result<Vec<SqlResult>, SqlError>, SqliteCaller), ApiError> {
    // The store asks `grants` for a proof of each access as SQLite
    // classifies the statements; each proof it gets is audited then.
    tokio::task::spawn_blocking(move || {
        let dbs = state.store.user_dbs();
        let result = match fence {
            None => dbs.execute(&mut grants, &statements, mode),
            Some(fence) => dbs.execute_fenced(&mut grants, &statements, mode, fence),
        };
        (result.map(|(results, _)| results), grants)
    })
    .await
    .map_err(ApiError::internal)
}

/// The answer to a failed call: a missing access is the caller's 403 (and,
/// for a run, a scope request its owner can allow).
pub(crate) fn refusal(grants: &SqliteCaller, e: SqlError) -> ApiError {
    match e {
        SqlError::Forbidden(access) => grants.refuse(if access == StatementAccess::Write {
            Scope::SQLITE_WRITE
        } else {
            Scope::SQLITE_READ
        }),
        e => e.into(),
    }
}

/// Runs a call here (one machine) or on the user's home node (a cluster).
async fn answer(state: AppState, grants: SqliteCaller, call: Call) -> Result<Response, ApiError> {
    if state.sqlite_cluster.is_some() {
        return super::sqlite_home::through_home(state, grants, call).await;
    }
    let one = matches!(call, Call::Execute(_));
    let (statements, mode) = call.into_statements()?;
    let (result, grants) = run(state, grants, statements, mode, None).await?;
    match result {
        Ok(results) => respond(one, &results),
        Err(e) => Err(refusal(&grants, e)),
    }
}

pub async fn execute(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<ExecuteBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let grants = caller.require_sqlite()?;
    let body = super::json_body(body)?;
    answer(state, grants, Call::Execute(body)).await
}

pub async fn batch(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<BatchBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let grants = caller.require_sqlite()?;
    let body = super::json_body(body)?;
    answer(state, grants, Call::Batch(body)).await
}
