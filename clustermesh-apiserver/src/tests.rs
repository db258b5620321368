//! The registry driven through [`LocalSource`] by a source that is not gRPC,
//! on the in-memory kvstore backend: the shape of the Kubernetes source
//! (list every kind, `retain` what was listed, then declare synced), and the
//! export holding back its sync canaries and its deletion of adopted keys
//! until the source is synced.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use api::keys;
use kvstore::{MemoryBackend, SyncStoreConfig};
use tokio::sync::oneshot;

use super::*;
use crate::registry::{Listing, Owner, RegistryError};
use mesh_proto::model::{
    EndpointSpec, Labels, NodeSpec, ObjectKey, ServicePort, ServiceSpec, TargetPort,
};

const DEADLINE: Duration = Duration::from_secs(10);

/// Lists once as the source-wide owner, like a reflector per kind going
/// through `Init`, `InitApply`… and `InitDone`, then waits for `gate` (other
/// reflectors still listing) before declaring the source synced.
struct ListingSource {
    nodes: Vec<NodeSpec>,
    endpoints: Vec<EndpointSpec>,
    services: Vec<ServiceSpec>,
    listed: oneshot::Sender<()>,
    gate: oneshot::Receiver<()>,
}

impl LocalSource for ListingSource {
    type Error = RegistryError;

    async fn run(
        self,
        registry: Registry,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), RegistryError> {
        let owner = Owner::Source;
        let names = self.nodes.iter().map(|n| n.name.clone()).collect();
        for node in self.nodes {
            registry.upsert_node(&owner, node).await?;
        }
        registry.retain(&owner, &Listing::Nodes(names)).await?;
        let keys = self.endpoints.iter().map(EndpointSpec::key).collect();
        for endpoint in self.endpoints {
            let upserted = registry.upsert_endpoint(&owner, endpoint).await?;
            assert!(upserted.conflicts.is_empty());
        }
        registry.retain(&owner, &Listing::Endpoints(keys)).await?;
        let keys = self.services.iter().map(ServiceSpec::key).collect();
        for service in self.services {
            registry.upsert_service(&owner, service).await?;
        }
        registry.retain(&owner, &Listing::Services(keys)).await?;
        let _ = self.listed.send(());
        let _ = self.gate.await;
        registry.synced().await;
        shutdown.await;
        Ok(())
    }
}

fn node(name: &str, cidr: &str) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        internal_ips: vec!["192.168.1.1".parse().unwrap()],
        cilium_internal_ips: vec![],
        pod_cidrs: vec![cidr.parse().unwrap()],
        wireguard_public_key: String::new(),
        labels: Labels::new(),
    }
}

fn endpoint() -> EndpointSpec {
    EndpointSpec {
        namespace: "default".into(),
        name: "web-1".into(),
        uid: String::new(),
        service_account: "default".into(),
        ips: vec!["10.1.1.5".parse().unwrap()],
        labels: [("app".to_owned(), "web".to_owned())].into(),
        named_ports: vec![],
        node: "n1".into(),
    }
}

fn service() -> ServiceSpec {
    ServiceSpec {
        namespace: "default".into(),
        name: "web".into(),
        frontend_ips: vec!["10.96.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: mesh_proto::model::Protocol::Tcp,
            port: 80,
            target: TargetPort::Number(8080),
        }],
        selector: [("app".to_owned(), "web".to_owned())].into(),
        labels: Labels::new(),
        global: true,
        shared: true,
        affinity: mesh_proto::model::Affinity::None,
        backends: None,
    }
}

fn config() -> Config {
    let etcd = kvstore::EtcdConfig::from_endpoints(
        ["http://127.0.0.1:2379".to_owned()],
        &kvstore::TlsPaths::default(),
    )
    .unwrap();
    Config::new(
        "c1".parse().unwrap(),
        api::ClusterId::new(3, api::MaxConnectedClusters::Max255).unwrap(),
        etcd,
    )
}

fn canaries(memory: &MemoryBackend) -> Vec<String> {
    memory
        .dump()
        .into_keys()
        .filter(|k| k.starts_with("cilium/synced/"))
        .collect()
}

#[tokio::test]
async fn export_waits_for_the_source_to_be_synced() {
    let memory = MemoryBackend::new();
    let cluster: api::ClusterName = "c1".parse().unwrap();
    // A previous apiserver exported a node that no longer exists, and
    // persisted another one the source will not list again.
    let gone = keys::node_key(&cluster, "gone");
    memory.seed(&gone, b"{}");
    let old = node("old", "10.9.0.0/24");
    let old_persisted = format!("{}nodes/old", persist::prefix("c1"));
    memory.seed(&old_persisted, &serde_json::to_vec(&old).unwrap());

    let backend: Arc<dyn kvstore::Backend> = Arc::new(memory.clone());
    let registry = Registry::open(
        backend.clone(),
        Arc::new(memory.clone()),
        &config(),
        &SyncStoreConfig::default(),
    )
    .await
    .unwrap();
    assert!(registry.read().await.node("old").is_some(), "restored");

    let (listed_tx, listed) = oneshot::channel();
    let (gate, gate_rx) = oneshot::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let source = ListingSource {
        nodes: vec![node("n1", "10.1.1.0/24")],
        endpoints: vec![endpoint()],
        services: vec![service()],
        listed: listed_tx,
        gate: gate_rx,
    };
    let background = Background {
        backend,
        heartbeat_interval: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(5),
    };
    let task = tokio::spawn(background.drive(registry.clone(), source, None, async {
        let _ = stopped.await;
    }));

    tokio::time::timeout(DEADLINE, listed)
        .await
        .expect("the source to apply its listing")
        .expect("the source to report its listing");
    tokio::time::timeout(DEADLINE, registry.exporter().wait_idle())
        .await
        .expect("the export to write the listing");
    let dump = memory.dump();
    for key in [
        keys::node_key(&cluster, "n1"),
        keys::ip_key("10.1.1.5".parse().unwrap()),
        keys::service_key(&cluster, "default", "web"),
    ] {
        assert!(dump.contains_key(&key), "{key} exported before synced");
    }
    assert!(
        !dump.contains_key(&keys::node_key(&cluster, "old")),
        "retain removed the restored node the listing lacks"
    );
    assert!(!dump.contains_key(&old_persisted));
    assert!(
        dump.contains_key(&gone),
        "an adopted key nobody claimed stays until the source is synced"
    );
    assert_eq!(
        canaries(&memory),
        Vec::<String>::new(),
        "no canary before synced"
    );
    assert!(!registry.is_synced());
    assert!(!registry.counters().ready.load(Ordering::Relaxed));

    gate.send(()).unwrap();
    testkit::wait_until(
        DEADLINE,
        "the apiserver to be ready after the source synced",
        || {
            let ready = registry.counters().ready.load(Ordering::Relaxed);
            async move { ready }
        },
    )
    .await;
    let expected: BTreeSet<String> = [
        keys::NODES_BASE_PREFIX,
        keys::IP_BASE_PREFIX,
        keys::SERVICES_BASE_PREFIX,
        keys::IDENTITIES_BASE_PREFIX,
    ]
    .iter()
    .map(|prefix| keys::sync_canary_key(&cluster, prefix))
    .collect();
    assert_eq!(
        canaries(&memory).into_iter().collect::<BTreeSet<_>>(),
        expected
    );
    assert!(
        !memory.dump().contains_key(&gone),
        "stale key swept after synced"
    );
    assert_eq!(
        registry
            .read()
            .await
            .endpoint(&ObjectKey::new("default", "web-1"))
            .map(|e| e.identity),
        Some(3 << 16 | 256)
    );

    stop.send(()).unwrap();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the source to stop on shutdown")
        .unwrap()
        .unwrap();
}

/// How [`GatedRegistry`] treats puts of persisted endpoints.
#[derive(Debug, Clone)]
enum EndpointPuts {
    Pass,
    /// Hold the put until this key is in etcd: it only succeeds when the
    /// export does not wait for the persist.
    AfterExported(String),
    Refuse,
}

/// The in-memory backend with control over the registry's endpoint writes
/// (`mesh/registry/v1/c1/endpoints/...`); everything else passes through.
#[derive(Clone)]
struct GatedRegistry {
    memory: MemoryBackend,
    puts: Arc<std::sync::Mutex<EndpointPuts>>,
    /// Refuse every delete of a persisted registry record.
    refuse_deletes: Arc<std::sync::atomic::AtomicBool>,
}

impl GatedRegistry {
    fn set(&self, puts: EndpointPuts) {
        *self.puts.lock().unwrap() = puts;
    }
}

#[async_trait::async_trait]
impl kvstore::ListWatch for GatedRegistry {
    async fn list(&self, prefix: &str) -> Result<kvstore::Listing, kvstore::BackendError> {
        self.memory.list(prefix).await
    }

    async fn watch(
        &self,
        prefix: &str,
        from: kvstore::Revision,
    ) -> Result<kvstore::WatchStream, kvstore::BackendError> {
        self.memory.watch(prefix, from).await
    }
}

#[async_trait::async_trait]
impl kvstore::KvWrite for GatedRegistry {
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<kvstore::LeaseId>,
    ) -> Result<kvstore::Revision, kvstore::BackendError> {
        if key.starts_with(&format!("{}endpoints/", persist::prefix("c1"))) {
            let puts = self.puts.lock().unwrap().clone();
            match puts {
                EndpointPuts::Pass => {}
                EndpointPuts::Refuse => return Err(kvstore::BackendError::Unavailable),
                EndpointPuts::AfterExported(exported) => {
                    let memory = self.memory.clone();
                    let seen = tokio::time::timeout(DEADLINE, async move {
                        while !memory.dump().contains_key(&exported) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    })
                    .await;
                    if seen.is_err() {
                        return Err(kvstore::BackendError::Unavailable);
                    }
                }
            }
        }
        self.memory.put(key, value, lease).await
    }

    async fn delete(&self, key: &str) -> Result<bool, kvstore::BackendError> {
        if key.starts_with(&persist::prefix("c1"))
            && self
                .refuse_deletes
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(kvstore::BackendError::Unavailable);
        }
        self.memory.delete(key).await
    }
}

#[async_trait::async_trait]
impl kvstore::Leases for GatedRegistry {
    async fn grant(&self, ttl: Duration) -> Result<kvstore::LeaseId, kvstore::BackendError> {
        self.memory.grant(ttl).await
    }

    async fn keep_alive(&self, lease: kvstore::LeaseId) -> Result<Duration, kvstore::BackendError> {
        self.memory.keep_alive(lease).await
    }

    async fn revoke(&self, lease: kvstore::LeaseId) -> Result<(), kvstore::BackendError> {
        self.memory.revoke(lease).await
    }
}

#[async_trait::async_trait]
impl kvstore::Transactions for GatedRegistry {
    async fn txn(&self, txn: &kvstore::Txn) -> Result<kvstore::TxnOutcome, kvstore::BackendError> {
        self.memory.txn(txn).await
    }
}

fn endpoint_with(name: &str, ips: &[&str], app: &str) -> EndpointSpec {
    EndpointSpec {
        name: name.into(),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        ..endpoint()
    }
}

fn exported_identity(memory: &MemoryBackend, ip: &str) -> Option<u32> {
    let value = memory.dump().remove(&keys::ip_key(ip.parse().unwrap()))?;
    let entry: api::IpcacheEntry = serde_json::from_slice(&value).unwrap();
    Some(entry.id.0)
}

/// A registry whose own persistence goes through a [`GatedRegistry`], and
/// whose export writes straight to the memory backend.
async fn gated_registry() -> (MemoryBackend, GatedRegistry, Registry) {
    let memory = MemoryBackend::new();
    let gated = GatedRegistry {
        memory: memory.clone(),
        puts: Arc::new(std::sync::Mutex::new(EndpointPuts::Pass)),
        refuse_deletes: Arc::default(),
    };
    let registry = Registry::open(
        Arc::new(gated.clone()),
        Arc::new(memory.clone()),
        &config(),
        &SyncStoreConfig::default(),
    )
    .await
    .unwrap();
    (memory, gated, registry)
}

#[tokio::test]
async fn endpoint_export_does_not_wait_for_the_persist_and_is_undone_when_it_fails() {
    let (memory, gated, registry) = gated_registry().await;
    let owner = Owner::Source;
    let mut dual_stack = node("n1", "10.1.1.0/24");
    dual_stack.pod_cidrs.push("fd00:1::/64".parse().unwrap());
    registry.upsert_node(&owner, dual_stack).await.unwrap();
    registry.synced().await;

    // The persist of web-1 completes only once its ipcache key is exported.
    gated.set(EndpointPuts::AfterExported(keys::ip_key(
        "10.1.1.5".parse().unwrap(),
    )));
    let web = registry
        .upsert_endpoint(&owner, endpoint_with("web-1", &["10.1.1.5"], "web"))
        .await
        .expect("the export to write the ipcache key while the entry is persisted")
        .identity;
    let persisted_key = format!("{}endpoints/default/web-1", persist::prefix("c1"));
    let persisted = memory.dump()[&persisted_key].clone();

    // A relabel that also claims a second IP, and a new endpoint, both
    // refused by the registry's persistence: the export goes back to what
    // the registry holds.
    gated.set(EndpointPuts::Refuse);
    let relabel = registry
        .upsert_endpoint(
            &owner,
            endpoint_with("web-1", &["10.1.1.5", "fd00:1::6"], "db"),
        )
        .await;
    assert!(
        matches!(relabel, Err(RegistryError::Persist(_))),
        "{relabel:?}"
    );
    let new = registry
        .upsert_endpoint(&owner, endpoint_with("web-2", &["10.1.1.7"], "db"))
        .await;
    assert!(matches!(new, Err(RegistryError::Persist(_))), "{new:?}");
    tokio::time::timeout(DEADLINE, registry.exporter().wait_idle())
        .await
        .expect("the export to settle");
    assert_eq!(exported_identity(&memory, "10.1.1.5"), Some(web));
    assert_eq!(exported_identity(&memory, "fd00:1::6"), None);
    assert_eq!(exported_identity(&memory, "10.1.1.7"), None);
    assert_eq!(memory.dump()[&persisted_key], persisted);
    {
        let table = registry.read().await;
        let entry = table.endpoint(&ObjectKey::new("default", "web-1")).unwrap();
        assert_eq!(entry.spec, endpoint_with("web-1", &["10.1.1.5"], "web"));
        assert_eq!(entry.identity, web);
        assert!(table
            .endpoint(&ObjectKey::new("default", "web-2"))
            .is_none());
        assert!(table.ip_view("fd00:1::6".parse().unwrap()).is_none());
    }

    // Once etcd takes writes again, the relabel goes through.
    gated.set(EndpointPuts::Pass);
    let db = registry
        .upsert_endpoint(
            &owner,
            endpoint_with("web-1", &["10.1.1.5", "fd00:1::6"], "db"),
        )
        .await
        .unwrap()
        .identity;
    assert_ne!(db, web);
    tokio::time::timeout(DEADLINE, registry.exporter().wait_idle())
        .await
        .expect("the export to settle");
    assert_eq!(exported_identity(&memory, "10.1.1.5"), Some(db));
    assert_eq!(exported_identity(&memory, "fd00:1::6"), Some(db));
}

/// A delete that etcd refuses changes nothing: the record stays in the
/// table, in the persisted state and in the export, so what the apiserver
/// serves never differs from what it would restore after a restart.
#[tokio::test]
async fn a_refused_delete_leaves_the_record_registered_and_exported() {
    use std::sync::atomic::Ordering::Relaxed;
    let (memory, gated, registry) = gated_registry().await;
    let owner = Owner::Source;
    registry
        .upsert_node(&owner, node("n1", "10.1.1.0/24"))
        .await
        .unwrap();
    let web = registry
        .upsert_endpoint(&owner, endpoint_with("web-1", &["10.1.1.5"], "web"))
        .await
        .unwrap()
        .identity;
    registry.upsert_service(&owner, service()).await.unwrap();
    registry.synced().await;

    gated.refuse_deletes.store(true, Relaxed);
    let key = ObjectKey::new("default", "web-1");
    let refused = [
        registry.delete_endpoint(&owner, &key).await.map(|_| ()),
        registry.delete_node(&owner, "n1").await.map(|_| ()),
        registry
            .delete_service(&owner, &ObjectKey::new("default", "web"))
            .await
            .map(|_| ()),
    ];
    for result in refused {
        assert!(
            matches!(result, Err(RegistryError::Persist(_))),
            "{result:?}"
        );
    }
    tokio::time::timeout(DEADLINE, registry.exporter().wait_idle())
        .await
        .expect("the export to settle");
    assert_eq!(exported_identity(&memory, "10.1.1.5"), Some(web));
    {
        let table = registry.read().await;
        assert!(table.endpoint(&key).is_some(), "the endpoint is kept");
        assert!(table.node("n1").is_some(), "the node is kept");
        assert_eq!(table.services().count(), 1, "the service is kept");
    }

    gated.refuse_deletes.store(false, Relaxed);
    assert!(registry.delete_node(&owner, "n1").await.unwrap());
    tokio::time::timeout(DEADLINE, registry.exporter().wait_idle())
        .await
        .expect("the export to settle");
    assert_eq!(exported_identity(&memory, "10.1.1.5"), None);
    let table = registry.read().await;
    assert!(table.endpoint(&key).is_none());
    assert!(table.node("n1").is_none());
}

#[tokio::test]
async fn the_read_only_api_serves_reads_and_refuses_every_write() {
    use mesh_proto::v1::{self as pb, registry_client::RegistryClient};

    let memory = MemoryBackend::new();
    let backend: Arc<dyn kvstore::Backend> = Arc::new(memory.clone());
    let registry = Registry::open(
        backend,
        Arc::new(memory),
        &config(),
        &SyncStoreConfig::default(),
    )
    .await
    .unwrap();
    registry
        .upsert_node(&Owner::Source, node("n1", "10.1.1.0/24"))
        .await
        .unwrap();
    let grpc = Standalone::bind_read_only("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = grpc.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(grpc.run(registry.clone(), async {
        let _ = stopped.await;
    }));
    let mut client = testkit::wait_for(DEADLINE, "the read-only API to accept", || async move {
        RegistryClient::connect(format!("http://{addr}")).await.ok()
    })
    .await;

    let nodes = client.list_nodes(pb::ListNodesRequest {}).await.unwrap();
    assert_eq!(nodes.into_inner().nodes.len(), 1, "reads are served");
    let refused = [
        client
            .open_session(pb::OpenSessionRequest {
                node_name: "n1".into(),
            })
            .await
            .err(),
        client
            .upsert_service(pb::UpsertServiceRequest { service: None })
            .await
            .err(),
        client
            .delete_service(pb::DeleteServiceRequest {
                namespace: "default".into(),
                name: "web".into(),
            })
            .await
            .err(),
    ];
    for status in refused {
        let status = status.expect("a write is refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    }
    assert!(!registry.is_synced(), "a read-only API does not say synced");
    assert_eq!(
        registry.read().await.nodes().count(),
        1,
        "restored nodes get no session timer"
    );
    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the API to stop")
        .unwrap()
        .unwrap();
}
