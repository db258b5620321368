//! `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1.
//!
//! * `/healthz`: 200 while the process serves.
//! * `/readyz`: 200 once etcd is connected and the initial export (with its
//!   sync canaries) is written, 503 before.
//! * `/metrics`: Prometheus text format: exported records per kind, etcd
//!   errors, sessions, readiness.

use std::{convert::Infallible, fmt::Write as _, sync::atomic::Ordering};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::registry::Registry;

/// Renders the metrics of `registry` in the Prometheus text format.
pub async fn render_metrics(registry: &Registry) -> String {
    let mut out = String::new();
    out.push_str("# HELP mesh_apiserver_exported Records exported to etcd, per kind.\n");
    out.push_str("# TYPE mesh_apiserver_exported gauge\n");
    for (kind, n) in registry.exported_counts().await {
        let _ = writeln!(out, "mesh_apiserver_exported{{kind=\"{kind}\"}} {n}");
    }
    out.push_str(
        "# HELP mesh_apiserver_etcd_errors_total Failed etcd requests (writes are retried).\n",
    );
    out.push_str("# TYPE mesh_apiserver_etcd_errors_total counter\n");
    let _ = writeln!(
        out,
        "mesh_apiserver_etcd_errors_total {}",
        registry.etcd_errors()
    );
    out.push_str("# HELP mesh_apiserver_ready Initial export synced and etcd connected.\n");
    out.push_str("# TYPE mesh_apiserver_ready gauge\n");
    let _ = writeln!(
        out,
        "mesh_apiserver_ready {}",
        u8::from(registry.counters().ready.load(Ordering::Relaxed))
    );
    out.push_str("# HELP mesh_apiserver_etcd_connected Last etcd write succeeded.\n");
    out.push_str("# TYPE mesh_apiserver_etcd_connected gauge\n");
    let _ = writeln!(
        out,
        "mesh_apiserver_etcd_connected {}",
        u8::from(registry.counters().etcd_connected.load(Ordering::Relaxed))
    );
    out
}

async fn handle(
    registry: Registry,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => {
            let ready = registry.counters().ready.load(Ordering::Relaxed)
                && registry.counters().etcd_connected.load(Ordering::Relaxed);
            if ready {
                (StatusCode::OK, "ready\n".to_owned())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "initial export not synced\n".to_owned(),
                )
            }
        }
        "/metrics" => (StatusCode::OK, render_metrics(&registry).await),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if req.uri().path() == "/metrics" {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
    }
    Ok(response)
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, registry: Registry) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, "health accept failed");
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(registry.clone(), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "health connection failed");
            }
        });
    }
}
