//! Vals: a user's code, its kind, and the scopes and env its runs get.

use std::collections::BTreeMap;

use valet_core::grant::{ValRead, ValScope, ValWrite};
use valet_core::{Granted, GrantedSet, Schedule, ScopeSet};

use crate::sql::{Row, args};
use crate::{Store, StoreError, new_id, time};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValKind {
    Http,
    Script,
    Cron,
}

impl ValKind {
    /// The word stored in the `kind` column (and shown by the API).
    pub fn as_str(self) -> &'static str {
        match self {
            ValKind::Http => "http",
            ValKind::Script => "script",
            ValKind::Cron => "cron",
        }
    }

    pub fn parse(s: &str) -> Result<ValKind, StoreError> {
        match s {
            "http" => Ok(ValKind::Http),
            "script" => Ok(ValKind::Script),
            "cron" => Ok(ValKind::Cron),
            _ => Err(StoreError::Invalid(format!(
                "invalid val type '{s}': use http, script or cron"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Val {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub kind: ValKind,
    pub code: String,
    pub scopes: ScopeSet,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: i64,
    /// When a cron val runs; a cron val always has one.
    pub schedule: Option<Schedule>,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_run_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct NewVal {
    pub name: String,
    pub kind: ValKind,
    pub code: String,
    pub scopes: ScopeSet,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: i64,
    pub schedule: Option<Schedule>,
}

/// A partial update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ValPatch {
    pub name: Option<String>,
    pub kind: Option<ValKind>,
    pub code: Option<String>,
    pub scopes: Option<ScopeSet>,
    pub env: Option<BTreeMap<String, String>>,
    pub timeout_ms: Option<i64>,
    /// `Some(None)` removes the schedule.
    pub schedule: Option<Option<Schedule>>,
}

impl ValPatch {
    /// Whether the patch changes what the val's runs execute: its code,
    /// its env (which code reads) or its type (which decides how the code
    /// is called).
    pub fn changes_what_runs(&self) -> bool {
        self.code.is_some() || self.env.is_some() || self.kind.is_some()
    }

    fn apply(self, val: &mut Val) {
        if let Some(name) = self.name {
            val.name = name;
        }
        if let Some(kind) = self.kind {
            val.kind = kind;
        }
        if let Some(code) = self.code {
            val.code = code;
        }
        if let Some(scopes) = self.scopes {
            val.scopes = scopes;
        }
        if let Some(env) = self.env {
            val.env = env;
        }
        if let Some(timeout) = self.timeout_ms {
            val.timeout_ms = timeout;
        }
        if let Some(schedule) = self.schedule {
            val.schedule = schedule;
        }
    }
}

/// Refuses a change that would hand the val's runs (or its code) power
/// that `cover` does not prove.
fn check_cover(user_id: &str, cover: &GrantedSet, needed: ScopeSet) -> Result<(), StoreError> {
    if cover.user_id() != user_id {
        return Err(StoreError::Invalid(
            "the scope proof is for another user".into(),
        ));
    }
    match needed.minus(cover.scopes()).iter().next() {
        None => Ok(()),
        Some(missing) => Err(StoreError::ScopeNotHeld(missing)),
    }
}

pub const MAX_TIMEOUT_MS: i64 = 15 * 60 * 1000;
pub const MAX_CODE_BYTES: usize = 1 << 20;

/// Names the runtime sets itself; a val's env cannot override them.
pub const RESERVED_ENV: &[&str] = &["valtown", "VAL_TOWN_API_KEY", "VALTOWN_API_URL"];

pub fn validate_val_name(name: &str) -> Result<(), StoreError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphabetic();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid val name '{name}': use 1-64 letters, digits, '-' or '_', starting with a letter"
        )))
    }
}

pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), StoreError> {
    for (name, value) in env {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !ok {
            return Err(StoreError::Invalid(format!(
                "invalid env var name '{name}': use letters, digits and '_', not starting with a digit"
            )));
        }
        if RESERVED_ENV.contains(&name.as_str()) || name.starts_with("DENO_") {
            return Err(StoreError::Invalid(format!(
                "env var '{name}' is set by valet itself and cannot be configured"
            )));
        }
        if value.contains('\0') || value.len() > 32 * 1024 {
            return Err(StoreError::Invalid(format!(
                "env var '{name}' has an invalid value"
            )));
        }
    }
    Ok(())
}

fn validate_timeout(ms: i64) -> Result<(), StoreError> {
    if (100..=MAX_TIMEOUT_MS).contains(&ms) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid timeout {ms} ms: use 100 ms to {} minutes",
            MAX_TIMEOUT_MS / 60_000
        )))
    }
}

/// A cron val needs a schedule (other kinds may keep one; it is unused).
fn validate_schedule(kind: ValKind, schedule: Option<&Schedule>) -> Result<(), StoreError> {
    if kind == ValKind::Cron && schedule.is_none() {
        return Err(StoreError::Invalid(
            "a cron val needs a schedule (use cron syntax, e.g. '*/5 * * * *')".into(),
        ));
    }
    Ok(())
}

fn validate_code(code: &str) -> Result<(), StoreError> {
    if code.len() > MAX_CODE_BYTES {
        return Err(StoreError::Invalid(format!(
            "code is larger than {MAX_CODE_BYTES} bytes"
        )));
    }
    Ok(())
}

const COLUMNS: &str = "id, user_id, name, kind, code, scopes, env, timeout_ms, schedule, created_at, updated_at, last_run_at";

/// A stored schedule, parsed once as the row is read. One that no longer
/// parses (kept by an older valet with a laxer parser) reads as none, so
/// the val stays readable and the scheduler skips it until a new schedule
/// is saved.
fn schedule_column(id: &str, text: Option<String>) -> Option<Schedule> {
    let text = text?;
    match Schedule::parse(&text) {
        Ok(schedule) => Some(schedule),
        Err(e) => {
            tracing::warn!(val_id = id, error = %e, "ignoring a stored schedule that does not parse");
            None
        }
    }
}

fn from_row(row: &Row) -> Result<Val, StoreError> {
    let id: String = row.get(0)?;
    let kind: String = row.get(3)?;
    let scopes: String = row.get(5)?;
    let env: String = row.get(6)?;
    let schedule = schedule_column(&id, row.get(8)?);
    Ok(Val {
        id,
        user_id: row.get(1)?,
        name: row.get(2)?,
        kind: ValKind::parse(&kind).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        code: row.get(4)?,
        scopes: ScopeSet::parse(&scopes)?,
        env: serde_json::from_str(&env)
            .map_err(|e| StoreError::Corrupt(format!("a val's env: {e}")))?,
        timeout_ms: row.get(7)?,
        schedule,
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
        last_run_at: row.get(11)?,
    })
}

/// The val in `row`, if there is one.
fn maybe(row: Option<Row>) -> Result<Option<Val>, StoreError> {
    row.as_ref().map(from_row).transpose()
}

impl Store {
    /// Creates a val whose runs get `new.scopes`: `cover` proves that its
    /// maker holds them all.
    pub fn create_val(
        &self,
        grant: &Granted<ValWrite>,
        cover: &GrantedSet,
        new: NewVal,
    ) -> Result<Val, StoreError> {
        let user_id = grant.user_id();
        check_cover(user_id, cover, new.scopes)?;
        validate_val_name(&new.name)?;
        validate_env(&new.env)?;
        validate_timeout(new.timeout_ms)?;
        validate_code(&new.code)?;
        validate_schedule(new.kind, new.schedule.as_ref())?;
        let now = time::now_ms();
        let val = Val {
            id: new_id("val"),
            user_id: user_id.to_owned(),
            name: new.name,
            kind: new.kind,
            code: new.code,
            scopes: new.scopes,
            env: new.env,
            timeout_ms: new.timeout_ms,
            schedule: new.schedule,
            created_at: now,
            updated_at: now,
            last_run_at: None,
        };
        let env =
            serde_json::to_string(&val.env).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.db_write(|sql| {
            let n = sql.execute(
                "INSERT INTO vals (id, user_id, name, kind, code, scopes, env, timeout_ms, schedule, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10) ON CONFLICT(user_id, name) DO NOTHING",
                args![val.id, val.user_id, val.name, val.kind.as_str(), val.code, val.scopes.to_claim(), env, val.timeout_ms, val.schedule.as_ref().map(Schedule::as_str), now],
            )?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("a val named '{}' already exists", val.name)));
            }
            Ok(())
        })?;
        Ok(val)
    }

    /// A val of the grant's user; another user's val is "not found", never
    /// "forbidden".
    pub fn val_of_user<S: ValScope>(
        &self,
        grant: &Granted<S>,
        id: &str,
    ) -> Result<Val, StoreError> {
        let user_id = grant.user_id();
        self.db_read(|sql| {
            maybe(sql.query_opt(
                &format!("SELECT {COLUMNS} FROM vals WHERE id = ?1 AND user_id = ?2"),
                args![id, user_id],
            )?)?
            .ok_or_else(|| StoreError::NotFound(format!("val '{id}'")))
        })
    }

    /// A val by its owner and name, for the public http route (which acts
    /// for no caller) and the supervisor.
    pub fn val_by_name(&self, user_id: &str, name: &str) -> Result<Option<Val>, StoreError> {
        self.db_read(|sql| {
            maybe(sql.query_opt(
                &format!("SELECT {COLUMNS} FROM vals WHERE user_id = ?1 AND name = ?2"),
                args![user_id, name],
            )?)
        })
    }

    /// The val `name` of the user named `username`, as an http request
    /// names it: from memory when it was read less than a second ago and
    /// nothing changed since (see `val_cache.rs`).
    pub fn val_by_names(&self, username: &str, name: &str) -> Result<Option<Val>, StoreError> {
        if let Some(val) = self.cached_val(username, name) {
            return Ok(Some(val));
        }
        let generation = self.val_cache().generation();
        let Some(user) = self.user_by_name(username)? else {
            return Ok(None);
        };
        let val = self.val_by_name(&user.id, name)?;
        if let Some(val) = &val {
            self.val_cache().put(username, val, generation);
        }
        Ok(val)
    }

    /// The val as [`Store::val_by_names`] has it in memory, without a read.
    pub fn cached_val(&self, username: &str, name: &str) -> Option<Val> {
        self.val_cache().get(username, name)
    }

    pub fn val_by_id(&self, id: &str) -> Result<Option<Val>, StoreError> {
        self.db_read(|sql| {
            maybe(sql.query_opt(
                &format!("SELECT {COLUMNS} FROM vals WHERE id = ?1"),
                args![id],
            )?)
        })
    }

    /// A val of the grant's user by name.
    pub fn val_named(
        &self,
        grant: &Granted<ValRead>,
        name: &str,
    ) -> Result<Option<Val>, StoreError> {
        self.val_by_name(grant.user_id(), name)
    }

    pub fn list_vals(&self, grant: &Granted<ValRead>) -> Result<Vec<Val>, StoreError> {
        let user_id = grant.user_id();
        self.db_read(|sql| {
            sql.query_map(
                &format!("SELECT {COLUMNS} FROM vals WHERE user_id = ?1 ORDER BY name"),
                args![user_id],
                from_row,
            )
        })
    }

    /// Every cron val with a schedule, for the scheduler.
    pub fn cron_vals(&self) -> Result<Vec<Val>, StoreError> {
        self.db_read(|sql| {
            sql.query_map(
                &format!("SELECT {COLUMNS} FROM vals WHERE kind = 'cron' AND schedule IS NOT NULL"),
                args![],
                from_row,
            )
        })
    }

    /// Changes a val. `cover` proves what the caller holds: new scopes need
    /// all of them, and a change to what the val's runs execute (code, env,
    /// type) needs every scope the runs hold, so no one changes code that
    /// runs with more power than they have. The read and the write are one
    /// immediate transaction, so a concurrent edit (another patch, an
    /// allowed scope request) is never overwritten with a stale copy, and
    /// the cover is checked against the val as it is when written.
    pub fn update_val(
        &self,
        grant: &Granted<ValWrite>,
        cover: &GrantedSet,
        id: &str,
        patch: ValPatch,
    ) -> Result<Val, StoreError> {
        let user_id = grant.user_id();
        if let Some(name) = &patch.name {
            validate_val_name(name)?;
        }
        if let Some(code) = &patch.code {
            validate_code(code)?;
        }
        if let Some(env) = &patch.env {
            validate_env(env)?;
        }
        if let Some(timeout) = patch.timeout_ms {
            validate_timeout(timeout)?;
        }
        if let Some(scopes) = patch.scopes {
            check_cover(user_id, cover, scopes)?;
        }
        let changes_what_runs = patch.changes_what_runs();
        self.db_write(|sql| {
            let lock = sql.for_update();
            let mut val = maybe(sql.query_opt(
                &format!("SELECT {COLUMNS} FROM vals WHERE id = ?1 AND user_id = ?2{lock}"),
                args![id, user_id],
            )?)?
            .ok_or_else(|| StoreError::NotFound(format!("val '{id}'")))?;
            if changes_what_runs {
                check_cover(user_id, cover, val.scopes)?;
            }
            patch.apply(&mut val);
            validate_schedule(val.kind, val.schedule.as_ref())?;
            val.updated_at = time::now_ms();
            let env =
                serde_json::to_string(&val.env).map_err(|e| StoreError::Invalid(e.to_string()))?;
            let n = sql.execute(
                "UPDATE vals SET name = ?1, kind = ?2, code = ?3, scopes = ?4, env = ?5, timeout_ms = ?6,
                     schedule = ?7, updated_at = ?8 WHERE id = ?9 AND user_id = ?10",
                args![val.name, val.kind.as_str(), val.code, val.scopes.to_claim(), env, val.timeout_ms, val.schedule.as_ref().map(Schedule::as_str), val.updated_at, id, user_id],
            );
            match n {
                Ok(0) => Err(StoreError::NotFound(format!("val '{id}'"))),
                Ok(_) => Ok(val),
                Err(e) if e.is_constraint_violation() => Err(StoreError::Conflict(format!(
                    "a val named '{}' already exists",
                    val.name
                ))),
                Err(e) => Err(e),
            }
        })
    }

    pub fn delete_val(&self, grant: &Granted<ValWrite>, id: &str) -> Result<(), StoreError> {
        let user_id = grant.user_id();
        self.db_write(|sql| {
            let n = sql.execute(
                "DELETE FROM vals WHERE id = ?1 AND user_id = ?2",
                args![id, user_id],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("val '{id}'")));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use valet_core::{Granted, GrantedSet, Schedule, Scope, ScopeSet};

    use super::*;

    fn new_val(name: &str, kind: ValKind, schedule: Option<&str>) -> NewVal {
        NewVal {
            name: name.into(),
            kind,
            code: String::new(),
            scopes: ScopeSet::EMPTY,
            env: BTreeMap::new(),
            timeout_ms: 1000,
            schedule: schedule.map(|s| Schedule::parse(s).expect("schedule")),
        }
    }

    /// Issue #11, item 8: the schedule is stored as a parsed `Schedule`,
    /// and "a cron val needs a schedule" is the store's rule, whoever
    /// creates or changes the val.
    #[test]
    fn a_cron_val_always_has_a_schedule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let user = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        let write = Granted::<ValWrite>::for_operator(&user.id);
        let cover = GrantedSet::for_operator(&user.id, ScopeSet::all());
        let needs = |e: StoreError| e.to_string().contains("a cron val needs a schedule");
        let err = store
            .create_val(&write, &cover, new_val("c", ValKind::Cron, None))
            .expect_err("no schedule");
        assert!(needs(err));
        let cron = store
            .create_val(
                &write,
                &cover,
                new_val("c", ValKind::Cron, Some("*/5 * * * *")),
            )
            .expect("cron");
        assert_eq!(
            cron.schedule.as_ref().map(Schedule::as_str),
            Some("*/5 * * * *")
        );
        let clear = ValPatch {
            schedule: Some(None),
            ..ValPatch::default()
        };
        let err = store
            .update_val(&write, &cover, &cron.id, clear.clone())
            .expect_err("cleared");
        assert!(needs(err));
        let script = store
            .create_val(&write, &cover, new_val("s", ValKind::Script, None))
            .expect("script");
        let to_cron = ValPatch {
            kind: Some(ValKind::Cron),
            ..ValPatch::default()
        };
        assert!(needs(
            store
                .update_val(&write, &cover, &script.id, to_cron)
                .expect_err("cron without a schedule")
        ));
        // Clearing it with a change of type at once is fine.
        let changed = store
            .update_val(
                &write,
                &cover,
                &cron.id,
                ValPatch {
                    kind: Some(ValKind::Script),
                    ..clear
                },
            )
            .expect("script without a schedule");
        assert!(changed.schedule.is_none());
    }

    /// A schedule stored by an older, laxer parser reads as none: the val
    /// stays readable, and the scheduler skips it.
    #[test]
    fn a_stored_schedule_that_no_longer_parses_reads_as_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let user = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        let write = Granted::<ValWrite>::for_operator(&user.id);
        let cover = GrantedSet::for_operator(&user.id, ScopeSet::all());
        let val = store
            .create_val(
                &write,
                &cover,
                new_val("c", ValKind::Cron, Some("* * * * *")),
            )
            .expect("cron");
        store
            .write(|c| {
                c.execute(
                    "UPDATE vals SET schedule = '*/0 * * * *' WHERE id = ?1",
                    [&val.id],
                )?;
                Ok(())
            })
            .expect("old row");
        let back = store
            .val_of_user(&Granted::<ValRead>::for_operator(&user.id), &val.id)
            .expect("readable");
        assert!(back.schedule.is_none());
        assert!(
            store.cron_vals().expect("cron vals")[0].schedule.is_none(),
            "listed without a schedule, so the scheduler skips it"
        );
    }

    /// Issue #11, item 9: two concurrent edits never silently lose one.
    #[test]
    fn concurrent_edits_of_one_val_are_not_lost() {
        for backend in crate::testing::Backends::all() {
            let store = backend.open();
            let user = store
                .create_user("ada", "ada@example.com", None)
                .expect("user");
            let write = || Granted::<ValWrite>::for_operator(&user.id);
            let cover = || GrantedSet::for_operator(&user.id, ScopeSet::all());
            for round in 0..8 {
                let v = store
                    .create_val(
                        &write(),
                        &cover(),
                        NewVal {
                            name: format!("v{round}"),
                            kind: ValKind::Script,
                            code: String::new(),
                            scopes: ScopeSet::EMPTY,
                            env: BTreeMap::new(),
                            timeout_ms: 1000,
                            schedule: None,
                        },
                    )
                    .expect("val");
                let patcher = |patch: fn(i64) -> ValPatch| {
                    let (store, user_id, id) = (store.clone(), user.id.clone(), v.id.clone());
                    std::thread::spawn(move || {
                        for i in 0..40 {
                            store
                                .update_val(
                                    &Granted::for_operator(&user_id),
                                    &GrantedSet::for_operator(&user_id, ScopeSet::all()),
                                    &id,
                                    patch(i),
                                )
                                .expect("patch");
                        }
                    })
                };
                let editor = patcher(|i| ValPatch {
                    code: Some(format!("// edit {i}")),
                    ..ValPatch::default()
                });
                let timer = patcher(|i| ValPatch {
                    timeout_ms: Some(1000 + i),
                    ..ValPatch::default()
                });
                for scope in Scope::ALL {
                    store
                        .record_scope_request(&v.id, scope, "/v1/test")
                        .expect("request");
                    store
                        .decide_scope_request(&write(), &cover(), &v.id, scope, true)
                        .expect("allow");
                }
                editor.join().expect("editor");
                timer.join().expect("timer");
                let after = store
                    .val_of_user(&Granted::<ValRead>::for_operator(&user.id), &v.id)
                    .expect("val");
                assert_eq!(after.scopes, ScopeSet::all(), "an allowed scope was lost");
                assert_eq!(after.code, "// edit 39");
                assert_eq!(after.timeout_ms, 1039);
            }
        }
    }
}
