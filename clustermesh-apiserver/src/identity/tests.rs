//! Allocator tests on the in-memory kvstore backend (etcd's transaction and
//! lease semantics) with a paused clock. `tests/identity_ha.rs` runs the
//! multi-apiserver cases against a real etcd.

use std::collections::BTreeMap;

use kvstore::{Leases as _, ListWatch as _, MemoryBackend, Transactions as _};

use kvstore::{Compare, Txn, TxnOp};

use super::*;

const CLUSTER: &str = "c1";
const RANGE: RangeInclusive<u32> = (3 << 16 | 256)..=(3 << 16 | 0xffff);
const GRACE: Duration = Duration::from_secs(10);
const LEASE_TTL: Duration = Duration::from_secs(30);
const FIRST: u32 = 3 << 16 | 256;

fn config(instance: &str, range: RangeInclusive<u32>) -> AllocatorConfig {
    AllocatorConfig {
        cluster: CLUSTER.to_owned(),
        range,
        grace: GRACE,
        lease_ttl: LEASE_TTL,
        instance: instance.to_owned(),
    }
}

async fn allocator(m: &MemoryBackend, instance: &str) -> Allocator {
    Allocator::load(Arc::new(m.clone()), config(instance, RANGE))
        .await
        .unwrap()
}

/// The users of `id`: the instance names.
fn users(m: &MemoryBackend, id: u32) -> Vec<String> {
    let prefix = format!("{}{id}/", users_prefix(CLUSTER));
    m.dump()
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

fn index(m: &MemoryBackend) -> BTreeMap<String, String> {
    let prefix = index_prefix(CLUSTER);
    m.dump()
        .into_iter()
        .filter_map(|(k, v)| {
            let labels = k.strip_prefix(&prefix)?.to_owned();
            Some((labels, String::from_utf8(v).unwrap()))
        })
        .collect()
}

fn ids(m: &MemoryBackend) -> BTreeMap<u32, String> {
    m.dump()
        .into_iter()
        .filter_map(|(k, v)| {
            let id = api::keys::parse_identity_key(&k).ok()?.id.0;
            Some((id, String::from_utf8(v).unwrap()))
        })
        .collect()
}

/// Observe, wait out the grace period, collect: what one collector releases.
async fn collect_after_grace(a: &Allocator) -> usize {
    a.collect_garbage().await.unwrap();
    tokio::time::advance(GRACE).await;
    a.collect_garbage().await.unwrap()
}

#[test]
fn label_string_is_sorted_with_cluster_and_namespace() {
    let labels: Labels = [("app".to_owned(), "web".to_owned())].into();
    assert_eq!(
        label_string(&labels, "default", &"c1".parse().unwrap()).unwrap(),
        "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;"
    );
    // A pod label cannot pass for the namespace or the cluster label.
    let spoofed: Labels = [("io.cilium.k8s.policy.cluster".to_owned(), "c2".to_owned())].into();
    assert_eq!(
        label_string(&spoofed, "default", &"c1".parse().unwrap()).unwrap(),
        "k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;"
    );
}

#[tokio::test(start_paused = true)]
async fn same_labels_same_number_and_release_after_grace() {
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    let web = a.acquire("k8s:app=web;").await.unwrap();
    assert_eq!(web, FIRST);
    assert_eq!(a.acquire("k8s:app=web;").await.unwrap(), web);
    let db = a.acquire("k8s:app=db;").await.unwrap();
    assert_ne!(db, web);
    assert_eq!(users(&m, web), ["a"], "one user key per apiserver");
    assert_eq!(
        index(&m),
        BTreeMap::from([
            ("k8s:app=db;".to_owned(), db.to_string()),
            ("k8s:app=web;".to_owned(), web.to_string())
        ])
    );
    a.release("k8s:app=web;").await;
    assert_eq!(users(&m, web), ["a"], "one of two endpoints still uses it");
    a.release("k8s:app=web;").await;
    assert!(users(&m, web).is_empty());
    assert_eq!(a.collect_garbage().await.unwrap(), 0);
    tokio::time::advance(GRACE / 2).await;
    assert_eq!(a.collect_garbage().await.unwrap(), 0);
    // Used again within the grace period: kept, same number.
    assert_eq!(a.acquire("k8s:app=web;").await.unwrap(), web);
    a.release("k8s:app=web;").await;
    // The grace period starts again from that release.
    tokio::time::advance(GRACE / 2).await;
    assert_eq!(a.collect_garbage().await.unwrap(), 0);
    assert_eq!(collect_after_grace(&a).await, 1);
    assert_eq!(ids(&m), BTreeMap::from([(db, "k8s:app=db;".to_owned())]));
    assert_eq!(index(&m).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn two_allocators_never_share_a_number() {
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    let b = allocator(&m, "b").await;
    let x = a.acquire("k8s:app=x;").await.unwrap();
    // b does not know x's number yet: its first candidate is taken.
    let y = b.acquire("k8s:app=y;").await.unwrap();
    assert_ne!(x, y);
    // The same labels through the other allocator get the same number.
    assert_eq!(b.acquire("k8s:app=x;").await.unwrap(), x);
    assert_eq!(users(&m, x), ["a", "b"]);
    assert_eq!(ids(&m).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn identity_survives_while_another_apiserver_uses_it() {
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    let b = allocator(&m, "b").await;
    let l = a.acquire("k8s:app=l;").await.unwrap();
    assert_eq!(b.acquire("k8s:app=l;").await.unwrap(), l);
    a.release("k8s:app=l;").await;
    for _ in 0..3 {
        assert_eq!(collect_after_grace(&a).await, 0);
        assert_eq!(b.collect_garbage().await.unwrap(), 0);
    }
    assert_eq!(ids(&m).get(&l).map(String::as_str), Some("k8s:app=l;"));
    assert_eq!(users(&m, l), ["b"]);
    b.release("k8s:app=l;").await;
    // Either collector releases it, once.
    assert_eq!(collect_after_grace(&a).await, 1);
    assert_eq!(b.collect_garbage().await.unwrap(), 0);
    assert!(ids(&m).is_empty());
    assert!(index(&m).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_user_arriving_after_the_listing_stops_the_release() {
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    let l = a.acquire("k8s:app=l;").await.unwrap();
    a.release("k8s:app=l;").await;
    a.collect_garbage().await.unwrap();
    tokio::time::advance(GRACE).await;
    // Another apiserver's user key appears between a's listing and its
    // transaction: simulated by seeding it, then running the same release
    // transaction the collector builds.
    m.seed(&format!("{}{l}/b", users_prefix(CLUSTER)), b"");
    let id_rev = m.get(&id_key(l)).await.unwrap().unwrap().mod_revision;
    let index_key = format!("{}k8s:app=l;", index_prefix(CLUSTER));
    let index_rev = m.get(&index_key).await.unwrap().unwrap().mod_revision;
    let release = Txn::new()
        .when([
            Compare::mod_revision(id_key(l), id_rev),
            Compare::mod_revision(&index_key, index_rev),
            Compare::no_key_with_prefix(format!("{}{l}/", users_prefix(CLUSTER))),
        ])
        .and_then([TxnOp::delete(id_key(l)), TxnOp::delete(&index_key)]);
    assert!(!m.txn(&release).await.unwrap().succeeded);
    assert_eq!(a.collect_garbage().await.unwrap(), 0);
    assert!(ids(&m).contains_key(&l));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_apiservers_users_expire_with_its_lease() {
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    let b = allocator(&m, "b").await;
    let l = b.acquire("k8s:app=l;").await.unwrap();
    drop(b); // no shutdown, no keep-alive: a crash
    assert_eq!(collect_after_grace(&a).await, 0, "b's lease is still alive");
    // a keeps its own lease alive while b's expires.
    for _ in 0..4 {
        tokio::time::advance(LEASE_TTL / 3).await;
        a.keep_alive().await.unwrap();
    }
    assert!(users(&m, l).is_empty());
    assert_eq!(collect_after_grace(&a).await, 1);
    assert!(ids(&m).is_empty());
}

#[tokio::test(start_paused = true)]
async fn restart_adopts_and_releases_the_unadopted() {
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    let web = a.acquire("k8s:app=web;").await.unwrap();
    let old = a.acquire("k8s:app=old;").await.unwrap();
    a.shut_down().await.unwrap();
    assert!(users(&m, web).is_empty(), "shutdown revokes the user keys");
    let b = allocator(&m, "b").await;
    assert!(b.adopt("k8s:app=web;", web).await.unwrap());
    assert!(b.adopt("k8s:app=web;", web).await.unwrap());
    assert!(!b.adopt("k8s:app=web;", old).await.unwrap());
    assert!(!b.adopt("k8s:app=gone;", old).await.unwrap());
    assert_eq!(users(&m, web), ["b"]);
    assert_eq!(collect_after_grace(&b).await, 1);
    assert_eq!(b.acquire("k8s:app=web;").await.unwrap(), web);
    assert_eq!(ids(&m), BTreeMap::from([(web, "k8s:app=web;".to_owned())]));
}

#[tokio::test(start_paused = true)]
async fn exhausted_range_is_an_error_until_a_number_is_released() {
    let m = MemoryBackend::new();
    let a = Allocator::load(Arc::new(m.clone()), config("a", 256..=257))
        .await
        .unwrap();
    a.acquire("a").await.unwrap();
    let b = a.acquire("b").await.unwrap();
    assert!(matches!(
        a.acquire("c").await,
        Err(IdentityError::Exhausted { .. })
    ));
    a.release("b").await;
    assert_eq!(collect_after_grace(&a).await, 1);
    assert_eq!(a.acquire("c").await.unwrap(), b);
}

#[tokio::test(start_paused = true)]
async fn orphans_of_the_old_three_step_allocation_are_repaired_deterministically() {
    let m = MemoryBackend::new();
    let n = |local: u32| 3 << 16 | local;
    let idx = |labels: &str| format!("{}{labels}", index_prefix(CLUSTER));
    // An id key without an index entry.
    m.seed(&id_key(n(256)), b"k8s:app=a;");
    // An index entry without an id key.
    m.seed(&idx("k8s:app=b;"), n(300).to_string().as_bytes());
    // Two id keys of one label set, no index: the lowest number wins.
    m.seed(&id_key(n(260)), b"k8s:app=c;");
    m.seed(&id_key(n(258)), b"k8s:app=c;");
    // An index naming an id key that holds other labels.
    m.seed(&id_key(n(262)), b"k8s:app=e;");
    m.seed(&id_key(n(264)), b"k8s:app=d;");
    m.seed(&idx("k8s:app=d;"), n(262).to_string().as_bytes());
    // An unparsable index value.
    m.seed(&id_key(n(266)), b"k8s:app=f;");
    m.seed(&idx("k8s:app=f;"), b"garbage");
    // A consistent pair is left alone.
    m.seed(&id_key(n(268)), b"k8s:app=g;");
    m.seed(&idx("k8s:app=g;"), n(268).to_string().as_bytes());

    let a = allocator(&m, "a").await;
    let want: BTreeMap<String, String> = [
        ("k8s:app=a;", n(256)),
        ("k8s:app=c;", n(258)),
        ("k8s:app=d;", n(264)),
        ("k8s:app=e;", n(262)),
        ("k8s:app=f;", n(266)),
        ("k8s:app=g;", n(268)),
    ]
    .into_iter()
    .map(|(l, id)| (l.to_owned(), id.to_string()))
    .collect();
    assert_eq!(index(&m), want);
    // Repaired state needs no more repair: a second apiserver writes nothing.
    let before = m.revision();
    let b = allocator(&m, "b").await;
    assert_eq!(m.revision(), before);

    assert_eq!(a.acquire("k8s:app=c;").await.unwrap(), n(258));
    assert_eq!(b.acquire("k8s:app=a;").await.unwrap(), n(256));
    // Everything unused goes after the grace period, the duplicate included.
    a.collect_garbage().await.unwrap();
    assert_eq!(collect_after_grace(&b).await, 5);
    assert_eq!(
        ids(&m),
        BTreeMap::from([
            (n(256), "k8s:app=a;".to_owned()),
            (n(258), "k8s:app=c;".to_owned())
        ])
    );
    assert_eq!(index(&m).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_stale_index_met_by_acquire_is_replaced() {
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    // Written after a's startup repair: the index names a missing id key.
    m.seed(
        &format!("{}k8s:app=x;", index_prefix(CLUSTER)),
        (3u32 << 16 | 999).to_string().as_bytes(),
    );
    let x = a.acquire("k8s:app=x;").await.unwrap();
    assert_eq!(x, FIRST);
    assert_eq!(index(&m)["k8s:app=x;"], x.to_string());
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_renewed_and_the_user_keys_written_again() {
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    let b = allocator(&m, "b").await;
    let kept = a.acquire("k8s:app=kept;").await.unwrap();
    let lost = a.acquire("k8s:app=lost;").await.unwrap();
    // a is partitioned away for longer than its lease; b keeps its own.
    for _ in 0..4 {
        tokio::time::advance(LEASE_TTL / 3).await;
        b.keep_alive().await.unwrap();
    }
    assert!(users(&m, kept).is_empty());
    // Meanwhile b keeps "kept" alive but releases "lost" after the grace.
    assert_eq!(b.acquire("k8s:app=kept;").await.unwrap(), kept);
    assert_eq!(collect_after_grace(&b).await, 1);
    assert!(!ids(&m).contains_key(&lost));
    // a comes back: a new lease, its user keys again, "lost" re-created with
    // its number.
    a.keep_alive().await.unwrap();
    assert_eq!(users(&m, kept), ["a", "b"]);
    assert_eq!(users(&m, lost), ["a"]);
    assert_eq!(ids(&m)[&lost], "k8s:app=lost;");
    assert_eq!(index(&m)["k8s:app=lost;"], lost.to_string());
    let lease = m
        .get(&format!("{}{lost}/a", users_prefix(CLUSTER)))
        .await
        .unwrap()
        .unwrap()
        .lease;
    assert!(m.leases().contains(&lease));
    // An acquisition with the stale lease also renews: drop the new one.
    m.revoke(lease).await.unwrap();
    let y = a.acquire("k8s:app=y;").await.unwrap();
    assert_eq!(users(&m, y), ["a"]);
    assert_eq!(users(&m, kept), ["a", "b"]);
}

/// Another writer rewrites an identity's labels (an etcd without
/// authentication): the next collection writes them back and counts it; an
/// id key it adds that nobody indexed or uses is released after the grace.
#[tokio::test(start_paused = true)]
async fn a_tampered_identity_is_written_back_and_a_foreign_one_released() {
    use kvstore::KvWrite as _;
    let m = MemoryBackend::new();
    let a = allocator(&m, "a").await;
    let web = a.acquire("k8s:app=web;").await.unwrap();
    m.put(
        &id_key(web),
        b"k8s:app=db;k8s:io.cilium.k8s.policy.cluster=c1;",
        None,
    )
    .await
    .unwrap();
    let foreign = FIRST + 77;
    m.put(&id_key(foreign), b"k8s:app=evil;", None)
        .await
        .unwrap();
    a.collect_garbage().await.unwrap();
    assert_eq!(ids(&m)[&web], "k8s:app=web;", "written back");
    assert_eq!(a.restored(), 1);
    assert_eq!(collect_after_grace(&a).await, 1, "the foreign id key goes");
    assert_eq!(ids(&m), BTreeMap::from([(web, "k8s:app=web;".to_owned())]));
    a.collect_garbage().await.unwrap();
    assert_eq!(a.restored(), 1, "nothing else to restore");
}
