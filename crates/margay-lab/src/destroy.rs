//! Tearing a lab down by name: [`Lab::destroy`] (the `down` verb).
//!
//! It trusts nothing but names, so it works after a crash, with state.json missing or corrupt:
//!
//! 1. kill processes: `cgroup.kill` on `margay-lab/<lab>` (every cgroup2 mount it might be on),
//!    recorded pids whose start time still matches, and every process whose network namespace is
//!    one of the lab's (found through /proc), then wait for them to be gone;
//! 2. delete every namespace in /run/netns named `<lab>-*` (their veths, routes and bridge go
//!    with them);
//! 3. remove `/etc/netns/<lab>-*`, the cgroup tree (children first), the state directory, and the
//!    shared parents (`/run/margay-lab`, `margay-lab` cgroup, /etc/netns) if that left them empty.
//!
//! Every step runs even if an earlier one failed; the first failure is returned after all of
//! them, with the report of what was done.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::Signal;
use serde::Serialize;

use crate::cgroup::{self, LabCgroups};
use crate::cmd;
use crate::error::{Error, Result};
use crate::lab::{ETC_NETNS_DIR, Lab, NETNS_DIR, lab_netns, names_with_prefix};
use crate::naming::{netns_prefix, validate_lab_name};
use crate::procs;
use crate::state::{STATE_ROOT, StateStore};

/// What `destroy` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DestroyReport {
    pub lab: String,
    /// Processes found and killed (cgroups, recorded pids, namespace members).
    pub processes_killed: usize,
    /// Network namespaces deleted.
    pub netns_deleted: Vec<String>,
    /// Directories removed (state, cgroups, /etc/netns entries).
    pub removed: Vec<String>,
    /// Things worth knowing that did not stop the teardown (state unreadable, lock not free).
    pub warnings: Vec<String>,
}

impl fmt::Display for DestroyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.processes_killed == 0 && self.netns_deleted.is_empty() && self.removed.is_empty() {
            return write!(f, "lab {:?}: nothing to remove", self.lab);
        }
        write!(
            f,
            "lab {:?}: killed {} processes, deleted {} namespaces, removed {} directories",
            self.lab,
            self.processes_killed,
            self.netns_deleted.len(),
            self.removed.len()
        )
    }
}

impl Lab {
    /// Removes everything of the lab `name` (see the module docs). Idempotent.
    ///
    /// Refuses to run from inside the lab's own cgroup (it would kill itself half-way).
    pub fn destroy(name: &str) -> Result<DestroyReport> {
        validate_lab_name(name)?;
        let mut report = DestroyReport {
            lab: name.to_owned(),
            ..DestroyReport::default()
        };
        let mut errors: Vec<Error> = Vec::new();
        let store = StateStore::new(name);

        // Wait briefly for a writer in progress (add_node, create_pod_network) to finish.
        let _lock = if store.dir().exists() {
            let lock = store.lock_for(Duration::from_secs(5));
            if lock.is_none() {
                report
                    .warnings
                    .push("the state lock stayed busy for 5 s; tearing down anyway".to_owned());
            }
            lock
        } else {
            None
        };
        let state = match store.load() {
            Ok(s) => Some(s),
            Err(e) => {
                if store.dir().exists() {
                    report
                        .warnings
                        .push(format!("{e}; cleaning up by name only"));
                }
                None
            }
        };

        // Every cgroup2 mount the lab may have used: the recorded one and the current one.
        let mut mounts: Vec<PathBuf> = Vec::new();
        if let Some(m) = state.as_ref().and_then(|s| s.cgroup_mount.clone()) {
            mounts.push(m);
        }
        if let Some(m) = cgroup::detect_mount()
            && !mounts.contains(&m)
        {
            mounts.push(m);
        }
        let cgroups: Vec<LabCgroups> = mounts
            .into_iter()
            .map(|m| LabCgroups::new(m, name))
            .collect();
        let me = std::process::id();
        if cgroups.iter().any(|cg| cg.contains_pid(me)) {
            return Err(Error::invalid(
                "caller",
                format!("pid {me}"),
                format!("it runs inside lab {name:?}'s cgroup; run `down` from outside the lab"),
            ));
        }

        // 1. Processes.
        for cg in &cgroups {
            match LabCgroups::kill_tree(&cg.lab_dir(), Duration::from_secs(5)) {
                Ok(n) => report.processes_killed += n,
                Err(e) => errors.push(e),
            }
        }
        if let Some(s) = &state {
            let recorded: Vec<(u32, Option<u64>)> = s
                .processes
                .iter()
                .filter(|r| r.start_time.is_some() && procs::is_alive(r.pid, r.start_time))
                .map(|r| (r.pid, r.start_time))
                .collect();
            for &(pid, _) in &recorded {
                procs::signal(pid, Signal::KILL);
            }
            report.processes_killed += recorded.len();
            if !procs::wait_gone(&recorded, Duration::from_secs(5)) {
                errors.push(Error::Timeout(format!(
                    "recorded processes of lab {name:?} did not end after SIGKILL"
                )));
            }
        }
        let namespaces = lab_netns(name);
        // Identities taken before deletion: they stay valid while any process holds the
        // namespace, which is how late entrants are found below.
        let ns_ids = netns_ids(&namespaces);
        match kill_in_ns_ids(&ns_ids, Duration::from_secs(5)) {
            Ok(n) => report.processes_killed += n,
            Err(e) => errors.push(e),
        }

        // 2. Namespaces, in one `ip -force -batch` (a name deleted meanwhile is not an error).
        if !namespaces.is_empty() {
            let script: String = namespaces
                .iter()
                .map(|ns| format!("netns del {ns}\n"))
                .collect();
            let result = cmd::run_with_stdin("ip", &["-force", "-batch", "-"], Some(&script));
            let left = lab_netns(name);
            report.netns_deleted = namespaces
                .iter()
                .filter(|ns| !left.contains(ns))
                .cloned()
                .collect();
            if !left.is_empty() {
                errors.push(match result {
                    Err(e) => e,
                    Ok(_) => {
                        Error::Timeout(format!("namespaces still present: {}", left.join(", ")))
                    }
                });
            }
        }

        // A process that was entering the lab while we worked (an `ip netns exec` that had
        // opened its namespace, a `spawn` joining its cgroup) is caught by a second round.
        for cg in &cgroups {
            match LabCgroups::kill_tree(&cg.lab_dir(), Duration::from_secs(5)) {
                Ok(n) => report.processes_killed += n,
                Err(e) => errors.push(e),
            }
        }
        match kill_in_ns_ids(&ns_ids, Duration::from_secs(5)) {
            Ok(n) => report.processes_killed += n,
            Err(e) => errors.push(e),
        }

        // 3. Directories.
        let remove_dir = |path: &Path, report: &mut DestroyReport, errors: &mut Vec<Error>| {
            if path.exists() {
                match std::fs::remove_dir_all(path) {
                    Ok(()) => report.removed.push(path.display().to_string()),
                    Err(e) => errors.push(Error::io_path("remove", path, e)),
                }
            }
        };
        for d in names_with_prefix(Path::new(ETC_NETNS_DIR), &netns_prefix(name)) {
            remove_dir(&Path::new(ETC_NETNS_DIR).join(d), &mut report, &mut errors);
        }
        for cg in &cgroups {
            let dir = cg.lab_dir();
            if dir.exists() {
                match LabCgroups::remove_tree(&dir) {
                    Ok(()) => report.removed.push(dir.display().to_string()),
                    Err(e) => errors.push(e),
                }
            }
            cgroup::remove_if_empty(&cg.parent());
        }
        // Filesystems agents mounted inside the state directory (the BPF dataplane's bpffs):
        // unmounted, deepest first, so the directory can go. Unmounting a bpffs unpins what it
        // holds: the kernel frees maps and links no process uses any more.
        for mount in mounts_under(store.dir()) {
            let out = std::process::Command::new("umount")
                .arg("-l")
                .arg(&mount)
                .output();
            match out {
                Ok(o) if o.status.success() => report.removed.push(format!("mount {mount}")),
                Ok(o) => errors.push(Error::io_path(
                    "unmount",
                    Path::new(&mount),
                    std::io::Error::other(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
                )),
                Err(e) => errors.push(Error::io_path("unmount", Path::new(&mount), e)),
            }
        }
        remove_dir(store.dir(), &mut report, &mut errors);
        cgroup::remove_if_empty(Path::new(STATE_ROOT));
        cgroup::remove_if_empty(Path::new(ETC_NETNS_DIR));

        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

/// The identities of the named namespaces in /run/netns (missing ones are skipped).
fn netns_ids(namespaces: &[String]) -> HashSet<procs::NsId> {
    namespaces
        .iter()
        .filter_map(|ns| procs::ns_id(&Path::new(NETNS_DIR).join(ns)))
        .collect()
}

/// SIGKILLs every process whose network namespace is one of `namespaces` (names in /run/netns)
/// and waits for them to be gone; returns how many there were.
pub(crate) fn kill_in_netns(namespaces: &[String], timeout: Duration) -> Result<usize> {
    kill_in_ns_ids(&netns_ids(namespaces), timeout)
}

/// SIGKILLs every process in one of the namespaces `ids`, in rounds (a process may enter while
/// we kill), and waits for them to be gone; returns how many there were.
fn kill_in_ns_ids(ids: &HashSet<procs::NsId>, timeout: Duration) -> Result<usize> {
    let deadline = std::time::Instant::now() + timeout;
    let mut killed = 0;
    loop {
        let pids: Vec<(u32, Option<u64>)> = procs::pids_in_netns(ids)
            .into_iter()
            .map(|pid| (pid, procs::stat(pid).map(|s| s.start_time)))
            .collect();
        if pids.is_empty() {
            return Ok(killed);
        }
        for &(pid, _) in &pids {
            procs::signal(pid, Signal::KILL);
        }
        killed += pids.len();
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if !procs::wait_gone(&pids, left) {
            return Err(Error::Timeout(format!(
                "processes {:?} in the lab's namespaces did not end after SIGKILL",
                pids.iter().map(|p| p.0).collect::<Vec<_>>()
            )));
        }
    }
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found.dedup();
    found
}
