//! `margay-lab up`: build the topology, printing each step with its duration.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use margay_lab::{Lab, LabConfig, LbMode};

use crate::cli::UpArgs;

/// Builds the lab's infrastructure and returns it (for later steps: agents, datastore, DNS).
pub fn run(name: &str, args: &UpArgs) -> Result<Lab> {
    super::require_root("up")?;
    let mut config = LabConfig::new(name, args.nodes);
    config.lb_mode = args.lb_mode.parse::<LbMode>()?;
    let started = Instant::now();
    println!("lab {name}: {} nodes", args.nodes);
    let lab = Lab::create_with_progress(config, &mut |p| {
        // Progress only: a closed stdout must not stop (or panic) the build.
        let _ = writeln!(
            std::io::stdout(),
            "  {:<10} {:>6.1} ms  {}",
            p.step,
            p.elapsed.as_secs_f64() * 1000.0,
            p.detail
        );
    })
    .with_context(|| format!("cannot build lab {name:?}"))?;
    println!(
        "  {:<10} {:>6.1} ms",
        "total",
        started.elapsed().as_secs_f64() * 1000.0
    );
    print_summary(&lab)?;
    Ok(lab)
}

fn print_summary(lab: &Lab) -> Result<()> {
    let state = lab.state()?;
    let c = &state.config;
    println!(
        "client {} -> router {} / {} -> nodes:",
        c.client_ip, c.router_internet_ip, c.router_underlay_ip
    );
    for n in &state.nodes {
        println!("  {:<10} {:<15} netns {}", n.name, n.ip, n.netns);
    }
    println!("LoadBalancer IPs {} -> {}", c.lb_pool, state.lb_mode);
    println!(
        "try: margay-lab --name {0} node exec {1} -- ping -c1 {2}; margay-lab --name {0} status; margay-lab --name {0} down",
        lab.name(),
        state.nodes.first().map_or("node-1", |n| n.name.as_str()),
        c.client_ip
    );
    Ok(())
}
