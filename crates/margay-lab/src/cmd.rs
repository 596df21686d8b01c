//! Running `ip`, `sysctl` and friends, with errors that name the command and quote its stderr.
//!
//! The lab talks to the kernel by shelling out (see docs/design/lab.md, "Why shell out"). To keep
//! `up` fast it batches: one `ip -n NS -batch -` process per namespace and phase, one
//! `ip netns exec NS sysctl -w ...` per namespace, and independent namespaces in parallel.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::error::{Error, Result};

/// Quotes one word for display as a shell would need it.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A command line for messages: `ip -n lab-node-1 route add ...`.
pub fn describe<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut out = shell_quote(program);
    for a in args {
        out.push(' ');
        out.push_str(&shell_quote(&a.as_ref().to_string_lossy()));
    }
    out
}

fn status_text(output: &Output) -> String {
    match output.status.code() {
        Some(code) => format!("exit status {code}"),
        None => format!("{}", output.status),
    }
}

/// Runs `program args...` with stdin closed, captures its output, and fails unless it exits 0.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output> {
    run_with_stdin(program, args, None)
}

/// As [`run`], feeding `stdin` to the command.
pub fn run_with_stdin<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stdin: Option<&str>,
) -> Result<Output> {
    let line = describe(program, args);
    tracing::debug!(command = %line, "run");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("cannot run `{line}`"), e))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A command that exits early closes the pipe; its exit status tells the real story.
        let _ = pipe.write_all(text.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("cannot wait for `{line}`"), e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::Command {
            command: line,
            status: status_text(&output),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Runs `ip [-n NETNS] -batch -` over `lines`, stopping at the first failing line, whose text
/// the error quotes.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let script = lines.join("\n") + "\n";
    match run_with_stdin("ip", &args, Some(&script)) {
        Ok(_) => Ok(()),
        Err(Error::Command {
            command,
            status,
            stderr,
        }) => {
            let failed = failed_batch_line(&stderr)
                .and_then(|n| lines.get(n.wrapping_sub(1)))
                .map(|l| format!(" at `{l}`"))
                .unwrap_or_default();
            Err(Error::Command {
                command: format!("{command}{failed}"),
                status,
                stderr,
            })
        }
        Err(e) => Err(e),
    }
}

/// iproute2 reports a failing batch line as `Command failed -:N`.
fn failed_batch_line(stderr: &str) -> Option<usize> {
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Command failed -:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Sets sysctls inside a namespace: `ip netns exec NS sysctl -q -w k=v ...`.
pub fn sysctl(netns: &str, settings: &[(String, String)]) -> Result<()> {
    if settings.is_empty() {
        return Ok(());
    }
    let mut args = vec![
        "netns".to_owned(),
        "exec".to_owned(),
        netns.to_owned(),
        "sysctl".to_owned(),
        "-q".to_owned(),
        "-w".to_owned(),
    ];
    args.extend(settings.iter().map(|(k, v)| format!("{k}={v}")));
    run("ip", &args).map(|_| ())
}

/// A unit of work for [`parallel`].
pub type Job<'a> = Box<dyn FnOnce() -> Result<()> + Send + 'a>;

/// Runs independent jobs on threads of their own and waits for all of them; returns the first
/// failure in job order (all jobs run to completion either way, so nothing is left half-done
/// behind the caller's back).
pub fn parallel(jobs: Vec<Job<'_>>) -> Result<()> {
    if jobs.len() <= 1 {
        return jobs.into_iter().try_for_each(|job| job());
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs.into_iter().map(|job| scope.spawn(job)).collect();
        let mut first: Option<Error> = None;
        for h in handles {
            let result = h
                .join()
                .unwrap_or_else(|_| Err(Error::Timeout("a lab worker thread panicked".into())));
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(shell_quote("10.0.0.1/32"), "10.0.0.1/32");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(describe("ip", &["-n", "x y"]), "ip -n 'x y'");
    }

    #[test]
    fn batch_line_numbers() {
        assert_eq!(
            failed_batch_line("Error: Nexthop has invalid gateway.\nCommand failed -:3\n"),
            Some(3)
        );
        assert_eq!(failed_batch_line("nothing"), None);
    }

    #[test]
    fn failing_command_names_itself_and_its_stderr() {
        let e = run("sh", &["-c", "echo boom >&2; exit 3"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sh -c 'echo boom >&2; exit 3'`"), "{e}");
        assert!(e.contains("exit status 3"), "{e}");
        assert!(e.ends_with(": boom"), "{e}");
        let e = run("/nonexistent/prog", &["x"]).unwrap_err().to_string();
        assert!(e.contains("cannot run `/nonexistent/prog x`"), "{e}");
    }

    #[test]
    fn parallel_reports_first_failure_in_order() {
        let jobs: Vec<Job<'_>> = vec![
            Box::new(|| Ok(())),
            Box::new(|| Err(Error::Timeout("second".into()))),
            Box::new(|| Err(Error::Timeout("third".into()))),
        ];
        assert_eq!(parallel(jobs).unwrap_err().to_string(), "second");
    }
}
