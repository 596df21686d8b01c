//! The BPF dataplane's Service NAT as a pure function: Services and EndpointSlices in, the
//! desired contents of the NAT maps (`mg_nat_fe`, `mg_nat_be`) out, in a plain Rust model that
//! knows nothing of aya ([`NatModel`]). `margay-dataplane::bpf` writes it by difference
//! ([`NatModel::diff`]). Design: `docs/design/services-nat.md`.
//!
//! ## Semantics (the same as `bpf/lib/nat.h` and `crates/margay-bpf/src/maps/nat.rs`)
//!
//! A **frontend** is (address, port, protocol, optional client source CIDR) -> (service id,
//! backend count, local backend count, flags, affinity timeout). A **backend** is (service id,
//! ordinal) -> (address, port), ordinals `0..count`, the backends on this node first
//! (`0..local_count`), so a Local traffic policy is `random % local_count`.
//!
//! Per service port (TCP and UDP; SCTP is not handled by the programs and is skipped):
//!
//! | frontend | entries | flags |
//! |---|---|---|
//! | ClusterIP | `clusterIP:port` | `INT_LOCAL \| EXT_LOCAL` when `internalTrafficPolicy: Local` (ClusterIP traffic follows the internal policy whoever the client is, as in kube-proxy) |
//! | NodePort | `nodeIP:nodePort` for each node address (the programs have no wildcard) | `EXT_LOCAL` when `externalTrafficPolicy: Local` |
//! | externalIPs | `ip:port` | as NodePort |
//! | LoadBalancer ingress (ipMode VIP) | `ip:port`; with `loadBalancerSourceRanges`: a catch-all entry flagged `BLACKHOLE`, plus one entry per allowed range (and `ip/32` when a range holds a node address, as kube-proxy) | as NodePort, plus `SRC_RANGES` |
//!
//! In-cluster clients of an external frontend use every backend (`count`), external clients the
//! local ones when the policy is Local: kube-proxy's short-circuit of pod and host traffic.
//!
//! Endpoints are read as kube-proxy reads them: slices labelled `kubernetes.io/service-name`,
//! IPv4, not headless; ports matched by name and protocol; the first address; duplicates merged
//! by `ip:port` (a local copy wins). The **cluster set** is the ready endpoints, or the serving
//! and terminating ones when none is ready; the **local set** is the local ready ones, or the
//! local serving and terminating ones when no local one is ready. Both must be prefixes of the
//! backend list (one is `count`, the other `local_count`); when the local set holds a local
//! terminating endpoint while remote ones are ready, it is not a subset of the cluster set and
//! the service port gets a second backend list ("`+local`" variant, its own id) for its
//! frontends with a Local flag. See [`nat_services`].
//!
//! ## Service ids
//!
//! Ids are derived from the service port's name (`ns/name:port/tcp`): the first 32 bits of its
//! SHA-256, never 0. They are **sticky**: [`assign_ids`] takes the previous model and keeps the
//! id of every service port it already named; a restarted agent (previous model read back from
//! the maps, without names) adopts the id its frontends carry. Only a new service port gets a
//! new id: its hash, or on collision the next free value (linear probing), never an id the
//! previous model still uses (so an id freed in this sync is not reused before its old entries
//! are gone). Collisions therefore never move an existing service.

mod dump;
mod ids;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::kube_proxy::{
    DEFAULT_AFFINITY_TIMEOUT_SECONDS, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
    NodeContext,
};

pub use ids::{assign_ids, replace_lists, service_id_hash};

/// Whether the backend list `list` (a [`NatService::name`]) is one of the Service's:
/// `ns/name:port/proto` or `ns/name/proto`, with or without `+local`.
pub fn list_of_service(list: &str, service: &crate::kube_proxy::ServiceName) -> bool {
    list.strip_prefix(service.0.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_prefix(service.1.as_str()))
        .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('/'))
}

// === The model ===

/// Frontend flags (`MG_FE_F_*` in `bpf/include/margay/types.h`; the driver checks them against
/// margay-bpf's constants at compile time).
pub mod flags {
    /// `externalTrafficPolicy: Local` for external clients.
    pub const EXT_LOCAL: u32 = 1 << 0;
    /// `internalTrafficPolicy: Local` for in-cluster clients.
    pub const INT_LOCAL: u32 = 1 << 1;
    /// Drop: the client is outside every allowed source range.
    pub const BLACKHOLE: u32 = 1 << 2;
    /// The frontend has `loadBalancerSourceRanges`.
    pub const SRC_RANGES: u32 = 1 << 3;

    /// `EXT_LOCAL|SRC_RANGES`, `-` for none.
    pub fn names(flags: u32) -> String {
        let all = [
            (EXT_LOCAL, "EXT_LOCAL"),
            (INT_LOCAL, "INT_LOCAL"),
            (BLACKHOLE, "BLACKHOLE"),
            (SRC_RANGES, "SRC_RANGES"),
        ];
        let mut out: Vec<String> = all
            .iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, name)| (*name).to_owned())
            .collect();
        let unknown = flags & !all.iter().fold(0, |acc, (bit, _)| acc | bit);
        if unknown != 0 {
            out.push(format!("{unknown:#x}"));
        }
        if out.is_empty() {
            "-".to_owned()
        } else {
            out.join("|")
        }
    }
}

/// The protocols the NAT programs translate (IP protocol numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number (`IPPROTO_TCP` / `IPPROTO_UDP`).
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }

    /// Lower case, as kube-proxy names protocols.
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Key of `mg_nat_fe`: a frontend address, port and protocol, for every client (`source: None`,
/// LPM prefix /64) or only for clients in `source` (prefix 64 + its length). A source range is
/// never `/0` (that is the catch-all entry, `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub source: Option<Ipv4Net>,
}

impl FrontendKey {
    pub const fn new(addr: Ipv4Addr, port: u16, proto: Proto) -> Self {
        Self {
            addr,
            port,
            proto,
            source: None,
        }
    }

    /// The length of the source range (0 for the catch-all entry).
    pub fn source_len(&self) -> u8 {
        self.source.map_or(0, |s| s.prefix_len())
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)?;
        if let Some(src) = self.source {
            write!(f, " src {src}")?;
        }
        Ok(())
    }
}

/// Value of `mg_nat_fe`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendValue {
    pub svc_id: u32,
    /// Backends at ordinals `0..count`.
    pub count: u32,
    /// Backends on this node, at ordinals `0..local_count`.
    pub local_count: u32,
    /// [`flags`].
    pub flags: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds, 0 without affinity.
    pub affinity_timeout_s: u32,
}

/// Key of `mg_nat_be`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub svc_id: u32,
    pub ordinal: u32,
}

/// Value of `mg_nat_be`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The node that hosts a remote backend (Tunnel mode sends external flows there);
    /// unspecified for local backends and when the node is not known.
    pub node: Ipv4Addr,
}

impl Backend {
    pub fn new(addr: Ipv4Addr, port: u16) -> Backend {
        Backend {
            addr,
            port,
            node: Ipv4Addr::UNSPECIFIED,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)?;
        if !self.node.is_unspecified() {
            write!(f, " on {}", self.node)?;
        }
        Ok(())
    }
}

/// The desired (or the actual) contents of the NAT maps.
///
/// `frontends` and `backends` are exactly the map entries; `services` names the ids (it is not
/// in the maps: a model read back from the maps has it empty) and `conflicts` says which
/// frontends two service ports claimed (the first in name order got it). Two models program the
/// same maps when [`NatModel::same_entries`] holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatModel {
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    pub backends: BTreeMap<BackendKey, Backend>,
    /// Service id -> service port name (`ns/name:port/tcp`, `+local` for the second list).
    pub services: BTreeMap<u32, String>,
    /// Frontends claimed by more than one service port: "key: kept by A, also wanted by B".
    pub conflicts: Vec<String>,
}

impl NatModel {
    /// Whether both models hold the same map entries (names and conflicts aside).
    pub fn same_entries(&self, other: &NatModel) -> bool {
        self.frontends == other.frontends && self.backends == other.backends
    }

    /// Every id the model uses: named, or referenced by a frontend or a backend.
    pub fn ids(&self) -> BTreeSet<u32> {
        let mut ids: BTreeSet<u32> = self.services.keys().copied().collect();
        ids.extend(self.frontends.values().map(|v| v.svc_id));
        ids.extend(self.backends.keys().map(|k| k.svc_id));
        ids
    }

    /// The backends of `svc_id`, ordinal order (those present: `0..count` in a written model).
    pub fn backends_of(&self, svc_id: u32) -> impl Iterator<Item = (u32, &Backend)> {
        let lo = BackendKey { svc_id, ordinal: 0 };
        let hi = BackendKey {
            svc_id,
            ordinal: u32::MAX,
        };
        self.backends.range(lo..=hi).map(|(k, b)| (k.ordinal, b))
    }

    /// The writes and deletes that turn `self` (what the maps hold) into `desired`, in the order
    /// that keeps a program reading concurrently safe (see [`NatDiff`]).
    pub fn diff(&self, desired: &NatModel) -> NatDiff {
        let mut d = NatDiff::default();
        merge_diff(
            &self.backends,
            &desired.backends,
            &mut d.backend_writes,
            &mut d.backend_deletes,
        );
        merge_diff(
            &self.frontends,
            &desired.frontends,
            &mut d.frontend_writes,
            &mut d.frontend_deletes,
        );
        // Most specific first: a new source range is in place before the catch-all entry of its
        // frontend turns into a blackhole.
        d.frontend_writes
            .sort_by_key(|(k, _)| (std::cmp::Reverse(k.source_len()), *k));
        // Least specific first: the catch-all entry goes before the ranges it lets through.
        d.frontend_deletes.sort_by_key(|k| (k.source_len(), *k));
        d
    }

    /// The model as text, one entry per line, grouped by service (golden tests, debugging).
    pub fn dump(&self) -> String {
        dump::dump(self)
    }
}

/// The entries of `new` missing from or different in `old`, and the keys of `old` missing from
/// `new`, in key order: one merge pass over both sorted maps (linear, no lookups).
fn merge_diff<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    writes: &mut Vec<(K, V)>,
    deletes: &mut Vec<K>,
) {
    let mut o = old.iter().peekable();
    let mut n = new.iter().peekable();
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some((ok, _)), None) => {
                deletes.push(**ok);
                o.next();
            }
            (None, Some((nk, nv))) => {
                writes.push((**nk, **nv));
                n.next();
            }
            (Some((ok, ov)), Some((nk, nv))) => match ok.cmp(nk) {
                std::cmp::Ordering::Less => {
                    deletes.push(**ok);
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    writes.push((**nk, **nv));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if ov != nv {
                        writes.push((**nk, **nv));
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
}

/// What changes between two models, in the order to apply it:
///
/// 1. `backend_writes`: new and changed backends. A frontend still holds its old count, so the
///    ordinals it may pick all exist (new ones are not picked yet, shrinking ones still exist).
/// 2. `frontend_writes`: new and changed frontends (new counts, new ids), most specific source
///    range first.
/// 3. `frontend_deletes`: catch-all entries first.
/// 4. `backend_deletes`: ordinals past a new count, ids no longer used; nothing points at them.
///
/// This is `margay_bpf::maps::nat::write_service`'s order, applied to the whole table at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatDiff {
    pub backend_writes: Vec<(BackendKey, Backend)>,
    pub frontend_writes: Vec<(FrontendKey, FrontendValue)>,
    pub frontend_deletes: Vec<FrontendKey>,
    pub backend_deletes: Vec<BackendKey>,
}

impl NatDiff {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of map operations.
    pub fn len(&self) -> usize {
        self.backend_writes.len()
            + self.frontend_writes.len()
            + self.frontend_deletes.len()
            + self.backend_deletes.len()
    }

    /// Every service id an operation touches.
    pub fn touched_ids(&self) -> BTreeSet<u32> {
        let mut ids = BTreeSet::new();
        ids.extend(self.backend_writes.iter().map(|(k, _)| k.svc_id));
        ids.extend(self.frontend_writes.iter().map(|(_, v)| v.svc_id));
        ids.extend(self.backend_deletes.iter().map(|k| k.svc_id));
        ids
    }
}

impl fmt::Display for NatDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, b) in &self.backend_writes {
            writeln!(f, "write  backend {:#010x}/{} = {b}", k.svc_id, k.ordinal)?;
        }
        for (k, v) in &self.frontend_writes {
            writeln!(f, "write  frontend {k} = {}", dump::value(v))?;
        }
        for k in &self.frontend_deletes {
            writeln!(f, "delete frontend {k}")?;
        }
        for k in &self.backend_deletes {
            writeln!(f, "delete backend {:#010x}/{}", k.svc_id, k.ordinal)?;
        }
        Ok(())
    }
}

// === The calculation ===

/// One backend list as NAT wants it, before it has an id: the frontends that point at it and
/// its backends, local ones first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatService {
    /// `ns/name:port/tcp` (`ns/name/tcp` for an unnamed port); `+local` appended for the second
    /// list of a port whose local set is not part of its cluster set.
    pub name: String,
    /// Frontends and their flags, in order: the ClusterIP first (ids are adopted through it).
    pub frontends: Vec<(FrontendKey, u32)>,
    /// Ordinal order: `local_count` local backends, then the others.
    pub backends: Vec<Backend>,
    pub local_count: u32,
    pub affinity_timeout_s: u32,
}

impl NatService {
    /// The value every frontend of this list gets, with its own `flags`.
    pub fn value(&self, svc_id: u32, flags: u32) -> FrontendValue {
        FrontendValue {
            svc_id,
            count: len_u32(self.backends.len()),
            local_count: self.local_count,
            flags,
            affinity_timeout_s: self.affinity_timeout_s,
        }
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The NAT maps for `services` and `slices` on `node`, keeping the ids of `previous` (the model
/// the maps hold now: the driver's current model, or `NatModel::default()` for a fresh node).
pub fn bpf_nat_model(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
    previous: &NatModel,
) -> NatModel {
    assign_ids(nat_services(services, slices, node), previous)
}

/// As [`bpf_nat_model`], with more backend lists beside the Services' (`extra`: the pods'
/// hostPorts, [`crate::host_ports::host_port_nat_services`]). Lists are named apart
/// (`hostport/...`), so ids stay sticky the same way; a frontend both claim goes to the first
/// name in order, and the conflict is recorded.
pub fn bpf_nat_model_with(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
    extra: &[NatService],
    previous: &NatModel,
) -> NatModel {
    let mut lists = nat_services(services, slices, node);
    lists.extend(extra.iter().cloned());
    lists.sort_by(|a, b| a.name.cmp(&b.name));
    assign_ids(lists, previous)
}

/// One service port, as the BPF NAT sees it.
#[derive(Debug)]
struct PortInfo {
    /// `ns/name:port/tcp`.
    name: String,
    namespace: String,
    service: String,
    port_name: String,
    proto: Proto,
    cluster_ip: Ipv4Addr,
    port: u16,
    node_port: u16,
    external_ips: Vec<Ipv4Addr>,
    lb_vips: Vec<Ipv4Addr>,
    /// Truncated, deduplicated; empty when a range is `/0` (every client allowed).
    source_ranges: BTreeSet<Ipv4Net>,
    affinity_timeout_s: u32,
    external_local: bool,
    internal_local: bool,
}

/// One endpoint of a service port after merging slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Endpoint {
    backend: Backend,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// The backend lists of every service port, sorted by name, without ids. Skipped as kube-proxy
/// skips them: ExternalName, headless, another proxy's (`service.kubernetes.io/service-proxy-name`),
/// no IPv4 cluster IP; and SCTP ports, which the BPF programs do not translate.
pub fn nat_services(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> Vec<NatService> {
    let by_service = slices_by_service(slices);
    let mut ports: Vec<PortInfo> = services.iter().flat_map(port_infos).collect();
    ports.sort_by(|a, b| {
        (&a.namespace, &a.service, &a.port_name, a.proto).cmp(&(
            &b.namespace,
            &b.service,
            &b.port_name,
            b.proto,
        ))
    });
    let mut out = Vec::new();
    for p in &ports {
        let key = (p.namespace.clone(), p.service.clone());
        let eps = by_service
            .get(&key)
            .map(|s| endpoints_for(p, s, node))
            .unwrap_or_default();
        lists_for(p, &eps, node, &mut out);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn parse_v4(text: &str) -> Option<Ipv4Addr> {
    text.trim().parse().ok()
}

fn port_number(p: i32) -> u16 {
    u16::try_from(p).unwrap_or(0)
}

fn port_infos(svc: &Service) -> Vec<PortInfo> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    if svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME))
    {
        return Vec::new();
    }
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Vec::new();
    }
    let Some(cluster_ip) = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .find_map(|ip| parse_v4(ip))
    else {
        return Vec::new();
    };
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let service = svc.metadata.name.clone().unwrap_or_default();
    let external_ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| parse_v4(ip))
        .collect();
    let externally_accessible_type = svc_type == "LoadBalancer"
        || svc_type == "NodePort"
        || (svc_type == "ClusterIP" && !external_ips.is_empty());
    let external_local =
        externally_accessible_type && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
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
    let mut source_ranges: BTreeSet<Ipv4Net> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| r.trim().parse::<Ipv4Net>().ok().map(|n| n.trunc()))
        .collect();
    if source_ranges.iter().any(|r| r.prefix_len() == 0) {
        source_ranges.clear();
    }
    let affinity_timeout_s = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
        u32::try_from(t).unwrap_or(0).max(1)
    } else {
        0
    };

    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            _ => continue,
        };
        let port_name = port.name.clone().unwrap_or_default();
        let name = if port_name.is_empty() {
            format!("{namespace}/{service}/{proto}")
        } else {
            format!("{namespace}/{service}:{port_name}/{proto}")
        };
        out.push(PortInfo {
            name,
            namespace: namespace.clone(),
            service: service.clone(),
            port_name,
            proto,
            cluster_ip,
            port: port_number(port.port),
            node_port: port_number(port.node_port.unwrap_or(0)),
            external_ips: external_ips.clone(),
            lb_vips: lb_vips.clone(),
            source_ranges: source_ranges.clone(),
            affinity_timeout_s,
            external_local,
            internal_local,
        });
    }
    out
}

/// Slices by (namespace, service), each list sorted by slice name (deterministic merging).
fn slices_by_service(slices: &[EndpointSlice]) -> BTreeMap<(String, String), Vec<&EndpointSlice>> {
    let mut by: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let labels = slice.metadata.labels.as_ref();
        let Some(service) = labels.and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            continue;
        };
        if service.is_empty()
            || labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS))
            || slice.address_type != "IPv4"
        {
            continue;
        }
        let namespace = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        by.entry((namespace, service.clone()))
            .or_default()
            .push(slice);
    }
    for list in by.values_mut() {
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    by
}

/// The endpoints of a service port, merged by `ip:port` (the first copy, or a local one), sorted
/// by address then port.
fn endpoints_for(p: &PortInfo, slices: &[&EndpointSlice], node: &NodeContext) -> Vec<Endpoint> {
    let mut set: BTreeMap<Backend, Endpoint> = BTreeMap::new();
    for slice in slices {
        for sport in slice.ports.iter().flatten() {
            if sport.name.as_deref().unwrap_or("") != p.port_name {
                continue;
            }
            let proto_ok = match sport.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => p.proto == Proto::Tcp,
                "UDP" => p.proto == Proto::Udp,
                _ => false,
            };
            let port = port_number(sport.port.unwrap_or(0));
            if !proto_ok || port == 0 {
                continue;
            }
            for ep in &slice.endpoints {
                let Some(addr) = ep.addresses.first().and_then(|a| parse_v4(a)) else {
                    continue;
                };
                let cond = ep.conditions.clone().unwrap_or_default();
                let local = !node.node_name.is_empty()
                    && ep.node_name.as_deref() == Some(node.node_name.as_str());
                let backend = Backend::new(addr, port);
                let endpoint = Endpoint {
                    backend,
                    local,
                    ready: cond.ready.unwrap_or(true),
                    serving: cond.serving.unwrap_or(true),
                    terminating: cond.terminating.unwrap_or(false),
                };
                if set.get(&backend).is_none_or(|_| local) {
                    set.insert(backend, endpoint);
                }
            }
        }
    }
    set.into_values().collect()
}

/// The backend list(s) of one service port and which frontends point at each.
fn lists_for(p: &PortInfo, eps: &[Endpoint], node: &NodeContext, out: &mut Vec<NatService>) {
    let usable = |e: &&Endpoint| e.serving && e.terminating;
    // The cluster set: ready endpoints, else serving-and-terminating ones (kube-proxy's
    // CategorizeEndpoints without topology).
    let mut cluster: Vec<Endpoint> = eps.iter().filter(|e| e.ready).copied().collect();
    if cluster.is_empty() {
        cluster = eps.iter().filter(usable).copied().collect();
    }
    // The local set: local ready ones, else local serving-and-terminating ones.
    let mut local: Vec<Endpoint> = eps.iter().filter(|e| e.local && e.ready).copied().collect();
    if local.is_empty() {
        local = eps
            .iter()
            .filter(|e| e.local)
            .filter(usable)
            .copied()
            .collect();
    }

    // Frontends: (key, flags). A Local flag means the frontend reads `local_count`.
    let mut frontends: Vec<(FrontendKey, u32)> = Vec::new();
    let cluster_ip_flags = if p.internal_local {
        flags::INT_LOCAL | flags::EXT_LOCAL
    } else {
        0
    };
    frontends.push((
        FrontendKey::new(p.cluster_ip, p.port, p.proto),
        cluster_ip_flags,
    ));
    let ext = if p.external_local {
        flags::EXT_LOCAL
    } else {
        0
    };
    if p.node_port != 0 {
        for ip in &node.node_ips {
            frontends.push((FrontendKey::new(*ip, p.node_port, p.proto), ext));
        }
        // The wildcard a backend node matches a NodePort flow by when it arrives through the
        // tunnel from another node (its destination is that node's address).
        frontends.push((
            FrontendKey::new(Ipv4Addr::BROADCAST, p.node_port, p.proto),
            ext,
        ));
    }
    for ip in &p.external_ips {
        frontends.push((FrontendKey::new(*ip, p.port, p.proto), ext));
    }
    for vip in &p.lb_vips {
        let key = FrontendKey::new(*vip, p.port, p.proto);
        if p.source_ranges.is_empty() {
            frontends.push((key, ext));
            continue;
        }
        let ranged = ext | flags::SRC_RANGES;
        frontends.push((key, ranged | flags::BLACKHOLE));
        let mut sources = p.source_ranges.clone();
        // kube-proxy: when a node address is in an allowed range, the node may reach its own LB
        // IP, and such packets carry the LB IP as source.
        if p.source_ranges
            .iter()
            .any(|r| node.node_ips.iter().any(|ip| r.contains(ip)))
        {
            sources.insert(Ipv4Net::from(*vip));
        }
        for source in sources {
            frontends.push((
                FrontendKey {
                    source: Some(source),
                    ..key
                },
                ranged,
            ));
        }
    }

    let is_local = |e: &Endpoint| local.iter().any(|l| l.backend == e.backend);
    let subset = local
        .iter()
        .all(|l| cluster.iter().any(|c| c.backend == l.backend));
    let ordered = |first: &[Endpoint], rest: &[Endpoint]| -> Vec<Backend> {
        first
            .iter()
            .map(|e| e.backend)
            .chain(
                rest.iter()
                    .filter(|e| !first.iter().any(|f| f.backend == e.backend))
                    .map(|e| e.backend),
            )
            .collect()
    };
    let service =
        |name: String, frontends: Vec<(FrontendKey, u32)>, backends, local_count| NatService {
            name,
            frontends,
            backends,
            local_count,
            affinity_timeout_s: p.affinity_timeout_s,
        };

    if subset {
        // One list: the local set is the local part of the cluster set.
        let first: Vec<Endpoint> = cluster.iter().filter(|e| is_local(e)).copied().collect();
        out.push(service(
            p.name.clone(),
            frontends,
            ordered(&first, &cluster),
            len_u32(first.len()),
        ));
        return;
    }
    // The local set holds local terminating endpoints while remote ones are ready: frontends
    // that only count (`flags == 0`) get the cluster set alone; those with a Local flag get the
    // local set first, then the cluster set (their in-cluster clients of an externalTrafficPolicy
    // Local frontend may then pick a local terminating endpoint: see the design doc).
    let (plain, with_local): (Vec<_>, Vec<_>) = frontends
        .into_iter()
        .partition(|(_, f)| f & (flags::EXT_LOCAL | flags::INT_LOCAL) == 0);
    if !plain.is_empty() {
        // No local endpoint is ready, so the cluster set has no local member.
        out.push(service(p.name.clone(), plain, ordered(&[], &cluster), 0));
    }
    if !with_local.is_empty() {
        out.push(service(
            format!("{}+local", p.name),
            with_local,
            ordered(&local, &cluster),
            len_u32(local.len()),
        ));
    }
}
