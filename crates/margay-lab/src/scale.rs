//! Many Services at once, for scale tests and benchmarks: selectorless Services, each with one
//! EndpointSlice naming the endpoints given, written through the validating client in atomic
//! batches ([`margay_datastore::Client::write_in_batches`]), and removed the same way.
//!
//! Selectorless Services with hand-written EndpointSlices are what Kubernetes offers for
//! endpoints it does not manage; the lab's EndpointSlice controller leaves them alone (they do not
//! carry its `managed-by` label), so the Services' endpoints are exactly what the caller asked
//! for, and a bulk load costs no controller work.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use margay_api::Kind;
use margay_datastore::{Client, Key, Revision, WriteMode};
use serde_json::{Value, json};

use crate::Lab;
use crate::controller::agents;

/// Objects per commit: SQLite takes this many in one transaction in well under a second; etcd
/// gets smaller commits ([`Client::commit_batch`]).
pub const BATCH: usize = 5_000;

/// What to create: `count` Services `<prefix>-<i>` in `namespace`, port `port` to
/// `target_port` on every one of `endpoints`.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    pub namespace: String,
    pub prefix: String,
    pub count: usize,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServiceSet {
    /// The name of Service number `i` (0-based); the last one added is `count - 1`.
    pub fn name(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// The Namespace, then each Service followed by its EndpointSlice.
    pub fn manifests(&self) -> Vec<Value> {
        let mut out = Vec::with_capacity(2 * self.count + 1);
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": self.namespace}}));
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
            .collect();
        for i in 0..self.count {
            let name = self.name(i);
            out.push(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": {"ports": [{"name": "tcp", "port": self.port, "targetPort": self.target_port}]}
            }));
            out.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-bulk"), "namespace": self.namespace,
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "tcp", "port": self.target_port, "protocol": "TCP"}]
            }));
        }
        out
    }

    /// Writes the set (applying: an existing set is updated in place); returns the store's
    /// revision after the last batch, for [`wait_until_programmed`].
    pub async fn create(&self, client: &Client) -> Result<Revision> {
        client
            .write_in_batches(self.manifests(), &self.namespace, WriteMode::Apply, BATCH)
            .await
            .with_context(|| {
                format!(
                    "cannot create {} Services in {}",
                    self.count, self.namespace
                )
            })?;
        Ok(client.store().revision().await?)
    }

    /// Deletes every Service and EndpointSlice of the namespace (and the namespace), in batches.
    pub async fn delete_all(client: &Client, namespace: &str) -> Result<Revision> {
        let mut keys: Vec<(Key, Option<u64>)> = Vec::new();
        for kind in [Kind::EndpointSlice, Kind::Service] {
            keys.extend(
                client
                    .list(kind, Some(namespace))
                    .await?
                    .items
                    .into_iter()
                    .map(|s| (s.key, None)),
            );
        }
        for batch in keys.chunks(client.commit_batch(BATCH)) {
            client.delete(batch.to_vec(), true).await?;
        }
        client
            .delete(
                vec![(Key::new(Kind::Namespace, None, namespace), None)],
                true,
            )
            .await?;
        Ok(client.store().revision().await?)
    }
}

/// The ClusterIP the registry gave a Service.
pub async fn cluster_ip(client: &Client, namespace: &str, name: &str) -> Result<Ipv4Addr> {
    let svc = client
        .get(&Key::new(Kind::Service, Some(namespace), name))
        .await?;
    svc.value["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("Service {namespace}/{name} has no ClusterIP"))
}

/// Waits until every node's agent reports `revision` programmed (its status file, polled every
/// few milliseconds); returns when that was seen.
pub fn wait_until_programmed(
    lab: &Lab,
    nodes: &[String],
    revision: Revision,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let behind: Vec<&String> = nodes
            .iter()
            .filter(|node| {
                !agents::read_status(lab, node).is_some_and(|s| {
                    s["datastore"] == "InSync"
                        && s["syncedRevision"].as_u64().unwrap_or(0) >= revision
                        && s["lastError"].is_null()
                })
            })
            .collect();
        if behind.is_empty() {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            let why: Vec<String> = behind
                .iter()
                .map(|n| {
                    let s = agents::read_status(lab, n).unwrap_or(Value::Null);
                    format!(
                        "{n} (revision {}, error {})",
                        s["syncedRevision"],
                        s["lastError"].as_str().unwrap_or("none")
                    )
                })
                .collect();
            bail!(
                "the agents did not program revision {revision} within {timeout:?}: {}; see {}",
                why.join(", "),
                lab.logs_dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
