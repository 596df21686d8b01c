//! kube-proxy's iptables mode as a pure function: Services and EndpointSlices in, [`Ruleset`] out.
//!
//! This follows `pkg/proxy/iptables/proxier.go` of Kubernetes 1.28 to 1.34 (IPv4, default flags:
//! masquerade bit 14, localhost NodePorts on, `--nodeport-addresses` unset, conntrack not liberal,
//! `--cluster-cidr` given by [`NodeContext::cluster_cidrs`]), rule for rule and comment for
//! comment, so that a Margay node in Iptables mode is indistinguishable from a kube-proxy node to
//! anyone reading `iptables-save`. Where Margay differs (no topology hints, no nfacct counters,
//! sorted output, several pod CIDRs) the item says so; `docs/design/iptables.md` lists them all.
//!
//! ## Shape
//!
//! nat: `PREROUTING`/`OUTPUT -> KUBE-SERVICES`, which matches each ClusterIP, external IP and
//! load-balancer IP and ends with `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`. A ClusterIP
//! goes to `KUBE-SVC-<hash>` (all usable endpoints) or `KUBE-SVL-<hash>` (local ones, for
//! `internalTrafficPolicy: Local`); the other destinations go to `KUBE-EXT-<hash>` (through
//! `KUBE-FW-<hash>` when `loadBalancerSourceRanges` is set), which masquerades and continues to
//! `KUBE-SVC` (policy Cluster) or short-circuits pod and host traffic and continues to `KUBE-SVL`
//! (policy Local). Service chains pick an endpoint chain `KUBE-SEP-<hash>` at random
//! (`-m statistic`, probability `1/(n-i)`), after ClientIP affinity checks (`-m recent`); the
//! endpoint chain marks hairpin traffic for masquerade and DNATs. `KUBE-MARK-MASQ` sets mark
//! 0x4000, `KUBE-POSTROUTING` masquerades marked packets.
//!
//! filter: `KUBE-SERVICES` and `KUBE-EXTERNAL-SERVICES` REJECT traffic to services without
//! endpoints (and DROP when a Local policy has no local endpoint), `KUBE-PROXY-FIREWALL` drops
//! what `KUBE-FW-<hash>` did not accept, `KUBE-NODEPORTS` opens health-check node ports,
//! `KUBE-FORWARD` accepts marked and established forwarded traffic, `KUBE-FIREWALL` blocks
//! martian localnet traffic (needed because localhost NodePorts need `route_localnet=1`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};

use crate::model::{Jump, Ruleset, TableRules, comment};

mod incremental;
pub use incremental::{KubeProxyRules, ServiceName, Update};

// === Names ===

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";
/// Margay's own helper chain (not kube-proxy's): with more than one pod CIDR, "not from the
/// cluster" needs several negated source matches, which one iptables rule cannot hold, so the
/// service chain jumps here; each pod CIDR returns and the rest is marked for masquerade.
pub const KUBE_MARK_MASQ_OFF_CLUSTER: &str = "KUBE-MARK-MASQ-OFF-CLUSTER";

/// The masquerade mark, kube-proxy's default `--iptables-masquerade-bit=14`.
pub const MASQ_MARK: &str = "0x4000";
/// The label linking an EndpointSlice to its Service (same namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy; kube-proxy ignores them.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// EndpointSlices carrying this label belong to headless services; kube-proxy ignores them.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Above this many endpoints kube-proxy drops the comments of endpoint rules ("large cluster
/// mode") to keep iptables-restore input small.
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;
/// kube-apiserver's default ClientIP affinity timeout, used when the Service does not say.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10800;

/// What the calculation needs to know about the node it runs for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// Endpoints whose `nodeName` equals this are local (Local traffic policies use only them).
    pub node_name: String,
    /// The node's own addresses. NodePorts answer on every local address anyway
    /// (`--dst-type LOCAL`); these matter for `loadBalancerSourceRanges` that include the node,
    /// which then also accept traffic the node sends to its own load-balancer IPs.
    pub node_ips: Vec<Ipv4Addr>,
    /// The pod pools, as kube-proxy's `--cluster-cidr`: ClusterIP traffic from outside them is
    /// masqueraded, and pod traffic to external destinations of Local-policy services is
    /// short-circuited to the Cluster chain. Empty means kube-proxy without `--cluster-cidr`:
    /// neither rule is written.
    pub cluster_cidrs: Vec<Ipv4Net>,
}

/// The 16 characters kube-proxy appends to `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-` and `KUBE-FW-`:
/// base32 (RFC 4648, standard alphabet) of SHA-256 of the service port name (`ns/name` or
/// `ns/name:port`) followed by the lower-case protocol. Chain names must fit in 28 characters,
/// and matching kube-proxy's names lets people reuse what they know (`KUBE-SVC-NPX46M4PTMTKRN6Y`
/// is `default/kubernetes:https` on every cluster).
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    hash16(&[service_port_name, protocol])
}

/// `KUBE-SEP-` + 16 characters: the same hash over service port name, protocol and `ip:port`.
pub fn endpoint_chain_name(service_port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&[service_port_name, protocol, endpoint])
    )
}

fn hash16(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
    }
    base32_prefix(&hasher.finalize()[..10])
}

/// Base32 (standard alphabet) of `bytes`, whose length must be a multiple of 5 (no padding).
fn base32_prefix(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5);
    for group in bytes.chunks(5) {
        let mut bits: u64 = 0;
        for b in group {
            bits = (bits << 8) | u64::from(*b);
        }
        let nbits = group.len() * 8;
        for i in 0..nbits / 5 {
            let index = (bits >> (nbits - 5 * (i + 1))) & 0x1f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

/// kube-proxy's probability for the i-th of n endpoints, `1/(n-i)`, as Go's `%0.10f` prints it.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

// === Inputs, read as kube-proxy reads them ===

/// One service port, with what kube-proxy's `servicePortInfo` keeps.
#[derive(Debug)]
struct ServicePortInfo {
    /// `ns/name` or `ns/name:port`: comments and hashes use it.
    name: String,
    sort_key: (String, String, String, String),
    /// Lower case: `tcp`, `udp` or `sctp`.
    protocol: &'static str,
    /// Upper case as in the API, to match EndpointSlice ports.
    api_protocol: &'static str,
    port_name: String,
    namespace: String,
    service_name: String,
    cluster_ip: Ipv4Addr,
    port: u16,
    node_port: u16,
    external_ips: Vec<Ipv4Addr>,
    lb_vips: Vec<Ipv4Addr>,
    lb_source_ranges: Vec<Ipv4Net>,
    affinity_timeout: Option<i32>,
    health_check_node_port: u16,
    external_policy_local: bool,
    internal_policy_local: bool,
    svc_chain: String,
    svl_chain: String,
    ext_chain: String,
    fw_chain: String,
}

impl ServicePortInfo {
    fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.lb_vips.is_empty() || !self.external_ips.is_empty()
    }

    /// Cluster endpoints are needed for ClusterIP traffic under policy Cluster, and for any
    /// external traffic (even under policy Local, to short-circuit pod and host traffic).
    fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }
}

/// One endpoint of one service port, after deduplication across slices.
#[derive(Debug, Clone)]
struct Endpoint {
    ip: Ipv4Addr,
    /// `ip:port`, kube-proxy's endpoint string: sort key, hash input, DNAT target.
    text: String,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
    chain: String,
}

fn protocol_names(api: Option<&str>) -> Option<(&'static str, &'static str)> {
    match api.unwrap_or("TCP") {
        "TCP" => Some(("TCP", "tcp")),
        "UDP" => Some(("UDP", "udp")),
        "SCTP" => Some(("SCTP", "sctp")),
        _ => None,
    }
}

fn parse_v4(text: &str) -> Option<Ipv4Addr> {
    text.trim().parse().ok()
}

/// The service's ports as kube-proxy's IPv4 proxier sees them; empty for services it skips
/// (ExternalName, headless, another proxy's, IPv6-only).
fn service_ports(svc: &Service) -> Vec<ServicePortInfo> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return Vec::new();
    }
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Vec::new();
    }
    // kube-proxy's GetClusterIPByFamily: the IPv4 entry of clusterIPs, else clusterIP.
    let cluster_ip = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .find_map(|ip| parse_v4(ip));
    let Some(cluster_ip) = cluster_ip else {
        return Vec::new(); // "None", "", missing or IPv6 only.
    };
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let service_name = svc.metadata.name.clone().unwrap_or_default();

    let all_external_ips = spec.external_ips.as_deref().unwrap_or_default();
    let externally_accessible_type = svc_type == "LoadBalancer"
        || svc_type == "NodePort"
        || (svc_type == "ClusterIP" && !all_external_ips.is_empty());
    let external_policy_local =
        externally_accessible_type && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_ips: Vec<Ipv4Addr> = all_external_ips
        .iter()
        .filter_map(|ip| parse_v4(ip))
        .collect();
    let lb_source_ranges: Vec<Ipv4Net> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| r.trim().parse::<Ipv4Net>().ok().map(|n| n.trunc()))
        .collect();
    // Only VIP-mode ingress IPs: with ipMode Proxy the load balancer proxies to the node itself.
    let lb_vips: Vec<Ipv4Addr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|ing| ing.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
        .filter_map(|ing| ing.ip.as_deref().and_then(parse_v4))
        .collect();
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
    });
    let health_check_node_port = if svc_type == "LoadBalancer" && external_policy_local {
        port_number(spec.health_check_node_port.unwrap_or(0))
    } else {
        0
    };

    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some((api_protocol, protocol)) = protocol_names(port.protocol.as_deref()) else {
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let name = if port_name.is_empty() {
            format!("{namespace}/{service_name}")
        } else {
            format!("{namespace}/{service_name}:{port_name}")
        };
        let hash = port_proto_hash(&name, protocol);
        out.push(ServicePortInfo {
            sort_key: (
                namespace.clone(),
                service_name.clone(),
                port_name.clone(),
                api_protocol.to_owned(),
            ),
            protocol,
            api_protocol,
            port_name,
            namespace: namespace.clone(),
            service_name: service_name.clone(),
            cluster_ip,
            port: port_number(port.port),
            node_port: port_number(port.node_port.unwrap_or(0)),
            external_ips: external_ips.clone(),
            lb_vips: lb_vips.clone(),
            lb_source_ranges: lb_source_ranges.clone(),
            affinity_timeout,
            health_check_node_port,
            external_policy_local,
            internal_policy_local,
            svc_chain: format!("KUBE-SVC-{hash}"),
            svl_chain: format!("KUBE-SVL-{hash}"),
            ext_chain: format!("KUBE-EXT-{hash}"),
            fw_chain: format!("KUBE-FW-{hash}"),
            name,
        });
    }
    out
}

fn port_number(p: i32) -> u16 {
    u16::try_from(p).unwrap_or(0)
}

/// EndpointSlices by (namespace, service name), each list sorted by slice name so that
/// deduplication is deterministic. Headless-labelled and non-IPv4 slices are left out, as
/// kube-proxy's informer and IPv4 proxier leave them out.
fn slices_by_service(slices: &[EndpointSlice]) -> BTreeMap<(String, String), Vec<&EndpointSlice>> {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let labels = slice.metadata.labels.as_ref();
        let Some(service) = labels.and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            continue;
        };
        if service.is_empty() || labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
            continue;
        }
        if slice.address_type != "IPv4" {
            continue;
        }
        let namespace = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        by_service
            .entry((namespace, service.clone()))
            .or_default()
            .push(slice);
    }
    for list in by_service.values_mut() {
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    by_service
}

/// The endpoints of one service port: slice ports with the same name and protocol, the first
/// address of each endpoint, deduplicated by `ip:port` (a local copy wins), sorted by `ip:port`
/// as strings, as kube-proxy's EndpointSliceCache does.
fn endpoints_for(
    sp: &ServicePortInfo,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Vec<Endpoint> {
    let mut set: BTreeMap<String, Endpoint> = BTreeMap::new();
    for slice in slices {
        for port in slice.ports.iter().flatten() {
            // kube-proxy ignores ports whose name is nil; the EndpointSlice controller always
            // sets it (to "" for an unnamed port), and Margay reads nil as "" so that
            // hand-written slices for unnamed ports work.
            if port.name.as_deref().unwrap_or("") != sp.port_name {
                continue;
            }
            if port.protocol.as_deref().unwrap_or("TCP") != sp.api_protocol {
                continue;
            }
            let port_num = port_number(port.port.unwrap_or(0));
            if port_num == 0 {
                continue;
            }
            for ep in &slice.endpoints {
                let Some(ip) = ep.addresses.first().and_then(|a| parse_v4(a)) else {
                    continue;
                };
                let cond = ep.conditions.clone().unwrap_or_default();
                let ready = cond.ready.unwrap_or(true);
                let local = !node.node_name.is_empty()
                    && ep.node_name.as_deref() == Some(node.node_name.as_str());
                let text = format!("{ip}:{port_num}");
                let endpoint = Endpoint {
                    ip,
                    chain: endpoint_chain_name(&sp.name, sp.protocol, &text),
                    text: text.clone(),
                    local,
                    ready,
                    serving: cond.serving.unwrap_or(true),
                    terminating: cond.terminating.unwrap_or(false),
                };
                let keep_existing = set.get(&text).is_some_and(|_| !local);
                if !keep_existing {
                    set.insert(text, endpoint);
                }
            }
        }
    }
    set.into_values().collect()
}

/// kube-proxy's `CategorizeEndpoints` without topology hints: the endpoints for policy Cluster,
/// for policy Local, the union of both (the endpoint chains to write), and whether the service
/// has a usable endpoint anywhere. Ready endpoints are used; when there is none (separately for
/// Cluster and Local), serving-and-terminating ones are.
#[derive(Debug, Default)]
struct Categorized {
    cluster: Vec<Endpoint>,
    local: Vec<Endpoint>,
    reachable: Vec<Endpoint>,
    has_any: bool,
}

fn categorize(endpoints: &[Endpoint], sp: &ServicePortInfo) -> Categorized {
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        return out;
    }
    let pick = |f: &dyn Fn(&Endpoint) -> bool| -> Vec<Endpoint> {
        endpoints.iter().filter(|e| f(e)).cloned().collect()
    };
    if sp.uses_cluster_endpoints() {
        out.cluster = pick(&|e| e.ready);
        if out.cluster.is_empty() {
            out.cluster = pick(&|e| e.serving && e.terminating);
        }
        out.has_any = !out.cluster.is_empty();
    }
    if !sp.uses_local_endpoints() {
        out.reachable = out.cluster.clone();
        return out;
    }
    let (mut local_ready, mut local_serving_terminating) = (false, false);
    for e in endpoints {
        if e.ready {
            out.has_any = true;
            local_ready |= e.local;
        } else if e.serving && e.terminating {
            out.has_any = true;
            local_serving_terminating |= e.local;
        }
    }
    let mut serving_terminating_used = false;
    if local_ready {
        out.local = pick(&|e| e.local && e.ready);
    } else if local_serving_terminating {
        serving_terminating_used = true;
        out.local = pick(&|e| e.local && e.serving && e.terminating);
    }
    if !sp.uses_cluster_endpoints() {
        out.reachable = out.local.clone();
        return out;
    }
    if !serving_terminating_used {
        // Local holds only ready endpoints, all of which are in Cluster.
        out.reachable = out.cluster.clone();
        return out;
    }
    let mut union: BTreeMap<String, Endpoint> = BTreeMap::new();
    for e in out.cluster.iter().chain(&out.local) {
        union.insert(e.text.clone(), e.clone());
    }
    out.reachable = union.into_values().collect();
    out
}

// === Rules ===

/// The rules kube-proxy writes for `services` and `slices` on `node`, plus its jumps from the
/// built-in chains. Services are processed in (namespace, name, port name, protocol) order, so
/// the output is stable (kube-proxy's own order follows a Go map).
pub fn kube_proxy_ruleset(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> Ruleset {
    let mut rs = Ruleset::default();
    write_skeleton(&mut rs, node);

    let by_service = slices_by_service(slices);
    let mut ports: Vec<ServicePortInfo> = services.iter().flat_map(service_ports).collect();
    ports.sort_by(|a, b| a.sort_key.cmp(&b.sort_key));
    let with_endpoints: Vec<(ServicePortInfo, Vec<Endpoint>)> = ports
        .into_iter()
        .map(|sp| {
            let key = (sp.namespace.clone(), sp.service_name.clone());
            let eps = by_service
                .get(&key)
                .map(|s| endpoints_for(&sp, s, node))
                .unwrap_or_default();
            (sp, eps)
        })
        .collect();
    let total: usize = with_endpoints.iter().map(|(_, e)| e.len()).sum();
    let large = total > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;

    for (sp, eps) in &with_endpoints {
        write_service_port(&mut rs, sp, eps, node, large);
    }

    write_tail(&mut rs);
    rs
}

/// The rules after every service's.
fn write_tail(rs: &mut Ruleset) {
    // Tail call to the NodePorts chain: must stay the last rule of nat KUBE-SERVICES.
    rs.nat.push(
        KUBE_SERVICES,
        format!(
            "{} -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}",
            comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
        ),
    );
    rs.filter
        .push(KUBE_FORWARD, "-m conntrack --ctstate INVALID -j DROP");
    rs.filter.push(
        KUBE_FORWARD,
        format!(
            "{} -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
            comment("kubernetes forwarding rules")
        ),
    );
    rs.filter.push(
        KUBE_FORWARD,
        format!(
            "{} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            comment("kubernetes forwarding conntrack rule")
        ),
    );
}

/// Chains kube-proxy always declares, the rules that do not depend on services, and the jumps.
fn write_skeleton(rs: &mut Ruleset, node: &NodeContext) {
    for chain in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
        KUBE_FIREWALL,
    ] {
        rs.filter.chain_mut(chain);
    }
    for chain in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        rs.nat.chain_mut(chain);
    }
    rs.nat.push(
        KUBE_POSTROUTING,
        format!("-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
    );
    // Clear the mark so a packet that goes through the stack again is not masqueraded twice.
    rs.nat.push(
        KUBE_POSTROUTING,
        format!("-j MARK --set-xmark {MASQ_MARK}/0x0"),
    );
    rs.nat.push(
        KUBE_POSTROUTING,
        format!(
            "{} -j MASQUERADE --random-fully",
            comment("kubernetes service traffic requiring SNAT")
        ),
    );
    rs.nat.push(
        KUBE_MARK_MASQ,
        format!("-j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}"),
    );
    // Localhost NodePorts need route_localnet=1, which lets martian 127/8 packets in from the
    // network; this is the rule kube-proxy and kubelet add against that (kubernetes#90259).
    rs.filter.push(
        KUBE_FIREWALL,
        format!(
            "! -s 127.0.0.0/8 -d 127.0.0.0/8 {} -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
            comment("block incoming localnet connections")
        ),
    );
    if node.cluster_cidrs.len() > 1 {
        for cidr in &node.cluster_cidrs {
            rs.nat.push(
                KUBE_MARK_MASQ_OFF_CLUSTER,
                format!(
                    "-s {} {} -j RETURN",
                    cidr.trunc(),
                    comment("from a cluster CIDR")
                ),
            );
        }
        rs.nat
            .push(KUBE_MARK_MASQ_OFF_CLUSTER, format!("-j {KUBE_MARK_MASQ}"));
    }
    rs.filter.jumps = filter_jumps();
    rs.nat.jumps = nat_jumps();
}

/// kube-proxy's jumps from filter's built-in chains (and kubelet's two to `KUBE-FIREWALL`), in
/// the order they end up on a fresh system, where kube-proxy inserts each at the top.
pub fn filter_jumps() -> Vec<Jump> {
    let new = "-m conntrack --ctstate NEW";
    let lb_fw = format!(
        "{new} {} -j {KUBE_PROXY_FIREWALL}",
        comment("kubernetes load balancer firewall")
    );
    let ext = format!(
        "{new} {} -j {KUBE_EXTERNAL_SERVICES}",
        comment("kubernetes externally-visible service portals")
    );
    let svc = format!(
        "{new} {} -j {KUBE_SERVICES}",
        comment("kubernetes service portals")
    );
    vec![
        Jump::new("INPUT", format!("-j {KUBE_FIREWALL}")),
        Jump::new("INPUT", lb_fw.clone()),
        Jump::new(
            "INPUT",
            format!(
                "{} -j {KUBE_NODEPORTS}",
                comment("kubernetes health check service ports")
            ),
        ),
        Jump::new("INPUT", ext.clone()),
        Jump::new("FORWARD", lb_fw.clone()),
        Jump::new(
            "FORWARD",
            format!(
                "{} -j {KUBE_FORWARD}",
                comment("kubernetes forwarding rules")
            ),
        ),
        Jump::new("FORWARD", svc.clone()),
        Jump::new("FORWARD", ext),
        Jump::new("OUTPUT", format!("-j {KUBE_FIREWALL}")),
        Jump::new("OUTPUT", lb_fw),
        Jump::new("OUTPUT", svc),
    ]
}

/// kube-proxy's jumps from nat's built-in chains.
pub fn nat_jumps() -> Vec<Jump> {
    let portals = format!(
        "{} -j {KUBE_SERVICES}",
        comment("kubernetes service portals")
    );
    vec![
        Jump::new("PREROUTING", portals.clone()),
        Jump::new("OUTPUT", portals),
        Jump::new(
            "POSTROUTING",
            format!(
                "{} -j {KUBE_POSTROUTING}",
                comment("kubernetes postrouting rules")
            ),
        ),
    ]
}

/// `-d IP/32 -p P COMMENT -m P --dport PORT`, the match kube-proxy writes for a service address.
fn dest_match(ip: Ipv4Addr, protocol: &str, comment_text: &str, port: u16) -> String {
    format!(
        "-d {ip}/32 -p {protocol} {} -m {protocol} --dport {port}",
        comment(comment_text)
    )
}

/// The rules of one service port, transcribed from the body of kube-proxy's `syncProxyRules`
/// loop; the comments there explain each step, the ones here say what is Margay's.
fn write_service_port(
    rs: &mut Ruleset,
    sp: &ServicePortInfo,
    endpoints: &[Endpoint],
    node: &NodeContext,
    large: bool,
) {
    let name = sp.name.as_str();
    let p = sp.protocol;
    let cat = categorize(endpoints, sp);

    let uses_cluster_chain = !cat.cluster.is_empty() && sp.uses_cluster_endpoints();
    let uses_local_chain = !cat.local.is_empty() && sp.uses_local_endpoints();

    let mut internal_chain = sp.svc_chain.as_str();
    let mut has_internal = cat.has_any;
    if sp.internal_policy_local {
        internal_chain = &sp.svl_chain;
        has_internal &= !cat.local.is_empty();
    }
    let mut external_policy_chain = sp.svc_chain.as_str();
    let mut has_external = cat.has_any;
    if sp.external_policy_local {
        external_policy_chain = &sp.svl_chain;
        has_external &= !cat.local.is_empty();
    }
    let ext_chain = sp.ext_chain.as_str();
    let uses_ext_chain = cat.has_any && sp.externally_accessible();
    let uses_fw_chain = cat.has_any && !sp.lb_vips.is_empty() && !sp.lb_source_ranges.is_empty();
    let lb_chain = if uses_fw_chain {
        sp.fw_chain.as_str()
    } else {
        ext_chain
    };

    let no_endpoints = format!("{name} has no endpoints");
    let no_local = format!("{name} has no local endpoints");
    let reject = "REJECT --reject-with icmp-port-unreachable";
    let (internal_filter, external_filter) = if !cat.has_any {
        (
            (reject, no_endpoints.as_str()),
            (reject, no_endpoints.as_str()),
        )
    } else {
        (("DROP", no_local.as_str()), ("DROP", no_local.as_str()))
    };

    // ClusterIP.
    let cluster_ip_comment = format!("{name} cluster IP");
    if has_internal {
        rs.nat.push(
            KUBE_SERVICES,
            format!(
                "{} -j {internal_chain}",
                dest_match(sp.cluster_ip, p, &cluster_ip_comment, sp.port)
            ),
        );
    } else {
        let (target, text) = internal_filter;
        rs.filter.push(
            KUBE_SERVICES,
            format!(
                "{} -j {target}",
                dest_match(sp.cluster_ip, p, text, sp.port)
            ),
        );
    }

    // External IPs.
    for ip in &sp.external_ips {
        if cat.has_any {
            rs.nat.push(
                KUBE_SERVICES,
                format!(
                    "{} -j {ext_chain}",
                    dest_match(*ip, p, &format!("{name} external IP"), sp.port)
                ),
            );
        }
        if !has_external {
            let (target, text) = external_filter;
            rs.filter.push(
                KUBE_EXTERNAL_SERVICES,
                format!("{} -j {target}", dest_match(*ip, p, text, sp.port)),
            );
        }
    }

    // Load-balancer IPs.
    for ip in &sp.lb_vips {
        if cat.has_any {
            rs.nat.push(
                KUBE_SERVICES,
                format!(
                    "{} -j {lb_chain}",
                    dest_match(*ip, p, &format!("{name} loadbalancer IP"), sp.port)
                ),
            );
        }
        if uses_fw_chain {
            rs.filter.push(
                KUBE_PROXY_FIREWALL,
                format!(
                    "{} -j DROP",
                    dest_match(
                        *ip,
                        p,
                        &format!("{name} traffic not accepted by {}", sp.fw_chain),
                        sp.port
                    )
                ),
            );
        }
    }
    if !has_external {
        let (target, text) = external_filter;
        for ip in &sp.lb_vips {
            rs.filter.push(
                KUBE_EXTERNAL_SERVICES,
                format!("{} -j {target}", dest_match(*ip, p, text, sp.port)),
            );
        }
    }

    // NodePort. (kube-proxy also writes a 127.0.0.0/8 rule counting localhost NodePorts in an
    // nfacct counter when the kernel has nfacct; Margay keeps no such counter.)
    if sp.node_port != 0 {
        if cat.has_any {
            rs.nat.push(
                KUBE_NODEPORTS,
                format!(
                    "-p {p} {} -m {p} --dport {} -j {ext_chain}",
                    comment(name),
                    sp.node_port
                ),
            );
        }
        if !has_external {
            let (target, text) = external_filter;
            rs.filter.push(
                KUBE_EXTERNAL_SERVICES,
                format!(
                    "-p {p} {} -m addrtype --dst-type LOCAL -m {p} --dport {} -j {target}",
                    comment(text),
                    sp.node_port
                ),
            );
        }
    }

    // Health-check NodePort: open whether or not there are local endpoints (the agent's HTTP
    // server answers 200 or 503).
    if sp.health_check_node_port != 0 {
        rs.filter.push(
            KUBE_NODEPORTS,
            format!(
                "-p tcp {} -m tcp --dport {} -j ACCEPT",
                comment(&format!("{name} health check node port")),
                sp.health_check_node_port
            ),
        );
    }

    // Masquerade ClusterIP traffic from outside the cluster (it may be routed to another node).
    if has_internal {
        let base = dest_match(sp.cluster_ip, p, &cluster_ip_comment, sp.port);
        match node.cluster_cidrs.as_slice() {
            [] => {}
            [cidr] => rs.nat.push(
                internal_chain,
                format!("! -s {} {base} -j {KUBE_MARK_MASQ}", cidr.trunc()),
            ),
            _ => rs.nat.push(
                internal_chain,
                format!("{base} -j {KUBE_MARK_MASQ_OFF_CLUSTER}"),
            ),
        }
    }

    // External destinations.
    if uses_ext_chain {
        rs.nat.chain_mut(ext_chain);
        if !sp.external_policy_local {
            rs.nat.push(
                ext_chain,
                format!(
                    "{} -j {KUBE_MARK_MASQ}",
                    comment(&format!(
                        "masquerade traffic for {name} external destinations"
                    ))
                ),
            );
        } else {
            for cidr in &node.cluster_cidrs {
                rs.nat.push(
                    ext_chain,
                    format!(
                        "-s {} {} -j {}",
                        cidr.trunc(),
                        comment(&format!("pod traffic for {name} external destinations")),
                        sp.svc_chain
                    ),
                );
            }
            rs.nat.push(
                ext_chain,
                format!(
                    "{} -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}",
                    comment(&format!(
                        "masquerade LOCAL traffic for {name} external destinations"
                    ))
                ),
            );
            rs.nat.push(
                ext_chain,
                format!(
                    "{} -m addrtype --src-type LOCAL -j {}",
                    comment(&format!(
                        "route LOCAL traffic for {name} external destinations"
                    )),
                    sp.svc_chain
                ),
            );
        }
        if has_external {
            rs.nat
                .push(ext_chain, format!("-j {external_policy_chain}"));
        }
    }

    // Load-balancer source ranges.
    if uses_fw_chain {
        let fw = sp.fw_chain.as_str();
        let lb_comment = comment(&format!("{name} loadbalancer IP"));
        let mut allow_from_node = false;
        for range in &sp.lb_source_ranges {
            rs.nat
                .push(fw, format!("-s {range} {lb_comment} -j {ext_chain}"));
            allow_from_node |= node.node_ips.iter().any(|ip| range.contains(ip));
        }
        if allow_from_node {
            for ip in &sp.lb_vips {
                rs.nat
                    .push(fw, format!("-s {ip}/32 {lb_comment} -j {ext_chain}"));
            }
        }
        // Falls through without DNAT, so KUBE-PROXY-FIREWALL in filter drops it.
        rs.nat.push(
            fw,
            comment(&format!(
                "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
            )),
        );
    }

    if uses_cluster_chain {
        write_endpoint_choice(&mut rs.nat, sp, &sp.svc_chain, &cat.cluster, large);
    }
    if uses_local_chain {
        write_endpoint_choice(&mut rs.nat, sp, &sp.svl_chain, &cat.local, large);
    }

    // Endpoint chains.
    for ep in &cat.reachable {
        let svc_comment = if large {
            String::new()
        } else {
            format!("{} ", comment(name))
        };
        rs.nat.push(
            &ep.chain,
            format!("-s {}/32 {svc_comment}-j {KUBE_MARK_MASQ}", ep.ip),
        );
        let recent = if sp.affinity_timeout.is_some() {
            format!(
                "-m recent --set --name {} --mask 255.255.255.255 --rsource ",
                ep.chain
            )
        } else {
            String::new()
        };
        rs.nat.push(
            &ep.chain,
            format!(
                "-p {p} {svc_comment}{recent}-m {p} -j DNAT --to-destination {}",
                ep.text
            ),
        );
    }
}

/// Session-affinity checks, then the random choice among `endpoints` (kube-proxy's
/// `writeServiceToEndpointRules`).
fn write_endpoint_choice(
    nat: &mut TableRules,
    sp: &ServicePortInfo,
    chain: &str,
    endpoints: &[Endpoint],
    large: bool,
) {
    nat.chain_mut(chain);
    let ep_comment = |ep: &Endpoint| {
        if large {
            String::new()
        } else {
            format!("{} ", comment(&format!("{} -> {}", sp.name, ep.text)))
        }
    };
    if let Some(timeout) = sp.affinity_timeout {
        for ep in endpoints {
            nat.push(
                chain,
                format!(
                    "{}-m recent --rcheck --seconds {timeout} --reap --name {} --mask 255.255.255.255 --rsource -j {}",
                    ep_comment(ep),
                    ep.chain,
                    ep.chain
                ),
            );
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        if i + 1 < n {
            nat.push(
                chain,
                format!(
                    "{}-m statistic --mode random --probability {} -j {}",
                    ep_comment(ep),
                    probability(n - i),
                    ep.chain
                ),
            );
        } else {
            nat.push(chain, format!("{}-j {}", ep_comment(ep), ep.chain));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_kube_proxy() {
        // Names every kube-proxy cluster shows for these services.
        assert_eq!(
            port_proto_hash("default/kubernetes:https", "tcp"),
            "NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            port_proto_hash("kube-system/kube-dns:dns", "udp"),
            "TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            port_proto_hash("kube-system/kube-dns:dns-tcp", "tcp"),
            "ERIFXISQEP7F7OF4"
        );
        assert_eq!(
            port_proto_hash("kube-system/kube-dns:metrics", "tcp"),
            "JD5MR3NA4I4DYORP"
        );
    }

    #[test]
    fn base32_matches_rfc4648() {
        // RFC 4648 section 10 test vector "fooba" -> "MZXW6YTB".
        assert_eq!(base32_prefix(b"fooba"), "MZXW6YTB");
        assert_eq!(base32_prefix(&[0; 10]), "AAAAAAAAAAAAAAAA");
    }

    fn service(name: &str, spec: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "default", "name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    fn slice(service: &str, name: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "namespace": "default",
                "name": name,
                "labels": {LABEL_SERVICE_NAME: service},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap()
    }

    fn node() -> NodeContext {
        NodeContext {
            node_name: "node-a".to_owned(),
            node_ips: vec![Ipv4Addr::new(192, 168, 0, 10)],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        }
    }

    fn web() -> Service {
        service(
            "web",
            serde_json::json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
        )
    }

    #[test]
    fn large_clusters_drop_endpoint_comments() {
        let endpoints = |n: usize| {
            let eps: Vec<serde_json::Value> = (0..n)
                .map(|i| serde_json::json!({"addresses": [format!("10.244.{}.{}", i / 250, i % 250 + 1)]}))
                .collect();
            vec![slice("web", "web-1", serde_json::Value::Array(eps))]
        };
        let small = kube_proxy_ruleset(&[web()], &endpoints(1000), &node());
        let large = kube_proxy_ruleset(&[web()], &endpoints(1001), &node());
        let seps = |rs: &Ruleset| -> Vec<String> {
            rs.nat
                .chains
                .iter()
                .filter(|(name, _)| name.starts_with("KUBE-SEP-"))
                .flat_map(|(_, rules)| rules.clone())
                .collect()
        };
        assert!(seps(&small).iter().all(|r| r.contains("--comment")));
        assert_eq!(seps(&large).len(), 2002);
        assert!(seps(&large).iter().all(|r| !r.contains("--comment")));
        let svc = large
            .nat
            .chains
            .iter()
            .find(|(n, _)| n.starts_with("KUBE-SVC-"))
            .unwrap()
            .1;
        // The off-cluster masquerade rule keeps its comment; the endpoint rules lose theirs.
        assert!(svc[0].contains("cluster IP"));
        assert!(svc[1..].iter().all(|r| !r.contains("--comment")));
        assert!(svc[1].ends_with(&format!(
            "--probability {} -j {}",
            probability(1001),
            rule_target_of(&svc[1])
        )));
    }

    fn rule_target_of(rule: &str) -> String {
        crate::model::rule_target(rule).unwrap()
    }

    #[test]
    fn a_local_copy_of_a_duplicate_endpoint_wins() {
        let slices = [
            slice(
                "web",
                "web-a",
                serde_json::json!([{"addresses": ["10.244.1.1"], "nodeName": "node-b"}]),
            ),
            slice(
                "web",
                "web-b",
                serde_json::json!([{"addresses": ["10.244.1.1"], "nodeName": "node-a"}]),
            ),
        ];
        let mut local_web = web();
        if let Some(spec) = local_web.spec.as_mut() {
            spec.internal_traffic_policy = Some("Local".to_owned());
        }
        let rs = kube_proxy_ruleset(&[local_web], &slices, &node());
        assert!(rs.nat.chains.keys().any(|c| c.starts_with("KUBE-SVL-")));
        assert!(
            rs.filter.chains[KUBE_SERVICES].is_empty(),
            "the endpoint is local"
        );
    }

    #[test]
    fn local_policies_fall_back_to_local_terminating_endpoints_independently() {
        // A ready remote endpoint and a serving-terminating local one: Cluster uses the ready
        // one, Local falls back to the terminating local one; both get endpoint chains.
        let slices = [slice(
            "web",
            "web-1",
            serde_json::json!([
                {"addresses": ["10.244.2.1"], "nodeName": "node-b"},
                {"addresses": ["10.244.1.1"], "nodeName": "node-a",
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
            ]),
        )];
        let svc = service(
            "web",
            serde_json::json!({
                "type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
            }),
        );
        let rs = kube_proxy_ruleset(&[svc], &slices, &node());
        let chain = |prefix: &str| {
            rs.nat
                .chains
                .iter()
                .find(|(n, _)| n.starts_with(prefix))
                .map(|(_, r)| r.clone())
                .unwrap_or_default()
        };
        assert!(
            chain("KUBE-SVC-")
                .iter()
                .any(|r| r.contains("10.244.2.1:8080"))
        );
        assert!(
            !chain("KUBE-SVC-")
                .iter()
                .any(|r| r.contains("10.244.1.1:8080"))
        );
        assert_eq!(chain("KUBE-SVL-").len(), 1);
        assert!(chain("KUBE-SVL-")[0].contains("10.244.1.1:8080"));
        let seps = rs
            .nat
            .chains
            .keys()
            .filter(|c| c.starts_with("KUBE-SEP-"))
            .count();
        assert_eq!(seps, 2);
    }

    #[test]
    fn without_cluster_cidrs_nothing_is_masqueraded_by_source() {
        let slices = [slice(
            "web",
            "web-1",
            serde_json::json!([{"addresses": ["10.244.2.1"]}]),
        )];
        let rs = kube_proxy_ruleset(
            &[web()],
            &slices,
            &NodeContext {
                cluster_cidrs: Vec::new(),
                ..node()
            },
        );
        let svc = rs
            .nat
            .chains
            .iter()
            .find(|(n, _)| n.starts_with("KUBE-SVC-"))
            .unwrap()
            .1;
        assert_eq!(svc.len(), 1, "{svc:?}");
    }

    #[test]
    fn unknown_protocols_and_missing_specs_are_skipped() {
        let odd = service(
            "odd",
            serde_json::json!({"clusterIP": "10.96.0.11", "ports": [{"name": "x", "port": 80, "protocol": "QUIC"}]}),
        );
        let bare: Service =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "bare"}})).unwrap();
        let empty = kube_proxy_ruleset(&[], &[], &node());
        assert_eq!(kube_proxy_ruleset(&[odd, bare], &[], &node()), empty);
    }

    #[test]
    fn probabilities_have_ten_decimals() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(7), "0.1428571429");
        assert_eq!(probability(1000), "0.0010000000");
        // An exact tie at the tenth decimal rounds to even, as Go's strconv does.
        assert_eq!(probability(2048), "0.0004882812");
    }
}
