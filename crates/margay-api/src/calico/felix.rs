//! `projectcalico.org/v3` FelixConfiguration: the agent's configuration, global (`default`) or
//! per node (`node.<nodename>`).
//!
//! Every field is optional, as in Calico: what the user did not set is absent from the stored
//! object and takes Calico's default when the agent computes its effective configuration
//! ([`FelixConfigurationSpec::effective`]). `bpfLogLevel` is the one exception, kept as Calico keeps
//! it: always present, `""` when unset (which is why the seed's output shows `bpfLogLevel: ""`).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::error::{Validation, fail};
use crate::names::check_subdomain;
use crate::object::Object;
use crate::values::{
    Cidr, GoDuration, MapSize, Mark, Mtu, OptionalPort, Port, PortRange, PositiveCount,
    RegexPattern, RulePriority, Vni, string_enum,
};

pub type FelixConfiguration = Object<FelixConfigurationSpec>;

string_enum!(
    /// `bpfLogLevel`.
    BpfLogLevel { Off = "Off", Info = "Info", Debug = "Debug" }
);
string_enum!(
    /// `bpfConnectTimeLoadBalancing`.
    ConnectTimeLoadBalancing { Tcp = "TCP", Enabled = "Enabled", Disabled = "Disabled" }
);
string_enum!(
    /// Calico's two-valued switches (`floatingIPs`, `bpfHostNetworkedNATWithoutCTLB`).
    EnabledDisabled { Enabled = "Enabled", Disabled = "Disabled" }
);
string_enum!(
    /// `bpfExternalServiceMode`: how external traffic reaches a backend on another node.
    ExternalServiceMode { Tunnel = "Tunnel", Dsr = "DSR" }
);
string_enum!(
    /// `bpfEnforceRPF`.
    EnforceRpf { Disabled = "Disabled", Loose = "Loose", Strict = "Strict" }
);
string_enum!(
    /// `bpfRedirectToPeer`.
    RedirectToPeer { Enabled = "Enabled", Disabled = "Disabled", L2Only = "L2Only" }
);
string_enum!(
    /// `iptablesBackend`: which iptables the standard dataplane programs. `Auto` picks the one
    /// that already holds rules in the node's network namespace, else the system's `iptables`.
    IptablesBackend { Legacy = "Legacy", Nft = "NFT", Auto = "Auto" }
);
string_enum!(
    /// `logSeverityScreen`.
    LogSeverity {
        Trace = "Trace",
        Debug = "Debug",
        Info = "Info",
        Warning = "Warning",
        Error = "Error",
        Fatal = "Fatal",
    }
);

/// `bpfLogLevel` as stored: `""` (unset, meaning Off) or one of [`BpfLogLevel`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BpfLogLevelText(String);

impl BpfLogLevelText {
    /// The level in force: unset means Off.
    pub fn level(&self) -> BpfLogLevel {
        self.0.parse().unwrap_or(BpfLogLevel::Off)
    }

    pub fn is_unset(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for BpfLogLevelText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Option::<String>::deserialize(d)?.unwrap_or_default();
        if text.is_empty() {
            return Ok(BpfLogLevelText(text));
        }
        let level: BpfLogLevel = text.parse().map_err(serde::de::Error::custom)?;
        Ok(BpfLogLevelText(level.as_str().to_owned()))
    }
}

/// A conntrack timeout: a Go duration, or `Auto` to take the kernel's conntrack setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ConntrackTimeout {
    #[serde(serialize_with = "serialize_auto")]
    Auto,
    Duration(GoDuration),
}

fn serialize_auto<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("Auto")
}

impl<'de> Deserialize<'de> for ConntrackTimeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.eq_ignore_ascii_case("auto") {
            return Ok(ConntrackTimeout::Auto);
        }
        text.parse()
            .map(ConntrackTimeout::Duration)
            .map_err(|e: String| serde::de::Error::custom(format!("{e}, or Auto")))
    }
}

/// `bpfConntrackTimeouts`: per-state idle timeouts of the BPF conntrack table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BpfConntrackTimeouts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_grace_period: Option<ConntrackTimeout>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_syn_sent: Option<ConntrackTimeout>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_established: Option<ConntrackTimeout>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_fins_seen: Option<ConntrackTimeout>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_reset_seen: Option<ConntrackTimeout>,
    #[serde(rename = "udpTimeout", skip_serializing_if = "Option::is_none")]
    pub udp_timeout: Option<ConntrackTimeout>,
    #[serde(rename = "genericTimeout", skip_serializing_if = "Option::is_none")]
    pub generic_timeout: Option<ConntrackTimeout>,
    #[serde(rename = "icmpTimeout", skip_serializing_if = "Option::is_none")]
    pub icmp_timeout: Option<ConntrackTimeout>,
}

/// Declares the spec struct: every field optional and omitted when unset, in Calico's names.
macro_rules! felix_spec {
    ($($(#[$meta:meta])* $json:literal $field:ident: $ty:ty,)+) => {
        /// The FelixConfiguration spec; field names and meanings are Calico's.
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        pub struct FelixConfigurationSpec {
            /// Always present, `""` when unset, as in Calico.
            #[serde(rename = "bpfLogLevel", default)]
            pub bpf_log_level: BpfLogLevelText,
            $(
                $(#[$meta])*
                #[serde(rename = $json, default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )+
        }
    };
}

felix_spec! {
    /// The BPF dataplane is on.
    "bpfEnabled" bpf_enabled: bool,
    /// Host interfaces the BPF programs attach to.
    "bpfDataIfacePattern" bpf_data_iface_pattern: RegexPattern,
    /// Extra L3 devices the BPF programs attach to.
    "bpfL3IfacePattern" bpf_l3_iface_pattern: RegexPattern,
    "bpfConnectTimeLoadBalancing" bpf_connect_time_load_balancing: ConnectTimeLoadBalancing,
    "bpfHostNetworkedNATWithoutCTLB" bpf_host_networked_nat_without_ctlb: EnabledDisabled,
    "bpfExternalServiceMode" bpf_external_service_mode: ExternalServiceMode,
    /// Clients in these CIDRs stay on Tunnel mode when DSR is on.
    "bpfDSROptoutCIDRs" bpf_dsr_optout_cidrs: Vec<Cidr>,
    "bpfExtToServiceConnmark" bpf_ext_to_service_connmark: Mark,
    /// Destinations never service-NATed.
    "bpfExcludeCIDRsFromNAT" bpf_exclude_cidrs_from_nat: Vec<Cidr>,
    /// Remove kube-proxy's KUBE-* chains when in BPF mode.
    "bpfKubeProxyIptablesCleanupEnabled" bpf_kube_proxy_iptables_cleanup_enabled: bool,
    "bpfKubeProxyMinSyncPeriod" bpf_kube_proxy_min_sync_period: GoDuration,
    "bpfKubeProxyHealthzPort" bpf_kube_proxy_healthz_port: OptionalPort,
    /// Source ports for NodePort tuple collisions.
    "bpfPSNATPorts" bpf_psnat_ports: PortRange,
    "bpfHostConntrackBypass" bpf_host_conntrack_bypass: bool,
    "bpfEnforceRPF" bpf_enforce_rpf: EnforceRpf,
    "bpfRedirectToPeer" bpf_redirect_to_peer: RedirectToPeer,
    "bpfPolicyDebugEnabled" bpf_policy_debug_enabled: bool,
    "bpfDisableUnprivileged" bpf_disable_unprivileged: bool,
    "bpfConntrackTimeouts" bpf_conntrack_timeouts: BpfConntrackTimeouts,
    "bpfMapSizeConntrack" bpf_map_size_conntrack: MapSize,
    "bpfMapSizeNATFrontend" bpf_map_size_nat_frontend: MapSize,
    "bpfMapSizeNATBackend" bpf_map_size_nat_backend: MapSize,
    "bpfMapSizeNATAffinity" bpf_map_size_nat_affinity: MapSize,
    "bpfMapSizeRoute" bpf_map_size_route: MapSize,
    "bpfMapSizeIfState" bpf_map_size_if_state: MapSize,
    "bpfMaglevMaxServices" bpf_maglev_max_services: PositiveCount,
    "bpfMaglevMaxEndpointsPerService" bpf_maglev_max_endpoints_per_service: PositiveCount,
    "wireguardEnabled" wireguard_enabled: bool,
    "wireguardEnabledV6" wireguard_enabled_v6: bool,
    "wireguardHostEncryptionEnabled" wireguard_host_encryption_enabled: bool,
    "wireguardInterfaceName" wireguard_interface_name: String,
    "wireguardListeningPort" wireguard_listening_port: Port,
    "wireguardMTU" wireguard_mtu: Mtu,
    "wireguardKeepAlive" wireguard_keep_alive: GoDuration,
    "wireguardRoutingRulePriority" wireguard_routing_rule_priority: RulePriority,
    /// Which iptables backend kube-proxy's rules go to (Legacy, NFT, Auto).
    "iptablesBackend" iptables_backend: IptablesBackend,
    "logSeverityScreen" log_severity_screen: LogSeverity,
    "reportingInterval" reporting_interval: GoDuration,
    "floatingIPs" floating_ips: EnabledDisabled,
    "healthEnabled" health_enabled: bool,
    "healthPort" health_port: Port,
    "vxlanEnabled" vxlan_enabled: bool,
    "vxlanPort" vxlan_port: Port,
    "vxlanVNI" vxlan_vni: Vni,
    "ipipEnabled" ipip_enabled: bool,
    /// Where to attach connect-time load balancing (cgroup v2 mount or sub-cgroup).
    "cgroupV2Path" cgroup_v2_path: String,
}

impl FelixConfigurationSpec {
    /// Calico's defaults for every field, as the reference lists them.
    pub fn calico_defaults() -> FelixConfigurationSpec {
        let defaults = serde_json::json!({
            "bpfLogLevel": "Off",
            "bpfEnabled": false,
            "bpfDataIfacePattern": "^((en|wl|ww|sl|ib)[Popsx].*|(eth|wlan|wwan|bond).*)",
            "bpfConnectTimeLoadBalancing": "TCP",
            "bpfHostNetworkedNATWithoutCTLB": "Enabled",
            "bpfExternalServiceMode": "Tunnel",
            "bpfExtToServiceConnmark": 0,
            "bpfKubeProxyIptablesCleanupEnabled": true,
            "bpfKubeProxyMinSyncPeriod": "1s",
            "bpfKubeProxyHealthzPort": 10256,
            "bpfPSNATPorts": "20000:29999",
            "bpfHostConntrackBypass": false,
            "bpfEnforceRPF": "Loose",
            "bpfRedirectToPeer": "Enabled",
            "bpfPolicyDebugEnabled": true,
            "bpfDisableUnprivileged": true,
            "bpfConntrackTimeouts": {
                "creationGracePeriod": "10s",
                "tcpSynSent": "20s",
                "tcpEstablished": "1h",
                "tcpFinsSeen": "Auto",
                "tcpResetSeen": "40s",
                "udpTimeout": "60s",
                "genericTimeout": "10m",
                "icmpTimeout": "5s"
            },
            "bpfMapSizeConntrack": 512000,
            "bpfMapSizeNATFrontend": 65536,
            "bpfMapSizeNATBackend": 262144,
            "bpfMapSizeNATAffinity": 65536,
            "bpfMapSizeRoute": 262144,
            "bpfMapSizeIfState": 1000,
            "bpfMaglevMaxServices": 100,
            "bpfMaglevMaxEndpointsPerService": 100,
            "wireguardEnabled": false,
            "wireguardEnabledV6": false,
            "wireguardHostEncryptionEnabled": false,
            "wireguardInterfaceName": "wireguard.cali",
            "wireguardListeningPort": 51820,
            "wireguardMTU": 0,
            "wireguardKeepAlive": "0s",
            "wireguardRoutingRulePriority": 99,
            "iptablesBackend": "Auto",
            "logSeverityScreen": "Info",
            "reportingInterval": "0s",
            "floatingIPs": "Disabled",
            "healthEnabled": false,
            "healthPort": 9099,
            "vxlanPort": 4789,
            "vxlanVNI": 4096,
        });
        // A constant, checked by `calico_defaults_are_complete_and_valid`.
        serde_json::from_value(defaults).unwrap_or_default()
    }

    /// The configuration in force: each field from the first layer that sets it (a node's
    /// `node.<name>` object, then `default`), else Calico's default. Nested objects
    /// (`bpfConntrackTimeouts`) merge field by field.
    pub fn effective(layers: &[&FelixConfigurationSpec]) -> FelixConfigurationSpec {
        let mut merged = to_json(&FelixConfigurationSpec::calico_defaults());
        for layer in layers.iter().rev() {
            let mut layer = to_json(layer);
            if layer["bpfLogLevel"] == ""
                && let Some(map) = layer.as_object_mut()
            {
                map.remove("bpfLogLevel");
            }
            merge_json(&mut merged, layer);
        }
        serde_json::from_value(merged).unwrap_or_else(|_| FelixConfigurationSpec::calico_defaults())
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Validation {
        if let Some(name) = &self.wireguard_interface_name {
            check_interface_name("spec.wireguardInterfaceName", name)?;
        }
        if let Some(mtu) = self.wireguard_mtu
            && mtu.0 != 0
            && mtu.0 < 576
        {
            return fail(
                "spec.wireguardMTU",
                format!("{} is too small (0 for automatic, or at least 576)", mtu.0),
            );
        }
        if let Some(path) = &self.cgroup_v2_path
            && !path.starts_with('/')
        {
            return fail(
                "spec.cgroupV2Path",
                format!("{path:?} must be an absolute path"),
            );
        }
        Ok(())
    }
}

fn to_json(spec: &FelixConfigurationSpec) -> Value {
    serde_json::to_value(spec).unwrap_or(Value::Null)
}

fn merge_json(base: &mut Value, layer: Value) {
    match (base, layer) {
        (Value::Object(base), Value::Object(layer)) => {
            for (k, v) in layer {
                merge_json(base.entry(k).or_insert(Value::Null), v);
            }
        }
        (base, layer) => *base = layer,
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, no white space.
pub fn check_interface_name(path: &str, name: &str) -> Validation {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return fail(
            path,
            format!(
                "{name:?} is not a valid interface name (1 to 15 characters, no '/' or spaces)"
            ),
        );
    }
    Ok(())
}

/// Checks a FelixConfiguration's name: `default`, or `node.<nodename>` for a node's overrides.
pub fn validate_name(name: &str) -> Validation {
    if name == "default" {
        return Ok(());
    }
    match name.strip_prefix("node.") {
        Some(node) => check_subdomain("metadata.name", node),
        None => check_subdomain("metadata.name", name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calico_defaults_are_complete_and_valid() {
        let d = FelixConfigurationSpec::calico_defaults();
        assert_eq!(d.bpf_log_level.level(), BpfLogLevel::Off);
        assert_eq!(d.bpf_map_size_conntrack, Some(MapSize(512000)));
        assert_eq!(
            d.bpf_external_service_mode,
            Some(ExternalServiceMode::Tunnel)
        );
        assert_eq!(
            d.wireguard_interface_name.as_deref(),
            Some("wireguard.cali")
        );
        assert_eq!(d.iptables_backend, Some(IptablesBackend::Auto));
        assert!(d.validate().is_ok());
    }

    #[test]
    fn iptables_backend_takes_calicos_values_and_refuses_others() {
        let spec: FelixConfigurationSpec =
            serde_json::from_value(serde_json::json!({"iptablesBackend": "NFT"})).unwrap();
        assert_eq!(spec.iptables_backend, Some(IptablesBackend::Nft));
        assert_eq!(
            serde_json::to_value(&spec).unwrap()["iptablesBackend"],
            "NFT"
        );
        let err = serde_json::from_value::<FelixConfigurationSpec>(
            serde_json::json!({"iptablesBackend": "nftables"}),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("is not one of Legacy, NFT, Auto"),
            "{err}"
        );
    }

    #[test]
    fn effective_takes_the_first_layer_that_sets_a_field() {
        let node: FelixConfigurationSpec =
            serde_json::from_value(serde_json::json!({"bpfLogLevel": "debug"})).unwrap();
        let global: FelixConfigurationSpec = serde_json::from_value(serde_json::json!({
            "bpfLogLevel": "", "bpfEnabled": true, "bpfConntrackTimeouts": {"udpTimeout": "30s"}
        }))
        .unwrap();
        let eff = FelixConfigurationSpec::effective(&[&node, &global]);
        assert_eq!(eff.bpf_log_level.level(), BpfLogLevel::Debug);
        assert_eq!(eff.bpf_enabled, Some(true));
        let ct = eff.bpf_conntrack_timeouts.unwrap();
        assert_eq!(
            ct.udp_timeout,
            Some(ConntrackTimeout::Duration("30s".parse().unwrap()))
        );
        assert_eq!(
            ct.tcp_established,
            Some(ConntrackTimeout::Duration("1h".parse().unwrap()))
        );
        let only_global = FelixConfigurationSpec::effective(&[&global]);
        assert_eq!(only_global.bpf_log_level.level(), BpfLogLevel::Off);
    }
}
