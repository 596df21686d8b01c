//! Pods' hostPorts on a real lab: reachable at their node's address from the external client
//! (203.0.113.10), which the pod sees as the source, in the Iptables dataplane (the CNI portmap
//! plugin's chains) and in the BPF dataplane (NAT frontends), after live switches, and not at all
//! with the Installation's `hostPorts: Disabled`.
//!
//! Root only (namespaces, iptables and BPF in them); run by CI as root. The lab has a unique name
//! and is taken down on drop, even when the test fails.

mod common;

use std::time::{Duration, Instant};

use common::{From, TestLab, peer, skip_unless_root};

const NODE_1: &str = "10.224.0.4";
const NODE_2: &str = "10.224.0.5";
const NODE_3: &str = "10.224.0.6";
const CLIENT: &str = "203.0.113.10";

/// An echo pod on node-1 with a TCP and a UDP hostPort on every node address, one on node-2
/// whose hostPort answers only at the hostIP, and a client pod on node-3.
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: matrix}
---
apiVersion: v1
kind: Pod
metadata: {name: hp-echo, namespace: matrix}
spec:
  nodeName: node-1
  containers:
  - name: echo
    image: margay/echo
    ports:
    - {containerPort: 8080, hostPort: 18080}
    - {containerPort: 5353, hostPort: 15353, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: hp-pinned, namespace: matrix}
spec:
  nodeName: node-2
  containers:
  - name: echo
    image: margay/echo
    ports: [{containerPort: 8080, hostPort: 18081, hostIP: 10.224.0.5}]
---
apiVersion: v1
kind: Pod
metadata: {name: hp-client, namespace: matrix}
spec:
  nodeName: node-3
  containers: [{name: sleep, image: busybox, command: [sleep, "100000"]}]
"#;

/// Probes until `want(exit code, line)` holds, or fails after 20 s with the last answer.
fn eventually(
    lab: &TestLab,
    proto: &str,
    target: &str,
    what: &str,
    want: impl Fn(i32, &str) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, line) = lab.probe(&From::Client, proto, target);
        if want(code, &line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{proto} {target}: {what}; last answer: exit {code}: {line}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every hostPort answers the client, and the pod saw the client's own address.
fn reachable_keeping_the_client(lab: &TestLab, when: &str) {
    for (proto, target, pod) in [
        ("tcp", format!("{NODE_1}:18080"), "hp-echo"),
        ("udp", format!("{NODE_1}:15353"), "hp-echo"),
        ("tcp", format!("{NODE_2}:18081"), "hp-pinned"),
    ] {
        eventually(
            lab,
            proto,
            &target,
            &format!("{when}: reachable, from {CLIENT}"),
            |code, line| code == 0 && peer(line) == CLIENT && line.contains(pod),
        );
        println!("{when}: {proto} {target} -> {pod} saw {CLIENT}");
    }
    // A pod on another node reaches it too; the node address is outside every pool, so the
    // pool's natOutgoing masquerades it behind its own node's address (10.224.0.6), as Calico's.
    let (code, line) = lab.probe(&From::Pod("hp-client"), "tcp", &format!("{NODE_1}:18080"));
    assert!(
        code == 0 && peer(&line) == NODE_3 && line.contains("hp-echo"),
        "{when}: from the pod on node-3: exit {code}: {line}"
    );
    // A hostPort answers only on its pod's node.
    let (code, line) = lab.probe(&From::Client, "tcp", &format!("{NODE_2}:18080"));
    assert_ne!(code, 0, "{when}: node-2 has no pod on 18080, yet: {line}");
}

fn unreachable(lab: &TestLab, when: &str) {
    for (proto, target) in [
        ("tcp", format!("{NODE_1}:18080")),
        ("udp", format!("{NODE_1}:15353")),
        ("tcp", format!("{NODE_2}:18081")),
    ] {
        eventually(
            lab,
            proto,
            &target,
            &format!("{when}: unreachable"),
            |code, _| code != 0,
        );
    }
}

fn set_installation(lab: &TestLab, network: &str) {
    lab.margayctl(&[
        "patch",
        "installation.operator.tigera.io",
        "default",
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"spec":{{"calicoNetwork":{network}}}}}"#),
    ]);
}

fn switch_to(lab: &TestLab, dataplane: &str) {
    set_installation(lab, &format!(r#"{{"linuxDataplane":"{dataplane}"}}"#));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active = lab.jsonpath(&["nodes"], "{.items[*].status.dataplane.active}");
        if active
            .split_whitespace()
            .filter(|a| *a == dataplane)
            .count()
            == 3
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every node runs {dataplane}: {active}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node1_nat(lab: &TestLab) -> String {
    lab.ok(&["node", "exec", "node-1", "--", "iptables-save", "-t", "nat"])
}

#[test]
fn host_ports_reach_pods_with_the_client_address_in_both_dataplanes_and_not_when_disabled() {
    if skip_unless_root("host_ports_reach_pods_with_the_client_address_in_both_dataplanes") {
        return;
    }
    let lab = TestLab::up("hp", &[]);
    lab.apply(PODS);

    // Iptables: portmap's chains, DNAT to the pod, no masquerade for outside clients.
    reachable_keeping_the_client(&lab, "Iptables");
    let nat = node1_nat(&lab);
    for rule in [
        "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        "-m multiport --dports 18080 -j CNI-DN-",
        "-p udp -m comment --comment \"dnat name: k8s-pod-network id: matrix/hp-echo\"",
        "-j DNAT --to-destination 192.168.0.",
        "-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE",
    ] {
        assert!(nat.contains(rule), "node-1 lacks {rule:?}:\n{nat}");
    }

    // Live to BPF (kube-proxy's and portmap's rules cleaned up): the programs serve them.
    switch_to(&lab, "BPF");
    reachable_keeping_the_client(&lab, "BPF");
    let nat = node1_nat(&lab);
    assert!(
        !nat.contains("CNI-HOSTPORT-DNAT"),
        "BPF mode serves hostPorts without portmap's chains:\n{nat}"
    );

    // Disabled: gone from the BPF maps, and stays gone after switching back to Iptables.
    set_installation(&lab, r#"{"hostPorts":"Disabled"}"#);
    unreachable(&lab, "BPF, hostPorts Disabled");
    switch_to(&lab, "Iptables");
    unreachable(&lab, "Iptables, hostPorts Disabled");
    let nat = node1_nat(&lab);
    assert!(
        !nat.contains("CNI-HOSTPORT") && !nat.contains("CNI-DN-"),
        "hostPorts Disabled leaves no portmap chain:\n{nat}"
    );

    // Enabled again (null: Calico's default) in Iptables.
    set_installation(&lab, r#"{"hostPorts":null}"#);
    reachable_keeping_the_client(&lab, "Iptables after the reversal");
}
