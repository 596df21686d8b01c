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
        let out = lab.run(&args);
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

/// The BPF dataplane's connectivity matrix (the lab must run `--dataplane bpf` with
/// [`WORKLOADS`]): every cell is real traffic whose source, as the backend saw it, is checked;
/// the external client's address must survive on every node (Tunnel mode through VXLAN to the
/// backend's node, and with WireGuard on, through WireGuard). `node2_source` is the source a
/// connection from node-2's own stack to a pod on node-1 shows: node-2's address, or its
/// WireGuard interface address when WireGuard is on (source selection takes the outgoing
/// interface's). Prints every cell; returns the failed ones.
pub fn bpf_matrix(lab: &TestLab, node2_source: &str) -> Vec<String> {
    let ip = |pod: &str| lab.jsonpath(&["pod", pod, "-n", "matrix"], "{.status.podIP}");
    let cluster_ip = |svc: &str| lab.jsonpath(&["svc", svc, "-n", "matrix"], "{.spec.clusterIP}");
    let (client1, client2, echo1) = (ip("client-1"), ip("client-2"), ip("echo-1"));
    let echo = cluster_ip("echo");
    let lb = lab.jsonpath(
        &["svc", "echo-lb", "-n", "matrix"],
        "{.status.loadBalancer.ingress[0].ip}",
    );
    let mut failures = Vec::new();
    let mut check = |cell: &str, (code, line): (i32, String), want: Result<&str, ()>| {
        let ok = match want {
            Ok(source) => code == 0 && peer(&line) == source,
            Err(()) => code != 0,
        };
        println!(
            "{cell:<62} {} (exit {code}: {line})",
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            failures.push(format!("{cell}: wanted {want:?}, got exit {code}: {line}"));
        }
    };
    let tcp80 = |addr: &str| format!("{addr}:80");
    check(
        "pod -> ClusterIP, same node (connect-time LB): pod IP",
        lab.probe(&From::Pod("client-1"), "tcp", &tcp80(&echo)),
        Ok(client1.as_str()),
    );
    check(
        "pod -> ClusterIP, other node (connect-time LB): pod IP",
        lab.probe(&From::Pod("client-2"), "tcp", &tcp80(&echo)),
        Ok(client2.as_str()),
    );
    check(
        "pod -> ClusterIP over UDP (TC NAT): pod IP",
        lab.probe(&From::Pod("client-2"), "udp", &format!("{echo}:53")),
        Ok(client2.as_str()),
    );
    check(
        "pod -> pod on another node: pod IP",
        lab.probe(&From::Pod("client-2"), "tcp", &format!("{echo1}:8080")),
        Ok(client2.as_str()),
    );
    check(
        "node -> ClusterIP (backend on another node): the node's source",
        lab.probe(&From::Node("node-2"), "tcp", &tcp80(&echo)),
        Ok(node2_source),
    );
    check(
        "client -> NodePort, backend on that node: the CLIENT's IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_1}:30080")),
        Ok(CLIENT),
    );
    check(
        "client -> NodePort, Local policy, backend on that node: client IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_1}:30081")),
        Ok(CLIENT),
    );
    check(
        "client -> NodePort, Local policy, no local backend: refused",
        lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30081")),
        Err(()),
    );
    check(
        "client -> NodePort on a node WITHOUT the backend (Tunnel): CLIENT IP",
        lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30080")),
        Ok(CLIENT),
    );
    check(
        "client -> NodePort on node-3 (Tunnel): CLIENT IP",
        lab.probe(&From::Client, "tcp", "10.224.0.6:30080"),
        Ok(CLIENT),
    );
    // The router spreads connections over the nodes: every one must show the client.
    for i in 0..6 {
        check(
            &format!("client -> LoadBalancer IP, ECMP connection {i}: CLIENT IP"),
            lab.probe(&From::Client, "tcp", &tcp80(&lb)),
            Ok(CLIENT),
        );
    }
    check(
        "pod -> ClusterIP without endpoints: refused",
        lab.probe(&From::Pod("client-1"), "tcp", &tcp80(&cluster_ip("empty"))),
        Err(()),
    );
    check(
        "pod -> its own Service (hairpin): its own address",
        lab.probe(&From::Pod("echo-1"), "tcp", &tcp80(&echo)),
        Ok(echo1.as_str()),
    );
    // healthCheckNodePort, still answered by the agent in BPF mode.
    let hc = lab.jsonpath(
        &["svc", "echo-lb-local", "-n", "matrix"],
        "{.spec.healthCheckNodePort}",
    );
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
        println!("{:<62} {got}", format!("healthCheckNodePort on {node}"));
        if got != want {
            failures.push(format!(
                "healthCheckNodePort on {node}: wanted {want}, got {got}"
            ));
        }
    }
    let dns = lab.run(&[
        "exec", "-n", "matrix", "client-1", "--", "getent", "hosts", "echo",
    ]);
    let answer = String::from_utf8_lossy(&dns.stdout).trim().to_owned();
    println!("{:<62} {answer}", "pod -> kube-dns through BPF");
    if !answer.starts_with(&echo) {
        failures.push(format!("DNS through BPF: {answer:?}"));
    }
    failures
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
