use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;

fn service(name: &str, spec: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn slice(service: &str, name: &str, endpoints: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "namespace": "default",
            "name": name,
            "labels": {LABEL_SERVICE_NAME: service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .unwrap()
}

fn node() -> NodeContext {
    NodeContext {
        node_name: "node-a".to_owned(),
        node_ips: vec![Ipv4Addr::new(192, 168, 0, 10)],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
    }
}

fn simple(name: &str, ip: &str) -> Service {
    service(
        name,
        json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}),
    )
}

fn eps(ips: &[&str]) -> serde_json::Value {
    ips.iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "node-b"}))
        .collect()
}

fn fe(ip: &str, port: u16) -> FrontendKey {
    FrontendKey::new(ip.parse().unwrap(), port, Proto::Tcp)
}

fn three_services() -> (Vec<Service>, Vec<EndpointSlice>) {
    let services = vec![
        simple("a", "10.96.0.1"),
        simple("b", "10.96.0.2"),
        simple("c", "10.96.0.3"),
    ];
    let slices = vec![
        slice("a", "a-1", eps(&["10.244.1.1", "10.244.1.2"])),
        slice("b", "b-1", eps(&["10.244.2.1", "10.244.2.2", "10.244.2.3"])),
        slice("c", "c-1", eps(&["10.244.3.1"])),
    ];
    (services, slices)
}

#[test]
fn ids_are_the_name_hash_on_a_fresh_node() {
    let (services, slices) = three_services();
    let m = bpf_nat_model(&services, &slices, &node(), &NatModel::default());
    for (id, name) in &m.services {
        assert_eq!(*id, service_id_hash(name), "{name}");
    }
    assert_eq!(m.frontends[&fe("10.96.0.2", 80)].count, 3);
    assert_eq!(m.backends.len(), 6);
}

#[test]
fn one_endpoint_change_touches_only_its_service() {
    let (services, mut slices) = three_services();
    let before = bpf_nat_model(&services, &slices, &node(), &NatModel::default());
    // b loses its middle endpoint and gains another one.
    slices[1] = slice("b", "b-1", eps(&["10.244.2.1", "10.244.2.3", "10.244.2.9"]));
    let after = bpf_nat_model(&services, &slices, &node(), &before);
    assert_eq!(before.services, after.services, "ids are stable");
    let diff = before.diff(&after);
    let b_id = after.frontends[&fe("10.96.0.2", 80)].svc_id;
    assert_eq!(diff.touched_ids(), BTreeSet::from([b_id]));
    // Ordinals 1 and 2 change (.3 moves down, .9 arrives); the count stays 3.
    assert_eq!(diff.backend_writes.len(), 2, "{diff}");
    assert!(diff.frontend_writes.is_empty(), "{diff}");
    assert!(diff.backend_deletes.is_empty(), "{diff}");

    // Removing the last endpoint in address order: no backend is rewritten; the frontend's count
    // shrinks, then the last ordinal is deleted.
    slices[1] = slice("b", "b-1", eps(&["10.244.2.1", "10.244.2.3"]));
    let shrunk = bpf_nat_model(&services, &slices, &node(), &after);
    let diff = after.diff(&shrunk);
    assert_eq!(diff.touched_ids(), BTreeSet::from([b_id]));
    assert_eq!(diff.frontend_writes.len(), 1);
    assert_eq!(
        diff.backend_deletes,
        vec![BackendKey {
            svc_id: b_id,
            ordinal: 2
        }]
    );
}

#[test]
fn a_hash_collision_never_moves_an_existing_service() {
    let (services, slices) = three_services();
    // The maps already hold a service "zzz" whose id is the hash of a's name (as if zzz had
    // collided into that value earlier).
    let a_hash = service_id_hash("default/a:http/tcp");
    let mut previous = NatModel::default();
    previous
        .services
        .insert(a_hash, "default/zzz:http/tcp".to_owned());
    previous.frontends.insert(
        fe("10.96.9.9", 80),
        FrontendValue {
            svc_id: a_hash,
            ..FrontendValue::default()
        },
    );
    let mut with_zzz = services.clone();
    with_zzz.push(simple("zzz", "10.96.9.9"));
    let m = bpf_nat_model(&with_zzz, &slices, &node(), &previous);
    assert_eq!(
        m.frontends[&fe("10.96.9.9", 80)].svc_id,
        a_hash,
        "zzz keeps its id"
    );
    assert_eq!(
        m.frontends[&fe("10.96.0.1", 80)].svc_id,
        a_hash.wrapping_add(1).max(1),
        "a probes to the next value"
    );
}

#[test]
fn an_id_freed_in_this_sync_is_not_reused() {
    let previous = {
        let mut m = NatModel::default();
        let id = service_id_hash("default/a:http/tcp");
        m.services.insert(id, "default/old:http/tcp".to_owned());
        m.backends.insert(
            BackendKey {
                svc_id: id,
                ordinal: 0,
            },
            Backend::new(Ipv4Addr::new(10, 1, 1, 1), 1),
        );
        m
    };
    let (services, slices) = three_services();
    let m = bpf_nat_model(&services, &slices, &node(), &previous);
    let a = m.frontends[&fe("10.96.0.1", 80)].svc_id;
    assert_ne!(a, service_id_hash("default/a:http/tcp"));
}

#[test]
fn a_restarted_agent_adopts_ids_from_the_maps() {
    // Before the restart, b had an id that is not its hash (it once collided).
    let (services, slices) = three_services();
    let mut fresh = bpf_nat_model(&services, &slices, &node(), &NatModel::default());
    let b_hash = service_id_hash("default/b:http/tcp");
    let moved = 12345;
    let entries: Vec<_> = fresh.frontends.iter_mut().collect();
    for (_, v) in entries {
        if v.svc_id == b_hash {
            v.svc_id = moved;
        }
    }
    let backends = std::mem::take(&mut fresh.backends);
    fresh.backends = backends
        .into_iter()
        .map(|(mut k, b)| {
            if k.svc_id == b_hash {
                k.svc_id = moved;
            }
            (k, b)
        })
        .collect();
    // What a restarted agent reads back: entries only, no names.
    let read_back = NatModel {
        frontends: fresh.frontends.clone(),
        backends: fresh.backends.clone(),
        ..NatModel::default()
    };
    let m = bpf_nat_model(&services, &slices, &node(), &read_back);
    assert!(
        m.same_entries(&read_back),
        "nothing to write after a restart"
    );
    assert!(read_back.diff(&m).is_empty());
    assert_eq!(m.services[&moved], "default/b:http/tcp");
}

#[test]
fn output_does_not_depend_on_object_order() {
    let (mut services, mut slices) = three_services();
    let a = bpf_nat_model(&services, &slices, &node(), &NatModel::default());
    services.reverse();
    slices.reverse();
    let b = bpf_nat_model(&services, &slices, &node(), &NatModel::default());
    assert_eq!(a, b);
}

#[test]
fn local_terminating_with_remote_ready_gets_a_second_list() {
    let svc = service(
        "web",
        json!({
            "type": "NodePort",
            "clusterIP": "10.96.0.10",
            "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
        }),
    );
    let sl = slice(
        "web",
        "web-1",
        json!([
            {"addresses": ["10.244.1.5"], "nodeName": "node-a",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.2.5"], "nodeName": "node-b"},
        ]),
    );
    let m = bpf_nat_model(&[svc], &[sl], &node(), &NatModel::default());
    let cip = m.frontends[&fe("10.96.0.10", 80)];
    let np = m.frontends[&fe("192.168.0.10", 30080)];
    assert_ne!(cip.svc_id, np.svc_id);
    // ClusterIP: the ready remote endpoint only.
    assert_eq!((cip.count, cip.local_count), (1, 0));
    assert_eq!(m.backends_of(cip.svc_id).count(), 1);
    // NodePort, external clients: the local terminating endpoint at ordinal 0.
    assert_eq!(
        (np.count, np.local_count, np.flags),
        (2, 1, flags::EXT_LOCAL)
    );
    let np_backends: Vec<String> = m
        .backends_of(np.svc_id)
        .map(|(_, b)| b.to_string())
        .collect();
    assert_eq!(np_backends, ["10.244.1.5:8080", "10.244.2.5:8080"]);
    assert_eq!(m.services[&np.svc_id], "default/web:http/tcp+local");
}

#[test]
fn an_allow_all_source_range_is_no_source_range() {
    let mut svc = service(
        "lb",
        json!({
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.20",
            "loadBalancerSourceRanges": ["10.0.0.0/8", "0.0.0.0/0"],
            "ports": [{"name": "http", "port": 80}],
        }),
    );
    svc.status =
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}))
            .unwrap();
    let m = bpf_nat_model(&[svc], &[], &node(), &NatModel::default());
    let lb: Vec<_> = m
        .frontends
        .iter()
        .filter(|(k, _)| k.addr == Ipv4Addr::new(203, 0, 113, 1))
        .collect();
    assert_eq!(lb.len(), 1);
    assert_eq!(lb[0].1.flags, 0);
}

#[test]
fn diff_writes_specific_ranges_first_and_deletes_them_last() {
    let before = NatModel::default();
    let mut after = NatModel::default();
    let key = fe("203.0.113.1", 80);
    let ranged = FrontendKey {
        source: Some("10.0.0.0/8".parse().unwrap()),
        ..key
    };
    after.frontends.insert(key, FrontendValue::default());
    after.frontends.insert(ranged, FrontendValue::default());
    let d = before.diff(&after);
    let order: Vec<_> = d.frontend_writes.iter().map(|(k, _)| *k).collect();
    assert_eq!(order, [ranged, key]);
    let d = after.diff(&before);
    assert_eq!(d.frontend_deletes, [key, ranged]);
}

#[test]
fn conflicting_frontends_go_to_the_first_service_by_name() {
    let a = service(
        "a",
        json!({"clusterIP": "10.96.0.1", "externalIPs": ["198.51.100.1"],
               "ports": [{"name": "http", "port": 80}]}),
    );
    let b = service(
        "b",
        json!({"clusterIP": "10.96.0.2", "externalIPs": ["198.51.100.1"],
               "ports": [{"name": "http", "port": 80}]}),
    );
    let m = bpf_nat_model(&[b, a], &[], &node(), &NatModel::default());
    assert_eq!(
        m.frontends[&fe("198.51.100.1", 80)].svc_id,
        service_id_hash("default/a:http/tcp")
    );
    assert_eq!(m.conflicts.len(), 1, "{:?}", m.conflicts);
}

#[test]
fn skipped_services_and_protocols() {
    let services = vec![
        service(
            "ext",
            json!({"type": "ExternalName", "externalName": "x.example"}),
        ),
        service(
            "headless",
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
        ),
        service(
            "sctp",
            json!({"clusterIP": "10.96.0.5", "ports": [{"port": 80, "protocol": "SCTP"}]}),
        ),
    ];
    let m = bpf_nat_model(&services, &[], &node(), &NatModel::default());
    assert!(
        m.frontends.is_empty() && m.backends.is_empty(),
        "{}",
        m.dump()
    );
}

#[test]
fn flags_match_the_c_names() {
    assert_eq!(flags::names(0), "-");
    assert_eq!(
        flags::names(flags::BLACKHOLE | flags::SRC_RANGES | 0x40),
        "BLACKHOLE|SRC_RANGES|0x40"
    );
}
