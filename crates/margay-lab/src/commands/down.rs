//! `margay-lab down`: remove everything of the lab, by name (works after a crash).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use margay_lab::Lab;

pub fn run(name: &str) -> Result<ExitCode> {
    super::require_root("down")?;
    let started = Instant::now();
    let report = Lab::destroy(name).with_context(|| format!("cannot remove lab {name:?}"))?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    margayctl::outln!(
        "{report} in {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(ExitCode::SUCCESS)
}
