//! Operating the BPF dataplane on a real lab: `margayctl bpf ...` dumps of a node's pinned maps,
//! and an agent crash (kill -9) under a steady stream of requests.
//!
//! Root only; run by CI as root. Each test builds its own lab with a unique name and takes it
//! down on drop, even when it fails.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestLab, peer, skip_unless_root};

const NODE_1: &str = "10.224.0.4";
const NODE_2: &str = "10.224.0.5";
const CLIENT: &str = "203.0.113.10";

/// One HTTP echo backend on node-1 (answers `<peer> web` on every GET of a kept-alive
/// connection) behind a NodePort and a LoadBalancer Service, and a ClusterIP with
/// sessionAffinity.
const WEB: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ops}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: ops, labels: {app: web}}
spec:
  nodeName: node-1
  containers:
  - {name: web, image: margay/echo, args: ["--http", "8081"], ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ops}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8081, nodePort: 30090}]
---
apiVersion: v1
kind: Service
metadata: {name: web-lb, namespace: ops}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{port: 80, targetPort: 8081}]
"#;

/// `curl` from the external client: `requests` GETs of `url` at `rate` per second, all on one
/// kept-alive connection (curl reuses it between the URLs of one command line); each answer
/// is followed by a line `<http code> <new connections made for it>`.
fn kept_alive_stream(lab: &TestLab, url: &str, requests: u32, rate: u32) -> Child {
    Command::new(lab.bin_dir.join("margay-lab"))
        .args([
            "--name", &lab.name, "client", "--", "curl", "-s", "-m", "60",
        ])
        .args(["--rate", &format!("{rate}/s")])
        .args(["-w", "%{http_code} %{num_connects}\\n"])
        .arg(format!("{url}?[1-{requests}]"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl stream")
}

/// What a kept-alive stream saw: answers (peer lines), HTTP codes, connections opened.
#[derive(Debug, Default)]
struct StreamResult {
    peers: Vec<String>,
    ok: usize,
    failed: usize,
    connects: u64,
}

fn finish(stream: Child) -> StreamResult {
    let out = stream.wait_with_output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = StreamResult::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [code, connects] if code.len() == 3 && code.chars().all(|c| c.is_ascii_digit()) => {
                if *code == "200" {
                    r.ok += 1;
                } else {
                    r.failed += 1;
                }
                r.connects += connects.parse::<u64>().unwrap_or(0);
            }
            [addr, "web"] => r.peers.push((*addr).to_owned()),
            _ => {}
        }
    }
    if !out.status.success() {
        eprintln!(
            "curl exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        r.failed += 1;
    }
    r
}

#[test]
fn bpf_dumps_show_frontends_backends_live_flows_routes_and_counters() {
    if skip_unless_root("bpf_dumps_show_frontends_backends_live_flows_routes_and_counters") {
        return;
    }
    let lab = TestLab::up("bd", &["--dataplane", "bpf", "--lb-mode", "node-2"]);
    lab.apply(WEB);
    let web = lab.jsonpath(&["pod", "web", "-n", "ops"], "{.status.podIP}");
    let cluster_ip = lab.jsonpath(&["svc", "web", "-n", "ops"], "{.spec.clusterIP}");

    // NAT: the Service's frontends (ClusterIP, the NodePort on node-2's address and its
    // wildcard) with the backend, on node-2 where it is remote (on node-1).
    let nat = lab.margayctl(&["bpf", "nat", "dump", "--node", "node-2"]);
    println!("{nat}");
    for frontend in [
        format!("{cluster_ip}:80/TCP"),
        format!("{NODE_2}:30090/TCP"),
        "*:30090/TCP".to_owned(),
    ] {
        let line = nat
            .lines()
            .position(|l| l.starts_with(&format!("{frontend} ")))
            .unwrap_or_else(|| panic!("no frontend {frontend} in node-2's dump:\n{nat}"));
        let backend = nat.lines().nth(line + 1).unwrap_or_default();
        assert!(
            backend.contains(&format!("{web}:8081  on {NODE_1}")),
            "{frontend}: its backend is the pod on node-1: {backend:?}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(
        &lab.margayctl(&["bpf", "nat", "dump", "--node", "node-1", "-o", "json"]),
    )
    .expect("nat json");
    let local = json["frontends"]
        .as_array()
        .expect("frontends")
        .iter()
        .find(|f| f["address"] == NODE_1 && f["port"] == 30090)
        .expect("node-1's NodePort frontend");
    assert_eq!(local["localCount"], 1, "{local}");
    assert_eq!(local["backends"][0]["local"], true, "{local}");
    assert_eq!(local["backends"][0]["address"], web.as_str());

    // Routes: node-2 knows node-1's pod block (next hop node-1) and every node's address;
    // node-1 has a /32 for its pod, on the pod's veth.
    let routes = lab.margayctl(&["bpf", "routes", "dump", "--node", "node-2"]);
    println!("{routes}");
    assert!(
        routes
            .lines()
            .any(|l| l.contains("remote-workload in-pool") && l.ends_with(&format!("via {NODE_1}"))),
        "node-2 routes node-1's pod block through node-1:\n{routes}"
    );
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with(&format!("{NODE_2}/32 ")) && l.contains("local-host")),
        "{routes}"
    );
    let routes1 = lab.margayctl(&["bpf", "routes", "dump", "--node", "node-1"]);
    assert!(
        routes1.lines().any(|l| l.starts_with(&format!("{web}/32 "))
            && l.contains("local-workload in-pool ifindex")
            && l.contains("(cali")),
        "node-1 has its pod's /32 on its veth:\n{routes1}"
    );

    // A live flow: a kept-alive connection from the client to the NodePort on node-2, which
    // tunnels it to node-1. While it runs, node-2 has the tunnel entry and node-1 the NAT pair,
    // established.
    let counters_before = lab.margayctl(&["bpf", "counters", "--node", "node-2", "-o", "json"]);
    let stream = kept_alive_stream(&lab, &format!("http://{NODE_2}:30090/"), 30, 10);
    std::thread::sleep(Duration::from_millis(1500));
    let ct2 = lab.margayctl(&["bpf", "conntrack", "dump", "--node", "node-2"]);
    let ct1 = lab.margayctl(&["bpf", "conntrack", "dump", "--node", "node-1"]);
    let result = finish(stream);
    println!("node-2:\n{ct2}node-1:\n{ct1}");
    assert_eq!(result.failed, 0, "{result:?}");
    let tunnel = ct2
        .lines()
        .find(|l| {
            l.starts_with(&format!("TCP {CLIENT}:"))
                && l.contains(&format!(" -> {NODE_2}:30090  tunnel to node {NODE_1}"))
        })
        .unwrap_or_else(|| panic!("no tunnel entry for the live flow on node-2:\n{ct2}"));
    assert!(tunnel.contains("established"), "{tunnel}");
    // Every NAT and tunnel entry names the Service of the frontend the client dialled (looked
    // up in the node's frontends and the datastore's Services).
    let service = format!("  svc {} ops/web/tcp  ", local["serviceId"]);
    assert!(tunnel.contains(&service), "{tunnel} lacks {service:?}");
    let forward = ct1
        .lines()
        .find(|l| {
            l.contains(&format!(
                " -> {NODE_2}:30090  nat-forward backend {web}:8081 ingress node {NODE_2}"
            ))
        })
        .unwrap_or_else(|| panic!("no forward entry on node-1:\n{ct1}"));
    assert!(
        forward.contains("established")
            && forward.contains("from-tunnel")
            && forward.contains(&service),
        "{forward}"
    );
    assert!(
        ct1.lines().any(|l| l.contains(&format!(
            " -> {web}:8081  nat-reverse frontend {NODE_2}:30090"
        )) && l.contains(&service)),
        "no reverse entry naming the Service on node-1:\n{ct1}"
    );
    let ct_json: serde_json::Value = serde_json::from_str(&lab.margayctl(&[
        "bpf",
        "conntrack",
        "dump",
        "--node",
        "node-1",
        "-o",
        "json",
    ]))
    .expect("conntrack json");
    let forward_json = ct_json
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["type"] == "nat-forward" && e["nat"]["backend"] == format!("{web}:8081"))
        .unwrap_or_else(|| panic!("no forward entry in the json: {ct_json}"));
    assert_eq!(forward_json["service"], "ops/web/tcp", "{forward_json}");
    assert_eq!(
        forward_json["serviceId"], local["serviceId"],
        "{forward_json}"
    );
    // One ingress node per client tuple: the client keeps its port (port SNAT is proven with
    // two ingress nodes in margay-bpf's tunnel.rs, and its rendering in margayctl's unit test).
    assert_eq!(
        forward_json["psnatPort"],
        serde_json::Value::Null,
        "{forward_json}"
    );
    assert!(
        forward_json
            .as_object()
            .expect("entry")
            .contains_key("psnatPort"),
        "{forward_json}"
    );

    // Counters: the new flow was counted (and tunnelled) on node-2.
    let count = |json: &str, reason: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(json).expect("counters json");
        v.as_array()
            .expect("counters")
            .iter()
            .find(|c| c["reason"] == reason)
            .and_then(|c| c["packets"].as_u64())
            .unwrap_or_else(|| panic!("no counter {reason}: {v}"))
    };
    let counters_after = lab.margayctl(&["bpf", "counters", "--node", "node-2", "-o", "json"]);
    for reason in ["new_flow", "tunnel_flow"] {
        assert!(
            count(&counters_after, reason) > count(&counters_before, reason),
            "{reason} did not move: {counters_before} -> {counters_after}"
        );
    }
    let text = lab.margayctl(&["bpf", "counters", "--node", "node-2"]);
    assert!(
        text.lines().any(|l| l.starts_with("tunnel_flow ")),
        "{text}"
    );
}

#[test]
fn agent_crash_under_load_keeps_connections_and_requests_and_adopts_the_maps() {
    if skip_unless_root("agent_crash_under_load_keeps_connections_and_requests_and_adopts_the_maps")
    {
        return;
    }
    // LoadBalancer traffic enters at node-2 and is tunnelled to the backend on node-1: both
    // agents matter, and both are killed.
    let lab = TestLab::up("cr", &["--dataplane", "bpf", "--lb-mode", "node-2"]);
    lab.apply(WEB);
    let lb = lab.jsonpath(
        &["svc", "web-lb", "-n", "ops"],
        "{.status.loadBalancer.ingress[0].ip}",
    );
    // Two kept-alive connections (through the LoadBalancer and straight to the NodePort on
    // node-1) and a stream of new connections, all running across both crashes.
    let via_lb = kept_alive_stream(&lab, &format!("http://{lb}/"), 100, 10);
    let via_node_port = kept_alive_stream(&lab, &format!("http://{NODE_1}:30090/"), 100, 10);
    let app = lab
        .bin_dir
        .join("margay-demo-app")
        .to_string_lossy()
        .into_owned();
    let new_connections = Command::new(lab.bin_dir.join("margay-lab"))
        .args(["--name", &lab.name, "client", "--", &app, "probe", "http"])
        .arg(format!("http://{lb}/"))
        .args(["--count", "100", "--interval", "80ms", "--timeout", "2s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("new-connection stream");

    std::thread::sleep(Duration::from_secs(2));
    for node in ["node-2", "node-1"] {
        let restarted = lab.ok(&["node", "restart-agent", node]);
        println!("{}", restarted.trim());
        std::thread::sleep(Duration::from_secs(1));
    }

    let lb_stream = finish(via_lb);
    let np_stream = finish(via_node_port);
    let out = new_connections.wait_with_output().expect("probe");
    let answers = String::from_utf8_lossy(&out.stdout);
    let failures = String::from_utf8_lossy(&out.stderr);
    let new_ok = answers.lines().filter(|l| peer(l) == CLIENT).count();
    println!(
        "kept-alive via LB: {} ok, {} failed, {} connections; via NodePort: {} ok, {} failed, {} connections; new connections: {new_ok}/100 answered",
        lb_stream.ok,
        lb_stream.failed,
        lb_stream.connects,
        np_stream.ok,
        np_stream.failed,
        np_stream.connects
    );
    for (what, s) in [("LoadBalancer", &lb_stream), ("NodePort", &np_stream)] {
        assert_eq!(
            (s.ok, s.failed),
            (100, 0),
            "{what}: every request answered: {s:?}"
        );
        assert_eq!(
            s.connects, 1,
            "{what}: one connection for all 100 requests, kept across both crashes: {s:?}"
        );
        let ports: std::collections::BTreeSet<&String> = s.peers.iter().collect();
        assert_eq!(
            ports.len(),
            1,
            "{what}: the backend saw one connection: {ports:?}"
        );
        assert!(
            s.peers.iter().all(|p| peer(p) == CLIENT),
            "{what}: the client's address throughout: {:?}",
            s.peers
        );
    }
    assert_eq!(
        new_ok, 100,
        "every new connection to the existing backend answered:\n{failures}"
    );

    // Each restarted agent adopted the pinned maps and its first sync wrote nothing.
    for node in ["node-1", "node-2"] {
        let log = std::fs::read_to_string(format!(
            "/run/margay-lab/{}/logs/agent-{node}.log",
            lab.name
        ))
        .expect("agent log");
        let adopted = log
            .lines()
            .position(|l| l.contains("adopted pinned BPF maps"))
            .unwrap_or_else(|| {
                panic!("{node}: the restarted agent did not adopt the maps:\n{log}")
            });
        let first_sync = log
            .lines()
            .skip(adopted)
            .find(|l| l.contains("dataplane sync"))
            .unwrap_or_else(|| panic!("{node}: no sync after the restart:\n{log}"));
        println!("{node} after restart: {first_sync}");
        assert!(
            first_sync.contains("backends_written: 0, frontends_written: 0, frontends_deleted: 0, backends_deleted: 0")
                // Routes and interface states both adopted, not rewritten.
                && first_sync.matches("(0 written or removed)").count() == 2,
            "{node}: the restarted agent rewrote maps: {first_sync}"
        );
    }
}

/// `bpfLogLevel: Debug` on a running BPF lab: the agent switches the programs' decision log on
/// and its log gets one line per packet decision for real traffic (the external client's
/// request to the NodePort on node-1, DNATed to the pod there); back to Off, no more lines.
#[test]
fn bpf_log_level_debug_logs_packet_decisions_in_the_agent_log() {
    if skip_unless_root("bpf_log_level_debug_logs_packet_decisions_in_the_agent_log") {
        return;
    }
    let lab = TestLab::up("dl", &["--dataplane", "bpf"]);
    lab.apply(WEB);
    let web = lab.jsonpath(&["pod", "web", "-n", "ops"], "{.status.podIP}");
    let log_path = format!("/run/margay-lab/{}/logs/agent-node-1.log", lab.name);
    let agent_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let decisions = |log: &str| {
        log.lines()
            .filter(|l| l.contains("bpf decision: mg_from_hep") && l.contains(":30090: dnat to "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let url = format!("http://{NODE_1}:30090/");
    let get = || {
        lab.run(&[
            "client",
            "--",
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
    };
    assert!(
        decisions(&agent_log()).is_empty(),
        "Off by default: no decision lines"
    );

    let patch = |level: &str| {
        lab.margayctl(&[
            "--allow-version-mismatch",
            "patch",
            "felixconfiguration",
            "default",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"bpfLogLevel":"{level}"}}}}"#),
        ])
    };
    patch("Debug");
    // The agent applies the change at its next sync; then a request's packets are logged.
    let mut lines = Vec::new();
    for _ in 0..30 {
        let out = get();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "request answered"
        );
        std::thread::sleep(Duration::from_millis(500));
        lines = decisions(&agent_log());
        if !lines.is_empty() {
            break;
        }
    }
    println!("{}", lines.join("\n"));
    assert!(
        lines.iter().any(
            |l| l.contains(&format!("{CLIENT}:")) && l.contains(&format!("dnat to {web}:8081"))
        ),
        "a line for the client's request DNATed to the pod: {lines:#?}"
    );

    patch("Off");
    std::thread::sleep(Duration::from_secs(3));
    let before = decisions(&agent_log()).len();
    let out = get();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        decisions(&agent_log()).len(),
        before,
        "Off again: no new decision lines"
    );
}
