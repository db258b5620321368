//! End-to-end tests: real labs, real processes, real packets. Each test brings
//! its own lab up and down (a drop guard, also on failure). To keep the suite
//! within CI's budget on two cores, one 2×2 lab carries several scenarios in a
//! row (traffic, disconnect/connect, etcd crash, clean down).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshctl::lab::state::Role;
use meshctl::lab::{self, ip, plan, supervise};
use multi_cluster_tests::{
    all_pairs, echo_pods, eventually, prerequisites, probe, Capture, Lab, Proto,
};

const ALL: [Proto; 3] = [Proto::Icmp, Proto::Tcp, Proto::Udp];

fn assert_all_pairs(lab: &Lab, protos: &[Proto], marker: &str) {
    let state = lab.state();
    let pods = echo_pods(&state);
    let failures = all_pairs(&pods, protos, marker);
    assert!(
        failures.is_empty(),
        "{} of {} probes failed (pods {}):\n{}\n{}",
        failures.len(),
        pods.len() * (pods.len() - 1) * protos.len(),
        multi_cluster_tests::describe(&pods),
        failures.join("\n"),
        lab.logs_tail()
    );
}

fn cluster_status<'a>(status: &'a serde_json::Value, cluster: &str) -> &'a serde_json::Value {
    status
        .as_array()
        .and_then(|a| a.iter().find(|c| c["cluster"] == cluster))
        .unwrap_or_else(|| panic!("no cluster {cluster} in {status}"))
}

fn assert_status_ready(lab: &Lab, clusters: usize, nodes: u64) {
    let status = lab.status_json();
    for n in 1..=clusters {
        let name = format!("c{n}");
        let c = cluster_status(&status, &name);
        assert_eq!(c["ready"], true, "{name} not ready: {c:#}");
        assert_eq!(c["nodes"], nodes, "{c:#}");
        assert_eq!(c["nodes_connected_to_all"], nodes, "{c:#}");
        let remotes = c["remote_clusters"].as_array().expect("remote_clusters");
        assert_eq!(remotes.len(), clusters - 1, "{c:#}");
        for r in remotes {
            assert_eq!(r["configured"], nodes, "{r:#}");
            assert_eq!(r["ready"], nodes, "{r:#}");
            // Every remote node and echo pod is known.
            assert!(r["nodes"].as_u64() >= Some(1), "{r:#}");
            assert!(r["endpoints"].as_u64() >= Some(1), "{r:#}");
        }
    }
}

/// 2 clusters × 2 nodes over VXLAN: every pair of echo pods within and across
/// clusters by ICMP, TCP and UDP; then disconnect and connect; then etcd of c1
/// SIGKILLed and restarted under a long-lived TCP stream c1 → c2; then a
/// `lab down` that leaves nothing behind.
#[test]
fn two_by_two_tunnel_traffic_disconnect_etcd_crash_and_clean_down() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::up("tun", &["--clusters", "2", "--nodes", "2"]);
    assert_status_ready(&lab, 2, 2);
    assert_all_pairs(&lab, &ALL, "hello-tunnel");

    // Running `lab up` again is harmless: same lab, same processes.
    let before: Vec<i32> = lab.state().processes.iter().map(|p| p.pid).collect();
    let (ok, _, stderr) = lab.meshctl(&["lab", "up", "--clusters", "2", "--nodes", "2"]);
    assert!(ok, "second lab up failed: {stderr}");
    let after: Vec<i32> = lab.state().processes.iter().map(|p| p.pid).collect();
    assert_eq!(before, after, "second lab up restarted processes");

    // Disconnect: cross-cluster traffic stops and c2's entries leave c1's view.
    let state = lab.state();
    let pods = echo_pods(&state);
    let c1 = pods.iter().find(|p| p.cluster == "c1").unwrap().clone();
    let c1_other = pods
        .iter()
        .find(|p| p.cluster == "c1" && p.name != c1.name)
        .unwrap()
        .clone();
    let c2 = pods.iter().find(|p| p.cluster == "c2").unwrap().clone();
    let (ok, _, stderr) = lab.meshctl(&[
        "clustermesh",
        "disconnect",
        "--source",
        "c1",
        "--destination",
        "c2",
    ]);
    assert!(ok, "disconnect: {stderr}");
    eventually(
        "c1 to drop c2 from its status",
        Duration::from_secs(60),
        || {
            let status = lab.status_json();
            let c = cluster_status(&status, "c1");
            c["remote_clusters"].as_array().is_some_and(Vec::is_empty) && c["ready"] == true
        },
    );
    eventually("traffic c1 -> c2 to stop", Duration::from_secs(30), || {
        probe(&c1, &c2, Proto::Tcp, "after-disconnect").is_err()
    });
    probe(&c1, &c1_other, Proto::Tcp, "within-c1").expect("traffic within c1 still works");

    // Connect again: restored.
    let (ok, _, stderr) = lab.meshctl(&[
        "clustermesh",
        "connect",
        "--source",
        "c1",
        "--destination",
        "c2",
    ]);
    assert!(ok, "connect: {stderr}");
    lab.wait_ready("90s");
    assert_status_ready(&lab, 2, 2);
    for proto in ALL {
        probe(&c1, &c2, proto, "reconnected").expect("traffic restored after connect");
    }

    // Connecting a cluster to itself is refused, naming the clash.
    let (ok, _, stderr) = lab.meshctl(&[
        "clustermesh",
        "connect",
        "--source",
        "c1",
        "--destination",
        "c1",
    ]);
    assert!(!ok && stderr.contains("both are named \"c1\""), "{stderr}");

    // etcd of c1 SIGKILLed and restarted while a TCP stream c1 -> c2 runs.
    let target = SocketAddr::from((c2.ip.unwrap(), plan::ECHO_PORT));
    let stop = Arc::new(AtomicBool::new(false));
    let stop_stream = stop.clone();
    let stream = std::thread::spawn(move || {
        ip::in_netns(&c1.netns, move || -> Result<u64, String> {
            let conn = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .map_err(|e| format!("connect: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut writer = conn;
            let mut n = 0u64;
            while !stop_stream.load(Ordering::Relaxed) {
                writeln!(writer, "line-{n}").map_err(|e| format!("send {n}: {e}"))?;
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .map_err(|e| format!("receive {n}: {e}"))?;
                if !line.ends_with(&format!("msg=line-{n}\n")) {
                    return Err(format!("line {n}: unexpected reply {line:?}"));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(n)
        })
        .map_err(|e| e.to_string())?
    });
    // Let the stream run before the crash (it paces itself at 20 lines/s).
    std::thread::sleep(Duration::from_secs(2));
    let mut state = lab.state();
    let etcd = state
        .processes
        .iter()
        .find(|p| p.role == Role::Etcd && p.cluster == "c1")
        .unwrap()
        .clone();
    supervise::kill_hard(&etcd);
    eventually(
        "c2's agents to see c1 disconnected",
        Duration::from_secs(60),
        || {
            let status = lab.status_json();
            cluster_status(&status, "c2")["ready"] == false
        },
    );
    // Hold the outage: the stream must keep flowing with c1's etcd down.
    std::thread::sleep(Duration::from_secs(2));
    lab::restart_etcd(&mut state, "c1").expect("restart etcd of c1");
    lab.wait_ready("90s");
    // Keep streaming for a while after the reconnect, then stop.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let lines = stream.join().expect("stream thread").unwrap_or_else(|e| {
        panic!(
            "TCP stream c1 -> c2 was interrupted: {e}\n{}",
            lab.logs_tail()
        )
    });
    assert!(
        lines > 20,
        "only {lines} lines crossed during the etcd crash"
    );
    assert_status_ready(&lab, 2, 2);
    assert_all_pairs(&lab, &[Proto::Tcp], "after-etcd-restart");

    // Down leaves nothing: namespaces (and the links in them), processes, mounts, files.
    let left = lab.down_and_leftovers();
    assert!(left.is_empty(), "lab down left: {left:#?}");
}

/// 2 × 2 with WireGuard: all pairs work, and an underlay capture never shows
/// the payload marker (while the same capture method does show it in clear
/// text for the tunnel lab's own check below).
#[test]
fn two_by_two_wireguard_encrypts_the_underlay() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::up(
        "wg",
        &[
            "--clusters",
            "2",
            "--nodes",
            "2",
            "--encryption",
            "wireguard",
        ],
    );
    assert_status_ready(&lab, 2, 2);
    // Every agent checked its (userspace) device and found it answering.
    for cluster in &lab.state().clusters {
        for node in &cluster.nodes {
            let status = meshctl::clustermesh::status::read_agent_status(&node.status_socket)
                .expect("agent status");
            let wg = status
                .reconcile
                .wireguard
                .expect("a WireGuard health check");
            assert!(
                wg.healthy && wg.backend == "userspace",
                "{}: {wg:?}",
                node.name
            );
        }
    }
    let pcap = std::env::temp_dir().join(format!("{}-underlay.pcap", lab.name));
    let capture = Capture::start(&lab.name, &pcap);
    let marker = "MESH-PAYLOAD-MARKER-7f3a";
    assert_all_pairs(&lab, &[Proto::Tcp, Proto::Udp], marker);
    let bytes = capture.stop();
    let _ = std::fs::remove_file(&pcap);
    // Traffic did cross the underlay (the capture is not empty) ...
    assert!(
        bytes.len() > 10_000,
        "capture holds only {} bytes",
        bytes.len()
    );
    // ... and never in clear text.
    assert!(
        !multi_cluster_tests::contains(&bytes, marker.as_bytes()),
        "the payload marker crossed the underlay in clear text"
    );
}

/// The capture method sees clear text without encryption (so the WireGuard
/// test's negative result means something), with native routing.
#[test]
fn two_by_one_native_routing_in_clear() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::up(
        "nat",
        &["--clusters", "2", "--nodes", "1", "--routing", "native"],
    );
    assert_status_ready(&lab, 2, 1);
    let pcap = std::env::temp_dir().join(format!("{}-underlay.pcap", lab.name));
    let capture = Capture::start(&lab.name, &pcap);
    let marker = "MESH-PAYLOAD-MARKER-clear";
    assert_all_pairs(&lab, &ALL, marker);
    let bytes = capture.stop();
    let _ = std::fs::remove_file(&pcap);
    assert!(
        multi_cluster_tests::contains(&bytes, marker.as_bytes()),
        "the capture did not see the clear-text marker"
    );
}

/// 3 clusters × 1 node, all connected: everything reaches everything.
#[test]
fn three_clusters_full_mesh() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::up("tri", &["--clusters", "3", "--nodes", "1"]);
    assert_status_ready(&lab, 3, 1);
    assert_all_pairs(&lab, &ALL, "hello-three");
}
