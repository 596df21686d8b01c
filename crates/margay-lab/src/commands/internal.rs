//! Hidden verbs used by tests and connectivity checks inside lab namespaces.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use margay_lab::probe;

use crate::cli::{ConnectArgs, EchoArgs};

/// `internal-echo --port N [--tag T]`: serve until killed.
pub fn echo(args: &EchoArgs) -> Result<ExitCode> {
    let listen = SocketAddr::new(args.address, args.port);
    probe::echo_server(listen, args.tag.as_deref())
        .with_context(|| format!("echo server on {listen}"))?;
    Ok(ExitCode::SUCCESS)
}

/// `internal-connect ADDR`: print the server's answer.
pub fn connect(args: &ConnectArgs) -> Result<ExitCode> {
    let text = probe::connect(
        args.addr,
        Duration::from_millis(args.timeout_ms),
        Duration::from_millis(args.retry_ms),
    )
    .with_context(|| format!("cannot connect to {}", args.addr))?;
    margayctl::out!("{text}");
    Ok(ExitCode::SUCCESS)
}
