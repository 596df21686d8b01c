//! Validation errors that name the field at fault.

use std::fmt;

/// A rejected manifest: the field path (`spec.bpfLogLevel`, `spec.ports[0].port`) and why.
///
/// Displayed as `spec.bpfLogLevel: "Loud" is not one of Off, Info, Debug`, the one line that
/// margayctl prints on stderr.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub path: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ValidationError {
        ValidationError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Prefixes the path with the enclosing field (`spec` + `ports[0]` = `spec.ports[0]`).
    pub fn within(mut self, parent: &str) -> ValidationError {
        self.path = join_path(parent, &self.path);
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Joins two field paths, leaving array indices attached (`spec` + `[0]` = `spec[0]`).
pub fn join_path(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_owned(),
        (_, true) => parent.to_owned(),
        _ if child.starts_with('[') => format!("{parent}{child}"),
        _ => format!("{parent}.{child}"),
    }
}

/// Result of a validation step.
pub type Validation = Result<(), ValidationError>;

/// Shorthand for failing at `path`.
pub fn fail<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, ValidationError> {
    Err(ValidationError::new(path, message))
}
