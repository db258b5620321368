//! What the agent reports: the status document on the status socket and the
//! Prometheus metrics derived from the same snapshot.
//!
//! Status socket protocol: connect, read until EOF. The agent writes exactly
//! one JSON document ([`AgentStatus`]) per connection and closes, so
//! `socat - UNIX-CONNECT:/run/mesh/status.sock | jq` or a ten-line client in
//! meshctl reads it; there is no request to send.
//!
//! The per-cluster fields mirror Cilium's remote-cluster status
//! (`cilium-dbg status --verbose`, `clustermesh status`), with the same names.
//!
//! The document's types live in [`api::agent`], shared with its readers
//! (`meshctl clustermesh status`, `meshctl service list`).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use api::agent::{AgentStatus, ClusterStatus, ReconcileStatus};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{debug, warn};

use crate::unix::bind_unix;

/// Shared, cheaply updated status of the cluster tasks and the reconciler.
#[derive(Debug, Default)]
pub struct StatusHub {
    clusters: RwLock<BTreeMap<String, ClusterStatus>>,
    reconcile: RwLock<ReconcileStatus>,
}

impl StatusHub {
    /// Applies `f` to the status of `cluster` (created if new).
    pub fn update_cluster(&self, cluster: &str, f: impl FnOnce(&mut ClusterStatus)) {
        let mut map = self
            .clusters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map
            .entry(cluster.to_owned())
            .or_insert_with(|| ClusterStatus {
                name: cluster.to_owned(),
                ..ClusterStatus::default()
            });
        f(entry);
    }

    /// Forgets `cluster` (its config file was removed).
    pub fn remove_cluster(&self, cluster: &str) {
        self.clusters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(cluster);
    }

    /// Applies `f` to the reconciler counters.
    pub fn update_reconcile(&self, f: impl FnOnce(&mut ReconcileStatus)) {
        f(&mut self
            .reconcile
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    /// Copies of the cluster states.
    pub fn clusters(&self) -> Vec<ClusterStatus> {
        self.clusters
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Copy of the reconciler counters.
    pub fn reconcile(&self) -> ReconcileStatus {
        self.reconcile
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Produces a status snapshot on demand.
pub trait StatusSource: Send + Sync + 'static {
    /// The current status.
    fn snapshot(&self) -> impl Future<Output = AgentStatus> + Send;
}

/// Serves one JSON status document per connection on `path` until
/// `shutdown`.
///
/// # Errors
///
/// When the socket cannot be bound.
pub async fn serve_status<S: StatusSource>(
    path: &Path,
    source: Arc<S>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = bind_unix(path)?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let source = source.clone();
                    tokio::spawn(async move {
                        let status = source.snapshot().await;
                        let mut bytes = serde_json::to_vec_pretty(&status).unwrap_or_default();
                        bytes.push(b'\n');
                        if let Err(e) = stream.write_all(&bytes).await {
                            debug!(error = %e, "status client went away");
                        }
                        let _ = stream.shutdown().await;
                    });
                }
                Err(e) => warn!(error = %e, "accepting on the status socket"),
            },
        }
    }
}

/// Renders `status` in the Prometheus text exposition format (0.0.4).
pub fn render_metrics(status: &AgentStatus) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let per_cluster = |f: &dyn Fn(&ClusterStatus) -> f64| -> Vec<(String, f64)> {
        status
            .clusters
            .iter()
            .map(|c| (format!("{{cluster=\"{}\"}}", escape(&c.name)), f(c)))
            .collect()
    };
    family(
        "mesh_agent_cluster_ready",
        "gauge",
        "Whether the cluster is connected and fully synced.",
        &per_cluster(&|c| f64::from(u8::from(c.ready))),
    );
    family(
        "mesh_agent_cluster_connected",
        "gauge",
        "Whether the cluster's etcd connection is up.",
        &per_cluster(&|c| f64::from(u8::from(c.connected))),
    );
    family(
        "mesh_agent_cluster_failures_total",
        "counter",
        "Connection failures per cluster.",
        &per_cluster(&|c| c.num_failures as f64),
    );
    let mut entries = Vec::new();
    for c in &status.clusters {
        for (kind, n) in [
            ("nodes", c.num_nodes),
            ("endpoints", c.num_endpoints),
            ("identities", c.num_identities),
            ("services", c.num_shared_services),
        ] {
            entries.push((
                format!("{{cluster=\"{}\",kind=\"{kind}\"}}", escape(&c.name)),
                n as f64,
            ));
        }
    }
    family(
        "mesh_agent_cluster_entries",
        "gauge",
        "Records held per cluster and kind.",
        &entries,
    );
    let mut rejected = Vec::new();
    for c in &status.clusters {
        for (reason, n) in &c.rejected {
            rejected.push((
                format!(
                    "{{cluster=\"{}\",reason=\"{}\"}}",
                    escape(&c.name),
                    escape(reason)
                ),
                *n as f64,
            ));
        }
    }
    family(
        "mesh_agent_rejected_records_total",
        "counter",
        "Remote records refused by validation.",
        &rejected,
    );
    let r = &status.reconcile;
    family(
        "mesh_agent_reconcile_passes_total",
        "counter",
        "Reconcile passes by kind: incremental (queued changes) or full.",
        &[
            (
                "{kind=\"incremental\"}".to_owned(),
                r.incremental_passes as f64,
            ),
            ("{kind=\"full\"}".to_owned(), r.full_passes as f64),
        ],
    );
    // Families with one unlabelled sample: (name, type, help, value).
    let single: [(&str, &str, &str, f64); 9] = [
        (
            "mesh_agent_reconcile_duration_seconds",
            "gauge",
            "Duration of the last reconcile pass.",
            r.last_duration_seconds,
        ),
        (
            "mesh_agent_reconcile_runs_total",
            "counter",
            "Completed reconcile passes.",
            r.runs as f64,
        ),
        (
            "mesh_agent_reconcile_errors_total",
            "counter",
            "Failed datapath or tunnel writes.",
            r.errors as f64,
        ),
        (
            "mesh_agent_reconcile_changes_total",
            "counter",
            "Endpoint and node changes applied by incremental passes.",
            r.changes_applied as f64,
        ),
        (
            "mesh_agent_reconcile_full_duration_seconds",
            "gauge",
            "Duration of the last full reconcile pass.",
            r.last_full_duration_seconds,
        ),
        (
            "mesh_agent_reconcile_resyncs_total",
            "counter",
            "Periodic resyncs (full pass over a re-read ipcache map).",
            r.resyncs as f64,
        ),
        (
            "mesh_agent_reconcile_resync_corrections_total",
            "counter",
            "ipcache writes a resync had to make; non-zero means the incremental passes missed a change or someone else wrote the map.",
            r.resync_corrections as f64,
        ),
        (
            "mesh_agent_ipcache_entries",
            "gauge",
            "Entries in the ipcache map owned by the reconciler.",
            r.ipcache_entries as f64,
        ),
        (
            "mesh_agent_local_endpoints",
            "gauge",
            "Pods on this node.",
            status.local_endpoints as f64,
        ),
    ];
    for (name, kind, help, value) in single {
        family(name, kind, help, &[(String::new(), value)]);
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` over HTTP/1.0 on `listener` until `shutdown`.
/// Deliberately minimal (one request per connection, no keep-alive): it is
/// scraped every few seconds by one Prometheus.
///
/// # Errors
///
/// Never after binding; accept errors are logged.
pub async fn serve_metrics<S: StatusSource>(
    listener: TcpListener,
    source: Arc<S>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let source = source.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::with_capacity(1024);
                        let read = tokio::time::timeout(Duration::from_secs(5), async {
                            let mut chunk = [0u8; 1024];
                            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                                let n = stream.read(&mut chunk).await?;
                                if n == 0 {
                                    break;
                                }
                                buf.extend_from_slice(&chunk[..n]);
                            }
                            Ok::<_, std::io::Error>(())
                        })
                        .await;
                        if !matches!(read, Ok(Ok(()))) {
                            return;
                        }
                        let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
                        let (code, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET /metrics\r") {
                            ("200 OK", render_metrics(&source.snapshot().await))
                        } else {
                            ("404 Not Found", "not found; try /metrics\n".to_owned())
                        };
                        let head = format!(
                            "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(head.as_bytes()).await;
                        let _ = stream.write_all(body.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    });
                }
                Err(e) => warn!(error = %e, "accepting on the metrics listener"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use api::agent::Synced;

    use super::*;

    fn sample() -> AgentStatus {
        let hub = StatusHub::default();
        hub.update_cluster("c2", |c| {
            c.connected = true;
            c.synced = Synced {
                nodes: true,
                endpoints: true,
                identities: true,
                services: true,
            };
            c.ready = c.synced.all();
            c.num_endpoints = 3;
            c.rejected.insert("cluster mismatch".into(), 2);
        });
        hub.update_reconcile(|r| {
            r.runs = 7;
            r.last_duration_seconds = 0.25;
        });
        AgentStatus {
            cluster_name: "c1".into(),
            cluster_id: 1,
            clusters: hub.clusters(),
            reconcile: hub.reconcile(),
            ..AgentStatus::default()
        }
    }

    #[test]
    fn status_json_uses_ciliums_field_names() {
        let v = serde_json::to_value(sample()).unwrap();
        let c = &v["clusters"][0];
        for field in [
            "name",
            "ready",
            "connected",
            "status",
            "num-nodes",
            "num-endpoints",
            "num-identities",
            "num-shared-services",
            "num-failures",
            "last-failure",
            "synced",
            "rejected",
        ] {
            assert!(c.get(field).is_some(), "{field} missing in {c}");
        }
        assert_eq!(c["synced"]["endpoints"], true);
        assert_eq!(c["rejected"]["cluster mismatch"], 2);
        let back: AgentStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn readers_take_documents_with_fields_missing() {
        // What an older agent (no services, no resync counters) sends.
        let doc = r#"{"node-name":"n1","clusters":[{"name":"c2","ready":true,"num-shared-services":2}],"reconcile":{"runs":3}}"#;
        let s: AgentStatus = serde_json::from_str(doc).unwrap();
        assert_eq!(s.node_name, "n1");
        assert!(s.clusters[0].ready);
        assert!(!s.clusters[0].synced.all());
        assert_eq!(s.reconcile.runs, 3);
        assert_eq!(s.global_services(), 2);
        assert!(s.services.services.is_empty());
    }

    #[test]
    fn metrics_text_has_per_cluster_samples() {
        let text = render_metrics(&sample());
        assert!(
            text.contains("mesh_agent_cluster_ready{cluster=\"c2\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("mesh_agent_cluster_entries{cluster=\"c2\",kind=\"endpoints\"} 3\n"),
            "{text}"
        );
        assert!(text.contains(
            "mesh_agent_rejected_records_total{cluster=\"c2\",reason=\"cluster mismatch\"} 2\n"
        ));
        assert!(text.contains("mesh_agent_reconcile_duration_seconds 0.25\n"));
        assert!(text.contains("# TYPE mesh_agent_reconcile_runs_total counter\n"));
    }
}
