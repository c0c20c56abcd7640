//! `valet dev FILE`: serve an http val from a file, a fresh run per request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use clap::Args as ClapArgs;
use valet_runtime::{RunSpec, Source, Supervisor};
use valet_server::{Host, HostConfig};
use valet_store::{Store, ValKind};

#[derive(ClapArgs)]
pub struct Args {
    file: PathBuf,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    #[arg(long, default_value = "dev")]
    user: String,
    #[arg(long)]
    scopes: Option<String>,
    #[arg(long)]
    env: Vec<String>,
    #[arg(long, default_value = "30s")]
    timeout: String,
    #[arg(long)]
    egress_allow: Vec<String>,
}

pub async fn run(store: Store, args: Args) -> anyhow::Result<ExitCode> {
    if !args.file.is_file() {
        anyhow::bail!("no such file: {}", args.file.display());
    }
    super::run::check_readable_by_runs(&args.file)?;
    let spec = RunSpec {
        user_id: super::run::local_user(&store, &args.user)?.id,
        val_id: None,
        kind: ValKind::Http,
        source: Source::File(args.file.clone()),
        scopes: super::parse_scopes(args.scopes.as_deref())?,
        env: super::parse_env(&args.env)?,
        timeout: super::parse_duration(&args.timeout)?,
        trigger: "http",
        last_run_at: None,
    };
    let mut config = HostConfig::new("127.0.0.1:0".parse()?);
    config.cron = false;
    // Each request is a run of the file's current code in a fresh process;
    // two are kept started ahead, able to read the file's directory.
    config.warm_pool = 2;
    config.extra_read = vec![super::run::file_dir(&args.file)?];
    config.egress_allow = super::parse_egress(&args.egress_allow)?;
    let host = Host::start(store, config).await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "serving {} on http://{}",
        args.file.display(),
        listener.local_addr()?
    );
    let app = axum::Router::new()
        .fallback(handle)
        .with_state((host.supervisor.clone(), spec));
    axum::serve(listener, app)
        .with_graceful_shutdown(super::shutdown_signal())
        .await?;
    let store = host.store.clone();
    tokio::time::timeout(Duration::from_secs(5), host.shutdown())
        .await
        .ok();
    // Whatever the shutdown did not finish, the records queued are written.
    store.flush_audit();
    Ok(ExitCode::SUCCESS)
}

async fn handle(
    State((supervisor, spec)): State<(Supervisor, RunSpec)>,
    request: Request<Body>,
) -> Response {
    valet_server::http_response(supervisor.serve_http(spec, request).await)
}
