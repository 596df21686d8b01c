//! The lab's wiring as `ip -batch` lines and sysctl settings, per namespace. Pure functions: the
//! golden tests below pin exactly what the kernel is asked to do, without root.
//!
//! ```text
//!   <lab>-client          <lab>-router                 <lab>-underlay            <lab>-node-K
//!   eth0 203.0.113.10 ── eth1 203.0.113.1
//!                         eth0 10.224.0.1  ─────────── rtr ─┐
//!                                                            br0
//!                                                      nK ──┘ ─────────────────── eth0 10.224.0.(3+K)
//! ```

use std::net::Ipv4Addr;

use crate::config::{LabConfig, LbMode};
use crate::naming::{POD_GATEWAY, ROUTER_UNDERLAY_PORT, UNDERLAY_BRIDGE, netns_name};
use crate::state::NodeState;

/// A sysctl key and value.
pub type Sysctl = (String, String);

fn sysctl(key: &str, value: &str) -> Sysctl {
    (key.to_owned(), value.to_owned())
}

/// The names of the fixed namespaces: (underlay, router, client).
pub fn fixed_netns(lab: &str) -> [String; 3] {
    [
        netns_name(lab, "underlay"),
        netns_name(lab, "router"),
        netns_name(lab, "client"),
    ]
}

/// The node that takes slot `slot`.
pub fn node_state(
    lab: &str,
    config: &LabConfig,
    name: &str,
    slot: u32,
) -> crate::Result<NodeState> {
    Ok(NodeState {
        name: name.to_owned(),
        netns: netns_name(lab, name),
        ip: config.node_ip(slot)?,
        slot,
        underlay_veth: format!("n{slot}"),
    })
}

/// In the underlay namespace: the bridge, the router's port, and the router-client link (created
/// from here directly into the router's and the client's namespaces).
pub fn underlay_base_lines(lab: &str, config: &LabConfig) -> Vec<String> {
    let [_, router, client] = fixed_netns(lab);
    let mtu = config.underlay_mtu;
    vec![
        "link set lo up".to_owned(),
        format!("link add {UNDERLAY_BRIDGE} mtu {mtu} type bridge"),
        format!("link set {UNDERLAY_BRIDGE} up"),
        format!(
            "link add {ROUTER_UNDERLAY_PORT} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {router}"
        ),
        format!("link set {ROUTER_UNDERLAY_PORT} master {UNDERLAY_BRIDGE} up"),
        format!("link add eth1 netns {router} type veth peer name eth0 netns {client}"),
    ]
}

/// In the underlay namespace: a node's port on the bridge and its `eth0`.
pub fn underlay_node_lines(config: &LabConfig, node: &NodeState) -> Vec<String> {
    let mtu = config.underlay_mtu;
    let port = &node.underlay_veth;
    vec![
        format!(
            "link add {port} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {}",
            node.netns
        ),
        format!("link set {port} master {UNDERLAY_BRIDGE} up"),
    ]
}

/// In the router namespace: addresses on both sides, and the LoadBalancer route.
pub fn router_lines(config: &LabConfig, lb_mode: &LbMode, nodes: &[NodeState]) -> Vec<String> {
    let mut lines = vec![
        "link set lo up".to_owned(),
        format!(
            "addr add {}/{} dev eth0",
            config.router_underlay_ip,
            config.underlay.prefix_len()
        ),
        "link set eth0 up".to_owned(),
        format!(
            "addr add {}/{} dev eth1",
            config.router_internet_ip,
            config.internet.prefix_len()
        ),
        "link set eth1 up".to_owned(),
    ];
    if let LbRoute::Replace(line) = lb_route(config, lb_mode, nodes) {
        lines.push(line);
    }
    lines
}

/// The router forwards, hashes multipath on L4, and does not filter by reverse path (replies
/// from a node other than the one a route points to, as with DSR, must pass).
pub fn router_sysctls() -> Vec<Sysctl> {
    vec![
        sysctl("net.ipv4.ip_forward", "1"),
        sysctl("net.ipv4.fib_multipath_hash_policy", "1"),
        sysctl("net.ipv4.conf.all.rp_filter", "0"),
        sysctl("net.ipv4.conf.default.rp_filter", "0"),
    ]
}

/// In the client namespace: its address and default route via the router.
pub fn client_lines(config: &LabConfig) -> Vec<String> {
    vec![
        "link set lo up".to_owned(),
        format!(
            "addr add {}/{} dev eth0",
            config.client_ip,
            config.internet.prefix_len()
        ),
        "link set eth0 up".to_owned(),
        format!(
            "route add default via {} dev eth0",
            config.router_internet_ip
        ),
    ]
}

/// In a node namespace: its underlay address and default route via the router.
pub fn node_lines(config: &LabConfig, node: &NodeState) -> Vec<String> {
    vec![
        "link set lo up".to_owned(),
        format!(
            "addr add {}/{} dev eth0",
            node.ip,
            config.underlay.prefix_len()
        ),
        "link set eth0 up".to_owned(),
        format!(
            "route add default via {} dev eth0",
            config.router_underlay_ip
        ),
    ]
}

/// A node forwards (it routes for its pods) and does not filter by reverse path.
pub fn node_sysctls() -> Vec<Sysctl> {
    vec![
        sysctl("net.ipv4.ip_forward", "1"),
        sysctl("net.ipv4.conf.all.rp_filter", "0"),
        sysctl("net.ipv4.conf.default.rp_filter", "0"),
        sysctl("net.ipv4.conf.eth0.rp_filter", "0"),
    ]
}

/// What the router's LoadBalancer route should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbRoute {
    /// `route replace <pool> ...`: an `ip -batch` line.
    Replace(String),
    /// No node to send to: the route must be absent (`route del <pool>`, missing is fine).
    Absent(String),
}

/// The router's route for the LoadBalancer pool, given the mode and the nodes (in slot order).
pub fn lb_route(config: &LabConfig, lb_mode: &LbMode, nodes: &[NodeState]) -> LbRoute {
    let pool = config.lb_pool;
    let targets: Vec<Ipv4Addr> = match lb_mode {
        LbMode::Ecmp => nodes.iter().map(|n| n.ip).collect(),
        LbMode::Node(name) => nodes
            .iter()
            .filter(|n| &n.name == name)
            .map(|n| n.ip)
            .collect(),
    };
    match targets.as_slice() {
        [] => LbRoute::Absent(format!("route del {pool}")),
        [one] => LbRoute::Replace(format!(
            "route replace {pool} proto static via {one} dev eth0"
        )),
        many => {
            let hops: Vec<String> = many
                .iter()
                .map(|ip| format!("nexthop via {ip} dev eth0"))
                .collect();
            LbRoute::Replace(format!(
                "route replace {pool} proto static {}",
                hops.join(" ")
            ))
        }
    }
}

/// In the node namespace: the host end of a pod's veth (its peer goes straight into the pod's
/// namespace as `eth0`) and the /32 route to the pod.
pub fn pod_host_lines(pod_netns: &str, host_veth: &str, pod_ip: Ipv4Addr, mtu: u32) -> Vec<String> {
    vec![
        format!(
            "link add {host_veth} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {pod_netns}"
        ),
        format!("link set {host_veth} up"),
        format!("route add {pod_ip}/32 dev {host_veth} scope link"),
    ]
}

/// Proxy ARP on the host end, answering at once, so the pod resolves 169.254.1.1 to it (as
/// Calico's CNI does). Keys use '/' so interface names with dots stay one component.
pub fn pod_host_sysctls(host_veth: &str) -> Vec<Sysctl> {
    vec![
        sysctl(&format!("net/ipv4/conf/{host_veth}/proxy_arp"), "1"),
        sysctl(&format!("net/ipv4/neigh/{host_veth}/proxy_delay"), "0"),
    ]
}

/// In the pod namespace: the /32 address and the route via the link-local gateway.
pub fn pod_lines(pod_ip: Ipv4Addr) -> Vec<String> {
    vec![
        "link set lo up".to_owned(),
        format!("addr add {pod_ip}/32 dev eth0"),
        "link set eth0 up".to_owned(),
        format!("route add {POD_GATEWAY} dev eth0 scope link"),
        format!("route add default via {POD_GATEWAY} dev eth0"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(config: &LabConfig) -> Vec<NodeState> {
        config
            .nodes
            .iter()
            .zip(1..)
            .map(|(n, slot)| node_state("lab", config, n, slot).unwrap())
            .collect()
    }

    #[test]
    fn underlay_wiring() {
        let config = LabConfig::new("lab", 2);
        assert_eq!(
            underlay_base_lines("lab", &config),
            [
                "link set lo up",
                "link add br0 mtu 1500 type bridge",
                "link set br0 up",
                "link add rtr mtu 1500 type veth peer name eth0 mtu 1500 netns lab-router",
                "link set rtr master br0 up",
                "link add eth1 netns lab-router type veth peer name eth0 netns lab-client",
            ]
        );
        let n = nodes(&config);
        assert_eq!(n[1].netns, "lab-node-2");
        assert_eq!(n[1].ip, Ipv4Addr::new(10, 224, 0, 5));
        assert_eq!(
            underlay_node_lines(&config, &n[1]),
            [
                "link add n2 mtu 1500 type veth peer name eth0 mtu 1500 netns lab-node-2",
                "link set n2 master br0 up",
            ]
        );
        assert_eq!(
            node_lines(&config, &n[1]),
            [
                "link set lo up",
                "addr add 10.224.0.5/16 dev eth0",
                "link set eth0 up",
                "route add default via 10.224.0.1 dev eth0",
            ]
        );
        assert_eq!(
            client_lines(&config),
            [
                "link set lo up",
                "addr add 203.0.113.10/24 dev eth0",
                "link set eth0 up",
                "route add default via 203.0.113.1 dev eth0",
            ]
        );
    }

    #[test]
    fn lb_routes() {
        let config = LabConfig::new("lab", 3);
        let n = nodes(&config);
        assert_eq!(
            lb_route(&config, &LbMode::Ecmp, &n),
            LbRoute::Replace(
                "route replace 198.51.100.0/24 proto static nexthop via 10.224.0.4 dev eth0 \
                 nexthop via 10.224.0.5 dev eth0 nexthop via 10.224.0.6 dev eth0"
                    .into()
            )
        );
        assert_eq!(
            lb_route(&config, &LbMode::Node("node-2".into()), &n),
            LbRoute::Replace(
                "route replace 198.51.100.0/24 proto static via 10.224.0.5 dev eth0".into()
            )
        );
        assert_eq!(
            lb_route(&config, &LbMode::Ecmp, &n[..1]),
            LbRoute::Replace(
                "route replace 198.51.100.0/24 proto static via 10.224.0.4 dev eth0".into()
            )
        );
        assert_eq!(
            lb_route(&config, &LbMode::Node("gone".into()), &n),
            LbRoute::Absent("route del 198.51.100.0/24".into())
        );
        assert_eq!(
            lb_route(&config, &LbMode::Ecmp, &[]),
            LbRoute::Absent("route del 198.51.100.0/24".into())
        );
        assert_eq!(
            router_lines(&config, &LbMode::Ecmp, &[]),
            [
                "link set lo up",
                "addr add 10.224.0.1/16 dev eth0",
                "link set eth0 up",
                "addr add 203.0.113.1/24 dev eth1",
                "link set eth1 up",
            ]
        );
    }

    #[test]
    fn pod_wiring() {
        let ip = Ipv4Addr::new(10, 244, 1, 5);
        assert_eq!(
            pod_host_lines("lab-pod-0011aabb", "cali0123456789a", ip, 1450),
            [
                "link add cali0123456789a mtu 1450 type veth peer name eth0 mtu 1450 netns lab-pod-0011aabb",
                "link set cali0123456789a up",
                "route add 10.244.1.5/32 dev cali0123456789a scope link",
            ]
        );
        assert_eq!(
            pod_lines(ip),
            [
                "link set lo up",
                "addr add 10.244.1.5/32 dev eth0",
                "link set eth0 up",
                "route add 169.254.1.1 dev eth0 scope link",
                "route add default via 169.254.1.1 dev eth0",
            ]
        );
        assert_eq!(
            pod_host_sysctls("cali0123456789a")[0],
            (
                "net/ipv4/conf/cali0123456789a/proxy_arp".to_owned(),
                "1".to_owned()
            )
        );
    }
}
