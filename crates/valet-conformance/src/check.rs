//! Running one case and checking its expectations.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use valet_store::{
    BatchMode, BlobKey, HeldSqliteGrants, NewVal, OutboxStatus, SqlStatement, Store, ValKind,
};

use super::CaseResult;
use super::case::{Case, EmailCheck, Expect};
use valet_core::grant::ValRead;
use valet_core::{Granted, GrantedSet, Schedule};
use valet_runtime::{RunSpec, Source};
use valet_server::{Host, HostConfig};

const VAL_FILES: &[&str] = &["val.ts", "val.tsx", "val.js"];

/// What a run produced, for the checks.
struct Observed {
    outcome: String,
    logs: String,
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

pub async fn run_case(path: &Path, smtp: Option<String>, cache: PathBuf) -> CaseResult {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let started = Instant::now();
    let (expected, outcome) = match load(path) {
        Ok(case) => {
            let expected = case.expect.outcome.clone();
            (expected, execute(path, &name, case, smtp, cache).await)
        }
        Err(e) => (String::new(), Err(e)),
    };
    let (got, failures) = match outcome {
        Ok((got, failures)) => (got, failures),
        Err(e) => ("error".to_owned(), vec![e]),
    };
    CaseResult {
        name,
        passed: failures.is_empty(),
        expected,
        got,
        failures,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

fn load(path: &Path) -> Result<Case, String> {
    let text =
        std::fs::read_to_string(path.join("case.json")).map_err(|e| format!("case.json: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("case.json is invalid: {e}"))
}

async fn execute(
    path: &Path,
    name: &str,
    case: Case,
    smtp: Option<String>,
    cache: PathBuf,
) -> Result<(String, Vec<String>), String> {
    let val_file = VAL_FILES
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.is_file())
        .ok_or("no val.ts, val.tsx or val.js")?;
    let kind = ValKind::parse(&case.kind).map_err(|e| e.to_string())?;
    let scopes = case.scopes.resolve()?;
    let data = tempdir()?;
    let store = Store::open(&data).map_err(|e| e.to_string())?;
    let user = store
        .create_user("conformance", "conformance@example.com", None)
        .map_err(|e| e.to_string())?;
    store
        .set_tier(&user.id, valet_store::Tier::Pro)
        .map_err(|e| e.to_string())?;
    let val_name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    // A cron val needs a schedule (the store's rule). The scheduler is off
    // here and the runner starts the run itself, so the schedule never fires.
    let schedule = match kind {
        ValKind::Cron => Some(Schedule::parse("@yearly").map_err(|e| e.to_string())?),
        _ => None,
    };
    // The runner acts for the case's user, who holds every scope.
    let val = store
        .create_val(
            &Granted::for_operator(&user.id),
            &GrantedSet::for_operator(&user.id, scopes),
            NewVal {
                name: format!("c-{val_name}"),
                kind,
                code: String::new(),
                scopes,
                env: case.env.clone(),
                timeout_ms: case.timeout_ms as i64,
                schedule,
            },
        )
        .map_err(|e| e.to_string())?;
    for (key, value) in &case.seed.blobs {
        let key = BlobKey::parse(key).map_err(|e| e.to_string())?;
        store
            .blob_put(
                &Granted::for_operator(&user.id),
                &key,
                value.as_bytes(),
                u64::MAX,
            )
            .map_err(|e| e.to_string())?;
    }
    if !case.seed.sql.is_empty() {
        let statements: Vec<SqlStatement> = case
            .seed
            .sql
            .iter()
            .map(|s| SqlStatement::Text(s.clone()))
            .collect();
        let mut grants = HeldSqliteGrants::new(
            Some(Granted::for_operator(&user.id)),
            Some(Granted::for_operator(&user.id)),
        )
        .ok_or("seed sql: no grants")?;
        store
            .user_dbs()
            .execute(&mut grants, &statements, BatchMode::Write)
            .map_err(|e| format!("seed sql: {e}"))?;
    }

    let mut config = HostConfig::new("127.0.0.1:0".parse().map_err(|_| "address")?);
    config.cron = false;
    config.smtp = smtp.clone();
    config.deno_dir = Some(cache);
    let host = Host::start(store.clone(), config)
        .await
        .map_err(|e| e.to_string())?;
    let spec = RunSpec {
        user_id: user.id.clone(),
        val_id: Some(val.id.clone()),
        kind,
        source: Source::File(val_file),
        scopes,
        env: case.env.clone(),
        timeout: Duration::from_millis(case.timeout_ms),
        trigger: "conformance",
        last_run_at: case
            .last_run_at
            .as_deref()
            .and_then(valet_store::time::parse),
    };
    let observed = match kind {
        ValKind::Http => http(&host, &store, &val.id, spec, &case).await,
        _ => match host.supervisor.run(spec).await {
            Ok(out) => Ok(Observed {
                outcome: out.outcome.as_str().to_owned(),
                logs: out.logs,
                status: None,
                headers: Vec::new(),
                body: Vec::new(),
            }),
            Err(e) => Err(e.to_string()),
        },
    };
    let result = match observed {
        Ok(observed) => {
            let failures = check(
                &case.expect,
                &observed,
                &host,
                &store,
                &user.id,
                &val.id,
                smtp.is_some(),
            )
            .await;
            Ok((observed.outcome, failures))
        }
        Err(e) => Err(e),
    };
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&data);
    result
}

fn tempdir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("valet-case-{}", valet_store::new_id("c")));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

async fn http(
    host: &Host,
    store: &Store,
    val_id: &str,
    spec: RunSpec,
    case: &Case,
) -> Result<Observed, String> {
    let user_id = spec.user_id.clone();
    let request = case
        .request
        .as_ref()
        .ok_or("an http case needs a request")?;
    let mut builder = Request::builder()
        .method(request.method.as_str())
        .uri(&request.path)
        .header("host", host.addr.to_string());
    for (k, v) in &request.headers {
        builder = builder.header(k, v);
    }
    let body = match (&request.body, &request.body_base64) {
        (_, Some(b64)) => Body::from(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                .map_err(|e| e.to_string())?,
        ),
        (Some(text), None) => Body::from(text.clone()),
        (None, None) => Body::empty(),
    };
    let request = builder.body(body).map_err(|e| e.to_string())?;
    let response = valet_server::http_response(host.supervisor.serve_http(spec, request).await);
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    // The run ends after the body; wait for its record.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (id, grant) = (val_id.to_owned(), Granted::for_operator(&user_id));
        let runs = store
            .call(move |s| s.runs_of_val(&grant, &id, 1))
            .await
            .map_err(|e| e.to_string())?;
        if let Some(run) = runs
            .first()
            .filter(|r| r.outcome != valet_store::Outcome::Running)
        {
            return Ok(Observed {
                outcome: run.outcome.as_str().to_owned(),
                logs: run.logs.clone(),
                status: Some(status),
                headers,
                body,
            });
        }
        if Instant::now() > deadline {
            return Err("the http run did not end".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn check(
    expect: &Expect,
    observed: &Observed,
    host: &Host,
    store: &Store,
    user_id: &str,
    val_id: &str,
    delivered: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    let logs = &observed.logs;
    if observed.outcome != expect.outcome {
        failures.push(format!(
            "outcome {} (expected {}); logs:\n{}",
            observed.outcome,
            expect.outcome,
            indent(logs)
        ));
    }
    for needle in &expect.logs_contain {
        if !logs.contains(needle.as_str()) {
            failures.push(format!("logs lack {needle:?}; logs:\n{}", indent(logs)));
        }
    }
    for needle in &expect.logs_exclude {
        if logs.contains(needle.as_str()) {
            failures.push(format!("logs contain {needle:?}"));
        }
    }
    let mut from = 0;
    for needle in &expect.logs_in_order {
        match logs[from..].find(needle.as_str()) {
            Some(at) => from += at + needle.len(),
            None => failures.push(format!("logs lack {needle:?} after the previous ones")),
        }
    }
    if let Some(status) = expect.status
        && observed.status != Some(status)
    {
        failures.push(format!("status {:?} (expected {status})", observed.status));
    }
    for (name, value) in &expect.headers {
        let got = observed
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        if got != Some(value.as_str()) {
            failures.push(format!("header {name}: {got:?} (expected {value:?})"));
        }
    }
    let body_text = String::from_utf8_lossy(&observed.body);
    if let Some(body) = &expect.body
        && body_text != body.as_str()
    {
        failures.push(format!("body {body_text:?} (expected {body:?})"));
    }
    if let Some(b64) = &expect.body_base64 {
        let expected = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
            .unwrap_or_default();
        if observed.body != expected {
            failures.push(format!(
                "binary body {:?} (expected {expected:?})",
                observed.body
            ));
        }
    }
    for needle in &expect.body_contains {
        if !body_text.contains(needle.as_str()) {
            failures.push(format!("body lacks {needle:?}: {body_text:?}"));
        }
    }
    for needle in &expect.body_excludes {
        if body_text.contains(needle.as_str()) {
            failures.push(format!("body contains {needle:?}"));
        }
    }
    for (key, value) in &expect.blobs {
        let got = read_blob(store, user_id, key)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        if &got != value {
            failures.push(format!("blob {key:?} is {got:?} (expected {value:?})"));
        }
    }
    for sql in &expect.sql {
        let (uid, query) = (user_id.to_owned(), sql.query.clone());
        let result = store
            .call(move |s| {
                let Some(mut grants) =
                    HeldSqliteGrants::new(Some(Granted::for_operator(&uid)), None)
                else {
                    return Ok(Err(valet_store::SqlError::Invalid("no grants".into())));
                };
                Ok(s.user_dbs()
                    .execute(&mut grants, &[SqlStatement::Text(query)], BatchMode::Read))
            })
            .await
            .unwrap_or_else(|e| Err(valet_store::SqlError::Invalid(e.to_string())));
        match result {
            Ok((results, _)) => {
                let rows = valet_api::sql_rows_json(&results[0].rows);
                if rows != sql.rows {
                    failures.push(format!(
                        "{}: rows {rows} (expected {})",
                        sql.query, sql.rows
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", sql.query)),
        }
    }
    if let Some(emails) = &expect.emails {
        failures.extend(check_emails(emails, store, user_id, delivered).await);
    }
    if let Some(key) = &expect.dead_token_in_blob {
        failures.extend(check_dead_token(key, host, store, user_id).await);
    }
    if !expect.scope_requests.is_empty() {
        // Requests are recorded off the request path: give them a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got: Vec<String> = Vec::new();
        while Instant::now() < deadline {
            let (id, grant) = (val_id.to_owned(), Granted::<ValRead>::for_operator(user_id));
            let requests = store
                .call(move |s| s.scope_requests(&grant, &id))
                .await
                .unwrap_or_default();
            got = requests.iter().map(|r| r.scope.to_string()).collect();
            if expect.scope_requests.iter().all(|s| got.contains(s)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for scope in &expect.scope_requests {
            if !got.contains(scope) {
                failures.push(format!("no scope request for {scope} (got {got:?})"));
            }
        }
    }
    failures
}

async fn check_emails(
    expected: &[EmailCheck],
    store: &Store,
    user_id: &str,
    delivered: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let list = || {
        let grant = Granted::for_operator(user_id);
        store.call(move |s| s.list_emails(&grant, 100))
    };
    let mut entries = list().await.unwrap_or_default();
    // With a relay, wait until every message was delivered.
    while delivered
        && entries.iter().any(|e| e.status != OutboxStatus::Sent)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        entries = list().await.unwrap_or_default();
    }
    entries.reverse();
    if entries.len() != expected.len() {
        failures.push(format!(
            "{} emails in the outbox (expected {})",
            entries.len(),
            expected.len()
        ));
        return failures;
    }
    for (i, (want, got)) in expected.iter().zip(&entries).enumerate() {
        if delivered && got.status != OutboxStatus::Sent {
            failures.push(format!("email {i} was not delivered: {:?}", got.last_error));
        }
        let m = &got.message;
        let list_eq = |field: &str,
                       want: &Option<Vec<String>>,
                       got: &Vec<String>,
                       failures: &mut Vec<String>| {
            if let Some(w) = want
                && w != got
            {
                failures.push(format!("email {i} {field} {got:?} (expected {w:?})"));
            }
        };
        list_eq("to", &want.to, &m.to().to_vec(), &mut failures);
        list_eq("cc", &want.cc, &m.cc().to_vec(), &mut failures);
        list_eq("bcc", &want.bcc, &m.bcc().to_vec(), &mut failures);
        list_eq(
            "replyTo",
            &want.reply_to,
            &m.reply_to().to_vec(),
            &mut failures,
        );
        if let Some(s) = &want.subject
            && s != m.subject()
        {
            failures.push(format!(
                "email {i} subject {:?} (expected {s:?})",
                m.subject()
            ));
        }
        if let Some(t) = &want.text_contains
            && !m.text().unwrap_or("").contains(t.as_str())
        {
            failures.push(format!("email {i} text {:?} lacks {t:?}", m.text()));
        }
        if let Some(h) = &want.html_contains
            && !m.html().unwrap_or("").contains(h.as_str())
        {
            failures.push(format!("email {i} html {:?} lacks {h:?}", m.html()));
        }
        if let Some(a) = &want.attachments {
            let names: Vec<String> = m.attachments().iter().map(|a| a.filename.clone()).collect();
            if &names != a {
                failures.push(format!("email {i} attachments {names:?} (expected {a:?})"));
            }
        }
    }
    failures
}

async fn check_dead_token(key: &str, host: &Host, store: &Store, user_id: &str) -> Vec<String> {
    let token = read_blob(store, user_id, key)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    let Some(token) = token else {
        return vec![format!("no token in blob {key:?}")];
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let request = Request::get(format!("http://{}/v1/blob", host.addr))
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty());
    let Ok(request) = request else {
        return vec!["could not build a request".into()];
    };
    match client.request(request).await {
        Ok(response) if response.status() == 401 => Vec::new(),
        Ok(response) => vec![format!(
            "the run's token still works after the run: {}",
            response.status()
        )],
        Err(e) => vec![format!("request with the run's token failed: {e}")],
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("           {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A blob's bytes, or `None` when the key is invalid or missing.
async fn read_blob(store: &Store, user_id: &str, key: &str) -> Option<Vec<u8>> {
    let key = BlobKey::parse(key).ok()?;
    let grant = Granted::for_operator(user_id);
    store
        .call(move |s| s.blob_get(&grant, &key))
        .await
        .ok()
        .flatten()
}
