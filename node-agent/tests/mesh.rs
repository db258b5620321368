//! Two clusters, one node each, real etcd, real apiserver, real agents and
//! the real CNI plugin (see `common`). Needs root, iproute2 and etcd.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{echo_server, started_lab, tcp_exchange, Lab};
use datapath::{IpcacheEntry, IpcacheFlags};
use ipnet::IpNet;

fn host(ip: Ipv4Addr) -> IpNet {
    IpNet::from(IpAddr::V4(ip))
}

async fn etcd_value(etcd: &testkit::EtcdServer, key: &str) -> Option<Vec<u8>> {
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    let resp = client.get(key, None).await.expect("etcd get");
    resp.kvs().first().map(|kv| kv.value().to_vec())
}

async fn etcd_put(etcd: &testkit::EtcdServer, key: &str, value: &[u8]) {
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    client.put(key, value, None).await.expect("etcd put");
}

/// The identity A's apiserver exported for `ip`.
async fn exported_identity(lab: &Lab, ip: Ipv4Addr) -> u32 {
    let key = format!("cilium/state/ip/v1/default/{ip}");
    let value = testkit::wait_for(
        Duration::from_secs(20),
        &format!("{key} in etcd of c1"),
        || {
            let etcd = &lab.a.etcd;
            let key = key.clone();
            async move { etcd_value(etcd, &key).await }
        },
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&value).expect("ipcache JSON");
    v["ID"].as_u64().expect("ID") as u32
}

async fn wait_entry(lab_c: &common::ClusterLab, prefix: IpNet, what: &str) -> IpcacheEntry {
    let map = lab_c.ipcache();
    testkit::wait_for(Duration::from_secs(20), what, || {
        let e = map.get(prefix).expect("read ipcache");
        async move { e }
    })
    .await
}

async fn wait_gone(lab_c: &common::ClusterLab, prefix: IpNet, what: &str) {
    let map = lab_c.ipcache();
    testkit::eventually!(Duration::from_secs(20), what, {
        map.get(prefix).expect("read ipcache").is_none()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoint_of_a_reaches_b_then_delete_and_drain() {
    let Some((mut lab, pa, pb)) = started_lab("none").await else {
        return;
    };
    let ip_a = lab.a.add_pod("web-a", &pa);
    let ip_b = lab.b.add_pod("client-b", &pb);

    // A's endpoint appears in B's ipcache with A's identity, tunnelled to A's node.
    let identity = exported_identity(&lab, ip_a).await;
    let entry = wait_entry(&lab.b, host(ip_a), "pod of c1 in the ipcache of c2").await;
    assert_eq!(
        entry,
        IpcacheEntry {
            identity,
            tunnel_endpoint: Some(IpAddr::V4(lab.a.node_ip)),
            flags: IpcacheFlags::REMOTE_CLUSTER,
        }
    );
    assert!(
        (65_536..131_072).contains(&identity),
        "c1's range: {identity}"
    );
    // A's pod CIDR too, and A's own pod without a tunnel endpoint in A's map.
    let cidr = wait_entry(
        &lab.b,
        "10.1.1.0/24".parse().unwrap(),
        "c1's pod CIDR in c2",
    )
    .await;
    assert_eq!(cidr.tunnel_endpoint, Some(IpAddr::V4(lab.a.node_ip)));
    let own = wait_entry(&lab.a, host(ip_a), "own pod in c1's ipcache").await;
    assert_eq!(own.tunnel_endpoint, None);
    wait_entry(&lab.a, host(ip_b), "pod of c2 in the ipcache of c1").await;

    // B's pod reaches A's pod over TCP.
    let server = SocketAddr::new(IpAddr::V4(ip_a), 7000);
    echo_server(&pa, server);
    let got = tcp_exchange(&pb, server, b"hello across clusters").unwrap_or_else(|e| {
        panic!(
            "TCP from c2 to c1 failed: {e}\nagent a:\n{}\nagent b:\n{}",
            lab.a.logs(),
            lab.b.logs()
        )
    });
    assert_eq!(got, b"hello across clusters");

    // Status: both clusters connected and synced, counts filled.
    let c1 = lab.b.cluster_status("c1").expect("c1 in b's status");
    assert_eq!(c1["connected"], true);
    assert_eq!(c1["synced"]["endpoints"], true);
    assert!(c1["num-endpoints"].as_u64().unwrap() >= 1, "{c1}");
    assert!(c1["num-nodes"].as_u64().unwrap() >= 1, "{c1}");

    // Deleting the pod removes the entry.
    lab.a.del_pod("web-a", &pa);
    wait_gone(
        &lab.b,
        host(ip_a),
        "deleted pod of c1 gone from c2's ipcache",
    )
    .await;

    // Removing B's config file for A drains every entry of A.
    let ip_a2 = lab.a.add_pod("web-a2", &pa);
    wait_entry(&lab.b, host(ip_a2), "second pod of c1 in c2").await;
    lab.remove_remote_config(&lab.b, &lab.a);
    wait_gone(&lab.b, host(ip_a2), "c1's pod drained from c2").await;
    wait_gone(
        &lab.b,
        "10.1.1.0/24".parse().unwrap(),
        "c1's CIDR drained from c2",
    )
    .await;
    testkit::eventually!(Duration::from_secs(10), "c1 gone from c2's status", {
        lab.b.cluster_status("c1").is_none()
    });
    // c2's own entries are untouched.
    assert!(lab.b.ipcache().get(host(ip_b)).unwrap().is_some());
    assert!(lab.b.agent_running());
    lab.b.stop_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_under_a_long_lived_stream_keeps_entries_and_flow() {
    let Some((mut lab, pa, pb)) = started_lab("none").await else {
        return;
    };
    let ip_a = lab.a.add_pod("stream-a", &pa);
    lab.b.add_pod("stream-b", &pb);
    wait_entry(&lab.b, host(ip_a), "pod of c1 in c2").await;
    let server = SocketAddr::new(IpAddr::V4(ip_a), 7001);
    echo_server(&pa, server);

    // A watcher samples B's entry for A's pod every millisecond.
    let stop = Arc::new(AtomicBool::new(false));
    let misses = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, misses, samples) = (stop.clone(), misses.clone(), samples.clone());
        let map = lab.b.ipcache();
        let expected = map.get(host(ip_a)).unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if map.get(host(ip_a)).ok().flatten() != expected {
                    misses.fetch_add(1, Ordering::Relaxed);
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // One TCP connection, a message every 10 ms, echoed, until told to stop.
    let stream = {
        let stop = stop.clone();
        common::in_netns(&pb, move || -> std::io::Result<u64> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = n.to_be_bytes();
                s.write_all(&msg)?;
                let mut back = [0u8; 8];
                s.read_exact(&mut back)?;
                assert_eq!(back, msg);
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(n)
        })
    };
    // Stream under a running agent first, then hold an outage with no agent
    // at all: the pinned datapath must keep forwarding on its own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.b.stop_agent();
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.b.start_agent();
    lab.b.wait_ready(&["c1", "c2"]).await;
    // Let the restarted agent run passes (and the sweep) under the stream.
    testkit::eventually!(Duration::from_secs(40), "restarted agent sweeping", {
        lab.b
            .status()
            .is_some_and(|s| s["reconcile"]["sweeping"] == true)
    });
    // Keep the stream and the watcher running while the sweep works.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let exchanged = stream
        .join()
        .expect("stream thread")
        .unwrap_or_else(|e| panic!("the stream broke during the restart: {e}\n{}", lab.b.logs()));
    watcher.join().expect("watcher");
    assert!(exchanged > 50, "only {exchanged} messages");
    assert!(samples.load(Ordering::Relaxed) > 100);
    assert_eq!(
        misses.load(Ordering::Relaxed),
        0,
        "the entry was missing or different during the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_records_are_rejected_and_counted() {
    let Some((lab, pa, _pb)) = started_lab("none").await else {
        return;
    };
    let ip_a = lab.a.add_pod("legit-a", &pa);
    let legit = wait_entry(&lab.b, host(ip_a), "legit pod of c1 in c2").await;

    // Written straight into c1's etcd: an identity of c2's range, a node
    // under c1's prefix claiming to be c2's, and a value that is not JSON.
    etcd_put(
        &lab.a.etcd,
        "cilium/state/ip/v1/default/10.1.1.200",
        br#"{"IP":"10.1.1.200","HostIP":"192.168.1.2","ID":131372,"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"evil"}"#,
    )
    .await;
    etcd_put(
        &lab.a.etcd,
        "cilium/state/nodes/v1/c1/evil",
        br#"{"Name":"evil","Cluster":"c2","IPAddresses":[{"Type":"InternalIP","IP":"192.168.9.9"}],"IPv4AllocCIDR":{"IP":"10.9.0.0","Mask":"////AA=="},"ClusterID":2}"#,
    )
    .await;
    etcd_put(
        &lab.a.etcd,
        "cilium/state/ip/v1/default/10.1.1.201",
        b"{not json",
    )
    .await;

    testkit::eventually!(
        Duration::from_secs(20),
        "three rejections for c1 in c2's status",
        {
            lab.b.cluster_status("c1").is_some_and(|c| {
                c["rejected"]
                    .as_object()
                    .map(|r| r.values().filter_map(|v| v.as_u64()).sum::<u64>())
                    .unwrap_or(0)
                    >= 3
            })
        }
    );
    let status = lab.b.cluster_status("c1").unwrap();
    let reasons = status["rejected"].as_object().unwrap();
    assert!(reasons.len() >= 2, "distinct reasons expected: {status}");
    let map = lab.b.ipcache();
    for bad in ["10.1.1.200/32", "10.1.1.201/32", "10.9.0.0/24"] {
        assert!(
            map.get(bad.parse().unwrap()).unwrap().is_none(),
            "hostile {bad} reached the map"
        );
    }
    assert_eq!(
        map.get(host(ip_a)).unwrap(),
        Some(legit),
        "legit entry changed"
    );
    assert_eq!(status["connected"], true);
    let mut lab = lab;
    assert!(lab.b.agent_running(), "agent died:\n{}", lab.b.logs());
}
