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
        nat::ServiceNat,
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
    h.write_service(&svc);
}

/// The port of the `addr:port` a server wrote back as the peer it saw.
fn port_in(seen: &str) -> u16 {
    seen.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {seen:?}"))
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
    let client_port = port_in(&seen_by_server);
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
    h.write_service(&svc);
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

/// A connected UDP socket in the client pod sends to `to` and waits for an answer; returns the
/// error kind its second `recv` reports (an ICMP error arrives asynchronously: the first may time
/// out, later ones report it). `None` when no error came within the timeout.
fn udp_error_seen_by_client(t: &Topology, to: (Ipv4Addr, u16)) -> Option<std::io::ErrorKind> {
    t.pod_a.run(|| {
        let u = UdpSocket::bind((POD_A_IP, 0)).expect("bind");
        u.connect(SocketAddr::from(to)).expect("connect");
        u.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        u.send(b"query").expect("send");
        let mut buf = [0u8; 64];
        match u.recv(&mut buf) {
            Ok(n) => panic!("unexpected answer of {n} bytes"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => None,
            Err(e) => Some(e.kind()),
        }
    })
}

#[test]
fn udp_errors_reach_the_client_about_the_clusterip() {
    if !common::privileged("udp_errors_reach_the_client_about_the_clusterip") {
        return;
    }
    let mut h = Harness::new();
    let t = Topology::new();
    // The backend pod has no socket on BE_PORT: its kernel answers ICMP port unreachable about
    // (client -> pod), which from_wl must turn into one about (client -> ClusterIP), or the
    // client's socket (connected to the ClusterIP) never hears of it.
    seed_service(&mut h);
    let empty = (Ipv4Addr::new(10, 96, 0, 12), 53);
    let svc = ServiceNat {
        svc_id: 3,
        frontends: vec![(
            NatFrontendKey::new(empty.0, empty.1, Protocol::Udp, None),
            0,
        )],
        ..ServiceNat::default()
    };
    h.write_service(&svc);
    let _links = attach_node_programs(&mut h, &t, TcMode::Auto);

    assert_eq!(
        udp_error_seen_by_client(&t, SVC),
        Some(std::io::ErrorKind::ConnectionRefused),
        "the pod's port unreachable, translated to the ClusterIP, refuses the client's socket"
    );
    assert_eq!(
        udp_error_seen_by_client(&t, empty),
        Some(std::io::ErrorKind::ConnectionRefused),
        "no endpoints: ICMP port unreachable from the ClusterIP"
    );
}

// === Tunnel mode: an external client, the backend pod on another node ===

mod tunnel {
    use super::*;
    use common::{Netns, node_port_service, wire_pod};
    use margay_bpf::maps::{
        CtType, ExternalServiceMode, NodeConfig, Reason, conntrack::F_FROM_TUNNEL,
    };

    const CLIENT_IP: &str = "192.168.50.100";
    const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
    const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
    const LB: (Ipv4Addr, u16) = (Ipv4Addr::new(198, 51, 100, 7), 80);
    const NODE_PORT: u16 = 30080;
    const POD_IP: &str = "10.65.1.3";

    /// A LAN (a bridge in a namespace of its own) with an external client and two nodes; node
    /// B hosts the backend pod, node A none. Each node has its own dataplane (maps), with its
    /// host programs on `eth0`; B has its workload programs on the pod's veth.
    struct Cluster {
        _lan: Netns,
        client: Netns,
        a: (Netns, Harness),
        b: (Netns, Harness),
        pod: Netns,
        _links: Vec<margay_bpf::TcAttachment>,
    }

    fn plug(lan: &Netns, ns: &Netns, port: &str, cidr: &str) {
        lan.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        lan.ip(&["link", "set", port, "master", "br0", "up"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["addr", "add", cidr, "dev", "eth0"]);
    }

    impl Cluster {
        fn new(mode: ExternalServiceMode) -> Self {
            let (lan, client, a_ns, b_ns, pod) = (
                Netns::new(),
                Netns::new(),
                Netns::new(),
                Netns::new(),
                Netns::new(),
            );
            lan.ip(&["link", "add", "br0", "type", "bridge"]);
            lan.ip(&["link", "set", "br0", "up"]);
            plug(&lan, &client, "cl", &format!("{CLIENT_IP}/24"));
            plug(&lan, &a_ns, "na", &format!("{NODE_A}/24"));
            plug(&lan, &b_ns, "nb", &format!("{NODE_B}/24"));
            client.ip(&[
                "route",
                "add",
                &format!("{}/32", LB.0),
                "via",
                &NODE_A.to_string(),
            ]);
            for n in [&a_ns, &b_ns] {
                for s in [
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ] {
                    n.exec("sysctl", &["-qw", s]);
                }
            }
            wire_pod(&b_ns, &pod, VETH_B, POD_IP);

            let pod_ip: Ipv4Addr = POD_IP.parse().expect("ip");
            let mut a = Harness::new();
            let mut b = Harness::new();
            a.maps
                .node_config
                .set(&NodeConfig::new(NODE_A, mode))
                .expect("cfg");
            b.maps
                .node_config
                .set(&NodeConfig::new(NODE_B, mode))
                .expect("cfg");
            let backend = NatBackendValue::new(pod_ip, BE_PORT);
            a.write_service(&node_port_service(
                1, NODE_A, NODE_PORT, LB, backend, NODE_B,
            ));
            b.write_service(&node_port_service(
                1, NODE_B, NODE_PORT, LB, backend, NODE_B,
            ));

            let mut links = a_ns.run(|| {
                [TcProgram::FromHostIface, TcProgram::ToHostIface]
                    .into_iter()
                    .map(|p| a.dp.attach_tc(p, "eth0", TcMode::Auto).expect("attach A"))
                    .collect::<Vec<_>>()
            });
            links.extend(b_ns.run(|| {
                let mut v = Vec::new();
                for p in [TcProgram::FromHostIface, TcProgram::ToHostIface] {
                    v.push(b.dp.attach_tc(p, "eth0", TcMode::Auto).expect("attach B"));
                }
                for p in [TcProgram::FromWorkload, TcProgram::ToWorkload] {
                    v.push(b.dp.attach_tc(p, VETH_B, TcMode::Auto).expect("attach B"));
                }
                v
            }));
            Self {
                _lan: lan,
                client,
                a: (a_ns, a),
                b: (b_ns, b),
                pod,
                _links: links,
            }
        }

        /// TCP from the client to `frontend`; returns (what the pod saw as its peer, the
        /// client's peer address).
        fn tcp(&self, frontend: (Ipv4Addr, u16)) -> (String, SocketAddr) {
            let (tx, rx) = mpsc::channel();
            std::thread::scope(|s| {
                let server = s.spawn(|| {
                    self.pod.run(|| {
                        let l = TcpListener::bind((POD_IP, BE_PORT)).expect("bind");
                        tx.send(()).expect("ready");
                        let (mut c, peer) = l.accept().expect("accept");
                        c.set_read_timeout(Some(Duration::from_secs(5)))
                            .expect("timeout");
                        let mut buf = [0u8; 5];
                        c.read_exact(&mut buf).expect("read request");
                        // Several segments each way, so established packets cross too.
                        for _ in 0..3 {
                            c.write_all(format!("{peer}\n").as_bytes()).expect("write");
                        }
                    });
                });
                rx.recv_timeout(Duration::from_secs(5))
                    .expect("server ready");
                let out = self.client.run(|| {
                    let mut c = TcpStream::connect_timeout(
                        &SocketAddr::from(frontend),
                        Duration::from_secs(5),
                    )
                    .expect("connect to the frontend");
                    c.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    c.write_all(b"hello").expect("write");
                    let mut seen = String::new();
                    c.read_to_string(&mut seen).expect("read");
                    (seen, c.peer_addr().expect("peer"))
                });
                server.join().expect("server");
                let first = out.0.lines().next().unwrap_or_default().to_owned();
                assert_eq!(out.0, format!("{first}\n").repeat(3), "whole answer");
                (first, out.1)
            })
        }
    }

    /// Bulk TCP both ways through the tunnel (full-size segments, TSO/GSO on the veths):
    /// `n` bytes up, `n` bytes down, checked byte for byte.
    fn bulk(c: &Cluster, frontend: (Ipv4Addr, u16), n: usize) {
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            let server = s.spawn(|| {
                c.pod.run(|| {
                    let l = TcpListener::bind((POD_IP, BE_PORT)).expect("bind");
                    tx.send(()).expect("ready");
                    let (mut sock, _) = l.accept().expect("accept");
                    sock.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    sock.set_write_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    let mut got = vec![0u8; n];
                    sock.read_exact(&mut got).expect("upload");
                    sock.write_all(&got).expect("download");
                });
            });
            rx.recv_timeout(Duration::from_secs(5)).expect("ready");
            let back = c.client.run(|| {
                let mut sock =
                    TcpStream::connect_timeout(&SocketAddr::from(frontend), Duration::from_secs(5))
                        .expect("connect");
                sock.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                sock.set_write_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                sock.write_all(&data).expect("upload");
                let mut back = vec![0u8; n];
                sock.read_exact(&mut back).expect("download");
                back
            });
            server.join().expect("server");
            assert!(back == data, "{n} bytes came back intact");
        });
    }

    fn client_keeps_its_address(mode: ExternalServiceMode) {
        let c = Cluster::new(mode);
        for frontend in [(NODE_A, NODE_PORT), LB] {
            let (seen_by_pod, peer) = c.tcp(frontend);
            assert!(
                seen_by_pod.starts_with(&format!("{CLIENT_IP}:")),
                "{mode:?} {frontend:?}: the pod sees the client's own address, got {seen_by_pod}"
            );
            assert_eq!(
                peer,
                SocketAddr::from(frontend),
                "{mode:?}: the client talks to the frontend it dialled"
            );
            let port = port_in(&seen_by_pod);
            let client = (CLIENT_IP.parse().expect("ip"), port);
            let t =
                c.a.1
                    .maps
                    .conntrack
                    .get(&CtKey::new(Protocol::Tcp, client, frontend).0)
                    .expect("get")
                    .expect("A: tunnel entry");
            assert_eq!(t.kind(), Some(CtType::Tunnel));
            assert_eq!(t.tunnel_node(), Some(NODE_B));
            let (cl, srv) = t.tcp_client_server();
            assert_eq!(
                cl & (TCP_SYN | TCP_ACK),
                TCP_SYN | TCP_ACK,
                "client leg at A"
            );
            if mode == ExternalServiceMode::Tunnel {
                assert_eq!(
                    srv & (TCP_SYN | TCP_ACK),
                    TCP_SYN | TCP_ACK,
                    "replies via A"
                );
            } else {
                assert_eq!(srv, 0, "DSR: no reply crosses A");
            }
            let pod = (POD_IP.parse().expect("ip"), BE_PORT);
            let rev =
                c.b.1
                    .maps
                    .conntrack
                    .get(&CtKey::new(Protocol::Tcp, client, pod).0)
                    .expect("get")
                    .expect("B: reverse entry");
            assert_ne!(rev.flags & F_FROM_TUNNEL, 0);
            assert_eq!(rev.tunnel_node(), Some(NODE_A));
        }
        // Full-size segments both ways, in GSO packets (the veths' TSO): the kernel segments
        // them to fit the tunnel, nothing is dropped. Except one thing, which is path MTU
        // discovery and not a fault: TCP now and then sends a full-size segment alone, not as
        // GSO (the last segment the window allows, before the next burst: seen in a capture of
        // a failing run, seq 91225:92673 between two 26 KB GSO packets); with the tunnel's 50
        // bytes it exceeds the underlay MTU, so the node answers it with ICMP "fragmentation
        // needed" (mtu 1450) and counts it as too_big; the sender lowers its path MTU and from
        // then on fits. Whether such a segment is sent depends on timing (1 run in 4 on a
        // loaded machine, at A for the client's upload or at B for the pod's download). So
        // too_big alone is allowed here, and only as that: at most two per node (one, or a
        // second sent before the first ICMP arrived), each one an ICMP the sender received.
        // Every other drop reason stays 0.
        let (client_told, pod_told) = (icmp_unreachables(&c.client), icmp_unreachables(&c.pod));
        bulk(&c, (NODE_A, NODE_PORT), 512 * 1024);
        let told = [
            ("client", icmp_unreachables(&c.client) - client_told),
            ("pod", icmp_unreachables(&c.pod) - pod_told),
        ];
        for ((node, h), (sender, told)) in [&c.a, &c.b].into_iter().zip(told) {
            for (r, n) in h.maps.counters.all().expect("counters") {
                if r == Reason::TooBig {
                    if n > 0 {
                        eprintln!("{}: {n} too_big, the {sender} told", node.name());
                    }
                    assert!(
                        n <= 2,
                        "{}: {n} too_big, more than path MTU discovery",
                        node.name()
                    );
                    assert_eq!(
                        n,
                        told,
                        "{}: each too_big is an ICMP fragmentation needed the {sender} received",
                        node.name()
                    );
                } else {
                    assert!(!r.is_drop() || n == 0, "{}: {n} drops {r:?}", node.name());
                }
            }
        }
        // One full-size segment per packet (no GSO at the client nor the pod): the first ones
        // do not fit the tunnel and are answered with ICMP "fragmentation needed"; the client
        // and the pod lower their path MTU and the transfer completes. From a clean start: the
        // GSO transfer above may have left a too_big in the counters, and a path MTU of 1450 in
        // the pod's route to the client (the same client address for every frontend), with which
        // the pod would advertise an MSS that fits the tunnel and nothing would be too big. A
        // route cache flush forgets the learned path MTUs.
        let too_big = |h: &Harness| h.maps.counters.get(Reason::TooBig).expect("counter");
        let (a_before, b_before) = (too_big(&c.a.1), too_big(&c.b.1));
        for (ns, peer) in [
            (&c.client, NODE_A.to_string()),
            (&c.pod, CLIENT_IP.to_owned()),
        ] {
            ns.ip(&["route", "flush", "cache"]);
            let route = ns.ip(&["route", "get", &peer]);
            assert!(!route.contains(" mtu "), "path MTU forgotten: {route}");
            ns.ip(&["link", "set", "eth0", "gso_max_segs", "1"]);
        }
        bulk(&c, LB, 256 * 1024);
        assert!(too_big(&c.a.1) > a_before, "the client was told at A");
        if mode == ExternalServiceMode::Tunnel {
            assert!(too_big(&c.b.1) > b_before, "the pod was told at B");
        }
    }

    /// The ICMP "destination unreachable" messages (fragmentation needed among them) the
    /// kernel of `ns` has received: `InDestUnreachs` of its `/proc/net/snmp`.
    fn icmp_unreachables(ns: &Netns) -> u64 {
        let snmp = ns.exec("cat", &["/proc/net/snmp"]);
        let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp: "));
        let (names, values) = (
            icmp.next().expect("Icmp names"),
            icmp.next().expect("Icmp values"),
        );
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "InDestUnreachs")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no InDestUnreachs in {snmp}"))
    }

    #[test]
    fn external_client_keeps_its_address_through_the_tunnel() {
        if !common::privileged("external_client_keeps_its_address_through_the_tunnel") {
            return;
        }
        client_keeps_its_address(ExternalServiceMode::Tunnel);
    }

    #[test]
    fn external_client_keeps_its_address_with_dsr() {
        if !common::privileged("external_client_keeps_its_address_with_dsr") {
            return;
        }
        client_keeps_its_address(ExternalServiceMode::Dsr);
    }
}

/// bpfLogLevel Debug: with the log on, real traffic through a ClusterIP leaves one event per
/// packet decision in `mg_log` (the DNAT of the client's packets, the SNAT of the replies, each
/// with its program and interface); with it off, none.
#[test]
fn debug_log_has_one_line_per_packet_decision() {
    if !common::privileged("debug_log_has_one_line_per_packet_decision") {
        return;
    }
    let mut h = Harness::new();
    let t = Topology::new();
    seed_service(&mut h);
    let _links = attach_node_programs(&mut h, &t, TcMode::Auto);
    let mut log = margay_bpf::maps::DecisionLog::open(h.dp.pin_dir()).expect("open mg_log");

    h.dp.set_debug_log(true).expect("debug on");
    let (seen, _) = tcp_through_clusterip(&t);
    let events = log.drain();
    let lines: Vec<String> = events.iter().map(ToString::to_string).collect();
    let pod_b: Ipv4Addr = POD_B_IP.parse().expect("ip");
    let veth_a = t.node.ifindex(VETH_A);
    let client_port: u16 = seen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let syn = format!(
        "mg_from_wl if={veth_a} tcp {POD_A_IP}:{client_port} -> {}:{}: dnat to {pod_b}:{BE_PORT}, pass",
        SVC.0, SVC.1
    );
    assert!(
        lines.contains(&syn),
        "the client's DNATed packets are logged: {syn:?} not in {lines:#?}"
    );
    let reply = format!(
        "mg_from_wl if={} tcp {pod_b}:{BE_PORT} -> {POD_A_IP}:{client_port}: snat to {}:{}, pass",
        t.node.ifindex(VETH_B),
        SVC.0,
        SVC.1
    );
    assert!(
        lines.contains(&reply),
        "the backend's SNATed replies are logged: {reply:?} not in {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("mg_to_wl ")),
        "the to_wl decisions too: {lines:#?}"
    );
    // Every packet of the exchange crossed 2 programs on this node: as many events as decisions.
    assert!(events.len() >= 8, "{} events", events.len());

    h.dp.set_debug_log(false).expect("debug off");
    let _ = tcp_through_clusterip(&t);
    assert_eq!(log.drain(), Vec::new(), "log off: no event");
}
