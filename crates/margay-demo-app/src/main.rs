//! `margay-demo-app`: see the library's documentation and the crate's README.md.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    margay_demo_app::run(margay_demo_app::cli::Cli::parse())
}
