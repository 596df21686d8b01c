//! Patch semantics: RFC 7386 merge patches, RFC 6902 JSON patches, and "strategic" patches.
//!
//! calicoctl accepts `--type json|merge` but always performs a strategic merge; Margay does what
//! the user asked. A strategic merge behaves as a merge patch for our kinds: Calico's kinds have
//! no list merge keys, and for the Kubernetes kinds replacing lists whole is the safe, predictable
//! reading (documented in docs/design/datastore.md).

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// The `--type` of a patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Strategic,
    Merge,
    Json,
}

impl FromStr for PatchType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strategic" => Ok(PatchType::Strategic),
            "merge" => Ok(PatchType::Merge),
            "json" => Ok(PatchType::Json),
            _ => Err(format!(
                "{s:?} is not a patch type; use strategic, merge or json"
            )),
        }
    }
}

impl fmt::Display for PatchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PatchType::Strategic => "strategic",
            PatchType::Merge => "merge",
            PatchType::Json => "json",
        })
    }
}

/// Why a patch could not be applied. The document is never partly changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

/// Applies `patch` (JSON, or YAML as kubectl also takes) to `doc` and returns the new document;
/// `doc` itself is left alone, so a failing JSON patch changes nothing.
pub fn apply_patch(doc: &Value, patch: &str, patch_type: PatchType) -> Result<Value, PatchError> {
    let patch_value: Value = serde_yaml_ng::from_str(patch)
        .map_err(|e| PatchError(format!("the patch is not valid JSON or YAML: {e}")))?;
    let mut out = doc.clone();
    match patch_type {
        PatchType::Merge | PatchType::Strategic => {
            if !patch_value.is_object() {
                return Err(PatchError(format!(
                    "a {patch_type} patch must be a JSON object, like {{\"spec\": {{...}}}}"
                )));
            }
            json_patch::merge(&mut out, &patch_value);
        }
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch_value).map_err(|e| {
                PatchError(format!(
                    "a json patch must be a list of RFC 6902 operations ({e})"
                ))
            })?;
            json_patch::patch(&mut out, &ops)
                .map_err(|e| PatchError(format!("the json patch failed: {e}")))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({"spec": {"bpfLogLevel": "", "wireguardEnabled": true, "bpfKubeProxyIptablesCleanupEnabled": false}})
    }

    #[test]
    fn merge_null_removes_a_field() {
        let out = apply_patch(
            &doc(),
            r#"{"spec": {"bpfKubeProxyIptablesCleanupEnabled": null}}"#,
            PatchType::Merge,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"spec": {"bpfLogLevel": "", "wireguardEnabled": true}})
        );
    }

    #[test]
    fn strategic_behaves_as_merge() {
        let p = r#"{"spec": {"wireguardEnabled": false}}"#;
        assert_eq!(
            apply_patch(&doc(), p, PatchType::Strategic).unwrap(),
            apply_patch(&doc(), p, PatchType::Merge).unwrap()
        );
    }

    #[test]
    fn json_patch_with_failing_test_changes_nothing() {
        let d = doc();
        let p = r#"[{"op": "replace", "path": "/spec/wireguardEnabled", "value": false},
                    {"op": "test", "path": "/spec/bpfLogLevel", "value": "Debug"}]"#;
        assert!(apply_patch(&d, p, PatchType::Json).is_err());
        assert_eq!(d, doc());
        let ok = r#"[{"op": "test", "path": "/spec/bpfLogLevel", "value": ""},
                     {"op": "add", "path": "/spec/bpfLogLevel", "value": "Debug"}]"#;
        assert_eq!(
            apply_patch(&d, ok, PatchType::Json).unwrap()["spec"]["bpfLogLevel"],
            "Debug"
        );
    }

    #[test]
    fn yaml_patches_and_bad_patches() {
        let out = apply_patch(
            &doc(),
            "spec:\n  wireguardEnabled: false\n",
            PatchType::Merge,
        )
        .unwrap();
        assert_eq!(out["spec"]["wireguardEnabled"], false);
        assert!(apply_patch(&doc(), "{not json", PatchType::Merge).is_err());
        assert!(apply_patch(&doc(), "[1]", PatchType::Merge).is_err());
        assert!(apply_patch(&doc(), r#"{"op": "add"}"#, PatchType::Json).is_err());
        assert!("xml".parse::<PatchType>().is_err());
    }
}
