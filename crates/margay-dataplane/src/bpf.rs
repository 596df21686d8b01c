//! The BPF dataplane's Service NAT driver: makes the pinned NAT maps (`mg_nat_fe`, `mg_nat_be`)
//! hold a [`NatModel`] computed by `margay_calc::bpf_nat`, and cleans the conntrack table
//! ([`conntrack`]).
//!
//! ## Model
//!
//! The driver keeps `current`, the model it believes the maps hold. On start it **adopts** the
//! maps: it reads every frontend and backend back ([`BpfNatDriver::new`]), so a restarted agent
//! computes its next model against what the kernel has (`margay_calc::bpf_nat::assign_ids`
//! adopts the ids the frontends carry) and writes nothing when nothing changed: flows go on
//! being translated and nothing is rewritten.
//!
//! [`BpfNatDriver::apply`] writes the difference between `current` and the desired model in the
//! order that keeps a program reading concurrently safe ([`NatDiff`]): new and changed backends,
//! then frontends (most specific source range first), then stale frontends, then stale backends.
//! A frontend never counts an ordinal that is missing, a blackhole never covers an allowed range
//! that is not written yet, and a deleted service stops matching before its backends go. Then
//! it removes the session-affinity entries that point at backends a service lost, so that a
//! sticky client does not keep being sent to a dead pod for the affinity timeout.
//!
//! Nothing is written before the first `apply`: the agent calls it once its datastore sync is
//! complete (an early partial model would delete services that are merely not loaded yet).
//!
//! `current` is updated entry by entry as writes succeed, so after a failed `apply` (a full map,
//! say) it still matches the kernel and the next `apply` retries only what is missing.
//! [`BpfNatDriver::verify`] compares the kernel with `current` (drift, tests) and
//! [`BpfNatDriver::resync`] re-adopts the kernel's contents.
//!
//! The driver blocks on one syscall per entry written, deleted or read back (aya 0.14 has no
//! batch operations); from async code call it through `spawn_blocking`. Maps are per host, not
//! per network namespace: the driver works from any namespace.

pub mod conntrack;
pub mod handover;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use margay_api::calico::FelixConfigurationSpec;
use margay_bpf::maps::{
    MapSizes, Maps, NatBackendKey, NatBackendValue, NatFrontendKey, NatFrontendValue, Protocol, nat,
};
use margay_calc::NodeContext;
use margay_calc::bpf_nat::{
    Backend, BackendKey, FrontendKey, FrontendValue, NatDiff, NatModel, Proto, bpf_nat_model_with,
    flags,
};
use margay_calc::kube_proxy::ServiceName;

pub use conntrack::{CleanupReport, Timeouts};

// The flags and protocol numbers of the model are the C's (mirrored in margay-bpf).
const _: () = {
    assert!(Proto::Tcp.number() == Protocol::Tcp as u8);
    assert!(Proto::Udp.number() == Protocol::Udp as u8);
    assert!(flags::EXT_LOCAL == nat::FE_EXT_LOCAL);
    assert!(flags::INT_LOCAL == nat::FE_INT_LOCAL);
    assert!(flags::BLACKHOLE == nat::FE_BLACKHOLE);
    assert!(flags::SRC_RANGES == nat::FE_SRC_RANGES);
};

// === Errors ===

/// Why the driver failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(transparent)]
    Bpf(#[from] margay_bpf::Error),
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

// === Conversions between the model and the maps ===

fn protocol(p: Proto) -> Protocol {
    match p {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
    }
}

/// The map key of a model frontend.
pub fn frontend_key(k: &FrontendKey) -> NatFrontendKey {
    NatFrontendKey::new(k.addr, k.port, protocol(k.proto), k.source)
}

/// The map value of a model frontend.
pub fn frontend_value(v: &FrontendValue) -> NatFrontendValue {
    NatFrontendValue {
        svc_id: v.svc_id,
        count: v.count,
        local_count: v.local_count,
        flags: v.flags,
        affinity_timeout_s: v.affinity_timeout_s,
    }
}

/// The model key of a map frontend; `None` for an entry Margay does not write (unknown
/// protocol, non-zero pad, a source prefix longer than /32).
pub fn model_frontend_key(k: &NatFrontendKey) -> Option<FrontendKey> {
    let proto = Proto::from_number(k.proto)?;
    let len = k.prefixlen.checked_sub(nat::PREFIX_FIXED)?;
    if k.pad != 0 || len > 32 {
        return None;
    }
    let source = if len == 0 {
        if k.src_addr != 0 {
            return None;
        }
        None
    } else {
        Some(k.source()?)
    };
    let key = FrontendKey {
        addr: k.addr(),
        port: k.port(),
        proto,
        source,
    };
    // Only canonical keys (source network truncated) round-trip.
    (frontend_key(&key) == *k).then_some(key)
}

fn model_frontend_value(v: &NatFrontendValue) -> FrontendValue {
    FrontendValue {
        svc_id: v.svc_id,
        count: v.count,
        local_count: v.local_count,
        flags: v.flags,
        affinity_timeout_s: v.affinity_timeout_s,
    }
}

fn backend_key(k: &BackendKey) -> NatBackendKey {
    NatBackendKey {
        svc_id: k.svc_id,
        ordinal: k.ordinal,
    }
}

fn backend_value(b: &Backend) -> NatBackendValue {
    let value = NatBackendValue::new(b.addr, b.port);
    if b.node.is_unspecified() {
        value
    } else {
        value.on_node(b.node)
    }
}

fn model_backend(v: &NatBackendValue) -> Backend {
    Backend {
        addr: v.addr(),
        port: v.port(),
        node: v.node().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}

/// Map sizes from the effective FelixConfiguration (`bpfMapSize*`; Calico's defaults where
/// unset).
pub fn map_sizes(spec: &FelixConfigurationSpec) -> MapSizes {
    let d = MapSizes::default();
    MapSizes {
        conntrack: spec.bpf_map_size_conntrack.map_or(d.conntrack, |s| s.0),
        nat_frontend: spec
            .bpf_map_size_nat_frontend
            .map_or(d.nat_frontend, |s| s.0),
        nat_backend: spec.bpf_map_size_nat_backend.map_or(d.nat_backend, |s| s.0),
        nat_affinity: spec
            .bpf_map_size_nat_affinity
            .map_or(d.nat_affinity, |s| s.0),
        route: spec.bpf_map_size_route.map_or(d.route, |s| s.0),
        if_state: spec.bpf_map_size_if_state.map_or(d.if_state, |s| s.0),
    }
}

// === Reports ===

/// What adopting the maps found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    pub frontends: usize,
    pub backends: usize,
    /// Frontend entries Margay would never write (see [`model_frontend_key`]); the first
    /// `apply` deletes them.
    pub foreign_frontends: usize,
    pub duration: Duration,
}

/// What [`BpfNatDriver::sync_services`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServicesSync {
    /// Only the changed Services' entries were recalculated and the differences written.
    Applied(ApplyReport),
    /// Nothing was written: this change needs [`BpfNatDriver::sync`] with every Service (why).
    NeedsFull(String),
}

/// What one [`BpfNatDriver::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub backends_written: usize,
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    pub backends_deleted: usize,
    /// Session-affinity entries removed because their backend left the service.
    pub affinity_removed: usize,
    /// Totals after the apply.
    pub frontends: usize,
    pub backends: usize,
    pub services: usize,
    pub duration: Duration,
}

impl ApplyReport {
    /// Map operations performed (writes and deletes, affinity included).
    pub fn operations(&self) -> usize {
        self.backends_written
            + self.frontends_written
            + self.frontends_deleted
            + self.backends_deleted
            + self.affinity_removed
    }
}

/// What [`BpfNatDriver::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Operations that would turn the kernel's maps into the driver's model.
    pub diff: NatDiff,
    pub foreign_frontends: Vec<NatFrontendKey>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.diff.is_empty() && self.foreign_frontends.is_empty()
    }
}

// === The driver ===

/// Owns the typed maps and programs the NAT by difference.
#[derive(Debug)]
pub struct BpfNatDriver {
    maps: Maps,
    current: NatModel,
    foreign_frontends: Vec<NatFrontendKey>,
    applied: bool,
    adopted: AdoptReport,
    /// Other nodes' addresses, for remote backends (Tunnel mode).
    peers: BTreeMap<String, Ipv4Addr>,
    /// Backend lists beside the Services': this node's pods' hostPorts.
    host_ports: Vec<margay_calc::bpf_nat::NatService>,
}

impl BpfNatDriver {
    /// Takes the maps (from `Dataplane::maps()` or `Maps::open`) and adopts their contents.
    /// Writes nothing.
    pub fn new(maps: Maps) -> Result<Self, BpfError> {
        let mut driver = Self {
            maps,
            current: NatModel::default(),
            foreign_frontends: Vec::new(),
            applied: false,
            adopted: AdoptReport::default(),
            peers: BTreeMap::new(),
            host_ports: Vec::new(),
        };
        driver.resync()?;
        Ok(driver)
    }

    /// Opens the maps pinned in `pin_dir` and adopts them.
    pub fn open(pin_dir: &Path) -> Result<Self, BpfError> {
        Self::new(Maps::open(pin_dir)?)
    }

    /// What the maps held when they were last adopted.
    pub fn adopted(&self) -> &AdoptReport {
        &self.adopted
    }

    /// The model the driver believes the maps hold: pass it as `previous` to
    /// `margay_calc::bpf_nat_model` so that ids stay put.
    pub fn current(&self) -> &NatModel {
        &self.current
    }

    /// Whether [`Self::apply`] has completed once (conntrack cleanup of flows to removed
    /// backends waits for it: before, the model says nothing about the cluster).
    pub fn applied(&self) -> bool {
        self.applied
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The maps, for what the driver does not own (counters, routes, ifstate). Writing the NAT
    /// maps behind the driver's back is drift: call [`Self::resync`] after.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Reads the NAT maps into a model (no names) and the frontend keys Margay does not write.
    pub fn read_maps(&self) -> Result<(NatModel, Vec<NatFrontendKey>), BpfError> {
        let mut model = NatModel::default();
        let mut foreign = Vec::new();
        for (k, v) in self.maps.nat_frontends.entries()? {
            match model_frontend_key(&k) {
                Some(key) => {
                    model.frontends.insert(key, model_frontend_value(&v));
                }
                None => foreign.push(k),
            }
        }
        for (k, v) in self.maps.nat_backends.entries()? {
            model.backends.insert(
                BackendKey {
                    svc_id: k.svc_id,
                    ordinal: k.ordinal,
                },
                model_backend(&v),
            );
        }
        Ok((model, foreign))
    }

    /// Re-adopts the kernel's contents (after drift, or a failure the driver cannot account
    /// for). Names of ids still present are kept.
    pub fn resync(&mut self) -> Result<&AdoptReport, BpfError> {
        let start = Instant::now();
        let (mut model, foreign) = self.read_maps()?;
        let ids = model.ids();
        model.services = std::mem::take(&mut self.current.services)
            .into_iter()
            .filter(|(id, _)| ids.contains(id))
            .collect();
        self.adopted = AdoptReport {
            frontends: model.frontends.len(),
            backends: model.backends.len(),
            foreign_frontends: foreign.len(),
            duration: start.elapsed(),
        };
        self.current = model;
        self.foreign_frontends = foreign;
        Ok(&self.adopted)
    }

    /// How the kernel differs from [`Self::current`]: the operations that would bring it back,
    /// and the frontend entries Margay does not write. Nothing, when there is no drift.
    pub fn verify(&self) -> Result<Drift, BpfError> {
        let (kernel, foreign) = self.read_maps()?;
        Ok(Drift {
            diff: kernel.diff(&self.current),
            foreign_frontends: foreign,
        })
    }

    /// Computes the model for these resources against [`Self::current`] and applies it.
    pub fn sync(
        &mut self,
        services: &[Service],
        slices: &[EndpointSlice],
        node: &NodeContext,
    ) -> Result<ApplyReport, BpfError> {
        let desired = self.desired(services, slices, node);
        self.apply(&desired)
    }

    /// The model [`Self::sync`] would apply for these resources (ids adopted from
    /// [`Self::current`]).
    pub fn desired(
        &self,
        services: &[Service],
        slices: &[EndpointSlice],
        node: &NodeContext,
    ) -> NatModel {
        let mut desired =
            bpf_nat_model_with(services, slices, node, &self.host_ports, &self.current);
        self.place_remote_backends(&mut desired, slices, node);
        for c in &desired.conflicts {
            tracing::warn!(conflict = %c, "two services claim one frontend");
        }
        desired
    }

    /// Writes a NAT pair into `mg_ct` for each UDP flow of `flows` (read from the kernel's
    /// conntrack, [`handover::parse_nf_conntrack`]) whose frontend and backend `model` has and
    /// that the programs do not track yet, so that its next datagram keeps the backend the
    /// kernel chose ([`handover`]). TCP flows are left to the fall-through path.
    pub fn seed_udp_flows(
        &mut self,
        model: &NatModel,
        flows: &[handover::KernelNatFlow],
    ) -> Result<handover::SeedReport, BpfError> {
        let mut report = handover::SeedReport::default();
        let now = conntrack::monotonic_now_ns();
        for flow in flows.iter().filter(|f| f.proto == 17) {
            report.kernel_flows += 1;
            let Some(svc_id) = handover::service_of(model, flow) else {
                report.unknown += 1;
                continue;
            };
            let [rev, fwd] = handover::nat_pair(flow, svc_id, now);
            if self.maps.conntrack.get(&fwd.0)?.is_some() {
                report.present += 1;
                continue;
            }
            // Reverse first, as the programs do: a forward entry never points at nothing.
            self.maps.conntrack.insert(&rev.0, &rev.1)?;
            self.maps.conntrack.insert(&fwd.0, &fwd.1)?;
            report.seeded += 1;
        }
        Ok(report)
    }

    /// Sets this node's Tunnel/DSR configuration for the programs: its own address (0 turns the
    /// tunnel off) and how replies of tunnelled flows return.
    pub fn set_node_config(&mut self, cfg: &margay_bpf::maps::NodeConfig) -> Result<(), BpfError> {
        self.maps.node_config.set(cfg)?;
        Ok(())
    }

    /// Sets the backend lists the next syncs write beside the Services': this node's pods'
    /// hostPorts (`margay_calc::host_ports::host_port_nat_services`), empty when Disabled.
    pub fn set_host_ports(&mut self, lists: Vec<margay_calc::bpf_nat::NatService>) {
        self.host_ports = lists;
    }

    /// Sets `bpfDSROptoutCIDRs`: in DSR mode, clients in these networks are served the Tunnel
    /// way. Written by difference; IPv6 networks are not for this IPv4 dataplane and are skipped.
    pub fn set_dsr_optout(&mut self, nets: &[ipnet::IpNet]) -> Result<(), BpfError> {
        let v4: Vec<ipnet::Ipv4Net> = nets
            .iter()
            .filter_map(|n| match n {
                ipnet::IpNet::V4(n) => Some(*n),
                ipnet::IpNet::V6(_) => None,
            })
            .collect();
        self.maps.dsr_optout.set(&v4)?;
        Ok(())
    }

    /// Tells the driver where other nodes are (node name -> address): backends on those nodes
    /// are written with their node, which the programs' Tunnel mode sends external flows to.
    pub fn set_peer_nodes(&mut self, peers: BTreeMap<String, Ipv4Addr>) {
        self.peers = peers;
    }

    /// Fills in the node of every backend that runs on another known node.
    fn place_remote_backends(
        &self,
        model: &mut NatModel,
        slices: &[EndpointSlice],
        node: &NodeContext,
    ) {
        if self.peers.is_empty() {
            return;
        }
        let mut node_of: BTreeMap<Ipv4Addr, Ipv4Addr> = BTreeMap::new();
        for slice in slices {
            for ep in &slice.endpoints {
                let Some(name) = ep.node_name.as_deref() else {
                    continue;
                };
                if name == node.node_name {
                    continue;
                }
                let Some(ip) = self.peers.get(name) else {
                    continue;
                };
                for addr in &ep.addresses {
                    if let Ok(a) = addr.parse() {
                        node_of.insert(a, *ip);
                    }
                }
            }
        }
        for backend in model.backends.values_mut() {
            if let Some(ip) = node_of.get(&backend.addr) {
                backend.node = *ip;
            }
        }
    }

    /// Makes the maps hold `desired` by difference (see the module doc for the order).
    /// `desired` should have been computed with [`Self::current`] as its previous model.
    pub fn apply(&mut self, desired: &NatModel) -> Result<ApplyReport, BpfError> {
        let start = Instant::now();
        let diff = self.current.diff(desired);
        // Names: the desired ones, plus old ones whose entries may still be in the maps until
        // the deletes have succeeded.
        let old_names = std::mem::replace(&mut self.current.services, desired.services.clone());
        for (id, name) in old_names {
            self.current.services.entry(id).or_insert(name);
        }
        self.current.conflicts = desired.conflicts.clone();
        let mut report = self.write_diff(&diff)?;
        self.current
            .services
            .retain(|id, _| desired.services.contains_key(id));
        self.applied = true;
        report.frontends = self.current.frontends.len();
        report.backends = self.current.backends.len();
        report.services = self.current.services.len();
        report.duration = start.elapsed();
        tracing::debug!(?report, "NAT maps applied");
        Ok(report)
    }

    /// Recalculates only the Services `changed` and writes only their entries that changed:
    /// `services` holds those of them that exist, `slices` every EndpointSlice naming one of
    /// them (others are ignored). The maps end up exactly as [`Self::sync`] with every Service
    /// would leave them (`tests/bpf.rs` checks it), unless the answer could depend on other
    /// Services (a frontend two lists claim) or no full sync has completed yet: then nothing is
    /// written and [`ServicesSync::NeedsFull`] says why.
    pub fn sync_services(
        &mut self,
        changed: &[ServiceName],
        services: &[Service],
        slices: &[EndpointSlice],
        node: &NodeContext,
    ) -> Result<ServicesSync, BpfError> {
        if !self.applied {
            return Ok(ServicesSync::NeedsFull(
                "no full sync has completed since the maps were adopted".to_owned(),
            ));
        }
        let start = Instant::now();
        let own_slices: Vec<EndpointSlice> = slices
            .iter()
            .filter(|s| {
                margay_calc::scenario::slice_service(s).is_some_and(|n| changed.contains(&n))
            })
            .cloned()
            .collect();
        let own_services: Vec<Service> = services
            .iter()
            .filter(|s| changed.contains(&margay_calc::scenario::service_name(s)))
            .cloned()
            .collect();
        let lists = margay_calc::bpf_nat::nat_services(&own_services, &own_slices, node);
        let host_port_lists: BTreeSet<&str> =
            self.host_ports.iter().map(|l| l.name.as_str()).collect();
        let replaced = |name: &str| {
            !host_port_lists.contains(name)
                && changed
                    .iter()
                    .any(|svc| margay_calc::bpf_nat::list_of_service(name, svc))
        };
        let (old, mut new) =
            match margay_calc::bpf_nat::replace_lists(&self.current, &replaced, lists) {
                Ok(pair) => pair,
                Err(why) => return Ok(ServicesSync::NeedsFull(why)),
            };
        self.place_remote_backends(&mut new, &own_slices, node);
        let diff = old.diff(&new);
        self.current.services.extend(new.services.clone());
        let mut report = self.write_diff(&diff)?;
        for id in old.services.keys() {
            if !new.services.contains_key(id) {
                self.current.services.remove(id);
            }
        }
        report.frontends = self.current.frontends.len();
        report.backends = self.current.backends.len();
        report.services = self.current.services.len();
        report.duration = start.elapsed();
        tracing::debug!(?report, "NAT maps applied for {} Services", changed.len());
        Ok(ServicesSync::Applied(report))
    }

    /// Writes `diff` in the order the module doc gives, keeping [`Self::current`]'s entries in
    /// step with each write, and removes stale affinity entries of sticky services whose
    /// backends changed.
    fn write_diff(&mut self, diff: &NatDiff) -> Result<ApplyReport, BpfError> {
        let mut report = ApplyReport::default();

        // Services with session affinity whose backend set changes: their affinity entries
        // are checked once the backends are written.
        let sticky: BTreeSet<u32> = self
            .current
            .frontends
            .values()
            .filter(|v| v.affinity_timeout_s != 0)
            .map(|v| v.svc_id)
            .collect();
        let mut affinity_check: BTreeSet<u32> = BTreeSet::new();
        for (k, _) in &diff.backend_writes {
            if sticky.contains(&k.svc_id) && self.current.backends.contains_key(k) {
                affinity_check.insert(k.svc_id);
            }
        }
        for k in &diff.backend_deletes {
            if sticky.contains(&k.svc_id) {
                affinity_check.insert(k.svc_id);
            }
        }

        for (k, b) in &diff.backend_writes {
            self.maps
                .nat_backends
                .insert(&backend_key(k), &backend_value(b))?;
            self.current.backends.insert(*k, *b);
            report.backends_written += 1;
        }
        for (k, v) in &diff.frontend_writes {
            self.maps
                .nat_frontends
                .insert(&frontend_key(k), &frontend_value(v))?;
            self.current.frontends.insert(*k, *v);
            report.frontends_written += 1;
        }
        for k in &diff.frontend_deletes {
            self.maps.nat_frontends.remove(&frontend_key(k))?;
            self.current.frontends.remove(k);
            report.frontends_deleted += 1;
        }
        while let Some(k) = self.foreign_frontends.pop() {
            if let Err(e) = self.maps.nat_frontends.remove(&k) {
                self.foreign_frontends.push(k);
                return Err(e.into());
            }
            report.frontends_deleted += 1;
        }
        for k in &diff.backend_deletes {
            self.maps.nat_backends.remove(&backend_key(k))?;
            self.current.backends.remove(k);
            report.backends_deleted += 1;
        }

        if !affinity_check.is_empty() {
            report.affinity_removed = self.purge_affinity(&affinity_check)?;
        }
        Ok(report)
    }

    /// Removes the affinity entries of `ids` whose backend is no longer one of the service's.
    fn purge_affinity(&mut self, ids: &BTreeSet<u32>) -> Result<usize, BpfError> {
        let live: BTreeMap<u32, BTreeSet<Backend>> = ids
            .iter()
            .map(|id| {
                (
                    *id,
                    self.current.backends_of(*id).map(|(_, b)| *b).collect(),
                )
            })
            .collect();
        let mut removed = 0;
        for (k, v) in self.maps.affinity.entries()? {
            let Some(set) = live.get(&k.svc_id) else {
                continue;
            };
            if !set.contains(&model_backend(&v.be)) {
                self.maps.affinity.remove(&k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Flows in conntrack that may still send packets ([`conntrack::live_flows`]).
    pub fn live_flows(&self, timeouts: &Timeouts) -> Result<usize, BpfError> {
        let entries = self.maps.conntrack.entries()?;
        Ok(conntrack::live_flows(
            &entries,
            conntrack::monotonic_now_ns(),
            timeouts,
        ))
    }

    /// The live flows ([`conntrack::live_flow_entries`]), one line each
    /// ([`conntrack::describe_flow`]).
    pub fn live_flow_descriptions(&self, timeouts: &Timeouts) -> Result<Vec<String>, BpfError> {
        let entries = self.maps.conntrack.entries()?;
        Ok(
            conntrack::live_flow_entries(&entries, conntrack::monotonic_now_ns(), timeouts)
                .into_iter()
                .map(|(k, v)| conntrack::describe_flow(k, v))
                .collect(),
        )
    }

    /// One conntrack cleanup pass ([`conntrack::cleanup`]) with the driver's model: expired
    /// pairs and orphans always; flows to backends the model no longer has only once the model
    /// has been applied.
    pub fn cleanup_conntrack(&mut self, timeouts: &Timeouts) -> Result<CleanupReport, BpfError> {
        let live = self
            .applied
            .then(|| conntrack::LiveBackends::new(&self.current));
        conntrack::cleanup(
            &mut self.maps.conntrack,
            live.as_ref(),
            timeouts,
            conntrack::monotonic_now_ns(),
        )
    }
}
