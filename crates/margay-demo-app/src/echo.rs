//! `echo`: the connectivity-test server. Every peer is answered with one line,
//!
//! ```text
//! <peer-ip>:<peer-port> <name>
//! ```
//!
//! (IPv6 peers as `[addr]:port`), where the peer is the source address this socket saw and the
//! name is `--name`/`$POD_NAME` or the host name, so a client learns both which backend answered
//! and which source address reached it.
//!
//! - TCP: the line is written as soon as the connection is accepted, then our side is shut down
//!   (FIN). Whatever the client sent is then read and discarded until it closes, for at most
//!   [`DRAIN_LIMIT`]: closing a socket with unread data would send a RST instead of a FIN, and
//!   the client might lose the line.
//! - UDP: each datagram gets the line back, from the same socket.
//! - HTTP: every GET (any path) answers the line as its body.
//!
//! Each peer is logged on stdout, werkzeug-style, with the local address that was reached:
//!
//! ```text
//! 10.65.0.7 - - [12/Dec/2022 18:55:38] "TCP 10.65.1.4:8080" 10.65.0.7:40522
//! 10.65.0.7 - - [12/Dec/2022 18:55:38] "UDP 0.0.0.0:5353" 10.65.0.7:40101
//! 10.65.0.7 - - [12/Dec/2022 18:55:38] "GET / HTTP/1.1" 200 -
//! ```
//!
//! A UDP socket bound to 0.0.0.0 does not learn which of its addresses a datagram was sent to,
//! so its log shows 0.0.0.0; its reply's source address is chosen by the kernel's routing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

use crate::access_log::{self, peer_ip};
use crate::cli::EchoArgs;
use crate::identity::workload_name;
use crate::server;

/// How long a TCP connection is kept open after our answer, waiting for the client to close.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long writing the answer may take before the connection is dropped.
const WRITE_LIMIT: Duration = Duration::from_secs(5);

/// `<peer-ip>:<peer-port> <name>` (no newline).
pub fn answer(peer: SocketAddr, name: &str) -> String {
    format!("{} {name}", SocketAddr::new(peer_ip(peer), peer.port()))
}

/// `<peer-ip> - - [<date>] "<PROTO> <local-addr>" <peer-ip>:<peer-port>`
fn log_line(peer: SocketAddr, what: &str) -> String {
    let canonical = SocketAddr::new(peer_ip(peer), peer.port());
    format!(
        "{} - - [{}] \"{what}\" {canonical}",
        canonical.ip(),
        access_log::now()
    )
}

pub async fn run(args: EchoArgs) -> anyhow::Result<()> {
    let name: Arc<str> = workload_name(args.name).into();
    // Bind everything first: a port that cannot be had fails the command before any serving.
    let mut tcp = Vec::new();
    for spec in &args.tcp {
        let addr = spec.socket_addr(args.bind);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("echo: cannot listen on tcp {addr}"))?;
        tcp.push(listener);
    }
    let mut udp = Vec::new();
    for spec in &args.udp {
        let addr = spec.socket_addr(args.bind);
        let socket = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("echo: cannot bind udp {addr}"))?;
        udp.push(socket);
    }
    let mut http = Vec::new();
    for spec in &args.http {
        let addr = spec.socket_addr(args.bind);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("echo: cannot listen on http {addr}"))?;
        http.push(listener);
    }

    let mut tasks = JoinSet::new();
    for listener in tcp {
        server::banner(&format!(
            "echo: Listening on tcp://{}",
            listener.local_addr()?
        ));
        tasks.spawn(serve_tcp(listener, name.clone()));
    }
    for socket in udp {
        server::banner(&format!(
            "echo: Listening on udp://{}",
            socket.local_addr()?
        ));
        tasks.spawn(serve_udp(socket, name.clone()));
    }
    for listener in http {
        let app = http_router(name.clone());
        tasks.spawn(async move { server::serve_listener("echo", listener, app).await });
    }
    tokio::select! {
        Some(ended) = tasks.join_next() => match ended {
            Ok(result) => result.context("echo: a server stopped"),
            Err(e) => Err(anyhow::anyhow!("echo: a server task failed: {e}")),
        },
        () = server::shutdown_signal() => Ok(()),
    }
}

async fn serve_tcp(listener: TcpListener, name: Arc<str>) -> anyhow::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(answer_tcp(stream, peer, name.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: say so, breathe, go on.
                access_log::error("echo", format!("tcp accept: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer_tcp(mut stream: TcpStream, peer: SocketAddr, name: Arc<str>) {
    let local = stream
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    access_log::emit(&log_line(peer, &format!("TCP {local}")));
    let line = format!("{}\n", answer(peer, &name));
    let written = tokio::time::timeout(WRITE_LIMIT, async {
        stream.write_all(line.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    // Drain until the client closes, so that our close is a FIN and not a RST.
    let _ = tokio::time::timeout(DRAIN_LIMIT, async {
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn serve_udp(socket: UdpSocket, name: Arc<str>) -> anyhow::Result<()> {
    let local = socket.local_addr()?;
    let mut buf = vec![0u8; 65536];
    loop {
        let peer = match socket.recv_from(&mut buf).await {
            Ok((_, peer)) => peer,
            Err(e) => {
                access_log::error("echo", format!("udp {local} receive: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        access_log::emit(&log_line(peer, &format!("UDP {local}")));
        let line = format!("{}\n", answer(peer, &name));
        if let Err(e) = socket.send_to(line.as_bytes(), peer).await {
            access_log::error("echo", format!("udp {local} reply to {peer}: {e}"));
        }
    }
}

fn http_router(name: Arc<str>) -> Router {
    Router::new()
        .route("/", axum::routing::get(answer_http))
        .fallback(axum::routing::get(answer_http))
        .with_state(name)
}

async fn answer_http(
    State(name): State<Arc<str>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> String {
    format!("{}\n", answer(peer, &name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_shows_peer_and_name() {
        let peer: SocketAddr = "[::ffff:10.65.0.7]:40522".parse().unwrap();
        assert_eq!(answer(peer, "echo-1"), "10.65.0.7:40522 echo-1");
        let peer: SocketAddr = "[fd00::7]:40522".parse().unwrap();
        assert_eq!(answer(peer, "echo-1"), "[fd00::7]:40522 echo-1");
    }
}
