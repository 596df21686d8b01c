//! The command line. One variant per verb; each verb's code is in `commands/<verb>.rs`.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "margay-lab",
    version,
    about = "A multi-node cluster on one machine, made of network namespaces",
    long_about = "margay-lab builds a lab: an underlay bridge, a router, a client on an \"internet\" \
                  segment and N nodes, each in its own network namespace, with pods wired as \
                  Calico's CNI wires them. Everything is named after the lab (--name) and \
                  `margay-lab down` removes all of it, also after a crash. Run as root."
)]
pub struct Cli {
    /// The lab's name: 1-12 lowercase letters and digits; prefixes everything it creates.
    #[arg(
        long,
        global = true,
        env = "MARGAY_LAB",
        default_value = margay_lab::DEFAULT_LAB_NAME,
        value_name = "NAME"
    )]
    pub name: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the lab: namespaces, underlay, router, client, nodes.
    Up(UpArgs),
    /// Remove everything of the lab (processes, namespaces, cgroups, state); also after a crash.
    Down,
    /// Show addresses, nodes, pods, processes and where their logs are.
    Status(StatusArgs),
    /// Run commands on nodes, add or delete nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Create or update workloads and resources from a file: Namespace, Service, Deployment, Pod,
    /// ConfigMap, Calico resources. Waits until every node has programmed the result.
    Apply(ApplyArgs),
    /// Show pods, services, nodes, endpointslices, deployments (kubectl's columns).
    Get(GetArgs),
    /// Delete pods (a Deployment replaces them with new names and addresses) or other resources.
    Delete(DeleteArgs),
    /// Print a pod's log: `logs POD`, `logs deployment/NAME`, `logs -l app=customer`.
    Logs(LogsArgs),
    /// Run a command in a pod's network namespace: `exec POD -- CMD` (executed directly).
    Exec(ExecArgs),
    /// `rollout restart deployment NAME`: replace every Pod of a Deployment.
    Rollout(RolloutArgs),
    /// Run a command on the client (203.0.113.10, outside the cluster): `client -- curl ...`.
    Client(CommandArgs),
    /// Run a command on the router: `router -- ip route`.
    Router(CommandArgs),
    /// Stop or start the lab's own etcd (`up --datastore etcd`), for outage drills.
    #[command(subcommand)]
    Etcd(EtcdCommand),
    /// Benchmarks on a lab of its own: pod IP, ClusterIP in both dataplanes, NodePort and
    /// LoadBalancer, at 1 to 50,000 Services; programming time, endpoint changes, memory,
    /// throughput, a switch under load, BPF per-packet cost. Writes JSON, Markdown and PNG plots.
    Bench(BenchArgs),
    /// TCP echo server answering each connection with the peer address (for tests).
    #[command(hide = true)]
    InternalEcho(EchoArgs),
    /// Connect, print what the server sends (for tests).
    #[command(hide = true)]
    InternalConnect(ConnectArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// How many nodes (node-1 ... node-N).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub nodes: usize,
    /// How the router spreads LoadBalancer IPs: `ecmp` or a node name (`node-1`).
    #[arg(long, default_value = "ecmp", value_name = "ecmp|NODE")]
    pub lb_mode: String,
    /// The dataplane the nodes start with.
    #[arg(long, default_value = "iptables", value_name = "iptables|bpf")]
    pub dataplane: String,
    /// The datastore: `etcd` for an etcd the lab starts (on a unix socket in its state
    /// directory), or a URL (default: a SQLite file in the lab's state directory).
    #[arg(long, value_name = "etcd|URL")]
    pub datastore: Option<String>,
    /// Build only the network (no datastore, agents or cluster DNS).
    #[arg(long)]
    pub infrastructure_only: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The short run (1 and 1,000 Services, 1 s loads, under two minutes), as CI runs it.
    #[arg(long)]
    pub quick: bool,
    /// Where bench.json, bench.md and the plots go.
    #[arg(long, default_value = "bench-results", value_name = "DIR")]
    pub out: std::path::PathBuf,
    /// The numbers of extra Services to measure at, comma-separated (default 1,1000,10000,50000;
    /// with --quick 1,1000).
    #[arg(long, value_name = "N,N,...")]
    pub services: Option<String>,
    /// Leave the lab up at the end.
    #[arg(long)]
    pub keep: bool,
    /// FelixConfiguration `iptablesBackend` for the run (Legacy, NFT, Auto). Legacy by default:
    /// iptables-nft-restore 1.8.9 takes minutes per restore beyond a few thousand Services
    /// (docs/design/bench.md).
    #[arg(long, default_value = "Legacy", value_name = "Legacy|NFT|Auto")]
    pub iptables_backend: margay_api::calico::felix::IptablesBackend,
    /// Measure only the endpoint-change latency (at each N, in both dataplanes), with `SAMPLES`
    /// changes per cell; prints its table and writes `endpoint-changes.json` to `--out`.
    #[arg(long, value_name = "SAMPLES")]
    pub endpoint_changes_only: Option<usize>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A file of resources (YAML or JSON, several documents), or - for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub filename: String,
    /// The namespace of namespaced resources that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// pods, svc, nodes, endpointslices, deployments (or any margayctl kind).
    pub kind: String,
    /// Names; all when none is given.
    pub names: Vec<String>,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// wide, name, yaml, json, jsonpath=TEMPLATE.
    #[arg(short = 'o', long, default_value = "ps")]
    pub output: String,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The kind (`pod`, `svc`, `deployment`, ...).
    pub kind: String,
    /// Names.
    pub names: Vec<String>,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Delete the pods whose labels match (`app=customer`, `k8s-app=kube-dns`).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Delete every object of the kind in the namespace.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A pod name or `deployment/NAME`.
    pub target: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The pods whose labels match.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The pod.
    pub pod: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub command: CommandArgs,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// `restart`.
    pub action: String,
    /// `deployment NAME` or `deployment/NAME`.
    #[arg(num_args = 1..=2, value_name = "RESOURCE")]
    pub resource: Vec<String>,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run a command in a node's namespace and cgroup: `node exec node-1 -- ip route`.
    Exec {
        /// The node.
        node: String,
        #[command(flatten)]
        command: CommandArgs,
    },
    /// Add a node (next free address); the router's LoadBalancer route follows.
    Add {
        /// The new node's name.
        node: String,
    },
    /// Delete a node, its pods and their processes.
    Delete {
        /// The node.
        node: String,
    },
    /// Kill a node's agent with SIGKILL, as a crash would, and start a new one. Its BPF maps and
    /// links stay pinned in the node's bpffs (`<state dir>/bpf/<node>`): flows go on while it is
    /// down and the new agent adopts them.
    RestartAgent {
        /// The node.
        node: String,
        /// Start the new agent against this datastore URL instead of the lab's (for example
        /// the lab's etcd through a Service address, to see the BPF preflight refuse it).
        #[arg(long, value_name = "URL")]
        datastore: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// Stop the lab's etcd: the agents lose the datastore and keep forwarding as programmed.
    Stop,
    /// Start the lab's etcd again on its data.
    Start {
        /// Serve on another socket file in the lab's etcd directory (`drill.sock:2379`) instead
        /// of the agents' one, to change the store while the agents cannot reach it.
        #[arg(long, value_name = "NAME:PORT")]
        socket: Option<String>,
    },
    /// Print the URL the lab's etcd serves (for margayctl's MARGAY_DATASTORE) and whether it runs.
    Status,
}

#[derive(Debug, Args)]
pub struct CommandArgs {
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub argv: Vec<String>,
}

#[derive(Debug, Args)]
pub struct EchoArgs {
    /// The TCP port to listen on.
    #[arg(long)]
    pub port: u16,
    /// The address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub address: std::net::IpAddr,
    /// A word added to each answer (a node or pod name).
    #[arg(long)]
    pub tag: Option<String>,
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// ip:port.
    pub addr: std::net::SocketAddr,
    /// Timeout of each attempt and of the read, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Keep retrying a failed connect for this long, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub retry_ms: u64,
}
