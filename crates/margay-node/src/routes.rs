//! Routes between nodes: each node's IPAM blocks are reached through that node.
//!
//! The calculation is pure ([`desired_routes`]); the driver ([`RouteDriver`]) reads the routes it
//! owns (marked with routing protocol [`ROUTE_PROTOCOL`], as Calico marks its own) and applies the
//! difference with one `ip -batch` process per sync, the way the iptables driver uses one
//! `iptables-restore`: one process, all changes, no per-route forks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The routing protocol number our routes carry (Calico's Felix uses 80 too), so that we only
/// ever touch routes we made.
pub const ROUTE_PROTOCOL: u8 = 80;

/// One route the node should have.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    /// A remote node's block, through that node.
    Via { dst: Ipv4Net, gateway: Ipv4Addr },
    /// A remote node's block, through a tunnel device (VXLAN) to that node's tunnel address.
    Tunnel {
        dst: Ipv4Net,
        gateway: Ipv4Addr,
        dev: String,
    },
    /// One of our own blocks: addresses in it that no local pod holds are dropped here rather
    /// than sent out of the default route (Calico does the same).
    Blackhole { dst: Ipv4Net },
}

impl Route {
    pub fn dst(&self) -> Ipv4Net {
        match self {
            Route::Via { dst, .. } | Route::Tunnel { dst, .. } | Route::Blackhole { dst } => *dst,
        }
    }
}

/// How to reach another node's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// Directly over the network between nodes, via the node's address.
    Direct(Ipv4Addr),
    /// Through a tunnel device, via the node's tunnel address.
    Tunnel { gateway: Ipv4Addr, dev: String },
}

/// Blocks by node, and how to reach each node, to routes for `node`. A node with no next hop
/// yet (no address published) gets no route rather than a wrong one.
pub fn desired_routes(
    node: &str,
    blocks: &BTreeMap<Ipv4Net, String>,
    next_hops: &BTreeMap<String, NextHop>,
) -> BTreeSet<Route> {
    blocks
        .iter()
        .filter_map(|(dst, owner)| {
            if owner == node {
                return Some(Route::Blackhole { dst: *dst });
            }
            match next_hops.get(owner)? {
                NextHop::Direct(gateway) => Some(Route::Via {
                    dst: *dst,
                    gateway: *gateway,
                }),
                NextHop::Tunnel { gateway, dev } => Some(Route::Tunnel {
                    dst: *dst,
                    gateway: *gateway,
                    dev: dev.clone(),
                }),
            }
        })
        .collect()
}

/// Applies routes in the agent's network namespace.
#[derive(Debug, Default)]
pub struct RouteDriver {}

impl RouteDriver {
    /// The routes of ours that the kernel has now.
    pub async fn current(&self) -> Result<BTreeSet<Route>> {
        let out = Command::new("ip")
            .args(["-4", "-j", "route", "show", "table", "main", "proto"])
            .arg(ROUTE_PROTOCOL.to_string())
            .output()
            .await
            .context("cannot run ip route show")?;
        if !out.status.success() {
            bail!(
                "ip route show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let listed: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).context("cannot parse ip -j route output")?;
        let mut routes = BTreeSet::new();
        for r in listed {
            let Some(dst) = r["dst"].as_str().and_then(parse_dst) else {
                continue;
            };
            let onlink = r["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "onlink"));
            if r["type"] == "blackhole" {
                routes.insert(Route::Blackhole { dst });
            } else if let Some(gateway) = r["gateway"].as_str().and_then(|g| g.parse().ok()) {
                match r["dev"].as_str() {
                    Some(dev) if onlink => routes.insert(Route::Tunnel {
                        dst,
                        gateway,
                        dev: dev.to_owned(),
                    }),
                    _ => routes.insert(Route::Via { dst, gateway }),
                };
            }
        }
        Ok(routes)
    }

    /// Makes our routes equal `desired`; returns how many routes changed.
    pub async fn apply(&self, desired: &BTreeSet<Route>) -> Result<usize> {
        let current = self.current().await?;
        let mut batch = String::new();
        let proto = ROUTE_PROTOCOL;
        let desired_dsts: BTreeSet<Ipv4Net> = desired.iter().map(Route::dst).collect();
        for stale in current.difference(desired) {
            // A route whose destination stays is replaced below; only remove the others.
            if !desired_dsts.contains(&stale.dst()) {
                match stale {
                    Route::Via { dst, .. } | Route::Tunnel { dst, .. } => {
                        batch.push_str(&format!("route del {dst} proto {proto}\n"))
                    }
                    Route::Blackhole { dst } => {
                        batch.push_str(&format!("route del blackhole {dst} proto {proto}\n"))
                    }
                }
            }
        }
        for new in desired.difference(&current) {
            match new {
                Route::Via { dst, gateway } => batch.push_str(&format!(
                    "route replace {dst} via {gateway} proto {proto}\n"
                )),
                Route::Tunnel { dst, gateway, dev } => batch.push_str(&format!(
                    "route replace {dst} via {gateway} dev {dev} onlink proto {proto}\n"
                )),
                Route::Blackhole { dst } => {
                    batch.push_str(&format!("route replace blackhole {dst} proto {proto}\n"))
                }
            }
        }
        if batch.is_empty() {
            return Ok(0);
        }
        let changes = batch.lines().count();
        let mut child = Command::new("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run ip -batch")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(batch.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "ip -batch failed: {} (batch was: {})",
                String::from_utf8_lossy(&out.stderr).trim(),
                batch.replace('\n', "; ")
            );
        }
        Ok(changes)
    }

    /// Removes every route we own (used when the agent is told to clean up).
    pub async fn cleanup(&self) -> Result<usize> {
        self.apply(&BTreeSet::new()).await
    }
}

fn parse_dst(text: &str) -> Option<Ipv4Net> {
    if text.contains('/') {
        text.parse().ok()
    } else {
        text.parse::<Ipv4Addr>().ok().map(Ipv4Net::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_blocks_route_via_their_node_and_own_blocks_blackhole() {
        let blocks: BTreeMap<Ipv4Net, String> = [
            ("192.168.0.0/26".parse().unwrap(), "node-1".to_owned()),
            ("192.168.0.64/26".parse().unwrap(), "node-2".to_owned()),
            ("192.168.0.128/26".parse().unwrap(), "node-3".to_owned()),
        ]
        .into();
        let ips: BTreeMap<String, NextHop> = [
            (
                "node-1".to_owned(),
                NextHop::Direct("10.224.0.4".parse().unwrap()),
            ),
            (
                "node-2".to_owned(),
                NextHop::Direct("10.224.0.5".parse().unwrap()),
            ),
        ]
        .into();
        let routes = desired_routes("node-1", &blocks, &ips);
        assert_eq!(
            routes.into_iter().collect::<Vec<_>>(),
            vec![
                Route::Via {
                    dst: "192.168.0.64/26".parse().unwrap(),
                    gateway: "10.224.0.5".parse().unwrap()
                },
                // node-3 has no address yet: no route rather than a wrong one.
                Route::Blackhole {
                    dst: "192.168.0.0/26".parse().unwrap()
                },
            ]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
    }
}
