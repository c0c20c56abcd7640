//! One module per command; each is a thin wrapper over library calls.

pub mod conformance;
pub mod dev;
pub mod keys;
pub mod migrate;
pub mod run;
pub mod serve;
pub mod token;
pub mod user;
pub mod val;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use valet_store::{Store, StoreOptions};

use crate::cli::{Cli, Command};

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let options = StoreOptions {
        database: cli.database.clone(),
        blob_store: cli.blob_store.clone(),
        ..StoreOptions::local(&cli.data_dir)
    };
    let open = || open_store(&options);
    match cli.command {
        Command::Serve(args) => serve::run(open()?, args).await,
        Command::User(c) => user::run(open()?, c),
        Command::Token(c) => token::run(open()?, c),
        Command::Val(c) => val::run(open()?, c),
        Command::Keys(c) => keys::run(open()?, c),
        // The run's process starts before the store opens.
        Command::Run(args) => run::run(open, args).await,
        Command::Dev(args) => dev::run(open()?, args).await,
        Command::Migrate(c) => migrate::run(open()?, c),
        // Each case gets a fresh data dir of its own.
        Command::Conformance(args) => conformance::run(args).await,
    }
}

fn open_store(options: &StoreOptions) -> anyhow::Result<Store> {
    let dir = options.data_dir.display();
    match options.database {
        None => Store::open_with(options).with_context(|| format!("could not open the data dir {dir}")),
        Some(_) => Store::open_with(options).with_context(|| {
            format!("could not open the control plane on PostgreSQL (--database), with the data dir {dir}")
        }),
    }
}

/// `500ms`, `30s`, `10m`, `2h`, `30d`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().with_context(|| {
        format!("invalid duration '{text}': use e.g. 500ms, 30s, 10m, 2h or 30d")
    })?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => anyhow::bail!("invalid duration '{text}': unknown unit '{unit}' (ms, s, m, h or d)"),
    };
    Ok(Duration::from_millis(ms))
}

/// `K=V` pairs into a map.
pub fn parse_env(pairs: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("invalid --env '{pair}': use NAME=VALUE"))
        })
        .collect()
}

/// `--egress-allow HOST:PORT` values.
pub fn parse_egress(values: &[String]) -> anyhow::Result<Vec<valet_runtime::EgressAllow>> {
    values
        .iter()
        .map(|s| s.parse().map_err(anyhow::Error::msg))
        .collect()
}

pub fn parse_scopes(text: Option<&str>) -> anyhow::Result<valet_core::ScopeSet> {
    match text {
        None => Ok(valet_core::ScopeSet::default_val()),
        Some(t) => Ok(valet_core::ScopeSet::parse(t)?),
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
