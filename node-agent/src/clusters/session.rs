//! One task per cluster: connect, read the cluster config, claim the name
//! and ID, run the stores, probe; on failure back off and reconnect.

use std::{sync::Arc, time::Duration};

use api::agent::ClusterStatus;
use api::{
    ClusterConfig, ClusterEndpointSlice, ClusterId, ClusterName, ClusterService, IdentityRecord,
    IpcacheEntry, MaxConnectedClusters, Node, RemoteScope, Resource,
};
use kvstore::retry::Backoff;
use kvstore::{Event, ListWatch, WatchStore, WatchStoreConfig};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn, Instrument};

use super::{
    Change, Changes, ClusterError, ClusterStores, Connector, EtcdSource, Mesh, ServiceSource,
};
use crate::status::StatusHub;

/// How often a connected cluster is probed (heartbeat key, cluster config).
const PROBE_PERIOD: Duration = Duration::from_secs(5);

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
    pub local_name: ClusterName,
    /// The local cluster's ID.
    pub local_id: ClusterId,
    /// 255 or 511.
    pub max_connected: MaxConnectedClusters,
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

impl Context {
    pub(super) fn set_status(&self, cluster: &str, f: impl FnOnce(&mut ClusterStatus)) {
        self.hub.update_cluster(cluster, f);
    }

    fn failure(&self, cluster: &str, error: &ClusterError) {
        let text = kvstore::error_chain(error);
        warn!(cluster, error = %text, "cluster connection failed");
        self.set_status(cluster, |s| {
            s.connected = false;
            s.ready = false;
            s.num_failures += 1;
            s.last_failure = Some(api::Timestamp::now().to_string());
            s.status = text;
        });
    }

    /// Starts the task of `cluster` reading from `source`.
    pub fn spawn_cluster(
        &self,
        cluster: ClusterName,
        source: EtcdSource,
        local: bool,
    ) -> JoinHandle<()> {
        let ctx = self.clone();
        let span = tracing::info_span!("remote_cluster", cluster = %cluster, local);
        self.set_status(cluster.as_str(), |s| s.status = "connecting".to_owned());
        self.mesh.update(&cluster, |e| e.local = local);
        tokio::spawn(async move { ctx.run_cluster(cluster, source, local).await }.instrument(span))
    }

    async fn run_cluster(self, cluster: ClusterName, source: EtcdSource, local: bool) {
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1);
        loop {
            let mut connected = false;
            let error = self.session(&cluster, &source, local, &mut connected).await;
            if connected {
                backoff.reset();
            }
            self.mesh
                .update(&cluster, |e| e.refused = error.is_refusal());
            self.failure(cluster.as_str(), &error);
            backoff.wait().await;
        }
    }

    /// One connection: returns why it ended.
    async fn session(
        &self,
        name: &ClusterName,
        source: &EtcdSource,
        local: bool,
        connected: &mut bool,
    ) -> ClusterError {
        let cluster = name.as_str();
        let (backend, allowed_pod_cidrs, allowed_node_cidrs) =
            match self.connector.connect(cluster, source).await {
                Ok(c) => (c.backend, c.allowed_pod_cidrs, c.allowed_node_cidrs),
                Err(e) => return e,
            };
        let waiting = || {
            self.set_status(cluster, |s| {
                s.status = format!(
                    "waiting for {} (cilium/.has-cluster-config is set)",
                    ClusterConfig::key(name)
                );
            });
        };
        let config = match kvstore::read_required_cluster_config(
            backend.as_ref(),
            name,
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
        let id = config.id;
        let mode = config.capabilities.max_connected_clusters;
        if mode != self.max_connected {
            return ClusterError::ModeMismatch {
                cluster: cluster.to_owned(),
                configured: self.max_connected.max_cluster_id(),
                found: mode.max_cluster_id(),
            };
        }
        if local && id != self.local_id {
            return ClusterError::LocalIdMismatch {
                cluster: cluster.to_owned(),
                configured: self.local_id.get(),
                found: id.get(),
            };
        }
        if !local && id == self.local_id {
            return ClusterError::DuplicateId {
                cluster: cluster.to_owned(),
                id: id.get(),
                owner: self.local_name.to_string(),
            };
        }
        let _claim = match self.mesh.claim(name, id) {
            Ok(guard) => guard,
            Err(owner) => {
                return ClusterError::DuplicateId {
                    cluster: cluster.to_owned(),
                    id: id.get(),
                    owner: owner.to_string(),
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
            local,
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
            allowed_pod_cidrs,
            allowed_node_cidrs,
        });
        self.mesh.update(name, |e| {
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
            id = id.get(),
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
                self.mesh.update(name, |e| e.previous = None);
            }
            was_ready = ready;
            match kvstore::read_cluster_config(backend.as_ref(), name).await {
                Ok(c) if c.id != id => {
                    return ClusterError::IdChanged {
                        cluster: cluster.to_owned(),
                        old: id.get(),
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
    /// incremental passes (and wake the service reconciler, which judges
    /// remote backends against them), service changes wake the service
    /// reconciler, and a store's `Synced` asks both for a full pass.
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
        let local = streams.local;
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
                            // Remote endpoints are judged as service backends
                            // too, and nodes decide what a cluster owns.
                            let services = !local || matches!(change, Change::Node(_));
                            changes.push(change);
                            if services {
                                mesh.notify();
                            } else {
                                mesh.notify_reconciler();
                            }
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
    /// The connection is to this node's own cluster.
    local: bool,
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::IpAddr, sync::Mutex};

    use futures::future::BoxFuture;

    use super::*;
    use crate::clusters::Connection;

    /// Hands out one in-memory backend, as an etcd connection would.
    struct Memory(Arc<kvstore::MemoryBackend>);

    impl Connector for Memory {
        fn connect<'a>(
            &'a self,
            _cluster: &'a str,
            _source: &'a EtcdSource,
        ) -> BoxFuture<'a, Result<Connection, ClusterError>> {
            let backend: Arc<dyn ListWatch> = self.0.clone();
            Box::pin(async move {
                Ok(Connection {
                    backend,
                    allowed_pod_cidrs: Vec::new(),
                    allowed_node_cidrs: Vec::new(),
                })
            })
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
        let id = put_c2_config(&backend, |_| {}).await;
        let ctx = memory_context(&backend);
        let (task, stores) = spawn_synced_c2(&ctx).await;
        let deadline = DEADLINE;
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
            local_name: "c1".parse().unwrap(),
            local_id: ClusterId::new(1, MaxConnectedClusters::Max255).unwrap(),
            max_connected: MaxConnectedClusters::Max255,
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

    const DEADLINE: Duration = Duration::from_secs(10);

    /// c2's ID and its cluster config (no canaries unless `tweak` says so).
    async fn put_c2_config(
        backend: &kvstore::MemoryBackend,
        tweak: impl FnOnce(&mut api::ClusterConfig),
    ) -> ClusterId {
        use kvstore::KvWrite as _;
        let max = MaxConnectedClusters::Max255;
        let id = ClusterId::new(2, max).unwrap();
        let mut config = api::ClusterConfig::new(id, max, false);
        config.capabilities.synced_canaries = false;
        tweak(&mut config);
        backend
            .put(
                &ClusterConfig::key(&"c2".parse().unwrap()),
                &config.encode(),
                None,
            )
            .await
            .unwrap();
        id
    }

    /// Starts c2's task and waits until its stores are synced.
    async fn spawn_synced_c2(ctx: &Context) -> (JoinHandle<()>, Arc<ClusterStores>) {
        let task = ctx.spawn_cluster(
            "c2".parse().unwrap(),
            EtcdSource::Endpoints(Vec::new()),
            false,
        );
        let stores = testkit::wait_for(DEADLINE, "c2's stores synced", || async {
            ctx.mesh
                .snapshot()
                .get("c2")
                .and_then(|e| e.current.clone())
                .filter(|s| s.synced().all())
        })
        .await;
        (task, stores)
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
        let task = ctx.spawn_cluster(
            "c2".parse().unwrap(),
            EtcdSource::Endpoints(Vec::new()),
            false,
        );
        let deadline = DEADLINE;
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
        put_c2_config(&backend, |_| {}).await;
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
        let id = put_c2_config(&backend, |config| {
            config.capabilities.synced_canaries = true;
            config.capabilities.cached = true;
            config.capabilities.endpoint_slices_export_mode =
                api::EndpointSlicesExportMode::EndpointSlicesOnly;
        })
        .await;
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
        let (task, stores) = spawn_synced_c2(&ctx).await;
        let deadline = DEADLINE;
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
}
