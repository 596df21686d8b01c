//! `projectcalico.org/v3` Node: a host running the agent, its addresses, tunnel addresses,
//! WireGuard key and pod CIDRs, and (Margay's own) the dataplane it runs.

use serde::{Deserialize, Serialize};

use crate::error::{Validation, fail};
use crate::names::check_subdomain;
use crate::object::Object;
use crate::operator::LinuxDataplane;
use crate::values::{Cidr, IpAddress, IpWithPrefix, string_enum};

pub type Node = Object<NodeSpec, NodeStatus>;

string_enum!(
    /// What a Node address is.
    NodeAddressType {
        CalicoNodeIp = "CalicoNodeIP",
        InternalIp = "InternalIP",
        ExternalIp = "ExternalIP",
    }
);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<NodeAddress>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBgpSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<NodeWireguardSpec>,
    #[serde(
        rename = "ipv4VXLANTunnelAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_vxlan_tunnel_addr: Option<IpAddress>,
    #[serde(
        rename = "vxlanTunnelMACAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub vxlan_tunnel_mac_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orch_refs: Option<Vec<OrchRef>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeAddress {
    pub address: IpWithPrefix,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub address_type: Option<NodeAddressType>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeBgpSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<IpWithPrefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_address: Option<IpWithPrefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeWireguardSpec {
    #[serde(
        rename = "interfaceIPv4Address",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub interface_ipv4_address: Option<IpAddress>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrchRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub orchestrator: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Option::is_none")]
    pub pod_cidrs: Option<Vec<Cidr>>,
    /// Margay's own: what the agent on this node runs and how its last sync went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<NodeDataplaneStatus>,
}

/// Margay's report of a node's dataplane, written by its agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDataplaneStatus {
    /// What the Installation and FelixConfiguration ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<LinuxDataplane>,
    /// What the agent actually runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<LinuxDataplane>,
    /// Why `active` differs from `requested`, or the last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the last dataplane sync finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// How long the last dataplane sync took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_duration_ms: Option<f64>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// While WireGuard runs on the node: which implementation (`kernel`, or `userspace
    /// (boringtun over TUN): <why not the kernel>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_device: Option<String>,
    /// In BPF mode: the bpffs directory the agent pins its maps and links in (its maps are in
    /// `<bpffsDir>/maps`); `margayctl bpf ... --node NAME` reads them there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpffs_dir: Option<String>,
    /// The last BPF preflight (while BPF is requested): each check and its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preflight: Option<PreflightStatus>,
    /// In BPF mode: each program attachment (program, hook, interface or cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<Vec<AttachmentStatus>>,
    /// In BPF mode: how full each map is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maps: Option<Vec<MapFillStatus>>,
}

/// The outcome of the checks a node runs before it takes BPF on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreflightStatus {
    /// Every check passed and the node runs (or may run) BPF.
    pub passed: bool,
    #[serde(default)]
    pub checks: Vec<PreflightCheck>,
}

/// One preflight check: `kernel BTF`, `bpffs`, `cgroup v2`, `datastore`, `programs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreflightCheck {
    pub name: String,
    pub passed: bool,
    /// What was found (when passed) or what is wrong and what to change (when not).
    pub detail: String,
}

/// Where one BPF program is attached.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentStatus {
    /// The program's name (`mg_from_wl`, `mg_connect4`...).
    pub program: String,
    /// `tc ingress`, `tc egress`, or the cgroup hook (`cgroup connect4`...).
    pub hook: String,
    /// TC programs: `tcx` or `clsact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// TC programs: the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// cgroup programs: the cgroup v2 directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// How full one BPF map is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapFillStatus {
    /// The map's pinned name (`mg_ct`, `mg_nat_fe`...).
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
    /// How `entries` is known: `exact` (the agent's own writes) or `scan` (counted by the
    /// periodic conntrack and affinity scan, up to its period old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl NodeSpec {
    pub fn validate(&self) -> Validation {
        if let Some(mac) = &self.vxlan_tunnel_mac_addr {
            let ok = mac.len() == 17
                && mac.split(':').count() == 6
                && mac
                    .split(':')
                    .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                return fail(
                    "spec.vxlanTunnelMACAddr",
                    format!("{mac:?} is not a MAC address (expected e.g. 66:c3:2a:0f:21:aa)"),
                );
            }
        }
        for (i, r) in self.orch_refs.iter().flatten().enumerate() {
            if r.orchestrator.is_empty() {
                return fail(
                    format!("spec.orchRefs[{i}].orchestrator"),
                    "must not be empty",
                );
            }
        }
        Ok(())
    }
}

impl NodeStatus {
    pub fn validate(&self) -> Validation {
        if let Some(key) = &self.wireguard_public_key
            && !is_wireguard_key(key)
        {
            return fail(
                "status.wireguardPublicKey",
                format!("{key:?} is not a WireGuard public key (44 characters of base64)"),
            );
        }
        Ok(())
    }
}

/// A WireGuard key is 32 bytes, written as 44 characters of standard base64 ending in `=`.
fn is_wireguard_key(key: &str) -> bool {
    key.len() == 44
        && key.ends_with('=')
        && key[..43]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

pub fn validate_name(name: &str) -> Validation {
    check_subdomain("metadata.name", name)
}
