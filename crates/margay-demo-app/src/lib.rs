//! The workloads that run inside Margay's lab pods.
//!
//! One binary, `margay-demo-app`, seven subcommands:
//!
//! - `database`, `summary`, `customer`: the yaobank demo of the Calico labs. `customer` serves the
//!   "YAO Bank" page, asking `summary`, which asks `database` (a read-only subset of etcd's v2
//!   keys API, as the original image was an etcd). All three log every request on stdout in
//!   werkzeug's format, whose first field is the TCP peer address the server saw: the observable
//!   that shows whether the dataplane preserved the client's source IP.
//! - `echo`: a connectivity-test server on any number of TCP, UDP and HTTP ports that answers
//!   every peer with `<peer-ip>:<peer-port> <pod-name>`.
//! - `probe`: the client for `echo`, with exit codes that tell refused/reset, timeout and DNS
//!   failures apart, for the lab's connectivity matrix.
//! - `load-server` and `load`: the benchmark's server and load generator (`margay-lab bench`).
//!
//! Everything a person or a test reads is on stdout (access lines, probe answers); diagnostics
//! and the startup banner (` * Running on http://ADDR/`, as werkzeug prints) go to stderr.

pub mod access_log;
pub mod cli;
pub mod duration;
pub mod echo;
pub mod failure;
pub mod http_client;
pub mod identity;
pub mod load;
pub mod net;
pub mod probe;
pub mod server;
pub mod yaobank;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Runs one parsed command line to completion and returns the process's exit code.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Probe(args) => probe::run(args).await,
            Command::Database(args) => report(yaobank::database::run(args).await),
            Command::Summary(args) => report(yaobank::summary::run(args).await),
            Command::Customer(args) => report(yaobank::customer::run(args).await),
            Command::Echo(args) => report(echo::run(args).await),
            Command::LoadServer(args) => report(load::serve(args).await),
            Command::Load(args) => report(load::run(args).await),
        }
    });
    // A name lookup that timed out may still hold a blocking thread: don't wait for it.
    runtime.shutdown_background();
    code
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
