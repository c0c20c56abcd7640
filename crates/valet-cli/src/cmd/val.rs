//! `valet val create`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use valet_core::Schedule;
use valet_store::{NewVal, Store, ValKind};

#[derive(Subcommand)]
pub enum Command {
    /// Store a val from a file.
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        file: PathBuf,
        /// http, script or cron.
        #[arg(long = "type", default_value = "script")]
        kind: String,
        /// Default: every scope but val:write and user:write.
        #[arg(long)]
        scopes: Option<String>,
        /// NAME=VALUE, repeatable.
        #[arg(long)]
        env: Vec<String>,
        #[arg(long, default_value = "30s")]
        timeout: String,
        /// Cron schedule (cron vals need one), e.g. "*/5 * * * *".
        #[arg(long, value_parser = Schedule::parse)]
        schedule: Option<Schedule>,
    },
}

pub fn run(store: Store, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create {
            user,
            name,
            file,
            kind,
            scopes,
            env,
            timeout,
            schedule,
        } => {
            let kind = ValKind::parse(&kind)?;
            let scopes = super::parse_scopes(scopes.as_deref())?;
            let env = super::parse_env(&env)?;
            let timeout = super::parse_duration(&timeout)?;
            let code = std::fs::read_to_string(&file)
                .with_context(|| format!("could not read {}", file.display()))?;
            let user = store.require_user(&user)?;
            // The operator acts for the user, who holds every scope.
            let val = store.create_val(
                &valet_core::Granted::for_operator(&user.id),
                &valet_core::GrantedSet::for_operator(&user.id, scopes),
                NewVal {
                    name,
                    kind,
                    code,
                    scopes,
                    env,
                    timeout_ms: timeout.as_millis() as i64,
                    schedule,
                },
            )?;
            eprintln!(
                "created {} val {} ({}) with scopes: {}",
                kind.as_str(),
                val.name,
                val.id,
                val.scopes
            );
            println!("{}", val.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
