//! Habit 5: every program variant through the verifier, and map pinning / adoption.

mod common;

use std::{net::Ipv4Addr, time::Instant};

use margay_bpf::{
    CgroupProgram, Config, Dataplane, LogLevel, TcProgram,
    maps::{MapSizes, NatFrontendKey, NatFrontendValue, Protocol, names},
};

fn config(dir: &std::path::Path, log_level: LogLevel, ctlb_udp: bool) -> Config {
    Config {
        pin_dir: dir.to_owned(),
        sizes: MapSizes::small(),
        log_level,
        ctlb_udp,
    }
}

#[test]
fn every_program_variant_loads() {
    if !common::privileged("every_program_variant_loads") {
        return;
    }
    let fs = common::Bpffs::new();
    // Variants are load-time constants: the log level (the verifier prunes disabled logging) and
    // UDP connect-time load balancing.
    for log_level in [LogLevel::Off, LogLevel::Info, LogLevel::Debug] {
        for ctlb_udp in [false, true] {
            let dir = fs.path().join(format!("{log_level:?}-{ctlb_udp}"));
            let t = Instant::now();
            let dp = Dataplane::load(&config(&dir, log_level, ctlb_udp))
                .unwrap_or_else(|e| panic!("{log_level:?} ctlb_udp={ctlb_udp}: {e:?}"));
            eprintln!(
                "loaded {} TC + {} cgroup programs ({log_level:?}, ctlb_udp={ctlb_udp}) in {:?}",
                TcProgram::ALL.len(),
                CgroupProgram::ALL.len(),
                t.elapsed()
            );
            for p in TcProgram::ALL {
                let (verified, size) = dp.tc_complexity(p).expect("program info");
                eprintln!(
                    "  {}: {verified:?} instructions verified, {size:?} bytes",
                    p.name()
                );
                // The kernel accepts up to 1 000 000; this budget makes growth visible.
                assert!(
                    verified.is_none_or(|n| n < 100_000),
                    "{}: {verified:?} instructions to verify",
                    p.name()
                );
            }
            for name in names::ALL {
                assert!(dir.join(name).exists(), "map {name} is not pinned");
            }
            assert!(dp.replaced_maps().is_empty());
        }
    }
}

#[test]
fn pinned_maps_survive_a_restart_and_incompatible_ones_are_replaced() {
    if !common::privileged("pinned_maps_survive_a_restart") {
        return;
    }
    let fs = common::Bpffs::new();
    let cfg = config(fs.path(), LogLevel::Off, false);
    let key = NatFrontendKey::new(Ipv4Addr::new(10, 96, 0, 1), 443, Protocol::Tcp, None);
    let val = NatFrontendValue {
        svc_id: 7,
        count: 1,
        local_count: 1,
        flags: 0,
        affinity_timeout_s: 0,
    };
    {
        let dp = Dataplane::load(&cfg).expect("load");
        dp.maps()
            .expect("maps")
            .nat_frontends
            .insert(&key, &val)
            .expect("insert");
    }
    // "Restart": a new load adopts the pinned maps with their contents.
    let dp = Dataplane::load(&cfg).expect("reload");
    assert!(dp.replaced_maps().is_empty());
    let got = dp
        .maps()
        .expect("maps")
        .nat_frontends
        .entries()
        .expect("entries");
    assert_eq!(got, vec![(key, val)]);
    drop(dp);

    // A different frontend map size cannot be adopted: the map is recreated, empty.
    let mut resized = cfg.clone();
    resized.sizes.nat_frontend *= 2;
    let dp = Dataplane::load(&resized).expect("load resized");
    assert_eq!(dp.replaced_maps(), &[names::NAT_FRONTEND]);
    assert!(
        dp.maps()
            .expect("maps")
            .nat_frontends
            .entries()
            .expect("entries")
            .is_empty()
    );
}
