//! Calico's IPAM records, as Calico keeps them (`crd.projectcalico.org/v1` IPAMBlock and
//! BlockAffinity): a pool is carved into blocks (`blockSize`, /26 by default), each block is
//! affine to one node, and each address of a block is either unallocated or allocated to a handle
//! (a pod) with attributes saying which.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::error::{Validation, fail};
use crate::names::check_subdomain;
use crate::object::Object;
use crate::values::{Cidr, string_enum};

pub type IPAMBlock = Object<IPAMBlockSpec>;
pub type BlockAffinity = Object<BlockAffinitySpec>;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IPAMBlockSpec {
    pub cidr: Option<Cidr>,
    /// `host:<node>` for a block affine to a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// One entry per address of the block: the index of its attribute, or null when free.
    #[serde(default)]
    pub allocations: Vec<Option<u32>>,
    /// The free ordinals, in the order they will be handed out.
    #[serde(default)]
    pub unallocated: Vec<u32>,
    #[serde(default)]
    pub attributes: Vec<AllocationAttribute>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict_affinity: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    /// Calico spells this one in snake case.
    #[serde(rename = "handle_id", default, skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    /// `namespace`, `node`, `pod`, `timestamp`, as Calico's CNI plugin records them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secondary: BTreeMap<String, String>,
}

string_enum!(
    /// `BlockAffinity.spec.state`.
    AffinityState { Confirmed = "confirmed", Pending = "pending", PendingDeletion = "pendingDeletion" }
);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockAffinitySpec {
    pub cidr: Option<Cidr>,
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AffinityState>,
    /// A string, as in Calico's CRD (`"false"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<String>,
}

/// The object name Calico gives a block: its CIDR with `.` and `/` as `-` (`192-168-0-0-26`).
pub fn block_name(cidr: &ipnet::Ipv4Net) -> String {
    cidr.to_string().replace(['.', '/'], "-")
}

/// The object name Calico gives a node's affinity to a block (`node-1-192-168-0-0-26`).
pub fn affinity_name(node: &str, cidr: &ipnet::Ipv4Net) -> String {
    format!("{node}-{}", block_name(cidr))
}

impl IPAMBlockSpec {
    /// A new, empty block affine to `node`.
    pub fn empty(cidr: ipnet::Ipv4Net, node: &str) -> IPAMBlockSpec {
        let size = 1u32 << (32 - cidr.prefix_len());
        IPAMBlockSpec {
            cidr: cidr.to_string().parse().ok(),
            affinity: Some(format!("host:{node}")),
            allocations: vec![None; size as usize],
            unallocated: (0..size).collect(),
            attributes: Vec::new(),
            strict_affinity: Some(false),
            deleted: Some(false),
        }
    }

    /// The address at `ordinal`.
    pub fn address(&self, ordinal: u32) -> Option<Ipv4Addr> {
        match self.cidr.as_ref()?.net() {
            ipnet::IpNet::V4(net) => Some(Ipv4Addr::from(u32::from(net.network()) + ordinal)),
            ipnet::IpNet::V6(_) => None,
        }
    }

    pub fn validate(&self) -> Validation {
        let Some(cidr) = &self.cidr else {
            return fail("spec.cidr", "is required");
        };
        let ipnet::IpNet::V4(net) = cidr.net() else {
            return fail("spec.cidr", "only IPv4 blocks are supported");
        };
        let size = 1usize << (32 - net.prefix_len());
        if self.allocations.len() != size {
            return fail(
                "spec.allocations",
                format!(
                    "has {} entries; a {cidr} block has {size}",
                    self.allocations.len()
                ),
            );
        }
        for (i, a) in self.allocations.iter().enumerate() {
            if let Some(attr) = a
                && *attr as usize >= self.attributes.len()
            {
                return fail(
                    format!("spec.allocations[{i}]"),
                    format!("refers to attribute {attr}, which does not exist"),
                );
            }
        }
        for (i, u) in self.unallocated.iter().enumerate() {
            if *u as usize >= size || self.allocations[*u as usize].is_some() {
                return fail(
                    format!("spec.unallocated[{i}]"),
                    format!("{u} is not a free ordinal of the block"),
                );
            }
        }
        if let Some(aff) = &self.affinity {
            match aff.strip_prefix("host:") {
                Some(node) => check_subdomain("spec.affinity", node)?,
                None => {
                    return fail(
                        "spec.affinity",
                        format!("{aff:?} is not of the form host:<node>"),
                    );
                }
            }
        }
        Ok(())
    }
}

impl BlockAffinitySpec {
    pub fn validate(&self) -> Validation {
        if self.cidr.is_none() {
            return fail("spec.cidr", "is required");
        }
        match &self.node {
            Some(node) => check_subdomain("spec.node", node),
            None => fail("spec.node", "is required"),
        }
    }
}

pub fn validate_name(name: &str) -> Validation {
    check_subdomain("metadata.name", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_empty_blocks() {
        let net: ipnet::Ipv4Net = "192.168.0.64/26".parse().unwrap();
        assert_eq!(block_name(&net), "192-168-0-64-26");
        assert_eq!(affinity_name("node-1", &net), "node-1-192-168-0-64-26");
        let block = IPAMBlockSpec::empty(net, "node-1");
        assert_eq!(block.allocations.len(), 64);
        assert_eq!(block.address(3), Some("192.168.0.67".parse().unwrap()));
        assert!(block.validate().is_ok());
        let mut bad = block;
        bad.unallocated.push(64);
        assert!(bad.validate().is_err());
    }
}
