//! Running programs inside the lab: detached ([`Lab::spawn`]) or in the foreground
//! ([`Lab::exec`], [`Lab::exec_interactive`]), always inside the target's namespace and cgroup.
//!
//! How a process gets there, without unsafe code (no `pre_exec`, no `setns` in this process):
//!
//! ```text
//! sh -c 'echo $$ > "$1" || exit 125; shift; exec setsid ip netns exec "$@"' \
//!     margay-lab <cgroup>/cgroup.procs <netns> <argv...>
//! ```
//!
//! `sh` moves itself into the cgroup, then `exec`s `setsid` (which, since `sh` is not a process
//! group leader, calls setsid(2) and execs without forking), which execs `ip netns exec` (which
//! enters the namespace, bind-mounts `/etc/netns/<ns>/*` over /etc, and execs without forking), which
//! execs the program. One pid all the way: the pid `spawn` returns is the program's. Every word is
//! passed as an argument, never spliced into the script, so no quoting can go wrong.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use chrono::Utc;
use rustix::process::Signal;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::lab::{Lab, netns_exists};
use crate::naming::Target;
use crate::procs;
use crate::state::ProcessRecord;

/// Options for [`Lab::spawn`].
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// A label for status and the log file name; the program's file name if unset.
    pub name: Option<String>,
    /// Environment variables added to the inherited environment.
    pub env: Vec<(String, String)>,
    /// The log file (stdout and stderr, appended); `logs/<target>.<name>.log` if unset.
    pub log: Option<PathBuf>,
    /// The working directory; inherited if unset.
    pub cwd: Option<PathBuf>,
}

impl SpawnOptions {
    /// No options: inherited environment and directory, default log file.
    pub fn new() -> SpawnOptions {
        SpawnOptions::default()
    }

    /// Sets the label.
    pub fn name(mut self, name: impl Into<String>) -> SpawnOptions {
        self.name = Some(name.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> SpawnOptions {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the log file.
    pub fn log(mut self, path: impl Into<PathBuf>) -> SpawnOptions {
        self.log = Some(path.into());
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> SpawnOptions {
        self.cwd = Some(dir.into());
        self
    }
}

/// A recorded process and whether it still runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessStatus {
    #[serde(flatten)]
    pub record: ProcessRecord,
    pub alive: bool,
}

const JOIN_AND_EXEC: &str = "echo $$ > \"$1\" || { echo \"margay-lab: cannot join cgroup $1\" >&2; exit 125; }; shift; exec \"$@\"";

impl Lab {
    /// A `Command` that runs `argv` in `target`'s namespace and cgroup, in the foreground of the
    /// caller (same session). Set stdio as needed and run it.
    pub fn command<S: AsRef<OsStr>>(&self, target: &Target, argv: &[S]) -> Result<Command> {
        Ok(self.prepare(target, argv, false)?.0)
    }

    fn prepare<S: AsRef<OsStr>>(
        &self,
        target: &Target,
        argv: &[S],
        detach: bool,
    ) -> Result<(Command, Option<PathBuf>)> {
        let Some(program) = argv.first() else {
            return Err(Error::invalid("command", "", "it is empty"));
        };
        match target {
            Target::Node(n) => crate::naming::validate_node_name(n)?,
            Target::Pod(ns) => crate::naming::validate_pod_netns(&self.name, ns)?,
            Target::Client | Target::Router | Target::Underlay => {}
        }
        let netns = self.netns(target);
        if !netns_exists(&netns) {
            return Err(Error::Missing {
                lab: self.name.clone(),
                what: "namespace",
                name: netns,
                hint: format!(
                    " for {target} (see `margay-lab status --name {}`)",
                    self.name
                ),
            });
        }
        check_program(program.as_ref())?;
        let cgroup = self.cgroup_dir(target)?;
        let mut inner: Vec<&OsStr> = Vec::new();
        if detach {
            inner.push(OsStr::new("setsid"));
        }
        inner.extend([OsStr::new("ip"), OsStr::new("netns"), OsStr::new("exec")]);
        inner.push(OsStr::new(&netns));
        inner.extend(argv.iter().map(AsRef::as_ref));
        let command = match &cgroup {
            Some(dir) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(JOIN_AND_EXEC)
                    .arg("margay-lab")
                    .arg(dir.join("cgroup.procs"))
                    .args(&inner);
                c
            }
            None => {
                let mut c = Command::new(inner[0]);
                c.args(&inner[1..]);
                c
            }
        };
        Ok((command, cgroup))
    }

    /// Starts `argv` detached in `target`: own session, surviving the caller, inside the
    /// target's namespace and cgroup, stdout and stderr appended to a log file under the lab's
    /// state directory, stdin from /dev/null. Returns its pid (the program's own) once it is
    /// recorded in the state.
    pub fn spawn<S: AsRef<str>>(
        &self,
        target: &Target,
        argv: &[S],
        opts: &SpawnOptions,
    ) -> Result<u32> {
        let argv: Vec<String> = argv.iter().map(|a| a.as_ref().to_owned()).collect();
        let (mut command, cgroup) = self.prepare(target, &argv, true)?;
        let name = opts.name.clone().unwrap_or_else(|| {
            Path::new(&argv[0])
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| argv[0].clone())
        });
        let log = opts.log.clone().unwrap_or_else(|| {
            self.logs_dir().join(format!(
                "{}.{}.log",
                target.slug(&self.name),
                sanitize(&name)
            ))
        });
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::io_path("open the log file", &log, e))?;
        let header = format!(
            "--- {} margay-lab spawn in {target}: {} ---\n",
            Utc::now().to_rfc3339(),
            crate::cmd::describe(&argv[0], &argv[1..])
        );
        file.write_all(header.as_bytes())
            .map_err(|e| Error::io_path("write", &log, e))?;
        let stderr = file
            .try_clone()
            .map_err(|e| Error::io_path("duplicate the handle of", &log, e))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr));
        for (k, v) in &opts.env {
            command.env(k, v);
        }
        if let Some(dir) = &opts.cwd {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(|e| {
            Error::io(
                format!(
                    "cannot start {} in {target}",
                    crate::cmd::describe(&argv[0], &argv[1..])
                ),
                e,
            )
        })?;
        let pid = child.id();
        let start_time = procs::stat(pid).map(|s| s.start_time);
        // Return only once the process is in place (cgroup joined, namespace entered), so that
        // callers can rely on it at once, and `down` right after `spawn` cannot miss it.
        let netns = self.netns(target);
        if let Err(e) = wait_in_netns(&mut child, &netns, &log, target, &argv) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        // Reap it when it ends, so that a long-lived caller (a test, a controller) sees it gone
        // rather than a zombie. If the caller exits first, init adopts it.
        let reaper = std::thread::Builder::new()
            .name(format!("margay-lab-reap-{pid}"))
            .spawn(move || {
                let _ = child.wait();
            });
        if let Err(e) = reaper {
            tracing::warn!(pid, error = %e, "no reaper thread; the process stays a zombie when it ends");
        }
        let record = ProcessRecord {
            pid,
            start_time,
            target: target.clone(),
            name,
            argv,
            log,
            cgroup,
            started_at: Utc::now(),
        };
        if let Err(e) = self.store.update(|s| {
            s.processes.push(record);
            Ok(())
        }) {
            terminate(pid, start_time, true);
            return Err(e);
        }
        Ok(pid)
    }

    /// Runs `argv` in `target` and captures its output. A non-zero exit is not an error here
    /// (check `status`); not being able to start is.
    pub fn exec<S: AsRef<OsStr>>(&self, target: &Target, argv: &[S]) -> Result<Output> {
        let mut command = self.command(target, argv)?;
        command.stdin(Stdio::null());
        command
            .output()
            .map_err(|e| Error::io(format!("cannot run {} in {target}", describe_os(argv)), e))
    }

    /// As [`Lab::exec`], but a non-zero exit is an [`Error::Command`] with its stderr.
    pub fn exec_checked<S: AsRef<OsStr>>(&self, target: &Target, argv: &[S]) -> Result<Output> {
        let output = self.exec(target, argv)?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(Error::Command {
                command: format!("{} (in {target})", describe_os(argv)),
                status: match output.status.code() {
                    Some(c) => format!("exit status {c}"),
                    None => output.status.to_string(),
                },
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
    }

    /// Runs `argv` in `target` with the caller's stdin, stdout and stderr (for `node exec`,
    /// `client`), and returns its exit status.
    pub fn exec_interactive<S: AsRef<OsStr>>(
        &self,
        target: &Target,
        argv: &[S],
    ) -> Result<ExitStatus> {
        let mut command = self.command(target, argv)?;
        command
            .status()
            .map_err(|e| Error::io(format!("cannot run {} in {target}", describe_os(argv)), e))
    }

    /// Stops a process of this lab: SIGTERM to its process group, SIGKILL after 3 s, and drops
    /// its record. A pid that is neither recorded nor inside the lab's cgroups or namespaces is
    /// refused. A process that already ended is fine.
    pub fn kill(&self, pid: u32) -> Result<()> {
        let state = self.store.load()?;
        let record = state.processes.iter().find(|r| r.pid == pid);
        match record {
            Some(r) => {
                if procs::is_alive(pid, r.start_time) && !terminate(pid, r.start_time, true) {
                    return Err(Error::Timeout(format!(
                        "process {pid} ({}) did not end after SIGKILL",
                        r.name
                    )));
                }
            }
            None => {
                if procs::is_alive(pid, None) {
                    if !self.owns_pid(pid) {
                        return Err(Error::Missing {
                            lab: self.name.clone(),
                            what: "process",
                            name: pid.to_string(),
                            hint: " (not started by the lab, nor inside its cgroups or namespaces)"
                                .to_owned(),
                        });
                    }
                    let start = procs::stat(pid).map(|s| s.start_time);
                    if !terminate(pid, start, false) {
                        return Err(Error::Timeout(format!(
                            "process {pid} did not end after SIGKILL"
                        )));
                    }
                }
            }
        }
        self.store.update(|s| {
            s.processes.retain(|r| r.pid != pid);
            Ok(())
        })
    }

    /// Kills a recorded process of this lab with SIGKILL at once (no SIGTERM, only the process,
    /// not its group), as a crash would, waits until it is gone and drops its record.
    pub fn kill_hard(&self, pid: u32) -> Result<()> {
        let state = self.store.load()?;
        let Some(record) = state.processes.iter().find(|r| r.pid == pid) else {
            return Err(Error::Missing {
                lab: self.name.clone(),
                what: "process",
                name: pid.to_string(),
                hint: " (only processes the lab started can be killed this way)".to_owned(),
            });
        };
        if procs::is_alive(pid, record.start_time) {
            procs::signal(pid, Signal::KILL);
            if !procs::wait_gone(&[(pid, record.start_time)], Duration::from_secs(5)) {
                return Err(Error::Timeout(format!(
                    "process {pid} ({}) did not end after SIGKILL",
                    record.name
                )));
            }
        }
        self.store.update(|s| {
            s.processes.retain(|r| r.pid != pid);
            Ok(())
        })
    }

    /// The recorded processes, with whether each still runs.
    pub fn processes(&self) -> Result<Vec<ProcessStatus>> {
        Ok(self
            .state()?
            .processes
            .into_iter()
            .map(|record| ProcessStatus {
                alive: procs::is_alive(record.pid, record.start_time),
                record,
            })
            .collect())
    }

    /// Drops the records of processes that have ended; returns how many.
    pub fn forget_dead_processes(&self) -> Result<usize> {
        self.store.update(|s| {
            let before = s.processes.len();
            s.processes.retain(|r| procs::is_alive(r.pid, r.start_time));
            Ok(before - s.processes.len())
        })
    }

    /// Whether `pid` runs inside one of this lab's cgroups or namespaces.
    fn owns_pid(&self, pid: u32) -> bool {
        if self.cgroups.as_ref().is_some_and(|cg| cg.contains_pid(pid)) {
            return true;
        }
        let Some(id) = procs::ns_id(Path::new(&format!("/proc/{pid}/ns/net"))) else {
            return false;
        };
        crate::lab::lab_netns(&self.name)
            .iter()
            .any(|ns| procs::ns_id(&Path::new(crate::lab::NETNS_DIR).join(ns)) == Some(id))
    }
}

/// Waits until the child's network namespace is `netns`. A child that ends first is fine if it
/// succeeded (a short program that already ran); otherwise the error quotes its log's end.
fn wait_in_netns(
    child: &mut std::process::Child,
    netns: &str,
    log: &Path,
    target: &Target,
    argv: &[String],
) -> Result<()> {
    let want = procs::ns_id(&Path::new(crate::lab::NETNS_DIR).join(netns));
    let own = Path::new("/proc")
        .join(child.id().to_string())
        .join("ns/net");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let describe = || crate::cmd::describe(&argv[0], &argv[1..]);
    loop {
        if want.is_some() && procs::ns_id(&own) == want {
            return Ok(());
        }
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(Error::Command {
                    command: format!("{} (spawned in {target})", describe()),
                    status: status.to_string(),
                    stderr: log_tail(log),
                });
            }
            Ok(None) => {}
            Err(e) => return Err(Error::io(format!("cannot watch {}", describe()), e)),
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "{} did not enter namespace {netns} within 10 s",
                describe()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The last lines of a log file, for error messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("{} (log {})", tail.join("\n"), log.display())
}

/// SIGTERM, wait up to 3 s, SIGKILL, wait up to 2 s. `group`: signal the process group (the
/// process leads it, as spawned ones do). `true` once it is gone.
fn terminate(pid: u32, start_time: Option<u64>, group: bool) -> bool {
    let send = |sig| {
        if !(group && procs::signal_group(pid, sig)) {
            procs::signal(pid, sig);
        }
    };
    send(Signal::TERM);
    if procs::wait_gone(&[(pid, start_time)], Duration::from_secs(3)) {
        return true;
    }
    send(Signal::KILL);
    procs::wait_gone(&[(pid, start_time)], Duration::from_secs(2))
}

/// Fails early, with a clear message, when the program cannot be found (instead of a process
/// that dies at once with the reason only in its log).
fn check_program(program: &OsStr) -> Result<()> {
    let path = Path::new(program);
    let found = if path.components().count() > 1 || program.to_string_lossy().contains('/') {
        path.is_file()
    } else {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(path).is_file()))
            .unwrap_or(false)
    };
    if found {
        Ok(())
    } else {
        Err(Error::invalid(
            "program",
            program.to_string_lossy(),
            "not found (give a path, or a name on PATH)",
        ))
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn describe_os<S: AsRef<OsStr>>(argv: &[S]) -> String {
    match argv.split_first() {
        Some((first, rest)) => crate::cmd::describe(&first.as_ref().to_string_lossy(), rest),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_checked() {
        assert!(check_program(OsStr::new("sh")).is_ok());
        assert!(check_program(OsStr::new("/bin/sh")).is_ok());
        let e = check_program(OsStr::new("no-such-program-xyz")).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    }

    #[test]
    fn log_names_are_sanitized() {
        assert_eq!(sanitize("margay-node"), "margay-node");
        assert_eq!(sanitize("a b/c"), "a_b_c");
    }

    #[test]
    fn join_script_passes_words_through() {
        // Runs the real script (without a cgroup: a temporary file stands in for cgroup.procs).
        let dir = std::env::temp_dir().join(format!("margay-lab-join-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let procs = dir.join("cgroup.procs");
        let out = Command::new("sh")
            .args(["-c", JOIN_AND_EXEC, "margay-lab"])
            .arg(&procs)
            .args(["printf", "%s|", "a b", "$HOME", "it's", "*"])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|$HOME|it's|*|");
        let pid: u32 = std::fs::read_to_string(&procs)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(pid > 0);
        std::fs::remove_dir_all(&dir).unwrap();
        let out = Command::new("sh")
            .args([
                "-c",
                JOIN_AND_EXEC,
                "margay-lab",
                "/nonexistent/dir/cgroup.procs",
                "true",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot join cgroup"));
    }
}
