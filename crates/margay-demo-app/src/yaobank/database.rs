//! `database`: the account data, served through a read-only subset of etcd's v2 keys API (the
//! original yaobank database was an etcd), plus a plain JSON shortcut.
//!
//! - `GET /v2/keys[/KEY][?recursive=true]`: etcd v2's answer shape (`action`, `node`, `nodes`,
//!   `dir`, `createdIndex`, `modifiedIndex`; 404 with `errorCode` 100 for a missing key).
//! - `GET /accounts/519940` or `GET /accounts/spike`: `{"name":"Spike Curtis","balance":"2389.45"}`.
//! - `GET /healthz`.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderName, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::{ACCOUNT_BALANCE, ACCOUNT_ID, ACCOUNT_NAME};
use crate::cli::DatabaseArgs;
use crate::server;

/// The store, sorted by key: `(key, value)`. Indexes count from 4, as a fresh etcd's do.
const KEYS: &[(&str, &str)] = &[
    ("/accounts/519940/balance", ACCOUNT_BALANCE),
    ("/accounts/519940/name", ACCOUNT_NAME),
];
const FIRST_INDEX: usize = 4;

pub async fn run(args: DatabaseArgs) -> anyhow::Result<()> {
    server::serve_http("database", args.listen, router()).await
}

pub fn router() -> Router {
    Router::new()
        .route("/v2/keys", get(keys))
        .route("/v2/keys/", get(keys))
        .route("/v2/keys/{*key}", get(keys))
        .route("/accounts/{id}", get(account))
        .route("/healthz", get(super::healthz))
}

async fn account(Path(id): Path<String>) -> Response {
    if id == ACCOUNT_ID || id.eq_ignore_ascii_case("spike") {
        axum::Json(json!({"name": ACCOUNT_NAME, "balance": ACCOUNT_BALANCE})).into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": format!("no account {id:?}")})),
        )
            .into_response()
    }
}

async fn keys(uri: Uri) -> Response {
    let key = uri
        .path()
        .strip_prefix("/v2/keys")
        .unwrap_or_default()
        .trim_end_matches('/');
    let recursive = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair == "recursive=true");
    let index = (FIRST_INDEX + KEYS.len() - 1).to_string();
    let etcd_index = HeaderName::from_static("x-etcd-index");
    match node(key, recursive, true) {
        Some(node) => (
            [(etcd_index, index)],
            axum::Json(json!({"action": "get", "node": node})),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(etcd_index, index.clone())],
            axum::Json(json!({
                "errorCode": 100,
                "message": "Key not found",
                "cause": if key.is_empty() { "/" } else { key },
                "index": FIRST_INDEX + KEYS.len() - 1,
            })),
        )
            .into_response(),
    }
}

/// etcd v2's node for `key` ("" is the root): a leaf, or a directory listing its children
/// (grandchildren only when `recursive`). `None` if there is no such key.
fn node(key: &str, recursive: bool, top: bool) -> Option<Value> {
    if let Some(i) = KEYS.iter().position(|(k, _)| *k == key) {
        let index = FIRST_INDEX + i;
        return Some(json!({
            "key": key,
            "value": KEYS[i].1,
            "modifiedIndex": index,
            "createdIndex": index,
        }));
    }
    let prefix = format!("{key}/");
    let below: Vec<(usize, &str)> = KEYS
        .iter()
        .enumerate()
        .filter_map(|(i, (k, _))| k.strip_prefix(&prefix).map(|rest| (i, rest)))
        .collect();
    let (first, _) = *below.first()?;
    let mut dir = serde_json::Map::new();
    if !key.is_empty() {
        dir.insert("key".into(), json!(key));
    }
    dir.insert("dir".into(), json!(true));
    if top || recursive {
        let mut children: Vec<&str> = below
            .iter()
            .filter_map(|(_, rest)| rest.split('/').next())
            .collect();
        children.dedup();
        let nodes: Vec<Value> = children
            .into_iter()
            .filter_map(|child| node(&format!("{key}/{child}"), recursive, false))
            .collect();
        dir.insert("nodes".into(), Value::Array(nodes));
    }
    if !key.is_empty() {
        let index = FIRST_INDEX + first;
        dir.insert("modifiedIndex".into(), json!(index));
        dir.insert("createdIndex".into(), json!(index));
    }
    Some(Value::Object(dir))
}

/// Reads an account's name and balance out of an etcd v2 answer for
/// `/v2/keys/accounts/<id>?recursive=true`.
pub fn account_from_etcd(answer: &Value) -> Option<(String, String)> {
    let nodes = answer.get("node")?.get("nodes")?.as_array()?;
    let field = |name: &str| {
        nodes.iter().find_map(|n| {
            let key = n.get("key")?.as_str()?;
            key.rsplit('/')
                .next()
                .filter(|last| *last == name)
                .and_then(|_| super::text_field(n, "value"))
        })
    };
    Some((field("name")?, field("balance")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_and_directories_have_etcd_v2_shapes() {
        assert_eq!(
            node("/accounts/519940/name", false, true),
            Some(
                json!({"key": "/accounts/519940/name", "value": "Spike Curtis",
                        "modifiedIndex": 5, "createdIndex": 5})
            )
        );
        let account = node("/accounts/519940", false, true).unwrap();
        assert_eq!(account["dir"], json!(true));
        assert_eq!(account["nodes"].as_array().map(Vec::len), Some(2));
        // Not recursive: a subdirectory is listed without its children.
        let accounts = node("/accounts", false, true).unwrap();
        assert_eq!(accounts["nodes"][0]["key"], json!("/accounts/519940"));
        assert!(accounts["nodes"][0].get("nodes").is_none());
        // Recursive from the root: everything, and the root has no key.
        let root = node("", true, true).unwrap();
        assert!(root.get("key").is_none());
        assert_eq!(
            root["nodes"][0]["nodes"][0]["nodes"][1]["value"],
            json!("Spike Curtis")
        );
        assert_eq!(node("/accounts/42", true, true), None);
        assert_eq!(node("/acc", true, true), None);
    }

    #[test]
    fn summary_reads_the_account_back() {
        let answer = json!({"action": "get", "node": node("/accounts/519940", true, true)});
        assert_eq!(
            account_from_etcd(&answer),
            Some(("Spike Curtis".to_owned(), "2389.45".to_owned()))
        );
        assert_eq!(account_from_etcd(&json!({"action": "get"})), None);
    }
}
