//! [`Lab::status`]: addresses, nodes, pods and processes, as JSON or as text for people.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::config::LbMode;
use crate::controller::agents;
use crate::error::Result;
use crate::lab::{Lab, netns_exists};
use crate::naming::{UNDERLAY_BRIDGE, netns_name};
use crate::process::ProcessStatus;
use crate::state::{NodeState, PodState};

/// A snapshot of a lab for `margay-lab status`.
#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub state_dir: PathBuf,
    pub logs_dir: PathBuf,
    pub datastore_url: String,
    /// The lab's cgroup, or `None` without cgroup2.
    pub cgroup: Option<PathBuf>,
    pub underlay: SegmentStatus,
    pub internet: SegmentStatus,
    pub router: RouterStatus,
    pub client: ClientStatus,
    pub load_balancer: LbStatus,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    pub processes: Vec<ProcessStatus>,
    pub annotations: BTreeMap<String, serde_json::Value>,
}

/// A network segment.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentStatus {
    pub cidr: Ipv4Net,
    /// The namespace holding the segment's bridge, if it has one.
    pub netns: Option<String>,
    pub bridge: Option<String>,
    pub mtu: u32,
}

/// The router.
#[derive(Debug, Clone, Serialize)]
pub struct RouterStatus {
    pub netns: String,
    pub present: bool,
    pub underlay_ip: Ipv4Addr,
    pub internet_ip: Ipv4Addr,
}

/// The client.
#[derive(Debug, Clone, Serialize)]
pub struct ClientStatus {
    pub netns: String,
    pub present: bool,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

/// Where LoadBalancer traffic goes.
#[derive(Debug, Clone, Serialize)]
pub struct LbStatus {
    pub pool: Ipv4Net,
    pub mode: LbMode,
    /// The nodes the router's route points at (empty: no route).
    pub next_hops: Vec<String>,
}

/// A node and whether its namespace exists.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub node: NodeState,
    pub present: bool,
    pub pods: usize,
    /// Whether the node's agent follows the datastore (`InSync`, `Resyncing` while it cannot
    /// reach it, `WaitingForDatastore` before its first listing), from the status file the agent
    /// writes; read without the datastore, so it also answers during a datastore outage.
    pub agent_datastore: Option<String>,
    /// The highest datastore revision the agent's dataplane reflects.
    pub agent_synced_revision: Option<u64>,
}

/// A pod network and whether its namespace exists.
#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    #[serde(flatten)]
    pub pod: PodState,
    pub present: bool,
}

impl Lab {
    /// The lab as recorded, checked against what exists (namespaces, live processes).
    pub fn status(&self) -> Result<LabStatus> {
        let state = self.state()?;
        let processes = self.processes()?;
        let c = &state.config;
        let next_hops = match &state.lb_mode {
            LbMode::Ecmp => state.nodes.iter().map(|n| n.name.clone()).collect(),
            LbMode::Node(n) => state
                .nodes
                .iter()
                .filter(|x| &x.name == n)
                .map(|x| x.name.clone())
                .collect(),
        };
        Ok(LabStatus {
            name: self.name.clone(),
            created_at: state.created_at,
            state_dir: self.state_dir().to_owned(),
            logs_dir: self.logs_dir(),
            datastore_url: state
                .annotations
                .get(crate::controller::DATASTORE_ANNOTATION)
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| self.default_datastore_url()),
            cgroup: self.cgroups.as_ref().map(|cg| cg.lab_dir()),
            underlay: SegmentStatus {
                cidr: c.underlay,
                netns: Some(netns_name(&self.name, "underlay")),
                bridge: Some(UNDERLAY_BRIDGE.to_owned()),
                mtu: c.underlay_mtu,
            },
            internet: SegmentStatus {
                cidr: c.internet,
                netns: None,
                bridge: None,
                mtu: 1500,
            },
            router: RouterStatus {
                netns: netns_name(&self.name, "router"),
                present: netns_exists(&netns_name(&self.name, "router")),
                underlay_ip: c.router_underlay_ip,
                internet_ip: c.router_internet_ip,
            },
            client: ClientStatus {
                netns: netns_name(&self.name, "client"),
                present: netns_exists(&netns_name(&self.name, "client")),
                ip: c.client_ip,
                gateway: c.router_internet_ip,
            },
            load_balancer: LbStatus {
                pool: c.lb_pool,
                mode: state.lb_mode.clone(),
                next_hops,
            },
            nodes: state
                .nodes
                .iter()
                .map(|n| NodeStatus {
                    present: netns_exists(&n.netns),
                    pods: state.pods.iter().filter(|p| p.node == n.name).count(),
                    agent_datastore: agents::read_status(self, &n.name)
                        .and_then(|s| s["datastore"].as_str().map(str::to_owned)),
                    agent_synced_revision: agents::read_status(self, &n.name)
                        .and_then(|s| s["syncedRevision"].as_u64()),
                    node: n.clone(),
                })
                .collect(),
            pods: state
                .pods
                .iter()
                .map(|p| PodStatus {
                    present: netns_exists(&p.netns),
                    pod: p.clone(),
                })
                .collect(),
            processes,
            annotations: state.annotations.clone(),
        })
    }
}

/// Left-aligned columns separated by two spaces.
fn table(out: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::from("  ");
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn present(yes: bool) -> &'static str {
    if yes { "" } else { " (namespace MISSING)" }
}

impl fmt::Display for LabStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "lab {}  (created {})",
            self.name,
            self.created_at.format("%Y-%m-%d %H:%M:%S UTC")
        )?;
        writeln!(f, "state      {}", self.state_dir.display())?;
        writeln!(f, "logs       {}", self.logs_dir.display())?;
        writeln!(f, "datastore  {}", self.datastore_url)?;
        match &self.cgroup {
            Some(cg) => writeln!(f, "cgroup     {}", cg.display())?,
            None => writeln!(f, "cgroup     none (cgroup2 is not mounted)")?,
        }
        writeln!(
            f,
            "underlay   {} on {} in {} (mtu {})",
            self.underlay.cidr,
            self.underlay.bridge.as_deref().unwrap_or("-"),
            self.underlay.netns.as_deref().unwrap_or("-"),
            self.underlay.mtu
        )?;
        writeln!(
            f,
            "router     {}: eth0 {}, eth1 {}{}",
            self.router.netns,
            self.router.underlay_ip,
            self.router.internet_ip,
            present(self.router.present)
        )?;
        writeln!(
            f,
            "client     {}: eth0 {}/{} via {}{}",
            self.client.netns,
            self.client.ip,
            self.internet.cidr.prefix_len(),
            self.client.gateway,
            present(self.client.present)
        )?;
        let hops = if self.load_balancer.next_hops.is_empty() {
            "no route (no such node)".to_owned()
        } else {
            self.load_balancer.next_hops.join(", ")
        };
        writeln!(
            f,
            "lb         {} -> {} ({})",
            self.load_balancer.pool, hops, self.load_balancer.mode
        )?;

        writeln!(f, "\nnodes ({})", self.nodes.len())?;
        let mut rows = vec![vec![
            "NAME".to_owned(),
            "NETNS".to_owned(),
            "IP".to_owned(),
            "PORT".to_owned(),
            "PODS".to_owned(),
            "AGENT".to_owned(),
        ]];
        for n in &self.nodes {
            let agent = match (&n.agent_datastore, n.agent_synced_revision) {
                (Some(sync), Some(revision)) => format!("{sync} (revision {revision})"),
                (Some(sync), None) => sync.clone(),
                _ => "-".to_owned(),
            };
            rows.push(vec![
                n.node.name.clone(),
                format!("{}{}", n.node.netns, present(n.present)),
                n.node.ip.to_string(),
                n.node.underlay_veth.clone(),
                n.pods.to_string(),
                agent,
            ]);
        }
        table(f, &rows)?;

        writeln!(f, "\npods ({})", self.pods.len())?;
        if !self.pods.is_empty() {
            let mut rows = vec![vec![
                "NETNS".to_owned(),
                "NODE".to_owned(),
                "IP".to_owned(),
                "HOST VETH".to_owned(),
            ]];
            for p in &self.pods {
                rows.push(vec![
                    format!("{}{}", p.pod.netns, present(p.present)),
                    p.pod.node.clone(),
                    p.pod.ip.to_string(),
                    p.pod.host_veth.clone(),
                ]);
            }
            table(f, &rows)?;
        }

        writeln!(f, "\nprocesses ({})", self.processes.len())?;
        if !self.processes.is_empty() {
            let mut rows = vec![vec![
                "PID".to_owned(),
                "STATE".to_owned(),
                "TARGET".to_owned(),
                "NAME".to_owned(),
                "LOG".to_owned(),
            ]];
            for p in &self.processes {
                rows.push(vec![
                    p.record.pid.to_string(),
                    if p.alive { "running" } else { "dead" }.to_owned(),
                    p.record.target.to_string(),
                    p.record.name.clone(),
                    p.record.log.display().to_string(),
                ]);
            }
            table(f, &rows)?;
        }
        if !self.annotations.is_empty() {
            writeln!(f, "\nannotations")?;
            for (k, v) in &self.annotations {
                writeln!(f, "  {k} = {v}")?;
            }
        }
        Ok(())
    }
}
