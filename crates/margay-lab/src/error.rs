//! The lab's one error type.
//!
//! Every message is complete on its own (it names the failing command, its exit status and its
//! stderr, or the file and the operation), so callers can print `{e}` without walking sources.

use std::path::Path;

/// What went wrong in a lab operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name, address or argument the lab refuses; `reason` says what would be accepted.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },

    /// `create` found pieces of a lab with this name (a running lab or a crash's leftovers).
    #[error(
        "lab {name:?} already exists ({}); remove it with `margay-lab down --name {name}` and try again",
        found.join(", ")
    )]
    Exists { name: String, found: Vec<String> },

    /// `open` found no usable state for this lab.
    #[error("lab {name:?} is not usable: {reason}")]
    NotFound { name: String, reason: String },

    /// A node, pod or process that the lab's state does not have.
    #[error("lab {lab:?} has no {what} {name:?}{hint}")]
    Missing {
        lab: String,
        what: &'static str,
        name: String,
        hint: String,
    },

    /// The same node, pod, address or interface already exists.
    #[error("lab {lab:?} already has {what} {name:?}")]
    Duplicate {
        lab: String,
        what: &'static str,
        name: String,
    },

    /// An external command (ip, sysctl, sh) failed.
    #[error("`{command}` failed ({status}){}", stderr_suffix(stderr))]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    /// A file-system or system-call failure; `context` says what was being done to what.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },

    /// state.json could not be read or parsed.
    #[error(
        "the state of lab {lab:?} ({path}) is unreadable: {reason}; \
         remove the lab with `margay-lab down --name {lab}`"
    )]
    State {
        lab: String,
        path: String,
        reason: String,
    },

    /// A process did not do what was asked in time (did not exit, cgroup did not empty).
    #[error("{0}")]
    Timeout(String),
}

fn stderr_suffix(stderr: &str) -> String {
    let trimmed = stderr.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!(": {}", trimmed.replace('\n', " | "))
    }
}

/// The lab's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, cause: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            cause,
        }
    }

    pub(crate) fn io_path(verb: &str, path: &Path, cause: std::io::Error) -> Error {
        Error::io(format!("cannot {verb} {}", path.display()), cause)
    }

    pub(crate) fn invalid(
        what: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Error {
        Error::Invalid {
            what,
            value: value.into(),
            reason: reason.into(),
        }
    }
}
