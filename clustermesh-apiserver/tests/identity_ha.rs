//! Two apiservers of one cluster allocating identities against one real
//! etcd. Each side is the apiserver's identity allocator on its own etcd
//! connection, with its own instance id and session lease, exactly as
//! `Server::start` builds it (two full apiservers of one cluster would also
//! fight over the exported nodes and ipcache keys, which is not what these
//! tests are about).

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::RangeInclusive,
    sync::Arc,
    time::Duration,
};

use api::keys::{identities_prefix, identity_key, parse_identity_key};
use api::NumericIdentity;
use clustermesh_apiserver::identity::{index_prefix, users_prefix, Allocator, AllocatorConfig};
use kvstore::{EtcdConfig, ListWatch as _, TlsPaths};
use tokio::sync::{watch, Barrier};

const CLUSTER: &str = "c1";
const RANGE: RangeInclusive<u32> = (3 << 16 | 256)..=(3 << 16 | 0xffff);
const DEADLINE: Duration = Duration::from_secs(20);

async fn connect(etcd: &testkit::EtcdServer) -> kvstore::EtcdBackend {
    let config = EtcdConfig::from_endpoints([etcd.endpoint()], &TlsPaths::default()).unwrap();
    kvstore::connect(&config)
        .await
        .expect("connect to the test etcd")
}

/// An allocator on its own etcd connection.
async fn apiserver(etcd: &testkit::EtcdServer, instance: &str, grace: Duration) -> Arc<Allocator> {
    let backend: Arc<dyn kvstore::Backend> = Arc::new(connect(etcd).await);
    let config = AllocatorConfig {
        cluster: CLUSTER.to_owned(),
        range: RANGE,
        grace,
        lease_ttl: Duration::from_secs(10),
        instance: instance.to_owned(),
    };
    Arc::new(
        Allocator::load(backend, config)
            .await
            .unwrap_or_else(|e| panic!("{instance}: load: {e}")),
    )
}

/// id → labels, labels → id, id → users, as etcd holds them.
struct Stored {
    ids: BTreeMap<u32, String>,
    index: BTreeMap<String, u32>,
    users: BTreeMap<u32, BTreeSet<String>>,
}

async fn stored(b: &kvstore::EtcdBackend) -> Stored {
    let ids = b.list(&identities_prefix()).await.unwrap().kvs;
    let index_prefix = index_prefix(CLUSTER);
    let index = b.list(&index_prefix).await.unwrap().kvs;
    let users_prefix = users_prefix(CLUSTER);
    let users = b.list(&users_prefix).await.unwrap().kvs;
    let mut out = Stored {
        ids: ids
            .iter()
            .map(|kv| {
                let id = parse_identity_key(&kv.key).unwrap().id.0;
                (id, String::from_utf8(kv.value.clone()).unwrap())
            })
            .collect(),
        index: index
            .iter()
            .map(|kv| {
                let labels = kv.key[index_prefix.len()..].to_owned();
                (labels, String::from_utf8_lossy(&kv.value).parse().unwrap())
            })
            .collect(),
        users: BTreeMap::new(),
    };
    for kv in users {
        let (id, instance) = kv.key[users_prefix.len()..].split_once('/').unwrap();
        out.users
            .entry(id.parse().unwrap())
            .or_default()
            .insert(instance.to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apiservers_allocate_concurrently_without_sharing_a_number() {
    if !testkit::require_binary("etcd") {
        return;
    }
    let etcd = testkit::EtcdServer::start().await;
    let observer = connect(&etcd).await;
    let a = apiserver(&etcd, "a", Duration::from_secs(300)).await;
    let b = apiserver(&etcd, "b", Duration::from_secs(300)).await;

    // 30 label sets both allocate (in opposite orders), 20 only a, 20 only b,
    // interleaved, all at once.
    let shared: Vec<String> = (0..30).map(|i| format!("k8s:app=shared-{i};")).collect();
    let plan = |own: &str, reverse: bool| {
        let mut labels: Vec<String> = shared.clone();
        if reverse {
            labels.reverse();
        }
        for i in 0..20 {
            labels.insert(i * 2, format!("k8s:app={own}-{i};"));
        }
        labels
    };
    let barrier = Arc::new(Barrier::new(2));
    let run = |allocator: Arc<Allocator>, labels: Vec<String>, barrier: Arc<Barrier>| {
        tokio::spawn(async move {
            barrier.wait().await;
            let mut got = BTreeMap::new();
            for l in labels {
                let id = allocator
                    .acquire(&l)
                    .await
                    .unwrap_or_else(|e| panic!("{}: acquire {l}: {e}", allocator.instance()));
                got.insert(l, id);
            }
            got
        })
    };
    let ta = run(a.clone(), plan("a", false), barrier.clone());
    let tb = run(b.clone(), plan("b", true), barrier);
    let (got_a, got_b) =
        tokio::time::timeout(DEADLINE, async { (ta.await.unwrap(), tb.await.unwrap()) })
            .await
            .expect("both apiservers to allocate within the deadline");

    // The same labels got the same number on both sides.
    for l in &shared {
        assert_eq!(got_a[l], got_b[l], "{l} got two numbers");
    }
    // No number was handed out for two label sets.
    let mut by_number: BTreeMap<u32, &String> = BTreeMap::new();
    for (l, id) in got_a.iter().chain(got_b.iter()) {
        assert!(RANGE.contains(id));
        if let Some(other) = by_number.insert(*id, l) {
            assert_eq!(other, l, "{id} was handed out to {other} and {l}");
        }
    }
    assert_eq!(by_number.len(), 70);
    // etcd agrees: one id key and one index entry per label set, consistent,
    // and one user key per apiserver using it.
    let s = stored(&observer).await;
    assert_eq!(s.ids.len(), 70);
    assert_eq!(s.index.len(), 70);
    for (id, labels) in &s.ids {
        assert_eq!(s.index[labels], *id, "index of {labels}");
        assert_eq!(by_number[id], labels);
        let want: BTreeSet<String> = match labels.strip_prefix("k8s:app=") {
            Some(rest) if rest.starts_with("shared-") => ["a", "b"].map(String::from).into(),
            Some(rest) if rest.starts_with("a-") => ["a".to_owned()].into(),
            _ => ["b".to_owned()].into(),
        };
        assert_eq!(s.users[id], want, "users of {id} ({labels})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_survives_while_another_apiserver_uses_it() {
    if !testkit::require_binary("etcd") {
        return;
    }
    let etcd = testkit::EtcdServer::start().await;
    let observer = connect(&etcd).await;
    let grace = Duration::from_millis(800);
    let a = apiserver(&etcd, "a", grace).await;
    let b = apiserver(&etcd, "b", grace).await;
    let (stop, stopped) = watch::channel(false);
    let loops = [
        tokio::spawn(a.clone().run(stopped.clone())),
        tokio::spawn(b.clone().run(stopped)),
    ];

    let l =
        "k8s:app=l;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;";
    let id = a.acquire(l).await.unwrap();
    assert_eq!(b.acquire(l).await.unwrap(), id);
    a.release(l).await;
    // Both collectors run every grace/4; give them three grace periods.
    let until = tokio::time::Instant::now() + grace * 3;
    while tokio::time::Instant::now() < until {
        let s = stored(&observer).await;
        assert_eq!(
            s.ids.get(&id).map(String::as_str),
            Some(l),
            "released while b uses it"
        );
        assert_eq!(s.index.get(l), Some(&id));
        assert_eq!(s.users.get(&id), Some(&["b".to_owned()].into()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.release(l).await;
    let released_at = tokio::time::Instant::now();
    testkit::wait_until(DEADLINE, "the unused identity to be released", || {
        let observer = observer.clone();
        async move {
            let s = stored(&observer).await;
            s.ids.is_empty() && s.index.is_empty() && s.users.is_empty()
        }
    })
    .await;
    assert!(
        released_at.elapsed() >= grace,
        "released after {:?}, before the grace period of {grace:?}",
        released_at.elapsed()
    );
    let _ = stop.send(true);
    for task in loops {
        task.await.unwrap();
    }
    assert!(observer
        .get(&identity_key(NumericIdentity(id)))
        .await
        .unwrap()
        .is_none());
    assert_eq!(a.count().await, 0);
    assert_eq!(b.count().await, 0);
}
