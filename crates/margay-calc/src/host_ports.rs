//! Pods' `hostPort`s (Installation `spec.calicoNetwork.hostPorts: Enabled`, Calico's default):
//! a container port reachable at its node's address, from anywhere, keeping the client's address.
//!
//! - [`host_ports`]: the mappings of this node's pods, from the Pod resources.
//! - Iptables dataplane: [`Ruleset::add_host_ports`] writes the chains of the CNI `portmap`
//!   plugin, which Calico's CNI chains for hostPorts, so `iptables-save | grep CNI-HOSTPORT` reads
//!   as on a Calico node (design: `docs/design/iptables.md`).
//! - BPF dataplane: [`host_port_nat_services`] turns them into NAT frontends `nodeIP:hostPort`
//!   with the pod as their only (local) backend, merged with the Services' by
//!   `margay-dataplane::bpf` (design: `docs/design/services-nat.md`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest, Sha256};

use crate::bpf_nat::{Backend, FrontendKey, NatService, Proto};
use crate::model::{Jump, Ruleset, comment};

/// One `hostPort` of a pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostPort {
    /// `namespace/name` of the pod (portmap's "container id").
    pub pod: String,
    pub proto: Proto,
    pub host_port: u16,
    /// `hostIP`: only this node address answers; `None` (unset or `0.0.0.0`): every one.
    pub host_ip: Option<Ipv4Addr>,
    pub pod_ip: Ipv4Addr,
    pub container_port: u16,
}

/// The hostPorts of the pods running on `node` that have an IPv4 address, in (pod, protocol,
/// hostPort) order. Host-network pods are left out (their containers bind the node's port
/// themselves), and so are finished pods, SCTP ports and ports out of range.
pub fn host_ports(pods: &[Pod], node: &str) -> Vec<HostPort> {
    let mut out = Vec::new();
    for pod in pods {
        let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else {
            continue;
        };
        if spec.node_name.as_deref() != Some(node) || spec.host_network == Some(true) {
            continue;
        }
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let Some(pod_ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) else {
            continue;
        };
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        for port in spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
        {
            let (Some(host_port), Ok(container_port)) = (
                port.host_port.and_then(|p| u16::try_from(p).ok()),
                u16::try_from(port.container_port),
            ) else {
                continue;
            };
            if host_port == 0 || container_port == 0 {
                continue;
            }
            let proto = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                _ => continue,
            };
            let host_ip = port
                .host_ip
                .as_deref()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                .filter(|ip| !ip.is_unspecified());
            out.push(HostPort {
                pod: name.clone(),
                pod_ip,
                host_ip,
                host_port,
                container_port,
                proto,
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

/// portmap's chains (nat table).
pub const HOSTPORT_DNAT_CHAIN: &str = "CNI-HOSTPORT-DNAT";
pub const HOSTPORT_SETMARK_CHAIN: &str = "CNI-HOSTPORT-SETMARK";
pub const HOSTPORT_MASQ_CHAIN: &str = "CNI-HOSTPORT-MASQ";
/// Prefix of the per-pod chains.
pub const HOSTPORT_POD_CHAIN_PREFIX: &str = "CNI-DN-";
/// The CNI network name portmap puts in its chain names and comments (Calico's).
pub const CNI_NETWORK: &str = "k8s-pod-network";
/// portmap's default masquerade mark (bit 13), distinct from kube-proxy's 0x4000.
pub const HOSTPORT_MASQ_MARK: u32 = 0x2000;

/// The per-pod chain: `CNI-DN-` and the first 21 hex digits of a SHA-256 over the network name
/// and the pod (portmap hashes the network name and the container id, SHA-512, to the same
/// 28-character limit of iptables chain names).
pub fn pod_chain(pod: &str) -> String {
    let digest = Sha256::digest(format!("{CNI_NETWORK}{pod}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{HOSTPORT_POD_CHAIN_PREFIX}{}", &hex[..21])
}

impl Ruleset {
    /// Adds portmap's chains for `ports` (nothing when empty, so the driver removes them when the
    /// last hostPort goes or hostPorts are Disabled):
    ///
    /// ```text
    /// PREROUTING, OUTPUT: -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
    /// CNI-HOSTPORT-DNAT:  -p tcp -m comment --comment "dnat name: k8s-pod-network id: ns/pod"
    ///                        -m multiport --dports 8080,8443 -j CNI-DN-<hash>   (per pod, protocol)
    /// CNI-DN-<hash>:      -s podIP [-d hostIP] -p tcp --dport H -j CNI-HOSTPORT-SETMARK (hairpin)
    ///                     -s 127.0.0.1 [-d hostIP] -p tcp --dport H -j CNI-HOSTPORT-SETMARK
    ///                     [-d hostIP] -p tcp --dport H -j DNAT --to-destination podIP:C
    /// CNI-HOSTPORT-SETMARK: -j MARK --set-xmark 0x2000/0x2000
    /// POSTROUTING:        -j CNI-HOSTPORT-MASQ; CNI-HOSTPORT-MASQ: --mark 0x2000 -j MASQUERADE
    /// ```
    ///
    /// Traffic from outside keeps its source address: only a pod reaching itself and localhost
    /// clients are masqueraded (their replies must come back through this node's NAT).
    pub fn add_host_ports(&mut self, ports: &[HostPort]) {
        if ports.is_empty() {
            return;
        }
        let mut by_pod: BTreeMap<(&str, Proto), Vec<&HostPort>> = BTreeMap::new();
        for p in ports {
            by_pod.entry((p.pod.as_str(), p.proto)).or_default().push(p);
        }
        let nat = &mut self.nat;
        nat.chain_mut(HOSTPORT_DNAT_CHAIN);
        for ((pod, proto), list) in &by_pod {
            let chain = pod_chain(pod);
            let mut dports: Vec<u16> = list.iter().map(|p| p.host_port).collect();
            dports.sort_unstable();
            dports.dedup();
            // multiport takes at most 15 ports per rule.
            for group in dports.chunks(15) {
                let list: Vec<String> = group.iter().map(u16::to_string).collect();
                nat.push(
                    HOSTPORT_DNAT_CHAIN,
                    format!(
                        "-p {proto} {} -m multiport --dports {} -j {chain}",
                        comment(&format!("dnat name: {CNI_NETWORK} id: {pod}")),
                        list.join(",")
                    ),
                );
            }
            for p in list {
                // iptables-save prints -s before -d before -p.
                let dst = p
                    .host_ip
                    .map(|ip| format!(" -d {ip}/32"))
                    .unwrap_or_default();
                let port = format!("-p {proto} -m {proto} --dport {}", p.host_port);
                nat.push(
                    &chain,
                    format!("-s {}/32{dst} {port} -j {HOSTPORT_SETMARK_CHAIN}", p.pod_ip),
                );
                nat.push(
                    &chain,
                    format!("-s 127.0.0.1/32{dst} {port} -j {HOSTPORT_SETMARK_CHAIN}"),
                );
                let dst = dst.trim_start();
                let sep = if dst.is_empty() { "" } else { " " };
                nat.push(
                    &chain,
                    format!(
                        "{dst}{sep}{port} -j DNAT --to-destination {}:{}",
                        p.pod_ip, p.container_port
                    ),
                );
            }
        }
        *nat.chain_mut(HOSTPORT_SETMARK_CHAIN) = vec![format!(
            "{} -j MARK --set-xmark {HOSTPORT_MASQ_MARK:#x}/{HOSTPORT_MASQ_MARK:#x}",
            comment("CNI portfwd masquerade mark")
        )];
        *nat.chain_mut(HOSTPORT_MASQ_CHAIN) = vec![format!(
            "-m mark --mark {HOSTPORT_MASQ_MARK:#x}/{HOSTPORT_MASQ_MARK:#x} -j MASQUERADE"
        )];
        for jump in host_port_jumps() {
            if !nat.jumps.contains(&jump) {
                nat.jumps.push(jump);
            }
        }
    }
}

/// The built-in-chain rules into portmap's chains.
pub fn host_port_jumps() -> Vec<Jump> {
    let dnat = format!("-m addrtype --dst-type LOCAL -j {HOSTPORT_DNAT_CHAIN}");
    vec![
        Jump::new("PREROUTING", dnat.clone()),
        Jump::new("OUTPUT", dnat),
        Jump::new(
            "POSTROUTING",
            format!(
                "{} -j {HOSTPORT_MASQ_CHAIN}",
                comment("CNI portfwd requiring masquerade")
            ),
        ),
    ]
}

/// The BPF NAT's view of `ports`: per hostPort one backend list named
/// `hostport/ns/pod:hostPort/tcp`, whose frontends are `hostIP:hostPort`, or `nodeIP:hostPort`
/// for each of `node_ips` when no hostIP is set, and whose one backend is the pod (local, so the
/// programs translate the destination only and the pod sees the client's address).
pub fn host_port_nat_services(ports: &[HostPort], node_ips: &[Ipv4Addr]) -> Vec<NatService> {
    let mut out: Vec<NatService> = ports
        .iter()
        .map(|p| {
            let addrs: Vec<Ipv4Addr> = match p.host_ip {
                Some(ip) => vec![ip],
                None => node_ips.to_vec(),
            };
            NatService {
                name: format!("hostport/{}:{}/{}", p.pod, p.host_port, p.proto),
                frontends: addrs
                    .into_iter()
                    .map(|a| (FrontendKey::new(a, p.host_port, p.proto), 0))
                    .collect(),
                backends: vec![Backend::new(p.pod_ip, p.container_port)],
                local_count: 1,
                affinity_timeout_s: 0,
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<Pod> {
        serde_yaml_ng::from_str(
            r#"
- metadata: {name: web, namespace: shop}
  spec:
    nodeName: node-1
    containers:
    - name: web
      ports:
      - {containerPort: 8080, hostPort: 80}
      - {containerPort: 8443, hostPort: 443, hostIP: 10.224.0.4}
      - {containerPort: 5353, hostPort: 53, protocol: UDP}
      - {containerPort: 9090}
      - {containerPort: 7, hostPort: 7, protocol: SCTP}
  status: {phase: Running, podIP: 192.168.0.7}
- metadata: {name: elsewhere, namespace: shop}
  spec:
    nodeName: node-2
    containers: [{name: c, ports: [{containerPort: 80, hostPort: 81}]}]
  status: {phase: Running, podIP: 192.168.0.70}
- metadata: {name: pending, namespace: shop}
  spec:
    nodeName: node-1
    containers: [{name: c, ports: [{containerPort: 80, hostPort: 82}]}]
  status: {phase: Pending}
- metadata: {name: hostnet, namespace: shop}
  spec:
    nodeName: node-1
    hostNetwork: true
    containers: [{name: c, ports: [{containerPort: 83, hostPort: 83}]}]
  status: {phase: Running, podIP: 10.224.0.4}
- metadata: {name: done, namespace: shop}
  spec:
    nodeName: node-1
    containers: [{name: c, ports: [{containerPort: 80, hostPort: 84}]}]
  status: {phase: Succeeded, podIP: 192.168.0.9}
"#,
        )
        .expect("pods")
    }

    #[test]
    fn only_this_nodes_running_pods_with_an_address() {
        let ports = host_ports(&pods(), "node-1");
        let seen: Vec<(u16, u16, Proto, Option<Ipv4Addr>)> = ports
            .iter()
            .map(|p| (p.host_port, p.container_port, p.proto, p.host_ip))
            .collect();
        assert_eq!(
            seen,
            [
                (80, 8080, Proto::Tcp, None),
                (443, 8443, Proto::Tcp, Some(Ipv4Addr::new(10, 224, 0, 4))),
                (53, 5353, Proto::Udp, None),
            ]
        );
        assert!(ports.iter().all(|p| p.pod == "shop/web"));
    }

    #[test]
    fn portmap_chains_as_iptables_save_prints_them() {
        let mut rs = Ruleset::default();
        rs.add_host_ports(&host_ports(&pods(), "node-1"));
        let chain = pod_chain("shop/web");
        assert!(chain.len() <= 28, "{chain}");
        assert_eq!(
            rs.nat.chains[HOSTPORT_DNAT_CHAIN],
            [
                format!(
                    "-p tcp -m comment --comment \"dnat name: k8s-pod-network id: shop/web\" -m multiport --dports 80,443 -j {chain}"
                ),
                format!(
                    "-p udp -m comment --comment \"dnat name: k8s-pod-network id: shop/web\" -m multiport --dports 53 -j {chain}"
                ),
            ]
        );
        assert_eq!(
            rs.nat.chains[&chain],
            [
                "-s 192.168.0.7/32 -p tcp -m tcp --dport 80 -j CNI-HOSTPORT-SETMARK",
                "-s 127.0.0.1/32 -p tcp -m tcp --dport 80 -j CNI-HOSTPORT-SETMARK",
                "-p tcp -m tcp --dport 80 -j DNAT --to-destination 192.168.0.7:8080",
                "-s 192.168.0.7/32 -d 10.224.0.4/32 -p tcp -m tcp --dport 443 -j CNI-HOSTPORT-SETMARK",
                "-s 127.0.0.1/32 -d 10.224.0.4/32 -p tcp -m tcp --dport 443 -j CNI-HOSTPORT-SETMARK",
                "-d 10.224.0.4/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 192.168.0.7:8443",
                "-s 192.168.0.7/32 -p udp -m udp --dport 53 -j CNI-HOSTPORT-SETMARK",
                "-s 127.0.0.1/32 -p udp -m udp --dport 53 -j CNI-HOSTPORT-SETMARK",
                "-p udp -m udp --dport 53 -j DNAT --to-destination 192.168.0.7:5353",
            ]
        );
        assert_eq!(rs.nat.jumps, host_port_jumps());
        // Nothing at all without hostPorts, so Disabled removes every chain and jump.
        let mut empty = Ruleset::default();
        empty.add_host_ports(&[]);
        assert_eq!(empty, Ruleset::default());
    }

    #[test]
    fn bpf_frontends_on_every_node_address_or_the_host_ip() {
        let node_ips = [Ipv4Addr::new(10, 224, 0, 4), Ipv4Addr::new(10, 225, 0, 4)];
        let services = host_port_nat_services(&host_ports(&pods(), "node-1"), &node_ips);
        let shown: Vec<(String, Vec<String>, Vec<String>)> = services
            .iter()
            .map(|s| {
                assert_eq!(s.local_count, 1);
                (
                    s.name.clone(),
                    s.frontends.iter().map(|(k, _)| k.to_string()).collect(),
                    s.backends.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            shown,
            [
                (
                    "hostport/shop/web:443/tcp".to_owned(),
                    s(&["10.224.0.4:443/tcp"]),
                    s(&["192.168.0.7:8443"])
                ),
                (
                    "hostport/shop/web:53/udp".to_owned(),
                    s(&["10.224.0.4:53/udp", "10.225.0.4:53/udp"]),
                    s(&["192.168.0.7:5353"])
                ),
                (
                    "hostport/shop/web:80/tcp".to_owned(),
                    s(&["10.224.0.4:80/tcp", "10.225.0.4:80/tcp"]),
                    s(&["192.168.0.7:8080"])
                ),
            ]
        );
    }
}
