//! The trust boundary between clusters, end to end (`docs/architecture.md`
//! §8):
//!
//! * every etcd credential present on every node of a lab (its own
//!   cluster's, and each remote cluster's) is tried: every write is refused,
//!   and so is every read of the apiserver's private prefix;
//! * a cluster turns hostile after connect (its control plane taken over:
//!   its apiserver is killed and the attacker writes its etcd as root):
//!   none of its claims on other clusters' addresses reaches any map, each is
//!   counted by reason and logged once, its legitimate records keep
//!   arriving, and traffic between legitimate pods is unaffected.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use api::{ClusterId, ClusterName, ClusterService, IpcacheEntry, MaxConnectedClusters, Node};
use api::{L4Addr, L4Protocol, NumericIdentity, Resource};
use kvstore::{KvWrite as _, Leases as _, ListWatch as _, Transactions as _};
use meshctl::clustermesh::config::configured_clusters;
use meshctl::clustermesh::status::read_agent_status;
use meshctl::lab::state::{ClusterState, LabState, PodRecord, Role};
use meshctl::lab::{self, ip, supervise};
use multi_cluster_tests::{eventually, prerequisites, probe, Lab, Proto};

const CONVERGE: Duration = Duration::from_secs(60);

/// Runs `f` with a client of the etcd that `config` (a config file) names,
/// from inside network namespace `netns`.
fn with_etcd<T, Fut>(
    netns: &str,
    config: &Path,
    f: impl FnOnce(kvstore::EtcdBackend) -> Fut + Send + 'static,
) -> T
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let config = kvstore::EtcdConfig::from_file(config)
        .unwrap_or_else(|e| panic!("{}: {}", config.display(), kvstore::error_chain(&e)));
    ip::block_on(Some(netns), move || async move {
        let client = kvstore::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("connect: {}", kvstore::error_chain(&e)));
        f(client).await
    })
    .expect("enter the namespace")
}

fn denied<T: std::fmt::Debug>(what: &str, result: Result<T, kvstore::BackendError>) -> u32 {
    match result {
        Err(e) if e.is_permission_denied() => 1,
        other => panic!("{what}: expected permission denied, got {other:?}"),
    }
}

/// Every config file (with its certificates) installed on `node` of
/// `cluster`: the local cluster's and each remote cluster's.
fn credentials(
    state: &LabState,
    cluster: &ClusterState,
    node: usize,
) -> Vec<(String, std::path::PathBuf)> {
    let n = &cluster.nodes[node];
    let layout = lab::Layout::new(&state.dir);
    let mut out: Vec<(String, std::path::PathBuf)> =
        configured_clusters(&layout.node(&n.name).join("local-etcd"))
            .into_iter()
            .collect();
    out.extend(configured_clusters(&n.clustermesh_dir));
    out
}

#[test]
fn every_etcd_credential_on_every_node_writes_nothing() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::up("cred", &["--clusters", "2", "--nodes", "2"]);
    let state = lab.state();
    let mut tried = 0;
    for cluster in &state.clusters {
        for (i, node) in cluster.nodes.iter().enumerate() {
            let found = credentials(&state, cluster, i);
            assert_eq!(
                found.len(),
                2,
                "{}: local and one remote credential: {found:?}",
                node.name
            );
            for (target, path) in found {
                let what = format!("{} with its credential for {target}", node.name);
                let denials = with_etcd(&node.netns, &path, move |etcd| async move {
                    let target = ClusterName::new(&target).unwrap();
                    // The credential is good for reading what a reader needs.
                    etcd.list("cilium/state/")
                        .await
                        .expect("a reader reads the state");
                    let hijack = IpcacheEntry::new(
                        "10.1.2.2".parse().unwrap(),
                        NumericIdentity(1 << 16 | 300),
                        Some("192.168.2.11".parse().unwrap()),
                    );
                    let mut n = 0;
                    for key in [
                        hijack.key(),
                        format!("cilium/state/nodes/v1/{target}/evil"),
                        api::keys::cluster_config_key(&target),
                        api::keys::HEARTBEAT_KEY.to_owned(),
                        format!("{}x", api::keys::registry_prefix(target.as_str())),
                        "elsewhere".to_owned(),
                    ] {
                        n += denied(&key, etcd.put(&key, &hijack.encode(), None).await);
                    }
                    n += denied("delete", etcd.delete(api::keys::HEARTBEAT_KEY).await);
                    let txn = kvstore::Txn::new().and_then([kvstore::TxnOp::put(
                        hijack.key(),
                        hijack.encode(),
                        None,
                    )]);
                    n += denied("txn", etcd.txn(&txn).await);
                    if let Ok(lease) = etcd.grant(Duration::from_secs(60)).await {
                        n += denied(
                            "put with a lease",
                            etcd.put(&hijack.key(), b"x", Some(lease)).await,
                        );
                    }
                    for prefix in [
                        api::keys::registry_prefix(target.as_str()),
                        "mesh/".to_owned(),
                        "cilium/".to_owned(),
                    ] {
                        n += denied(&prefix, etcd.list(&prefix).await);
                    }
                    n
                });
                assert!(denials >= 11, "{what}: {denials} refusals");
                tried += 1;
            }
        }
    }
    assert_eq!(tried, 8, "2 clusters × 2 nodes × 2 credentials");
}

/// The root credential of a lab cluster's etcd, installed as a config file
/// under `dir`.
fn root_config(state: &LabState, cluster: &ClusterState, dir: &Path) -> std::path::PathBuf {
    lab::etcd_config_for(state, cluster, kvstore::auth::ROOT_USER)
        .unwrap()
        .install(dir, &cluster.name)
        .unwrap()
}

fn c2() -> (ClusterName, ClusterId) {
    let max = MaxConnectedClusters::Max255;
    ("c2".parse().unwrap(), ClusterId::new(2, max).unwrap())
}

fn node(name: &str, ip: &str, cidrs: &[&str]) -> Node {
    let (cluster, id) = c2();
    let mut n = Node::new(name, cluster, id);
    n.set_address(api::AddressType::InternalIp, ip.parse().unwrap());
    n.set_pod_cidrs(cidrs.iter().map(|c| c.parse().unwrap()));
    n
}

fn endpoint(ip: &str, host: Option<&str>) -> IpcacheEntry {
    IpcacheEntry::new(
        ip.parse().unwrap(),
        NumericIdentity(2 << 16 | 999),
        host.map(|h| h.parse().unwrap()),
    )
}

/// Keys and values to write into an etcd.
type Records = Vec<(String, Vec<u8>)>;

/// What the hostile c2 publishes, with how many records each reason refuses.
fn hostile() -> (Records, Vec<(&'static str, u64)>) {
    let nodes = [
        node("evil-default", "192.168.2.91", &["0.0.0.0/0", "::/0"]),
        node("evil-c1", "192.168.2.92", &["10.1.0.0/16"]),
        node("evil-underlay", "192.168.2.93", &["192.168.0.0/15"]),
        node("evil-c1-subnet", "192.168.2.94", &["192.168.1.0/24"]),
        node("evil-c1-node", "192.168.1.11", &["10.2.77.0/24"]),
        node("evil-c3-part", "192.168.2.95", &["10.3.1.128/25"]),
        node("evil-v6", "192.168.2.96", &["fd00:1:1::/64"]),
        node("evil-loopback", "192.168.2.97", &["169.254.42.0/24"]),
    ];
    let endpoints = [
        endpoint("10.1.1.2", Some("192.168.2.11")),
        endpoint("10.3.1.2", Some("192.168.2.11")),
        endpoint("192.168.1.11", Some("192.168.2.11")),
        endpoint("169.254.42.1", Some("192.168.2.11")),
        endpoint("fe80::1", Some("192.168.2.11")),
        endpoint("fd00:1:1::5", Some("192.168.2.11")),
        endpoint("10.2.1.77", Some("192.168.1.11")),
        endpoint("10.2.1.78", None),
    ];
    let mut records: Records = nodes.iter().map(|n| (n.key(), n.encode())).collect();
    records.extend(endpoints.iter().map(|e| (e.key(), e.encode())));
    let reasons = vec![
        ("endpoint-host-not-a-node", 1),
        ("endpoint-is-node-address", 1),
        ("endpoint-outside-pod-cidrs", 3),
        ("endpoint-reserved-address", 2),
        ("endpoint-without-host", 1),
        ("node-address-outside-allowed", 1),
        ("node-cidr-default-route", 1),
        ("node-cidr-outside-allowed", 4),
        ("node-cidr-reserved", 1),
        ("node-cidr-too-short", 1),
        ("service-backend-not-an-endpoint", 2),
    ];
    (records, reasons)
}

/// Waits (up to [`CONVERGE`]) until `get` returns `want`; panics with the
/// last value otherwise.
fn wait_eq<T: PartialEq + std::fmt::Debug>(what: &str, mut get: impl FnMut() -> T, want: &T) {
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let got = get();
        if got == *want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: after {CONVERGE:?}\n got {got:?}\nwant {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pod<'a>(state: &'a LabState, name: &str) -> &'a PodRecord {
    state
        .pods
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("pod {name}"))
}

/// c2's global service `default/web`, as the attacker rewrites it: its own
/// pod and two pods of other clusters as backends.
fn hostile_service(own: IpAddr) -> ClusterService {
    let (cluster, id) = c2();
    let mut s = ClusterService::new(cluster, id, "default", "web");
    let port = |p| {
        [(
            "echo".to_owned(),
            L4Addr {
                protocol: L4Protocol::Tcp,
                port: p,
            },
        )]
        .into()
    };
    s.frontends.insert("10.96.0.10".parse().unwrap(), port(80));
    for ip in [
        own,
        "10.1.1.2".parse().unwrap(),
        "10.3.1.2".parse().unwrap(),
    ] {
        s.backends.insert(ip, port(8080));
    }
    s
}

#[test]
fn a_cluster_turned_hostile_steers_nothing() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::up("hst", &["--clusters", "3", "--nodes", "1"]);
    // A global service in c1 and c2, with a backend in c2.
    let (ok, _, stderr) = lab.meshctl(&[
        "lab",
        "pod",
        "add",
        "c2/n1/web",
        "--labels",
        "app=web",
        "--echo",
    ]);
    assert!(ok, "{stderr}");
    for c in ["c1", "c2"] {
        let (ok, out, err) = lab.meshctl(&[
            "service",
            "add",
            c,
            "default/web",
            "--frontend",
            "10.96.0.10:80/TCP",
            "--target-port",
            "8080",
            "--port-name",
            "echo",
            "--selector",
            "app=web",
            "--global",
        ]);
        assert!(ok, "{out}\n{err}");
    }
    let state = lab.state();
    let web = IpAddr::V4(pod(&state, "web").ip.expect("web has an IP"));
    let c1 = state.cluster("c1").unwrap().clone();
    let c2_state = state.cluster("c2").unwrap().clone();
    let backends = |node: &meshctl::lab::state::NodeState| -> Vec<String> {
        read_agent_status(&node.status_socket)
            .map(|s| {
                s.services
                    .services
                    .iter()
                    .filter(|s| s.name == "web")
                    .flat_map(|s| &s.frontends)
                    .flat_map(|f| &f.backends)
                    .map(|b| format!("{} {}", b.cluster, b.address))
                    .collect()
            })
            .unwrap_or_default()
    };
    let want_backends = [format!("c2 {web}:8080")];
    eventually("c1 to program c2's web backend", CONVERGE, || {
        backends(&c1.nodes[0]) == want_backends
    });

    // c2's control plane is taken over: its apiserver dies (its records
    // stay, on their 15-minute leases) and the attacker writes its etcd.
    for p in state
        .processes
        .iter()
        .filter(|p| p.role == Role::Apiserver && p.cluster == "c2")
    {
        supervise::kill_hard(p);
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = root_config(&state, &c2_state, tmp.path());
    let (mut records, reasons) = hostile();
    let service = hostile_service(web);
    records.push((service.key(), service.encode()));
    // An identity naming c1 under a second source, and a new legitimate
    // endpoint of c2: the former is refused by validation, the latter must
    // arrive.
    records.push((
        format!("cilium/state/identities/v1/id/{}", 2 << 16 | 998),
        b"k8s:app=x;k8s:io.cilium.k8s.policy.cluster=c2;any:io.cilium.k8s.policy.cluster=c1;"
            .to_vec(),
    ));
    let fresh = endpoint("10.2.1.50", Some("192.168.2.11"));
    records.push((fresh.key(), fresh.encode()));
    with_etcd(&c2_state.control_netns, &root, move |etcd| async move {
        for (key, value) in records {
            etcd.put(&key, &value, None)
                .await
                .expect("the attacker writes");
        }
    });

    // Every reader refuses every claim, and counts it by reason.
    let want: std::collections::BTreeMap<String, u64> =
        reasons.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect();
    for reader in ["c1", "c3"] {
        let node = &state.cluster(reader).unwrap().nodes[0];
        let not_owned = || {
            read_agent_status(&node.status_socket)
                .ok()
                .and_then(|s| s.clusters.into_iter().find(|c| c.name == "c2"))
                .map(|c| (c.not_owned, c.rejected, c.ready))
        };
        wait_eq(
            &format!("{reader}'s refusals of c2's claims"),
            || not_owned().map(|(n, _, _)| n),
            &Some(want.clone()),
        );
        let (_, rejected, ready) = not_owned().unwrap();
        assert!(ready, "{reader}: c2's connection stays up");
        assert!(
            rejected.get("cluster_mismatch").copied().unwrap_or(0) >= 1,
            "{reader}: the identity naming c1 is refused: {rejected:?}"
        );

        let ipcache = datapath::Ipcache::open(&node.bpffs).expect("ipcache");
        let entries: Vec<(ipnet::IpNet, datapath::IpcacheEntry)> = ipcache
            .iter()
            .collect::<Result<_, _>>()
            .expect("dump ipcache");
        for claimed in [
            "0.0.0.0/0",
            "::/0",
            "10.1.0.0/16",
            "192.168.0.0/15",
            "192.168.1.0/24",
            "10.2.77.0/24",
            "10.3.1.128/25",
            "fd00:1:1::/64",
            "169.254.42.0/24",
            "192.168.1.11/32",
            "169.254.42.1/32",
            "fe80::1/128",
            "fd00:1:1::5/128",
            "10.2.1.77/32",
            "10.2.1.78/32",
        ] {
            let prefix: ipnet::IpNet = claimed.parse().unwrap();
            assert!(
                entries.iter().all(|(p, _)| *p != prefix),
                "{reader}: {prefix} reached the ipcache map"
            );
        }
        let tunnel = |ip: &str| {
            entries
                .iter()
                .find(|(p, _)| *p == ipnet::IpNet::from(ip.parse::<IpAddr>().unwrap()))
                .map(|(_, e)| e.tunnel_endpoint)
        };
        // Other clusters' pods keep their own nodes; c2's new pod arrives.
        let c3_pod = if reader == "c3" {
            None
        } else {
            Some("192.168.3.11".parse().unwrap())
        };
        assert_eq!(tunnel("10.3.1.2"), Some(c3_pod), "{reader}: c3's pod");
        let c1_pod = if reader == "c1" {
            None
        } else {
            Some("192.168.1.11".parse().unwrap())
        };
        assert_eq!(tunnel("10.1.1.2"), Some(c1_pod), "{reader}: c1's pod");
        eventually(&format!("{reader} to take c2's new pod"), CONVERGE, || {
            let map = datapath::Ipcache::open(&node.bpffs).unwrap();
            matches!(map.get("10.2.1.50/32".parse().unwrap()), Ok(Some(e))
                if e.tunnel_endpoint == Some("192.168.2.11".parse().unwrap()))
        });

        // Each refused record of c2 is logged once, however many passes ran.
        // (A legitimate record of another cluster may be refused for a moment
        // while it connects, e.g. c1's pod before c1's node arrived: the
        // stores of one cluster are separate watches, not one ordered stream.)
        let log = state
            .processes
            .iter()
            .find(|p| p.role == Role::Agent && p.cluster == reader)
            .map(|p| std::fs::read_to_string(&p.log).unwrap())
            .unwrap();
        for record in ["endpoint 10.1.1.2", "node evil-default", "endpoint fe80::1"] {
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains("record refused")
                        && l.contains("cluster=c2 ")
                        && l.contains(&format!("record={record} "))
                })
                .collect();
            assert_eq!(
                lines.len(),
                1,
                "{reader}: {record} logged {} times:\n{}",
                lines.len(),
                lines.join("\n")
            );
        }
    }
    assert_eq!(
        backends(&c1.nodes[0]),
        want_backends,
        "c1's web keeps c2's pod and takes neither foreign backend"
    );

    // Legitimate pods still talk across every cluster.
    let state = lab.state();
    let echo = |c: &str| pod(&state, &format!("echo-{c}-n1")).clone();
    for (a, b) in [("c1", "c3"), ("c3", "c1"), ("c1", "c2"), ("c3", "c2")] {
        probe(&echo(a), &echo(b), Proto::Tcp, "still-here")
            .unwrap_or_else(|e| panic!("{a} -> {b}: {e}"));
    }
}
