//! Name rules shared by every kind: Kubernetes' DNS-1123 names and label syntax.

use std::collections::BTreeMap;

use crate::error::{Validation, ValidationError, fail};

/// A DNS-1123 subdomain: lower-case alphanumerics, `-` and `.`, starting and ending with an
/// alphanumeric, at most 253 characters. Most object names follow it.
pub fn check_subdomain(path: &str, name: &str) -> Validation {
    if name.is_empty() {
        return fail(path, "must not be empty");
    }
    if name.len() > 253 {
        return fail(path, format!("{name:?} is longer than 253 characters"));
    }
    for part in name.split('.') {
        if !is_dns_label(part) {
            return fail(
                path,
                format!(
                    "{name:?} is not a valid name: use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
                ),
            );
        }
    }
    Ok(())
}

/// A DNS-1123 label: like a subdomain but without dots and at most 63 characters. Namespace and
/// Service names follow it.
pub fn check_label_name(path: &str, name: &str) -> Validation {
    if name.is_empty() {
        return fail(path, "must not be empty");
    }
    if !is_dns_label(name) {
        return fail(
            path,
            format!(
                "{name:?} is not a valid name: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
            ),
        );
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks label keys and values as Kubernetes does: an optional DNS subdomain prefix and a name of
/// at most 63 characters; values at most 63 characters of alphanumerics, `-`, `_` and `.`.
pub fn check_labels(path: &str, labels: Option<&BTreeMap<String, String>>) -> Validation {
    for (key, value) in labels.into_iter().flatten() {
        check_label_key(&format!("{path}[{key:?}]"), key)?;
        if !is_label_value(value) {
            return fail(
                format!("{path}[{key:?}]"),
                format!(
                    "{value:?} is not a valid label value: at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
                ),
            );
        }
    }
    Ok(())
}

/// Checks one label (or annotation) key.
pub fn check_label_key(path: &str, key: &str) -> Validation {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        check_subdomain(path, prefix).map_err(|e| {
            ValidationError::new(e.path, format!("the prefix of key {key:?}: {}", e.message))
        })?;
    }
    if name.is_empty() || name.len() > 63 || !is_qualified_name(name) {
        return fail(
            path,
            format!(
                "{key:?} is not a valid key: a name of at most 63 letters, digits, '-', '_' and '.' with an optional DNS prefix and '/'"
            ),
        );
    }
    Ok(())
}

fn is_qualified_name(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
        && bytes
            .iter()
            .all(|&b| alnum(b) || b == b'-' || b == b'_' || b == b'.')
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || (s.len() <= 63 && is_qualified_name(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains() {
        assert!(check_subdomain("metadata.name", "node-1.example").is_ok());
        assert!(check_subdomain("metadata.name", "Node_1").is_err());
        assert!(check_subdomain("metadata.name", "").is_err());
        assert!(check_subdomain("metadata.name", "-a").is_err());
    }

    #[test]
    fn labels() {
        let ok: BTreeMap<_, _> = [("app".to_owned(), "customer".to_owned())].into();
        assert!(check_labels("metadata.labels", Some(&ok)).is_ok());
        let prefixed: BTreeMap<_, _> =
            [("k8s-app.io/name".to_owned(), "kube-dns".to_owned())].into();
        assert!(check_labels("metadata.labels", Some(&prefixed)).is_ok());
        let bad: BTreeMap<_, _> = [("app".to_owned(), "no spaces".to_owned())].into();
        let err = check_labels("metadata.labels", Some(&bad)).unwrap_err();
        assert_eq!(err.path, "metadata.labels[\"app\"]");
    }
}
