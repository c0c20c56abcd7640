//! `valet run FILE`: one run of a file against an in-process API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use valet_runtime::{RunSpec, Source};
use valet_server::{Host, HostConfig};
use valet_store::{Outcome, Store, User, ValKind};

#[derive(ClapArgs)]
pub struct Args {
    file: PathBuf,
    /// The user the run acts for (created if it does not exist).
    #[arg(long, default_value = "dev")]
    user: String,
    /// Default: every scope but val:write and user:write.
    #[arg(long)]
    scopes: Option<String>,
    /// NAME=VALUE, repeatable.
    #[arg(long)]
    env: Vec<String>,
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// script or cron.
    #[arg(long = "type", default_value = "script")]
    kind: String,
    /// Open HOST:PORT to the run. Repeatable.
    #[arg(long)]
    egress_allow: Vec<String>,
    /// SMTP relay for email the run sends.
    #[arg(long, env = "VALET_SMTP")]
    smtp: Option<String>,
    /// Print {run_id, outcome, logs, duration_ms} as JSON.
    #[arg(long)]
    json: bool,
}

/// The directory of the file a run loads, where its relative imports are.
pub fn file_dir(file: &std::path::Path) -> anyhow::Result<PathBuf> {
    let file = std::fs::canonicalize(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    Ok(file.parent().map(PathBuf::from).unwrap_or_default())
}

/// When valet runs as root, runs get a uid of their own, which must be able
/// to read the file (and reach it): say so before the run, rather than
/// let its import fail with a bare "permission denied".
pub fn check_readable_by_runs(file: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let uid = valet_runtime::RuntimeConfig::default().sandbox_uid;
    let file = std::fs::canonicalize(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    // The permission bits that apply to `uid` (whose gid is the same).
    let allows = |meta: &std::fs::Metadata, bit: u32| {
        let shift = if meta.uid() == uid {
            6
        } else if meta.gid() == uid {
            3
        } else {
            0
        };
        meta.mode() >> shift & bit != 0
    };
    let mut steps: Vec<&std::path::Path> = file.ancestors().skip(1).collect();
    steps.reverse();
    for dir in steps {
        if let Ok(meta) = std::fs::metadata(dir)
            && !allows(&meta, 0o1)
        {
            anyhow::bail!(
                "runs read {} as uid {uid} (valet runs as root and gives runs a uid of their own), \
                 which cannot enter {}: move the file, make the directory enterable (chmod o+x), \
                 or run valet as your own user",
                file.display(),
                dir.display()
            );
        }
    }
    if let Ok(meta) = std::fs::metadata(&file)
        && !allows(&meta, 0o4)
    {
        anyhow::bail!(
            "runs read {} as uid {uid} (valet runs as root and gives runs a uid of their own), \
             which cannot read it: make it readable (chmod o+r), or run valet as your own user",
            file.display()
        );
    }
    Ok(())
}

/// The local user, created on first use.
pub fn local_user(store: &Store, name: &str) -> anyhow::Result<User> {
    if let Some(user) = store.user_by_name(name)? {
        return Ok(user);
    }
    let user = store.create_user(name, &format!("{name}@valet.localhost"), None)?;
    store.set_tier(&user.id, valet_store::Tier::Pro)?;
    Ok(user)
}

/// `open` opens the store: called once the run's process is starting, so
/// that the two overlap.
pub async fn run(
    open: impl FnOnce() -> anyhow::Result<Store>,
    args: Args,
) -> anyhow::Result<ExitCode> {
    let kind = ValKind::parse(&args.kind)?;
    if kind == ValKind::Http {
        anyhow::bail!(
            "http vals answer requests: use `valet dev {}`",
            args.file.display()
        );
    }
    let scopes = super::parse_scopes(args.scopes.as_deref())?;
    let env = super::parse_env(&args.env)?;
    let timeout = super::parse_duration(&args.timeout)?;
    if !args.file.is_file() {
        anyhow::bail!("no such file: {}", args.file.display());
    }
    check_readable_by_runs(&args.file)?;
    let mut config = HostConfig::new("127.0.0.1:0".parse()?);
    config.cron = false;
    config.smtp = args.smtp;
    // The run's process starts with valet, while the store opens: it may
    // read the file's directory (relative imports), and no second one is
    // started after it.
    config.warm_pool = 1;
    config.warm_pool_refill = false;
    config.extra_read = vec![file_dir(&args.file)?];
    config.egress_allow = super::parse_egress(&args.egress_allow)?;
    let prepared = Host::prepare(config)?;
    let store = open()?;
    let user = local_user(&store, &args.user)?;
    let host = prepared.start(store).await?;
    let output = host
        .supervisor
        .run(RunSpec {
            user_id: user.id,
            val_id: None,
            kind,
            source: Source::File(args.file),
            scopes,
            env,
            timeout,
            trigger: "cli",
            last_run_at: None,
        })
        .await;
    host.shutdown_within(std::time::Duration::ZERO).await;
    let output = output?;
    if args.json {
        let json = valet_api::FinishedRunJson {
            run_id: &output.run_id,
            outcome: output.outcome,
            detail: Some(&output.detail),
            logs: &output.logs,
            duration_ms: output.duration_ms,
        };
        println!("{}", serde_json::to_string(&json)?);
    } else {
        print!("{}", output.logs);
        eprintln!(
            "run {} {} in {} ms ({})",
            output.run_id,
            output.outcome.as_str(),
            output.duration_ms,
            output.detail
        );
    }
    Ok(if output.outcome == Outcome::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
