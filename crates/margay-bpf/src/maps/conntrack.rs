//! Conntrack (`mg_ct`): normalised keys, entries, iteration and deletion in pairs.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};

use super::{
    addr_of, be_addr, be_port, impl_pod, names,
    nat::{Protocol, found, ignore_missing, map_err},
    port_of,
};
use crate::Error;

/// `MG_CT_TCP_*`: TCP flags seen on a leg.
pub const TCP_SYN: u8 = 1 << 0;
pub const TCP_ACK: u8 = 1 << 1;
pub const TCP_FIN: u8 = 1 << 2;
pub const TCP_RST: u8 = 1 << 3;

/// `MG_CT_F_CLIENT_IS_B`: the endpoint that opened the flow is the key's `b`.
pub const F_CLIENT_IS_B: u8 = 1 << 0;
/// `MG_CT_F_EXTERNAL`: the client came in through a host interface.
pub const F_EXTERNAL: u8 = 1 << 1;
/// `MG_CT_F_FROM_TUNNEL`: on the backend node, a pair whose flow came in the tunnel from the
/// ingress node [`CtValue::tun_addr`]; replies are sent back through the tunnel. The forward
/// entry's frontend may be the NodePort on the ingress node's address (served through the
/// NodePort wildcard frontend, [`super::nat::NODEPORT_ANY`]).
pub const F_FROM_TUNNEL: u8 = 1 << 2;
/// `MG_CT_F_DSR`: with [`F_FROM_TUNNEL`], replies go straight to the client (DSR mode).
pub const F_DSR: u8 = 1 << 3;

/// Mirrors `struct mg_ct_key`: a 5-tuple with the lower endpoint first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub proto: u8,
    pub pad: [u8; 3],
    /// be
    pub addr_a: u32,
    /// be
    pub addr_b: u32,
    /// be
    pub port_a: u16,
    /// be
    pub port_b: u16,
}

impl CtKey {
    /// The normalised key of the tuple `src -> dst`, as `mg_ct_key_fill` builds it, and whether
    /// the source is the key's `b` side. Order: raw network-order address, then raw port.
    pub fn new(proto: Protocol, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> (Self, bool) {
        let (s, sp, d, dp) = (
            be_addr(src.0),
            be_port(src.1),
            be_addr(dst.0),
            be_port(dst.1),
        );
        let src_is_b = s > d || (s == d && sp > dp);
        let (a, pa, b, pb) = if src_is_b {
            (d, dp, s, sp)
        } else {
            (s, sp, d, dp)
        };
        let key = Self {
            proto: proto as u8,
            pad: [0; 3],
            addr_a: a,
            addr_b: b,
            port_a: pa,
            port_b: pb,
        };
        (key, src_is_b)
    }

    pub fn a(&self) -> (Ipv4Addr, u16) {
        (addr_of(self.addr_a), port_of(self.port_a))
    }

    pub fn b(&self) -> (Ipv4Addr, u16) {
        (addr_of(self.addr_b), port_of(self.port_b))
    }
}

/// `enum mg_ct_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CtType {
    Normal = 0,
    NatForward = 1,
    NatReverse = 2,
    /// `MG_CT_TUNNEL`: on the ingress node, an external flow sent in the tunnel to the node
    /// [`CtValue::tun_addr`] without NAT. A single entry keyed by (client, frontend): no peer.
    Tunnel = 3,
}

/// Mirrors `struct mg_ct_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// host: CLOCK_MONOTONIC ns.
    pub created_ns: u64,
    /// host: CLOCK_MONOTONIC ns of the last packet that hit this entry.
    pub last_seen_ns: u64,
    /// `enum mg_ct_type` (the C field is `kind`, see [`CtValue::kind`]).
    pub kind: u8,
    /// `F_*`.
    pub flags: u8,
    /// `TCP_*` seen from endpoint a through this entry.
    pub tcp_a: u8,
    /// `TCP_*` seen from endpoint b through this entry.
    pub tcp_b: u8,
    /// host
    pub svc_id: u32,
    /// The other entry of the pair.
    pub peer: CtKey,
    /// be: forward: backend address; reverse: frontend address.
    pub nat_addr: u32,
    /// be
    pub nat_port: u16,
    /// be: the client's port under port SNAT (`bpfPSNATPorts`), 0 = kept. [`CtType::NatFwd`]:
    /// the port the client's packets get; [`CtType::NatRev`]: the client's own port, which the
    /// replies get back.
    pub psnat_port: u16,
    /// be: [`CtType::Tunnel`]: the backend's node; with [`F_FROM_TUNNEL`]: the ingress node;
    /// 0 otherwise.
    pub tun_addr: u32,
    pub pad2: u32,
}

impl CtValue {
    pub fn kind(&self) -> Option<CtType> {
        match self.kind {
            0 => Some(CtType::Normal),
            1 => Some(CtType::NatForward),
            2 => Some(CtType::NatReverse),
            3 => Some(CtType::Tunnel),
            _ => None,
        }
    }

    /// The NAT address and port (forward: the backend; reverse: the frontend).
    pub fn nat(&self) -> (Ipv4Addr, u16) {
        (addr_of(self.nat_addr), port_of(self.nat_port))
    }

    /// The other node of a tunnelled flow (see [`CtValue::tun_addr`]), `None` otherwise.
    pub fn tunnel_node(&self) -> Option<Ipv4Addr> {
        (self.tun_addr != 0).then(|| addr_of(self.tun_addr))
    }

    /// TCP flags seen from the client and from the server side through this entry.
    pub fn tcp_client_server(&self) -> (u8, u8) {
        if self.flags & F_CLIENT_IS_B != 0 {
            (self.tcp_b, self.tcp_a)
        } else {
            (self.tcp_a, self.tcp_b)
        }
    }
}

impl_pod!(CtKey, CtValue);

/// `mg_ct`: the conntrack table.
#[derive(Debug)]
pub struct Conntrack {
    map: HashMap<MapData, CtKey, CtValue>,
}

impl Conntrack {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::CONNTRACK,
            source,
        })?;
        Ok(Self { map })
    }

    pub fn get(&self, key: &CtKey) -> Result<Option<CtValue>, Error> {
        found(self.map.get(key, 0), names::CONNTRACK)
    }

    /// Inserts or replaces an entry (tests and restores; the programs create entries).
    pub fn insert(&mut self, key: &CtKey, value: &CtValue) -> Result<(), Error> {
        self.map
            .insert(key, value, 0)
            .map_err(map_err(names::CONNTRACK))
    }

    pub fn remove(&mut self, key: &CtKey) -> Result<(), Error> {
        ignore_missing(self.map.remove(key), names::CONNTRACK)
    }

    /// Removes an entry and, for a NAT entry, its peer: entries go in pairs. The forward entry
    /// goes first: a client packet arriving in between then misses conntrack altogether (a new
    /// flow, or "fall through" for TCP) instead of being DNATed into a flow whose replies would
    /// no longer be translated back.
    ///
    /// The peer goes only while it still points back: a new flow may have taken it over (a SYN
    /// reusing a finished flow's client tuple to the same backend through another frontend
    /// rewrites the reverse entry to point to its own forward entry), and removing it then
    /// would leave that live flow's replies untranslated. The check and the removal are two
    /// syscalls (the map has no compare-and-delete), so the window is one syscall wide instead
    /// of the whole cleanup decision.
    pub fn remove_pair(&mut self, key: &CtKey) -> Result<(), Error> {
        let Some(v) = self.get(key)? else {
            return Ok(());
        };
        match v.kind() {
            Some(CtType::NatForward) => {
                self.remove(key)?;
                self.remove_if_peer_of(&v.peer, key)
            }
            Some(CtType::NatReverse) => {
                self.remove_if_peer_of(&v.peer, key)?;
                self.remove(key)
            }
            _ => self.remove(key),
        }
    }

    /// Removes `key` if its entry still names `peer` as its other half.
    fn remove_if_peer_of(&mut self, key: &CtKey, peer: &CtKey) -> Result<(), Error> {
        match self.get(key)? {
            Some(v) if v.peer == *peer => self.remove(key),
            _ => Ok(()),
        }
    }

    /// Every entry. Entries can come and go while iterating (the programs and LRU eviction
    /// write concurrently); an entry removed meanwhile is skipped.
    pub fn entries(&self) -> Result<Vec<(CtKey, CtValue)>, Error> {
        let mut out = Vec::new();
        for r in self.map.iter() {
            match r {
                Ok(kv) => out.push(kv),
                Err(e) if super::nat::is_missing(&e) => {}
                Err(e) => {
                    return Err(Error::Map {
                        name: names::CONNTRACK,
                        source: e,
                    });
                }
            }
        }
        Ok(out)
    }
}
