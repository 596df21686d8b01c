//! Reading resources from a file or standard input: YAML or JSON, several documents, and Lists
//! (`kind: List` or `kind: <Kind>List`, as `get -o yaml` prints them) flattened into their items.

use std::io::Read;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

/// Reads every resource in `path` (`-` is standard input).
pub fn read_manifests(path: &str) -> Result<Vec<Value>> {
    let (text, origin) = if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        (text, "standard input".to_owned())
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        (text, path.to_owned())
    };
    let documents = parse_documents(&text).with_context(|| format!("cannot parse {origin}"))?;
    let mut manifests = Vec::new();
    for doc in documents {
        flatten(doc, &mut manifests)?;
    }
    if manifests.is_empty() {
        bail!("{origin} holds no resources");
    }
    Ok(manifests)
}

/// Splits text into documents: a JSON stream when it starts like JSON, YAML documents otherwise.
pub fn parse_documents(text: &str) -> Result<Vec<Value>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut docs = Vec::new();
        for doc in serde_json::Deserializer::from_str(trimmed).into_iter::<Value>() {
            docs.push(doc.map_err(|e| anyhow!("invalid JSON: {e}"))?);
        }
        return Ok(docs);
    }
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| anyhow!("invalid YAML: {e}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn flatten(doc: Value, out: &mut Vec<Value>) -> Result<()> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let is_list = kind == "List" || (kind.ends_with("List") && doc.get("items").is_some());
    if !is_list {
        if let Value::Array(items) = doc {
            // A bare JSON array of resources.
            for item in items {
                flatten(item, out)?;
            }
        } else {
            out.push(doc);
        }
        return Ok(());
    }
    let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
    let api_version = doc["apiVersion"].clone();
    let Some(Value::Array(items)) = doc.get("items").cloned() else {
        bail!("a {kind} must have an items array");
    };
    for mut item in items {
        // calicoctl's typed lists may omit each item's apiVersion and kind.
        if let (Some(k), Some(map)) = (item_kind, item.as_object_mut()) {
            map.entry("kind").or_insert_with(|| k.into());
            map.entry("apiVersion")
                .or_insert_with(|| api_version.clone());
        }
        flatten(item, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_json_streams_and_lists() {
        let yaml = "---\nkind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\n---\nkind: Namespace\napiVersion: v1\nmetadata: {name: b}\n";
        assert_eq!(parse_documents(yaml).unwrap().len(), 2);
        let json = r#"{"kind":"Namespace"} {"kind":"Namespace"}"#;
        assert_eq!(parse_documents(json).unwrap().len(), 2);
        let list: Value = serde_json::json!({"apiVersion": "projectcalico.org/v3",
            "kind": "IPPoolList", "items": [{"metadata": {"name": "p"}}]});
        let mut out = Vec::new();
        flatten(list, &mut out).unwrap();
        assert_eq!(out[0]["kind"], "IPPool");
        assert_eq!(out[0]["apiVersion"], "projectcalico.org/v3");
        assert!(parse_documents("a: [1, 2").is_err());
        assert!(parse_documents("{\"a\": ").is_err());
    }
}
