//! The agent's Prometheus metrics (`--metrics-listen`), computed at scrape
//! time from the same snapshot as the status document, encoded by
//! prometheus-client and served by [`telemetry`].
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `mesh_agent_cluster_ready` | gauge | `cluster` |
//! | `mesh_agent_cluster_connected` | gauge | `cluster` |
//! | `mesh_agent_cluster_failures_total` | counter | `cluster` |
//! | `mesh_agent_cluster_entries` | gauge | `cluster`, `kind` (nodes, endpoints, identities, services) |
//! | `mesh_agent_rejected_records_total` | counter | `cluster`, `reason` |
//! | `mesh_agent_records_not_owned` | gauge | `cluster`, `reason` ([`crate::trust`]) |
//! | `mesh_agent_reconcile_passes_total` | counter | `kind` (incremental, full) |
//! | `mesh_agent_reconcile_runs_total`, `_errors_total`, `_changes_total`, `_resyncs_total`, `_resync_corrections_total` | counter | |
//! | `mesh_agent_reconcile_duration_seconds`, `_full_duration_seconds` | gauge | |
//! | `mesh_agent_ipcache_entries`, `mesh_agent_local_endpoints` | gauge | |
//! | `mesh_agent_services_frontends` | gauge | |
//! | `mesh_agent_services_errors_total`, `mesh_agent_services_conflicts_total` | counter | |
//! | `mesh_agent_wireguard_healthy` (gauge), `mesh_agent_wireguard_health_failures_total` (counter) | with `--encryption wireguard` | |

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use api::agent::AgentStatus;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use telemetry::Reply;
use tokio::net::TcpListener;

use crate::status::StatusSource;

type Labels = Vec<(&'static str, String)>;

fn gauge(value: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

fn seconds(value: f64) -> Gauge<f64, AtomicU64> {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    g
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

/// The registry of one scrape: every metric of the module docs, from
/// `status`.
pub fn registry(status: &AgentStatus) -> Registry {
    let mut registry = Registry::with_prefix("mesh_agent");
    let by_cluster = |f: &dyn Fn(&api::agent::ClusterStatus) -> u64| {
        let family = Family::<Labels, Gauge>::default();
        for c in &status.clusters {
            family
                .get_or_create(&vec![("cluster", c.name.clone())])
                .set(i64::try_from(f(c)).unwrap_or(i64::MAX));
        }
        family
    };
    registry.register(
        "cluster_ready",
        "Whether the cluster is connected and fully synced.",
        by_cluster(&|c| u64::from(c.ready)),
    );
    registry.register(
        "cluster_connected",
        "Whether the cluster's etcd connection is up.",
        by_cluster(&|c| u64::from(c.connected)),
    );
    let failures = Family::<Labels, Counter>::default();
    let entries = Family::<Labels, Gauge>::default();
    let rejected = Family::<Labels, Counter>::default();
    let not_owned = Family::<Labels, Gauge>::default();
    for c in &status.clusters {
        let cluster = || ("cluster", c.name.clone());
        failures
            .get_or_create(&vec![cluster()])
            .inc_by(c.num_failures);
        for (kind, n) in [
            ("nodes", c.num_nodes),
            ("endpoints", c.num_endpoints),
            ("identities", c.num_identities),
            ("services", c.num_shared_services),
        ] {
            entries
                .get_or_create(&vec![cluster(), ("kind", kind.to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for (reason, n) in &c.rejected {
            rejected
                .get_or_create(&vec![cluster(), ("reason", reason.clone())])
                .inc_by(*n);
        }
        for (reason, n) in &c.not_owned {
            not_owned
                .get_or_create(&vec![cluster(), ("reason", reason.clone())])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
    registry.register(
        "cluster_failures",
        "Connection failures per cluster.",
        failures,
    );
    registry.register(
        "cluster_entries",
        "Records held per cluster and kind.",
        entries,
    );
    registry.register(
        "rejected_records",
        "Records refused by validation, per cluster and reason.",
        rejected,
    );
    registry.register(
        "records_not_owned",
        "Records held but not used because they claim what their cluster does not own, per cluster and reason.",
        not_owned,
    );
    let r = &status.reconcile;
    let passes = Family::<Labels, Counter>::default();
    passes
        .get_or_create(&vec![("kind", "incremental".to_owned())])
        .inc_by(r.incremental_passes);
    passes
        .get_or_create(&vec![("kind", "full".to_owned())])
        .inc_by(r.full_passes);
    registry.register(
        "reconcile_passes",
        "Reconcile passes by kind: incremental (queued changes) or full.",
        passes,
    );
    for (name, help, value) in [
        ("reconcile_runs", "Completed reconcile passes.", r.runs),
        ("reconcile_errors", "Failed datapath or tunnel writes.", r.errors),
        (
            "reconcile_changes",
            "Endpoint and node changes applied by incremental passes.",
            r.changes_applied,
        ),
        (
            "reconcile_resyncs",
            "Periodic resyncs (full pass over a re-read ipcache map).",
            r.resyncs,
        ),
        (
            "reconcile_resync_corrections",
            "ipcache writes a resync had to make; non-zero means the incremental passes missed a change or someone else wrote the map.",
            r.resync_corrections,
        ),
        (
            "services_errors",
            "Failed load-balancer writes.",
            status.services.errors,
        ),
        (
            "services_conflicts",
            "Frontends or backend IPs claimed twice in the last service pass.",
            status.services.conflicts,
        ),
    ] {
        registry.register(name, help, counter(value));
    }
    registry.register(
        "reconcile_duration_seconds",
        "Duration of the last reconcile pass.",
        seconds(r.last_duration_seconds),
    );
    registry.register(
        "reconcile_full_duration_seconds",
        "Duration of the last full reconcile pass.",
        seconds(r.last_full_duration_seconds),
    );
    for (name, help, value) in [
        (
            "ipcache_entries",
            "Entries in the ipcache map owned by the reconciler.",
            r.ipcache_entries,
        ),
        (
            "local_endpoints",
            "Pods on this node.",
            status.local_endpoints,
        ),
        (
            "services_frontends",
            "Frontends in the load balancer.",
            status.services.frontends,
        ),
    ] {
        registry.register(name, help, gauge(value));
    }
    if let Some(wg) = &r.wireguard {
        registry.register(
            "wireguard_healthy",
            "Whether the WireGuard device answered its last health check.",
            gauge(u64::from(wg.healthy)),
        );
        registry.register(
            "wireguard_health_failures",
            "Failed WireGuard device health checks.",
            counter(wg.failures),
        );
    }
    registry
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve<S: StatusSource>(
    listener: TcpListener,
    source: Arc<S>,
    shutdown: impl Future<Output = ()>,
) {
    telemetry::serve(
        listener,
        move |path: String| {
            let source = source.clone();
            async move {
                match path.as_str() {
                    "/metrics" => Reply::metrics(&registry(&source.snapshot().await)),
                    _ => Reply::text(404, "not found; try /metrics\n"),
                }
            }
        },
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cluster_samples_and_conventional_names() {
        let mut status = AgentStatus::default();
        let mut c2 = api::agent::ClusterStatus {
            name: "c2".into(),
            ready: true,
            num_endpoints: 3,
            ..Default::default()
        };
        c2.rejected.insert("cluster_mismatch".into(), 2);
        status.clusters.push(c2);
        status.reconcile.runs = 7;
        status.reconcile.last_duration_seconds = 0.25;
        let text = telemetry::encode(&registry(&status));
        for want in [
            "mesh_agent_cluster_ready{cluster=\"c2\"} 1\n",
            "mesh_agent_cluster_entries{cluster=\"c2\",kind=\"endpoints\"} 3\n",
            "mesh_agent_rejected_records_total{cluster=\"c2\",reason=\"cluster_mismatch\"} 2\n",
            "mesh_agent_reconcile_duration_seconds 0.25\n",
            "# TYPE mesh_agent_reconcile_runs_total counter\nmesh_agent_reconcile_runs_total 7\n",
        ] {
            assert!(text.contains(want), "{want:?} missing in\n{text}");
        }
    }
}
