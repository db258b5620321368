//! Propagation latency across clusters: 1,000 endpoints registered one after
//! another with cluster A's apiserver (gRPC, as an agent registers its
//! pods), each timed until its entry is in the ipcache map of B's agent;
//! in the same run, the raw etcd put → watch-event latency of A's etcd as
//! the baseline. Prints p50/p99 of both, the split of the end-to-end time
//! into the apiserver's and the agent's share, and the ratios (goal ≤ 3×).
//!
//! **Where it runs.** The whole benchmark (etcds, apiservers, B's agent)
//! runs in a private network namespace that it creates first, so nothing
//! listens on the host's loopback. B's agent runs in that namespace too and
//! connects to A's etcd directly, as an agent connects to a remote etcd
//! over the network. The integration tests instead run each agent in its
//! node's namespace behind a userspace TCP relay (a task of the test
//! process); a real deployment has no such relay, so the benchmark keeps it
//! off the measured path and measures what it would add instead: the raw
//! put → watch latency once more with the watcher in B's node namespace,
//! behind the relay.
//!
//! **The split.** A watcher of A's etcd (this process, on loopback) notes
//! when each endpoint's key appears. The agent's watch receives the same
//! event at about the same moment, so
//! * apiserver share = call → key seen (the apiserver's work and one watch
//!   delivery: comparable to the raw put → watch baseline), and
//! * agent share = key seen → entry in B's map (decoding, validating, the
//!   reconcile pass, the map write, and this benchmark's map polling: one
//!   longest-prefix-match lookup every ~50 µs).
//!
//! Needs root, iproute2 and etcd. `cargo bench -p node-agent --bench
//! propagation`; `MESH_BENCH_N` changes the count.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use mesh_proto::v1::{
    registry_client::RegistryClient, Endpoint, Node, RegisterNodeRequest, UpsertEndpointRequest,
};
use nix::sched::CloneFlags;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50 and p99 of `samples`.
fn quantiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    (percentile(samples, 0.5), percentile(samples, 0.99))
}

/// Waits (busy, 50 µs steps) until the datapath's lookup of `ip` finds
/// `identity`. One longest-prefix-match lookup per step (a single
/// syscall), as the datapath does it: before the endpoint's /32 arrives,
/// the lookup finds the node's pod CIDR (identity `world`).
/// [`datapath::Ipcache::get`] would walk the whole map instead, two
/// syscalls per entry, so the polling itself would slow down as the map
/// fills.
fn wait_in_map(
    map: &datapath::Ipcache,
    ip: IpAddr,
    identity: u32,
    deadline: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if map
            .lookup(ip)
            .ok()
            .flatten()
            .is_some_and(|e| e.identity == identity)
        {
            return Some(start.elapsed());
        }
        if start.elapsed() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Moves this process into a network namespace of its own (before any
/// thread exists, so every thread and child inherits it) with `lo` up.
fn enter_private_netns() {
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare the network namespace");
    common::ip(&["link", "set", "lo", "up"]);
}

fn main() {
    if !common::requirements() {
        eprintln!("propagation bench skipped (needs root, ip and etcd)");
        return;
    }
    enter_private_netns();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

/// Raw put → watch-event latency on `endpoint`: each put is done by this
/// process directly; the watch events come from `events` (a watcher that
/// may sit elsewhere), as `(key, received at)`.
async fn raw_put_to_watch(
    endpoint: &str,
    prefix: &str,
    n: usize,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
) -> Vec<Duration> {
    let mut etcd = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("etcd client");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("{prefix}{i}");
        let start = Instant::now();
        etcd.put(key.as_str(), format!("{{\"i\":{i}}}"), None)
            .await
            .expect("put");
        loop {
            let (seen, at) = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("watch event in 10 s")
                .expect("watcher alive");
            if seen == key {
                out.push(at.saturating_duration_since(start));
                break;
            }
        }
    }
    out
}

/// Watches `prefix` on `endpoint` and sends every key with the moment it
/// arrived.
async fn watch_keys(
    endpoint: String,
    prefix: String,
    tx: tokio::sync::mpsc::UnboundedSender<(String, Instant)>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut etcd = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("etcd client");
    let mut events = etcd
        .watch(
            prefix.as_str(),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .expect("watch");
    let _ = ready.send(());
    while let Ok(Some(resp)) = events.message().await {
        let now = Instant::now();
        for kv in resp.events().iter().filter_map(|e| e.kv()) {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if tx.send((key, now)).is_err() {
                return;
            }
        }
    }
}

/// A watcher of `prefix` inside network namespace `ns`, on a thread and
/// runtime of its own, reaching etcd at `endpoint` as seen from there.
fn watch_keys_in_netns(
    ns: &str,
    endpoint: String,
    prefix: &str,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let path = format!("/run/netns/{ns}");
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        let f = File::open(&path).expect("open the node namespace");
        nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).expect("enter the node namespace");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("watcher runtime")
            .block_on(watch_keys(endpoint, prefix, tx, ready_tx));
    });
    (rx, ready_rx)
}

/// Unary gRPC calls etcd at `addr` has handled, by method (its
/// `grpc_server_handled_total` metric).
async fn etcd_calls(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to etcd for /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .await
        .expect("request /metrics");
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .expect("read /metrics");
    let mut calls = HashMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_handled_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let unary = labels.contains("grpc_type=\"unary\"");
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("grpc_method=\""))
            .map(|m| m.trim_end_matches('"'));
        if let (true, Some(method), Ok(v)) = (unary, method, value.trim().parse::<f64>()) {
            *calls.entry(method.to_owned()).or_default() += v;
        }
    }
    calls
}

async fn run() {
    let n: usize = std::env::var("MESH_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut lab = common::Lab::new("none").await;
    lab.b.start_agent_in_current_netns();
    lab.b.wait_ready(&["c1", "c2"]).await;

    // A session of a second node of cluster A with a large pod CIDR.
    let mut client = RegistryClient::connect(format!("http://{}", lab.a.apiserver))
        .await
        .expect("connect apiserver of c1");
    let (opened, mut session) = mesh_proto::open_session(&mut client, "bench-node")
        .await
        .expect("open session");
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

    // When each ipcache key appears in c1's etcd (the apiserver's export).
    let exported: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(watch_keys(
            lab.a.etcd.endpoint(),
            "cilium/state/ip/v1/default/".into(),
            tx,
            ready_tx,
        ));
        ready_rx.await.expect("ipcache watcher ready");
        let exported = exported.clone();
        tokio::spawn(async move {
            while let Some((key, at)) = rx.recv().await {
                exported.lock().unwrap().entry(key).or_insert(at);
            }
        });
    }
    let map = Arc::new(lab.b.ipcache());
    let calls_before = etcd_calls(lab.a.etcd.client_addr()).await;
    let mut mesh = Vec::with_capacity(n);
    let mut rpc = Vec::with_capacity(n);
    let mut timed = Vec::with_capacity(n);
    for i in 0..n {
        let ip = Ipv4Addr::new(10, 1, 128 + (i / 250) as u8, (i % 250 + 2) as u8);
        let start = Instant::now();
        let identity = client
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
            .expect("upsert endpoint")
            .into_inner()
            .identity;
        rpc.push(start.elapsed());
        let map = map.clone();
        let seen = tokio::task::spawn_blocking(move || {
            wait_in_map(&map, IpAddr::V4(ip), identity, Duration::from_secs(20))
        })
        .await
        .expect("poll thread");
        assert!(seen.is_some(), "{ip} did not reach c2's ipcache in 20 s");
        let done = Instant::now();
        mesh.push(done - start);
        timed.push((format!("cilium/state/ip/v1/default/{ip}"), start, done));
    }
    // Split each end-to-end time at the moment the key was seen in c1's
    // etcd (the watcher may report a key after its entry was already in
    // c2's map: then the agent's share is zero).
    testkit::eventually!(
        Duration::from_secs(10),
        "the watcher of c1's etcd saw every key",
        {
            let seen = exported.lock().unwrap();
            timed.iter().all(|(key, _, _)| seen.contains_key(key))
        }
    );
    let (mut apiserver, mut agent): (Vec<Duration>, Vec<Duration>) = {
        let seen = exported.lock().unwrap();
        timed
            .iter()
            .map(|(key, start, done)| {
                let at = seen[key].min(*done);
                (at - *start, *done - at)
            })
            .unzip()
    };
    let calls_after = etcd_calls(lab.a.etcd.client_addr()).await;
    let reconcile = lab.b.status().map(|s| s["reconcile"].clone());

    // Baseline: raw put → watch event on the same etcd, both direct.
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(watch_keys(
        lab.a.etcd.endpoint(),
        "bench/raw/".into(),
        tx,
        ready_tx,
    ));
    ready_rx.await.expect("raw watcher ready");
    let mut raw = raw_put_to_watch(&lab.a.etcd.endpoint(), "bench/raw/", n, &mut events).await;

    // The same with the watcher in B's node namespace behind the test relay,
    // where the integration tests' agents sit: what the relay would add.
    let (mut relayed_events, ready) =
        watch_keys_in_netns(&lab.b.node_ns, lab.a.etcd.endpoint(), "bench/relay/");
    ready.await.expect("relayed watcher ready");
    let mut relayed = raw_put_to_watch(
        &lab.a.etcd.endpoint(),
        "bench/relay/",
        n,
        &mut relayed_events,
    )
    .await;

    let (m50, m99) = quantiles(&mut mesh);
    let (r50, r99) = quantiles(&mut raw);
    let (q50, q99) = quantiles(&mut rpc);
    let (x50, x99) = quantiles(&mut relayed);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!("propagation of {n} endpoints, c1's apiserver → c2's ipcache map:");
    println!(
        "  end to end (UpsertEndpoint call → entry in c2's map) p50 {:6.3} ms  p99 {:6.3} ms  ({:.1}x / {:.1}x raw)",
        ms(m50),
        ms(m99),
        ratio(m50, r50),
        ratio(m99, r99)
    );
    println!(
        "    UpsertEndpoint RPC alone                            p50 {:6.3} ms  p99 {:6.3} ms",
        ms(q50),
        ms(q99)
    );
    {
        let (a50, a99) = quantiles(&mut apiserver);
        let (g50, g99) = quantiles(&mut agent);
        println!(
            "    apiserver share: call → key seen in c1's etcd       p50 {:6.3} ms  p99 {:6.3} ms  ({:.1}x / {:.1}x raw)",
            ms(a50),
            ms(a99),
            ratio(a50, r50),
            ratio(a99, r99)
        );
        println!(
            "    agent share: key seen in c1's etcd → c2's map       p50 {:6.3} ms  p99 {:6.3} ms  ({:.1}x / {:.1}x raw)",
            ms(g50),
            ms(g99),
            ratio(g50, r50),
            ratio(g99, r99),
        );
    }
    println!(
        "  raw etcd put → watch event                           p50 {:6.3} ms  p99 {:6.3} ms",
        ms(r50),
        ms(r99)
    );
    println!(
        "  raw, watcher behind the tests' relay (not measured)  p50 {:6.3} ms  p99 {:6.3} ms  (relay adds {:+.3} / {:+.3} ms)",
        ms(x50),
        ms(x99),
        ms(x50) - ms(r50),
        ms(x99) - ms(r99)
    );
    let mut per_call: Vec<(String, f64)> = calls_after
        .iter()
        .map(|(m, after)| {
            (
                m.clone(),
                (after - calls_before.get(m).unwrap_or(&0.0)) / n as f64,
            )
        })
        .filter(|(_, per)| *per >= 0.01)
        .collect();
    per_call.sort_by(|a, b| a.0.cmp(&b.0));
    println!(
        "  c1's etcd calls per registered endpoint (all clients): {}",
        per_call
            .iter()
            .map(|(m, per)| format!("{m} {per:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "ratio end to end / raw: p50 {:.1}x, p99 {:.1}x (goal ≤ 3x)",
        ratio(m50, r50),
        ratio(m99, r99)
    );
    if let Some(r) = reconcile {
        println!("c2 agent reconciler after the run: {r}");
    }
    lab.b.stop_agent();
}
