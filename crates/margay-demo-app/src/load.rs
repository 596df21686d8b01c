//! `load-server` and `load`: the benchmark's server and load generator (`margay-lab bench`).
//!
//! The protocol is deliberately tiny, so the figures measure the network path and not a parser:
//!
//! - A request is [`REQUEST_LEN`] bytes ending in `\n`; the answer is [`RESPONSE_LEN`] bytes
//!   ending in `\n` that start with the server's name (`srv-a ...`), so the client learns which
//!   backend answered. A connection may carry any number of requests.
//! - A connection whose first byte is `S` is a stream: the server counts and discards everything
//!   until the client shuts down its sending side, then answers the byte count as one line.
//!
//! `load` runs for a fixed time with a fixed number of concurrent connections and prints one JSON
//! object: completed requests, failures by kind, the rate, latency percentiles from an
//! HdrHistogram (microseconds, 3 significant digits) and the answers per backend. Modes:
//!
//! - `short`: each request on a new connection (connect, request, answer, close);
//! - `keepalive`: requests back to back on long-lived connections; a connection that fails after
//!   answering at least once counts as broken and is replaced;
//! - `stream`: one connection sends as fast as it can (single-stream throughput);
//! - `short --until NAME`: short requests one at a time until `NAME` answers; prints `ready`
//!   after the first answer, then the wall-clock time (Unix nanoseconds) of the first answer from
//!   `NAME`, for endpoint-change latency.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::cli::{LoadArgs, LoadMode, LoadServerArgs};
use crate::identity::workload_name;

/// Bytes of one request, newline included.
pub const REQUEST_LEN: usize = 32;
/// Bytes of one answer, newline included.
pub const RESPONSE_LEN: usize = 64;
/// Buffer of the stream mode's writes and reads.
const STREAM_CHUNK: usize = 128 * 1024;

pub async fn serve(args: LoadServerArgs) -> Result<()> {
    let name = workload_name(args.name);
    let mut answer = format!("{name} ").into_bytes();
    answer.resize(RESPONSE_LEN - 1, b'.');
    answer.push(b'\n');
    let answer: Arc<[u8]> = answer.into();
    let listener = TcpListener::bind(SocketAddr::new(args.bind, args.port))
        .await
        .with_context(|| format!("load-server: cannot listen on port {}", args.port))?;
    eprintln!(" * load-server {name} on {}", listener.local_addr()?);
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("load-server: accept: {e}");
                continue;
            }
        };
        let answer = Arc::clone(&answer);
        tokio::spawn(async move {
            let _ = serve_connection(socket, &answer).await;
        });
    }
}

async fn serve_connection(mut socket: TcpStream, answer: &[u8]) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let mut first = [0u8; 1];
    if socket.read(&mut first).await? == 0 {
        return Ok(());
    }
    if first[0] == b'S' {
        let mut buf = vec![0u8; STREAM_CHUNK];
        let mut total: u64 = 1;
        loop {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        socket.write_all(format!("{total}\n").as_bytes()).await?;
        return socket.shutdown().await;
    }
    let mut request = [0u8; REQUEST_LEN];
    request[0] = first[0];
    let mut have = 1;
    loop {
        while have < REQUEST_LEN {
            let n = socket.read(&mut request[have..]).await?;
            if n == 0 {
                return Ok(());
            }
            have += n;
        }
        socket.write_all(answer).await?;
        have = 0;
    }
}

/// What went wrong with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The connect was refused or reset.
    Refused,
    /// No answer (connect or request) within the timeout.
    Timeout,
    /// The connection broke (reset, closed early) after it had been answered at least once.
    Broken,
    /// Anything else (unreachable, a short answer...).
    Other,
}

/// The JSON `load` prints.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub mode: String,
    pub target: String,
    pub connections: usize,
    pub seconds: f64,
    pub requests: u64,
    pub failures: BTreeMap<String, u64>,
    /// Completed requests per second.
    pub rate: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Answers per backend name.
    pub backends: BTreeMap<String, u64>,
    /// Stream mode: bytes the server counted, and the rate in Gbit/s.
    pub bytes: u64,
    pub gbit_per_s: f64,
}

struct Shared {
    histogram: Histogram<u64>,
    requests: u64,
    failures: BTreeMap<Failure, u64>,
    backends: BTreeMap<String, u64>,
}

pub async fn run(args: LoadArgs) -> Result<()> {
    let target: SocketAddr = args.target;
    if let Some(name) = &args.until {
        return until(target, name, args.duration, args.timeout).await;
    }
    let report = match args.mode {
        LoadMode::Stream => stream(target, args.duration, args.timeout).await?,
        mode => {
            let connections = usize::try_from(args.connections).unwrap_or(1);
            generate(mode, target, connections, args.duration, args.timeout).await?
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn generate(
    mode: LoadMode,
    target: SocketAddr,
    connections: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<Report> {
    let shared = Arc::new(Mutex::new(Shared {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        requests: 0,
        failures: BTreeMap::new(),
        backends: BTreeMap::new(),
    }));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections.max(1) {
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            match mode {
                LoadMode::Short => short_worker(target, deadline, timeout, &shared).await,
                _ => keepalive_worker(target, deadline, timeout, &shared).await,
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    let s = shared.lock().await;
    let us = |q: f64| s.histogram.value_at_quantile(q) as f64;
    Ok(Report {
        mode: format!("{mode:?}").to_ascii_lowercase(),
        target: target.to_string(),
        connections,
        seconds,
        requests: s.requests,
        failures: s
            .failures
            .iter()
            .map(|(k, v)| (format!("{k:?}").to_ascii_lowercase(), *v))
            .collect(),
        rate: s.requests as f64 / seconds,
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        max_us: s.histogram.max() as f64,
        backends: s.backends.clone(),
        ..Report::default()
    })
}

fn classify(e: &std::io::Error) -> Failure {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted => Failure::Refused,
        TimedOut => Failure::Timeout,
        _ => Failure::Other,
    }
}

/// One request on `socket`: the answer's backend name.
async fn exchange(socket: &mut TcpStream) -> std::io::Result<String> {
    let mut request = [b'r'; REQUEST_LEN];
    request[REQUEST_LEN - 1] = b'\n';
    socket.write_all(&request).await?;
    let mut answer = [0u8; RESPONSE_LEN];
    socket.read_exact(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    Ok(text.split(' ').next().unwrap_or_default().to_owned())
}

async fn with_timeout<T>(
    timeout: Duration,
    f: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
    }
}

async fn short_once(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    with_timeout(timeout, async {
        let mut socket = TcpStream::connect(target).await?;
        socket.set_nodelay(true)?;
        let name = exchange(&mut socket).await?;
        // Close without lingering: the next connection is a new flow, as a client's would be.
        drop(socket);
        Ok(name)
    })
    .await
}

async fn short_worker(
    target: SocketAddr,
    deadline: Instant,
    timeout: Duration,
    shared: &Mutex<Shared>,
) {
    while Instant::now() < deadline {
        let t = Instant::now();
        let result = short_once(target, timeout).await;
        let elapsed = t.elapsed();
        record(shared, result.map_err(|e| classify(&e)), elapsed).await;
    }
}

async fn keepalive_worker(
    target: SocketAddr,
    deadline: Instant,
    timeout: Duration,
    shared: &Mutex<Shared>,
) {
    while Instant::now() < deadline {
        let mut socket = match with_timeout(timeout, TcpStream::connect(target)).await {
            Ok(s) => s,
            Err(e) => {
                record(shared, Err(classify(&e)), Duration::ZERO).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let mut answered = false;
        while Instant::now() < deadline {
            let t = Instant::now();
            match with_timeout(timeout, exchange(&mut socket)).await {
                Ok(name) => {
                    answered = true;
                    record(shared, Ok(name), t.elapsed()).await;
                }
                Err(e) => {
                    let failure = if answered {
                        Failure::Broken
                    } else {
                        classify(&e)
                    };
                    record(shared, Err(failure), t.elapsed()).await;
                    break;
                }
            }
        }
    }
}

async fn record(shared: &Mutex<Shared>, result: Result<String, Failure>, elapsed: Duration) {
    let mut s = shared.lock().await;
    match result {
        Ok(name) => {
            s.requests += 1;
            let us = u64::try_from(elapsed.as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            let _ = s.histogram.record(us.min(60_000_000));
            *s.backends.entry(name).or_default() += 1;
        }
        Err(f) => *s.failures.entry(f).or_default() += 1,
    }
}

async fn stream(target: SocketAddr, duration: Duration, timeout: Duration) -> Result<Report> {
    let mut socket = with_timeout(timeout, TcpStream::connect(target))
        .await
        .with_context(|| format!("cannot connect to {target}"))?;
    let chunk = vec![b'S'; STREAM_CHUNK];
    let started = Instant::now();
    while started.elapsed() < duration {
        socket.write_all(&chunk).await?;
    }
    socket.shutdown().await?;
    let mut reply = String::new();
    with_timeout(timeout, socket.read_to_string(&mut reply)).await?;
    // The server counted what arrived; the time runs until its count came back.
    let seconds = started.elapsed().as_secs_f64();
    let bytes: u64 = reply
        .trim()
        .parse()
        .with_context(|| format!("the server answered {reply:?}, not a byte count"))?;
    Ok(Report {
        mode: "stream".into(),
        target: target.to_string(),
        connections: 1,
        seconds,
        bytes,
        gbit_per_s: bytes as f64 * 8.0 / seconds / 1e9,
        ..Report::default()
    })
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Short requests one after another until `name` answers: `ready <backend>` after the first
/// answer, then `seen <unix ns> <requests> <failures>` (or an error when `limit` passes).
async fn until(target: SocketAddr, name: &str, limit: Duration, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let mut ready = false;
    let (mut requests, mut failures) = (0u64, 0u64);
    while started.elapsed() < limit {
        match short_once(target, timeout).await {
            Ok(backend) => {
                requests += 1;
                if backend == name {
                    println!("seen {} {requests} {failures}", unix_ns());
                    return Ok(());
                }
                if !ready {
                    ready = true;
                    println!("ready {backend}");
                }
            }
            Err(_) => failures += 1,
        }
    }
    bail!(
        "{name} did not answer at {target} within {limit:?} ({requests} answers from others, {failures} failures)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::LoadServerArgs;

    async fn server(name: &str) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let args = LoadServerArgs {
            port: addr.port(),
            bind: addr.ip(),
            name: Some(name.into()),
        };
        tokio::spawn(serve(args));
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_ok() {
                return addr;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("load-server did not start");
    }

    #[tokio::test]
    async fn every_mode_against_a_real_server() {
        let addr = server("srv-t").await;
        let d = Duration::from_millis(300);
        let t = Duration::from_secs(1);
        for mode in [LoadMode::Short, LoadMode::Keepalive] {
            let r = generate(mode, addr, 2, d, t).await.unwrap();
            assert!(r.requests > 10, "{r:?}");
            assert!(r.failures.is_empty(), "{r:?}");
            assert_eq!(r.backends.keys().collect::<Vec<_>>(), ["srv-t"]);
            assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us, "{r:?}");
        }
        let s = stream(addr, d, t).await.unwrap();
        assert!(s.bytes > STREAM_CHUNK as u64, "{s:?}");
        assert!(s.gbit_per_s > 0.0);
    }

    #[tokio::test]
    async fn refused_connections_are_counted_not_fatal() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let r = generate(
            LoadMode::Short,
            addr,
            1,
            Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(r.requests, 0);
        assert!(r.failures.get("refused").copied().unwrap_or(0) > 0, "{r:?}");
    }
}
