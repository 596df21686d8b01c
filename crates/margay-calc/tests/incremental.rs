//! Equivalence: kube-proxy's rules updated one Service at a time ([`KubeProxyRules::update`])
//! equal, at every step, the full calculation ([`kube_proxy_ruleset`]) from the same Services and
//! EndpointSlices, on every golden scenario and across kube-proxy's large-cluster threshold.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use margay_calc::kube_proxy::{KubeProxyRules, ServiceName, Update};
use margay_calc::scenario::{service_name, slice_service};
use margay_calc::{NodeContext, Scenario, kube_proxy_ruleset, ruleset_to_restore};

fn scenarios() -> Vec<(PathBuf, Scenario)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/golden") {
        let case = entry.expect("entry").path();
        for file in ["input.yaml", "update.yaml"] {
            let path = case.join(file);
            if let Ok(text) = std::fs::read_to_string(&path) {
                let s = Scenario::from_yaml(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
                out.push((path, s));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() > 10, "the golden scenarios are there");
    out
}

/// Applies one step's touched Services; a threshold crossing recalculates everything.
fn apply(
    rules: &mut KubeProxyRules,
    touched: &[ServiceName],
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> usize {
    let mut full = 0;
    for name in touched {
        let svc = services.iter().find(|s| service_name(s) == *name);
        let own: Vec<EndpointSlice> = slices
            .iter()
            .filter(|s| slice_service(s).as_ref() == Some(name))
            .cloned()
            .collect();
        if rules.update(name, svc, &own) == Update::NeedsFull {
            *rules = KubeProxyRules::full(services, slices, node);
            full += 1;
        }
    }
    full
}

fn assert_same(
    rules: &KubeProxyRules,
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
    what: &str,
) {
    let expected = kube_proxy_ruleset(services, slices, node);
    let actual = rules.ruleset();
    if actual != expected {
        panic!(
            "{what}: the incremental rules differ from the full calculation\n--- full\n{}\n--- incremental\n{}",
            ruleset_to_restore(&expected, None),
            ruleset_to_restore(&actual, None)
        );
    }
}

#[test]
fn one_service_at_a_time_equals_the_full_calculation_on_every_golden_scenario() {
    for (path, scenario) in scenarios() {
        let node = &scenario.node;
        let mut rules = KubeProxyRules::full(&[], &[], node);
        for step in scenario.churn() {
            apply(
                &mut rules,
                &step.touched,
                &step.services,
                &step.slices,
                node,
            );
            assert_same(
                &rules,
                &step.services,
                &step.slices,
                node,
                &format!("{}: {}", path.display(), step.what),
            );
        }
        // From scratch too.
        let full = KubeProxyRules::full(&scenario.services, &scenario.slices, node);
        assert_same(
            &full,
            &scenario.services,
            &scenario.slices,
            node,
            &path.display().to_string(),
        );
    }
}

/// `count` ClusterIP Services with `per` endpoints each.
fn generated(count: usize, per: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..count {
        let name = format!("s{i}");
        services.push(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": "bulk", "name": name},
                "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                         "ports": [{"port": 80, "targetPort": 8080}]}
            }))
            .expect("service"),
        );
        let endpoints: Vec<serde_json::Value> = (0..per)
            .map(|j| serde_json::json!({"addresses": [format!("10.244.{}.{}", j, i % 250 + 1)]}))
            .collect();
        slices.push(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": "bulk", "name": format!("{name}-abc"),
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "", "port": 8080, "protocol": "TCP"}]
            }))
            .expect("slice"),
        );
    }
    (services, slices)
}

#[test]
fn crossing_the_large_cluster_threshold_asks_for_a_full_calculation() {
    let node = NodeContext {
        node_name: "node-a".into(),
        node_ips: vec!["192.168.0.10".parse().unwrap()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
    };
    // 500 Services x 2 endpoints = 1000: at the threshold, not above it.
    let (mut services, mut slices) = generated(500, 2);
    let mut rules = KubeProxyRules::full(&services, &slices, &node);
    assert!(!rules.large());
    assert_same(&rules, &services, &slices, &node, "500 Services");
    // Two more endpoints cross it: every endpoint rule loses its comment.
    for last in ["10.244.9.9", "10.244.9.10"] {
        let mut ep = slices[7].endpoints[0].clone();
        ep.addresses = vec![last.into()];
        slices[7].endpoints.push(ep);
    }
    let name: ServiceName = ("bulk".into(), "s7".into());
    assert_eq!(
        rules.update(&name, Some(&services[7]), &slices[7..8]),
        Update::NeedsFull
    );
    assert_eq!(
        apply(
            &mut rules,
            std::slice::from_ref(&name),
            &services,
            &slices,
            &node
        ),
        1
    );
    assert!(rules.large());
    assert_same(&rules, &services, &slices, &node, "1002 endpoints");
    // Above it, changes stay incremental; removing a Service brings it back under.
    slices[8].endpoints.pop();
    let eight: ServiceName = ("bulk".into(), "s8".into());
    assert_eq!(apply(&mut rules, &[eight], &services, &slices, &node), 0);
    assert_same(&rules, &services, &slices, &node, "1001 endpoints");
    let gone = services.remove(3);
    let three = service_name(&gone);
    assert_eq!(apply(&mut rules, &[three], &services, &slices, &node), 1);
    assert!(!rules.large());
    assert_same(&rules, &services, &slices, &node, "one Service removed");
}
