//! What a kubelet and Calico's CNI plugin do on each node, for the lab: a Pod assigned to a node
//! gets an address from the node's IPAM blocks, a network namespace wired to the node with a
//! Calico-named veth, the cluster's resolv.conf, and its containers' processes (in the pod's
//! namespace and the node's cgroup); it becomes Ready when its ports answer. A Pod marked for
//! deletion has its processes stopped, its network removed, its address released and its object
//! deleted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use margay_api::Kind;
use margay_datastore::{Client, Key, ipam};
use serde_json::{Value, json};

use crate::workloads::{PodContext, container_process, find_binary};
use crate::{Lab, SpawnOptions, Target, new_pod_netns_name};

/// Annotations recording where a Pod's network lives.
pub const NETNS_ANNOTATION: &str = "lab.margay.dev/netns";
pub const VETH_ANNOTATION: &str = "lab.margay.dev/host-veth";

/// The cluster DNS Service's address, as kubeadm clusters have it.
pub const DNS_SERVICE_IP: &str = "10.96.0.10";

/// How long a container's ports may take to answer before the Pod is reported not ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a pass changed.
#[derive(Debug, Default)]
pub struct KubeletChanges {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub failed: Vec<String>,
}

/// Calico's host-side interface name for a pod: `cali` and 11 hex digits of a hash of
/// `<namespace>.<pod>` (Calico uses SHA-1; any stable hash serves, and the name stays within
/// Linux's 15 characters).
pub fn host_veth_name(namespace: &str, pod: &str) -> String {
    let hash = margay_controllers::short_hash(&format!("{namespace}.{pod}"), 11);
    let hex: String = hash
        .bytes()
        .map(|b| char::from_digit(u32::from(b) % 16, 16).unwrap_or('0'))
        .collect();
    format!("cali{hex}")
}

fn handle(namespace: &str, pod: &str) -> String {
    format!("k8s-pod-network.{namespace}.{pod}")
}

/// Which half of a pass to run: new Pods are started before old ones are stopped, with the
/// dataplane updated in between, so a rollout never leaves a Service without endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Start,
    Stop,
}

/// One pass over the Pods of the lab's nodes.
pub async fn realize(lab: &Lab, client: &Client, pass: Pass) -> Result<KubeletChanges> {
    let nodes: Vec<String> = lab.nodes()?.into_iter().map(|n| n.name).collect();
    let mut changes = KubeletChanges::default();
    let pods = client.list(Kind::Pod, None).await?.items;
    for stored in pods {
        let pod: Pod = match serde_json::from_value(stored.value.clone()) {
            Ok(p) => p,
            Err(_) => continue,
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if !nodes.contains(&node) {
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let id = format!("{ns}/{name}");
        if pod.metadata.deletion_timestamp.is_some() {
            if pass == Pass::Stop {
                stop(lab, client, &stored.key, &stored.value).await?;
                changes.stopped.push(id);
            }
            continue;
        }
        if pass == Pass::Stop {
            continue;
        }
        let started = stored.value["status"]["podIP"].is_string();
        let failed = stored.value["status"]["phase"] == "Failed";
        if started || failed {
            continue;
        }
        match start(lab, client, &stored.key, &pod, &node).await {
            Ok(()) => changes.started.push(id),
            Err(e) => {
                let message = format!("{e:#}");
                changes.failed.push(format!("{id}: {message}"));
                client
                    .modify(&stored.key, |current| {
                        let mut next = current.clone();
                        next["status"] = json!({"phase": "Failed", "message": message});
                        Ok(next)
                    })
                    .await?;
            }
        }
    }
    Ok(changes)
}

async fn start(lab: &Lab, client: &Client, key: &Key, pod: &Pod, node: &str) -> Result<()> {
    let ns = key.namespace.clone().unwrap_or_default();
    let name = key.name.clone();
    let node_labels: BTreeMap<String, String> = client
        .get(&Key::new(Kind::Node, None, node))
        .await
        .ok()
        .and_then(|n| serde_json::from_value(n.value["metadata"]["labels"].clone()).ok())
        .unwrap_or_default();
    let attributes: BTreeMap<String, String> = [
        ("namespace".to_owned(), ns.clone()),
        ("pod".to_owned(), name.clone()),
        ("node".to_owned(), node.to_owned()),
    ]
    .into();
    let assignment = ipam::assign(client, node, &node_labels, &handle(&ns, &name), attributes)
        .await
        .with_context(|| format!("cannot assign an address to pod {ns}/{name}"))?;
    let netns = new_pod_netns_name(lab.name());
    let veth = host_veth_name(&ns, &name);
    let wired = (|| -> Result<()> {
        lab.create_pod_network(node, &netns, assignment.ip, &veth)?;
        lab.write_pod_resolv_conf(
            &netns,
            &margay_controllers::dns::resolv_conf(&ns, DNS_SERVICE_IP),
        )?;
        Ok(())
    })();
    if let Err(e) = wired {
        let _ = ipam::release(client, &handle(&ns, &name)).await;
        return Err(e);
    }
    let ctx = PodContext {
        namespace: ns.clone(),
        pod_name: name.clone(),
        pod_ip: assignment.ip.to_string(),
        node_name: node.to_owned(),
        dns_hosts_dir: dns_hosts_dir(lab),
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let launched = launch_containers(lab, &netns, &ctx, &spec);
    let (container_statuses, ports) = match launched {
        Ok(x) => x,
        Err(e) => {
            // Leave nothing behind: the pod is reported Failed, without an address.
            let _ = lab.delete_pod_network(&netns);
            let _ = ipam::release(client, &handle(&ns, &name)).await;
            return Err(e);
        }
    };
    let ready = wait_ready(lab, &netns, &ports);
    let host_ip = lab.node(node)?.ip.to_string();
    let ip = assignment.ip.to_string();
    client
        .modify(key, |current| {
            let mut next = current.clone();
            let annotations = &mut next["metadata"]["annotations"];
            if !annotations.is_object() {
                *annotations = json!({});
            }
            annotations[NETNS_ANNOTATION] = netns.clone().into();
            annotations[VETH_ANNOTATION] = veth.clone().into();
            next["status"] = json!({
                "phase": "Running",
                "hostIP": host_ip,
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now(),
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": if ready {"True"} else {"False"}},
                    {"type": "Ready", "status": if ready {"True"} else {"False"}},
                ],
                "containerStatuses": container_statuses,
            });
            Ok(next)
        })
        .await?;
    Ok(())
}

/// Container statuses, and the (port, protocol) pairs to probe for readiness.
type Launched = (Vec<Value>, Vec<(i32, String)>);

/// Starts every container of a pod; returns their statuses and the ports to probe.
fn launch_containers(
    lab: &Lab,
    netns: &str,
    ctx: &PodContext,
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> Result<Launched> {
    let (ns, name) = (&ctx.namespace, &ctx.pod_name);
    std::fs::create_dir_all(lab.logs_dir().join("pods"))?;
    let mut container_statuses = Vec::new();
    let mut ports = Vec::new();
    for container in &spec.containers {
        let process = container_process(container, ctx).map_err(anyhow::Error::msg)?;
        let mut opts = SpawnOptions::new()
            .name(format!("{ns}/{name}/{}", container.name))
            .log(pod_log_path(lab, ns, name, &container.name));
        for (k, v) in &process.env {
            opts = opts.env(k.clone(), v.clone());
        }
        lab.spawn(&Target::pod(netns.to_owned()), &process.argv, &opts)
            .with_context(|| format!("cannot start container {} of {ns}/{name}", container.name))?;
        for p in container.ports.iter().flatten() {
            ports.push((
                p.container_port,
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            ));
        }
        container_statuses.push(json!({
            "name": container.name, "image": container.image, "ready": true,
            "restartCount": 0, "started": true,
            "state": {"running": {"startedAt": now()}}
        }));
    }
    Ok((container_statuses, ports))
}

/// Waits until every TCP port of the pod accepts connections from inside the pod (UDP-only
/// ports count as ready once the process runs).
fn wait_ready(lab: &Lab, netns: &str, ports: &[(i32, String)]) -> bool {
    let probe = find_binary("margay-demo-app")
        .to_string_lossy()
        .into_owned();
    let deadline = Instant::now() + READY_TIMEOUT;
    for (port, proto) in ports {
        if proto != "TCP" {
            continue;
        }
        loop {
            let addr = format!("127.0.0.1:{port}");
            // `probe tcp` expects a server that speaks first; an accepted connection that then
            // stays silent ends in a timeout (exit 4), which still proves the port is open.
            let ok = lab
                .exec(
                    &Target::pod(netns.to_owned()),
                    &[
                        probe.as_str(),
                        "probe",
                        "tcp",
                        addr.as_str(),
                        "--timeout",
                        "200ms",
                    ],
                )
                .map(|o| matches!(o.status.code(), Some(0) | Some(4)))
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    true
}

async fn stop(lab: &Lab, client: &Client, key: &Key, value: &Value) -> Result<()> {
    let ns = key.namespace.clone().unwrap_or_default();
    if let Some(netns) = value["metadata"]["annotations"][NETNS_ANNOTATION].as_str() {
        lab.delete_pod_network(netns)
            .with_context(|| format!("cannot remove the network of pod {ns}/{}", key.name))?;
    }
    ipam::release(client, &handle(&ns, &key.name)).await?;
    client.delete(vec![(key.clone(), None)], true).await?;
    Ok(())
}

/// Where cluster DNS records are written for dnsmasq.
pub fn dns_hosts_dir(lab: &Lab) -> std::path::PathBuf {
    lab.state_dir().join("dns")
}

/// A container's log file.
pub fn pod_log_path(lab: &Lab, namespace: &str, pod: &str, container: &str) -> std::path::PathBuf {
    lab.logs_dir()
        .join("pods")
        .join(format!("{namespace}_{pod}_{container}.log"))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
