//! The lab's control plane: what the API server's controllers, the kubelets and Calico's CNI
//! plugin would do in a real cluster, run by the `margay-lab` verbs against the lab's datastore.
//!
//! Every verb that changes workloads ends in [`Cluster::converge`]: Deployments to Pods, Pods
//! started on their nodes, EndpointSlices and DNS records updated, then Pods being deleted
//! stopped, and finally a wait until every node's agent has programmed the result. So when a
//! verb returns, the dataplane already reflects it.

pub mod agents;
pub mod etcd;
pub mod kubelet;

use std::time::Duration;

use anyhow::{Context, Result};
use margay_api::Kind;
use margay_controllers::reconcile;
use margay_datastore::{Client, Key, WriteMode};
use serde_json::json;

use crate::Lab;

/// The lab annotation recording the datastore URL its agents use.
pub const DATASTORE_ANNOTATION: &str = "datastore";
/// How long `converge` waits for the agents.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A lab with its datastore.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub lab: Lab,
    pub client: Client,
    pub datastore_url: String,
}

impl Cluster {
    /// Opens the datastore of an existing lab.
    pub async fn open(name: &str) -> Result<Cluster> {
        let lab = Lab::open(name)?;
        let url = lab
            .state()?
            .annotations
            .get(DATASTORE_ANNOTATION)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| lab.default_datastore_url());
        Self::connect(lab, url).await
    }

    /// Connects to `url` for `lab`, seeding a fresh datastore.
    pub async fn connect(lab: Lab, url: String) -> Result<Cluster> {
        let store = margay_datastore::open(&url)
            .await
            .with_context(|| format!("cannot open the lab's datastore {url}"))?;
        let client = Client::new(store);
        client.bootstrap().await?;
        Ok(Cluster {
            lab,
            client,
            datastore_url: url,
        })
    }

    /// Writes what every lab cluster has: the LoadBalancer pool the router serves, the cluster
    /// DNS Deployment and its Service at 10.96.0.10.
    pub async fn install_system(&self) -> Result<()> {
        let config = self.lab.config()?;
        let manifests = vec![
            json!({
                "apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                "metadata": {"name": "loadbalancer-ipv4-ippool"},
                "spec": {"cidr": config.lb_pool.to_string(), "allowedUses": ["LoadBalancer"]}
            }),
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "coredns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    "template": {
                        "metadata": {"labels": {"k8s-app": "kube-dns"}},
                        "spec": {"containers": [{
                            "name": "coredns",
                            "image": "registry.k8s.io/coredns/coredns:v1.11.1",
                            "ports": [
                                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}
                            ]
                        }]}
                    }
                }
            }),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
                "spec": {
                    "clusterIP": kubelet::DNS_SERVICE_IP,
                    "selector": {"k8s-app": "kube-dns"},
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}
                    ]
                }
            }),
        ];
        self.client
            .write(manifests, "default", WriteMode::Apply)
            .await?;
        Ok(())
    }

    /// The lab's node names.
    pub fn node_names(&self) -> Result<Vec<String>> {
        Ok(self.lab.nodes()?.into_iter().map(|n| n.name).collect())
    }

    /// Runs the control loops until nothing changes, then waits for the agents.
    pub async fn converge(&self) -> Result<()> {
        let nodes = self.node_names()?;
        // dnsmasq watches the records directory from its start: it must exist first.
        self.write_dns_records().await?;
        let mut suffix = random_suffix;
        for _ in 0..8 {
            let d = reconcile::deployments(&self.client, &nodes, &mut suffix).await?;
            let started = kubelet::realize(&self.lab, &self.client, kubelet::Pass::Start).await?;
            for f in &started.failed {
                eprintln!("warning: pod failed to start: {f}");
            }
            let e = reconcile::endpoint_slices(&self.client).await?;
            self.write_dns_records().await?;
            let busy = !d.is_empty() || !started.started.is_empty() || !e.is_empty();
            // New endpoints are programmed before old Pods stop.
            self.wait_for_agents().await?;
            let stopped = kubelet::realize(&self.lab, &self.client, kubelet::Pass::Stop).await?;
            if !stopped.stopped.is_empty() {
                reconcile::endpoint_slices(&self.client).await?;
                self.write_dns_records().await?;
                continue;
            }
            if !busy {
                break;
            }
        }
        self.wait_for_agents().await
    }

    /// Waits until every agent has programmed the datastore as it is now.
    pub async fn wait_for_agents(&self) -> Result<()> {
        let revision = self.client.store().revision().await?;
        let nodes = self.node_names()?;
        let lab = self.lab.clone();
        tokio::task::spawn_blocking(move || {
            agents::wait_for_revision(&lab, &nodes, revision, AGENT_TIMEOUT)
        })
        .await?
    }

    /// After a node is gone: its Pods are deleted (a Deployment re-creates them elsewhere), its
    /// address blocks released and its Node resource removed, so the other agents withdraw their
    /// routes to it.
    pub async fn forget_node(&self, node: &str) -> Result<()> {
        let pods = self.client.list(Kind::Pod, None).await?;
        let keys: Vec<(Key, Option<u64>)> = pods
            .items
            .into_iter()
            .filter(|p| p.value["spec"]["nodeName"] == node)
            .map(|p| (p.key, None))
            .collect();
        self.client.delete(keys, true).await?;
        margay_datastore::ipam::release_node(&self.client, node).await?;
        self.client
            .delete(vec![(Key::new(Kind::Node, None, node), None)], true)
            .await?;
        Ok(())
    }

    /// Rewrites the cluster DNS records (dnsmasq re-reads its hosts directory on change).
    pub async fn write_dns_records(&self) -> Result<()> {
        let services = typed(&self.client, Kind::Service).await?;
        let slices = typed(&self.client, Kind::EndpointSlice).await?;
        let text = margay_controllers::dns::hosts_file(&services, &slices);
        let dir = kubelet::dns_hosts_dir(&self.lab);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("cluster.hosts");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            let tmp = dir.join(".cluster.hosts.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// Applies manifests (Namespaces, Services, Deployments, Pods, Calico resources) and
    /// converges.
    pub async fn apply(&self, manifests: Vec<serde_json::Value>, namespace: &str) -> Result<usize> {
        let written = self
            .client
            .write(manifests, namespace, WriteMode::Apply)
            .await?;
        self.converge().await?;
        Ok(written.len())
    }

    /// Marks Pods for deletion and converges (a Deployment's Pods come back with new names).
    pub async fn delete_pods(&self, namespace: &str, names: &[String]) -> Result<()> {
        for name in names {
            reconcile::mark_for_deletion(&self.client, namespace, name).await?;
        }
        self.converge().await
    }

    /// `rollout restart`: a new template annotation, so every Pod is replaced.
    pub async fn rollout_restart(&self, namespace: &str, deployment: &str) -> Result<()> {
        let key = Key::new(Kind::Deployment, Some(namespace), deployment);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        self.client
            .modify(&key, |current| {
                let mut next = current.clone();
                let template = &mut next["spec"]["template"];
                if !template["metadata"].is_object() {
                    template["metadata"] = json!({});
                }
                if !template["metadata"]["annotations"].is_object() {
                    template["metadata"]["annotations"] = json!({});
                }
                template["metadata"]["annotations"]
                    [margay_controllers::deployments::RESTARTED_AT_ANNOTATION] = now.clone().into();
                Ok(next)
            })
            .await?;
        self.converge().await
    }
}

async fn typed<T: serde::de::DeserializeOwned>(client: &Client, kind: Kind) -> Result<Vec<T>> {
    Ok(client
        .list(kind, None)
        .await?
        .items
        .into_iter()
        .filter_map(|s| serde_json::from_value(s.value).ok())
        .collect())
}

/// Five random lower-case alphanumerics, as Kubernetes' generated names end.
fn random_suffix() -> String {
    let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    margay_controllers::short_hash(&format!("{seed}/{n}"), 5)
}
