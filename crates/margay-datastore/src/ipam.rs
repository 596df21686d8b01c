//! Pod address management as Calico's IPAM does it, recorded the way Calico records it: each node
//! claims blocks (`blockSize`, /26 by default) of an IP pool through a BlockAffinity, and hands
//! out the addresses of its blocks to pods, each allocation tagged with a handle (the pod) and
//! attributes (namespace, node, pod).
//!
//! Every change is a compare-and-swap through the validating [`Client`], so concurrent
//! assignments (several pods starting at once, on one node or many) never hand out one address
//! twice; a lost race re-reads and retries.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use margay_api::calico::ipam::{IPAMBlockSpec, affinity_name, block_name};
use margay_api::calico::ippool::AllowedUse;
use margay_api::selector::Selector;
use margay_api::{Kind, Resource};
use serde_json::{Value, json};

use crate::backend::{Error, Key, Stored};
use crate::client::{Client, ClientError, WriteMode};

/// How many times a claim of a new block is retried when other nodes claim at the same time.
const CLAIM_ATTEMPTS: usize = 16;

/// An address handed to a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub ip: Ipv4Addr,
    pub block: Ipv4Net,
}

/// Assigns an address to `handle` (Calico uses `k8s-pod-network.<container id>`; any unique
/// string will do) on `node`, from the node's blocks, claiming a new block from a matching pool
/// when they are full. `node_labels` are matched against pools' `nodeSelector`.
pub async fn assign(
    client: &Client,
    node: &str,
    node_labels: &BTreeMap<String, String>,
    handle: &str,
    attributes: BTreeMap<String, String>,
) -> Result<Assignment, ClientError> {
    for _ in 0..CLAIM_ATTEMPTS {
        for block in node_blocks(client, node).await? {
            if let Some(a) = take_from_block(client, &block.key, handle, &attributes).await? {
                return Ok(a);
            }
        }
        claim_block(client, node, node_labels).await?;
    }
    Err(ClientError::Refused(format!(
        "could not assign an address on node {node}: the pools stayed contended"
    )))
}

/// Releases every address held by `handle`. Blocks stay affine to their node, as in Calico.
pub async fn release(client: &Client, handle: &str) -> Result<Vec<Ipv4Addr>, ClientError> {
    let mut freed = Vec::new();
    let blocks = client.list(Kind::IPAMBlock, None).await?;
    for block in blocks.items {
        let holds = block.value["spec"]["attributes"]
            .as_array()
            .is_some_and(|attrs| attrs.iter().any(|a| a["handle_id"] == handle));
        if !holds {
            continue;
        }
        let mut released = Vec::new();
        client
            .modify(&block.key, |current| {
                let mut spec = spec_of(current)?;
                released.clear();
                for (ordinal, slot) in spec.allocations.iter_mut().enumerate() {
                    let mine = slot.is_some_and(|attr| {
                        spec.attributes
                            .get(attr as usize)
                            .and_then(|a| a.handle_id.as_deref())
                            == Some(handle)
                    });
                    if mine {
                        *slot = None;
                        spec.unallocated.push(ordinal as u32);
                        released.push(ordinal as u32);
                    }
                }
                compact_attributes(&mut spec);
                with_spec(current, &spec)
            })
            .await?;
        let spec = spec_of(&block.value)?;
        freed.extend(released.iter().filter_map(|o| spec.address(*o)));
    }
    Ok(freed)
}

/// Removes a node's blocks and affinities (when the node is deleted). Addresses still allocated
/// in them are released with them.
pub async fn release_node(client: &Client, node: &str) -> Result<(), ClientError> {
    let mut keys = Vec::new();
    for block in node_blocks(client, node).await? {
        keys.push((block.key, None));
    }
    let affinities = client.list(Kind::BlockAffinity, None).await?;
    for a in affinities.items {
        if a.value["spec"]["node"] == node {
            keys.push((a.key, None));
        }
    }
    client.delete(keys, true).await?;
    Ok(())
}

/// The CIDRs of the blocks affine to `node`: its pod CIDRs.
pub async fn node_cidrs(client: &Client, node: &str) -> Result<Vec<Ipv4Net>, ClientError> {
    Ok(node_blocks(client, node)
        .await?
        .iter()
        .filter_map(|b| b.value["spec"]["cidr"].as_str()?.parse().ok())
        .collect())
}

async fn node_blocks(client: &Client, node: &str) -> Result<Vec<Stored>, ClientError> {
    let affinity = format!("host:{node}");
    let mut blocks: Vec<Stored> = client
        .list(Kind::IPAMBlock, None)
        .await?
        .items
        .into_iter()
        .filter(|b| b.value["spec"]["affinity"] == affinity.as_str())
        .collect();
    blocks.sort_by_key(|b| {
        b.value["spec"]["cidr"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    });
    Ok(blocks)
}

async fn take_from_block(
    client: &Client,
    key: &Key,
    handle: &str,
    attributes: &BTreeMap<String, String>,
) -> Result<Option<Assignment>, ClientError> {
    let mut taken = None;
    let result = client
        .modify(key, |current| {
            let mut spec = spec_of(current)?;
            taken = None;
            let Some(ordinal) = spec.unallocated.first().copied() else {
                // Full: leave it unchanged (a no-op write) and try the next block.
                return Ok(current.clone());
            };
            spec.unallocated.remove(0);
            let attr_index = spec.attributes.len() as u32;
            spec.attributes
                .push(margay_api::calico::ipam::AllocationAttribute {
                    handle_id: Some(handle.to_owned()),
                    secondary: attributes.clone(),
                });
            spec.allocations[ordinal as usize] = Some(attr_index);
            taken = spec.address(ordinal).zip(block_net(&spec));
            with_spec(current, &spec)
        })
        .await;
    match result {
        Ok(_) => Ok(taken.map(|(ip, block)| Assignment { ip, block })),
        // The block was released (its node deleted) between listing and taking.
        Err(ClientError::Store(Error::NotFound(_))) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Claims the first free block of a pool that serves `node`: a BlockAffinity and an empty
/// IPAMBlock created in one commit (so two nodes racing for one block cannot both win).
async fn claim_block(
    client: &Client,
    node: &str,
    node_labels: &BTreeMap<String, String>,
) -> Result<(), ClientError> {
    let pools = client.list(Kind::IPPool, None).await?;
    let blocks = client.list(Kind::IPAMBlock, None).await?;
    // Another assignment on this node may have claimed a block since our caller looked: use it
    // rather than claiming one more.
    let affinity = format!("host:{node}");
    let has_room = blocks.items.iter().any(|b| {
        b.value["spec"]["affinity"] == affinity.as_str()
            && b.value["spec"]["unallocated"]
                .as_array()
                .is_some_and(|u| !u.is_empty())
    });
    if has_room {
        return Ok(());
    }
    let taken: std::collections::HashSet<String> = blocks
        .items
        .iter()
        .filter_map(|b| b.value["spec"]["cidr"].as_str().map(str::to_owned))
        .collect();
    for pool in pools.items {
        let Ok(Resource::IPPool(pool)) = Resource::from_value(pool.value) else {
            continue;
        };
        let spec = &pool.spec;
        let selected = spec
            .node_selector
            .as_deref()
            .map(Selector::parse)
            .transpose()
            .ok()
            .flatten()
            .is_none_or(|s| s.matches(node_labels));
        if spec.disabled == Some(true) || !spec.allows(AllowedUse::Workload) || !selected {
            continue;
        }
        let Some(ipnet::IpNet::V4(cidr)) = spec.cidr.as_ref().map(|c| c.net()) else {
            continue;
        };
        let block_size = spec.block_size.unwrap_or(26);
        let Ok(subnets) = cidr.subnets(block_size) else {
            continue;
        };
        let Some(free) = subnets
            .into_iter()
            .find(|b| !taken.contains(&b.to_string()))
        else {
            continue;
        };
        let manifests = vec![
            json!({
                "apiVersion": "crd.projectcalico.org/v1",
                "kind": "BlockAffinity",
                "metadata": {"name": affinity_name(node, &free)},
                "spec": {"cidr": free.to_string(), "node": node, "state": "confirmed", "deleted": "false"}
            }),
            json!({
                "apiVersion": "crd.projectcalico.org/v1",
                "kind": "IPAMBlock",
                "metadata": {"name": block_name(&free)},
                "spec": serde_json::to_value(IPAMBlockSpec::empty(free, node)).unwrap_or(Value::Null)
            }),
        ];
        return match client.write(manifests, "default", WriteMode::Create).await {
            // Another node took this block first; the caller retries with a fresh view.
            Ok(_) | Err(ClientError::Store(Error::AlreadyExists(_))) => Ok(()),
            Err(e) => Err(e),
        };
    }
    Err(ClientError::Refused(format!(
        "no IP pool has a free block for node {node} (pools must be enabled, allow Workload, and select the node)"
    )))
}

fn spec_of(value: &Value) -> Result<IPAMBlockSpec, ClientError> {
    serde_json::from_value(value["spec"].clone())
        .map_err(|e| ClientError::Refused(format!("a stored IPAMBlock is unreadable: {e}")))
}

fn with_spec(current: &Value, spec: &IPAMBlockSpec) -> Result<Value, ClientError> {
    let mut next = current.clone();
    next["spec"] = serde_json::to_value(spec)
        .map_err(|e| ClientError::Refused(format!("cannot write an IPAMBlock: {e}")))?;
    Ok(next)
}

fn block_net(spec: &IPAMBlockSpec) -> Option<Ipv4Net> {
    match spec.cidr.as_ref()?.net() {
        ipnet::IpNet::V4(n) => Some(n),
        ipnet::IpNet::V6(_) => None,
    }
}

/// Drops attributes no allocation refers to and renumbers the rest, so that blocks do not grow
/// with churn.
fn compact_attributes(spec: &mut IPAMBlockSpec) {
    let mut remap = vec![None; spec.attributes.len()];
    let mut kept = Vec::new();
    for slot in spec.allocations.iter_mut().flatten() {
        let old = *slot as usize;
        let new = *remap[old].get_or_insert_with(|| {
            kept.push(spec.attributes[old].clone());
            (kept.len() - 1) as u32
        });
        *slot = new;
    }
    spec.attributes = kept;
}
