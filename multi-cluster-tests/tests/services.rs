//! Global services end to end, in one 2 × 2 lab (VXLAN) reused for every
//! scenario to keep CI time low. Backends are echo pods, whose replies name
//! the pod, so every assertion is on who actually answered a real TCP
//! connection to the service frontend from a pod of c1; the agents' status
//! documents (what `meshctl service list` shows) are only used to wait until
//! a change reached c1's client node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use meshctl::clustermesh::status::read_agent_status;
use meshctl::lab::ip;
use meshctl::lab::state::PodRecord;
use meshctl::netprobe::{self, TcpSession};
use multi_cluster_tests::{eventually, prerequisites, Lab, PROBE_TIMEOUT};

const FRONTEND: &str = "10.96.0.10:80";
const SERVICE: &str = "default/gsvc";
const CONVERGE: Duration = Duration::from_secs(30);

fn frontend() -> SocketAddr {
    FRONTEND.parse().unwrap()
}

/// `meshctl service add CLUSTER default/gsvc ... EXTRA`.
fn declare(lab: &Lab, cluster: &str, extra: &[&str]) {
    let mut args = vec![
        "service",
        "add",
        cluster,
        SERVICE,
        "--frontend",
        "10.96.0.10:80/TCP",
        "--target-port",
        "8080",
        "--port-name",
        "echo",
        "--selector",
        "app=gsvc",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = lab.meshctl(&args);
    assert!(ok, "meshctl {args:?} failed:\n{stdout}\n{stderr}");
}

fn add_pod(lab: &Lab, spec: &str) {
    let (ok, _, stderr) =
        lab.meshctl(&["lab", "pod", "add", spec, "--labels", "app=gsvc", "--echo"]);
    assert!(ok, "lab pod add {spec} failed: {stderr}");
}

fn del_pod(lab: &Lab, spec: &str) {
    let (ok, _, stderr) = lab.meshctl(&["lab", "pod", "del", spec]);
    assert!(ok, "lab pod del {spec} failed: {stderr}");
}

/// The backends (cluster, address, preferred) the agent of c1/n1 programmed
/// for the frontend.
fn programmed(lab: &Lab) -> Vec<(String, String, bool)> {
    let state = lab.state();
    let node = &state.cluster("c1").expect("c1").nodes[0];
    let Ok(status) = read_agent_status(&node.status_socket) else {
        return Vec::new();
    };
    status
        .services
        .services
        .iter()
        .filter(|s| format!("{}/{}", s.namespace, s.name) == SERVICE)
        .flat_map(|s| &s.frontends)
        .filter(|f| f.frontend == "10.96.0.10:80/TCP")
        .flat_map(|f| &f.backends)
        .map(|b| (b.cluster.clone(), b.address.clone(), b.preferred))
        .collect()
}

/// Waits until c1/n1 programmed backends whose clusters and preference are
/// exactly `want` (sorted `(cluster, preferred)` pairs).
fn wait_programmed(lab: &Lab, what: &str, want: &[(&str, bool)]) {
    let mut want: Vec<(String, bool)> = want.iter().map(|(c, p)| ((*c).to_owned(), *p)).collect();
    want.sort();
    let mut last = Vec::new();
    let started = std::time::Instant::now();
    loop {
        let mut got: Vec<(String, bool)> = programmed(lab)
            .into_iter()
            .map(|(c, _, p)| (c, p))
            .collect();
        got.sort();
        if got == want {
            return;
        }
        if started.elapsed() > CONVERGE {
            panic!(
                "{what}: c1/n1 did not program {want:?} within {CONVERGE:?}; last {last:?}\n{}",
                lab.logs_tail()
            );
        }
        last = got;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` new TCP connections from `client` to the frontend; answers per
/// `cluster/pod`. Panics on any failed connection.
fn connections(client: &PodRecord, n: usize) -> BTreeMap<String, usize> {
    let netns = client.netns.clone();
    let result = ip::in_netns(&netns, move || {
        let mut hits: BTreeMap<String, usize> = BTreeMap::new();
        let mut failures = Vec::new();
        for i in 0..n {
            match netprobe::tcp_request(frontend(), &format!("svc-{i}"), PROBE_TIMEOUT) {
                Ok(reply) => {
                    *hits
                        .entry(format!("{}/{}", reply.from.cluster, reply.from.pod))
                        .or_default() += 1;
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        (hits, failures)
    })
    .expect("enter the client pod");
    let (hits, failures) = result;
    assert!(
        failures.is_empty(),
        "{} of {n} connections to {FRONTEND} failed, e.g. {:?} (answers: {hits:?})",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    hits
}

fn clusters_of(hits: &BTreeMap<String, usize>) -> Vec<&str> {
    let mut c: Vec<&str> = hits.keys().filter_map(|k| k.split('/').next()).collect();
    c.dedup();
    c
}

#[test]
fn global_services_affinity_shared_local_and_long_lived_flows() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::up("svc", &["--clusters", "2", "--nodes", "2"]);
    let client = lab
        .state()
        .pod("c1", "echo-c1-n1")
        .expect("client pod")
        .clone();
    for spec in [
        "c1/n1/gsvc-a1",
        "c1/n2/gsvc-a2",
        "c2/n1/gsvc-b1",
        "c2/n2/gsvc-b2",
    ] {
        add_pod(&lab, spec);
    }

    // 1. Global in both clusters: 200 new connections reach both clusters.
    declare(&lab, "c1", &["--global"]);
    declare(&lab, "c2", &["--global"]);
    wait_programmed(
        &lab,
        "global service",
        &[("c1", false), ("c1", false), ("c2", false), ("c2", false)],
    );
    let hits = connections(&client, 200);
    eprintln!("global, affinity=none: {hits:?}");
    assert_eq!(clusters_of(&hits), ["c1", "c2"], "answers: {hits:?}");
    assert_eq!(hits.len(), 4, "every backend answers some of 200: {hits:?}");

    // `meshctl service list` shows the merged view with its clusters.
    let (ok, stdout, stderr) = lab.meshctl(&["service", "list", "--cluster", "c1", "-o", "json"]);
    assert!(ok, "service list failed: {stderr}");
    let list: serde_json::Value = serde_json::from_str(&stdout).expect("service list -o json");
    let backends = &list[0]["services"][0]["frontends"][0]["backends"];
    assert_eq!(backends.as_array().map(Vec::len), Some(4), "{stdout}");

    // 2. affinity=local: only c1's backends while they exist, then c2's.
    declare(&lab, "c1", &["--global", "--affinity", "local"]);
    wait_programmed(
        &lab,
        "affinity=local",
        &[("c1", true), ("c1", true), ("c2", false), ("c2", false)],
    );
    let hits = connections(&client, 200);
    eprintln!("affinity=local: {hits:?}");
    assert_eq!(clusters_of(&hits), ["c1"], "answers: {hits:?}");
    del_pod(&lab, "c1/gsvc-a1");
    del_pod(&lab, "c1/gsvc-a2");
    wait_programmed(
        &lab,
        "affinity=local without local backends",
        &[("c2", false), ("c2", false)],
    );
    let hits = connections(&client, 100);
    eprintln!("affinity=local, no local backends: {hits:?}");
    assert_eq!(clusters_of(&hits), ["c2"], "answers: {hits:?}");
    add_pod(&lab, "c1/n1/gsvc-a1");
    add_pod(&lab, "c1/n2/gsvc-a2");

    // 3. shared=false in c2: c1's clients never reach c2.
    declare(&lab, "c1", &["--global"]);
    declare(&lab, "c2", &["--global", "--shared=false"]);
    wait_programmed(&lab, "shared=false in c2", &[("c1", false), ("c1", false)]);
    let hits = connections(&client, 200);
    eprintln!("c2 shared=false: {hits:?}");
    assert_eq!(clusters_of(&hits), ["c1"], "answers: {hits:?}");

    // 4. Not global in c1 any more: local backends only, though c2 shares again.
    declare(&lab, "c2", &["--global"]);
    wait_programmed(
        &lab,
        "c2 shared again",
        &[("c1", false), ("c1", false), ("c2", false), ("c2", false)],
    );
    declare(&lab, "c1", &[]);
    wait_programmed(
        &lab,
        "global flag removed in c1",
        &[("c1", false), ("c1", false)],
    );
    let hits = connections(&client, 200);
    eprintln!("not global in c1: {hits:?}");
    assert_eq!(clusters_of(&hits), ["c1"], "answers: {hits:?}");

    // 5. A long-lived connection keeps its backend when one is added.
    declare(&lab, "c1", &["--global"]);
    wait_programmed(
        &lab,
        "global again",
        &[("c1", false), ("c1", false), ("c2", false), ("c2", false)],
    );
    let mut session = ip::in_netns(&client.netns, || {
        TcpSession::connect(frontend(), PROBE_TIMEOUT)
    })
    .expect("enter the client pod")
    .expect("long-lived connection to the frontend");
    let first = session.request("before").expect("first request");
    add_pod(&lab, "c2/n1/gsvc-b3");
    wait_programmed(
        &lab,
        "a third c2 backend",
        &[
            ("c1", false),
            ("c1", false),
            ("c2", false),
            ("c2", false),
            ("c2", false),
        ],
    );
    for i in 0..20 {
        let reply = session
            .request(&format!("after-{i}"))
            .expect("the long-lived connection survives adding a backend");
        assert_eq!(
            (reply.from.cluster.as_str(), reply.from.pod.as_str()),
            (first.from.cluster.as_str(), first.from.pod.as_str()),
            "the long-lived connection moved to another backend"
        );
    }
    let hits = connections(&client, 200);
    eprintln!("five backends: {hits:?}");
    assert!(
        hits.contains_key("c2/gsvc-b3"),
        "the new backend takes new flows: {hits:?}"
    );

    // 6. Hairpin: a backend pod calls its own service and is often picked
    //    itself (1 in 5 here), over TCP and over UDP (a second frontend
    //    port, same backends); every connection is answered, its own ones
    //    included (without the service loopback SNAT they time out).
    let (ok, stdout, stderr) = lab.meshctl(&[
        "service",
        "add",
        "c1",
        "default/gsvc-udp",
        "--frontend",
        "10.96.0.10:53/UDP",
        "--target-port",
        "8080",
        "--port-name",
        "echo-udp",
        "--selector",
        "app=gsvc",
    ]);
    assert!(ok, "meshctl service add (UDP) failed:\n{stdout}\n{stderr}");
    let backend = lab
        .state()
        .pod("c1", "gsvc-a1")
        .expect("backend pod")
        .clone();
    let udp_frontend: SocketAddr = "10.96.0.10:53".parse().unwrap();
    eventually("c1/n1 to program the UDP frontend", CONVERGE, || {
        ip::in_netns(&backend.netns, move || {
            netprobe::udp_request(udp_frontend, "ready?", PROBE_TIMEOUT).is_ok()
        })
        .unwrap_or(false)
    });
    let hits = connections(&backend, 100);
    eprintln!("hairpin, TCP from c1/gsvc-a1: {hits:?}");
    assert!(
        hits.contains_key("c1/gsvc-a1"),
        "the pod reached itself: {hits:?}"
    );
    let udp_hits = ip::in_netns(&backend.netns, move || {
        let mut hits: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..40 {
            let reply = netprobe::udp_request(udp_frontend, &format!("udp-{i}"), PROBE_TIMEOUT)
                .unwrap_or_else(|e| panic!("UDP request {i} to {udp_frontend}: {e}"));
            *hits.entry(reply.from.pod).or_default() += 1;
        }
        hits
    })
    .expect("enter the backend pod");
    eprintln!("hairpin, UDP from c1/gsvc-a1: {udp_hits:?}");
    assert!(
        udp_hits.contains_key("gsvc-a1"),
        "UDP reached itself: {udp_hits:?}"
    );

    // 7. Deleting the service in c1 removes the frontend from c1's agents.
    let (ok, _, stderr) = lab.meshctl(&["service", "del", "c1", SERVICE]);
    assert!(ok, "service del failed: {stderr}");
    eventually("c1/n1 to drop the frontend", CONVERGE, || {
        programmed(&lab).is_empty()
    });
    let failed = ip::in_netns(&client.netns, || {
        netprobe::tcp_request(frontend(), "gone", Duration::from_secs(2)).is_err()
    })
    .expect("enter the client pod");
    assert!(
        failed,
        "{FRONTEND} still answers after the service was deleted"
    );
}
