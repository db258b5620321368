//! The clusters of the mesh as this node sees them: one task per cluster
//! (the local one included), and the directory watcher that starts, restarts
//! and removes them.
//!
//! # One task owns one cluster
//!
//! A cluster task connects to the cluster's etcd (TLS as its config file
//! says), reads `cilium/cluster-config/<name>`, claims the cluster's name and
//! ID in the [`Mesh`] (a second cluster with the same ID, or a remote
//! cluster with the local cluster's ID, is refused with a clear status), and
//! starts one [`WatchStore`] per kind (nodes, ipcache, identities, services)
//! validating every record against the connection's [`RemoteScope`]. The
//! stores list, watch and, when a watch breaks, list again with mark and
//! sweep on their own; the task then only probes the connection (heartbeat
//! key, cluster config) so that the status says whether the cluster is
//! reachable, and reconnects from scratch when the cluster's ID changes.
//! Every failure is counted and retried with jittered exponential backoff.
//!
//! # Stop keeps, remove drains
//!
//! Stopping the agent stops the tasks and leaves the datapath as it is (the
//! next agent adopts the pinned maps). Removing a config file removes the
//! cluster from the [`Mesh`], so the reconciler's next pass deletes its
//! entries. A *changed* config file restarts the task, and the stores of the
//! old connection stay in the mesh ([`ClusterEntry::previous`]) until the new
//! ones have synced, so a reconnect never withdraws a live entry.
//!
//! # The config directory
//!
//! One file per remote cluster in Cilium's etcd config format; the file name
//! is the cluster name. Names with a `.` are skipped: a cluster name never
//! has one, and Cilium's layout keeps each cluster's certificates beside its
//! config as `<cluster>.etcd-client.crt` and the like; so are dotfiles
//! (Kubernetes secret volumes keep `..data` links there). The directory is polled (once a second by
//! default) and files are compared by content, which also catches secret
//! volumes that swap a symlink rather than write a file.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use api::{
    ClusterConfig, ClusterEndpointSlice, ClusterName, ClusterService, IdentityRecord, IpcacheEntry,
    Node, RemoteScope, Resource,
};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::future::BoxFuture;
use kvstore::{Event, ListWatch, WatchStore, WatchStoreConfig};
use tokio::{
    sync::Notify,
    task::{JoinHandle, JoinSet},
};
use tracing::{info, warn, Instrument};

use api::agent::ClusterStatus;

use crate::status::StatusHub;

/// How often a connected cluster is probed (heartbeat key, cluster config).
const PROBE_PERIOD: Duration = Duration::from_secs(5);

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
    /// The cluster name is not a valid cluster name.
    #[error("{cluster:?} is not a valid cluster name")]
    InvalidName {
        /// The name.
        cluster: String,
        /// Why.
        #[source]
        source: api::ClusterError,
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
            Self::DuplicateId { .. }
                | Self::LocalIdMismatch { .. }
                | Self::ModeMismatch { .. }
                | Self::InvalidName { .. }
        )
    }
}

/// Where a cluster's etcd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdSource {
    /// A Cilium-style etcd config file (read at each connection attempt).
    File(PathBuf),
    /// Plain endpoint URLs.
    Endpoints(Vec<String>),
}

/// Opens a read connection to a cluster's etcd. Injected so that tests can
/// swap the client (e.g. for an in-memory backend).
pub trait Connector: Send + Sync + 'static {
    /// Connects to `source` of `cluster`.
    fn connect<'a>(
        &'a self,
        cluster: &'a str,
        source: &'a EtcdSource,
    ) -> BoxFuture<'a, Result<Arc<dyn ListWatch>, ClusterError>>;
}

/// The real connector: [`kvstore::connect`].
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdConnector;

impl Connector for EtcdConnector {
    fn connect<'a>(
        &'a self,
        cluster: &'a str,
        source: &'a EtcdSource,
    ) -> BoxFuture<'a, Result<Arc<dyn ListWatch>, ClusterError>> {
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
            Ok(Arc::new(backend) as Arc<dyn ListWatch>)
        })
    }
}

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

/// What changed in one connection's stores, for the reconciler's
/// incremental passes ([`crate::reconciler`]).
///
/// A change only *names* a record (an endpoint by IP, a node by name); the
/// reconciler reads the record's current value from the store, which is
/// updated before the event is sent. So a burst of changes to one record is
/// applied as one, a change applied twice is harmless, and a full pass that
/// reads the stores may simply drop what was queued before it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// The endpoint (ipcache record) with this IP.
    Endpoint(IpAddr),
    /// The node with this name.
    Node(String),
}

/// Changes of one connection, queued by the store forwarders and taken by
/// the reconciler. Bounded: past [`Changes::MAX_PENDING`] the queue is
/// dropped and a full pass requested instead, which reads the stores.
#[derive(Debug, Default)]
pub struct Changes(Mutex<Pending>);

/// What [`Changes::take`] hands over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Changed records, in arrival order (possibly repeated).
    pub changes: Vec<Change>,
    /// Apply by a full pass instead: a store synced (which changes which
    /// connections count) or the queue overflowed.
    pub full: bool,
}

impl Changes {
    /// Queue length past which a full pass is requested instead.
    pub const MAX_PENDING: usize = 65_536;

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a change of one record.
    pub fn push(&self, change: Change) {
        let mut pending = self.lock();
        if pending.full {
            // The full pass to come reads the stores after this change.
            return;
        }
        if pending.changes.len() >= Self::MAX_PENDING {
            pending.changes = Vec::new();
            pending.full = true;
            return;
        }
        pending.changes.push(change);
    }

    /// Asks for a full pass (a store synced).
    pub fn push_full(&self) {
        let mut pending = self.lock();
        pending.changes = Vec::new();
        pending.full = true;
    }

    /// Takes everything queued.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.lock())
    }

    /// Whether `f` holds for a queued change (without taking it).
    pub fn any(&self, f: impl Fn(&Change) -> bool) -> bool {
        let pending = self.lock();
        pending.full || pending.changes.iter().any(f)
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

/// What the mesh knows about one cluster.
#[derive(Debug, Default, Clone)]
pub struct ClusterEntry {
    /// This node's own cluster.
    pub local: bool,
    /// The stores of the current connection.
    pub current: Option<Arc<ClusterStores>>,
    /// The stores of the previous connection, kept until `current` synced.
    pub previous: Option<Arc<ClusterStores>>,
    /// Refused (duplicate ID, wrong mode): does not hold up the sweep.
    pub refused: bool,
}

impl ClusterEntry {
    /// Whether the current connection has synced every kind.
    pub fn synced(&self) -> bool {
        self.current.as_ref().is_some_and(|s| s.synced().all())
    }

    /// The stores whose records count: the current ones, plus the previous
    /// ones while the current ones have not synced yet.
    pub fn sources(&self) -> impl Iterator<Item = &Arc<ClusterStores>> {
        let keep_previous = !self.synced();
        self.current
            .iter()
            .chain(self.previous.iter().filter(move |_| keep_previous))
    }
}

/// The shared view of every cluster, read by the reconciler and the status.
#[derive(Debug, Default)]
pub struct Mesh {
    clusters: RwLock<BTreeMap<String, ClusterEntry>>,
    /// Bumped (under the `clusters` write lock) by every change of
    /// `clusters`, so the reconciler knows when its view of which
    /// connections count is out of date.
    version: AtomicU64,
    /// Cluster ID → name of the cluster holding it.
    claims: Mutex<BTreeMap<u16, String>>,
    changed: Notify,
    /// The service reconciler's own wake-up ([`crate::services`]).
    services_changed: Notify,
}

impl Mesh {
    /// Wakes the reconciler and the service reconciler.
    pub fn notify(&self) {
        self.changed.notify_one();
        self.services_changed.notify_one();
    }

    /// Like [`Mesh::changed`], for the service reconciler.
    pub async fn services_changed(&self) {
        self.services_changed.notified().await;
    }

    /// Wakes only the (ipcache) reconciler: an endpoint or node changed.
    pub fn notify_reconciler(&self) {
        self.changed.notify_one();
    }

    /// Waits for the next change (changes while nobody waits are kept as
    /// one pending wake-up, so none is lost and bursts coalesce).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A copy of every cluster's entry.
    pub fn snapshot(&self) -> BTreeMap<String, ClusterEntry> {
        self.versioned_snapshot().1
    }

    /// The version of the cluster map: it changes whenever a cluster, a
    /// connection or a refusal does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// [`Mesh::version`] and [`Mesh::snapshot`], read together.
    pub fn versioned_snapshot(&self) -> (u64, BTreeMap<String, ClusterEntry>) {
        let map = self
            .clusters
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (self.version.load(Ordering::Acquire), map.clone())
    }

    fn write(&self, f: impl FnOnce(&mut BTreeMap<String, ClusterEntry>)) {
        let mut map = self
            .clusters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut map);
        self.version.fetch_add(1, Ordering::AcqRel);
        drop(map);
        self.notify();
    }

    /// Applies `f` to the entry of `cluster` (created if new).
    pub(crate) fn update(&self, cluster: &str, f: impl FnOnce(&mut ClusterEntry)) {
        self.write(|map| f(map.entry(cluster.to_owned()).or_default()));
    }

    /// Removes `cluster` (its config file is gone): its entries are drained
    /// by the next reconcile pass.
    pub fn remove(&self, cluster: &str) {
        self.write(|map| {
            map.remove(cluster);
        });
    }

    fn claim(&self, cluster: &str, id: u16) -> Result<ClaimGuard<'_>, String> {
        let mut claims = self
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match claims.get(&id) {
            Some(owner) if owner != cluster => Err(owner.clone()),
            _ => {
                claims.insert(id, cluster.to_owned());
                Ok(ClaimGuard { mesh: self, id })
            }
        }
    }
}

/// Releases a cluster ID claim when the connection ends (also on abort).
struct ClaimGuard<'a> {
    mesh: &'a Mesh,
    id: u16,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        self.mesh
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// What every cluster task shares.
#[derive(Clone)]
pub struct Context {
    /// The mesh view the tasks publish into.
    pub mesh: Arc<Mesh>,
    /// Status of the connections.
    pub hub: Arc<StatusHub>,
    /// The client factory.
    pub connector: Arc<dyn Connector>,
    /// The local cluster's name.
    pub local_name: String,
    /// The local cluster's ID.
    pub local_id: u16,
    /// 255 or 511.
    pub max_connected: u16,
    /// Backoff bounds of reconnects.
    pub backoff: (Duration, Duration),
    /// How long to wait for a cluster config that the etcd promises
    /// (`cilium/.has-cluster-config`); [`kvstore::CLUSTER_CONFIG_WAIT`].
    pub cluster_config_wait: Duration,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("local_name", &self.local_name)
            .field("local_id", &self.local_id)
            .finish_non_exhaustive()
    }
}

fn now_rfc3339() -> String {
    kvstore::keys::rfc3339_now()
}

impl Context {
    fn set_status(&self, cluster: &str, f: impl FnOnce(&mut ClusterStatus)) {
        self.hub.update_cluster(cluster, f);
    }

    fn failure(&self, cluster: &str, error: &ClusterError) {
        let text = kvstore::error_chain(error);
        warn!(cluster, error = %text, "cluster connection failed");
        self.set_status(cluster, |s| {
            s.connected = false;
            s.ready = false;
            s.num_failures += 1;
            s.last_failure = Some(now_rfc3339());
            s.status = text;
        });
    }

    /// Starts the task of `cluster` reading from `source`.
    pub fn spawn_cluster(
        &self,
        cluster: String,
        source: EtcdSource,
        local: bool,
    ) -> JoinHandle<()> {
        let ctx = self.clone();
        let span = tracing::info_span!("remote_cluster", cluster = %cluster, local);
        self.set_status(&cluster, |s| s.status = "connecting".to_owned());
        self.mesh.update(&cluster, |e| e.local = local);
        tokio::spawn(async move { ctx.run_cluster(cluster, source, local).await }.instrument(span))
    }

    async fn run_cluster(self, cluster: String, source: EtcdSource, local: bool) {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.backoff.0)
            .with_max_delay(self.backoff.1)
            .with_jitter()
            .without_max_times();
        let mut backoff = builder.build();
        loop {
            let mut connected = false;
            let error = self.session(&cluster, &source, local, &mut connected).await;
            if connected {
                backoff = builder.build();
            }
            self.mesh
                .update(&cluster, |e| e.refused = error.is_refusal());
            self.failure(&cluster, &error);
            let delay = backoff.next().unwrap_or(self.backoff.1);
            tokio::time::sleep(delay).await;
        }
    }

    /// One connection: returns why it ended.
    async fn session(
        &self,
        cluster: &str,
        source: &EtcdSource,
        local: bool,
        connected: &mut bool,
    ) -> ClusterError {
        let backend = match self.connector.connect(cluster, source).await {
            Ok(b) => b,
            Err(e) => return e,
        };
        let name = match ClusterName::new(cluster) {
            Ok(n) => n,
            Err(source) => {
                return ClusterError::InvalidName {
                    cluster: cluster.to_owned(),
                    source,
                }
            }
        };
        let waiting = || {
            self.set_status(cluster, |s| {
                s.status = format!(
                    "waiting for {} (cilium/.has-cluster-config is set)",
                    ClusterConfig::key(&name)
                );
            });
        };
        let config = match kvstore::read_required_cluster_config(
            backend.as_ref(),
            &name,
            self.cluster_config_wait,
            waiting,
        )
        .await
        {
            Ok(c) => c,
            Err(source) => {
                return ClusterError::ClusterConfig {
                    cluster: cluster.to_owned(),
                    source,
                }
            }
        };
        let id = config.id.get();
        let mode = config.capabilities.max_connected_clusters.max_cluster_id();
        if mode != self.max_connected {
            return ClusterError::ModeMismatch {
                cluster: cluster.to_owned(),
                configured: self.max_connected,
                found: mode,
            };
        }
        if local && id != self.local_id {
            return ClusterError::LocalIdMismatch {
                cluster: cluster.to_owned(),
                configured: self.local_id,
                found: id,
            };
        }
        if !local && id == self.local_id {
            return ClusterError::DuplicateId {
                cluster: cluster.to_owned(),
                id,
                owner: self.local_name.clone(),
            };
        }
        let _claim = match self.mesh.claim(cluster, id) {
            Ok(guard) => guard,
            Err(owner) => {
                return ClusterError::DuplicateId {
                    cluster: cluster.to_owned(),
                    id,
                    owner,
                }
            }
        };
        *connected = true;
        let scope = config.scope(name.clone());
        let store_config = WatchStoreConfig {
            wait_for_canary: config.capabilities.synced_canaries,
            cached: config.capabilities.cached,
            ..WatchStoreConfig::default()
        };
        // The store forwarders end with the connection (JoinSet aborts on drop).
        let mut forwarders = JoinSet::new();
        let changes = Arc::new(Changes::default());
        let streams = Streams {
            backend: &backend,
            scope: &scope,
            config: &store_config,
            changes: &changes,
        };
        let nodes = self.store(&streams, &mut forwarders, |n: &Node| {
            Route::Reconciler(Change::Node(n.name.clone()))
        });
        let endpoints = self.store(&streams, &mut forwarders, |e: &IpcacheEntry| {
            Route::Reconciler(Change::Endpoint(e.ip))
        });
        // Identities have no datapath state of their own (the ipcache
        // entries carry the numeric identity), so their changes wake nobody.
        let identities = self.store(&streams, &mut forwarders, |_: &IdentityRecord| {
            Route::Nobody
        });
        let mode = config.capabilities.endpoint_slices_export_mode;
        let services = if mode.backends_from_endpoint_slices() {
            ServiceSource::EndpointSlices(self.store(
                &streams,
                &mut forwarders,
                |_: &ClusterEndpointSlice| Route::Services,
            ))
        } else {
            ServiceSource::Services(self.store(&streams, &mut forwarders, |_: &ClusterService| {
                Route::Services
            }))
        };
        let stores = Arc::new(ClusterStores {
            scope: scope.clone(),
            nodes,
            endpoints,
            identities,
            services,
            changes,
        });
        self.mesh.update(cluster, |e| {
            e.refused = false;
            if let Some(old) = e.current.take() {
                // Keep the last synced connection's records until the new one synced.
                if old.synced().all() || e.previous.is_none() {
                    e.previous = Some(old);
                }
            }
            e.current = Some(stores.clone());
        });
        self.set_status(cluster, |s| {
            s.connected = true;
            s.kvstoremesh = config.capabilities.cached;
            s.endpoint_slices_export_mode = mode.name().to_owned();
            s.status = "waiting for initial sync".to_owned();
        });
        info!(
            id,
            cached = config.capabilities.cached,
            services = mode.name(),
            "connected"
        );
        let mut probe = tokio::time::interval(PROBE_PERIOD);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_ready = false;
        loop {
            tokio::select! {
                _ = probe.tick() => {}
                () = wait_synced(&stores), if !was_ready => {}
            }
            let ready = stores.synced().all();
            if ready && !was_ready {
                info!("initial sync complete");
                self.mesh.update(cluster, |e| e.previous = None);
            }
            was_ready = ready;
            match kvstore::read_cluster_config(backend.as_ref(), &name).await {
                Ok(c) if c.id.get() != id => {
                    return ClusterError::IdChanged {
                        cluster: cluster.to_owned(),
                        old: id,
                        new: c.id.get(),
                    }
                }
                Ok(_) => {}
                Err(kvstore::ClusterConfigError::Backend { source, .. }) => {
                    // The stores keep retrying on their own; report and probe again.
                    let e = ClusterError::Probe {
                        cluster: cluster.to_owned(),
                        source,
                    };
                    self.failure(cluster, &e);
                    continue;
                }
                Err(source) => {
                    return ClusterError::ClusterConfig {
                        cluster: cluster.to_owned(),
                        source,
                    }
                }
            }
            self.set_status(cluster, |s| {
                s.connected = true;
                s.ready = ready;
                s.status = if ready {
                    "connected".to_owned()
                } else {
                    "waiting for initial sync".to_owned()
                };
            });
        }
    }

    /// Starts the store of one kind and the task that forwards its events:
    /// endpoint and node changes are queued for the reconciler's
    /// incremental passes, service changes wake the service reconciler,
    /// and a store's `Synced` asks both for a full pass.
    fn store<R: Resource>(
        &self,
        streams: &Streams<'_>,
        forwarders: &mut JoinSet<()>,
        route: fn(&R) -> Route,
    ) -> WatchStore<R> {
        let (store, mut events) = WatchStore::<R>::spawn(
            streams.backend.clone(),
            streams.scope.clone(),
            streams.config.clone(),
        );
        let mesh = self.mesh.clone();
        let changes = streams.changes.clone();
        forwarders.spawn(
            async move {
                while let Some(event) = events.recv().await {
                    let record = match &event {
                        Event::Upsert(r) | Event::Delete(r) => r,
                        Event::Synced => {
                            changes.push_full();
                            mesh.notify();
                            continue;
                        }
                    };
                    match route(record) {
                        Route::Reconciler(change) => {
                            changes.push(change);
                            mesh.notify_reconciler();
                        }
                        Route::Services => mesh.notify(),
                        Route::Nobody => {}
                    }
                }
            }
            .in_current_span(),
        );
        store
    }
}

/// What every store of one connection is started with.
struct Streams<'a> {
    backend: &'a Arc<dyn ListWatch>,
    scope: &'a RemoteScope,
    config: &'a WatchStoreConfig,
    changes: &'a Arc<Changes>,
}

/// Who hears about a changed record.
enum Route {
    /// The ipcache reconciler, through the connection's [`Changes`].
    Reconciler(Change),
    /// The service reconciler.
    Services,
    /// Nobody: the kind has no datapath state.
    Nobody,
}

async fn wait_synced(stores: &ClusterStores) {
    stores.nodes.wait_until_synced().await;
    stores.endpoints.wait_until_synced().await;
    stores.identities.wait_until_synced().await;
    stores.services.wait_until_synced().await;
}

/// A running cluster task and the config it runs with.
struct Running {
    content: Vec<u8>,
    task: Option<JoinHandle<()>>,
}

/// Watches the remote-cluster config directory until dropped; see the
/// module docs.
pub async fn watch_config_dir(ctx: Context, dir: PathBuf, period: Duration) {
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned_missing = false;
    loop {
        tick.tick().await;
        let files = match scan(&dir) {
            Ok(f) => {
                warned_missing = false;
                f
            }
            Err(e) => {
                if !warned_missing {
                    warn!(dir = %dir.display(), error = %e, "cannot read the clustermesh config directory; treating it as empty");
                    warned_missing = true;
                }
                BTreeMap::new()
            }
        };
        let gone: Vec<String> = running
            .keys()
            .filter(|k| !files.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = running.remove(&name) {
                if let Some(t) = r.task {
                    t.abort();
                }
            }
            info!(cluster = %name, "config removed; draining the cluster");
            ctx.mesh.remove(&name);
            ctx.hub.remove_cluster(&name);
        }
        for (name, content) in files {
            if running.get(&name).is_some_and(|r| r.content == content) {
                continue;
            }
            let restart = running.remove(&name);
            if let Some(t) = restart.and_then(|r| r.task) {
                info!(cluster = %name, "config changed; reconnecting");
                t.abort();
            }
            let task = match refuse_name(&ctx, &name) {
                Some(reason) => {
                    warn!(cluster = %name, reason = %reason, "cluster config refused");
                    ctx.set_status(&name, |s| {
                        s.connected = false;
                        s.ready = false;
                        s.status = reason;
                    });
                    None
                }
                None => {
                    info!(cluster = %name, "cluster config found; connecting");
                    Some(ctx.spawn_cluster(name.clone(), EtcdSource::File(dir.join(&name)), false))
                }
            };
            running.insert(name, Running { content, task });
        }
    }
}

fn refuse_name(ctx: &Context, name: &str) -> Option<String> {
    if let Err(e) = ClusterName::new(name) {
        return Some(format!(
            "file name {name:?} is not a valid cluster name: {e}"
        ));
    }
    if name == ctx.local_name {
        return Some(format!(
            "cluster {name} has the local cluster's name; refusing to connect to it as a remote cluster"
        ));
    }
    None
}

/// The config files in `dir`: name → content. Names with a `.` (dotfiles and
/// the certificate files Cilium's layout keeps beside each config) and
/// directories are skipped; symlinks are followed.
fn scan(dir: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.contains('.') {
            continue;
        }
        let path = entry.path();
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        // A file vanishing between listing and reading counts as removed.
        if let Ok(content) = std::fs::read(&path) {
            out.insert(name, content);
        }
    }
    Ok(out)
}

/// The names of clusters with a config file, for tests and status.
pub fn config_names(dir: &Path) -> BTreeSet<String> {
    scan(dir)
        .map(|m| m.into_keys().collect())
        .unwrap_or_default()
}

/// Cluster entries over real [`WatchStore`]s on the in-memory backend, for
/// the unit tests of the reconcilers.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use api::{ClusterId, ClusterName, MaxConnectedClusters, RemoteScope, Resource};
    use kvstore::{KvWrite, MemoryBackend, WatchStore, WatchStoreConfig};

    use super::{ClusterEntry, ClusterStores, ServiceSource};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_skips_dotfiles_certificates_and_directories() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("c2"), "endpoints: []").unwrap();
        std::fs::write(tmp.path().join(".hidden"), "x").unwrap();
        for companion in [
            "c2.etcd-client.crt",
            "c2.etcd-client.key",
            "c2.etcd-client-ca.crt",
        ] {
            std::fs::write(tmp.path().join(companion), "-----BEGIN").unwrap();
        }
        std::fs::create_dir(tmp.path().join("..data")).unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        let files = scan(tmp.path()).unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["c2"]);
    }

    /// Hands out one in-memory backend, as an etcd connection would.
    struct Memory(Arc<kvstore::MemoryBackend>);

    impl Connector for Memory {
        fn connect<'a>(
            &'a self,
            _cluster: &'a str,
            _source: &'a EtcdSource,
        ) -> BoxFuture<'a, Result<Arc<dyn ListWatch>, ClusterError>> {
            let backend: Arc<dyn ListWatch> = self.0.clone();
            Box::pin(async move { Ok(backend) })
        }
    }

    /// A real cluster task over the in-memory backend: its stores' endpoint
    /// and node events are queued for the reconciler by record, `Synced`
    /// asks for a full pass, and identity records queue nothing.
    #[tokio::test]
    async fn store_events_are_queued_for_the_reconciler() {
        use kvstore::KvWrite as _;
        let backend = Arc::new(kvstore::MemoryBackend::new());
        let name: ClusterName = "c2".parse().unwrap();
        let max = api::MaxConnectedClusters::Max255;
        let id = api::ClusterId::new(2, max).unwrap();
        let mut config = api::ClusterConfig::new(id, max, false);
        config.capabilities.synced_canaries = false;
        kvstore::write_cluster_config(backend.as_ref(), &name, &config, None)
            .await
            .unwrap();
        let ctx = memory_context(&backend);
        let task = ctx.spawn_cluster("c2".into(), EtcdSource::Endpoints(Vec::new()), false);
        let deadline = Duration::from_secs(10);
        let stores = testkit::wait_for(deadline, "c2's stores synced", || async {
            ctx.mesh
                .snapshot()
                .get("c2")
                .and_then(|e| e.current.clone())
                .filter(|s| s.synced().all())
        })
        .await;
        testkit::eventually!(deadline, "a full pass asked for by Synced", {
            stores.changes.take().full
        });

        let mut node = Node::new("m1", name.clone(), id);
        node.set_address(api::AddressType::InternalIp, "192.168.2.2".parse().unwrap());
        let ep = IpcacheEntry::new(
            "10.2.1.9".parse().unwrap(),
            api::NumericIdentity(131_372),
            Some("192.168.2.2".parse().unwrap()),
        );
        backend
            .put(
                "cilium/state/identities/v1/id/131372",
                b"k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c2;",
                None,
            )
            .await
            .unwrap();
        backend
            .put(&node.key(), &node.encode(), None)
            .await
            .unwrap();
        backend.put(&ep.key(), &ep.encode(), None).await.unwrap();
        backend.delete(&ep.key()).await.unwrap();
        let seen = Mutex::new(Vec::new());
        testkit::eventually!(deadline, "one node and two endpoint changes", {
            let mut seen = seen.lock().unwrap();
            seen.extend(stores.changes.take().changes);
            seen.len() >= 3
        });
        let mut seen = seen.into_inner().unwrap();
        seen.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            seen,
            [
                Change::Endpoint(ep.ip),
                Change::Endpoint(ep.ip),
                Change::Node("m1".into())
            ]
        );
        assert_eq!(stores.identities.len(), 1, "the identity was read");
        task.abort();
    }

    fn memory_context(backend: &Arc<kvstore::MemoryBackend>) -> Context {
        Context {
            mesh: Arc::default(),
            hub: Arc::default(),
            connector: Arc::new(Memory(backend.clone())),
            local_name: "c1".into(),
            local_id: 1,
            max_connected: 255,
            backoff: (Duration::from_millis(10), Duration::from_millis(100)),
            cluster_config_wait: kvstore::CLUSTER_CONFIG_WAIT,
        }
    }

    fn status_of(ctx: &Context, cluster: &str) -> ClusterStatus {
        ctx.hub
            .clusters()
            .into_iter()
            .find(|c| c.name == cluster)
            .unwrap_or_default()
    }

    /// An etcd with `cilium/.has-cluster-config` but no config yet: the task
    /// says it waits, and connects as soon as the config is written.
    #[tokio::test]
    async fn a_promised_cluster_config_is_waited_for() {
        use kvstore::KvWrite as _;
        let backend = Arc::new(kvstore::MemoryBackend::new());
        backend
            .put(api::keys::HAS_CLUSTER_CONFIG_KEY, b"true", None)
            .await
            .unwrap();
        let ctx = memory_context(&backend);
        let task = ctx.spawn_cluster("c2".into(), EtcdSource::Endpoints(Vec::new()), false);
        let deadline = Duration::from_secs(10);
        testkit::eventually!(deadline, "the status to say it waits for the config", {
            status_of(&ctx, "c2")
                .status
                .contains("waiting for cilium/cluster-config/c2")
        });
        assert_eq!(
            status_of(&ctx, "c2").num_failures,
            0,
            "waiting is no failure"
        );
        let max = api::MaxConnectedClusters::Max255;
        let mut config = api::ClusterConfig::new(api::ClusterId::new(2, max).unwrap(), max, false);
        config.capabilities.synced_canaries = false;
        kvstore::write_cluster_config(backend.as_ref(), &"c2".parse().unwrap(), &config, None)
            .await
            .unwrap();
        testkit::eventually!(deadline, "c2 connected and synced", {
            status_of(&ctx, "c2").ready
        });
        task.abort();
    }

    /// A cluster config with `"cached":true` and `endpointslices-only`: the
    /// stores read `cilium/cache/...` (a record in the state layout is not
    /// seen), and the global services come from the EndpointSlice records.
    #[tokio::test]
    async fn a_kvstoremesh_cache_in_endpointslices_mode_is_read_there() {
        use api::records::endpoint_slice::{SliceAddressType, SliceEndpoint, SlicePort};
        use kvstore::KvWrite as _;
        let backend = Arc::new(kvstore::MemoryBackend::new());
        let name: ClusterName = "c2".parse().unwrap();
        let max = api::MaxConnectedClusters::Max255;
        let id = api::ClusterId::new(2, max).unwrap();
        let mut config = api::ClusterConfig::new(id, max, false);
        config.capabilities.cached = true;
        config.capabilities.endpoint_slices_export_mode =
            api::EndpointSlicesExportMode::EndpointSlicesOnly;
        kvstore::write_cluster_config(backend.as_ref(), &name, &config, None)
            .await
            .unwrap();
        for kind in ["nodes", "ip", "identities", "endpointslices"] {
            let canary = format!("cilium/synced/c2/cilium/cache/{kind}/v1");
            backend
                .put(&canary, b"2026-12-04T00:00:00Z", None)
                .await
                .unwrap();
        }
        let mut node = Node::new("m1", name.clone(), id);
        node.set_address(api::AddressType::InternalIp, "192.168.2.2".parse().unwrap());
        backend
            .put("cilium/cache/nodes/v1/c2/m1", &node.encode(), None)
            .await
            .unwrap();
        let mut stray = Node::new("m2", name.clone(), id);
        stray.set_address(api::AddressType::InternalIp, "192.168.2.3".parse().unwrap());
        backend
            .put(&stray.key(), &stray.encode(), None)
            .await
            .unwrap();
        let slice = ClusterEndpointSlice {
            cluster: name.clone(),
            cluster_id: id,
            namespace: "default".into(),
            name: "web-abcde".into(),
            labels: [("kubernetes.io/service-name".to_owned(), "web".to_owned())].into(),
            annotations: BTreeMap::new(),
            address_type: SliceAddressType::Ipv4,
            endpoints: vec![SliceEndpoint {
                addresses: vec!["10.2.1.7".parse().unwrap()],
                ..SliceEndpoint::default()
            }],
            ports: vec![SlicePort {
                name: Some("http".into()),
                protocol: None,
                port: Some(8080),
            }],
        };
        backend
            .put(
                "cilium/cache/endpointslices/v1/c2/default/web-abcde",
                &slice.encode(),
                None,
            )
            .await
            .unwrap();
        let ctx = memory_context(&backend);
        let task = ctx.spawn_cluster("c2".into(), EtcdSource::Endpoints(Vec::new()), false);
        let deadline = Duration::from_secs(10);
        let stores = testkit::wait_for(deadline, "c2's stores synced", || async {
            ctx.mesh
                .snapshot()
                .get("c2")
                .and_then(|e| e.current.clone())
                .filter(|s| s.synced().all())
        })
        .await;
        let nodes: Vec<String> = stores.nodes.list().iter().map(|n| n.name.clone()).collect();
        assert_eq!(nodes, ["m1"], "only the cache layout is read");
        let exports = stores.services.exports(&stores.scope);
        assert_eq!(exports.len(), 1);
        assert_eq!(
            (exports[0].namespace.as_str(), exports[0].name.as_str()),
            ("default", "web")
        );
        let port = exports[0].backends[&"10.2.1.7".parse::<IpAddr>().unwrap()]["http"];
        assert_eq!((port.protocol, port.port), (api::L4Protocol::Tcp, 8080));
        testkit::eventually!(deadline, "the status to name the cache and the mode", {
            let s = status_of(&ctx, "c2");
            s.kvstoremesh && s.endpoint_slices_export_mode == "endpointslices-only"
        });
        task.abort();
    }

    #[test]
    fn a_full_queue_asks_for_a_full_pass_instead() {
        let changes = Changes::default();
        for i in 0..Changes::MAX_PENDING {
            changes.push(Change::Node(i.to_string()));
        }
        changes.push(Change::Node("one too many".into()));
        let pending = changes.take();
        assert!(pending.full);
        assert!(pending.changes.is_empty());
        assert_eq!(changes.take(), Pending::default());
    }

    #[test]
    fn claims_refuse_a_second_owner_and_release_on_drop() {
        let mesh = Mesh::default();
        let a = mesh.claim("c2", 2).unwrap();
        assert_eq!(mesh.claim("c3", 2).err().as_deref(), Some("c2"));
        drop(a);
        assert!(mesh.claim("c3", 2).is_ok());
    }
}
