//! Connect-time load balancing reverse translation (`mg_ctlb_rev`).

use aya::maps::{HashMap, Map, MapData};

use super::{impl_pod, names, nat::map_err};
use crate::Error;

/// Mirrors `struct mg_ctlb_rev_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtlbRevKey {
    /// host: socket cookie.
    pub cookie: u64,
    /// be: backend address.
    pub addr: u32,
    /// be: backend port.
    pub port: u16,
    pub pad: u16,
}

/// Mirrors `struct mg_ctlb_rev_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtlbRevValue {
    /// be: frontend address.
    pub addr: u32,
    /// be: frontend port.
    pub port: u16,
    pub pad: u16,
}

impl_pod!(CtlbRevKey, CtlbRevValue);

/// `mg_ctlb_rev`.
#[derive(Debug)]
pub struct CtlbRev {
    map: HashMap<MapData, CtlbRevKey, CtlbRevValue>,
}

impl CtlbRev {
    pub(crate) fn new(map: Map) -> Result<Self, Error> {
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::CTLB_REV,
            source,
        })?;
        Ok(Self { map })
    }

    pub fn entries(&self) -> Result<Vec<(CtlbRevKey, CtlbRevValue)>, Error> {
        self.map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::CTLB_REV))
    }
}
