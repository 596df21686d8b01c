//! The command line, as calicoctl and kubectl users type it.

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "margayctl",
    version,
    about = "Manage Margay: Calico-compatible resources, Services and the dataplane",
    long_about = "margayctl speaks calicoctl's verbs (create, apply, replace, delete, get, patch, label, version) \
                  and Calico's resource formats, so that Calico manifests and habits carry over."
)]
pub struct Cli {
    /// The datastore: sqlite:///path/to/margay.db (default sqlite:///var/lib/margay/margay.db) or
    /// etcd://host:port[,host:port]; calicoctl's DATASTORE_TYPE=etcdv3 and ETCD_* variables work too.
    #[arg(long, global = true, env = "MARGAY_DATASTORE", value_name = "URL")]
    pub datastore: Option<String>,

    /// Accepted for calicoctl compatibility: Margay's client and agents share one version.
    #[arg(long, global = true)]
    pub allow_version_mismatch: bool,

    /// The namespace of namespaced resources (Service, Pod, ConfigMap, EndpointSlice).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create resources from a file; every one must be new.
    Create(WriteArgs),
    /// Create or replace resources from a file.
    Apply(WriteArgs),
    /// Replace existing resources from a file.
    Replace(WriteArgs),
    /// Delete resources named in a file or on the command line.
    Delete(DeleteArgs),
    /// Show resources.
    Get(GetArgs),
    /// Change fields of one resource.
    Patch(PatchArgs),
    /// Set or remove a label on one resource.
    Label(LabelArgs),
    /// Show the client's and the cluster's versions.
    Version,
    /// Node commands: `node status [NODE]`.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Inspect a node's BPF dataplane from its pinned maps, as `calico-node -bpf` does:
    /// `bpf nat dump`, `bpf conntrack dump`, `bpf routes dump`, `bpf counters`.
    #[command(subcommand)]
    Bpf(BpfCommand),
}

#[derive(Debug, Subcommand)]
pub enum BpfCommand {
    /// Service frontends with their backends (and session-affinity entries).
    #[command(subcommand)]
    Nat(BpfDump),
    /// Conntrack entries: tuple, NAT, state, age.
    #[command(subcommand)]
    Conntrack(BpfDump),
    /// The route map: pools, pod blocks, local pods, hosts.
    #[command(subcommand)]
    Routes(BpfDump),
    /// Packet counters by reason (drops and events), summed over CPUs.
    Counters(BpfTarget),
}

#[derive(Debug, Subcommand)]
pub enum BpfDump {
    /// Print every entry, one line each.
    Dump(BpfTarget),
}

/// Which maps to read and how to print them.
#[derive(Debug, Args)]
pub struct BpfTarget {
    /// The agent's bpffs directory (its maps are in `<DIR>/maps`); default as margay-node's.
    #[arg(long, value_name = "DIR", conflicts_with = "node")]
    pub bpffs_dir: Option<std::path::PathBuf>,
    /// Read the maps of this node (the directory its agent reports in its Node status): for a
    /// lab, whose nodes share this machine, or on the node itself.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Output: text (default, one line per entry) or json.
    #[arg(short = 'o', long, default_value = "text")]
    pub output: String,
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// A file of resources (YAML or JSON, several documents, Lists), or - for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub filename: String,
    /// Optionally, the kind and name the file must hold (refused if it holds anything else).
    #[arg(value_name = "KIND NAME", num_args = 0..=2)]
    pub target: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// A file naming the resources to delete, or - for standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "target"
    )]
    pub filename: Option<String>,
    /// Do not fail when a resource does not exist.
    #[arg(short = 's', long)]
    pub skip_not_exists: bool,
    /// KIND NAME [NAME...]
    #[arg(value_name = "KIND NAME")]
    pub target: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The kind (any alias calicoctl or kubectl takes: felixconfig, svc, ippool, ...).
    pub kind: String,
    /// Names; all objects of the kind when none is given.
    pub names: Vec<String>,
    /// Output: ps (default), wide, yaml, json, name, jsonpath=TEMPLATE.
    #[arg(short = 'o', long, default_value = "ps")]
    pub output: String,
    /// List namespaced resources in every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Debug, Args)]
pub struct PatchArgs {
    pub kind: String,
    pub name: String,
    /// The patch, as JSON or YAML.
    #[arg(short = 'p', long = "patch", value_name = "PATCH")]
    pub patch: String,
    /// strategic (default, as calicoctl), merge (RFC 7386) or json (RFC 6902).
    #[arg(short = 't', long = "type", default_value = "strategic")]
    pub patch_type: String,
}

#[derive(Debug, Args)]
pub struct LabelArgs {
    pub kind: String,
    pub name: String,
    /// key=value to set; key (with --remove) or key- to remove.
    #[arg(required = true)]
    pub labels: Vec<String>,
    /// Replace a label that already has a different value.
    #[arg(long)]
    pub overwrite: bool,
    /// Remove the named labels.
    #[arg(long)]
    pub remove: bool,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Per node: the dataplane requested and in use, why they differ, the BPF preflight, what
    /// is attached where, map fill levels, the last sync and its duration, the pod CIDRs and
    /// WireGuard key, as each node's agent reports them in its Node status.
    Status {
        /// One node, in full; every node, one line each, when omitted.
        node: Option<String>,
        /// Output: ps (default), wide (every node in full), json or yaml.
        #[arg(short = 'o', long, default_value = "ps")]
        output: String,
    },
}
