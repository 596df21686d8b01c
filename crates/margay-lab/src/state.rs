//! `state.json`: what a lab holds (config, nodes, pods, processes), saved atomically under a lock.
//!
//! The state is a record, not the source of truth for cleanup: `down` finds everything by name.
//! It is what `status`, `open`, `exec` and the control plane read to know addresses and pids.
//!
//! Writers take an exclusive `flock` on `<state dir>/lock` (std's `File::lock`, Rust 1.89), re-read
//! the file, change it and replace it with write-to-temporary + rename, so concurrent CLI
//! invocations and threads never lose each other's updates and readers never see half a file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{LabConfig, LbMode};
use crate::error::{Error, Result};
use crate::naming::Target;

/// Where every lab keeps its state: a tmpfs, so a reboot (which also drops every namespace)
/// drops the state too.
pub const STATE_ROOT: &str = "/run/margay-lab";
/// The state format written by this version.
pub const STATE_VERSION: u32 = 1;

/// `/run/margay-lab/<lab>`.
pub fn state_dir(lab: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(lab)
}

/// Everything recorded about one lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    /// The state format version (1) when written.
    pub version: u32,
    /// The configuration the lab was created with (nodes added later are in `nodes` only).
    pub config: LabConfig,
    pub created_at: DateTime<Utc>,
    /// The router's current load-balancing mode.
    pub lb_mode: LbMode,
    /// The cgroup2 mount used, or `None` when cgroup2 was unavailable.
    pub cgroup_mount: Option<PathBuf>,
    /// Nodes, in slot order.
    pub nodes: Vec<NodeState>,
    /// Pod networks, in creation order.
    pub pods: Vec<PodState>,
    /// Processes started with `spawn` (killed or dead ones are dropped by `kill` / `prune`).
    pub processes: Vec<ProcessRecord>,
    /// Free-form values for layers above (the control plane's pids, ports, URLs).
    #[serde(default)]
    pub annotations: BTreeMap<String, serde_json::Value>,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    /// `<lab>-<name>`.
    pub netns: String,
    /// Address on the underlay (prefix length is the underlay's).
    pub ip: Ipv4Addr,
    /// 1-based slot: the address offset from `first_node_ip` and the `n<slot>` port name.
    pub slot: u32,
    /// The node's port on `br0` in the underlay namespace (`n1`, `n2`, ...).
    pub underlay_veth: String,
}

/// One pod network made by `create_pod_network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    /// `<lab>-pod-<id>`.
    pub netns: String,
    /// The node whose namespace holds the host end of the veth.
    pub node: String,
    pub ip: Ipv4Addr,
    /// The host end of the veth, in the node's namespace (`cali...`).
    pub host_veth: String,
    pub created_at: DateTime<Utc>,
}

/// One process started with `spawn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22): with `pid` it names the
    /// process unambiguously, so a reused pid is never mistaken for it (or killed).
    pub start_time: Option<u64>,
    pub target: Target,
    /// A short label (the program's name unless the caller chose one).
    pub name: String,
    pub argv: Vec<String>,
    /// The file its stdout and stderr are appended to.
    pub log: PathBuf,
    /// The cgroup it joined, if any.
    pub cgroup: Option<PathBuf>,
    pub started_at: DateTime<Utc>,
}

impl LabState {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod whose namespace is `netns`.
    pub fn pod(&self, netns: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.netns == netns)
    }
}

/// Reads and writes one lab's state file.
#[derive(Debug, Clone)]
pub(crate) struct StateStore {
    lab: String,
    dir: PathBuf,
}

/// Holds the lab's state lock until dropped.
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: File,
}

impl StateStore {
    pub(crate) fn new(lab: &str) -> StateStore {
        StateStore {
            lab: lab.to_owned(),
            dir: state_dir(lab),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// Takes the exclusive lock, waiting for other writers.
    pub(crate) fn lock(&self) -> Result<StateLock> {
        let path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::NotFound {
                    name: self.lab.clone(),
                    reason: format!("{} does not exist", self.dir.display()),
                },
                _ => Error::io_path("open the lock file", &path, e),
            })?;
        file.lock().map_err(|e| Error::io_path("lock", &path, e))?;
        Ok(StateLock { _file: file })
    }

    /// Tries to take the lock for up to `timeout`; `None` if another holder kept it.
    pub(crate) fn lock_for(&self, timeout: std::time::Duration) -> Option<StateLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_path())
            .ok()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if file.try_lock().is_ok() {
                return Some(StateLock { _file: file });
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Reads and parses state.json.
    pub(crate) fn load(&self) -> Result<LabState> {
        let path = self.state_path();
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::NotFound {
                name: self.lab.clone(),
                reason: format!(
                    "{} does not exist; create the lab with `margay-lab up --name {}` \
                     (or clear leftovers with `margay-lab down --name {}`)",
                    path.display(),
                    self.lab,
                    self.lab
                ),
            },
            _ => Error::io_path("read", &path, e),
        })?;
        let state: LabState = serde_json::from_str(&text).map_err(|e| Error::State {
            lab: self.lab.clone(),
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if state.version > STATE_VERSION {
            return Err(Error::State {
                lab: self.lab.clone(),
                path: path.display().to_string(),
                reason: format!(
                    "it was written by a newer margay-lab (state version {}, this one reads {})",
                    state.version, STATE_VERSION
                ),
            });
        }
        Ok(state)
    }

    /// Replaces state.json atomically (the caller holds the lock).
    pub(crate) fn save(&self, state: &LabState, _lock: &StateLock) -> Result<()> {
        let path = self.state_path();
        let tmp = self
            .dir
            .join(format!("state.json.tmp.{}", std::process::id()));
        let mut text = serde_json::to_string_pretty(state)
            .map_err(|e| Error::io("cannot serialise the lab state", std::io::Error::other(e)))?;
        text.push('\n');
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io_path("write", &path, e)
        })
    }

    /// Locks, re-reads, applies `change`, saves (only if `change` succeeded), unlocks.
    pub(crate) fn update<R>(&self, change: impl FnOnce(&mut LabState) -> Result<R>) -> Result<R> {
        let lock = self.lock()?;
        let mut state = self.load()?;
        let out = change(&mut state)?;
        self.save(&state, &lock)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let state = LabState {
            version: STATE_VERSION,
            config: LabConfig::new("t1", 1),
            created_at: Utc::now(),
            lb_mode: LbMode::Node("node-1".into()),
            cgroup_mount: Some("/sys/fs/cgroup".into()),
            nodes: vec![NodeState {
                name: "node-1".into(),
                netns: "t1-node-1".into(),
                ip: Ipv4Addr::new(10, 224, 0, 4),
                slot: 1,
                underlay_veth: "n1".into(),
            }],
            pods: vec![],
            processes: vec![ProcessRecord {
                pid: 42,
                start_time: Some(7),
                target: Target::node("node-1"),
                name: "sleep".into(),
                argv: vec!["sleep".into(), "1".into()],
                log: "/run/margay-lab/t1/logs/node-1.sleep.log".into(),
                cgroup: None,
                started_at: Utc::now(),
            }],
            annotations: BTreeMap::new(),
        };
        let text = serde_json::to_string(&state).unwrap();
        let back: LabState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);
        assert_eq!(
            back.node("node-1").unwrap().ip,
            Ipv4Addr::new(10, 224, 0, 4)
        );
    }
}
