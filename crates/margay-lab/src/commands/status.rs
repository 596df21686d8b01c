//! `margay-lab status [-o json]`.

use std::process::ExitCode;

use anyhow::Result;
use margay_lab::Lab;

use crate::cli::{OutputFormat, StatusArgs};

pub fn run(name: &str, args: &StatusArgs) -> Result<ExitCode> {
    let lab = Lab::open(name)?;
    let status = lab.status()?;
    match args.output {
        OutputFormat::Text => margayctl::out!("{status}"),
        OutputFormat::Json => margayctl::outln!("{}", serde_json::to_string_pretty(&status)?),
    }
    Ok(ExitCode::SUCCESS)
}
