//! One file per verb; `run` dispatches. Verbs return the process's exit code, so that `node exec`
//! and `client` can pass their command's status through.

mod apply;
mod bench;
mod client;
mod down;
mod etcd;
mod get;
mod internal;
mod node;
mod status;
mod up;
mod workloads;

use std::process::{ExitCode, ExitStatus};

use anyhow::Result;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> Result<ExitCode> {
    let name = cli.name.as_str();
    match cli.command {
        Command::Up(args) => up::run(name, &args).map(|_| ExitCode::SUCCESS),
        Command::Down => down::run(name),
        Command::Status(args) => status::run(name, &args),
        Command::Node(command) => node::run(name, command),
        Command::Apply(args) => apply::run(name, &args),
        Command::Get(args) => get::run(name, &args),
        Command::Delete(args) => workloads::delete(name, &args),
        Command::Logs(args) => workloads::logs(name, &args),
        Command::Exec(args) => workloads::exec(name, &args),
        Command::Rollout(args) => workloads::rollout(name, &args),
        Command::Client(args) => client::run(name, margay_lab::Target::Client, &args),
        Command::Etcd(command) => etcd::run(name, command),
        Command::Router(args) => client::run(name, margay_lab::Target::Router, &args),
        Command::Bench(args) => bench::run(name, &args),
        Command::InternalEcho(args) => internal::echo(&args),
        Command::InternalConnect(args) => internal::connect(&args),
    }
}

/// The exit code a shell would give for `status` (128 + signal when killed by one).
pub fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Refuses early, with the reason, when not root (everything the lab does needs it).
pub fn require_root(verb: &str) -> Result<()> {
    if margay_lab::is_root() {
        Ok(())
    } else {
        anyhow::bail!("`margay-lab {verb}` needs root (it creates network namespaces and cgroups)")
    }
}

/// A runtime for the verbs that talk to the datastore.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
