//! `summary`: `GET /` answers `{"name": ..., "balance": ...}` for one account, read from the
//! database (`GET <database-url>/v2/keys/accounts/<account>?recursive=true`, which a real etcd
//! answers too). Database failures are 502s that say what failed.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::database::account_from_etcd;
use crate::access_log;
use crate::cli::SummaryArgs;
use crate::server;

#[derive(Debug)]
struct Config {
    account_url: String,
    timeout: Duration,
}

pub async fn run(args: SummaryArgs) -> anyhow::Result<()> {
    let app = router(&args.database_url, &args.account, args.timeout);
    server::serve_http("summary", args.listen, app).await
}

pub fn router(database_url: &str, account: &str, timeout: Duration) -> Router {
    let config = Arc::new(Config {
        account_url: format!(
            "{}/v2/keys/accounts/{account}?recursive=true",
            database_url.trim_end_matches('/')
        ),
        timeout,
    });
    Router::new()
        .route("/", get(summary))
        .route("/healthz", get(super::healthz))
        .with_state(config)
}

async fn summary(State(config): State<Arc<Config>>) -> Response {
    let answer =
        match super::fetch_json("summary", "database", &config.account_url, config.timeout).await {
            Ok(answer) => answer,
            Err(response) => return response,
        };
    match account_from_etcd(&answer) {
        Some((name, balance)) => {
            axum::Json(json!({"name": name, "balance": balance})).into_response()
        }
        None => {
            let message = format!(
                "database at {} answered without an account name and balance",
                config.account_url
            );
            access_log::error("summary", &message);
            (StatusCode::BAD_GATEWAY, format!("{message}\n")).into_response()
        }
    }
}
