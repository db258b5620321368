//! Facts about an external cluster, read from its etcd through a Cilium-style
//! config file: its name and ID (`cilium/cluster-config/<name>`) and its pod
//! CIDRs (the `IPv4AllocCIDR` of its node records), so that `connect
//! --destination-config` can refuse a clash before any agent sees the cluster.
//! Works against our clustermesh-apiserver's etcd and against Cilium's.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use ipnet::Ipv4Net;
use serde::Deserialize;

use super::config::{ClusterFacts, EtcdConfig};

/// Key prefix of cluster configs (FIXED: Cilium schema v1).
const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config/";
/// Key prefix of node records (FIXED: Cilium schema v1).
const NODES_PREFIX: &str = "cilium/state/nodes/v1/";

/// Errors reading an external cluster.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// A certificate file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// etcd could not be reached or refused.
    #[error("cannot {action} etcd at {endpoints}")]
    Etcd {
        /// What was tried.
        action: &'static str,
        /// The endpoints.
        endpoints: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The etcd holds no cluster config.
    #[error("etcd at {endpoints} has no cluster config under {CLUSTER_CONFIG_PREFIX} (is it a clustermesh etcd?)")]
    NoClusterConfig {
        /// The endpoints.
        endpoints: String,
    },
    /// Several cluster configs and no name given.
    #[error(
        "etcd at {endpoints} holds configs of several clusters ({names}); pass --destination-name"
    )]
    Ambiguous {
        /// The endpoints.
        endpoints: String,
        /// The names found.
        names: String,
    },
    /// The named cluster is not there.
    #[error("etcd at {endpoints} has no config for cluster {name} (it has {names})")]
    NotFound {
        /// The endpoints.
        endpoints: String,
        /// The name asked for.
        name: String,
        /// The names found.
        names: String,
    },
    /// A cluster config that does not parse.
    #[error("invalid cluster config of {name}: {problem}")]
    BadConfig {
        /// The cluster.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The tokio runtime could not start.
    #[error("cannot start an async runtime")]
    Runtime(#[source] std::io::Error),
}

#[derive(Debug, Deserialize)]
struct CiliumClusterConfig {
    id: u32,
    #[serde(default)]
    cached: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AllocCidr {
    #[serde(rename = "IP")]
    ip: Ipv4Addr,
    mask: String,
}

#[derive(Debug, Deserialize)]
struct NodeRecord {
    #[serde(rename = "IPv4AllocCIDR")]
    ipv4_alloc_cidr: Option<AllocCidr>,
}

fn read(path: &Path) -> Result<Vec<u8>, ExternalError> {
    std::fs::read(path).map_err(|source| ExternalError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads the name, ID and pod CIDRs of the cluster behind `config`.
/// `name` picks one cluster when the etcd holds several (a KVStoreMesh cache).
///
/// # Errors
///
/// [`ExternalError`].
pub fn read_facts(
    config: &EtcdConfig,
    origin: &str,
    name: Option<&str>,
) -> Result<ClusterFacts, ExternalError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ExternalError::Runtime)?;
    runtime.block_on(read_facts_async(config, origin, name))
}

async fn read_facts_async(
    config: &EtcdConfig,
    origin: &str,
    name: Option<&str>,
) -> Result<ClusterFacts, ExternalError> {
    let endpoints = config.endpoints.join(",");
    let etcd = |action| {
        let endpoints = endpoints.clone();
        move |source| ExternalError::Etcd {
            action,
            endpoints,
            source,
        }
    };
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    if config.endpoints.iter().any(|e| e.starts_with("https://")) {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.trusted_ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    let mut client = Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(etcd("connect to"))?;
    let configs = client
        .get(CLUSTER_CONFIG_PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd("read cluster configs from"))?;
    let mut found: Vec<(String, CiliumClusterConfig)> = Vec::new();
    for kv in configs.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let cluster = key.trim_start_matches(CLUSTER_CONFIG_PREFIX).to_owned();
        let parsed: CiliumClusterConfig =
            serde_json::from_slice(kv.value()).map_err(|e| ExternalError::BadConfig {
                name: cluster.clone(),
                problem: e.to_string(),
            })?;
        found.push((cluster, parsed));
    }
    let names = found
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let (cluster, cluster_config) = match name {
        Some(wanted) => found
            .into_iter()
            .find(|(n, _)| n == wanted)
            .ok_or_else(|| ExternalError::NotFound {
                endpoints: endpoints.clone(),
                name: wanted.to_owned(),
                names: names.clone(),
            })?,
        None => {
            // A KVStoreMesh etcd also holds other clusters' configs, marked cached.
            let mut own: Vec<_> = found.into_iter().filter(|(_, c)| !c.cached).collect();
            match own.len() {
                0 => return Err(ExternalError::NoClusterConfig { endpoints }),
                1 => own.remove(0),
                _ => return Err(ExternalError::Ambiguous { endpoints, names }),
            }
        }
    };
    let nodes = client
        .get(
            format!("{NODES_PREFIX}{cluster}/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(etcd("read nodes from"))?;
    let mut pod_cidrs = Vec::new();
    for kv in nodes.kvs() {
        let Ok(node) = serde_json::from_slice::<NodeRecord>(kv.value()) else {
            continue;
        };
        if let Some(cidr) = node.ipv4_alloc_cidr.and_then(|c| alloc_cidr(&c)) {
            if !pod_cidrs.contains(&cidr) {
                pod_cidrs.push(cidr);
            }
        }
    }
    Ok(ClusterFacts {
        origin: origin.to_owned(),
        name: cluster,
        id: cluster_config.id,
        pod_cidrs,
    })
}

/// Decodes Go's `net.IPNet` JSON (the mask as base64 bytes).
fn alloc_cidr(c: &AllocCidr) -> Option<Ipv4Net> {
    let mask = base64::engine::general_purpose::STANDARD
        .decode(&c.mask)
        .ok()?;
    let bytes: [u8; 4] = mask.try_into().ok()?;
    let prefix = u32::from_be_bytes(bytes).leading_ones();
    Ipv4Net::new(c.ip, u8::try_from(prefix).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_go_ipnet() {
        let c = AllocCidr {
            ip: Ipv4Addr::new(10, 1, 0, 0),
            mask: "////AA==".into(),
        };
        assert_eq!(alloc_cidr(&c).unwrap().to_string(), "10.1.0.0/24");
        let bad = AllocCidr {
            ip: Ipv4Addr::new(10, 1, 0, 0),
            mask: "!!".into(),
        };
        assert!(alloc_cidr(&bad).is_none());
    }
}
