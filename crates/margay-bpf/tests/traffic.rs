//! Real traffic through the TC programs: a pod connects to a ClusterIP and reaches the backend
//! pod behind it, through veths in network namespaces of our own (nothing in the root namespace).

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::Duration,
};

use common::{Harness, POD_A_IP, POD_B_IP, Topology, VETH_A, VETH_B};
use margay_bpf::{
    TcMode, TcProgram,
    maps::{
        CtKey, NatBackendValue, NatFrontendKey, Protocol,
        conntrack::{TCP_ACK, TCP_SYN},
        nat::{ServiceNat, write_service},
    },
};

const SVC: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const BE_PORT: u16 = 8080;

fn attach_node_programs(
    h: &mut Harness,
    t: &Topology,
    mode: TcMode,
) -> Vec<margay_bpf::TcAttachment> {
    t.node.run(|| {
        let mut v = Vec::new();
        for veth in [VETH_A, VETH_B] {
            for p in [TcProgram::FromWorkload, TcProgram::ToWorkload] {
                v.push(h.dp.attach_tc(p, veth, mode).expect("attach"));
            }
        }
        v
    })
}

fn seed_service(h: &mut Harness) {
    let pod_b: Ipv4Addr = POD_B_IP.parse().expect("ip");
    let svc = ServiceNat {
        svc_id: 1,
        frontends: vec![
            (NatFrontendKey::new(SVC.0, SVC.1, Protocol::Tcp, None), 0),
            (NatFrontendKey::new(SVC.0, SVC.1, Protocol::Udp, None), 0),
        ],
        local: vec![NatBackendValue::new(pod_b, BE_PORT)],
        remote: vec![],
        affinity_timeout_s: 0,
    };
    write_service(&mut h.maps.nat_frontends, &mut h.maps.nat_backends, &svc, 0).expect("seed");
}

fn tcp_through_clusterip(t: &Topology) -> (String, SocketAddr) {
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            t.pod_b.run(|| {
                let l = TcpListener::bind((POD_B_IP, BE_PORT)).expect("bind");
                tx.send(()).expect("ready");
                let (mut c, peer) = l.accept().expect("accept");
                c.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut buf = [0u8; 5];
                c.read_exact(&mut buf).expect("read request");
                c.write_all(format!("{peer}").as_bytes()).expect("write");
            });
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("server ready");
        let out = t.pod_a.run(|| {
            let addr = SocketAddr::from(SVC);
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .expect("connect to the ClusterIP");
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            c.write_all(b"hello").expect("write");
            let mut seen = String::new();
            c.read_to_string(&mut seen).expect("read");
            (seen, c.peer_addr().expect("peer"))
        });
        server.join().expect("server");
        out
    })
}

#[test]
fn tcp_and_udp_to_a_clusterip_reach_the_backend_pod() {
    if !common::privileged("tcp_and_udp_to_a_clusterip_reach_the_backend_pod") {
        return;
    }
    let mut h = Harness::new();
    let t = Topology::new();
    seed_service(&mut h);
    let _links = attach_node_programs(&mut h, &t, TcMode::Auto);

    let (seen_by_server, peer) = tcp_through_clusterip(&t);
    assert!(
        seen_by_server.starts_with(&format!("{POD_A_IP}:")),
        "the backend sees the client pod's own address, got {seen_by_server}"
    );
    assert_eq!(
        peer,
        SocketAddr::from(SVC),
        "the client talks to the ClusterIP"
    );

    // The pair of conntrack entries saw both handshake legs.
    let client_port: u16 = seen_by_server
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let client = (POD_A_IP.parse().expect("ip"), client_port);
    let (rev_key, _) = CtKey::new(
        Protocol::Tcp,
        client,
        (POD_B_IP.parse().expect("ip"), BE_PORT),
    );
    let rev = h
        .maps
        .conntrack
        .get(&rev_key)
        .expect("get")
        .expect("reverse entry");
    let (c, s) = rev.tcp_client_server();
    assert_eq!(
        (c & TCP_SYN, s & (TCP_SYN | TCP_ACK)),
        (TCP_SYN, TCP_SYN | TCP_ACK)
    );

    // UDP: the answer comes from the ClusterIP.
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|sc| {
        let server = sc.spawn(|| {
            t.pod_b.run(|| {
                let u = UdpSocket::bind((POD_B_IP, BE_PORT)).expect("bind udp");
                u.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                tx.send(()).expect("ready");
                let mut buf = [0u8; 64];
                let (n, from) = u.recv_from(&mut buf).expect("recv");
                u.send_to(format!("{from}").as_bytes(), from).expect("send");
                n
            })
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("ready");
        let (answer, from) = t.pod_a.run(|| {
            let u = UdpSocket::bind((POD_A_IP, 0)).expect("bind");
            u.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            u.send_to(b"query", SocketAddr::from(SVC)).expect("send");
            let mut buf = [0u8; 64];
            let (n, from) = u.recv_from(&mut buf).expect("answer");
            (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
        });
        assert_eq!(server.join().expect("server"), 5);
        assert!(
            answer.starts_with(&format!("{POD_A_IP}:")),
            "backend saw {answer}"
        );
        assert_eq!(
            from,
            SocketAddr::from(SVC),
            "the answer comes from the ClusterIP"
        );
    });
}

#[test]
fn clsact_fallback_carries_traffic_too() {
    if !common::privileged("clsact_fallback_carries_traffic_too") {
        return;
    }
    let mut h = Harness::new();
    let t = Topology::new();
    seed_service(&mut h);
    let links = attach_node_programs(&mut h, &t, TcMode::Clsact);
    assert!(
        links
            .iter()
            .all(|l| l.kind() == margay_bpf::TcLinkKind::Clsact)
    );
    let shown = t
        .node
        .exec("tc", &["filter", "show", "dev", VETH_A, "ingress"]);
    assert!(
        shown.contains("mg_from_wl"),
        "clsact filter listed: {shown}"
    );
    let (seen_by_server, peer) = tcp_through_clusterip(&t);
    assert!(seen_by_server.starts_with(&format!("{POD_A_IP}:")));
    assert_eq!(peer, SocketAddr::from(SVC));
    // A clsact filter is removed over netlink in the current namespace: drop it in its own.
    t.node.run(move || drop(links));
    let shown = t
        .node
        .exec("tc", &["filter", "show", "dev", VETH_A, "ingress"]);
    assert!(
        !shown.contains("mg_from_wl"),
        "filter removed with its attachment: {shown}"
    );
}

#[test]
fn a_clusterip_without_endpoints_refuses_tcp_at_once() {
    if !common::privileged("a_clusterip_without_endpoints_refuses_tcp_at_once") {
        return;
    }
    let mut h = Harness::new();
    let t = Topology::new();
    let empty = (Ipv4Addr::new(10, 96, 0, 11), 80);
    let svc = ServiceNat {
        svc_id: 2,
        frontends: vec![(
            NatFrontendKey::new(empty.0, empty.1, Protocol::Tcp, None),
            0,
        )],
        ..ServiceNat::default()
    };
    write_service(&mut h.maps.nat_frontends, &mut h.maps.nat_backends, &svc, 0).expect("seed");
    let _links = attach_node_programs(&mut h, &t, TcMode::Auto);
    let started = std::time::Instant::now();
    let err = t
        .pod_a
        .run(|| TcpStream::connect_timeout(&SocketAddr::from(empty), Duration::from_secs(5)))
        .expect_err("no endpoints: the connection must fail");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "refused, got {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not timed out"
    );
}
