//! Per-packet cost of the TC program's paths, measured by the kernel through BPF_PROG_TEST_RUN.
//!
//! `sudo cargo run -p margay-bpf --release --example bench [-- N]`
//!
//! BPF_PROG_TEST_RUN with `repeat` reuses one skb: a program that rewrites the packet sees its own
//! output from the second pass on. So paths that rewrite (new flow, established DNAT) are timed
//! with `repeat = 1` calls, each on a fresh copy of the packet, and paths that leave the packet
//! unchanged are timed both ways; the difference between the two ways on the same path is the
//! fixed overhead of a `repeat = 1` measurement, reported so it can be subtracted.
//!
//! Mounts a private bpffs on a temporary directory and unmounts it at the end (also on panic).

use std::{net::Ipv4Addr, time::Duration};

use margay_bpf::{
    Config, Dataplane, LogLevel, TC_ACT_OK, TcProgram,
    maps::{
        MapSizes, NatBackendValue, NatFrontendKey, Protocol, nat::ServiceNat, nat::write_service,
    },
};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 2);
const SVC: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const OTHER: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 9, 9), 9999);

struct Bpffs(tempfile::TempDir);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = umount2(self.0.path(), MntFlags::MNT_DETACH);
    }
}

/// Ethernet + IPv4 + TCP with valid checksums.
fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
    let total: u16 = 20 + 20 + 6;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src.0.octets());
    p.extend_from_slice(&dst.0.octets());
    let c = csum(&p[14..34], 0);
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&src.1.to_be_bytes());
    p.extend_from_slice(&dst.1.to_be_bytes());
    p.extend_from_slice(&[
        0, 0, 3, 232, 0, 0, 7, 208, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    p.extend_from_slice(b"margay");
    let (s, d) = (src.0.octets(), dst.0.octets());
    let pseudo: u32 = [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
        6,
        26,
    ]
    .iter()
    .map(|w| u32::from(*w))
    .sum();
    let c = csum(&p[34..], pseudo);
    p[50..52].copy_from_slice(&c.to_be_bytes());
    p
}

fn csum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

struct Stats {
    mean: f64,
    median: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let ns: Vec<f64> = v.iter().map(|d| d.as_nanos() as f64).collect();
    Stats {
        mean: ns.iter().sum::<f64>() / ns.len() as f64,
        median: ns[ns.len() / 2],
    }
}

fn once(dp: &Dataplane, prog: TcProgram, pkt: &[u8]) -> Duration {
    let r = dp.run_tc(prog, pkt, 0).expect("test run");
    assert_eq!(r.verdict, TC_ACT_OK);
    r.duration
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u16 = std::env::args().nth(1).map_or(Ok(20_000), |a| a.parse())?;
    if !nix::unistd::geteuid().is_root() {
        return Err("the benchmark loads BPF programs: run it as root".into());
    }
    let fs = Bpffs(tempfile::Builder::new().prefix("margay-bench-").tempdir()?);
    mount(
        Some("bpf"),
        fs.0.path(),
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )?;
    let mut sizes = MapSizes::small();
    sizes.conntrack = 4 * u32::from(n) + 1024;
    let cfg = Config {
        pin_dir: fs.0.path().join("m"),
        sizes,
        log_level: LogLevel::Off,
        ctlb_udp: false,
    };
    let dp = Dataplane::load(&cfg)?;
    let mut maps = dp.maps()?;
    let svc = ServiceNat {
        svc_id: 1,
        frontends: vec![(NatFrontendKey::new(SVC.0, SVC.1, Protocol::Tcp, None), 0)],
        local: vec![NatBackendValue::new(Ipv4Addr::new(10, 65, 1, 3), 8080)],
        remote: vec![NatBackendValue::new(Ipv4Addr::new(10, 65, 2, 4), 8080)],
        affinity_timeout_s: 0,
    };
    write_service(&mut maps.nat_frontends, &mut maps.nat_backends, &svc, 0)?;
    // Frontends for other services, so that the LPM trie is not trivially small.
    for i in 0..512u32 {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i);
        let key = NatFrontendKey::new(addr, 443, Protocol::Tcp, None);
        maps.nat_frontends.insert(&key, &svc.value(0))?;
    }

    let first_port = 10_000u16;
    // New flow: a SYN from a new source port each time (conntrack miss, frontend hit, backend
    // pick, two conntrack inserts, DNAT).
    let new_flow: Vec<Duration> = (0..n)
        .map(|i| {
            once(
                &dp,
                TcProgram::FromWorkload,
                &tcp((CLIENT, first_port + i), SVC, 0x02),
            )
        })
        .collect();
    // Established, forward: an ACK of one of those flows (one conntrack lookup, DNAT).
    let est: Vec<Duration> = (0..n)
        .map(|i| {
            once(
                &dp,
                TcProgram::FromWorkload,
                &tcp((CLIENT, first_port + i), SVC, 0x10),
            )
        })
        .collect();
    // The same, on one flow whose entry stays in the CPU caches.
    let hot_ack = tcp((CLIENT, first_port), SVC, 0x10);
    let est_hot: Vec<Duration> = (0..n)
        .map(|_| once(&dp, TcProgram::FromWorkload, &hot_ack))
        .collect();
    // Established, no rewrite: the already translated packet at the backend's veth.
    let fwd_done = dp
        .run_tc(
            TcProgram::FromWorkload,
            &tcp((CLIENT, first_port), SVC, 0x10),
            0,
        )?
        .packet;
    let est_pass: Vec<Duration> = (0..n)
        .map(|_| once(&dp, TcProgram::ToWorkload, &fwd_done))
        .collect();
    let est_pass_rep = dp
        .run_tc_repeat(TcProgram::ToWorkload, &fwd_done, 0, u32::from(n))?
        .duration;
    // No match: pod to pod (conntrack miss, frontend miss).
    let miss = tcp((CLIENT, 5555), OTHER, 0x02);
    let no_match: Vec<Duration> = (0..n)
        .map(|_| once(&dp, TcProgram::FromWorkload, &miss))
        .collect();
    let no_match_rep = dp
        .run_tc_repeat(TcProgram::FromWorkload, &miss, 0, u32::from(n))?
        .duration;

    let (nf, es, eh, ep, nm) = (
        stats(new_flow),
        stats(est),
        stats(est_hot),
        stats(est_pass),
        stats(no_match),
    );
    let overhead = nm.mean - no_match_rep.as_nanos() as f64;
    println!(
        "margay TC program, ns per packet (BPF_PROG_TEST_RUN, kernel-measured, {n} packets per path)"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>14}",
        "path", "median", "mean", "repeat=N mean"
    );
    println!(
        "{:<44} {:>10.0} {:>10.0} {:>14}",
        "new flow (CT miss, LPM hit, 2 CT inserts)", nf.median, nf.mean, "-"
    );
    println!(
        "{:<44} {:>10.0} {:>10.0} {:>14}",
        "established, DNAT, n flows (1 CT lookup)", es.median, es.mean, "-"
    );
    println!(
        "{:<44} {:>10.0} {:>10.0} {:>14}",
        "established, DNAT, one hot flow", eh.median, eh.mean, "-"
    );
    println!(
        "{:<44} {:>10.0} {:>10.0} {:>14}",
        "established, no rewrite (1 CT lookup)",
        ep.median,
        ep.mean,
        est_pass_rep.as_nanos()
    );
    println!(
        "{:<44} {:>10.0} {:>10.0} {:>14}",
        "no match (CT miss, LPM miss)",
        nm.median,
        nm.mean,
        no_match_rep.as_nanos()
    );
    println!(
        "repeat=1 measurement overhead (no match, repeat=1 mean - repeat=N mean): {overhead:.0} ns"
    );
    println!(
        "new flow / established n flows (means): {:.2}",
        nf.mean / es.mean
    );
    println!(
        "new flow / established n flows (means less the overhead): {:.2}",
        (nf.mean - overhead) / (es.mean - overhead).max(1.0)
    );
    Ok(())
}
