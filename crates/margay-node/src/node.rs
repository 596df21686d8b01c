//! The agent's Node resource: it says where the node is (addresses), what it owns (pod CIDRs)
//! and what it runs (`status.dataplane`).

use std::net::Ipv4Addr;

use margay_api::Kind;
use margay_datastore::{Client, ClientError, Error, Key, WriteMode};
use serde_json::{Value, json};

/// Creates the node's Node resource, or brings an existing one's addresses up to date (keeping
/// whatever else users or other agents wrote on it: labels, WireGuard fields).
pub async fn register(
    client: &Client,
    node: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), ClientError> {
    let key = Key::new(Kind::Node, None, node);
    let addresses = json!([
        {"address": format!("{ip}/{prefix_len}"), "type": "CalicoNodeIP"},
        {"address": ip.to_string(), "type": "InternalIP"},
    ]);
    match client.get(&key).await {
        Ok(_) => {
            client
                .modify(&key, |current| {
                    let mut next = current.clone();
                    next["spec"]["addresses"] = addresses.clone();
                    let labels = &mut next["metadata"]["labels"];
                    if !labels.is_object() {
                        *labels = json!({});
                    }
                    labels["kubernetes.io/hostname"] = node.into();
                    Ok(next)
                })
                .await?;
        }
        Err(ClientError::Store(Error::NotFound(_))) => {
            let manifest = json!({
                "apiVersion": "projectcalico.org/v3",
                "kind": "Node",
                "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
                "spec": {
                    "addresses": addresses,
                    "orchRefs": [{"nodeName": node, "orchestrator": "k8s"}]
                }
            });
            match client
                .write(vec![manifest], "default", WriteMode::Create)
                .await
            {
                Ok(_) | Err(ClientError::Store(Error::AlreadyExists(_))) => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Writes `status` fields (merged over what is there) if they differ from the stored ones.
/// Returns whether anything was written.
pub async fn update_status(
    client: &Client,
    node: &str,
    status: Value,
) -> Result<bool, ClientError> {
    let key = Key::new(Kind::Node, None, node);
    let current = client.get(&key).await?;
    let mut merged = current.value["status"].clone();
    if !merged.is_object() {
        merged = json!({});
    }
    if let (Some(m), Some(s)) = (merged.as_object_mut(), status.as_object()) {
        for (k, v) in s {
            if v.is_null() {
                m.remove(k);
            } else {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    if merged == current.value["status"] {
        return Ok(false);
    }
    client
        .modify(&key, |current| {
            let mut next = current.clone();
            next["status"] = merged.clone();
            Ok(next)
        })
        .await?;
    Ok(true)
}
