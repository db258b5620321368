//! Export: registry state → Cilium clustermesh records in this cluster's etcd.
//!
//! Nodes, ipcache entries and services go through one [`SyncStore`] each
//! (coalescing, skip-unchanged, leases, canary, adoption across restarts).
//! Identities are not exported here: the allocator's compare-and-swap writes
//! *are* the identity records ([`crate::identity`]); this module only writes
//! their sync canary. The cluster config is written once at start, the
//! heartbeat every `heartbeat_interval`; both only when their value changed or
//! is due, so a restart rewrites nothing that is still valid.

use std::{net::IpAddr, sync::Arc};

use api::{
    keys, AddressType, ClusterConfig, ClusterId, ClusterName, ClusterService, IpcacheEntry, L4Addr,
    L4Protocol, MaxConnectedClusters, Node, NumericIdentity, Resource, Timestamp,
};
use kvstore::{SyncStore, SyncStoreConfig};

use crate::registry::{Dirty, Table};
use mesh_proto::model::{NodeSpec, ObjectKey, PortConfig, Protocol};

/// Kinds exported, as named in `Status` and in metrics.
pub const KINDS: [&str; 4] = ["nodes", "ipcache", "identities", "services"];

fn l4(p: Protocol) -> L4Protocol {
    match p {
        Protocol::Tcp => L4Protocol::Tcp,
        Protocol::Udp => L4Protocol::Udp,
        Protocol::Sctp => L4Protocol::Sctp,
    }
}

fn l4addr(p: PortConfig) -> L4Addr {
    L4Addr {
        protocol: l4(p.protocol),
        port: p.port,
    }
}

/// Who this apiserver exports for.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub name: ClusterName,
    pub id: ClusterId,
    pub max: MaxConnectedClusters,
}

impl ClusterInfo {
    /// The node record of `spec`.
    pub fn node_record(&self, spec: &NodeSpec) -> Node {
        let mut node = Node::new(spec.name.clone(), self.name.clone(), self.id);
        for ip in &spec.internal_ips {
            node.ip_addresses.push(api::NodeAddress {
                kind: AddressType::InternalIp,
                ip: *ip,
            });
        }
        for ip in &spec.cilium_internal_ips {
            node.ip_addresses.push(api::NodeAddress {
                kind: AddressType::CiliumInternalIp,
                ip: *ip,
            });
        }
        node.set_pod_cidrs(spec.pod_cidrs.iter().copied());
        node.labels = spec.labels.clone();
        node.wireguard_pub_key = spec.wireguard_public_key.clone();
        node
    }

    /// The ipcache entry of `ip`, if an endpoint owns it.
    pub fn ip_record(&self, table: &Table, ip: IpAddr) -> Option<IpcacheEntry> {
        let view = table.ip_view(ip)?;
        let spec = &view.endpoint.spec;
        let mut entry =
            IpcacheEntry::new(ip, NumericIdentity(view.endpoint.identity), view.host_ip);
        entry.k8s_namespace = spec.namespace.clone();
        entry.k8s_pod_name = spec.name.clone();
        entry.k8s_pod_uid = spec.uid.clone();
        entry.k8s_service_account = spec.service_account.clone();
        entry.named_ports = spec
            .named_ports
            .iter()
            .map(|p| api::NamedPort {
                name: p.name.clone(),
                port: p.port,
                protocol: l4(p.protocol),
            })
            .collect();
        Some(entry)
    }

    /// The exported record of a service: only global services are exported;
    /// `shared=false` exports it without this cluster's backends.
    pub fn service_record(&self, table: &Table, key: &ObjectKey) -> Option<ClusterService> {
        let view = table.service_view(key)?;
        let spec = view.spec;
        if !spec.global {
            return None;
        }
        let mut svc = ClusterService::new(
            self.name.clone(),
            self.id,
            spec.namespace.clone(),
            spec.name.clone(),
        );
        let frontend_ports: api::PortConfiguration = spec
            .ports
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    L4Addr {
                        protocol: l4(p.protocol),
                        port: p.port,
                    },
                )
            })
            .collect();
        for ip in &spec.frontend_ips {
            svc.frontends.insert(*ip, frontend_ports.clone());
        }
        if spec.shared {
            for (ip, ports) in view.backends {
                svc.backends
                    .insert(ip, ports.into_iter().map(|(n, p)| (n, l4addr(p))).collect());
            }
        }
        svc.labels = spec.labels.clone();
        svc.selector = spec.selector.clone();
        svc.include_external = true;
        svc.shared = spec.shared;
        Some(svc)
    }
}

/// The SyncStores of one cluster.
#[derive(Debug)]
pub struct Exporter {
    pub info: ClusterInfo,
    pub nodes: SyncStore<Node>,
    pub ips: SyncStore<IpcacheEntry>,
    pub services: SyncStore<ClusterService>,
}

impl Exporter {
    /// Starts the stores; each adopts what a previous apiserver left.
    pub fn start(
        backend: Arc<dyn kvstore::SyncBackend>,
        info: ClusterInfo,
        config: &SyncStoreConfig,
    ) -> Self {
        Self {
            nodes: SyncStore::start(backend.clone(), &info.name, config.clone()),
            ips: SyncStore::start(backend.clone(), &info.name, config.clone()),
            services: SyncStore::start(backend, &info.name, config.clone()),
            info,
        }
    }

    /// Renders the dirty keys again and hands them to the stores.
    pub fn apply(&self, table: &Table, dirty: &Dirty) {
        for name in &dirty.nodes {
            match table.node(name) {
                Some(spec) => self.nodes.upsert(&self.info.node_record(spec)),
                None => self
                    .nodes
                    .delete_key(&keys::node_key(&self.info.name, name)),
            }
        }
        for ip in &dirty.ips {
            match self.info.ip_record(table, *ip) {
                Some(entry) => self.ips.upsert(&entry),
                None => self.ips.delete_key(&keys::ip_key(*ip)),
            }
        }
        for key in &dirty.services {
            match self.info.service_record(table, key) {
                Some(svc) => self.services.upsert(&svc),
                None => self.services.delete_key(&keys::service_key(
                    &self.info.name,
                    &key.namespace,
                    &key.name,
                )),
            }
        }
    }

    /// Exports the whole table (the registry restored at start). Adopted
    /// keys it lacks stay until [`Exporter::synced`].
    pub fn export_all(&self, table: &Table) {
        let dirty = Dirty {
            nodes: table.nodes().map(|n| n.name.clone()).collect(),
            ips: table.claimed_ips().collect(),
            services: table.services().map(|s| s.key()).collect(),
        };
        self.apply(table, &dirty);
    }

    /// Declares the initial state complete (the local source has synced):
    /// adopted keys nobody claimed are removed and the canaries written.
    pub fn synced(&self) {
        self.nodes.synced();
        self.ips.synced();
        self.services.synced();
    }

    /// Waits until the stores have written everything, canaries included.
    pub async fn wait_idle(&self) {
        self.nodes.wait_idle().await;
        self.ips.wait_idle().await;
        self.services.wait_idle().await;
    }

    /// Failed etcd requests of all stores (each was retried).
    pub fn errors(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.nodes.stats().errors.load(Relaxed)
            + self.ips.stats().errors.load(Relaxed)
            + self.services.stats().errors.load(Relaxed)
    }

    /// Per kind: (own keys another writer changed or deleted, written back;
    /// keys another writer put under the prefix, deleted) — the stores'
    /// tamper guards.
    pub fn tampering(&self) -> [(&'static str, u64, u64); 3] {
        use std::sync::atomic::Ordering::Relaxed;
        let of = |s: &kvstore::SyncStats| {
            (
                s.tampered_restored.load(Relaxed),
                s.foreign_removed.load(Relaxed),
            )
        };
        let [(a, b), (c, d), (e, f)] = [
            of(self.nodes.stats()),
            of(self.ips.stats()),
            of(self.services.stats()),
        ];
        [("nodes", a, b), ("ipcache", c, d), ("services", e, f)]
    }

    /// Stops writing; the keys stay for a successor to adopt.
    pub fn stop(self) {
        self.nodes.stop();
        self.ips.stop();
        self.services.stop();
    }
}

/// Writes `key` = `value` unless it already holds exactly that.
///
/// # Errors
///
/// When etcd cannot be read or written.
pub async fn put_if_changed(
    backend: &dyn kvstore::Backend,
    key: &str,
    value: &[u8],
) -> Result<bool, kvstore::BackendError> {
    if backend.get(key).await?.is_some_and(|kv| kv.value == value) {
        return Ok(false);
    }
    backend.put(key, value, None).await?;
    Ok(true)
}

/// Writes `cilium/.has-cluster-config` (Cilium writes it when it sets up a
/// clustermesh etcd: readers then wait for a config that is not there yet
/// instead of taking the cluster for one without a config), then the
/// cluster config (`cilium/cluster-config/<cluster>`), each if it differs.
///
/// # Errors
///
/// When etcd cannot be read or written.
pub async fn write_cluster_config(
    backend: &dyn kvstore::Backend,
    info: &ClusterInfo,
) -> Result<bool, kvstore::BackendError> {
    put_if_changed(backend, keys::HAS_CLUSTER_CONFIG_KEY, b"true").await?;
    let config = ClusterConfig::new(info.id, info.max, false);
    put_if_changed(backend, &ClusterConfig::key(&info.name), &config.encode()).await
}

/// Writes the identities' sync canary (the allocator writes the identities).
///
/// # Errors
///
/// When etcd cannot be written.
pub async fn write_identities_canary(
    backend: &dyn kvstore::Backend,
    cluster: &ClusterName,
) -> Result<(), kvstore::BackendError> {
    let key = keys::sync_canary_key(cluster, api::IdentityRecord::BASE_PREFIX);
    backend
        .put(&key, Timestamp::now().to_string().as_bytes(), None)
        .await
        .map(|_| ())
}

/// Rewrites `cilium/.heartbeat` with the current time.
///
/// # Errors
///
/// When etcd cannot be written.
pub async fn write_heartbeat(backend: &dyn kvstore::Backend) -> Result<(), kvstore::BackendError> {
    backend
        .put(
            keys::HEARTBEAT_KEY,
            Timestamp::now().to_string().as_bytes(),
            None,
        )
        .await
        .map(|_| ())
}
