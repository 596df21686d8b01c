//! Real etcd servers for tests: Debian's `etcd` binary started as child processes on loopback,
//! each with its own ports and a temporary data directory, killed when the guard drops (also
//! when the test panics).
//!
//! Every test gets its own server (or cluster), so tests run in parallel and each sees an
//! empty store. A server starts in about half a second. If `etcd` is not installed the tests
//! fail and say how to install it: CI installs it, and a suite that skips silently would hide
//! a broken backend.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use margay_datastore::{Datastore, EtcdDatastore, EtcdOptions, EtcdTls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// How long a server may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a server gets new ports when the ones picked were taken in between (another test
/// picked the same free port before etcd bound it).
const PORT_ATTEMPTS: usize = 5;

/// One etcd member: its process and where it listens.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd server or cluster. Dropping it kills every member.
#[derive(Debug)]
pub struct TestEtcd {
    dir: TempDir,
    members: Vec<Member>,
    tls: Option<TlsFiles>,
}

/// Certificates made for one TLS server: a CA, the server's certificate (for 127.0.0.1), a
/// client certificate signed by the same CA, and a client certificate from another CA.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

impl TestEtcd {
    /// One plain-HTTP member.
    pub async fn start() -> TestEtcd {
        TestEtcd::launch(1, false).await
    }

    /// One member serving TLS that requires client certificates signed by its CA
    /// (`--client-cert-auth`).
    pub async fn start_tls() -> TestEtcd {
        TestEtcd::launch(1, true).await
    }

    /// A cluster of `size` plain-HTTP members.
    pub async fn cluster(size: usize) -> TestEtcd {
        TestEtcd::launch(size, false).await
    }

    async fn launch(size: usize, tls: bool) -> TestEtcd {
        check_installed();
        let mut dir = tempfile::Builder::new()
            .prefix("margay-etcd-")
            .tempdir()
            .unwrap();
        let tls = tls.then(|| make_certificates(dir.path()));
        for attempt in 1..=PORT_ATTEMPTS {
            let ports = free_ports(2 * size);
            let members = (0..size)
                .map(|i| {
                    let name = format!("m{i}");
                    Member {
                        data_dir: dir.path().join(format!("{name}.etcd")),
                        log: dir.path().join(format!("{name}.log")),
                        name,
                        client_port: ports[2 * i],
                        peer_port: ports[2 * i + 1],
                        child: None,
                    }
                })
                .collect();
            let mut etcd = TestEtcd {
                dir,
                members,
                tls: tls.clone(),
            };
            for i in 0..size {
                etcd.spawn(i);
            }
            match etcd.wait_ready().await {
                Ok(()) => return etcd,
                Err(log) if log.contains("address already in use") && attempt < PORT_ATTEMPTS => {
                    etcd.kill_all();
                    // Keep the directory (and the certificates) for the next attempt.
                    dir = std::mem::replace(&mut etcd.dir, tempfile::tempdir().unwrap());
                    for member in &etcd.members {
                        let _ = std::fs::remove_dir_all(&member.data_dir);
                    }
                }
                Err(log) => panic!("etcd did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts member `i` (again, after [`TestEtcd::stop`]: same ports, same data).
    fn spawn(&mut self, i: usize) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &self.members[i];
        let client_url = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .unwrap();
        let mut command = Command::new("etcd");
        command
            // etcd reads ETCD_* variables as flags, and calicoctl's ETCD_CERT_FILE and
            // ETCD_KEY_FILE are also etcd's own: start from a clean environment.
            .env_clear()
            .envs(search_path())
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(cluster.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(self.dir.path().to_string_lossy().as_ref())
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        self.members[i].child = Some(child);
    }

    /// Waits until every member answers; `Err` with the logs when one exits first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for i in 0..self.members.len() {
            let mut options = self.options_for(&[i]);
            options.connect_timeout = Duration::from_millis(500);
            options.request_timeout = Duration::from_secs(1);
            loop {
                if let Some(status) = self.members[i]
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().unwrap())
                {
                    return Err(format!("member {i} exited with {status}:\n{}", self.logs()));
                }
                if EtcdDatastore::connect(options.clone()).await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "member {i} did not answer within {READY_TIMEOUT:?}:\n{}",
                        self.logs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    /// The client endpoints, as `host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Client options for every member, with the CA and the client certificate when the
    /// server uses TLS.
    pub fn options(&self) -> EtcdOptions {
        self.options_for(&(0..self.members.len()).collect::<Vec<_>>())
    }

    fn options_for(&self, members: &[usize]) -> EtcdOptions {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = members
            .iter()
            .map(|&i| format!("{scheme}://127.0.0.1:{}", self.members[i].client_port))
            .collect();
        let mut options = EtcdOptions::new(&endpoints);
        options.tls = self.tls.as_ref().map(|tls| EtcdTls {
            ca_cert_file: Some(tls.ca.clone()),
            cert_file: Some(tls.client_cert.clone()),
            key_file: Some(tls.client_key.clone()),
        });
        options
    }

    /// The certificates of a TLS server.
    pub fn tls(&self) -> &TlsFiles {
        self.tls.as_ref().expect("this etcd does not use TLS")
    }

    /// A new handle (its own connections) on this etcd.
    pub async fn connect(&self) -> Arc<EtcdDatastore> {
        Arc::new(
            EtcdDatastore::connect(self.options())
                .await
                .unwrap_or_else(|e| panic!("cannot connect to the test etcd: {e}")),
        )
    }

    /// A new handle with credentials.
    pub async fn connect_as(&self, user: &str, password: &str) -> Arc<dyn Datastore> {
        let mut options = self.options();
        options.credentials = Some((user.to_owned(), password.to_owned()));
        Arc::new(
            EtcdDatastore::connect(options)
                .await
                .unwrap_or_else(|e| panic!("cannot connect as {user}: {e}")),
        )
    }

    /// Runs `etcdctl` against this etcd (all members, as root when `user` is given) and
    /// returns its output; panics when it fails.
    pub fn etcdctl(&self, user: Option<&str>, args: &[&str]) -> Output {
        let output = self.etcdctl_unchecked(user, args);
        assert!(
            output.status.success(),
            "etcdctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Like [`TestEtcd::etcdctl`], returning the output whatever the exit status.
    pub fn etcdctl_unchecked(&self, user: Option<&str>, args: &[&str]) -> Output {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let mut command = Command::new("etcdctl");
        command
            .env_clear()
            .envs(search_path())
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .args(["--command-timeout", "10s"]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        if let Some(user) = user {
            command.arg("--user").arg(user);
        }
        command.args(args);
        command.output().unwrap_or_else(|e| {
            panic!(
                "cannot run etcdctl ({e}); install Debian's etcd-client (scripts/install-deps.sh)"
            )
        })
    }

    /// Kills member `i`, keeping its data and ports.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again after [`TestEtcd::stop`] and waits until it answers.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut options = self.options_for(&[i]);
        options.connect_timeout = Duration::from_millis(500);
        options.request_timeout = Duration::from_secs(1);
        while EtcdDatastore::connect(options.clone()).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "member {i} did not come back:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }

    /// The end of every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for member in &self.members {
            let log = std::fs::read_to_string(&member.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            text.push_str(&format!("--- {} ---\n{}\n", member.name, tail.join("\n")));
        }
        text
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The caller's `PATH`, kept for children whose environment is otherwise cleared, so that
/// `etcd` and `etcdctl` are found wherever they are installed.
fn search_path() -> Option<(&'static str, std::ffi::OsString)> {
    std::env::var_os("PATH").map(|path| ("PATH", path))
}

/// Fails the test, saying what to install, when there is no `etcd` to run.
fn check_installed() {
    match Command::new("etcd")
        .arg("--version")
        .env_clear()
        .envs(search_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`etcd --version` failed ({status}); is etcd-server installed?"),
        Err(e) => panic!(
            "the etcd tests need Debian's etcd-server and etcd-client packages (the `etcd` and \
             `etcdctl` binaries), which are not installed ({e}); run \
             `bash scripts/install-deps.sh` as root"
        ),
    }
}

/// `n` distinct loopback ports that were free a moment ago. They are released before etcd
/// binds them, so another process may take one in between: [`TestEtcd::launch`] retries.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A CA with the given common name.
fn make_ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

/// A leaf certificate signed by `issuer`, with `sans` and the given uses.
fn make_leaf(
    name: &str,
    sans: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
    issuer: &Issuer<'_, &KeyPair>,
) -> (String, String) {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = usages;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Writes a CA, a server certificate for 127.0.0.1, a client certificate from the same CA, and
/// a client certificate from another CA into `dir`.
fn make_certificates(dir: &Path) -> TlsFiles {
    let (ca_params, ca_key, ca_pem) = make_ca("margay test etcd CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let (server_cert, server_key) = make_leaf(
        "etcd",
        &["127.0.0.1", "localhost"],
        // etcd also dials itself with its server certificate (its HTTP gateway).
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        &issuer,
    );
    let (client_cert, client_key) = make_leaf(
        "margay",
        &[],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &issuer,
    );
    let (other_params, other_key, other_pem) = make_ca("some other CA");
    let other = Issuer::from_params(&other_params, &other_key);
    let (stranger_cert, stranger_key) = make_leaf(
        "stranger",
        &[],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &other,
    );
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    TlsFiles {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
        other_ca: write("other-ca.pem", &other_pem),
        stranger_cert: write("stranger.pem", &stranger_cert),
        stranger_key: write("stranger-key.pem", &stranger_key),
    }
}

/// One etcd member that listens on unix sockets only (clients and peers), as the lab runs it:
/// etcd 3.4 takes `unix://NAME:PORT` and creates the socket file `NAME:PORT` in its working
/// directory, so it runs in the temporary directory and the socket path is absolute from there.
#[derive(Debug)]
pub struct UnixEtcd {
    dir: TempDir,
    child: Option<Child>,
}

impl UnixEtcd {
    pub async fn start() -> UnixEtcd {
        check_installed();
        let dir = tempfile::Builder::new()
            .prefix("margay-etcd-unix-")
            .tempdir()
            .unwrap();
        let mut etcd = UnixEtcd { dir, child: None };
        etcd.restart().await;
        etcd
    }

    /// The socket clients connect to.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("etcd.sock:2379")
    }

    /// The datastore URL of the socket.
    pub fn url(&self) -> String {
        format!("etcd+unix://{}", self.socket().display())
    }

    /// Kills the server (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on its data and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        // A killed etcd leaves its socket files behind; etcd refuses to bind over them.
        let _ = std::fs::remove_file(self.socket());
        let _ = std::fs::remove_file(self.dir.path().join("peer.sock:2380"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new("etcd")
            .current_dir(self.dir.path())
            .env_clear()
            .envs(search_path())
            .args(["--name", "m0", "--data-dir", "data"])
            .args(["--listen-client-urls", "unix://etcd.sock:2379"])
            .args(["--advertise-client-urls", "unix://etcd.sock:2379"])
            .args(["--listen-peer-urls", "unix://peer.sock:2380"])
            .args(["--initial-advertise-peer-urls", "unix://peer.sock:2380"])
            .args(["--initial-cluster", "m0=unix://peer.sock:2380"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if margay_datastore::open(&self.url()).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "etcd exited with {status}:\n{}",
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer on {} within {READY_TIMEOUT:?}",
                self.url()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for UnixEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}
