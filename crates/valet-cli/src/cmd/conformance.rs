//! `valet conformance [DIR]`: run the fixtures and print a pass/fail table.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use valet_conformance::{self as conformance, Options};

#[derive(ClapArgs)]
pub struct Args {
    #[arg(default_value = "fixtures")]
    dir: PathBuf,
    /// Only cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Deliver the cases' email through this SMTP relay and check delivery.
    #[arg(long)]
    smtp: Option<String>,
    /// Cases at once (default: the number of cores).
    #[arg(long)]
    parallel: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let parallel = args.parallel.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let report = conformance::run(
        &args.dir,
        Options {
            filter: args.filter,
            smtp: args.smtp,
            parallel,
        },
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
