//! The checks a node runs before it takes the BPF dataplane on: the kernel's BTF, a bpffs, cgroup
//! v2 for connect-time load balancing, and a datastore reached without going through a Service
//! address this node programs itself. The program load (the verifier) is the last check and is
//! done by [`crate::bpf_mode::BpfDataplane::start`]. A node that fails any of them stays in
//! Iptables and says why (Node status, `margayctl node status`, one log line).
//!
//! The datastore check is Calico's `kubernetes-services-endpoint` concern: Felix reaching the
//! API server through the `kubernetes` Service works only while something translates that
//! ClusterIP; while the node's own Service dataplane is being replaced, nothing may. Margay's
//! agents talk to etcd (or a local SQLite file), so the question is whether an etcd endpoint is
//! an address the node's Service dataplane translates.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use margay_api::calico::node::PreflightCheck;
use margay_datastore::open::Location;

/// A check's outcome.
pub fn check(name: &str, result: Result<String, String>) -> PreflightCheck {
    let (passed, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    PreflightCheck {
        name: name.to_owned(),
        passed,
        detail,
    }
}

/// The kernel exposes its BTF, which the programs' CO-RE relocations need.
pub fn kernel_btf() -> Result<String, String> {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if path.exists() {
        Ok(format!("{} present", path.display()))
    } else {
        Err(format!(
            "the kernel has no BTF ({} is missing): the BPF programs need a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y",
            path.display()
        ))
    }
}

/// Where connect-time load balancing attaches: the configured cgroup (`--cgroup`, Calico's
/// `cgroupV2Path`) when this process sees it, else this process's own cgroup v2 through a
/// private cgroup2 mount beside the bpffs (inside `ip netns exec` /sys is a fresh sysfs without
/// the cgroup mounts). It must be a cgroup v2 directory: the programs attach with
/// BPF_CGROUP_INET4_CONNECT and friends, which cgroup v1 does not have.
pub fn cgroup_v2(configured: Option<&Path>, bpffs: &Path) -> Result<PathBuf, String> {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("cgroup2"))
    {
        return Err(
            "the kernel has no cgroup v2 (no cgroup2 in /proc/filesystems): connect-time load \
             balancing attaches to a cgroup v2; use a kernel with cgroup v2, or set \
             bpfConnectTimeLoadBalancing: Disabled"
                .to_owned(),
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Some(dir) = configured.filter(|d| d.exists()) {
        let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
        return match fs_type_at(&mounts, &canonical) {
            Some("cgroup2") => Ok(canonical),
            other => Err(format!(
                "--cgroup {} is not a cgroup v2 directory (its file system is {}): give the \
                 cgroup v2 hierarchy's directory (usually /sys/fs/cgroup), or boot with \
                 systemd.unified_cgroup_hierarchy=1",
                dir.display(),
                other.unwrap_or("unknown")
            )),
        };
    }
    crate::bpf_mode::own_cgroup(bpffs).map_err(|e| {
        format!(
            "no cgroup v2 to attach connect-time load balancing to ({e:#}); the configured \
             --cgroup {} is not visible here: run the agent where the cgroup v2 hierarchy is \
             mounted, or on a host booted with systemd.unified_cgroup_hierarchy=1",
            configured.map_or("(none)".into(), |c| c.display().to_string())
        )
    })
}

/// The file system type of the mount that holds `path` (the longest mount point that is a
/// prefix of it), from `/proc/self/mounts`.
fn fs_type_at<'a>(mounts: &'a str, path: &Path) -> Option<&'a str> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, kind) = (f.next(), f.next()?, f.next()?);
            path.starts_with(at).then_some((at.len(), kind))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

/// One configured datastore endpoint with the addresses its host resolved to (or why it did
/// not resolve).
#[derive(Clone, Debug)]
pub struct ResolvedEndpoint {
    pub host: String,
    pub port: u16,
    pub addresses: Result<Vec<Ipv4Addr>, String>,
}

/// Resolves the hosts of an etcd datastore's endpoints (the system resolver, as the etcd
/// client does when it connects).
pub async fn resolve(location: &Location) -> Vec<ResolvedEndpoint> {
    let Location::Endpoints(endpoints) = location else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (host, port) in endpoints {
        let addresses = match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => Ok(vec![ip]),
            Ok(IpAddr::V6(_)) => Ok(Vec::new()),
            Err(_) => match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => Ok(addrs
                    .filter_map(|a| match a.ip() {
                        IpAddr::V4(ip) => Some(ip),
                        IpAddr::V6(_) => None,
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()),
                Err(e) => Err(e.to_string()),
            },
        };
        out.push(ResolvedEndpoint {
            host: host.clone(),
            port: *port,
            addresses,
        });
    }
    out
}

/// What the node's Service dataplane translates, for the datastore check.
pub struct ServiceAddresses<'a> {
    /// The range ClusterIPs are allocated from (kube-apiserver's `--service-cluster-ip-range`).
    pub cluster_ip_range: Ipv4Net,
    pub services: &'a [Service],
    pub slices: &'a [EndpointSlice],
    /// Every node's address (NodePorts answer on each of them) and this node's.
    pub node_addresses: &'a [Ipv4Addr],
}

/// Whether the datastore at `url` (leading to `location`, its hosts resolved to `resolved`) is
/// reached without going through an address the node's Service dataplane translates. Ok with
/// what was found, or Err with what is wrong and what to change.
///
/// An endpoint fails when one of its addresses is: inside the ClusterIP range (a ClusterIP
/// exists only as a translation, whether or not a Service holds it yet), a Service's ExternalIP
/// or LoadBalancer IP on one of the Service's ports, or a node address or a loopback address on
/// a Service's NodePort. A host that does not resolve fails too (the check cannot vouch for it).
/// A SQLite file and a unix socket are local: nothing to translate.
pub fn datastore(
    url: &str,
    location: &Location,
    resolved: &[ResolvedEndpoint],
    svc: &ServiceAddresses<'_>,
) -> Result<String, String> {
    match location {
        Location::LocalFile(path) => {
            return Ok(format!("local datastore (SQLite file {})", path.display()));
        }
        Location::UnixSocket(path) => {
            return Ok(format!(
                "local datastore (etcd on unix socket {})",
                path.display()
            ));
        }
        Location::Endpoints(_) => {}
    }
    let mut problems = Vec::new();
    let mut direct = Vec::new();
    let mut suggestions: Vec<String> = Vec::new();
    for ep in resolved {
        let named = if ep.host.parse::<IpAddr>().is_ok() {
            format!("{}:{}", ep.host, ep.port)
        } else {
            format!(
                "{}:{} ({})",
                ep.host,
                ep.port,
                addresses_text(&ep.addresses)
            )
        };
        let addresses = match &ep.addresses {
            Ok(a) => a,
            Err(e) => {
                problems.push(format!(
                    "the endpoint {}:{} does not resolve ({e}), so it cannot be checked",
                    ep.host, ep.port
                ));
                continue;
            }
        };
        let mut found = None;
        for ip in addresses {
            if let Some((why, service)) = translated_by(*ip, ep.port, svc) {
                if let Some(s) = service {
                    suggestions.extend(direct_endpoints(s, ep.port, svc.slices));
                }
                found = Some(format!("the endpoint {named} is {why}"));
                break;
            }
        }
        match found {
            Some(p) => problems.push(p),
            None => direct.push(named),
        }
    }
    if problems.is_empty() {
        return Ok(format!(
            "etcd reached directly at {} (no Service address)",
            direct.join(", ")
        ));
    }
    suggestions.sort();
    suggestions.dedup();
    let instead = if suggestions.is_empty() {
        "the etcd members' own addresses".to_owned()
    } else {
        format!("etcd://{} (the Service's endpoints)", suggestions.join(","))
    };
    Err(format!(
        "the datastore {url} goes through a Service address this node translates itself: {}; \
         while this node's Service dataplane changes hands the agent would lose its datastore \
         (Calico's kubernetes-services-endpoint concern). Point this node's agent at etcd \
         directly: set --datastore (or MARGAY_DATASTORE, or ETCD_ENDPOINTS) to {instead} and \
         restart it; it stays in Iptables until then",
        problems.join("; ")
    ))
}

fn addresses_text(a: &Result<Vec<Ipv4Addr>, String>) -> String {
    match a {
        Ok(a) if a.is_empty() => "no IPv4 address".to_owned(),
        Ok(a) => a
            .iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => e.clone(),
    }
}

/// Why the node's Service dataplane translates `ip:port`, and the Service that owns it.
fn translated_by<'a>(
    ip: Ipv4Addr,
    port: u16,
    svc: &ServiceAddresses<'a>,
) -> Option<(String, Option<&'a Service>)> {
    let name = |s: &Service| {
        format!(
            "{}/{}",
            s.metadata.namespace.as_deref().unwrap_or("default"),
            s.metadata.name.as_deref().unwrap_or("?")
        )
    };
    let ports = |s: &Service| -> Vec<(u16, Option<u16>)> {
        s.spec
            .iter()
            .flat_map(|sp| sp.ports.iter().flatten())
            .filter_map(|p| {
                let node_port = p.node_port.and_then(|n| u16::try_from(n).ok());
                Some((u16::try_from(p.port).ok()?, node_port))
            })
            .collect()
    };
    let text = ip.to_string();
    for s in svc.services {
        let Some(spec) = &s.spec else { continue };
        let cluster_ips: Vec<&String> = spec
            .cluster_ip
            .iter()
            .chain(spec.cluster_ips.iter().flatten())
            .collect();
        if cluster_ips.contains(&&text) {
            return Some((format!("the ClusterIP of Service {}", name(s)), Some(s)));
        }
        let serves_port = ports(s).iter().any(|(p, _)| *p == port);
        if serves_port && spec.external_ips.iter().flatten().any(|e| *e == text) {
            return Some((
                format!("an ExternalIP of Service {} on its port {port}", name(s)),
                Some(s),
            ));
        }
        let lb_ips = s
            .status
            .iter()
            .flat_map(|st| st.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|i| i.ip.as_ref());
        if serves_port && lb_ips.into_iter().any(|l| *l == text) {
            return Some((
                format!(
                    "a LoadBalancer IP of Service {} on its port {port}",
                    name(s)
                ),
                Some(s),
            ));
        }
        let on_node = ip.is_loopback() || svc.node_addresses.contains(&ip);
        if on_node && ports(s).iter().any(|(_, np)| *np == Some(port)) {
            return Some((
                format!(
                    "a node address on the NodePort {port} of Service {}",
                    name(s)
                ),
                Some(s),
            ));
        }
    }
    if svc.cluster_ip_range.contains(&ip) {
        return Some((
            format!(
                "inside the Services' ClusterIP range {} (addresses there exist only as the \
                 Service dataplane's translations)",
                svc.cluster_ip_range
            ),
            None,
        ));
    }
    None
}

/// The addresses a Service's port leads to (its EndpointSlices' ready endpoints and the target
/// port), to tell the user what to point the agent at instead.
fn direct_endpoints(service: &Service, port: u16, slices: &[EndpointSlice]) -> Vec<String> {
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let Some(name) = service.metadata.name.as_deref() else {
        return Vec::new();
    };
    // The Service port the endpoint used (by port, NodePort or, for one-port Services, any).
    let svc_ports: Vec<_> = service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .collect();
    let port_name = svc_ports
        .iter()
        .find(|p| {
            u16::try_from(p.port).ok() == Some(port)
                || p.node_port.and_then(|n| u16::try_from(n).ok()) == Some(port)
        })
        .or(svc_ports.first())
        .and_then(|p| p.name.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for slice in slices {
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"));
        if slice.metadata.namespace.as_deref().unwrap_or("default") != namespace
            || owner.map(String::as_str) != Some(name)
        {
            continue;
        }
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.clone().unwrap_or_default() == port_name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for addr in &ep.addresses {
                out.push(format!("{addr}:{target}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: serde_json::Value) -> Service {
        serde_json::from_value(yaml).expect("service")
    }

    fn services() -> Vec<Service> {
        vec![
            service(serde_json::json!({
                "metadata": {"name": "etcd", "namespace": "kube-system"},
                "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                         "ports": [{"name": "client", "port": 2379, "targetPort": 2379}]},
            })),
            service(serde_json::json!({
                "metadata": {"name": "lb", "namespace": "shop"},
                "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.30",
                         "externalIPs": ["192.0.2.50"],
                         "ports": [{"port": 443, "nodePort": 30443}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}},
            })),
        ]
    }

    fn slices() -> Vec<EndpointSlice> {
        vec![
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "etcd-abc", "namespace": "kube-system",
                             "labels": {"kubernetes.io/service-name": "etcd"}},
                "addressType": "IPv4",
                "ports": [{"name": "client", "port": 2379}],
                "endpoints": [{"addresses": ["10.244.1.9"], "conditions": {"ready": true}},
                              {"addresses": ["10.244.2.9"], "conditions": {"ready": false}}],
            }))
            .expect("slice"),
        ]
    }

    fn endpoint(host: &str, port: u16, addresses: &[&str]) -> ResolvedEndpoint {
        ResolvedEndpoint {
            host: host.to_owned(),
            port,
            addresses: Ok(addresses.iter().map(|a| a.parse().unwrap()).collect()),
        }
    }

    fn decide(endpoints: &[ResolvedEndpoint]) -> Result<String, String> {
        let services = services();
        let slices = slices();
        let nodes: Vec<Ipv4Addr> =
            vec!["10.224.0.4".parse().unwrap(), "10.224.0.5".parse().unwrap()];
        let location =
            Location::Endpoints(endpoints.iter().map(|e| (e.host.clone(), e.port)).collect());
        datastore(
            "etcd://configured",
            &location,
            endpoints,
            &ServiceAddresses {
                cluster_ip_range: "10.96.0.0/12".parse().unwrap(),
                services: &services,
                slices: &slices,
                node_addresses: &nodes,
            },
        )
    }

    /// The decision table: what passes, what fails, and what the message says.
    #[test]
    fn datastore_check_decision_table() {
        let empty = ServiceAddresses {
            cluster_ip_range: "10.96.0.0/12".parse().unwrap(),
            services: &[],
            slices: &[],
            node_addresses: &[],
        };
        // Local stores: nothing to translate.
        let local = datastore(
            "sqlite:///var/lib/margay/margay.db",
            &Location::LocalFile("/var/lib/margay/margay.db".into()),
            &[],
            &empty,
        )
        .unwrap();
        assert!(local.starts_with("local datastore"), "{local}");
        let socket = datastore(
            "etcd+unix:///run/etcd.sock",
            &Location::UnixSocket("/run/etcd.sock".into()),
            &[],
            &empty,
        )
        .unwrap();
        assert!(socket.starts_with("local datastore"), "{socket}");

        // An etcd member's own address (a node's, or a pod's) passes, on any port, even a
        // node address on a port that is no NodePort.
        let ok = decide(&[
            endpoint("10.224.0.4", 2379, &["10.224.0.4"]),
            endpoint("10.244.1.9", 2379, &["10.244.1.9"]),
        ])
        .unwrap();
        assert!(ok.contains("10.224.0.4:2379, 10.244.1.9:2379"), "{ok}");
        // An ExternalIP or LB IP on a port its Service does not serve is not translated.
        decide(&[endpoint("192.0.2.50", 2379, &["192.0.2.50"])]).unwrap();
        decide(&[endpoint("198.51.100.7", 2379, &["198.51.100.7"])]).unwrap();

        let fails = |eps: &[ResolvedEndpoint], expected: &[&str]| {
            let e = decide(eps).expect_err("must fail");
            for part in expected {
                assert!(e.contains(part), "{part:?} not in: {e}");
            }
            // Every failure says what to change.
            assert!(
                e.contains("set --datastore (or MARGAY_DATASTORE, or ETCD_ENDPOINTS)"),
                "{e}"
            );
            assert!(e.contains("stays in Iptables"), "{e}");
        };
        // A Service's ClusterIP: named, and its ready endpoints offered instead.
        fails(
            &[endpoint("10.96.0.20", 2379, &["10.96.0.20"])],
            &[
                "the endpoint 10.96.0.20:2379 is the ClusterIP of Service kube-system/etcd",
                "to etcd://10.244.1.9:2379 (the Service's endpoints)",
            ],
        );
        // Inside the ClusterIP range without a Service yet.
        fails(
            &[endpoint("10.100.3.4", 2379, &["10.100.3.4"])],
            &[
                "inside the Services' ClusterIP range 10.96.0.0/12",
                "the etcd members' own addresses",
            ],
        );
        // ExternalIP and LoadBalancer IP on a port of their Service.
        fails(
            &[endpoint("192.0.2.50", 443, &["192.0.2.50"])],
            &["an ExternalIP of Service shop/lb on its port 443"],
        );
        fails(
            &[endpoint("198.51.100.7", 443, &["198.51.100.7"])],
            &["a LoadBalancer IP of Service shop/lb on its port 443"],
        );
        // A NodePort on any node's address, or on loopback.
        fails(
            &[endpoint("10.224.0.5", 30443, &["10.224.0.5"])],
            &["a node address on the NodePort 30443 of Service shop/lb"],
        );
        fails(
            &[endpoint("127.0.0.1", 30443, &["127.0.0.1"])],
            &["the NodePort 30443"],
        );
        // A host name is judged by what it resolves to, and named with it.
        fails(
            &[endpoint("etcd.kube-system.svc", 2379, &["10.96.0.20"])],
            &[
                "etcd.kube-system.svc:2379 (10.96.0.20) is the ClusterIP of Service kube-system/etcd",
            ],
        );
        // A host that does not resolve cannot be vouched for.
        fails(
            &[ResolvedEndpoint {
                host: "nowhere.invalid".into(),
                port: 2379,
                addresses: Err("no such host".into()),
            }],
            &["nowhere.invalid:2379 does not resolve (no such host)"],
        );
        // One bad endpoint among good ones is enough: the client may pick it.
        fails(
            &[
                endpoint("10.224.0.4", 2379, &["10.224.0.4"]),
                endpoint("10.96.0.20", 2379, &["10.96.0.20"]),
            ],
            &["10.96.0.20:2379 is the ClusterIP"],
        );
    }

    /// A configured cgroup directory on another file system is refused, saying which and what
    /// to give instead (read from this machine's real mount table).
    #[test]
    fn a_cgroup_that_is_not_cgroup_v2_is_refused_with_the_reason() {
        let err = cgroup_v2(
            Some(Path::new("/proc/self")),
            Path::new("/nonexistent/bpffs"),
        )
        .expect_err("/proc is no cgroup v2");
        assert!(
            err.contains(
                "--cgroup /proc/self is not a cgroup v2 directory (its file system is proc)"
            ) && err.contains("systemd.unified_cgroup_hierarchy=1"),
            "{err}"
        );
    }

    #[test]
    fn the_cgroup_mount_is_the_longest_prefix() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n\
                      cgroup /sys/fs/cgroup/net_cls cgroup rw,net_cls 0 0\n";
        assert_eq!(
            fs_type_at(mounts, Path::new("/sys/fs/cgroup/a/b")),
            Some("cgroup2")
        );
        assert_eq!(
            fs_type_at(mounts, Path::new("/sys/fs/cgroup/net_cls/x")),
            Some("cgroup")
        );
        assert_eq!(fs_type_at(mounts, Path::new("/sys/kernel")), Some("sysfs"));
        assert_eq!(fs_type_at(mounts, Path::new("/var")), None);
    }
}
