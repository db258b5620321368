//! Transactions against a real etcd, and the same checks against the
//! in-memory backend, so that unit tests built on [`MemoryBackend`] can trust
//! it to behave like etcd: single-key compare-and-swap, multi-key [`Txn`]
//! semantics (compares, one revision for all writes, leases, refusals), and
//! contention between two separately connected clients.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use kvstore::{Backend, BackendError, Compare, MemoryBackend, Txn, TxnOp, WatchEvent, MAX_TXN_OPS};
use tokio::sync::Barrier;

const DEADLINE: Duration = Duration::from_secs(10);

async fn revision_of(b: &dyn Backend, key: &str) -> i64 {
    b.get(key).await.unwrap().map_or(0, |kv| kv.mod_revision)
}

async fn store_revision(b: &dyn Backend) -> i64 {
    b.list("none/").await.unwrap().revision
}

/// `create_if_absent`, `put_if_mod_revision`, `delete_if_mod_revision`.
async fn single_key_ops(b: &dyn Backend) {
    assert!(b.create_if_absent("s/k", b"1", None).await.unwrap());
    assert!(!b.create_if_absent("s/k", b"2", None).await.unwrap());
    assert_eq!(b.get("s/k").await.unwrap().unwrap().value, b"1");
    let rev = revision_of(b, "s/k").await;
    assert!(!b
        .put_if_mod_revision("s/k", b"3", rev - 1, None)
        .await
        .unwrap());
    assert!(!b.put_if_mod_revision("s/k", b"3", 0, None).await.unwrap());
    assert!(b.put_if_mod_revision("s/k", b"3", rev, None).await.unwrap());
    assert_eq!(b.get("s/k").await.unwrap().unwrap().value, b"3");
    // The stale revision no longer deletes.
    assert!(!b.delete_if_mod_revision("s/k", rev).await.unwrap());
    let rev = revision_of(b, "s/k").await;
    assert!(b.delete_if_mod_revision("s/k", rev).await.unwrap());
    assert!(b.get("s/k").await.unwrap().is_none());
    // Expected revision 0 creates a missing key but never "deletes" one.
    assert!(!b.delete_if_mod_revision("s/k", 0).await.unwrap());
    assert!(b.put_if_mod_revision("s/k", b"4", 0, None).await.unwrap());
    // With a lease: the key goes with it.
    let lease = b.grant(Duration::from_secs(30)).await.unwrap();
    assert!(b.create_if_absent("s/l", b"1", Some(lease)).await.unwrap());
    assert_eq!(b.get("s/l").await.unwrap().unwrap().lease, lease);
    b.revoke(lease).await.unwrap();
    assert!(b.get("s/l").await.unwrap().is_none());
    assert!(matches!(
        b.create_if_absent("s/l", b"1", Some(lease)).await,
        Err(BackendError::LeaseNotFound { lease: l }) if l == lease
    ));
}

/// Multi-key transactions: all or nothing, one revision, every compare kind.
async fn multi_key_txn(b: &dyn Backend) {
    let mut watch = b.watch("m/", store_revision(b).await + 1).await.unwrap();

    // Both absent: both created, at one revision, seen by a watcher.
    let create = Txn::new()
        .when([Compare::absent("m/id/1"), Compare::absent("m/index/web")])
        .and_then([
            TxnOp::put("m/id/1", "web", None),
            TxnOp::put("m/index/web", "1", None),
        ]);
    let won = b.txn(&create).await.unwrap();
    assert!(won.succeeded);
    assert_eq!(revision_of(b, "m/id/1").await, won.revision);
    assert_eq!(revision_of(b, "m/index/web").await, won.revision);
    assert_eq!(store_revision(b).await, won.revision);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = tokio::time::timeout(DEADLINE, watch.next())
            .await
            .expect("the txn's watch events within the deadline")
            .expect("the watch is open")
            .unwrap();
        seen.extend(batch);
    }
    for event in &seen {
        assert!(
            matches!(event, WatchEvent::Put(kv) if kv.mod_revision == won.revision),
            "{event:?} is not a put at revision {}",
            won.revision
        );
    }

    // One of two compares fails: nothing is written, the revision stays.
    let lost = b.txn(&create).await.unwrap();
    assert!(!lost.succeeded);
    assert_eq!(lost.revision, won.revision);
    let partly = Txn::new()
        .when([Compare::absent("m/id/2"), Compare::absent("m/index/web")])
        .and_then([TxnOp::put("m/id/2", "web", None)]);
    assert!(!b.txn(&partly).await.unwrap().succeeded);
    assert!(b.get("m/id/2").await.unwrap().is_none());
    assert_eq!(store_revision(b).await, won.revision);

    // Value compares: equal holds, different or missing fails.
    let value = |v: &str| Txn::new().when([Compare::value("m/id/1", v.as_bytes())]);
    assert!(b.txn(&value("web")).await.unwrap().succeeded);
    assert!(!b.txn(&value("db")).await.unwrap().succeeded);
    let missing = Txn::new().when([Compare::value("m/none", Vec::new())]);
    assert!(!b.txn(&missing).await.unwrap().succeeded);

    // Mod revision compares; 0 means absent.
    let modrev = |key: &str, rev| Txn::new().when([Compare::mod_revision(key, rev)]);
    assert!(
        b.txn(&modrev("m/id/1", won.revision))
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        !b.txn(&modrev("m/id/1", won.revision + 1))
            .await
            .unwrap()
            .succeeded
    );
    assert!(b.txn(&modrev("m/none", 0)).await.unwrap().succeeded);
    assert!(!b.txn(&modrev("m/id/1", 0)).await.unwrap().succeeded);

    // Prefix compares: any key under the prefix fails it; a sibling whose
    // name merely starts the same way (m/users/10/) does not.
    let lease = b.grant(Duration::from_secs(30)).await.unwrap();
    b.put("m/users/10/a", b"", None).await.unwrap();
    let no_users = || Txn::new().when([Compare::no_key_with_prefix("m/users/1/")]);
    assert!(b.txn(&no_users()).await.unwrap().succeeded);
    b.put("m/users/1/a", b"", Some(lease)).await.unwrap();
    assert!(!b.txn(&no_users()).await.unwrap().succeeded);
    b.revoke(lease).await.unwrap();
    assert!(b.txn(&no_users()).await.unwrap().succeeded);

    // Delete both in one transaction, conditioned on the listed revisions.
    let before = store_revision(b).await;
    let delete = Txn::new()
        .when([
            Compare::mod_revision("m/id/1", won.revision),
            Compare::mod_revision("m/index/web", won.revision),
            Compare::no_key_with_prefix("m/users/1/"),
        ])
        .and_then([TxnOp::delete("m/id/1"), TxnOp::delete("m/index/web")]);
    let deleted = b.txn(&delete).await.unwrap();
    assert!(deleted.succeeded);
    assert_eq!(deleted.revision, before + 1, "both deletes at one revision");
    assert!(b.get("m/id/1").await.unwrap().is_none());
    assert!(b.get("m/index/web").await.unwrap().is_none());

    // Deleting what is gone succeeds and changes nothing.
    let nothing = Txn::new().and_then([TxnOp::delete("m/id/1")]);
    let outcome = b.txn(&nothing).await.unwrap();
    assert!(outcome.succeeded);
    assert_eq!(outcome.revision, deleted.revision);

    // A lease in a put: bound when it exists; a missing one fails the whole
    // transaction when the compares hold, and does not matter when they fail.
    let lease = b.grant(Duration::from_secs(30)).await.unwrap();
    let leased = Txn::new().and_then([
        TxnOp::put("m/leased/a", "1", Some(lease)),
        TxnOp::put("m/leased/b", "1", None),
    ]);
    assert!(b.txn(&leased).await.unwrap().succeeded);
    assert_eq!(b.get("m/leased/a").await.unwrap().unwrap().lease, lease);
    assert_eq!(b.get("m/leased/b").await.unwrap().unwrap().lease, 0);
    b.revoke(lease).await.unwrap();
    assert!(b.get("m/leased/a").await.unwrap().is_none());
    assert!(b.get("m/leased/b").await.unwrap().is_some());
    let gone = Txn::new().and_then([
        TxnOp::put("m/leased/c", "1", None),
        TxnOp::put("m/leased/d", "1", Some(lease)),
    ]);
    assert!(matches!(
        b.txn(&gone).await,
        Err(BackendError::LeaseNotFound { lease: l }) if l == lease
    ));
    assert!(b.get("m/leased/c").await.unwrap().is_none());
    let gone_but_lost = gone.clone().when([Compare::absent("m/leased/b")]);
    assert!(!b.txn(&gone_but_lost).await.unwrap().succeeded);

    // What etcd refuses, both backends refuse before sending.
    let twice = Txn::new().and_then([TxnOp::put("m/x", "1", None), TxnOp::delete("m/x")]);
    assert!(matches!(
        b.txn(&twice).await,
        Err(BackendError::InvalidTxn { key, .. }) if key == "m/x"
    ));
    let huge = Txn::new().and_then((0..=MAX_TXN_OPS).map(|i| TxnOp::delete(format!("m/{i}"))));
    assert!(matches!(
        b.txn(&huge).await,
        Err(BackendError::TxnTooLarge { .. })
    ));
    let empty_prefix = Txn::new().when([Compare::no_key_with_prefix("")]);
    assert!(matches!(
        b.txn(&empty_prefix).await,
        Err(BackendError::InvalidTxn { .. })
    ));
}

/// Two clients race for the same pair of keys, round after round: exactly
/// one wins each round, and the pair is never mixed.
async fn race_for_pairs(a: Arc<dyn Backend>, b: Arc<dyn Backend>, rounds: usize) {
    let barrier = Arc::new(Barrier::new(2));
    let racer = |name: &'static str, backend: Arc<dyn Backend>, barrier: Arc<Barrier>| {
        tokio::spawn(async move {
            let mut wins = Vec::new();
            for round in 0..rounds {
                let id = format!("r/{round}/id");
                let index = format!("r/{round}/index");
                let txn = Txn::new()
                    .when([Compare::absent(&id), Compare::absent(&index)])
                    .and_then([TxnOp::put(&id, name, None), TxnOp::put(&index, name, None)]);
                barrier.wait().await;
                if backend.txn(&txn).await.unwrap().succeeded {
                    wins.push(round);
                }
            }
            wins
        })
    };
    let wins_a = racer("a", a.clone(), barrier.clone());
    let wins_b = racer("b", b, barrier);
    let (wins_a, wins_b) = tokio::time::timeout(DEADLINE * 6, async {
        (wins_a.await.unwrap(), wins_b.await.unwrap())
    })
    .await
    .expect("both racers to finish");
    let mut winners = BTreeMap::new();
    for (name, wins) in [("a", &wins_a), ("b", &wins_b)] {
        for round in wins {
            assert!(
                winners.insert(*round, name).is_none(),
                "round {round} was won twice"
            );
        }
    }
    assert_eq!(winners.len(), rounds, "every round has exactly one winner");
    let stored = a.list("r/").await.unwrap();
    assert_eq!(stored.kvs.len(), rounds * 2);
    for kv in &stored.kvs {
        let round: usize = kv.key.split('/').nth(1).unwrap().parse().unwrap();
        assert_eq!(
            kv.value,
            winners[&round].as_bytes(),
            "{} holds the loser's value",
            kv.key
        );
    }
    eprintln!(
        "race of {rounds} rounds: a won {}, b won {}",
        wins_a.len(),
        wins_b.len()
    );
}

/// Two clients increment one counter by read, compare the value, write; each
/// increment also creates a log key. No increment is lost or doubled.
async fn contended_counter(a: Arc<dyn Backend>, b: Arc<dyn Backend>, each: usize) {
    let incrementer = |name: &'static str, backend: Arc<dyn Backend>| {
        tokio::spawn(async move {
            let mut conflicts = 0usize;
            for _ in 0..each {
                loop {
                    let current = backend.get("c/counter").await.unwrap();
                    let (compare, n) = match &current {
                        None => (Compare::absent("c/counter"), 1u64),
                        Some(kv) => {
                            let n: u64 = String::from_utf8_lossy(&kv.value).parse().unwrap();
                            (Compare::value("c/counter", kv.value.clone()), n + 1)
                        }
                    };
                    let txn = Txn::new().when([compare]).and_then([
                        TxnOp::put("c/counter", n.to_string(), None),
                        TxnOp::put(format!("c/log/{n:06}"), name, None),
                    ]);
                    if backend.txn(&txn).await.unwrap().succeeded {
                        break;
                    }
                    conflicts += 1;
                }
            }
            conflicts
        })
    };
    let ca = incrementer("a", a.clone());
    let cb = incrementer("b", b);
    let (ca, cb) = tokio::time::timeout(DEADLINE * 6, async {
        (ca.await.unwrap(), cb.await.unwrap())
    })
    .await
    .expect("both incrementers to finish");
    let total = 2 * each;
    let counter = a.get("c/counter").await.unwrap().unwrap();
    assert_eq!(counter.value, total.to_string().as_bytes());
    let log = a.list("c/log/").await.unwrap();
    let numbers: Vec<String> = log.kvs.iter().map(|kv| kv.key.clone()).collect();
    let want: Vec<String> = (1..=total).map(|n| format!("c/log/{n:06}")).collect();
    assert_eq!(numbers, want, "every increment logged exactly once");
    eprintln!("{total} contended increments: {ca} + {cb} lost compares retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_key_ops_on_etcd() {
    let Some((_etcd, b)) = common::etcd().await else {
        return;
    };
    single_key_ops(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_txn_on_etcd() {
    let Some((_etcd, b)) = common::etcd().await else {
        return;
    };
    multi_key_txn(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_etcd_clients_race_and_exactly_one_wins() {
    let Some((etcd, a)) = common::etcd().await else {
        return;
    };
    // A second, separately connected client: its own gRPC channel.
    let b = common::backend(&etcd.endpoint()).await;
    race_for_pairs(Arc::new(a.clone()), Arc::new(b.clone()), 200).await;
    contended_counter(Arc::new(a), Arc::new(b), 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_behaves_like_etcd() {
    let m = MemoryBackend::new();
    single_key_ops(&m).await;
    multi_key_txn(&m).await;
    race_for_pairs(Arc::new(m.clone()), Arc::new(m.clone()), 200).await;
    contended_counter(Arc::new(m.clone()), Arc::new(m), 100).await;
}
