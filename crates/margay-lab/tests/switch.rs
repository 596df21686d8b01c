//! Switching dataplanes live, checked with the kernel rather than with the agent's bookkeeping:
//!
//! - BPF -> Iptables leaves none of our programs, links, maps, pins or cgroup attachments on any
//!   node, with the programs attached as TCX links (the default) and as clsact filters (forced
//!   with the test-only `MARGAY_BPF_TC_ATTACH=clsact`);
//! - BPF with `bpfKubeProxyIptablesCleanupEnabled: false`: kube-proxy's chains stay, and no new
//!   connection hits them (their packet counters do not move);
//! - a UDP flow keeps its backend across Iptables -> BPF (the kernel's DNAT handed over to BPF
//!   conntrack) and BPF -> Iptables (the drain).
//!
//! Root only; run by CI as root. Each test has its own lab, taken down on drop even when it fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{From, TestLab, WORKLOADS, skip_unless_root};

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// Patches the Installation's dataplane and waits until every node reports it active.
fn switch(lab: &TestLab, dataplane: &str) {
    lab.margayctl(&[
        "patch",
        "installation",
        "default",
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"spec":{{"calicoNetwork":{{"linuxDataplane":"{dataplane}"}}}}}}"#),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active = lab.jsonpath(&["nodes"], "{.items[*].status.dataplane.active}");
        if active
            .split_whitespace()
            .filter(|a| *a == dataplane)
            .count()
            == NODES.len()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not switch to {dataplane}: {active}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn patch_felix(lab: &TestLab, spec: &str) {
    lab.margayctl(&[
        "patch",
        "felixconfiguration",
        "default",
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"spec":{spec}}}"#),
    ]);
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(cmd: &mut Command) -> serde_json::Value {
    let text = run(cmd);
    // `bpftool cgroup show` prints nothing at all for a cgroup without programs.
    if text.trim().is_empty() {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{cmd:?}: not JSON ({e}): {text}"))
}

fn bpftool(args: &[&str]) -> serde_json::Value {
    json(Command::new("bpftool").arg("-j").args(args))
}

fn ids(list: &serde_json::Value, field: &str) -> BTreeSet<u64> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e[field].as_u64())
        .collect()
}

/// What the kernel holds of one node's BPF dataplane, every fact read from the kernel: the
/// programs on each interface of the node's namespace (TCX, through BPF_PROG_QUERY, and clsact
/// filters, through `bpftool net show`), on the node's cgroup (`bpftool cgroup show`), the links
/// and maps of those programs, and the files in the node's bpffs.
#[derive(Debug, Default)]
struct NodeBpf {
    /// (interface, hook, program id) of TCX attachments.
    tcx: Vec<(String, &'static str, u32)>,
    /// (interface, kind, program id) of clsact filters.
    clsact: Vec<(String, String, u64)>,
    /// Program ids attached to the node's cgroup.
    cgroup: BTreeSet<u64>,
    /// Paths under the node's bpffs.
    pins: Vec<PathBuf>,
}

impl NodeBpf {
    fn programs(&self) -> BTreeSet<u64> {
        let mut out: BTreeSet<u64> = self.tcx.iter().map(|t| u64::from(t.2)).collect();
        out.extend(self.clsact.iter().map(|c| c.2));
        out.extend(&self.cgroup);
        out
    }

    fn is_empty(&self) -> bool {
        self.tcx.is_empty()
            && self.clsact.is_empty()
            && self.cgroup.is_empty()
            && self.pins.is_empty()
    }
}

/// The lab's facts a kernel check needs: each node's namespace, cgroup and bpffs.
struct LabPaths {
    name: String,
    cgroup: PathBuf,
    state_dir: PathBuf,
}

impl LabPaths {
    fn of(lab: &TestLab) -> LabPaths {
        let status: serde_json::Value =
            serde_json::from_str(&lab.ok(&["status", "-o", "json"])).expect("status JSON");
        LabPaths {
            name: lab.name.clone(),
            cgroup: PathBuf::from(status["cgroup"].as_str().expect("the lab's cgroup")),
            state_dir: PathBuf::from(status["state_dir"].as_str().expect("state_dir")),
        }
    }

    fn netns(&self, node: &str) -> String {
        format!("{}-{node}", self.name)
    }

    fn bpffs(&self, node: &str) -> PathBuf {
        self.state_dir.join("bpf").join(node)
    }
}

/// The interfaces of the namespace `netns`.
fn interfaces(netns: &str) -> Vec<String> {
    let links = json(Command::new("ip").args(["netns", "exec", netns, "ip", "-j", "link", "show"]));
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

/// The TCX programs on every interface of the namespace `netns`, asked from a thread that
/// entered it (BPF_PROG_QUERY resolves the interface name in the caller's namespace; Debian's
/// bpftool 7.1 cannot list TCX attachments).
fn tcx_in_netns(netns: &str) -> Vec<(String, &'static str, u32)> {
    let path = Path::new("/run/netns").join(netns);
    let names = interfaces(netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path).expect("open the node's netns");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns into the node's netns");
            let mut out = Vec::new();
            for iface in &names {
                let hooks = margay_bpf::tcx_program_ids(iface)
                    .unwrap_or_else(|e| panic!("TCX query on {iface} in {netns}: {e}"));
                for (hook, ids) in hooks {
                    out.extend(ids.into_iter().map(|id| (iface.clone(), hook, id)));
                }
            }
            out
        })
        .join()
        .expect("tcx query thread")
    })
}

fn inventory(paths: &LabPaths, node: &str) -> NodeBpf {
    let netns = paths.netns(node);
    let mut bpf = NodeBpf {
        tcx: tcx_in_netns(&netns),
        ..NodeBpf::default()
    };
    let net =
        json(Command::new("ip").args(["netns", "exec", &netns, "bpftool", "-j", "net", "show"]));
    for section in net.as_array().into_iter().flatten() {
        for f in section["tc"].as_array().into_iter().flatten() {
            bpf.clsact.push((
                f["devname"].as_str().unwrap_or_default().to_owned(),
                f["kind"].as_str().unwrap_or_default().to_owned(),
                f["id"].as_u64().unwrap_or_default(),
            ));
        }
    }
    let cgroup = paths.cgroup.join(node);
    bpf.cgroup = ids(
        &bpftool(&["cgroup", "show", &cgroup.to_string_lossy()]),
        "id",
    );
    bpf.pins = pins(&paths.bpffs(node));
    bpf
}

/// Every file and directory under a bpffs, except the two iterators the kernel's bpf_preload
/// puts at the root of every bpffs mount (`maps.debug`, `progs.debug`), which are not ours.
fn pins(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if dir == root
                && matches!(
                    path.file_name().and_then(|n| n.to_str()),
                    Some("maps.debug" | "progs.debug")
                )
            {
                continue;
            }
            if path.is_dir() {
                todo.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// What is left of `programs`, `links` and `maps` (ids) in the whole kernel.
fn still_in_kernel(
    programs: &BTreeSet<u64>,
    links: &BTreeSet<u64>,
    maps: &BTreeSet<u64>,
) -> [BTreeSet<u64>; 3] {
    let live_progs = ids(&bpftool(&["prog", "show"]), "id");
    let live_links = ids(&bpftool(&["link", "show"]), "id");
    let live_maps = ids(&bpftool(&["map", "show"]), "id");
    [
        programs.intersection(&live_progs).copied().collect(),
        links.intersection(&live_links).copied().collect(),
        maps.intersection(&live_maps).copied().collect(),
    ]
}

/// Iptables -> BPF -> Iptables on a lab whose agents attach TC programs as `tc_attach` says;
/// before the switch back, everything the kernel holds of each node's dataplane is collected;
/// after it (and the drain), none of it may remain.
fn switch_back_leaves_nothing(prefix: &str, tc_attach: &str) {
    let lab = TestLab::up_with_env(prefix, &[], &[("MARGAY_BPF_TC_ATTACH", tc_attach)]);
    lab.apply(WORKLOADS);
    switch(&lab, "BPF");
    // Traffic through the programs, so that conntrack and the maps are in use. By address: a
    // DNS lookup would be a UDP flow, which holds the drain for the UDP timeout.
    let echo = format!(
        "{}:80",
        lab.jsonpath(&["svc", "echo", "-n", "matrix"], "{.spec.clusterIP}")
    );
    let (code, line) = lab.probe(&From::Pod("client-2"), "tcp", &echo);
    assert_eq!(code, 0, "pod -> ClusterIP in BPF: {line}");
    let paths = LabPaths::of(&lab);
    let mut before = BTreeMap::new();
    for node in NODES {
        let bpf = inventory(&paths, node);
        println!(
            "{node} in BPF ({tc_attach}): TCX {:?}; clsact {:?}; cgroup {:?}; {} pins",
            bpf.tcx,
            bpf.clsact,
            bpf.cgroup,
            bpf.pins.len()
        );
        // The programs are attached the way this test asked, on the host interface and on the
        // pods' veths, and connect-time load balancing on the node's cgroup.
        let attached: BTreeSet<&str> = match tc_attach {
            "clsact" => {
                assert!(
                    bpf.tcx.is_empty(),
                    "{node}: TCX used in clsact mode: {:?}",
                    bpf.tcx
                );
                bpf.clsact.iter().map(|c| c.0.as_str()).collect()
            }
            _ => {
                assert!(
                    bpf.clsact.is_empty(),
                    "{node}: clsact used in TCX mode: {:?}",
                    bpf.clsact
                );
                bpf.tcx.iter().map(|t| t.0.as_str()).collect()
            }
        };
        assert!(
            attached.contains("eth0"),
            "{node}: nothing on eth0: {attached:?}"
        );
        assert!(
            attached.iter().any(|i| i.starts_with("cali")),
            "{node}: nothing on a pod veth: {attached:?}"
        );
        assert_eq!(
            bpf.cgroup.len(),
            4,
            "{node}: connect-time programs on its cgroup"
        );
        assert!(!bpf.pins.is_empty(), "{node}: no pins");
        before.insert(node, bpf);
    }
    let programs: BTreeSet<u64> = before.values().flat_map(NodeBpf::programs).collect();
    let links: BTreeSet<u64> = bpftool(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| programs.contains(&p)))
        .filter_map(|l| l["id"].as_u64())
        .collect();
    let mut maps = BTreeSet::new();
    for id in &programs {
        let prog = bpftool(&["prog", "show", "id", &id.to_string()]);
        maps.extend(
            prog["map_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_u64()),
        );
    }
    // TCX: a link per TC attachment and per cgroup program; clsact: the cgroup ones only.
    assert!(links.len() >= 4 * NODES.len(), "links: {links:?}");
    assert!(!maps.is_empty(), "the programs' maps");
    println!(
        "before the switch back: {} programs, {} links, {} maps",
        programs.len(),
        links.len(),
        maps.len()
    );

    switch(&lab, "Iptables");
    // No flow is live (the probe's connection closed), so the drain ends at its first check;
    // the kernel frees a program when its last attachment and file go.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after: BTreeMap<&str, NodeBpf> =
            NODES.iter().map(|n| (*n, inventory(&paths, n))).collect();
        let [progs_left, links_left, maps_left] = still_in_kernel(&programs, &links, &maps);
        let clean = after.values().all(NodeBpf::is_empty)
            && progs_left.is_empty()
            && links_left.is_empty()
            && maps_left.is_empty();
        if clean {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after BPF -> Iptables the kernel still holds: {after:#?}\nprograms {progs_left:?}, links {links_left:?}, maps {maps_left:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, line) = lab.probe(&From::Pod("client-2"), "tcp", &echo);
    assert_eq!(code, 0, "pod -> ClusterIP in Iptables again: {line}");
}

#[test]
fn switching_back_leaves_no_bpf_program_link_map_or_pin_in_the_kernel() {
    if skip_unless_root("switching_back_leaves_no_bpf_program_link_map_or_pin_in_the_kernel") {
        return;
    }
    switch_back_leaves_nothing("swt", "tcx");
}

#[test]
fn switching_back_leaves_no_clsact_filter_in_the_kernel() {
    if skip_unless_root("switching_back_leaves_no_clsact_filter_in_the_kernel") {
        return;
    }
    switch_back_leaves_nothing("swq", "clsact");
}

/// The chains of kube-proxy's NAT rules that only Service traffic reaches.
const SERVICE_CHAINS: [&str; 7] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-NODEPORTS",
    "KUBE-MARK-MASQ",
];

/// Packet counters of every rule of [`SERVICE_CHAINS`] on every node, from `iptables-save -c`
/// in the node's namespace: (node, rule) -> packets.
fn service_rule_counters(lab: &TestLab) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for node in NODES {
        let saved = lab.ok(&[
            "node",
            "exec",
            node,
            "--",
            "iptables-save",
            "-c",
            "-t",
            "nat",
        ]);
        for line in saved.lines() {
            // [packets:bytes] -A CHAIN ...
            let Some((counters, rule)) = line.strip_prefix('[').and_then(|l| l.split_once("] "))
            else {
                continue;
            };
            let Some(chain) = rule.strip_prefix("-A ") else {
                continue;
            };
            if !SERVICE_CHAINS.iter().any(|c| chain.starts_with(c)) {
                continue;
            }
            let packets = counters
                .split(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("counters of {line}"));
            out.insert((node.to_owned(), rule.to_owned()), packets);
        }
    }
    out
}

/// The rules whose counters differ.
fn moved(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> Vec<String> {
    after
        .iter()
        .filter(|(k, p)| before.get(*k) != Some(*p))
        .map(|((node, rule), p)| {
            format!(
                "{node}: {} -> {p}: {rule}",
                before
                    .get(&(node.clone(), rule.clone()))
                    .copied()
                    .unwrap_or(0)
            )
        })
        .collect()
}

/// New connections of every kind that reach kube-proxy's Service chains in Iptables mode: pod
/// to ClusterIP (backend on the same node and on another, TCP and UDP), the external client to a
/// NodePort (on the backend's node and on another, and externalTrafficPolicy Local) and to
/// LoadBalancer IPs (TCP and UDP; the router spreads them over the nodes with ECMP).
fn new_connections(lab: &TestLab) {
    let svc = |name: &str, path: &str| lab.jsonpath(&["svc", name, "-n", "matrix"], path);
    let cluster_ip = svc("echo", "{.spec.clusterIP}");
    let sticky_ip = svc("sticky", "{.spec.clusterIP}");
    let lb = svc("echo-lb", "{.status.loadBalancer.ingress[0].ip}");
    let lb_udp = svc("echo-udp", "{.status.loadBalancer.ingress[0].ip}");
    let probes: Vec<(From, &str, String)> = vec![
        (From::Pod("client-1"), "tcp", format!("{cluster_ip}:80")),
        (From::Pod("client-2"), "tcp", format!("{cluster_ip}:80")),
        (From::Pod("client-1"), "udp", format!("{cluster_ip}:53")),
        (From::Pod("client-3"), "udp", format!("{cluster_ip}:53")),
        (From::Pod("client-1"), "tcp", format!("{sticky_ip}:80")),
        (From::Client, "tcp", "10.224.0.4:30080".to_owned()),
        (From::Client, "tcp", "10.224.0.5:30080".to_owned()),
        (From::Client, "tcp", "10.224.0.4:30081".to_owned()),
        (From::Client, "tcp", format!("{lb}:80")),
        (From::Client, "tcp", format!("{lb}:80")),
        (From::Client, "tcp", format!("{lb}:80")),
        (From::Client, "udp", format!("{lb_udp}:53")),
        (From::Client, "udp", format!("{lb_udp}:53")),
        (From::Client, "udp", "10.224.0.6:30053".to_owned()),
    ];
    for (from, proto, target) in &probes {
        let (code, line) = lab.probe(from, proto, target);
        assert_eq!(code, 0, "{proto} {target}: {line}");
    }
}

#[test]
fn kept_kube_proxy_chains_count_no_new_connection_in_bpf_mode() {
    if skip_unless_root("kept_kube_proxy_chains_count_no_new_connection_in_bpf_mode") {
        return;
    }
    let lab = TestLab::up("swk", &[]);
    lab.apply(WORKLOADS);
    patch_felix(&lab, r#"{"bpfKubeProxyIptablesCleanupEnabled": false}"#);
    // In Iptables mode the same connections do count: the check below can see them.
    let before = service_rule_counters(&lab);
    new_connections(&lab);
    let iptables_moved = moved(&before, &service_rule_counters(&lab));
    assert!(
        iptables_moved.len() >= 10,
        "in Iptables mode the connections go through kube-proxy's rules: {iptables_moved:#?}"
    );
    switch(&lab, "BPF");
    let before = service_rule_counters(&lab);
    assert!(
        before.len() > 30,
        "kube-proxy's chains stay with the cleanup off: {} rules",
        before.len()
    );
    new_connections(&lab);
    let after = service_rule_counters(&lab);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the kept rules did not change"
    );
    let bpf_moved = moved(&before, &after);
    println!(
        "Service rules whose counters moved: Iptables {} of {}, BPF {} of {}",
        iptables_moved.len(),
        before.len(),
        bpf_moved.len(),
        after.len()
    );
    assert!(
        bpf_moved.is_empty(),
        "new connections in BPF mode went through kube-proxy's kept rules:\n{}",
        bpf_moved.join("\n")
    );
}

/// Two UDP echo pods (node-1 and node-2) behind one ClusterIP.
const UDP_WORKLOAD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: udp-a, namespace: matrix, labels: {app: udp}}
spec:
  nodeName: node-1
  containers: [{name: echo, image: margay/echo, ports: [{containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: udp-b, namespace: matrix, labels: {app: udp}}
spec:
  nodeName: node-2
  containers: [{name: echo, image: margay/echo, ports: [{containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Service
metadata: {name: udp, namespace: matrix}
spec:
  selector: {app: udp}
  ports: [{port: 53, targetPort: 5353, protocol: UDP}]
"#;

#[test]
fn a_udp_flow_keeps_its_backend_across_both_switches() {
    if skip_unless_root("a_udp_flow_keeps_its_backend_across_both_switches") {
        return;
    }
    let lab = TestLab::up("swu", &[]);
    lab.apply(WORKLOADS);
    lab.apply(UDP_WORKLOAD);
    // The drain after BPF -> Iptables waits for the UDP flows to expire: short, for the test.
    patch_felix(&lab, r#"{"bpfConntrackTimeouts": {"udpTimeout": "5s"}}"#);
    let target = format!(
        "{}:53",
        lab.jsonpath(&["svc", "udp", "-n", "matrix"], "{.spec.clusterIP}")
    );
    let app = lab
        .bin_dir
        .join("margay-demo-app")
        .to_string_lossy()
        .into_owned();
    // Two client sockets per pod (one UDP flow each), a datagram every 100 ms for ~16 s, while
    // the cluster goes Iptables -> BPF -> Iptables. Each flow's backend is chosen by iptables
    // (the kernel's conntrack) at its first datagram: 6 flows over 2 backends, so a dataplane
    // that picked again at the switch would keep all six by chance once in 64 runs.
    let clients: Vec<(&str, std::process::Child)> = ["client-1", "client-2", "client-3"]
        .into_iter()
        .flat_map(|pod| [pod, pod])
        .map(|pod| {
            let child = Command::new(lab.bin_dir.join("margay-lab"))
                .args(["--name", &lab.name, "exec", "-n", "matrix", pod, "--", &app])
                .args(["probe", "udp", &target, "--one-socket", "--count", "160"])
                .args(["--interval", "100ms", "--timeout", "1s"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("udp client");
            (pod, child)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    switch(&lab, "BPF");
    std::thread::sleep(Duration::from_secs(4));
    switch(&lab, "Iptables");
    // The programs drain: they go on translating the flows they track.
    let message = lab.jsonpath(&["node", "node-1"], "{.status.dataplane.message}");
    println!("node-1 after the switch back: {message}");
    assert!(
        message.contains("stay attached"),
        "node-1 drains the flows its programs translate: {message:?}"
    );
    let mut problems = Vec::new();
    for (pod, child) in clients {
        let out = child.wait_with_output().expect("udp client");
        let answers = String::from_utf8_lossy(&out.stdout);
        let failures = String::from_utf8_lossy(&out.stderr);
        let mut backends: BTreeMap<&str, usize> = BTreeMap::new();
        for line in answers.lines() {
            let name = line.split_whitespace().nth(1).unwrap_or_default();
            *backends.entry(name).or_default() += 1;
        }
        let failed = failures.lines().filter(|l| !l.trim().is_empty()).count();
        println!("{pod}: replies by backend {backends:?}, {failed} without reply");
        if backends.len() != 1 {
            problems.push(format!("{pod}: the flow changed backends: {backends:?}"));
        }
        if backends.values().sum::<usize>() < 150 {
            problems.push(format!("{pod}: {backends:?}, failures:\n{failures}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
