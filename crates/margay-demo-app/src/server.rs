//! Serving an axum router the way all our HTTP workloads do: the access-log middleware, the peer
//! address in every request, werkzeug's startup banner on stderr, and a clean exit on SIGTERM or
//! SIGINT.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use tokio::net::TcpListener;

use crate::access_log;

/// Binds `listen` and serves `app` until SIGTERM/SIGINT.
pub async fn serve_http(component: &str, listen: SocketAddr, app: Router) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("{component}: cannot listen on {listen}"))?;
    serve_listener(component, listener, app).await
}

/// Serves `app` on a bound listener until SIGTERM/SIGINT.
pub async fn serve_listener(
    component: &str,
    listener: TcpListener,
    app: Router,
) -> anyhow::Result<()> {
    let local = listener.local_addr().context("listener address")?;
    banner(&format!(
        "{component}: Running on http://{local}/ (Press CTRL+C to quit)"
    ));
    let app = app.layer(axum::middleware::from_fn(access_log::middleware));
    let serve = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    );
    tokio::select! {
        result = serve => result.with_context(|| format!("{component}: serving on {local}")),
        () = shutdown_signal() => Ok(()),
    }
}

/// ` * <text>` on stderr, as werkzeug announces itself.
pub fn banner(text: &str) {
    eprintln!(" * {text}");
}

/// Resolves on SIGTERM or SIGINT (or never, if the handlers cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
