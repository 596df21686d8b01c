//! VXLAN between nodes, as Calico does it when a pool's `vxlanMode` asks for it (`Always`, or
//! `CrossSubnet` for nodes in another subnet): one device `vxlan.calico` per node with an address
//! from the node's IPAM blocks (published as `spec.ipv4VXLANTunnelAddr`, with the device's MAC as
//! `spec.vxlanTunnelMACAddr`), and for each remote node a permanent neighbour entry (its tunnel
//! address -> its MAC) and forwarding entry (its MAC -> its node address), so no learning or
//! flooding is needed; routes to its blocks go `via <its tunnel address> dev vxlan.calico onlink`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use margay_api::Kind;
use margay_datastore::{Client, Key, ipam};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::routes::NextHop;

/// The device name Calico uses.
pub const DEVICE: &str = "vxlan.calico";
/// The IPAM handle of a node's tunnel address.
fn handle(node: &str) -> String {
    format!("vxlan-tunnel-addr-{node}")
}

/// How a pool wants traffic between nodes carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Never,
    CrossSubnet,
    Always,
}

/// A node as the tunnel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub ip: Ipv4Addr,
    pub subnet: Option<Ipv4Net>,
    pub tunnel_ip: Option<Ipv4Addr>,
    pub mac: Option<String>,
}

impl Peer {
    pub fn from_node(node: &Value) -> Option<Peer> {
        let ip = crate::cache::node_ipv4(node)?;
        let subnet = node["spec"]["addresses"]
            .as_array()?
            .iter()
            .filter_map(|a| a["address"].as_str())
            .filter(|a| a.contains('/'))
            .find_map(|a| a.parse::<Ipv4Net>().ok())
            .map(|n| n.trunc());
        Some(Peer {
            ip,
            subnet,
            tunnel_ip: node["spec"]["ipv4VXLANTunnelAddr"]
                .as_str()
                .and_then(|s| s.parse().ok()),
            mac: node["spec"]["vxlanTunnelMACAddr"]
                .as_str()
                .map(str::to_owned),
        })
    }
}

/// Whether traffic to `peer` goes through the tunnel under `mode`.
pub fn tunnelled(mode: Mode, me: &Peer, peer: &Peer) -> bool {
    match mode {
        Mode::Never => false,
        Mode::Always => true,
        Mode::CrossSubnet => match (me.subnet, peer.subnet) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        },
    }
}

/// The next hop to every other node: through the tunnel when the mode says so and the peer has
/// published its tunnel address, directly otherwise.
pub fn next_hops(
    node: &str,
    mode: Mode,
    peers: &BTreeMap<String, Peer>,
) -> BTreeMap<String, NextHop> {
    let me = peers.get(node);
    peers
        .iter()
        .filter(|(name, _)| *name != node)
        .filter_map(|(name, peer)| {
            let tunnel = me.is_some_and(|me| tunnelled(mode, me, peer));
            match (tunnel, peer.tunnel_ip) {
                (true, Some(gateway)) => Some((
                    name.clone(),
                    NextHop::Tunnel {
                        gateway,
                        dev: DEVICE.to_owned(),
                    },
                )),
                // The peer has not published its tunnel address yet: no route rather than a
                // direct one its network may not carry.
                (true, None) => None,
                (false, _) => Some((name.clone(), NextHop::Direct(peer.ip))),
            }
        })
        .collect()
}

async fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn batch(program: &str, lines: &str) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new(program)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program} -batch"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(lines.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "{program} -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The device's MAC, if it exists.
async fn device_mac() -> Option<String> {
    let text = run("ip", &["-j", "link", "show", "dev", DEVICE])
        .await
        .ok()?;
    let links: Vec<Value> = serde_json::from_str(&text).ok()?;
    links.first()?["address"].as_str().map(str::to_owned)
}

/// Makes the tunnel match what is needed: when `needed`, the device exists with its address and
/// every peer's neighbour and forwarding entries, and the Node publishes its tunnel address and
/// MAC; otherwise the device and those fields are gone and the address released.
pub async fn sync(
    client: &Client,
    node: &str,
    node_ip: Ipv4Addr,
    needed: bool,
    vni: u32,
    port: u16,
    peers: &BTreeMap<String, Peer>,
) -> Result<()> {
    let key = Key::new(Kind::Node, None, node);
    if !needed {
        if device_mac().await.is_some() {
            run("ip", &["link", "del", DEVICE]).await?;
            ipam::release(client, &handle(node)).await?;
            tracing::info!("removed {DEVICE}: no pool needs VXLAN");
        }
        if peers
            .get(node)
            .is_some_and(|p| p.tunnel_ip.is_some() || p.mac.is_some())
        {
            set_node_fields(client, &key, None, None).await?;
        }
        return Ok(());
    }
    let tunnel_ip = match peers.get(node).and_then(|p| p.tunnel_ip) {
        Some(ip) => ip,
        None => {
            let labels = BTreeMap::new();
            let attrs = [
                ("node".to_owned(), node.to_owned()),
                ("type".to_owned(), "vxlanTunnelAddress".to_owned()),
            ]
            .into();
            ipam::assign(client, node, &labels, &handle(node), attrs)
                .await?
                .ip
        }
    };
    if device_mac().await.is_none() {
        run(
            "ip",
            &[
                "link",
                "add",
                DEVICE,
                "type",
                "vxlan",
                "id",
                &vni.to_string(),
                "dstport",
                &port.to_string(),
                "local",
                &node_ip.to_string(),
                "nolearning",
            ],
        )
        .await?;
        run("ip", &["link", "set", DEVICE, "mtu", "1450", "up"]).await?;
        tracing::info!(vni, port, "created {DEVICE}");
    }
    run(
        "ip",
        &["addr", "replace", &format!("{tunnel_ip}/32"), "dev", DEVICE],
    )
    .await?;
    let mac = device_mac().await.context("the VXLAN device has no MAC")?;
    let me = peers.get(node);
    if me.and_then(|p| p.tunnel_ip) != Some(tunnel_ip)
        || me.and_then(|p| p.mac.as_deref()) != Some(mac.as_str())
    {
        set_node_fields(client, &key, Some(tunnel_ip), Some(mac.clone())).await?;
    }
    let (mut neigh, mut fdb) = (String::new(), String::new());
    for (name, peer) in peers {
        if name == node {
            continue;
        }
        if let (Some(tip), Some(pmac)) = (peer.tunnel_ip, &peer.mac) {
            neigh.push_str(&format!(
                "neigh replace {tip} lladdr {pmac} dev {DEVICE} nud permanent\n"
            ));
            fdb.push_str(&format!(
                "fdb replace {pmac} dev {DEVICE} dst {} self permanent\n",
                peer.ip
            ));
        }
    }
    batch("ip", &neigh).await?;
    batch("bridge", &fdb).await?;
    Ok(())
}

async fn set_node_fields(
    client: &Client,
    key: &Key,
    tunnel_ip: Option<Ipv4Addr>,
    mac: Option<String>,
) -> Result<()> {
    client
        .modify(key, |current| {
            let mut next = current.clone();
            if let Some(spec) = next["spec"].as_object_mut() {
                match tunnel_ip {
                    Some(ip) => {
                        spec.insert("ipv4VXLANTunnelAddr".into(), ip.to_string().into());
                    }
                    None => {
                        spec.remove("ipv4VXLANTunnelAddr");
                    }
                }
                match &mac {
                    Some(m) => {
                        spec.insert("vxlanTunnelMACAddr".into(), m.clone().into());
                    }
                    None => {
                        spec.remove("vxlanTunnelMACAddr");
                    }
                }
            }
            Ok(next)
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str, subnet: &str, tunnel: Option<&str>) -> Peer {
        Peer {
            ip: ip.parse().unwrap(),
            subnet: Some(subnet.parse().unwrap()),
            tunnel_ip: tunnel.map(|t| t.parse().unwrap()),
            mac: tunnel.map(|_| "66:00:00:00:00:01".to_owned()),
        }
    }

    #[test]
    fn modes_choose_the_next_hop() {
        let peers: BTreeMap<String, Peer> = [
            (
                "node-1".to_owned(),
                peer("10.224.0.4", "10.224.0.0/16", Some("192.168.0.0")),
            ),
            (
                "node-2".to_owned(),
                peer("10.224.0.5", "10.224.0.0/16", Some("192.168.0.64")),
            ),
            (
                "node-3".to_owned(),
                peer("10.225.0.6", "10.225.0.0/16", None),
            ),
        ]
        .into();
        let never = next_hops("node-1", Mode::Never, &peers);
        assert_eq!(
            never["node-2"],
            NextHop::Direct("10.224.0.5".parse().unwrap())
        );
        let always = next_hops("node-1", Mode::Always, &peers);
        assert_eq!(
            always["node-2"],
            NextHop::Tunnel {
                gateway: "192.168.0.64".parse().unwrap(),
                dev: DEVICE.into()
            }
        );
        assert!(
            !always.contains_key("node-3"),
            "no tunnel address yet: no route"
        );
        let cross = next_hops("node-1", Mode::CrossSubnet, &peers);
        assert_eq!(
            cross["node-2"],
            NextHop::Direct("10.224.0.5".parse().unwrap())
        );
        assert!(!cross.contains_key("node-3"));
    }
}
