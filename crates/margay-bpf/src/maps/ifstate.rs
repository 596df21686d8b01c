//! Interface state (`mg_ifstate`), written by the agent as it attaches to interfaces.

use aya::maps::{HashMap, Map, MapData};

use super::{
    impl_pod, names,
    nat::{found, ignore_missing, map_err},
};
use crate::Error;

pub const IF_WORKLOAD: u32 = 1 << 0;
pub const IF_HOST: u32 = 1 << 1;
pub const IF_TUNNEL: u32 = 1 << 2;
pub const IF_READY: u32 = 1 << 3;

/// Mirrors `struct mg_ifstate_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfStateKey {
    /// host
    pub ifindex: u32,
}

/// Mirrors `struct mg_ifstate_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfStateValue {
    /// host: `IF_*`.
    pub flags: u32,
    /// NUL-padded name.
    pub name: [u8; 16],
}

impl IfStateValue {
    /// A value for `name` (truncated to 15 bytes).
    pub fn new(flags: u32, name: &str) -> Self {
        let mut n = [0u8; 16];
        for (d, s) in n.iter_mut().take(15).zip(name.bytes()) {
            *d = s;
        }
        Self { flags, name: n }
    }

    pub fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

impl_pod!(IfStateKey, IfStateValue);

/// `mg_ifstate`.
#[derive(Debug)]
pub struct IfState {
    map: HashMap<MapData, IfStateKey, IfStateValue>,
}

impl IfState {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::IF_STATE,
            source,
        })?;
        Ok(Self { map })
    }

    pub fn insert(&mut self, ifindex: u32, value: &IfStateValue) -> Result<(), Error> {
        self.map
            .insert(IfStateKey { ifindex }, value, 0)
            .map_err(map_err(names::IF_STATE))
    }

    pub fn get(&self, ifindex: u32) -> Result<Option<IfStateValue>, Error> {
        found(self.map.get(&IfStateKey { ifindex }, 0), names::IF_STATE)
    }

    /// Every entry, for dumps.
    pub fn entries(&self) -> Result<Vec<(u32, IfStateValue)>, Error> {
        self.map
            .iter()
            .map(|r| r.map(|(k, v)| (k.ifindex, v)))
            .collect::<Result<_, _>>()
            .map_err(map_err(names::IF_STATE))
    }

    pub fn remove(&mut self, ifindex: u32) -> Result<(), Error> {
        ignore_missing(self.map.remove(&IfStateKey { ifindex }), names::IF_STATE)
    }
}
