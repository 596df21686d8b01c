//! Access lines in werkzeug's format, the observable of the whole lab:
//!
//! ```text
//! 10.224.0.62 - - [12/Dec/2022 18:55:38] "GET / HTTP/1.1" 200 -
//! ```
//!
//! The first field is the TCP peer address the server's socket saw, after the dataplane did (or
//! did not) rewrite it: an IPv4-mapped IPv6 peer (`::ffff:10.0.0.1`, seen on a dual-stack
//! listener) is printed as the IPv4 address, as werkzeug would. The time is local time (UTC in
//! the lab's pods) as `%d/%b/%Y %H:%M:%S`. Every line is written and flushed on its own, so a
//! reader of a pipe or a log file sees it at once.

use std::fmt::Display;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;

/// werkzeug's (BaseHTTPRequestHandler's) date format.
pub const DATE_FORMAT: &str = "%d/%b/%Y %H:%M:%S";

/// The peer address as werkzeug prints it: IPv4-mapped IPv6 addresses as plain IPv4.
pub fn peer_ip(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

pub fn now() -> String {
    chrono::Local::now().format(DATE_FORMAT).to_string()
}

/// `<peer-ip> - - [<date>] "<request line>" <status> -`
pub fn format_line(
    peer: impl Display,
    date: &str,
    request_line: &str,
    status: impl Display,
) -> String {
    format!("{peer} - - [{date}] \"{request_line}\" {status} -")
}

/// Writes one line on stdout and flushes it. A closed stdout must not take the server down, so
/// write errors are ignored.
pub fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Writes one diagnostic line on stderr, with the same date as the access lines.
pub fn error(component: &str, message: impl Display) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "[{}] {component}: {message}", now());
    let _ = err.flush();
}

/// axum middleware: logs every request once its status is known. Needs the service to be made
/// with `into_make_service_with_connect_info::<SocketAddr>()`.
pub async fn middleware(request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| peer_ip(*addr));
    let target = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |pq| pq.as_str().to_owned(),
    );
    let request_line = format!("{} {} {:?}", request.method(), target, request.version());
    let response = next.run(request).await;
    let peer = peer.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
    emit(&format_line(
        peer,
        &now(),
        &request_line,
        response.status().as_u16(),
    ));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_matches_werkzeug() {
        let line = format_line(
            IpAddr::from([10, 224, 0, 62]),
            "12/Dec/2022 18:55:38",
            "GET / HTTP/1.1",
            200,
        );
        assert_eq!(
            line,
            r#"10.224.0.62 - - [12/Dec/2022 18:55:38] "GET / HTTP/1.1" 200 -"#
        );
    }

    #[test]
    fn date_format_is_werkzeugs() {
        let date = chrono::NaiveDate::from_ymd_opt(2021, 10, 26)
            .and_then(|d| d.and_hms_opt(9, 5, 3))
            .unwrap();
        assert_eq!(date.format(DATE_FORMAT).to_string(), "26/Oct/2021 09:05:03");
    }

    #[test]
    fn mapped_ipv6_peers_print_as_ipv4() {
        let peer: SocketAddr = "[::ffff:173.178.61.132]:41234".parse().unwrap();
        assert_eq!(peer_ip(peer).to_string(), "173.178.61.132");
        let peer: SocketAddr = "[fd00::1]:41234".parse().unwrap();
        assert_eq!(peer_ip(peer).to_string(), "fd00::1");
    }

    #[test]
    fn request_version_prints_as_in_the_request_line() {
        assert_eq!(format!("{:?}", axum::http::Version::HTTP_11), "HTTP/1.1");
        assert_eq!(format!("{:?}", axum::http::Version::HTTP_10), "HTTP/1.0");
    }
}
