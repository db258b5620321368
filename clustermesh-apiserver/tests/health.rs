//! `/healthz`, `/readyz`, `/metrics` against a real etcd, and the binary's
//! exit code 64 on bad flags.

use std::{net::SocketAddr, time::Duration};

use common::Served;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

mod common;

async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_metrics() {
    if !testkit::require_binary("etcd") {
        return;
    }
    let etcd = testkit::EtcdServer::start().await;
    let mut config = common::config(&etcd, 2);
    config.health_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let served = Served::start(config, kvstore::SyncStoreConfig::default()).await;
    let health = served.health.expect("health listens");
    let healthz = get(health, "/healthz").await.expect("healthz answers");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    testkit::wait_until(Duration::from_secs(15), "/readyz to answer 200", || async {
        get(health, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    let metrics = get(health, "/metrics").await.unwrap();
    for line in [
        "mesh_apiserver_exported_records{kind=\"nodes\"} 0",
        "mesh_apiserver_exported_records{kind=\"ipcache\"} 0",
        "mesh_apiserver_exported_records{kind=\"identities\"} 0",
        "mesh_apiserver_exported_records{kind=\"services\"} 0",
        "mesh_apiserver_etcd_errors_total 0",
        "mesh_apiserver_ready 1",
    ] {
        assert!(
            metrics.contains(line),
            "/metrics lacks {line:?}:\n{metrics}"
        );
    }
    served.stop().await;
}

#[test]
fn bad_flags_exit_64_naming_every_value() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .args([
            "--cluster-name=BAD",
            "--cluster-id=0",
            "--etcd-endpoints=localhost:2379",
            "--session-grace=soon",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for flag in [
        "--cluster-name",
        "--cluster-id",
        "--etcd-endpoints",
        "--session-grace",
    ] {
        assert!(stderr.contains(flag), "stderr lacks {flag}: {stderr}");
    }
}
