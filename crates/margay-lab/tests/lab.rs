//! The lab on a real kernel: topology, reachability with source addresses, pods, the router's
//! LoadBalancer routes, processes, teardown (also after a crash), and the CLI.
//!
//! Needs root (namespaces, cgroups); skipped with a printed reason otherwise. Each test builds
//! its own lab with a unique name, so they run in parallel, and a [`LabGuard`] destroys it even
//! when the test panics. Nothing touches the root network namespace.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use margay_lab::probe::EchoReply;
use margay_lab::{Lab, LabConfig, LbMode, SpawnOptions, Target};

const BIN: &str = env!("CARGO_BIN_EXE_margay-lab");

macro_rules! require_root {
    () => {
        if !margay_lab::is_root() {
            eprintln!(
                "skipped: lab tests need root (they create network namespaces and cgroups); \
                 run `cargo test -p margay-lab` as root"
            );
            return;
        }
    };
}

/// A fresh lab name: `t` + 6 random hex digits + a counter (12 characters at most).
fn unique_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "t{}{}",
        &random[..6],
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Destroys the lab on drop, panic or not.
struct LabGuard {
    name: String,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = Lab::destroy(&self.name) {
            eprintln!("LabGuard: destroying lab {} failed: {e}", self.name);
        }
    }
}

fn up(config: LabConfig) -> (LabGuard, Lab) {
    let guard = LabGuard {
        name: config.name.clone(),
    };
    let started = Instant::now();
    let lab = Lab::create(config).expect("lab comes up");
    eprintln!("lab {} up in {:?}", lab.name(), started.elapsed());
    (guard, lab)
}

fn up_nodes(nodes: usize) -> (LabGuard, Lab) {
    up(LabConfig::new(unique_name(), nodes))
}

fn node(name: &str) -> Target {
    Target::node(name)
}

fn exec_ok(lab: &Lab, target: &Target, argv: &[&str]) -> String {
    let out = lab
        .exec_checked(target, argv)
        .unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ping(lab: &Lab, from: &Target, to: &str) {
    exec_ok(lab, from, &["ping", "-c1", "-W2", to]);
}

fn sysctl(lab: &Lab, target: &Target, key: &str) -> String {
    exec_ok(lab, target, &["sysctl", "-n", key])
        .trim()
        .to_owned()
}

/// Spawns the echo server (tagged) in `target` on `port`.
fn echo(lab: &Lab, target: &Target, port: u16, tag: &str) -> u32 {
    let port = port.to_string();
    lab.spawn(
        target,
        &[BIN, "internal-echo", "--port", &port, "--tag", tag],
        &SpawnOptions::new().name(format!("echo-{port}")),
    )
    .expect("echo server starts")
}

/// Connects from `from` to `addr` (retrying while the server starts) and parses the answer.
fn connect(lab: &Lab, from: &Target, addr: &str) -> EchoReply {
    let text = exec_ok(
        lab,
        from,
        &[
            BIN,
            "internal-connect",
            addr,
            "--timeout-ms",
            "2000",
            "--retry-ms",
            "5000",
        ],
    );
    EchoReply::parse(&text).unwrap_or_else(|| panic!("bad echo answer {text:?}"))
}

fn netns_of(pid: u32) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("process has a netns");
    (m.dev(), m.ino())
}

fn netns_id(name: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(Path::new("/run/netns").join(name)).expect("netns exists");
    (m.dev(), m.ino())
}

/// The root namespace's interfaces, addresses, routes and forwarding switch (which no lab may
/// change).
fn root_netns_snapshot() -> String {
    let mut out = String::new();
    for args in [
        &["-o", "link"][..],
        &["-o", "addr"],
        &["route", "show", "table", "all"],
    ] {
        let o = Command::new("ip").args(args).output().expect("ip runs");
        // Drop counters and timers that change on their own.
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let stable: Vec<&str> = line
                .split_whitespace()
                .take_while(|w| !w.starts_with("valid_lft") && *w != "expires")
                .collect();
            out.push_str(&stable.join(" "));
            out.push('\n');
        }
    }
    out.push_str(&std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default());
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

// === topology ===

#[test]
fn three_nodes_come_up_and_reach_each_other_over_the_underlay() {
    require_root!();
    let root_before = root_netns_snapshot();
    let (_guard, lab) = up_nodes(3);
    let name = lab.name().to_owned();
    assert_eq!(
        root_netns_snapshot(),
        root_before,
        "the root namespace changed"
    );

    let netns = margay_lab::lab_netns(&name);
    let expected: BTreeSet<String> = ["underlay", "router", "client", "node-1", "node-2", "node-3"]
        .iter()
        .map(|r| format!("{name}-{r}"))
        .collect();
    assert_eq!(netns.into_iter().collect::<BTreeSet<_>>(), expected);

    let nodes = lab.nodes().unwrap();
    let ips: Vec<String> = nodes.iter().map(|n| n.ip.to_string()).collect();
    assert_eq!(ips, ["10.224.0.4", "10.224.0.5", "10.224.0.6"]);
    assert_eq!(nodes[2].underlay_veth, "n3");

    ping(&lab, &node("node-1"), "10.224.0.5");
    ping(&lab, &node("node-1"), "10.224.0.6");
    ping(&lab, &node("node-3"), "10.224.0.4");
    ping(&lab, &node("node-2"), "10.224.0.1");
    ping(&lab, &Target::Client, "203.0.113.1");
    // Through the router both ways.
    ping(&lab, &Target::Client, "10.224.0.6");
    ping(&lab, &node("node-1"), "203.0.113.10");

    let n1 = node("node-1");
    assert_eq!(sysctl(&lab, &n1, "net.ipv4.ip_forward"), "1");
    assert_eq!(sysctl(&lab, &n1, "net.ipv4.conf.all.rp_filter"), "0");
    assert_eq!(sysctl(&lab, &n1, "net.ipv4.conf.default.rp_filter"), "0");
    assert_eq!(sysctl(&lab, &Target::Router, "net.ipv4.ip_forward"), "1");
    assert_eq!(
        sysctl(&lab, &Target::Router, "net.ipv4.fib_multipath_hash_policy"),
        "1"
    );
    let routes = exec_ok(&lab, &n1, &["ip", "route", "show", "default"]);
    assert!(
        routes.contains("default via 10.224.0.1 dev eth0"),
        "{routes}"
    );
    let lo = exec_ok(&lab, &n1, &["ip", "-br", "link", "show", "lo"]);
    assert!(lo.contains("UNKNOWN") || lo.contains("UP"), "{lo}");
    let ports = exec_ok(
        &lab,
        &Target::Underlay,
        &["ip", "-br", "link", "show", "master", "br0"],
    );
    for port in ["rtr", "n1", "n2", "n3"] {
        assert!(ports.contains(port), "{port} not on br0: {ports}");
    }

    let status = lab.status().unwrap();
    assert_eq!(status.nodes.len(), 3);
    assert!(status.nodes.iter().all(|n| n.present));
    assert_eq!(
        status.datastore_url,
        format!("sqlite:///run/margay-lab/{name}/margay.db")
    );
    assert_eq!(lab.default_datastore_url(), status.datastore_url);
}

#[test]
fn client_reaches_a_node_through_the_router_with_its_own_source_ip() {
    require_root!();
    let (_guard, lab) = up_nodes(2);
    let pid = echo(&lab, &node("node-1"), 8080, "node-1");

    // The process is where it should be: the node's namespace and cgroup, its own session.
    assert_eq!(netns_of(pid), netns_id(&format!("{}-node-1", lab.name())));
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("0::/margay-lab/{}/node-1\n", lab.name())),
        "{cgroup}"
    );

    let reply = connect(&lab, &Target::Client, "10.224.0.4:8080");
    assert_eq!(
        reply.peer.ip().to_string(),
        "203.0.113.10",
        "source IP changed on the way"
    );
    assert_eq!(reply.tag.as_deref(), Some("node-1"));
    let reply = connect(&lab, &node("node-2"), "10.224.0.4:8080");
    assert_eq!(reply.peer.ip().to_string(), "10.224.0.5");

    let processes = lab.processes().unwrap();
    assert_eq!(processes.len(), 1);
    assert!(processes[0].alive);
    assert_eq!(processes[0].record.target, node("node-1"));
    let log = std::fs::read_to_string(&processes[0].record.log).unwrap();
    assert!(log.contains("margay-lab spawn in node/node-1"), "{log}");
    assert!(
        processes[0].record.log.starts_with(lab.logs_dir()),
        "log outside the lab's state dir"
    );

    lab.kill(pid).unwrap();
    assert!(!alive(pid));
    assert!(lab.processes().unwrap().is_empty());
    // Killing it again, or a pid that is not the lab's, is handled.
    lab.kill(pid).unwrap();
    let e = lab.kill(1).unwrap_err().to_string();
    assert!(e.contains("not started by the lab"), "{e}");
    // Unknown programs and targets fail before anything starts.
    let e = lab
        .spawn(
            &node("node-1"),
            &["no-such-program-xyz"],
            &SpawnOptions::new(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    let e = lab
        .spawn(&node("node-9"), &["sleep", "1"], &SpawnOptions::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("namespace"), "{e}");
}

#[test]
fn spawned_processes_get_their_environment_and_outlive_their_parent_session() {
    require_root!();
    let (_guard, lab) = up_nodes(1);
    let log = lab.logs_dir().join("env-check.log");
    let pid = lab
        .spawn(
            &Target::Client,
            &[
                "sh",
                "-c",
                "echo \"value=$MARGAY_TEST_VALUE sid=$(cut -d' ' -f6 /proc/$$/stat)\"; sleep 1000",
            ],
            &SpawnOptions::new()
                .name("env")
                .env("MARGAY_TEST_VALUE", "a b'c")
                .log(&log),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("value=")) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.contains("value=a b'c"), "{text}");
    // Its own session: the session id is its pid.
    assert!(text.contains(&format!("sid={pid}")), "{text}");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains("/external\n"), "{cgroup}");
}

// === pods ===

#[test]
fn a_pod_reaches_its_node_and_other_nodes_reach_it_through_a_route() {
    require_root!();
    let (_guard, lab) = up_nodes(2);
    let pod = margay_lab::new_pod_netns_name(lab.name());
    let veth = margay_lab::new_host_veth_name();
    let ip: Ipv4Addr = "10.244.1.5".parse().unwrap();
    let started = Instant::now();
    lab.create_pod_network("node-1", &pod, ip, &veth).unwrap();
    eprintln!("pod network created in {:?}", started.elapsed());
    let p = Target::pod(&pod);

    let addr = exec_ok(&lab, &p, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("10.244.1.5/32"), "{addr}");
    let routes = exec_ok(&lab, &p, &["ip", "route"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0 scope link"),
        "{routes}"
    );
    let host = exec_ok(
        &lab,
        &node("node-1"),
        &["ip", "route", "show", "10.244.1.5"],
    );
    assert!(host.contains(&format!("dev {veth} scope link")), "{host}");
    assert_eq!(
        sysctl(
            &lab,
            &node("node-1"),
            &format!("net.ipv4.conf.{veth}.proxy_arp")
        ),
        "1"
    );

    ping(&lab, &node("node-1"), "10.244.1.5");
    ping(&lab, &p, "10.224.0.4");
    // What the agent will do: node-2 routes the pod's /32 via node-1.
    exec_ok(
        &lab,
        &node("node-2"),
        &["ip", "route", "add", "10.244.1.5/32", "via", "10.224.0.4"],
    );
    ping(&lab, &node("node-2"), "10.244.1.5");
    ping(&lab, &p, "10.224.0.5");

    // A server in the pod sees node-2's address; it runs in node-1's cgroup.
    let pid = echo(&lab, &p, 8080, "pod");
    let reply = connect(&lab, &node("node-2"), "10.244.1.5:8080");
    assert_eq!(reply.peer.ip().to_string(), "10.224.0.5");
    assert_eq!(reply.tag.as_deref(), Some("pod"));
    assert_eq!(netns_of(pid), netns_id(&pod));
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains("/node-1\n"), "{cgroup}");

    // resolv.conf is what processes in the pod see.
    let path = lab
        .write_pod_resolv_conf(
            &pod,
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local\n",
        )
        .unwrap();
    assert_eq!(path, Path::new("/etc/netns").join(&pod).join("resolv.conf"));
    let seen = exec_ok(&lab, &p, &["cat", "/etc/resolv.conf"]);
    assert!(seen.contains("nameserver 10.96.0.10"), "{seen}");

    // Refusals: same namespace, same address, wrong names, unknown node.
    let other = margay_lab::new_pod_netns_name(lab.name());
    let e = lab.create_pod_network(
        "node-1",
        &pod,
        "10.244.1.6".parse().unwrap(),
        "cali00000000001",
    );
    assert!(e.unwrap_err().to_string().contains("already has pod"));
    let e = lab.create_pod_network("node-2", &other, ip, "cali00000000001");
    assert!(e.unwrap_err().to_string().contains("pod address"));
    let e = lab.create_pod_network("node-1", "elsewhere-pod-1", ip, "cali00000000001");
    assert!(e.unwrap_err().to_string().contains("pod namespace"));
    let e = lab.create_pod_network(
        "node-7",
        &other,
        "10.244.1.7".parse().unwrap(),
        "cali00000000001",
    );
    assert!(e.unwrap_err().to_string().contains("no node"));
    assert!(!Path::new("/run/netns").join(&other).exists());

    lab.delete_pod_network(&pod).unwrap();
    assert!(!alive(pid), "the pod's process outlived its network");
    assert!(!Path::new("/run/netns").join(&pod).exists());
    assert!(!Path::new("/etc/netns").join(&pod).exists());
    let links = exec_ok(&lab, &node("node-1"), &["ip", "-br", "link"]);
    assert!(!links.contains(&veth), "{links}");
    let host = exec_ok(
        &lab,
        &node("node-1"),
        &["ip", "route", "show", "10.244.1.5"],
    );
    assert!(host.trim().is_empty(), "{host}");
    assert!(lab.pods().unwrap().is_empty());
    assert!(lab.processes().unwrap().is_empty());
    // Idempotent.
    lab.delete_pod_network(&pod).unwrap();
}

// === the router's LoadBalancer routes ===

#[test]
fn the_router_delivers_load_balancer_ips_to_one_node_or_spreads_them() {
    require_root!();
    let (_guard, lab) = up_nodes(2);
    for n in ["node-1", "node-2"] {
        // What the agent will do: accept the LoadBalancer IP locally.
        exec_ok(
            &lab,
            &node(n),
            &["ip", "addr", "add", "198.51.100.1/32", "dev", "lo"],
        );
        echo(&lab, &node(n), 80, n);
    }

    lab.set_lb_mode(LbMode::Node("node-2".into())).unwrap();
    for _ in 0..4 {
        let reply = connect(&lab, &Target::Client, "198.51.100.1:80");
        assert_eq!(reply.tag.as_deref(), Some("node-2"));
        assert_eq!(reply.peer.ip().to_string(), "203.0.113.10");
    }
    lab.set_lb_mode(LbMode::Node("node-1".into())).unwrap();
    for _ in 0..4 {
        let reply = connect(&lab, &Target::Client, "198.51.100.1:80");
        assert_eq!(reply.tag.as_deref(), Some("node-1"));
        assert_eq!(reply.peer.ip().to_string(), "203.0.113.10");
    }
    assert_eq!(lab.lb_mode().unwrap(), LbMode::Node("node-1".into()));

    // ECMP hashes on ports: over 24 connections (new source port each), both nodes answer
    // (all on one node has probability 2^-23).
    lab.set_lb_mode(LbMode::Ecmp).unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..24 {
        let reply = connect(&lab, &Target::Client, "198.51.100.1:80");
        assert_eq!(reply.peer.ip().to_string(), "203.0.113.10");
        seen.insert(reply.tag.unwrap_or_default());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["node-1", "node-2"]);

    let e = lab.set_lb_mode(LbMode::Node("node-9".into())).unwrap_err();
    assert!(e.to_string().contains("no node"), "{e}");
}

#[test]
fn nodes_can_be_added_and_deleted_and_the_router_follows() {
    require_root!();
    let (_guard, lab) = up_nodes(2);
    let lb_route = |lab: &Lab| {
        exec_ok(
            lab,
            &Target::Router,
            &["ip", "route", "show", "198.51.100.0/24"],
        )
    };

    let n3 = lab.add_node("node-3").unwrap();
    assert_eq!(n3.ip.to_string(), "10.224.0.6");
    assert_eq!(n3.underlay_veth, "n3");
    ping(&lab, &node("node-3"), "10.224.0.4");
    ping(&lab, &Target::Client, "10.224.0.6");
    let route = lb_route(&lab);
    for ip in ["10.224.0.4", "10.224.0.5", "10.224.0.6"] {
        assert!(route.contains(&format!("via {ip}")), "{route}");
    }
    assert!(
        lab.add_node("node-3")
            .unwrap_err()
            .to_string()
            .contains("already has node")
    );
    assert!(lab.add_node("router").is_err());

    // A node's processes and pods go with it.
    let pod = margay_lab::new_pod_netns_name(lab.name());
    lab.create_pod_network(
        "node-2",
        &pod,
        "10.244.2.2".parse().unwrap(),
        "cali00000000002",
    )
    .unwrap();
    let pid = lab
        .spawn(&node("node-2"), &["sleep", "1000"], &SpawnOptions::new())
        .unwrap();
    let pod_pid = lab
        .spawn(&Target::pod(&pod), &["sleep", "1000"], &SpawnOptions::new())
        .unwrap();
    lab.delete_node("node-2").unwrap();
    assert!(!alive(pid) && !alive(pod_pid));
    assert!(
        !Path::new("/run/netns")
            .join(format!("{}-node-2", lab.name()))
            .exists()
    );
    assert!(!Path::new("/run/netns").join(&pod).exists());
    let route = lb_route(&lab);
    assert!(!route.contains("10.224.0.5"), "{route}");
    assert!(
        route.contains("10.224.0.4") && route.contains("10.224.0.6"),
        "{route}"
    );
    let ports = exec_ok(&lab, &Target::Underlay, &["ip", "-br", "link"]);
    assert!(!ports.contains("n2"), "{ports}");
    assert!(lab.pods().unwrap().is_empty());
    assert!(lab.processes().unwrap().is_empty());

    // The freed slot is reused.
    let again = lab.add_node("node-4").unwrap();
    assert_eq!(
        (again.slot, again.ip.to_string()),
        (2, "10.224.0.5".to_owned())
    );
    ping(&lab, &node("node-4"), "10.224.0.6");

    // Deleting the node the LoadBalancer points at removes the route.
    lab.set_lb_mode(LbMode::Node("node-4".into())).unwrap();
    lab.delete_node("node-4").unwrap();
    assert!(lb_route(&lab).trim().is_empty());
    assert!(lab.status().unwrap().load_balancer.next_hops.is_empty());
}

// === teardown ===

#[test]
fn down_removes_everything_even_after_a_crash() {
    require_root!();
    let (guard, lab) = up_nodes(2);
    let name = lab.name().to_owned();
    let pod = margay_lab::new_pod_netns_name(&name);
    lab.create_pod_network(
        "node-1",
        &pod,
        "10.244.1.9".parse().unwrap(),
        "cali00000000009",
    )
    .unwrap();
    lab.write_pod_resolv_conf(&pod, "nameserver 10.96.0.10\n")
        .unwrap();
    let pids = [
        lab.spawn(&node("node-1"), &["sleep", "1000"], &SpawnOptions::new())
            .unwrap(),
        lab.spawn(&Target::pod(&pod), &["sleep", "1000"], &SpawnOptions::new())
            .unwrap(),
        lab.spawn(&Target::Client, &["sleep", "1000"], &SpawnOptions::new())
            .unwrap(),
    ];
    // A process someone started by hand in a lab namespace: in no lab cgroup, not recorded.
    let mut stray = Command::new("ip")
        .args(["netns", "exec", &format!("{name}-node-2"), "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node2 = netns_id(&format!("{name}-node-2"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while netns_of(stray.id()) != node2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let cgroup_dir = lab.cgroup_dir(&node("node-1")).unwrap();

    // The crash: state.json is gone.
    std::fs::remove_file(lab.state_dir().join("state.json")).unwrap();
    assert!(Lab::open(&name).is_err());

    let started = Instant::now();
    let report = Lab::destroy(&name).unwrap();
    eprintln!("down after crash in {:?}: {report}", started.elapsed());
    assert!(report.processes_killed >= 4, "{report:?}");
    assert_eq!(report.netns_deleted.len(), 6, "{report:?}");
    assert!(stray.wait().is_ok());
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived down");
    }
    assert_eq!(Lab::footprint(&name).unwrap(), Vec::<String>::new());
    assert!(!Path::new("/etc/netns").join(&pod).exists());
    assert!(!lab.state_dir().exists());
    if let Some(dir) = cgroup_dir {
        assert!(!dir.exists() && !dir.parent().unwrap().exists());
    }
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&format!("{name}-")));

    // Idempotent.
    let again = Lab::destroy(&name).unwrap();
    assert_eq!(
        again.to_string(),
        format!("lab {name:?}: nothing to remove")
    );
    drop(guard);
}

#[test]
fn down_works_with_a_corrupt_state_file() {
    require_root!();
    let (_guard, lab) = up_nodes(1);
    let name = lab.name().to_owned();
    std::fs::write(lab.state_dir().join("state.json"), "{ not json").unwrap();
    let e = Lab::open(&name).unwrap_err().to_string();
    assert!(
        e.contains("unreadable") && e.contains("margay-lab down --name"),
        "{e}"
    );
    let report = Lab::destroy(&name).unwrap();
    assert!(
        report.warnings.iter().any(|w| w.contains("unreadable")),
        "{report:?}"
    );
    assert_eq!(Lab::footprint(&name).unwrap(), Vec::<String>::new());
}

#[test]
fn up_twice_refuses_with_the_recovery_hint() {
    require_root!();
    let (_guard, lab) = up_nodes(1);
    let name = lab.name().to_owned();
    let e = Lab::create(LabConfig::new(&name, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert!(e.contains(&format!("margay-lab down --name {name}")), "{e}");
    // The refused attempt destroyed nothing of the running lab.
    ping(&lab, &node("node-1"), "10.224.0.1");

    // A crash's leftover (one namespace, no state) also blocks `up`, and `down` clears it.
    Lab::destroy(&name).unwrap();
    let stray = format!("{name}-node-1");
    let out = Command::new("ip")
        .args(["netns", "add", &stray])
        .output()
        .unwrap();
    assert!(out.status.success());
    let e = Lab::create(LabConfig::new(&name, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("netns {stray}")), "{e}");
    let e = Lab::open(&name).unwrap_err().to_string();
    assert!(e.contains("margay-lab up --name"), "{e}");
    Lab::destroy(&name).unwrap();
    assert!(Lab::footprint(&name).unwrap().is_empty());
}

#[test]
fn a_failed_create_leaves_nothing_behind() {
    require_root!();
    for step in ["state", "namespaces", "links", "addresses"] {
        let name = unique_name();
        let _guard = LabGuard { name: name.clone() };
        let mut config = LabConfig::new(&name, 2);
        config.fail_after_step = Some(step.to_owned());
        let e = Lab::create(config).unwrap_err().to_string();
        assert!(e.contains("test hook"), "{e}");
        assert_eq!(
            Lab::footprint(&name).unwrap(),
            Vec::<String>::new(),
            "after {step}"
        );
    }
}

#[test]
fn concurrent_state_updates_are_not_lost() {
    require_root!();
    let (_guard, lab) = up_nodes(1);
    std::thread::scope(|s| {
        for i in 0..8 {
            let lab = lab.clone();
            s.spawn(move || {
                lab.set_annotation(&format!("k{i}"), serde_json::json!(i))
                    .unwrap()
            });
        }
    });
    let state = lab.state().unwrap();
    assert_eq!(state.annotations.len(), 8);
    lab.remove_annotation("k0").unwrap();
    assert_eq!(lab.state().unwrap().annotations.len(), 7);
}

// === the CLI ===

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("margay-lab runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_verbs() {
    require_root!();
    let name = unique_name();
    let _guard = LabGuard { name: name.clone() };
    let n = name.as_str();

    let started = Instant::now();
    let (code, out, err) = cli(&["up", "--name", n, "--nodes", "3", "--lb-mode", "node-2"]);
    eprintln!(
        "margay-lab up --nodes 3 took {:?}:\n{out}",
        started.elapsed()
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("total") && out.contains("10.224.0.6"), "{out}");

    let (code, out, err) = cli(&["--name", n, "status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(status["load_balancer"]["mode"]["node"], "node-2");
    assert_eq!(status["client"]["ip"], "203.0.113.10");
    let (code, out, _) = cli(&["status", "--name", n]);
    assert_eq!(code, 0);
    assert!(
        out.contains("node-3") && out.contains("10.224.0.6"),
        "{out}"
    );

    let (code, out, err) = cli(&[
        "--name", n, "node", "exec", "node-1", "--", "ip", "-br", "addr", "show", "eth0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10.224.0.4/16"), "{out}");
    let (code, _, _) = cli(&[
        "--name", n, "node", "exec", "node-1", "--", "sh", "-c", "exit 3",
    ]);
    assert_eq!(code, 3, "exit status passes through");
    let (code, out, _) = cli(&["--name", n, "client", "--", "ip", "route"]);
    assert_eq!(code, 0);
    assert!(out.contains("default via 203.0.113.1"), "{out}");
    let (code, out, _) = cli(&[
        "--name",
        n,
        "router",
        "--",
        "ip",
        "route",
        "show",
        "198.51.100.0/24",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("via 10.224.0.5"), "{out}");
    let (code, _, err) = cli(&["--name", n, "node", "exec", "node-9", "--", "true"]);
    assert_eq!(code, 1);
    assert!(err.contains("no node \"node-9\""), "{err}");

    let started = Instant::now();
    let (code, out, err) = cli(&["--name", n, "node", "add", "node-4"]);
    eprintln!("node add took {:?}: {out}", started.elapsed());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10.224.0.7"), "{out}");
    let (code, _, err) = cli(&["--name", n, "node", "delete", "node-4"]);
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = cli(&["up", "--name", n]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("Error: ") && err.contains(&format!("margay-lab down --name {n}")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let started = Instant::now();
    let (code, out, err) = cli(&["down", "--name", n]);
    eprintln!("margay-lab down took {:?}: {out}", started.elapsed());
    assert_eq!(code, 0, "{err}");
    assert!(Lab::footprint(n).unwrap().is_empty());
    let (code, out, _) = cli(&["down", "--name", n]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to remove"), "{out}");

    let (code, _, err) = cli(&["--name", "Bad-Name", "status"]);
    assert_eq!(code, 1);
    assert!(err.contains("lab name"), "{err}");
}

/// `margay-lab status | head` once panicked ("failed printing to stdout: Broken pipe"): printing
/// verbs now end quietly, with status 0, when stdout's reader has gone. The reader here is
/// closed before the command starts, so every write it makes fails with EPIPE.
#[test]
fn printing_into_a_closed_pipe_exits_quietly() {
    require_root!();
    let (_guard, lab) = up_nodes(1);
    for args in [&["status"][..], &["status", "-o", "json"][..]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_margay-lab"))
            .args(["--name", lab.name()])
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("margay-lab");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "margay-lab {args:?} into a closed pipe: {:?}, stderr {stderr:?}",
            out.status
        );
    }
}
