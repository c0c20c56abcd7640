//! `valet serve`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use valet_server::{Host, HostConfig};
use valet_store::Store;

#[derive(ClapArgs)]
pub struct Args {
    /// Where the API and the pages listen.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where http vals answer, at /{user}/{val}: an origin of their own,
    /// never the pages'. Browsers send cookies across ports of one host,
    /// so in production give vals their own domain (--vals-domain).
    #[arg(long, default_value = "127.0.0.1:7071")]
    vals_listen: SocketAddr,
    /// Serve http vals on <user>-<val>.<DOMAIN> (point a wildcard DNS name
    /// at --vals-listen).
    #[arg(long)]
    vals_domain: Option<String>,
    /// SMTP relay for outgoing email, e.g. smtp://127.0.0.1:2525. Without
    /// one, email stays in the outbox.
    #[arg(long, env = "VALET_SMTP")]
    smtp: Option<String>,
    /// Open HOST:PORT to runs (tests, local development). Repeatable.
    #[arg(long)]
    egress_allow: Vec<String>,
    /// The URL people reach this server at (for links in emails).
    #[arg(long)]
    public_url: Option<String>,
    /// The address valet sends email from (vals' mail, with the val's
    /// display name, and valet's own).
    #[arg(long, env = "VALET_EMAIL_FROM", default_value = valet_store::DEFAULT_EMAIL_FROM)]
    email_from: String,
    /// Emails each user may send per day (UTC).
    #[arg(long, default_value_t = valet_store::EmailQuota::default().messages_per_day)]
    email_daily_messages: u64,
    /// Bytes of email each user may send per day (UTC), attachments included.
    #[arg(long, default_value_t = valet_store::EmailQuota::default().bytes_per_day)]
    email_daily_bytes: u64,
    /// Where GitHub publishes its secret-scanning keys.
    #[arg(long, env = "VALET_GITHUB_KEYS_URL", default_value = valet_api::secret_scanning::GITHUB_KEYS_URL)]
    github_keys_url: String,
    /// Deno processes kept started ahead of time for stored script and
    /// cron vals (0: every run starts cold).
    #[arg(long, default_value_t = 2)]
    warm_pool: usize,
    /// V8 heap cap per run, in MiB.
    #[arg(long, default_value_t = 128)]
    heap_mb: u64,
    /// With --database: this node's id in the cluster (default: a new one).
    #[arg(long)]
    node_id: Option<String>,
    /// With --database: how long this node counts as alive after each
    /// heartbeat; the others mark its runs lost after it.
    #[arg(long, default_value = "10s")]
    node_lease: String,
    /// With --database: queued runs this node runs at once.
    #[arg(long, default_value_t = 8)]
    node_runs: usize,
    /// With --database: the URL the other nodes reach this node's API at
    /// (they forward the sqlite calls of users whose database lives here).
    /// Default: http://<--listen>, unless that is a wildcard address.
    #[arg(long, env = "VALET_NODE_ADDRESS")]
    node_address: Option<String>,
    /// Whole-process memory cap per run, in MiB (V8 reserves about 500 MiB
    /// of it at start).
    #[arg(long, default_value_t = 1024)]
    memory_mb: u64,
    /// Runs at once on this machine.
    #[arg(long, default_value_t = 64)]
    max_runs: usize,
    /// Runs of one user at once.
    #[arg(long, default_value_t = 16)]
    max_runs_per_user: usize,
    /// Requests to one http val at once.
    #[arg(long, default_value_t = 8)]
    max_runs_per_val: usize,
    /// Runs that may wait per user (and per val) beyond those limits;
    /// more are refused at once with 503 and Retry-After.
    #[arg(long, default_value_t = 64)]
    run_queue: usize,
    /// How long a waiting run waits for a slot, e.g. 10s.
    #[arg(long, default_value = "10s")]
    run_queue_wait: String,
}

pub async fn run(store: Store, args: Args) -> anyhow::Result<ExitCode> {
    let mut config = HostConfig::new(args.listen);
    config.vals_listen = args.vals_listen;
    config.api.vals_domain = args.vals_domain;
    config.memory_mb = args.memory_mb;
    config.slots = valet_runtime::SlotLimits {
        total: args.max_runs,
        per_user: args.max_runs_per_user,
        per_val: args.max_runs_per_val,
        queue: args.run_queue,
        wait: super::parse_duration(&args.run_queue_wait)?,
    };
    config.recover_lost_runs = true;
    if store.is_shared() {
        let lease = super::parse_duration(&args.node_lease)?;
        anyhow::ensure!(
            lease >= std::time::Duration::from_millis(300),
            "--node-lease {} is too short: use 300ms or more (10s is the default)",
            args.node_lease
        );
        if let Some(address) = &args.node_address {
            anyhow::ensure!(
                address.starts_with("http://") || address.starts_with("https://"),
                "--node-address {address} is not a URL: give http://HOST:PORT (where this node's --listen is reached)"
            );
        }
        config.cluster = Some(valet_server::cluster::ClusterConfig {
            node_id: args.node_id,
            lease,
            capacity: args.node_runs,
            address: args.node_address,
        });
    }
    config.warm_pool = args.warm_pool;
    config.smtp = args.smtp;
    config.heap_mb = args.heap_mb;
    config.egress_allow = super::parse_egress(&args.egress_allow)?;
    config.api.github_keys_url = args.github_keys_url;
    valet_store::validate_email(&args.email_from)?;
    config.api.email_from = args.email_from;
    config.api.email_quota = valet_store::EmailQuota {
        messages_per_day: args.email_daily_messages,
        bytes_per_day: args.email_daily_bytes,
    };
    if let Some(url) = args.public_url {
        config.api.public_url = url;
    }
    let host = Host::start(store, config).await?;
    eprintln!("valet is serving on http://{}", host.addr);
    eprintln!(
        "http vals answer on http://{}/{{user}}/{{val}}",
        host.vals_addr
    );
    let layer = host.supervisor.os_layer();
    if layer.landlock_abi.is_none() && layer.uid.is_none() {
        eprintln!(
            "WARNING: runs are confined by Deno's permissions alone ({layer}): a bug in Deno would expose this machine; use a kernel with Landlock (Linux 5.13+) or run valet as root so runs get a uid of their own"
        );
    } else {
        eprintln!("runs are confined by Deno's permissions and the OS layer: {layer}");
    }
    if let Some(cluster) = &host.cluster {
        eprintln!("node {} of the cluster", cluster.node_id());
    }
    super::shutdown_signal().await;
    eprintln!("shutting down: waiting for runs in flight");
    host.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
