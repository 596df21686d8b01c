//! `margay-lab bench [--quick]`: the dataplane benchmarks of issue 8, on a lab of its own.
//!
//! One run brings up a 3-node lab (LoadBalancer IPs routed to node-1), starts `load-server` pods
//! `srv-a` on node-2 and `srv-b` on node-3 and a client pod on node-1, and for every number of
//! extra Services N (each with an endpoint) and each dataplane measures, with the project's load
//! generator (`margay-demo-app load`) running in the client pod or on the external client:
//!
//! - short connections and kept-alive requests to srv-a by pod IP and through a ClusterIP (rate,
//!   p50, p99), and from the external client through a NodePort of node-1 and the LoadBalancer IP
//!   (the backend is on node-2 in every case);
//! - the time to program the N Services from nothing (bulk write to every agent reporting the
//!   revision), and endpoint changes: Service `flip`'s EndpointSlice is moved between srv-a and
//!   srv-b while a client connects in a loop; the time from the datastore write returning to the
//!   first answer from the new backend;
//! - each agent's RSS and node-1's BPF map memory (the kernel's `memlock` of the maps the agent
//!   holds, from `/proc/<pid>/fdinfo`).
//!
//! Once: single-stream throughput by pod IP and ClusterIP in each mode; failed requests and broken
//! connections while the cluster switches Iptables -> BPF -> Iptables under load; and the TC
//! program's per-packet cost from `margay-bpf`'s BPF_PROG_TEST_RUN benchmark (its example binary,
//! run as is). Results go to `--out` as `bench.json`, `bench.md` and PNG plots.

use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use margay_api::Kind;
use margay_api::patch::PatchType;
use margay_datastore::{Key, WriteMode};
use margay_lab::controller::{Cluster, agents};
use margay_lab::scale::{ServiceSet, cluster_ip, wait_until_programmed};
use serde_json::{Value, json};

use crate::cli::BenchArgs;

mod report;

/// The benchmark's namespace and the extra Services' namespace.
const NS: &str = "bench";
const BULK_NS: &str = "bulk";
/// The load-server port.
const SERVER_PORT: u16 = 9000;
const NODE_PORT: u16 = 30090;
const NODE_1_IP: &str = "10.224.0.4";
/// How long the programming of a bulk load or a switch may take before the run gives up.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(900);

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: Pod
metadata: {name: srv-a, namespace: bench, labels: {app: srv-a}}
spec:
  nodeName: node-2
  containers: [{name: srv, image: margay/loadserver, ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: srv-b, namespace: bench, labels: {app: srv-b}}
spec:
  nodeName: node-3
  containers: [{name: srv, image: margay/loadserver, ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench}
spec:
  nodeName: node-1
  containers: [{name: sleep, image: busybox, command: [sleep, "1000000"]}]
---
apiVersion: v1
kind: Service
metadata: {name: direct, namespace: bench}
spec:
  selector: {app: srv-a}
  ports: [{port: 80, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: bench}
spec:
  type: NodePort
  selector: {app: srv-a}
  ports: [{port: 80, targetPort: 9000, nodePort: 30090}]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: bench}
spec:
  type: LoadBalancer
  selector: {app: srv-a}
  ports: [{port: 80, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: flip, namespace: bench}
spec:
  ports: [{name: tcp, port: 80, targetPort: 9000}]
"#;

/// What one run measures and for how long.
#[derive(Clone, Debug)]
struct Plan {
    services: Vec<usize>,
    /// Each kept-alive load.
    load_time: Duration,
    /// Short-connection loads run in this many rounds of `short_round` per path, the paths
    /// interleaved (see `short_loads`).
    short_rounds: usize,
    short_round: Duration,
    /// How long the agents may take to program a bulk load before the cell is recorded as not
    /// programmed (and the run goes on).
    program_limit: Duration,
    connections: u64,
    endpoint_changes: usize,
    switch_time: Duration,
    packets: u32,
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Result<Plan> {
        let mut plan = if args.quick {
            Plan {
                services: vec![1, 1000],
                load_time: Duration::from_secs(1),
                short_rounds: 3,
                short_round: Duration::from_millis(400),
                program_limit: Duration::from_secs(300),
                connections: 4,
                endpoint_changes: 3,
                switch_time: Duration::from_secs(12),
                packets: 2000,
            }
        } else {
            Plan {
                services: vec![1, 1000, 10_000, 50_000],
                load_time: Duration::from_secs(3),
                short_rounds: 5,
                short_round: Duration::from_secs(1),
                program_limit: Duration::from_secs(600),
                connections: 4,
                endpoint_changes: 10,
                switch_time: Duration::from_secs(30),
                packets: 20_000,
            }
        };
        if let Some(samples) = args.endpoint_changes_only {
            if !(1..=1000).contains(&samples) {
                bail!("--endpoint-changes-only: {samples} is not a sample count from 1 to 1000");
            }
            plan.endpoint_changes = samples;
            // The figure of issue 8's target, and the floor to compare it with.
            plan.services = vec![1, 10_000];
        }
        if let Some(list) = &args.services {
            plan.services = list
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n >= 1 && *n <= 100_000)
                        .with_context(|| {
                            format!("--services: {s:?} is not a count from 1 to 100000")
                        })
                })
                .collect::<Result<_>>()?;
        }
        Ok(plan)
    }
}

/// The lab, taken down when the run ends (unless `--keep`).
struct LabGuard {
    name: String,
    keep: bool,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "bench: lab {} left up (--keep); remove it with `margay-lab --name {} down`",
                self.name, self.name
            );
            return;
        }
        match margay_lab::Lab::destroy(&self.name) {
            Ok(_) => {}
            Err(e) => eprintln!("bench: cannot take lab {} down: {e}", self.name),
        }
    }
}

fn lab_command(name: &str) -> Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.arg("--name").arg(name);
    Ok(c)
}

fn demo() -> String {
    margay_lab::workloads::find_binary("margay-demo-app")
        .to_string_lossy()
        .into_owned()
}

fn unix_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0))
}

/// Where a load runs from.
#[derive(Clone, Copy)]
enum From {
    Pod,
    External,
}

struct Bench {
    name: String,
    plan: Plan,
    cluster: Cluster,
    rt: tokio::runtime::Runtime,
    nodes: Vec<String>,
    srv_a: Ipv4Addr,
    srv_b: Ipv4Addr,
    direct: Ipv4Addr,
    flip: Ipv4Addr,
    lb: Ipv4Addr,
}

pub fn run(name: &str, args: &BenchArgs) -> Result<ExitCode> {
    super::require_root("bench")?;
    let plan = Plan::from_args(args)?;
    let out = args.out.clone();
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let started = Instant::now();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let status = lab_command(name)?
        .args(["up", "--nodes", "3", "--lb-mode", "node-1"])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!(
            "margay-lab up failed (is a lab named {name} already up? `margay-lab --name {name} down`)"
        );
    }
    let _guard = LabGuard {
        name: name.to_owned(),
        keep: args.keep,
    };
    let rt = super::runtime()?;
    let cluster = rt.block_on(Cluster::open(name))?;
    set_iptables_backend(&rt, &cluster, args.iptables_backend)?;
    let manifests = margayctl::input::parse_documents(WORKLOADS)?;
    rt.block_on(cluster.apply(manifests, NS))?;
    let nodes = cluster.node_names()?;
    let pod_ip = |pod: &str| -> Result<Ipv4Addr> {
        let p = rt.block_on(cluster.client.get(&Key::new(Kind::Pod, Some(NS), pod)))?;
        p.value["status"]["podIP"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("pod {pod} has no address"))
    };
    let (srv_a, srv_b) = (pod_ip("srv-a")?, pod_ip("srv-b")?);
    let direct = rt.block_on(cluster_ip(&cluster.client, NS, "direct"))?;
    let flip = rt.block_on(cluster_ip(&cluster.client, NS, "flip"))?;
    let lb_svc = rt.block_on(cluster.client.get(&Key::new(Kind::Service, Some(NS), "lb")))?;
    let lb: Ipv4Addr = lb_svc.value["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("Service lb has no LoadBalancer address")?;
    let bench = Bench {
        name: name.to_owned(),
        plan: plan.clone(),
        cluster,
        rt,
        nodes,
        srv_a,
        srv_b,
        direct,
        flip,
        lb,
    };
    bench.set_flip(srv_a)?;
    bench.wait_programmed()?;
    bench.tune_clients()?;
    if args.endpoint_changes_only.is_some() {
        return bench.endpoint_changes_only(&out, started, &load_before);
    }

    let mut rows = Vec::new();
    let mut throughput = Vec::new();
    // The lab starts in Iptables; each N measures the mode it is in first, so one switch per N.
    let mut current = "Iptables";
    for (i, &n) in plan.services.iter().enumerate() {
        let order = if current == "Iptables" {
            ["Iptables", "BPF"]
        } else {
            ["BPF", "Iptables"]
        };
        for mode in order {
            if mode != current {
                bench.switch_to(mode)?;
                current = mode;
            }
            eprintln!("bench: {n} Services, {mode}");
            rows.push(bench.measure_at(n, mode)?);
            if i == 0 {
                throughput.push(bench.throughput(mode)?);
            }
        }
    }
    if current != "Iptables" {
        bench.switch_to("Iptables")?;
    }
    eprintln!("bench: switching under load");
    let switch = bench.switch_under_load()?;
    eprintln!("bench: per-packet cost (BPF_PROG_TEST_RUN)");
    let per_packet = per_packet_cost(plan.packets);

    let results = json!({
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "quick": args.quick,
        "machine": machine(&load_before),
        "plan": {
            "iptables_backend": args.iptables_backend.as_str(),
            "services": plan.services,
            "load_seconds": plan.load_time.as_secs_f64(),
            "short_rounds": plan.short_rounds,
            "short_round_seconds": plan.short_round.as_secs_f64(),
            "program_limit_seconds": plan.program_limit.as_secs_f64(),
            "connections": plan.connections,
            "endpoint_changes": plan.endpoint_changes,
            "switch_seconds": plan.switch_time.as_secs_f64(),
        },
        "rows": rows,
        "throughput": throughput,
        "switch": switch,
        "per_packet": per_packet,
        "run_seconds": started.elapsed().as_secs_f64(),
    });
    report::write_all(&out, &results)?;
    margayctl::outln!(
        "bench: done in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    margayctl::outln!("{}", report::markdown(&results));
    Ok(ExitCode::SUCCESS)
}

impl Bench {
    /// Back-to-back short-connection loads leave tens of thousands of client sockets in
    /// TIME_WAIT (60 s): with the default 28,232 ephemeral ports and no TIME_WAIT reuse, connect()
    /// then spends milliseconds searching for a free port and the figures measure that instead
    /// of the dataplane. So the two load-generating namespaces (the client pod, the external
    /// client; both the lab's own) get more ports and `tcp_tw_reuse` (a port in TIME_WAIT is
    /// reused after a second, timestamps keeping the flows apart), as load-testing clients are
    /// set up.
    fn tune_clients(&self) -> Result<()> {
        let sysctls = [
            "sysctl",
            "-q",
            "-w",
            // Above bpfPSNATPorts (20000:29999), which nodes use as client ports.
            "net.ipv4.ip_local_port_range=32768 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ];
        for from in [From::Pod, From::External] {
            let mut c = lab_command(&self.name)?;
            match from {
                From::Pod => c.args(["exec", "-n", NS, "client", "--"]),
                From::External => c.args(["client", "--"]),
            };
            let out = c.args(sysctls).output()?;
            if !out.status.success() {
                bail!(
                    "cannot tune the load client's namespace: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    fn wait_programmed(&self) -> Result<Instant> {
        let revision = self.rt.block_on(self.cluster.client.store().revision())?;
        wait_until_programmed(&self.cluster.lab, &self.nodes, revision, PROGRAM_TIMEOUT)
    }

    /// Points Service `flip` at `backend` (one endpoint); returns when the write returned.
    fn set_flip(&self, backend: Ipv4Addr) -> Result<i128> {
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "flip-bench", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "flip"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [backend.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "tcp", "port": SERVER_PORT, "protocol": "TCP"}]
        });
        self.rt
            .block_on(self.cluster.client.write(vec![slice], NS, WriteMode::Apply))?;
        Ok(unix_ns())
    }

    /// Switches every node's dataplane and waits until each agent reports it active.
    fn switch_to(&self, mode: &str) -> Result<Duration> {
        let started = Instant::now();
        let key = Key::new(Kind::Installation, None, "default");
        let patch = json!({"spec": {"calicoNetwork": {"linuxDataplane": mode}}}).to_string();
        self.rt
            .block_on(self.cluster.client.patch(&key, &patch, PatchType::Merge))?;
        let deadline = Instant::now() + PROGRAM_TIMEOUT;
        let revision = self.rt.block_on(self.cluster.client.store().revision())?;
        loop {
            let done = self.nodes.iter().all(|n| {
                agents::read_status(&self.cluster.lab, n).is_some_and(|s| {
                    s["dataplane"] == mode && s["syncedRevision"].as_u64().unwrap_or(0) >= revision
                })
            });
            if done {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("the nodes did not switch to {mode} within {PROGRAM_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `margay-demo-app load ...` from the client pod or the external client; its JSON report.
    fn load(&self, from: From, target: &str, mode: &str, time: Duration) -> Result<Value> {
        let mut c = lab_command(&self.name)?;
        match from {
            From::Pod => c.args(["exec", "-n", NS, "client", "--"]),
            From::External => c.args(["client", "--"]),
        };
        let duration = format!("{}ms", time.as_millis());
        let connections = self.plan.connections.to_string();
        c.args([
            demo().as_str(),
            "load",
            target,
            "--mode",
            mode,
            "--duration",
            &duration,
            "--connections",
            &connections,
        ]);
        let out = c.output()?;
        if !out.status.success() {
            bail!(
                "load {mode} to {target} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim())
            .with_context(|| format!("load {mode} to {target} printed {text:?}"))
    }

    /// `--endpoint-changes-only`: at each N, in both dataplanes (one switch per N, as the full
    /// run), only the endpoint-change samples; a table of p50 / p99 / max and
    /// `endpoint-changes.json`.
    fn endpoint_changes_only(
        &self,
        out: &Path,
        started: Instant,
        load_before: &str,
    ) -> Result<ExitCode> {
        let mut rows = Vec::new();
        let mut current = "Iptables";
        for &n in &self.plan.services {
            let order = if current == "Iptables" {
                ["Iptables", "BPF"]
            } else {
                ["BPF", "Iptables"]
            };
            for mode in order {
                if mode != current {
                    self.switch_to(mode)?;
                    current = mode;
                }
                eprintln!("bench: {n} Services, {mode}: endpoint changes");
                let set = self.bulk_set(n);
                let write_started = Instant::now();
                let revision = self.rt.block_on(set.create(&self.cluster.client))?;
                let programmed = wait_until_programmed(
                    &self.cluster.lab,
                    &self.nodes,
                    revision,
                    PROGRAM_TIMEOUT,
                )?;
                let samples = self.endpoint_changes()?;
                let deleted = self
                    .rt
                    .block_on(ServiceSet::delete_all(&self.cluster.client, BULK_NS))?;
                wait_until_programmed(&self.cluster.lab, &self.nodes, deleted, PROGRAM_TIMEOUT)?;
                rows.push(json!({
                    "services": n,
                    "mode": mode,
                    "programming_s": (programmed - write_started).as_secs_f64(),
                    "endpoint_change_ms": samples,
                }));
            }
        }
        if current != "Iptables" {
            self.switch_to("Iptables")?;
        }
        let results = json!({
            "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "machine": machine(load_before),
            "endpoint_changes": self.plan.endpoint_changes,
            "rows": rows,
            "run_seconds": started.elapsed().as_secs_f64(),
        });
        let path = out.join("endpoint-changes.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", report::endpoint_change_table(&results));
        Ok(ExitCode::SUCCESS)
    }

    /// The N extra Services of one cell.
    fn bulk_set(&self, n: usize) -> ServiceSet {
        ServiceSet {
            namespace: BULK_NS.to_owned(),
            prefix: "x".to_owned(),
            count: n,
            port: 80,
            target_port: SERVER_PORT,
            // Real endpoints (the benchmark's servers), so every extra Service is a working one.
            endpoints: vec![self.srv_a, self.srv_b],
        }
    }

    fn measure_at(&self, n: usize, mode: &str) -> Result<Value> {
        let set = ServiceSet {
            namespace: BULK_NS.to_owned(),
            prefix: "x".to_owned(),
            count: n,
            port: 80,
            target_port: SERVER_PORT,
            // Real endpoints (the benchmark's servers), so every extra Service is a working one.
            endpoints: vec![self.srv_a, self.srv_b],
        };
        let write_started = Instant::now();
        let revision = self.rt.block_on(set.create(&self.cluster.client))?;
        let written = Instant::now();
        let programmed = match wait_until_programmed(
            &self.cluster.lab,
            &self.nodes,
            revision,
            self.plan.program_limit,
        ) {
            Ok(at) => at,
            Err(e) => return self.programming_timed_out(n, mode, written - write_started, &e),
        };
        // The last Service added answers (a check, not a figure).
        let last = self
            .rt
            .block_on(cluster_ip(&self.cluster.client, BULK_NS, &set.name(n - 1)))?;
        self.load(
            From::Pod,
            &format!("{last}:80"),
            "short",
            Duration::from_millis(200),
        )
        .and_then(|r| {
            if r["requests"].as_u64().unwrap_or(0) == 0 {
                bail!("the last of {n} Services ({last}) did not answer: {r}")
            }
            Ok(())
        })?;
        let t = self.plan.load_time;
        let pod = format!("{}:{SERVER_PORT}", self.srv_a);
        let svc = format!("{}:80", self.direct);
        let node_port = format!("{NODE_1_IP}:{NODE_PORT}");
        let lb = format!("{}:80", self.lb);
        let mut loads = self.short_loads(&[
            ("pod_ip_short", pod.as_str(), From::Pod),
            ("cluster_ip_short", svc.as_str(), From::Pod),
            ("nodeport_short", node_port.as_str(), From::External),
            ("lb_short", lb.as_str(), From::External),
        ])?;
        for (key, target) in [
            ("pod_ip_keepalive", pod.as_str()),
            ("cluster_ip_keepalive", svc.as_str()),
        ] {
            loads.insert(
                key.to_owned(),
                self.load(From::Pod, target, "keepalive", t)?,
            );
        }
        let changes = self.endpoint_changes()?;
        let memory = self.memory()?;
        let deleted = self
            .rt
            .block_on(ServiceSet::delete_all(&self.cluster.client, BULK_NS))?;
        wait_until_programmed(&self.cluster.lab, &self.nodes, deleted, PROGRAM_TIMEOUT)?;
        Ok(json!({
            "services": n,
            "mode": mode,
            "write_s": (written - write_started).as_secs_f64(),
            "programming_s": (programmed - write_started).as_secs_f64(),
            "load": loads,
            "endpoint_change_ms": changes,
            "memory": memory,
        }))
    }

    /// The cell of a bulk load the agents did not program within `program_limit`: recorded as
    /// such (no traffic figures, since the dataplane is not the one to measure), with how far
    /// each agent got, then the Services are removed and the run goes on.
    fn programming_timed_out(
        &self,
        n: usize,
        mode: &str,
        write: Duration,
        error: &anyhow::Error,
    ) -> Result<Value> {
        eprintln!("bench: {n} Services, {mode}: {error:#}; recorded as not programmed");
        let progress: serde_json::Map<String, Value> = self
            .nodes
            .iter()
            .map(|node| {
                let status = agents::read_status(&self.cluster.lab, node).unwrap_or(Value::Null);
                (
                    node.clone(),
                    json!({"syncedRevision": status["syncedRevision"],
                           "services": status["services"],
                           "lastSyncDurationMs": status["lastSyncDurationMs"],
                           "lastError": status["lastError"]}),
                )
            })
            .collect();
        let memory = self.memory()?;
        let deleted = self
            .rt
            .block_on(ServiceSet::delete_all(&self.cluster.client, BULK_NS))?;
        wait_until_programmed(&self.cluster.lab, &self.nodes, deleted, PROGRAM_TIMEOUT)?;
        Ok(json!({
            "services": n,
            "mode": mode,
            "write_s": write.as_secs_f64(),
            "programming_s": null,
            "programming_timeout_s": self.plan.program_limit.as_secs_f64(),
            "agents_at_timeout": progress,
            "load": {},
            "endpoint_change_ms": [],
            "memory": memory,
        }))
    }

    /// Short-connection loads to every path, in rounds: each round runs each path for
    /// `short_round`, the order reversed every other round (A B C D, D C B A, ...), after a
    /// discarded warm-up of each path. A path's figures are the medians over its rounds (rate,
    /// p50, p99), its counts the sums, and `round_rates` keeps every round's rate. Why: on a
    /// shared 2-CPU machine a path measured once, in one block, takes whatever the machine was
    /// doing during those seconds (another developer's build, the agents' sync after a bulk
    /// write, TIME_WAIT left by the previous load), and the pod-IP rate, which does not depend
    /// on the dataplane, differed up to 8x between cells of one run; interleaved, every path
    /// sees the same disturbances, and the median drops a disturbed round.
    fn short_loads(&self, paths: &[(&str, &str, From)]) -> Result<serde_json::Map<String, Value>> {
        for &(_, target, from) in paths {
            self.load(from, target, "short", Duration::from_millis(150))?;
        }
        let mut rounds: Vec<Vec<Value>> = vec![Vec::new(); paths.len()];
        for round in 0..self.plan.short_rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..paths.len()).collect()
            } else {
                (0..paths.len()).rev().collect()
            };
            for i in order {
                let (_, target, from) = paths[i];
                rounds[i].push(self.load(from, target, "short", self.plan.short_round)?);
            }
        }
        Ok(paths
            .iter()
            .zip(rounds)
            .map(|(&(key, _, _), r)| (key.to_owned(), report::combine_rounds(&r)))
            .collect())
    }

    /// Moves Service `flip` between srv-a and srv-b `endpoint_changes` times while a client in
    /// the pod connects in a loop; milliseconds from each write returning to the first answer
    /// from the new backend.
    fn endpoint_changes(&self) -> Result<Vec<f64>> {
        let mut samples = Vec::new();
        let mut current = self.srv_a;
        for _ in 0..self.plan.endpoint_changes {
            let (next, next_name) = if current == self.srv_a {
                (self.srv_b, "srv-b")
            } else {
                (self.srv_a, "srv-a")
            };
            // The agents' bounded-frequency sync waits a period after the previous sync: start
            // each change from a quiet dataplane, as a lone endpoint change would find it.
            std::thread::sleep(Duration::from_millis(1100));
            let mut child = lab_command(&self.name)?
                .args(["exec", "-n", NS, "client", "--"])
                .args([
                    demo().as_str(),
                    "load",
                    &format!("{}:80", self.flip),
                    "--until",
                    next_name,
                    "--duration",
                    "60s",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            let stdout = child.stdout.take().context("no stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().transpose()?.unwrap_or_default();
            if !first.starts_with("ready") {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the endpoint-change client did not get going: {first:?}");
            }
            let written = self.set_flip(next)?;
            let seen = lines.next().transpose()?.unwrap_or_default();
            let _ = child.wait();
            let Some(ns) = seen
                .strip_prefix("seen ")
                .and_then(|r| r.split(' ').next())
                .and_then(|v| v.parse::<i128>().ok())
            else {
                bail!("the endpoint-change client said {seen:?}");
            };
            samples.push(((ns - written) as f64 / 1e6).max(0.0));
            current = next;
        }
        // Leave flip on srv-a for the next round.
        if current != self.srv_a {
            self.set_flip(self.srv_a)?;
        }
        Ok(samples)
    }

    /// Each agent's RSS, and the memory of the BPF maps node-1's agent holds.
    fn memory(&self) -> Result<Value> {
        let state = self.cluster.lab.state()?;
        let mut rss = serde_json::Map::new();
        let mut maps = Value::Null;
        for p in state.processes.iter().filter(|p| p.name == "margay-node") {
            let node = p.target.to_string();
            let kib = std::fs::read_to_string(format!("/proc/{}/status", p.pid))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                });
            rss.insert(node.clone(), json!(kib));
            if node.ends_with("node-1") {
                maps = json!(bpf_map_bytes(p.pid));
            }
        }
        Ok(json!({"agent_rss_kib": rss, "node1_bpf_map_bytes": maps}))
    }

    fn throughput(&self, mode: &str) -> Result<Value> {
        let t = self.plan.load_time.max(Duration::from_secs(2));
        let pod = self.load(
            From::Pod,
            &format!("{}:{SERVER_PORT}", self.srv_a),
            "stream",
            t,
        )?;
        let svc = self.load(From::Pod, &format!("{}:80", self.direct), "stream", t)?;
        Ok(json!({"mode": mode, "pod_ip": pod, "cluster_ip": svc}))
    }

    /// Short and kept-alive loads through the ClusterIP while the cluster switches Iptables ->
    /// BPF -> Iptables; the loads' failures are the figures.
    fn switch_under_load(&self) -> Result<Value> {
        let total = self.plan.switch_time;
        let spawn_load = |mode: &str| -> Result<std::process::Child> {
            Ok(lab_command(&self.name)?
                .args(["exec", "-n", NS, "client", "--"])
                .args([
                    demo().as_str(),
                    "load",
                    &format!("{}:80", self.direct),
                    "--mode",
                    mode,
                    "--connections",
                    "2",
                    "--duration",
                    &format!("{}ms", total.as_millis()),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?)
        };
        let short = spawn_load("short")?;
        let keepalive = spawn_load("keepalive")?;
        let third = total / 3;
        std::thread::sleep(third);
        let to_bpf = self.switch_to("BPF")?;
        std::thread::sleep(third.saturating_sub(to_bpf));
        let to_iptables = self.switch_to("Iptables")?;
        let parse = |child: std::process::Child| -> Result<Value> {
            let out = child.wait_with_output()?;
            serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "the load during the switch failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        Ok(json!({
            "short": parse(short)?,
            "keepalive": parse(keepalive)?,
            "to_bpf_s": to_bpf.as_secs_f64(),
            "to_iptables_s": to_iptables.as_secs_f64(),
        }))
    }
}

/// FelixConfiguration `default`'s `iptablesBackend`, as a user sets it (a merge patch of the
/// object, or the object when the lab has none yet).
fn set_iptables_backend(
    rt: &tokio::runtime::Runtime,
    cluster: &Cluster,
    backend: margay_api::calico::felix::IptablesBackend,
) -> Result<()> {
    let key = Key::new(Kind::FelixConfiguration, None, "default");
    let spec = json!({"iptablesBackend": backend.as_str()});
    let patch = json!({ "spec": spec }).to_string();
    if rt
        .block_on(cluster.client.patch(&key, &patch, PatchType::Merge))
        .is_ok()
    {
        return Ok(());
    }
    let object = json!({
        "apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
        "metadata": {"name": "default"}, "spec": spec
    });
    rt.block_on(cluster.client.write(vec![object], NS, WriteMode::Create))
        .context("cannot set FelixConfiguration default's iptablesBackend")?;
    Ok(())
}

/// The kernel's `memlock` of every distinct BPF map a process holds a descriptor of.
fn bpf_map_bytes(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let mut seen = std::collections::BTreeMap::new();
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    Some(seen.values().sum())
}

/// The machine as the report states it.
fn machine(load_before: &str) -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "cpus": cpus,
        "cpu": model,
        "kernel": kernel.trim(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "loadavg_before": load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "loadavg_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
            .split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

/// Runs `margay-bpf`'s BPF_PROG_TEST_RUN benchmark (the `bench` example, built next to this
/// binary by `cargo build --examples` or `cargo test`) and keeps its table rows.
fn per_packet_cost(packets: u32) -> Value {
    let exe = std::env::current_exe().ok();
    let candidates: Vec<PathBuf> = exe
        .iter()
        .filter_map(|e| e.parent().map(Path::to_path_buf))
        .map(|d| d.join("examples").join("bench"))
        .collect();
    let Some(path) = candidates.into_iter().find(|p| p.is_file()) else {
        return json!({"skipped": "margay-bpf's bench example is not built next to margay-lab (cargo build --examples -p margay-bpf)"});
    };
    let out = match Command::new(&path).arg(packets.to_string()).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return json!({"skipped": format!("{} failed: {}", path.display(), String::from_utf8_lossy(&o.stderr).trim())});
        }
        Err(e) => return json!({"skipped": format!("cannot run {}: {e}", path.display())}),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    json!({"packets": packets, "rows": report::parse_bench_rows(&text), "output": text})
}
