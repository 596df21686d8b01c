//! The standard dataplane's Service rules: kube-proxy's iptables mode, calculated by margay-calc
//! and applied by margay-dataplane's driver (one iptables-restore per sync, only changed chains),
//! plus Calico's natOutgoing masquerade for pod pools and the health checks of
//! externalTrafficPolicy Local Services.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::Result;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use margay_api::calico::felix::IptablesBackend;
use margay_calc::{NodeContext, kube_proxy_ruleset};
use margay_dataplane::iptables::{IptablesDriver, IptablesMode, SystemIptables};

use crate::agent::ProxySummary;
use crate::health::ServiceHealth;

/// The Service dataplane of this node.
#[derive(Debug)]
pub struct ProxyDataplane {
    driver: IptablesDriver,
    /// The backend `driver` writes to, once `iptablesBackend` was resolved.
    mode: Option<IptablesMode>,
}

impl ProxyDataplane {
    pub fn new() -> ProxyDataplane {
        ProxyDataplane {
            driver: IptablesDriver::new(),
            mode: None,
        }
    }

    /// Follows FelixConfiguration `iptablesBackend`: resolves it (`Auto` once, to the backend that
    /// holds rules, see [`IptablesMode::detect`]) and, when it names another backend than the one
    /// in use (also at the agent's start), removes this dataplane's chains from the other one, so
    /// the node never has Service rules in both (each would NAT a flow its own way).
    pub fn set_backend(&mut self, wanted: IptablesBackend) -> Result<IptablesMode> {
        let mode = match (wanted, self.mode) {
            (IptablesBackend::Legacy, _) => IptablesMode::Legacy,
            (IptablesBackend::Nft, _) => IptablesMode::Nft,
            (IptablesBackend::Auto, Some(current)) => current,
            (IptablesBackend::Auto, None) => tokio::task::block_in_place(IptablesMode::detect),
        };
        if self.mode != Some(mode) {
            let other = match mode {
                IptablesMode::Legacy => IptablesMode::Nft,
                IptablesMode::Nft => IptablesMode::Legacy,
            };
            let mut old = IptablesDriver::with_backend(SystemIptables::for_mode(other));
            tokio::task::block_in_place(|| old.cleanup()).map_err(|e| {
                anyhow::anyhow!(
                    "iptablesBackend {wanted}: cannot remove the rules from iptables-{other}: {e}"
                )
            })?;
            tracing::info!(%wanted, backend = %mode, "iptables backend in use");
            self.driver = IptablesDriver::with_backend(SystemIptables::for_mode(mode));
            self.mode = Some(mode);
        }
        Ok(mode)
    }

    /// Computes the rules for the current Services and Endpoints and applies the difference.
    /// With the BPF programs serving Services and kube-proxy's rules only kept
    /// (`bpfKubeProxyIptablesCleanupEnabled: false`), the flows the programs NAT get past
    /// KUBE-FORWARD's INVALID drop through the translated-mark accept
    /// (`margay_calc::bpf_handover`), present in every mode. `host_ports`: the pods' hostPorts
    /// this dataplane serves (none in BPF mode, where the programs do).
    pub async fn sync(
        &mut self,
        node: &str,
        node_ips: &[Ipv4Addr],
        services: &[Service],
        slices: &[EndpointSlice],
        pools: &[(Ipv4Net, bool)],
        host_ports: &[margay_calc::host_ports::HostPort],
    ) -> Result<ProxySummary> {
        let context = NodeContext {
            node_name: node.to_owned(),
            node_ips: node_ips.to_vec(),
            cluster_cidrs: pools.iter().map(|(net, _)| *net).collect(),
        };
        let mut ruleset = kube_proxy_ruleset(services, slices, &context);
        ruleset.add_nat_outgoing(pools);
        ruleset.add_host_ports(host_ports);
        ruleset.add_bpf_translated_accept();
        // iptables-restore is a blocking process; keep the runtime's other tasks (health
        // checks) running meanwhile.
        let report = tokio::task::block_in_place(|| self.driver.sync(&ruleset))?;
        let description = format!(
            "{} rules in {} chains; {} sync wrote {} chains ({} rules) in {:.1} ms",
            ruleset.rule_count(),
            ruleset.chain_count(),
            if report.full { "full" } else { "partial" },
            report.chains_written,
            report.rules_written,
            report.duration.as_secs_f64() * 1000.0
        );
        Ok(ProxySummary {
            description,
            health_checks: health_checks(node, services, slices),
        })
    }

    /// Keeps only Calico's natOutgoing rules: in BPF mode (with
    /// `bpfKubeProxyIptablesCleanupEnabled`) every KUBE-* chain and jump goes. KUBE-FORWARD's
    /// "drop INVALID" would otherwise drop the replies of flows the BPF programs NAT, which the
    /// kernel's conntrack never saw.
    pub async fn sync_nat_outgoing_only(
        &mut self,
        node: &str,
        services: &[Service],
        slices: &[EndpointSlice],
        pools: &[(Ipv4Net, bool)],
    ) -> Result<ProxySummary> {
        let mut ruleset = margay_calc::Ruleset::default();
        ruleset.add_nat_outgoing(pools);
        // Kept in BPF mode too, so that it is already there when kube-proxy's rules come back.
        ruleset.add_bpf_translated_accept();
        let report = tokio::task::block_in_place(|| self.driver.sync(&ruleset))?;
        Ok(ProxySummary {
            description: format!(
                "kube-proxy rules removed, natOutgoing kept ({} rules); wrote {} chains, deleted {}",
                ruleset.rule_count(),
                report.chains_written,
                report.chains_deleted
            ),
            // The agent still answers healthCheckNodePorts in BPF mode.
            health_checks: health_checks(node, services, slices),
        })
    }

    /// Removes every rule this dataplane owns.
    pub fn cleanup(&mut self) -> Result<()> {
        self.driver.cleanup()?;
        Ok(())
    }
}

/// kube-proxy serves a health check on each LoadBalancer Service with externalTrafficPolicy
/// Local, answering with the number of ready endpoints on this node.
pub fn health_checks(
    node: &str,
    services: &[Service],
    slices: &[EndpointSlice],
) -> BTreeMap<u16, ServiceHealth> {
    let mut out = BTreeMap::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        if !local || spec.type_.as_deref() != Some("LoadBalancer") {
            continue;
        }
        let (Some(name), Some(ns)) = (&svc.metadata.name, &svc.metadata.namespace) else {
            continue;
        };
        let local_endpoints = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_ref() == Some(ns)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(name)
            })
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| {
                e.node_name.as_deref() == Some(node)
                    && e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
            })
            .count();
        out.insert(
            port,
            ServiceHealth {
                namespace: ns.clone(),
                name: name.clone(),
                local_endpoints,
            },
        );
    }
    out
}
