//! A remote cluster cannot crash or mislead a reader; TLS with client
//! certificates admits the right client and refuses others clearly.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use api::{ClusterId, ClusterName, IpcacheEntry, Node, NumericIdentity, Resource};
use common::*;
use kvstore::{error_chain, ConnectError, EtcdConfig, KvWrite, TlsPaths};
use testkit::{EtcdOptions, EtcdServer};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_rejected_and_counted_good_ones_delivered() {
    let Some((_etcd, backend)) = etcd().await else {
        return;
    };
    let foreign = ClusterId::new(CLUSTER_ID + 1, MAX).unwrap();

    let mut good = BTreeMap::new();
    let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..1000 {
        let e = entry(i, 300 + (i % 1000) as u16);
        good.insert(e.key(), e.clone());
        puts.push((e.key(), e.encode()));
    }
    let mut want_rejected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut bad = |reason: &'static str, key: String, value: Vec<u8>| {
        *want_rejected.entry(reason).or_default() += 1;
        puts.push((key, value));
    };
    for i in 0..200u32 {
        let e = entry(10_000 + i, 300);
        bad(
            "bad_encoding",
            e.key(),
            format!("{{\"IP\": {i}, oops").into_bytes(),
        );
    }
    for i in 0..200u32 {
        let mut e = entry(20_000 + i, 300);
        e.id = NumericIdentity::from_parts(foreign, 300, MAX).unwrap();
        bad("identity_out_of_range", e.key(), e.encode());
    }
    for i in 0..200u32 {
        let e = entry(30_000 + i, 300);
        let key = format!(
            "{}300.1.{}.{}",
            IpcacheEntry::prefix(&cluster()),
            i / 256,
            i % 256
        );
        bad("invalid_ip", key, e.encode());
    }
    for i in 0..199u32 {
        let e = entry(40_000 + i, 300);
        let other = entry(50_000 + i, 300);
        bad("key_mismatch", other.key(), e.encode());
    }
    let huge = entry(60_000, 300);
    let mut value = huge.encode();
    value.pop(); // reopen the JSON object and pad it to 2 MiB
    value.extend_from_slice(b",\"Metadata\":\"");
    value.resize(2 * 1024 * 1024 - 2, b'x');
    value.extend_from_slice(b"\"}");
    bad("too_large", huge.key(), value);

    // Nodes: 200 claiming another cluster in the value, 10 good ones.
    let mut node_puts = Vec::new();
    let mut good_nodes = 0;
    for i in 0..210u32 {
        let name = format!("node-{i}");
        let claimed = if i < 200 {
            ClusterName::new("c2").unwrap()
        } else {
            good_nodes += 1;
            cluster()
        };
        let node = Node::new(
            name.clone(),
            claimed,
            ClusterId::new(CLUSTER_ID, MAX).unwrap(),
        );
        let key = api::keys::node_key(&cluster(), &name);
        node_puts.push((key, node.encode()));
    }

    // Readers start first, so every record also travels through the watch.
    let (r, events) = reader::<IpcacheEntry>(&backend);
    let recorded = record(events);
    let (nodes, node_events) = reader::<Node>(&backend);
    let _node_recorded = record(node_events);
    for (key, value) in puts.iter().chain(node_puts.iter()) {
        backend.put(key, value, None).await.expect("put");
    }
    // The writer's canary releases `Synced`.
    for base in [IpcacheEntry::BASE_PREFIX, Node::BASE_PREFIX] {
        let canary = api::keys::sync_canary_key(&cluster(), base);
        backend
            .put(&canary, api::Timestamp::now().to_string().as_bytes(), None)
            .await
            .unwrap();
    }
    converged(&r, &good, LONG).await;
    testkit::wait_until(LONG, "the node reader to hold the good nodes", || {
        let ok = nodes.len() == good_nodes && nodes.is_synced();
        async move { ok }
    })
    .await;
    let hostile_ip: u64 = want_rejected.values().sum();
    assert_eq!(hostile_ip + 200, 1000, "1000 hostile records in all");
    testkit::wait_until(LONG, "all hostile ipcache records to be counted", || {
        let n = r.stats().rejected.load(Ordering::Relaxed);
        async move { n >= hostile_ip }
    })
    .await;

    assert_eq!(r.stats().rejected_by_reason(), want_rejected);
    assert_eq!(r.stats().rejected.load(Ordering::Relaxed), hostile_ip);
    assert_eq!(
        nodes.stats().rejected_by_reason(),
        BTreeMap::from([("cluster_mismatch", 200)])
    );
    assert_eq!(
        recorded.lock().unwrap().upserts,
        1000,
        "every good record delivered once"
    );
    assert_eq!(recorded.lock().unwrap().delete_events, 0);

    // A fresh reader that only lists sees the same.
    let (again, _) = reader::<IpcacheEntry>(&backend);
    again.wait_until_synced().await;
    assert_eq!(again.len(), 1000);
    assert_eq!(again.stats().rejected_by_reason(), want_rejected);
}

fn write_config(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificate_admits_and_its_absence_refuses() {
    let Some(etcd) = EtcdServer::start_or_skip(EtcdOptions::tls()).await else {
        return;
    };
    let pki = etcd.pki().unwrap().clone();
    let dir = etcd.dir();
    let rel = |p: &std::path::Path| p.file_name().unwrap().to_str().unwrap().to_owned();

    // The right client certificate, in Cilium's config format with paths
    // relative to the file.
    let good = write_config(
        dir,
        "c1.yaml",
        &format!(
            "endpoints:\n- {}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
            etcd.endpoint(),
            rel(&pki.ca),
            rel(&pki.client.cert),
            rel(&pki.client.key)
        ),
    );
    let config = EtcdConfig::from_file(&good).unwrap();
    let backend = kvstore::connect(&config)
        .await
        .expect("a client with the right certificate connects");
    let e = entry(1, 300);
    backend.put(&e.key(), &e.encode(), None).await.unwrap();
    let (r, _) = kvstore::WatchStore::<IpcacheEntry>::spawn(
        std::sync::Arc::new(backend.clone()),
        scope(),
        kvstore::WatchStoreConfig::default(),
    );
    r.wait_until_synced().await;
    assert_eq!(*r.get(&e.key()).unwrap(), e);

    // No client certificate: the server refuses the handshake.
    let no_cert = write_config(
        dir,
        "nocert.yaml",
        &format!(
            "endpoints:\n- {}\ntrusted-ca-file: {}\n",
            etcd.endpoint(),
            rel(&pki.ca)
        ),
    );
    let mut config = EtcdConfig::from_file(&no_cert).unwrap();
    config.request_timeout = Duration::from_secs(3);
    let err = kvstore::connect(&config)
        .await
        .expect_err("no client certificate is refused");
    let text = error_chain(&err);
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{text}");
    // The cause is etcd's TLS alert (BadCertificate) or, when the alert
    // loses the race with the closed connection, a broken pipe; both are
    // in the chain after the endpoint and the config file.
    assert!(
        text.contains(&etcd.endpoint()) && text.contains("nocert.yaml"),
        "the error names endpoint and config: {text}"
    );

    // A certificate from another CA is refused as well.
    let tls = TlsPaths {
        trusted_ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.rogue_client.cert.clone()),
        key_file: Some(pki.rogue_client.key.clone()),
    };
    let mut config = EtcdConfig::from_endpoints([etcd.endpoint()], &tls).unwrap();
    config.request_timeout = Duration::from_secs(3);
    let err = kvstore::connect(&config)
        .await
        .expect_err("a rogue certificate is refused");
    assert!(
        matches!(err, ConnectError::Unreachable { .. }),
        "{}",
        error_chain(&err)
    );
    eprintln!("refused as expected: {text}");
}
