//! SyncStore → etcd → WatchStore against a real etcd: round trip, crash
//! and restart, data loss, a dead writer, a reader away during compaction.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use api::{IpcacheEntry, Resource};
use common::*;
use kvstore::{BackendError, KvWrite, ListWatch, SyncStoreConfig};
use testkit::TcpProxy;

const LONG: Duration = Duration::from_secs(90);

fn fast_config() -> SyncStoreConfig {
    SyncStoreConfig {
        lease_ttl: Duration::from_secs(30),
        keepalive_interval: Some(Duration::from_millis(500)),
        retry_max: Duration::from_millis(500),
        ..SyncStoreConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_10000_records_with_updates_and_deletes() {
    let Some((_etcd, backend)) = etcd().await else {
        return;
    };
    let (r, recorded) = recorded_reader(&backend);
    let w = writer(&backend, fast_config());

    let mut truth = records(10_000);
    export(&w, &truth, LONG).await;
    r.wait_until_synced().await;
    testkit::wait_until(LONG, "the Synced event", || {
        let n = recorded.lock().unwrap().synced;
        async move { n == 1 }
    })
    .await;

    // Updates (some of them several times) and deletes.
    for round in 0..3u16 {
        for i in (0..10_000).step_by(5) {
            let e = entry(i, 400 + round);
            w.upsert(&e);
            truth.insert(i, e);
        }
    }
    for i in (1..10_000).step_by(7) {
        w.delete(&truth.remove(&i).unwrap());
    }
    idle(&w, LONG).await;

    let want = expected(&truth);
    assert_eq!(
        etcd_records(&backend).await,
        want,
        "etcd holds exactly the writer's set"
    );
    converged(&r, &want, LONG).await;
    let rec = recorded.lock().unwrap();
    assert_eq!(rec.deleted.len(), 10_000 - truth.len());
    assert!(rec.deleted.iter().all(|k| !want.contains_key(k)));
    assert!(
        w.stats().coalesced.load(Ordering::Relaxed) > 0
            || w.stats().puts.load(Ordering::Relaxed) < 16_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_sigkilled_and_restarted_mid_churn() {
    let Some((mut etcd, backend)) = etcd().await else {
        return;
    };
    let (r, recorded) = recorded_reader(&backend);
    let w = writer(&backend, fast_config());

    // 0..2000 live throughout; 2000..3000 get deleted during the churn.
    let mut truth = records(3000);
    export(&w, &truth, LONG).await;
    r.wait_until_synced().await;

    for step in 0..20u16 {
        for i in (u32::from(step)..2000).step_by(20) {
            let e = entry(i, 500 + step);
            w.upsert(&e);
            truth.insert(i, e);
        }
        for i in (2000 + u32::from(step) * 50)..(2000 + u32::from(step + 1) * 50) {
            w.delete(&truth.remove(&i).unwrap());
        }
        if step == 8 {
            etcd.kill();
        }
        if step == 12 {
            etcd.restart().await;
        }
        // Pace the churn so steps 8..12 land while etcd is down.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    idle(&w, LONG).await;
    let want = expected(&truth);
    converged(&r, &want, LONG).await;
    assert_eq!(etcd_records(&backend).await, want);
    let rec = recorded.lock().unwrap();
    let live_deleted: Vec<&String> = rec
        .deleted
        .iter()
        .filter(|k| want.contains_key(*k))
        .collect();
    assert!(
        live_deleted.is_empty(),
        "records live before and after the outage were reported deleted: {live_deleted:?}"
    );
    assert_eq!(
        rec.deleted.len(),
        1000,
        "exactly the deleted records are reported deleted"
    );
    assert!(
        r.stats().restarts.load(Ordering::Relaxed) >= 1,
        "the reader noticed the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_empty_writer_recreates_everything() {
    let Some((mut etcd, backend)) = etcd().await else {
        return;
    };
    let (r, recorded) = recorded_reader(&backend);
    let w = writer(&backend, fast_config());
    let truth = records(2000);
    export(&w, &truth, LONG).await;
    let want = expected(&truth);
    converged(&r, &want, LONG).await;

    etcd.restart_empty().await;
    testkit::wait_until(LONG, "the writer to notice its lease is gone", || {
        let lost = w.stats().leases_lost.load(Ordering::Relaxed);
        async move { lost > 0 }
    })
    .await;
    idle(&w, LONG).await;
    assert_eq!(etcd_records(&backend).await, want, "everything re-created");
    let canary = backend.get(w.canary_key()).await.unwrap();
    assert!(canary.is_some(), "the canary is written again");
    converged(&r, &want, LONG).await;
    // Each lost lease is noticed on its own, so the canary may go more than
    // once more; at least once after the data loss.
    assert!(w.stats().canaries.load(Ordering::Relaxed) >= 2);
    assert_eq!(recorded.lock().unwrap().synced, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_writer_lease_expires_and_reader_reports_deletes() {
    let Some((_etcd, backend)) = etcd().await else {
        return;
    };
    let (r, recorded) = recorded_reader(&backend);
    let w = writer(
        &backend,
        SyncStoreConfig {
            lease_ttl: Duration::from_secs(2),
            ..fast_config()
        },
    );
    let truth = records(300);
    export(&w, &truth, LONG).await;
    converged(&r, &expected(&truth), LONG).await;

    w.stop(); // the process dies: nobody renews the lease
    converged(&r, &expected(&HashMap::new()), Duration::from_secs(30)).await;
    assert!(
        etcd_records(&backend).await.is_empty(),
        "the keys vanished from etcd"
    );
    let rec = recorded.lock().unwrap();
    assert_eq!(rec.deleted.len(), 300, "every record reported deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_away_during_compaction_lists_again_and_converges() {
    let Some((etcd, backend)) = etcd().await else {
        return;
    };
    let proxy = TcpProxy::start(etcd.client_addr()).await;
    let away = common::backend(&proxy.http_endpoint()).await;
    let (r, recorded) = recorded_reader(&away);
    let w = writer(&backend, fast_config());
    let mut truth = records(1000);
    export(&w, &truth, LONG).await;
    converged(&r, &expected(&truth), LONG).await;
    let before = backend.list("cilium/").await.unwrap().revision;

    proxy.cut();
    for i in 0..500 {
        let e = entry(i, 600);
        w.upsert(&e);
        truth.insert(i, e);
    }
    for i in 900..1000 {
        w.delete(&truth.remove(&i).unwrap());
    }
    idle(&w, LONG).await;
    let now = backend.list("cilium/").await.unwrap().revision;
    compact(&etcd.endpoint(), now).await;
    // The history the reader would need is gone.
    let mut stale = backend.watch("cilium/", before + 1).await.unwrap();
    let first = futures::StreamExt::next(&mut stale).await;
    assert!(
        matches!(first, Some(Err(BackendError::Compacted { .. }))),
        "a watch from a compacted revision fails: {first:?}"
    );

    proxy.restore();
    let want = expected(&truth);
    converged(&r, &want, LONG).await;
    assert!(r.stats().restarts.load(Ordering::Relaxed) >= 1);
    let rec = recorded.lock().unwrap();
    assert!(
        rec.deleted.iter().all(|k| !want.contains_key(k)),
        "no live record reported deleted"
    );
    assert_eq!(rec.deleted.len(), 100);
}

async fn compact(endpoint: &str, revision: i64) {
    let mut client = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    client
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("compact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_writer_adopts_without_flapping() {
    let Some((_etcd, backend)) = etcd().await else {
        return;
    };
    let (r, recorded) = recorded_reader(&backend);
    let truth = records(500);
    let first = writer(&backend, fast_config());
    export(&first, &truth, LONG).await;
    converged(&r, &expected(&truth), LONG).await;
    let rev = backend.list("cilium/").await.unwrap().revision;
    first.stop();

    let second = writer(&backend, fast_config());
    export(&second, &truth, LONG).await;
    assert_eq!(
        second.stats().puts.load(Ordering::Relaxed),
        0,
        "nothing unchanged is rewritten"
    );
    let listing = backend
        .list(&IpcacheEntry::prefix(&cluster()))
        .await
        .unwrap();
    assert!(listing.kvs.iter().all(|kv| kv.mod_revision <= rev));
    assert!(recorded.lock().unwrap().deleted.is_empty());
    assert_eq!(r.len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_config_round_trip() {
    let Some((_etcd, backend)) = etcd().await else {
        return;
    };
    let err = kvstore::read_cluster_config(&backend, &cluster())
        .await
        .unwrap_err();
    assert!(
        matches!(err, kvstore::ClusterConfigError::NotFound { .. }),
        "{err}"
    );
    let config = api::ClusterConfig::new(api::ClusterId::new(CLUSTER_ID, MAX).unwrap(), MAX, false);
    backend
        .put(&api::ClusterConfig::key(&cluster()), &config.encode(), None)
        .await
        .unwrap();
    let read = kvstore::read_cluster_config(&backend, &cluster())
        .await
        .unwrap();
    assert_eq!(read, config);
    backend
        .put(&api::ClusterConfig::key(&cluster()), b"{\"id\":0}", None)
        .await
        .unwrap();
    let err = kvstore::read_cluster_config(&backend, &cluster())
        .await
        .unwrap_err();
    assert!(
        matches!(err, kvstore::ClusterConfigError::Invalid { .. }),
        "{err}"
    );
}
