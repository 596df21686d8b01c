//! The driver's pure parts: conversions, expiry rules, backend liveness. The map operations are
//! tested against the kernel in `tests/bpf.rs`.

use std::net::Ipv4Addr;
use std::time::Duration;

use margay_bpf::maps::conntrack::{F_CLIENT_IS_B, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use margay_bpf::maps::{CtKey, CtType, CtValue, NatFrontendKey, Protocol};
use margay_calc::bpf_nat::{Backend, BackendKey, FrontendKey, FrontendValue, NatModel, Proto};

use super::conntrack::{LiveBackends, Timeouts, expired, frontend_and_backend, live_flows};
use super::*;

const SEC: u64 = 1_000_000_000;

#[test]
fn frontend_keys_round_trip() {
    let plain = FrontendKey::new(Ipv4Addr::new(10, 96, 0, 10), 80, Proto::Tcp);
    let ranged = FrontendKey {
        source: Some("198.51.100.0/24".parse().unwrap()),
        ..plain
    };
    let host = FrontendKey {
        source: Some("203.0.113.1/32".parse().unwrap()),
        proto: Proto::Udp,
        ..plain
    };
    for k in [plain, ranged, host] {
        assert_eq!(model_frontend_key(&frontend_key(&k)), Some(k), "{k}");
    }
}

#[test]
fn keys_margay_never_writes_are_foreign() {
    let good = NatFrontendKey::new(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp, None);
    let sctp = NatFrontendKey { proto: 132, ..good };
    let pad = NatFrontendKey { pad: 1, ..good };
    let stray_source = NatFrontendKey {
        src_addr: 7,
        ..good
    };
    let untruncated = NatFrontendKey {
        prefixlen: good.prefixlen + 8,
        src_addr: u32::from_ne_bytes([10, 1, 2, 3]),
        ..good
    };
    let too_long = NatFrontendKey {
        prefixlen: 200,
        ..good
    };
    for k in [sctp, pad, stray_source, untruncated, too_long] {
        assert_eq!(model_frontend_key(&k), None, "{k:?}");
    }
}

#[test]
fn map_sizes_follow_felix_configuration() {
    let spec: FelixConfigurationSpec =
        serde_json_value(r#"{"bpfMapSizeConntrack": 1000, "bpfMapSizeNATBackend": 2000}"#);
    let sizes = map_sizes(&FelixConfigurationSpec::effective(&[&spec]));
    assert_eq!(sizes.conntrack, 1000);
    assert_eq!(sizes.nat_backend, 2000);
    assert_eq!(sizes.nat_frontend, MapSizes::default().nat_frontend);
}

fn serde_json_value(text: &str) -> FelixConfigurationSpec {
    serde_json::from_str(text).unwrap()
}

#[test]
fn timeouts_follow_felix_configuration() {
    let effective = FelixConfigurationSpec::effective(&[]);
    assert_eq!(Timeouts::from_felix(&effective), Timeouts::default());
    let spec: FelixConfigurationSpec = serde_json_value(
        r#"{"bpfConntrackTimeouts": {"udpTimeout": "5s", "tcpFinsSeen": "Auto", "tcpEstablished": "2h"}}"#,
    );
    let t = Timeouts::from_felix(&FelixConfigurationSpec::effective(&[&spec]));
    assert_eq!(t.udp, Duration::from_secs(5));
    assert_eq!(t.tcp_fins_seen, Duration::from_secs(30));
    assert_eq!(t.tcp_established, Duration::from_secs(7200));
    assert_eq!(t.creation_grace, Duration::from_secs(10));
}

/// An entry whose client is the key's `a` side, with client and server leg flags.
fn entry(created_s: u64, last_s: u64, client: u8, server: u8) -> CtValue {
    CtValue {
        created_ns: created_s * SEC,
        last_seen_ns: last_s * SEC,
        kind: CtType::NatForward as u8,
        tcp_a: client,
        tcp_b: server,
        ..CtValue::default()
    }
}

#[test]
fn expiry_follows_calicos_rules() {
    let t = Timeouts::default();
    let now = 10_000 * SEC;
    let est = TCP_SYN | TCP_ACK;
    // (description, entries, proto, expired reason)
    let cases: Vec<(&str, Vec<CtValue>, u8, Option<&str>)> = vec![
        (
            "young entries are never expired",
            vec![entry(9_995, 5, 0, 0)],
            17,
            None,
        ),
        (
            "udp idle 61 s",
            vec![entry(1, 10_000 - 61, 0, 0)],
            17,
            Some("udp"),
        ),
        ("udp idle 59 s", vec![entry(1, 10_000 - 59, 0, 0)], 17, None),
        (
            "syn sent, no answer for 21 s",
            vec![entry(1, 10_000 - 21, TCP_SYN, 0)],
            6,
            Some("tcp_syn_sent"),
        ),
        (
            "established, idle 30 min",
            vec![entry(1, 10_000 - 1800, est, est)],
            6,
            None,
        ),
        (
            "established, idle 61 min",
            vec![entry(1, 10_000 - 3660, est, est)],
            6,
            Some("tcp_established"),
        ),
        (
            "established over two entries of a pair",
            vec![
                entry(1, 10_000 - 1800, est, 0),
                entry(1, 10_000 - 30, 0, est),
            ],
            6,
            None,
        ),
        (
            "the newer last_seen of the pair counts",
            vec![entry(1, 1, TCP_SYN, 0), entry(1, 10_000 - 5, 0, 0)],
            6,
            None,
        ),
        (
            "fins from both sides, idle 31 s",
            vec![entry(1, 10_000 - 31, est | TCP_FIN, est | TCP_FIN)],
            6,
            Some("tcp_fins"),
        ),
        (
            "fin from one side only: still established",
            vec![entry(1, 10_000 - 31, est | TCP_FIN, est)],
            6,
            None,
        ),
        (
            "rst, idle 39 s: kept even though not established",
            vec![entry(1, 10_000 - 39, TCP_SYN, TCP_RST)],
            6,
            None,
        ),
        (
            "rst, idle 41 s",
            vec![entry(1, 10_000 - 41, est, est | TCP_RST)],
            6,
            Some("tcp_reset"),
        ),
        (
            "icmp idle 6 s",
            vec![entry(1, 10_000 - 6, 0, 0)],
            1,
            Some("icmp"),
        ),
        (
            "other protocol idle 9 min",
            vec![entry(1, 10_000 - 540, 0, 0)],
            47,
            None,
        ),
        (
            "a timestamp in the future is not idle",
            vec![entry(1, 20_000, 0, 0)],
            17,
            None,
        ),
    ];
    for (what, entries, proto, want) in cases {
        let refs: Vec<&CtValue> = entries.iter().collect();
        assert_eq!(expired(&refs, proto, now, &t), want, "{what}");
    }
}

#[test]
fn client_legs_follow_the_client_is_b_flag() {
    // Client is b: tcp_b is the client leg.
    let v = CtValue {
        flags: F_CLIENT_IS_B,
        tcp_a: TCP_SYN | TCP_ACK,
        tcp_b: TCP_SYN,
        created_ns: SEC,
        last_seen_ns: SEC,
        ..CtValue::default()
    };
    // Server answered, client never ACKed: not established.
    assert_eq!(
        expired(&[&v], 6, 100 * SEC, &Timeouts::default()),
        Some("tcp_syn_sent")
    );
}

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 0, 2), 40000);
const FRONT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const BACK: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 1, 3), 8080);

/// The pair the programs create for CLIENT -> FRONT DNATed to BACK.
fn pair(proto: Protocol) -> ((CtKey, CtValue), (CtKey, CtValue)) {
    let (fk, fb) = CtKey::new(proto, CLIENT, FRONT);
    let (rk, rb) = CtKey::new(proto, CLIENT, BACK);
    let fwd = CtValue {
        kind: CtType::NatForward as u8,
        flags: if fb { F_CLIENT_IS_B } else { 0 },
        peer: rk,
        nat_addr: margay_bpf::maps::be_addr(BACK.0),
        nat_port: margay_bpf::maps::be_port(BACK.1),
        ..CtValue::default()
    };
    let rev = CtValue {
        kind: CtType::NatReverse as u8,
        flags: if rb { F_CLIENT_IS_B } else { 0 },
        peer: fk,
        nat_addr: margay_bpf::maps::be_addr(FRONT.0),
        nat_port: margay_bpf::maps::be_port(FRONT.1),
        ..CtValue::default()
    };
    ((fk, fwd), (rk, rev))
}

#[test]
fn frontend_and_backend_of_a_pair() {
    let ((fk, fwd), (rk, rev)) = pair(Protocol::Tcp);
    let want = Some((FRONT, BACK));
    assert_eq!(
        frontend_and_backend(Some((&fk, &fwd)), Some((&rk, &rev))),
        want
    );
    assert_eq!(frontend_and_backend(None, Some((&rk, &rev))), want);
    assert_eq!(frontend_and_backend(Some((&fk, &fwd)), None), want);
}

#[test]
fn live_backends_are_per_frontend() {
    let mut m = NatModel::default();
    let key = FrontendKey::new(FRONT.0, FRONT.1, Proto::Tcp);
    m.frontends.insert(
        key,
        FrontendValue {
            svc_id: 7,
            count: 1,
            ..FrontendValue::default()
        },
    );
    m.backends.insert(
        BackendKey {
            svc_id: 7,
            ordinal: 0,
        },
        Backend::new(BACK.0, BACK.1),
    );
    let live = LiveBackends::new(&m);
    assert!(live.serves(FRONT, 6, BACK));
    assert!(!live.serves(FRONT, 17, BACK), "other protocol");
    assert!(!live.serves(FRONT, 6, (BACK.0, 9999)), "other port");
    assert!(!live.serves((FRONT.0, 81), 6, BACK), "other frontend");
    assert!(live.has_frontend(FRONT, 6));
}

#[test]
fn live_flows_counts_each_open_flow_once() {
    let t = Timeouts::default();
    let now = 10_000 * SEC;
    let est = TCP_SYN | TCP_ACK;
    let with = |(k, v): (CtKey, CtValue), tcp: (u8, u8), last_s: u64| {
        let mut v = v;
        // Client is the key's a or b side: write the legs where tcp_client_server reads them.
        if v.flags & F_CLIENT_IS_B != 0 {
            (v.tcp_b, v.tcp_a) = tcp;
        } else {
            (v.tcp_a, v.tcp_b) = tcp;
        }
        v.created_ns = SEC;
        v.last_seen_ns = last_s * SEC;
        (k, v)
    };
    let (fwd, rev) = pair(Protocol::Tcp);
    // An established pair: one flow, not two.
    let open = vec![
        with(fwd, (est, est), now / SEC),
        with(rev, (est, est), now / SEC),
    ];
    assert_eq!(live_flows(&open, now, &t), 1);
    // FINs both ways, or a RST: ended at once (no need to wait for tcpFinsSeen).
    let fins = vec![with(fwd, (est | TCP_FIN, est | TCP_FIN), now / SEC - 1)];
    assert_eq!(live_flows(&fins, now, &t), 0);
    let half = vec![with(fwd, (est | TCP_FIN, est), now / SEC - 1)];
    assert_eq!(live_flows(&half, now, &t), 1, "only the client closed");
    let reset = vec![with(fwd, (est, est | TCP_RST), now / SEC - 1)];
    assert_eq!(live_flows(&reset, now, &t), 0);
    // Idle past its timeout: expired, not live.
    let (ufwd, urev) = pair(Protocol::Udp);
    let idle = vec![with(ufwd, (0, 0), now / SEC - 61)];
    assert_eq!(live_flows(&idle, now, &t), 0);
    // A lone reverse entry still translates replies.
    let lone = vec![with(urev, (0, 0), now / SEC - 1)];
    assert_eq!(live_flows(&lone, now, &t), 1);
}
