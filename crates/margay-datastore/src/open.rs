//! Opening a datastore from the URL users configure (`--datastore`, `MARGAY_DATASTORE`), or from
//! calicoctl's environment.
//!
//! A URL rather than a bare path so that one setting names either backend:
//! `sqlite:///var/lib/margay/margay.db` for the embedded store, `etcd://host:2379,host:2379` for
//! a shared etcd. What a URL should not carry (certificates, passwords: URLs end up in process
//! listings and logs) comes from the environment variables calicoctl users already set:
//! `ETCD_CA_CERT_FILE`, `ETCD_CERT_FILE`, `ETCD_KEY_FILE`, `ETCD_USERNAME`, `ETCD_PASSWORD`.
//! [`datastore_url`] also accepts calicoctl's `DATASTORE_TYPE=etcdv3` + `ETCD_ENDPOINTS`, so that
//! an environment set up for calicoctl works for Margay unchanged.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{Datastore, Error};
use crate::etcd::{EtcdDatastore, EtcdOptions, EtcdTls};
use crate::sqlite::SqliteDatastore;

/// The store used when none is configured: the SQLite file every process on the node shares.
pub const DEFAULT_DATASTORE_URL: &str = "sqlite:///var/lib/margay/margay.db";

/// The port etcd clients use when an endpoint names none (etcd's and calicoctl's default).
pub const DEFAULT_ETCD_PORT: u16 = 2379;

/// The endpoint calicoctl uses for `DATASTORE_TYPE=etcdv3` without `ETCD_ENDPOINTS`.
const CALICOCTL_DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// What a datastore URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Sqlite(PathBuf),
    Etcd(EtcdOptions),
}

/// Looks up an environment variable; the process environment in production, a table in tests
/// (tests run in parallel threads, which must not change the process environment).
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Opens the datastore named by `url`.
///
/// Accepted forms:
///
/// - `sqlite:///absolute/path.db` and `sqlite://relative/path.db` (relative to the working
///   directory);
/// - `etcd://HOST[:PORT][,HOST[:PORT]...]`: plain HTTP, or TLS when any of `ETCD_CA_CERT_FILE`,
///   `ETCD_CERT_FILE`, `ETCD_KEY_FILE` is set; `etcd+https://...` always uses TLS (and needs
///   `ETCD_CA_CERT_FILE`), `etcd+http://...` never does; `etcdv3://` is `etcd://`. The port
///   defaults to 2379. `ETCD_USERNAME` and `ETCD_PASSWORD` log in to an etcd with auth enabled.
///
/// An etcd store is contacted before this returns, so that a wrong address, certificate or
/// password is reported here.
pub async fn open(url: &str) -> Result<Arc<dyn Datastore>, Error> {
    match parse_with(url, &process_env)? {
        Target::Sqlite(path) => {
            let store = tokio::task::spawn_blocking(move || SqliteDatastore::open(&path))
                .await
                .map_err(|e| Error::Unavailable(format!("opening the datastore failed: {e}")))??;
            Ok(Arc::new(store))
        }
        Target::Etcd(options) => Ok(Arc::new(EtcdDatastore::connect(options).await?)),
    }
}

/// The datastore URL to use: `explicit` (from `--datastore` or `MARGAY_DATASTORE`) when given;
/// otherwise calicoctl's settings (`DATASTORE_TYPE=etcdv3`, `ETCD_ENDPOINTS`) when present;
/// otherwise [`DEFAULT_DATASTORE_URL`].
pub fn datastore_url(explicit: Option<&str>) -> Result<String, Error> {
    datastore_url_with(explicit, &process_env)
}

fn datastore_url_with(explicit: Option<&str>, env: Env<'_>) -> Result<String, Error> {
    if let Some(url) = explicit {
        return Ok(url.to_owned());
    }
    let endpoints = env("ETCD_ENDPOINTS");
    match env("DATASTORE_TYPE")
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        // calicoctl's default type is etcdv3, so ETCD_ENDPOINTS alone means etcd too.
        None if endpoints.is_none() => Ok(DEFAULT_DATASTORE_URL.to_owned()),
        None | Some("etcdv3") => {
            etcd_url_from_endpoints(endpoints.as_deref().unwrap_or(CALICOCTL_DEFAULT_ENDPOINT))
        }
        Some("kubernetes") => Err(Error::Invalid(
            "DATASTORE_TYPE=kubernetes is not supported by Margay; use DATASTORE_TYPE=etcdv3 \
             with ETCD_ENDPOINTS, or --datastore"
                .to_owned(),
        )),
        Some(other) => Err(Error::Invalid(format!(
            "unknown DATASTORE_TYPE {other:?}; Margay understands etcdv3 (with ETCD_ENDPOINTS), \
             or use --datastore URL"
        ))),
    }
}

/// Turns calicoctl's `ETCD_ENDPOINTS` (`http://h:2379,https://h2:2379`) into a datastore URL.
fn etcd_url_from_endpoints(endpoints: &str) -> Result<String, Error> {
    let mut hosts = Vec::new();
    let mut schemes = Vec::new();
    for entry in endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let (scheme, host) = match entry.split_once("://") {
            Some((scheme, host)) => (scheme.to_ascii_lowercase(), host),
            None => (String::new(), entry),
        };
        if !matches!(scheme.as_str(), "" | "http" | "https") {
            return Err(Error::Invalid(format!(
                "ETCD_ENDPOINTS entry {entry:?} is not an http:// or https:// URL"
            )));
        }
        schemes.push(scheme);
        hosts.push(host.trim_end_matches('/'));
    }
    if hosts.is_empty() {
        return Err(Error::Invalid(
            "ETCD_ENDPOINTS names no endpoint; set it to e.g. http://127.0.0.1:2379".to_owned(),
        ));
    }
    let scheme = if schemes.iter().all(|s| s == "https") {
        "etcd+https"
    } else if schemes.iter().all(|s| s == "http") {
        "etcd+http"
    } else if schemes.iter().all(String::is_empty) {
        "etcd"
    } else {
        return Err(Error::Invalid(format!(
            "ETCD_ENDPOINTS {endpoints:?} mixes schemes; use http:// or https:// for all"
        )));
    };
    Ok(format!("{scheme}://{}", hosts.join(",")))
}

/// Where a datastore URL leads, for checks that care about the path to the store rather than
/// about opening it (the node agent's BPF preflight: is the store reached through a Service
/// address the node programs itself?).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file on this machine.
    LocalFile(PathBuf),
    /// An etcd on a unix socket of this machine.
    UnixSocket(PathBuf),
    /// etcd endpoints reached over the network: (host as written, port).
    Endpoints(Vec<(String, u16)>),
}

/// Where `url` leads (the same parsing as [`open`], environment included, without connecting).
pub fn location(url: &str) -> Result<Location, Error> {
    match parse_with(url, &process_env)? {
        Target::Sqlite(path) => Ok(Location::LocalFile(path)),
        Target::Etcd(options) => {
            let mut endpoints = Vec::new();
            for e in &options.endpoints {
                if let Some(path) = e.strip_prefix("unix://") {
                    return Ok(Location::UnixSocket(PathBuf::from(path)));
                }
                let host_port = e.split_once("://").map_or(e.as_str(), |(_, rest)| rest);
                let (host, port) = host_port.rsplit_once(':').ok_or_else(|| {
                    Error::Invalid(format!("the endpoint {e:?} in {url:?} is not HOST:PORT"))
                })?;
                let port = port.parse::<u16>().map_err(|_| {
                    Error::Invalid(format!("the endpoint {e:?} in {url:?} is not HOST:PORT"))
                })?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                endpoints.push((host.to_owned(), port));
            }
            Ok(Location::Endpoints(endpoints))
        }
    }
}

#[cfg(test)]
fn parse(url: &str) -> Result<Target, Error> {
    parse_with(url, &|_| None)
}

fn parse_with(url: &str, env: Env<'_>) -> Result<Target, Error> {
    if url.trim().is_empty() {
        return Err(Error::Invalid(format!(
            "the datastore URL is empty; use for example {DEFAULT_DATASTORE_URL}"
        )));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        if url.starts_with('/') {
            return Err(Error::Invalid(format!(
                "the datastore URL {url:?} is a path, not a URL; write sqlite://{url}"
            )));
        }
        if let Some(path) = url.strip_prefix("sqlite:") {
            return Err(Error::Invalid(format!(
                "the datastore URL {url:?} is missing the // after sqlite:; write \
                 sqlite://{path} (an absolute path gives three slashes: sqlite:///var/lib/margay/margay.db)"
            )));
        }
        return Err(Error::Invalid(format!(
            "the datastore URL {url:?} has no scheme; use sqlite:///absolute/path.db \
             (for example {DEFAULT_DATASTORE_URL})"
        )));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => {
            if rest.is_empty() {
                return Err(Error::Invalid(format!(
                    "the datastore URL {url:?} names no file; use sqlite:///absolute/path.db \
                     (for example {DEFAULT_DATASTORE_URL})"
                )));
            }
            if rest.ends_with('/') {
                return Err(Error::Invalid(format!(
                    "the datastore URL {url:?} names a directory; name the database file, \
                     for example sqlite://{rest}margay.db"
                )));
            }
            Ok(Target::Sqlite(PathBuf::from(rest)))
        }
        "etcd" | "etcdv3" => parse_etcd(url, rest, None, env),
        "etcd+http" => parse_etcd(url, rest, Some(false), env),
        "etcd+https" => parse_etcd(url, rest, Some(true), env),
        "etcd+unix" => parse_etcd_unix(url, rest, env),
        _ => Err(Error::Invalid(format!(
            "unsupported datastore URL scheme {scheme:?} in {url:?}; supported: \
             sqlite:///absolute/path.db (for example {DEFAULT_DATASTORE_URL}) and \
             etcd://HOST:PORT[,HOST:PORT...] or etcd+unix:///path/to/socket"
        ))),
    }
}

/// `etcd+unix:///absolute/path`: one etcd reached through a unix socket (the lab's etcd, which
/// serves every network namespace of the machine without a TCP port in any of them). Plain
/// gRPC over the socket (the socket file's permissions are the protection); user and password
/// from the environment as for TCP.
fn parse_etcd_unix(url: &str, rest: &str, env: Env<'_>) -> Result<Target, Error> {
    if !rest.starts_with('/') || rest.len() == 1 {
        return Err(Error::Invalid(format!(
            "the datastore URL {url:?} names no socket; write etcd+unix:///absolute/path/to/socket"
        )));
    }
    if rest.contains([',', '?', '#', '@']) {
        return Err(Error::Invalid(format!(
            "the datastore URL {url:?} names more than a socket path; etcd+unix:// takes exactly \
             one absolute path (credentials go in ETCD_USERNAME and ETCD_PASSWORD)"
        )));
    }
    if ["ETCD_CA_CERT_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"]
        .iter()
        .any(|name| env(name).is_some())
    {
        return Err(Error::Invalid(format!(
            "the datastore URL {url:?} is a unix socket, which Margay does not speak TLS over, \
             but ETCD_CA_CERT_FILE, ETCD_CERT_FILE or ETCD_KEY_FILE is set; unset them"
        )));
    }
    let credentials = match (env("ETCD_USERNAME"), env("ETCD_PASSWORD")) {
        (Some(user), password) => Some((user, password.unwrap_or_default())),
        (None, Some(_)) => {
            return Err(Error::Invalid(
                "ETCD_PASSWORD is set without ETCD_USERNAME".to_owned(),
            ));
        }
        (None, None) => None,
    };
    let mut options = EtcdOptions::new(&[format!("unix://{rest}")]);
    options.credentials = credentials;
    Ok(Target::Etcd(options))
}

/// Parses the endpoints of an etcd URL and adds calicoctl's TLS and auth variables. `tls` is
/// what the scheme demands: always, never, or (`None`) when TLS files are configured.
fn parse_etcd(url: &str, rest: &str, tls: Option<bool>, env: Env<'_>) -> Result<Target, Error> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        return Err(Error::Invalid(format!(
            "the datastore URL {url:?} carries credentials; put them in ETCD_USERNAME and \
             ETCD_PASSWORD instead (URLs end up in process listings and logs)"
        )));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(Error::Invalid(format!(
            "the datastore URL {url:?} has a path or query; an etcd URL names endpoints only: \
             etcd://HOST:PORT[,HOST:PORT...]"
        )));
    }
    let mut hosts = Vec::new();
    for host in rest.split(',').map(str::trim) {
        if host.is_empty() {
            return Err(Error::Invalid(format!(
                "the datastore URL {url:?} has an empty endpoint; write \
                 etcd://HOST:PORT[,HOST:PORT...]"
            )));
        }
        hosts.push(with_port(url, host)?);
    }
    let file = |name: &str| env(name).map(PathBuf::from);
    let files = EtcdTls {
        ca_cert_file: file("ETCD_CA_CERT_FILE"),
        cert_file: file("ETCD_CERT_FILE"),
        key_file: file("ETCD_KEY_FILE"),
    };
    let files_set = files != EtcdTls::default();
    let use_tls = match tls {
        Some(false) if files_set => {
            return Err(Error::Invalid(format!(
                "the datastore URL {url:?} asks for plain HTTP but ETCD_CA_CERT_FILE, \
                 ETCD_CERT_FILE or ETCD_KEY_FILE is set; use etcd+https:// (or etcd://) for TLS, \
                 or unset them"
            )));
        }
        Some(forced) => forced,
        None => files_set,
    };
    if use_tls {
        if files.ca_cert_file.is_none() {
            return Err(Error::Invalid(format!(
                "TLS to etcd ({url:?}) needs the CA that signed etcd's certificate: set \
                 ETCD_CA_CERT_FILE"
            )));
        }
        if files.cert_file.is_some() != files.key_file.is_some() {
            return Err(Error::Invalid(
                "a client certificate needs both ETCD_CERT_FILE and ETCD_KEY_FILE".to_owned(),
            ));
        }
    }
    let credentials = match (env("ETCD_USERNAME"), env("ETCD_PASSWORD")) {
        (Some(user), password) => Some((user, password.unwrap_or_default())),
        (None, Some(_)) => {
            return Err(Error::Invalid(
                "ETCD_PASSWORD is set without ETCD_USERNAME".to_owned(),
            ));
        }
        (None, None) => None,
    };
    let scheme = if use_tls { "https" } else { "http" };
    let endpoints: Vec<String> = hosts.iter().map(|h| format!("{scheme}://{h}")).collect();
    let mut options = EtcdOptions::new(&endpoints);
    options.tls = use_tls.then_some(files);
    options.credentials = credentials;
    Ok(Target::Etcd(options))
}

/// `host` with the default port added when it names none (`[::1]` and `::1`-style IPv6
/// literals need brackets to carry a port).
fn with_port(url: &str, host: &str) -> Result<String, Error> {
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((_, "")) => (host, None),
            Some((_, rest)) => match rest.strip_prefix(':') {
                Some(port) => (&host[..host.len() - port.len() - 1], Some(port)),
                None => (host, Some(rest)),
            },
            None => (host, Some("")),
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') => (name, Some(port)),
            Some(_) => {
                return Err(Error::Invalid(format!(
                    "the endpoint {host:?} in {url:?} looks like an IPv6 address; write it in \
                     brackets: [{host}]:{DEFAULT_ETCD_PORT}"
                )));
            }
            None => (host, None),
        }
    };
    match port {
        None => Ok(format!("{name}:{DEFAULT_ETCD_PORT}")),
        Some(port) if port.parse::<u16>().is_ok_and(|p| p != 0) && !name.is_empty() => {
            Ok(format!("{name}:{port}"))
        }
        Some(_) => Err(Error::Invalid(format!(
            "the endpoint {host:?} in {url:?} is not HOST:PORT"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(url: &str) -> String {
        match parse(url) {
            Err(Error::Invalid(msg)) => msg,
            other => panic!("{url:?}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn locations_name_files_sockets_and_endpoints() {
        assert_eq!(
            location("sqlite:///var/lib/margay/margay.db").unwrap(),
            Location::LocalFile(PathBuf::from("/var/lib/margay/margay.db"))
        );
        assert_eq!(
            location("etcd+unix:///run/x/etcd.sock:2379").unwrap(),
            Location::UnixSocket(PathBuf::from("/run/x/etcd.sock:2379"))
        );
        assert_eq!(
            location("etcd+http://10.96.0.10,etcd.example:4001,[fd00::1]:2379").unwrap(),
            Location::Endpoints(vec![
                ("10.96.0.10".to_owned(), 2379),
                ("etcd.example".to_owned(), 4001),
                ("fd00::1".to_owned(), 2379),
            ])
        );
        assert!(location("etcd://").is_err());
    }

    #[test]
    fn sqlite_urls_name_files() {
        assert_eq!(
            parse(DEFAULT_DATASTORE_URL),
            Ok(Target::Sqlite(PathBuf::from("/var/lib/margay/margay.db")))
        );
        assert_eq!(
            parse("sqlite://data/margay.db"),
            Ok(Target::Sqlite(PathBuf::from("data/margay.db")))
        );
        assert_eq!(
            parse("SQLite:///tmp/x.db"),
            Ok(Target::Sqlite(PathBuf::from("/tmp/x.db")))
        );
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        assert!(
            invalid("/var/lib/margay/margay.db").contains("sqlite:///var/lib/margay/margay.db")
        );
        assert!(invalid("sqlite:/tmp/x.db").contains("sqlite:///tmp/x.db"));
        assert!(invalid("margay.db").contains("no scheme"));
        assert!(invalid("").contains("empty"));
        assert!(invalid("sqlite://").contains("names no file"));
        assert!(invalid("sqlite:///var/lib/margay/").contains("directory"));
        assert!(invalid("postgres://db/margay").contains("unsupported"));
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn etcd(url: &str, vars: &[(&str, &str)]) -> EtcdOptions {
        match parse_with(url, &env_of(vars)) {
            Ok(Target::Etcd(options)) => options,
            other => panic!("{url:?}: expected etcd options, got {other:?}"),
        }
    }

    fn etcd_invalid(url: &str, vars: &[(&str, &str)]) -> String {
        match parse_with(url, &env_of(vars)) {
            Err(Error::Invalid(msg)) => msg,
            other => panic!("{url:?}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn etcd_urls_name_endpoints() {
        let one = etcd("etcd://127.0.0.1:2379", &[]);
        assert_eq!(one.endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(one.tls, None);
        assert_eq!(one.credentials, None);
        assert_eq!(one.describe(), "etcd://127.0.0.1:2379");

        let many = etcd(
            "etcd://10.0.0.1:2379,etcd-2,[fd00::3]:12379,[fd00::4]/",
            &[],
        );
        assert_eq!(
            many.endpoints,
            vec![
                "http://10.0.0.1:2379",
                "http://etcd-2:2379",
                "http://[fd00::3]:12379",
                "http://[fd00::4]:2379"
            ]
        );
        assert_eq!(
            etcd("etcdv3://h:1", &[]).endpoints,
            etcd("ETCD+HTTP://h:1", &[]).endpoints
        );
    }

    #[test]
    fn etcd_unix_urls_name_one_socket() {
        let options = etcd("etcd+unix:///run/margay-lab/x/etcd.sock:2379", &[]);
        assert_eq!(
            options.endpoints,
            ["unix:///run/margay-lab/x/etcd.sock:2379"]
        );
        assert_eq!(options.tls, None);
        assert_eq!(
            options.describe(),
            "etcd+unix:///run/margay-lab/x/etcd.sock:2379"
        );
        let with_user = etcd(
            "etcd+unix:///s",
            &[("ETCD_USERNAME", "u"), ("ETCD_PASSWORD", "p")],
        );
        assert_eq!(
            with_user.credentials,
            Some(("u".to_owned(), "p".to_owned()))
        );
        assert!(etcd_invalid("etcd+unix://", &[]).contains("names no socket"));
        assert!(etcd_invalid("etcd+unix://relative.sock", &[]).contains("absolute"));
        assert!(etcd_invalid("etcd+unix:///a,/b", &[]).contains("exactly one"));
        assert!(
            etcd_invalid("etcd+unix:///s", &[("ETCD_CA_CERT_FILE", "/ca.pem")])
                .contains("unset them")
        );
    }

    #[test]
    fn etcd_tls_and_credentials_come_from_calicoctls_variables() {
        let vars = [
            ("ETCD_CA_CERT_FILE", "/etc/calico/ca.pem"),
            ("ETCD_CERT_FILE", "/etc/calico/cert.pem"),
            ("ETCD_KEY_FILE", "/etc/calico/key.pem"),
            ("ETCD_USERNAME", "margay"),
            ("ETCD_PASSWORD", "s3cret"),
        ];
        let options = etcd("etcd://h1:2379,h2:2379", &vars);
        assert_eq!(
            options.endpoints,
            vec!["https://h1:2379", "https://h2:2379"]
        );
        assert_eq!(
            options.tls,
            Some(EtcdTls {
                ca_cert_file: Some(PathBuf::from("/etc/calico/ca.pem")),
                cert_file: Some(PathBuf::from("/etc/calico/cert.pem")),
                key_file: Some(PathBuf::from("/etc/calico/key.pem")),
            })
        );
        assert_eq!(
            options.credentials,
            Some(("margay".to_owned(), "s3cret".to_owned()))
        );
        // The password shows nowhere.
        assert_eq!(
            options.describe(),
            "etcd+https://h1:2379,h2:2379 (user margay)"
        );
        assert!(!format!("{options:?}").contains("s3cret"));

        // A CA alone: TLS without a client certificate.
        let ca_only = etcd("etcd+https://h:2379", &vars[..1]);
        assert_eq!(ca_only.tls.unwrap().cert_file, None);
    }

    #[test]
    fn bad_etcd_settings_say_what_to_do() {
        assert!(etcd_invalid("etcd+https://h:2379", &[]).contains("ETCD_CA_CERT_FILE"));
        assert!(
            etcd_invalid("etcd+http://h:2379", &[("ETCD_CA_CERT_FILE", "/ca.pem")])
                .contains("plain HTTP")
        );
        assert!(
            etcd_invalid("etcd://h:2379", &[("ETCD_CERT_FILE", "/c.pem")])
                .contains("ETCD_CA_CERT_FILE")
        );
        assert!(
            etcd_invalid(
                "etcd://h:2379",
                &[
                    ("ETCD_CA_CERT_FILE", "/ca.pem"),
                    ("ETCD_CERT_FILE", "/c.pem")
                ]
            )
            .contains("ETCD_KEY_FILE")
        );
        assert!(
            etcd_invalid("etcd://h:2379", &[("ETCD_PASSWORD", "pw")]).contains("ETCD_USERNAME")
        );
        assert!(etcd_invalid("etcd://root:pw@h:2379", &[]).contains("ETCD_PASSWORD"));
        assert!(etcd_invalid("etcd://h:2379/calico", &[]).contains("endpoints only"));
        assert!(etcd_invalid("etcd://", &[]).contains("empty endpoint"));
        assert!(etcd_invalid("etcd://a,,b", &[]).contains("empty endpoint"));
        assert!(etcd_invalid("etcd://h:port", &[]).contains("HOST:PORT"));
        assert!(etcd_invalid("etcd://h:0", &[]).contains("HOST:PORT"));
        assert!(etcd_invalid("etcd://fd00::1", &[]).contains("brackets"));
    }

    #[test]
    fn calicoctl_environment_selects_etcd() {
        let url = |explicit: Option<&str>, vars: &[(&str, &str)]| {
            datastore_url_with(explicit, &env_of(vars))
        };
        assert_eq!(url(None, &[]).unwrap(), DEFAULT_DATASTORE_URL);
        // --datastore / MARGAY_DATASTORE wins.
        assert_eq!(
            url(Some("sqlite:///x.db"), &[("DATASTORE_TYPE", "etcdv3")]).unwrap(),
            "sqlite:///x.db"
        );
        assert_eq!(
            url(
                None,
                &[
                    ("DATASTORE_TYPE", "etcdv3"),
                    (
                        "ETCD_ENDPOINTS",
                        "http://10.0.0.1:2379, http://10.0.0.2:2379/"
                    )
                ]
            )
            .unwrap(),
            "etcd+http://10.0.0.1:2379,10.0.0.2:2379"
        );
        assert_eq!(
            url(None, &[("DATASTORE_TYPE", "etcdv3")]).unwrap(),
            "etcd+http://127.0.0.1:2379"
        );
        assert_eq!(
            url(
                None,
                &[("ETCD_ENDPOINTS", "https://e1:2379,https://e2:2379")]
            )
            .unwrap(),
            "etcd+https://e1:2379,e2:2379"
        );
        assert_eq!(
            url(None, &[("ETCD_ENDPOINTS", "e1:2379")]).unwrap(),
            "etcd://e1:2379"
        );
        let err = |vars: &[(&str, &str)]| match url(None, vars) {
            Err(Error::Invalid(msg)) => msg,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert!(err(&[("DATASTORE_TYPE", "kubernetes")]).contains("not supported"));
        assert!(err(&[("DATASTORE_TYPE", "consul")]).contains("unknown DATASTORE_TYPE"));
        assert!(
            err(&[("ETCD_ENDPOINTS", "http://a:2379,https://b:2379")]).contains("mixes schemes")
        );
        assert!(err(&[("ETCD_ENDPOINTS", "unix://sock")]).contains("http://"));
        assert!(err(&[("ETCD_ENDPOINTS", " , ")]).contains("names no endpoint"));
        // What datastore_url builds, parse accepts.
        let built = url(None, &[("ETCD_ENDPOINTS", "http://a:1,http://b:2")]).unwrap();
        assert_eq!(
            etcd(&built, &[]).endpoints,
            vec!["http://a:1", "http://b:2"]
        );
    }
}
