//! What the agent answers over HTTP: its own health (`/liveness`, `/readiness`, `/status`), and
//! kube-proxy's per-Service health checks on `healthCheckNodePort`s, which cloud load balancers
//! probe to send externalTrafficPolicy Local traffic only to nodes with a local endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use tokio::task::JoinHandle;

/// The agent's state as `/status` reports it and the readiness check judges it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    /// `WaitingForDatastore`, `Resyncing` or `InSync`.
    pub datastore: String,
    /// The dataplane in use.
    pub dataplane: String,
    /// The highest datastore revision the dataplane reflects.
    pub synced_revision: u64,
    pub syncs: u64,
    pub last_sync_time: Option<String>,
    pub last_sync_duration_ms: Option<f64>,
    /// The last dataplane error, cleared by a successful sync.
    pub last_error: Option<String>,
    pub services: usize,
    pub routes: usize,
}

impl AgentStatus {
    pub fn ready(&self) -> bool {
        self.datastore == "InSync" && self.syncs > 0 && self.last_error.is_none()
    }
}

pub type SharedStatus = Arc<RwLock<AgentStatus>>;

/// Serves `/liveness`, `/readiness` and `/status` on `addr` until the process ends.
pub async fn serve_agent_health(addr: SocketAddr, status: SharedStatus) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/liveness", get(|| async { "ok\n" }))
        .route("/readiness", get(readiness))
        .route("/status", get(status_json))
        .with_state(status);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for health checks: {e}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn readiness(State(status): State<SharedStatus>) -> impl IntoResponse {
    let s = status.read().map(|s| s.clone()).unwrap_or_default();
    if s.ready() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: datastore {}, {} syncs, last error {}\n",
                s.datastore,
                s.syncs,
                s.last_error.as_deref().unwrap_or("none")
            ),
        )
    }
}

async fn status_json(State(status): State<SharedStatus>) -> impl IntoResponse {
    let s = status.read().map(|s| s.clone()).unwrap_or_default();
    axum::Json(s)
}

/// One Service's health check: who it is and how many ready endpoints it has on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// The `healthCheckNodePort` listeners, started and stopped as Services come and go.
#[derive(Debug, Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, (Arc<RwLock<ServiceHealth>>, JoinHandle<()>)>,
}

impl HealthCheckServers {
    /// Makes the listeners match `wanted` (port -> Service health). Listener failures (a port in
    /// use) are logged and retried at the next update.
    pub async fn update(&mut self, wanted: &BTreeMap<u16, ServiceHealth>) {
        let stale: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in stale {
            if let Some((_, task)) = self.servers.remove(&port) {
                task.abort();
                tracing::info!(port, "stopped health check server");
            }
        }
        for (port, health) in wanted {
            if let Some((shared, _)) = self.servers.get(port) {
                if let Ok(mut h) = shared.write() {
                    *h = health.clone();
                }
                continue;
            }
            let shared = Arc::new(RwLock::new(health.clone()));
            let app = Router::new()
                .fallback(get(service_health))
                .with_state(shared.clone());
            let addr = SocketAddr::from(([0, 0, 0, 0], *port));
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    let task = tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    });
                    tracing::info!(
                        port,
                        service = %format!("{}/{}", health.namespace, health.name),
                        "serving health check"
                    );
                    self.servers.insert(*port, (shared, task));
                }
                Err(e) => {
                    tracing::warn!(port, error = %e, "cannot serve health check; will retry");
                }
            }
        }
    }
}

/// kube-proxy's answer: 200 with the local endpoint count when there is one, 503 otherwise.
async fn service_health(State(h): State<Arc<RwLock<ServiceHealth>>>) -> impl IntoResponse {
    let h = h.read().map(|h| h.clone()).unwrap_or(ServiceHealth {
        namespace: String::new(),
        name: String::new(),
        local_endpoints: 0,
    });
    let body = serde_json::json!({
        "service": {"namespace": h.namespace, "name": h.name},
        "localEndpoints": h.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let code = if h.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}
