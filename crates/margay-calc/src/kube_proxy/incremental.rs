//! kube-proxy's rules kept per Service, so that one Service's change (its EndpointSlices) is
//! recalculated alone instead of every Service of the cluster.
//!
//! [`kube_proxy_ruleset`](super::kube_proxy_ruleset) is the reference: for the same Services and
//! EndpointSlices, [`KubeProxyRules::ruleset`] returns exactly what it returns, whatever the order
//! of the updates that led there (the equivalence tests in `tests/incremental.rs` check it on
//! every golden scenario). That holds because a service port's rules depend only on its own
//! Service, its own slices, the node, and one cluster-wide fact: whether the cluster has more than
//! [`LARGE_CLUSTER_ENDPOINTS_THRESHOLD`] endpoints (kube-proxy's large-cluster mode drops endpoint
//! comments). Every Service's rules are therefore kept as a fragment (its own chains and its lines
//! in the shared chains, such as `KUBE-SERVICES`); the shared chains are put back together in
//! (namespace, name, port, protocol) order, the order the full calculation writes them in. An
//! update that moves the cluster across the threshold returns [`Update::NeedsFull`]: every
//! fragment would change, and the caller recalculates from everything it has.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    LARGE_CLUSTER_ENDPOINTS_THRESHOLD, NodeContext, endpoints_for, service_ports,
    slices_by_service, write_service_port, write_skeleton, write_tail,
};
use crate::model::{Ruleset, Table};

/// A Service, as (namespace, name); slices name theirs with `kubernetes.io/service-name`.
pub type ServiceName = (String, String);

/// A service port and its endpoints.
type PortEndpoints = (super::ServicePortInfo, Vec<super::Endpoint>);

/// What [`KubeProxyRules::update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The Service's fragment was recalculated (or removed); the others stand.
    Applied,
    /// The change moves the cluster across kube-proxy's large-cluster threshold: every
    /// fragment changes; recalculate with [`KubeProxyRules::full`]. Nothing was changed.
    NeedsFull,
}

/// One Service's rules: its ports', in order, and how many endpoints they count toward the
/// large-cluster threshold.
#[derive(Debug, Clone, Default)]
struct Fragment {
    rules: Ruleset,
    endpoints: usize,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct KubeProxyRules {
    node: NodeContext,
    fragments: BTreeMap<ServiceName, Fragment>,
    /// Sum of the fragments' endpoints.
    endpoints: usize,
}

impl KubeProxyRules {
    /// Every Service's rules, from scratch.
    pub fn full(services: &[Service], slices: &[EndpointSlice], node: &NodeContext) -> Self {
        let by_service = slices_by_service(slices);
        let mut parts: Vec<(ServiceName, Vec<PortEndpoints>)> = Vec::new();
        let mut total = 0;
        for svc in services {
            let ports = service_ports(svc);
            let Some(first) = ports.first() else { continue };
            let name = (first.namespace.clone(), first.service_name.clone());
            let own = by_service.get(&name);
            let with_endpoints: Vec<_> = ports
                .into_iter()
                .map(|sp| {
                    let eps = own.map(|s| endpoints_for(&sp, s, node)).unwrap_or_default();
                    total += eps.len();
                    (sp, eps)
                })
                .collect();
            parts.push((name, with_endpoints));
        }
        let large = total > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
        let mut rules = KubeProxyRules {
            node: node.clone(),
            fragments: BTreeMap::new(),
            endpoints: 0,
        };
        for (name, ports) in parts {
            let fragment = fragment(ports, node, large);
            rules.endpoints += fragment.endpoints;
            // Two Services of one name cannot both exist; the later one wins, as in a map.
            if let Some(old) = rules.fragments.insert(name, fragment) {
                rules.endpoints -= old.endpoints;
            }
        }
        rules
    }

    /// Recalculates the rules of the Service `name`: `service` is its current object (`None`
    /// when it is gone), `slices` every EndpointSlice that names it (others are ignored).
    pub fn update(
        &mut self,
        name: &ServiceName,
        service: Option<&Service>,
        slices: &[EndpointSlice],
    ) -> Update {
        let ports = service.map(service_ports).unwrap_or_default();
        let by_service = slices_by_service(slices);
        let own = by_service.get(name);
        let with_endpoints: Vec<_> = ports
            .into_iter()
            .filter(|sp| sp.namespace == name.0 && sp.service_name == name.1)
            .map(|sp| {
                let eps = own
                    .map(|s| endpoints_for(&sp, s, &self.node))
                    .unwrap_or_default();
                (sp, eps)
            })
            .collect();
        let new_endpoints: usize = with_endpoints.iter().map(|(_, e)| e.len()).sum();
        let old_endpoints = self.fragments.get(name).map_or(0, |f| f.endpoints);
        let total = self.endpoints - old_endpoints + new_endpoints;
        let large = total > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
        if large != self.large() {
            return Update::NeedsFull;
        }
        self.endpoints = total;
        if with_endpoints.is_empty() {
            self.fragments.remove(name);
        } else {
            let fragment = fragment(with_endpoints, &self.node, large);
            self.fragments.insert(name.clone(), fragment);
        }
        Update::Applied
    }

    /// Whether kube-proxy's large-cluster mode is on.
    pub fn large(&self) -> bool {
        self.endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD
    }

    /// How many Services have rules.
    pub fn services(&self) -> usize {
        self.fragments.len()
    }

    /// The whole ruleset, as [`kube_proxy_ruleset`](super::kube_proxy_ruleset) returns it.
    pub fn ruleset(&self) -> Ruleset {
        let mut rs = Ruleset::default();
        write_skeleton(&mut rs, &self.node);
        for fragment in self.fragments.values() {
            for table in Table::ALL {
                let into = rs.table_mut(table);
                for (chain, rules) in &fragment.rules.table(table).chains {
                    into.chain_mut(chain).extend(rules.iter().cloned());
                }
            }
        }
        write_tail(&mut rs);
        rs
    }
}

/// One Service's ports, written into a ruleset of their own.
fn fragment(ports: Vec<PortEndpoints>, node: &NodeContext, large: bool) -> Fragment {
    let mut ports = ports;
    ports.sort_by(|a, b| a.0.sort_key.cmp(&b.0.sort_key));
    let mut rules = Ruleset::default();
    let mut endpoints = 0;
    for (sp, eps) in &ports {
        write_service_port(&mut rules, sp, eps, node, large);
        endpoints += eps.len();
    }
    Fragment { rules, endpoints }
}
