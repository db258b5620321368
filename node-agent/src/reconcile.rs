//! The reconciler's core: desired state versus what the datapath (or the
//! tunnel) holds, as a list of operations. Pure, so every rule is unit-tested
//! without a kernel:
//!
//! * only differences are written (an unchanged entry is never rewritten, so
//!   a packet never sees it missing);
//! * deletions happen only when `sweep` is allowed: after an agent restart
//!   the adopted maps hold the previous run's entries, and they must stay
//!   until every cluster has synced (or the sync timeout passed), or live
//!   traffic would lose its entries while the lists are still arriving;
//! * for WireGuard peers a changed peer is removed and added again, because
//!   boringtun cannot modify a peer in place ([`peer_ops`]).
//!
//! [`desired_state`] is the other pure half: the merged view of every
//! cluster ([`crate::clusters::Mesh`]) as ipcache entries and remote nodes
//! for the tunnel layer.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use api::ReservedIdentity;
use datapath::{IpcacheEntry, IpcacheFlags};
use ipnet::IpNet;
use tunnel::routes::RemoteNode;

use crate::{
    clusters::ClusterEntry,
    config::{Encryption, Routing},
};

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<K, V> {
    /// Insert or replace.
    Upsert(K, V),
    /// Remove.
    Delete(K),
}

/// The operations that turn `actual` into `desired`. Deletions are left out
/// unless `sweep` is true. Deletions come first, so that a replaced prefix
/// never has two owners in a map with limited room.
pub fn diff<K, V>(desired: &BTreeMap<K, V>, actual: &BTreeMap<K, V>, sweep: bool) -> Vec<Op<K, V>>
where
    K: Ord + Clone,
    V: PartialEq + Clone,
{
    let mut ops = Vec::new();
    if sweep {
        ops.extend(
            actual
                .keys()
                .filter(|k| !desired.contains_key(k))
                .map(|k| Op::Delete(k.clone())),
        );
    }
    ops.extend(
        desired
            .iter()
            .filter(|(k, v)| actual.get(k) != Some(v))
            .map(|(k, v)| Op::Upsert(k.clone(), v.clone())),
    );
    ops
}

/// Like [`diff`], but a changed value becomes a delete followed by an
/// upsert (for WireGuard peers under boringtun). Peers are always swept:
/// a stale peer only costs a handshake, never a map entry of live traffic.
pub fn peer_ops<K, V>(desired: &BTreeMap<K, V>, actual: &BTreeMap<K, V>) -> Vec<Op<K, V>>
where
    K: Ord + Clone,
    V: PartialEq + Clone,
{
    let mut ops = Vec::new();
    for (k, v) in actual {
        match desired.get(k) {
            None => ops.push(Op::Delete(k.clone())),
            Some(d) if d != v => ops.push(Op::Delete(k.clone())),
            Some(_) => {}
        }
    }
    for (k, v) in desired {
        if actual.get(k) != Some(v) {
            ops.push(Op::Upsert(k.clone(), v.clone()));
        }
    }
    ops
}

/// This node, as the desired-state computation needs it.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// Local cluster name.
    pub cluster: String,
    /// This node's name.
    pub node_name: String,
    /// This node's underlay address.
    pub node_ip: Ipv4Addr,
    /// Routing mode.
    pub routing: Routing,
    /// Encryption mode.
    pub encryption: Encryption,
}

/// The merged desired state of every cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// ipcache prefix → entry.
    pub ipcache: BTreeMap<IpNet, IpcacheEntry>,
    /// Every node but this one, for routes and WireGuard peers, keyed by
    /// `cluster/node`.
    pub remotes: BTreeMap<String, RemoteNode>,
    /// Prefixes claimed twice (the first claim wins: the local cluster, then
    /// clusters by name).
    pub conflicts: u64,
}

/// Computes the datapath's desired state from every cluster's stores.
///
/// * Every endpoint (ipcache record) of every cluster becomes a host prefix
///   with its identity. Pods of this node have no tunnel endpoint (they are
///   delivered through the `endpoints` map); every other pod, with tunnel
///   routing, has its node's underlay address (the record's `HostIP`) as the
///   tunnel endpoint. Entries of other clusters carry `REMOTE_CLUSTER`.
/// * Every other node's pod CIDRs map to `world` with the same tunnel
///   endpoint, so traffic to an address the records do not (yet) list still
///   reaches the right node.
/// * With native routing and WireGuard, remote entries carry `ENCRYPT` (the
///   kernel routes them into the WireGuard device). With tunnel routing,
///   encryption is a routing decision on the VXLAN packets (see the `tunnel`
///   crate), so the entries are the same as without it.
pub fn desired_state(clusters: &BTreeMap<String, ClusterEntry>, me: &LocalNode) -> Desired {
    let mut out = Desired::default();
    let mut order: Vec<(&String, &ClusterEntry)> = clusters.iter().collect();
    order.sort_by_key(|(name, e)| (!e.local, name.as_str()));
    let remote_flags = |local_cluster: bool| {
        let mut flags = IpcacheFlags::NONE;
        if !local_cluster {
            flags = flags | IpcacheFlags::REMOTE_CLUSTER;
        }
        if me.routing == Routing::Native && me.encryption == Encryption::Wireguard {
            flags = flags | IpcacheFlags::ENCRYPT;
        }
        flags
    };
    let tunnel_to = |host: Option<IpAddr>| match (me.routing, host) {
        (Routing::Tunnel, Some(ip @ IpAddr::V4(_))) => Some(ip),
        _ => None,
    };
    let insert =
        |out: &mut Desired, prefix: IpNet, entry: IpcacheEntry| match out.ipcache.entry(prefix) {
            std::collections::btree_map::Entry::Occupied(_) => out.conflicts += 1,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(entry);
            }
        };
    for (name, cluster) in order {
        let local_cluster = cluster.local;
        for stores in cluster.sources() {
            for ep in stores.endpoints.list() {
                let own_pod = local_cluster && ep.host_ip == Some(IpAddr::V4(me.node_ip));
                let entry = if own_pod {
                    IpcacheEntry {
                        identity: ep.id.0,
                        tunnel_endpoint: None,
                        flags: IpcacheFlags::NONE,
                    }
                } else {
                    IpcacheEntry {
                        identity: ep.id.0,
                        tunnel_endpoint: tunnel_to(ep.host_ip),
                        flags: remote_flags(local_cluster),
                    }
                };
                insert(&mut out, IpNet::from(ep.ip), entry);
            }
        }
        for stores in cluster.sources() {
            for node in stores.nodes.list() {
                if local_cluster && node.name == me.node_name {
                    continue;
                }
                let key = format!("{name}/{}", node.name);
                if out.remotes.contains_key(&key) {
                    continue;
                }
                let Some(underlay) = node.internal_ipv4() else {
                    continue;
                };
                let cidrs = node.pod_cidrs();
                for cidr in &cidrs {
                    insert(
                        &mut out,
                        cidr.trunc(),
                        IpcacheEntry {
                            identity: ReservedIdentity::World as u32,
                            tunnel_endpoint: tunnel_to(Some(IpAddr::V4(underlay))),
                            flags: remote_flags(local_cluster),
                        },
                    );
                }
                let wireguard_public_key = (!node.wireguard_pub_key.is_empty())
                    .then(|| tunnel::PublicKey::from_base64(&node.wireguard_pub_key).ok())
                    .flatten();
                out.remotes.insert(
                    key.clone(),
                    RemoteNode {
                        name: key,
                        underlay_ip: IpAddr::V4(underlay),
                        pod_cidrs: cidrs,
                        wireguard_public_key,
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use api::{ClusterId, ClusterName, MaxConnectedClusters, Node, NumericIdentity, Resource};
    use kvstore::{KvWrite, MemoryBackend, WatchStore, WatchStoreConfig};

    use crate::clusters::ClusterStores;

    const MAX: MaxConnectedClusters = MaxConnectedClusters::Max255;

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
        let backend = Arc::new(MemoryBackend::new());
        for n in nodes {
            backend.put(&n.key(), &n.encode(), None).await.unwrap();
        }
        for p in pods {
            backend.put(&p.key(), &p.encode(), None).await.unwrap();
        }
        let name: ClusterName = name.parse().unwrap();
        let scope = api::RemoteScope::new(name, ClusterId::new(id, MAX).unwrap(), MAX);
        let cfg = WatchStoreConfig::default();
        let stores = ClusterStores {
            nodes: WatchStore::spawn(backend.clone(), scope.clone(), cfg.clone()).0,
            endpoints: WatchStore::spawn(backend.clone(), scope.clone(), cfg.clone()).0,
            identities: WatchStore::spawn(backend.clone(), scope.clone(), cfg.clone()).0,
            services: WatchStore::spawn(backend, scope.clone(), cfg).0,
            scope,
        };
        stores.nodes.wait_until_synced().await;
        stores.endpoints.wait_until_synced().await;
        ClusterEntry {
            local,
            current: Some(Arc::new(stores)),
            previous: None,
            refused: false,
        }
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

    async fn two_clusters() -> BTreeMap<String, ClusterEntry> {
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
        [("c1".to_owned(), c1), ("c2".to_owned(), c2)].into()
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
        let d = desired_state(
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
        let d = desired_state(
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
            "c2".into(),
            cluster(
                "c2",
                2,
                false,
                &[],
                &[pod("10.1.1.5", 131_401, "192.168.2.2")],
            )
            .await,
        );
        let d = desired_state(&clusters, &me(Routing::Tunnel, Encryption::None));
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
}
