//! `operator.tigera.io/v1` Installation: one object, `default`, that says which dataplane the
//! cluster runs and how pod networking is set up.

use serde::{Deserialize, Serialize};

use crate::error::{Validation, fail};
use crate::object::Object;
use crate::selector::check_selector;
use crate::values::{Cidr, Mtu, string_enum};

pub type Installation = Object<InstallationSpec, InstallationStatus>;

string_enum!(
    /// `spec.calicoNetwork.linuxDataplane`. Every value Calico knows is read, so that a manifest
    /// written for Calico gets a precise answer; [`LinuxDataplane::is_supported`] says which ones
    /// Margay runs.
    LinuxDataplane { Iptables = "Iptables", Bpf = "BPF", Nftables = "Nftables", Vpp = "VPP" }
);

impl LinuxDataplane {
    /// The dataplanes Margay runs.
    pub const SUPPORTED: [LinuxDataplane; 2] = [LinuxDataplane::Iptables, LinuxDataplane::Bpf];

    pub fn is_supported(self) -> bool {
        LinuxDataplane::SUPPORTED.contains(&self)
    }
}

string_enum!(
    /// `spec.calicoNetwork.hostPorts` and `spec.calicoNetwork.bgp`.
    OperatorSwitch { Enabled = "Enabled", Disabled = "Disabled" }
);
string_enum!(
    /// `spec.calicoNetwork.ipPools[].encapsulation`.
    Encapsulation {
        IpipCrossSubnet = "IPIPCrossSubnet",
        Ipip = "IPIP",
        Vxlan = "VXLAN",
        VxlanCrossSubnet = "VXLANCrossSubnet",
        None = "None",
    }
);
string_enum!(
    /// `spec.variant`.
    ProductVariant { Calico = "Calico", TigeraSecureEnterprise = "TigeraSecureEnterprise" }
);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<ProductVariant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calico_network: Option<CalicoNetworkSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CalicoNetworkSpec {
    /// Iptables when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux_dataplane: Option<LinuxDataplane>,
    /// Enabled when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ports: Option<OperatorSwitch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<OperatorSwitch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<Mtu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_pools: Option<Vec<InstallationIpPool>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallationIpPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Cidr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encapsulation: Option<Encapsulation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_outgoing: Option<OperatorSwitch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_uses: Option<Vec<crate::calico::ippool::AllowedUse>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<ProductVariant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<Mtu>,
}

impl InstallationSpec {
    /// The dataplane the cluster asks for (Iptables when unset).
    pub fn linux_dataplane(&self) -> LinuxDataplane {
        self.calico_network
            .as_ref()
            .and_then(|n| n.linux_dataplane)
            .unwrap_or(LinuxDataplane::Iptables)
    }

    /// Whether pods' `hostPort`s are served (Enabled when unset).
    pub fn host_ports(&self) -> OperatorSwitch {
        self.calico_network
            .as_ref()
            .and_then(|n| n.host_ports)
            .unwrap_or(OperatorSwitch::Enabled)
    }

    pub fn validate(&self) -> Validation {
        let Some(net) = &self.calico_network else {
            return Ok(());
        };
        if let Some(dp) = net.linux_dataplane
            && !dp.is_supported()
        {
            return fail(
                "spec.calicoNetwork.linuxDataplane",
                format!(
                    "{dp} is a Calico dataplane that Margay does not run yet; use {}",
                    LinuxDataplane::SUPPORTED
                        .map(LinuxDataplane::as_str)
                        .join(" or ")
                ),
            );
        }
        for (i, pool) in net.ip_pools.iter().flatten().enumerate() {
            let path = format!("spec.calicoNetwork.ipPools[{i}]");
            let Some(cidr) = &pool.cidr else {
                return fail(format!("{path}.cidr"), "is required");
            };
            if let Some(block) = pool.block_size {
                let (min, max) = match cidr.net() {
                    ipnet::IpNet::V4(_) => (20, 32),
                    ipnet::IpNet::V6(_) => (116, 128),
                };
                if block < min.max(cidr.net().prefix_len()) || block > max {
                    return fail(
                        format!("{path}.blockSize"),
                        format!(
                            "{block} is out of range for {cidr} (between {} and {max})",
                            min.max(cidr.net().prefix_len())
                        ),
                    );
                }
            }
            if let Some(selector) = &pool.node_selector {
                check_selector(&format!("{path}.nodeSelector"), selector)?;
            }
        }
        Ok(())
    }
}

pub fn validate_name(name: &str) -> Validation {
    if name != "default" {
        return fail(
            "metadata.name",
            format!("{name:?}: the operator reads only the Installation named default"),
        );
    }
    Ok(())
}
