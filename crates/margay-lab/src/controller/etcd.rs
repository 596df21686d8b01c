//! The lab's own etcd (`margay-lab up --datastore etcd`): one member that serves the node agents
//! (inside the node namespaces) and the lab's verbs and margayctl (in the root namespace)
//! through a **unix socket** in the lab's state directory.
//!
//! Why a socket and not TCP: the agents run in node network namespaces and the CLI in the root
//! one, and nothing may be added to the root namespace. A pathname unix socket is found through
//! the file system, which every namespace shares, so one listener serves both sides without an
//! address, a route or a `setns` anywhere; etcd opens no TCP port at all (its peer URL is a
//! socket too). The process itself runs in the lab's underlay namespace and `external` cgroup, so
//! `margay-lab down` kills it like any lab process, and its data directory is inside the state
//! directory that `down` removes, also after a crash.
//!
//! etcd 3.4 insists on `unix://NAME:PORT` (a host:port form) and creates the socket file
//! `NAME:PORT` in its working directory, hence the `:2379` in the socket's file name and the
//! working directory set to [`dir`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Lab, SpawnOptions, Target};

/// The lab annotation saying the lab runs its own etcd.
pub const ETCD_ANNOTATION: &str = "etcd";
/// The value of `--datastore` that asks for the lab's own etcd.
pub const LAB_ETCD: &str = "etcd";
/// The recorded process name of the lab's etcd.
const PROCESS_NAME: &str = "etcd";
/// The socket file the agents and the CLI use.
pub const SOCKET_NAME: &str = "etcd.sock:2379";
/// The peer socket (a one-member cluster still needs a peer URL).
const PEER_SOCKET_NAME: &str = "peer.sock:2380";
/// How long a starting etcd may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory of the lab's etcd: its data, sockets and nothing else.
pub fn dir(lab: &Lab) -> PathBuf {
    lab.state_dir().join("etcd")
}

/// The socket agents and the CLI connect to.
pub fn socket(lab: &Lab) -> PathBuf {
    dir(lab).join(SOCKET_NAME)
}

/// The datastore URL of a socket.
pub fn url_of(socket: &Path) -> String {
    format!("etcd+unix://{}", socket.display())
}

/// The datastore URL of the lab's etcd (`etcd+unix:///run/margay-lab/<lab>/etcd/etcd.sock:2379`).
pub fn url(lab: &Lab) -> String {
    url_of(&socket(lab))
}

/// Whether the lab runs its own etcd.
pub fn is_lab_etcd(lab: &Lab) -> Result<bool> {
    Ok(lab.state()?.annotations.contains_key(ETCD_ANNOTATION))
}

/// Starts the lab's etcd on its data directory and waits until it answers. `socket_name`
/// replaces the usual socket (a file name inside [`dir`]): `margay-lab etcd start --socket
/// drill.sock:2379` serves the store where the agents do not look, to change it while they
/// cannot reach it (an outage drill). Returns the URL it serves.
pub async fn start(lab: &Lab, socket_name: Option<&str>) -> Result<String> {
    if let Some(pid) = running(lab)? {
        bail!("the lab's etcd already runs (pid {pid}); stop it first with `margay-lab etcd stop`");
    }
    let socket_name = socket_name.unwrap_or(SOCKET_NAME);
    if socket_name.contains('/') || !socket_name.contains(':') || socket_name.starts_with('.') {
        bail!(
            "--socket {socket_name:?}: give a file name of the form NAME:PORT (etcd's form), \
             such as drill.sock:2379; it is created in {}",
            dir(lab).display()
        );
    }
    let dir = dir(lab);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // A killed etcd leaves its socket files behind, and etcd refuses to bind over them.
    for stale in [socket_name, PEER_SOCKET_NAME] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let client = format!("unix://{socket_name}");
    let peer = format!("unix://{PEER_SOCKET_NAME}");
    // etcd reads ETCD_* variables as flags (calicoctl's ETCD_CERT_FILE is also etcd's), and a
    // spawned process inherits the caller's environment: `env -u` removes the ones set here.
    let mut argv: Vec<String> = vec!["env".into()];
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && key.starts_with("ETCD_")
        {
            argv.extend(["-u".into(), key.to_owned()]);
        }
    }
    argv.extend(
        [
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            "data",
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("lab={peer}"),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .map(str::to_owned),
    );
    let options = SpawnOptions::new()
        .name(PROCESS_NAME)
        .cwd(&dir)
        .log(lab.logs_dir().join("etcd.log"));
    let pid = lab
        .spawn(&Target::Underlay, &argv, &options)
        .context("cannot start the lab's etcd (is Debian's etcd-server installed? run scripts/install-deps.sh)")?;
    let url = url_of(&dir.join(socket_name));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match margay_datastore::open(&url).await {
            Ok(_) => return Ok(url),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "the lab's etcd (pid {pid}) did not answer on {url} within {READY_TIMEOUT:?}: {e}; see {}",
                    lab.logs_dir().join("etcd.log").display()
                )
            }
            Err(_) => {}
        }
        if running(lab)?.is_none() {
            bail!(
                "the lab's etcd exited at start; see {}",
                lab.logs_dir().join("etcd.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pid of the lab's running etcd, if any.
pub fn running(lab: &Lab) -> Result<Option<u32>> {
    Ok(lab
        .processes()?
        .into_iter()
        .find(|p| p.alive && p.record.name == PROCESS_NAME && p.record.target == Target::Underlay)
        .map(|p| p.record.pid))
}

/// Stops the lab's etcd (its data stays, for `start`). Returns whether one was running.
pub fn stop(lab: &Lab) -> Result<bool> {
    match running(lab)? {
        Some(pid) => {
            lab.kill(pid)
                .with_context(|| format!("cannot stop the lab's etcd (pid {pid})"))?;
            Ok(true)
        }
        None => Ok(false),
    }
}
