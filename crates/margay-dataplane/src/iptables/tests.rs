//! Driver tests against the in-memory kernel; the privileged tests repeat the important ones
//! against the real one.

use super::*;
use margay_calc::Scenario;

/// A ruleset with services `names` (each with one endpoint), natOutgoing if `nat`.
fn ruleset(names: &[&str], endpoints: u8, nat: bool) -> Ruleset {
    let mut yaml =
        String::from("node: {name: node-a, ips: [192.168.0.10], clusterCIDRs: [10.244.0.0/16]}\n");
    yaml.push_str(&format!(
        "pools: [{{cidr: 10.244.0.0/16, natOutgoing: {nat}}}]\nobjects:\n"
    ));
    for (i, name) in names.iter().enumerate() {
        yaml.push_str(&format!(
            "- {{apiVersion: v1, kind: Service, metadata: {{namespace: default, name: {name}}}, \
             spec: {{clusterIP: 10.96.0.{}, ports: [{{name: http, port: 80}}]}}}}\n",
            i + 10
        ));
        let eps: Vec<String> = (0..endpoints)
            .map(|e| format!("{{addresses: [10.244.{}.{}]}}", i + 1, e + 1))
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

fn driver() -> IptablesDriver<FakeIptables> {
    IptablesDriver::with_backend(FakeIptables::new())
}

fn assert_no_drift(d: &mut IptablesDriver<FakeIptables>, rs: &Ruleset) {
    let drift = d.verify(rs).unwrap();
    assert!(
        drift.is_empty(),
        "{}",
        drift
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn first_sync_is_full_then_partial_then_nothing() {
    let mut d = driver();
    let a = ruleset(&["alpha", "beta"], 2, false);
    let r = d.sync(&a).unwrap();
    assert!(r.full);
    assert_eq!(r.processes, 2);
    assert_eq!(r.chains_written, a.chain_count());
    assert_eq!(r.rules_written, a.rule_count());
    assert_eq!(r.jumps_inserted, a.filter.jumps.len() + a.nat.jumps.len());
    assert_no_drift(&mut d, &a);

    let r = d.sync(&a).unwrap();
    assert_eq!((r.full, r.processes), (false, 0));

    let b = ruleset(&["alpha", "gamma"], 2, true);
    let r = d.sync(&b).unwrap();
    assert!(!r.full);
    assert_eq!(r.processes, 1);
    let input = d.backend().restores.last().unwrap().clone();
    let alpha = margay_calc::kube_proxy::port_proto_hash("default/alpha:http", "tcp");
    assert!(
        !input.contains(&format!(":KUBE-SVC-{alpha}")),
        "alpha is unchanged:\n{input}"
    );
    assert!(
        input.contains(":KUBE-SERVICES"),
        "KUBE-SERVICES changed:\n{input}"
    );
    assert!(input.contains("-X KUBE-SVC-"), "beta's chains go:\n{input}");
    assert!(
        input.contains("-I POSTROUTING 1"),
        "natOutgoing jump:\n{input}"
    );
    assert_no_drift(&mut d, &b);
    assert_eq!(
        d.backend().saves,
        3,
        "one save per full sync, plus the verifies"
    );
}

#[test]
fn built_in_chains_keep_other_rules_and_each_jump_once() {
    let mut fake = FakeIptables::new();
    let a = ruleset(&["alpha"], 1, false);
    // Someone else's rules, a duplicate of one of our jumps, an older kube-proxy's jump without
    // comment, and a stale service chain still in the kernel.
    fake.apply(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-OLD - [0:0]\n:DOCKER - [0:0]\n\
         -A KUBE-SVC-OLD -j RETURN\n\
         -A PREROUTING -j DOCKER\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-SERVICES\n\
         -A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE\n\
         COMMIT\n",
    )
    .unwrap();
    let mut d = IptablesDriver::with_backend(fake);
    let r = d.sync(&a).unwrap();
    assert_eq!(r.jumps_deleted, 2, "one duplicate, one stale jump");
    assert_eq!(r.chains_deleted, 1, "KUBE-SVC-OLD");
    assert_no_drift(&mut d, &a);
    let nat = |chain| d.backend().chain(Table::Nat, chain).unwrap().clone();
    assert!(nat("PREROUTING").contains(&"-j DOCKER".to_owned()));
    assert!(nat("POSTROUTING").contains(&"-s 172.17.0.0/16 -j MASQUERADE".to_owned()));
    assert_eq!(nat("POSTROUTING").len(), 2);
}

#[test]
fn stale_chain_referenced_by_someone_else_is_flushed_not_deleted() {
    let mut fake = FakeIptables::new();
    fake.apply("*nat\n:KUBE-SVC-OLD - [0:0]\n:MINE - [0:0]\n-A KUBE-SVC-OLD -j RETURN\n-A MINE -j KUBE-SVC-OLD\nCOMMIT\n")
        .unwrap();
    let mut d = IptablesDriver::with_backend(fake);
    let a = ruleset(&["alpha"], 1, false);
    let r = d.sync(&a).unwrap();
    assert_eq!((r.chains_flushed, r.chains_deleted), (1, 0));
    assert_eq!(
        d.backend().chain(Table::Nat, "KUBE-SVC-OLD"),
        Some(&Vec::new())
    );
}

#[test]
fn failed_partial_sync_falls_back_to_a_full_one() {
    let mut d = driver();
    d.sync(&ruleset(&["alpha"], 1, false)).unwrap();
    let b = ruleset(&["alpha", "beta"], 1, false);
    d.backend_mut()
        .fail_next_restore("line 3: simulated failure");
    let r = d.sync(&b).unwrap();
    assert!(r.full);
    assert!(
        r.fell_back
            .as_deref()
            .unwrap()
            .contains("simulated failure")
    );
    assert_eq!(r.processes, 3);
    assert_no_drift(&mut d, &b);
}

#[test]
fn tampering_is_repaired_by_the_fallback() {
    let mut d = driver();
    let a = ruleset(&["alpha"], 1, false);
    d.sync(&a).unwrap();
    // Someone flushes and deletes the nat table's chains behind the driver's back.
    let fresh = SavedTable::fresh(Table::Nat);
    d.backend_mut()
        .tables
        .tables
        .insert("nat".to_owned(), fresh);
    let b = ruleset(&["alpha", "beta"], 1, false);
    let r = d.sync(&b).unwrap();
    let reason = r.fell_back.expect("partial sync refers to a missing chain");
    assert!(reason.contains("does not exist"), "{reason}");
    assert!(reason.contains("input around the failing line"), "{reason}");
    assert_no_drift(&mut d, &b);
}

#[test]
fn failed_full_sync_is_retried_fully() {
    let mut d = driver();
    d.backend_mut().fail_next_save("no iptables here");
    assert!(d.sync(&ruleset(&["alpha"], 1, false)).is_err());
    assert!(d.applied().is_none());
    let mut d2 = driver();
    let a = ruleset(&["alpha"], 1, false);
    d2.sync(&a).unwrap();
    d2.backend_mut().fail_next_restore("boom");
    d2.request_full_sync();
    assert!(d2.sync(&a).is_err());
    let r = d2.sync(&a).unwrap();
    assert!(r.full);
}

#[test]
fn full_sync_period_forces_full_syncs() {
    let mut d = driver();
    d.set_full_sync_period(Duration::ZERO);
    let a = ruleset(&["alpha"], 1, false);
    d.sync(&a).unwrap();
    let r = d.sync(&a).unwrap();
    assert!(r.full);
    assert_eq!(
        (r.jumps_inserted, r.jumps_deleted, r.chains_deleted),
        (0, 0, 0)
    );
}

#[test]
fn cleanup_removes_everything_owned_and_nothing_else() {
    let mut d = driver();
    d.backend_mut()
        .apply("*filter\n:FOREIGN - [0:0]\n-A INPUT -j FOREIGN\n-A FOREIGN -j ACCEPT\nCOMMIT\n")
        .unwrap();
    let mut rs = ruleset(&["alpha", "beta"], 3, true);
    rs.add_bpf_translated_accept();
    d.sync(&rs).unwrap();
    assert!(
        d.backend().chain(Table::Filter, "FORWARD").unwrap()[0].contains("0x2000000"),
        "the BPF accept comes first"
    );
    let r = d.cleanup().unwrap();
    assert!(r.chains_left.is_empty());
    assert!(r.jumps_deleted >= 15);
    for table in Table::ALL {
        let t = d.backend().tables.table(table).unwrap();
        for (chain, rules) in &t.chains {
            assert!(!is_owned_chain(chain), "{chain} survived");
            for rule in rules {
                assert!(
                    !rule.contains("KUBE-") && !rule.contains("cali-") && !rule.contains("margay"),
                    "{chain}: {rule}"
                );
            }
        }
    }
    assert_eq!(
        d.backend().chain(Table::Filter, "INPUT").unwrap(),
        &vec!["-j FOREIGN".to_owned()]
    );
    // Cleanup of a clean kernel runs no restore.
    let restores = d.backend().restores.len();
    d.cleanup().unwrap();
    assert_eq!(d.backend().restores.len(), restores);
    // And the next sync is a full one.
    assert!(d.sync(&ruleset(&["alpha"], 1, false)).unwrap().full);
}

#[test]
fn restore_context_shows_the_failing_line() {
    let input = "*nat\n:A - [0:0]\n-A A -j B\nCOMMIT\n";
    let ctx = restore_context(input, "iptables-restore: line 3 failed");
    assert!(ctx.contains(">    3 -A A -j B"), "{ctx}");
    assert!(ctx.contains("    2 :A - [0:0]"), "{ctx}");
    assert_eq!(restore_context(input, "no number"), "");
}

#[test]
fn jumps_that_come_back_go_below_the_ones_that_must_stay_first() {
    // BPF mode: only the accept of BPF-translated packets (and natOutgoing) in FORWARD.
    let mut d = driver();
    let mut bpf_mode = Ruleset::default();
    bpf_mode.add_nat_outgoing(&[("10.244.0.0/16".parse().unwrap(), true)]);
    bpf_mode.add_bpf_translated_accept();
    d.sync(&bpf_mode).unwrap();
    // Back to Iptables: kube-proxy's jumps return, and must come after the accept.
    let mut iptables_mode = ruleset(&["alpha"], 1, true);
    iptables_mode.add_bpf_translated_accept();
    d.sync(&iptables_mode).unwrap();
    let forward = d.backend().chain(Table::Filter, "FORWARD").unwrap();
    assert!(forward[0].contains("0x2000000"), "{forward:#?}");
    assert_eq!(
        forward.iter().filter(|r| r.contains("0x2000000")).count(),
        1
    );
    assert_no_drift(&mut d, &iptables_mode);
}
