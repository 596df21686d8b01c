//! Privileged tests: the iptables driver against the real kernel (iptables 1.8, nft or legacy).
//!
//! Each test creates its own network namespaces (unique names, removed by a guard even when the
//! test panics) and runs the driver on a thread that entered one of them, so nothing outside
//! those namespaces changes. Without root they print why and pass without doing anything; CI
//! runs them as root.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use margay_calc::model::is_owned_chain;
use margay_calc::{Ruleset, Scenario, Table};
use margay_dataplane::iptables::{IptablesDriver, SavedTables};
use margay_testnet::Netns;

// === Harness ===

/// Whether this process may create network namespaces; prints why not when it may not.
fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI must not skip it"
    );
    // Written to stderr directly: libtest captures eprintln! of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "skipping {test}: needs root to create network namespaces and run iptables in them"
    );
    false
}

/// The namespace's tables as `iptables-save` prints them, parsed.
fn saved_tables(ns: &Netns) -> SavedTables {
    SavedTables::parse(&ns.exec("iptables-save", &[])).expect("iptables-save parses")
}

/// A namespace of this test binary's own (`mgi<pid>x<n>`), deleted on drop.
fn netns() -> Netns {
    Netns::with_prefix("mgi")
}

fn assert_no_drift(ns: &Netns, driver: &mut IptablesDriver, rs: &Ruleset, what: &str) {
    let drift = ns.run(|| driver.verify(rs)).expect("iptables-save runs");
    assert!(
        drift.is_empty(),
        "{what}: the kernel differs from the ruleset:\n{}",
        drift
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every owned chain and every rule mentioning one, in every table of the namespace.
fn leftovers(ns: &Netns) -> Vec<String> {
    let saved = saved_tables(ns);
    let mut out = Vec::new();
    for (table, t) in &saved.tables {
        for (chain, rules) in &t.chains {
            if is_owned_chain(chain) || chain.starts_with("KUBE-") {
                out.push(format!("{table}: chain {chain}"));
            }
            for rule in rules {
                if rule.contains("KUBE-") || rule.contains("cali-") {
                    out.push(format!("{table}: -A {chain} {rule}"));
                }
            }
        }
    }
    out
}

/// A ruleset for TCP services (port 80 to 8080, cluster IPs 10.96.0.10, .11...) with the given
/// endpoint addresses, all on this node.
fn ruleset(services: &[(&str, &[&str])]) -> Ruleset {
    let mut yaml = String::from(
        "node: {name: node-a, ips: [10.99.1.1], clusterCIDRs: [10.244.0.0/16]}\nobjects:\n",
    );
    for (i, (name, endpoints)) in services.iter().enumerate() {
        yaml.push_str(&format!(
            "- {{apiVersion: v1, kind: Service, metadata: {{namespace: default, name: {name}}}, \
             spec: {{clusterIP: 10.96.0.{}, ports: [{{name: http, port: 80}}]}}}}\n",
            i + 10
        ));
        let eps: Vec<String> = endpoints
            .iter()
            .map(|ip| format!("{{addresses: [{ip}], nodeName: node-a}}"))
            .collect();
        yaml.push_str(&format!(
            "- {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{namespace: default, \
             name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}, addressType: IPv4, \
             endpoints: [{}], ports: [{{name: http, port: 8080}}]}}\n",
            eps.join(", ")
        ));
    }
    Scenario::from_yaml(&yaml)
        .expect("valid scenario")
        .ruleset()
}

/// Services `names`, each with `endpoints` endpoints.
fn services(names: &[&str], endpoints: u8) -> Ruleset {
    let ips: Vec<Vec<String>> = (0..names.len())
        .map(|i| {
            (0..endpoints)
                .map(|e| format!("10.244.{}.{}", i + 1, e + 2))
                .collect()
        })
        .collect();
    let refs: Vec<Vec<&str>> = ips
        .iter()
        .map(|v| v.iter().map(String::as_str).collect())
        .collect();
    let list: Vec<(&str, &[&str])> = names
        .iter()
        .copied()
        .zip(refs.iter().map(Vec::as_slice))
        .collect();
    ruleset(&list)
}

// === Tests ===

/// Every golden case of margay-calc goes into one kernel, one after the other (a full sync,
/// then partial syncs between very different rulesets), and after each the kernel's
/// iptables-save equals the ruleset chain for chain, each jump once. Then cleanup leaves nothing.
#[test]
fn golden_rulesets_load_and_read_back_identically() {
    if !privileged("golden_rulesets_load_and_read_back_identically") {
        return;
    }
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../margay-calc/tests/golden");
    let mut cases: Vec<_> = std::fs::read_dir(&golden)
        .expect("margay-calc's golden cases")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("input.yaml").exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 15);
    // Each case's input, followed by its update when it has one.
    let files: Vec<_> = cases
        .iter()
        .flat_map(|c| [c.join("input.yaml"), c.join("update.yaml")])
        .filter(|f| f.exists())
        .collect();

    let ns = netns();
    // Someone else's rules in the built-in chains must survive all of it.
    ns.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "172.17.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    );
    ns.exec(
        "iptables",
        &["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],
    );
    let mut driver = IptablesDriver::new();
    for (i, case) in files.iter().enumerate() {
        let text = std::fs::read_to_string(case).expect("readable");
        let rs = Scenario::from_yaml(&text).expect("valid").ruleset();
        let report = ns
            .run(|| driver.sync(&rs))
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        assert_eq!(report.full, i == 0, "{}: {report:?}", case.display());
        assert!(report.fell_back.is_none(), "{}: {report:?}", case.display());
        assert_no_drift(&ns, &mut driver, &rs, &case.display().to_string());
    }
    let report = ns.run(|| driver.cleanup()).expect("cleanup");
    assert!(report.chains_left.is_empty(), "{report:?}");
    assert_eq!(leftovers(&ns), Vec::<String>::new());
    let saved = saved_tables(&ns);
    let nat = saved.table(Table::Nat).expect("nat table");
    assert_eq!(
        nat.chains["POSTROUTING"],
        ["-s 172.17.0.0/16 -j MASQUERADE"]
    );
    let filter = saved.table(Table::Filter).expect("filter table");
    assert_eq!(
        filter.chains["INPUT"],
        ["-p tcp -m tcp --dport 22 -j ACCEPT"]
    );
}

/// A partial sync rewrites only what changed: the packet counters of an untouched service's
/// chains survive it, and the restore input names only the changed chains.
#[test]
fn partial_sync_leaves_unchanged_chains_alone() {
    if !privileged("partial_sync_leaves_unchanged_chains_alone") {
        return;
    }
    let ns = netns();
    // A route for the DNATed SYN below to leave by (a veth whose peer never answers).
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "v0"]);
    ns.ip(&["link", "set", "v0", "up"]);
    ns.ip(&["link", "set", "v1", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.99.0.2"]);
    let mut driver = IptablesDriver::new();
    let before = ruleset(&[("alpha", &["10.244.1.2"]), ("beta", &["10.244.2.2"])]);
    assert!(ns.run(|| driver.sync(&before)).expect("first sync").full);

    // A SYN to alpha's ClusterIP goes through nat OUTPUT and counts in alpha's chains (the
    // DNATed packet then leaves through the dummy device, so the connect times out).
    ns.run(|| {
        let target = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80));
        let _ = TcpStream::connect_timeout(&target, Duration::from_millis(200));
    });
    let alpha_sep = |ns: &Netns| -> u64 {
        let text = ns.exec("iptables-save", &["-c", "-t", "nat"]);
        let line = text
            .lines()
            .find(|l| l.contains("-j DNAT --to-destination 10.244.1.2:8080"))
            .unwrap_or_else(|| panic!("alpha's DNAT rule:\n{text}"));
        line[1..line.find(':').expect("counters")]
            .parse()
            .expect("packet count")
    };
    assert_eq!(alpha_sep(&ns), 1, "the SYN was counted");

    // beta gains an endpoint; alpha does not change.
    let after = ruleset(&[
        ("alpha", &["10.244.1.2"]),
        ("beta", &["10.244.2.2", "10.244.2.3"]),
    ]);
    let report = ns.run(|| driver.sync(&after)).expect("partial sync");
    assert!(!report.full, "{report:?}");
    assert_eq!(report.processes, 1);
    assert_eq!(
        alpha_sep(&ns),
        1,
        "alpha's counters survived the partial sync"
    );
    assert_no_drift(&ns, &mut driver, &after, "after the partial sync");

    // A full sync rewrites everything, so the counters start again.
    driver.request_full_sync();
    assert!(ns.run(|| driver.sync(&after)).expect("full sync").full);
    assert_eq!(alpha_sep(&ns), 0);
}

/// When the kernel is not what the driver believes (someone flushed the nat table), the partial
/// restore fails as a whole, and the same sync repairs everything with a full one.
#[test]
fn failed_partial_sync_is_repaired_by_a_full_one() {
    if !privileged("failed_partial_sync_is_repaired_by_a_full_one") {
        return;
    }
    let ns = netns();
    let mut driver = IptablesDriver::new();
    ns.run(|| driver.sync(&services(&["alpha"], 2)))
        .expect("first sync");
    // Someone removes every nat rule and chain.
    ns.exec("iptables", &["-t", "nat", "-F"]);
    ns.exec("iptables", &["-t", "nat", "-X"]);
    let wanted = services(&["alpha", "beta"], 2);
    let report = ns.run(|| driver.sync(&wanted)).expect("sync repairs");
    assert!(report.full, "{report:?}");
    let reason = report.fell_back.expect("the partial restore failed");
    assert!(reason.contains("iptables-restore"), "{reason}");
    assert_no_drift(&ns, &mut driver, &wanted, "after the repair");
}

/// Each jump exists exactly once after syncs, whatever was there before, and other rules in the
/// built-in chains stay where they were.
#[test]
fn jumps_exist_exactly_once() {
    if !privileged("jumps_exist_exactly_once") {
        return;
    }
    let ns = netns();
    // A duplicate of one of kube-proxy's jumps (two agents raced?), an older kube-proxy's jump
    // without comment, and someone else's rule.
    ns.exec("iptables", &["-t", "nat", "-N", "KUBE-SERVICES"]);
    for args in [
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ][..],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ][..],
        &["-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES"][..],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "198.51.100.1/32",
            "-j",
            "RETURN",
        ][..],
    ] {
        ns.exec("iptables", args);
    }
    let mut driver = IptablesDriver::new();
    let rs = services(&["alpha"], 1);
    let report = ns.run(|| driver.sync(&rs)).expect("sync");
    assert_eq!(report.jumps_deleted, 2, "{report:?}");
    assert_no_drift(&ns, &mut driver, &rs, "after the first sync");
    driver.request_full_sync();
    let report = ns.run(|| driver.sync(&rs)).expect("second full sync");
    assert_eq!(
        (report.jumps_inserted, report.jumps_deleted),
        (0, 0),
        "{report:?}"
    );
    let nat = saved_tables(&ns);
    let prerouting = &nat.table(Table::Nat).expect("nat").chains["PREROUTING"];
    assert_eq!(
        prerouting,
        &[
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-d 198.51.100.1/32 -j RETURN",
        ]
    );
}

/// Pods' hostPorts (the CNI portmap plugin's chains) and BPF mode's FORWARD exception read back
/// exactly as written, next to kube-proxy's rules; removing the hostPorts removes every chain
/// and jump of theirs; cleanup leaves none.
#[test]
fn host_port_and_bpf_forward_rules_read_back_identically() {
    if !privileged("host_port_and_bpf_forward_rules_read_back_identically") {
        return;
    }
    let ns = netns();
    let mut driver = IptablesDriver::new();
    let pods: Vec<k8s_openapi::api::core::v1::Pod> = serde_json::from_value(serde_json::json!([
        {"metadata": {"name": "web", "namespace": "shop"},
         "spec": {"nodeName": "node-1", "containers": [{"name": "web", "ports": [
             {"containerPort": 8080, "hostPort": 80},
             {"containerPort": 8443, "hostPort": 443, "hostIP": "10.224.0.4"},
             {"containerPort": 5353, "hostPort": 53, "protocol": "UDP"}]}]},
         "status": {"phase": "Running", "podIP": "192.168.0.7"}}
    ]))
    .expect("pods");
    let ports = margay_calc::host_ports::host_ports(&pods, "node-1");
    assert_eq!(ports.len(), 3);
    let base = services(&["alpha"], 2);
    let mut rs = base.clone();
    rs.add_host_ports(&ports);
    rs.add_bpf_translated_accept();
    ns.run(|| driver.sync(&rs)).expect("full sync");
    assert_no_drift(
        &ns,
        &mut driver,
        &rs,
        "hostPorts and the BPF translated-mark accept",
    );
    let nat = ns.exec("iptables-save", &["-t", "nat"]);
    assert!(
        nat.contains("-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"),
        "{nat}"
    );
    let filter = ns.exec("iptables", &["-S", "FORWARD"]);
    let first = filter.lines().nth(1).unwrap_or_default();
    assert_eq!(
        first,
        "-A FORWARD -m mark --mark 0x2000000/0x2000000 -m comment --comment \"margay: translated by the BPF programs\" -j ACCEPT",
        "the translated-mark accept comes first:\n{filter}"
    );

    // Partial sync without them: every portmap chain and jump goes.
    ns.run(|| driver.sync(&base)).expect("partial sync");
    assert_no_drift(&ns, &mut driver, &base, "after removing them");
    let all = ns.exec("iptables-save", &[]);
    assert!(!all.contains("CNI-") && !all.contains("0x2000000"), "{all}");

    ns.run(|| driver.sync(&rs)).expect("sync again");
    ns.run(|| driver.cleanup()).expect("cleanup");
    assert_eq!(leftovers(&ns), Vec::<String>::new());
}

/// Cleanup removes every owned chain and jump, a real kube-proxy's leftovers included
/// (KUBE-MARK-DROP, KUBE-XLB-), keeps a chain someone else still jumps to (flushed), and
/// touches nothing else.
#[test]
fn cleanup_leaves_no_kube_chain() {
    if !privileged("cleanup_leaves_no_kube_chain") {
        return;
    }
    let ns = netns();
    let mut driver = IptablesDriver::new();
    let mut rs = services(&["alpha", "beta"], 3);
    rs.add_nat_outgoing(&[("10.244.0.0/16".parse().expect("cidr"), true)]);
    ns.run(|| driver.sync(&rs)).expect("sync");
    for args in [
        &["-t", "nat", "-N", "KUBE-MARK-DROP"][..],
        &[
            "-t",
            "nat",
            "-A",
            "KUBE-MARK-DROP",
            "-j",
            "MARK",
            "--set-xmark",
            "0x8000/0x8000",
        ][..],
        &["-t", "nat", "-N", "KUBE-XLB-OLDOLDOLDOLDOLD"][..],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-j",
            "KUBE-XLB-OLDOLDOLDOLDOLD",
        ][..],
        &["-N", "FOREIGN"][..],
        &["-A", "FOREIGN", "-j", "ACCEPT"][..],
        &["-A", "INPUT", "-j", "FOREIGN"][..],
    ] {
        ns.exec("iptables", args);
    }
    let report = ns.run(|| driver.cleanup()).expect("cleanup");
    assert!(report.chains_left.is_empty(), "{report:?}");
    assert_eq!(leftovers(&ns), Vec::<String>::new());
    let saved = saved_tables(&ns);
    let filter = saved.table(Table::Filter).expect("filter");
    assert_eq!(filter.chains["INPUT"], ["-j FOREIGN"]);
    assert_eq!(filter.chains["FOREIGN"], ["-j ACCEPT"]);

    // A KUBE- chain that someone else's chain jumps to cannot be deleted: it is flushed, kept
    // and reported.
    ns.run(|| driver.sync(&rs)).expect("sync again");
    ns.exec("iptables", &["-A", "FOREIGN", "-j", "KUBE-FORWARD"]);
    let report = ns.run(|| driver.cleanup()).expect("cleanup");
    assert_eq!(
        report.chains_left,
        [(Table::Filter, "KUBE-FORWARD".to_owned())]
    );
    assert_eq!(
        saved_tables(&ns)
            .table(Table::Filter)
            .expect("filter")
            .chains["KUBE-FORWARD"]
            .len(),
        0
    );
}

/// Real packets: a client namespace reaches a pod namespace through a node namespace that holds
/// the rules. A ClusterIP and a NodePort (policy Cluster) are DNATed to the pod and masqueraded
/// (the client is outside the cluster CIDR); a NodePort with policy Local keeps the client's
/// address; a service without endpoints refuses the connection at once.
#[test]
fn packets_reach_the_pod_through_the_rules() {
    if !privileged("packets_reach_the_pod_through_the_rules") {
        return;
    }
    let (client, node, pod) = (netns(), netns(), netns());
    // Each end's `eth0`, peered with `to-<end>` on the node.
    for (end, node_side) in [(&client, "to-client"), (&pod, "to-pod")] {
        let node_ns = node.name();
        end.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", node_side, "netns", node_ns,
        ]);
    }
    client.ip(&["addr", "add", "10.99.1.2/24", "dev", "eth0"]);
    client.ip(&["link", "set", "eth0", "up"]);
    client.ip(&["route", "add", "10.96.0.0/12", "via", "10.99.1.1"]);
    node.ip(&["addr", "add", "10.99.1.1/24", "dev", "to-client"]);
    node.ip(&["addr", "add", "10.244.1.1/24", "dev", "to-pod"]);
    node.ip(&["link", "set", "to-client", "up"]);
    node.ip(&["link", "set", "to-pod", "up"]);
    // Unmatched service traffic is forwarded (and rejected by filter KUBE-SERVICES on the way).
    // It would leave through the interface it came in by, so the node would first send an ICMP
    // redirect, and the REJECT's ICMP error right after it would be rate-limited away.
    node.ip(&["route", "add", "default", "via", "10.99.1.2"]);
    node.run(|| {
        // /proc/sys/net belongs to the network namespace of the thread that opens it.
        for (key, value) in [
            ("ipv4/ip_forward", "1"),
            ("ipv4/conf/all/send_redirects", "0"),
            ("ipv4/conf/to-client/send_redirects", "0"),
        ] {
            std::fs::write(format!("/proc/sys/net/{key}"), value)
                .unwrap_or_else(|e| panic!("net.{key}: {e}"));
        }
    });
    pod.ip(&["addr", "add", "10.244.1.5/24", "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", "10.244.1.1"]);

    let yaml = "
node: {name: node-a, ips: [10.99.1.1], clusterCIDRs: [10.244.0.0/16]}
objects:
- apiVersion: v1
  kind: Service
  metadata: {namespace: default, name: web}
  spec:
    type: NodePort
    clusterIP: 10.96.0.10
    ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
- apiVersion: v1
  kind: Service
  metadata: {namespace: default, name: web-local}
  spec:
    type: NodePort
    clusterIP: 10.96.0.20
    externalTrafficPolicy: Local
    ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
- apiVersion: v1
  kind: Service
  metadata: {namespace: default, name: nobody}
  spec:
    clusterIP: 10.96.0.30
    ports: [{name: http, port: 80, targetPort: 8080}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {namespace: default, name: web-1, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.1.5], nodeName: node-a}]
  ports: [{name: http, port: 8080}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {namespace: default, name: web-local-1, labels: {kubernetes.io/service-name: web-local}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.1.5], nodeName: node-a}]
  ports: [{name: http, port: 8080}]
";
    let rs = Scenario::from_yaml(yaml).expect("valid scenario").ruleset();
    let mut driver = IptablesDriver::new();
    ns_sync(&node, &mut driver, &rs);

    const EXPECTED_CONNECTIONS: usize = 3;
    let (seen, results) = std::thread::scope(|scope| {
        // The pod answers each connection with the source address it sees.
        let server = scope.spawn(|| {
            pod.run(|| {
                let listener = TcpListener::bind("10.244.1.5:8080").expect("bind in the pod");
                listener.set_nonblocking(true).expect("nonblocking");
                let deadline = Instant::now() + Duration::from_secs(15);
                let mut seen = Vec::new();
                while seen.len() < EXPECTED_CONNECTIONS && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            let _ = stream.write_all(peer.ip().to_string().as_bytes());
                            seen.push(peer.ip());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                seen
            })
        });
        let results = client.run(|| {
            // Give the listener a moment to bind.
            std::thread::sleep(Duration::from_millis(100));
            let ask = |ip: [u8; 4], port: u16| -> std::io::Result<String> {
                let addr = SocketAddr::from((Ipv4Addr::from(ip), port));
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut answer = String::new();
                stream.read_to_string(&mut answer)?;
                Ok(answer)
            };
            [
                ask([10, 96, 0, 10], 80),
                ask([10, 99, 1, 1], 30080),
                ask([10, 99, 1, 1], 30081),
                ask([10, 96, 0, 30], 80),
            ]
        });
        (server.join().expect("server thread"), results)
    });
    let [cluster_ip, node_port, node_port_local, no_endpoints] = results;
    assert_eq!(
        cluster_ip.expect("ClusterIP reaches the pod"),
        "10.244.1.1",
        "masqueraded"
    );
    assert_eq!(
        node_port.expect("NodePort reaches the pod"),
        "10.244.1.1",
        "masqueraded"
    );
    assert_eq!(
        node_port_local.expect("Local NodePort reaches the pod"),
        "10.99.1.2",
        "externalTrafficPolicy Local keeps the client's address"
    );
    let refused = no_endpoints.expect_err("no endpoints");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    assert_eq!(seen.len(), EXPECTED_CONNECTIONS);
}

fn ns_sync(ns: &Netns, driver: &mut IptablesDriver, rs: &Ruleset) {
    let report = ns.run(|| driver.sync(rs)).expect("sync");
    assert!(report.full);
}

/// Timings at kube-proxy's "large cluster" scale: 2000 services with 3 endpoints each. Prints
/// the reports (run with --nocapture to see them); checks that a one-endpoint change is a small
/// partial sync.
#[test]
fn sync_timings_at_scale() {
    if !privileged("sync_timings_at_scale") {
        return;
    }
    let ns = netns();
    let names: Vec<String> = (0..2000).map(|i| format!("svc-{i}")).collect();
    let build = |extra: bool| {
        let mut yaml = String::from(
            "node: {name: node-a, ips: [10.99.1.1], clusterCIDRs: [10.244.0.0/16]}\nobjects:\n",
        );
        for (i, name) in names.iter().enumerate() {
            let (hi, lo) = (i / 250, i % 250);
            yaml.push_str(&format!(
                "- {{apiVersion: v1, kind: Service, metadata: {{namespace: default, name: {name}}}, \
                 spec: {{clusterIP: 10.96.{hi}.{lo}, ports: [{{name: http, port: 80}}]}}}}\n"
            ));
            let mut eps = vec![
                format!("{{addresses: [10.244.{hi}.{lo}]}}"),
                format!("{{addresses: [10.245.{hi}.{lo}]}}"),
                format!("{{addresses: [10.246.{hi}.{lo}]}}"),
            ];
            if extra && i == 0 {
                eps.push("{addresses: [10.247.0.0]}".to_owned());
            }
            yaml.push_str(&format!(
                "- {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{namespace: default, \
                 name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}, addressType: IPv4, \
                 endpoints: [{}], ports: [{{name: http, port: 8080}}]}}\n",
                eps.join(", ")
            ));
        }
        Scenario::from_yaml(&yaml)
            .expect("valid scenario")
            .ruleset()
    };
    let (before, after) = (build(false), build(true));
    let mut driver = IptablesDriver::new();
    let full = ns.run(|| driver.sync(&before)).expect("full sync");
    let partial = ns.run(|| driver.sync(&after)).expect("partial sync");
    let _ = writeln!(
        std::io::stderr(),
        "{} rules in {} chains\nfull sync: {full:?}\npartial sync: {partial:?}",
        before.rule_count(),
        before.chain_count()
    );
    assert!(full.full && !partial.full);
    // svc-0's service chain and its new endpoint chain; KUBE-SERVICES (2001 rules) does not
    // change, so unlike kube-proxy the driver does not rewrite it.
    assert_eq!(partial.chains_written, 2, "{partial:?}");
    assert!(
        partial.rules_written < full.rules_written / 4,
        "{partial:?}"
    );
    assert_no_drift(&ns, &mut driver, &after, "after the partial sync");
}

/// FelixConfiguration `iptablesBackend`: a driver on `SystemIptables::for_mode` writes to that
/// backend only (the two keep separate tables), `IptablesMode::detect` (Auto) then joins the
/// backend holding the rules, and cleanup empties it again.
#[test]
fn each_backend_keeps_its_own_tables_and_auto_joins_the_one_with_rules() {
    use margay_dataplane::iptables::{IptablesMode, SystemIptables};
    if !privileged("each_backend_keeps_its_own_tables_and_auto_joins_the_one_with_rules") {
        return;
    }
    let ns = netns();
    let nothing_yet = ns.run(IptablesMode::detect);
    assert_eq!(
        nothing_yet,
        IptablesMode::system_default().unwrap_or(IptablesMode::Nft),
        "with no rules anywhere, Auto is the system's iptables"
    );
    let mut rs = Ruleset::default();
    rs.add_nat_outgoing(&[("10.244.0.0/16".parse().unwrap(), true)]);
    for (mode, other) in [
        (IptablesMode::Legacy, IptablesMode::Nft),
        (IptablesMode::Nft, IptablesMode::Legacy),
    ] {
        let mut driver = IptablesDriver::with_backend(SystemIptables::for_mode(mode));
        let report = ns.run(|| driver.sync(&rs)).expect("sync");
        assert!(report.full);
        let save = |m: IptablesMode| ns.exec(&format!("iptables-{m}-save"), &[]);
        assert!(
            save(mode).contains("-j cali-nat-outgoing"),
            "{mode}: {}",
            save(mode)
        );
        assert!(!save(other).contains("cali-nat-outgoing"), "{other}");
        assert_eq!(ns.run(IptablesMode::detect), mode, "Auto joins {mode}");
        ns.run(|| driver.cleanup()).expect("cleanup");
        assert!(
            !save(mode).contains("cali-nat-outgoing"),
            "{mode} cleaned up"
        );
    }
}
