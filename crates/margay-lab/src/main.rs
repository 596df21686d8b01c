//! `margay-lab`: build, inspect and tear down a lab (a cluster of network namespaces).
//!
//! Arguments are parsed by clap into [`cli::Cli`]; each verb lives in its own file under
//! `commands/`. Failures print one line on stderr and exit 1; `node exec` and `client` exit with
//! their command's status.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MARGAY_LAB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match commands::run(cli) {
        Ok(code) => code,
        // The reader of stdout went away (`| head`): nothing to report.
        Err(e) if margayctl::output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the cause chain: the contract with scripts and users.
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("Error: {message}");
            ExitCode::FAILURE
        }
    }
}
