//! Attaching: TCX links pinned and adopted by a restarted agent, cgroup links replaced, and
//! connect-time load balancing on real sockets in a cgroup of our own.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener},
    process::Command,
    sync::mpsc,
    time::Duration,
};

use common::{Bpffs, Cgroup, POD_A_IP, POD_B_IP, Topology, VETH_A};
use margay_bpf::{
    CgroupProgram, Config, Dataplane, LogLevel, TcLinkKind, TcMode, TcProgram,
    maps::{
        MapSizes, NatBackendValue, NatFrontendKey, Protocol, nat::ServiceNat, nat::write_service,
    },
    tcx_programs,
};

fn config(fs: &Bpffs) -> Config {
    Config {
        pin_dir: fs.path().join("maps"),
        sizes: MapSizes::small(),
        log_level: LogLevel::Off,
        ctlb_udp: false,
    }
}

#[test]
fn tcx_link_outlives_the_agent_and_is_adopted() {
    if !common::privileged("tcx_link_outlives_the_agent_and_is_adopted") {
        return;
    }
    let fs = Bpffs::new();
    let t = Topology::new();
    let pin = fs.path().join("link_caliA_ingress");

    let mut dp = Dataplane::load(&config(&fs)).expect("load");
    let (kind, adopted) = t
        .node
        .run(|| dp.attach_tc_pinned(TcProgram::FromWorkload, VETH_A, &pin, TcMode::Auto))
        .expect("attach");
    assert_eq!((kind, adopted), (TcLinkKind::Tcx, false));
    drop(dp); // the agent exits
    let attached = t
        .node
        .run(|| tcx_programs(VETH_A, TcProgram::FromWorkload))
        .expect("query");
    assert_eq!(
        attached,
        vec!["mg_from_wl"],
        "still attached with no agent running"
    );

    // The restarted agent replaces the program inside the pinned link: still exactly one.
    let mut dp = Dataplane::load(&config(&fs)).expect("reload");
    let (kind, adopted) = t
        .node
        .run(|| dp.attach_tc_pinned(TcProgram::FromWorkload, VETH_A, &pin, TcMode::Auto))
        .expect("adopt");
    assert_eq!((kind, adopted), (TcLinkKind::Tcx, true));
    let attached = t
        .node
        .run(|| tcx_programs(VETH_A, TcProgram::FromWorkload))
        .expect("query");
    assert_eq!(attached, vec!["mg_from_wl"]);
}

#[test]
fn cgroup_links_are_pinned_and_replaced() {
    if !common::privileged("cgroup_links_are_pinned_and_replaced") {
        return;
    }
    let fs = Bpffs::new();
    let cg = Cgroup::new();
    let pin = fs.path().join("link_connect4");
    let mut dp = Dataplane::load(&config(&fs)).expect("load");
    assert!(
        !dp.attach_cgroup_pinned(CgroupProgram::Connect4, cg.path(), &pin)
            .expect("attach")
    );
    drop(dp);
    let mut dp = Dataplane::load(&config(&fs)).expect("reload");
    assert!(
        dp.attach_cgroup_pinned(CgroupProgram::Connect4, cg.path(), &pin)
            .expect("replace")
    );
    assert!(pin.exists());
    let mut staging = pin.as_os_str().to_owned();
    staging.push("_new"); // bpffs refuses names with a dot
    assert!(!std::path::Path::new(&staging).exists());
}

#[test]
fn connect_time_load_balancing_in_a_cgroup() {
    if !common::privileged("connect_time_load_balancing_in_a_cgroup") {
        return;
    }
    let fs = Bpffs::new();
    let t = Topology::new();
    let cg = Cgroup::new();
    let mut dp = Dataplane::load(&config(&fs)).expect("load");
    let mut maps = dp.maps().expect("maps");
    let svc = (Ipv4Addr::new(10, 96, 0, 20), 80);
    let pod_b: Ipv4Addr = POD_B_IP.parse().expect("ip");
    write_service(
        &mut maps.nat_frontends,
        &mut maps.nat_backends,
        &ServiceNat {
            svc_id: 2,
            frontends: vec![(NatFrontendKey::new(svc.0, svc.1, Protocol::Tcp, None), 0)],
            local: vec![NatBackendValue::new(pod_b, 8080)],
            ..ServiceNat::default()
        },
        0,
    )
    .expect("seed");
    // The TC programs are attached too: had connect() not been translated, they would NAT the
    // flow and create conntrack entries.
    let _tc = t.node.run(|| {
        [TcProgram::FromWorkload, TcProgram::ToWorkload]
            .map(|p| dp.attach_tc(p, VETH_A, TcMode::Auto).expect("attach tc"))
    });
    let _cg = [CgroupProgram::Connect4, CgroupProgram::Getpeername4]
        .map(|p| dp.attach_cgroup(p, cg.path()).expect("attach cgroup"));

    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            t.pod_b.run(|| {
                let l = TcpListener::bind((POD_B_IP, 8080)).expect("bind");
                tx.send(()).expect("ready");
                let (mut c, peer) = l.accept().expect("accept");
                let mut buf = [0u8; 6];
                c.read_exact(&mut buf).expect("read");
                c.write_all(format!("{peer}").as_bytes()).expect("write");
            });
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("ready");
        // A client process in our cgroup (programs act on the cgroup's processes), in the pod.
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} bash -c \
             'exec 3<>/dev/tcp/{}/{} && echo hello >&3 && timeout 5 cat <&3'",
            cg.path().display(),
            t.pod_a.name(),
            svc.0,
            svc.1
        );
        let out = Command::new("bash")
            .args(["-c", &script])
            .output()
            .expect("client");
        server.join().expect("server");
        let seen = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            seen.starts_with(&format!("{POD_A_IP}:")),
            "backend saw {seen}"
        );
    });
    assert!(
        maps.conntrack.entries().expect("ct").is_empty(),
        "no packet needed NAT"
    );
    let rev = maps.ctlb_rev.entries().expect("ctlb rev");
    assert_eq!(
        rev.len(),
        1,
        "connect() recorded the frontend for getpeername()"
    );
    assert_eq!(
        (rev[0].1.addr, rev[0].1.port),
        (
            margay_bpf::maps::be_addr(svc.0),
            margay_bpf::maps::be_port(svc.1)
        )
    );
}
