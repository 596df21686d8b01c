//! `margayctl`: calicoctl's verbs and kubectl's habits over Margay's datastore.
//!
//! Arguments are parsed by clap into [`cli::Cli`]; each verb lives in its own file under
//! `commands/`. Every failure prints one line on stderr and exits 1; a failed command has changed
//! nothing (the datastore client validates everything before one atomic commit).

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
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
