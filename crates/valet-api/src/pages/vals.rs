//! `/vals/{val}/settings`: a val's scopes, env, timeout, schedule, recent
//! runs, the scope requests its runs left, and a least-privilege hint.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use valet_core::grant::{ValRead, ValWrite};
use valet_core::{Granted, Schedule, Scope, ScopeSet};
use valet_store::{ScopeRequestState, Store, StoreError, Val, ValKind, ValPatch};

use super::layout::page;
use super::scopes_form::{self, field};
use super::session::{CheckedForm, PageUser};
use crate::AppState;

/// How many recent runs the least-privilege hint looks at.
const HINT_RUNS: usize = 10;

/// A val of this user, by id or by name; anyone else's is "not found".
fn find(store: &Store, grant: &Granted<ValRead>, key: &str) -> Result<Val, StoreError> {
    if let Ok(val) = store.val_of_user(grant, key) {
        return Ok(val);
    }
    store
        .val_named(grant, key)?
        .ok_or_else(|| StoreError::NotFound(format!("val '{key}'")))
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        page(
            "Not found",
            None,
            html! { h1 { "No such val" } p { a href="/vals" { "Your vals" } } },
        ),
    )
        .into_response()
}

pub async fn index(State(state): State<AppState>, user: PageUser) -> Response {
    let grant = user.grant::<ValRead>();
    let vals = state
        .store
        .call(move |s| s.list_vals(&grant))
        .await
        .unwrap_or_default();
    let body = html! {
        h1 { "Vals" }
        section {
            @if vals.is_empty() { p.muted { "No vals yet. Create one with " code { "valet val create" } "." } }
            ul { @for v in &vals { li { a href=(format!("/vals/{}/settings", v.name)) { (v.name) } " " span.muted { (v.kind.as_str()) } } } }
        }
    };
    page("Vals", Some((&user.user, &user.csrf)), body).into_response()
}

struct Details {
    val: Val,
    runs: Vec<valet_store::RunRecord>,
    requests: Vec<valet_store::ScopeRequest>,
    unused: ScopeSet,
}

fn details(store: &Store, grant: &Granted<ValRead>, key: &str) -> Result<Details, StoreError> {
    let val = find(store, grant, key)?;
    let runs = store.runs_of_val(grant, &val.id, 20)?;
    let requests = store.scope_requests(grant, &val.id)?;
    let recent: Vec<String> = runs.iter().take(HINT_RUNS).map(|r| r.id.clone()).collect();
    let unused = if recent.is_empty() {
        ScopeSet::EMPTY
    } else {
        val.scopes.minus(store.scopes_used_by_runs(&recent)?)
    };
    Ok(Details {
        val,
        runs,
        requests,
        unused,
    })
}

async fn render(state: &AppState, user: &PageUser, key: String, error: Option<String>) -> Response {
    let grant = user.grant::<ValRead>();
    let d = match state.store.call(move |s| details(s, &grant, &key)).await {
        Ok(d) => d,
        Err(StoreError::NotFound(_)) => return not_found(),
        Err(e) => return crate::ApiError::from(e).into_response(),
    };
    let csrf = &user.csrf;
    let v = &d.val;
    let base = format!("/vals/{}", v.name);
    let pending: Vec<_> = d
        .requests
        .iter()
        .filter(|r| r.state == ScopeRequestState::Pending)
        .collect();
    let body = html! {
        h1 { "Val " code { (v.name) } " " span.muted { "(" (v.kind.as_str()) ")" } }
        @if let Some(e) = &error { p.notice role="alert" { (e) } }
        @if !pending.is_empty() {
            section #scope-requests {
                h2 { "Permission requests" }
                @for r in &pending {
                    div.notice data-scope=(r.scope.to_string()) {
                        p { "This val asked for " code { (r.scope.to_string()) } " — refused " (r.count) " time(s), last at " (seconds(r.last_at)) " on " code { (r.sample_route) } "."
                            @if r.scope.is_risky() { " " span.risky { "⚠ lets this val change code or credentials." } } }
                        form method="post" action=(format!("{base}/scope-requests/{}/allow", r.scope)) class="inline" {
                            input type="hidden" name="csrf" value=(csrf);
                            button.primary type="submit" { "Allow" }
                        }
                        " "
                        form method="post" action=(format!("{base}/scope-requests/{}/deny", r.scope)) class="inline" {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Deny" }
                        }
                    }
                }
            }
        }
        @if !d.unused.is_empty() {
            section #least-privilege {
                h2 { "Unused permissions" }
                p { "The last " (d.runs.len().min(HINT_RUNS)) " runs did not use: " (scopes_form::chips(d.unused)) }
                form method="post" action=(format!("{base}/remove-unused")) {
                    input type="hidden" name="csrf" value=(csrf);
                    button type="submit" { "Remove unused" }
                }
            }
        }
        form method="post" action=(format!("{base}/settings")) {
            input type="hidden" name="csrf" value=(csrf);
            section {
                h2 { "Permissions of its runs" }
                p.muted { "Each run gets a valet key with exactly these scopes." }
                (scopes_form::control(v.scopes))
            }
            section {
                h2 { "Environment variables" }
                p.muted { "Values are write-only: leave a value blank to keep it, tick to remove." }
                div.scroll { table {
                    thead { tr { th { "Name" } th { "Value" } th { "New value" } th { "Remove" } } }
                    tbody {
                        @for (name, value) in &v.env {
                            tr {
                                td { code { (name) } }
                                td { code { (mask(value)) } }
                                td { input type="text" name=(format!("env_value_{name}")) aria-label=(format!("new value for {name}")); }
                                td { input type="checkbox" name=(format!("env_remove_{name}")) aria-label=(format!("remove {name}")); }
                            }
                        }
                        tr {
                            td { input type="text" name="env_new_name" placeholder="NEW_NAME" aria-label="new variable name"; }
                            td {}
                            td { input type="text" name="env_new_value" aria-label="new variable value"; }
                            td {}
                        }
                    }
                } }
            }
            section class="grid" {
                h2 { "Limits" }
                label for="timeout" { "Timeout (seconds)" }
                input #timeout type="number" name="timeout_s" min="1" max="900" value=(v.timeout_ms / 1000);
                @if v.kind == ValKind::Cron {
                    label for="schedule" { "Schedule (cron)" }
                    input #schedule type="text" name="schedule" value=(v.schedule.as_ref().map(Schedule::as_str).unwrap_or_default());
                }
            }
            p { button.primary type="submit" { "Save settings" } }
        }
        section #runs {
            h2 { "Recent runs" }
            @if d.runs.is_empty() { p.muted { "No runs yet." } }
            @for r in &d.runs {
                details {
                    summary { (seconds(r.started_at)) " — "
                        strong.run-outcome { (r.outcome.as_str()) } " (" (r.trigger) ")"
                        @if let Some(ms) = r.duration_ms { " " (ms) " ms" } }
                    pre { (r.logs) }
                }
            }
        }
    };
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (
        status,
        page(
            &format!("{} settings", v.name),
            Some((&user.user, csrf)),
            body,
        ),
    )
        .into_response()
}

/// `2026-11-29 05:46:58`: a time to the second, in UTC.
fn seconds(ms: i64) -> String {
    valet_store::time::iso(ms)
        .replace('T', " ")
        .chars()
        .take(19)
        .collect()
}

fn mask(value: &str) -> String {
    let n = value.chars().count();
    if n <= 4 {
        "••••".into()
    } else {
        format!("••••{}", value.chars().skip(n - 2).collect::<String>())
    }
}

pub async fn settings_page(
    State(state): State<AppState>,
    user: PageUser,
    Path(key): Path<String>,
) -> Response {
    render(&state, &user, key, None).await
}

pub async fn update(
    State(state): State<AppState>,
    Path(key): Path<String>,
    CheckedForm { user, fields }: CheckedForm,
) -> Response {
    let scopes = match scopes_form::parse(&fields) {
        Ok(s) => s,
        Err(e) => return render(&state, &user, key, Some(e)).await,
    };
    let (read, write, cover) = (
        user.grant::<ValRead>(),
        user.grant::<ValWrite>(),
        user.grant_all(),
    );
    let k = key.clone();
    let result = state
        .store
        .call(move |s| {
            let val = find(s, &read, &k)?;
            let mut env: BTreeMap<String, String> = val.env.clone();
            for name in val.env.keys() {
                if !field(&fields, &format!("env_remove_{name}")).is_empty() {
                    env.remove(name);
                } else {
                    let new = field(&fields, &format!("env_value_{name}"));
                    if !new.is_empty() {
                        env.insert(name.clone(), new.to_owned());
                    }
                }
            }
            let new_name = field(&fields, "env_new_name").trim();
            if !new_name.is_empty() {
                env.insert(
                    new_name.to_owned(),
                    field(&fields, "env_new_value").to_owned(),
                );
            }
            let timeout_ms = field(&fields, "timeout_s").parse::<i64>().map_err(|_| {
                StoreError::Invalid("the timeout must be a whole number of seconds".into())
            })? * 1000;
            let schedule = if val.kind == ValKind::Cron {
                let text = field(&fields, "schedule").trim();
                let schedule =
                    Schedule::parse(text).map_err(|e| StoreError::Invalid(e.to_string()))?;
                Some(Some(schedule))
            } else {
                None
            };
            s.update_val(
                &write,
                &cover,
                &val.id,
                ValPatch {
                    scopes: Some(scopes),
                    env: Some(env),
                    timeout_ms: Some(timeout_ms),
                    schedule,
                    ..Default::default()
                },
            )
        })
        .await;
    match result {
        Ok(val) => Redirect::to(&format!("/vals/{}/settings", val.name)).into_response(),
        Err(StoreError::NotFound(_)) => not_found(),
        Err(e) => render(&state, &user, key, Some(e.to_string())).await,
    }
}

pub async fn decide(
    State(state): State<AppState>,
    Path((key, scope, decision)): Path<(String, String, String)>,
    CheckedForm { user, .. }: CheckedForm,
) -> Response {
    let Ok(scope) = scope.parse::<Scope>() else {
        return not_found();
    };
    let allow = match decision.as_str() {
        "allow" => true,
        "deny" => false,
        _ => return not_found(),
    };
    let (read, write, cover) = (
        user.grant::<ValRead>(),
        user.grant::<ValWrite>(),
        user.grant_all(),
    );
    let result = state
        .store
        .call(move |s| {
            let val = find(s, &read, &key)?;
            s.decide_scope_request(&write, &cover, &val.id, scope, allow)?;
            Ok(val.name)
        })
        .await;
    match result {
        Ok(name) => Redirect::to(&format!("/vals/{name}/settings")).into_response(),
        Err(_) => not_found(),
    }
}

pub async fn remove_unused(
    State(state): State<AppState>,
    Path(key): Path<String>,
    CheckedForm { user, .. }: CheckedForm,
) -> Response {
    let (read, write, cover) = (
        user.grant::<ValRead>(),
        user.grant::<ValWrite>(),
        user.grant_all(),
    );
    let result = state
        .store
        .call(move |s| {
            let d = details(s, &read, &key)?;
            s.update_val(
                &write,
                &cover,
                &d.val.id,
                ValPatch {
                    scopes: Some(d.val.scopes.minus(d.unused)),
                    ..Default::default()
                },
            )
        })
        .await;
    match result {
        Ok(val) => Redirect::to(&format!("/vals/{}/settings", val.name)).into_response(),
        Err(_) => not_found(),
    }
}
