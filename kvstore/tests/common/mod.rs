//! Shared setup of the kvstore integration tests: a real etcd, typed
//! ipcache records, a writer and a reader, and an event recorder.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{
    ClusterId, ClusterName, IpcacheEntry, MaxConnectedClusters, NumericIdentity, RemoteScope,
    Resource,
};
use kvstore::{
    EtcdBackend, EtcdConfig, Event, Events, ListWatch, SyncStore, SyncStoreConfig, TlsPaths,
    WatchStore, WatchStoreConfig,
};
use testkit::{EtcdOptions, EtcdServer};

pub(crate) const MAX: MaxConnectedClusters = MaxConnectedClusters::Max255;
pub(crate) const CLUSTER_ID: u16 = 3;

pub(crate) fn cluster() -> ClusterName {
    ClusterName::new("c1").unwrap()
}

pub(crate) fn scope() -> RemoteScope {
    RemoteScope::new(cluster(), ClusterId::new(CLUSTER_ID, MAX).unwrap(), MAX)
}

/// Record `i` with local identity `local` (256..).
pub(crate) fn entry(i: u32, local: u16) -> IpcacheEntry {
    let ip = IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i));
    let id =
        NumericIdentity::from_parts(ClusterId::new(CLUSTER_ID, MAX).unwrap(), local, MAX).unwrap();
    let mut e = IpcacheEntry::new(ip, id, Some(IpAddr::V4(Ipv4Addr::new(192, 168, 3, 1))));
    e.k8s_namespace = "default".into();
    e.k8s_pod_name = format!("pod-{i}");
    e
}

/// Logs to the test's output when `RUST_LOG` is set.
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub(crate) async fn backend(endpoint: &str) -> EtcdBackend {
    init_tracing();
    let mut config = EtcdConfig::from_endpoints([endpoint], &TlsPaths::default()).unwrap();
    config.request_timeout = Duration::from_secs(3);
    kvstore::connect(&config)
        .await
        .expect("connect to the test etcd")
}

/// A plain-text etcd and a client of it, or `None` (after the skip message)
/// when the `etcd` binary is missing.
pub(crate) async fn etcd() -> Option<(EtcdServer, EtcdBackend)> {
    let server = EtcdServer::start_or_skip(EtcdOptions::default()).await?;
    let backend = backend(&server.endpoint()).await;
    Some((server, backend))
}

pub(crate) fn writer(backend: &EtcdBackend, config: SyncStoreConfig) -> SyncStore<IpcacheEntry> {
    SyncStore::start(Arc::new(backend.clone()), &cluster(), config)
}

pub(crate) fn reader<R: Resource>(backend: &EtcdBackend) -> (WatchStore<R>, Events<R>) {
    let config = WatchStoreConfig {
        wait_for_canary: true,
        retry_max: Duration::from_millis(500),
        ..WatchStoreConfig::default()
    };
    WatchStore::spawn(Arc::new(backend.clone()), scope(), config)
}

/// Every event a reader emitted, recorded by a background task.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    pub upserts: usize,
    pub deleted: HashSet<String>,
    pub delete_events: usize,
    pub synced: usize,
}

pub(crate) fn record<R: Resource>(mut events: Events<R>) -> Arc<Mutex<Recorded>> {
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let r = recorded.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let mut r = r.lock().unwrap();
            match ev {
                Event::Upsert(_) => r.upserts += 1,
                Event::Delete(rec) => {
                    r.delete_events += 1;
                    r.deleted.insert(rec.key());
                }
                Event::Synced => r.synced += 1,
            }
        }
    });
    recorded
}

/// A reader of ipcache records and the recorder of its events.
pub(crate) fn recorded_reader(
    backend: &EtcdBackend,
) -> (WatchStore<IpcacheEntry>, Arc<Mutex<Recorded>>) {
    let (r, events) = reader::<IpcacheEntry>(backend);
    (r, record(events))
}

/// Records `0..n`, all with local identity 300, by index.
pub(crate) fn records(n: u32) -> HashMap<u32, IpcacheEntry> {
    (0..n).map(|i| (i, entry(i, 300))).collect()
}

/// The initial export of `truth` through `w`: every record, then the synced
/// mark, then waits (at most `deadline`) until the writer has written it all.
pub(crate) async fn export(
    w: &SyncStore<IpcacheEntry>,
    truth: &HashMap<u32, IpcacheEntry>,
    deadline: Duration,
) {
    for e in truth.values() {
        w.upsert(e);
    }
    w.synced();
    idle(w, deadline).await;
}

pub(crate) fn expected(entries: &HashMap<u32, IpcacheEntry>) -> BTreeMap<String, IpcacheEntry> {
    entries.values().map(|e| (e.key(), e.clone())).collect()
}

/// Waits until the reader holds exactly `want` (keys and values).
pub(crate) async fn converged(
    r: &WatchStore<IpcacheEntry>,
    want: &BTreeMap<String, IpcacheEntry>,
    deadline: Duration,
) {
    let what = format!(
        "the reader to hold exactly the writer's {} records",
        want.len()
    );
    testkit::wait_until(deadline, &what, || {
        let ok = r.len() == want.len()
            && want
                .iter()
                .all(|(k, v)| r.get(k).is_some_and(|held| *held == *v));
        async move { ok }
    })
    .await;
}

/// What etcd holds under the ipcache prefix, decoded.
pub(crate) async fn etcd_records(backend: &EtcdBackend) -> BTreeMap<String, IpcacheEntry> {
    let listing = backend
        .list(&IpcacheEntry::prefix(&cluster()))
        .await
        .expect("list etcd");
    listing
        .kvs
        .iter()
        .map(|kv| {
            let e = IpcacheEntry::decode(&kv.key, &kv.value, &scope()).expect("valid record");
            (kv.key.clone(), e)
        })
        .collect()
}

pub(crate) async fn idle(w: &SyncStore<IpcacheEntry>, deadline: Duration) {
    tokio::time::timeout(deadline, w.wait_idle())
        .await
        .unwrap_or_else(|_| {
            panic!("timed out after {deadline:?} waiting for the writer to write everything")
        });
}
