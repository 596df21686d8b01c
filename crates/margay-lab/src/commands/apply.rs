//! `margay-lab apply -f FILE`: write resources, run the control loops, wait for the nodes.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use margay_lab::controller::Cluster;

use crate::cli::ApplyArgs;

pub fn run(name: &str, args: &ApplyArgs) -> Result<ExitCode> {
    super::require_root("apply")?;
    let manifests = margayctl::input::read_manifests(&args.filename)?;
    let started = Instant::now();
    super::runtime()?.block_on(async {
        let cluster = Cluster::open(name).await?;
        let described: Vec<String> = manifests
            .iter()
            .map(|m| {
                let kind = m["kind"].as_str().unwrap_or("?").to_ascii_lowercase();
                let name = m["metadata"]["name"].as_str().unwrap_or("?");
                format!("{kind}/{name}")
            })
            .collect();
        cluster.apply(manifests, &args.namespace).await?;
        for d in described {
            margayctl::outln!("{d} applied");
        }
        margayctl::outln!("converged in {:.1} s", started.elapsed().as_secs_f64());
        Ok(ExitCode::SUCCESS)
    })
}
