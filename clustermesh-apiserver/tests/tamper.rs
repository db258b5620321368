//! The apiserver notices another writer in its etcd (one without
//! authentication): an exported key changed or deleted behind its back is
//! written back, a key it never wrote under its prefixes is deleted, and
//! `/metrics` counts both.

use std::net::SocketAddr;

use common::{Served, DEADLINE};
use kvstore::{KvWrite as _, ListWatch as _};
use mesh_proto::v1 as pb;

mod common;

async fn metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_is_undone_and_counted() {
    if !testkit::require_binary("etcd") {
        return;
    }
    let etcd = testkit::EtcdServer::start().await;
    let mut config = common::config(&etcd, 3);
    config.health_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let backend = kvstore::connect(&config.etcd).await.unwrap();
    let served = Served::start(config, kvstore::SyncStoreConfig::default()).await;
    let mut client = served.client.clone();
    let (opened, _session) = mesh_proto::open_session(&mut client, "n1").await.unwrap();
    client
        .register_node(pb::RegisterNodeRequest {
            session_id: opened.session_id.clone(),
            node: Some(pb::Node {
                name: "n1".into(),
                internal_ips: vec!["192.168.1.2".into()],
                pod_cidrs: vec!["10.1.1.0/24".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    client
        .upsert_endpoint(pb::UpsertEndpointRequest {
            session_id: opened.session_id,
            endpoint: Some(pb::Endpoint {
                namespace: "default".into(),
                name: "web-1".into(),
                ips: vec!["10.1.1.5".into()],
                labels: [("app".to_owned(), "web".to_owned())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let node_key = "cilium/state/nodes/v1/c1/n1";
    let ip_key = "cilium/state/ip/v1/default/10.1.1.5";
    let exported = testkit::wait_for(DEADLINE, "the node and endpoint exported", || {
        let backend = backend.clone();
        async move {
            let node = backend.get(node_key).await.ok().flatten()?;
            let ip = backend.get(ip_key).await.ok().flatten()?;
            Some((node.value, ip.value))
        }
    })
    .await;

    // Another writer: the node points elsewhere, the endpoint is gone, and
    // a node the apiserver never wrote appears.
    let hijacked = String::from_utf8(exported.0.clone())
        .unwrap()
        .replace("192.168.1.2", "192.168.9.9");
    backend
        .put(node_key, hijacked.as_bytes(), None)
        .await
        .unwrap();
    backend.delete(ip_key).await.unwrap();
    let foreign = "cilium/state/nodes/v1/c1/intruder";
    backend.put(foreign, &exported.0, None).await.unwrap();

    testkit::wait_until(DEADLINE, "the apiserver to undo the other writer", || {
        let backend = backend.clone();
        let exported = exported.clone();
        async move {
            let node = backend
                .get(node_key)
                .await
                .ok()
                .flatten()
                .map(|kv| kv.value);
            let ip = backend.get(ip_key).await.ok().flatten().map(|kv| kv.value);
            let gone = backend
                .get(foreign)
                .await
                .ok()
                .is_some_and(|kv| kv.is_none());
            node == Some(exported.0) && ip == Some(exported.1) && gone
        }
    })
    .await;
    let health = served.health.expect("health listens");
    let text = metrics(health).await;
    for line in [
        "mesh_apiserver_tampered_restored_total{kind=\"nodes\"} 1",
        "mesh_apiserver_tampered_restored_total{kind=\"ipcache\"} 1",
        "mesh_apiserver_foreign_removed_total{kind=\"nodes\"} 1",
        "mesh_apiserver_foreign_removed_total{kind=\"services\"} 0",
    ] {
        assert!(text.contains(line), "/metrics lacks {line:?}:\n{text}");
    }
    // Restored on the apiserver's lease, like everything it exports.
    let node = backend.get(node_key).await.unwrap().unwrap();
    assert_ne!(node.lease, 0, "written back on a lease");
    let listing = backend.list("cilium/state/nodes/v1/c1/").await.unwrap();
    assert_eq!(listing.kvs.len(), 1);
    served.stop().await;
}
