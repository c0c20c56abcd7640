//! `valet migrate scopes`: move legacy tokens to the safe defaults.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Args as ClapArgs, Subcommand};
use valet_store::{MigrationOptions, Store, time};

#[derive(Subcommand)]
pub enum Command {
    /// Give legacy tokens the safe default scopes; hold (and email the
    /// owners of) tokens that use val:write or user:write.
    Scopes(Args),
}

#[derive(ClapArgs)]
pub struct Args {
    /// Change nothing; print what would happen.
    #[arg(long)]
    dry_run: bool,
    /// How far back a use of val:write/user:write holds a token.
    #[arg(long, default_value = "90d")]
    window: String,
    /// Tokens per transaction.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Undo the migration of one token (it becomes legacy again).
    #[arg(long, value_name = "TOKEN_ID", conflicts_with_all = ["dry_run", "finish_held"])]
    revert: Option<String>,
    /// Move still-held tokens to the defaults (with a second email); needs --after.
    #[arg(long, requires = "after")]
    finish_held: bool,
    /// The end of the grace period (YYYY-MM-DD or RFC 3339); --finish-held refuses before it.
    #[arg(long)]
    after: Option<String>,
    /// The URL people reach valet at, for links in the emails.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    public_url: String,
    /// The address the emails come from (as `valet serve --email-from`).
    #[arg(long, env = "VALET_EMAIL_FROM", default_value = valet_store::DEFAULT_EMAIL_FROM)]
    email_from: String,
}

pub fn run(store: Store, Command::Scopes(args): Command) -> anyhow::Result<ExitCode> {
    let window = super::parse_duration(&args.window)?;
    valet_store::validate_email(&args.email_from)?;
    let options = MigrationOptions {
        dry_run: args.dry_run,
        window_ms: window.as_millis() as i64,
        batch_size: args.batch_size.max(1),
        stop_after_batches: None,
        public_url: args.public_url,
        email_from: args.email_from,
    };
    if let Some(id) = args.revert {
        store.revert_migration(&id)?;
        eprintln!("token {id} is a legacy token again (every scope)");
        return Ok(ExitCode::SUCCESS);
    }
    if args.finish_held {
        let text = args.after.unwrap_or_default();
        let after = time::parse(&text)
            .ok_or_else(|| anyhow::anyhow!("invalid --after '{text}': use YYYY-MM-DD"))?;
        if time::now_ms() < after {
            anyhow::bail!(
                "the grace period runs until {text}: run --finish-held on or after that date"
            );
        }
        let moved = store.finish_held(&options)?;
        eprintln!("moved {moved} held tokens to the safe defaults and emailed their owners");
        return Ok(ExitCode::SUCCESS);
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} tokens {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let summary = store.migrate_scopes(&options, |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        let json = valet_api::MigrationSummaryJson::from(&summary);
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for held in &summary.held_tokens {
            println!(
                "held {} \"{}\": {} (last use {})",
                held.id, held.name, held.reason, held.last_use
            );
        }
        println!("{}", summary.headline());
    }
    Ok(ExitCode::SUCCESS)
}
