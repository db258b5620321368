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
use crate::{
    model::{EndpointSpec, Labels, NodeSpec, ObjectKey, ServicePort, ServiceSpec, TargetPort},
    registry::{Listing, Owner, RegistryError},
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
            protocol: crate::model::Protocol::Tcp,
            port: 80,
            target: TargetPort::Number(8080),
        }],
        selector: [("app".to_owned(), "web".to_owned())].into(),
        labels: Labels::new(),
        global: true,
        shared: true,
        affinity: crate::model::Affinity::None,
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
