//! Issue 5's preflight, `margayctl node status` and bounded drain, on a real lab with its own
//! etcd: one node's agent reaches etcd through a Service's ClusterIP (an etcd gRPC proxy pod
//! behind a Service, reached through the kube-proxy rules of that node), so when the cluster
//! switches to BPF that node stays in Iptables and says why, while the others switch; the BPF
//! nodes report each program attachment and their map fills; leaving BPF, the programs are
//! removed after the drain limit even though a kept-alive connection is still open.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestLab, skip_unless_root};
use serde_json::Value;

const NODE_1: &str = "10.224.0.4";

/// An etcd gRPC proxy on node-2 in front of the lab's etcd (on its unix socket), a Service in
/// front of the proxy, an HTTP echo server on node-1 behind a NodePort.
fn workloads(etcd_socket: &str, proxy_dir: &str, app: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: swpf}}
---
apiVersion: v1
kind: Pod
metadata: {{name: etcd-proxy, namespace: swpf, labels: {{app: etcd-proxy}}}}
spec:
  nodeName: node-2
  containers:
  - name: proxy
    image: quay.io/coreos/etcd
    command: [etcd, grpc-proxy, start, "--endpoints=unix://{etcd_socket}", "--listen-addr=0.0.0.0:2379", "--data-dir={proxy_dir}"]
    ports: [{{containerPort: 2379}}]
---
apiVersion: v1
kind: Service
metadata: {{name: etcd, namespace: swpf}}
spec:
  selector: {{app: etcd-proxy}}
  ports: [{{name: client, port: 2379, targetPort: 2379}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: swpf, labels: {{app: web}}}}
spec:
  nodeName: node-1
  containers:
  - name: web
    image: margay/echo
    command: ["{app}", echo, --http, "8081", --name, web]
    ports: [{{containerPort: 8081}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: swpf}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8081, nodePort: 30090}}]
"#
    )
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => panic!("{what} within {timeout:?}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn node_report(lab: &TestLab, node: &str) -> Value {
    let json: Value = serde_json::from_str(&lab.margayctl(&["node", "status", node, "-o", "json"]))
        .expect("node status JSON");
    json[0].clone()
}

fn agent_log(lab: &TestLab, node: &str) -> String {
    std::fs::read_to_string(format!(
        "/run/margay-lab/{}/logs/agent-{node}.log",
        lab.name
    ))
    .unwrap_or_default()
}

fn conntrack_fill(report: &Value) -> u64 {
    report["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "mg_ct")
        .and_then(|m| m["entries"].as_u64())
        .unwrap_or_else(|| panic!("no mg_ct fill in {report}"))
}

#[test]
fn preflight_keeps_a_node_reaching_etcd_through_a_service_in_iptables_and_status_shows_bpf_nodes() {
    if skip_unless_root("preflight_keeps_a_node_reaching_etcd_through_a_service_in_iptables") {
        return;
    }
    // A short drain limit, so that the bound shows without a five-minute wait.
    let lab = TestLab::up_with_env(
        "swpf",
        &["--datastore", "etcd"],
        &[("MARGAY_BPF_DRAIN_LIMIT", "4s")],
    );
    lab.assert_on_lab_etcd();
    let socket = lab
        .datastore_url()
        .strip_prefix("etcd+unix://")
        .expect("the lab's etcd socket")
        .to_owned();
    let proxy_dir = format!("/run/margay-lab/{}/etcd/grpc-proxy", lab.name);
    let app = lab.bin_dir.join("margay-demo-app");
    lab.apply(&workloads(&socket, &proxy_dir, &app.to_string_lossy()));
    let cluster_ip = lab.jsonpath(&["svc", "etcd", "-n", "swpf"], "{.spec.clusterIP}");
    let proxy_ip = lab.jsonpath(&["pod", "etcd-proxy", "-n", "swpf"], "{.status.podIP}");

    // node-2's agent now reaches etcd only through the ClusterIP, which the kube-proxy rules
    // the previous agent programmed on node-2 translate to the proxy pod.
    let through_service = format!("etcd://{cluster_ip}:2379");
    wait_until(
        "the etcd proxy answers through the ClusterIP from node-2",
        Duration::from_secs(20),
        || {
            let out = lab.run(&[
                "node",
                "exec",
                "node-2",
                "--",
                "etcdctl",
                "--endpoints",
                &format!("{cluster_ip}:2379"),
                "--dial-timeout",
                "1s",
                "endpoint",
                "health",
            ]);
            out.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
        },
    );
    lab.ok(&[
        "node",
        "restart-agent",
        "node-2",
        "--datastore",
        &through_service,
    ]);
    assert!(
        agent_log(&lab, "node-2").contains(&through_service),
        "node-2's agent was started on the ClusterIP"
    );

    lab.margayctl(&[
        "patch",
        "installation",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"calicoNetwork":{"linuxDataplane":"BPF"}}}"#,
    ]);
    wait_until(
        "node-1 and node-3 run BPF, node-2 stays in Iptables",
        Duration::from_secs(30),
        || {
            let active: Vec<String> = ["node-1", "node-2", "node-3"]
                .iter()
                .map(|n| {
                    node_report(&lab, n)["active"]
                        .as_str()
                        .unwrap_or("?")
                        .to_owned()
                })
                .collect();
            let failed = node_report(&lab, "node-2")["preflight"]["passed"] == false;
            (active == ["BPF", "Iptables", "BPF"] && failed)
                .then_some(())
                .ok_or(format!(
                    "active {active:?}, node-2 preflight failed: {failed}"
                ))
        },
    );

    // node-2 says why, in its Node status, in margayctl node status and in its log.
    let report = node_report(&lab, "node-2");
    let message = report["message"].as_str().unwrap_or_default();
    println!("node-2: {message}");
    for expected in [
        "failed the preflight, staying in Iptables",
        &format!("the endpoint {cluster_ip}:2379 is the ClusterIP of Service swpf/etcd"),
        &format!(
            "set --datastore (or MARGAY_DATASTORE, or ETCD_ENDPOINTS) to etcd://{proxy_ip}:2379"
        ),
    ] {
        assert!(
            message.contains(expected),
            "{expected:?} not in node-2's message: {message}"
        );
    }
    let table = lab.margayctl(&["node", "status"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("node-2"))
        .expect("node-2's line");
    assert!(
        line.contains("BPF") && line.contains("Iptables") && line.contains("FAILED (datastore)"),
        "{table}"
    );
    let full = lab.margayctl(&["node", "status", "node-2"]);
    assert!(
        full.contains("datastore    FAILED   the datastore etcd://")
            && full.contains("cgroup v2    ok")
            && full.contains("kernel BTF   ok"),
        "{full}"
    );
    // One log line, not one per sync: another sync (a change every agent programs) adds none.
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: swpf}\nspec:\n  selector: {app: web}\n  ports: [{port: 81, targetPort: 8081}]\n",
    );
    let log = agent_log(&lab, "node-2");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("failed the preflight"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "node-2 logs its preflight failure once: {lines:#?}"
    );
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    // And it still follows the datastore through the Service: kube-proxy's rules stayed.
    let status: Value =
        serde_json::from_str(&lab.ok(&["status", "-o", "json"])).expect("status JSON");
    let node_2 = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "node-2")
        .expect("node-2");
    assert_eq!(node_2["agent_datastore"], "InSync", "{node_2}");

    // A BPF node's report: every workload veth with both TC programs, the cgroup hooks with
    // the cgroup path, the preflight's checks, map fills.
    let links: Value =
        serde_json::from_str(&lab.ok(&["node", "exec", "node-1", "--", "ip", "-j", "link"]))
            .expect("ip -j link");
    let veths: Vec<String> = links
        .as_array()
        .expect("links")
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("cali"))
        .map(str::to_owned)
        .collect();
    assert!(!veths.is_empty(), "node-1 has workload veths");
    let full = lab.margayctl(&["node", "status", "node-1"]);
    println!("{full}");
    assert!(
        full.contains("Node node-1: dataplane requested BPF, in use BPF"),
        "{full}"
    );
    assert!(full.contains("preflight:   passed"), "{full}");
    for veth in &veths {
        for (prog, hook) in [("mg_from_wl", "tc ingress"), ("mg_to_wl", "tc egress")] {
            assert!(
                full.lines()
                    .any(|l| l.contains(prog) && l.contains(hook) && l.ends_with(veth.as_str())),
                "{prog} on {veth} ({hook}) not in:\n{full}"
            );
        }
    }
    assert!(
        full.lines()
            .any(|l| l.contains("mg_from_hep") && l.ends_with("eth0")),
        "{full}"
    );
    let cgroup_suffix = format!("margay-lab/{}/node-1", lab.name);
    for hook in ["cgroup connect4", "cgroup sendmsg4", "cgroup recvmsg4"] {
        assert!(
            full.lines()
                .any(|l| l.contains(hook) && l.ends_with(&cgroup_suffix)),
            "{hook} on the node's cgroup (…/{cgroup_suffix}) not in:\n{full}"
        );
    }
    for map in [
        "mg_ct",
        "mg_nat_fe",
        "mg_nat_be",
        "mg_routes",
        "mg_ifstate",
        "mg_nat_aff",
    ] {
        assert!(
            full.lines().any(|l| l.trim_start().starts_with(map)),
            "{map} not in:\n{full}"
        );
    }

    // Conntrack fill grows after traffic: new connections from the external client to node-1's
    // NodePort, each a conntrack pair on node-1, show in the next periodic count (10 s).
    let before = conntrack_fill(&node_report(&lab, "node-1"));
    for _ in 0..5 {
        let out = lab.run(&[
            "client",
            "--",
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://{NODE_1}:30090/"),
        ]);
        assert!(out.status.success(), "the NodePort answers in BPF mode");
    }
    let mut after = before;
    wait_until(
        "node-1's conntrack fill grows",
        Duration::from_secs(30),
        || {
            after = conntrack_fill(&node_report(&lab, "node-1"));
            (after >= before + 5)
                .then_some(())
                .ok_or(format!("mg_ct entries {before} -> {after}"))
        },
    );
    println!("node-1 mg_ct entries: {before} before, {after} after 5 connections");

    // The drain bound: a kept-alive, idle connection opened in BPF does not hold node-1 in
    // between dataplanes past the limit (4 s here): it is cut, and the log names it.
    let idle = Command::new(lab.bin_dir.join("margay-lab"))
        .args(["--name", &lab.name, "client", "--", "bash", "-c"])
        .arg(format!(
            "exec 3<>/dev/tcp/{NODE_1}/30090; printf 'GET / HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n' >&3; head -c 1 <&3 >/dev/null; sleep 60"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("an idle kept-alive connection");
    let mut idle = scopeguard(idle);
    std::thread::sleep(Duration::from_secs(1));
    let switched = Instant::now();
    lab.margayctl(&[
        "patch",
        "installation",
        "default",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"calicoNetwork":{"linuxDataplane":"Iptables"}}}"#,
    ]);
    wait_until(
        "node-1's BPF dataplane is removed",
        Duration::from_secs(30),
        || {
            let log = agent_log(&lab, "node-1");
            log.contains("BPF dataplane removed")
                .then_some(())
                .ok_or("not yet".to_owned())
        },
    );
    let took = switched.elapsed();
    let log = agent_log(&lab, "node-1");
    let cut = log
        .lines()
        .find(|l| l.contains("BPF drain limit reached"))
        .unwrap_or_else(|| panic!("node-1 logs the flows it cut:\n{log}"));
    println!("{cut}");
    assert!(
        cut.contains(&format!("{NODE_1}:30090")) && cut.contains("203.0.113.10:"),
        "the cut flow is named: {cut}"
    );
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(20),
        "removed after the 4 s limit, not at once nor much later: {took:?}"
    );
    assert_eq!(
        idle.0.try_wait().expect("try_wait"),
        None,
        "the connection was still open when the drain was cut (the bound, not its end, removed BPF)"
    );
    wait_until(
        "node-1 reports Iptables with nothing attached",
        Duration::from_secs(10),
        || {
            let report = node_report(&lab, "node-1");
            (report["active"] == "Iptables" && report["attached"].is_null())
                .then_some(())
                .ok_or(report.to_string())
        },
    );
    drop(idle);
}

/// Kills the child when dropped, even when the test fails.
struct Guard(std::process::Child);

fn scopeguard(child: std::process::Child) -> Guard {
    Guard(child)
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
