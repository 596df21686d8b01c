//! End-to-end tests of the built `margay-demo-app` binary, as child processes on 127.0.0.1
//! ephemeral ports (no root, loopback only). Servers announce their bound addresses on stderr
//! (` * ...: Running on http://ADDR/`, ` * echo: Listening on tcp://ADDR`); their stdout is the
//! access log under test.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use regex::Regex;

const BIN: &str = env!("CARGO_BIN_EXE_margay-demo-app");
const WAIT: Duration = Duration::from_secs(10);
const WERKZEUG_GET: &str = r#"^\d+\.\d+\.\d+\.\d+ - - \[\d\d/[A-Z][a-z]{2}/\d{4} \d\d:\d\d:\d\d\] "GET / HTTP/1.1" 200 -$"#;

const SEED_PAGE: &str = r#"<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
   "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">

<html xmlns="http://www.w3.org/1999/xhtml">
   <head>
      <title>YAO Bank</title>
      <style>
      h2 {
         font-family: Arial, Helvetica, sans-serif;
      }
      h1 {
         font-family: Arial, Helvetica, sans-serif;
      }
      p {
         font-family: Arial, Helvetica, sans-serif;
      }
      </style>
   </head>
   <body>
      <h1>Welcome to YAO Bank</h1>
      <h2>Name: Spike Curtis</h2>
      <h2>Balance: 2389.45</h2>
      <p><a href="/logout">Log Out >></a></p>
   </body>
</html>
"#;

// === test harness ===

/// A server child process, killed on drop (even when the test panics).
struct Server {
    child: Child,
    /// `(scheme, address)` of each announced listener, in announcement order.
    listeners: Vec<(String, SocketAddr)>,
    stdout: Receiver<String>,
}

impl Server {
    /// Starts `margay-demo-app ARGS` and waits until it announced `listeners` listeners.
    fn start(args: &[&str], listeners: usize) -> Self {
        let mut child = command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn margay-demo-app");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        let mut server = Self {
            child,
            listeners: Vec::new(),
            stdout,
        };
        let deadline = Instant::now() + WAIT;
        while server.listeners.len() < listeners {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = stderr
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{args:?} did not announce {listeners} listeners"));
            if let Some(found) = parse_banner(&line) {
                server.listeners.push(found);
            }
        }
        // Keep draining stderr so the child never blocks on a full pipe.
        thread::spawn(move || {
            for line in stderr {
                eprintln!("[server stderr] {line}")
            }
        });
        server
    }

    fn addr(&self, scheme: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(s, _)| s == scheme)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {scheme} listener in {:?}", self.listeners))
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr("http"))
    }

    /// The next access line, within [`WAIT`].
    fn next_line(&self) -> String {
        self.stdout
            .recv_timeout(WAIT)
            .expect("an access line on stdout")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary, with none of the environment variables it reads inherited from the test runner.
fn command() -> Command {
    let mut command = Command::new(BIN);
    for var in [
        "POD_NAME",
        "YAOBANK_LISTEN",
        "YAOBANK_SUMMARY_URL",
        "YAOBANK_DATABASE_URL",
        "YAOBANK_ACCOUNT",
    ] {
        command.env_remove(var);
    }
    command
}

fn lines(pipe: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// ` * customer: Running on http://127.0.0.1:41234/ (Press CTRL+C to quit)` or
/// ` * echo: Listening on udp://127.0.0.1:41234`.
fn parse_banner(line: &str) -> Option<(String, SocketAddr)> {
    let rest = line
        .split_once("Running on ")
        .or_else(|| line.split_once("Listening on "))?
        .1;
    let url = rest.split_whitespace().next()?;
    let (scheme, addr) = url.split_once("://")?;
    Some((scheme.to_owned(), addr.trim_end_matches('/').parse().ok()?))
}

/// A plain HTTP/1.1 GET over std's TcpStream, independent of the crate's own client.
fn raw_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

fn probe(args: &[&str]) -> Output {
    command()
        .arg("probe")
        .args(args)
        .output()
        .expect("run probe")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A loopback port with nothing listening on it (TCP or UDP): bound, then released.
fn closed_tcp_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
}

fn closed_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("ephemeral port")
}

fn echo(name: &str) -> Server {
    Server::start(
        &[
            "echo",
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--name",
            name,
        ],
        3,
    )
}

// === yaobank ===

#[test]
fn yaobank_chain_serves_the_labs_page_and_logs_like_werkzeug() {
    let database = Server::start(&["database", "--listen", "127.0.0.1:0"], 1);
    let database_url = database.url();
    let summary = Server::start(
        &[
            "summary",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &database_url,
        ],
        1,
    );
    let summary_url = summary.url();
    let customer = Server::start(
        &[
            "customer",
            "--listen",
            "127.0.0.1:0",
            "--summary-url",
            &summary_url,
        ],
        1,
    );

    let (status, body) = raw_get(customer.addr("http"), "/");
    assert_eq!(status, 200);
    assert_eq!(body, SEED_PAGE);

    let werkzeug = Regex::new(WERKZEUG_GET).unwrap();
    for (tier, server) in [("customer", &customer), ("summary", &summary)] {
        let line = server.next_line();
        assert!(werkzeug.is_match(&line), "{tier} logged {line:?}");
        assert!(
            line.starts_with("127.0.0.1 - - ["),
            "{tier} logged {line:?}"
        );
    }
    let line = database.next_line();
    assert!(
        line.starts_with("127.0.0.1 - - [")
            && line.ends_with(r#""GET /v2/keys/accounts/519940?recursive=true HTTP/1.1" 200 -"#),
        "database logged {line:?}"
    );

    let (status, body) = raw_get(summary.addr("http"), "/");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"name":"Spike Curtis","balance":"2389.45"}"#);
    let (status, body) = raw_get(customer.addr("http"), "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[test]
fn customer_answers_502_when_summary_is_unreachable() {
    let summary_url = format!("http://{}/", closed_tcp_port());
    let customer = Server::start(
        &[
            "customer",
            "--listen",
            "127.0.0.1:0",
            "--summary-url",
            &summary_url,
        ],
        1,
    );
    let (status, body) = raw_get(customer.addr("http"), "/");
    assert_eq!(status, 502);
    assert!(
        body.contains("summary service at") && body.contains("refused"),
        "body: {body:?}"
    );
    let line = customer.next_line();
    assert!(
        line.ends_with(r#""GET / HTTP/1.1" 502 -"#),
        "logged {line:?}"
    );
}

#[test]
fn database_answers_etcd_v2_keys_and_plain_account_paths() {
    let database = Server::start(&["database", "--listen", "127.0.0.1:0"], 1);
    let addr = database.addr("http");
    let (status, body) = raw_get(addr, "/accounts/spike");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"name":"Spike Curtis","balance":"2389.45"}"#);
    let (status, body) = raw_get(addr, "/v2/keys/accounts/519940/name");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        r#"{"action":"get","node":{"key":"/accounts/519940/name","value":"Spike Curtis","modifiedIndex":5,"createdIndex":5}}"#
    );
    let (status, body) = raw_get(addr, "/v2/keys?recursive=true");
    assert_eq!(status, 200);
    assert!(body.contains(r#""value":"2389.45""#), "{body}");
    let (status, body) = raw_get(addr, "/v2/keys/accounts/42");
    assert_eq!(status, 404);
    assert!(body.contains(r#""errorCode":100"#), "{body}");
}

// === echo and probe ===

#[test]
fn echo_and_probe_over_tcp() {
    let echo = echo("pod-a");
    let target = echo.addr("tcp").to_string();
    let out = probe(&["tcp", &target]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let answer = text(&out.stdout);
    let line = Regex::new(r"^127\.0\.0\.1:(\d+) pod-a\n$").unwrap();
    let port = &line
        .captures(&answer)
        .unwrap_or_else(|| panic!("{answer:?}"))[1];
    // The echo logged the same peer, and the local address it was reached on.
    let logged = echo.next_line();
    assert!(logged.starts_with("127.0.0.1 - - ["), "{logged}");
    assert!(
        logged.ends_with(&format!(r#""TCP {target}" 127.0.0.1:{port}"#)),
        "{logged}"
    );
}

#[test]
fn echo_and_probe_over_udp() {
    let echo = echo("pod-b");
    let out = probe(&["udp", &echo.addr("udp").to_string()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let answer = text(&out.stdout);
    assert!(
        Regex::new(r"^127\.0\.0\.1:\d+ pod-b\n$")
            .unwrap()
            .is_match(&answer),
        "{answer:?}"
    );
    assert!(echo.next_line().contains(r#""UDP 127.0.0.1:"#));
}

#[test]
fn echo_and_probe_over_http() {
    let echo = echo("pod-c");
    let out = probe(&["http", &echo.url()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let answer = text(&out.stdout);
    assert!(
        Regex::new(r"^127\.0\.0\.1:\d+ pod-c\n$")
            .unwrap()
            .is_match(&answer),
        "{answer:?}"
    );
    let logged = echo.next_line();
    assert!(
        Regex::new(WERKZEUG_GET).unwrap().is_match(&logged),
        "{logged}"
    );
}

#[test]
fn probe_count_makes_a_new_connection_each_time() {
    let echo = echo("pod-d");
    for proto in ["tcp", "udp"] {
        let target = echo.addr(proto).to_string();
        let out = probe(&[proto, &target, "--count", "3", "--interval", "10ms"]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        let answers = text(&out.stdout);
        let mut ports: Vec<&str> = answers
            .lines()
            .map(|l| l.split([':', ' ']).nth(1).expect("a port"))
            .collect();
        assert_eq!(ports.len(), 3, "{proto}: {answers:?}");
        ports.dedup();
        assert_eq!(ports.len(), 3, "{proto}: source ports repeat: {answers:?}");
    }
}

#[test]
fn probe_resolves_names_with_the_system_resolver() {
    // "localhost" comes from /etc/hosts through getaddrinfo: no DNS traffic. It may resolve to
    // ::1 first; the probe then tries 127.0.0.1, where the echo listens.
    let echo = echo("pod-e");
    let port = echo.addr("tcp").port();
    let out = probe(&["tcp", &format!("localhost:{port}")]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with(" pod-e\n"));
}

#[test]
fn echo_answers_a_client_that_speaks_first_without_a_reset() {
    let echo = echo("pod-f");
    let mut stream = TcpStream::connect(echo.addr("tcp")).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.write_all(b"hello, are you there?\n").expect("send");
    thread::sleep(Duration::from_millis(100));
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("a clean close, not a reset");
    let local = stream.local_addr().expect("local address");
    assert_eq!(answer, format!("{local} pod-f\n"));
}

#[test]
fn probe_exits_3_when_refused() {
    let tcp = closed_tcp_port().to_string();
    let udp = closed_udp_port().to_string();
    let url = format!("http://{tcp}/");
    for args in [["tcp", &tcp], ["udp", &udp], ["http", &url]] {
        let out = probe(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("refused: "), "{args:?}: {stderr}");
    }
}

#[test]
fn probe_exits_4_on_timeout() {
    // Listening but never accepting nor answering: the kernel completes the TCP handshake, so
    // the probe connects and then waits in vain for an answer. The UDP socket never replies.
    let silent_tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let tcp = silent_tcp.local_addr().expect("addr").to_string();
    let udp = silent_udp.local_addr().expect("addr").to_string();
    let url = format!("http://{tcp}/");
    for args in [["tcp", &tcp], ["udp", &udp], ["http", &url]] {
        let started = Instant::now();
        let out = probe(&[args[0], args[1], "--timeout", "300ms"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(stderr.starts_with("timeout: "), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?}");
        // A TCP probe that connected names its flow, to find it in a capture.
        if args[0] == "tcp" {
            assert!(stderr.contains("(local 127.0.0.1:"), "{stderr}");
        }
    }
}

#[test]
fn probe_count_says_which_attempt_failed_and_when() {
    let tcp = closed_tcp_port().to_string();
    let out = probe(&["tcp", &tcp, "--count", "2", "--interval", "10ms"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    for (n, line) in lines.iter().enumerate() {
        assert!(line.starts_with("refused: "), "{line}");
        let suffix = Regex::new(&format!(
            r" \(attempt {} of 2, started \d+\.\d{{3}} s in\)$",
            n + 1
        ))
        .unwrap();
        assert!(suffix.is_match(line), "{line}");
    }
}

#[test]
fn probe_exits_2_on_usage_errors() {
    for args in [
        &["tcp", "no-port"][..],
        &["udp", "host:http"],
        &["http", "https://summary/"],
        &["tcp", "127.0.0.1:1", "--count", "0"],
        &["tcp", "127.0.0.1:1", "--timeout", "soon"],
    ] {
        let out = probe(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn probe_exits_5_when_the_name_does_not_resolve() {
    // In a new, empty network namespace (an unprivileged user namespace maps us to root in it)
    // no resolver is reachable, so getaddrinfo fails at once and no packet leaves the machine.
    // Skipped where user namespaces are not allowed.
    let isolated = |args: &[&str]| Command::new("unshare").arg("-rn").args(args).output();
    if !isolated(&["true"]).is_ok_and(|out| out.status.success()) {
        eprintln!("skipped: `unshare -rn` is not available here");
        return;
    }
    for args in [
        &["tcp", "summary.yaobank.svc.cluster.local:80"][..],
        &["udp", "kube-dns.kube-system:53"],
        &["http", "http://summary/"],
    ] {
        let out = isolated(&[&[BIN, "probe"][..], args, &["--timeout", "2s"]].concat())
            .expect("run probe in a new network namespace");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {stderr}");
        assert!(stderr.starts_with("dns: lookup "), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
}
