//! A datastore outage on a real lab whose agents run on the lab's own etcd
//! (`margay-lab up --datastore etcd`):
//!
//! 1. etcd is stopped for 60 s while the external client sends a steady stream of new
//!    connections through a LoadBalancer Service and a NodePort (both entering node-2, whose
//!    backend is on node-1): none may fail, since the agents leave the dataplane as programmed.
//! 2. Meanwhile every agent says it is not in sync: `/readiness` (503), its status file,
//!    `margay-lab status`, and its log; margayctl says the datastore is unreachable.
//! 3. What is simulated: between 20 s and 40 s into the outage, etcd runs again on its data but
//!    on another socket (`margay-lab etcd start --socket drill.sock:2379`), where the agents do
//!    not look, and margayctl writes two changes there: a new NodePort Service (`late`, 30090,
//!    with its EndpointSlice as the endpoints controller would write it) and the deletion of
//!    `echo-local` (NodePort 30081); then it compacts etcd's history to the current revision,
//!    so no agent can resume its watch and each needs a full resync. etcd is stopped again
//!    and, 60 s after the outage began, started on the agents' socket.
//! 0. First a short restart of etcd (inside the watches' 10 s reconnect window): the agents
//!    resume their watches, stay InSync and apply the next change.
//! 4. The agents resync by themselves (no agent restarts: their pids are unchanged) and apply
//!    both changes: 30090 answers, 30081 no longer does.
//!
//! Root only; CI runs it as root. The lab has a unique name and is taken down on drop.

// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{From, TestLab, WORKLOADS, skip_unless_root};
use serde_json::Value;

const NODE_1: &str = "10.224.0.4";
const NODE_2: &str = "10.224.0.5";
const OUTAGE: Duration = Duration::from_secs(60);
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

#[test]
fn agents_ride_out_a_60s_etcd_outage_and_apply_what_changed_meanwhile() {
    if skip_unless_root("agents_ride_out_a_60s_etcd_outage_and_apply_what_changed_meanwhile") {
        return;
    }
    let lab = TestLab::up("eo", &["--datastore", "etcd", "--lb-mode", "node-2"]);
    lab.assert_on_lab_etcd();
    lab.apply(WORKLOADS);
    let url = lab.datastore_url();
    let lb = lab.jsonpath(
        &["svc", "echo-lb", "-n", "matrix"],
        "{.status.loadBalancer.ingress[0].ip}",
    );
    let agents_before = agent_pids(&lab);
    assert_eq!(
        agents_before.len(),
        3,
        "one agent per node: {agents_before:?}"
    );
    // The change to make during the outage: `late`'s EndpointSlice is echo-np's (same backend).
    let slice = late_endpoint_slice(&lab, &url);
    for (cell, target) in [
        ("late", format!("{NODE_2}:30090")),
        ("gone", format!("{NODE_1}:30081")),
    ] {
        let (code, line) = lab.probe(&From::Client, "tcp", &target);
        let want_ok = cell == "gone";
        assert_eq!(
            code == 0,
            want_ok,
            "before the outage, {target}: exit {code}: {line}"
        );
    }

    // A short restart (a member restart, an upgrade) stays inside the watch's reconnect window:
    // the agents resume their watches from their revision, never leave InSync, and apply what
    // is written next (`apply` returns only once every agent has programmed it).
    lab.ok(&["etcd", "stop"]);
    lab.ok(&["etcd", "start"]);
    lab.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: after-restart, namespace: matrix}\ndata: {a: b}\n",
    );
    for node in NODES {
        assert_eq!(agent_file(&lab, node)["datastore"], "InSync", "{node}");
        let log = agent_log(&lab, node);
        assert!(
            !log.contains("not in sync"),
            "{node} lost sync over a short etcd restart"
        );
    }
    assert_eq!(agent_pids(&lab), agents_before, "no agent restarted");

    // The stream: new connections, one after another, through the LoadBalancer IP and the
    // NodePort, from the external client, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stream = {
        let lab_name = lab.name.clone();
        let bin_dir = lab.bin_dir.clone();
        let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
        let targets = [format!("{lb}:80"), format!("{NODE_2}:30080")];
        std::thread::spawn(move || {
            let probe = bin_dir.join("margay-demo-app");
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let target = &targets[i % targets.len()];
                i += 1;
                let out = std::process::Command::new(bin_dir.join("margay-lab"))
                    .args(["--name", &lab_name, "client", "--"])
                    .arg(&probe)
                    .args(["probe", "tcp", target, "--timeout", "2s"])
                    .output()
                    .expect("run a probe");
                sent.fetch_add(1, Ordering::Relaxed);
                if !out.status.success() {
                    failures.lock().unwrap().push(format!(
                        "{target}: {} {}",
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let outage = Instant::now();
    lab.ok(&["etcd", "stop"]);
    let sent_at_stop = sent.load(Ordering::Relaxed);

    // Every agent notices within its watch's reconnect window (10 s) and says so everywhere.
    wait_until(
        Duration::from_secs(30),
        "every agent reports Resyncing",
        || {
            NODES
                .iter()
                .all(|n| agent_file(&lab, n)["datastore"] == "Resyncing")
        },
    );
    let noticed = outage.elapsed();
    for node in NODES {
        let (code, text) = readiness(&lab, node);
        assert!(
            code != 0 && text.contains("503") && text.contains("Resyncing"),
            "{node} /readiness during the outage: exit {code}: {text}"
        );
        let log = agent_log(&lab, node);
        assert!(
            log.contains("not in sync"),
            "{node}'s log says nothing about losing the datastore"
        );
    }
    let status: Value = serde_json::from_str(&lab.ok(&["status", "-o", "json"])).unwrap();
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["agent_datastore"], "Resyncing", "margay-lab status: {n}");
    }
    let ctl = lab.margayctl_at(&url, &["node", "status"]);
    let ctl_err = String::from_utf8_lossy(&ctl.stderr);
    assert!(
        !ctl.status.success() && ctl_err.contains("unavailable"),
        "margayctl during the outage: {ctl_err}"
    );

    // The changes, written where the agents cannot see them.
    sleep_until(outage + Duration::from_secs(20));
    let drill = lab.ok(&["etcd", "start", "--socket", "drill.sock:2379"]);
    let drill_url = drill
        .split_whitespace()
        .find(|w| w.starts_with("etcd+unix://"))
        .expect("the drill URL")
        .to_owned();
    assert_ne!(drill_url, url);
    let late = r#"{"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "late", "namespace": "matrix"},
        "spec": {"type": "NodePort", "selector": {"app": "echo"},
                 "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30090}]}}"#;
    for manifest in [late.to_owned(), slice.to_string()] {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), manifest).unwrap();
        let path = file.path().to_string_lossy().into_owned();
        let out = lab.margayctl_at(&drill_url, &["create", "-f", &path]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = lab.margayctl_at(
        &drill_url,
        &["delete", "service", "echo-local", "-n", "matrix"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = drill_url.trim_start_matches("etcd+unix://");
    let revision = etcdctl(socket, &["endpoint", "status", "-w", "json"]);
    let revision: Value = serde_json::from_str(&revision).unwrap();
    let revision = revision[0]["Status"]["header"]["revision"]
        .as_u64()
        .unwrap();
    etcdctl(socket, &["compact", &revision.to_string()]);
    lab.ok(&["etcd", "stop"]);
    // Still nobody in sync, and nothing applied: the agents did not see the drill's etcd.
    for node in NODES {
        assert_eq!(agent_file(&lab, node)["datastore"], "Resyncing", "{node}");
    }
    let (code, line) = lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30090"));
    assert_ne!(
        code, 0,
        "30090 answered before the agents could know of it: {line}"
    );

    sleep_until(outage + OUTAGE);
    lab.ok(&["etcd", "start"]);
    let down_for = outage.elapsed();
    let back = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "every agent InSync and ready again",
        || {
            NODES
                .iter()
                .all(|n| agent_file(&lab, n)["datastore"] == "InSync" && readiness(&lab, n).0 == 0)
        },
    );
    let resynced = back.elapsed();
    wait_until(Duration::from_secs(20), "the changes applied", || {
        lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30090"))
            .0
            == 0
            && lab
                .probe(&From::Client, "tcp", &format!("{NODE_1}:30081"))
                .0
                != 0
    });
    let applied = back.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();

    let (code, line) = lab.probe(&From::Client, "tcp", &format!("{NODE_2}:30090"));
    assert_eq!(
        code, 0,
        "the Service added during the outage answers: {line}"
    );
    let (code, line) = lab.probe(&From::Client, "tcp", &format!("{NODE_1}:30081"));
    assert_ne!(
        code, 0,
        "the Service deleted during the outage is gone: {line}"
    );
    assert_eq!(agent_pids(&lab), agents_before, "no agent was restarted");
    let nodes = lab.margayctl(&["node", "status"]);
    assert_eq!(
        nodes.lines().count(),
        4,
        "margayctl node status after the return:\n{nodes}"
    );
    for node in NODES {
        let log = agent_log(&lab, node);
        let lost = log.rfind("not in sync").expect("lost");
        assert!(
            log[lost..].contains("status=InSync"),
            "{node}'s log shows no return to InSync after the outage"
        );
    }

    let sent = sent.load(Ordering::Relaxed);
    let failures = failures.lock().unwrap();
    println!(
        "etcd down {:.1} s (agents noticed after {:.1} s); {} connections during the test ({} while \
         etcd was down or after), {} failed; agents InSync {:.2} s after etcd returned, changes \
         applied after {:.2} s",
        down_for.as_secs_f64(),
        noticed.as_secs_f64(),
        sent,
        sent - sent_at_stop,
        failures.len(),
        resynced.as_secs_f64(),
        applied.as_secs_f64()
    );
    assert!(
        sent - sent_at_stop > 100,
        "the stream was too thin to show anything: {sent}"
    );
    assert!(
        failures.is_empty(),
        "connections failed while etcd was down:\n{}",
        failures.join("\n")
    );
}

/// The agents' pids, sorted.
fn agent_pids(lab: &TestLab) -> Vec<u64> {
    let status: Value = serde_json::from_str(&lab.ok(&["status", "-o", "json"])).unwrap();
    let mut pids: Vec<u64> = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "margay-node" && p["alive"] == true)
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    pids.sort_unstable();
    pids
}

/// A node agent's log.
fn agent_log(lab: &TestLab, node: &str) -> String {
    std::fs::read_to_string(format!(
        "/run/margay-lab/{}/logs/agent-{node}.log",
        lab.name
    ))
    .expect("agent log")
}

/// A node agent's status file.
fn agent_file(lab: &TestLab, node: &str) -> Value {
    std::fs::read_to_string(format!("/run/margay-lab/{}/agents/{node}.json", lab.name))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// `GET /readiness` on a node's agent: (exit code, what the probe printed).
fn readiness(lab: &TestLab, node: &str) -> (i32, String) {
    let app = lab.bin_dir.join("margay-demo-app");
    let app = app.to_string_lossy();
    let out = lab.run(&[
        "node",
        "exec",
        node,
        "--",
        &app,
        "probe",
        "http",
        "http://127.0.0.1:9099/readiness",
    ]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// echo-np's EndpointSlice, renamed for the Service `late`: what the endpoints controller would
/// write for `late` (same selector, same backend).
fn late_endpoint_slice(lab: &TestLab, url: &str) -> Value {
    let out = lab.margayctl_at(
        url,
        &["get", "endpointslices", "-n", "matrix", "-o", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![list.clone()]);
    let mut slice = items
        .into_iter()
        .find(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == "echo-np")
        .expect("echo-np's EndpointSlice");
    let metadata = slice["metadata"].as_object_mut().unwrap();
    for field in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "ownerReferences",
    ] {
        metadata.remove(field);
    }
    metadata.insert("name".into(), "late-slice".into());
    slice["metadata"]["labels"]["kubernetes.io/service-name"] = "late".into();
    slice
}

/// etcdctl against a unix socket; returns stdout.
fn etcdctl(socket: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("etcdctl")
        .env_clear()
        .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
        .arg("--endpoints")
        .arg(format!("unix://{socket}"))
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sleep_until(t: Instant) {
    if let Some(left) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
}

/// The lab's etcd and its data go with `margay-lab down`, also when the lab's state was lost
/// (a crash): `down` finds etcd by the lab's cgroup and namespaces, and its data directory is
/// inside the state directory it removes.
#[test]
fn down_removes_the_lab_etcd_and_its_data_after_a_crash() {
    if skip_unless_root("down_removes_the_lab_etcd_and_its_data_after_a_crash") {
        return;
    }
    let lab = TestLab::up("ec", &["--datastore", "etcd"]);
    lab.assert_on_lab_etcd();
    let status = lab.ok(&["etcd", "status"]);
    let pid: u32 = status
        .rsplit("pid ")
        .next()
        .and_then(|p| p.trim().trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no pid in {status:?}"));
    let state_dir = format!("/run/margay-lab/{}", lab.name);
    assert!(std::path::Path::new(&format!("{state_dir}/etcd/data")).is_dir());
    std::fs::remove_file(format!("{state_dir}/state.json")).unwrap();
    lab.ok(&["down"]);
    wait_until(Duration::from_secs(5), "etcd has exited", || {
        // Gone, or a zombie its parent has not collected yet.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
    });
    assert!(
        !std::path::Path::new(&state_dir).exists(),
        "{state_dir} (etcd's data) is left"
    );
}
