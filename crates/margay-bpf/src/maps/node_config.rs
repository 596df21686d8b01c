//! Node configuration (`mg_node_cfg`): what the programs need to know about their node, one
//! entry written by the agent. Today: the node's underlay address, which turns tunnel mode on
//! (`bpfExternalServiceMode`), and the mode itself.

use std::net::Ipv4Addr;

use aya::maps::{Array, Map, MapData};

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
        }
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
