//! Flags, parsed in two stages: clap takes raw strings, then each command
//! turns them into validated types before calling into the library crates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cmd;

#[derive(Parser)]
#[command(
    name = "valet",
    version,
    about = "Run vals in sandboxed Deno processes, each with its own short-lived, scoped valet key."
)]
pub struct Cli {
    /// Where valet keeps its database, blobs and keys.
    #[arg(
        long,
        global = true,
        env = "VALET_DATA_DIR",
        default_value = "./.valet"
    )]
    pub data_dir: PathBuf,
    /// The shared control plane of a cluster: postgres://user:password@host:port/dbname.
    /// Without it, the control plane is SQLite in the data dir.
    #[arg(long, global = true, env = "VALET_DATABASE_URL")]
    pub database: Option<String>,
    /// Blobs on S3-compatible storage: s3://bucket[/prefix] (endpoint, region and
    /// credentials from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY; AWS_ALLOW_HTTP=true for a plain-http endpoint).
    #[arg(long, global = true, env = "VALET_BLOB_STORE")]
    pub blob_store: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the API, the pages, http vals and cron on the embedded stores.
    Serve(cmd::serve::Args),
    /// Manage users.
    #[command(subcommand)]
    User(cmd::user::Command),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(cmd::token::Command),
    /// Manage stored vals.
    #[command(subcommand)]
    Val(cmd::val::Command),
    /// Manage the signing keys of run tokens.
    #[command(subcommand)]
    Keys(cmd::keys::Command),
    /// Run a file once, as a val, against an in-process API on the data dir.
    Run(cmd::run::Args),
    /// Serve an http val from a file, a fresh run per request.
    Dev(cmd::dev::Args),
    /// Data migrations.
    #[command(subcommand)]
    Migrate(cmd::migrate::Command),
    /// Run the conformance fixtures; prints a table ending `N passed, N failed`.
    Conformance(cmd::conformance::Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VALET_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(default_log_filter(&cli.command))
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cmd::dispatch(cli));
    // The command's work is done (a server has drained, a run's record is
    // written): the runtime's idle threads need no joining on the way out.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Serve(_) | Command::Dev(_) => "info,tower_http=warn",
        _ => "warn",
    }
}
