//! Why a cluster connection attempt ended.

/// Errors of one cluster connection attempt.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The etcd config file is invalid.
    #[error("etcd config of cluster {cluster}")]
    Config {
        /// The cluster.
        cluster: String,
        /// Cause.
        #[source]
        source: kvstore::ConfigError,
    },
    /// etcd cannot be reached.
    #[error("connecting to the etcd of cluster {cluster}")]
    Connect {
        /// The cluster.
        cluster: String,
        /// Cause.
        #[source]
        source: kvstore::ConnectError,
    },
    /// The cluster config cannot be read or is invalid.
    #[error("reading the cluster config of {cluster}")]
    ClusterConfig {
        /// The cluster.
        cluster: String,
        /// Cause.
        #[source]
        source: kvstore::ClusterConfigError,
    },
    /// Another connected cluster (or the local one) has this ID.
    #[error("cluster {cluster} has ID {id}, which cluster {owner} already uses; refusing it")]
    DuplicateId {
        /// The refused cluster.
        cluster: String,
        /// Its ID.
        id: u16,
        /// The cluster holding the ID.
        owner: String,
    },
    /// The local cluster's etcd says another ID than `--cluster-id`.
    #[error(
        "the local cluster {cluster} has ID {found} in its etcd, but --cluster-id is {configured}"
    )]
    LocalIdMismatch {
        /// The local cluster.
        cluster: String,
        /// `--cluster-id`.
        configured: u16,
        /// In etcd.
        found: u16,
    },
    /// The cluster runs in another identity mode than this agent.
    #[error(
        "cluster {cluster} allows {found} connected clusters, this agent {configured}; refusing it"
    )]
    ModeMismatch {
        /// The refused cluster.
        cluster: String,
        /// This agent's `--max-connected-clusters`.
        configured: u16,
        /// The cluster's.
        found: u16,
    },
    /// A probe of a connected cluster failed.
    #[error("cluster {cluster} is unreachable")]
    Probe {
        /// The cluster.
        cluster: String,
        /// Cause.
        #[source]
        source: kvstore::BackendError,
    },
    /// The cluster config changed its ID while connected.
    #[error("cluster {cluster} changed its ID from {old} to {new}; reconnecting")]
    IdChanged {
        /// The cluster.
        cluster: String,
        /// Previous ID.
        old: u16,
        /// New ID.
        new: u16,
    },
}

impl ClusterError {
    /// Whether the cluster is refused for a reason retrying cannot fix
    /// until the other side changes (it then does not hold up the sweep).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::DuplicateId { .. } | Self::LocalIdMismatch { .. } | Self::ModeMismatch { .. }
        )
    }
}
