//! The read stores of one connection: one [`WatchStore`] per kind, and
//! where a cluster publishes its services' backends.

use std::{collections::BTreeMap, sync::Arc};

use api::{ClusterEndpointSlice, ClusterService, IdentityRecord, IpcacheEntry, Node, RemoteScope};
use kvstore::WatchStore;

use super::Changes;

/// The read stores of one connection to one cluster.
#[derive(Debug)]
pub struct ClusterStores {
    /// What the records are validated against.
    pub scope: RemoteScope,
    /// Nodes.
    pub nodes: WatchStore<Node>,
    /// Endpoints (ipcache entries).
    pub endpoints: WatchStore<IpcacheEntry>,
    /// Identities.
    pub identities: WatchStore<IdentityRecord>,
    /// Global services, from service records or EndpointSlices.
    pub services: ServiceSource,
    /// Endpoint and node changes the reconciler has not applied yet.
    pub changes: Arc<Changes>,
    /// The cluster's pod address space, as the operator pinned it
    /// (`allowed-pod-cidrs:` in its config file; [`crate::trust`]).
    pub allowed_pod_cidrs: Vec<ipnet::IpNet>,
    /// Where its nodes' underlay addresses lie (`allowed-node-cidrs:`).
    pub allowed_node_cidrs: Vec<ipnet::IpNet>,
}

/// Where a cluster publishes the backends of its global services, as its
/// cluster config's `endpointSlicesExportMode` says: service records
/// (`cilium/state/services/v1`, every cluster but Cilium's service-v2
/// `endpointslices-only` ones) or EndpointSlice records.
#[derive(Debug)]
pub enum ServiceSource {
    /// `cilium/state/services/v1/<cluster>/...`
    Services(WatchStore<ClusterService>),
    /// `cilium/state/endpointslices/v1/<cluster>/...`
    EndpointSlices(WatchStore<ClusterEndpointSlice>),
}

impl ServiceSource {
    /// The cluster's exported services as service records: for
    /// EndpointSlices, one record per `(namespace, service)` holding the
    /// backends of all its slices (shared: a cluster exports slices only for
    /// services it shares), in name order.
    pub fn exports(&self, scope: &RemoteScope) -> Vec<Arc<ClusterService>> {
        match self {
            Self::Services(store) => store.list(),
            Self::EndpointSlices(store) => {
                let mut by_service: BTreeMap<(String, String), ClusterService> = BTreeMap::new();
                for slice in store.list() {
                    let Some(service) = slice.service_name() else {
                        continue;
                    };
                    let record = by_service
                        .entry((slice.namespace.clone(), service.to_owned()))
                        .or_insert_with(|| {
                            ClusterService::new(
                                scope.cluster.clone(),
                                scope.cluster_id,
                                slice.namespace.clone(),
                                service,
                            )
                        });
                    record.backends.extend(slice.backends());
                }
                by_service.into_values().map(Arc::new).collect()
            }
        }
    }

    /// Whether the store completed its initial listing.
    pub fn is_synced(&self) -> bool {
        match self {
            Self::Services(store) => store.is_synced(),
            Self::EndpointSlices(store) => store.is_synced(),
        }
    }

    /// Waits for the initial listing.
    pub async fn wait_until_synced(&self) {
        match self {
            Self::Services(store) => store.wait_until_synced().await,
            Self::EndpointSlices(store) => store.wait_until_synced().await,
        }
    }

    /// Rejected records by reason.
    pub fn rejected_by_reason(&self) -> BTreeMap<&'static str, u64> {
        match self {
            Self::Services(store) => store.stats().rejected_by_reason(),
            Self::EndpointSlices(store) => store.stats().rejected_by_reason(),
        }
    }
}

impl ClusterStores {
    /// Whether every store completed its initial listing.
    pub fn synced(&self) -> api::agent::Synced {
        api::agent::Synced {
            nodes: self.nodes.is_synced(),
            endpoints: self.endpoints.is_synced(),
            identities: self.identities.is_synced(),
            services: self.services.is_synced(),
        }
    }

    /// Rejected records of all stores, by reason.
    pub fn rejected(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for by_reason in [
            self.nodes.stats().rejected_by_reason(),
            self.endpoints.stats().rejected_by_reason(),
            self.identities.stats().rejected_by_reason(),
            self.services.rejected_by_reason(),
        ] {
            for (reason, n) in by_reason {
                *out.entry(reason.to_owned()).or_default() += n;
            }
        }
        out
    }
}

/// Cluster entries over real [`WatchStore`]s on the in-memory backend, for
/// the unit tests of the reconcilers.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use api::{ClusterId, ClusterName, MaxConnectedClusters, RemoteScope, Resource};
    use kvstore::{KvWrite, MemoryBackend, WatchStore, WatchStoreConfig};

    use super::{ClusterStores, ServiceSource};
    use crate::clusters::ClusterEntry;

    /// The identity layout the tests use.
    pub(crate) const MAX: MaxConnectedClusters = MaxConnectedClusters::Max255;

    /// The `(key, value)` an agent would read for `record`.
    pub(crate) fn kv(record: &impl Resource) -> (String, Vec<u8>) {
        (record.key(), record.encode())
    }

    /// Cluster `name` (ID `id`) holding `records`, every store synced.
    pub(crate) async fn memory_cluster(
        name: &str,
        id: u16,
        local: bool,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> ClusterEntry {
        let backend = Arc::new(MemoryBackend::new());
        for (key, value) in records {
            backend.put(&key, &value, None).await.unwrap();
        }
        let name: ClusterName = name.parse().unwrap();
        let scope = RemoteScope::new(name, ClusterId::new(id, MAX).unwrap(), MAX);
        let cfg = WatchStoreConfig::default();
        let stores = ClusterStores {
            nodes: WatchStore::spawn(backend.clone(), scope.clone(), cfg.clone()).0,
            endpoints: WatchStore::spawn(backend.clone(), scope.clone(), cfg.clone()).0,
            identities: WatchStore::spawn(backend.clone(), scope.clone(), cfg.clone()).0,
            services: ServiceSource::Services(WatchStore::spawn(backend, scope.clone(), cfg).0),
            scope,
            changes: Default::default(),
            allowed_pod_cidrs: Vec::new(),
            allowed_node_cidrs: Vec::new(),
        };
        stores.nodes.wait_until_synced().await;
        stores.endpoints.wait_until_synced().await;
        stores.identities.wait_until_synced().await;
        stores.services.wait_until_synced().await;
        ClusterEntry {
            local,
            current: Some(Arc::new(stores)),
            previous: None,
            refused: false,
        }
    }
}
