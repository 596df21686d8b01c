//! NAT frontends, backends and session affinity (`mg_nat_fe`, `mg_nat_be`, `mg_nat_aff`).

use std::net::Ipv4Addr;

use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use ipnet::Ipv4Net;

use super::{addr_of, be_addr, be_port, impl_pod, names, port_of};
use crate::Error;

/// Bits of [`NatFrontendKey`] after `prefixlen` that every frontend matches exactly
/// (`MG_NAT_FE_PREFIX_FIXED`): addr, port, proto and pad.
pub const PREFIX_FIXED: u32 = 64;
/// Prefix length of a lookup (`MG_NAT_FE_PREFIX_FULL`).
pub const PREFIX_FULL: u32 = PREFIX_FIXED + 32;

/// `MG_NAT_FE_NODEPORT_ANY`: the address of a NodePort's wildcard frontend, looked up only for
/// packets that came through the tunnel (their destination is the NodePort on the ingress
/// node's address). See [`NatFrontendKey::node_port_any`].
pub const NODEPORT_ANY: Ipv4Addr = Ipv4Addr::BROADCAST;

/// `MG_FE_F_EXT_LOCAL`: externalTrafficPolicy Local.
pub const FE_EXT_LOCAL: u32 = 1 << 0;
/// `MG_FE_F_INT_LOCAL`: internalTrafficPolicy Local.
pub const FE_INT_LOCAL: u32 = 1 << 1;
/// `MG_FE_F_BLACKHOLE`: drop (client outside every allowed source range).
pub const FE_BLACKHOLE: u32 = 1 << 2;
/// `MG_FE_F_SRC_RANGES`: the frontend has loadBalancerSourceRanges.
pub const FE_SRC_RANGES: u32 = 1 << 3;

/// IP protocols the NAT handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Protocol {
    Tcp = 6,
    Udp = 17,
}

impl Protocol {
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }
}

/// Mirrors `struct mg_nat_fe_key` (LPM trie key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatFrontendKey {
    /// host: [`PREFIX_FIXED`] + the source CIDR's length.
    pub prefixlen: u32,
    /// be
    pub addr: u32,
    /// be
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    /// be: source network, 0 without source range.
    pub src_addr: u32,
}

/// The part of [`NatFrontendKey`] after `prefixlen`, as aya's `lpm_trie::Key` wants it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatFrontendMatch {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub src_addr: u32,
}

impl NatFrontendKey {
    /// A frontend (address, port, protocol), for every client or only clients in `src`.
    pub fn new(addr: Ipv4Addr, port: u16, proto: Protocol, src: Option<Ipv4Net>) -> Self {
        let (prefix, src_addr) = match src {
            Some(net) => (u32::from(net.prefix_len()), be_addr(net.trunc().addr())),
            None => (0, 0),
        };
        Self {
            prefixlen: PREFIX_FIXED + prefix,
            addr: be_addr(addr),
            port: be_port(port),
            proto: proto as u8,
            pad: 0,
            src_addr,
        }
    }

    /// The wildcard frontend of a NodePort (address [`NODEPORT_ANY`]): the agent writes it next
    /// to the per-address NodePort frontends, with the same value, so that a node receiving a
    /// flow through the tunnel finds the service whichever node's address the client dialled.
    pub fn node_port_any(port: u16, proto: Protocol) -> Self {
        Self::new(NODEPORT_ANY, port, proto, None)
    }

    /// The key of a lookup by a packet from `client` (what the programs use).
    pub fn lookup(addr: Ipv4Addr, port: u16, proto: Protocol, client: Ipv4Addr) -> Self {
        Self {
            prefixlen: PREFIX_FULL,
            addr: be_addr(addr),
            port: be_port(port),
            proto: proto as u8,
            pad: 0,
            src_addr: be_addr(client),
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        addr_of(self.addr)
    }

    pub fn port(&self) -> u16 {
        port_of(self.port)
    }

    /// The source range, if any.
    pub fn source(&self) -> Option<Ipv4Net> {
        let len = self.prefixlen.checked_sub(PREFIX_FIXED)?;
        if len == 0 {
            return None;
        }
        Ipv4Net::new(addr_of(self.src_addr), u8::try_from(len).ok()?).ok()
    }

    fn to_lpm(self) -> Key<NatFrontendMatch> {
        Key::new(
            self.prefixlen,
            NatFrontendMatch {
                addr: self.addr,
                port: self.port,
                proto: self.proto,
                pad: 0,
                src_addr: self.src_addr,
            },
        )
    }

    fn from_lpm(k: &Key<NatFrontendMatch>) -> Self {
        let m = k.data();
        Self {
            prefixlen: k.prefix_len(),
            addr: m.addr,
            port: m.port,
            proto: m.proto,
            pad: m.pad,
            src_addr: m.src_addr,
        }
    }
}

/// Mirrors `struct mg_nat_fe_val`. All fields host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatFrontendValue {
    pub svc_id: u32,
    /// Backends at ordinals `0..count`.
    pub count: u32,
    /// Backends on this node, at ordinals `0..local_count`.
    pub local_count: u32,
    /// `FE_*` flags.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds, 0 = none.
    pub affinity_timeout_s: u32,
}

/// Mirrors `struct mg_nat_be_key`. Host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatBackendKey {
    pub svc_id: u32,
    pub ordinal: u32,
}

/// Mirrors `struct mg_nat_be_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatBackendValue {
    /// be
    pub addr: u32,
    /// be
    pub port: u16,
    pub pad: u16,
    /// be: underlay address of the node hosting the backend; 0 = this node. An external flow
    /// that picks a backend on another node goes there in the tunnel (tunnel mode).
    pub node: u32,
}

impl NatBackendValue {
    /// A backend on this node (or one whose node is not known: then it is DNATed here).
    pub fn new(addr: Ipv4Addr, port: u16) -> Self {
        Self {
            addr: be_addr(addr),
            port: be_port(port),
            pad: 0,
            node: 0,
        }
    }

    /// The same backend, hosted by the node with underlay address `node`.
    #[must_use]
    pub fn on_node(self, node: Ipv4Addr) -> Self {
        Self {
            node: be_addr(node),
            ..self
        }
    }

    /// The node hosting the backend, `None` for this node.
    pub fn node(&self) -> Option<Ipv4Addr> {
        (self.node != 0).then(|| addr_of(self.node))
    }

    pub fn addr(&self) -> Ipv4Addr {
        addr_of(self.addr)
    }

    pub fn port(&self) -> u16 {
        port_of(self.port)
    }
}

/// Mirrors `struct mg_nat_aff_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// host
    pub svc_id: u32,
    /// be
    pub client: u32,
}

/// Mirrors `struct mg_nat_aff_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// host: CLOCK_MONOTONIC ns when chosen.
    pub ts_ns: u64,
    pub be: NatBackendValue,
    pub pad: u32,
}

impl_pod!(
    NatFrontendMatch,
    NatFrontendValue,
    NatBackendKey,
    NatBackendValue,
    AffinityKey,
    AffinityValue
);

// === impl NatFrontends ===

/// `mg_nat_fe`: service frontends.
#[derive(Debug)]
pub struct NatFrontends {
    map: LpmTrie<MapData, NatFrontendMatch, NatFrontendValue>,
}

impl NatFrontends {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = LpmTrie::try_from(map).map_err(|source| Error::Map {
            name: names::NAT_FRONTEND,
            source,
        })?;
        Ok(Self { map })
    }

    pub fn insert(&mut self, key: &NatFrontendKey, value: &NatFrontendValue) -> Result<(), Error> {
        self.map
            .insert(&key.to_lpm(), value, 0)
            .map_err(map_err(names::NAT_FRONTEND))
    }

    /// Removes an entry; removing a missing entry is not an error.
    pub fn remove(&mut self, key: &NatFrontendKey) -> Result<(), Error> {
        ignore_missing(self.map.remove(&key.to_lpm()), names::NAT_FRONTEND)
    }

    /// Longest-prefix lookup, as the programs do it (use [`NatFrontendKey::lookup`]).
    pub fn lookup(&self, key: &NatFrontendKey) -> Result<Option<NatFrontendValue>, Error> {
        found(self.map.get(&key.to_lpm(), 0), names::NAT_FRONTEND)
    }

    pub fn entries(&self) -> Result<Vec<(NatFrontendKey, NatFrontendValue)>, Error> {
        self.map
            .iter()
            .map(|r| r.map(|(k, v)| (NatFrontendKey::from_lpm(&k), v)))
            .collect::<Result<_, _>>()
            .map_err(map_err(names::NAT_FRONTEND))
    }
}

// === impl NatBackends ===

/// `mg_nat_be`: backends by (service id, ordinal).
#[derive(Debug)]
pub struct NatBackends {
    map: HashMap<MapData, NatBackendKey, NatBackendValue>,
}

impl NatBackends {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::NAT_BACKEND,
            source,
        })?;
        Ok(Self { map })
    }

    pub fn insert(&mut self, key: &NatBackendKey, value: &NatBackendValue) -> Result<(), Error> {
        self.map
            .insert(key, value, 0)
            .map_err(map_err(names::NAT_BACKEND))
    }

    pub fn remove(&mut self, key: &NatBackendKey) -> Result<(), Error> {
        ignore_missing(self.map.remove(key), names::NAT_BACKEND)
    }

    pub fn get(&self, key: &NatBackendKey) -> Result<Option<NatBackendValue>, Error> {
        found(self.map.get(key, 0), names::NAT_BACKEND)
    }

    pub fn entries(&self) -> Result<Vec<(NatBackendKey, NatBackendValue)>, Error> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::NAT_BACKEND))
    }
}

/// One service as the agent programs it: its frontends (one per address, port, protocol and
/// source range) sharing one id, and its backends with the local ones first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceNat {
    pub svc_id: u32,
    pub frontends: Vec<(NatFrontendKey, u32)>,
    /// Backends on this node; they get the lowest ordinals.
    pub local: Vec<NatBackendValue>,
    /// Backends on other nodes (with their node, [`NatBackendValue::on_node`], for tunnel
    /// mode).
    pub remote: Vec<NatBackendValue>,
    pub affinity_timeout_s: u32,
}

impl ServiceNat {
    /// The frontend value every frontend of this service gets, with its own `flags`.
    pub fn value(&self, flags: u32) -> NatFrontendValue {
        NatFrontendValue {
            svc_id: self.svc_id,
            count: len_u32(self.local.len() + self.remote.len()),
            local_count: len_u32(self.local.len()),
            flags,
            affinity_timeout_s: self.affinity_timeout_s,
        }
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Writes a service so that a program reading concurrently never sees a count larger than the
/// ordinals present: backends first, then the frontends (with the new count), then the ordinals
/// past the new count are removed (`old_count` is the count written last time, 0 for a new
/// service).
pub fn write_service(
    fe: &mut NatFrontends,
    be: &mut NatBackends,
    svc: &ServiceNat,
    old_count: u32,
) -> Result<(), Error> {
    let all = svc.local.iter().chain(svc.remote.iter());
    let mut count = 0u32;
    for (ordinal, value) in (0u32..).zip(all) {
        be.insert(
            &NatBackendKey {
                svc_id: svc.svc_id,
                ordinal,
            },
            value,
        )?;
        count = ordinal + 1;
    }
    for (key, flags) in &svc.frontends {
        fe.insert(key, &svc.value(*flags))?;
    }
    for ordinal in count..old_count {
        be.remove(&NatBackendKey {
            svc_id: svc.svc_id,
            ordinal,
        })?;
    }
    Ok(())
}

/// Removes a service: frontends first (no new flow can pick it), then its `count` backends.
pub fn remove_service(
    fe: &mut NatFrontends,
    be: &mut NatBackends,
    svc: &ServiceNat,
    count: u32,
) -> Result<(), Error> {
    for (key, _) in &svc.frontends {
        fe.remove(key)?;
    }
    for ordinal in 0..count {
        be.remove(&NatBackendKey {
            svc_id: svc.svc_id,
            ordinal,
        })?;
    }
    Ok(())
}

// === impl Affinity ===

/// `mg_nat_aff`: sessionAffinity ClientIP state.
#[derive(Debug)]
pub struct Affinity {
    map: HashMap<MapData, AffinityKey, AffinityValue>,
}

impl Affinity {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::NAT_AFFINITY,
            source,
        })?;
        Ok(Self { map })
    }

    pub fn get(&self, key: &AffinityKey) -> Result<Option<AffinityValue>, Error> {
        found(self.map.get(key, 0), names::NAT_AFFINITY)
    }

    pub fn remove(&mut self, key: &AffinityKey) -> Result<(), Error> {
        ignore_missing(self.map.remove(key), names::NAT_AFFINITY)
    }

    pub fn entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, Error> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::NAT_AFFINITY))
    }
}

// === helpers shared by the map modules ===

pub(crate) fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

pub(crate) fn is_missing(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(2),
        _ => false,
    }
}

pub(crate) fn ignore_missing(
    r: Result<(), aya::maps::MapError>,
    name: &'static str,
) -> Result<(), Error> {
    match r {
        Err(e) if !is_missing(&e) => Err(Error::Map { name, source: e }),
        _ => Ok(()),
    }
}

pub(crate) fn found<V>(
    r: Result<V, aya::maps::MapError>,
    name: &'static str,
) -> Result<Option<V>, Error> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(Error::Map { name, source: e }),
    }
}
