//! The fixture format (documented in fixtures/README.md).

use std::collections::BTreeMap;

use serde::Deserialize;
use valet_core::ScopeSet;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub scopes: Scopes,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// For cron cases: the `lastRunAt` the val receives.
    #[serde(default)]
    pub last_run_at: Option<String>,
    #[serde(default)]
    pub seed: Seed,
    /// For http cases.
    #[serde(default)]
    pub request: Option<Request>,
    pub expect: Expect,
}

fn default_kind() -> String {
    "script".into()
}

fn default_timeout() -> u64 {
    10_000
}

/// `"default"` or a list of scopes.
#[derive(Debug, Deserialize, Default)]
#[serde(untagged)]
pub enum Scopes {
    #[default]
    #[serde(skip)]
    Default,
    Named(String),
    List(ScopeSet),
}

impl Scopes {
    pub fn resolve(&self) -> Result<ScopeSet, String> {
        match self {
            Scopes::Default => Ok(ScopeSet::default_val()),
            Scopes::Named(n) if n == "default" => Ok(ScopeSet::default_val()),
            Scopes::Named(n) if n == "all" => Ok(ScopeSet::all()),
            Scopes::Named(n) if n == "none" => Ok(ScopeSet::EMPTY),
            Scopes::Named(n) => Err(format!(
                "scopes must be \"default\", \"all\", \"none\" or a list, not {n:?}"
            )),
            Scopes::List(set) => Ok(*set),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Blobs present before the run (key → text).
    #[serde(default)]
    pub blobs: BTreeMap<String, String>,
    /// Statements run on the user's database before the run.
    #[serde(default)]
    pub sql: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<String>,
    /// A binary body, base64.
    #[serde(default)]
    pub body_base64: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}

fn default_path() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub outcome: String,
    #[serde(default)]
    pub logs_contain: Vec<String>,
    #[serde(default)]
    pub logs_exclude: Vec<String>,
    /// Substrings that must appear in this order in the logs.
    #[serde(default)]
    pub logs_in_order: Vec<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_base64: Option<String>,
    #[serde(default)]
    pub body_contains: Vec<String>,
    #[serde(default)]
    pub body_excludes: Vec<String>,
    /// Blobs after the run: key → text, or null for "absent".
    #[serde(default)]
    pub blobs: BTreeMap<String, Option<String>>,
    /// Queries on the user's database after the run and their rows.
    #[serde(default)]
    pub sql: Vec<SqlCheck>,
    /// Emails in the outbox after the run, in order.
    #[serde(default)]
    pub emails: Option<Vec<EmailCheck>>,
    /// A blob holding the run's own token: it must be refused after the run.
    #[serde(default)]
    pub dead_token_in_blob: Option<String>,
    /// Scope requests the run must have left on its val.
    #[serde(default)]
    pub scope_requests: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlCheck {
    pub query: String,
    pub rows: serde_json::Value,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EmailCheck {
    #[serde(default)]
    pub to: Option<Vec<String>>,
    #[serde(default)]
    pub cc: Option<Vec<String>>,
    #[serde(default)]
    pub bcc: Option<Vec<String>>,
    #[serde(default)]
    pub reply_to: Option<Vec<String>>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text_contains: Option<String>,
    #[serde(default)]
    pub html_contains: Option<String>,
    #[serde(default)]
    pub attachments: Option<Vec<String>>,
}
