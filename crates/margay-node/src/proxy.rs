//! The standard dataplane's Service rules: kube-proxy's iptables mode, calculated by margay-calc
//! and applied by margay-dataplane's driver (one iptables-restore per sync, only changed chains),
//! plus Calico's natOutgoing masquerade for pod pools and the health checks of
//! externalTrafficPolicy Local Services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::Result;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use margay_api::calico::felix::IptablesBackend;
use margay_calc::kube_proxy::{KubeProxyRules, ServiceName, Update};
use margay_calc::{NodeContext, Ruleset};
use margay_dataplane::iptables::{IptablesDriver, IptablesMode, SystemIptables};

use crate::agent::ProxySummary;
use crate::health::ServiceHealth;

/// The Service dataplane of this node.
#[derive(Debug)]
pub struct ProxyDataplane {
    driver: IptablesDriver,
    /// The backend `driver` writes to, once `iptablesBackend` was resolved.
    mode: Option<IptablesMode>,
    /// What the last full sync wrote, kept so that one Service's change is recalculated
    /// alone ([`ProxyDataplane::sync_services`]); `None` before the first full sync and after
    /// a failed sync.
    last: Option<Written>,
    /// The health checks of the last sync, by node port.
    health_checks: BTreeMap<u16, ServiceHealth>,
}

/// The last full sync's shape.
#[derive(Debug)]
enum Written {
    /// kube-proxy's rules, per Service, and the inputs of the rules that are not Services'.
    Rules {
        rules: KubeProxyRules,
        pools: Vec<(Ipv4Net, bool)>,
        host_ports: Vec<margay_calc::host_ports::HostPort>,
    },
    /// BPF mode with kube-proxy's rules removed: Services change no rule.
    NatOutgoingOnly,
}

impl ProxyDataplane {
    pub fn new() -> ProxyDataplane {
        ProxyDataplane {
            driver: IptablesDriver::new(),
            mode: None,
            last: None,
            health_checks: BTreeMap::new(),
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
            self.last = None;
            self.mode = Some(mode);
        }
        Ok(mode)
    }

    /// Applies the change of the Services `names` alone: their rules are recalculated (the
    /// others' are kept from the last sync), the ruleset reassembled and only the chains that
    /// differ written (one iptables-restore). `services` holds those of them that exist,
    /// `slices` every EndpointSlice naming one of them. `None` when only a full
    /// [`ProxyDataplane::sync`] can do it (no full sync yet, the last sync failed, or the
    /// change crosses kube-proxy's large-cluster threshold); nothing is written then.
    pub fn sync_services(
        &mut self,
        node: &str,
        names: &BTreeSet<ServiceName>,
        services: &[Service],
        slices: &[EndpointSlice],
    ) -> Option<Result<ProxySummary>> {
        let ruleset = match self.last.as_mut()? {
            Written::NatOutgoingOnly => None,
            Written::Rules {
                rules,
                pools,
                host_ports,
            } => {
                // In place: a refusal part-way leaves `last` unusable, so it is dropped below
                // and the full sync that follows starts afresh.
                let by_name: BTreeMap<ServiceName, &Service> = services
                    .iter()
                    .map(|s| (margay_calc::scenario::service_name(s), s))
                    .collect();
                let refused = names.iter().any(|name| {
                    let own: Vec<EndpointSlice> = slices
                        .iter()
                        .filter(|s| margay_calc::scenario::slice_service(s).as_ref() == Some(name))
                        .cloned()
                        .collect();
                    rules.update(name, by_name.get(name).copied(), &own) == Update::NeedsFull
                });
                if refused {
                    None
                } else {
                    Some(assemble(rules, pools, host_ports))
                }
            }
        };
        let description = match (ruleset, &self.last) {
            (None, Some(Written::NatOutgoingOnly)) => {
                "kube-proxy rules removed; no rule to change".to_owned()
            }
            (None, _) => {
                self.last = None;
                return None;
            }
            (Some(ruleset), _) => {
                match tokio::task::block_in_place(|| self.driver.sync(&ruleset)) {
                    Ok(report) => describe(&ruleset, &report),
                    Err(e) => {
                        self.last = None;
                        return Some(Err(e.into()));
                    }
                }
            }
        };
        // Health checks: the changed Services' replace theirs.
        self.health_checks
            .retain(|_, h| !names.contains(&(h.namespace.clone(), h.name.clone())));
        self.health_checks
            .extend(health_checks(node, services, slices));
        Some(Ok(ProxySummary {
            description,
            health_checks: self.health_checks.clone(),
        }))
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
        self.last = None;
        let rules = KubeProxyRules::full(services, slices, &context);
        let ruleset = assemble(&rules, pools, host_ports);
        // iptables-restore is a blocking process; keep the runtime's other tasks (health
        // checks) running meanwhile.
        let report = tokio::task::block_in_place(|| self.driver.sync(&ruleset))?;
        self.last = Some(Written::Rules {
            rules,
            pools: pools.to_vec(),
            host_ports: host_ports.to_vec(),
        });
        self.health_checks = health_checks(node, services, slices);
        Ok(ProxySummary {
            description: describe(&ruleset, &report),
            health_checks: self.health_checks.clone(),
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
        self.last = None;
        let mut ruleset = Ruleset::default();
        ruleset.add_nat_outgoing(pools);
        // Kept in BPF mode too, so that it is already there when kube-proxy's rules come back.
        ruleset.add_bpf_translated_accept();
        let report = tokio::task::block_in_place(|| self.driver.sync(&ruleset))?;
        self.last = Some(Written::NatOutgoingOnly);
        self.health_checks = health_checks(node, services, slices);
        Ok(ProxySummary {
            description: format!(
                "kube-proxy rules removed, natOutgoing kept ({} rules); wrote {} chains, deleted {}",
                ruleset.rule_count(),
                report.chains_written,
                report.chains_deleted
            ),
            // The agent still answers healthCheckNodePorts in BPF mode.
            health_checks: self.health_checks.clone(),
        })
    }

    /// Removes every rule this dataplane owns.
    pub fn cleanup(&mut self) -> Result<()> {
        self.last = None;
        self.driver.cleanup()?;
        Ok(())
    }
}

/// The node's whole ruleset: kube-proxy's rules plus the rules that do not come from Services.
fn assemble(
    rules: &KubeProxyRules,
    pools: &[(Ipv4Net, bool)],
    host_ports: &[margay_calc::host_ports::HostPort],
) -> Ruleset {
    let mut ruleset = rules.ruleset();
    ruleset.add_nat_outgoing(pools);
    ruleset.add_host_ports(host_ports);
    ruleset.add_bpf_translated_accept();
    ruleset
}

fn describe(ruleset: &Ruleset, report: &margay_dataplane::iptables::SyncReport) -> String {
    format!(
        "{} rules in {} chains; {} sync wrote {} chains ({} rules) in {:.1} ms (iptables-restore {:.1} ms)",
        ruleset.rule_count(),
        ruleset.chain_count(),
        if report.full { "full" } else { "partial" },
        report.chains_written,
        report.rules_written,
        report.duration.as_secs_f64() * 1000.0,
        report.restore_duration.as_secs_f64() * 1000.0
    )
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
