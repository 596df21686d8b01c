//! The lab test harness shared by the lab's integration tests: a lab per test with a unique
//! name, taken down on drop even when the test fails, and the ways tests drive it.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub mod matrix;

/// A lab for one test, removed on drop.
pub struct TestLab {
    pub name: String,
    pub bin_dir: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn skip_unless_root(test: &str) -> bool {
    if margay_lab::is_root() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI must run it: run the suite as root"
    );
    eprintln!("skipping {test}: needs root (network namespaces, iptables, TUN)");
    true
}

impl TestLab {
    /// Brings up a 3-node lab named `<prefix><pid><n>` with `extra` arguments to `up`.
    pub fn up(prefix: &str, extra: &[&str]) -> TestLab {
        TestLab::up_with_env(prefix, extra, &[])
    }

    /// [`TestLab::up`] with environment variables for `margay-lab up`, which its agents inherit
    /// (test-only switches such as `MARGAY_BPF_TC_ATTACH`, or `MARGAY_BPF_DRAIN_LIMIT`).
    pub fn up_with_env(prefix: &str, extra: &[&str], env: &[(&str, &str)]) -> TestLab {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{:x}{n}", std::process::id() % 0xfffff);
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_margay-lab"));
        let bin_dir = bin.parent().expect("bin dir").to_path_buf();
        for needed in ["margay-node", "margay-demo-app", "margayctl"] {
            assert!(
                bin_dir.join(needed).is_file(),
                "{needed} is not built next to margay-lab: run `cargo build --workspace --bins` first"
            );
        }
        let lab = TestLab { name, bin_dir };
        let mut args = vec!["up", "--nodes", "3"];
        args.extend_from_slice(extra);
        let out = Command::new(lab.bin_dir.join("margay-lab"))
            .arg("--name")
            .arg(&lab.name)
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .expect("run margay-lab up");
        assert!(
            out.status.success(),
            "margay-lab up failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        lab
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(self.bin_dir.join("margay-lab"))
            .arg("--name")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run margay-lab")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "margay-lab {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply(&self, yaml: &str) {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(yaml.as_bytes()).expect("write");
        let path = file.path().to_string_lossy().into_owned();
        self.ok(&["apply", "-f", &path]);
    }

    pub fn apply_example(&self, file: &str) {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let path = root.join(file).to_string_lossy().into_owned();
        self.ok(&["apply", "-f", &path]);
    }

    pub fn jsonpath(&self, args: &[&str], template: &str) -> String {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        let o = format!("jsonpath={template}");
        all.extend(["-o", o.as_str()]);
        self.ok(&all).trim().to_owned()
    }

    /// The URL of the lab's datastore, as `margay-lab status` reports it (SQLite by default,
    /// `etcd+unix://...` with `--datastore etcd`).
    pub fn datastore_url(&self) -> String {
        let status: serde_json::Value =
            serde_json::from_str(&self.ok(&["status", "-o", "json"])).expect("status JSON");
        status["datastore_url"]
            .as_str()
            .expect("status has datastore_url")
            .to_owned()
    }

    /// Checks that the lab runs on its own etcd, as `--datastore etcd` asks: the verbs use its
    /// socket, and etcd itself (asked with etcdctl, not through Margay) holds every Node where
    /// Calico keeps them. A test on etcd that silently ran on SQLite would prove nothing.
    pub fn assert_on_lab_etcd(&self) {
        let url = self.datastore_url();
        let socket = url
            .strip_prefix("etcd+unix://")
            .unwrap_or_else(|| panic!("the lab's datastore is not its etcd: {url}"));
        let out = Command::new("etcdctl")
            .env_clear()
            .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
            .arg("--endpoints")
            .arg(format!("unix://{socket}"))
            .args([
                "get",
                "--prefix",
                "--keys-only",
                "/calico/resources/v3/projectcalico.org/nodes/",
            ])
            .output()
            .expect("run etcdctl (Debian's etcd-client)");
        let keys = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            keys.lines().filter(|l| !l.is_empty()).count(),
            3,
            "etcdctl sees the lab's Nodes in etcd: {keys}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `margayctl ARGS` against the lab's datastore; returns stdout.
    pub fn margayctl(&self, args: &[&str]) -> String {
        let out = self.margayctl_at(&self.datastore_url(), args);
        assert!(
            out.status.success(),
            "margayctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `margayctl ARGS` against the datastore at `url`, whatever its outcome.
    pub fn margayctl_at(&self, url: &str, args: &[&str]) -> Output {
        Command::new(self.bin_dir.join("margayctl"))
            .args(args)
            .env("MARGAY_DATASTORE", url)
            .output()
            .expect("run margayctl")
    }

    /// Runs `margay-demo-app probe` from `from`; returns (exit code, first line).
    pub fn probe(&self, from: &From, proto: &str, target: &str) -> (i32, String) {
        let app = self
            .bin_dir
            .join("margay-demo-app")
            .to_string_lossy()
            .into_owned();
        let probe: Vec<&str> = vec![app.as_str(), "probe", proto, target, "--timeout", "2s"];
        let mut args: Vec<&str> = match from {
            From::Pod(pod) => vec!["exec", "-n", "matrix", pod, "--"],
            From::Node(node) => vec!["node", "exec", node, "--"],
            From::Client => vec!["client", "--"],
        };
        args.extend(probe);
        let out = self.run(&args);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        (
            out.status.code().unwrap_or(-1),
            if text.is_empty() { err } else { text },
        )
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let out = self.run(&["down"]);
        if !out.status.success() {
            eprintln!(
                "margay-lab down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A packet capture (`tcpdump -i any`) in one of a lab's namespaces, written to a file of its
/// own and stopped and removed on drop. For diagnosis: a test that sees a flow fail prints that
/// flow's packets ([`Capture::flow`]), hop by hop, so a failure in CI explains itself.
pub struct Capture {
    child: std::process::Child,
    file: PathBuf,
    log: PathBuf,
    netns: String,
}

impl Capture {
    /// Starts capturing in the namespace `<lab>-<role>` (`node-1`, `client`, ...) what matches
    /// the pcap `filter`, and waits until tcpdump listens.
    pub fn start(lab: &TestLab, role: &str, filter: &str) -> Capture {
        let base = std::env::temp_dir().join(format!("{}-{role}", lab.name));
        let (file, log) = (
            base.with_extension("pcap"),
            base.with_extension("tcpdump.log"),
        );
        let stderr = std::fs::File::create(&log).expect("tcpdump log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &format!("{}-{role}", lab.name)])
            // -U: every packet reaches the file at once (the capture is killed, not stopped).
            .args(["tcpdump", "-i", "any", "-n", "-U", "-s", "160", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("run tcpdump (apt-get install tcpdump)");
        let capture = Capture {
            child,
            file,
            log,
            netns: format!("{}-{role}", lab.name),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&capture.log)
            .unwrap_or_default()
            .contains("listening on")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "tcpdump did not start in {role}: {}",
                std::fs::read_to_string(&capture.log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        capture
    }

    /// Reads the capture back with `filter`. In the namespace it was taken in: the file holds
    /// interface indexes, which tcpdump names as the reading namespace does.
    fn read(&self, extra: &[&str], filter: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns, "tcpdump", "-n"])
            .args(extra)
            .arg("-r")
            .arg(&self.file)
            .arg(filter)
            .output()
            .expect("run tcpdump -r")
    }

    /// The captured packets with `port` at either end, one line each with its time and
    /// interface.
    pub fn flow(&self, port: u16) -> String {
        let out = self.read(&["-tt"], &format!("port {port}"));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The ports of the client side of connections with `host` whose handshake was sent more
    /// than once: a SYN or a SYN-ACK retransmitted, i.e. a packet lost or held up on the way,
    /// which TCP repaired by resending it a second later.
    pub fn resent_handshakes(&self, host: &str) -> Vec<u16> {
        let out = self.read(
            &[],
            &format!("host {host} and tcp[tcpflags] & tcp-syn != 0"),
        );
        // Counted per interface and direction: `-i any` sees a forwarded packet on each.
        let mut seen: std::collections::BTreeMap<(String, bool, u16), usize> = Default::default();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "04:36:30.907357 eth0  Out IP 203.0.113.10.41234 > 198.51.100.1.80: Flags [S], ..."
            let Some((hop, packet)) = line.split_once(" IP ") else {
                continue;
            };
            let hop: Vec<&str> = hop.split_whitespace().skip(1).collect();
            let fields: Vec<&str> = packet.split_whitespace().collect();
            let port = |endpoint: &str| -> Option<u16> {
                endpoint
                    .trim_end_matches(':')
                    .rsplit('.')
                    .next()?
                    .parse()
                    .ok()
            };
            let (syn_ack, client) = match fields.as_slice() {
                [src, ">", _, "Flags", "[S],", ..] => (false, port(src)),
                [_, ">", dst, "Flags", "[S.],", ..] => (true, port(dst)),
                _ => continue,
            };
            if let Some(client) = client {
                *seen.entry((hop.join(" "), syn_ack, client)).or_default() += 1;
            }
        }
        let mut resent: Vec<u16> = seen
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|((_, _, port), _)| port)
            .collect();
        resent.sort_unstable();
        resent.dedup();
        resent
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The lab's node-1 and node-2 (on the underlay) and its external client.
pub const NODE_1: &str = "10.224.0.4";
pub const NODE_2: &str = "10.224.0.5";
pub const CLIENT: &str = "203.0.113.10";

/// Where a probe starts (pods are in namespace `matrix`).
pub enum From {
    Pod(&'static str),
    Node(&'static str),
    Client,
}

/// The peer address in an echo line (`192.168.0.7:41234 echo-1`).
pub fn peer(line: &str) -> &str {
    line.split(':').next().unwrap_or_default()
}

/// The workloads the lab tests probe, in namespace `matrix`: echo backends on node-1 (`app: echo`)
/// and on node-2 and node-3 (`app: echo2`), a client pod on each node, and Services of every kind
/// in front of them (ClusterIP, NodePort, NodePort Local, LoadBalancer, LoadBalancer Local,
/// ClientIP affinity, one without endpoints, and a UDP LoadBalancer with its NodePort).
pub const WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: matrix}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: matrix, labels: {app: echo}}
spec:
  nodeName: node-1
  containers:
  - name: echo
    image: margay/echo
    ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-2a, namespace: matrix, labels: {app: echo2}}
spec:
  nodeName: node-2
  containers: [{name: echo, image: margay/echo, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-2b, namespace: matrix, labels: {app: echo2}}
spec:
  nodeName: node-3
  containers: [{name: echo, image: margay/echo, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client-1, namespace: matrix}
spec:
  nodeName: node-1
  containers: [{name: sleep, image: busybox, command: [sleep, "100000"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client-2, namespace: matrix}
spec:
  nodeName: node-2
  containers: [{name: sleep, image: busybox, command: [sleep, "100000"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client-3, namespace: matrix}
spec:
  nodeName: node-3
  containers: [{name: sleep, image: busybox, command: [sleep, "100000"]}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: matrix}
spec:
  selector: {app: echo}
  ports:
  - {name: tcp, port: 80, targetPort: 8080}
  - {name: udp, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: echo-np, namespace: matrix}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-local, namespace: matrix}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-lb, namespace: matrix}
spec:
  type: LoadBalancer
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-lb-local, namespace: matrix}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: matrix}
spec:
  selector: {app: echo2}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: matrix}
spec:
  selector: {app: nothing}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-udp, namespace: matrix}
spec:
  type: LoadBalancer
  selector: {app: echo}
  ports: [{port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}]
"#;
