//! Why a probe (or an upstream call) failed, and the exit code each reason maps to.
//!
//! The lab's connectivity matrix asserts on these codes, so the classification is exact and
//! documented: a policy that drops packets shows as a timeout, a missing listener (or a NAT entry
//! pointing at one) as refused, a conntrack or NAT mistake mid-connection often as a reset, and a
//! broken cluster DNS as a DNS failure, never as one of the others.

use std::fmt;
use std::io;

/// The reason an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connection refused (TCP RST to the SYN, or ICMP port unreachable for UDP).
    Refused,
    /// The connection was reset or closed by the peer before it answered.
    Reset,
    /// No answer within `--timeout` (connect or reply).
    Timeout,
    /// The name did not resolve (or the lookup itself timed out).
    Dns,
    /// Anything else: unreachable network, bad answer, non-2xx HTTP status, ...
    Other,
}

impl FailureKind {
    /// The process exit code: 3 refused/reset, 4 timeout, 5 DNS, 1 other (2 is clap's usage
    /// error).
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Refused | Self::Reset => 3,
            Self::Timeout => 4,
            Self::Dns => 5,
            Self::Other => 1,
        }
    }

    /// The stable word that starts the stderr line.
    pub fn word(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::Dns => "dns",
            Self::Other => "error",
        }
    }

    /// Classifies an I/O error from connect, send or receive.
    pub fn of_io(error: &io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => Self::Reset,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Self::Timeout,
            _ => Self::Other,
        }
    }
}

/// A failed attempt: its kind and one line saying what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// An I/O error during `what` (e.g. "connect 10.0.0.1:80").
    pub fn io(what: &str, error: &io::Error) -> Self {
        Self::new(
            FailureKind::of_io(error),
            format!("{what}: {}", describe_io(error)),
        )
    }
}

impl fmt::Display for Failure {
    /// `<word>: <message>`, e.g. `refused: connect 127.0.0.1:9: connection refused`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.word(), self.message)
    }
}

impl std::error::Error for Failure {}

/// The error's own words without the "(os error N)" suffix, lower-cased as in the kernel's.
fn describe_io(error: &io::Error) -> String {
    let text = error.to_string();
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_owned(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_documented_codes() {
        let code = |kind| FailureKind::of_io(&io::Error::from(kind)).exit_code();
        assert_eq!(code(io::ErrorKind::ConnectionRefused), 3);
        assert_eq!(code(io::ErrorKind::ConnectionReset), 3);
        assert_eq!(code(io::ErrorKind::TimedOut), 4);
        assert_eq!(code(io::ErrorKind::HostUnreachable), 1);
        assert_eq!(code(io::ErrorKind::PermissionDenied), 1);
        assert_eq!(FailureKind::Dns.exit_code(), 5);
    }

    #[test]
    fn display_is_one_line_starting_with_the_kind() {
        let failure = Failure::io(
            "connect 127.0.0.1:9",
            &io::Error::from_raw_os_error(111), // ECONNREFUSED on Linux
        );
        assert_eq!(
            failure.to_string(),
            "refused: connect 127.0.0.1:9: connection refused"
        );
    }
}
