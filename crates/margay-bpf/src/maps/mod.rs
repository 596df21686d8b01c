//! Typed access to the dataplane's maps.
//!
//! Every key and value type here is a `#[repr(C)]` mirror of a struct in
//! `bpf/include/margay/types.h` (the one source of truth) and names the C struct it mirrors.
//! [`shared_layouts`] lists their sizes and field offsets as Rust sees them; the test
//! `tests/layout.rs` compares that list with the BTF of the compiled objects, so a drift between
//! the C and the Rust fails the build's tests instead of corrupting maps.
//!
//! Byte order: fields the C marks "be" hold network-order values in a native integer (write them
//! with [`be_addr`] / [`be_port`], read them with [`addr_of`] / [`port_of`]); "host" fields are
//! plain numbers.

use std::{net::Ipv4Addr, path::Path};

use aya::maps::{Map, MapData};

use crate::{Error, layout::StructLayout};

pub mod conntrack;
pub mod counters;
pub mod ctlb;
pub mod ifstate;
pub mod log;
pub mod nat;
pub mod node_config;
pub mod routes;

pub use conntrack::{Conntrack, CtKey, CtType, CtValue};
pub use counters::{Counters, Reason};
pub use ctlb::{CtlbRev, CtlbRevKey, CtlbRevValue};
pub use ifstate::{IfState, IfStateKey, IfStateValue};
pub use log::{DecisionLog, LogEvent};
pub use nat::{
    Affinity, AffinityKey, AffinityValue, NatBackendKey, NatBackendValue, NatBackends,
    NatFrontendKey, NatFrontendValue, NatFrontends, Protocol,
};
pub use node_config::{DsrOptout, ExternalServiceMode, NodeConfig, NodeConfigMap};
pub use routes::{RouteKey, RouteValue, Routes};

/// Implements `aya::Pod` for a `#[repr(C)]` mirror of a C struct.
macro_rules! impl_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            // SAFETY: `$ty` is `#[repr(C)]`, `Copy`, made only of integers and integer arrays
            // with every padding byte a named field (checked against the C's BTF by
            // tests/layout.rs), so every bit pattern is a valid value and it has no pointers.
            #[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait for map keys and values")]
            unsafe impl aya::Pod for $ty {}
        )+
    };
}
pub(crate) use impl_pod;

/// The layout of a Rust mirror: its size and each field's offset and size.
macro_rules! rust_layout {
    ($ty:ty, $cname:literal, [$($field:ident),* $(,)?]) => {
        $crate::layout::StructLayout {
            name: $cname.to_owned(),
            size: ::std::mem::size_of::<$ty>(),
            fields: vec![$(
                $crate::layout::FieldLayout {
                    name: stringify!($field).to_owned(),
                    offset: ::std::mem::offset_of!($ty, $field),
                    size: $crate::layout::field_size(|s: &$ty| &s.$field),
                }
            ),*],
        }
    };
}

/// Sizes, offsets and field sizes of every shared struct as the Rust mirrors have them.
pub fn shared_layouts() -> Vec<StructLayout> {
    vec![
        rust_layout!(
            NatFrontendKey,
            "mg_nat_fe_key",
            [prefixlen, addr, port, proto, pad, src_addr]
        ),
        rust_layout!(
            NatFrontendValue,
            "mg_nat_fe_val",
            [svc_id, count, local_count, flags, affinity_timeout_s]
        ),
        rust_layout!(NatBackendKey, "mg_nat_be_key", [svc_id, ordinal]),
        rust_layout!(NatBackendValue, "mg_nat_be_val", [addr, port, pad, node]),
        rust_layout!(AffinityKey, "mg_nat_aff_key", [svc_id, client]),
        rust_layout!(AffinityValue, "mg_nat_aff_val", [ts_ns, be, pad]),
        rust_layout!(
            CtKey,
            "mg_ct_key",
            [proto, pad, addr_a, addr_b, port_a, port_b]
        ),
        rust_layout!(
            CtValue,
            "mg_ct_val",
            [
                created_ns,
                last_seen_ns,
                kind,
                flags,
                tcp_a,
                tcp_b,
                svc_id,
                peer,
                nat_addr,
                nat_port,
                psnat_port,
                tun_addr,
                pad2
            ]
        ),
        rust_layout!(RouteKey, "mg_route_key", [prefixlen, addr]),
        rust_layout!(RouteValue, "mg_route_val", [flags, ifindex, next_hop, pad]),
        rust_layout!(IfStateKey, "mg_ifstate_key", [ifindex]),
        rust_layout!(IfStateValue, "mg_ifstate_val", [flags, name]),
        rust_layout!(CtlbRevKey, "mg_ctlb_rev_key", [cookie, addr, port, pad]),
        rust_layout!(CtlbRevValue, "mg_ctlb_rev_val", [addr, port, pad]),
        rust_layout!(
            LogEvent,
            "mg_log_event",
            [
                ts_ns, ifindex, hook, proto, verdict, pad, saddr, daddr, sport, dport, out_saddr,
                out_daddr, out_sport, out_dport, tun_src
            ]
        ),
        rust_layout!(
            NodeConfig,
            "mg_node_cfg",
            [node_ip, flags, psnat_first, psnat_last]
        ),
    ]
}

/// Map names as declared in `bpf/lib/maps.h` (also their pin file names).
pub mod names {
    pub const NAT_FRONTEND: &str = "mg_nat_fe";
    pub const NAT_BACKEND: &str = "mg_nat_be";
    pub const NAT_AFFINITY: &str = "mg_nat_aff";
    pub const CONNTRACK: &str = "mg_ct";
    pub const ROUTES: &str = "mg_routes";
    pub const IF_STATE: &str = "mg_ifstate";
    pub const COUNTERS: &str = "mg_counters";
    pub const CTLB_REV: &str = "mg_ctlb_rev";
    pub const NODE_CONFIG: &str = "mg_node_cfg";
    pub const DSR_OPTOUT: &str = "mg_dsr_optout";
    pub const LOG: &str = "mg_log";
    /// Every map the programs share, pinned by name in the pin directory.
    pub const ALL: [&str; 11] = [
        NAT_FRONTEND,
        NAT_BACKEND,
        NAT_AFFINITY,
        CONNTRACK,
        ROUTES,
        IF_STATE,
        COUNTERS,
        CTLB_REV,
        NODE_CONFIG,
        DSR_OPTOUT,
        LOG,
    ];
}

/// Map sizes, mirroring FelixConfiguration's `bpfMapSize*` fields (defaults are Calico's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `bpfMapSizeConntrack`.
    pub conntrack: u32,
    /// `bpfMapSizeNATFrontend`.
    pub nat_frontend: u32,
    /// `bpfMapSizeNATBackend`.
    pub nat_backend: u32,
    /// `bpfMapSizeNATAffinity` (also sizes the connect-time LB reverse map).
    pub nat_affinity: u32,
    /// `bpfMapSizeRoute`.
    pub route: u32,
    /// `bpfMapSizeIfState`.
    pub if_state: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            conntrack: 512_000,
            nat_frontend: 65_536,
            nat_backend: 262_144,
            nat_affinity: 65_536,
            route: 262_144,
            if_state: 1_000,
        }
    }
}

impl MapSizes {
    /// Small maps for tests and benchmarks.
    pub const fn small() -> Self {
        Self {
            conntrack: 4096,
            nat_frontend: 1024,
            nat_backend: 4096,
            nat_affinity: 1024,
            route: 1024,
            if_state: 64,
        }
    }

    /// (map name, max_entries) for every map whose size is configurable.
    pub fn by_name(&self) -> [(&'static str, u32); 7] {
        [
            (names::CONNTRACK, self.conntrack),
            (names::NAT_FRONTEND, self.nat_frontend),
            (names::NAT_BACKEND, self.nat_backend),
            (names::NAT_AFFINITY, self.nat_affinity),
            (names::ROUTES, self.route),
            (names::IF_STATE, self.if_state),
            (names::CTLB_REV, self.nat_affinity),
        ]
    }
}

/// Every shared map, typed, opened from its pin. Opening needs no program: the agent's cleanup
/// loop, a restarted agent and tools all come in through here.
#[derive(Debug)]
pub struct Maps {
    pub nat_frontends: NatFrontends,
    pub nat_backends: NatBackends,
    pub affinity: Affinity,
    pub conntrack: Conntrack,
    pub routes: Routes,
    pub if_state: IfState,
    pub counters: Counters,
    pub ctlb_rev: CtlbRev,
    pub node_config: NodeConfigMap,
    pub dsr_optout: DsrOptout,
}

impl Maps {
    /// Opens every map pinned in `pin_dir` (created by [`crate::Dataplane::load`]).
    pub fn open(pin_dir: &Path) -> Result<Self, Error> {
        Ok(Self {
            nat_frontends: NatFrontends::new(open_pinned(pin_dir, names::NAT_FRONTEND)?)?,
            nat_backends: NatBackends::new(open_pinned(pin_dir, names::NAT_BACKEND)?)?,
            affinity: Affinity::new(open_pinned(pin_dir, names::NAT_AFFINITY)?)?,
            conntrack: Conntrack::new(open_pinned(pin_dir, names::CONNTRACK)?)?,
            routes: Routes::new(open_pinned(pin_dir, names::ROUTES)?)?,
            if_state: IfState::new(open_pinned(pin_dir, names::IF_STATE)?)?,
            counters: Counters::new(open_pinned(pin_dir, names::COUNTERS)?)?,
            ctlb_rev: CtlbRev::new(open_pinned(pin_dir, names::CTLB_REV)?)?,
            node_config: NodeConfigMap::new(open_pinned(pin_dir, names::NODE_CONFIG)?)?,
            dsr_optout: DsrOptout::new(open_pinned(pin_dir, names::DSR_OPTOUT)?)?,
        })
    }
}

fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, Error> {
    let data =
        MapData::from_pin(pin_dir.join(name)).map_err(|source| Error::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| Error::Map { name, source })
}

/// A network-order IPv4 address as the maps hold it.
pub fn be_addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address held in a network-order field.
pub fn addr_of(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

/// A network-order port as the maps hold it.
pub const fn be_port(port: u16) -> u16 {
    port.to_be()
}

/// The port held in a network-order field.
pub const fn port_of(be: u16) -> u16 {
    u16::from_be(be)
}
