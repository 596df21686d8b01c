//! The connectivity matrix on a real lab (the table of cells is in common/matrix.rs, shared
//! with the WireGuard tests), run in the Iptables dataplane (kube-proxy's rules) and in BPF in
//! its Tunnel and DSR modes, each on a lab of its own (plus etcd variants). Then the yaobank,
//! VXLAN and live-switch scenarios.
//!
//! Root only (namespaces, iptables and BPF in them); run by CI as root. Each test builds its own lab with
//! a unique name and takes it down on drop, even when it fails.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::matrix::{Dataplane, matrix_lab, run_matrix};
use common::{CLIENT, Capture, From, NODE_1, NODE_2, TestLab, WORKLOADS, peer, skip_unless_root};

#[test]
fn iptables_connectivity_matrix() {
    if skip_unless_root("iptables_connectivity_matrix") {
        return;
    }
    run_matrix(
        matrix_lab("mx", Dataplane::Iptables, &[]),
        Dataplane::Iptables,
    );
}

/// The same matrix with every agent and the lab's verbs on the lab's own etcd.
#[test]
fn iptables_connectivity_matrix_on_etcd() {
    if skip_unless_root("iptables_connectivity_matrix_on_etcd") {
        return;
    }
    let lab = matrix_lab("mxe", Dataplane::Iptables, &["--datastore", "etcd"]);
    lab.assert_on_lab_etcd();
    run_matrix(lab, Dataplane::Iptables);
}

#[test]
fn bpf_dataplane_matrix_keeps_client_addresses_on_every_node() {
    if skip_unless_root("bpf_dataplane_matrix_keeps_client_addresses_on_every_node") {
        return;
    }
    run_matrix(
        matrix_lab("bx", Dataplane::BpfTunnel, &[]),
        Dataplane::BpfTunnel,
    );
}

/// The same BPF matrix with every agent and the lab's verbs on the lab's own etcd.
#[test]
fn bpf_dataplane_matrix_on_etcd() {
    if skip_unless_root("bpf_dataplane_matrix_on_etcd") {
        return;
    }
    let lab = matrix_lab("bxe", Dataplane::BpfTunnel, &["--datastore", "etcd"]);
    lab.assert_on_lab_etcd();
    run_matrix(lab, Dataplane::BpfTunnel);
}

#[test]
fn bpf_dsr_matrix_keeps_client_addresses_and_answers_from_the_backend_node() {
    if skip_unless_root("bpf_dsr_matrix_keeps_client_addresses_and_answers_from_the_backend_node") {
        return;
    }
    run_matrix(matrix_lab("ds", Dataplane::BpfDsr, &[]), Dataplane::BpfDsr);
}

#[test]
fn yaobank_before_state_logs_node_addresses() {
    if skip_unless_root("yaobank_before_state_logs_node_addresses") {
        return;
    }
    let lab = TestLab::up("mx", &[]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for file in ["examples/yaobank.yaml", "examples/yaobank-customer-lb.yaml"] {
        let path = root.join(file).to_string_lossy().into_owned();
        lab.ok(&["apply", "-f", &path]);
    }
    let lb = lab.jsonpath(
        &["svc", "yaobank-customer", "-n", "yaobank"],
        "{.status.loadBalancer.ingress[0].ip}",
    );
    assert!(lb.starts_with("198.51.100."), "LoadBalancer IP {lb:?}");
    let page = lab.ok(&[
        "client",
        "--",
        "curl",
        "-s",
        "-m",
        "5",
        &format!("http://{lb}/"),
    ]);
    assert!(page.contains("<h1>Welcome to YAO Bank</h1>"), "{page}");
    assert!(
        page.contains("Name: Spike Curtis") && page.contains("Balance: 2389.45"),
        "{page}"
    );
    let logs = lab.ok(&["logs", "-n", "yaobank", "deployment/customer"]);
    let line = logs
        .lines()
        .find(|l| l.contains("\"GET / HTTP/1.1\" 200 -"))
        .unwrap_or_else(|| panic!("no request in the customer's log:\n{logs}"));
    let source = line.split_whitespace().next().unwrap_or_default();
    assert!(
        ["10.224.0.4", "10.224.0.5", "10.224.0.6"].contains(&source),
        "the standard dataplane shows a node's address, as kube-proxy does; got {line}"
    );
    // A deleted pod comes back with a new name and address, and the Service still works.
    lab.ok(&["delete", "pod", "-n", "yaobank", "-l", "app=customer"]);
    let page = lab.ok(&[
        "client",
        "--",
        "curl",
        "-s",
        "-m",
        "5",
        &format!("http://{lb}/"),
    ]);
    assert!(
        page.contains("Welcome to YAO Bank"),
        "after the pod was replaced: {page}"
    );
}

#[test]
fn vxlan_always_carries_pod_traffic_between_nodes_in_a_tunnel() {
    if skip_unless_root("vxlan_always_carries_pod_traffic_between_nodes_in_a_tunnel") {
        return;
    }
    let lab = TestLab::up("mx", &[]);
    let margayctl = lab.bin_dir.join("margayctl");
    let out = Command::new(&margayctl)
        .args([
            "patch",
            "ippool",
            "default-ipv4-ippool",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"vxlanMode":"Always"}}"#,
        ])
        .env(
            "MARGAY_DATASTORE",
            format!("sqlite:///run/margay-lab/{}/margay.db", lab.name),
        )
        .output()
        .expect("margayctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.apply(WORKLOADS);
    // Every node published a tunnel address and MAC.
    let tunnels = lab.jsonpath(&["nodes"], "{.items[*].spec.ipv4VXLANTunnelAddr}");
    assert_eq!(
        tunnels.split_whitespace().count(),
        3,
        "tunnel addresses: {tunnels:?}"
    );
    let echo1 = lab.jsonpath(&["pod", "echo-1", "-n", "matrix"], "{.status.podIP}");
    let client2 = lab.jsonpath(&["pod", "client-2", "-n", "matrix"], "{.status.podIP}");
    // Capture on the underlay while pod traffic crosses from node-2 to node-1.
    let capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}-underlay", lab.name),
            "timeout",
            "10",
            "tcpdump",
            "-n",
            "-c",
            "1",
            "-i",
            "br0",
            "udp",
            "port",
            "4789",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (code, line) = lab.probe(&From::Pod("client-2"), "tcp", &format!("{echo1}:8080"));
    assert_eq!(code, 0, "pod -> pod across nodes over VXLAN: {line}");
    assert_eq!(peer(&line), client2, "the pod address survives the tunnel");
    let captured = capture.wait_with_output().expect("tcpdump");
    let text = String::from_utf8_lossy(&captured.stdout);
    assert!(
        text.contains("VXLAN") || text.contains(".4789"),
        "no VXLAN packet on the underlay: {text}"
    );
    // Back to Never: the devices go and traffic is routed directly again.
    let out = Command::new(&margayctl)
        .args([
            "patch",
            "ippool",
            "default-ipv4-ippool",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"vxlanMode":"Never"}}"#,
        ])
        .env(
            "MARGAY_DATASTORE",
            format!("sqlite:///run/margay-lab/{}/margay.db", lab.name),
        )
        .output()
        .expect("margayctl");
    assert!(out.status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let tunnels = lab.jsonpath(&["nodes"], "{.items[*].spec.ipv4VXLANTunnelAddr}");
        let link = lab.run(&[
            "node",
            "exec",
            "node-1",
            "--",
            "ip",
            "link",
            "show",
            "vxlan.calico",
        ]);
        if tunnels.is_empty() && !link.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VXLAN not removed: {tunnels}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (code, line) = lab.probe(&From::Pod("client-2"), "tcp", &format!("{echo1}:8080"));
    assert_eq!(code, 0, "pod -> pod directly again: {line}");
}

/// A client that keeps one HTTP connection open and sends a request on it every 200 ms
/// (`count` requests): curl reuses the connection for every URL of its glob and reports, per
/// request, whether it had to connect again.
fn kept_alive(lab: &TestLab, from: &From, url: &str, count: u32) -> std::process::Child {
    let mut args: Vec<String> = match from {
        From::Pod(pod) => vec!["exec".into(), "-n".into(), "matrix".into(), (*pod).into()],
        From::Node(node) => vec!["node".into(), "exec".into(), (*node).into()],
        From::Client => vec!["client".into()],
    };
    args.extend(
        [
            "--",
            "curl",
            "-s",
            "--max-time",
            "60",
            "--rate",
            "5/s",
            "-w",
            "\n%{num_connects} %{http_code}\n",
        ]
        .map(String::from),
    );
    args.push(format!("{url}/?n=[1-{count}]"));
    Command::new(lab.bin_dir.join("margay-lab"))
        .arg("--name")
        .arg(&lab.name)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("curl")
}

/// What a kept-alive client saw: (answers, connections made, failed requests, sources the
/// backend saw).
fn kept_alive_result(child: std::process::Child) -> (usize, usize, usize, Vec<String>) {
    let out = child.wait_with_output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut answers, mut connects, mut failed) = (0, 0, 0);
    let mut sources = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [n, code] if code.len() == 3 && n.parse::<usize>().is_ok() => {
                connects += n.parse::<usize>().unwrap_or(0);
                if *code == "200" {
                    answers += 1;
                } else {
                    failed += 1;
                }
            }
            [peer_line, _name] => sources.push(peer(peer_line).to_owned()),
            _ => {}
        }
    }
    (answers, connects, failed, sources)
}

/// The HTTP backend the kept-alive clients talk to (on node-1) and its LoadBalancer Service.
fn keep_alive_workload(app: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: keep-1, namespace: matrix, labels: {{app: keep}}}}
spec:
  nodeName: node-1
  containers:
  - name: keep
    image: margay/echo
    command: ["{app}", echo, --http, "8081", --name, keep-1]
    ports: [{{containerPort: 8081}}]
---
apiVersion: v1
kind: Service
metadata: {{name: keep-lb, namespace: matrix}}
spec:
  type: LoadBalancer
  selector: {{app: keep}}
  ports: [{{port: 80, targetPort: 8081}}]
"#
    )
}

#[test]
fn switching_dataplanes_live_drops_no_request_and_no_connection() {
    if skip_unless_root("switching_dataplanes_live_drops_no_request_and_no_connection") {
        return;
    }
    let lab = TestLab::up("sw", &["--lb-mode", "node-1"]);
    lab.apply(WORKLOADS);
    let app = lab
        .bin_dir
        .join("margay-demo-app")
        .to_string_lossy()
        .into_owned();
    lab.apply(&keep_alive_workload(&app));
    let lb_of = |svc: &str| {
        lab.jsonpath(
            &["svc", svc, "-n", "matrix"],
            "{.status.loadBalancer.ingress[0].ip}",
        )
    };
    let lb = lb_of("echo-lb");
    let keep_lb = format!("http://{}", lb_of("keep-lb"));
    let keep_cluster_ip = format!(
        "http://{}",
        lab.jsonpath(&["svc", "keep-lb", "-n", "matrix"], "{.spec.clusterIP}")
    );
    let target = format!("{lb}:80");
    // Every TCP packet on node-1 (the LoadBalancer's node and the backends') and on the client,
    // so that a failed request prints its own packets, hop by hop.
    let captures = [
        ("node-1", Capture::start(&lab, "node-1", "tcp")),
        ("client", Capture::start(&lab, "client", "tcp")),
    ];
    let started = std::time::Instant::now();
    let mut timeline: Vec<(String, f64)> = Vec::new();
    // A steady stream of new connections from the external client while the cluster switches
    // Iptables -> BPF -> Iptables through the Installation, as the seed does. Each gets 3 s:
    // a flow a switch breaks never answers (the handshake's resent packets meet the same fate),
    // while a packet lost once costs TCP a second to resend it; those are counted and printed
    // with their packets below (connections whose handshake was resent).
    let stream = Command::new(lab.bin_dir.join("margay-lab"))
        .args([
            "--name", &lab.name, "client", "--", &app, "probe", "tcp", &target,
        ])
        .args(["--count", "300", "--interval", "20ms", "--timeout", "3s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("request stream");
    // Connections opened in Iptables mode, kept alive across both switches: from the external
    // client through the LoadBalancer IP, and from a pod on another node through the ClusterIP.
    let from_iptables = [
        (
            "client -> LB, opened in Iptables",
            kept_alive(&lab, &From::Client, &keep_lb, 60),
        ),
        (
            "pod -> ClusterIP, opened in Iptables",
            kept_alive(&lab, &From::Pod("client-2"), &keep_cluster_ip, 60),
        ),
    ];
    let switch = |dp: &str| {
        lab.margayctl(&[
            "patch",
            "installation",
            "default",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"spec":{{"calicoNetwork":{{"linuxDataplane":"{dp}"}}}}}}"#),
        ]);
    };
    let wait_for = |dp: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let active = lab.jsonpath(&["nodes"], "{.items[*].status.dataplane.active}");
            if active.split_whitespace().all(|a| a == dp) && active.split_whitespace().count() == 3
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nodes did not switch to {dp}: {active}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut mark = |what: &str| timeline.push((what.to_owned(), started.elapsed().as_secs_f64()));
    mark("BPF requested");
    switch("BPF");
    wait_for("BPF");
    mark("every node in BPF");
    // Connections opened in BPF mode, kept alive across the switch back.
    let from_bpf = [
        (
            "client -> LB, opened in BPF",
            kept_alive(&lab, &From::Client, &keep_lb, 40),
        ),
        (
            "pod -> ClusterIP, opened in BPF",
            kept_alive(&lab, &From::Pod("client-2"), &keep_cluster_ip, 40),
        ),
    ];
    std::thread::sleep(std::time::Duration::from_millis(1500));
    mark("Iptables requested");
    switch("Iptables");
    wait_for("Iptables");
    mark("every node in Iptables");
    let out = stream.wait_with_output().expect("stream");
    mark("stream ended");
    let answers = String::from_utf8_lossy(&out.stdout);
    let failures = String::from_utf8_lossy(&out.stderr);
    let ok = answers.lines().count();
    let failed = failures.lines().filter(|l| !l.trim().is_empty()).count();
    let sources: std::collections::BTreeSet<&str> = answers.lines().map(peer).collect();
    println!(
        "new connections during the switches: {ok} answered, {failed} failed; sources seen {sources:?}"
    );
    let timeline: Vec<String> = timeline
        .iter()
        .map(|(what, at)| format!("{what} {at:.3} s"))
        .collect();
    println!("timeline after the stream started: {}", timeline.join(", "));
    // A failed attempt names its flow ("(local 203.0.113.10:PORT)"); a connection whose
    // handshake TCP had to resend lost a packet somewhere, even if it answered in time. The
    // packets of each, on the client and on node-1.
    let mut flows: Vec<(String, u16)> = failures
        .lines()
        .filter_map(|line| {
            let port = line
                .split("(local ")
                .nth(1)?
                .split([')', ' '])
                .next()?
                .rsplit_once(':')?
                .1
                .parse()
                .ok()?;
            Some((format!("failed: {line}"), port))
        })
        .collect();
    let resent = captures[1].1.resent_handshakes(&lb);
    println!(
        "connections to {lb} whose handshake was resent: {} {resent:?}",
        resent.len()
    );
    flows.extend(
        resent
            .iter()
            .map(|port| (format!("handshake resent, port {port}"), *port)),
    );
    for (what, port) in &flows {
        for (role, capture) in &captures {
            println!("packets on {role} ({what}):\n{}", capture.flow(*port));
        }
    }
    let mut problems = Vec::new();
    for (what, child) in from_iptables.into_iter().chain(from_bpf) {
        let (answered, connects, failed, seen) = kept_alive_result(child);
        let seen: std::collections::BTreeSet<String> = seen.into_iter().collect();
        println!(
            "kept-alive {what}: {answered} answered, {failed} failed, {connects} connection(s); backend saw {seen:?}"
        );
        if failed > 0 || connects != 1 || answered < 40 {
            problems.push(format!(
                "{what}: {answered} answered, {failed} failed, {connects} connections"
            ));
        }
        // Opened in BPF from outside: the backend saw the client's own address (BPF served it).
        if what == "client -> LB, opened in BPF" && !seen.contains(CLIENT) {
            problems.push(format!("{what}: not served by BPF: {seen:?}"));
        }
    }
    // Both dataplanes answered: the node's address (Iptables) and the client's own (BPF).
    assert!(
        sources.contains(CLIENT),
        "BPF never served the stream: {sources:?}"
    );
    assert!(
        sources.contains(NODE_1),
        "Iptables never served the stream: {sources:?}"
    );
    assert_eq!(
        (ok, failed),
        (300, 0),
        "requests failed during the switches:\n{failures}"
    );
    assert!(
        problems.is_empty(),
        "kept-alive connections broke:\n{}",
        problems.join("\n")
    );
    // After the switch back, kube-proxy's rules are in place again.
    let saved = lab.ok(&["node", "exec", "node-1", "--", "iptables-save", "-t", "nat"]);
    assert!(saved.contains("KUBE-SERVICES"), "kube-proxy rules are back");
}

/// The seed's switch with every agent, the lab's verbs and margayctl on the lab's own etcd. On
/// SQLite the same path is walkthrough.rs (the seed's script itself, which also requires every
/// request to be a 200, i.e. the customer -> summary -> database chain answered), so it is not
/// repeated here.
#[test]
fn yaobank_switch_on_etcd() {
    if skip_unless_root("yaobank_switch_on_etcd") {
        return;
    }
    let lab = TestLab::up("ybe", &["--datastore", "etcd"]);
    lab.assert_on_lab_etcd();
    yaobank_switch(lab);
}

/// The seed's steps 4, 8, 10 and the reversal: before, the customer logs a node's address;
/// after switching the Installation to BPF (live: no agent or pod restarts), the client's,
/// whichever node the load balancer picks; after switching back, a node's again.
fn yaobank_switch(lab: TestLab) {
    lab.apply_example("examples/yaobank.yaml");
    lab.apply_example("examples/yaobank-customer-lb.yaml");
    let lb = lab.jsonpath(
        &["svc", "yaobank-customer", "-n", "yaobank"],
        "{.status.loadBalancer.ingress[0].ip}",
    );
    let sources_of_new_requests = |n: usize| -> Vec<String> {
        let before = lab
            .ok(&["logs", "-n", "yaobank", "deployment/customer"])
            .lines()
            .count();
        for _ in 0..n {
            let page = lab.ok(&[
                "client",
                "--",
                "curl",
                "-s",
                "-m",
                "5",
                &format!("http://{lb}/"),
            ]);
            assert!(page.contains("Balance: 2389.45"), "{page}");
        }
        lab.ok(&["logs", "-n", "yaobank", "deployment/customer"])
            .lines()
            .skip(before)
            .filter(|l| l.contains("\"GET / HTTP/1.1\" 200 -"))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
            .collect()
    };
    let set_dataplane = |dp: &str| {
        lab.margayctl(&[
            "patch",
            "installation.operator.tigera.io",
            "default",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"spec":{{"calicoNetwork":{{"linuxDataplane":"{dp}"}}}}}}"#),
        ]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let active = lab.jsonpath(&["nodes"], "{.items[*].status.dataplane.active}");
            if active.split_whitespace().filter(|a| *a == dp).count() == 3 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not all nodes run {dp}: {active}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let nodes = [NODE_1, NODE_2, "10.224.0.6"];
    let before = sources_of_new_requests(4);
    assert!(
        before.iter().all(|s| nodes.contains(&s.as_str())),
        "before: {before:?}"
    );
    set_dataplane("BPF");
    let after = sources_of_new_requests(6);
    println!("customer saw, before {before:?}, after the switch {after:?}");
    assert!(
        after.iter().all(|s| s == CLIENT),
        "after the switch to BPF: {after:?}"
    );
    set_dataplane("Iptables");
    let reverted = sources_of_new_requests(4);
    assert!(
        reverted.iter().all(|s| nodes.contains(&s.as_str())),
        "after the reversal: {reverted:?}"
    );
}
