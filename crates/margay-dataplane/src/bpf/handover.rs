//! Iptables -> BPF without moving a UDP flow to another backend: the UDP flows kube-proxy's rules
//! NATed (the kernel's conntrack holds their DNAT) are written into `mg_ct` as NAT pairs with the
//! same backend before the programs get any frontend, so the flow's next datagram hits the BPF
//! conntrack instead of a frontend and its random backend choice.
//!
//! TCP needs none of this: a TCP packet that is not a SYN and has no BPF entry falls through
//! (`MG_MARK_FALLTHROUGH`) to the kernel's conntrack, which keeps NATing it. A UDP datagram has no
//! such sign of being mid-flow, so without a seeded entry it opens a new BPF flow.
//!
//! Why read the kernel's table once here rather than have the programs ask it
//! (`bpf_skb_ct_lookup`) on every miss: that kfunc needs the loader to resolve kernel function
//! calls (aya 0.14 / aya-obj 0.3 have no kfunc relocation) and would cost every new flow a
//! lookup for the whole life of the dataplane, to serve flows that exist only at the switch.
//! The table is read from `/proc/net/nf_conntrack` (the kernel's own listing, per network
//! namespace), which needs no netlink client; entries are few at a switch.
//!
//! Only flows the kernel destination-NATed and did **not** source-NAT are taken: a flow
//! kube-proxy masqueraded (an external client through a NodePort) reached its backend from this
//! node's address, which a BPF pair cannot reproduce; it keeps the kernel's translation until it
//! ends (or BPF picks for it). Only flows whose frontend and backend the model has: the pair
//! gets the service's id, as if the programs had opened it.

use std::net::Ipv4Addr;

use margay_bpf::maps::conntrack::{CtKey, CtType, CtValue, F_CLIENT_IS_B};
use margay_bpf::maps::{Protocol, be_addr, be_port};
use margay_calc::bpf_nat::{NatModel, Proto};

use crate::bpf::BpfError;

/// A UDP or TCP flow the kernel's conntrack translated to a backend: `client -> frontend` as the
/// client sent it, `backend` where the kernel sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelNatFlow {
    pub proto: u8,
    pub client: (Ipv4Addr, u16),
    pub frontend: (Ipv4Addr, u16),
    pub backend: (Ipv4Addr, u16),
}

/// The destination-NATed, not source-NATed IPv4 flows of `/proc/net/nf_conntrack`'s text
/// (`ipv4 2 udp 17 29 src=.. dst=.. sport=.. dport=.. [UNREPLIED] src=.. dst=.. sport=..
/// dport=.. mark=0 use=2`): the first address/port set is the original direction, the second
/// the reply. Lines of other protocols or families, and malformed ones, are skipped.
pub fn parse_nf_conntrack(text: &str) -> Vec<KernelNatFlow> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<KernelNatFlow> {
    let mut words = line.split_whitespace();
    if words.next()? != "ipv4" {
        return None;
    }
    let proto: u8 = words.nth(2)?.parse().ok()?;
    let (mut addrs, mut ports) = (Vec::with_capacity(4), Vec::with_capacity(4));
    for w in words {
        if let Some(v) = w.strip_prefix("src=").or_else(|| w.strip_prefix("dst=")) {
            addrs.push(v.parse::<Ipv4Addr>().ok()?);
        } else if let Some(v) = w
            .strip_prefix("sport=")
            .or_else(|| w.strip_prefix("dport="))
        {
            ports.push(v.parse::<u16>().ok()?);
        }
    }
    // src dst (sport dport) twice: original, then reply.
    let [o_src, o_dst, r_src, r_dst] = <[Ipv4Addr; 4]>::try_from(addrs.get(..4)?).ok()?;
    let [o_sport, o_dport, r_sport, r_dport] = <[u16; 4]>::try_from(ports.get(..4)?).ok()?;
    let dnat = (r_src, r_sport) != (o_dst, o_dport);
    let snat = (r_dst, r_dport) != (o_src, o_sport);
    (dnat && !snat).then_some(KernelNatFlow {
        proto,
        client: (o_src, o_sport),
        frontend: (o_dst, o_dport),
        backend: (r_src, r_sport),
    })
}

/// The service id under which `model` serves `backend` behind `frontend` (any source range).
pub fn service_of(model: &NatModel, flow: &KernelNatFlow) -> Option<u32> {
    let proto = Proto::from_number(flow.proto)?;
    model
        .frontends
        .iter()
        .filter(|(k, _)| k.addr == flow.frontend.0 && k.port == flow.frontend.1 && k.proto == proto)
        .map(|(_, v)| v.svc_id)
        .find(|id| {
            model.backends.iter().any(|(k, b)| {
                k.svc_id == *id && (b.addr, b.port) == (flow.backend.0, flow.backend.1)
            })
        })
}

/// The NAT pair the programs would have created for `flow` (`mg_ct_create_nat`, without port
/// SNAT): (reverse key, reverse entry), (forward key, forward entry).
pub fn nat_pair(flow: &KernelNatFlow, svc_id: u32, now_ns: u64) -> [(CtKey, CtValue); 2] {
    let proto = if flow.proto == 6 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let (fwd_key, client_b_fwd) = CtKey::new(proto, flow.client, flow.frontend);
    let (rev_key, client_b_rev) = CtKey::new(proto, flow.client, flow.backend);
    let entry = |kind: CtType, client_b: bool, peer: CtKey, nat: (Ipv4Addr, u16)| CtValue {
        created_ns: now_ns,
        last_seen_ns: now_ns,
        kind: kind as u8,
        flags: if client_b { F_CLIENT_IS_B } else { 0 },
        svc_id,
        peer,
        nat_addr: be_addr(nat.0),
        nat_port: be_port(nat.1),
        ..CtValue::default()
    };
    [
        (
            rev_key,
            entry(CtType::NatReverse, client_b_rev, fwd_key, flow.frontend),
        ),
        (
            fwd_key,
            entry(CtType::NatForward, client_b_fwd, rev_key, flow.backend),
        ),
    ]
}

/// What [`crate::bpf::BpfNatDriver::seed_udp_flows`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedReport {
    /// Destination-NATed UDP flows in the kernel's table.
    pub kernel_flows: usize,
    /// Pairs written.
    pub seeded: usize,
    /// Flows the programs already track (an earlier pass, or a flow they opened).
    pub present: usize,
    /// Flows whose frontend or backend the model does not have.
    pub unknown: usize,
}

/// Reads this network namespace's kernel conntrack table; empty when the namespace has none
/// (nf_conntrack never used in it: then no iptables rule NATed anything here either).
pub fn read_kernel_conntrack() -> Result<String, BpfError> {
    match std::fs::read_to_string("/proc/net/nf_conntrack") {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(BpfError::Io {
            what: "read /proc/net/nf_conntrack",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dnat_only_flows() {
        let text = "\
ipv4     2 udp      17 28 src=192.168.0.5 dst=10.96.0.10 sport=40000 dport=53 src=192.168.1.7 dst=192.168.0.5 sport=5353 dport=40000 mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=192.168.0.5 dst=192.168.1.7 sport=41000 dport=5353 [UNREPLIED] src=192.168.1.7 dst=192.168.0.5 sport=5353 dport=41000 mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=203.0.113.10 dst=10.224.0.4 sport=42000 dport=30053 src=192.168.1.7 dst=10.224.0.4 sport=5353 dport=42000 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=192.168.0.5 dst=10.96.0.1 sport=50000 dport=443 src=10.224.0.4 dst=192.168.0.5 sport=6443 dport=50000 [ASSURED] mark=0 zone=0 use=2
ipv6     10 udp      17 28 src=fd00::1 dst=fd00::2 sport=1 dport=2 src=fd00::3 dst=fd00::1 sport=2 dport=1 mark=0 zone=0 use=2
garbage
";
        let flows = parse_nf_conntrack(text);
        assert_eq!(
            flows,
            vec![
                KernelNatFlow {
                    proto: 17,
                    client: ("192.168.0.5".parse().unwrap(), 40000),
                    frontend: ("10.96.0.10".parse().unwrap(), 53),
                    backend: ("192.168.1.7".parse().unwrap(), 5353),
                },
                KernelNatFlow {
                    proto: 6,
                    client: ("192.168.0.5".parse().unwrap(), 50000),
                    frontend: ("10.96.0.1".parse().unwrap(), 443),
                    backend: ("10.224.0.4".parse().unwrap(), 6443),
                },
            ],
            "untranslated and masqueraded flows are left out"
        );
    }

    #[test]
    fn the_pair_points_each_entry_at_the_other() {
        let flow = KernelNatFlow {
            proto: 17,
            client: ("192.168.0.5".parse().unwrap(), 40000),
            frontend: ("10.96.0.10".parse().unwrap(), 53),
            backend: ("192.168.1.7".parse().unwrap(), 5353),
        };
        let [(rev_key, rev), (fwd_key, fwd)] = nat_pair(&flow, 7, 1000);
        assert_eq!(
            (fwd.kind(), rev.kind()),
            (Some(CtType::NatForward), Some(CtType::NatReverse))
        );
        assert_eq!((fwd.peer, rev.peer), (rev_key, fwd_key));
        assert_eq!(fwd.nat(), flow.backend);
        assert_eq!(rev.nat(), flow.frontend);
        assert_eq!((fwd.svc_id, rev.svc_id), (7, 7));
    }
}
