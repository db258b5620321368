//! Propagation latency across clusters: 1,000 endpoints registered one after
//! another with cluster A's apiserver (gRPC, as an agent registers its
//! pods), each timed until its entry is in the ipcache map of B's agent;
//! in the same run, the raw etcd put → watch-event latency of A's etcd as
//! the baseline. Prints p50/p99 of both and the ratio (goal: ≤ 3×).
//!
//! Needs root, iproute2 and etcd (the two-cluster lab of the tests).
//! `cargo bench -p node-agent --bench propagation`; `MESH_BENCH_N` changes
//! the count.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use ipnet::IpNet;
use mesh_proto::v1::{
    registry_client::RegistryClient, session_event, Endpoint, Node, OpenSessionRequest,
    RegisterNodeRequest, UpsertEndpointRequest,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Waits (busy, 50 µs steps) until `prefix` is in `map`.
fn wait_in_map(map: &datapath::Ipcache, prefix: IpNet, deadline: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if map.get(prefix).ok().flatten().is_some() {
            return Some(start.elapsed());
        }
        if start.elapsed() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !common::requirements() {
        eprintln!("propagation bench skipped (needs root, ip and etcd)");
        return;
    }
    let n: usize = std::env::var("MESH_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut lab = common::Lab::new("none").await;
    lab.b.start_agent();
    lab.b.wait_ready(&["c1", "c2"]).await;

    // A session of a second node of cluster A with a large pod CIDR.
    let mut client = RegistryClient::connect(format!("http://{}", lab.a.apiserver))
        .await
        .expect("connect apiserver of c1");
    let mut session = client
        .open_session(OpenSessionRequest {
            node_name: "bench-node".into(),
        })
        .await
        .expect("open session")
        .into_inner();
    let first = session.message().await.expect("session").expect("opened");
    let Some(session_event::Event::Opened(opened)) = first.event else {
        panic!("first session event is not `opened`");
    };
    let session_id = opened.session_id;
    tokio::spawn(async move { while let Some(Ok(_)) = session.next().await {} });
    client
        .register_node(RegisterNodeRequest {
            session_id: session_id.clone(),
            node: Some(Node {
                name: "bench-node".into(),
                internal_ips: vec!["192.168.1.50".into()],
                cilium_internal_ips: vec![],
                pod_cidrs: vec!["10.1.128.0/17".into()],
                wireguard_public_key: String::new(),
                labels: Default::default(),
            }),
        })
        .await
        .expect("register node");

    // When each ipcache key appears in c1's etcd (the apiserver's export),
    // to split the end-to-end time into the apiserver's part and the
    // agent's part (etcd → c2's map).
    let exported: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        Default::default();
    {
        let mut etcd = etcd_client::Client::connect([lab.a.etcd.endpoint()], None)
            .await
            .expect("etcd client");
        let mut events = etcd
            .watch(
                "cilium/state/ip/v1/default/",
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .expect("watch ipcache prefix");
        let exported = exported.clone();
        tokio::spawn(async move {
            let _keep = etcd;
            while let Ok(Some(resp)) = events.message().await {
                let now = Instant::now();
                let mut seen = exported.lock().unwrap();
                for kv in resp.events().iter().filter_map(|e| e.kv()) {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    seen.entry(key).or_insert(now);
                }
            }
        });
    }
    let map = std::sync::Arc::new(lab.b.ipcache());
    let mut mesh = Vec::with_capacity(n);
    let mut rpc = Vec::with_capacity(n);
    let mut agent = Vec::with_capacity(n);
    for i in 0..n {
        let ip = Ipv4Addr::new(10, 1, 128 + (i / 250) as u8, (i % 250 + 2) as u8);
        let start = Instant::now();
        client
            .upsert_endpoint(UpsertEndpointRequest {
                session_id: session_id.clone(),
                endpoint: Some(Endpoint {
                    namespace: "bench".into(),
                    name: format!("ep-{i}"),
                    uid: String::new(),
                    service_account: String::new(),
                    ips: vec![ip.to_string()],
                    labels: [("app".to_owned(), format!("bench-{}", i % 10))].into(),
                    named_ports: vec![],
                    node: "bench-node".into(),
                }),
            })
            .await
            .expect("upsert endpoint");
        rpc.push(start.elapsed());
        let map = map.clone();
        let prefix = IpNet::from(IpAddr::V4(ip));
        let seen =
            tokio::task::spawn_blocking(move || wait_in_map(&map, prefix, Duration::from_secs(20)))
                .await
                .expect("poll thread");
        assert!(seen.is_some(), "{ip} did not reach c2's ipcache in 20 s");
        let done = Instant::now();
        mesh.push(done - start);
        let key = format!("cilium/state/ip/v1/default/{ip}");
        if let Some(at) = exported.lock().unwrap().get(&key) {
            agent.push(done.saturating_duration_since(*at));
        }
    }

    // Baseline: raw put → watch event on the same etcd.
    let mut etcd = etcd_client::Client::connect([lab.a.etcd.endpoint()], None)
        .await
        .expect("etcd client");
    let mut events = etcd
        .watch(
            "bench/raw/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .expect("watch");
    let mut raw = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("bench/raw/{i}");
        let start = Instant::now();
        etcd.put(key.as_str(), format!("{{\"i\":{i}}}"), None)
            .await
            .expect("put");
        loop {
            let resp = tokio::time::timeout(Duration::from_secs(10), events.message())
                .await
                .expect("watch event in 10 s")
                .expect("watch stream")
                .expect("watch open");
            if resp
                .events()
                .iter()
                .any(|e| e.kv().is_some_and(|kv| kv.key() == key.as_bytes()))
            {
                break;
            }
        }
        raw.push(start.elapsed());
    }

    mesh.sort();
    raw.sort();
    rpc.sort();
    agent.sort();
    let (m50, m99) = (percentile(&mesh, 0.5), percentile(&mesh, 0.99));
    let (r50, r99) = (percentile(&raw, 0.5), percentile(&raw, 0.99));
    println!(
        "propagation A→B ipcache, {n} endpoints: p50 {:.2} ms, p99 {:.2} ms",
        ms(m50),
        ms(m99)
    );
    println!(
        "raw etcd put→watch event,  {n} keys:      p50 {:.2} ms, p99 {:.2} ms",
        ms(r50),
        ms(r99)
    );
    println!(
        "  of which UpsertEndpoint RPC:          p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&rpc, 0.5)),
        ms(percentile(&rpc, 0.99))
    );
    if !agent.is_empty() {
        println!(
            "  of which key in c1's etcd → c2's map: p50 {:.2} ms, p99 {:.2} ms ({} samples; ratio to raw p50 {:.1}x)",
            ms(percentile(&agent, 0.5)),
            ms(percentile(&agent, 0.99)),
            agent.len(),
            percentile(&agent, 0.5).as_secs_f64() / r50.as_secs_f64()
        );
    }
    println!(
        "ratio: p50 {:.1}x, p99 {:.1}x (goal ≤ 3x)",
        m50.as_secs_f64() / r50.as_secs_f64(),
        m99.as_secs_f64() / r99.as_secs_f64()
    );
    if let Some(status) = lab.b.status() {
        println!("c2 agent reconciler after the run: {}", status["reconcile"]);
    }
    lab.b.stop_agent();
}
