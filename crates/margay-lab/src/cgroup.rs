//! The lab's cgroup v2 groups: `<cgroup2>/margay-lab/<lab>/{<node>...,external}`.
//!
//! Only directories are created and processes moved in; no controller is enabled and no limit is
//! set, so the lab never changes the settings of the root cgroup or of anything it did not make.
//! Their use is bookkeeping that survives crashes: `cgroup.kill` on `margay-lab/<lab>` ends every
//! process the lab started, even those that forked or double-forked away from their parent.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::error::{Error, Result};
use crate::procs;

/// The directory under the cgroup2 mount that holds every lab's groups.
pub const CGROUP_PARENT: &str = "margay-lab";
/// The group of the client's, router's and underlay's processes.
pub const EXTERNAL_GROUP: &str = "external";

/// The cgroup2 mount point from /proc/mounts (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), or `None` if cgroup2 is not mounted.
pub fn detect_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    parse_mounts(&mounts)
}

fn parse_mounts(mounts: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .collect();
    // Prefer the conventional locations when several mounts exist.
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .find_map(|p| candidates.iter().find(|c| c.as_path() == Path::new(p)))
        .or_else(|| candidates.first())
        .cloned()
}

/// /proc/mounts escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && let Ok(text) = std::str::from_utf8(digits)
            && let Ok(v) = u8::from_str_radix(text, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A lab's groups under one cgroup2 mount.
#[derive(Debug, Clone)]
pub struct LabCgroups {
    mount: PathBuf,
    lab: String,
}

impl LabCgroups {
    /// The groups of `lab` under `mount`.
    pub fn new(mount: PathBuf, lab: &str) -> LabCgroups {
        LabCgroups {
            mount,
            lab: lab.to_owned(),
        }
    }

    /// `<mount>/margay-lab`.
    pub fn parent(&self) -> PathBuf {
        self.mount.join(CGROUP_PARENT)
    }

    /// `<mount>/margay-lab/<lab>`.
    pub fn lab_dir(&self) -> PathBuf {
        self.parent().join(&self.lab)
    }

    /// `<mount>/margay-lab/<lab>/<group>`.
    pub fn group_dir(&self, group: &str) -> PathBuf {
        self.lab_dir().join(group)
    }

    /// The path of `group` as `/proc/PID/cgroup` shows it: `/margay-lab/<lab>/<group>`.
    pub fn lab_cgroup_path(&self) -> String {
        format!("/{CGROUP_PARENT}/{}", self.lab)
    }

    /// Whether `pid` sits in one of this lab's groups.
    pub fn contains_pid(&self, pid: u32) -> bool {
        let prefix = self.lab_cgroup_path();
        procs::cgroup_of(pid).is_some_and(|cg| cg == prefix || cg.starts_with(&(prefix + "/")))
    }

    /// Creates `margay-lab/<lab>` (which must not exist: it is part of the claim on the name).
    pub fn create_lab_dir(&self) -> Result<()> {
        create_dir_in_shared_parent(&self.parent(), &self.lab_dir())
    }

    /// Creates `margay-lab/<lab>/<group>` (fine if it exists).
    pub fn create_group(&self, group: &str) -> Result<()> {
        let dir = self.group_dir(group);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io_path("create the cgroup", &dir, e)),
        }
    }

    /// Kills every process in `dir` and below and waits until the groups are empty.
    /// Uses `cgroup.kill` (Linux 5.14) where it exists, else SIGKILLs `cgroup.procs` in rounds.
    pub fn kill_tree(dir: &Path, timeout: Duration) -> Result<usize> {
        if !dir.exists() {
            return Ok(0);
        }
        let before = procs_in_tree(dir).len();
        let kill_file = dir.join("cgroup.kill");
        let deadline = Instant::now() + timeout;
        loop {
            let pids = procs_in_tree(dir);
            if pids.is_empty() {
                return Ok(before);
            }
            if kill_file.exists() {
                if let Err(e) = std::fs::write(&kill_file, "1") {
                    if e.kind() == ErrorKind::NotFound {
                        return Ok(before);
                    }
                    return Err(Error::io_path("write 1 to", &kill_file, e));
                }
            } else {
                for pid in pids {
                    procs::signal(pid, Signal::KILL);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "processes in cgroup {} did not end within {timeout:?}: {:?}",
                    dir.display(),
                    procs_in_tree(dir)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes `dir` and the groups below it, children first (after [`LabCgroups::kill_tree`]).
    pub fn remove_tree(dir: &Path) -> Result<()> {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    LabCgroups::remove_tree(&e.path())?;
                }
            }
        }
        // rmdir can briefly fail with EBUSY while the last killed task is being reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() < deadline && e.kind() == ErrorKind::ResourceBusy => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(Error::io_path("remove the cgroup", dir, e)),
            }
        }
    }
}

/// Every pid in the cgroup `dir` and its descendants.
pub fn procs_in_tree(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(procs_in_tree(&e.path()));
            }
        }
    }
    out
}

/// Creates `child` (which must not exist) inside `parent` (created if missing). Retries when a
/// concurrent `down` of another lab removes the shared, momentarily empty `parent` between the
/// two steps.
pub fn create_dir_in_shared_parent(parent: &Path, child: &Path) -> Result<()> {
    let mut last = None;
    for _ in 0..10 {
        if let Err(e) = std::fs::create_dir_all(parent) {
            last = Some(e);
            continue;
        }
        match std::fs::create_dir(child) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(Error::io_path("create", child, e)),
        }
    }
    Err(Error::io_path(
        "create",
        child,
        last.unwrap_or_else(|| std::io::Error::other("retries exhausted")),
    ))
}

/// Removes a shared parent directory if it is empty; anything else (other labs' entries, a race)
/// leaves it alone.
pub fn remove_if_empty(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_mounts(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(parse_mounts(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let odd = "none /mnt/my\\040cgroup cgroup2 rw 0 0\n";
        assert_eq!(parse_mounts(odd), Some(PathBuf::from("/mnt/my cgroup")));
        assert_eq!(parse_mounts("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn paths() {
        let c = LabCgroups::new(PathBuf::from("/sys/fs/cgroup"), "lab1");
        assert_eq!(c.lab_dir(), Path::new("/sys/fs/cgroup/margay-lab/lab1"));
        assert_eq!(
            c.group_dir("node-1"),
            Path::new("/sys/fs/cgroup/margay-lab/lab1/node-1")
        );
        assert_eq!(c.lab_cgroup_path(), "/margay-lab/lab1");
    }
}
