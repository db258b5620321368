//! The plan's rules, on stores over the in-memory backend.

use super::*;
use std::sync::Arc;

use crate::clusters::test_support::{kv, memory_cluster, MAX};
use api::{ClusterId, Node, NumericIdentity};

fn node(cluster: &str, id: u16, name: &str, ip: &str, cidr: &str) -> Node {
    let mut n = Node::new(
        name,
        cluster.parse().unwrap(),
        ClusterId::new(id, MAX).unwrap(),
    );
    n.set_address(api::AddressType::InternalIp, ip.parse().unwrap());
    n.set_pod_cidrs([cidr.parse().unwrap()]);
    n
}

fn pod(ip: &str, identity: u32, host: &str) -> api::IpcacheEntry {
    api::IpcacheEntry::new(
        ip.parse().unwrap(),
        NumericIdentity(identity),
        Some(host.parse().unwrap()),
    )
}

/// Real WatchStores over the in-memory backend, synced.
async fn cluster(
    name: &str,
    id: u16,
    local: bool,
    nodes: &[Node],
    pods: &[api::IpcacheEntry],
) -> ClusterEntry {
    let records = nodes.iter().map(kv).chain(pods.iter().map(kv));
    memory_cluster(name, id, local, records).await
}

fn me(routing: Routing, encryption: Encryption) -> LocalNode {
    LocalNode {
        cluster: "c1".into(),
        node_name: "n1".into(),
        node_ip: Ipv4Addr::new(192, 168, 1, 2),
        routing,
        encryption,
    }
}

/// [`desired_state`] of the stores, checked against an [`Index`] built
/// from the same stores.
fn full(clusters: &BTreeMap<ClusterName, ClusterEntry>, me: &LocalNode) -> Desired {
    let d = desired_state(&active_clusters(clusters), me);
    let index = Index::build(active_clusters(clusters), me.clone());
    assert_eq!(index.to_desired(), d, "index built from the stores");
    d
}

async fn two_clusters() -> BTreeMap<ClusterName, ClusterEntry> {
    let c1 = cluster(
        "c1",
        1,
        true,
        &[
            node("c1", 1, "n1", "192.168.1.2", "10.1.1.0/24"),
            node("c1", 1, "n2", "192.168.1.3", "10.1.2.0/24"),
        ],
        &[
            pod("10.1.1.5", 65_800, "192.168.1.2"),
            pod("10.1.2.7", 65_801, "192.168.1.3"),
        ],
    )
    .await;
    let c2 = cluster(
        "c2",
        2,
        false,
        &[node("c2", 2, "m1", "192.168.2.2", "10.2.1.0/24")],
        &[pod("10.2.1.9", 131_400, "192.168.2.2")],
    )
    .await;
    [("c1".parse().unwrap(), c1), ("c2".parse().unwrap(), c2)].into()
}

fn entry(identity: u32, tep: Option<&str>, flags: IpcacheFlags) -> IpcacheEntry {
    IpcacheEntry {
        identity,
        tunnel_endpoint: tep.map(|t| t.parse().unwrap()),
        flags,
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[tokio::test]
async fn tunnel_mode_entries_of_every_cluster() {
    let d = full(
        &two_clusters().await,
        &me(Routing::Tunnel, Encryption::None),
    );
    let remote = IpcacheFlags::REMOTE_CLUSTER;
    let expected: BTreeMap<IpNet, IpcacheEntry> = [
        (net("10.1.1.5/32"), entry(65_800, None, IpcacheFlags::NONE)),
        (
            net("10.1.2.7/32"),
            entry(65_801, Some("192.168.1.3"), IpcacheFlags::NONE),
        ),
        (
            net("10.1.2.0/24"),
            entry(2, Some("192.168.1.3"), IpcacheFlags::NONE),
        ),
        (
            net("10.2.1.9/32"),
            entry(131_400, Some("192.168.2.2"), remote),
        ),
        (net("10.2.1.0/24"), entry(2, Some("192.168.2.2"), remote)),
    ]
    .into();
    assert_eq!(d.ipcache, expected);
    assert_eq!(
        d.remotes.keys().map(String::as_str).collect::<Vec<_>>(),
        ["c1/n2", "c2/m1"]
    );
    assert_eq!(d.conflicts, 0);
}

#[tokio::test]
async fn native_wireguard_entries_have_no_tunnel_endpoint_and_encrypt() {
    let d = full(
        &two_clusters().await,
        &me(Routing::Native, Encryption::Wireguard),
    );
    assert_eq!(
        d.ipcache[&net("10.2.1.9/32")],
        entry(
            131_400,
            None,
            IpcacheFlags::REMOTE_CLUSTER | IpcacheFlags::ENCRYPT
        )
    );
    assert_eq!(
        d.ipcache[&net("10.1.1.5/32")],
        entry(65_800, None, IpcacheFlags::NONE)
    );
}

#[tokio::test]
async fn the_local_cluster_wins_a_prefix_claimed_twice() {
    let mut clusters = two_clusters().await;
    // c2 claims c1's pod IP (with an identity in c2's own range).
    clusters.insert(
        "c2".parse().unwrap(),
        cluster(
            "c2",
            2,
            false,
            &[],
            &[pod("10.1.1.5", 131_401, "192.168.2.2")],
        )
        .await,
    );
    let d = full(&clusters, &me(Routing::Tunnel, Encryption::None));
    assert_eq!(d.ipcache[&net("10.1.1.5/32")].identity, 65_800);
    assert_eq!(d.conflicts, 1);
}

fn map(pairs: &[(&'static str, u32)]) -> BTreeMap<&'static str, u32> {
    pairs.iter().copied().collect()
}

#[test]
fn unchanged_entries_are_not_written() {
    let d = map(&[("a", 1), ("b", 2)]);
    assert!(diff(&d, &d.clone(), true).is_empty());
}

#[test]
fn new_and_changed_are_upserted_vanished_deleted_first() {
    let desired = map(&[("a", 1), ("b", 3), ("c", 4)]);
    let actual = map(&[("a", 1), ("b", 2), ("z", 9)]);
    assert_eq!(
        diff(&desired, &actual, true),
        vec![Op::Delete("z"), Op::Upsert("b", 3), Op::Upsert("c", 4)]
    );
}

#[test]
fn nothing_is_deleted_before_the_sweep_is_allowed() {
    // Restart: the adopted map holds the previous run's entries, the
    // clusters have synced only partly.
    let desired = map(&[("a", 1)]);
    let actual = map(&[("a", 1), ("b", 2), ("c", 3)]);
    assert!(diff(&desired, &actual, false).is_empty());
    assert_eq!(
        diff(&desired, &actual, true),
        vec![Op::Delete("b"), Op::Delete("c")]
    );
}

#[test]
fn a_changed_peer_is_removed_then_added() {
    let desired = map(&[("k1", 2), ("k2", 5)]);
    let actual = map(&[("k1", 1), ("k3", 7)]);
    assert_eq!(
        peer_ops(&desired, &actual),
        vec![
            Op::Delete("k1"),
            Op::Delete("k3"),
            Op::Upsert("k1", 2),
            Op::Upsert("k2", 5)
        ]
    );
    assert!(peer_ops(&desired, &desired.clone()).is_empty());
}

/// Property test: the index, fed the changes of random histories one by
/// one (delayed, batched and repeated as the queues deliver them), always
/// agrees with [`desired_state`] computed from scratch, and the writes it
/// asks for keep a map equal to that state, with no deletion before the
/// sweep. The pools are small so that prefixes are claimed by several
/// clusters, connections, endpoints and node CIDRs at once.
mod incremental {
    use super::*;
    use std::sync::Mutex;

    use rand::{rngs::StdRng, seq::IndexedRandom, Rng, SeedableRng};

    const SEQUENCES: u64 = 500;
    const STEPS: usize = 120;

    /// A connection's records in plain maps (what a store holds).
    #[derive(Debug, Default)]
    struct Model {
        endpoints: Mutex<BTreeMap<IpAddr, Arc<api::IpcacheEntry>>>,
        nodes: Mutex<BTreeMap<String, Arc<Node>>>,
    }

    impl SourceView for Model {
        fn endpoint(&self, ip: IpAddr) -> Option<Arc<api::IpcacheEntry>> {
            self.endpoints.lock().unwrap().get(&ip).cloned()
        }
        fn endpoints(&self) -> Vec<Arc<api::IpcacheEntry>> {
            self.endpoints.lock().unwrap().values().cloned().collect()
        }
        fn node(&self, name: &str) -> Option<Arc<Node>> {
            self.nodes.lock().unwrap().get(name).cloned()
        }
        fn nodes(&self) -> Vec<Arc<Node>> {
            self.nodes.lock().unwrap().values().cloned().collect()
        }
    }

    const ENDPOINT_IPS: &[&str] = &[
        "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.9.0.1", "10.9.0.5", "fd00::1", "fd00::2",
    ];
    const HOSTS: &[Option<&str>] = &[
        Some("192.168.1.2"), // this node
        Some("192.168.1.3"),
        Some("192.168.2.2"),
        Some("fd00::99"),
        None,
    ];
    const NODE_NAMES: &[&str] = &["n1", "n2", "n3"];
    const CIDRS: &[&str] = &[
        "10.0.0.1/32",
        "10.0.0.2/32",
        "10.9.0.0/24",
        "10.9.0.7/24", // truncates to 10.9.0.0/24
        "10.8.0.0/16",
        "fd00::/64",
        "fd00::1/128",
    ];
    const UNDERLAYS: &[Option<&str>] = &[
        Some("192.168.1.3"),
        Some("192.168.2.2"),
        Some("192.168.3.2"),
        Some("fd00::7"), // no IPv4 underlay: the node does not count
        None,
    ];
    const KEYS: &[&str] = &[
        "",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
    ];

    fn shared(clusters: &[ActiveCluster<Model>]) -> Vec<ActiveCluster<Model>> {
        clusters
            .iter()
            .map(|c| ActiveCluster {
                name: c.name.clone(),
                local: c.local,
                sources: c.sources.clone(),
            })
            .collect()
    }

    /// Changes one record of a random connection the way a store
    /// would, and queues the change it would report.
    fn mutate(
        rng: &mut StdRng,
        clusters: &[ActiveCluster<Model>],
        pending: &mut Vec<(usize, usize, Change)>,
    ) {
        let ci = rng.random_range(0..clusters.len());
        let si = rng.random_range(0..clusters[ci].sources.len());
        let cluster = &clusters[ci];
        let source = &cluster.sources[si];
        let id = u16::try_from(ci + 1).unwrap();
        let change = match rng.random_range(0..10) {
            0..=3 => {
                let ip: IpAddr = ENDPOINT_IPS.choose(rng).unwrap().parse().unwrap();
                let host = HOSTS.choose(rng).unwrap().map(|h| h.parse().unwrap());
                let identity = NumericIdentity(rng.random_range(65_536..65_540));
                let ep = api::IpcacheEntry::new(ip, identity, host);
                source.endpoints.lock().unwrap().insert(ip, Arc::new(ep));
                Change::Endpoint(ip)
            }
            4..=5 => {
                let ip: IpAddr = ENDPOINT_IPS.choose(rng).unwrap().parse().unwrap();
                if source.endpoints.lock().unwrap().remove(&ip).is_none() {
                    return; // a store reports nothing for an absent key
                }
                Change::Endpoint(ip)
            }
            6..=8 => {
                let name = *NODE_NAMES.choose(rng).unwrap();
                let mut node = Node::new(
                    name,
                    cluster.name.parse().unwrap(),
                    ClusterId::new(id, MAX).unwrap(),
                );
                if let Some(u) = UNDERLAYS.choose(rng).unwrap() {
                    node.set_address(api::AddressType::InternalIp, u.parse().unwrap());
                }
                let n = rng.random_range(0..=3);
                node.set_pod_cidrs(
                    CIDRS
                        .choose_multiple(rng, n)
                        .map(|c| c.parse::<IpNet>().unwrap()),
                );
                (*KEYS.choose(rng).unwrap()).clone_into(&mut node.wireguard_pub_key);
                source
                    .nodes
                    .lock()
                    .unwrap()
                    .insert(name.to_owned(), Arc::new(node));
                Change::Node(name.to_owned())
            }
            _ => {
                let name = *NODE_NAMES.choose(rng).unwrap();
                if source.nodes.lock().unwrap().remove(name).is_none() {
                    return;
                }
                Change::Node(name.to_owned())
            }
        };
        pending.push((ci, si, change));
    }

    fn apply_ops(
        actual: &mut BTreeMap<IpNet, IpcacheEntry>,
        ops: Vec<Op<IpNet, IpcacheEntry>>,
        sweep: bool,
    ) {
        for op in ops {
            match op {
                Op::Upsert(p, e) => {
                    actual.insert(p, e);
                }
                Op::Delete(p) => {
                    assert!(sweep, "{p} deleted before the sweep");
                    actual.remove(&p);
                }
            }
        }
    }

    fn check(
        seed: u64,
        step: usize,
        index: &Index<Model>,
        clusters: &[ActiveCluster<Model>],
        me: &LocalNode,
        actual: &BTreeMap<IpNet, IpcacheEntry>,
        sweep: bool,
    ) {
        let want = desired_state(clusters, me);
        assert_eq!(index.to_desired(), want, "seed {seed}, step {step}");
        if sweep {
            assert_eq!(actual, &want.ipcache, "map, seed {seed}, step {step}");
        } else {
            for (prefix, entry) in &want.ipcache {
                assert_eq!(actual.get(prefix), Some(entry), "seed {seed}, step {step}");
            }
        }
    }

    #[test]
    fn incremental_changes_agree_with_the_full_rebuild() {
        let mut conflicts_seen = 0;
        let mut deletes_seen = 0;
        for seed in 0..SEQUENCES {
            let mut rng = StdRng::seed_from_u64(seed);
            let me = LocalNode {
                cluster: "c1".into(),
                node_name: "n1".into(),
                node_ip: Ipv4Addr::new(192, 168, 1, 2),
                routing: *[Routing::Tunnel, Routing::Native].choose(&mut rng).unwrap(),
                encryption: *[Encryption::None, Encryption::Wireguard]
                    .choose(&mut rng)
                    .unwrap(),
            };
            // Clusters in a random order, one or two connections each
            // (a reconnect in progress keeps the previous one).
            let mut names = vec![("c3", false), ("c1", true), ("c2", false)];
            names.rotate_left(rng.random_range(0..3));
            let mut clusters: Vec<ActiveCluster<Model>> = names
                .into_iter()
                .map(|(name, local)| ActiveCluster {
                    name: name.into(),
                    local,
                    sources: (0..rng.random_range(1..=2))
                        .map(|_| Arc::new(Model::default()))
                        .collect(),
                })
                .collect();
            sort_by_precedence(&mut clusters);
            let mut pending = Vec::new();
            // The initial listing, then a map adopted from a previous run
            // with stale entries.
            for _ in 0..rng.random_range(0..12) {
                mutate(&mut rng, &clusters, &mut pending);
            }
            pending.clear();
            let mut actual: BTreeMap<IpNet, IpcacheEntry> = (0..rng.random_range(0..4))
                .map(|i| {
                    (
                        net(&format!("10.7.0.{i}/32")),
                        entry(9, None, IpcacheFlags::NONE),
                    )
                })
                .collect();
            let mut sweep = false;
            let mut index = Index::build(shared(&clusters), me.clone());
            let ops = diff(&desired_state(&clusters, &me).ipcache, &actual, sweep);
            apply_ops(&mut actual, ops, sweep);
            check(seed, 0, &index, &clusters, &me, &actual, sweep);
            for step in 1..=STEPS {
                mutate(&mut rng, &clusters, &mut pending);
                if rng.random_bool(0.1) {
                    // Reported twice (a replay is harmless).
                    if let Some(last) = pending.last().cloned() {
                        pending.push(last);
                    }
                }
                if step == STEPS / 2 {
                    // Every cluster synced: a full pass, sweeping from now on.
                    sweep = true;
                    pending.clear();
                    index = Index::build(shared(&clusters), me.clone());
                    let ops = diff(&desired_state(&clusters, &me).ipcache, &actual, sweep);
                    deletes_seen += ops.iter().filter(|o| matches!(o, Op::Delete(_))).count();
                    apply_ops(&mut actual, ops, sweep);
                } else if rng.random_bool(0.3) || step == STEPS {
                    // A pass takes what was queued so far.
                    let mut touched = Touched::default();
                    for (ci, si, change) in pending.drain(..) {
                        index.apply(ci, si, &change, &mut touched);
                    }
                    let ops = index.ops_for(&touched.prefixes, &actual, sweep);
                    deletes_seen += ops.iter().filter(|o| matches!(o, Op::Delete(_))).count();
                    apply_ops(&mut actual, ops, sweep);
                }
                if pending.is_empty() {
                    check(seed, step, &index, &clusters, &me, &actual, sweep);
                    conflicts_seen += index.conflicts();
                }
            }
        }
        // The histories did exercise what they are meant to.
        assert!(conflicts_seen > 1_000, "{conflicts_seen} conflicts");
        assert!(deletes_seen > 1_000, "{deletes_seen} deletions");
    }
}
