//! Per-CPU packet counters by reason (`mg_counters`).

use aya::maps::{Map, MapData, PerCpuArray};

use super::{names, nat::map_err};
use crate::Error;

/// `enum mg_reason`: why a packet was dropped, or a non-drop event counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Reason {
    /// Truncated or malformed header.
    Short = 1,
    /// The frontend has no (local, where the traffic policy requires it) backend.
    NoBackend = 2,
    /// A backend ordinal is missing (the agent was rewriting the service).
    BackendMissing = 3,
    /// Conntrack entries could not be created.
    CtCreate = 4,
    /// Rewriting the packet or its checksums failed.
    NatWrite = 5,
    /// Client outside loadBalancerSourceRanges.
    Blackhole = 6,
    /// Not a drop: new NAT flows.
    NewFlow = 7,
    /// Not a drop: TCP without SYN and without conntrack, left to the kernel.
    Fallthrough = 8,
    /// Tunnel encapsulation or decapsulation failed.
    Encap = 9,
    /// No route or next hop for a tunnelled or decapsulated packet.
    Fib = 10,
    /// The encapsulated packet exceeds the route's MTU.
    TooBig = 11,
    /// A decapsulated packet of no known flow that opens none.
    TunnelNoFlow = 12,
    /// Not a drop: new flows sent in the tunnel to another node (also counted in `NewFlow`).
    TunnelFlow = 13,
}

impl Reason {
    /// Every reason (`MG_REASON_MAX - 1` of them).
    pub const ALL: [Reason; 13] = [
        Reason::Short,
        Reason::NoBackend,
        Reason::BackendMissing,
        Reason::CtCreate,
        Reason::NatWrite,
        Reason::Blackhole,
        Reason::NewFlow,
        Reason::Fallthrough,
        Reason::Encap,
        Reason::Fib,
        Reason::TooBig,
        Reason::TunnelNoFlow,
        Reason::TunnelFlow,
    ];

    /// A stable name for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Short => "short",
            Reason::NoBackend => "no_backend",
            Reason::BackendMissing => "backend_missing",
            Reason::CtCreate => "ct_create",
            Reason::NatWrite => "nat_write",
            Reason::Blackhole => "blackhole",
            Reason::NewFlow => "new_flow",
            Reason::Fallthrough => "fallthrough",
            Reason::Encap => "encap",
            Reason::Fib => "fib",
            Reason::TooBig => "too_big",
            Reason::TunnelNoFlow => "tunnel_no_flow",
            Reason::TunnelFlow => "tunnel_flow",
        }
    }

    pub const fn is_drop(self) -> bool {
        !matches!(
            self,
            Reason::NewFlow | Reason::Fallthrough | Reason::TunnelFlow
        )
    }
}

/// `mg_counters`.
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

impl Counters {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = PerCpuArray::try_from(map).map_err(|source| Error::Map {
            name: names::COUNTERS,
            source,
        })?;
        Ok(Self { map })
    }

    /// The count of one reason, summed over CPUs.
    pub fn get(&self, reason: Reason) -> Result<u64, Error> {
        let per_cpu = self
            .map
            .get(&(reason as u32), 0)
            .map_err(map_err(names::COUNTERS))?;
        Ok(per_cpu.iter().sum())
    }

    /// Every reason with its count.
    pub fn all(&self) -> Result<Vec<(Reason, u64)>, Error> {
        Reason::ALL
            .iter()
            .map(|r| Ok((*r, self.get(*r)?)))
            .collect()
    }
}
