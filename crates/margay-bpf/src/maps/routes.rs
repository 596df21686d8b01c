//! Routes (`mg_routes`): local pods, remote pod blocks, hosts; for tunnel mode and traffic
//! policy. Written by the agent; the programs read only the WireGuard entries of other nodes
//! (`RT_WIREGUARD`) so far.

use std::net::Ipv4Addr;

use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use ipnet::Ipv4Net;

use super::{
    addr_of, be_addr, impl_pod, names,
    nat::{found, ignore_missing, map_err},
};
use crate::Error;

pub const RT_LOCAL_WL: u32 = 1 << 0;
pub const RT_REMOTE_WL: u32 = 1 << 1;
pub const RT_LOCAL_HOST: u32 = 1 << 2;
pub const RT_REMOTE_HOST: u32 = 1 << 3;
pub const RT_IN_POOL: u32 = 1 << 4;
/// Another node reached through WireGuard: tunnelled packets to it go into the WireGuard device
/// `ifindex` (`MG_RT_F_WIREGUARD`).
pub const RT_WIREGUARD: u32 = 1 << 5;

/// Mirrors `struct mg_route_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteKey {
    /// host: 0..=32
    pub prefixlen: u32,
    /// be
    pub addr: u32,
}

/// Mirrors `struct mg_route_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteValue {
    /// host: `RT_*`.
    pub flags: u32,
    /// host: a local pod's host-side veth; with `RT_WIREGUARD` the WireGuard device.
    pub ifindex: u32,
    /// be: the node hosting a remote block.
    pub next_hop: u32,
    pub pad: u32,
}

impl RouteValue {
    pub fn next_hop(&self) -> Ipv4Addr {
        addr_of(self.next_hop)
    }
}

impl_pod!(RouteValue);

/// `mg_routes`.
#[derive(Debug)]
pub struct Routes {
    map: LpmTrie<MapData, u32, RouteValue>,
}

fn key(net: Ipv4Net) -> Key<u32> {
    Key::new(u32::from(net.prefix_len()), be_addr(net.trunc().addr()))
}

impl Routes {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = LpmTrie::try_from(map).map_err(|source| Error::Map {
            name: names::ROUTES,
            source,
        })?;
        Ok(Self { map })
    }

    pub fn insert(&mut self, net: Ipv4Net, value: &RouteValue) -> Result<(), Error> {
        self.map
            .insert(&key(net), value, 0)
            .map_err(map_err(names::ROUTES))
    }

    pub fn remove(&mut self, net: Ipv4Net) -> Result<(), Error> {
        ignore_missing(self.map.remove(&key(net)), names::ROUTES)
    }

    /// Every route, as (prefix, value), in the map's order (for dumps).
    pub fn entries(&self) -> Result<Vec<(Ipv4Net, RouteValue)>, Error> {
        self.map
            .iter()
            .map(|r| {
                r.map(|(k, v)| {
                    let len = u8::try_from(k.prefix_len()).unwrap_or(32).min(32);
                    let net = Ipv4Net::new(addr_of(k.data()), len)
                        .unwrap_or_else(|_| Ipv4Net::from(addr_of(k.data())));
                    (net, v)
                })
            })
            .collect::<Result<_, _>>()
            .map_err(map_err(names::ROUTES))
    }

    /// Longest-prefix lookup of one address.
    pub fn lookup(&self, addr: Ipv4Addr) -> Result<Option<RouteValue>, Error> {
        found(self.map.get(&Key::new(32, be_addr(addr)), 0), names::ROUTES)
    }
}
