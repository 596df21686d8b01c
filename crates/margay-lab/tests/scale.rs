//! Issue 4's scale test on a real lab in BPF mode: 10,000 Services with 10 endpoints each are
//! programmed by every node's agent, a connection from a pod to the last Service added works, and
//! the programming time is printed.
//!
//! Root only; run by CI as root. The lab has a unique name and is taken down on drop.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{From, TestLab, skip_unless_root};
use margay_api::Kind;
use margay_lab::controller::Cluster;
use margay_lab::scale::{ServiceSet, cluster_ip, wait_until_programmed};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;

const BACKENDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: matrix}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: matrix}
spec:
  replicas: 10
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers: [{name: echo, image: margay/echo, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client-1, namespace: matrix}
spec:
  nodeName: node-1
  containers: [{name: sleep, image: busybox, command: [sleep, "100000"]}]
"#;

#[test]
fn ten_thousand_services_in_bpf_mode() {
    if skip_unless_root("ten_thousand_services_in_bpf_mode") {
        return;
    }
    let lab = TestLab::up("scale", &["--dataplane", "bpf"]);
    lab.apply(BACKENDS);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let cluster = runtime
        .block_on(Cluster::open(&lab.name))
        .expect("open the lab");
    let pods = runtime
        .block_on(cluster.client.list(Kind::Pod, Some("matrix")))
        .expect("pods");
    let endpoints: Vec<Ipv4Addr> = pods
        .items
        .iter()
        .filter(|p| p.value["metadata"]["labels"]["app"] == "echo")
        .filter_map(|p| p.value["status"]["podIP"].as_str()?.parse().ok())
        .collect();
    assert_eq!(endpoints.len(), ENDPOINTS, "echo pods: {endpoints:?}");
    let set = ServiceSet {
        namespace: "scale".to_owned(),
        prefix: "svc".to_owned(),
        count: SERVICES,
        port: 80,
        target_port: 8080,
        endpoints,
    };
    let started = Instant::now();
    let revision = runtime
        .block_on(set.create(&cluster.client))
        .expect("bulk create");
    let written = Instant::now();
    let nodes = cluster.node_names().expect("nodes");
    let programmed =
        wait_until_programmed(&cluster.lab, &nodes, revision, Duration::from_secs(300))
            .expect("programmed");
    let last = runtime
        .block_on(cluster_ip(
            &cluster.client,
            "scale",
            &set.name(SERVICES - 1),
        ))
        .expect("last ClusterIP");

    let (code, line) = lab.probe(&From::Pod("client-1"), "tcp", &format!("{last}:80"));
    assert_eq!(
        code, 0,
        "connection to the last Service ({last}) failed: {line}"
    );
    assert!(line.contains("echo-"), "answered by an echo pod: {line}");
    let connected = Instant::now();
    println!(
        "scale: {SERVICES} Services x {ENDPOINTS} endpoints: written to the datastore in {:.2} s, \
         programmed on all {} nodes (BPF) {:.2} s after the write ({:.2} s in total); \
         a connection to the last one ({last}:80) works: {line} (probe {:.2} s)",
        (written - started).as_secs_f64(),
        nodes.len(),
        (programmed - written).as_secs_f64(),
        (programmed - started).as_secs_f64(),
        (connected - programmed).as_secs_f64(),
    );
}
