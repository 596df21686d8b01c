//! The connectivity matrix: one table of cells (who probes what, over TCP or UDP) with what each
//! dataplane must show, run by tests/matrix.rs in the Iptables dataplane and in BPF in its Tunnel
//! and DSR modes, and by tests/wireguard.rs with WireGuard on in both dataplanes. Every cell
//! sends real traffic and asserts the source address the backend saw (the echo server answers
//! with the peer address it accepted), or how the probe failed.

use std::collections::BTreeMap;

use super::{CLIENT, From, NODE_1, NODE_2, TestLab, WORKLOADS, peer};

pub const NODE_3: &str = "10.224.0.6";
pub const NODES: [&str; 3] = [NODE_1, NODE_2, NODE_3];

/// The dataplanes the matrix runs in, each on a lab of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
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
    /// Answered; the backend (on node-1) saw what this other node sends from: its address, or,
    /// with WireGuard on, its WireGuard interface address (the packet leaves through the
    /// tunnel, and source selection and MASQUERADE take the outgoing interface's address, as in
    /// Calico).
    NodeSource(&'static str),
    /// Answered; the backend saw one of the nodes' sources (which node depends on the ECMP
    /// hash of the router): node-1's address, or another node's [`Want::NodeSource`].
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
    /// A pod's own address and a port.
    Pod(&'static str, u16),
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
    use Want::{Addr, AnyNode, Exit, NodeSource, Pod};
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
            "pod -> pod on another node: pod IP",
            From::Pod("client-2"),
            "tcp",
            Dest::Pod("echo-1", 8080),
            Pod("client-2"),
            Pod("client-2"),
        ),
        cell(
            "node -> ClusterIP, backend on another node: the node's source",
            From::Node("node-2"),
            "tcp",
            ClusterIp("echo", 80),
            NodeSource(NODE_2),
            NodeSource(NODE_2),
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
            NodeSource(NODE_2),
            Addr(CLIENT),
        ),
        cell(
            "client -> NodePort on node-3, backend on node-1",
            From::Client,
            "tcp",
            NodePort(NODE_3, 30080),
            NodeSource(NODE_3),
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
            NodeSource(NODE_2),
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
pub fn matrix_lab(prefix: &str, dataplane: Dataplane, extra: &[&str]) -> TestLab {
    let mut args: Vec<&str> = match dataplane {
        Dataplane::Iptables => vec![],
        Dataplane::BpfTunnel | Dataplane::BpfDsr => vec!["--dataplane", "bpf"],
    };
    args.extend_from_slice(extra);
    TestLab::up(prefix, &args)
}

/// Sets `lab` (brought up for `dataplane` by [`matrix_lab`]) up for the matrix, runs it and
/// fails with every failed cell.
pub fn run_matrix(lab: TestLab, dataplane: Dataplane) {
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
    let failures = matrix_failures(&lab, dataplane, None);
    assert!(
        failures.is_empty(),
        "{dataplane:?} matrix cells failed:\n{}",
        failures.join("\n")
    );
}

/// Runs every cell and the checks that are not single probes (DNS, session affinity,
/// healthCheckNodePort, what each dataplane leaves in the node) on `lab`, which runs
/// `dataplane` with [`WORKLOADS`] applied. `wireguard`: WireGuard is on, and these are the
/// nodes' WireGuard interface addresses by node address (what [`Want::NodeSource`] cells must
/// show). Prints every cell; returns the failed ones.
pub fn matrix_failures(
    lab: &TestLab,
    dataplane: Dataplane,
    wireguard: Option<&BTreeMap<String, String>>,
) -> Vec<String> {
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
    let label = match wireguard {
        Some(_) => format!("{dataplane:?}+WireGuard"),
        None => format!("{dataplane:?}"),
    };
    // What a node other than node-1 (the backend's) sends from: see [`Want::NodeSource`].
    let node_source = |node: &'static str| -> String {
        match wireguard {
            Some(tunnel) if node != NODE_1 => tunnel
                .get(node)
                .cloned()
                .unwrap_or_else(|| panic!("no WireGuard interface address for {node}: {tunnel:?}")),
            _ => node.to_owned(),
        }
    };

    let ip = |pod: &str| lab.jsonpath(&["pod", pod, "-n", "matrix"], "{.status.podIP}");
    let service = |svc: &str, template: &str| lab.jsonpath(&["svc", svc, "-n", "matrix"], template);
    let mut failures = Vec::new();
    let mut report = |cell: &str, ok: bool, got: &str, want: &dyn std::fmt::Debug| {
        println!(
            "{label} {cell:<64} {} ({got})",
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
            Dest::Pod(pod, port) => format!("{}:{port}", ip(pod)),
        };
        for i in 0..cell.repeat {
            let (code, line) = lab.probe(&cell.from, cell.proto, &target);
            let source = peer(&line);
            let ok = match want {
                Want::Pod(pod) => code == 0 && source == ip(pod),
                Want::Addr(addr) => code == 0 && source == addr,
                Want::NodeSource(node) => code == 0 && source == node_source(node),
                Want::AnyNode => code == 0 && NODES.iter().any(|n| source == node_source(n)),
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
    failures
}
