//! Deployments to Pods: keep `spec.replicas` Pods of the current template, replace Pods of an
//! older template (a `rollout restart` changes the template through an annotation, as kubectl
//! does), and report the Deployment's status.
//!
//! Pods are not removed here: they are marked for deletion (`metadata.deletionTimestamp`), and the
//! node that runs them stops them and removes the object, as a kubelet does. Until then they are
//! terminating, which EndpointSlices report.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::short_hash;

/// The label carrying the template's hash, as Kubernetes' ReplicaSets set it.
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
/// The annotation `rollout restart` sets on the template.
pub const RESTARTED_AT_ANNOTATION: &str = "kubectl.kubernetes.io/restartedAt";

/// What to do for one Deployment.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// New Pods, ready to be written (their node is chosen by the caller).
    pub create: Vec<Pod>,
    /// Names of Pods to mark for deletion.
    pub delete: Vec<String>,
    /// The Deployment's status after this plan.
    pub status: DeploymentStatus,
}

/// The hash of a Deployment's Pod template.
pub fn template_hash(deployment: &Deployment) -> String {
    let template = deployment
        .spec
        .as_ref()
        .map(|s| serde_json::to_string(&s.template).unwrap_or_default())
        .unwrap_or_default();
    short_hash(&template, 10)
}

/// Whether `pod` belongs to `deployment`.
pub fn owns(deployment: &Deployment, pod: &Pod) -> bool {
    pod.metadata.namespace == deployment.metadata.namespace
        && pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "Deployment" && Some(&o.name) == deployment.metadata.name.as_ref())
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Plans one Deployment against the Pods of its namespace. `suffix` makes the random part of new
/// Pod names (injected so tests are deterministic).
pub fn plan(deployment: &Deployment, pods: &[Pod], mut suffix: impl FnMut() -> String) -> Plan {
    let mut out = Plan::default();
    let Some(spec) = &deployment.spec else {
        return out;
    };
    let name = deployment.metadata.name.clone().unwrap_or_default();
    let hash = template_hash(deployment);
    let desired = spec.replicas.unwrap_or(1).max(0) as usize;
    let mine: Vec<&Pod> = pods
        .iter()
        .filter(|p| owns(deployment, p) && p.metadata.deletion_timestamp.is_none())
        .collect();
    let (current, old): (Vec<&Pod>, Vec<&Pod>) = mine.iter().partition(|p| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(TEMPLATE_HASH_LABEL))
            == Some(&hash)
    });
    // Pods of an older template go; the newest of the current ones go when there are too many.
    out.delete
        .extend(old.iter().filter_map(|p| p.metadata.name.clone()));
    let mut current_sorted = current.clone();
    current_sorted.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
    for extra in current_sorted.iter().skip(desired) {
        out.delete.extend(extra.metadata.name.clone());
    }
    let mut labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(TEMPLATE_HASH_LABEL.into(), hash.clone());
    for _ in current.len()..desired {
        out.create.push(Pod {
            metadata: ObjectMeta {
                name: Some(format!("{name}-{hash}-{}", suffix())),
                namespace: deployment.metadata.namespace.clone(),
                labels: Some(labels.clone()),
                annotations: spec
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.annotations.clone()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: name.clone(),
                    uid: deployment.metadata.uid.clone().unwrap_or_default(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            spec: spec.template.spec.clone(),
            status: None,
        });
    }
    let kept = current.len().min(desired);
    let ready = current_sorted
        .iter()
        .take(desired)
        .filter(|p| is_ready(p))
        .count() as i32;
    out.status = DeploymentStatus {
        observed_generation: deployment.metadata.generation,
        replicas: Some((kept + out.create.len()) as i32),
        updated_replicas: Some((kept + out.create.len()) as i32),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        ..DeploymentStatus::default()
    };
    out
}

/// Counts Pods per node, for placement.
pub fn pods_per_node(nodes: &[String], pods: &[Pod]) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = nodes.iter().map(|n| (n.clone(), 0)).collect();
    for pod in pods {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref())
            && let Some(c) = counts.get_mut(node)
        {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(replicas: i32, restarted: Option<&str>) -> Deployment {
        let mut annotations = serde_json::Map::new();
        if let Some(r) = restarted {
            annotations.insert(RESTARTED_AT_ANNOTATION.into(), r.into());
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "customer", "namespace": "yaobank", "uid": "u1"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "customer"}},
                "template": {"metadata": {"labels": {"app": "customer"}, "annotations": annotations},
                    "spec": {"containers": [{"name": "customer", "image": "spikecurtis/yaobank-customer"}]}}}
        }))
        .unwrap()
    }

    fn counter() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("p{n}")
        }
    }

    #[test]
    fn scales_up_then_keeps_then_replaces_on_restart() {
        let d = deployment(2, None);
        let plan1 = plan(&d, &[], counter());
        assert_eq!(plan1.create.len(), 2);
        assert!(plan1.delete.is_empty());
        let pod = &plan1.create[0];
        assert!(pod.metadata.name.as_ref().unwrap().starts_with("customer-"));
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["app"], "customer");
        assert!(owns(&d, pod));
        // With its Pods in place, nothing to do.
        let plan2 = plan(&d, &plan1.create, counter());
        assert_eq!(
            plan2,
            Plan {
                status: plan2.status.clone(),
                ..Plan::default()
            }
        );
        // A restart changes the template: two new Pods, the two old ones go.
        let restarted = deployment(2, Some("2026-11-26T10:00:00Z"));
        let plan3 = plan(&restarted, &plan1.create, counter());
        assert_eq!(plan3.create.len(), 2);
        assert_eq!(plan3.delete.len(), 2);
        // Scaling down removes the extras.
        let plan4 = plan(&deployment(1, None), &plan1.create, counter());
        assert_eq!(plan4.delete.len(), 1);
        assert!(plan4.create.is_empty());
    }

    #[test]
    fn terminating_pods_are_replaced() {
        let d = deployment(1, None);
        let mut pods = plan(&d, &[], counter()).create;
        pods[0].metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let p = plan(&d, &pods, counter());
        assert_eq!(p.create.len(), 1);
        assert!(p.delete.is_empty());
    }
}
