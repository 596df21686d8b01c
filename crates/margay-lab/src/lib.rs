//! A multi-node cluster on one machine, made of network namespaces: the infrastructure under
//! Margay's lab.
//!
//! # Model
//!
//! A lab is a set of kernel objects that all carry its name: namespaces `<lab>-underlay` (bridge
//! `br0`), `<lab>-router`, `<lab>-client`, one per node (`<lab>-node-1`, ...) and one per pod
//! (`<lab>-pod-<id>`); cgroups under `<cgroup2>/margay-lab/<lab>/`; state, logs and the default
//! datastore under `/run/margay-lab/<lab>/`; resolv.conf files under `/etc/netns/<lab>-pod-*`.
//! Nothing is created in, or changed about, the root network namespace or the root cgroup.
//!
//! The router carries traffic between the underlay (10.224.0.0/16: router .1, nodes from .4)
//! and the "internet" (203.0.113.0/24: router .1, client .10) without NAT, and delivers the
//! LoadBalancer pool (198.51.100.0/24) to the nodes as a cloud load balancer would: ECMP over all
//! nodes hashed on L4, or all to one node ([`LbMode`]).
//!
//! # Goals
//!
//! - **Cleanup is by name.** [`Lab::destroy`] finds everything from the name alone, so it works
//!   after a crash, with the state file gone. `state.json` is a record for `status` and callers,
//!   never the only way to find something.
//! - **Fast.** `ip -batch` per namespace and phase, namespaces configured in parallel: a
//!   three-node lab comes up in tens of milliseconds.
//! - **Errors say what failed.** Every failure names the command, its exit status and stderr
//!   (and the failing `ip -batch` line), or the file and the operation.
//! - **No unsafe code.** Processes join namespaces through `ip netns exec` and cgroups through a
//!   one-line `sh` prologue (see [`process`](crate::Lab::spawn)); signals go through rustix.
//!
//! # Concurrency
//!
//! [`Lab`] is `Send + Sync` and cheap to clone. Every change re-reads `state.json` under an
//! exclusive `flock` and replaces it atomically, so several threads and several processes (CLI
//! invocations, a controller) can act on one lab at once. Different labs share nothing but the
//! parent directories, which are created and removed with retries for that reason.
//!
//! # Example
//!
//! ```no_run
//! use margay_lab::{Lab, LabConfig, SpawnOptions, Target};
//!
//! let lab = Lab::create(LabConfig::new("demo", 3))?;
//! let pod = margay_lab::new_pod_netns_name(lab.name());
//! lab.create_pod_network("node-1", &pod, "10.244.1.5".parse().unwrap(), &margay_lab::new_host_veth_name())?;
//! let pid = lab.spawn(&Target::Pod(pod.clone()), &["sleep", "1000"], &SpawnOptions::new())?;
//! lab.kill(pid)?;
//! Lab::destroy("demo")?;
//! # Ok::<(), margay_lab::Error>(())
//! ```

mod cgroup;
mod cmd;
mod config;
pub mod controller;
mod destroy;
mod error;
mod lab;
mod naming;
mod pods;
pub mod probe;
mod process;
mod procs;
pub mod scale;
mod state;
mod status;
mod topology;
pub mod workloads;

pub use config::{LabConfig, LbMode, default_node_name};
pub use destroy::DestroyReport;
pub use error::{Error, Result};
pub use lab::{ETC_NETNS_DIR, Lab, NETNS_DIR, Progress, default_datastore_url, lab_netns};
pub use naming::{
    DEFAULT_LAB_NAME, MAX_LAB_NAME_LEN, POD_GATEWAY, Target, new_host_veth_name,
    new_pod_netns_name, validate_lab_name, validate_node_name, validate_pod_netns,
};
pub use process::{ProcessStatus, SpawnOptions};
pub use procs::is_root;
pub use state::{LabState, NodeState, PodState, ProcessRecord, STATE_ROOT, state_dir};
pub use status::{
    ClientStatus, LabStatus, LbStatus, NodeStatus, PodStatus, RouterStatus, SegmentStatus,
};
