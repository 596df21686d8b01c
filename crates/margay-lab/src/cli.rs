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
    /// Run a command on the client (203.0.113.10, outside the cluster): `client -- curl ...`.
    Client(CommandArgs),
    /// Run a command on the router: `router -- ip route`.
    Router(CommandArgs),
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
