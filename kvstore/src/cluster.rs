//! Reading the cluster config.
//!
//! The cluster config (`cilium/cluster-config/<cluster>`) tells readers a
//! cluster's ID and capabilities; a remote-cluster task reads it first and
//! builds the [`api::RemoteScope`] its watch stores validate against. Its
//! writer is the cluster's clustermesh-apiserver.

use std::time::Duration;

use api::{ClusterConfig, ClusterName, ValidationError};

use api::keys::HAS_CLUSTER_CONFIG_KEY;

use crate::backend::{BackendError, ListWatch, WatchEvent};

/// Errors reading or writing the cluster config.
#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    /// The kvstore request failed.
    #[error("cluster config of {cluster}: kvstore request failed")]
    Backend {
        /// The cluster.
        cluster: ClusterName,
        /// The failure.
        #[source]
        source: BackendError,
    },
    /// The key does not exist (yet).
    #[error("cluster config of {cluster} not found under {key}")]
    NotFound {
        /// The cluster.
        cluster: ClusterName,
        /// The key looked up.
        key: String,
    },
    /// The etcd says a config will be there (`cilium/.has-cluster-config`),
    /// but none appeared within the wait.
    #[error("cluster config of {cluster} expected under {key} (cilium/.has-cluster-config is set), but none appeared within {waited:?}")]
    NotFoundAfterWait {
        /// The cluster.
        cluster: ClusterName,
        /// The key waited for.
        key: String,
        /// How long.
        waited: Duration,
    },
    /// The stored value is invalid.
    #[error("cluster config of {cluster} is invalid")]
    Invalid {
        /// The cluster.
        cluster: ClusterName,
        /// Why (boxed: a validation error is large, a config error is
        /// returned on every connection attempt).
        #[source]
        source: Box<ValidationError>,
    },
}

/// Decodes `cluster`'s config found under `key`.
fn decode_config(
    key: &str,
    value: &[u8],
    cluster: &ClusterName,
) -> Result<ClusterConfig, ClusterConfigError> {
    ClusterConfig::decode(key, value, cluster).map_err(|source| ClusterConfigError::Invalid {
        cluster: cluster.clone(),
        source: Box::new(source),
    })
}

/// Reads and validates `cluster`'s config.
///
/// # Errors
///
/// [`ClusterConfigError::NotFound`] when absent, `Invalid` when it fails
/// validation, `Backend` when the read fails.
pub async fn read_cluster_config(
    backend: &dyn ListWatch,
    cluster: &ClusterName,
) -> Result<ClusterConfig, ClusterConfigError> {
    let key = ClusterConfig::key(cluster);
    let kv = backend
        .get(&key)
        .await
        .map_err(|source| ClusterConfigError::Backend {
            cluster: cluster.clone(),
            source,
        })?
        .ok_or_else(|| ClusterConfigError::NotFound {
            cluster: cluster.clone(),
            key: key.clone(),
        })?;
    decode_config(&key, &kv.value, cluster)
}

/// How long [`read_required_cluster_config`] waits for a config that the
/// etcd promises (Cilium's agents wait three minutes).
pub const CLUSTER_CONFIG_WAIT: Duration = Duration::from_secs(180);

/// Reads `cluster`'s config as a Cilium agent does: when it is absent but
/// the etcd has `cilium/.has-cluster-config` (written when a clustermesh
/// etcd is set up, before any config), the config is on its way, so this
/// calls `on_wait` and then waits up to `wait` for it to be written (a watch
/// on the key, no polling).
///
/// # Errors
///
/// As [`read_cluster_config`]; [`ClusterConfigError::NotFoundAfterWait`]
/// when the promised config does not appear in time.
pub async fn read_required_cluster_config(
    backend: &dyn ListWatch,
    cluster: &ClusterName,
    wait: Duration,
    on_wait: impl FnOnce(),
) -> Result<ClusterConfig, ClusterConfigError> {
    use futures::StreamExt as _;

    let backend_error = |source| ClusterConfigError::Backend {
        cluster: cluster.clone(),
        source,
    };
    match read_cluster_config(backend, cluster).await {
        Err(ClusterConfigError::NotFound { .. }) => {}
        other => return other,
    }
    let promised = backend
        .get(HAS_CLUSTER_CONFIG_KEY)
        .await
        .map_err(backend_error)?
        .is_some();
    let key = ClusterConfig::key(cluster);
    if !promised {
        return Err(ClusterConfigError::NotFound {
            cluster: cluster.clone(),
            key,
        });
    }
    on_wait();
    let waiting = async {
        // List (the key may have appeared meanwhile), then watch from there.
        let listing = backend.list(&key).await.map_err(backend_error)?;
        if let Some(kv) = listing.kvs.iter().find(|kv| kv.key == key) {
            return decode_config(&key, &kv.value, cluster);
        }
        let mut stream = backend
            .watch(&key, listing.revision + 1)
            .await
            .map_err(backend_error)?;
        while let Some(batch) = stream.next().await {
            for event in batch.map_err(backend_error)? {
                // The watch is on a prefix: `c1` also sees `c10`.
                if let WatchEvent::Put(kv) = event {
                    if kv.key == key {
                        return decode_config(&key, &kv.value, cluster);
                    }
                }
            }
        }
        Err(backend_error(BackendError::WatchCanceled {
            prefix: key.clone(),
            reason: "the watch ended".to_owned(),
        }))
    };
    tokio::time::timeout(wait, waiting)
        .await
        .unwrap_or_else(|_| {
            Err(ClusterConfigError::NotFoundAfterWait {
                cluster: cluster.clone(),
                key: key.clone(),
                waited: wait,
            })
        })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use api::{ClusterId, MaxConnectedClusters};

    use super::*;
    use crate::{KvWrite as _, MemoryBackend};

    const WAIT: Duration = Duration::from_secs(180);

    fn config() -> ClusterConfig {
        let max = MaxConnectedClusters::Max255;
        ClusterConfig::new(ClusterId::new(2, max).unwrap(), max, false)
    }

    fn c(name: &str) -> ClusterName {
        name.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_marker_a_missing_config_is_not_waited_for() {
        let m = MemoryBackend::new();
        let waited = AtomicBool::new(false);
        let err = read_required_cluster_config(&m, &c("c2"), WAIT, || {
            waited.store(true, Ordering::Relaxed)
        })
        .await
        .unwrap_err();
        assert!(matches!(err, ClusterConfigError::NotFound { .. }), "{err}");
        assert!(!waited.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_marker_the_config_is_waited_for() {
        let m = Arc::new(MemoryBackend::new());
        m.put(HAS_CLUSTER_CONFIG_KEY, b"true", None).await.unwrap();
        let writer = m.clone();
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            // Another cluster whose name has c2 as a prefix: not ours.
            let mut other = config();
            other.id = ClusterId::new(10, MaxConnectedClusters::Max255).unwrap();
            writer
                .put(&ClusterConfig::key(&c("c20")), &other.encode(), None)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            writer
                .put(&ClusterConfig::key(&c("c2")), &config().encode(), None)
                .await
                .unwrap();
        });
        let waited = AtomicBool::new(false);
        let got = read_required_cluster_config(m.as_ref(), &c("c2"), WAIT, || {
            waited.store(true, Ordering::Relaxed)
        })
        .await
        .unwrap();
        assert_eq!(got, config());
        assert!(waited.load(Ordering::Relaxed));
        assert_eq!(start.elapsed(), Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_promised_config_that_never_comes_times_out_clearly() {
        let m = MemoryBackend::new();
        m.put(HAS_CLUSTER_CONFIG_KEY, b"true", None).await.unwrap();
        let err = read_required_cluster_config(&m, &c("c2"), WAIT, || {})
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClusterConfigError::NotFoundAfterWait { waited, .. } if waited == WAIT),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("cilium/cluster-config/c2") && text.contains(".has-cluster-config"),
            "{text}"
        );
    }
}
