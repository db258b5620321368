//! Where a cluster's etcd is, and the injected factory of read connections.

use std::{path::PathBuf, sync::Arc};

use futures::future::BoxFuture;
use kvstore::ListWatch;

use super::ClusterError;

/// Where a cluster's etcd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdSource {
    /// A Cilium-style etcd config file (read at each connection attempt).
    File(PathBuf),
    /// Plain endpoint URLs.
    Endpoints(Vec<String>),
}

/// A read connection to a cluster's etcd, with what its config file says
/// beyond where etcd is.
#[derive(Clone)]
pub struct Connection {
    /// The etcd.
    pub backend: Arc<dyn ListWatch>,
    /// `allowed-pod-cidrs:` of the config file ([`crate::trust`]).
    pub allowed_pod_cidrs: Vec<ipnet::IpNet>,
    /// `allowed-node-cidrs:` of the config file ([`crate::trust`]).
    pub allowed_node_cidrs: Vec<ipnet::IpNet>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("allowed_pod_cidrs", &self.allowed_pod_cidrs)
            .field("allowed_node_cidrs", &self.allowed_node_cidrs)
            .finish_non_exhaustive()
    }
}

/// Opens a read connection to a cluster's etcd. Injected so that tests can
/// swap the client (e.g. for an in-memory backend).
pub trait Connector: Send + Sync + 'static {
    /// Connects to `source` of `cluster`.
    fn connect<'a>(
        &'a self,
        cluster: &'a str,
        source: &'a EtcdSource,
    ) -> BoxFuture<'a, Result<Connection, ClusterError>>;
}

/// The real connector: [`kvstore::connect`].
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdConnector;

impl Connector for EtcdConnector {
    fn connect<'a>(
        &'a self,
        cluster: &'a str,
        source: &'a EtcdSource,
    ) -> BoxFuture<'a, Result<Connection, ClusterError>> {
        Box::pin(async move {
            let config = match source {
                EtcdSource::File(path) => kvstore::EtcdConfig::from_file(path),
                EtcdSource::Endpoints(eps) => {
                    kvstore::EtcdConfig::from_endpoints(eps.clone(), &kvstore::TlsPaths::default())
                }
            }
            .map_err(|source| ClusterError::Config {
                cluster: cluster.to_owned(),
                source,
            })?;
            let backend =
                kvstore::connect(&config)
                    .await
                    .map_err(|source| ClusterError::Connect {
                        cluster: cluster.to_owned(),
                        source,
                    })?;
            Ok(Connection {
                backend: Arc::new(backend),
                allowed_pod_cidrs: config.allowed_pod_cidrs.clone(),
                allowed_node_cidrs: config.allowed_node_cidrs.clone(),
            })
        })
    }
}
