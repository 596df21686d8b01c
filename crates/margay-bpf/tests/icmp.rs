//! ICMP through the production TC programs (BPF_PROG_TEST_RUN): errors about NATed flows are
//! translated back so that their receiver gets them about the packet it sent (outer and quoted
//! headers, every checksum recomputed from scratch by the test and compared byte for byte), and
//! a UDP datagram to a frontend without endpoints is answered with ICMP port unreachable.
//!
//! One node: client pod 10.65.0.2 (veth A), backend 10.65.1.3:8080 behind ClusterIP
//! 10.96.0.10:80, a router 10.65.7.1 on the way.

mod common;

use std::net::Ipv4Addr;

use common::{
    Harness,
    packet::{ACK, Pkt, SYN, icmp_answer, icmp_error, parse},
};
use margay_bpf::{
    TC_ACT_OK, TC_ACT_REDIRECT, TcProgram,
    maps::{
        NatBackendValue, NatFrontendKey, Protocol, Reason, nat::ServiceNat, nat::write_service,
    },
};

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 0, 2), 40000);
const SVC: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const BE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 1, 3), 8080);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 65, 7, 1);
const OTHER: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 9, 9), 9999);

const PORT_UNREACHABLE: (u8, u8) = (3, 3);
const FRAG_NEEDED: (u8, u8) = (3, 4);
const TIME_EXCEEDED: (u8, u8) = (11, 0);
const ECHO_REQUEST: (u8, u8) = (8, 0);

/// What a router quotes (RFC 792: the IPv4 header and 8 bytes) and what Linux quotes (all of a
/// small packet).
const QUOTE_MIN: usize = 28;
const QUOTE_ALL: usize = 576;

fn service(h: &mut Harness, endpoints: &[(Ipv4Addr, u16)]) {
    let svc = ServiceNat {
        svc_id: 1,
        frontends: vec![
            (NatFrontendKey::new(SVC.0, SVC.1, Protocol::Tcp, None), 0),
            (NatFrontendKey::new(SVC.0, SVC.1, Protocol::Udp, None), 0),
        ],
        local: endpoints
            .iter()
            .map(|e| NatBackendValue::new(e.0, e.1))
            .collect(),
        remote: vec![],
        affinity_timeout_s: 0,
    };
    write_service(&mut h.maps.nat_frontends, &mut h.maps.nat_backends, &svc, 0).expect("seed");
}

/// The IPv4 + ICMP checksums of an ICMP frame, from scratch.
fn icmp_checksums_ok(p: &[u8]) -> bool {
    common::packet::csum(&p[14..34], 0) == 0 && common::packet::csum(&p[34..], 0) == 0
}

#[test]
fn icmp_errors_about_nated_flows_are_translated_back() {
    if !common::privileged("icmp_errors_about_nated_flows_are_translated_back") {
        return;
    }
    let mut h = Harness::new();
    service(&mut h, &[BE]);
    // Open a UDP and a TCP flow from the client pod (forward + reverse entries each).
    let udp = Pkt::udp(CLIENT, SVC);
    let mut udp0 = Pkt::udp((CLIENT.0, 40001), SVC);
    udp0.no_udp_csum = true;
    let tcp = Pkt::tcp(CLIENT, SVC, SYN);
    for p in [&udp, &udp0, &tcp] {
        let r =
            h.dp.run_tc(TcProgram::FromWorkload, &p.bytes(), 0)
                .expect("run");
        assert_eq!(r.verdict, TC_ACT_OK);
        assert_eq!(parse(&r.packet).dst, BE, "flow opened");
    }

    struct Case {
        name: &'static str,
        hook: TcProgram,
        input: Vec<u8>,
        /// `None`: passes unchanged.
        output: Option<Vec<u8>>,
    }
    let cases = vec![
        Case {
            name: "port unreachable from the backend about a DNATed datagram: from the ClusterIP",
            hook: TcProgram::FromWorkload,
            input: icmp_error(
                BE.0,
                CLIENT.0,
                PORT_UNREACHABLE,
                0,
                &udp.with_dst(BE).bytes(),
                QUOTE_ALL,
            ),
            output: Some(icmp_error(
                SVC.0,
                CLIENT.0,
                PORT_UNREACHABLE,
                0,
                &udp.bytes(),
                QUOTE_ALL,
            )),
        },
        Case {
            name: "the same, quoted datagram without UDP checksum",
            hook: TcProgram::FromWorkload,
            input: icmp_error(
                BE.0,
                CLIENT.0,
                PORT_UNREACHABLE,
                0,
                &udp0.with_dst(BE).bytes(),
                QUOTE_ALL,
            ),
            output: Some(icmp_error(
                SVC.0,
                CLIENT.0,
                PORT_UNREACHABLE,
                0,
                &udp0.bytes(),
                QUOTE_ALL,
            )),
        },
        Case {
            name: "fragmentation needed from a router about a DNATed segment: router stays",
            hook: TcProgram::FromWorkload,
            input: icmp_error(
                ROUTER,
                CLIENT.0,
                FRAG_NEEDED,
                1400,
                &Pkt::tcp(CLIENT, BE, ACK).bytes(),
                QUOTE_MIN,
            ),
            output: Some(icmp_error(
                ROUTER,
                CLIENT.0,
                FRAG_NEEDED,
                1400,
                &Pkt::tcp(CLIENT, SVC, ACK).bytes(),
                QUOTE_MIN,
            )),
        },
        Case {
            name: "fragmentation needed from the client's side about an SNATed reply: to the backend",
            hook: TcProgram::FromWorkload,
            input: icmp_error(
                CLIENT.0,
                SVC.0,
                FRAG_NEEDED,
                1280,
                &Pkt::tcp(SVC, CLIENT, ACK).bytes(),
                QUOTE_MIN,
            ),
            output: Some(icmp_error(
                CLIENT.0,
                BE.0,
                FRAG_NEEDED,
                1280,
                &Pkt::tcp(BE, CLIENT, ACK).bytes(),
                QUOTE_MIN,
            )),
        },
        Case {
            name: "time exceeded from a router about an SNATed datagram (host interface)",
            hook: TcProgram::FromHostIface,
            input: icmp_error(
                ROUTER,
                SVC.0,
                TIME_EXCEEDED,
                0,
                &udp.reply(0).bytes(),
                QUOTE_ALL,
            ),
            output: Some(icmp_error(
                ROUTER,
                BE.0,
                TIME_EXCEEDED,
                0,
                &udp.reply(0).with_src(BE).bytes(),
                QUOTE_ALL,
            )),
        },
        Case {
            name: "already translated (the client's veth, to_wl): unchanged",
            hook: TcProgram::ToWorkload,
            input: icmp_error(
                SVC.0,
                CLIENT.0,
                PORT_UNREACHABLE,
                0,
                &udp.bytes(),
                QUOTE_ALL,
            ),
            output: None,
        },
        Case {
            name: "already translated (the backend's veth, to_wl): unchanged",
            hook: TcProgram::ToWorkload,
            input: icmp_error(
                CLIENT.0,
                BE.0,
                FRAG_NEEDED,
                1280,
                &Pkt::tcp(BE, CLIENT, ACK).bytes(),
                QUOTE_MIN,
            ),
            output: None,
        },
        Case {
            name: "about a flow we do not know: unchanged",
            hook: TcProgram::FromWorkload,
            input: icmp_error(
                OTHER.0,
                CLIENT.0,
                PORT_UNREACHABLE,
                0,
                &Pkt::udp(CLIENT, OTHER).bytes(),
                QUOTE_ALL,
            ),
            output: None,
        },
        Case {
            name: "not an error (echo request quoting a flow's tuple): unchanged",
            hook: TcProgram::FromWorkload,
            input: icmp_error(
                BE.0,
                CLIENT.0,
                ECHO_REQUEST,
                0,
                &udp.with_dst(BE).bytes(),
                QUOTE_ALL,
            ),
            output: None,
        },
        Case {
            name: "quoting less than 8 bytes: unchanged",
            hook: TcProgram::FromWorkload,
            input: icmp_error(
                BE.0,
                CLIENT.0,
                PORT_UNREACHABLE,
                0,
                &udp.with_dst(BE).bytes(),
                24,
            ),
            output: None,
        },
    ];
    for c in cases {
        assert!(icmp_checksums_ok(&c.input), "{}: test input", c.name);
        let r = h.dp.run_tc(c.hook, &c.input, 0).expect("run");
        assert_eq!(r.verdict, TC_ACT_OK, "{}: verdict", c.name);
        let expected = c.output.unwrap_or_else(|| c.input.clone());
        assert!(icmp_checksums_ok(&r.packet), "{}: checksums", c.name);
        assert_eq!(r.packet, expected, "{}: output bytes", c.name);
    }
    assert_eq!(
        h.maps.counters.get(Reason::NatWrite).expect("counter"),
        0,
        "no rewrite failed"
    );
}

#[test]
fn udp_to_a_frontend_without_endpoints_gets_port_unreachable() {
    if !common::privileged("udp_to_a_frontend_without_endpoints_gets_port_unreachable") {
        return;
    }
    let mut h = Harness::new();
    service(&mut h, &[]);
    let mut with_opts = Pkt::udp(CLIENT, SVC);
    with_opts.ip_options = vec![1, 1, 1, 0];
    struct Case {
        name: &'static str,
        input: Pkt,
        verdict: u32,
    }
    let cases = [
        Case {
            name: "UDP: ICMP port unreachable from the ClusterIP, MACs swapped",
            input: Pkt::udp(CLIENT, SVC),
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "UDP without checksum: the same",
            input: Pkt {
                no_udp_csum: true,
                ..Pkt::udp((CLIENT.0, 40002), SVC)
            },
            verdict: TC_ACT_REDIRECT,
        },
        Case {
            name: "IPv4 options: not answered, dropped",
            input: with_opts,
            verdict: 2,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let input = c.input.bytes();
        let r =
            h.dp.run_tc(TcProgram::FromWorkload, &input, 0)
                .expect("run");
        assert_eq!(r.verdict, c.verdict, "{}: verdict", c.name);
        assert_eq!(
            h.maps.counters.get(Reason::NoBackend).expect("counter"),
            i as u64 + 1,
            "{}: counted no_backend",
            c.name
        );
        if c.verdict == TC_ACT_REDIRECT {
            let eth = ([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02]);
            let expected = icmp_answer(eth, SVC.0, CLIENT.0, 3, 0, &input);
            assert_eq!(r.packet, expected, "{}: answer bytes", c.name);
        }
    }
    assert!(
        h.maps.conntrack.entries().expect("ct").is_empty(),
        "no conntrack for a refused datagram"
    );
}
