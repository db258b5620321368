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
//! The desired state (ipcache entries and remote nodes for the tunnel layer,
//! merged over every cluster) is computed two ways that must agree:
//! [`desired_state`] from scratch, by walking every store, and [`Index`]
//! change by change, at a cost that does not grow with the number of
//! entries. The reconciler ([`crate::reconcile::task`]) applies changes through
//! the index and runs the full computation when the set of connections
//! changes and periodically, to check that there is nothing to correct.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use api::{ClusterName, Node, ReservedIdentity};
use datapath::{IpcacheEntry, IpcacheFlags};
use ipnet::IpNet;
use tunnel::routes::RemoteNode;

use crate::{
    clusters::{Change, ClusterEntry, ClusterStores},
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

impl LocalNode {
    /// Flags of an entry hosted elsewhere than on this node.
    fn remote_flags(&self, local_cluster: bool) -> IpcacheFlags {
        let mut flags = IpcacheFlags::NONE;
        if !local_cluster {
            flags = flags | IpcacheFlags::REMOTE_CLUSTER;
        }
        if self.routing == Routing::Native && self.encryption == Encryption::Wireguard {
            flags = flags | IpcacheFlags::ENCRYPT;
        }
        flags
    }

    fn tunnel_to(&self, host: Option<IpAddr>) -> Option<IpAddr> {
        match (self.routing, host) {
            (Routing::Tunnel, Some(ip @ IpAddr::V4(_))) => Some(ip),
            _ => None,
        }
    }

    /// The ipcache entry of an endpoint of a cluster (see [`desired_state`]).
    pub fn endpoint_entry(&self, local_cluster: bool, ep: &api::IpcacheEntry) -> IpcacheEntry {
        let own_pod = local_cluster && ep.host_ip == Some(IpAddr::V4(self.node_ip));
        if own_pod {
            IpcacheEntry {
                identity: ep.id.0,
                tunnel_endpoint: None,
                flags: IpcacheFlags::NONE,
            }
        } else {
            IpcacheEntry {
                identity: ep.id.0,
                tunnel_endpoint: self.tunnel_to(ep.host_ip),
                flags: self.remote_flags(local_cluster),
            }
        }
    }

    /// The ipcache entry of a pod CIDR of a node reached at `underlay`.
    pub fn node_cidr_entry(&self, local_cluster: bool, underlay: Ipv4Addr) -> IpcacheEntry {
        IpcacheEntry {
            identity: ReservedIdentity::World as u32,
            tunnel_endpoint: self.tunnel_to(Some(IpAddr::V4(underlay))),
            flags: self.remote_flags(local_cluster),
        }
    }

    /// Whether `name` is this node (in the local cluster).
    fn is_me(&self, local_cluster: bool, name: &str) -> bool {
        local_cluster && name == self.node_name
    }
}

/// The tunnel layer's view of a node of `cluster`.
fn remote_node(cluster: &str, node: &Node, underlay: Ipv4Addr) -> RemoteNode {
    let wireguard_public_key = (!node.wireguard_pub_key.is_empty())
        .then(|| tunnel::PublicKey::from_base64(&node.wireguard_pub_key).ok())
        .flatten();
    RemoteNode {
        name: format!("{cluster}/{}", node.name),
        underlay_ip: IpAddr::V4(underlay),
        pod_cidrs: node.pod_cidrs(),
        wireguard_public_key,
    }
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

/// Read access to the records of one connection ("source") to a cluster.
///
/// An endpoint counts only under its canonical key
/// (`cilium/state/ip/v1/default/<ip>`, the IP as Rust prints it). The
/// schema lets a remote cluster write one IPv6 address under several
/// spellings (`…/2001:db8::1`, `…/2001:db8:0::1`); store events carry the
/// record and not its key, so only the canonical one can be followed change
/// by change, and the full computation ignores the others as well. An IPv4
/// address has a single spelling that parses.
pub trait SourceView {
    /// The endpoint with IP `ip`, if held under its canonical key.
    fn endpoint(&self, ip: IpAddr) -> Option<Arc<api::IpcacheEntry>>;
    /// Every endpoint held under its canonical key.
    fn endpoints(&self) -> Vec<Arc<api::IpcacheEntry>>;
    /// The node named `name`.
    fn node(&self, name: &str) -> Option<Arc<Node>>;
    /// Every node.
    fn nodes(&self) -> Vec<Arc<Node>>;
    /// The cluster's pod address space, as the operator pinned it
    /// (`allowed-pod-cidrs:` in its config file; empty: not pinned).
    fn allowed_pod_cidrs(&self) -> &[IpNet] {
        &[]
    }
    /// Where the cluster's nodes' underlay addresses lie
    /// (`allowed-node-cidrs:`; empty: not pinned).
    fn allowed_node_cidrs(&self) -> &[IpNet] {
        &[]
    }
}

impl SourceView for ClusterStores {
    fn endpoint(&self, ip: IpAddr) -> Option<Arc<api::IpcacheEntry>> {
        self.endpoints.get(&api::keys::ip_key(ip))
    }

    fn endpoints(&self) -> Vec<Arc<api::IpcacheEntry>> {
        let mut all = self.endpoints.list();
        all.retain(|ep| {
            ep.ip.is_ipv4()
                || self
                    .endpoints
                    .get(&api::keys::ip_key(ep.ip))
                    .is_some_and(|held| Arc::ptr_eq(&held, ep))
        });
        all
    }

    fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes
            .get(&api::keys::node_key(&self.scope.cluster, name))
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.list()
    }

    fn allowed_pod_cidrs(&self) -> &[IpNet] {
        &self.allowed_pod_cidrs
    }

    fn allowed_node_cidrs(&self) -> &[IpNet] {
        &self.allowed_node_cidrs
    }
}

/// One cluster as the desired state sees it.
#[derive(Debug)]
pub struct ActiveCluster<S> {
    /// Cluster name.
    pub name: String,
    /// This node's own cluster.
    pub local: bool,
    /// The connections whose records count, in precedence order: the
    /// current one, then the previous one while the current one has not
    /// synced ([`ClusterEntry::sources`]).
    pub sources: Vec<Arc<S>>,
}

/// Sorts `clusters` by precedence: the local cluster first, then by name.
pub fn sort_by_precedence<S>(clusters: &mut [ActiveCluster<S>]) {
    clusters.sort_by(|a, b| (!a.local, &a.name).cmp(&(!b.local, &b.name)));
}

/// Every cluster of `clusters` with the connections that count, in
/// precedence order.
pub fn active_clusters(
    clusters: &BTreeMap<ClusterName, ClusterEntry>,
) -> Vec<ActiveCluster<ClusterStores>> {
    let mut out: Vec<_> = clusters
        .iter()
        .map(|(name, entry)| ActiveCluster {
            name: name.to_string(),
            local: entry.local,
            sources: entry.sources().cloned().collect(),
        })
        .collect();
    sort_by_precedence(&mut out);
    out
}

/// Computes the datapath's desired state from scratch from every cluster's
/// stores; `clusters` in precedence order ([`active_clusters`]).
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
/// * A prefix claimed more than once goes to the first claim: clusters in
///   precedence order; within a cluster the endpoints (current connection,
///   then previous) before the node CIDRs; nodes by connection, then by
///   name. A node appears once per cluster, from the first connection that
///   has it with an IPv4 `InternalIP`.
pub fn desired_state<S: SourceView>(clusters: &[ActiveCluster<S>], me: &LocalNode) -> Desired {
    let mut out = Desired::default();
    let insert =
        |out: &mut Desired, prefix: IpNet, entry: IpcacheEntry| match out.ipcache.entry(prefix) {
            std::collections::btree_map::Entry::Occupied(_) => out.conflicts += 1,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(entry);
            }
        };
    for cluster in clusters {
        for source in &cluster.sources {
            for ep in source.endpoints() {
                insert(
                    &mut out,
                    IpNet::from(ep.ip),
                    me.endpoint_entry(cluster.local, &ep),
                );
            }
        }
        for source in &cluster.sources {
            let mut nodes = source.nodes();
            nodes.sort_by(|a, b| a.name.cmp(&b.name));
            for node in nodes {
                if me.is_me(cluster.local, &node.name) {
                    continue;
                }
                let key = format!("{}/{}", cluster.name, node.name);
                if out.remotes.contains_key(&key) {
                    continue;
                }
                let Some(underlay) = node.internal_ipv4() else {
                    continue;
                };
                for cidr in node.pod_cidrs() {
                    insert(
                        &mut out,
                        cidr.trunc(),
                        me.node_cidr_entry(cluster.local, underlay),
                    );
                }
                out.remotes
                    .insert(key, remote_node(&cluster.name, &node, underlay));
            }
        }
    }
    out
}

/// What a claim on a prefix is, in precedence order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ClaimKind {
    Endpoint,
    NodeCidr,
}

/// The precedence of one claim on a prefix; the smallest wins. The same
/// order as [`desired_state`]'s loops.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// Position of the cluster in precedence order.
    cluster: usize,
    kind: ClaimKind,
    /// Position of the connection in the cluster's sources.
    source: usize,
    /// The node (empty for endpoints).
    node: String,
    /// Which of the node's CIDRs.
    nth: usize,
}

/// The claims of the node `cluster/name` that counts.
#[derive(Debug, Clone, PartialEq)]
struct NodeClaim {
    source: usize,
    prefixes: Vec<IpNet>,
    entry: IpcacheEntry,
}

/// What applying changes to an [`Index`] touched.
#[derive(Debug, Default)]
pub struct Touched {
    /// Prefixes whose claims changed (possibly repeated).
    pub prefixes: Vec<IpNet>,
    /// Whether the remote nodes changed.
    pub remotes: bool,
}

/// The desired state kept up to date change by change: after
/// [`Index::apply`] of every change of the stores, it equals
/// [`desired_state`] of those stores (a property test below checks this on
/// random histories with conflicts and deletes).
///
/// Every prefix keeps all of its claims ordered by precedence (`Rank`);
/// the first is the desired entry and the others are counted as conflicts.
/// A change names one record; the index reads that record's current value
/// from its connection's store and replaces the claims it made before, so
/// the cost of a change does not grow with the number of entries.
#[derive(Debug)]
pub struct Index<S> {
    me: LocalNode,
    clusters: Vec<ActiveCluster<S>>,
    claims: HashMap<IpNet, BTreeMap<Rank, IpcacheEntry>>,
    nodes: HashMap<(usize, String), NodeClaim>,
    remotes: BTreeMap<String, RemoteNode>,
    conflicts: u64,
}

impl<S: SourceView> Index<S> {
    /// Builds the index of `clusters` (in precedence order,
    /// [`active_clusters`]) from their stores.
    pub fn build(clusters: Vec<ActiveCluster<S>>, me: LocalNode) -> Self {
        let mut index = Self {
            me,
            clusters,
            claims: HashMap::new(),
            nodes: HashMap::new(),
            remotes: BTreeMap::new(),
            conflicts: 0,
        };
        let mut touched = Touched::default();
        for ci in 0..index.clusters.len() {
            for si in 0..index.clusters[ci].sources.len() {
                let source = &index.clusters[ci].sources[si];
                let (endpoints, nodes) = (source.endpoints(), source.nodes());
                for ep in endpoints {
                    index.endpoint(ci, si, ep.ip, &mut touched);
                }
                for node in nodes {
                    index.node(ci, &node.name, &mut touched);
                }
                touched.prefixes.clear();
            }
        }
        index
    }

    /// The clusters the index reads, in precedence order.
    pub fn clusters(&self) -> &[ActiveCluster<S>] {
        &self.clusters
    }

    /// Applies a change reported by source `source` of cluster `cluster`
    /// (positions in [`Index::clusters`]).
    pub fn apply(&mut self, cluster: usize, source: usize, change: &Change, touched: &mut Touched) {
        match change {
            Change::Endpoint(ip) => self.endpoint(cluster, source, *ip, touched),
            Change::Node(name) => self.node(cluster, name, touched),
        }
    }

    /// The desired entry of `prefix`.
    pub fn desired(&self, prefix: &IpNet) -> Option<&IpcacheEntry> {
        self.claims.get(prefix).and_then(|c| c.values().next())
    }

    /// Every node but this one, keyed by `cluster/node`.
    pub fn remotes(&self) -> &BTreeMap<String, RemoteNode> {
        &self.remotes
    }

    /// Claims that lost to another claim on the same prefix.
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    /// The whole desired state, as [`desired_state`] returns it.
    pub fn to_desired(&self) -> Desired {
        Desired {
            ipcache: self
                .claims
                .iter()
                .filter_map(|(p, c)| c.values().next().map(|e| (*p, *e)))
                .collect(),
            remotes: self.remotes.clone(),
            conflicts: self.conflicts,
        }
    }

    /// The writes that make `actual` agree with the index on `prefixes`
    /// (what [`diff`] would write for them): deletions first, and only
    /// when `sweep` is allowed.
    pub fn ops_for(
        &self,
        prefixes: &[IpNet],
        actual: &BTreeMap<IpNet, IpcacheEntry>,
        sweep: bool,
    ) -> Vec<Op<IpNet, IpcacheEntry>> {
        let touched: std::collections::BTreeSet<IpNet> = prefixes.iter().copied().collect();
        let (mut deletes, mut upserts) = (Vec::new(), Vec::new());
        for prefix in touched {
            match (self.desired(&prefix), actual.get(&prefix)) {
                (Some(want), have) if have != Some(want) => upserts.push(Op::Upsert(prefix, *want)),
                (None, Some(_)) if sweep => deletes.push(Op::Delete(prefix)),
                _ => {}
            }
        }
        deletes.append(&mut upserts);
        deletes
    }

    fn endpoint(&mut self, ci: usize, si: usize, ip: IpAddr, touched: &mut Touched) {
        let cluster = &self.clusters[ci];
        let entry = cluster.sources[si]
            .endpoint(ip)
            .map(|ep| self.me.endpoint_entry(cluster.local, &ep));
        let rank = Rank {
            cluster: ci,
            kind: ClaimKind::Endpoint,
            source: si,
            node: String::new(),
            nth: 0,
        };
        self.set_claim(IpNet::from(ip), rank, entry, touched);
    }

    fn node(&mut self, ci: usize, name: &str, touched: &mut Touched) {
        let cluster = &self.clusters[ci];
        let key = format!("{}/{name}", cluster.name);
        let counted = if self.me.is_me(cluster.local, name) {
            None
        } else {
            cluster.sources.iter().enumerate().find_map(|(si, s)| {
                let node = s.node(name)?;
                let underlay = node.internal_ipv4()?;
                Some((si, node, underlay))
            })
        };
        let claim = counted.as_ref().map(|(si, node, underlay)| NodeClaim {
            source: *si,
            prefixes: node.pod_cidrs().iter().map(IpNet::trunc).collect(),
            entry: self.me.node_cidr_entry(cluster.local, *underlay),
        });
        let remote = counted.map(|(_, node, underlay)| remote_node(&cluster.name, &node, underlay));
        let slot = (ci, name.to_owned());
        let old = self.nodes.remove(&slot);
        if old != claim {
            let rank = |source: usize, nth: usize| Rank {
                cluster: ci,
                kind: ClaimKind::NodeCidr,
                source,
                node: name.to_owned(),
                nth,
            };
            if let Some(old) = &old {
                for (nth, prefix) in old.prefixes.iter().enumerate() {
                    self.set_claim(*prefix, rank(old.source, nth), None, touched);
                }
            }
            if let Some(new) = &claim {
                for (nth, prefix) in new.prefixes.iter().enumerate() {
                    self.set_claim(*prefix, rank(new.source, nth), Some(new.entry), touched);
                }
            }
        }
        if let Some(claim) = claim {
            self.nodes.insert(slot, claim);
        }
        let changed = match remote {
            Some(remote) if self.remotes.get(&key) != Some(&remote) => {
                self.remotes.insert(key, remote);
                true
            }
            Some(_) => false,
            None => self.remotes.remove(&key).is_some(),
        };
        touched.remotes |= changed;
    }

    fn set_claim(
        &mut self,
        prefix: IpNet,
        rank: Rank,
        entry: Option<IpcacheEntry>,
        touched: &mut Touched,
    ) {
        match entry {
            Some(entry) => {
                let claims = self.claims.entry(prefix).or_default();
                let others = claims.len() - usize::from(claims.contains_key(&rank));
                if claims.insert(rank, entry).is_none() && others > 0 {
                    self.conflicts += 1;
                }
            }
            None => {
                let Some(claims) = self.claims.get_mut(&prefix) else {
                    return;
                };
                if claims.remove(&rank).is_none() {
                    return;
                }
                if claims.is_empty() {
                    self.claims.remove(&prefix);
                } else {
                    self.conflicts -= 1;
                }
            }
        }
        touched.prefixes.push(prefix);
    }
}

#[cfg(test)]
mod tests;
