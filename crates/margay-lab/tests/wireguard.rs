//! WireGuard between nodes on a real lab: the agents' userspace tunnels (boringtun over TUN)
//! carry all pod traffic between nodes while `wireguardEnabled` is on, as a capture on the
//! underlay shows; turning it off removes every trace (the seed's `margayctl get node NODE -o
//! yaml | grep wireguard` prints nothing) and traffic is plain again; a node that cannot run
//! WireGuard is reached in the clear; toggling while requests flow loses none once settled.
//!
//! Root only (namespaces, TUN, tcpdump); run by CI as root. Each test builds its own lab with a
//! unique name and takes it down on drop, even when it fails. Traffic is generated inside pods
//! by this test binary itself, re-executed there (see [`helper`]), so no tool beyond `tcpdump`
//! and `curl` is needed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

mod common;

use common::matrix::{Dataplane, matrix_failures};
use common::{From, NODE_2, TestLab, WORKLOADS, peer, skip_unless_root};

// === what these tests add to the harness ===

impl TestLab {
    /// Patches FelixConfiguration `name` (the seed's step, with calicoctl's flags).
    fn patch_felix(&self, name: &str, spec: &str) {
        let patch = format!(r#"{{"spec":{spec}}}"#);
        let out = self.margayctl(&[
            "--allow-version-mismatch",
            "patch",
            "felixconfiguration",
            name,
            "--type=merge",
            "-p",
            &patch,
        ]);
        assert!(out.contains("Successfully patched"), "{out}");
    }

    fn set_wireguard(&self, on: bool) {
        self.patch_felix("default", &format!(r#"{{"wireguardEnabled":{on}}}"#));
    }

    fn nodes(&self) -> Vec<Value> {
        let text = self.ok(&["get", "nodes", "-o", "json"]);
        let v: Value = serde_json::from_str(&text).expect("nodes json");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// `ip ARGS` in the namespace of `node`; returns stdout ("" when the command fails).
    fn ip(&self, node: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(format!("{}-{node}", self.name))
            .args(args)
            .output()
            .expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the kernel makes a `wireguard` link in `node`'s namespace (a probe link, removed
    /// at once): what the agents there should choose.
    fn kernel_has_wireguard(&self, node: &str) -> bool {
        let made = Command::new("ip")
            .args(["-n", &format!("{}-{node}", self.name)])
            .args(["link", "add", "mgwgprobe", "type", "wireguard"])
            .output()
            .expect("ip link add");
        if made.status.success() {
            let _ = Command::new("ip")
                .args(["-n", &format!("{}-{node}", self.name)])
                .args(["link", "del", "mgwgprobe"])
                .output();
        }
        made.status.success()
    }

    /// Each node's published key and tunnel address.
    fn wireguard_fields(&self) -> BTreeMap<String, (Option<String>, Option<String>)> {
        self.nodes()
            .iter()
            .map(|n| {
                (
                    n["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    (
                        n["status"]["wireguardPublicKey"]
                            .as_str()
                            .map(str::to_owned),
                        n["spec"]["wireguard"]["interfaceIPv4Address"]
                            .as_str()
                            .map(str::to_owned),
                    ),
                )
            })
            .collect()
    }

    /// Waits until the nodes in `on` have keys and route every other keyed node's blocks through
    /// their tunnel, and the nodes not in `on` have no key, no interface and no rule.
    fn wait_for_wireguard(&self, on: &[&str]) -> Duration {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(30);
        loop {
            match self.wireguard_state_is(on) {
                Ok(()) => return started.elapsed(),
                Err(why) if Instant::now() > deadline => {
                    panic!("WireGuard did not settle within 30 s: {why}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn wireguard_state_is(&self, on: &[&str]) -> Result<(), String> {
        let fields = self.wireguard_fields();
        let blocks = self.blocks();
        for (node, (key, addr)) in &fields {
            let want = on.contains(&node.as_str());
            if want != key.is_some() || want != addr.is_some() {
                return Err(format!("{node}: key {key:?}, address {addr:?}"));
            }
            let link = self.ip(node, &["-d", "link", "show", "dev", "wireguard.cali"]);
            let rule = self.ip(node, &["rule", "show", "pref", "99"]);
            if !want {
                // An interface of another kind with the name is not the agent's.
                if link.contains(" tun ") || rule.contains("lookup 1") {
                    return Err(format!("{node}: interface or rule left: {link} {rule}"));
                }
                continue;
            }
            if !rule.contains("not from all fwmark 0x100000/0x100000 lookup 1") {
                return Err(format!("{node}: no rule yet: {rule:?}"));
            }
            let table = self.ip(node, &["route", "show", "table", "1"]);
            for (cidr, owner) in &blocks {
                let tunnelled = owner != node && on.contains(&owner.as_str());
                if tunnelled != table.contains(&format!("{cidr} dev wireguard.cali")) {
                    return Err(format!(
                        "{node}: table 1 is {table:?}; block {cidr} of {owner}"
                    ));
                }
            }
        }
        // Every agent has programmed everything written so far.
        let revisions: Vec<u64> = fields
            .keys()
            .filter_map(|n| {
                let path = format!("/run/margay-lab/{}/agents/{n}.json", self.name);
                let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
                v["syncedRevision"].as_u64()
            })
            .collect();
        let nodes_revision = self
            .nodes()
            .iter()
            .filter_map(|n| {
                n["metadata"]["resourceVersion"]
                    .as_str()?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        if revisions.len() != fields.len() || revisions.iter().any(|r| *r < nodes_revision) {
            return Err(format!(
                "agents at {revisions:?}, nodes at {nodes_revision}"
            ));
        }
        Ok(())
    }

    /// Block CIDR -> node.
    fn blocks(&self) -> BTreeMap<String, String> {
        let text = self.margayctl(&["get", "ipamblocks", "-o", "json"]);
        let v: Value = serde_json::from_str(&text).expect("blocks json");
        let items = v["items"].as_array().cloned().unwrap_or_else(|| vec![v]);
        items
            .iter()
            .filter_map(|b| {
                Some((
                    b["spec"]["cidr"].as_str()?.to_owned(),
                    b["spec"]["affinity"]
                        .as_str()?
                        .strip_prefix("host:")?
                        .to_owned(),
                ))
            })
            .collect()
    }

    fn pod_ip(&self, ns: &str, pod: &str) -> String {
        self.jsonpath(&["pod", pod, "-n", ns], "{.status.podIP}")
    }

    /// Runs this test binary's [`helper`] inside `pod` with `role`; returns its `WG|` lines.
    fn helper(&self, ns: &str, pod: &str, role: &str) -> Vec<String> {
        let out = self.helper_command(ns, pod, role).output().expect("helper");
        helper_lines(&out)
    }

    fn helper_command(&self, ns: &str, pod: &str, role: &str) -> Command {
        self.helper_command_at(&["exec", "-n", ns, pod], role)
    }

    /// The helper on the external client (203.0.113.10).
    fn client_helper_command(&self, role: &str) -> Command {
        self.helper_command_at(&["client"], role)
    }

    /// The helper run by `margay-lab ARGS -- ...` (`exec -n NS POD` or `client`).
    fn helper_command_at(&self, at: &[&str], role: &str) -> Command {
        let exe = std::env::current_exe().expect("test binary");
        let mut cmd = Command::new(self.bin_dir.join("margay-lab"));
        cmd.args(["--name", &self.name])
            .args(at)
            .args(["--", "env"])
            .arg(format!("MARGAY_WG_HELPER={role}"))
            .arg(exe)
            .args(["helper", "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"]);
        cmd
    }

    /// Starts a capture on the underlay bridge.
    fn capture(&self, filter: &str, ascii: bool) -> Capture {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("capture.txt");
        let err = dir.path().join("capture.err");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}-underlay", self.name)])
            .args(["tcpdump", "-n", "-l", "-U", "-i", "br0"]);
        if ascii {
            cmd.arg("-A");
        }
        let child = cmd
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("capture file"))
            .stderr(std::fs::File::create(&err).expect("capture err"))
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("listening on")
        {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Capture {
            child,
            out,
            _dir: dir,
        }
    }
}

/// A running tcpdump on the underlay.
struct Capture {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// Stops the capture; returns what it printed.
    fn stop(mut self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

/// The packet lines of a capture (`HH:MM:SS.us IP a.b.c.d.port > e.f.g.h.port: ...`).
fn packets(capture: &str) -> Vec<&str> {
    capture
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("IP"))
        .collect()
}

/// Packets that are not WireGuard between two node addresses.
fn not_wireguard<'a>(packets: &[&'a str], port: u16) -> Vec<&'a str> {
    packets
        .iter()
        .copied()
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let node_port = |w: &str| {
                w.trim_end_matches(':').starts_with("10.224.0.")
                    && w.trim_end_matches(':').ends_with(&format!(".{port}"))
            };
            !(words.len() > 5 && node_port(words[2]) && node_port(words[4]) && words[5] == "UDP,")
        })
        .collect()
}

fn helper_lines(out: &Output) -> Vec<String> {
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = wg_lines(&text);
    assert!(
        !lines.is_empty(),
        "the helper printed nothing: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

/// The helper's own lines (the test harness may print `test helper ... ` before the first).
fn wg_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| Some(l[l.find("WG|")? + 3..].to_owned()))
        .collect()
}

const NODE_IP: [(&str, &str); 3] = [
    ("node-1", "10.224.0.4"),
    ("node-2", "10.224.0.5"),
    ("node-3", "10.224.0.6"),
];

/// Pod traffic between every pair of nodes, both ways, TCP and UDP, straight to pod addresses:
/// each answer must show the client pod's own address (nothing is NATed on the way).
fn cross_node_traffic(lab: &TestLab) {
    let echo1 = lab.pod_ip("matrix", "echo-1");
    let echo2 = lab.pod_ip("matrix", "echo-2a");
    let echo3 = lab.pod_ip("matrix", "echo-2b");
    for (from, to, proto) in [
        ("client-2", &echo1, "tcp"),
        ("client-3", &echo1, "tcp"),
        ("client-1", &echo2, "tcp"),
        ("client-3", &echo2, "tcp"),
        ("client-1", &echo3, "tcp"),
        ("client-2", &echo3, "tcp"),
        ("client-2", &echo1, "udp"),
    ] {
        let target = if proto == "udp" {
            format!("{to}:5353")
        } else {
            format!("{to}:8080")
        };
        let (code, line) = lab.probe(&From::Pod(pod_name(from)), proto, &target);
        let me = lab.pod_ip("matrix", from);
        assert!(
            code == 0 && peer(&line) == me,
            "{from} -> {target} ({proto}): exit {code}: {line}"
        );
    }
}

fn pod_name(name: &str) -> &'static str {
    match name {
        "client-1" => "client-1",
        "client-2" => "client-2",
        "client-3" => "client-3",
        "echo-1" => "echo-1",
        _ => panic!("unknown pod {name}"),
    }
}

/// A yaobank pod and a client pod on different nodes: (client pod, URL).
fn cross_node_yaobank(lab: &TestLab) -> (&'static str, String) {
    let text = lab.ok(&["get", "pods", "-n", "yaobank", "-o", "json"]);
    let pods: Value = serde_json::from_str(&text).expect("pods json");
    for p in pods["items"].as_array().into_iter().flatten() {
        let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
        let ip = p["status"]["podIP"].as_str().unwrap_or_default();
        let app = p["metadata"]["labels"]["app"].as_str().unwrap_or_default();
        if ip.is_empty() || !(app == "customer" || app == "summary") {
            continue;
        }
        let client = if node == "node-1" {
            "client-2"
        } else {
            "client-1"
        };
        return (client, format!("http://{ip}:80/"));
    }
    panic!("no yaobank customer or summary pod: {text}");
}

fn curl_from_pod(lab: &TestLab, pod: &str, url: &str) -> String {
    let out = lab.run(&[
        "exec", "-n", "matrix", pod, "--", "curl", "-s", "-m", "5", url,
    ]);
    assert!(
        out.status.success(),
        "curl {url} from {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The whole story of the issue: on, encrypted, matrix passes; off, every trace gone, plain.
#[test]
fn wireguard_encrypts_pod_traffic_between_nodes_and_turns_off_without_a_trace() {
    if skip_unless_root(
        "wireguard_encrypts_pod_traffic_between_nodes_and_turns_off_without_a_trace",
    ) {
        return;
    }
    let lab = TestLab::up("wg", &["--lb-mode", "node-2"]);
    lab.apply(WORKLOADS);
    lab.apply_example("examples/yaobank.yaml");
    lab.apply_example("examples/yaobank-customer-lb.yaml");

    // The seed starts from a cluster with WireGuard on.
    lab.set_wireguard(true);
    let settle = lab.wait_for_wireguard(&["node-1", "node-2", "node-3"]);
    println!("WireGuard on everywhere after {settle:?}");
    let fields = lab.wireguard_fields();
    for (node, (key, addr)) in &fields {
        let key = key.as_deref().unwrap_or_default();
        assert_eq!(key.len(), 44, "{node}: public key {key:?}");
        println!("{node}: key {key}, interface address {addr:?}");
    }
    // The key file: 0600, kept by the agent under the lab's state directory.
    let key_file = format!("/run/margay-lab/{}/nodes/node-1/wireguard.key", lab.name);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file)
            .expect("key file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{key_file}");
    // Which WireGuard: the kernel's where it can make a `wireguard` link (tried in the node's
    // namespace), boringtun otherwise; the agent says which in its log and the Node's status.
    let kernel = lab.kernel_has_wireguard("node-1");
    for (node, _) in NODE_IP {
        let device = lab.jsonpath(&["node", node], "{.status.dataplane.wireguardDevice}");
        let log = std::fs::read_to_string(format!(
            "/run/margay-lab/{}/logs/agent-{node}.log",
            lab.name
        ))
        .expect("agent log");
        println!("{node}: wireguardDevice {device:?}");
        if kernel {
            assert_eq!(device, "kernel", "{node}");
        } else {
            assert_eq!(
                device,
                "userspace (boringtun over TUN): this kernel has no WireGuard (ip link add ... type wireguard: Unknown device type)",
                "{node}"
            );
            assert!(
                log.contains(
                    "no kernel WireGuard here: falling back to userspace WireGuard (boringtun)"
                ) && log.contains("Unknown device type"),
                "{node}'s log does not say why it runs boringtun"
            );
        }
        assert!(
            log.contains(&format!("implementation={device}"))
                || log.contains(&format!("implementation=\"{device}\"")),
            "{node}'s log does not name the implementation {device:?}"
        );
    }
    let nodes_table = lab.margayctl(&["node", "status"]);
    let want_column = if kernel {
        "on (kernel)"
    } else {
        "on (userspace)"
    };
    assert_eq!(
        nodes_table.matches(want_column).count(),
        3,
        "margayctl node status:\n{nodes_table}"
    );
    // The interface: MTU 1500 - 60, the node's tunnel address.
    let link = lab.ip("node-1", &["-d", "link", "show", "dev", "wireguard.cali"]);
    let kind = if kernel { "wireguard" } else { "tun" };
    assert!(link.contains("mtu 1440") && link.contains(kind), "{link}");
    let addr = lab.ip(
        "node-1",
        &["-4", "-br", "addr", "show", "dev", "wireguard.cali"],
    );
    let tunnel1 = fields["node-1"].1.clone().unwrap_or_default();
    assert!(addr.contains(&format!("{tunnel1}/32")), "{addr}");

    // On the underlay, between nodes, only WireGuard's UDP (the router's and the client's own
    // traffic is left out of the filter: it never carries pod traffic between nodes).
    let capture = lab.capture(
        "ip and not host 10.224.0.1 and not host 203.0.113.10",
        false,
    );
    cross_node_traffic(&lab);
    let (client, url) = cross_node_yaobank(&lab);
    let page = curl_from_pod(&lab, client, &url);
    assert!(!page.is_empty(), "yaobank answered nothing");
    let lb = lab.jsonpath(
        &["svc", "yaobank-customer", "-n", "yaobank"],
        "{.status.loadBalancer.ingress[0].ip}",
    );
    let page = lab.ok(&[
        "client",
        "--",
        "curl",
        "-s",
        "-m",
        "5",
        &format!("http://{lb}/"),
    ]);
    assert!(page.contains("Welcome to YAO Bank"), "{page}");
    let text = capture.stop();
    let all = packets(&text);
    let plain = not_wireguard(&all, 51820);
    println!(
        "capture with WireGuard on: {} packets, {} not WireGuard",
        all.len(),
        plain.len()
    );
    assert!(all.len() >= 14, "too few packets captured: {text}");
    assert!(
        plain.is_empty(),
        "traffic between nodes outside the tunnel:\n{}",
        plain.join("\n")
    );

    // The connectivity matrix (tests/matrix.rs's table) with WireGuard on.
    let failures = matrix_failures(
        &lab,
        Dataplane::Iptables,
        Some(&interface_addresses(&fields)),
    );
    assert!(
        failures.is_empty(),
        "matrix cells failed with WireGuard on:\n{}",
        failures.join("\n")
    );

    // The seed turns it off: every trace goes.
    lab.set_wireguard(false);
    let settle = lab.wait_for_wireguard(&[]);
    println!("WireGuard off everywhere after {settle:?}");
    for (node, _) in NODE_IP {
        let yaml = lab.margayctl(&["get", "node", node, "-o", "yaml"]);
        let grep: Vec<&str> = yaml.lines().filter(|l| l.contains("wireguard")).collect();
        assert!(grep.is_empty(), "{node} still mentions wireguard: {grep:?}");
        assert!(lab.ip(node, &["route", "show", "table", "1"]).is_empty());
    }
    let blocks = lab.margayctl(&["get", "ipamblocks", "-o", "yaml"]);
    assert!(
        !blocks.contains("wireguard-tunnel-addr"),
        "tunnel addresses not released: {blocks}"
    );

    // Now the plain HTTP of yaobank crosses the underlay.
    let capture = lab.capture("ip and not host 10.224.0.1 and not host 203.0.113.10", true);
    cross_node_traffic(&lab);
    let page = curl_from_pod(&lab, client, &url);
    assert!(!page.is_empty());
    let text = capture.stop();
    assert!(
        text.contains("GET / HTTP/1.1"),
        "no plain HTTP on the underlay after WireGuard was turned off:\n{text}"
    );
    assert!(
        !text.contains(".51820: UDP"),
        "WireGuard traffic after it was turned off:\n{text}"
    );

    // On again: the same keys (kept in the key files), and traffic flows.
    lab.set_wireguard(true);
    lab.wait_for_wireguard(&["node-1", "node-2", "node-3"]);
    let again = lab.wireguard_fields();
    for (node, (key, _)) in &again {
        assert_eq!(key, &fields[node].0, "{node}'s key changed");
    }
    cross_node_traffic(&lab);
}

/// The nodes' WireGuard interface addresses by node address, from [`TestLab::wireguard_fields`]
/// (what the matrix's cells expect where traffic from a node leaves through the tunnel).
fn interface_addresses(
    fields: &BTreeMap<String, (Option<String>, Option<String>)>,
) -> BTreeMap<String, String> {
    NODE_IP
        .iter()
        .filter_map(|(node, ip)| Some(((*ip).to_owned(), fields.get(*node)?.1.clone()?)))
        .collect()
}

/// A NodePort in front of echo-1 (node-1) for bulk transfers: the helper's sink (5201) and
/// source (5202) run in that pod.
const BULK: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: bulk, namespace: matrix}
spec:
  type: NodePort
  selector: {app: echo}
  ports:
  - {name: sink, port: 5201, targetPort: 5201, nodePort: 30521}
  - {name: source, port: 5202, targetPort: 5202, nodePort: 30522}
"#;

/// Issue part 4: WireGuard with the BPF dataplane. Pod traffic between nodes and the Tunnel
/// mode's VXLAN between nodes (an external client's NodePort or LoadBalancer flow whose backend
/// is on another node) both go through WireGuard: the underlay carries nothing else between
/// nodes; the client's address still reaches the pod on every node; bulk transfers both ways
/// through the tunnel complete, the client learning the tunnel's MTU (1440 - 50) from the
/// ingress node's ICMP.
#[test]
fn wireguard_in_the_bpf_dataplane_encrypts_pod_traffic_and_the_nodeport_tunnel() {
    if skip_unless_root(
        "wireguard_in_the_bpf_dataplane_encrypts_pod_traffic_and_the_nodeport_tunnel",
    ) {
        return;
    }
    let lab = TestLab::up("wgbx", &["--dataplane", "bpf"]);
    lab.apply(WORKLOADS);
    lab.apply(BULK);
    lab.set_wireguard(true);
    let settle = lab.wait_for_wireguard(&["node-1", "node-2", "node-3"]);
    println!("WireGuard on everywhere after {settle:?}");
    let nodes = lab.ok(&["get", "nodes", "-o", "wide"]);
    assert_eq!(
        nodes.matches(" BPF").count(),
        3,
        "every node runs BPF:\n{nodes}"
    );
    let fields = lab.wireguard_fields();

    // Each agent attached mg_from_wg to its WireGuard device and sends the tunnel to both
    // other nodes into it (its sync summary says so; the pins live in the agent's own mount
    // namespace).
    for (node, _) in NODE_IP {
        let log = format!("/run/margay-lab/{}/logs/agent-{node}.log", lab.name);
        let text = std::fs::read_to_string(&log).expect("agent log");
        assert!(
            text.contains("tunnel to 2 nodes through wireguard.cali"),
            "{node}: the BPF tunnel does not go through WireGuard ({log})"
        );
    }

    // Everything between nodes on the underlay is WireGuard while pod traffic, the whole BPF
    // matrix (NodePorts on nodes without the backend, ECMP LoadBalancer connections) and bulk
    // transfers through node-2's NodePort to node-1 run.
    let capture = lab.capture(
        "ip and not host 10.224.0.1 and not host 203.0.113.10",
        false,
    );
    cross_node_traffic(&lab);
    let failures = matrix_failures(
        &lab,
        Dataplane::BpfTunnel,
        Some(&interface_addresses(&fields)),
    );
    let mut sink = lab
        .helper_command("matrix", "echo-1", "sink:5201:30")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sink");
    std::thread::sleep(Duration::from_millis(500));
    let up = helper_lines(
        &lab.client_helper_command(&format!("send:{NODE_2}:30521:2"))
            .output()
            .expect("send"),
    );
    let _ = sink.kill();
    let _ = sink.wait();
    let mut source = lab
        .helper_command("matrix", "echo-1", "source:5202:2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("source");
    std::thread::sleep(Duration::from_millis(500));
    let down = helper_lines(
        &lab.client_helper_command(&format!("fetch:{NODE_2}:30522"))
            .output()
            .expect("fetch"),
    );
    let _ = source.wait();
    println!("client -> node-2's NodePort -> echo-1 (node-1): {up:?}");
    println!("echo-1 (node-1) -> node-2's NodePort -> client: {down:?}");
    let text = capture.stop();
    let all = packets(&text);
    let plain = not_wireguard(&all, 51820);
    println!(
        "capture with WireGuard on (BPF): {} packets, {} not WireGuard",
        all.len(),
        plain.len()
    );
    assert!(all.len() >= 100, "too few packets captured: {text}");
    assert!(
        plain.is_empty(),
        "traffic between nodes outside WireGuard (VXLAN port 4789 is the BPF tunnel):\n{}",
        plain.join("\n")
    );
    assert!(
        failures.is_empty(),
        "BPF matrix cells failed with WireGuard on:\n{}",
        failures.join("\n")
    );
    // The client's path to node-2 learned the room left in WireGuard for the tunnel: the
    // device's 1440 less the VXLAN tunnel's 50 bytes, from node-2's "fragmentation needed".
    let route = Command::new("ip")
        .args([
            "-n",
            &format!("{}-client", lab.name),
            "route",
            "get",
            NODE_2,
        ])
        .output()
        .expect("ip route get");
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains("mtu 1390"),
        "client's route to node-2: {route}"
    );
}

#[test]
fn a_node_that_cannot_run_wireguard_publishes_no_key_and_is_reached_in_the_clear() {
    if skip_unless_root(
        "a_node_that_cannot_run_wireguard_publishes_no_key_and_is_reached_in_the_clear",
    ) {
        return;
    }
    let lab = TestLab::up("wg", &[]);
    lab.apply(WORKLOADS);
    // Another interface holds the name on node-3: the agent must not take it over.
    let out = Command::new("ip")
        .args(["-n", &format!("{}-node-3", lab.name)])
        .args([
            "link",
            "add",
            "wireguard.cali",
            "type",
            "veth",
            "peer",
            "name",
            "wgblock",
        ])
        .output()
        .expect("ip link add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    lab.set_wireguard(true);
    lab.wait_for_wireguard(&["node-1", "node-2"]);
    let node3 = lab.margayctl(&["get", "node", "node-3", "-o", "json"]);
    let node3: Value = serde_json::from_str(&node3).expect("json");
    let message = node3["status"]["dataplane"]["message"]
        .as_str()
        .unwrap_or_default();
    println!("node-3 says: {message}");
    assert!(
        message.contains("cannot run") && message.contains("wireguard.cali exists"),
        "{message}"
    );
    assert!(node3["status"]["wireguardPublicKey"].is_null());
    // The interface that was there is untouched.
    let link = lab.ip("node-3", &["-d", "link", "show", "dev", "wireguard.cali"]);
    assert!(link.contains("veth"), "{link}");

    // node-1 <-> node-2 in the tunnel, node-1 <-> node-3 in the clear.
    let capture = lab.capture("ip and not host 10.224.0.1", false);
    let echo1 = lab.pod_ip("matrix", "echo-1");
    let echo3 = lab.pod_ip("matrix", "echo-2b");
    for (from, target) in [
        ("client-2", format!("{echo1}:8080")),
        ("client-1", format!("{echo3}:8080")),
        ("client-3", format!("{echo1}:8080")),
    ] {
        let (code, line) = lab.probe(&From::Pod(pod_name(from)), "tcp", &target);
        assert_eq!(code, 0, "{from} -> {target}: {line}");
        assert_eq!(peer(&line), lab.pod_ip("matrix", from));
    }
    let text = capture.stop();
    let all = packets(&text);
    let plain = not_wireguard(&all, 51820);
    assert!(
        plain
            .iter()
            .all(|l| l.contains(&echo3) || l.contains(&lab.pod_ip("matrix", "client-3"))),
        "only node-3's traffic may be plain:\n{}",
        plain.join("\n")
    );
    assert!(
        plain.iter().any(|l| l.contains(&format!("{echo3}.8080"))),
        "node-3's pods are reached in the clear:\n{text}"
    );
    assert!(
        all.len() > plain.len(),
        "node-1 <-> node-2 went through the tunnel:\n{text}"
    );

    // Freed, node-3 joins at the next sync (a Node change wakes every agent).
    let out = Command::new("ip")
        .args(["-n", &format!("{}-node-3", lab.name)])
        .args(["link", "del", "wireguard.cali"])
        .output()
        .expect("ip link del");
    assert!(out.status.success());
    lab.patch_felix("default", r#"{"wireguardKeepAlive":"25s"}"#);
    lab.wait_for_wireguard(&["node-1", "node-2", "node-3"]);
    cross_node_traffic(&lab);
}

/// A restarted agent adopts the tunnel its predecessor made (the interface outlives the agent,
/// with its routes and rule) instead of making a new one: same key, same kind of device (its
/// status says it kept the device of an earlier run), pod traffic between nodes encrypted again.
#[test]
fn a_restarted_agent_adopts_its_wireguard_device() {
    if skip_unless_root("a_restarted_agent_adopts_its_wireguard_device") {
        return;
    }
    let lab = TestLab::up("wgr", &[]);
    lab.apply(WORKLOADS);
    lab.set_wireguard(true);
    lab.wait_for_wireguard(&["node-1", "node-2", "node-3"]);
    let before = lab.wireguard_fields();
    let device = |node: &str| lab.jsonpath(&["node", node], "{.status.dataplane.wireguardDevice}");
    let made = device("node-1");
    let ifindex = |node: &str| {
        let links: Value =
            serde_json::from_str(&lab.ip(node, &["-j", "link", "show", "dev", "wireguard.cali"]))
                .unwrap_or_default();
        links[0]["ifindex"].as_u64()
    };
    let link_before = ifindex("node-1");
    assert!(link_before.is_some(), "no wireguard.cali on node-1");
    lab.ok(&["node", "restart-agent", "node-1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let adopted = loop {
        let now = device("node-1");
        if now != made && !now.is_empty() {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "node-1's status still says {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("node-1 made {made:?}, after the restart {adopted:?}");
    let kind = if lab.kernel_has_wireguard("node-1") {
        "kernel"
    } else {
        "userspace (boringtun over TUN), the device of an earlier run of the agent"
    };
    assert_eq!(adopted, kind);
    assert_eq!(
        ifindex("node-1"),
        link_before,
        "the interface was made again instead of adopted"
    );
    lab.wait_for_wireguard(&["node-1", "node-2", "node-3"]);
    assert_eq!(lab.wireguard_fields(), before, "keys or addresses changed");
    let capture = lab.capture(
        "ip and not host 10.224.0.1 and not host 203.0.113.10",
        false,
    );
    cross_node_traffic(&lab);
    let text = capture.stop();
    let all = packets(&text);
    let plain = not_wireguard(&all, 51820);
    assert!(all.len() >= 14, "too few packets captured: {text}");
    assert!(
        plain.is_empty(),
        "traffic between nodes outside the tunnel after the restart:\n{}",
        plain.join("\n")
    );
}

/// Toggling while a request loop runs: requests may fail while the nodes change over (each
/// node changes when it reads the change, so for a moment one sends in the tunnel what the other
/// no longer decrypts), never after every node has settled.
#[test]
fn toggling_wireguard_while_requests_flow_loses_none_after_it_settles() {
    if skip_unless_root("toggling_wireguard_while_requests_flow_loses_none_after_it_settles") {
        return;
    }
    toggling_wireguard_under_requests("wg", &[], false);
}

/// The same in the BPF dataplane, with a second stream from the external client through
/// node-2's NodePort, whose backend is on node-1: the tunnel between nodes moves into WireGuard
/// and out of it.
#[test]
fn toggling_wireguard_in_the_bpf_dataplane_loses_no_request_after_it_settles() {
    if skip_unless_root("toggling_wireguard_in_the_bpf_dataplane_loses_no_request_after_it_settles")
    {
        return;
    }
    toggling_wireguard_under_requests("wgt", &["--dataplane", "bpf"], true);
}

/// Turns WireGuard on, off, on, off while requests flow one at a time (pod to pod between
/// nodes, and with `through_nodeport` also from the external client through node-2's NodePort
/// to node-1's pod); a request started after a change settled must succeed.
fn toggling_wireguard_under_requests(prefix: &str, up: &[&str], through_nodeport: bool) {
    let lab = TestLab::up(prefix, up);
    lab.apply(WORKLOADS);
    let echo1 = lab.pod_ip("matrix", "echo-1");
    let all = ["node-1", "node-2", "node-3"];
    let seconds = 36;
    let mut loops = vec![(
        "pod client-2 -> pod echo-1",
        lab.helper_command(
            "matrix",
            "client-2",
            &format!("loop:{echo1}:8080:{seconds}"),
        ),
    )];
    if through_nodeport {
        loops.push((
            "client -> node-2's NodePort -> echo-1 on node-1",
            lab.client_helper_command(&format!("loop:{NODE_2}:30080:{seconds}")),
        ));
    }
    let loopers: Vec<(&str, Child)> = loops
        .into_iter()
        .map(|(label, mut cmd)| {
            let child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("request loop");
            (label, child)
        })
        .collect();
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    };
    let mut settled = Vec::new();
    std::thread::sleep(Duration::from_secs(3));
    for (i, on) in [true, false, true, false].into_iter().enumerate() {
        let changed = now_ms();
        lab.set_wireguard(on);
        let took = lab.wait_for_wireguard(if on { &all } else { &[] });
        settled.push((changed, now_ms(), on));
        println!("change {i}: WireGuard {on}, settled after {took:?}");
        std::thread::sleep(Duration::from_secs(5));
    }
    let mut after_settle = Vec::new();
    for (label, mut looper) in loopers {
        let mut stdout = String::new();
        looper
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("read loop output");
        let status = looper.wait().expect("loop");
        assert!(status.success(), "{label}: {stdout}");
        let results: Vec<(u64, bool, String)> = wg_lines(&stdout)
            .iter()
            .filter_map(|l| {
                let mut w = l.splitn(3, ' ');
                Some((
                    w.next()?.parse().ok()?,
                    w.next()? == "ok",
                    w.next().unwrap_or("").to_owned(),
                ))
            })
            .collect();
        assert!(results.len() > 100, "{label}: too few requests: {stdout}");
        let failed: Vec<&(u64, bool, String)> = results.iter().filter(|r| !r.1).collect();
        println!(
            "{label}: {} requests, {} failed: {:?}",
            results.len(),
            failed.len(),
            failed
                .iter()
                .map(|r| (r.0, r.2.as_str()))
                .collect::<Vec<_>>()
        );
        // A request started after a change settled, and before the next change, must succeed.
        for (i, (changed, done, on)) in settled.iter().enumerate() {
            let next = settled.get(i + 1).map_or(u64::MAX, |s| s.0);
            let during = results
                .iter()
                .filter(|r| r.0 >= changed.saturating_sub(1000) && r.0 < *done && !r.1)
                .count();
            let window: Vec<_> = results
                .iter()
                .filter(|r| r.0 >= *done && r.0 < next)
                .collect();
            let bad: Vec<_> = window.iter().filter(|r| !r.1).collect();
            println!(
                "  change {i} (on={on}): {during} failed while it happened; after it settled: {} requests, {} failed",
                window.len(),
                bad.len()
            );
            assert!(!window.is_empty(), "{label}: no request after change {i}");
            after_settle.extend(bad.into_iter().map(|r| format!("{label}: {r:?}")));
        }
    }
    assert!(
        after_settle.is_empty(),
        "requests failed after the change settled: {after_settle:?}"
    );
}

/// Pod-to-pod throughput and request rate between nodes, without and with WireGuard, in both
/// dataplanes (one lab each), printed side by side.
/// `cargo test -p margay-lab --test wireguard -- --ignored --nocapture benchmark`
#[test]
#[ignore = "benchmark"]
fn benchmark_pod_to_pod_with_and_without_wireguard() {
    if skip_unless_root("benchmark_pod_to_pod_with_and_without_wireguard") {
        return;
    }
    let mut rows = Vec::new();
    for (dataplane, up) in [("Iptables", &[][..]), ("BPF", &["--dataplane", "bpf"][..])] {
        let lab = TestLab::up("wgb", up);
        lab.apply(WORKLOADS);
        for row in wireguard_benchmark(&lab) {
            rows.push((dataplane, row));
        }
    }
    println!("\npod-to-pod between nodes (debug build of the agent; 2 cores)");
    println!(
        "{:<10} {:<10} {:<40} requests (connect, read a line, close)",
        "dataplane", "WireGuard", "throughput (one TCP stream, 5 s)"
    );
    for (dataplane, row) in rows {
        println!(
            "{dataplane:<10} {:<10} {:<40} {}",
            if row.wireguard { "on" } else { "off" },
            row.throughput,
            row.requests
        );
    }
}

/// One line of [`wireguard_benchmark`].
struct BenchRow {
    wireguard: bool,
    /// `N Mbit/s (M MB in T s)`
    throughput: String,
    /// `N requests/s (M in T s, F failed)`
    requests: String,
}

/// Measures, on a lab with [`WORKLOADS`], pod-to-pod throughput (client-2 on node-2 to
/// client-1 on node-1, one TCP stream for 5 s) and request rate (connect, read a line, close,
/// one at a time for 5 s, to echo-1 on node-1) with WireGuard off, then on. Leaves WireGuard on.
fn wireguard_benchmark(lab: &TestLab) -> Vec<BenchRow> {
    let echo1 = lab.pod_ip("matrix", "echo-1");
    let client1 = lab.pod_ip("matrix", "client-1");
    let mut rows = Vec::new();
    for on in [false, true] {
        lab.set_wireguard(on);
        lab.wait_for_wireguard(if on {
            &["node-1", "node-2", "node-3"]
        } else {
            &[]
        });
        // A sink in client-1 (node-1), a sender in client-2 (node-2).
        let mut sink = lab
            .helper_command("matrix", "client-1", "sink:5201:30")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sink");
        std::thread::sleep(Duration::from_millis(500));
        let sent = lab.helper("matrix", "client-2", &format!("send:{client1}:5201:5"));
        let _ = sink.kill();
        let _ = sink.wait();
        let rate = lab.helper("matrix", "client-2", &format!("rate:{echo1}:8080:5"));
        println!("WireGuard {on}: {sent:?} {rate:?}");
        rows.push(BenchRow {
            wireguard: on,
            throughput: sent.join(" "),
            requests: rate.join(" "),
        });
    }
    rows
}

/// Not a test: the traffic generator the other tests run inside pods (this binary, re-executed
/// there by `margay-lab exec` with `MARGAY_WG_HELPER` set). Prints `WG|` lines. Roles:
/// `loop:IP:PORT:SECS` (one request at a time, a line per request), `rate:IP:PORT:SECS`
/// (requests per second), `sink:PORT:SECS` (counts what a sender sends), `send:IP:PORT:SECS`
/// (sends as fast as it can; prints what the sink received per second), `source:PORT:SECS`
/// (sends as fast as it can to the one connection it accepts), `fetch:IP:PORT` (reads until
/// the source closes; prints the rate).
#[test]
#[ignore = "helper the other tests run inside lab pods"]
fn helper() {
    let Ok(role) = std::env::var("MARGAY_WG_HELPER") else {
        return;
    };
    let parts: Vec<&str> = role.split(':').collect();
    let secs = |s: &str| Duration::from_secs(s.parse().expect("seconds"));
    let addr =
        |ip: &str, port: &str| -> SocketAddr { format!("{ip}:{port}").parse().expect("address") };
    match parts.as_slice() {
        ["loop", ip, port, s] => {
            let (addr, until) = (addr(ip, port), Instant::now() + secs(s));
            // 2 s per request: the lab shares two cores with its agents and other tests.
            while Instant::now() < until {
                let started = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock")
                    .as_millis();
                match request(addr, Duration::from_secs(2)) {
                    Ok(_) => println!("WG|{started} ok"),
                    Err(e) => println!("WG|{started} fail {e}"),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        ["rate", ip, port, s] => {
            let (addr, d) = (addr(ip, port), secs(s));
            let started = Instant::now();
            let (mut n, mut failed) = (0u64, 0u64);
            while started.elapsed() < d {
                match request(addr, Duration::from_secs(1)) {
                    Ok(_) => n += 1,
                    Err(_) => failed += 1,
                }
            }
            let t = started.elapsed().as_secs_f64();
            println!(
                "WG|{:.0} requests/s ({n} in {t:.1} s, {failed} failed)",
                n as f64 / t
            );
        }
        ["sink", port, s] => {
            let listener =
                TcpListener::bind(("0.0.0.0", port.parse().expect("port"))).expect("listen");
            let until = Instant::now() + secs(s);
            listener.set_nonblocking(true).expect("nonblocking");
            while Instant::now() < until {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                conn.set_nonblocking(false).expect("blocking");
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0u64;
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = writeln!(conn, "{total}");
            }
        }
        ["send", ip, port, s] => {
            let mut conn = TcpStream::connect_timeout(&addr(ip, port), Duration::from_secs(2))
                .expect("connect");
            let d = secs(s);
            let buf = vec![0u8; 1 << 16];
            let started = Instant::now();
            while started.elapsed() < d {
                conn.write_all(&buf).expect("send");
            }
            conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).expect("count");
            let t = started.elapsed().as_secs_f64();
            let bytes: f64 = line.trim().parse().expect("byte count");
            println!(
                "WG|{:.0} Mbit/s ({:.0} MB in {t:.1} s)",
                bytes * 8.0 / t / 1e6,
                bytes / 1e6
            );
        }
        ["source", port, s] => {
            // Sends as fast as it can to each connection for SECS, then closes it.
            let listener =
                TcpListener::bind(("0.0.0.0", port.parse().expect("port"))).expect("listen");
            let (mut conn, _) = listener.accept().expect("accept");
            let buf = vec![0u8; 1 << 16];
            let started = Instant::now();
            while started.elapsed() < secs(s) {
                if conn.write_all(&buf).is_err() {
                    break;
                }
            }
        }
        ["fetch", ip, port] => {
            let mut conn = TcpStream::connect_timeout(&addr(ip, port), Duration::from_secs(2))
                .expect("connect");
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut buf = vec![0u8; 1 << 16];
            let (started, mut total) = (Instant::now(), 0u64);
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) => panic!("fetch after {total} bytes: {e}"),
                }
            }
            let t = started.elapsed().as_secs_f64();
            println!(
                "WG|{:.0} Mbit/s ({:.0} MB in {t:.1} s)",
                total as f64 * 8.0 / t / 1e6,
                total as f64 / 1e6
            );
        }
        _ => panic!("unknown helper role {role:?}"),
    }
}

/// One request to the echo server: connect, read its line, close.
fn request(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("empty answer"));
    }
    Ok(line)
}
