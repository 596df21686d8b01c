//! Processes seen through /proc: identity (pid + start time), liveness, network namespace and
//! cgroup membership, and signals (through rustix, without unsafe code).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// A namespace's identity: the (device, inode) of its nsfs file.
pub type NsId = (u64, u64);

/// The identity of the namespace bound at `path` (`/run/netns/X`, `/proc/PID/ns/net`).
pub fn ns_id(path: &Path) -> Option<NsId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// `/proc/PID/stat` parsed for what the lab needs: state letter and start time (clock ticks
/// since boot). A pid plus its start time names one process for ever, even after pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub start_time: u64,
}

/// Parses the text of `/proc/PID/stat` (the command name may hold spaces and parentheses).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// The stat of a live pid, or `None`.
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Whether `pid` runs (not a zombie) and, when `start_time` is given, is still that process.
pub fn is_alive(pid: u32, start_time: Option<u64>) -> bool {
    match stat(pid) {
        Some(s) => {
            !matches!(s.state, 'Z' | 'X' | 'x') && start_time.is_none_or(|t| t == s.start_time)
        }
        None => false,
    }
}

/// The cgroup v2 path of `pid` (`/margay-lab/lab/node-1`), from `/proc/PID/cgroup`'s `0::` line.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Every pid (thread-group leader) whose network namespace is one of `namespaces`, except ours.
pub fn pids_in_netns(namespaces: &HashSet<NsId>) -> Vec<u32> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            ns_id(Path::new(&format!("/proc/{pid}/ns/net")))
                .is_some_and(|id| namespaces.contains(&id))
        })
        .collect()
}

fn pid_of(pid: u32) -> Option<Pid> {
    Pid::from_raw(i32::try_from(pid).ok()?)
}

/// Sends `signal` to `pid`; `false` if there is no such process.
pub fn signal(pid: u32, signal: Signal) -> bool {
    pid_of(pid).is_some_and(|p| rustix::process::kill_process(p, signal).is_ok())
}

/// Sends `signal` to the process group `pgid` (a spawned process leads its own session and
/// group, so this reaches the children it forked too).
pub fn signal_group(pgid: u32, signal: Signal) -> bool {
    pid_of(pgid).is_some_and(|p| rustix::process::kill_process_group(p, signal).is_ok())
}

/// Waits until none of `pids` is alive, polling; `true` if they all ended in time.
pub fn wait_gone(pids: &[(u32, Option<u64>)], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&(pid, start)| !is_alive(pid, start)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether this process runs with root's effective uid.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let text = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'S',
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_identified() {
        let me = std::process::id();
        let s = stat(me).unwrap();
        assert!(is_alive(me, Some(s.start_time)));
        assert!(!is_alive(me, Some(s.start_time + 1)));
        assert!(!is_alive(u32::MAX, None));
    }
}
