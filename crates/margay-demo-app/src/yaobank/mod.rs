//! The yaobank demo: `customer` -> `summary` -> `database`, as in the Calico labs.
//!
//! The original images were Flask apps (customer, summary) and an etcd (database). We keep their
//! interfaces: the customer page byte for byte as the lab shows it, werkzeug's access lines, and
//! etcd's v2 keys API (read-only) on the database's port 2379, so the labs' own commands
//! (`curl http://database:2379/v2/keys?recursive=true`) still work.

pub mod customer;
pub mod database;
pub mod summary;

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::access_log;
use crate::http_client;

/// Spike Curtis's account, the only one.
pub const ACCOUNT_ID: &str = "519940";
pub const ACCOUNT_NAME: &str = "Spike Curtis";
pub const ACCOUNT_BALANCE: &str = "2389.45";

/// GETs a JSON document from an upstream tier. Any failure (unreachable, non-2xx, not JSON) is
/// logged on stderr and becomes a 502 response that says which upstream failed and how.
pub(crate) async fn fetch_json(
    component: &str,
    upstream: &str,
    url: &str,
    timeout: Duration,
) -> Result<serde_json::Value, Response> {
    let failed = |why: String| {
        let message = format!("{upstream} service at {url} {why}");
        access_log::error(component, &message);
        (StatusCode::BAD_GATEWAY, format!("{message}\n")).into_response()
    };
    let response = http_client::get(url, timeout)
        .await
        .map_err(|f| failed(format!("is unreachable: {f}")))?;
    if !response.status.is_success() {
        let body = String::from_utf8_lossy(&response.body);
        return Err(failed(format!(
            "answered {}: {}",
            response.status,
            body.trim()
        )));
    }
    serde_json::from_slice(&response.body)
        .map_err(|e| failed(format!("answered something that is not JSON: {e}")))
}

/// A JSON field as text: strings as they are, numbers and others as JSON.
pub(crate) fn text_field(value: &serde_json::Value, field: &str) -> Option<String> {
    match value.get(field)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}
