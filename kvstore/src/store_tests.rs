//! Unit tests of the stores' logic on the in-memory backend, on a paused
//! clock. Behaviour against real etcd is covered by `tests/`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use api::{
    ClusterId, ClusterName, IpcacheEntry, MaxConnectedClusters, NumericIdentity, RemoteScope,
    Resource,
};

use crate::{
    Event, Events, MemoryBackend, SyncStore, SyncStoreConfig, WatchStore, WatchStoreConfig,
};

const MAX: MaxConnectedClusters = MaxConnectedClusters::Max255;

fn cluster() -> ClusterName {
    ClusterName::new("c1").unwrap()
}

fn scope() -> RemoteScope {
    RemoteScope::new(cluster(), ClusterId::new(3, MAX).unwrap(), MAX)
}

fn entry(i: u32, local: u16) -> IpcacheEntry {
    let ip = IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i));
    let id = NumericIdentity::from_parts(ClusterId::new(3, MAX).unwrap(), local, MAX).unwrap();
    IpcacheEntry::new(ip, id, Some(IpAddr::V4(Ipv4Addr::new(192, 168, 3, 1))))
}

fn config() -> SyncStoreConfig {
    SyncStoreConfig {
        lease_ttl: Duration::from_secs(30),
        concurrency: 4,
        ..SyncStoreConfig::default()
    }
}

fn writer(m: &MemoryBackend, config: SyncStoreConfig) -> SyncStore<IpcacheEntry> {
    SyncStore::start(Arc::new(m.clone()), &cluster(), config)
}

fn reader(m: &MemoryBackend) -> (WatchStore<IpcacheEntry>, Events<IpcacheEntry>) {
    let config = WatchStoreConfig {
        wait_for_canary: true,
        ..WatchStoreConfig::default()
    };
    WatchStore::spawn(Arc::new(m.clone()), scope(), config)
}

fn records(m: &MemoryBackend) -> BTreeMap<String, Vec<u8>> {
    let prefix = IpcacheEntry::prefix(&cluster());
    m.dump()
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .collect()
}

fn expected(entries: &[IpcacheEntry]) -> BTreeMap<String, Vec<u8>> {
    entries.iter().map(|e| (e.key(), e.encode())).collect()
}

/// The initial export of records `0..n` (local identity 300) through `w`:
/// every record, the synced mark, then waits until all are written.
async fn export(w: &SyncStore<IpcacheEntry>, n: u32) -> Vec<IpcacheEntry> {
    let entries: Vec<IpcacheEntry> = (0..n).map(|i| entry(i, 300)).collect();
    for e in &entries {
        w.upsert(e);
    }
    w.synced();
    idle(w).await;
    entries
}

async fn idle(w: &SyncStore<IpcacheEntry>) {
    tokio::time::timeout(Duration::from_secs(60), w.wait_idle())
        .await
        .expect("the writer becomes idle within 60s");
}

async fn converged(r: &WatchStore<IpcacheEntry>, want: &BTreeMap<String, Vec<u8>>) {
    let keys: std::collections::HashSet<String> = want.keys().cloned().collect();
    testkit::wait_until(
        Duration::from_secs(60),
        "the reader to hold exactly the writer's keys",
        || {
            let held = r.keys();
            let ok = held == keys;
            async move { ok }
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn coalesces_skips_unchanged_and_writes_canary_last() {
    let m = MemoryBackend::new();
    let (r, mut events) = reader(&m);
    let w = writer(&m, config());
    let mut entries: Vec<IpcacheEntry> = (0..50).map(|i| entry(i, 300)).collect();
    for e in &entries {
        w.upsert(e);
    }
    // Rapid changes to one key: only some writes reach the store.
    for local in 301..400 {
        entries[0] = entry(0, local);
        w.upsert(&entries[0]);
    }
    w.upsert(&entries[1]); // unchanged
    w.delete(&entries[49]);
    entries.pop();
    w.synced();
    idle(&w).await;

    assert_eq!(records(&m), expected(&entries));
    let canary = m
        .dump()
        .get(w.canary_key())
        .cloned()
        .expect("canary written");
    assert!(std::str::from_utf8(&canary)
        .unwrap()
        .parse::<api::Timestamp>()
        .is_ok());
    let stats = w.stats();
    assert!(
        stats.puts.load(Ordering::Relaxed) < 50 + 99,
        "coalesced: {stats:?}"
    );
    assert!(stats.skipped_unchanged.load(Ordering::Relaxed) >= 1);
    assert_eq!(stats.canaries.load(Ordering::Relaxed), 1);

    r.wait_until_synced().await;
    converged(&r, &expected(&entries)).await;
    // Synced comes after the listing, and only once the canary exists.
    let mut saw_synced = false;
    while let Ok(ev) = events.try_recv() {
        if ev == Event::Synced {
            assert!(!saw_synced, "Synced is sent once");
            saw_synced = true;
        }
    }
    assert!(saw_synced);
    assert_eq!(*r.get(&entries[0].key()).unwrap(), entries[0]);
}

#[tokio::test(start_paused = true)]
async fn caps_keys_per_lease() {
    let m = MemoryBackend::new();
    let w = writer(
        &m,
        SyncStoreConfig {
            max_keys_per_lease: 10,
            ..config()
        },
    );
    for i in 0..35 {
        w.upsert(&entry(i, 300));
    }
    idle(&w).await;
    assert_eq!(w.leases().len(), 4, "35 keys at 10 per lease");
    assert_eq!(m.leases().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn rewrites_everything_after_etcd_comes_back_empty() {
    let m = MemoryBackend::new();
    let (r, _events) = reader(&m);
    let w = writer(&m, config());
    let entries = export(&w, 40).await;
    r.wait_until_synced().await;

    m.wipe();
    assert!(m.dump().is_empty());
    // The next keep-alive finds the lease gone; everything goes back.
    testkit::wait_until(
        Duration::from_secs(60),
        "the writer to restore its keys and canary",
        || {
            let ok = records(&m) == expected(&entries) && m.dump().contains_key(w.canary_key());
            async move { ok }
        },
    )
    .await;
    assert!(w.stats().leases_lost.load(Ordering::Relaxed) >= 1);
    assert_eq!(w.stats().canaries.load(Ordering::Relaxed), 2);
    converged(&r, &expected(&entries)).await;
}

#[tokio::test(start_paused = true)]
async fn restarted_writer_adopts_and_deletes_stale_only_after_synced() {
    let m = MemoryBackend::new();
    let first = writer(&m, config());
    let entries = export(&first, 20).await;
    first.stop();

    let second = writer(&m, config());
    // The successor knows 19 of the 20, one of them changed.
    let mut now = entries[..19].to_vec();
    now[0] = entry(0, 301);
    for e in &now {
        second.upsert(e);
    }
    idle(&second).await;
    assert!(
        m.dump().contains_key(&entries[19].key()),
        "a stale key stays until the initial sync is complete"
    );
    assert_eq!(
        second.stats().puts.load(Ordering::Relaxed),
        1,
        "only the changed record is written"
    );
    second.synced();
    idle(&second).await;
    assert_eq!(records(&m), expected(&now));
    assert_eq!(second.stats().deletes.load(Ordering::Relaxed), 1);
    assert_eq!(second.stats().adopted.load(Ordering::Relaxed), 20);

    // The adopted lease is kept alive: nothing expires past the TTL.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(records(&m), expected(&now));
}

#[tokio::test(start_paused = true)]
async fn dead_writer_keys_expire_and_reader_reports_deletes() {
    let m = MemoryBackend::new();
    let (r, mut events) = reader(&m);
    let w = writer(&m, config());
    let entries = export(&w, 10).await;
    converged(&r, &expected(&entries)).await;
    drop(w);
    // Paused clock: advance past the lease TTL so the dead writer's keys expire.
    tokio::time::sleep(Duration::from_secs(31)).await;
    converged(&r, &BTreeMap::new()).await;
    let mut deletes = 0;
    while let Ok(ev) = events.try_recv() {
        if matches!(ev, Event::Delete(_)) {
            deletes += 1;
        }
    }
    assert_eq!(deletes, 10);
}

#[tokio::test(start_paused = true)]
async fn reader_relists_after_outage_and_sweeps_only_what_is_gone() {
    let m = MemoryBackend::new();
    for i in 0..10 {
        let e = entry(i, 300);
        m.seed(&e.key(), &e.encode());
    }
    let (r, mut events) = WatchStore::<IpcacheEntry>::spawn(
        Arc::new(m.clone()),
        scope(),
        WatchStoreConfig::default(),
    );
    r.wait_until_synced().await;
    assert_eq!(r.len(), 10);
    while events.try_recv().is_ok() {}

    m.set_available(false);
    // While the reader is away: one key deleted, one changed, history compacted.
    m.seed(&entry(1, 300).key(), &entry(1, 301).encode());
    m.set_available(true);
    m.unseed(&entry(0, 300).key());
    m.compact(m.revision());
    let mut want = expected(
        &(1..10)
            .map(|i| entry(i, if i == 1 { 301 } else { 300 }))
            .collect::<Vec<_>>(),
    );
    want.remove(&entry(0, 300).key());
    converged(&r, &want).await;
    assert_eq!(*r.get(&entry(1, 300).key()).unwrap(), entry(1, 301));
    let mut deleted = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let Event::Delete(e) = ev {
            deleted.push(e.key());
        }
    }
    assert_eq!(
        deleted,
        [entry(0, 300).key()],
        "only the missing key is reported deleted"
    );
    assert!(r.stats().restarts.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(start_paused = true)]
async fn rejects_and_counts_invalid_records() {
    let m = MemoryBackend::new();
    let good = entry(1, 300);
    m.seed(&good.key(), &good.encode());
    m.seed("cilium/state/ip/v1/default/10.9.9.9", b"{not json");
    m.seed("cilium/state/ip/v1/default/not-an-ip", &good.encode());
    m.seed(&entry(2, 300).key(), &good.encode()); // key/value mismatch
    let (r, _events) = WatchStore::<IpcacheEntry>::spawn(
        Arc::new(m.clone()),
        scope(),
        WatchStoreConfig::default(),
    );
    r.wait_until_synced().await;
    assert_eq!(r.len(), 1);
    assert_eq!(r.stats().rejected.load(Ordering::Relaxed), 3);
    assert_eq!(r.stats().rejected_by_reason().values().sum::<u64>(), 3);

    // A held record whose value turns invalid is deleted.
    m.seed(&good.key(), b"[]");
    testkit::wait_until(
        Duration::from_secs(5),
        "the invalidated record to go",
        || {
            let ok = r.is_empty();
            async move { ok }
        },
    )
    .await;
}

/// With `cached`, a reader takes the KVStoreMesh layout: records under
/// `cilium/cache/ip/v1/<cluster>/`, `Synced` only after the cache's canary,
/// and nothing from the cluster's own state prefix.
#[tokio::test(start_paused = true)]
async fn a_cached_reader_reads_the_cache_layout_and_its_canary() {
    use crate::KvWrite as _;
    let m = MemoryBackend::new();
    let config = WatchStoreConfig {
        wait_for_canary: true,
        cached: true,
        ..WatchStoreConfig::default()
    };
    let (r, mut events) = WatchStore::<IpcacheEntry>::spawn(Arc::new(m.clone()), scope(), config);
    let cached = entry(1, 300);
    let state = entry(2, 300);
    let cache_key = format!("cilium/cache/ip/v1/c1/{}", cached.ip);
    m.put(&cache_key, &cached.encode(), None).await.unwrap();
    m.put(&state.key(), &state.encode(), None).await.unwrap();
    // The state layout's canary does not count for a cached reader.
    m.put("cilium/synced/c1/cilium/state/ip/v1", b"t", None)
        .await
        .unwrap();
    assert!(matches!(events.recv().await, Some(Event::Upsert(e)) if *e == cached));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!r.is_synced(), "synced before the cache's canary");
    m.put("cilium/synced/c1/cilium/cache/ip/v1", b"t", None)
        .await
        .unwrap();
    assert_eq!(events.recv().await, Some(Event::Synced));
    assert_eq!(r.keys(), [cache_key].into());
}

async fn converge_to(m: &MemoryBackend, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    testkit::wait_until(Duration::from_secs(60), what, || {
        let ok = records(m) == *want;
        async move { ok }
    })
    .await;
}

/// Another writer changes, deletes and adds keys under the prefix: each is
/// undone and counted. The store's own churn is not.
#[tokio::test(start_paused = true)]
async fn the_guard_undoes_and_counts_what_another_writer_does() {
    use crate::KvWrite as _;
    let m = MemoryBackend::new();
    let w = writer(&m, config());
    let mut entries = export(&w, 10).await;
    for local in 301..320 {
        entries[0] = entry(0, local);
        w.upsert(&entries[0]);
    }
    w.delete(&entries[9]);
    entries.pop();
    idle(&w).await;
    let stats = w.stats();
    let counts = || {
        (
            stats.tampered_restored.load(Ordering::Relaxed),
            stats.foreign_removed.load(Ordering::Relaxed),
        )
    };
    assert_eq!(counts(), (0, 0), "the store's own writes");

    m.put(&entries[1].key(), &entry(1, 999).encode(), None)
        .await
        .unwrap();
    m.delete(&entries[2].key()).await.unwrap();
    let foreign = entry(77, 300);
    m.put(&foreign.key(), &foreign.encode(), None)
        .await
        .unwrap();
    converge_to(
        &m,
        &expected(&entries),
        "the guard to undo the other writer",
    )
    .await;
    idle(&w).await;
    assert_eq!(counts(), (2, 1));
    // Written back on the store's lease: they vanish with the writer.
    drop(w);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(records(&m).is_empty(), "{:?}", records(&m).keys());
}

/// A key another writer puts before the caller's initial state is complete
/// may still be claimed: it is deleted only if nobody has by `synced`.
#[tokio::test(start_paused = true)]
async fn a_foreign_key_before_synced_waits_for_a_claim() {
    use crate::KvWrite as _;
    let m = MemoryBackend::new();
    let w = writer(&m, config());
    let mut entries: Vec<IpcacheEntry> = (0..3).map(|i| entry(i, 300)).collect();
    for e in &entries {
        w.upsert(e);
    }
    idle(&w).await;
    let (claimed, stray) = (entry(5, 300), entry(6, 300));
    m.put(&claimed.key(), &entry(5, 999).encode(), None)
        .await
        .unwrap();
    m.put(&stray.key(), &stray.encode(), None).await.unwrap();
    // Let the guard see both before the caller goes on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(records(&m).contains_key(&stray.key()), "kept before synced");
    w.upsert(&claimed);
    entries.push(claimed);
    w.synced();
    idle(&w).await;
    converge_to(&m, &expected(&entries), "the stray key to go").await;
    assert_eq!(w.stats().foreign_removed.load(Ordering::Relaxed), 0);
    assert_eq!(w.stats().deletes.load(Ordering::Relaxed), 1);
}

/// Keys that vanish with their lease (etcd came back empty) are recovered
/// by the lease logic and are not tampering.
#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_not_tampering() {
    let m = MemoryBackend::new();
    let w = writer(&m, config());
    let entries = export(&w, 10).await;
    m.wipe();
    converge_to(&m, &expected(&entries), "the writer to restore its keys").await;
    assert_eq!(w.stats().tampered_restored.load(Ordering::Relaxed), 0);
}
