//! Export throughput: 50,000 ipcache records through `SyncStore` into a real
//! etcd, against a plain `etcd-client` put loop at the same concurrency, in
//! the same run, each on an empty etcd. Prints both rates and their ratio.
//!
//! `cargo bench -p kvstore --bench export` (needs `etcd` on PATH).
//! `EXPORT_RECORDS` and `EXPORT_CONCURRENCY` override the defaults.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use api::{ClusterId, ClusterName, IpcacheEntry, MaxConnectedClusters, NumericIdentity, Resource};
use kvstore::{EtcdConfig, SyncStore, SyncStoreConfig, TlsPaths};
use testkit::EtcdServer;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn records(n: usize) -> Vec<IpcacheEntry> {
    let max = MaxConnectedClusters::Max255;
    let cluster = ClusterId::new(3, max).expect("cluster id");
    (0..n)
        .map(|i| {
            let i = u32::try_from(i).expect("fits u32");
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i));
            let local = 256 + u16::try_from(i % 60_000).expect("fits u16");
            let id = NumericIdentity::from_parts(cluster, local, max).expect("identity");
            let mut e = IpcacheEntry::new(ip, id, Some(IpAddr::V4(Ipv4Addr::new(192, 168, 3, 1))));
            e.k8s_namespace = "default".into();
            e.k8s_pod_name = format!("pod-{i}");
            e.k8s_service_account = "default".into();
            e
        })
        .collect()
}

async fn sync_store_rate(etcd: &EtcdServer, records: &[IpcacheEntry], concurrency: usize) -> f64 {
    let config =
        EtcdConfig::from_endpoints([etcd.endpoint()], &TlsPaths::default()).expect("config");
    let backend = kvstore::connect(&config).await.expect("connect");
    let cluster = ClusterName::new("c1").expect("cluster name");
    let store = SyncStore::<IpcacheEntry>::start(
        Arc::new(backend),
        &cluster,
        SyncStoreConfig {
            concurrency,
            ..SyncStoreConfig::default()
        },
    );
    let start = Instant::now();
    for r in records {
        store.upsert(r);
    }
    store.wait_idle().await;
    let elapsed = start.elapsed();
    let written = store
        .stats()
        .puts
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(written as usize, records.len(), "every record written once");
    records.len() as f64 / elapsed.as_secs_f64()
}

/// Key, value and lease of one plain put.
type Put = (String, Vec<u8>, Option<i64>);

/// Plain puts, `concurrency` tasks each putting every `concurrency`-th record.
/// With `per_lease`, keys are bound to leases of that many keys each (the
/// store's own policy), granted before the clock starts.
async fn plain_rate(
    etcd: &EtcdServer,
    records: &[IpcacheEntry],
    concurrency: usize,
    per_lease: Option<usize>,
) -> f64 {
    let client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect");
    let mut leases = Vec::new();
    if let Some(per_lease) = per_lease {
        for _ in 0..records.len().div_ceil(per_lease) {
            leases.push(
                client
                    .clone()
                    .lease_grant(900, None)
                    .await
                    .expect("lease")
                    .id(),
            );
        }
    }
    let items: Arc<Vec<Put>> = Arc::new(
        records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let lease = per_lease.map(|per| leases[i / per]);
                (r.key(), r.encode(), lease)
            })
            .collect(),
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let mut client = client.clone();
        let items = items.clone();
        tasks.push(tokio::spawn(async move {
            for (key, value, lease) in items.iter().skip(worker).step_by(concurrency) {
                let opts = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
                client
                    .put(key.as_str(), value.as_slice(), opts)
                    .await
                    .expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.expect("put task");
    }
    records.len() as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if testkit::find_binary("etcd").is_none() {
        eprintln!("SKIPPED: the export benchmark needs the `etcd` binary on PATH");
        return;
    }
    let n = env_or("EXPORT_RECORDS", 50_000);
    let concurrency = env_or("EXPORT_CONCURRENCY", SyncStoreConfig::default().concurrency);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let records = records(n);
        // Each contender gets its own fresh etcd, so none pays for
        // another's data.
        let per_lease = SyncStoreConfig::default().max_keys_per_lease;
        let plain = {
            let etcd = EtcdServer::start().await;
            plain_rate(&etcd, &records, concurrency, None).await
        };
        let plain_leased = {
            let etcd = EtcdServer::start().await;
            plain_rate(&etcd, &records, concurrency, Some(per_lease)).await
        };
        let store = {
            let etcd = EtcdServer::start().await;
            sync_store_rate(&etcd, &records, concurrency).await
        };
        println!("export of {n} ipcache records into etcd, concurrency {concurrency}");
        println!("  SyncStore (leases of {per_lease} keys):      {store:>9.0} records/s");
        println!("  plain etcd-client put, no lease:     {plain:>9.0} records/s");
        println!("  plain etcd-client put, same leases:  {plain_leased:>9.0} records/s");
        println!(
            "  ratio SyncStore / plain (no lease):    {:.2}",
            store / plain
        );
        println!(
            "  ratio SyncStore / plain (same leases): {:.2}",
            store / plain_leased
        );
    });
}
