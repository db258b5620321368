//! The registry's own persistence, under a private prefix of the cluster's etcd.
//!
//! Layout (ours, not Cilium's; `v1` versions the JSON of [`crate::model`]):
//!
//! ```text
//! mesh/registry/v1/<cluster>/nodes/<node>              NodeSpec
//! mesh/registry/v1/<cluster>/endpoints/<ns>/<name>     EndpointEntry (spec, identity, IP claim order)
//! mesh/registry/v1/<cluster>/services/<ns>/<name>      ServiceSpec
//! mesh/registry/v1/<cluster>/identities/<labels>       numeric identity (see crate::identity)
//! mesh/registry/v1/<cluster>/identity-users/<n>/<id>   "" per apiserver using identity n, leased
//! ```
//!
//! Writes happen before a request is answered, so an acknowledged registration
//! survives a restart. The keys carry no lease: the registry must outlive the
//! process, while the exported `cilium/state/...` keys are the SyncStores'
//! (the identity user keys are the exception: they say "this process uses
//! it" and must vanish with the process).

use std::collections::BTreeMap;

use std::sync::Arc;

use serde::{de::DeserializeOwned, Serialize};

use crate::registry::EndpointEntry;
use mesh_proto::model::{NodeSpec, ObjectKey, ServiceSpec};

/// The private prefix of `cluster`: `mesh/registry/v1/<cluster>/`.
pub fn prefix(cluster: &str) -> String {
    api::keys::registry_prefix(cluster)
}

/// Errors of the registry's persistence.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("etcd {operation} {key:?}")]
    Etcd {
        operation: &'static str,
        key: String,
        #[source]
        source: kvstore::BackendError,
    },
    #[error("encode {key:?}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Everything persisted, as read at startup.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeSpec>,
    pub endpoints: Vec<EndpointEntry>,
    pub services: Vec<ServiceSpec>,
    /// Keys whose value could not be decoded (logged and skipped).
    pub corrupt: Vec<String>,
}

/// Reads and writes the registry of one cluster.
#[derive(Clone)]
pub struct Persistence {
    backend: Arc<dyn kvstore::Backend>,
    prefix: String,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Persistence {
    pub fn new(backend: Arc<dyn kvstore::Backend>, cluster: &str) -> Self {
        Self {
            backend,
            prefix: prefix(cluster),
        }
    }

    fn node_key(&self, name: &str) -> String {
        format!("{}nodes/{name}", self.prefix)
    }

    fn endpoint_key(&self, key: &ObjectKey) -> String {
        format!("{}endpoints/{key}", self.prefix)
    }

    fn service_key(&self, key: &ObjectKey) -> String {
        format!("{}services/{key}", self.prefix)
    }

    /// Reads the whole registry.
    ///
    /// # Errors
    ///
    /// When etcd cannot be read; undecodable values are reported in
    /// [`Snapshot::corrupt`] instead.
    pub async fn load(&self) -> Result<Snapshot, PersistError> {
        let mut snapshot = Snapshot::default();
        let nodes = self.list(&format!("{}nodes/", self.prefix)).await?;
        snapshot.nodes = decode_all(nodes, &mut snapshot.corrupt);
        let endpoints = self.list(&format!("{}endpoints/", self.prefix)).await?;
        snapshot.endpoints = decode_all(endpoints, &mut snapshot.corrupt);
        let services = self.list(&format!("{}services/", self.prefix)).await?;
        snapshot.services = decode_all(services, &mut snapshot.corrupt);
        Ok(snapshot)
    }

    async fn list(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, PersistError> {
        let listing = self
            .backend
            .list(prefix)
            .await
            .map_err(|source| PersistError::Etcd {
                operation: "list",
                key: prefix.to_owned(),
                source,
            })?;
        Ok(listing
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect())
    }

    async fn put<T: Serialize>(&self, key: String, value: &T) -> Result<(), PersistError> {
        let bytes = serde_json::to_vec(value).map_err(|source| PersistError::Encode {
            key: key.clone(),
            source,
        })?;
        self.backend
            .put(&key, &bytes, None)
            .await
            .map_err(|source| PersistError::Etcd {
                operation: "put",
                key,
                source,
            })?;
        Ok(())
    }

    async fn delete(&self, key: String) -> Result<(), PersistError> {
        self.backend
            .delete(&key)
            .await
            .map_err(|source| PersistError::Etcd {
                operation: "delete",
                key,
                source,
            })?;
        Ok(())
    }

    /// # Errors
    ///
    /// When etcd refuses the write.
    pub async fn put_node(&self, node: &NodeSpec) -> Result<(), PersistError> {
        self.put(self.node_key(&node.name), node).await
    }

    /// # Errors
    ///
    /// When etcd refuses the delete.
    pub async fn delete_node(&self, name: &str) -> Result<(), PersistError> {
        self.delete(self.node_key(name)).await
    }

    /// # Errors
    ///
    /// When etcd refuses the write.
    pub async fn put_endpoint(&self, entry: &EndpointEntry) -> Result<(), PersistError> {
        self.put(self.endpoint_key(&entry.spec.key()), entry).await
    }

    /// # Errors
    ///
    /// When etcd refuses the delete.
    pub async fn delete_endpoint(&self, key: &ObjectKey) -> Result<(), PersistError> {
        self.delete(self.endpoint_key(key)).await
    }

    /// # Errors
    ///
    /// When etcd refuses the write.
    pub async fn put_service(&self, spec: &ServiceSpec) -> Result<(), PersistError> {
        self.put(self.service_key(&spec.key()), spec).await
    }

    /// # Errors
    ///
    /// When etcd refuses the delete.
    pub async fn delete_service(&self, key: &ObjectKey) -> Result<(), PersistError> {
        self.delete(self.service_key(key)).await
    }
}

fn decode_all<T: DeserializeOwned>(
    entries: BTreeMap<String, Vec<u8>>,
    corrupt: &mut Vec<String>,
) -> Vec<T> {
    entries
        .into_iter()
        .filter_map(|(key, value)| match serde_json::from_slice(&value) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(key, error = %e, "skipping undecodable registry entry");
                corrupt.push(key);
                None
            }
        })
        .collect()
}
