//! Privileged tests: the BPF NAT driver and the conntrack cleanup against real maps.
//!
//! Each test loads margay-bpf's dataplane (every program through the verifier, small maps) into
//! a bpffs of its own, mounted on a temporary directory and unmounted by a guard even when the
//! test panics. Nothing is attached anywhere: packets go through the production TC programs
//! with BPF_PROG_TEST_RUN. Without root the tests print why and pass; with `CI` set they fail.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use margay_bpf::maps::{CtKey, CtType, CtValue, MapSizes, Protocol, be_addr, be_port};
use margay_bpf::{Config, Dataplane, LogLevel, TC_ACT_OK, TC_ACT_REDIRECT, TcProgram};
use margay_calc::bpf_nat::{NatModel, bpf_nat_model};
use margay_calc::{NodeContext, Scenario};
use margay_dataplane::bpf::conntrack::monotonic_now_ns;
use margay_dataplane::bpf::{BpfNatDriver, Timeouts};
use margay_testnet::{Netns, wire_pod};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

// === Harness ===

fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI must not skip it"
    );
    let _ = writeln!(
        std::io::stderr(),
        "skipping {test}: needs root (CAP_BPF, CAP_SYS_ADMIN to mount a bpffs)"
    );
    false
}

/// A bpffs of our own on a temporary directory; unmounted on drop (pins go with it).
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("margay-dp-bpffs-")
            .tempdir()
            .expect("tempdir");
        mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount bpffs");
        Self { dir }
    }

    fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("margay")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

fn load(pin_dir: &Path, sizes: MapSizes) -> Dataplane {
    Dataplane::load(&Config {
        pin_dir: pin_dir.to_owned(),
        sizes,
        log_level: LogLevel::Off,
        ctlb_udp: false,
    })
    .expect("load dataplane")
}

/// A dataplane with small maps in its own bpffs, and a driver over its maps.
struct Node {
    driver: BpfNatDriver,
    dp: Dataplane,
    fs: Bpffs,
}

impl Node {
    fn new() -> Self {
        Self::with_sizes(MapSizes::small())
    }

    fn with_sizes(sizes: MapSizes) -> Self {
        let fs = Bpffs::new();
        let dp = load(&fs.pin_dir(), sizes);
        let driver = BpfNatDriver::new(dp.maps().expect("maps")).expect("driver");
        Self { driver, dp, fs }
    }

    /// Applies a scenario and checks that the kernel holds exactly the model.
    fn sync(&mut self, s: &Scenario) -> margay_dataplane::bpf::ApplyReport {
        let report = self
            .driver
            .sync(&s.services, &s.slices, &s.node)
            .expect("sync");
        let (kernel, foreign) = self.driver.read_maps().expect("read maps");
        assert!(foreign.is_empty());
        assert!(
            kernel.same_entries(self.driver.current()),
            "kernel:\n{}\nmodel:\n{}",
            kernel.dump(),
            self.driver.current().dump()
        );
        report
    }
}

fn scenario(yaml: &str) -> Scenario {
    Scenario::from_yaml(yaml).expect("scenario")
}

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const CLIENT_POD: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 2);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const LOCAL_BE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 1, 3), 8080);
const REMOTE_BE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 66, 2, 4), 8080);

/// web: NodePort, externalTrafficPolicy Local, a local and a remote endpoint; sticky: ClientIP
/// affinity, two remote endpoints; dns: UDP; empty: no endpoints.
const BASE: &str = r#"
node: {name: node-a, ips: [192.168.50.1], clusterCIDRs: [10.64.0.0/12]}
objects:
  - apiVersion: v1
    kind: Service
    metadata: {namespace: default, name: web}
    spec:
      type: NodePort
      clusterIP: 10.96.0.10
      externalTrafficPolicy: Local
      ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080}]
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {namespace: default, name: web-1, labels: {kubernetes.io/service-name: web}}
    addressType: IPv4
    endpoints:
      - {addresses: [10.65.1.3], nodeName: node-a}
      - {addresses: [10.66.2.4], nodeName: node-b}
    ports: [{name: http, port: 8080, protocol: TCP}]
  - apiVersion: v1
    kind: Service
    metadata: {namespace: default, name: sticky}
    spec:
      clusterIP: 10.96.0.20
      sessionAffinity: ClientIP
      ports: [{name: http, port: 80, protocol: TCP}]
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {namespace: default, name: sticky-1, labels: {kubernetes.io/service-name: sticky}}
    addressType: IPv4
    endpoints:
      - {addresses: [10.66.3.1], nodeName: node-b}
      - {addresses: [10.66.3.2], nodeName: node-b}
    ports: [{name: http, port: 8080, protocol: TCP}]
  - apiVersion: v1
    kind: Service
    metadata: {namespace: default, name: dns}
    spec:
      clusterIP: 10.96.0.53
      ports: [{name: dns, port: 53, protocol: UDP}]
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {namespace: default, name: dns-1, labels: {kubernetes.io/service-name: dns}}
    addressType: IPv4
    endpoints:
      - {addresses: [10.66.4.1], nodeName: node-b}
      - {addresses: [10.66.4.2], nodeName: node-b}
    ports: [{name: dns, port: 5353, protocol: UDP}]
  - apiVersion: v1
    kind: Service
    metadata: {namespace: default, name: empty}
    spec:
      clusterIP: 10.96.0.99
      ports: [{name: http, port: 80, protocol: TCP}]
"#;

// === Packets ===

const SYN: u8 = 0x02;

/// Ethernet + IPv4 + TCP (SYN) or UDP, checksums computed.
fn packet(proto: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let l4_len: usize = if proto == 6 { 20 } else { 8 };
    let total = 20 + l4_len;
    let mut p = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    p.extend_from_slice(&src.0.octets());
    p.extend_from_slice(&dst.0.octets());
    let c = csum(&p[14..34], 0);
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&src.1.to_be_bytes());
    p.extend_from_slice(&dst.1.to_be_bytes());
    if proto == 6 {
        p.extend_from_slice(&1000u32.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&[0x50, SYN, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
    }
    let s = src.0.octets();
    let d = dst.0.octets();
    let pseudo: u32 = [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
        u16::from(proto),
        l4_len as u16,
    ]
    .iter()
    .map(|w| u32::from(*w))
    .sum();
    let off = 34 + if proto == 6 { 16 } else { 6 };
    let c = csum(&p[34..], pseudo);
    p[off..off + 2].copy_from_slice(&c.to_be_bytes());
    p
}

fn csum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The destination of a packet as the program left it.
fn destination(p: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(p[30], p[31], p[32], p[33]),
        u16::from_be_bytes([p[36], p[37]]),
    )
}

/// Sends a first packet of a new flow through `hook`; returns the verdict and destination.
fn first_packet(
    dp: &Dataplane,
    hook: TcProgram,
    proto: u8,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> (u32, (Ipv4Addr, u16)) {
    let run = dp.run_tc(hook, &packet(proto, src, dst), 0).expect("run");
    (run.verdict, destination(&run.packet))
}

// === Tests ===

/// Every golden case of margay-calc, one after another in one set of maps (so each step is a
/// diff from an unrelated model), then nothing: the kernel always reads back as the model.
#[test]
fn golden_cases_load_and_read_back() {
    if !privileged("golden_cases_load_and_read_back") {
        return;
    }
    let mut node = Node::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../margay-calc/tests/golden-bpf-nat");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("golden cases")
        .map(|e| e.expect("entry").path().join("input.yaml"))
        .filter(|p| p.exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 15);
    for case in &cases {
        let s = scenario(&std::fs::read_to_string(case).expect("read"));
        node.sync(&s);
        // What the kernel holds is exactly the golden text.
        let expected = std::fs::read_to_string(case.with_file_name("expected.txt")).expect("read");
        let fresh = bpf_nat_model(&s.services, &s.slices, &s.node, &NatModel::default());
        assert_eq!(fresh.dump(), expected, "{}", case.display());
        assert!(
            fresh.same_entries(node.driver.current()),
            "{}",
            case.display()
        );
        assert!(node.driver.verify().expect("verify").is_empty());
    }
    let nothing = Scenario::default();
    let report = node.sync(&nothing);
    assert_eq!((report.frontends, report.backends), (0, 0));
    assert!(
        node.driver
            .read_maps()
            .expect("read")
            .0
            .frontends
            .is_empty()
    );
}

/// A changed model writes only what changed: one endpoint replaced is one backend write.
#[test]
fn a_changed_endpoint_is_one_write() {
    if !privileged("a_changed_endpoint_is_one_write") {
        return;
    }
    let mut node = Node::new();
    let base = scenario(BASE);
    let first = node.sync(&base);
    // 4 ClusterIPs + 1 NodePort and its wildcard (for flows tunnelled from other nodes);
    // 2 + 2 + 2 backends.
    assert_eq!((first.frontends_written, first.backends_written), (6, 6));
    assert_eq!(node.sync(&base).operations(), 0, "no change, no write");

    let changed = scenario(&BASE.replace("10.66.4.2", "10.66.4.9"));
    let report = node.sync(&changed);
    assert_eq!(
        (
            report.backends_written,
            report.frontends_written,
            report.frontends_deleted,
            report.backends_deleted
        ),
        (1, 0, 0, 0),
        "{report:?}"
    );

    // A service gone: its frontend, then its two backends; nothing else.
    let without_dns = scenario(&BASE.replace("clusterIP: 10.96.0.53", "clusterIP: None"));
    let report = node.sync(&without_dns);
    assert_eq!(
        (
            report.frontends_deleted,
            report.backends_deleted,
            report.operations()
        ),
        (1, 2, 3)
    );
}

/// Nothing is written before the first apply, and a restarted agent (new dataplane load and
/// driver over the same pins) adopts the maps and writes nothing for an unchanged model.
#[test]
fn restart_adopts_the_maps_and_writes_nothing() {
    if !privileged("restart_adopts_the_maps_and_writes_nothing") {
        return;
    }
    let fs = Bpffs::new();
    let base = scenario(BASE);
    let written = {
        let dp = load(&fs.pin_dir(), MapSizes::small());
        let mut driver = BpfNatDriver::new(dp.maps().expect("maps")).expect("driver");
        assert!(!driver.applied());
        assert_eq!(driver.adopted().frontends, 0);
        assert!(driver.read_maps().expect("read").0.frontends.is_empty());
        driver
            .sync(&base.services, &base.slices, &base.node)
            .expect("sync");
        driver.current().clone()
    };
    // The agent is gone (driver and programs dropped); the pins keep the maps.
    let dp = load(&fs.pin_dir(), MapSizes::small());
    assert!(dp.replaced_maps().is_empty());
    let mut driver = BpfNatDriver::new(dp.maps().expect("maps")).expect("driver");
    assert_eq!(driver.adopted().frontends, written.frontends.len());
    assert_eq!(driver.adopted().backends, written.backends.len());
    // Creating a driver writes nothing either.
    assert!(driver.current().same_entries(&written));
    let report = driver
        .sync(&base.services, &base.slices, &base.node)
        .expect("sync");
    assert_eq!(report.operations(), 0, "{report:?}");
    assert_eq!(driver.current().services, written.services, "ids adopted");

    let changed = scenario(&BASE.replace("10.66.3.2", "10.66.3.7"));
    let report = driver
        .sync(&changed.services, &changed.slices, &changed.node)
        .expect("sync");
    assert_eq!(report.operations(), 1, "{report:?}");
}

/// The programs translate what the driver wrote: ClusterIP to any backend, externalTrafficPolicy
/// Local NodePort from outside to the local backend only, from a pod to both, no endpoints to a
/// RST, UDP too.
#[test]
fn packets_follow_the_driver_model() {
    if !privileged("packets_follow_the_driver_model") {
        return;
    }
    let mut node = Node::new();
    node.sync(&scenario(BASE));
    let web = (Ipv4Addr::new(10, 96, 0, 10), 80);
    let np = (NODE_IP, 30080);
    let mut from_pod = BTreeSet::new();
    let mut from_pod_np = BTreeSet::new();
    let mut from_outside = BTreeSet::new();
    for port in 0..64u16 {
        let (v, d) = first_packet(
            &node.dp,
            TcProgram::FromWorkload,
            6,
            (CLIENT_POD, 40000 + port),
            web,
        );
        assert_eq!(v, TC_ACT_OK);
        from_pod.insert(d);
        let (_, d) = first_packet(
            &node.dp,
            TcProgram::FromWorkload,
            6,
            (CLIENT_POD, 41000 + port),
            np,
        );
        from_pod_np.insert(d);
        let (_, d) = first_packet(
            &node.dp,
            TcProgram::FromHostIface,
            6,
            (EXTERNAL, 42000 + port),
            np,
        );
        from_outside.insert(d);
    }
    let both = BTreeSet::from([LOCAL_BE, REMOTE_BE]);
    assert_eq!(from_pod, both);
    assert_eq!(
        from_pod_np, both,
        "in-cluster clients of a Local NodePort use every backend"
    );
    assert_eq!(from_outside, BTreeSet::from([LOCAL_BE]));

    let (v, d) = first_packet(
        &node.dp,
        TcProgram::FromWorkload,
        17,
        (CLIENT_POD, 5000),
        (Ipv4Addr::new(10, 96, 0, 53), 53),
    );
    assert_eq!(v, TC_ACT_OK);
    assert!(d.0 == Ipv4Addr::new(10, 66, 4, 1) || d.0 == Ipv4Addr::new(10, 66, 4, 2));
    assert_eq!(d.1, 5353);

    let (v, _) = first_packet(
        &node.dp,
        TcProgram::FromWorkload,
        6,
        (CLIENT_POD, 43000),
        (Ipv4Addr::new(10, 96, 0, 99), 80),
    );
    assert_eq!(
        v, TC_ACT_REDIRECT,
        "no endpoints: the SYN is answered with a RST"
    );
}

/// A sticky client whose backend leaves the service loses its affinity entry at once.
#[test]
fn affinity_to_a_removed_backend_is_purged() {
    if !privileged("affinity_to_a_removed_backend_is_purged") {
        return;
    }
    let mut node = Node::new();
    node.sync(&scenario(BASE));
    let sticky = (Ipv4Addr::new(10, 96, 0, 20), 80);
    let (_, first) = first_packet(
        &node.dp,
        TcProgram::FromWorkload,
        6,
        (CLIENT_POD, 40000),
        sticky,
    );
    for port in 1..16 {
        let (_, d) = first_packet(
            &node.dp,
            TcProgram::FromWorkload,
            6,
            (CLIENT_POD, 40000 + port),
            sticky,
        );
        assert_eq!(d, first, "sticky");
    }
    assert_eq!(node.driver.maps().affinity.entries().expect("aff").len(), 1);

    // The backend the client sticks to goes away.
    let gone = first.0.to_string();
    let other = if gone == "10.66.3.1" {
        "10.66.3.2"
    } else {
        "10.66.3.1"
    };
    let yaml = BASE.replace(
        &format!("      - {{addresses: [{gone}], nodeName: node-b}}\n"),
        "",
    );
    let report = node.sync(&scenario(&yaml));
    assert_eq!(report.affinity_removed, 1, "{report:?}");
    assert!(
        node.driver
            .maps()
            .affinity
            .entries()
            .expect("aff")
            .is_empty()
    );
    let (_, d) = first_packet(
        &node.dp,
        TcProgram::FromWorkload,
        6,
        (CLIENT_POD, 40100),
        sticky,
    );
    assert_eq!(d.0.to_string(), other);
}

/// Synthetic pairs with chosen ages and states, plus real ones created by the programs: the
/// cleanup removes expired pairs, old orphans and flows to removed backends, and keeps live
/// flows, young orphans and flows whose backend stays.
#[test]
fn conntrack_cleanup_removes_expired_orphaned_and_stale_flows() {
    if !privileged("conntrack_cleanup_removes_expired_orphaned_and_stale_flows") {
        return;
    }
    let mut node = Node::new();
    node.sync(&scenario(BASE));
    let now = monotonic_now_ns();
    let sec = 1_000_000_000u64;
    let ago = |s: u64| now.saturating_sub(s * sec);
    let web = (Ipv4Addr::new(10, 96, 0, 10), 80);
    let dns = (Ipv4Addr::new(10, 96, 0, 53), 53);
    let est = 0x3; // SYN|ACK

    let mut insert_pair = |client: (Ipv4Addr, u16),
                           front: (Ipv4Addr, u16),
                           back: (Ipv4Addr, u16),
                           proto: Protocol,
                           created: u64,
                           last: u64,
                           tcp: u8|
     -> (CtKey, CtKey) {
        let (fk, fwd, rk, rev) = nat_pair(client, front, back, proto, created, last, tcp);
        let ct = &mut node.driver.maps_mut().conntrack;
        ct.insert(&rk, &rev).expect("insert");
        ct.insert(&fk, &fwd).expect("insert");
        (fk, rk)
    };
    let c = |n: u16| (CLIENT_POD, 50000 + n);
    let dns_be = (Ipv4Addr::new(10, 66, 4, 1), 5353);
    // Kept: established TCP, last packet 10 minutes ago.
    let live_tcp = insert_pair(c(1), web, LOCAL_BE, Protocol::Tcp, ago(7200), ago(600), est);
    // Kept: UDP, last packet 30 s ago.
    let live_udp = insert_pair(c(2), dns, dns_be, Protocol::Udp, ago(300), ago(30), 0);
    // Removed: UDP idle for 2 minutes.
    let old_udp = insert_pair(c(3), dns, dns_be, Protocol::Udp, ago(300), ago(120), 0);
    // Removed: established TCP idle for 2 hours.
    let old_tcp = insert_pair(
        c(4),
        web,
        REMOTE_BE,
        Protocol::Tcp,
        ago(9000),
        ago(7200),
        est,
    );
    // Removed: a SYN never answered, 25 s ago.
    let syn = insert_pair(c(5), web, REMOTE_BE, Protocol::Tcp, ago(25), ago(25), 0x1);
    // Removed: fresh UDP and TCP flows to backends that are not the service's.
    let stale_udp = insert_pair(
        c(6),
        dns,
        (Ipv4Addr::new(10, 66, 4, 77), 5353),
        Protocol::Udp,
        ago(20),
        now,
        0,
    );
    let stale_tcp = insert_pair(
        c(7),
        web,
        (Ipv4Addr::new(10, 66, 9, 9), 8080),
        Protocol::Tcp,
        ago(20),
        now,
        est,
    );
    // Orphans: a reverse entry whose forward entry is gone, old (removed) and young (kept).
    let old_orphan = insert_pair(c(8), web, LOCAL_BE, Protocol::Tcp, ago(60), ago(1), est);
    let young_orphan = insert_pair(c(9), web, LOCAL_BE, Protocol::Tcp, ago(2), ago(1), 0x1);
    {
        let ct = &mut node.driver.maps_mut().conntrack;
        ct.remove(&old_orphan.0).expect("remove");
        ct.remove(&young_orphan.0).expect("remove");
    }
    // Real flows from the programs: to each dns backend.
    for port in 0..8 {
        first_packet(
            &node.dp,
            TcProgram::FromWorkload,
            17,
            (CLIENT_POD, 6000 + port),
            dns,
        );
    }
    let before = node.driver.maps().conntrack.entries().expect("ct").len();
    assert_eq!(before, 2 * 7 + 2 + 2 * 8);

    let report = node
        .driver
        .cleanup_conntrack(&Timeouts::default())
        .expect("cleanup");
    assert_eq!(report.entries, before);
    assert_eq!(report.expired_total(), 3, "{report:?}");
    assert_eq!(report.expired.get("udp"), Some(&1));
    assert_eq!(report.expired.get("tcp_established"), Some(&1));
    assert_eq!(report.expired.get("tcp_syn_sent"), Some(&1));
    assert_eq!(
        (report.stale_backend_udp, report.stale_backend_tcp),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(report.orphans, 1);
    assert_eq!(report.removed_entries, 3 * 2 + 2 * 2 + 1);

    let ct = &node.driver.maps().conntrack;
    let present = |k: &CtKey| ct.get(k).expect("get").is_some();
    for (name, (fk, rk)) in [("live tcp", live_tcp), ("live udp", live_udp)] {
        assert!(present(&fk) && present(&rk), "{name} kept");
    }
    for (name, (fk, rk)) in [
        ("old udp", old_udp),
        ("old tcp", old_tcp),
        ("syn", syn),
        ("stale udp", stale_udp),
        ("stale tcp", stale_tcp),
    ] {
        assert!(!present(&fk) && !present(&rk), "{name} removed");
    }
    assert!(!present(&old_orphan.1), "old orphan removed");
    assert!(present(&young_orphan.1), "young orphan kept");

    // A dns backend leaves: the real flows to it go at once, the others stay.
    let left = ct.entries().expect("ct").len();
    let to_removed = ct
        .entries()
        .expect("ct")
        .iter()
        .filter(|(_, v)| v.kind() == Some(CtType::NatForward) && v.nat().0 == dns_be.0)
        .count();
    node.sync(&scenario(&BASE.replace(
        "      - {addresses: [10.66.4.1], nodeName: node-b}\n",
        "",
    )));
    let report = node
        .driver
        .cleanup_conntrack(&Timeouts::default())
        .expect("cleanup");
    // live_udp goes too: its backend is the removed one.
    assert_eq!(report.stale_backend_udp, to_removed, "{report:?}");
    assert_eq!(
        node.driver.maps().conntrack.entries().expect("ct").len(),
        left - 2 * to_removed
    );
}

/// Before the first apply the model knows nothing: cleanup removes expired flows only.
#[test]
fn cleanup_before_the_first_apply_keeps_unknown_flows() {
    if !privileged("cleanup_before_the_first_apply_keeps_unknown_flows") {
        return;
    }
    let mut node = Node::new();
    let now = monotonic_now_ns();
    let (fk, fb) = CtKey::new(
        Protocol::Udp,
        (CLIENT_POD, 1),
        (Ipv4Addr::new(10, 96, 0, 53), 53),
    );
    let (rk, rb) = CtKey::new(
        Protocol::Udp,
        (CLIENT_POD, 1),
        (Ipv4Addr::new(10, 66, 4, 1), 5353),
    );
    let fwd = CtValue {
        created_ns: now.saturating_sub(60_000_000_000),
        last_seen_ns: now,
        kind: CtType::NatForward as u8,
        flags: u8::from(fb),
        peer: rk,
        nat_addr: be_addr(Ipv4Addr::new(10, 66, 4, 1)),
        nat_port: be_port(5353),
        ..CtValue::default()
    };
    let rev = CtValue {
        kind: CtType::NatReverse as u8,
        flags: u8::from(rb),
        peer: fk,
        nat_addr: be_addr(Ipv4Addr::new(10, 96, 0, 53)),
        nat_port: be_port(53),
        ..fwd
    };
    node.driver
        .maps_mut()
        .conntrack
        .insert(&rk, &rev)
        .expect("insert");
    node.driver
        .maps_mut()
        .conntrack
        .insert(&fk, &fwd)
        .expect("insert");
    let report = node
        .driver
        .cleanup_conntrack(&Timeouts::default())
        .expect("cleanup");
    assert_eq!(report.removed_entries, 0, "{report:?}");
    assert_eq!(report.pairs, 1);
}

// === Scale ===

fn scale_objects(
    services: usize,
    endpoints: usize,
    node: &str,
) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = Vec::with_capacity(services);
    let mut slices = Vec::with_capacity(services);
    for i in 0..services {
        let name = format!("svc-{i}");
        let meta = |n: &str| ObjectMeta {
            namespace: Some("scale".to_owned()),
            name: Some(n.to_owned()),
            ..ObjectMeta::default()
        };
        let i = u32::try_from(i).expect("small");
        let cluster_ip = Ipv4Addr::from(0x0a60_0000 + i); // 10.96.0.0 + i
        svcs.push(Service {
            metadata: meta(&name),
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.to_string()),
                ports: Some(vec![ServicePort {
                    name: Some("http".to_owned()),
                    port: 80,
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        });
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("kubernetes.io/service-name".to_owned(), name.clone());
        slices.push(EndpointSlice {
            metadata: ObjectMeta {
                labels: Some(labels),
                ..meta(&format!("{name}-1"))
            },
            address_type: "IPv4".to_owned(),
            endpoints: (0..endpoints)
                .map(|e| {
                    let e = u32::try_from(e).expect("small");
                    Endpoint {
                        addresses: vec![Ipv4Addr::from(0x0a80_0000 + i * 16 + e).to_string()],
                        node_name: Some(if e == 0 { node } else { "other" }.to_owned()),
                        ..Endpoint::default()
                    }
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("http".to_owned()),
                port: Some(8080),
                protocol: Some("TCP".to_owned()),
                ..EndpointPort::default()
            }]),
        });
    }
    (svcs, slices)
}

/// 10,000 Services x 10 endpoints through the calculation and the driver into maps sized for
/// them; prints the figures (run with `--nocapture`; `--release` for production numbers).
#[test]
fn scale_ten_thousand_services() {
    if !privileged("scale_ten_thousand_services") {
        return;
    }
    const SERVICES: usize = 10_000;
    const ENDPOINTS: usize = 10;
    const FLOWS: u32 = 50_000;
    let sizes = MapSizes {
        nat_frontend: 16_384,
        nat_backend: 131_072,
        conntrack: 131_072,
        ..MapSizes::small()
    };
    let mut node = Node::with_sizes(sizes);
    let ctx = NodeContext {
        node_name: "node-a".to_owned(),
        node_ips: vec![NODE_IP],
        cluster_cidrs: vec![],
    };
    let (svcs, mut slices) = scale_objects(SERVICES, ENDPOINTS, "node-a");

    let t = Instant::now();
    let model = bpf_nat_model(&svcs, &slices, &ctx, node.driver.current());
    let calc_full = t.elapsed();
    let t = Instant::now();
    let full = node.driver.apply(&model).expect("apply");
    let apply_full = t.elapsed();
    assert_eq!(full.frontends_written, SERVICES);
    assert_eq!(full.backends_written, SERVICES * ENDPOINTS);

    // One endpoint of one service changes (the last in address order: one backend write).
    slices[4321].endpoints[ENDPOINTS - 1].addresses = vec!["10.200.0.1".to_owned()];
    let t = Instant::now();
    let model = bpf_nat_model(&svcs, &slices, &ctx, node.driver.current());
    let calc_one = t.elapsed();
    let t = Instant::now();
    let one = node.driver.apply(&model).expect("apply");
    let apply_one = t.elapsed();
    assert_eq!(one.operations(), 1, "{one:?}");

    // A restarted agent: adopt 110,000 entries, recompute, write nothing.
    let t = Instant::now();
    let mut restarted = BpfNatDriver::open(&node.fs.pin_dir()).expect("driver");
    let adopt = t.elapsed();
    let t = Instant::now();
    let again = restarted.sync(&svcs, &slices, &ctx).expect("sync");
    let resync = t.elapsed();
    assert_eq!(again.operations(), 0);

    // Conntrack: 50,000 live established pairs (100,000 entries) to the services' backends.
    let now = monotonic_now_ns();
    let ct = &mut restarted.maps_mut().conntrack;
    for f in 0..FLOWS {
        let svc = f % u32::try_from(SERVICES).expect("small");
        let client = (Ipv4Addr::from(0x0b00_0000 + f), 40000);
        let front = (Ipv4Addr::from(0x0a60_0000 + svc), 80);
        let back = (Ipv4Addr::from(0x0a80_0000 + svc * 16 + 1), 8080);
        let (fk, fwd, rk, rev) = nat_pair(client, front, back, Protocol::Tcp, now, now, 0x3);
        ct.insert(&rk, &rev).expect("insert");
        ct.insert(&fk, &fwd).expect("insert");
    }
    let t = Instant::now();
    let scan = restarted
        .cleanup_conntrack(&Timeouts::default())
        .expect("cleanup");
    let scan_time = t.elapsed();
    assert_eq!(
        (scan.entries, scan.pairs, scan.removed_entries),
        (2 * FLOWS as usize, FLOWS as usize, 0),
        "{scan:?}"
    );

    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let _ = writeln!(
        std::io::stderr(),
        "scale ({profile} build, {SERVICES} services x {ENDPOINTS} endpoints = {} frontends + {} backends):\n  \
         full: calc {calc_full:?}, apply {apply_full:?} ({:.1} us per entry)\n  \
         one endpoint: calc {calc_one:?}, apply {apply_one:?} ({} write)\n  \
         restart: adopt {adopt:?}, calc + apply {resync:?} (0 writes)\n  \
         conntrack scan: {} entries ({FLOWS} live pairs) in {scan_time:?}, nothing removed",
        full.frontends,
        full.backends,
        apply_full.as_secs_f64() * 1e6 / (full.frontends + full.backends) as f64,
        one.operations(),
        scan.entries,
    );
    assert!(apply_full < Duration::from_secs(60));
}

// === Real traffic ===

const ECHO: &str = r#"
node: {name: node-a, ips: [192.168.50.1], clusterCIDRs: [10.64.0.0/12]}
objects:
  - apiVersion: v1
    kind: Service
    metadata: {namespace: default, name: echo}
    spec:
      clusterIP: 10.96.0.10
      ports:
        - {name: tcp, port: 80, protocol: TCP}
        - {name: udp, port: 53, protocol: UDP}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {namespace: default, name: echo-1, labels: {kubernetes.io/service-name: echo}}
    addressType: IPv4
    endpoints:
      - {addresses: [10.65.1.3], nodeName: node-a}
    ports:
      - {name: tcp, port: 8080, protocol: TCP}
      - {name: udp, port: 5353, protocol: UDP}
"#;

/// A pod talks to a Service the driver programmed from Service/EndpointSlice objects, over
/// real veths: the cleanup sees the live TCP flow as established and keeps it; the agent
/// restarts mid-connection (new dataplane load, new driver over the pins), writes nothing, and
/// the connection goes on; when the endpoint leaves the Service, the cleanup removes both flows.
#[test]
fn real_traffic_survives_cleanup_and_restart() {
    use std::io::{Read as _, Write as _};
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};

    if !privileged("real_traffic_survives_cleanup_and_restart") {
        return;
    }
    let fs = Bpffs::new();
    let (node_ns, client_ns, backend_ns) = (
        Netns::with_prefix("mgd"),
        Netns::with_prefix("mgd"),
        Netns::with_prefix("mgd"),
    );
    node_ns.sysctl("net.ipv4.ip_forward=1");
    node_ns.sysctl("net.ipv4.conf.all.rp_filter=0");
    node_ns.sysctl("net.ipv4.conf.default.rp_filter=0");
    wire_pod(&node_ns, &client_ns, "caliA", "10.65.0.2");
    wire_pod(&node_ns, &backend_ns, "caliB", "10.65.1.3");

    let echo = scenario(ECHO);
    let mut dp = load(&fs.pin_dir(), MapSizes::small());
    let mut driver = BpfNatDriver::new(dp.maps().expect("maps")).expect("driver");
    driver
        .sync(&echo.services, &echo.slices, &echo.node)
        .expect("sync");
    let links: Vec<margay_bpf::TcAttachment> = node_ns.run(|| {
        let mut v = Vec::new();
        for veth in ["caliA", "caliB"] {
            for p in [TcProgram::FromWorkload, TcProgram::ToWorkload] {
                v.push(
                    dp.attach_tc(p, veth, margay_bpf::TcMode::Auto)
                        .expect("attach"),
                );
            }
        }
        v
    });

    // Backend: a TCP echo server and a UDP echo socket.
    let (listener, udp_server) = backend_ns.run(|| {
        (
            TcpListener::bind(("10.65.1.3", 8080)).expect("bind"),
            UdpSocket::bind(("10.65.1.3", 5353)).expect("bind udp"),
        )
    });
    // Detached: once its flow is removed, the server never sees the client's FIN; its reads
    // time out and the thread ends on its own.
    std::thread::spawn(move || {
        let Ok((mut c, _)) = listener.accept() else {
            return;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buf = [0u8; 64];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 || c.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let udp = std::thread::spawn(move || {
        udp_server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        if let Ok((n, from)) = udp_server.recv_from(&mut buf) {
            let _ = udp_server.send_to(&buf[..n], from);
        }
    });

    let svc = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80));
    let mut conn = client_ns.run(|| {
        TcpStream::connect_timeout(&svc, Duration::from_secs(5)).expect("connect to the ClusterIP")
    });
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut round_trip = |msg: &[u8]| {
        conn.write_all(msg).expect("write");
        let mut buf = vec![0u8; msg.len()];
        conn.read_exact(&mut buf).expect("read");
        assert_eq!(buf, msg);
    };
    round_trip(b"one");
    let client_udp = client_ns.run(|| {
        let u = UdpSocket::bind(("10.65.0.2", 0)).expect("bind");
        u.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        u.send_to(b"ping", (Ipv4Addr::new(10, 96, 0, 10), 53))
            .expect("send");
        let mut buf = [0u8; 8];
        let (n, from) = u.recv_from(&mut buf).expect("udp answer");
        assert_eq!((&buf[..n], from.port()), (&b"ping"[..], 53));
        u
    });

    // Two pairs; the TCP one is established as the cleanup reads it: with no grace and a SYN
    // timeout of zero it would go if it were not.
    let strict = Timeouts {
        creation_grace: Duration::ZERO,
        tcp_syn_sent: Duration::ZERO,
        ..Timeouts::default()
    };
    let report = driver.cleanup_conntrack(&strict).expect("cleanup");
    assert_eq!((report.pairs, report.removed_entries), (2, 0), "{report:?}");
    round_trip(b"two");

    // The agent restarts: programs and maps reloaded from the pins, a new driver.
    drop(driver);
    let dp2 = load(&fs.pin_dir(), MapSizes::small());
    let mut driver = BpfNatDriver::new(dp2.maps().expect("maps")).expect("driver");
    let report = driver
        .sync(&echo.services, &echo.slices, &echo.node)
        .expect("sync");
    assert_eq!(report.operations(), 0, "{report:?}");
    round_trip(b"three");
    let report = driver.cleanup_conntrack(&strict).expect("cleanup");
    assert_eq!(report.removed_entries, 0, "{report:?}");

    // The endpoint leaves the Service: both flows go at once.
    let gone = scenario(&ECHO.replace("      - {addresses: [10.65.1.3], nodeName: node-a}\n", ""));
    driver
        .sync(&gone.services, &gone.slices, &gone.node)
        .expect("sync");
    let report = driver
        .cleanup_conntrack(&Timeouts::default())
        .expect("cleanup");
    assert_eq!(
        (report.stale_backend_tcp, report.stale_backend_udp),
        (1, 1),
        "{report:?}"
    );
    assert!(driver.maps().conntrack.entries().expect("ct").is_empty());

    drop(conn);
    drop(client_udp);
    udp.join().expect("udp echo");
    drop(links);
    drop(dp);
}

/// Equivalence: one Service at a time (`sync_services`) leaves the kernel's maps exactly as a
/// full recalculation wants them, at every step of each golden scenario's churn (Services
/// arriving, endpoints going and turning terminating, Services and slices going), with a peer
/// node so that remote backends carry their node: after each incremental step the maps equal the
/// driver's model and a full sync finds nothing to write.
#[test]
fn one_service_at_a_time_equals_a_full_sync() {
    if !privileged("one_service_at_a_time_equals_a_full_sync") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../margay-calc/tests/golden-bpf-nat");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("golden cases")
        .flat_map(|e| {
            let case = e.expect("entry").path();
            [case.join("input.yaml"), case.join("update.yaml")]
        })
        .filter(|p| p.exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 15);
    let mut node = Node::new();
    node.driver.set_peer_nodes(
        [("node-b".to_owned(), Ipv4Addr::new(192, 168, 50, 2))]
            .into_iter()
            .collect(),
    );
    let (mut incremental, mut full) = (0, 0);
    for case in &cases {
        let s = scenario(&std::fs::read_to_string(case).expect("read"));
        // Each case starts from empty maps after a full sync (the agent's first sync is full).
        node.sync(&Scenario {
            node: s.node.clone(),
            ..Scenario::default()
        });
        for step in s.churn() {
            let what = format!("{}: {}", case.display(), step.what);
            match node
                .driver
                .sync_services(&step.touched, &step.services, &step.slices, &s.node)
                .expect("sync_services")
            {
                margay_dataplane::bpf::ServicesSync::Applied(_) => incremental += 1,
                margay_dataplane::bpf::ServicesSync::NeedsFull(why) => {
                    eprintln!("{what}: full sync ({why})");
                    node.driver
                        .sync(&step.services, &step.slices, &s.node)
                        .expect("sync");
                    full += 1;
                }
            }
            let (kernel, foreign) = node.driver.read_maps().expect("read maps");
            assert!(foreign.is_empty(), "{what}");
            assert!(
                kernel.same_entries(node.driver.current()),
                "{what}: kernel:\n{}\nmodel:\n{}",
                kernel.dump(),
                node.driver.current().dump()
            );
            let before = node.driver.current().clone();
            let report = node
                .driver
                .sync(&step.services, &step.slices, &s.node)
                .expect("full sync");
            assert_eq!(
                report.operations(),
                0,
                "{what}: a full sync after the incremental one still wrote {report:?}\nincremental:\n{}\nfull:\n{}",
                before.dump(),
                node.driver.current().dump()
            );
        }
    }
    println!("{incremental} incremental steps, {full} fell back to a full sync");
    assert!(
        incremental > 50,
        "most steps are incremental ({incremental})"
    );
}

/// The conntrack cleanup removes a finished flow's pair while a new flow from the same client
/// tuple, through another frontend to the same backend, has taken its reverse entry over (the
/// bench's NodePort and LoadBalancer rounds share the external client's ports): the new flow's
/// entries stay, else its replies would go untranslated and the client time out.
#[test]
fn removing_a_finished_pair_spares_the_reverse_entry_a_new_flow_took_over() {
    if !privileged("removing_a_finished_pair_spares_the_reverse_entry_a_new_flow_took_over") {
        return;
    }
    let mut node = Node::new();
    node.sync(&scenario(BASE));
    let now = monotonic_now_ns();
    let client = (CLIENT_POD, 51000);
    let pair = |front: (Ipv4Addr, u16), created: u64, tcp: u8| {
        nat_pair(
            client,
            front,
            LOCAL_BE,
            Protocol::Tcp,
            created,
            created,
            tcp,
        )
    };
    // The old flow, finished (SYN, ACK, FIN from both sides) a minute ago, through one frontend.
    let (old_fk, old_fwd, rk, old_rev) = pair(
        (Ipv4Addr::new(10, 96, 0, 10), 80),
        now - 60_000_000_000,
        0x7,
    );
    // The new flow, through another frontend to the same backend: the same reverse key.
    let (new_fk, new_fwd, new_rk, new_rev) = pair((Ipv4Addr::new(10, 96, 0, 11), 80), now, 0x1);
    assert_eq!(rk, new_rk, "both flows share the reverse tuple");
    let ct = &mut node.driver.maps_mut().conntrack;
    ct.insert(&rk, &old_rev).expect("insert");
    ct.insert(&old_fk, &old_fwd).expect("insert");
    // The takeover, after the cleanup judged the old pair expired.
    ct.insert(&rk, &new_rev).expect("insert");
    ct.insert(&new_fk, &new_fwd).expect("insert");

    ct.remove_pair(&old_fk).expect("remove pair");

    assert!(
        ct.get(&old_fk).expect("get").is_none(),
        "the old forward entry is removed"
    );
    let reverse = ct
        .get(&rk)
        .expect("get")
        .expect("the new flow's reverse entry stays");
    assert_eq!(reverse.peer, new_fk, "and still points to the new flow");
    assert!(
        ct.get(&new_fk).expect("get").is_some(),
        "the new forward entry stays"
    );
}

/// A NAT flow's conntrack pair as the programs write it: the forward entry (client ->
/// frontend, translated to the backend) and the reverse one (backend -> client), each naming
/// the other as its peer; `tcp` is each leg's TCP flags.
fn nat_pair(
    client: (Ipv4Addr, u16),
    front: (Ipv4Addr, u16),
    back: (Ipv4Addr, u16),
    proto: Protocol,
    created: u64,
    last: u64,
    tcp: u8,
) -> (CtKey, CtValue, CtKey, CtValue) {
    let (fk, fb) = CtKey::new(proto, client, front);
    let (rk, rb) = CtKey::new(proto, client, back);
    let fwd = CtValue {
        created_ns: created,
        last_seen_ns: last,
        kind: CtType::NatForward as u8,
        flags: u8::from(fb),
        tcp_a: tcp,
        tcp_b: tcp,
        svc_id: 1,
        peer: rk,
        nat_addr: be_addr(back.0),
        nat_port: be_port(back.1),
        psnat_port: 0,
        ..CtValue::default()
    };
    let rev = CtValue {
        kind: CtType::NatReverse as u8,
        flags: u8::from(rb),
        peer: fk,
        nat_addr: be_addr(front.0),
        nat_port: be_port(front.1),
        ..fwd
    };
    (fk, fwd, rk, rev)
}
