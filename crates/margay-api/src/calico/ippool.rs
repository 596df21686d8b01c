//! `projectcalico.org/v3` IPPool: a range pods (or LoadBalancer Services) take addresses from.

use serde::{Deserialize, Serialize};

use crate::error::{Validation, fail};
use crate::names::check_subdomain;
use crate::object::Object;
use crate::selector::check_selector;
use crate::values::{Cidr, string_enum};

pub type IPPool = Object<IPPoolSpec>;

string_enum!(
    /// `vxlanMode` and `ipipMode`.
    EncapMode { Never = "Never", Always = "Always", CrossSubnet = "CrossSubnet" }
);
string_enum!(
    /// `allowedUses`.
    AllowedUse { Workload = "Workload", Tunnel = "Tunnel", LoadBalancer = "LoadBalancer" }
);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// Required; missing is reported by `validate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Cidr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_mode: Option<EncapMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_mode: Option<EncapMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_outgoing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(
        rename = "disableBGPExport",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub disable_bgp_export: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_uses: Option<Vec<AllowedUse>>,
}

impl IPPoolSpec {
    /// Fills what Calico fills when a pool is written: block size 26 (IPv4) or 122 (IPv6), no
    /// encapsulation, `all()` nodes, Workload and Tunnel uses.
    pub fn apply_defaults(&mut self) {
        let v6 = matches!(self.cidr.as_ref().map(Cidr::net), Some(ipnet::IpNet::V6(_)));
        self.block_size.get_or_insert(if v6 { 122 } else { 26 });
        self.vxlan_mode.get_or_insert(EncapMode::Never);
        self.ipip_mode.get_or_insert(EncapMode::Never);
        self.nat_outgoing.get_or_insert(false);
        self.node_selector.get_or_insert_with(|| "all()".to_owned());
        self.allowed_uses
            .get_or_insert_with(|| vec![AllowedUse::Workload, AllowedUse::Tunnel]);
    }

    pub fn validate(&self) -> Validation {
        let Some(cidr) = &self.cidr else {
            return fail("spec.cidr", "is required");
        };
        let net = cidr.net();
        let (min, max) = match net {
            ipnet::IpNet::V4(_) => (20, 32),
            ipnet::IpNet::V6(_) => (116, 128),
        };
        if let Some(block) = self.block_size {
            if block < min || block > max {
                return fail(
                    "spec.blockSize",
                    format!(
                        "{block} is out of range (must be between {min} and {max} for this pool)"
                    ),
                );
            }
            if block < net.prefix_len() {
                return fail(
                    "spec.blockSize",
                    format!(
                        "{block} is larger than the pool {cidr} itself (the block size must be at least the prefix length, {})",
                        net.prefix_len()
                    ),
                );
            }
        }
        if matches!(net, ipnet::IpNet::V6(_))
            && self.ipip_mode.is_some_and(|m| m != EncapMode::Never)
        {
            return fail("spec.ipipMode", "IPIP is not supported for IPv6 pools");
        }
        let vxlan = self.vxlan_mode.is_some_and(|m| m != EncapMode::Never);
        let ipip = self.ipip_mode.is_some_and(|m| m != EncapMode::Never);
        if vxlan && ipip {
            return fail(
                "spec.vxlanMode",
                "VXLAN and IPIP cannot both be enabled on one pool",
            );
        }
        if let Some(selector) = &self.node_selector {
            check_selector("spec.nodeSelector", selector)?;
        }
        if let Some(uses) = &self.allowed_uses {
            for (i, u) in uses.iter().enumerate() {
                if uses[..i].contains(u) {
                    return fail(
                        format!("spec.allowedUses[{i}]"),
                        format!("{u} is listed twice"),
                    );
                }
            }
            if uses.contains(&AllowedUse::LoadBalancer) && uses.len() > 1 {
                return fail(
                    "spec.allowedUses",
                    "LoadBalancer cannot be combined with Workload or Tunnel in one pool",
                );
            }
            if uses.contains(&AllowedUse::LoadBalancer) && (vxlan || ipip) {
                return fail(
                    "spec.allowedUses",
                    "a LoadBalancer pool takes no encapsulation (vxlanMode and ipipMode must be Never)",
                );
            }
        }
        Ok(())
    }

    /// Whether addresses of `use_` may come from this pool (after defaults).
    pub fn allows(&self, use_: AllowedUse) -> bool {
        match &self.allowed_uses {
            Some(uses) => uses.contains(&use_),
            None => use_ != AllowedUse::LoadBalancer,
        }
    }
}

pub fn validate_name(name: &str) -> Validation {
    check_subdomain("metadata.name", name)
}
