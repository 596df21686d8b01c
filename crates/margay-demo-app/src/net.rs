//! Name resolution and TCP connection with classified failures, shared by `probe` and the HTTP
//! client.
//!
//! Names go through the system resolver (`getaddrinfo`, so glibc reads the pod's
//! /etc/resolv.conf and its search path: `summary` resolves as `summary.yaobank.svc...`). An IP
//! literal is used as is, without any lookup.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::failure::{Failure, FailureKind};

/// One attempt's time budget: a deadline and the budget it came from (for messages).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub budget: Duration,
}

impl Deadline {
    pub fn start(budget: Duration) -> Self {
        Self {
            at: Instant::now() + budget,
            budget,
        }
    }

    fn expired(&self, what: &str, kind: FailureKind) -> Failure {
        Failure::new(kind, format!("{what}: no answer within {:?}", self.budget))
    }
}

/// Splits `HOST:PORT`, `[V6]:PORT` or `V6ADDR:PORT`... the last colon separates the port.
pub fn split_host_port(target: &str) -> Result<(String, u16), String> {
    let bad =
        || format!("{target:?} is not HOST:PORT (e.g. summary:80, 10.0.0.1:80, [fd00::1]:80)");
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Resolves `host` to socket addresses, in the resolver's order.
pub async fn resolve(
    host: &str,
    port: u16,
    deadline: Deadline,
) -> Result<Vec<SocketAddr>, Failure> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let what = format!("lookup {host}");
    match tokio::time::timeout_at(deadline.at, tokio::net::lookup_host((host, port))).await {
        Err(_) => Err(deadline.expired(&what, FailureKind::Dns)),
        Ok(Err(e)) => Err(Failure::new(FailureKind::Dns, format!("{what}: {e}"))),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err(Failure::new(
                    FailureKind::Dns,
                    format!("{what}: no addresses"),
                ))
            } else {
                Ok(addrs)
            }
        }
    }
}

/// Connects to the first address that accepts, trying them in order; the failure reported is
/// the last address's (a timeout ends the attempt at once: the budget is spent).
pub async fn connect_tcp(addrs: &[SocketAddr], deadline: Deadline) -> Result<TcpStream, Failure> {
    let mut last = Failure::new(FailureKind::Other, "no address to connect to");
    for addr in addrs {
        let what = format!("connect {addr}");
        match tokio::time::timeout_at(deadline.at, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = Failure::io(&what, &e),
            Err(_) => return Err(deadline.expired(&what, FailureKind::Timeout)),
        }
    }
    Err(last)
}

/// Resolves and connects.
pub async fn connect_host(host: &str, port: u16, deadline: Deadline) -> Result<TcpStream, Failure> {
    let addrs = resolve(host, port, deadline).await?;
    connect_tcp(&addrs, deadline).await
}

/// The deadline-bound version of an I/O step: an elapsed deadline is a timeout.
pub async fn within<T>(
    deadline: Deadline,
    what: &str,
    step: impl Future<Output = std::io::Result<T>>,
) -> Result<T, Failure> {
    match tokio::time::timeout_at(deadline.at, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failure::io(what, &e)),
        Err(_) => Err(deadline.expired(what, FailureKind::Timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_host_and_port() {
        assert_eq!(
            split_host_port("summary:80"),
            Ok(("summary".to_owned(), 80))
        );
        assert_eq!(
            split_host_port("10.0.0.1:2379"),
            Ok(("10.0.0.1".to_owned(), 2379))
        );
        assert_eq!(
            split_host_port("[fd00::1]:80"),
            Ok(("fd00::1".to_owned(), 80))
        );
        assert!(split_host_port("summary").is_err());
        assert!(split_host_port(":80").is_err());
        assert!(split_host_port("summary:http").is_err());
    }

    #[tokio::test]
    async fn ip_literals_need_no_lookup() {
        let deadline = Deadline::start(Duration::from_secs(1));
        let addrs = resolve("127.0.0.1", 80, deadline).await.unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:80".parse::<SocketAddr>().unwrap()]);
    }
}
