//! Service NAT through the production TC programs on crafted packets (BPF_PROG_TEST_RUN), with
//! the maps seeded through the API the agent uses. Flows are followed hop by hop, numbered by the
//! packet's life as in Cilium's bpf/tests (`_1_forward`, `_2_...`): each step names the hook the
//! packet crosses, the packet as it arrives, the verdict and the packet as it must leave, and
//! every checksum is recomputed from scratch by the test.
//!
//! Topology of one node: client pod (veth A), backend pods (veth B), host interface (eth0).
//!   client 10.65.0.2 --[A: from_wl]--> node --[B: to_wl]--> backend 10.65.1.3:8080
//!   client <--[A: to_wl]-- node <--[B: from_wl]-- backend

mod common;

use std::{collections::BTreeSet, net::Ipv4Addr};

use common::{
    Harness,
    packet::{ACK, FIN, Pkt, RST, SYN, parse},
};
use ipnet::Ipv4Net;
use margay_bpf::{
    TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TcProgram,
    maps::{
        CtKey, CtType, NatBackendValue, NatFrontendKey, Protocol, Reason,
        conntrack::{F_CLIENT_IS_B, F_EXTERNAL, TCP_ACK, TCP_SYN},
        nat::{FE_BLACKHOLE, FE_EXT_LOCAL, FE_SRC_RANGES, ServiceNat, write_service},
    },
};

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 0, 2), 40000);
const SVC: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const BE1: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 1, 3), 8080);
const BE2: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 2, 4), 8080);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const NODE_PORT: u16 = 30080;
const EXT: (Ipv4Addr, u16) = (Ipv4Addr::new(203, 0, 113, 9), 5555);

fn be(ep: (Ipv4Addr, u16)) -> NatBackendValue {
    NatBackendValue::new(ep.0, ep.1)
}

/// A service with one frontend per (key, flags); `local` backends first.
fn service(
    h: &mut Harness,
    svc_id: u32,
    frontends: Vec<(NatFrontendKey, u32)>,
    local: &[(Ipv4Addr, u16)],
    remote: &[(Ipv4Addr, u16)],
    affinity_timeout_s: u32,
) {
    let svc = ServiceNat {
        svc_id,
        frontends,
        local: local.iter().copied().map(be).collect(),
        remote: remote.iter().copied().map(be).collect(),
        affinity_timeout_s,
    };
    write_service(&mut h.maps.nat_frontends, &mut h.maps.nat_backends, &svc, 0)
        .expect("write service");
}

fn cluster_ip(h: &mut Harness, local: &[(Ipv4Addr, u16)], remote: &[(Ipv4Addr, u16)]) {
    let key = NatFrontendKey::new(SVC.0, SVC.1, Protocol::Tcp, None);
    let ukey = NatFrontendKey::new(SVC.0, SVC.1, Protocol::Udp, None);
    service(h, 1, vec![(key, 0), (ukey, 0)], local, remote, 0);
}

/// One hop: the packet as it arrives at `hook`, and what must come out.
struct Step {
    name: &'static str,
    hook: TcProgram,
    input: Pkt,
    verdict: u32,
    /// The packet as it must leave (`None`: unchanged).
    output: Option<Pkt>,
}

fn run(h: &Harness, steps: &[Step]) {
    for s in steps {
        let input = s.input.bytes();
        let r =
            h.dp.run_tc(s.hook, &input, 0)
                .unwrap_or_else(|e| panic!("{}: {e:?}", s.name));
        assert_eq!(r.verdict, s.verdict, "{}: verdict", s.name);
        if s.verdict == TC_ACT_SHOT {
            continue;
        }
        let expected = s.output.as_ref().map_or_else(|| input.clone(), Pkt::bytes);
        let got = parse(&r.packet);
        assert!(got.ip_csum_ok, "{}: IPv4 checksum wrong in {got:?}", s.name);
        assert!(got.l4_csum_ok, "{}: L4 checksum wrong in {got:?}", s.name);
        assert_eq!(r.packet, expected, "{}: output bytes (got {got:?})", s.name);
    }
}

fn ct(
    h: &Harness,
    proto: Protocol,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> Option<margay_bpf::maps::CtValue> {
    h.maps
        .conntrack
        .get(&CtKey::new(proto, src, dst).0)
        .expect("ct get")
}

/// `p` is a bare RST (+ACK when `ack` is not 0) from `src` to `dst`, MACs swapped, valid checksums.
fn assert_rst(p: &[u8], src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seq: u32, ack: u32) {
    let got = parse(p);
    assert_eq!(
        (got.src, got.dst),
        (src, dst),
        "RST addressed back to the client"
    );
    assert!(got.ip_csum_ok && got.l4_csum_ok, "RST checksums {got:?}");
    assert_eq!(p.len(), 14 + 20 + 20, "headers only");
    assert_eq!(
        &p[0..6],
        &[0x02, 0, 0, 0, 0, 0x01],
        "destination MAC = the client's"
    );
    let tcp = &p[34..];
    let flags = if ack == 0 { RST } else { RST | ACK };
    assert_eq!(tcp[13], flags, "flags");
    assert_eq!(
        u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        seq,
        "seq"
    );
    assert_eq!(
        u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        ack,
        "ack"
    );
}

fn counter(h: &Harness, r: Reason) -> u64 {
    h.maps.counters.get(r).expect("counter")
}

#[test]
fn clusterip_tcp_flow_hop_by_hop() {
    if !common::privileged("clusterip_tcp_flow_hop_by_hop") {
        return;
    }
    let mut h = Harness::new();
    cluster_ip(&mut h, &[BE1], &[]);
    let syn = Pkt::tcp(CLIENT, SVC, SYN);

    run(
        &h,
        &[
            Step {
                name: "_1_forward: client pod -> ClusterIP, leaving the client's veth: DNAT to the backend",
                hook: TcProgram::FromWorkload,
                input: syn.clone(),
                verdict: TC_ACT_OK,
                output: Some(syn.with_dst(BE1)),
            },
            Step {
                name: "_2_forward: entering the backend's veth: already translated, unchanged",
                hook: TcProgram::ToWorkload,
                input: syn.with_dst(BE1),
                verdict: TC_ACT_OK,
                output: None,
            },
        ],
    );

    // Conntrack: a forward entry keyed by (client, ClusterIP) pointing at a reverse entry keyed
    // by (client, backend); the forward one holds the backend, the reverse one the frontend.
    let (fwd_key, client_b_fwd) = CtKey::new(Protocol::Tcp, CLIENT, SVC);
    let (rev_key, client_b_rev) = CtKey::new(Protocol::Tcp, CLIENT, BE1);
    let fwd = h
        .maps
        .conntrack
        .get(&fwd_key)
        .expect("get")
        .expect("forward entry");
    let rev = h
        .maps
        .conntrack
        .get(&rev_key)
        .expect("get")
        .expect("reverse entry");
    assert_eq!(fwd.kind(), Some(CtType::NatForward));
    assert_eq!(rev.kind(), Some(CtType::NatReverse));
    assert_eq!((fwd.peer, rev.peer), (rev_key, fwd_key));
    assert_eq!((fwd.nat(), rev.nat()), (BE1, SVC));
    assert_eq!(fwd.svc_id, 1);
    assert_eq!(fwd.flags & F_CLIENT_IS_B != 0, client_b_fwd);
    assert_eq!(rev.flags & F_CLIENT_IS_B != 0, client_b_rev);
    assert_eq!(fwd.flags & F_EXTERNAL, 0);
    assert_eq!(
        fwd.tcp_client_server(),
        (TCP_SYN, 0),
        "forward entry saw the client's SYN"
    );
    assert_eq!(
        rev.tcp_client_server(),
        (TCP_SYN, 0),
        "reverse entry saw the SYN at hop 2"
    );
    assert_eq!(counter(&h, Reason::NewFlow), 1);

    let syn_ack = Pkt::tcp(BE1, CLIENT, SYN | ACK);
    run(
        &h,
        &[
            Step {
                name: "_3_reverse: backend -> client, leaving the backend's veth: SNAT to the ClusterIP",
                hook: TcProgram::FromWorkload,
                input: syn_ack.clone(),
                verdict: TC_ACT_OK,
                output: Some(syn_ack.with_src(SVC)),
            },
            Step {
                name: "_4_reverse: entering the client's veth: already translated, unchanged",
                hook: TcProgram::ToWorkload,
                input: syn_ack.with_src(SVC),
                verdict: TC_ACT_OK,
                output: None,
            },
        ],
    );
    let rev = ct(&h, Protocol::Tcp, CLIENT, BE1).expect("reverse entry");
    assert_eq!(rev.tcp_client_server(), (TCP_SYN, TCP_SYN | TCP_ACK));

    // _5: the rest of the flow uses conntrack alone. Remove the frontend to prove it: the
    // established flow keeps its backend with no NAT lookup.
    h.maps
        .nat_frontends
        .remove(&NatFrontendKey::new(SVC.0, SVC.1, Protocol::Tcp, None))
        .expect("remove frontend");
    let ack = Pkt::tcp(CLIENT, SVC, ACK);
    let fin = Pkt::tcp(CLIENT, SVC, FIN | ACK);
    run(
        &h,
        &[
            Step {
                name: "_5_established: client ACK -> same backend through conntrack only",
                hook: TcProgram::FromWorkload,
                input: ack.clone(),
                verdict: TC_ACT_OK,
                output: Some(ack.with_dst(BE1)),
            },
            Step {
                name: "_6_established: client FIN -> same backend",
                hook: TcProgram::FromWorkload,
                input: fin.clone(),
                verdict: TC_ACT_OK,
                output: Some(fin.with_dst(BE1)),
            },
        ],
    );
    let fwd = ct(&h, Protocol::Tcp, CLIENT, SVC).expect("forward entry");
    assert_eq!(
        fwd.tcp_client_server().0,
        TCP_SYN | TCP_ACK | margay_bpf::maps::conntrack::TCP_FIN
    );
    assert!(fwd.last_seen_ns >= fwd.created_ns);
    assert_eq!(
        counter(&h, Reason::NewFlow),
        1,
        "no new flow after the first packet"
    );
    assert_eq!(
        h.maps.conntrack.entries().expect("entries").len(),
        2,
        "one pair"
    );

    // Userspace cleanup removes the pair together.
    h.maps.conntrack.remove_pair(&fwd_key).expect("remove pair");
    assert!(h.maps.conntrack.entries().expect("entries").is_empty());
}

#[test]
fn udp_flow_with_and_without_checksum() {
    if !common::privileged("udp_flow_with_and_without_checksum") {
        return;
    }
    let mut h = Harness::new();
    cluster_ip(&mut h, &[BE1], &[]);
    let q = Pkt::udp(CLIENT, SVC);
    let a = Pkt::udp(BE1, CLIENT);
    let mut q0 = Pkt::udp((CLIENT.0, 40001), SVC);
    q0.no_udp_csum = true;
    let mut a0 = Pkt::udp(BE1, (CLIENT.0, 40001));
    a0.no_udp_csum = true;
    run(
        &h,
        &[
            Step {
                name: "_1_forward: UDP query DNAT",
                hook: TcProgram::FromWorkload,
                input: q.clone(),
                verdict: TC_ACT_OK,
                output: Some(q.with_dst(BE1)),
            },
            Step {
                name: "_2_reverse: UDP answer SNAT",
                hook: TcProgram::FromWorkload,
                input: a.clone(),
                verdict: TC_ACT_OK,
                output: Some(a.with_src(SVC)),
            },
            Step {
                name: "_3_forward: query without checksum keeps none",
                hook: TcProgram::FromWorkload,
                input: q0.clone(),
                verdict: TC_ACT_OK,
                output: Some(q0.with_dst(BE1)),
            },
            Step {
                name: "_4_reverse: answer without checksum keeps none",
                hook: TcProgram::FromWorkload,
                input: a0.clone(),
                verdict: TC_ACT_OK,
                output: Some(a0.with_src(SVC)),
            },
        ],
    );
    let out =
        h.dp.run_tc(TcProgram::FromWorkload, &q0.bytes(), 0)
            .expect("run");
    assert_eq!(
        parse(&out.packet).l4_csum,
        0,
        "a zero UDP checksum stays zero"
    );
    assert_eq!(counter(&h, Reason::NewFlow), 2);
}

/// Single-packet cases: description, hook, packet, expected verdict, expected output, and the
/// counter that must move.
#[test]
fn single_packet_cases() {
    if !common::privileged("single_packet_cases") {
        return;
    }
    struct Case {
        name: &'static str,
        hook: TcProgram,
        input: Pkt,
        verdict: u32,
        output: Option<Pkt>,
        counter: Option<Reason>,
        mark: u32,
    }
    let other = (Ipv4Addr::new(10, 65, 9, 9), 9999);
    let mut with_opts = Pkt::tcp((CLIENT.0, 40100), SVC, SYN);
    with_opts.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let cases = vec![
        Case {
            name: "no frontend: pod to pod passes unchanged",
            hook: TcProgram::FromWorkload,
            input: Pkt::tcp(CLIENT, other, SYN),
            verdict: TC_ACT_OK,
            output: None,
            counter: None,
            mark: 0,
        },
        Case {
            name: "frontend address, other port: passes unchanged",
            hook: TcProgram::FromWorkload,
            input: Pkt::tcp(CLIENT, (SVC.0, 81), SYN),
            verdict: TC_ACT_OK,
            output: None,
            counter: None,
            mark: 0,
        },
        Case {
            name: "to_wl never opens a flow",
            hook: TcProgram::ToWorkload,
            input: Pkt::tcp((CLIENT.0, 40200), SVC, SYN),
            verdict: TC_ACT_OK,
            output: None,
            counter: None,
            mark: 0,
        },
        Case {
            name: "TCP without SYN and without conntrack: left to the kernel, marked",
            hook: TcProgram::FromWorkload,
            input: Pkt::tcp((CLIENT.0, 40300), SVC, ACK),
            verdict: TC_ACT_OK,
            output: None,
            counter: Some(Reason::Fallthrough),
            mark: 0x0100_0000,
        },
        Case {
            name: "IPv4 options: DNAT at the right offsets",
            hook: TcProgram::FromWorkload,
            input: with_opts.clone(),
            verdict: TC_ACT_OK,
            output: Some(with_opts.with_dst(BE1)),
            counter: Some(Reason::NewFlow),
            // Translated: the agent's iptables rules accept it ahead of "drop INVALID".
            mark: 0x0200_0000,
        },
    ];
    let mut h = Harness::new();
    cluster_ip(&mut h, &[BE1], &[]);
    for c in cases {
        let before = c.counter.map(|r| counter(&h, r));
        let ct_before = h.maps.conntrack.entries().expect("ct").len();
        let input = c.input.bytes();
        let r = h.dp.run_tc(c.hook, &input, 0).expect("run");
        assert_eq!(r.verdict, c.verdict, "{}: verdict", c.name);
        let expected = c.output.as_ref().map_or_else(|| input.clone(), Pkt::bytes);
        assert_eq!(r.packet, expected, "{}: output", c.name);
        let p = parse(&r.packet);
        assert!(p.ip_csum_ok && p.l4_csum_ok, "{}: checksums {p:?}", c.name);
        assert_eq!(r.mark, c.mark, "{}: mark", c.name);
        if let (Some(reason), Some(before)) = (c.counter, before) {
            assert_eq!(
                counter(&h, reason),
                before + 1,
                "{}: counter {reason:?}",
                c.name
            );
        }
        if c.output.is_none() {
            assert_eq!(
                h.maps.conntrack.entries().expect("ct").len(),
                ct_before,
                "{}: no conntrack entry",
                c.name
            );
        }
    }
}

#[test]
fn drops_are_counted_by_reason() {
    if !common::privileged("drops_are_counted_by_reason") {
        return;
    }
    let mut h = Harness::new();
    // A service without endpoints.
    cluster_ip(&mut h, &[], &[]);
    let r =
        h.dp.run_tc(
            TcProgram::FromWorkload,
            &Pkt::tcp(CLIENT, SVC, SYN).bytes(),
            0,
        )
        .expect("run");
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "no endpoints: TCP is refused");
    assert_rst(&r.packet, SVC, CLIENT, 0, 1000 + 1 + 6);
    assert_eq!(counter(&h, Reason::NoBackend), 1);
    assert!(
        h.maps.conntrack.entries().expect("ct").is_empty(),
        "no conntrack for a refused flow"
    );
    // A SYN-ACK without conntrack is no new flow: it falls through rather than being refused.
    let r =
        h.dp.run_tc(
            TcProgram::FromWorkload,
            &Pkt::tcp(CLIENT, SVC, SYN | ACK).bytes(),
            0,
        )
        .expect("run");
    assert_eq!(
        r.verdict, TC_ACT_OK,
        "SYN-ACK without conntrack falls through"
    );
    // UDP: ICMP port unreachable (tests/icmp.rs checks its bytes).
    let r =
        h.dp.run_tc(TcProgram::FromWorkload, &Pkt::udp(CLIENT, SVC).bytes(), 0)
            .expect("run");
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "no endpoints: UDP refused");
    assert_eq!(counter(&h, Reason::NoBackend), 2);

    // A truncated TCP header.
    let before = counter(&h, Reason::Short);
    let mut short = Pkt::tcp(CLIENT, SVC, SYN).bytes();
    short.truncate(14 + 20 + 10);
    short[16..18].copy_from_slice(&30u16.to_be_bytes());
    let r =
        h.dp.run_tc(TcProgram::FromWorkload, &short, 0)
            .expect("run");
    assert_eq!(r.verdict, TC_ACT_SHOT, "truncated: dropped");
    assert_eq!(counter(&h, Reason::Short), before + 1);

    // A frontend whose backend ordinal is missing (a half-written service).
    let key = NatFrontendKey::new(SVC.0, 443, Protocol::Tcp, None);
    h.maps
        .nat_frontends
        .insert(
            &key,
            &margay_bpf::maps::NatFrontendValue {
                svc_id: 9,
                count: 1,
                local_count: 0,
                flags: 0,
                affinity_timeout_s: 0,
            },
        )
        .expect("insert");
    let r =
        h.dp.run_tc(
            TcProgram::FromWorkload,
            &Pkt::tcp(CLIENT, (SVC.0, 443), SYN).bytes(),
            0,
        )
        .expect("run");
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(counter(&h, Reason::BackendMissing), 1);
}

#[test]
fn new_flows_spread_over_backends_and_keep_them() {
    if !common::privileged("new_flows_spread_over_backends_and_keep_them") {
        return;
    }
    let mut h = Harness::new();
    cluster_ip(&mut h, &[BE1], &[BE2]);
    let mut seen = BTreeSet::new();
    for port in 41000..41100u16 {
        let syn = Pkt::tcp((CLIENT.0, port), SVC, SYN);
        let r =
            h.dp.run_tc(TcProgram::FromWorkload, &syn.bytes(), 0)
                .expect("run");
        let first = parse(&r.packet).dst;
        seen.insert(first);
        // The flow's next packet goes to the same backend.
        let ack = Pkt::tcp((CLIENT.0, port), SVC, ACK);
        let r =
            h.dp.run_tc(TcProgram::FromWorkload, &ack.bytes(), 0)
                .expect("run");
        assert_eq!(
            parse(&r.packet).dst,
            first,
            "flow from port {port} changed backend"
        );
    }
    assert_eq!(
        seen,
        BTreeSet::from([BE1, BE2]),
        "100 flows over 2 backends reach both"
    );
}

#[test]
fn nodeport_external_traffic_policy_local() {
    if !common::privileged("nodeport_external_traffic_policy_local") {
        return;
    }
    let mut h = Harness::new();
    let np = NatFrontendKey::new(NODE, NODE_PORT, Protocol::Tcp, None);
    // Cluster policy for pods, Local for external clients; BE1 is local (ordinal 0).
    service(&mut h, 3, vec![(np, FE_EXT_LOCAL)], &[BE1], &[BE2], 0);
    for port in 0..20u16 {
        let syn = Pkt::tcp((EXT.0, EXT.1 + port), (NODE, NODE_PORT), SYN);
        run(
            &h,
            &[Step {
                name: "_1_forward: external client -> NodePort on the host interface: local backend only",
                hook: TcProgram::FromHostIface,
                input: syn.clone(),
                verdict: TC_ACT_OK,
                output: Some(syn.with_dst(BE1)),
            }],
        );
    }
    let fwd = ct(&h, Protocol::Tcp, EXT, (NODE, NODE_PORT)).expect("forward entry");
    assert_ne!(fwd.flags & F_EXTERNAL, 0, "external flow flagged");
    // The reply leaves the backend with the client's real address as destination: SNAT back to
    // the node's address and NodePort.
    let reply = Pkt::tcp(BE1, EXT, SYN | ACK);
    run(
        &h,
        &[Step {
            name: "_2_reverse: backend -> external client: SNAT to node IP and NodePort",
            hook: TcProgram::FromWorkload,
            input: reply.clone(),
            verdict: TC_ACT_OK,
            output: Some(reply.with_src((NODE, NODE_PORT))),
        }],
    );

    // No local backend with policy Local: refused.
    service(&mut h, 3, vec![(np, FE_EXT_LOCAL)], &[], &[BE2], 0);
    let r =
        h.dp.run_tc(
            TcProgram::FromHostIface,
            &Pkt::tcp((EXT.0, 6000), (NODE, NODE_PORT), SYN).bytes(),
            0,
        )
        .expect("run");
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_rst(&r.packet, (NODE, NODE_PORT), (EXT.0, 6000), 0, 1007);
    assert_eq!(counter(&h, Reason::NoBackend), 1);
}

#[test]
fn load_balancer_source_ranges() {
    if !common::privileged("load_balancer_source_ranges") {
        return;
    }
    let mut h = Harness::new();
    let lb = (Ipv4Addr::new(198, 51, 100, 7), 443);
    let allowed: Ipv4Net = "203.0.113.0/24".parse().expect("net");
    service(
        &mut h,
        4,
        vec![
            // The catch-all entry of a frontend with source ranges is a blackhole.
            (
                NatFrontendKey::new(lb.0, lb.1, Protocol::Tcp, None),
                FE_BLACKHOLE | FE_SRC_RANGES,
            ),
            (
                NatFrontendKey::new(lb.0, lb.1, Protocol::Tcp, Some(allowed)),
                FE_SRC_RANGES,
            ),
        ],
        &[BE1],
        &[],
        0,
    );
    let ok = Pkt::tcp(EXT, lb, SYN);
    run(
        &h,
        &[Step {
            name: "client inside the range: DNAT",
            hook: TcProgram::FromHostIface,
            input: ok.clone(),
            verdict: TC_ACT_OK,
            output: Some(ok.with_dst(BE1)),
        }],
    );
    let r =
        h.dp.run_tc(
            TcProgram::FromHostIface,
            &Pkt::tcp((Ipv4Addr::new(192, 0, 2, 1), 1234), lb, SYN).bytes(),
            0,
        )
        .expect("run");
    assert_eq!(r.verdict, TC_ACT_SHOT, "client outside the range: dropped");
    assert_eq!(counter(&h, Reason::Blackhole), 1);
}

#[test]
fn session_affinity_client_ip() {
    if !common::privileged("session_affinity_client_ip") {
        return;
    }
    let mut h = Harness::new();
    let key = NatFrontendKey::new(SVC.0, SVC.1, Protocol::Tcp, None);
    let many: Vec<(Ipv4Addr, u16)> = (1..=8)
        .map(|i| (Ipv4Addr::new(10, 65, 3, i), 8080))
        .collect();
    service(&mut h, 5, vec![(key, 0)], &many, &[], 10_800);
    let first = parse(
        &h.dp
            .run_tc(
                TcProgram::FromWorkload,
                &Pkt::tcp(CLIENT, SVC, SYN).bytes(),
                0,
            )
            .expect("run")
            .packet,
    )
    .dst;
    for port in 42000..42030u16 {
        let r =
            h.dp.run_tc(
                TcProgram::FromWorkload,
                &Pkt::tcp((CLIENT.0, port), SVC, SYN).bytes(),
                0,
            )
            .expect("run");
        assert_eq!(
            parse(&r.packet).dst,
            first,
            "new flow from the same client, same backend"
        );
    }
    let aff = h.maps.affinity.entries().expect("affinity");
    assert_eq!(aff.len(), 1);
    assert_eq!((aff[0].1.be.addr(), aff[0].1.be.port()), first);
}
