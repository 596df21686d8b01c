//! The connectivity matrix on a real lab: one table of cells (who probes what, over TCP or UDP)
//! with what each dataplane must show, run in the Iptables dataplane (kube-proxy's rules) and in
//! BPF in its Tunnel and DSR modes. Every cell sends real traffic and asserts the source address
//! the backend saw (the echo server answers with the peer address it accepted), or how the
//! probe failed. Then the yaobank, VXLAN and live-switch scenarios.
//!
//! Root only (namespaces, iptables and BPF in them); run by CI as root. Each test builds its own lab with
//! a unique name and takes it down on drop, even when it fails.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{From, TestLab, WORKLOADS, peer, skip_unless_root};

const NODE_1: &str = "10.224.0.4";
const NODE_2: &str = "10.224.0.5";
const CLIENT: &str = "203.0.113.10";

const NODE_3: &str = "10.224.0.6";
const NODES: [&str; 3] = [NODE_1, NODE_2, NODE_3];

/// The dataplanes the matrix runs in, each on a lab of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dataplane {
    /// kube-proxy's rules (the lab's default).
    Iptables,
    /// BPF, `bpfExternalServiceMode: Tunnel` (the default): an external flow whose backend is
    /// on another node goes there in VXLAN and its replies come back the same way.
    BpfTunnel,
    /// BPF, `bpfExternalServiceMode: DSR`: the backend's node answers the client directly.
    BpfDsr,
}

/// Who the backend must see as the source, or how the probe must fail.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Answered; the backend saw this client pod's address.
    Pod(&'static str),
    /// Answered; the backend saw this address.
    Addr(&'static str),
    /// Answered; the backend saw one of the nodes' addresses (which one depends on the ECMP
    /// hash of the router).
    AnyNode,
    /// The probe fails with this exit code (3 refused or reset, 4 timeout).
    Exit(i32),
}

/// Where a probe goes.
#[derive(Clone, Copy, Debug)]
enum Dest {
    /// The Service's ClusterIP and port.
    ClusterIp(&'static str, u16),
    /// A node's address and a NodePort.
    NodePort(&'static str, u16),
    /// The Service's LoadBalancer IP and port.
    LoadBalancer(&'static str, u16),
}

/// One row of the matrix: a probe and what each dataplane must show. `bpf` holds for Tunnel
/// and DSR alike: the client's address is kept on every node either way, and the probe's
/// socket is connected, so an answer also proves the reply came from the address it dialled
/// (the service address), whichever node sent it.
struct Cell {
    name: &'static str,
    from: From,
    proto: &'static str,
    to: Dest,
    iptables: Want,
    bpf: Want,
    /// Probes of the cell (new connections; through ECMP they land on different nodes).
    repeat: usize,
}

fn cells() -> Vec<Cell> {
    use Dest::{ClusterIp, LoadBalancer, NodePort};
    use Want::{Addr, AnyNode, Exit, Pod};
    let cell = |name, from, proto, to, iptables, bpf| Cell {
        name,
        from,
        proto,
        to,
        iptables,
        bpf,
        repeat: 1,
    };
    vec![
        // In BPF mode pods' TCP goes through connect-time load balancing, UDP through TC.
        cell(
            "pod -> ClusterIP, backend on the same node: pod IP",
            From::Pod("client-1"),
            "tcp",
            ClusterIp("echo", 80),
            Pod("client-1"),
            Pod("client-1"),
        ),
        cell(
            "pod -> ClusterIP, backend on another node: pod IP",
            From::Pod("client-2"),
            "tcp",
            ClusterIp("echo", 80),
            Pod("client-2"),
            Pod("client-2"),
        ),
        cell(
            "pod -> ClusterIP over UDP, backend on another node: pod IP",
            From::Pod("client-2"),
            "udp",
            ClusterIp("echo", 53),
            Pod("client-2"),
            Pod("client-2"),
        ),
        cell(
            "node -> ClusterIP: the node's IP",
            From::Node("node-2"),
            "tcp",
            ClusterIp("echo", 80),
            Addr(NODE_2),
            Addr(NODE_2),
        ),
        cell(
            "client -> NodePort, backend on that node",
            From::Client,
            "tcp",
            NodePort(NODE_1, 30080),
            Addr(NODE_1),
            Addr(CLIENT),
        ),
        cell(
            "client -> NodePort on node-2, backend on node-1",
            From::Client,
            "tcp",
            NodePort(NODE_2, 30080),
            Addr(NODE_2),
            Addr(CLIENT),
        ),
        cell(
            "client -> NodePort on node-3, backend on node-1",
            From::Client,
            "tcp",
            NodePort(NODE_3, 30080),
            Addr(NODE_3),
            Addr(CLIENT),
        ),
        cell(
            "client -> UDP NodePort, backend on that node",
            From::Client,
            "udp",
            NodePort(NODE_1, 30053),
            Addr(NODE_1),
            Addr(CLIENT),
        ),
        cell(
            "client -> UDP NodePort on node-2, backend on node-1",
            From::Client,
            "udp",
            NodePort(NODE_2, 30053),
            Addr(NODE_2),
            Addr(CLIENT),
        ),
        Cell {
            repeat: 6,
            ..cell(
                "client -> LoadBalancer IP (ECMP over the nodes)",
                From::Client,
                "tcp",
                LoadBalancer("echo-lb", 80),
                AnyNode,
                Addr(CLIENT),
            )
        },
        Cell {
            repeat: 4,
            ..cell(
                "client -> UDP LoadBalancer IP (ECMP over the nodes)",
                From::Client,
                "udp",
                LoadBalancer("echo-udp", 53),
                AnyNode,
                Addr(CLIENT),
            )
        },
        cell(
            "client -> NodePort, Local policy, backend on that node",
            From::Client,
            "tcp",
            NodePort(NODE_1, 30081),
            Addr(CLIENT),
            Addr(CLIENT),
        ),
        // kube-proxy drops (the client times out); BPF answers the SYN with a RST.
        cell(
            "client -> NodePort, Local policy, no local backend",
            From::Client,
            "tcp",
            NodePort(NODE_2, 30081),
            Exit(4),
            Exit(3),
        ),
        cell(
            "pod -> ClusterIP without endpoints: refused",
            From::Pod("client-1"),
            "tcp",
            ClusterIp("empty", 80),
            Exit(3),
            Exit(3),
        ),
        // kube-proxy masquerades a hairpin to the node; BPF keeps the pod's own address.
        cell(
            "pod -> its own Service (hairpin)",
            From::Pod("echo-1"),
            "tcp",
            ClusterIp("echo", 80),
            Addr(NODE_1),
            Pod("echo-1"),
        ),
    ]
}

/// A lab for the matrix in `dataplane` (ECMP LoadBalancer routing), with `extra` arguments to
/// `up` (`--datastore etcd`).
fn matrix_lab(prefix: &str, dataplane: Dataplane, extra: &[&str]) -> TestLab {
    let mut args: Vec<&str> = match dataplane {
        Dataplane::Iptables => vec![],
        Dataplane::BpfTunnel | Dataplane::BpfDsr => vec!["--dataplane", "bpf"],
    };
    args.extend_from_slice(extra);
    TestLab::up(prefix, &args)
}

/// Runs every cell and the checks that are not single probes (DNS, session affinity,
/// healthCheckNodePort, what each dataplane leaves in the node) on `lab`, brought up for
/// `dataplane` by [`matrix_lab`].
fn run_matrix(lab: TestLab, dataplane: Dataplane) {
    if dataplane == Dataplane::BpfDsr {
        lab.margayctl(&[
            "patch",
            "felixconfiguration",
            "default",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"bpfExternalServiceMode":"DSR"}}"#,
        ]);
    }
    // `apply` returns once every agent has programmed it (the DSR setting included).
    lab.apply(WORKLOADS);
    let nodes = lab.ok(&["get", "nodes", "-o", "wide"]);
    let want_dp = if dataplane == Dataplane::Iptables {
        " Iptables"
    } else {
        " BPF"
    };
    assert_eq!(
        nodes.matches(want_dp).count(),
        3,
        "every node runs {dataplane:?}:\n{nodes}"
    );

    let ip = |pod: &str| lab.jsonpath(&["pod", pod, "-n", "matrix"], "{.status.podIP}");
    let service = |svc: &str, template: &str| lab.jsonpath(&["svc", svc, "-n", "matrix"], template);
    let mut failures = Vec::new();
    let mut report = |cell: &str, ok: bool, got: &str, want: &dyn std::fmt::Debug| {
        println!(
            "{dataplane:?} {cell:<64} {} ({got})",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            failures.push(format!("{cell}: wanted {want:?}, got {got}"));
        }
    };

    for cell in cells() {
        let want = match dataplane {
            Dataplane::Iptables => cell.iptables,
            Dataplane::BpfTunnel | Dataplane::BpfDsr => cell.bpf,
        };
        let target = match cell.to {
            Dest::ClusterIp(svc, port) => format!("{}:{port}", service(svc, "{.spec.clusterIP}")),
            Dest::NodePort(node, port) => format!("{node}:{port}"),
            Dest::LoadBalancer(svc, port) => format!(
                "{}:{port}",
                service(svc, "{.status.loadBalancer.ingress[0].ip}")
            ),
        };
        for i in 0..cell.repeat {
            let (code, line) = lab.probe(&cell.from, cell.proto, &target);
            let source = peer(&line);
            let ok = match want {
                Want::Pod(pod) => code == 0 && source == ip(pod),
                Want::Addr(addr) => code == 0 && source == addr,
                Want::AnyNode => code == 0 && NODES.contains(&source),
                Want::Exit(expected) => code == expected,
            };
            let name = if cell.repeat > 1 {
                format!("{} #{i}", cell.name)
            } else {
                cell.name.to_owned()
            };
            report(
                &format!("{name} [{} {target}]", cell.proto),
                ok,
                &format!("exit {code}: {line}"),
                &want,
            );
        }
    }

    // Cluster DNS: a real resolver (glibc) asks dnsmasq through the kube-dns ClusterIP over
    // UDP, by full name and through the search path.
    let echo = service("echo", "{.spec.clusterIP}");
    for name in ["echo.matrix.svc.cluster.local", "echo"] {
        let dns = lab.run(&[
            "exec", "-n", "matrix", "client-1", "--", "getent", "hosts", name,
        ]);
        let answer = String::from_utf8_lossy(&dns.stdout).trim().to_owned();
        report(
            &format!("pod -> kube-dns (UDP): {name}"),
            dns.status.success() && answer.split_whitespace().next() == Some(echo.as_str()),
            &answer,
            &echo,
        );
    }

    // Session affinity ClientIP: every connection from one client lands on the same backend
    // (two backends, on node-2 and node-3). BPF: through TC (connect-time LB leaves affinity
    // frontends alone), with the choice in the affinity map.
    let sticky = format!("{}:80", service("sticky", "{.spec.clusterIP}"));
    let backends: std::collections::BTreeSet<String> = (0..6)
        .map(|_| {
            let (code, line) = lab.probe(&From::Pod("client-1"), "tcp", &sticky);
            if code == 0 {
                line.split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned()
            } else {
                format!("exit {code}: {line}")
            }
        })
        .collect();
    report(
        "session affinity ClientIP: one backend for 6 connections",
        backends.len() == 1 && backends.iter().all(|b| b.starts_with("echo-2")),
        &format!("{backends:?}"),
        &"one of echo-2a, echo-2b",
    );

    // healthCheckNodePort: 200 where a local endpoint exists, 503 elsewhere (answered by the
    // agent in both dataplanes).
    let hc = service("echo-lb-local", "{.spec.healthCheckNodePort}");
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
        report(
            &format!("healthCheckNodePort on {node}"),
            got == want,
            &got,
            &want,
        );
    }

    // What each dataplane leaves in the node, seen with the node's own tools.
    let saved = lab.ok(&["node", "exec", "node-1", "--", "iptables-save"]);
    let datastore = lab.datastore_url();
    let margayctl = |args: &[&str]| lab.margayctl_at(&datastore, args);
    match dataplane {
        Dataplane::Iptables => {
            report(
                "kube-proxy's rules in place",
                saved.contains("KUBE-SERVICES"),
                "iptables-save",
                &"KUBE-SERVICES",
            );
            let out = margayctl(&["bpf", "nat", "dump", "--node", "node-1"]);
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            report(
                "margayctl bpf nat dump: no maps in Iptables mode",
                !out.status.success()
                    && err
                        == "Error: node node-1 runs the Iptables dataplane, not BPF: it has no BPF maps (margayctl node status node-1 says why)",
                &err,
                &"a clear error",
            );
        }
        Dataplane::BpfTunnel | Dataplane::BpfDsr => {
            // bpfKubeProxyIptablesCleanupEnabled defaults to true.
            report(
                "no kube-proxy rule left",
                !saved.contains("KUBE-"),
                "iptables-save",
                &"no KUBE-*",
            );
            // The NodePort flows tunnelled from node-2 and node-3 are still in node-1's
            // conntrack: their pairs say whether replies went back through the tunnel or
            // straight to the client.
            let out = margayctl(&["bpf", "conntrack", "dump", "--node", "node-1", "-o", "json"]);
            let entries: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            let tunnelled: Vec<&serde_json::Value> = entries
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| {
                    e["type"] == "nat-forward"
                        && e["client"].as_str().is_some_and(|c| c.starts_with(CLIENT))
                        && e["flags"]
                            .as_array()
                            .is_some_and(|f| f.contains(&"from-tunnel".into()))
                })
                .collect();
            let dsr = tunnelled
                .iter()
                .filter(|e| {
                    e["flags"]
                        .as_array()
                        .is_some_and(|f| f.contains(&"dsr".into()))
                })
                .count();
            let want_dsr = dataplane == Dataplane::BpfDsr;
            report(
                "node-1's conntrack: the tunnelled flows' replies mode",
                !tunnelled.is_empty()
                    && (dsr == tunnelled.len()) == want_dsr
                    && (dsr == 0) != want_dsr,
                &format!("{} tunnelled pairs, {dsr} DSR", tunnelled.len()),
                &if want_dsr { "all DSR" } else { "none DSR" },
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{dataplane:?} matrix cells failed:\n{}",
        failures.join("\n")
    );
}

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
    switch("BPF");
    wait_for("BPF");
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
    switch("Iptables");
    wait_for("Iptables");
    let out = stream.wait_with_output().expect("stream");
    let answers = String::from_utf8_lossy(&out.stdout);
    let failures = String::from_utf8_lossy(&out.stderr);
    let ok = answers.lines().count();
    let failed = failures.lines().filter(|l| !l.trim().is_empty()).count();
    let sources: std::collections::BTreeSet<&str> = answers.lines().map(peer).collect();
    println!(
        "new connections during the switches: {ok} answered, {failed} failed; sources seen {sources:?}"
    );
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
