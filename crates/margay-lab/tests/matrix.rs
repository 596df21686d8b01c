//! The connectivity matrix in the Iptables dataplane, on a real lab: every cell sends real
//! traffic through the node agents' kube-proxy rules and asserts the source address the backend
//! saw (the echo server answers with the peer address of the connection it accepted).
//!
//! Root only (namespaces, iptables in them); run by CI as root. Each test builds its own lab with
//! a unique name and takes it down on drop, even when it fails.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{From, TestLab, WORKLOADS, peer, skip_unless_root};

const NODE_1: &str = "10.224.0.4";
const NODE_2: &str = "10.224.0.5";
const CLIENT: &str = "203.0.113.10";

#[test]
fn iptables_connectivity_matrix() {
    if skip_unless_root("iptables_connectivity_matrix") {
        return;
    }
    iptables_matrix(TestLab::up("mx", &["--lb-mode", "node-2"]));
}

/// The same matrix with every agent and the lab's verbs on the lab's own etcd.
#[test]
fn iptables_connectivity_matrix_on_etcd() {
    if skip_unless_root("iptables_connectivity_matrix_on_etcd") {
        return;
    }
    let lab = TestLab::up("mxe", &["--lb-mode", "node-2", "--datastore", "etcd"]);
    lab.assert_on_lab_etcd();
    iptables_matrix(lab);
}

/// Every cell of the Iptables matrix on `lab`, whose LoadBalancer traffic goes to node-2, which
/// has no backend of `echo`.
fn iptables_matrix(lab: TestLab) {
    lab.apply(WORKLOADS);

    let ip = |pod: &str| lab.jsonpath(&["pod", pod, "-n", "matrix"], "{.status.podIP}");
    let cluster_ip = |svc: &str| lab.jsonpath(&["svc", svc, "-n", "matrix"], "{.spec.clusterIP}");
    let lb_ip = |svc: &str| {
        lab.jsonpath(
            &["svc", svc, "-n", "matrix"],
            "{.status.loadBalancer.ingress[0].ip}",
        )
    };
    let (client1, client2) = (ip("client-1"), ip("client-2"));
    let echo = cluster_ip("echo");
    let mut failures = Vec::new();
    let mut check = |cell: &str, (code, line): (i32, String), want: Result<&str, i32>| {
        let ok = match want {
            Ok(source) => code == 0 && peer(&line) == source,
            Err(expected_code) => code == expected_code,
        };
        println!(
            "{:<58} {} (exit {code}: {line})",
            cell,
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            failures.push(format!("{cell}: wanted {want:?}, got exit {code}: {line}"));
        }
    };

    let tcp80 = |addr: &str| format!("{addr}:80");
    check(
        "pod -> ClusterIP, backend on the same node: pod IP",
        lab.probe(&From::Pod("client-1"), "tcp", &tcp80(&echo)),
        Ok(client1.as_str()),
    );
    check(
        "pod -> ClusterIP, backend on another node: pod IP",
        lab.probe(&From::Pod("client-2"), "tcp", &tcp80(&echo)),
        Ok(client2.as_str()),
    );
    check(
        "pod -> ClusterIP over UDP, backend on another node: pod IP",
        lab.probe(&From::Pod("client-2"), "udp", &format!("{echo}:53")),
        Ok(client2.as_str()),
    );
    check(
        "node -> ClusterIP: masqueraded to the node's IP",
        lab.probe(&From::Node("node-2"), "tcp", &tcp80(&echo)),
        Ok(NODE_2),
    );
    check(
        "client -> NodePort on a node with a local backend: node IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_1}:30080")),
        Ok(NODE_1),
    );
    check(
        "client -> NodePort on a node without one: that node's IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30080")),
        Ok(NODE_2),
    );
    check(
        "client -> LoadBalancer IP (router -> node-2): node-2's IP",
        lab.probe(&From::Client, "tcp", &tcp80(&lb_ip("echo-lb"))),
        Ok(NODE_2),
    );
    check(
        "client -> NodePort, externalTrafficPolicy Local: client IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_1}:30081")),
        Ok(CLIENT),
    );
    check(
        "client -> NodePort, Local, no local backend: dropped",
        lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30081")),
        Err(4),
    );
    check(
        "pod -> ClusterIP without endpoints: refused",
        lab.probe(&From::Pod("client-1"), "tcp", &tcp80(&cluster_ip("empty"))),
        Err(3),
    );
    check(
        "pod -> its own Service (hairpin): masqueraded to its node",
        lab.probe(&From::Pod("echo-1"), "tcp", &tcp80(&echo)),
        Ok(NODE_1),
    );
    // Cluster DNS: a real resolver (glibc) asks dnsmasq through the kube-dns ClusterIP over UDP.
    let dns = lab.run(&[
        "exec",
        "-n",
        "matrix",
        "client-1",
        "--",
        "getent",
        "hosts",
        "echo.matrix.svc.cluster.local",
    ]);
    let answer = String::from_utf8_lossy(&dns.stdout).trim().to_owned();
    check(
        "pod -> kube-dns (UDP): echo.matrix.svc.cluster.local",
        (dns.status.code().unwrap_or(-1), answer.replace(' ', ":")),
        Ok(echo.as_str()),
    );
    let short = lab.run(&[
        "exec", "-n", "matrix", "client-1", "--", "getent", "hosts", "echo",
    ]);
    check(
        "pod -> kube-dns: the short name through the search path",
        (
            short.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&short.stdout)
                .trim()
                .replace(' ', ":"),
        ),
        Ok(echo.as_str()),
    );
    // Session affinity: every connection from one client lands on the same backend.
    let sticky = cluster_ip("sticky");
    let backends: std::collections::BTreeSet<String> = (0..6)
        .map(|_| {
            let (code, line) = lab.probe(&From::Pod("client-1"), "tcp", &tcp80(&sticky));
            assert_eq!(code, 0, "sticky probe failed: {line}");
            line.split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    println!(
        "{:<58} {:?}",
        "session affinity ClientIP: backends seen", backends
    );
    if backends.len() != 1 {
        failures.push(format!("session affinity: several backends {backends:?}"));
    }
    // healthCheckNodePort: 200 where a local endpoint exists, 503 elsewhere.
    let hc = lab.jsonpath(
        &["svc", "echo-lb-local", "-n", "matrix"],
        "{.spec.healthCheckNodePort}",
    );
    for (node, want) in [(NODE_1, "200"), (NODE_2, "503")] {
        let out = lab.run(&[
            "client",
            "--",
            "curl",
            "-s",
            "-m",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{node}:{hc}/"),
        ]);
        let got = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!("{:<58} {got}", format!("healthCheckNodePort on {node}"));
        if got != want {
            failures.push(format!(
                "healthCheckNodePort on {node}: wanted {want}, got {got}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "matrix cells failed:\n{}",
        failures.join("\n")
    );
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

#[test]
fn bpf_dataplane_matrix_keeps_client_addresses_on_every_node() {
    if skip_unless_root("bpf_dataplane_matrix_keeps_client_addresses_on_every_node") {
        return;
    }
    bpf_matrix(TestLab::up("bx", &["--dataplane", "bpf"]));
}

/// The same BPF matrix with every agent and the lab's verbs on the lab's own etcd.
#[test]
fn bpf_dataplane_matrix_on_etcd() {
    if skip_unless_root("bpf_dataplane_matrix_on_etcd") {
        return;
    }
    let lab = TestLab::up("bxe", &["--dataplane", "bpf", "--datastore", "etcd"]);
    lab.assert_on_lab_etcd();
    bpf_matrix(lab);
}

/// The BPF matrix on `lab` (brought up with `--dataplane bpf`). LoadBalancer traffic is spread
/// over every node (ECMP); only node-1 runs `echo`'s backend: the others reach it through the
/// Tunnel mode (VXLAN to node-1, which NATs).
fn bpf_matrix(lab: TestLab) {
    lab.apply(WORKLOADS);
    let nodes = lab.ok(&["get", "nodes", "-o", "wide"]);
    assert_eq!(
        nodes.matches(" BPF").count(),
        3,
        "every node runs BPF:\n{nodes}"
    );
    // No kube-proxy rule is left (bpfKubeProxyIptablesCleanupEnabled defaults to true).
    let saved = lab.ok(&["node", "exec", "node-1", "--", "iptables-save"]);
    assert!(
        !saved.contains("KUBE-"),
        "kube-proxy rules left in BPF mode:\n{saved}"
    );

    let ip = |pod: &str| lab.jsonpath(&["pod", pod, "-n", "matrix"], "{.status.podIP}");
    let cluster_ip = |svc: &str| lab.jsonpath(&["svc", svc, "-n", "matrix"], "{.spec.clusterIP}");
    let (client1, client2, echo1) = (ip("client-1"), ip("client-2"), ip("echo-1"));
    let echo = cluster_ip("echo");
    let lb = lab.jsonpath(
        &["svc", "echo-lb", "-n", "matrix"],
        "{.status.loadBalancer.ingress[0].ip}",
    );
    let mut failures = Vec::new();
    let mut check = |cell: &str, (code, line): (i32, String), want: Result<&str, ()>| {
        let ok = match want {
            Ok(source) => code == 0 && peer(&line) == source,
            Err(()) => code != 0,
        };
        println!(
            "{cell:<62} {} (exit {code}: {line})",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            failures.push(format!("{cell}: wanted {want:?}, got exit {code}: {line}"));
        }
    };
    let tcp80 = |addr: &str| format!("{addr}:80");
    check(
        "pod -> ClusterIP, same node (connect-time LB): pod IP",
        lab.probe(&From::Pod("client-1"), "tcp", &tcp80(&echo)),
        Ok(client1.as_str()),
    );
    check(
        "pod -> ClusterIP, other node (connect-time LB): pod IP",
        lab.probe(&From::Pod("client-2"), "tcp", &tcp80(&echo)),
        Ok(client2.as_str()),
    );
    check(
        "pod -> ClusterIP over UDP (TC NAT): pod IP",
        lab.probe(&From::Pod("client-2"), "udp", &format!("{echo}:53")),
        Ok(client2.as_str()),
    );
    check(
        "node -> ClusterIP: the node's IP",
        lab.probe(&From::Node("node-2"), "tcp", &tcp80(&echo)),
        Ok(NODE_2),
    );
    check(
        "client -> NodePort, backend on that node: the CLIENT's IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_1}:30080")),
        Ok(CLIENT),
    );
    check(
        "client -> NodePort, Local policy, backend on that node: client IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_1}:30081")),
        Ok(CLIENT),
    );
    check(
        "client -> NodePort, Local policy, no local backend: refused",
        lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30081")),
        Err(()),
    );
    check(
        "client -> NodePort on a node WITHOUT the backend (Tunnel): CLIENT IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30080")),
        Ok(CLIENT),
    );
    check(
        "client -> NodePort on node-3 (Tunnel): CLIENT IP",
        lab.probe(&From::Client, "tcp", "10.224.0.6:30080"),
        Ok(CLIENT),
    );
    // The router spreads connections over the nodes: every one must show the client.
    for i in 0..6 {
        check(
            &format!("client -> LoadBalancer IP, ECMP connection {i}: CLIENT IP"),
            lab.probe(&From::Client, "tcp", &tcp80(&lb)),
            Ok(CLIENT),
        );
    }
    check(
        "pod -> ClusterIP without endpoints: refused",
        lab.probe(&From::Pod("client-1"), "tcp", &tcp80(&cluster_ip("empty"))),
        Err(()),
    );
    check(
        "pod -> its own Service (hairpin): its own address",
        lab.probe(&From::Pod("echo-1"), "tcp", &tcp80(&echo)),
        Ok(echo1.as_str()),
    );
    // healthCheckNodePort, still answered by the agent in BPF mode.
    let hc = lab.jsonpath(
        &["svc", "echo-lb-local", "-n", "matrix"],
        "{.spec.healthCheckNodePort}",
    );
    for (node, want) in [(NODE_1, "200"), (NODE_2, "503")] {
        let out = lab.run(&[
            "client",
            "--",
            "curl",
            "-s",
            "-m",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{node}:{hc}/"),
        ]);
        let got = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!("{:<62} {got}", format!("healthCheckNodePort on {node}"));
        if got != want {
            failures.push(format!(
                "healthCheckNodePort on {node}: wanted {want}, got {got}"
            ));
        }
    }
    let dns = lab.run(&[
        "exec", "-n", "matrix", "client-1", "--", "getent", "hosts", "echo",
    ]);
    let answer = String::from_utf8_lossy(&dns.stdout).trim().to_owned();
    println!("{:<62} {answer}", "pod -> kube-dns through BPF");
    if !answer.starts_with(&echo) {
        failures.push(format!("DNS through BPF: {answer:?}"));
    }
    assert!(
        failures.is_empty(),
        "BPF matrix cells failed:\n{}",
        failures.join("\n")
    );
    drop(lab);
}

#[test]
fn switching_dataplanes_live_keeps_new_requests_working() {
    if skip_unless_root("switching_dataplanes_live_keeps_new_requests_working") {
        return;
    }
    let lab = TestLab::up("sw", &["--lb-mode", "node-1"]);
    lab.apply(WORKLOADS);
    let lb = lab.jsonpath(
        &["svc", "echo-lb", "-n", "matrix"],
        "{.status.loadBalancer.ingress[0].ip}",
    );
    let app = lab
        .bin_dir
        .join("margay-demo-app")
        .to_string_lossy()
        .into_owned();
    let target = format!("{lb}:80");
    // A steady stream of new connections from the external client while the cluster switches
    // Iptables -> BPF -> Iptables through the Installation, as the seed does.
    let stream = Command::new(lab.bin_dir.join("margay-lab"))
        .args([
            "--name", &lab.name, "client", "--", &app, "probe", "tcp", &target,
        ])
        .args(["--count", "300", "--interval", "20ms", "--timeout", "1s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("request stream");
    let switch = |dp: &str| {
        let out = Command::new(lab.bin_dir.join("margayctl"))
            .args(["patch", "installation", "default", "--type", "merge", "-p"])
            .arg(format!(
                r#"{{"spec":{{"calicoNetwork":{{"linuxDataplane":"{dp}"}}}}}}"#
            ))
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
    std::thread::sleep(std::time::Duration::from_secs(1));
    switch("BPF");
    wait_for("BPF");
    std::thread::sleep(std::time::Duration::from_secs(1));
    switch("Iptables");
    wait_for("Iptables");
    let out = stream.wait_with_output().expect("stream");
    let answers = String::from_utf8_lossy(&out.stdout);
    let failures = String::from_utf8_lossy(&out.stderr);
    let ok = answers.lines().count();
    let failed = failures.lines().filter(|l| !l.trim().is_empty()).count();
    let sources: std::collections::BTreeSet<&str> = answers.lines().map(peer).collect();
    println!("switch under load: {ok} answered, {failed} failed; sources seen {sources:?}");
    // Both dataplanes answered: the node's address (Iptables) and the client's own (BPF).
    assert!(
        sources.contains(CLIENT),
        "BPF never served the stream: {sources:?}"
    );
    assert!(
        sources.contains(NODE_1),
        "Iptables never served the stream: {sources:?}"
    );
    assert!(
        ok >= 290,
        "too many failures during the switches: {failed}\n{failures}"
    );
    // After the switch back, kube-proxy's rules are in place again.
    let saved = lab.ok(&["node", "exec", "node-1", "--", "iptables-save", "-t", "nat"]);
    assert!(saved.contains("KUBE-SERVICES"), "kube-proxy rules are back");
}

#[test]
fn yaobank_shows_the_client_address_after_switching_to_bpf_and_a_node_address_after_switching_back()
{
    if skip_unless_root("yaobank_shows_the_client_address_after_switching_to_bpf") {
        return;
    }
    yaobank_switch(TestLab::up("yb", &[]));
}

/// The same path with every agent, the lab's verbs and margayctl on the lab's own etcd.
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
