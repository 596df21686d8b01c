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
//! Tunnel mode's paths (an external client, the backend on another node) run on two dataplanes,
//! "node A" (ingress) and "node B" (the backend's), each from a network namespace of its own
//! (`ip netns add`, deleted at the end) where the programs' FIB lookups find a route and a
//! neighbour; nothing in the machine's own namespace is read or changed.
//!
//! Mounts a private bpffs on a temporary directory and unmounts it at the end (also on panic).

use std::{fs::File, net::Ipv4Addr, process::Command, time::Duration};

use margay_bpf::{
    Config, Dataplane, LogLevel, TC_ACT_OK, TC_ACT_REDIRECT, TcProgram, TcRunContext,
    maps::{
        ExternalServiceMode, MapSizes, NatBackendValue, NatFrontendKey, NodeConfig, Protocol,
        nat::ServiceNat, nat::write_service,
    },
};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 65, 0, 2);
const SVC: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const OTHER: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 65, 9, 9), 9999);

struct Bpffs(tempfile::TempDir);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = umount2(self.0.path(), MntFlags::MNT_DETACH);
    }
}

/// A network namespace of the benchmark's own; deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(ns: &str, args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let st = Command::new("ip").arg("-n").arg(ns).args(args).status()?;
    if !st.success() {
        return Err(format!("ip -n {ns} {args:?} failed").into());
    }
    Ok(())
}

/// A node's namespace: `eth0` (a veth) with `addr`/24, a permanent neighbour for `peer` and for
/// the router .254 (the default route), forwarding on.
fn node_ns(
    name: &str,
    addr: Ipv4Addr,
    peer: Ipv4Addr,
) -> Result<(Netns, u32), Box<dyn std::error::Error>> {
    let st = Command::new("ip").args(["netns", "add", name]).status()?;
    if !st.success() {
        return Err(format!("ip netns add {name} failed").into());
    }
    let ns = Netns(name.to_owned());
    ip(
        name,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "wire0",
        ],
    )?;
    for dev in ["lo", "eth0", "wire0"] {
        ip(name, &["link", "set", dev, "up"])?;
    }
    ip(name, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    for (n, mac) in [
        (peer.to_string(), "02:00:00:00:00:0b"),
        ("192.168.50.254".to_owned(), "02:00:00:00:00:fe"),
    ] {
        ip(
            name,
            &[
                "neigh",
                "add",
                &n,
                "lladdr",
                mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
    }
    ip(name, &["route", "add", "default", "via", "192.168.50.254"])?;
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .status()?;
    if !st.success() {
        return Err("sysctl failed".into());
    }
    let out = Command::new("ip")
        .args(["-n", name, "-o", "link", "show", "eth0"])
        .output()?;
    let ifindex = String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .ok_or("no ifindex")?;
    Ok((ns, ifindex))
}

/// Runs `f` on a thread that entered namespace `ns`.
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{}", ns.0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = File::open(&path).expect("open netns");
            setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns")
    })
}

/// Runs `prog` once on each packet from `ifindex`, expecting `verdict`; the durations and the
/// packets as the program left them.
fn each(
    dp: &Dataplane,
    prog: TcProgram,
    ifindex: u32,
    pkts: &[Vec<u8>],
    verdict: u32,
) -> (Vec<Duration>, Vec<Vec<u8>>) {
    let ctx = TcRunContext {
        ifindex,
        ..TcRunContext::default()
    };
    pkts.iter()
        .map(|p| {
            let r = dp.run_tc_with(prog, p, &ctx).expect("test run");
            assert_eq!(r.verdict, verdict, "{prog:?}");
            (r.duration, r.packet)
        })
        .unzip()
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
    tunnel(&fs, n)?;
    Ok(())
}

/// Tunnel mode, hop by hop over `n` flows: client -> NodePort on node A, backend pod on node B.
fn tunnel(fs: &Bpffs, n: u16) -> Result<(), Box<dyn std::error::Error>> {
    let node_a = Ipv4Addr::new(192, 168, 50, 1);
    let node_b = Ipv4Addr::new(192, 168, 50, 2);
    let client = Ipv4Addr::new(203, 0, 113, 9);
    let pod = (Ipv4Addr::new(10, 65, 1, 3), 8080);
    let np = (node_a, 30080);
    let pid = std::process::id();
    let (ns_a, if_a) = node_ns(&format!("mgbench{pid}a"), node_a, node_b)?;
    let (ns_b, if_b) = node_ns(&format!("mgbench{pid}b"), node_b, node_a)?;
    let mut sizes = MapSizes::small();
    sizes.conntrack = 4 * u32::from(n) + 1024;
    let load = |dir: &str, node: Ipv4Addr| -> Result<Dataplane, Box<dyn std::error::Error>> {
        let dp = Dataplane::load(&Config {
            pin_dir: fs.0.path().join(dir),
            sizes,
            log_level: LogLevel::Off,
            ctlb_udp: false,
        })?;
        dp.maps()?
            .node_config
            .set(&NodeConfig::new(node, ExternalServiceMode::Tunnel))?;
        Ok(dp)
    };
    let (a, b) = (load("a", node_a)?, load("b", node_b)?);
    let svc =
        |local: Vec<NatBackendValue>, remote: Vec<NatBackendValue>, node: Ipv4Addr| ServiceNat {
            svc_id: 1,
            frontends: vec![
                (NatFrontendKey::new(node, 30080, Protocol::Tcp, None), 0),
                (NatFrontendKey::node_port_any(30080, Protocol::Tcp), 0),
            ],
            local,
            remote,
            affinity_timeout_s: 0,
        };
    let be = NatBackendValue::new(pod.0, pod.1);
    let mut ma = a.maps()?;
    write_service(
        &mut ma.nat_frontends,
        &mut ma.nat_backends,
        &svc(vec![], vec![be.on_node(node_b)], node_a),
        0,
    )?;
    let mut mb = b.maps()?;
    write_service(
        &mut mb.nat_frontends,
        &mut mb.nat_backends,
        &svc(vec![be], vec![], node_b),
        0,
    )?;

    let with_eth = |mut p: Vec<u8>| {
        p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x0a]);
        p
    };
    let syns: Vec<Vec<u8>> = (0..n)
        .map(|i| with_eth(tcp((client, 10_000 + i), np, 0x02)))
        .collect();
    let acks: Vec<Vec<u8>> = (0..n)
        .map(|i| with_eth(tcp((client, 10_000 + i), np, 0x10)))
        .collect();
    let replies: Vec<Vec<u8>> = (0..n)
        .map(|i| tcp(pod, (client, 10_000 + i), 0x10))
        .collect();

    let (a_new, syn_tun) = in_ns(&ns_a, || {
        each(&a, TcProgram::FromHostIface, if_a, &syns, TC_ACT_REDIRECT)
    });
    let (b_new, _) = in_ns(&ns_b, || {
        each(&b, TcProgram::FromHostIface, if_b, &syn_tun, TC_ACT_OK)
    });
    let (a_est, ack_tun) = in_ns(&ns_a, || {
        each(&a, TcProgram::FromHostIface, if_a, &acks, TC_ACT_REDIRECT)
    });
    let (b_est, _) = in_ns(&ns_b, || {
        each(&b, TcProgram::FromHostIface, if_b, &ack_tun, TC_ACT_OK)
    });
    let (b_rep, rep_tun) = in_ns(&ns_b, || {
        each(&b, TcProgram::FromWorkload, if_b, &replies, TC_ACT_REDIRECT)
    });
    let (a_rep, _) = in_ns(&ns_a, || {
        each(
            &a,
            TcProgram::FromHostIface,
            if_a,
            &rep_tun,
            TC_ACT_REDIRECT,
        )
    });

    println!();
    println!("tunnel mode ({n} flows; client -> NodePort on A, backend on B)");
    println!("{:<60} {:>10} {:>10}", "path", "median", "mean");
    for (name, v) in [
        (
            "_1 A new flow (CT miss, LPM, 1 CT insert, FIB, encap)",
            a_new,
        ),
        (
            "_2 B new flow (decap, CT miss, LPM, 2 CT inserts, DNAT)",
            b_new,
        ),
        ("_1 A established (1 CT lookup, FIB, encap)", a_est),
        ("_2 B established (decap, 1 CT lookup, DNAT)", b_est),
        ("_4 B reply (1 CT lookup, FIB, SNAT, encap)", b_rep),
        ("_5 A reply (decap, 1 CT lookup, FIB)", a_rep),
    ] {
        let st = stats(v);
        println!("{name:<60} {:>10.0} {:>10.0}", st.median, st.mean);
    }
    drop((ns_a, ns_b));
    Ok(())
}
