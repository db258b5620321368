//! `/healthz`, `/readyz` and `/metrics`, served by [`telemetry`].
//!
//! * `/healthz`: 200 while the process serves.
//! * `/readyz`: 200 once etcd is connected and the initial export (with its
//!   sync canaries) is written, 503 before.
//! * `/metrics` (Prometheus text format, computed at scrape time):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `mesh_apiserver_exported_records` | gauge | `kind` (nodes, ipcache, identities, services) |
//! | `mesh_apiserver_etcd_errors_total` | counter | |
//! | `mesh_apiserver_tampered_restored_total` | counter | `kind`: exported keys another writer changed or deleted, written back |
//! | `mesh_apiserver_foreign_removed_total` | counter | `kind`: keys another writer put under an exported prefix, deleted |
//! | `mesh_apiserver_ready` | gauge | |
//! | `mesh_apiserver_etcd_connected` | gauge | |

use std::sync::atomic::Ordering;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as Metrics;
use telemetry::Reply;
use tokio::net::TcpListener;

use crate::registry::Registry;

/// The metrics of `registry`, one scrape's worth.
pub async fn metrics(registry: &Registry) -> Metrics {
    let mut metrics = Metrics::with_prefix("mesh_apiserver");
    let exported = Family::<Vec<(&'static str, String)>, Gauge>::default();
    for (kind, n) in registry.exported_counts().await {
        exported
            .get_or_create(&vec![("kind", kind.to_owned())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    metrics.register(
        "exported_records",
        "Records exported to etcd, per kind.",
        exported,
    );
    let errors = Counter::<u64>::default();
    errors.inc_by(registry.etcd_errors());
    metrics.register(
        "etcd_errors",
        "Failed etcd requests (writes are retried).",
        errors,
    );
    let restored = Family::<Vec<(&'static str, String)>, Counter>::default();
    let removed = Family::<Vec<(&'static str, String)>, Counter>::default();
    for (kind, r, f) in registry.tampering() {
        let labels = vec![("kind", kind.to_owned())];
        restored.get_or_create(&labels).inc_by(r);
        removed.get_or_create(&labels).inc_by(f);
    }
    metrics.register(
        "tampered_restored",
        "Exported keys another writer changed or deleted, written back.",
        restored,
    );
    metrics.register(
        "foreign_removed",
        "Keys another writer put under an exported prefix, deleted.",
        removed,
    );
    let flag = |on: bool| {
        let g: Gauge = Gauge::default();
        g.set(i64::from(on));
        g
    };
    let counters = registry.counters();
    metrics.register(
        "ready",
        "Initial export synced and etcd connected.",
        flag(counters.ready.load(Ordering::Relaxed)),
    );
    metrics.register(
        "etcd_connected",
        "Last etcd write succeeded.",
        flag(counters.etcd_connected.load(Ordering::Relaxed)),
    );
    metrics
}

async fn handle(registry: Registry, path: String) -> Reply {
    match path.as_str() {
        "/healthz" => Reply::text(200, "ok\n"),
        "/readyz" => {
            let counters = registry.counters();
            if counters.ready.load(Ordering::Relaxed)
                && counters.etcd_connected.load(Ordering::Relaxed)
            {
                Reply::text(200, "ready\n")
            } else {
                Reply::text(503, "initial export not synced\n")
            }
        }
        "/metrics" => Reply::metrics(&metrics(&registry).await),
        _ => Reply::not_found(),
    }
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, registry: Registry) {
    telemetry::serve(
        listener,
        move |path| handle(registry.clone(), path),
        std::future::pending(),
    )
    .await;
}
