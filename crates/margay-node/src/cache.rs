//! The agent's copy of the datastore, kept by the sync stream, with typed views of what the
//! dataplane calculation needs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use margay_api::calico::FelixConfigurationSpec;
use margay_api::operator::LinuxDataplane;
use margay_api::{Kind, Resource};
use margay_calc::kube_proxy::ServiceName;
use margay_calc::scenario::slice_service;
use margay_datastore::{Key, Stored};
use serde_json::Value;

/// The kinds the agent follows.
pub const KINDS: [Kind; 9] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Node,
    Kind::IPPool,
    Kind::IPAMBlock,
    Kind::FelixConfiguration,
    Kind::Installation,
    Kind::Namespace,
    // For their hostPorts.
    Kind::Pod,
];

#[derive(Debug, Default)]
pub struct Cache {
    /// Every object but Services and EndpointSlices, as stored (few, read as JSON).
    objects: BTreeMap<Key, Stored>,
    /// Services and EndpointSlices, parsed once when they arrive (a sync at 10,000 Services
    /// would otherwise spend most of its time turning JSON into them again), and only parsed:
    /// their JSON is not kept. It took three times the memory of the parsed objects (5.6 KB
    /// per object against 1.4-2.2 KB, `serde_json` keeping key order), 110 MB of the agent's
    /// 390 MB at 10,000 Services, and nothing read it.
    services: BTreeMap<ServiceName, Service>,
    slices: BTreeMap<Key, EndpointSlice>,
    /// The slices naming each Service, so that one Service's slices are found without
    /// looking at every slice.
    slices_by_service: BTreeMap<ServiceName, BTreeSet<Key>>,
    /// The store revision this copy reflects (from the sync stream's progress reports).
    pub revision: u64,
    /// What changed since [`Cache::take_changes`] was last called.
    changes: Changes,
}

/// What changed in the copy since the last dataplane sync took the changes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Something other than Services and EndpointSlices changed: only a full sync covers it.
    pub other: bool,
    /// The Services whose object or EndpointSlices changed (a slice moved between Services
    /// names both).
    pub services: BTreeSet<ServiceName>,
}

impl Cache {
    /// Stores `stored`; returns whether the dataplane may need to change. A Node whose only
    /// change is its agent's `status.dataplane` report (refreshed every few seconds in BPF
    /// mode) does not: nothing the agent programs reads it.
    pub fn upsert(&mut self, stored: Stored) -> bool {
        let relevant = match self.objects.get(&stored.key) {
            Some(old) if stored.key.kind == Kind::Node => {
                without_dataplane_report(&old.value) != without_dataplane_report(&stored.value)
            }
            _ => true,
        };
        // A change nothing reads (a Node's dataplane report) is not a change to program.
        if relevant {
            self.track(&stored.key);
        }
        match stored.key.kind {
            Kind::Service => match serde_json::from_value::<Service>(stored.value) {
                Ok(svc) => {
                    self.services.insert(key_name(&stored.key), svc);
                }
                Err(e) => {
                    tracing::warn!(key = %stored.key, error = %e, "cannot read the Service; ignoring it");
                    self.services.remove(&key_name(&stored.key));
                }
            },
            Kind::EndpointSlice => match serde_json::from_value::<EndpointSlice>(stored.value) {
                Ok(slice) => {
                    self.unindex_slice(&stored.key);
                    if let Some(name) = slice_service(&slice) {
                        self.changes.services.insert(name.clone());
                        self.slices_by_service
                            .entry(name)
                            .or_default()
                            .insert(stored.key.clone());
                    }
                    self.slices.insert(stored.key.clone(), slice);
                }
                Err(e) => {
                    tracing::warn!(key = %stored.key, error = %e, "cannot read the EndpointSlice; ignoring it");
                    self.unindex_slice(&stored.key);
                    self.slices.remove(&stored.key);
                }
            },
            _ => {
                self.objects.insert(stored.key.clone(), stored);
            }
        }
        relevant
    }

    pub fn remove(&mut self, key: &Key) {
        self.track(key);
        match key.kind {
            Kind::Service => {
                self.services.remove(&key_name(key));
            }
            Kind::EndpointSlice => {
                self.unindex_slice(key);
                self.slices.remove(key);
            }
            _ => {
                self.objects.remove(key);
            }
        }
    }

    /// Forgets which Service the slice `key` named.
    fn unindex_slice(&mut self, key: &Key) {
        let Some(name) = self.slices.get(key).and_then(slice_service) else {
            return;
        };
        if let Some(keys) = self.slices_by_service.get_mut(&name) {
            keys.remove(key);
            if keys.is_empty() {
                self.slices_by_service.remove(&name);
            }
        }
    }

    /// Records what a change of `key` affects, before the change (a slice's old Service).
    fn track(&mut self, key: &Key) {
        match key.kind {
            Kind::Service => {
                self.changes.services.insert(key_name(key));
            }
            Kind::EndpointSlice => {
                if let Some(name) = self.slices.get(key).and_then(slice_service) {
                    self.changes.services.insert(name);
                }
            }
            _ => self.changes.other = true,
        }
    }

    /// What changed since the last call (and forgets it).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The current Service objects of `names` (those that exist) and every EndpointSlice that
    /// names one of them.
    pub fn services_and_slices_of(
        &self,
        names: &BTreeSet<ServiceName>,
    ) -> (Vec<Service>, Vec<EndpointSlice>) {
        let services = names
            .iter()
            .filter_map(|n| self.services.get(n).cloned())
            .collect();
        let slices = names
            .iter()
            .filter_map(|n| self.slices_by_service.get(n))
            .flatten()
            .filter_map(|key| self.slices.get(key).cloned())
            .collect();
        (services, slices)
    }

    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Stored> {
        self.objects.values().filter(move |s| s.key.kind == kind)
    }

    /// The stored JSON of `key`; none for Services and EndpointSlices (kept parsed only).
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key).map(|s| &s.value)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn services(&self) -> Vec<Service> {
        self.services.values().cloned().collect()
    }

    /// The hostPorts of the pods on `node`, or none when the Installation says
    /// `hostPorts: Disabled` (Enabled when unset, as in Calico).
    pub fn host_ports(&self, node: &str) -> Vec<margay_calc::host_ports::HostPort> {
        let disabled = self
            .get(&Key::new(Kind::Installation, None, "default"))
            .is_some_and(|v| v["spec"]["calicoNetwork"]["hostPorts"] == "Disabled");
        if disabled {
            return Vec::new();
        }
        let pods: Vec<k8s_openapi::api::core::v1::Pod> = self
            .of_kind(Kind::Pod)
            .filter(|s| s.value["spec"]["nodeName"] == node)
            .filter_map(|s| serde_json::from_value(s.value.clone()).ok())
            .collect();
        margay_calc::host_ports::host_ports(&pods, node)
    }

    pub fn endpoint_slices(&self) -> Vec<EndpointSlice> {
        self.slices.values().cloned().collect()
    }

    /// Every Node resource by name.
    pub fn nodes(&self) -> BTreeMap<String, Value> {
        self.of_kind(Kind::Node)
            .map(|s| (s.key.name.clone(), s.value.clone()))
            .collect()
    }

    /// The strongest `vxlanMode` among the enabled Workload pools.
    pub fn vxlan_mode(&self) -> crate::vxlan::Mode {
        use crate::vxlan::Mode;
        let mut mode = Mode::Never;
        for s in self.of_kind(Kind::IPPool) {
            if s.value["spec"]["disabled"] == true {
                continue;
            }
            let workload = s.value["spec"]["allowedUses"]
                .as_array()
                .is_none_or(|u| u.iter().any(|x| x == "Workload"));
            if !workload {
                continue;
            }
            match s.value["spec"]["vxlanMode"].as_str() {
                Some("Always") => mode = Mode::Always,
                Some("CrossSubnet") if mode == Mode::Never => mode = Mode::CrossSubnet,
                _ => {}
            }
        }
        mode
    }

    /// Every IPAM block and the node it is affine to.
    pub fn blocks(&self) -> BTreeMap<Ipv4Net, String> {
        self.of_kind(Kind::IPAMBlock)
            .filter_map(|s| {
                let cidr = s.value["spec"]["cidr"].as_str()?.parse().ok()?;
                let node = s.value["spec"]["affinity"]
                    .as_str()?
                    .strip_prefix("host:")?;
                Some((cidr, node.to_owned()))
            })
            .collect()
    }

    /// IPv4 pools (Workload use) and whether each masquerades traffic leaving the pools.
    pub fn pools(&self) -> Vec<(Ipv4Net, bool)> {
        self.of_kind(Kind::IPPool)
            .filter_map(|s| match Resource::from_value(s.value.clone()).ok()? {
                Resource::IPPool(p) => {
                    if !p
                        .spec
                        .allows(margay_api::calico::ippool::AllowedUse::Workload)
                    {
                        return None;
                    }
                    let net = match p.spec.cidr.as_ref()?.net() {
                        ipnet::IpNet::V4(n) => n,
                        ipnet::IpNet::V6(_) => return None,
                    };
                    Some((net, p.spec.nat_outgoing.unwrap_or(false)))
                }
                _ => None,
            })
            .collect()
    }

    /// The FelixConfiguration in force on `node`: `node.<node>`, then `default`, then Calico's
    /// defaults.
    pub fn felix(&self, node: &str) -> FelixConfigurationSpec {
        let read = |name: &str| -> Option<FelixConfigurationSpec> {
            let v = self.get(&Key::new(Kind::FelixConfiguration, None, name))?;
            serde_json::from_value(v["spec"].clone()).ok()
        };
        let layers: Vec<FelixConfigurationSpec> = [read(&format!("node.{node}")), read("default")]
            .into_iter()
            .flatten()
            .collect();
        let refs: Vec<&FelixConfigurationSpec> = layers.iter().collect();
        FelixConfigurationSpec::effective(&refs)
    }

    /// The dataplane the cluster asks for: the Installation's, or BPF when FelixConfiguration
    /// says `bpfEnabled: true`.
    pub fn requested_dataplane(&self, node: &str) -> LinuxDataplane {
        let from_installation = self
            .get(&Key::new(Kind::Installation, None, "default"))
            .and_then(|v| v["spec"]["calicoNetwork"]["linuxDataplane"].as_str())
            .and_then(|s| s.parse().ok());
        match from_installation {
            Some(dp) => dp,
            None if self.felix(node).bpf_enabled == Some(true) => LinuxDataplane::Bpf,
            None => LinuxDataplane::Iptables,
        }
    }
}

/// A Service's (namespace, name) from its key.
fn key_name(key: &Key) -> ServiceName {
    (
        key.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        key.name.clone(),
    )
}

/// A Node's IPv4 address: the first IPv4 of `spec.addresses` (CalicoNodeIP first), else
/// `spec.bgp.ipv4Address`.
pub fn node_ipv4(node: &Value) -> Option<Ipv4Addr> {
    let parse = |s: &str| s.split('/').next()?.parse::<Ipv4Addr>().ok();
    let addresses = node["spec"]["addresses"].as_array();
    let by_type = |t: &str| {
        addresses?
            .iter()
            .filter(|a| a["type"] == t)
            .find_map(|a| parse(a["address"].as_str()?))
    };
    by_type("CalicoNodeIP")
        .or_else(|| by_type("InternalIP"))
        .or_else(|| {
            addresses?
                .iter()
                .find_map(|a| parse(a["address"].as_str()?))
        })
        .or_else(|| parse(node["spec"]["bgp"]["ipv4Address"].as_str()?))
}

/// A Node without `status.dataplane`, its agent's report.
fn without_dataplane_report(node: &Value) -> Value {
    let mut v = node.clone();
    if let Some(status) = v.get_mut("status").and_then(Value::as_object_mut) {
        status.remove("dataplane");
    }
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(kind: Kind, namespace: Option<&str>, name: &str, value: Value) -> Stored {
        Stored {
            key: Key::new(kind, namespace, name),
            revision: 1,
            value,
        }
    }

    fn service(name: &str) -> Stored {
        stored(
            Kind::Service,
            Some("shop"),
            name,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": "shop"},
                   "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}),
        )
    }

    fn slice(name: &str, service: &str) -> Stored {
        stored(
            Kind::EndpointSlice,
            Some("shop"),
            name,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": name, "namespace": "shop",
                                "labels": {"kubernetes.io/service-name": service}},
                   "addressType": "IPv4",
                   "endpoints": [{"addresses": ["192.168.1.5"]}],
                   "ports": [{"port": 8080}]}),
        )
    }

    #[test]
    fn services_and_slices_are_served_parsed_without_their_json() {
        let mut cache = Cache::default();
        cache.upsert(service("web"));
        cache.upsert(slice("web-abc", "web"));
        let web: ServiceName = ("shop".to_owned(), "web".to_owned());
        assert_eq!(cache.service_count(), 1);
        let (services, slices) = cache.services_and_slices_of(&BTreeSet::from([web.clone()]));
        assert_eq!(
            services[0].spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10")
        );
        assert_eq!(slices[0].endpoints[0].addresses, ["192.168.1.5"]);
        assert_eq!(cache.endpoint_slices().len(), 1);
        // Only parsed: the JSON is not kept (memory), and nothing asks for it.
        assert!(
            cache
                .get(&Key::new(Kind::Service, Some("shop"), "web"))
                .is_none()
        );
        assert!(
            cache
                .get(&Key::new(Kind::EndpointSlice, Some("shop"), "web-abc"))
                .is_none()
        );
        let changes = cache.take_changes();
        assert_eq!(changes.services, BTreeSet::from([web.clone()]));
        assert!(!changes.other);

        // Removing them empties the views and names the Service as changed.
        cache.remove(&Key::new(Kind::EndpointSlice, Some("shop"), "web-abc"));
        cache.remove(&Key::new(Kind::Service, Some("shop"), "web"));
        assert_eq!(cache.service_count(), 0);
        assert!(cache.endpoint_slices().is_empty());
        assert_eq!(cache.take_changes().services, BTreeSet::from([web]));
    }

    #[test]
    fn other_kinds_keep_their_json_and_need_a_full_sync() {
        let mut cache = Cache::default();
        let installation = json!({"apiVersion": "operator.tigera.io/v1", "kind": "Installation",
            "metadata": {"name": "default"},
            "spec": {"calicoNetwork": {"linuxDataplane": "BPF"}}});
        cache.upsert(stored(
            Kind::Installation,
            None,
            "default",
            installation.clone(),
        ));
        assert_eq!(
            cache.get(&Key::new(Kind::Installation, None, "default")),
            Some(&installation)
        );
        assert_eq!(cache.requested_dataplane("node-1"), LinuxDataplane::Bpf);
        assert!(cache.take_changes().other);
        cache.remove(&Key::new(Kind::Installation, None, "default"));
        assert!(
            cache
                .get(&Key::new(Kind::Installation, None, "default"))
                .is_none()
        );
        assert_eq!(
            cache.requested_dataplane("node-1"),
            LinuxDataplane::Iptables
        );
    }

    #[test]
    fn a_service_that_does_not_parse_is_left_out() {
        let mut cache = Cache::default();
        cache.upsert(service("web"));
        let mut broken = service("web");
        broken.value["spec"]["ports"] = json!("eighty");
        cache.upsert(broken);
        assert_eq!(cache.service_count(), 0);
    }
}
