//! Helpers for the privileged tests: root check, RAII guards for every piece of kernel state a
//! test creates (bpffs mount, network namespace, cgroup), and a packet builder/checker.
//!
//! Guards use unique names (pid + counter) and clean up on drop, so also when a test panics.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

pub mod packet;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use margay_bpf::maps::nat::{ServiceNat, write_service};
use margay_bpf::maps::{NatBackendValue, NatFrontendKey, Protocol};

// The namespace guard and the pod wiring are shared with margay-dataplane's packet tests.
pub use margay_testnet::{Netns, unique, wire_pod};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// True when the test can run. Not root: prints why and returns false, except under CI (`CI`
/// set), where skipping would hide a broken setup, so it panics.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI must not skip it"
    );
    eprintln!("skipping {test}: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
    false
}

// === impl Bpffs ===

/// A private bpffs mounted on a temporary directory; unmounted and removed on drop.
#[derive(Debug)]
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("margay-bpffs-")
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

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Unpinning is implied: the mount's pins go with it (their objects live while in use).
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

// === impl Cgroup ===

/// A cgroup v2 directory of our own under the machine's cgroup2 mount (or under a cgroup2
/// mount of our own when there is none); removed on drop. Never the root cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    own_mount: Option<tempfile::TempDir>,
}

impl Cgroup {
    pub fn new() -> Self {
        let (root, own_mount) = match cgroup2_mount() {
            Some(p) => (p, None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("margay-cg2-")
                    .tempdir()
                    .expect("tempdir");
                mount(
                    Some("cgroup2"),
                    dir.path(),
                    Some("cgroup2"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .expect("mount cgroup2");
                (dir.path().to_owned(), Some(dir))
            }
        };
        let path = root.join(unique("margay-test-"));
        std::fs::create_dir(&path).expect("create cgroup");
        Self { path, own_mount }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
        if let Some(dir) = &self.own_mount {
            let _ = umount2(dir.path(), MntFlags::MNT_DETACH);
        }
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on
/// unified ones), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(pre.split_whitespace().nth(4)?))
    })
}

// === the dataplane under test ===

/// A dataplane loaded for one test: its own bpffs (so its own maps), small maps.
#[derive(Debug)]
pub struct Harness {
    pub maps: margay_bpf::maps::Maps,
    pub dp: margay_bpf::Dataplane,
    pub fs: Bpffs,
}

impl Harness {
    pub fn new() -> Self {
        let fs = Bpffs::new();
        let cfg = margay_bpf::Config {
            pin_dir: fs.path().join("margay"),
            sizes: margay_bpf::maps::MapSizes::small(),
            log_level: margay_bpf::LogLevel::Off,
            ctlb_udp: true,
        };
        let dp = margay_bpf::Dataplane::load(&cfg).expect("load dataplane");
        let maps = dp.maps().expect("open maps");
        Self { maps, dp, fs }
    }

    /// Writes `svc`'s frontends and backends as the agent does (no previous backend count).
    pub fn write_service(&mut self, svc: &ServiceNat) {
        write_service(
            &mut self.maps.nat_frontends,
            &mut self.maps.nat_backends,
            svc,
            0,
        )
        .expect("write service");
    }
}

// === two nodes, one Service ===

/// A NodePort + LoadBalancer Service as the agent of the node at `node` programs it when its
/// only backend, `backend`, runs on `backend_node`: for TCP and UDP, the NodePort on the node's
/// address, the NodePort wildcard (matched by flows that arrive in the tunnel) and the LB IP;
/// the backend local on its own node, remote (tagged with its node) on any other.
pub fn node_port_service(
    svc_id: u32,
    node: Ipv4Addr,
    node_port: u16,
    lb: (Ipv4Addr, u16),
    backend: NatBackendValue,
    backend_node: Ipv4Addr,
) -> ServiceNat {
    let mut frontends = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        frontends.push((NatFrontendKey::new(node, node_port, proto, None), 0));
        frontends.push((NatFrontendKey::node_port_any(node_port, proto), 0));
        frontends.push((NatFrontendKey::new(lb.0, lb.1, proto, None), 0));
    }
    let (local, remote) = if node == backend_node {
        (vec![backend], vec![])
    } else {
        (vec![], vec![backend.on_node(backend_node)])
    };
    ServiceNat {
        svc_id,
        frontends,
        local,
        remote,
        affinity_timeout_s: 0,
    }
}

// === impl Topology ===

/// One node in a network namespace with two pods, each in its own namespace, wired as Calico
/// wires them: a veth per pod (`eth0` in the pod, `cali<x>` on the node), a /32 on the pod, a
/// default route via 169.254.1.1 (static neighbour: the node's veth), host routes on the node.
#[derive(Debug)]
pub struct Topology {
    pub node: Netns,
    pub pod_a: Netns,
    pub pod_b: Netns,
}

pub const POD_A_IP: &str = "10.65.0.2";
pub const POD_B_IP: &str = "10.65.1.3";
pub const VETH_A: &str = "caliA";
pub const VETH_B: &str = "caliB";

impl Topology {
    pub fn new() -> Self {
        let t = Self {
            node: Netns::new(),
            pod_a: Netns::new(),
            pod_b: Netns::new(),
        };
        t.node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        t.node
            .exec("sysctl", &["-qw", "net.ipv4.conf.all.rp_filter=0"]);
        t.node
            .exec("sysctl", &["-qw", "net.ipv4.conf.default.rp_filter=0"]);
        t.wire(&t.pod_a, VETH_A, POD_A_IP);
        t.wire(&t.pod_b, VETH_B, POD_B_IP);
        t
    }

    fn wire(&self, pod: &Netns, veth: &str, ip: &str) {
        wire_pod(&self.node, pod, veth, ip);
    }
}
