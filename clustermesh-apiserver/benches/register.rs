//! Registers 20,000 endpoints over 1,000 label sets through the gRPC API and
//! times until every ipcache entry is in etcd; then, in the same run against a
//! fresh etcd, puts the same final records (ipcache entries and identities)
//! with a plain sequential etcd loop. Prints both and the ratio.
//!
//! Needs the `etcd` binary (skips with a message otherwise, fails under
//! `MESH_TEST_STRICT=1`).

use std::time::{Duration, Instant};

use clustermesh_apiserver::{config::Config, Server};
use kvstore::{KvWrite as _, ListWatch as _};
use mesh_proto::v1 as pb;
use pb::registry_client::RegistryClient;

const ENDPOINTS: usize = 20_000;
const LABEL_SETS: usize = 1_000;
const CONCURRENCY: usize = 64;

fn ip(i: usize) -> String {
    format!("10.1.{}.{}", i / 250, i % 250 + 1)
}

async fn etcd_config(etcd: &testkit::EtcdServer) -> kvstore::EtcdConfig {
    kvstore::EtcdConfig::from_endpoints([etcd.endpoint()], &kvstore::TlsPaths::default()).unwrap()
}

/// Returns the time from the first request to all ipcache keys in etcd, and
/// the final records for the baseline.
async fn through_apiserver() -> (Duration, Vec<(String, Vec<u8>)>) {
    let etcd = testkit::EtcdServer::start().await;
    let cfg = etcd_config(&etcd).await;
    let backend = kvstore::connect(&cfg).await.unwrap();
    let config = Config::new(
        "c1".parse().unwrap(),
        api::ClusterId::new(1, api::MaxConnectedClusters::Max255).unwrap(),
        cfg,
    );
    let server = Server::start(config).await.unwrap();
    let addr = server.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    let mut client = RegistryClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (opened, session) = mesh_proto::open_session(&mut client, "n1").await.unwrap();
    let session_id = opened.session_id;
    client
        .register_node(pb::RegisterNodeRequest {
            session_id: session_id.clone(),
            node: Some(pb::Node {
                name: "n1".into(),
                internal_ips: vec!["192.168.1.1".into()],
                pod_cidrs: vec!["10.1.0.0/16".into()],
                ..pb::Node::default()
            }),
        })
        .await
        .unwrap();

    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let mut client = client.clone();
        let session_id = session_id.clone();
        tasks.push(tokio::spawn(async move {
            for i in (worker..ENDPOINTS).step_by(CONCURRENCY) {
                client
                    .upsert_endpoint(pb::UpsertEndpointRequest {
                        session_id: session_id.clone(),
                        endpoint: Some(pb::Endpoint {
                            namespace: "default".into(),
                            name: format!("pod-{i}"),
                            ips: vec![ip(i)],
                            labels: [("app".to_owned(), format!("app-{}", i % LABEL_SETS))].into(),
                            ..pb::Endpoint::default()
                        }),
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = backend.list("cilium/state/ip/v1/").await.unwrap().kvs.len();
        if n == ENDPOINTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {ENDPOINTS} ipcache keys in etcd after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for prefix in ["cilium/state/ip/v1/", "cilium/state/identities/v1/id/"] {
        for kv in backend.list(prefix).await.unwrap().kvs {
            records.push((kv.key, kv.value));
        }
    }
    let _ = stop.send(());
    drop(session);
    task.await.unwrap().unwrap();
    (elapsed, records)
}

async fn plain_loop(records: &[(String, Vec<u8>)]) -> Duration {
    let etcd = testkit::EtcdServer::start().await;
    let backend = kvstore::connect(&etcd_config(&etcd).await).await.unwrap();
    let start = Instant::now();
    for (key, value) in records {
        backend.put(key, value, None).await.unwrap();
    }
    start.elapsed()
}

#[tokio::main]
async fn main() {
    if !testkit::require_binary("etcd") {
        return;
    }
    let (api_time, records) = through_apiserver().await;
    let loop_time = plain_loop(&records).await;
    println!(
        "register {ENDPOINTS} endpoints / {LABEL_SETS} label sets via gRPC until in etcd: {:.2} s",
        api_time.as_secs_f64()
    );
    println!(
        "plain etcd put loop of the same {} final records:                 {:.2} s",
        records.len(),
        loop_time.as_secs_f64()
    );
    println!(
        "ratio apiserver / plain loop: {:.2}",
        api_time.as_secs_f64() / loop_time.as_secs_f64()
    );
}
