//! `std/sqlite` routes on the caller's own database. SQLite decides whether
//! each statement reads or writes; the proofs the caller's scope checks
//! hand out decide whether it may.
//!
//! The std library's JSON is written here: statements as a bare string or
//! `{sql, args}`, values as JSON (a blob as `{"base64": ...}`), results as
//! `{columns, columnTypes, rows, rowsAffected, lastInsertRowid}`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use valet_core::Scope;
use valet_store::{BatchMode, SqlError, SqlResult, SqlValue, StatementAccess};

use crate::{ApiError, AppState, Caller, SqliteCaller};

/// A statement as the std library sends it: a bare string or `{sql,
/// args}`. (Named like the store's statement because serde quotes the
/// name to a client whose statement matches neither form.)
#[derive(Deserialize)]
#[serde(untagged)]
enum SqlStatement {
    Text(String),
    WithArgs {
        sql: String,
        #[serde(default)]
        args: SqlArgs,
    },
}

/// Arguments, positional (`?`) or named (`:name`).
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum SqlArgs {
    #[default]
    None,
    Positional(Vec<serde_json::Value>),
    Named(BTreeMap<String, serde_json::Value>),
}

/// Batch transaction modes of the libsql client.
#[derive(Deserialize, Default, Clone, Copy)]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBody {
    statement: SqlStatement,
}

#[derive(Deserialize)]
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

async fn run(
    state: AppState,
    mut grants: SqliteCaller,
    statements: Vec<SqlStatement>,
    mode: BatchMode,
) -> Result<Vec<SqlResult>, ApiError> {
    // The store asks `grants` for a proof of each access as SQLite
    // classifies the statements; each proof it gets is audited then.
    let (result, grants) = tokio::task::spawn_blocking(move || {
        let result = statements
            .into_iter()
            .map(SqlStatement::into_statement)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|statements| {
                state
                    .store
                    .user_dbs()
                    .execute(&mut grants, &statements, mode)
            });
        (result, grants)
    })
    .await
    .map_err(ApiError::internal)?;
    match result {
        Ok((results, _)) => Ok(results),
        Err(SqlError::Forbidden(access)) => {
            Err(grants.refuse(if access == StatementAccess::Write {
                Scope::SQLITE_WRITE
            } else {
                Scope::SQLITE_READ
            }))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn execute(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<ExecuteBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let grants = caller.require_sqlite()?;
    let body = super::json_body(body)?;
    let results = run(state, grants, vec![body.statement], BatchMode::Deferred).await?;
    let result = results
        .first()
        .ok_or_else(|| ApiError::internal("empty result"))?;
    Ok(Json(ResultJson::from(result)).into_response())
}

pub async fn batch(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<BatchBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let grants = caller.require_sqlite()?;
    let body = super::json_body(body)?;
    let results = run(state, grants, body.statements, body.mode.into()).await?;
    Ok(Json(results.iter().map(ResultJson::from).collect::<Vec<_>>()).into_response())
}
