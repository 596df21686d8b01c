//! The node agents: one `margay-node` per lab node, in the node's namespace and cgroup, against
//! the lab's datastore, each writing its status to a file the lab reads to know when every node
//! has programmed a change.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Lab, SpawnOptions, Target};
use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::workloads::find_binary;

/// The file a node's agent writes its status to.
pub fn status_file(lab: &Lab, node: &str) -> PathBuf {
    lab.state_dir().join("agents").join(format!("{node}.json"))
}

/// Starts the agent of `node`.
pub fn start(lab: &Lab, node: &str, datastore: &str) -> Result<u32> {
    let state = lab.node(node)?;
    let prefix = lab.config()?.underlay.prefix_len();
    std::fs::create_dir_all(lab.state_dir().join("agents"))?;
    let status = status_file(lab, node);
    let _ = std::fs::remove_file(&status);
    // The node's bpffs is mounted here, in the lab's (the host's) mount namespace, before the
    // agent starts: `ip netns exec` gives the agent a mount namespace of its own, and a bpffs
    // the agent mounted there would vanish with it, unpinning every map and link when the agent
    // dies. Mounted here, the pins outlive the agent (a restarted agent adopts them, flows go
    // on) and tools on the host (`margayctl bpf ... --node`) see them.
    let bpffs = bpffs_dir(lab, node);
    ensure_bpffs(&bpffs)?;
    let binary = find_binary("margay-node");
    let argv: Vec<String> = vec![
        binary.to_string_lossy().into_owned(),
        "--node-name".into(),
        node.into(),
        "--datastore".into(),
        datastore.into(),
        "--node-ip".into(),
        format!("{}/{prefix}", state.ip),
        "--health-listen".into(),
        "0.0.0.0:9099".into(),
        "--status-file".into(),
        status.to_string_lossy().into_owned(),
        "--state-dir".into(),
        lab.state_dir()
            .join("nodes")
            .join(node)
            .to_string_lossy()
            .into_owned(),
        "--bpffs-dir".into(),
        bpffs_dir(lab, node).to_string_lossy().into_owned(),
    ];
    let mut argv = argv;
    if let Some(cgroup) = lab.cgroup_dir(&Target::node(node))? {
        argv.push("--cgroup".into());
        argv.push(cgroup.to_string_lossy().into_owned());
    }
    let pid = lab
        .spawn(
            &Target::node(node),
            &argv,
            &SpawnOptions::new()
                .name("margay-node")
                .log(lab.logs_dir().join(format!("agent-{node}.log"))),
        )
        .with_context(|| format!("cannot start the agent of {node}"))?;
    Ok(pid)
}

/// Where a node's agent pins its BPF maps and links: a bpffs the agent mounts inside the lab's
/// state directory (`down` unmounts it).
pub fn bpffs_dir(lab: &Lab, node: &str) -> PathBuf {
    lab.state_dir().join("bpf").join(node)
}

/// Mounts a bpffs at `dir` unless one is mounted there already.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if is_bpffs_mount(dir) {
        return Ok(());
    }
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir)
        .output()
        .context("cannot run mount")?;
    if !out.status.success() {
        bail!(
            "cannot mount a bpffs at {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn is_bpffs_mount(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next(), f.next(), f.next());
        kind == Some("bpf") && at.map(Path::new) == Some(dir)
    })
}

/// Unmounts a deleted node's bpffs (which unpins its maps and links) and removes the
/// directory. `down` does the same for every node through the state directory's mounts.
pub fn remove_bpffs(lab: &Lab, node: &str) -> Result<()> {
    let dir = bpffs_dir(lab, node);
    if is_bpffs_mount(&dir) {
        let out = std::process::Command::new("umount")
            .arg("-l")
            .arg(&dir)
            .output()
            .context("cannot run umount")?;
        if !out.status.success() {
            bail!(
                "cannot unmount {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    match std::fs::remove_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The pid of `node`'s running agent, if it runs.
pub fn running_agent(lab: &Lab, node: &str) -> Result<Option<u32>> {
    Ok(lab
        .processes()?
        .into_iter()
        .find(|p| {
            p.alive && p.record.name == "margay-node" && p.record.target == Target::node(node)
        })
        .map(|p| p.record.pid))
}

/// Kills `node`'s agent with SIGKILL (a crash: no cleanup, nothing flushed) and starts a new
/// one against `datastore`. The BPF maps and links stay pinned in the node's bpffs meanwhile,
/// so flows go on; the new agent adopts them. Returns (old pid, new pid).
pub fn restart_after_crash(lab: &Lab, node: &str, datastore: &str) -> Result<(u32, u32)> {
    let Some(old) = running_agent(lab, node)? else {
        bail!("the agent of {node} is not running");
    };
    lab.kill_hard(old)
        .with_context(|| format!("cannot kill the agent of {node}"))?;
    let new = start(lab, node, datastore)?;
    Ok((old, new))
}

/// An agent's last status, if it wrote one.
pub fn read_status(lab: &Lab, node: &str) -> Option<Value> {
    let text = std::fs::read_to_string(status_file(lab, node)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Waits until every node's agent is in sync and has programmed `revision` or later.
pub fn wait_for_revision(
    lab: &Lab,
    nodes: &[String],
    revision: u64,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut behind = Vec::new();
        for node in nodes {
            match read_status(lab, node) {
                Some(s)
                    if s["datastore"] == "InSync"
                        && s["syncedRevision"].as_u64().unwrap_or(0) >= revision
                        && s["lastError"].is_null() => {}
                Some(s) => behind.push(format!(
                    "{node} (datastore {}, revision {}, error {})",
                    s["datastore"].as_str().unwrap_or("?"),
                    s["syncedRevision"],
                    s["lastError"].as_str().unwrap_or("none")
                )),
                None => behind.push(format!("{node} (no status yet)")),
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "node agents did not program revision {revision} within {timeout:?}: {}; see {}",
                behind.join(", "),
                lab.logs_dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
