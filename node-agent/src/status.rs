//! What the agent reports on its status socket (the Prometheus metrics,
//! from the same snapshot, are in [`crate::metrics`]).
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
    future::Future,
    path::Path,
    sync::{Arc, RwLock},
};

use api::agent::{AgentStatus, ClusterStatus, ReconcileStatus};
use tokio::io::AsyncWriteExt;
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

    /// Sets the `not-owned` counts whose reasons start with one of
    /// `prefixes` (the part of them one task judges) to `counts`, for every
    /// cluster: a cluster absent from `counts` has none of them.
    pub fn set_not_owned(
        &self,
        prefixes: &[&str],
        counts: &BTreeMap<String, BTreeMap<String, u64>>,
    ) {
        let mut map = self
            .clusters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, status) in map.iter_mut() {
            status
                .not_owned
                .retain(|reason, _| !prefixes.iter().any(|p| reason.starts_with(p)));
            if let Some(mine) = counts.get(name) {
                status
                    .not_owned
                    .extend(mine.iter().map(|(r, n)| (r.clone(), *n)));
            }
        }
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
}
