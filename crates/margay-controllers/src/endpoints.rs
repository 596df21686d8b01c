//! Services and Pods to EndpointSlices, as Kubernetes' EndpointSlice controller makes them.
//!
//! One IPv4 slice per Service with a selector (named `<service>-<hash>`, labelled with the
//! Service's name), one endpoint per Pod that matches the selector and has an address, with the
//! conditions dataplanes read:
//! - `ready`: the Pod is Ready and not terminating (or the Service publishes not-ready addresses);
//! - `serving`: the Pod is Ready, terminating or not;
//! - `terminating`: the Pod is being deleted.
//!
//! Named target ports resolve against each Pod's container ports; Pods that resolve a Service's
//! ports differently get a slice of their own, as in Kubernetes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL, short_hash};

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The port a Service port reaches on `pod`, or None when a named port does not exist there.
fn resolve_port(target: Option<&IntOrString>, service_port: i32, pod: &Pod) -> Option<i32> {
    match target {
        None => Some(service_port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

/// The EndpointSlices every selector Service should have, given all Pods.
pub fn desired_slices(services: &[Service], pods: &[Pod]) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let name = svc.metadata.name.clone().unwrap_or_default();
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
        let ports = spec.ports.clone().unwrap_or_default();
        // Pods grouped by how they resolve the Service's ports.
        let mut groups: BTreeMap<Vec<Option<i32>>, Vec<Endpoint>> = BTreeMap::new();
        let mut members: Vec<&Pod> = pods
            .iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns.as_str()) && selects(selector, p)
            })
            .collect();
        members.sort_by_key(|p| p.metadata.name.clone());
        for pod in members {
            let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                continue;
            };
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let ready = pod_ready(pod);
            let resolved: Vec<Option<i32>> = ports
                .iter()
                .map(|p| resolve_port(p.target_port.as_ref(), p.port, pod))
                .collect();
            groups.entry(resolved).or_default().push(Endpoint {
                addresses: vec![ip],
                conditions: Some(EndpointConditions {
                    ready: Some((ready && !terminating) || publish_not_ready),
                    serving: Some(ready || publish_not_ready),
                    terminating: Some(terminating),
                }),
                node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    namespace: Some(ns.clone()),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                }),
                ..Endpoint::default()
            });
        }
        if groups.is_empty() {
            // A Service with no endpoints still has a slice: empty, so dataplanes know it is
            // known and empty (and reject traffic to it).
            groups.insert(ports.iter().map(|p| Some(p.port)).collect(), Vec::new());
        }
        for (resolved, endpoints) in groups {
            let slice_ports: Vec<EndpointPort> = ports
                .iter()
                .zip(&resolved)
                .filter_map(|(p, r)| {
                    Some(EndpointPort {
                        name: Some(p.name.clone().unwrap_or_default()),
                        port: Some((*r)?),
                        protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                        app_protocol: p.app_protocol.clone(),
                    })
                })
                .collect();
            let hash = short_hash(&format!("{ns}/{name}/{resolved:?}"), 5);
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-{hash}")),
                    namespace: Some(ns.clone()),
                    labels: Some(
                        [
                            (SERVICE_NAME_LABEL.to_owned(), name.clone()),
                            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                        ]
                        .into(),
                    ),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Service".into(),
                        name: name.clone(),
                        uid: svc.metadata.uid.clone().unwrap_or_default(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]),
                    ..ObjectMeta::default()
                },
                address_type: "IPv4".into(),
                endpoints,
                ports: Some(slice_ports),
            });
        }
    }
    out
}

/// Whether a slice is ours to manage.
pub fn is_managed(slice: &EndpointSlice) -> bool {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: Option<&str>, ready: bool, terminating: bool) -> Pod {
        let mut v = json!({
            "metadata": {"name": name, "namespace": "yaobank", "labels": {"app": "customer"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        });
        if let Some(ip) = ip {
            v["status"]["podIP"] = ip.into();
        }
        if terminating {
            v["metadata"]["deletionTimestamp"] = "2026-11-26T10:00:00Z".into();
        }
        serde_json::from_value(v).unwrap()
    }

    fn service(target: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "customer", "namespace": "yaobank", "uid": "s1"},
            "spec": {"selector": {"app": "customer"}, "ports": [{"name": "web", "port": 80, "targetPort": target, "protocol": "TCP"}]}
        }))
        .unwrap()
    }

    #[test]
    fn conditions_ports_and_names() {
        let pods = vec![
            pod("a", Some("192.168.0.1"), true, false),
            pod("b", Some("192.168.0.2"), false, false),
            pod("c", Some("192.168.0.3"), true, true),
            pod("d", None, true, false),
        ];
        let slices = desired_slices(&[service(json!("http"))], &pods);
        assert_eq!(slices.len(), 1);
        let s = &slices[0];
        assert!(s.metadata.name.as_ref().unwrap().starts_with("customer-"));
        assert_eq!(
            s.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "customer"
        );
        assert_eq!(s.ports.as_ref().unwrap()[0].port, Some(8080));
        let conds: Vec<(bool, bool, bool)> = s
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
            })
            .collect();
        assert_eq!(
            conds,
            vec![
                (true, true, false),
                (false, false, false),
                (false, true, true)
            ]
        );
        // Stable across calls.
        assert_eq!(desired_slices(&[service(json!("http"))], &pods), slices);
    }

    #[test]
    fn empty_services_still_have_a_slice() {
        let slices = desired_slices(&[service(json!(80))], &[]);
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints.is_empty());
        assert_eq!(slices[0].ports.as_ref().unwrap()[0].port, Some(80));
    }
}
