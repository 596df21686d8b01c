//! Test support for the privileged packet tests of margay-bpf and margay-dataplane: a network
//! namespace guard ([`Netns`]) and a pod wired to a node as Calico wires it ([`wire_pod`]).
//!
//! A dev-dependency only: it shells out to `ip` and panics on any failure, which is what a
//! test wants and nothing else should. Names are unique per process (pid + counter), so test
//! binaries run in parallel; every namespace is deleted on drop, also when a test panics.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique on this machine for this process: `<prefix><pid>x<n>` (at most 15 chars, an
/// interface name's limit, for prefixes up to 4 chars).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its output when it fails; returns its stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace created with `ip netns add`, loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Netns {
    /// A namespace named `mgt<pid>x<n>`.
    pub fn new() -> Self {
        Self::with_prefix("mgt")
    }

    /// A namespace named `<prefix><pid>x<n>` (a prefix of at most 4 chars), so that a test
    /// binary's namespaces can be told apart from another's in `ip netns list`.
    pub fn with_prefix(prefix: &str) -> Self {
        let name = unique(prefix);
        sh("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// `ip netns exec <ns> CMD ARGS`.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name.as_str(), cmd];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// `sysctl -qw SETTING` inside the namespace (e.g. `net.ipv4.ip_forward=1`).
    pub fn sysctl(&self, setting: &str) {
        self.exec("sysctl", &["-qw", setting]);
    }

    /// The index of interface `dev` in this namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", dev]);
        out.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex in {out}"))
    }

    /// The MAC address of interface `dev` in this namespace, as `aa:bb:..`.
    pub fn mac(&self, dev: &str) -> String {
        mac(&self.ip(&["-o", "link", "show", dev]))
    }

    /// Runs `f` on a new thread that has entered this namespace (the calling thread's
    /// namespace is never changed). Sockets created there stay in this namespace wherever
    /// they are used.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = File::open(&path).expect("open netns");
                setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            // The test's own panic (an assertion inside the namespace), not a generic one.
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Wires `pod` to `node` as Calico does: a veth (`eth0` in the pod, `veth` on the node), a /32
/// on the pod, a default route via 169.254.1.1 (static neighbour: the node's veth), a host route
/// and a static neighbour on the node (so no ARP is needed either way).
pub fn wire_pod(node: &Netns, pod: &Netns, veth: &str, ip: &str) {
    node.ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ip(&["link", "set", veth, "up"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    pod.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    let node_mac = node.mac(veth);
    let pod_mac = pod.mac("eth0");
    pod.ip(&[
        "neigh",
        "add",
        "169.254.1.1",
        "lladdr",
        &node_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", veth]);
    node.ip(&[
        "neigh",
        "add",
        ip,
        "lladdr",
        &pod_mac,
        "dev",
        veth,
        "nud",
        "permanent",
    ]);
}

/// The MAC address in an `ip -o link show` line.
fn mac(link_show: &str) -> String {
    let mut it = link_show.split_whitespace();
    while let Some(w) = it.next() {
        if w == "link/ether" {
            return it.next().expect("mac").to_owned();
        }
    }
    panic!("no MAC in {link_show}");
}
