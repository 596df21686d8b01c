//! The pure half of WireGuard: what the node's tunnel should look like, from the cluster's
//! resources. No I/O; the driver applies the difference.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use margay_api::calico::FelixConfigurationSpec;
use margay_api::calico::ipam::IPAMBlockSpec;
use serde_json::Value;

/// The routing table our tunnel routes live in (Calico's `wireguardRoutingTableIndex`, 1 by
/// default). The policy rule at `wireguardRoutingRulePriority` sends everything not marked
/// [`FWMARK`] through it before the main table.
pub const ROUTING_TABLE: u32 = 1;

/// The mark the tunnel's own UDP packets carry, so that the rule lets them skip our table (they
/// must not be routed into the tunnel they carry). Outside kube-proxy's 0x4000 and 0x8000.
pub const FWMARK: u32 = 0x0010_0000;

/// WireGuard's overhead on IPv4: outer IP (20) + UDP (8) + WireGuard header and tag (32).
pub const IPV4_OVERHEAD: u32 = 60;

/// The IPAM handle of a node's tunnel address (Calico's).
pub fn tunnel_handle(node: &str) -> String {
    format!("wireguard-tunnel-addr-{node}")
}

/// The WireGuard settings in force on one node (its FelixConfiguration, Calico's defaults
/// applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub interface: String,
    pub port: u16,
    /// 0: the underlay's MTU minus [`IPV4_OVERHEAD`].
    pub mtu: u32,
    /// Persistent keepalive in seconds, 0 for none.
    pub keepalive: u16,
    pub rule_priority: u32,
    /// Also route traffic to the other nodes' own addresses through the tunnel.
    pub host_encryption: bool,
}

impl Settings {
    pub fn from_felix(felix: &FelixConfigurationSpec) -> Settings {
        Settings {
            enabled: felix.wireguard_enabled == Some(true),
            interface: felix
                .wireguard_interface_name
                .clone()
                .unwrap_or_else(|| "wireguard.cali".into()),
            port: felix.wireguard_listening_port.map_or(51820, |p| p.0),
            mtu: felix.wireguard_mtu.map_or(0, |m| m.0),
            keepalive: felix.wireguard_keep_alive.as_ref().map_or(0, |d| {
                d.as_duration().as_secs().min(u64::from(u16::MAX)) as u16
            }),
            rule_priority: felix.wireguard_routing_rule_priority.map_or(99, |p| p.0),
            host_encryption: felix.wireguard_host_encryption_enabled == Some(true),
        }
    }

    /// The tunnel's MTU on an underlay of `underlay_mtu`.
    pub fn effective_mtu(&self, underlay_mtu: u32) -> u32 {
        if self.mtu != 0 {
            self.mtu
        } else {
            underlay_mtu.saturating_sub(IPV4_OVERHEAD).max(576)
        }
    }
}

/// What the node needs to know of another node to peer with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    /// `status.wireguardPublicKey`.
    pub public_key: Option<String>,
    /// `spec.wireguard.interfaceIPv4Address`.
    pub tunnel_ip: Option<Ipv4Addr>,
    /// Its `wireguardListeningPort` (per-node FelixConfiguration may differ).
    pub port: u16,
}

impl NodeInfo {
    /// Reads a Node resource; `ip` and `port` come from the caller (the cache knows them).
    pub fn from_node(name: &str, node: &Value, ip: Option<Ipv4Addr>, port: u16) -> NodeInfo {
        NodeInfo {
            name: name.to_owned(),
            ip,
            public_key: node["status"]["wireguardPublicKey"]
                .as_str()
                .map(str::to_owned),
            tunnel_ip: node["spec"]["wireguard"]["interfaceIPv4Address"]
                .as_str()
                .and_then(|s| s.split('/').next()?.parse().ok()),
            port,
        }
    }
}

/// One peer of the tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    /// Base64, as published.
    pub public_key: String,
    pub endpoint: SocketAddrV4,
    /// The peer's blocks, its tunnel address (when not inside one of them) and, with host
    /// encryption, its own address: what it may send us and what we route to it.
    pub allowed_ips: BTreeSet<Ipv4Net>,
    pub keepalive: u16,
    pub tunnel_ip: Option<Ipv4Addr>,
}

/// Every other node with a usable key becomes a peer. Nodes without a key (WireGuard off there,
/// or it cannot run it) are left out: they are reached in the clear, through the main table.
/// Returns the peers by public key, and why any node with a key was left out.
pub fn desired_peers(
    me: &str,
    my_key: &str,
    nodes: &[NodeInfo],
    blocks: &BTreeMap<Ipv4Net, String>,
    settings: &Settings,
) -> (BTreeMap<String, Peer>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nodes {
        if let Some(k) = n.public_key.as_deref() {
            *seen.entry(k).or_default() += 1;
        }
    }
    let mut peers = BTreeMap::new();
    for n in nodes {
        if n.name == me {
            continue;
        }
        let Some(key) = n.public_key.as_deref() else {
            continue;
        };
        if super::key::base64_to_hex(key).is_none() {
            warnings.push(format!("node {}: {key:?} is not a WireGuard key", n.name));
            continue;
        }
        if key == my_key || seen.get(key).copied().unwrap_or(0) > 1 {
            // Two nodes with one key (a cloned disk): neither can be told apart, so neither is
            // a peer (Calico does the same) until one of them makes a new key.
            warnings.push(format!(
                "node {} publishes a public key another node also has; not peering with it",
                n.name
            ));
            continue;
        }
        let Some(ip) = n.ip else {
            warnings.push(format!("node {} has a key but no address yet", n.name));
            continue;
        };
        let own: Vec<Ipv4Net> = blocks
            .iter()
            .filter(|(_, owner)| **owner == n.name)
            .map(|(cidr, _)| *cidr)
            .collect();
        let mut allowed_ips: BTreeSet<Ipv4Net> = own.iter().copied().collect();
        if let Some(t) = n.tunnel_ip
            && !own.iter().any(|b| b.contains(&t))
        {
            allowed_ips.insert(Ipv4Net::from(t));
        }
        // Always the node's own address too: the BPF dataplane's tunnel between nodes (VXLAN
        // from node address to node address) goes through WireGuard. It is *routed* into the
        // tunnel only with host encryption (see `desired_routes`).
        allowed_ips.insert(Ipv4Net::from(ip));
        peers.insert(
            key.to_owned(),
            Peer {
                node: n.name.clone(),
                public_key: key.to_owned(),
                endpoint: SocketAddrV4::new(ip, n.port),
                allowed_ips,
                keepalive: settings.keepalive,
                tunnel_ip: n.tunnel_ip,
            },
        );
    }
    (peers, warnings)
}

/// The routes of our table: each peer's allowed IPs, through the tunnel device; the peer's own
/// address only with host encryption (without it, host traffic stays in the clear and only the
/// BPF programs send into the tunnel to that address).
pub fn desired_routes(peers: &BTreeMap<String, Peer>, host_encryption: bool) -> BTreeSet<Ipv4Net> {
    peers
        .values()
        .flat_map(|p| {
            let node = Ipv4Net::from(*p.endpoint.ip());
            p.allowed_ips
                .iter()
                .copied()
                .filter(move |n| host_encryption || *n != node)
        })
        .collect()
}

/// What to change in the device's peers: keys to remove, peers to add. boringtun cannot modify
/// a peer in place (it panics), so a changed peer is removed and added again.
pub fn peer_changes<'a>(
    current: &'a BTreeMap<String, Peer>,
    desired: &'a BTreeMap<String, Peer>,
) -> (Vec<&'a str>, Vec<&'a Peer>) {
    let remove = current
        .iter()
        .filter(|(k, p)| desired.get(*k) != Some(*p))
        .map(|(k, _)| k.as_str())
        .collect();
    let add = desired
        .iter()
        .filter(|(k, p)| current.get(*k) != Some(*p))
        .map(|(_, p)| p)
        .collect();
    (remove, add)
}

// === the configuration protocol (UAPI), as wireguard-go and boringtun speak it ===

/// The device's own settings. `replace_peers` starts from no peers (a new or adopted device).
pub fn uapi_device(secret_hex: &str, port: u16, fwmark: u32) -> String {
    format!(
        "set=1\nprivate_key={secret_hex}\nlisten_port={port}\nfwmark={fwmark}\nreplace_peers=true\n\n"
    )
}

/// Adds one peer. One peer per request: boringtun carries a section's settings over into the
/// next section of the same request.
pub fn uapi_add_peer(peer: &Peer) -> Option<String> {
    let key = super::key::base64_to_hex(&peer.public_key)?;
    let mut text = format!(
        "set=1\npublic_key={key}\nremove=false\nendpoint={}\n",
        peer.endpoint
    );
    if peer.keepalive > 0 {
        text.push_str(&format!(
            "persistent_keepalive_interval={}\n",
            peer.keepalive
        ));
    }
    for net in &peer.allowed_ips {
        text.push_str(&format!("allowed_ip={net}\n"));
    }
    text.push('\n');
    Some(text)
}

/// Removes one peer.
pub fn uapi_remove_peer(public_key: &str) -> Option<String> {
    let key = super::key::base64_to_hex(public_key)?;
    Some(format!("set=1\npublic_key={key}\nremove=true\n\n"))
}

/// The address `handle` holds in one of `blocks` (IPAMBlock specs), if any.
pub fn find_allocation<'a>(
    blocks: impl IntoIterator<Item = &'a Value>,
    handle: &str,
) -> Option<Ipv4Addr> {
    blocks.into_iter().find_map(|spec| {
        let spec: IPAMBlockSpec = serde_json::from_value(spec.clone()).ok()?;
        let attr = spec
            .attributes
            .iter()
            .position(|a| a.handle_id.as_deref() == Some(handle))? as u32;
        let ordinal = spec.allocations.iter().position(|a| *a == Some(attr))? as u32;
        spec.address(ordinal)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const K1: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const K2: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
    const K3: &str = "XkAfSzcb/9mVuLRYIlQvr7pgs1ZjHwbe9NRzyRpKqUQ=";

    fn node(name: &str, ip: &str, key: Option<&str>, tunnel: Option<&str>) -> NodeInfo {
        let value = json!({
            "spec": {"wireguard": tunnel.map(|t| json!({"interfaceIPv4Address": t}))},
            "status": {"wireguardPublicKey": key},
        });
        NodeInfo::from_node(name, &value, ip.parse().ok(), 51820)
    }

    fn blocks() -> BTreeMap<Ipv4Net, String> {
        [
            ("10.244.0.0/26", "node-1"),
            ("10.244.0.64/26", "node-2"),
            ("10.244.0.128/26", "node-3"),
            ("10.244.0.192/26", "node-2"),
        ]
        .into_iter()
        .map(|(c, n)| (c.parse().unwrap(), n.to_owned()))
        .collect()
    }

    fn settings() -> Settings {
        Settings::from_felix(&FelixConfigurationSpec::default())
    }

    #[test]
    fn defaults_are_calicos() {
        let s = settings();
        assert!(!s.enabled);
        assert_eq!(s.interface, "wireguard.cali");
        assert_eq!(
            (s.port, s.mtu, s.keepalive, s.rule_priority),
            (51820, 0, 0, 99)
        );
        assert_eq!(s.effective_mtu(1500), 1440);
        assert_eq!(
            Settings { mtu: 1400, ..s }.effective_mtu(1500),
            1400,
            "an explicit MTU wins"
        );
    }

    #[test]
    fn peers_are_the_other_nodes_with_keys() {
        let nodes = vec![
            node("node-1", "10.224.0.4", Some(K1), Some("10.244.0.0")),
            node("node-2", "10.224.0.5", Some(K2), Some("10.244.0.64")),
            // No key: WireGuard off there, reached in the clear.
            node("node-3", "10.224.0.6", None, None),
        ];
        let (peers, warnings) = desired_peers("node-1", K1, &nodes, &blocks(), &settings());
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(peers.len(), 1);
        let p = &peers[K2];
        assert_eq!(p.node, "node-2");
        assert_eq!(p.endpoint.to_string(), "10.224.0.5:51820");
        // Both of node-2's blocks (its tunnel address is inside the first, so no extra /32),
        // and its own address for the BPF tunnel between nodes, which is not routed.
        assert_eq!(
            p.allowed_ips
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["10.224.0.5/32", "10.244.0.64/26", "10.244.0.192/26"]
        );
        assert_eq!(
            desired_routes(&peers, false)
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["10.244.0.64/26", "10.244.0.192/26"]
        );
    }

    #[test]
    fn host_encryption_adds_node_addresses_and_keepalive_is_carried() {
        let nodes = vec![node("node-2", "10.224.0.5", Some(K2), Some("10.99.0.1"))];
        let s = Settings {
            host_encryption: true,
            keepalive: 25,
            ..settings()
        };
        let (peers, _) = desired_peers("node-1", K1, &nodes, &blocks(), &s);
        let p = &peers[K2];
        assert!(p.allowed_ips.contains(&"10.224.0.5/32".parse().unwrap()));
        assert!(desired_routes(&peers, true).contains(&"10.224.0.5/32".parse().unwrap()));
        // A tunnel address outside the node's blocks gets its own /32.
        assert!(p.allowed_ips.contains(&"10.99.0.1/32".parse().unwrap()));
        let text = uapi_add_peer(p).unwrap();
        assert!(
            text.contains("persistent_keepalive_interval=25\n"),
            "{text}"
        );
    }

    #[test]
    fn duplicate_and_bad_keys_and_addressless_nodes_are_left_out() {
        let nodes = vec![
            node("node-2", "10.224.0.5", Some(K2), None),
            node("node-3", "10.224.0.6", Some(K2), None),
            node("node-4", "10.224.0.7", Some("short"), None),
            node("node-5", "", Some(K3), None),
            node("node-6", "10.224.0.9", Some(K1), None),
        ];
        let (peers, warnings) = desired_peers("node-1", K1, &nodes, &blocks(), &settings());
        assert!(peers.is_empty(), "{peers:?}");
        assert_eq!(warnings.len(), 5, "{warnings:?}");
    }

    #[test]
    fn uapi_text_is_what_boringtun_parses() {
        let nodes = vec![node("node-2", "10.224.0.5", Some(K2), Some("10.244.0.64"))];
        let (peers, _) = desired_peers("node-1", K1, &nodes, &blocks(), &settings());
        assert_eq!(
            uapi_add_peer(&peers[K2]).unwrap(),
            "set=1\npublic_key=de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f\n\
             remove=false\nendpoint=10.224.0.5:51820\nallowed_ip=10.224.0.5/32\n\
             allowed_ip=10.244.0.64/26\nallowed_ip=10.244.0.192/26\n\n"
        );
        assert_eq!(
            uapi_remove_peer(K2).unwrap(),
            "set=1\npublic_key=de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f\nremove=true\n\n"
        );
        assert!(uapi_device("ab", 51820, FWMARK).contains("fwmark=1048576\n"));
    }

    #[test]
    fn changed_peers_are_removed_and_added_again() {
        let nodes = vec![
            node("node-2", "10.224.0.5", Some(K2), None),
            node("node-3", "10.224.0.6", Some(K3), None),
        ];
        let (before, _) = desired_peers("node-1", K1, &nodes, &blocks(), &settings());
        let mut more = blocks();
        more.insert("10.244.1.0/26".parse().unwrap(), "node-3".into());
        let (after, _) = desired_peers("node-1", K1, &nodes[1..], &more, &settings());
        let (remove, add) = peer_changes(&before, &after);
        assert_eq!(remove, [K2, K3]);
        assert_eq!(
            add.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(),
            ["node-3"]
        );
        let (remove, add) = peer_changes(&after, &after);
        assert!(remove.is_empty() && add.is_empty());
    }

    #[test]
    fn the_tunnel_address_is_found_by_its_handle() {
        let block = json!({
            "cidr": "10.244.0.64/26",
            "affinity": "host:node-2",
            "allocations": [0, null, 1],
            "unallocated": [1],
            "attributes": [
                {"handle_id": "k8s-pod-network.abc"},
                {"handle_id": "wireguard-tunnel-addr-node-2"}
            ]
        });
        assert_eq!(
            find_allocation([&block], &tunnel_handle("node-2")),
            Some("10.244.0.66".parse().unwrap())
        );
        assert_eq!(find_allocation([&block], &tunnel_handle("node-1")), None);
    }
}
