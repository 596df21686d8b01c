//! `margay-lab client -- CMD...` and `margay-lab router -- CMD...`: run a command outside the
//! cluster (the client on the internet segment, or the router), in the foreground.

use std::process::ExitCode;

use anyhow::Result;
use margay_lab::{Lab, Target};

use crate::cli::CommandArgs;

pub fn run(name: &str, target: Target, args: &CommandArgs) -> Result<ExitCode> {
    let lab = Lab::open(name)?;
    let status = lab.exec_interactive(&target, &args.argv)?;
    Ok(super::exit_code(status))
}
