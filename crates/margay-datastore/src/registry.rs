//! What kube-apiserver's Service registry and Calico's LoadBalancer IPAM do when a Service is
//! written: give it a ClusterIP from the service range, NodePorts and a healthCheckNodePort from
//! the NodePort range, and a LoadBalancer address from an IP pool with `allowedUses:
//! [LoadBalancer]`, written to `status.loadBalancer.ingress`.
//!
//! Allocations are derived from the Services that exist (no separate bitmap to drift out of
//! step): freeing an address is deleting or changing its Service. Two writers allocating at the
//! same moment would see the same free address, so every write that allocates something new also
//! updates one lock object (ConfigMap `kube-system/margay-service-allocations`) with
//! compare-and-swap in the same commit; the loser's commit conflicts and the client re-plans it
//! from a fresh read.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus};
use margay_api::calico::ippool::AllowedUse;
use margay_api::k8s::NODE_PORT_RANGE;
use margay_api::{Kind, Resource};
use serde_json::{Value, json};

use crate::backend::{Datastore, Error, Key, ListRequest, Op, Stored};
use crate::client::ClientError;

/// Kubernetes' default service range.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The first address handed out automatically: below it are `kubernetes` (.1) and kube-dns
/// (.10), which are asked for by address.
const FIRST_AUTOMATIC_OFFSET: u32 = 11;

/// The lock object every allocating write updates.
pub const LOCK_NAMESPACE: &str = "kube-system";
pub const LOCK_NAME: &str = "margay-service-allocations";

/// Whether `key` is the registry's lock object.
pub fn is_lock(key: &Key) -> bool {
    key.kind == Kind::ConfigMap
        && key.namespace.as_deref() == Some(LOCK_NAMESPACE)
        && key.name == LOCK_NAME
}

/// Who holds what, read from the store once per plan.
#[derive(Debug, Default)]
pub struct Allocations {
    cluster_ips: HashMap<Ipv4Addr, Key>,
    node_ports: HashMap<(i32, String), Key>,
    health_ports: HashMap<i32, Key>,
    lb_ips: HashMap<IpAddr, Key>,
    lb_pools: Vec<Ipv4Net>,
    lock: Option<Stored>,
    /// Whether this plan allocated anything new (and so must take the lock).
    allocated: bool,
    /// Where the search for a free ClusterIP resumes (an offset in the range): a bulk write of
    /// 50,000 Services would otherwise rescan every allocated address for each new one.
    cluster_ip_cursor: u32,
}

impl Allocations {
    pub async fn load(store: &dyn Datastore) -> Result<Allocations, Error> {
        // The lock is read before the Services: a writer that commits in between advances the
        // lock too, so our commit against the lock revision read here will conflict and re-plan.
        // Read after, it could show the new lock revision with a listing that predates it.
        let lock = match store
            .get(&Key::new(Kind::ConfigMap, Some(LOCK_NAMESPACE), LOCK_NAME))
            .await
        {
            Ok(s) => Some(s),
            Err(Error::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let mut a = Allocations {
            lock,
            ..Allocations::default()
        };
        let services = store
            .list(&ListRequest {
                kind: Some(Kind::Service),
                namespace: None,
            })
            .await?;
        for s in &services.items {
            a.record(&s.key, &s.value);
        }
        let pools = store
            .list(&ListRequest {
                kind: Some(Kind::IPPool),
                namespace: None,
            })
            .await?;
        for p in pools.items {
            if let Ok(Resource::IPPool(pool)) = Resource::from_value(p.value) {
                let disabled = pool.spec.disabled.unwrap_or(false);
                if pool.spec.allows(AllowedUse::LoadBalancer)
                    && !disabled
                    && let Some(ipnet::IpNet::V4(net)) = pool.spec.cidr.as_ref().map(|c| c.net())
                {
                    a.lb_pools.push(net);
                }
            }
        }
        Ok(a)
    }

    fn record(&mut self, key: &Key, value: &Value) {
        let spec = &value["spec"];
        if let Some(ip) = spec["clusterIP"].as_str().and_then(|s| s.parse().ok()) {
            self.cluster_ips.insert(ip, key.clone());
        }
        for p in spec["ports"].as_array().into_iter().flatten() {
            if let Some(np) = p["nodePort"].as_i64() {
                let proto = p["protocol"].as_str().unwrap_or("TCP").to_owned();
                self.node_ports.insert((np as i32, proto), key.clone());
            }
        }
        if let Some(hp) = spec["healthCheckNodePort"].as_i64() {
            self.health_ports.insert(hp as i32, key.clone());
        }
        for i in value["status"]["loadBalancer"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(ip) = i["ip"].as_str().and_then(|s| s.parse().ok()) {
                self.lb_ips.insert(ip, key.clone());
            }
        }
    }

    fn free_for<K: std::hash::Hash + Eq>(map: &HashMap<K, Key>, k: &K, me: &Key) -> bool {
        map.get(k).is_none_or(|owner| owner == me)
    }

    /// Fills in `value` (a validated Service about to be written under `key`; `current` is what
    /// is stored now) what the registry allocates, and records it.
    pub fn assign(
        &mut self,
        key: &Key,
        value: &mut Value,
        current: Option<&Value>,
    ) -> Result<(), ClientError> {
        let what = key.to_string();
        let refuse = |path: &str, msg: String| ClientError::Invalid {
            what: what.clone(),
            error: margay_api::ValidationError::new(path, msg),
        };
        let mut svc: Service = serde_json::from_value(value.clone())
            .map_err(|e| ClientError::Refused(format!("{what}: {e}")))?;
        let old: Option<Service> = current.and_then(|c| serde_json::from_value(c.clone()).ok());
        let spec = svc.spec.get_or_insert_with(Default::default);
        let old_spec = old.as_ref().and_then(|o| o.spec.as_ref());
        let svc_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());

        // === ClusterIP ===
        if svc_type == "ExternalName" {
            spec.cluster_ip = None;
            spec.cluster_ips = None;
        } else {
            let requested = spec.cluster_ip.clone().filter(|s| !s.is_empty());
            let previous = old_spec
                .and_then(|s| s.cluster_ip.clone())
                .filter(|s| !s.is_empty());
            let ip = match (requested, previous) {
                (None, Some(prev)) => prev,
                (Some(req), Some(prev)) if req != prev => {
                    return Err(refuse(
                        "spec.clusterIP",
                        format!("cannot change from {prev} to {req}: the field is immutable"),
                    ));
                }
                (Some(req), _) if req == "None" => req,
                (Some(req), _) => {
                    let addr: Ipv4Addr = req.parse().map_err(|_| {
                        refuse("spec.clusterIP", format!("{req:?} is not an IPv4 address"))
                    })?;
                    let range: Ipv4Net = SERVICE_CIDR.parse().unwrap_or_default();
                    if !range.contains(&addr) {
                        return Err(refuse(
                            "spec.clusterIP",
                            format!("{addr} is not in the service range {SERVICE_CIDR}"),
                        ));
                    }
                    if let Some(owner) = self.cluster_ips.get(&addr).filter(|o| *o != key) {
                        return Err(refuse(
                            "spec.clusterIP",
                            format!("{addr} is already allocated to {owner}"),
                        ));
                    }
                    if current.is_none() {
                        self.allocated = true;
                    }
                    req
                }
                (None, None) => {
                    let ip = self.next_cluster_ip(&what)?;
                    self.allocated = true;
                    ip.to_string()
                }
            };
            if ip != "None" {
                if let Ok(addr) = ip.parse() {
                    self.cluster_ips.insert(addr, key.clone());
                }
                spec.cluster_ips = Some(vec![ip.clone()]);
            } else {
                spec.cluster_ips = Some(vec![ip.clone()]);
            }
            spec.cluster_ip = Some(ip);
        }

        // === NodePorts ===
        let wants_node_ports = svc_type == "NodePort" || svc_type == "LoadBalancer";
        for port in spec.ports.iter_mut().flatten() {
            if !wants_node_ports {
                port.node_port = None;
                continue;
            }
            let proto = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let previous = old_spec
                .and_then(|s| s.ports.as_ref())
                .and_then(|ports| {
                    ports.iter().find(|p| {
                        p.port == port.port && p.protocol.as_deref().unwrap_or("TCP") == proto
                    })
                })
                .and_then(|p| p.node_port);
            let np = match port.node_port.or(previous) {
                Some(np) => {
                    if !Self::free_for(&self.node_ports, &(np, proto.clone()), key) {
                        let owner = &self.node_ports[&(np, proto.clone())];
                        return Err(refuse(
                            "spec.ports.nodePort",
                            format!("{np}/{proto} is already allocated to {owner}"),
                        ));
                    }
                    np
                }
                None => {
                    let np = NODE_PORT_RANGE
                        .clone()
                        .find(|np| {
                            !self.node_ports.contains_key(&(*np, proto.clone()))
                                && !self.health_ports.contains_key(np)
                        })
                        .ok_or_else(|| {
                            ClientError::Refused(format!("{what}: no NodePort left in the range"))
                        })?;
                    self.allocated = true;
                    np
                }
            };
            self.node_ports.insert((np, proto), key.clone());
            port.node_port = Some(np);
        }

        // === healthCheckNodePort ===
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        if svc_type == "LoadBalancer" && local {
            let previous = old_spec.and_then(|s| s.health_check_node_port);
            let hp = match spec.health_check_node_port.or(previous) {
                Some(hp) => hp,
                None => {
                    let hp = NODE_PORT_RANGE
                        .clone()
                        .find(|p| {
                            !self.health_ports.contains_key(p)
                                && !self.node_ports.keys().any(|(np, _)| np == p)
                        })
                        .ok_or_else(|| {
                            ClientError::Refused(format!("{what}: no NodePort left in the range"))
                        })?;
                    self.allocated = true;
                    hp
                }
            };
            self.health_ports.insert(hp, key.clone());
            spec.health_check_node_port = Some(hp);
        } else {
            spec.health_check_node_port = None;
        }

        // === LoadBalancer address ===
        let requested_lb = spec.load_balancer_ip.clone().filter(|s| !s.is_empty());
        let status = svc.status.get_or_insert_with(ServiceStatus::default);
        let ingress_now: Vec<String> = status
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.ingress.as_ref())
            .map(|i| i.iter().filter_map(|x| x.ip.clone()).collect())
            .unwrap_or_default();
        if svc_type == "LoadBalancer" {
            let keep = ingress_now
                .first()
                .filter(|ip| requested_lb.as_ref().is_none_or(|r| r == *ip))
                .cloned();
            let ip = match (keep, requested_lb) {
                (Some(ip), _) => Some(ip),
                (None, Some(req)) => {
                    let addr: IpAddr = req.parse().map_err(|_| {
                        refuse(
                            "spec.loadBalancerIP",
                            format!("{req:?} is not an IP address"),
                        )
                    })?;
                    if let Some(owner) = self.lb_ips.get(&addr).filter(|o| *o != key) {
                        return Err(refuse(
                            "spec.loadBalancerIP",
                            format!("{addr} is already allocated to {owner}"),
                        ));
                    }
                    self.allocated = true;
                    Some(req)
                }
                (None, None) => {
                    let next = self.next_lb_ip();
                    if next.is_some() {
                        self.allocated = true;
                    }
                    next.map(|ip| ip.to_string())
                }
            };
            if let Some(ip) = ip {
                if let Ok(addr) = ip.parse() {
                    self.lb_ips.insert(addr, key.clone());
                }
                status.load_balancer = Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        ip: Some(ip),
                        ip_mode: Some("VIP".into()),
                        ..Default::default()
                    }]),
                });
            }
        } else if !ingress_now.is_empty() {
            status.load_balancer = Some(LoadBalancerStatus::default());
        }
        if svc
            .status
            .as_ref()
            .is_some_and(|s| *s == ServiceStatus::default())
        {
            svc.status = None;
        }

        let mut out =
            serde_json::to_value(&svc).map_err(|e| ClientError::Refused(format!("{what}: {e}")))?;
        // k8s-openapi writes apiVersion and kind itself; keep what the rest of the pipeline uses.
        if let (Some(map), Some(orig)) = (out.as_object_mut(), value.as_object()) {
            for k in ["apiVersion", "kind"] {
                if let Some(v) = orig.get(k) {
                    map.insert(k.into(), v.clone());
                }
            }
        }
        *value = out;
        Ok(())
    }

    fn next_cluster_ip(&mut self, what: &str) -> Result<Ipv4Addr, ClientError> {
        let range: Ipv4Net = SERVICE_CIDR.parse().unwrap_or_default();
        let base = u32::from(range.network());
        let size = 1u32 << (32 - range.prefix_len());
        let start = self
            .cluster_ip_cursor
            .clamp(FIRST_AUTOMATIC_OFFSET, size - 1);
        // From the cursor to the end, then from the first automatic address to the cursor: every
        // candidate is looked at once, so "full" is still only said when it is.
        let offset = (start..size - 1)
            .chain(FIRST_AUTOMATIC_OFFSET..start)
            .find(|offset| {
                !self
                    .cluster_ips
                    .contains_key(&Ipv4Addr::from(base + offset))
            })
            .ok_or_else(|| {
                ClientError::Refused(format!("{what}: the service range {SERVICE_CIDR} is full"))
            })?;
        self.cluster_ip_cursor = offset + 1;
        Ok(Ipv4Addr::from(base + offset))
    }

    fn next_lb_ip(&self) -> Option<Ipv4Addr> {
        self.lb_pools.iter().find_map(|pool| {
            pool.hosts()
                .find(|ip| !self.lb_ips.contains_key(&IpAddr::V4(*ip)))
        })
    }

    /// The lock update to add to the commit when something new was allocated.
    pub fn lock_op(&self) -> Option<Op> {
        if !self.allocated {
            return None;
        }
        let key = Key::new(Kind::ConfigMap, Some(LOCK_NAMESPACE), LOCK_NAME);
        let generation = self
            .lock
            .as_ref()
            .and_then(|l| l.value["data"]["generation"].as_str()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        let value = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": LOCK_NAME,
                "namespace": LOCK_NAMESPACE,
                "annotations": {
                    "margay.dev/purpose": "serialises Service address and port allocation; do not edit"
                }
            },
            "data": {"generation": generation.to_string()}
        });
        Some(match &self.lock {
            Some(l) => Op::Update {
                key,
                value,
                expected: Some(l.revision),
            },
            None => Op::Create { key, value },
        })
    }
}

/// When an update changes a Service's type, drops the fields the old type allocated and the new
/// one forbids, if the update left them as they were (kube-apiserver's `dropTypeDependentFields`):
/// `kubectl patch svc web -p '{"spec":{"type":"ClusterIP"}}'` just works.
pub fn drop_type_dependent_fields(old: &Value, new: &mut Value) {
    let old_type = old["spec"]["type"].as_str().unwrap_or("ClusterIP");
    let new_type = new["spec"]["type"]
        .as_str()
        .unwrap_or("ClusterIP")
        .to_owned();
    if old_type == new_type {
        return;
    }
    let node_ports_allowed = new_type == "NodePort" || new_type == "LoadBalancer";
    let old_ports = old["spec"]["ports"].as_array().cloned().unwrap_or_default();
    if let Some(ports) = new["spec"]["ports"].as_array_mut() {
        for port in ports.iter_mut() {
            let unchanged = old_ports
                .iter()
                .any(|o| o["port"] == port["port"] && o["nodePort"] == port["nodePort"]);
            if !node_ports_allowed
                && unchanged
                && let Some(map) = port.as_object_mut()
            {
                map.remove("nodePort");
            }
        }
    }
    let has_external_ips = new["spec"]["externalIPs"]
        .as_array()
        .is_some_and(|ips| !ips.is_empty());
    if !node_ports_allowed
        && !has_external_ips
        && new["spec"]["externalTrafficPolicy"] == old["spec"]["externalTrafficPolicy"]
        && let Some(spec) = new["spec"].as_object_mut()
    {
        spec.remove("externalTrafficPolicy");
    }
    if new_type != "LoadBalancer"
        && new["spec"]["healthCheckNodePort"] == old["spec"]["healthCheckNodePort"]
        && let Some(spec) = new["spec"].as_object_mut()
    {
        spec.remove("healthCheckNodePort");
    }
}
