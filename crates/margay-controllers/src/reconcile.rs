//! The reconcile functions: read the datastore through the validating client, compute with the
//! pure functions of this crate, and write only the difference.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use margay_api::Kind;
use margay_datastore::{Client, ClientError, Error, Key, WriteMode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{deployments, endpoints, placement};

/// What a reconcile changed, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
    }
}

async fn list<T: DeserializeOwned>(client: &Client, kind: Kind) -> Result<Vec<T>, ClientError> {
    Ok(client
        .list(kind, None)
        .await?
        .items
        .into_iter()
        .filter_map(|s| serde_json::from_value(s.value).ok())
        .collect())
}

fn to_manifest<T: serde::Serialize>(kind: Kind, object: &T) -> Value {
    let mut v = serde_json::to_value(object).unwrap_or(Value::Null);
    if let Some(map) = v.as_object_mut() {
        map.insert("apiVersion".into(), kind.api_version().into());
        map.insert("kind".into(), kind.as_str().into());
    }
    v
}

/// Brings every managed EndpointSlice in line with Services and Pods.
pub async fn endpoint_slices(client: &Client) -> Result<Changes, ClientError> {
    let services: Vec<Service> = list(client, Kind::Service).await?;
    let pods: Vec<Pod> = list(client, Kind::Pod).await?;
    let existing: Vec<EndpointSlice> = list(client, Kind::EndpointSlice).await?;
    let desired = endpoints::desired_slices(&services, &pods);
    let mut changes = Changes::default();
    let by_key = |s: &EndpointSlice| {
        (
            s.metadata.namespace.clone().unwrap_or_default(),
            s.metadata.name.clone().unwrap_or_default(),
        )
    };
    let existing_map: BTreeMap<_, _> = existing
        .iter()
        .filter(|s| endpoints::is_managed(s))
        .map(|s| (by_key(s), s))
        .collect();
    let mut writes = Vec::new();
    for slice in &desired {
        let key = by_key(slice);
        match existing_map.get(&key) {
            Some(current)
                if current.endpoints == slice.endpoints
                    && current.ports == slice.ports
                    && current.metadata.labels == slice.metadata.labels => {}
            Some(_) => {
                changes.updated.push(format!("{}/{}", key.0, key.1));
                writes.push(to_manifest(Kind::EndpointSlice, slice));
            }
            None => {
                changes.created.push(format!("{}/{}", key.0, key.1));
                writes.push(to_manifest(Kind::EndpointSlice, slice));
            }
        }
    }
    if !writes.is_empty() {
        client.write(writes, "default", WriteMode::Apply).await?;
    }
    let wanted: HashSet<_> = desired.iter().map(by_key).collect();
    let stale: Vec<(Key, Option<u64>)> = existing_map
        .keys()
        .filter(|k| !wanted.contains(*k))
        .map(|(ns, name)| (Key::new(Kind::EndpointSlice, Some(ns), name), None))
        .collect();
    if !stale.is_empty() {
        changes.deleted.extend(
            stale
                .iter()
                .map(|(k, _)| format!("{}/{}", k.namespace.clone().unwrap_or_default(), k.name)),
        );
        client.delete(stale, true).await?;
    }
    Ok(changes)
}

/// Brings every Deployment's Pods in line with it: creates missing Pods on the nodes `nodes`
/// (placement spreads them), marks Pods of older templates and extras for deletion, and updates
/// each Deployment's status. `suffix` makes the random part of Pod names.
pub async fn deployments(
    client: &Client,
    nodes: &[String],
    mut suffix: impl FnMut() -> String,
) -> Result<Changes, ClientError> {
    let deployments: Vec<Deployment> = list(client, Kind::Deployment).await?;
    let mut pods: Vec<Pod> = list(client, Kind::Pod).await?;
    let mut changes = Changes::default();
    for d in &deployments {
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let name = d.metadata.name.clone().unwrap_or_default();
        let plan = deployments::plan(d, &pods, &mut suffix);
        let mut new_pods = Vec::new();
        for mut pod in plan.create {
            let live: Vec<Pod> = pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .cloned()
                .collect();
            let counts = deployments::pods_per_node(nodes, &live);
            let requested = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let Some(node) = placement::choose_node(requested.as_deref(), &counts) else {
                return Err(ClientError::Refused(format!(
                    "Deployment {ns}/{name}: no node to run its Pods on"
                )));
            };
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_name = Some(node);
            }
            changes.created.push(format!(
                "{ns}/{}",
                pod.metadata.name.clone().unwrap_or_default()
            ));
            pods.push(pod.clone());
            new_pods.push(to_manifest(Kind::Pod, &pod));
        }
        if !new_pods.is_empty() {
            client.write(new_pods, &ns, WriteMode::Create).await?;
        }
        for pod_name in &plan.delete {
            mark_for_deletion(client, &ns, pod_name).await?;
            changes.deleted.push(format!("{ns}/{pod_name}"));
        }
        let key = Key::new(Kind::Deployment, Some(&ns), &name);
        let status = serde_json::to_value(&plan.status).unwrap_or(Value::Null);
        let current_status = d
            .status
            .as_ref()
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null));
        if current_status.as_ref() != Some(&status) {
            client
                .modify(&key, |current| {
                    let mut next = current.clone();
                    next["status"] = status.clone();
                    Ok(next)
                })
                .await?;
        }
    }
    Ok(changes)
}

/// Marks a Pod as terminating (what `kubectl delete pod` starts): its node stops it and removes
/// the object. Already gone or already marked is fine.
pub async fn mark_for_deletion(
    client: &Client,
    namespace: &str,
    pod: &str,
) -> Result<(), ClientError> {
    let key = Key::new(Kind::Pod, Some(namespace), pod);
    let now = chrono_now();
    match client
        .modify(&key, |current| {
            let mut next = current.clone();
            if next["metadata"]["deletionTimestamp"].is_null() {
                next["metadata"]["deletionTimestamp"] = now.clone().into();
            }
            Ok(next)
        })
        .await
    {
        Ok(_) | Err(ClientError::Store(Error::NotFound(_))) => Ok(()),
        Err(e) => Err(e),
    }
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
