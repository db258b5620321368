//! The cluster config record and the heartbeat.
//!
//! The cluster config (`cilium/cluster-config/<cluster>`) tells readers a
//! cluster's ID and capabilities; a remote-cluster task reads it first and
//! builds the [`api::RemoteScope`] its watch stores validate against. The
//! heartbeat (`cilium/.heartbeat`, an RFC 3339 timestamp rewritten every
//! minute) lets readers tell a live etcd from a stale one.

use std::time::Duration;

use api::{ClusterConfig, ClusterName, ValidationError};
use backon::BackoffBuilder;
use tracing::{debug, warn};

use crate::backend::{BackendError, KvWrite, LeaseId, ListWatch};
use crate::keys::{rfc3339_now, HEARTBEAT_KEY};

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
    /// The stored value is invalid.
    #[error("cluster config of {cluster} is invalid")]
    Invalid {
        /// The cluster.
        cluster: ClusterName,
        /// Why.
        #[source]
        source: ValidationError,
    },
}

/// Writes `cluster`'s config, bound to `lease` when given.
///
/// # Errors
///
/// [`ClusterConfigError::Backend`] when the put fails.
pub async fn write_cluster_config(
    backend: &dyn KvWrite,
    cluster: &ClusterName,
    config: &ClusterConfig,
    lease: Option<LeaseId>,
) -> Result<(), ClusterConfigError> {
    let key = ClusterConfig::key(cluster);
    backend
        .put(&key, &config.encode(), lease)
        .await
        .map_err(|source| ClusterConfigError::Backend {
            cluster: cluster.clone(),
            source,
        })?;
    Ok(())
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
    ClusterConfig::decode(&key, &kv.value, cluster).map_err(|source| ClusterConfigError::Invalid {
        cluster: cluster.clone(),
        source,
    })
}

/// The heartbeat period of Cilium (one minute).
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(60);

/// Writes `cilium/.heartbeat` now and then every `period` until `shutdown`
/// completes. A failed write is logged and retried with jittered backoff
/// (never later than the next period).
pub async fn run_heartbeat(
    backend: &dyn KvWrite,
    period: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retry = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(period)
        .with_jitter()
        .without_max_times();
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let mut backoff = retry.build();
        loop {
            match backend
                .put(HEARTBEAT_KEY, rfc3339_now().as_bytes(), None)
                .await
            {
                Ok(_) => {
                    debug!("heartbeat written");
                    break;
                }
                Err(error) => {
                    let delay = backoff.next().unwrap_or(period).min(period);
                    warn!(error = %crate::backend::error_chain(&error), retry_in = ?delay, "heartbeat write failed");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}
