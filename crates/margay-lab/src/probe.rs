//! Tiny TCP probes for connectivity checks, with nothing to install: an echo server that answers
//! every connection with the address it saw the connection come from (the source IP that
//! arrived, after whatever NAT happened on the way), and a client that reads that answer.
//!
//! The `margay-lab` binary exposes them as hidden verbs (`internal-echo`, `internal-connect`) so
//! they can be spawned inside lab namespaces.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// One answer of the echo server: `<peer ip:port>[ <tag>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReply {
    /// The connection's source as the server saw it.
    pub peer: SocketAddr,
    /// The server's tag (a node or pod name), if it has one.
    pub tag: Option<String>,
}

impl EchoReply {
    /// Parses a reply line.
    pub fn parse(line: &str) -> Option<EchoReply> {
        let mut words = line.split_whitespace();
        let peer = words.next()?.parse().ok()?;
        let tag = words.next().map(str::to_owned);
        Some(EchoReply { peer, tag })
    }
}

/// Serves forever on `listen`: each connection gets one line, `<peer>[ <tag>]\n`, then is closed.
pub fn echo_server(listen: SocketAddr, tag: Option<&str>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let line = match tag {
            Some(t) => format!("{peer} {t}\n"),
            None => format!("{peer}\n"),
        };
        let _ = stream.write_all(line.as_bytes());
    }
    Ok(())
}

/// Connects to `addr` and returns everything the server sends until it closes. Retries failed
/// connects (refused, unreachable: a server still starting) until `retry_for` has passed; each
/// attempt and the read are bounded by `timeout`.
pub fn connect(
    addr: SocketAddr,
    timeout: Duration,
    retry_for: Duration,
) -> std::io::Result<String> {
    let deadline = Instant::now() + retry_for;
    loop {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(mut stream) => {
                stream.set_read_timeout(Some(timeout))?;
                let mut text = String::new();
                stream.read_to_string(&mut text)?;
                return Ok(text);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(%addr, error = %e, "connect failed; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_over_loopback() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        std::thread::spawn(move || echo_server(addr, Some("t1")));
        let text = connect(addr, Duration::from_secs(2), Duration::from_secs(5)).unwrap();
        let reply = EchoReply::parse(&text).unwrap();
        assert_eq!(reply.peer.ip().to_string(), "127.0.0.1");
        assert_eq!(reply.tag.as_deref(), Some("t1"));
        assert_eq!(EchoReply::parse("nonsense"), None);
    }
}
