//! Node configuration (`mg_node_cfg`): what the programs need to know about their node, one
//! entry written by the agent: the node's underlay address, which turns tunnel mode on
//! (`bpfExternalServiceMode`), the mode itself, and the `bpfPSNATPorts` range. Beside it the
//! `bpfDSROptoutCIDRs` (`mg_dsr_optout`).

use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::{Array, LpmTrie, Map, MapData, lpm_trie::Key};
use ipnet::Ipv4Net;

use super::{addr_of, be_addr, impl_pod, names, nat::map_err};
use crate::Error;

/// `MG_CFG_F_DSR`: replies of tunnelled flows leave the backend node directly.
pub const CFG_DSR: u32 = 1 << 0;

/// `MG_TUNNEL_PORT`: the UDP port of the tunnel between nodes (VXLAN).
pub const TUNNEL_PORT: u16 = 4789;
/// `MG_TUNNEL_VNI`: the reserved VNI that marks Margay's tunnel (Calico's value).
pub const TUNNEL_VNI: u32 = 0x00ca_11c0;

/// `bpfExternalServiceMode`: how replies of external flows whose backend is on another node
/// reach the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ExternalServiceMode {
    /// Back through the tunnel to the ingress node, which forwards them (Calico's default).
    #[default]
    Tunnel,
    /// Straight from the backend's node, with the frontend as source (the underlay must let
    /// that source through).
    Dsr,
}

/// Mirrors `struct mg_node_cfg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeConfig {
    /// be: this node's underlay address; 0 = tunnel off (remote backends are DNATed here).
    pub node_ip: u32,
    /// host: `CFG_*`.
    pub flags: u32,
    /// host: `bpfPSNATPorts`, first port; 0 = no port SNAT.
    pub psnat_first: u16,
    /// host: `bpfPSNATPorts`, last port (inclusive).
    pub psnat_last: u16,
}

impl NodeConfig {
    /// Tunnel mode on, with `node_ip` as this node's underlay address.
    pub fn new(node_ip: Ipv4Addr, mode: ExternalServiceMode) -> Self {
        Self {
            node_ip: be_addr(node_ip),
            flags: match mode {
                ExternalServiceMode::Tunnel => 0,
                ExternalServiceMode::Dsr => CFG_DSR,
            },
            ..Self::default()
        }
    }

    /// With the `bpfPSNATPorts` range `first..=last` (Calico's default 20000:29999): the client
    /// ports a new flow gets when its (client, backend) is taken by another flow.
    #[must_use]
    pub fn with_psnat_ports(mut self, first: u16, last: u16) -> Self {
        self.psnat_first = first;
        self.psnat_last = last;
        self
    }

    /// This node's address, `None` when tunnel mode is off.
    pub fn node_ip(&self) -> Option<Ipv4Addr> {
        (self.node_ip != 0).then(|| addr_of(self.node_ip))
    }

    pub fn mode(&self) -> ExternalServiceMode {
        if self.flags & CFG_DSR != 0 {
            ExternalServiceMode::Dsr
        } else {
            ExternalServiceMode::Tunnel
        }
    }
}

impl_pod!(NodeConfig);

/// `mg_node_cfg`: an array of one entry.
pub struct NodeConfigMap {
    map: Array<MapData, NodeConfig>,
}

impl std::fmt::Debug for NodeConfigMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfigMap").finish_non_exhaustive()
    }
}

impl NodeConfigMap {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = Array::try_from(map).map_err(|source| Error::Map {
            name: names::NODE_CONFIG,
            source,
        })?;
        Ok(Self { map })
    }

    /// The configuration (all zero until the agent writes it: tunnel mode off).
    pub fn get(&self) -> Result<NodeConfig, Error> {
        self.map.get(&0, 0).map_err(map_err(names::NODE_CONFIG))
    }

    /// Writes the configuration; the programs see it at their next packet.
    pub fn set(&mut self, cfg: &NodeConfig) -> Result<(), Error> {
        self.map.set(0, cfg, 0).map_err(map_err(names::NODE_CONFIG))
    }
}

/// `max_entries` of `mg_dsr_optout` (as in `bpf/lib/maps.h`; not configurable).
pub const DSR_OPTOUT_MAX: u32 = 1024;

/// `mg_dsr_optout`: `bpfDSROptoutCIDRs`, client networks served the Tunnel way in DSR mode. Key
/// `struct mg_route_key` ([`super::RouteKey`]'s layout), value 1.
pub struct DsrOptout {
    map: LpmTrie<MapData, u32, u32>,
}

impl std::fmt::Debug for DsrOptout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsrOptout").finish_non_exhaustive()
    }
}

fn optout_key(net: Ipv4Net) -> Key<u32> {
    Key::new(u32::from(net.prefix_len()), be_addr(net.trunc().addr()))
}

impl DsrOptout {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = LpmTrie::try_from(map).map_err(|source| Error::Map {
            name: names::DSR_OPTOUT,
            source,
        })?;
        Ok(Self { map })
    }

    /// The networks in the map.
    pub fn get(&self) -> Result<BTreeSet<Ipv4Net>, Error> {
        let mut out = BTreeSet::new();
        for k in self.map.keys() {
            let k = k.map_err(map_err(names::DSR_OPTOUT))?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(32).min(32);
            if let Ok(net) = Ipv4Net::new(addr_of(k.data()), len) {
                out.insert(net);
            }
        }
        Ok(out)
    }

    /// Makes the map hold exactly `nets` (written by difference: new ones first, then the ones
    /// no longer wanted removed). More than [`DSR_OPTOUT_MAX`] networks is refused before
    /// anything is written.
    pub fn set(&mut self, nets: &[Ipv4Net]) -> Result<(), Error> {
        let want: BTreeSet<Ipv4Net> = nets.iter().map(Ipv4Net::trunc).collect();
        if want.len() > DSR_OPTOUT_MAX as usize {
            return Err(Error::TooMany {
                what: "bpfDSROptoutCIDRs",
                count: want.len(),
                max: DSR_OPTOUT_MAX as usize,
            });
        }
        let have = self.get()?;
        for net in want.difference(&have) {
            self.map
                .insert(&optout_key(*net), 1, 0)
                .map_err(map_err(names::DSR_OPTOUT))?;
        }
        for net in have.difference(&want) {
            self.map
                .remove(&optout_key(*net))
                .map_err(map_err(names::DSR_OPTOUT))?;
        }
        Ok(())
    }
}
