//! Facts about an external cluster, read from its etcd through a Cilium-style
//! config file: its name and ID (`cilium/cluster-config/<name>`) and its pod
//! CIDRs (the pod CIDRs of its node records), so that `connect
//! --destination-config` can refuse a clash before any agent sees the cluster.
//!
//! The records are read with the same decoders and validation the agents
//! use ([`api`], through [`kvstore`]), so whatever a Cilium
//! clustermesh-apiserver (or KVStoreMesh, `"cached":true`: the nodes are then
//! under `cilium/cache/nodes/v1/<name>/`) publishes reads here as it reads in
//! an agent; a node record an agent would refuse is skipped and counted.
//!
//! In a lab the etcd's address exists only inside the lab's namespaces, so
//! the caller names a network namespace to read from ([`read_facts`]).

use std::path::{Path, PathBuf};

use api::{ClusterConfig, ClusterName, Node, Resource};
use ipnet::IpNet;
use kvstore::ListWatch as _;

use super::config::ClusterFacts;

/// Errors reading an external cluster.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// The config file is not a usable etcd config.
    #[error("etcd config {path}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kvstore::ConfigError,
    },
    /// etcd could not be reached.
    #[error("cannot reach the etcd of {path}")]
    Connect {
        /// The config file.
        path: PathBuf,
        /// Why (boxed: the client's errors are large).
        #[source]
        source: Box<kvstore::ConnectError>,
    },
    /// A read failed.
    #[error("cannot read {what} from the etcd of {path}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kvstore::BackendError,
    },
    /// The etcd holds no cluster config.
    #[error("the etcd of {path} has no cluster config under cilium/cluster-config/ (is it a clustermesh etcd?)")]
    NoClusterConfig {
        /// The config file.
        path: PathBuf,
    },
    /// Several cluster configs and no name given.
    #[error(
        "the etcd of {path} holds configs of several clusters ({names}); pass --destination-name"
    )]
    Ambiguous {
        /// The config file.
        path: PathBuf,
        /// The names found.
        names: String,
    },
    /// The named cluster is not there.
    #[error("the etcd of {path} has no config for cluster {name} (it has {names})")]
    NotFound {
        /// The config file.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// The names found.
        names: String,
    },
    /// A cluster config that does not decode.
    #[error("invalid cluster config of {name}")]
    BadConfig {
        /// The cluster.
        name: String,
        /// What is wrong.
        #[source]
        source: Box<api::ValidationError>,
    },
    /// The network namespace to read from could not be entered, or no
    /// runtime could start there.
    #[error("cannot read the external cluster from inside network namespace {netns}")]
    Netns {
        /// The namespace.
        netns: String,
        /// Why.
        #[source]
        source: crate::lab::ip::IpError,
    },
}

/// Reads the name, ID and pod CIDRs of the cluster behind the etcd config
/// file `path`. `name` picks one cluster when the etcd holds several (a
/// KVStoreMesh cache). With `netns`, every connection is made from inside
/// that network namespace (the lab's addresses exist only there).
///
/// # Errors
///
/// [`ExternalError`].
pub fn read_facts(
    path: &Path,
    name: Option<&str>,
    netns: Option<&str>,
) -> Result<ClusterFacts, ExternalError> {
    let (owned_path, name) = (path.to_owned(), name.map(str::to_owned));
    crate::lab::ip::block_on(netns, move || async move {
        read_facts_async(&owned_path, name.as_deref()).await
    })
    .map_err(|source| ExternalError::Netns {
        netns: netns.unwrap_or("(this one)").to_owned(),
        source,
    })?
}

async fn read_facts_async(path: &Path, name: Option<&str>) -> Result<ClusterFacts, ExternalError> {
    let config = kvstore::EtcdConfig::from_file(path).map_err(|source| ExternalError::Config {
        path: path.to_owned(),
        source,
    })?;
    let backend = kvstore::connect(&config)
        .await
        .map_err(|source| ExternalError::Connect {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
    let read = |what| {
        move |source| ExternalError::Read {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let listing = backend
        .list(api::keys::CLUSTER_CONFIG_PREFIX)
        .await
        .map_err(read("cluster configs"))?;
    let mut found: Vec<(ClusterName, ClusterConfig)> = Vec::new();
    for kv in &listing.kvs {
        let Ok(cluster) = api::keys::parse_cluster_config_key(&kv.key) else {
            continue;
        };
        let config = ClusterConfig::decode(&kv.key, &kv.value, &cluster).map_err(|source| {
            ExternalError::BadConfig {
                name: cluster.to_string(),
                source: Box::new(source),
            }
        })?;
        found.push((cluster, config));
    }
    let names = found
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let (cluster, cluster_config) = match name {
        Some(wanted) => found
            .into_iter()
            .find(|(n, _)| n.as_str() == wanted)
            .ok_or_else(|| ExternalError::NotFound {
                path: path.to_owned(),
                name: wanted.to_owned(),
                names: names.clone(),
            })?,
        None => {
            // A KVStoreMesh etcd also holds other clusters' configs, marked cached.
            let mut own: Vec<_> = found
                .into_iter()
                .filter(|(_, c)| !c.capabilities.cached)
                .collect();
            match own.len() {
                0 => {
                    return Err(ExternalError::NoClusterConfig {
                        path: path.to_owned(),
                    })
                }
                1 => own.remove(0),
                _ => {
                    return Err(ExternalError::Ambiguous {
                        path: path.to_owned(),
                        names,
                    })
                }
            }
        }
    };
    let scope = cluster_config.scope(cluster.clone());
    let prefix = if cluster_config.capabilities.cached {
        api::keys::cache_prefix::<Node>(&cluster)
    } else {
        Node::prefix(&cluster)
    };
    let nodes = backend.list(&prefix).await.map_err(read("node records"))?;
    let mut pod_cidrs: Vec<IpNet> = Vec::new();
    for kv in &nodes.kvs {
        match Node::decode(&kv.key, &kv.value, &scope) {
            Ok(node) => {
                for cidr in node.pod_cidrs() {
                    if !pod_cidrs.contains(&cidr) {
                        pod_cidrs.push(cidr);
                    }
                }
            }
            // The agents will refuse it too; say so, and check the rest.
            Err(error) => eprintln!("meshctl: skipping a node record of {cluster}: {error}"),
        }
    }
    Ok(ClusterFacts {
        origin: path.display().to_string(),
        name: cluster.to_string(),
        id: u32::from(cluster_config.id.get()),
        pod_cidrs,
    })
}
