//! `probe`: the connectivity-test client.
//!
//! Each attempt resolves the host with the system resolver, connects on a new socket (`probe udp
//! --one-socket`: one socket for every attempt, i.e. one UDP flow), and prints the server's
//! answer (for `echo`: `<source-ip-it-saw>:<port> <name>`) as one line on stdout.
//! A failed attempt prints one line on stderr, `<kind>: <what>: <why>`, kind being one of
//! `refused`, `reset`, `timeout`, `dns`, `error`; a TCP probe that connected names its local
//! address (`read from 10.0.0.1:80 (local 203.0.113.10:41234)`), and with `--count` above 1 the
//! line ends with `(attempt K of N, started S s in)`, to find the flow in a capture and place it
//! against what happened meanwhile. With `--count N` every attempt is made, and the exit code is
//! the first failure's:
//!
//! | exit | meaning |
//! |---|---|
//! | 0 | every attempt got an answer |
//! | 1 | other failure (unreachable network, non-2xx HTTP status, empty answer, ...) |
//! | 2 | usage error (bad arguments, bad HOST:PORT or URL) |
//! | 3 | connection refused (TCP RST or ICMP port unreachable) or reset/closed before answering |
//! | 4 | timeout: no connection or no answer within `--timeout` |
//! | 5 | DNS: the name did not resolve, or the lookup took longer than `--timeout` |
//!
//! `--timeout` bounds each attempt: first the name lookup, then (from the same start) connect
//! and answer together.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::UdpSocket;

use crate::cli::{ProbeArgs, ProbeCommon, ProbeTarget};
use crate::failure::{Failure, FailureKind};
use crate::http_client::{self, HttpTarget};
use crate::net::{self, Deadline, within};

/// The datagram `probe udp` sends.
pub const UDP_PAYLOAD: &[u8] = b"margay-probe\n";
/// The most `probe tcp` reads while waiting for the first line.
const MAX_LINE: usize = 64 * 1024;

pub async fn run(args: ProbeArgs) -> ExitCode {
    match args.target {
        ProbeTarget::Tcp(args) => {
            let Some((host, port)) = usage(net::split_host_port(&args.target)) else {
                return ExitCode::from(2);
            };
            repeat(&args.common, |timeout| tcp(&host, port, timeout)).await
        }
        ProbeTarget::Udp(args) => {
            let Some((host, port)) = usage(net::split_host_port(&args.target)) else {
                return ExitCode::from(2);
            };
            if args.one_socket {
                let resolved = Deadline::start(args.common.timeout);
                let socket = match udp_socket(&host, port, resolved).await {
                    Ok(s) => std::sync::Arc::new(s),
                    Err(failure) => {
                        eprintln!("{failure}");
                        return ExitCode::from(failure.kind.exit_code());
                    }
                };
                repeat(&args.common, |timeout| {
                    let socket = socket.clone();
                    async move { udp_exchange(&socket, Deadline::start(timeout)).await }
                })
                .await
            } else {
                repeat(&args.common, |timeout| udp(&host, port, timeout)).await
            }
        }
        ProbeTarget::Http(args) => {
            if usage(HttpTarget::parse(&args.url).map_err(|f| f.message)).is_none() {
                return ExitCode::from(2);
            }
            repeat(&args.common, |timeout| http(&args.url, timeout)).await
        }
    }
}

fn usage<T>(parsed: Result<T, String>) -> Option<T> {
    parsed.map_err(|e| eprintln!("usage: {e}")).ok()
}

/// Makes `--count` attempts, `--interval` apart; prints answers on stdout and failures on
/// stderr as they come; exits with the first failure's code. With more than one attempt a
/// failure says which attempt it was and when it started, to place it against what happened
/// meanwhile (a dataplane switch, a rollout).
async fn repeat<F, Fut>(common: &ProbeCommon, mut attempt: F) -> ExitCode
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<String, Failure>>,
{
    let mut first_failure: Option<FailureKind> = None;
    let started = tokio::time::Instant::now();
    for i in 0..common.count {
        if i > 0 && !common.interval.is_zero() {
            tokio::time::sleep(common.interval).await;
        }
        let attempt_started = started.elapsed();
        match attempt(common.timeout).await {
            Ok(answer) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{answer}");
                let _ = out.flush();
            }
            Err(failure) if common.count > 1 => {
                eprintln!(
                    "{failure} (attempt {} of {}, started {:.3} s in)",
                    i + 1,
                    common.count,
                    attempt_started.as_secs_f64()
                );
                first_failure.get_or_insert(failure.kind);
            }
            Err(failure) => {
                eprintln!("{failure}");
                first_failure.get_or_insert(failure.kind);
            }
        }
    }
    first_failure.map_or(ExitCode::SUCCESS, |kind| ExitCode::from(kind.exit_code()))
}

/// The answer as one printable piece: lossy UTF-8, without the final line break.
fn answer_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text)
        .to_owned()
}

/// Connects and reads up to the first line break (or until the server closes).
pub async fn tcp(host: &str, port: u16, timeout: Duration) -> Result<String, Failure> {
    let deadline = Deadline::start(timeout);
    let mut stream = net::connect_host(host, port, deadline).await?;
    let remote = stream
        .peer_addr()
        .map_or_else(|_| format!("{host}:{port}"), |a| a.to_string());
    // The local address names the flow (for a capture or a conntrack dump when it fails).
    let local = stream
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let what = format!("read from {remote} (local {local})");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = within(deadline, &what, stream.read(&mut buf)).await?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
        if let Some(end) = received.iter().position(|b| *b == b'\n') {
            received.truncate(end + 1);
            break;
        }
        if received.len() >= MAX_LINE {
            break;
        }
    }
    if received.is_empty() {
        return Err(Failure::new(
            FailureKind::Other,
            format!("{what}: connected, but the server closed without sending anything"),
        ));
    }
    Ok(answer_text(&received))
}

/// Sends one datagram from a new connected socket and waits for the reply. A connected socket
/// reports the ICMP port unreachable of a closed port as "connection refused".
pub async fn udp(host: &str, port: u16, timeout: Duration) -> Result<String, Failure> {
    let deadline = Deadline::start(timeout);
    let socket = udp_socket(host, port, deadline).await?;
    udp_exchange(&socket, deadline).await
}

/// A UDP socket connected to HOST:PORT (resolved before `deadline`).
async fn udp_socket(host: &str, port: u16, deadline: Deadline) -> Result<UdpSocket, Failure> {
    let addrs = net::resolve(host, port, deadline).await?;
    let remote = addrs[0];
    let local = SocketAddr::new(
        match remote.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        },
        0,
    );
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| Failure::io(&format!("bind udp {local}"), &e))?;
    socket
        .connect(remote)
        .await
        .map_err(|e| Failure::io(&format!("connect udp {remote}"), &e))?;
    Ok(socket)
}

/// One datagram on a connected socket and its reply, before `deadline`.
async fn udp_exchange(socket: &UdpSocket, deadline: Deadline) -> Result<String, Failure> {
    let remote = socket
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    within(
        deadline,
        &format!("send to udp {remote}"),
        socket.send(UDP_PAYLOAD),
    )
    .await?;
    let mut buf = vec![0u8; 65536];
    let n = within(
        deadline,
        &format!("reply from udp {remote}"),
        socket.recv(&mut buf),
    )
    .await?;
    Ok(answer_text(&buf[..n]))
}

/// GETs the URL; a 2xx answer's body is the answer, anything else a failure.
pub async fn http(url: &str, timeout: Duration) -> Result<String, Failure> {
    let response = http_client::get(url, timeout).await?;
    let body = answer_text(&response.body);
    if response.status.is_success() {
        Ok(body)
    } else {
        let first_line = body.lines().next().unwrap_or_default();
        Err(Failure::new(
            FailureKind::Other,
            format!(
                "GET {url} ({}): HTTP {}: {first_line}",
                response.remote, response.status
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_text_drops_one_line_break() {
        assert_eq!(answer_text(b"127.0.0.1:4000 echo\n"), "127.0.0.1:4000 echo");
        assert_eq!(
            answer_text(b"127.0.0.1:4000 echo\r\n"),
            "127.0.0.1:4000 echo"
        );
        assert_eq!(answer_text(b"no break"), "no break");
        assert_eq!(answer_text(b"two\n\n"), "two\n");
    }
}
