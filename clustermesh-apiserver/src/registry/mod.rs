//! The registry: this cluster's nodes, endpoints and services, and the one
//! write path into them that every local source uses.
//!
//! A local source ([`crate::source`]) never touches the table, the identity
//! allocator, the persistence or the export itself. It calls the typed
//! methods of a [`Registry`] handle: [`Registry::upsert_node`],
//! [`Registry::delete_node`], [`Registry::upsert_endpoint`],
//! [`Registry::delete_endpoint`], [`Registry::upsert_service`],
//! [`Registry::delete_service`], [`Registry::retain`] and, once,
//! [`Registry::synced`]. Each write runs under one async lock:
//!
//! 1. check the record (module `check`, then against the table: node registered,
//!    IP inside its pod CIDRs) and the caller's [`Owner`]ship;
//! 2. allocate the endpoint's identity ([`crate::identity`]);
//! 3. apply it to the sans-IO [`Table`], which answers with the keys it made
//!    dirty;
//! 4. persist it under the private prefix ([`crate::persist`]);
//! 5. hand the dirty keys to the export ([`crate::export`]) and wake the
//!    `WatchServices` streams when a service's view changed.
//!
//! An endpoint upsert, the write node agents make for every pod, does 5
//! before 4: the export's SyncStore writes the ipcache entry while the
//! entry is persisted, so a registration reaches remote clusters after one
//! etcd round trip instead of two in a row. When the persist then fails,
//! the table is put back and exported again, so the exported key returns to
//! its old value (or is deleted) and etcd keeps nothing the registry
//! refused; the caller gets the error. The call still answers only after
//! the persist, so an acknowledged registration survives a restart.
//!
//! Serialising writes keeps the persisted registry, the identity reference
//! counts and the export in the order of the calls, which is what makes a
//! restart exact. Because validation is here, every source gets the same
//! [`RegistryError`] for the same bad record.
//!
//! The export writes records as soon as they change, but it declares its
//! initial state complete (deleting adopted keys nobody claimed, writing the
//! sync canaries, turning `/readyz` green) only after the source called
//! [`Registry::synced`]: as Cilium's clustermesh-apiserver waits for its
//! Kubernetes caches, so remote clusters never see a half-listed cluster as
//! complete.

mod check;
mod table;

use std::{
    collections::BTreeSet,
    fmt,
    ops::Deref,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use api::allocation_range;
use kvstore::SyncStoreConfig;
use tokio::sync::{watch, Mutex, MutexGuard};
use tracing::{info, warn};

pub use table::{
    Conflict, Dirty, EndpointEntry, EndpointUpsert, FieldError, IpView, ServiceView, Table,
};

use crate::{
    config::Config,
    export::{self, ClusterInfo, Exporter},
    identity::{label_string, Allocator, AllocatorConfig, IdentityError},
    persist::{PersistError, Persistence, Snapshot},
};
use mesh_proto::model::{EndpointSpec, NodeSpec, ObjectKey, ServiceSpec};

/// Who writes a record, and so what it may write and what [`Registry::retain`]
/// may sweep on its behalf.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A node agent's session (standalone source): it declares its own node
    /// and the endpoints on that node, nothing else.
    Session { node: String },
    /// The source as a whole: every node, endpoint and service. The
    /// Kubernetes source writes everything as this owner; the standalone
    /// source uses it for services (declared by `meshctl`, not by a node).
    Source,
}

impl Owner {
    fn holds_node(&self, name: &str) -> bool {
        match self {
            Owner::Session { node } => node == name,
            Owner::Source => true,
        }
    }

    fn holds_service(&self) -> bool {
        matches!(self, Owner::Source)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Session { node } => write!(f, "the session of node {node:?}"),
            Owner::Source => f.write_str("the source"),
        }
    }
}

/// Why a write was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The record is invalid (gRPC: `InvalidArgument`).
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The record belongs to someone else (gRPC: `PermissionDenied`).
    #[error("{record} belongs to {holder}, not to {owner}")]
    NotOwner {
        record: String,
        holder: String,
        owner: Owner,
    },
    /// The registry could not be written to etcd (gRPC: `Unavailable`).
    #[error("registry write to etcd")]
    Persist(#[source] PersistError),
    /// No identity could be allocated (gRPC: `Unavailable`).
    #[error("identity allocation")]
    Identity(#[source] IdentityError),
}

/// Errors that stop the registry from opening.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("read the persisted registry")]
    Load(#[source] PersistError),
    #[error("load identities")]
    Identities(#[source] IdentityError),
    #[error("persist a renumbered endpoint")]
    Persist(#[source] PersistError),
    #[error("write {what} to etcd")]
    Write {
        what: &'static str,
        #[source]
        source: kvstore::BackendError,
    },
}

/// What [`Registry::upsert_endpoint`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUpserted {
    /// The numeric security identity of the endpoint's labels.
    pub identity: u32,
    /// IPs another endpoint owns: this one is registered and waits in line
    /// for them (the standalone source answers `InvalidArgument`, as Cilium
    /// refuses the second claimant).
    pub conflicts: Vec<Conflict>,
}

/// The complete set of one kind's keys a source listed, for
/// [`Registry::retain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    Nodes(BTreeSet<String>),
    Endpoints(BTreeSet<ObjectKey>),
    Services(BTreeSet<ObjectKey>),
}

/// Counters shown by `Status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub etcd_errors: AtomicU64,
    pub etcd_connected: AtomicBool,
    /// The initial export, canaries included, is written.
    pub ready: AtomicBool,
}

struct Inner {
    info: ClusterInfo,
    table: Mutex<Table>,
    exporter: Exporter,
    allocator: Arc<Allocator>,
    persistence: Persistence,
    counters: Counters,
    /// Set once by [`Registry::synced`].
    synced: watch::Sender<bool>,
    /// Bumped whenever a service or the backends it selects changed.
    services_generation: watch::Sender<u64>,
}

/// A cheap, cloneable handle on the registry: the write API of the local
/// sources and the reads of the gRPC API, status and metrics.
#[derive(Clone)]
pub struct Registry(Arc<Inner>);

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("cluster", &self.0.info.name)
            .finish_non_exhaustive()
    }
}

/// Read access to the table; holds the registry's lock, so drop it soon.
#[derive(Debug)]
pub struct TableRead<'a>(MutexGuard<'a, Table>);

impl Deref for TableRead<'_> {
    type Target = Table;

    fn deref(&self) -> &Table {
        &self.0
    }
}

impl Registry {
    /// Restores the persisted registry (adopting its identities), writes the
    /// cluster config and starts the export of what was restored. The export
    /// is not declared complete until a source calls [`Registry::synced`].
    ///
    /// # Errors
    ///
    /// See [`OpenError`].
    pub async fn open(
        backend: Arc<dyn kvstore::Backend>,
        sync_backend: Arc<dyn kvstore::SyncBackend>,
        config: &Config,
        stores: &SyncStoreConfig,
    ) -> Result<Self, OpenError> {
        let cluster = config.cluster_name.as_str().to_owned();
        let info = ClusterInfo {
            name: config.cluster_name.clone(),
            id: config.cluster_id,
            max: config.max_connected_clusters,
        };
        let persistence = Persistence::new(backend.clone(), &cluster);
        let snapshot = persistence.load().await.map_err(OpenError::Load)?;
        let range = allocation_range(config.cluster_id, config.max_connected_clusters);
        let instance = format!("{:016x}", rand::random::<u64>());
        info!(instance = %instance, "identity allocation instance");
        let allocator = Arc::new(
            Allocator::load(
                backend.clone(),
                AllocatorConfig {
                    cluster: cluster.clone(),
                    range,
                    grace: config.identity_grace,
                    lease_ttl: config.identity_lease_ttl,
                    instance,
                },
            )
            .await
            .map_err(OpenError::Identities)?,
        );
        let (table, renumbered) = restore(snapshot, &allocator, &config.cluster_name)
            .await
            .map_err(OpenError::Identities)?;
        for entry in &renumbered {
            persistence
                .put_endpoint(entry)
                .await
                .map_err(OpenError::Persist)?;
        }
        export::write_cluster_config(backend.as_ref(), &info)
            .await
            .map_err(|source| OpenError::Write {
                what: "cluster config",
                source,
            })?;
        let exporter = Exporter::start(sync_backend, info.clone(), stores);
        exporter.export_all(&table);
        info!(
            cluster = %info.name,
            nodes = table.nodes().count(),
            endpoints = table.endpoints().count(),
            services = table.services().count(),
            "registry restored"
        );
        let counters = Counters::default();
        counters.etcd_connected.store(true, Ordering::Relaxed);
        Ok(Self(Arc::new(Inner {
            info,
            table: Mutex::new(table),
            exporter,
            allocator,
            persistence,
            counters,
            synced: watch::Sender::new(false),
            services_generation: watch::Sender::new(0),
        })))
    }

    /// Who this registry exports for.
    pub fn info(&self) -> &ClusterInfo {
        &self.0.info
    }

    /// The table, for reads. Holds the registry's lock while it lives.
    pub async fn read(&self) -> TableRead<'_> {
        TableRead(self.0.table.lock().await)
    }

    /// Moves whenever a service or the backends it selects changed.
    pub fn watch_services(&self) -> watch::Receiver<u64> {
        self.0.services_generation.subscribe()
    }

    pub fn counters(&self) -> &Counters {
        &self.0.counters
    }

    pub(crate) fn exporter(&self) -> &Exporter {
        &self.0.exporter
    }

    pub(crate) fn allocator(&self) -> &Arc<Allocator> {
        &self.0.allocator
    }

    /// Counts of what is exported now, per kind of [`crate::export::KINDS`].
    pub async fn exported_counts(&self) -> [(&'static str, u64); 4] {
        let exporter = &self.0.exporter;
        [
            ("nodes", exporter.nodes.len() as u64),
            ("ipcache", exporter.ips.len() as u64),
            ("identities", self.0.allocator.count().await as u64),
            ("services", exporter.services.len() as u64),
        ]
    }

    /// What was undone of another writer's changes, per kind: (written
    /// back, deleted) — the export's tamper guards ([`Exporter::tampering`])
    /// and the identity allocator's ([`Allocator::restored`]).
    pub fn tampering(&self) -> Vec<(&'static str, u64, u64)> {
        let mut out = self.0.exporter.tampering().to_vec();
        out.push(("identities", self.0.allocator.restored(), 0));
        out
    }

    /// Failed etcd requests: registry writes, identity allocation, export.
    pub fn etcd_errors(&self) -> u64 {
        self.0.counters.etcd_errors.load(Ordering::Relaxed) + self.0.exporter.errors()
    }

    /// Declares the source's first full listing applied. Only then does the
    /// export delete adopted keys nobody claimed and write its sync
    /// canaries. Later calls do nothing.
    ///
    /// Every write the source made before calling this is part of the
    /// initial state: the call waits for writes still in progress.
    pub async fn synced(&self) {
        let _table = self.0.table.lock().await;
        if self.0.synced.send_replace(true) {
            return;
        }
        self.0.exporter.synced();
        info!("local source synced");
    }

    /// Whether [`Registry::synced`] was called.
    pub fn is_synced(&self) -> bool {
        *self.0.synced.borrow()
    }

    /// Completes once [`Registry::synced`] was called.
    pub async fn wait_synced(&self) {
        let mut rx = self.0.synced.subscribe();
        // The guard `wait_for` returns is not `Send`: drop it here.
        let _ = rx.wait_for(|synced| *synced).await.map(|_| ());
    }

    /// Adds or replaces a node.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Invalid`] for a bad record or a node the owner may
    /// not declare; [`RegistryError::Persist`] when etcd refuses the write.
    pub async fn upsert_node(&self, owner: &Owner, node: NodeSpec) -> Result<(), RegistryError> {
        check::node(owner, &node)?;
        let mut table = self.0.table.lock().await;
        self.0
            .persistence
            .put_node(&node)
            .await
            .map_err(|e| self.persist_failed(e))?;
        let dirty = table.upsert_node(node);
        self.publish(&table, &dirty);
        Ok(())
    }

    /// Removes a node and every endpoint on it; `false` when it did not exist.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotOwner`] when `owner` is another node's session;
    /// [`RegistryError::Persist`] when etcd refuses a delete.
    pub async fn delete_node(&self, owner: &Owner, name: &str) -> Result<bool, RegistryError> {
        if !owner.holds_node(name) {
            return Err(RegistryError::NotOwner {
                record: format!("node {name:?}"),
                holder: Owner::Session {
                    node: name.to_owned(),
                }
                .to_string(),
                owner: owner.clone(),
            });
        }
        let mut table = self.0.table.lock().await;
        self.remove_node(&mut table, name).await
    }

    /// Adds or replaces an endpoint, allocating the identity of its labels.
    /// An endpoint claiming an IP another one owns is registered all the
    /// same and reported in [`EndpointUpserted::conflicts`].
    ///
    /// # Errors
    ///
    /// [`RegistryError::Invalid`] for a bad record, an unregistered node, an
    /// IP outside the node's pod CIDRs or a node the owner may not declare;
    /// [`RegistryError::Identity`] or [`RegistryError::Persist`] when etcd
    /// fails. Nothing changes then.
    pub async fn upsert_endpoint(
        &self,
        owner: &Owner,
        spec: EndpointSpec,
    ) -> Result<EndpointUpserted, RegistryError> {
        check::endpoint(owner, &spec)?;
        let mut table = self.0.table.lock().await;
        table.check_endpoint(&spec)?;
        let labels = self.labels_of(&spec)?;
        let identity = self.0.allocator.acquire(&labels).await.map_err(|e| {
            self.0.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
            RegistryError::Identity(e)
        })?;
        let key = spec.key();
        let outcome = match table.upsert_endpoint(spec, identity) {
            Ok(outcome) => outcome,
            Err(e) => {
                self.0.allocator.release(&labels).await;
                return Err(e.into());
            }
        };
        // Export first: the SyncStore writes the ipcache entry while the
        // entry is persisted, so the registration's latency is one etcd
        // round trip, not two in a row.
        self.publish(&table, &outcome.dirty);
        let persisted = match table.endpoint(&key) {
            Some(entry) => self.0.persistence.put_endpoint(entry).await,
            None => Ok(()),
        };
        if let Err(e) = persisted {
            self.undo_endpoint_upsert(&mut table, &key, outcome);
            self.0.allocator.release(&labels).await;
            return Err(self.persist_failed(e));
        }
        if let Some(previous) = &outcome.previous {
            self.0
                .allocator
                .release(&self.labels_of(&previous.spec)?)
                .await;
        }
        Ok(EndpointUpserted {
            identity,
            conflicts: outcome.conflicts,
        })
    }

    /// Removes an endpoint; `false` when it did not exist.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotOwner`] when the endpoint is on a node the owner's
    /// session does not own; [`RegistryError::Persist`] when etcd refuses.
    pub async fn delete_endpoint(
        &self,
        owner: &Owner,
        key: &ObjectKey,
    ) -> Result<bool, RegistryError> {
        let mut table = self.0.table.lock().await;
        match table.endpoint(key) {
            None => return Ok(false),
            Some(entry) if !owner.holds_node(&entry.spec.node) => {
                return Err(RegistryError::NotOwner {
                    record: format!("endpoint {key}"),
                    holder: format!("node {:?}", entry.spec.node),
                    owner: owner.clone(),
                })
            }
            Some(_) => {}
        }
        self.remove_endpoint(&mut table, key).await
    }

    /// Adds or replaces a service.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Invalid`] for a bad record;
    /// [`RegistryError::NotOwner`] for a session (services belong to the
    /// source); [`RegistryError::Persist`] when etcd refuses the write.
    pub async fn upsert_service(
        &self,
        owner: &Owner,
        spec: ServiceSpec,
    ) -> Result<(), RegistryError> {
        check::service(&spec)?;
        self.own_service(owner, &spec.key())?;
        let mut table = self.0.table.lock().await;
        self.0
            .persistence
            .put_service(&spec)
            .await
            .map_err(|e| self.persist_failed(e))?;
        let dirty = table.upsert_service(spec);
        self.publish(&table, &dirty);
        Ok(())
    }

    /// Removes a service; `false` when it did not exist.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotOwner`] for a session;
    /// [`RegistryError::Persist`] when etcd refuses the delete.
    pub async fn delete_service(
        &self,
        owner: &Owner,
        key: &ObjectKey,
    ) -> Result<bool, RegistryError> {
        self.own_service(owner, key)?;
        let mut table = self.0.table.lock().await;
        self.remove_service(&mut table, key).await
    }

    /// Mark and sweep after a full listing of one kind (a Kubernetes
    /// reflector's `InitDone`): removes every record of that kind that
    /// `owner` holds and `listing` lacks, such as what was restored from
    /// etcd but deleted while the apiserver was down. Returns how many went.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Persist`] when etcd refuses a delete; what was
    /// removed before stays removed.
    pub async fn retain(&self, owner: &Owner, listing: &Listing) -> Result<usize, RegistryError> {
        let mut table = self.0.table.lock().await;
        let mut removed = 0;
        match listing {
            Listing::Nodes(keep) => {
                let stale: Vec<String> = table
                    .nodes()
                    .map(|n| n.name.clone())
                    .filter(|n| owner.holds_node(n) && !keep.contains(n))
                    .collect();
                for name in stale {
                    removed += usize::from(self.remove_node(&mut table, &name).await?);
                }
            }
            Listing::Endpoints(keep) => {
                let stale: Vec<ObjectKey> = table
                    .endpoints()
                    .filter(|e| owner.holds_node(&e.spec.node))
                    .map(|e| e.spec.key())
                    .filter(|k| !keep.contains(k))
                    .collect();
                for key in stale {
                    removed += usize::from(self.remove_endpoint(&mut table, &key).await?);
                }
            }
            Listing::Services(keep) if owner.holds_service() => {
                let stale: Vec<ObjectKey> = table
                    .services()
                    .map(ServiceSpec::key)
                    .filter(|k| !keep.contains(k))
                    .collect();
                for key in stale {
                    removed += usize::from(self.remove_service(&mut table, &key).await?);
                }
            }
            Listing::Services(_) => {}
        }
        if removed > 0 {
            info!(owner = %owner, removed, "removed records the listing lacks");
        }
        Ok(removed)
    }

    fn own_service(&self, owner: &Owner, key: &ObjectKey) -> Result<(), RegistryError> {
        if owner.holds_service() {
            return Ok(());
        }
        Err(RegistryError::NotOwner {
            record: format!("service {key}"),
            holder: Owner::Source.to_string(),
            owner: owner.clone(),
        })
    }

    /// Puts the table back as it was before an endpoint upsert whose
    /// persistence failed, and exports that state again: keys the upsert
    /// changed get their old value back, keys it created are deleted. The
    /// SyncStore coalesces, so a write it has not started yet never reaches
    /// etcd. The previous entry keeps its claim order (its claims carry
    /// their sequence numbers) and its identity, which the upsert had not
    /// released yet.
    fn undo_endpoint_upsert(&self, table: &mut Table, key: &ObjectKey, outcome: EndpointUpsert) {
        let (mut dirty, _) = table.delete_endpoint(key);
        if let Some(previous) = outcome.previous {
            table.restore_endpoint(previous);
        }
        dirty.merge(outcome.dirty);
        self.publish(table, &dirty);
    }

    // The removals below delete the persisted record first and change the
    // table only once etcd took the delete: a refused delete leaves the
    // record registered and exported, as it would be restored on a restart.

    async fn remove_node(&self, table: &mut Table, name: &str) -> Result<bool, RegistryError> {
        if table.node(name).is_none() {
            return Ok(false);
        }
        let on_node: Vec<ObjectKey> = table
            .endpoints()
            .filter(|e| e.spec.node == name)
            .map(|e| e.spec.key())
            .collect();
        for key in on_node {
            self.remove_endpoint(table, &key).await?;
        }
        self.0
            .persistence
            .delete_node(name)
            .await
            .map_err(|e| self.persist_failed(e))?;
        let (dirty, _) = table.remove_node(name);
        self.publish(table, &dirty);
        Ok(true)
    }

    async fn remove_endpoint(
        &self,
        table: &mut Table,
        key: &ObjectKey,
    ) -> Result<bool, RegistryError> {
        if table.endpoint(key).is_none() {
            return Ok(false);
        }
        self.0
            .persistence
            .delete_endpoint(key)
            .await
            .map_err(|e| self.persist_failed(e))?;
        let (dirty, removed) = table.delete_endpoint(key);
        self.publish(table, &dirty);
        if let Some(entry) = removed {
            self.0
                .allocator
                .release(&self.labels_of(&entry.spec)?)
                .await;
        }
        Ok(true)
    }

    async fn remove_service(
        &self,
        table: &mut Table,
        key: &ObjectKey,
    ) -> Result<bool, RegistryError> {
        if table.service(key).is_none() {
            return Ok(false);
        }
        self.0
            .persistence
            .delete_service(key)
            .await
            .map_err(|e| self.persist_failed(e))?;
        if let Some(dirty) = table.delete_service(key) {
            self.publish(table, &dirty);
        }
        Ok(true)
    }

    /// The endpoint's identity labels; its labels passed [`check::endpoint`],
    /// which applies the same label rules.
    fn labels_of(&self, spec: &EndpointSpec) -> Result<String, RegistryError> {
        label_string(&spec.labels, &spec.namespace, &self.0.info.name)
            .map_err(|e| RegistryError::Invalid(FieldError::new("endpoint.labels", e.to_string())))
    }

    fn persist_failed(&self, e: PersistError) -> RegistryError {
        self.0.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "registry write to etcd failed");
        RegistryError::Persist(e)
    }

    /// Hands the dirty keys of a write to the export and wakes the
    /// `WatchServices` streams when a service's view changed.
    fn publish(&self, table: &Table, dirty: &Dirty) {
        self.0.exporter.apply(table, dirty);
        if !dirty.services.is_empty() {
            self.0
                .services_generation
                .send_modify(|g| *g = g.wrapping_add(1));
        }
    }
}

/// Puts the persisted registry back: nodes, services, endpoints with their
/// identities (adopted when the number still holds, allocated otherwise).
async fn restore(
    snapshot: Snapshot,
    allocator: &Allocator,
    cluster: &api::ClusterName,
) -> Result<(Table, Vec<EndpointEntry>), IdentityError> {
    let mut table = Table::default();
    let mut renumbered = Vec::new();
    for node in snapshot.nodes {
        table.upsert_node(node);
    }
    for service in snapshot.services {
        table.upsert_service(service);
    }
    for mut entry in snapshot.endpoints {
        let labels = match label_string(&entry.spec.labels, &entry.spec.namespace, cluster) {
            Ok(labels) => labels,
            Err(e) => {
                // Written by an older version with other label rules: not
                // restored, its node registers it again.
                warn!(endpoint = %entry.spec.key(), error = %e, "persisted endpoint has invalid labels; dropped");
                continue;
            }
        };
        if !allocator.adopt(&labels, entry.identity).await? {
            entry.identity = allocator.acquire(&labels).await?;
            renumbered.push(entry.clone());
        }
        table.restore_endpoint(entry);
    }
    Ok((table, renumbered))
}
