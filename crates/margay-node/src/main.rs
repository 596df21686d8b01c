//! `margay-node`: the per-node agent. It follows the datastore and programs this node's
//! dataplane: routes to other nodes' pod blocks, kube-proxy-equivalent Service rules, the
//! health checks load balancers probe, and its own Node resource.

mod agent;
mod bpf_mode;
mod cache;
mod health;
mod node;
mod preflight;
mod proxy;
mod routes;
mod vxlan;
mod wireguard;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "margay-node", version, about = "Margay's per-node agent")]
struct Args {
    /// This node's name (its Node resource).
    #[arg(long, env = "NODENAME", required_unless_present = "cleanup")]
    node_name: Option<String>,
    /// The datastore URL (`sqlite:///path`, `etcd://HOST:PORT,...`). Without it, calico-node's
    /// settings (`DATASTORE_TYPE=etcdv3`, `ETCD_ENDPOINTS`) as margayctl reads them, else
    /// `sqlite:///var/lib/margay/margay.db`.
    #[arg(long, env = "MARGAY_DATASTORE", value_name = "URL")]
    datastore: Option<String>,
    /// This node's IPv4 address and prefix length on the network between nodes (10.224.0.4/16).
    #[arg(long, value_name = "IP/PREFIX", required_unless_present = "cleanup")]
    node_ip: Option<ipnet::Ipv4Net>,
    /// Where to serve /liveness, /readiness and /status (Calico's Felix uses 9099).
    #[arg(long, default_value = "0.0.0.0:9099")]
    health_listen: SocketAddr,
    /// Write the agent's status here (JSON) after every sync.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Where the agent keeps state across restarts (the WireGuard private key, mode 0600).
    /// Default: /var/lib/margay/<node name>.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The bpffs directory the BPF dataplane pins its maps and links in (mounted if needed).
    #[arg(long, default_value = bpf_mode::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// The cgroup v2 directory connect-time load balancing attaches to (FelixConfiguration's
    /// cgroupV2Path; the whole host's root cgroup on a real node).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// How long a node leaving BPF keeps its programs for the flows they translated before it
    /// cuts them (Go-style duration: `300s`, `5m`; default 5m).
    #[arg(long, env = "MARGAY_BPF_DRAIN_LIMIT", value_name = "DURATION", value_parser = parse_duration)]
    bpf_drain_limit: Option<std::time::Duration>,
    /// Remove every route and iptables rule this agent owns on this node, then exit (for
    /// uninstalling, or after moving a node to another dataplane by hand).
    #[arg(long)]
    cleanup: bool,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "MARGAY_LOG", default_value = "info")]
    log: String,
}

/// A Go-style duration (`300s`, `5m`, `1h30m`), as FelixConfiguration writes them.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<margay_api::values::GoDuration>()
        .map(|d| d.as_duration())
        .map_err(|e| e.to_string())
}

fn cleanup() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("margay-node: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let routes = routes::RouteDriver::default().cleanup().await?;
        proxy::ProxyDataplane::new().cleanup()?;
        wireguard::cleanup("wireguard.cali").await?;
        anyhow::Ok(routes)
    });
    match result {
        Ok(routes) => {
            println!("margay-node: removed {routes} routes and every KUBE-* and Calico NAT rule");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("margay-node: cleanup failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_ansi(false)
        .init();
    if args.cleanup {
        return cleanup();
    }
    let (Some(node), Some(node_ip)) = (args.node_name, args.node_ip) else {
        eprintln!("margay-node: --node-name and --node-ip are required");
        return ExitCode::FAILURE;
    };
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| wireguard::key::default_state_dir(&node));
    let datastore_url = match margay_datastore::open::datastore_url(args.datastore.as_deref()) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("margay-node: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = agent::AgentConfig {
        node,
        datastore_url,
        node_ip: node_ip.addr(),
        node_prefix_len: node_ip.prefix_len(),
        health_listen: args.health_listen,
        status_file: args.status_file,
        state_dir,
        bpffs_dir: args.bpffs_dir,
        cgroup: args.cgroup,
        bpf_drain_limit: args.bpf_drain_limit.unwrap_or(bpf_mode::DRAIN_LIMIT),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("margay-node: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
