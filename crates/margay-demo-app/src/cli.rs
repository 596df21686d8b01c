//! Command-line arguments: clap derives, parsed into typed values (addresses, durations) here so
//! that the subcommands never see a raw string they would have to validate again.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::duration::parse_duration;

/// The workloads of Margay's lab pods: the yaobank demo and connectivity-test tools.
#[derive(Debug, Parser)]
#[command(name = "margay-demo-app", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// yaobank front end: the "YAO Bank" page, with Name and Balance from the summary service.
    Customer(CustomerArgs),
    /// yaobank middle tier: GET / answers {"name", "balance"} read from the database.
    Summary(SummaryArgs),
    /// yaobank database: account data over a read-only subset of etcd's v2 keys API.
    Database(DatabaseArgs),
    /// Connectivity-test server: answers `<peer-ip>:<peer-port> <name>` on TCP, UDP and HTTP.
    Echo(EchoArgs),
    /// Connectivity-test client: prints what the server answered; exit codes classify failures
    /// (3 refused/reset, 4 timeout, 5 DNS, 1 other, 2 usage).
    Probe(ProbeArgs),
    /// Benchmark server: answers fixed-size requests on kept-alive connections, counts streams.
    LoadServer(LoadServerArgs),
    /// Benchmark load generator: short or kept-alive requests, or one stream, for a fixed time;
    /// prints rate, latency percentiles and failures as JSON.
    Load(LoadArgs),
}

#[derive(Debug, Args)]
pub struct LoadServerArgs {
    /// TCP port to serve.
    #[arg(long, default_value_t = 9000)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Name at the start of each answer [default: the host name].
    #[arg(long, env = "POD_NAME")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadMode {
    /// A new connection per request: connect, request, answer, close.
    Short,
    /// Requests back to back on long-lived connections.
    Keepalive,
    /// One connection sending as fast as it can (throughput).
    Stream,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// IP:PORT of a load-server (or of a Service in front of one).
    pub target: SocketAddr,
    #[arg(long, value_enum, default_value = "short")]
    pub mode: LoadMode,
    /// How long to run (with --until: how long to wait at most).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent connections (short, keepalive).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub connections: u64,
    /// Limit of each connect and each request.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Short requests one at a time until this backend answers; prints when it did.
    #[arg(long, value_name = "NAME")]
    pub until: Option<String>,
}

#[derive(Debug, Args)]
pub struct CustomerArgs {
    /// Address to listen on.
    #[arg(long, env = "YAOBANK_LISTEN", default_value = "0.0.0.0:80")]
    pub listen: SocketAddr,
    /// The summary service's URL (http only), resolved with the system resolver per request.
    #[arg(
        long,
        env = "YAOBANK_SUMMARY_URL",
        default_value = "http://summary:80/"
    )]
    pub summary_url: String,
    /// How long to wait for the summary service (DNS, connect and answer) per request.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct SummaryArgs {
    /// Address to listen on.
    #[arg(long, env = "YAOBANK_LISTEN", default_value = "0.0.0.0:80")]
    pub listen: SocketAddr,
    /// The database's base URL (an etcd v2 keys API; `margay-demo-app database` or etcd itself).
    #[arg(
        long,
        env = "YAOBANK_DATABASE_URL",
        default_value = "http://database:2379/"
    )]
    pub database_url: String,
    /// The account whose summary GET / answers.
    #[arg(long, env = "YAOBANK_ACCOUNT", default_value = "519940")]
    pub account: String,
    /// How long to wait for the database (DNS, connect and answer) per request.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// Address to listen on.
    #[arg(long, env = "YAOBANK_LISTEN", default_value = "0.0.0.0:2379")]
    pub listen: SocketAddr,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("ports").required(true).multiple(true).args(["tcp", "udp", "http"])))]
pub struct EchoArgs {
    /// TCP port to serve (PORT or ADDR:PORT; repeatable): write the line, then close.
    #[arg(long, value_name = "PORT")]
    pub tcp: Vec<ListenSpec>,
    /// UDP port to serve (PORT or ADDR:PORT; repeatable): reply to each datagram with the line.
    #[arg(long, value_name = "PORT")]
    pub udp: Vec<ListenSpec>,
    /// HTTP port to serve (PORT or ADDR:PORT; repeatable): GET / answers the line.
    #[arg(long, value_name = "PORT")]
    pub http: Vec<ListenSpec>,
    /// Address that bare PORTs bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Name put after the peer in each answer [default: the host name].
    #[arg(long, env = "POD_NAME")]
    pub name: Option<String>,
}

/// `PORT` (bound on `--bind`) or `ADDR:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: Option<IpAddr>,
    pub port: u16,
}

impl ListenSpec {
    pub fn socket_addr(self, default_ip: IpAddr) -> SocketAddr {
        SocketAddr::new(self.addr.unwrap_or(default_ip), self.port)
    }
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(port) = s.parse::<u16>() {
            return Ok(Self { addr: None, port });
        }
        match s.parse::<SocketAddr>() {
            Ok(sa) => Ok(Self {
                addr: Some(sa.ip()),
                port: sa.port(),
            }),
            Err(_) => Err(format!(
                "{s:?} is neither a port nor an ADDR:PORT (e.g. 8080, 127.0.0.1:8080, [::1]:8080)"
            )),
        }
    }
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(subcommand)]
    pub target: ProbeTarget,
}

#[derive(Debug, Subcommand)]
pub enum ProbeTarget {
    /// Connect, print the first line the server sends, close.
    Tcp(SocketProbeArgs),
    /// Send one datagram, print the reply.
    Udp(UdpProbeArgs),
    /// GET the URL, print the body (a non-2xx answer is a failure, exit 1).
    Http(HttpProbeArgs),
}

#[derive(Debug, Args)]
pub struct SocketProbeArgs {
    /// HOST:PORT; HOST is resolved with the system resolver (so /etc/resolv.conf's search path).
    #[arg(value_name = "HOST:PORT")]
    pub target: String,
    #[command(flatten)]
    pub common: ProbeCommon,
}

#[derive(Debug, Args)]
pub struct UdpProbeArgs {
    /// HOST:PORT; HOST is resolved with the system resolver (so /etc/resolv.conf's search path).
    #[arg(value_name = "HOST:PORT")]
    pub target: String,
    /// Send every attempt from one socket (one source port: one UDP flow), resolved and
    /// connected once, instead of a new socket each time. A reply that comes after its
    /// attempt's timeout is read by the next attempt.
    #[arg(long)]
    pub one_socket: bool,
    #[command(flatten)]
    pub common: ProbeCommon,
}

#[derive(Debug, Args)]
pub struct HttpProbeArgs {
    /// http://HOST[:PORT][/PATH]
    pub url: String,
    #[command(flatten)]
    pub common: ProbeCommon,
}

#[derive(Debug, Clone, Args)]
pub struct ProbeCommon {
    /// Limit for each attempt: name lookup, then connect and answer (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Attempts, each on a new connection (new socket), one output line each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Pause between attempts.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub interval: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_spec_accepts_port_and_socket_address() {
        assert_eq!(
            "8080".parse::<ListenSpec>(),
            Ok(ListenSpec {
                addr: None,
                port: 8080
            })
        );
        let spec: ListenSpec = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            spec.socket_addr(IpAddr::from([0, 0, 0, 0])).to_string(),
            "127.0.0.1:0"
        );
        let spec: ListenSpec = "[::1]:53".parse().unwrap();
        assert_eq!(
            spec.socket_addr(IpAddr::from([0, 0, 0, 0])).to_string(),
            "[::1]:53"
        );
        assert!("localhost:80".parse::<ListenSpec>().is_err());
        assert!("70000".parse::<ListenSpec>().is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
