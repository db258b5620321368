//! Ownership: a cluster may announce only what it owns.
//!
//! Validation ([`api::Resource::decode`]) checks each record alone: its
//! cluster is the connection's, its identity in the cluster's range, its
//! fields well formed. That does not stop a connected cluster from
//! announcing, in its own etcd, a node whose pod CIDR is `0.0.0.0/0`, the
//! local cluster's pod CIDR or the underlay, or an endpoint at another
//! cluster's pod IP: every such record would steer traffic of other
//! clusters to its nodes. Cilium relies on etcd RBAC and trusts what a
//! remote cluster publishes; the agent also checks what each record claims
//! against what its cluster owns, continuously, for remote clusters and the
//! local one alike (`docs/architecture.md` §8).
//!
//! # Nodes
//!
//! A node record is refused ([`Reason`]) when
//!
//! * an underlay address (`InternalIP`, `ExternalIP`) is unspecified,
//!   loopback, link-local or multicast, or lies outside the cluster's
//!   `allowed-node-cidrs` (when its config file pins them);
//! * a pod CIDR is a default route, shorter than the minimum prefix
//!   ([`Rules`]), overlaps a reserved range (loopback, link-local, which
//!   holds the service loopback address, multicast, IPv4-mapped), or lies
//!   outside the cluster's `allowed-pod-cidrs` (when pinned);
//! * a pod CIDR contains an underlay address of a node of its own cluster;
//! * it conflicts with a node of **another** cluster: their pod CIDRs
//!   overlap, one's underlay address lies in the other's pod CIDR, or both
//!   have one underlay address.
//!
//! **Conflicts** are resolved without regard to arrival order: the local
//! cluster wins against any remote cluster (its record stays, the remote
//! one is refused); between two remote clusters *both* records are refused.
//! So no cluster can take over addresses of the local cluster or of another
//! cluster. Only records that pass the checks of their own are compared,
//! so a refused record takes nothing away from anyone: **pinning** a
//! cluster's address spaces in its config file (`allowed-pod-cidrs:`,
//! `allowed-node-cidrs:`, which `meshctl clustermesh connect` writes in a
//! lab) makes a claim outside them fail on its own, so a hostile cluster
//! cannot even make another cluster's nodes unusable; without pinning it
//! can, and that shows as refusals of both.
//!
//! # Endpoints
//!
//! An endpoint (ipcache record) of cluster X is refused when its IP is
//! unspecified, loopback, link-local or multicast, is a node's underlay
//! address, or lies outside X's accepted node pod CIDRs and outside the CIDRs
//! the operator allows for X (`allowed-pod-cidrs:` in X's config file, for
//! pods that take VPC addresses; an IP there must not lie in another
//! cluster's accepted pod CIDRs), and when its `HostIP` is missing or not an
//! underlay address of one of X's accepted nodes.
//!
//! # Identities and services
//!
//! An identity's cluster labels must name its cluster (checked when the
//! record is decoded). A global service's remote backend must be an
//! accepted endpoint of the exporting cluster ([`crate::services`]).
//!
//! # What a refusal does
//!
//! A refused record stays in its store, so it is used as soon as what it
//! conflicts with goes away, but nothing reads it: [`Vetted`] hides it from
//! the reconciler. Refusals are counted by reason (status `not-owned`,
//! metric `mesh_agent_records_not_owned`), logged once per record, and never
//! touch the connection: the cluster's other records keep flowing.

mod prefixes;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use api::{AddressType, Node};
use ipnet::IpNet;

use crate::reconcile::plan::{ActiveCluster, SourceView};
use prefixes::Prefixes;

/// Why a record is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A node's underlay address is unspecified, loopback, link-local or multicast.
    NodeAddressReserved,
    /// A node's underlay address lies outside its cluster's `allowed-node-cidrs`.
    NodeAddressOutsideAllowed,
    /// A node's pod CIDR is a default route.
    NodeCidrDefaultRoute,
    /// A node's pod CIDR is shorter than the minimum prefix.
    NodeCidrTooShort,
    /// A node's pod CIDR overlaps loopback, link-local, multicast or IPv4-mapped space.
    NodeCidrReserved,
    /// A node's pod CIDR lies outside its cluster's `allowed-pod-cidrs`.
    NodeCidrOutsideAllowed,
    /// A node's pod CIDR contains a node's underlay address.
    NodeCidrContainsNodeAddress,
    /// A node's pod CIDR overlaps one of the local cluster.
    NodeCidrOverlapsLocalCluster,
    /// A node's pod CIDR overlaps one of another remote cluster (both refused).
    NodeCidrOverlapsOtherCluster,
    /// A node's underlay address is one of a local node's.
    NodeAddressOfLocalCluster,
    /// A node's underlay address is one of another remote cluster's node (both refused).
    NodeAddressOfOtherCluster,
    /// A node's underlay address lies in another cluster's pod CIDR.
    NodeAddressInPodCidr,
    /// An endpoint's IP is unspecified, loopback, link-local or multicast.
    EndpointReservedAddress,
    /// An endpoint's IP is a node's underlay address.
    EndpointIsNodeAddress,
    /// An endpoint's IP lies outside its cluster's pod CIDRs.
    EndpointOutsidePodCidrs,
    /// An endpoint's IP (in its cluster's allowed CIDRs) lies in another cluster's pod CIDR.
    EndpointInOtherClusterCidr,
    /// An endpoint has no `HostIP`.
    EndpointWithoutHost,
    /// An endpoint's `HostIP` is not one of its cluster's nodes.
    EndpointHostNotANode,
    /// A global service's backend is not an endpoint of the exporting cluster.
    ServiceBackendNotAnEndpoint,
}

impl Reason {
    /// The label in status documents and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NodeAddressReserved => "node-address-reserved",
            Self::NodeAddressOutsideAllowed => "node-address-outside-allowed",
            Self::NodeCidrDefaultRoute => "node-cidr-default-route",
            Self::NodeCidrTooShort => "node-cidr-too-short",
            Self::NodeCidrReserved => "node-cidr-reserved",
            Self::NodeCidrOutsideAllowed => "node-cidr-outside-allowed",
            Self::NodeCidrContainsNodeAddress => "node-cidr-contains-node-address",
            Self::NodeCidrOverlapsLocalCluster => "node-cidr-overlaps-local-cluster",
            Self::NodeCidrOverlapsOtherCluster => "node-cidr-overlaps-other-cluster",
            Self::NodeAddressOfLocalCluster => "node-address-of-local-cluster",
            Self::NodeAddressOfOtherCluster => "node-address-of-other-cluster",
            Self::NodeAddressInPodCidr => "node-address-in-pod-cidr",
            Self::EndpointReservedAddress => "endpoint-reserved-address",
            Self::EndpointIsNodeAddress => "endpoint-is-node-address",
            Self::EndpointOutsidePodCidrs => "endpoint-outside-pod-cidrs",
            Self::EndpointInOtherClusterCidr => "endpoint-in-other-cluster-cidr",
            Self::EndpointWithoutHost => "endpoint-without-host",
            Self::EndpointHostNotANode => "endpoint-host-not-a-node",
            Self::ServiceBackendNotAnEndpoint => "service-backend-not-an-endpoint",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tunables of the node rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Shortest IPv4 pod CIDR a node may announce (`--min-pod-cidr-prefix-v4`).
    pub min_prefix_v4: u8,
    /// Shortest IPv6 pod CIDR a node may announce (`--min-pod-cidr-prefix-v6`).
    pub min_prefix_v6: u8,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            min_prefix_v4: 16,
            min_prefix_v6: 48,
        }
    }
}

/// Ranges no node CIDR may touch and no endpoint or node address may lie in.
const RESERVED: [&str; 10] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "fe80::/10",
    "ff00::/8",
];

fn reserved() -> impl Iterator<Item = IpNet> {
    RESERVED.iter().filter_map(|s| s.parse::<IpNet>().ok())
}

fn reserved_address(ip: IpAddr) -> bool {
    reserved().any(|r| r.contains(&ip))
}

/// The underlay addresses of a node: what tunnels and routes point at.
pub fn underlay_addresses(node: &Node) -> impl Iterator<Item = IpAddr> + '_ {
    node.ip_addresses
        .iter()
        .filter(|a| matches!(a.kind, AddressType::InternalIp | AddressType::ExternalIp))
        .map(|a| a.ip)
}

/// A node record as the rules see it.
#[derive(Debug)]
struct Record {
    cluster: usize,
    source: usize,
    name: String,
    local: bool,
    addresses: Vec<IpAddr>,
    cidrs: Vec<IpNet>,
    /// The cluster's pinned address spaces (empty: not pinned).
    allowed_pods: Arc<[IpNet]>,
    allowed_nodes: Arc<[IpNet]>,
}

/// The checks of a node record on its own.
fn intrinsic(record: &Record, rules: &Rules) -> Option<Reason> {
    let within = |pinned: &[IpNet], inner: &IpNet| pinned.iter().any(|p| p.contains(inner));
    if record.addresses.iter().any(|a| reserved_address(*a)) {
        return Some(Reason::NodeAddressReserved);
    }
    if !record.allowed_nodes.is_empty()
        && !record
            .addresses
            .iter()
            .all(|a| within(&record.allowed_nodes, &IpNet::from(*a)))
    {
        return Some(Reason::NodeAddressOutsideAllowed);
    }
    record.cidrs.iter().find_map(|cidr| {
        let min = match cidr {
            IpNet::V4(_) => rules.min_prefix_v4,
            IpNet::V6(_) => rules.min_prefix_v6,
        };
        if cidr.prefix_len() == 0 {
            Some(Reason::NodeCidrDefaultRoute)
        } else if cidr.prefix_len() < min {
            Some(Reason::NodeCidrTooShort)
        } else if reserved().any(|r| r.contains(cidr) || cidr.contains(&r)) {
            Some(Reason::NodeCidrReserved)
        } else if !record.allowed_pods.is_empty() && !within(&record.allowed_pods, cidr) {
            Some(Reason::NodeCidrOutsideAllowed)
        } else {
            None
        }
    })
}

/// What one cluster owns: its accepted nodes' pod CIDRs and underlay
/// addresses, and the CIDRs the operator allows for its endpoints.
#[derive(Debug, Default, PartialEq)]
struct Owned {
    local: bool,
    cidrs: Prefixes<()>,
    allowed: Prefixes<()>,
    hosts: BTreeSet<IpAddr>,
}

/// The outcome of the node rules over every cluster, and what each
/// cluster owns as a result; endpoints are judged against it
/// ([`Verdicts::endpoint`]). Equal verdicts mean every endpoint is judged
/// the same.
#[derive(Debug, Default, PartialEq)]
pub struct Verdicts {
    /// Refused node records: (cluster, source, node) → why.
    refused: BTreeMap<(String, usize, String), Reason>,
    /// Per cluster name.
    owned: BTreeMap<String, Owned>,
    /// Underlay addresses of every accepted node.
    node_addresses: BTreeSet<IpAddr>,
    /// Pod CIDRs of every accepted node, with their cluster.
    cidrs: Prefixes<String>,
}

impl Verdicts {
    /// Judges every node record of `clusters` (in precedence order, as
    /// [`crate::reconcile::plan::active_clusters`] gives them).
    pub fn judge<S: SourceView>(clusters: &[ActiveCluster<S>], rules: &Rules) -> Self {
        let mut records = Vec::new();
        for (ci, cluster) in clusters.iter().enumerate() {
            let pinned = |f: fn(&S) -> &[IpNet]| -> Arc<[IpNet]> {
                let mut all: Vec<IpNet> = cluster
                    .sources
                    .iter()
                    .flat_map(|s| f(s).iter().copied())
                    .collect();
                all.sort_unstable();
                all.dedup();
                all.into()
            };
            let allowed_pods = pinned(S::allowed_pod_cidrs);
            let allowed_nodes = pinned(S::allowed_node_cidrs);
            for (si, source) in cluster.sources.iter().enumerate() {
                let mut nodes = source.nodes();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                records.extend(nodes.iter().map(|node| Record {
                    cluster: ci,
                    source: si,
                    name: node.name.clone(),
                    local: cluster.local,
                    addresses: underlay_addresses(node).collect(),
                    cidrs: node.pod_cidrs().iter().map(IpNet::trunc).collect(),
                    allowed_pods: allowed_pods.clone(),
                    allowed_nodes: allowed_nodes.clone(),
                }));
            }
        }
        let mut refused: Vec<Option<Reason>> =
            records.iter().map(|r| intrinsic(r, rules)).collect();

        // Conflicts between the records that passed on their own.
        let mut cidrs: Prefixes<Vec<usize>> = Prefixes::default();
        let mut addresses: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
        for (i, r) in records
            .iter()
            .enumerate()
            .filter(|(i, _)| refused[*i].is_none())
        {
            for cidr in &r.cidrs {
                cidrs.get_or_default(*cidr).push(i);
            }
            for a in &r.addresses {
                addresses.entry(*a).or_default().push(i);
            }
        }
        let mut verdict = Vec::new();
        for (i, r) in records
            .iter()
            .enumerate()
            .filter(|(i, _)| refused[*i].is_none())
        {
            for a in &r.addresses {
                for (_, owners) in cidrs.containing(*a) {
                    for &o in owners.iter().filter(|&&o| o != i) {
                        if records[o].cluster == r.cluster {
                            verdict.push((o, Reason::NodeCidrContainsNodeAddress));
                        } else {
                            conflict(&records, i, o, Kind::AddressInCidr, &mut verdict);
                        }
                    }
                }
                for &o in &addresses[a] {
                    if records[o].cluster != r.cluster {
                        conflict(&records, i, o, Kind::SameAddress, &mut verdict);
                    }
                }
            }
            for cidr in &r.cidrs {
                for (_, owners) in cidrs.overlapping(*cidr) {
                    for &o in owners.iter().filter(|&&o| records[o].cluster != r.cluster) {
                        conflict(&records, i, o, Kind::CidrOverlap, &mut verdict);
                    }
                }
            }
        }
        // A record in several conflicts gets the first reason in `Reason`'s
        // order, whatever order the conflicts were found in.
        for (i, reason) in verdict {
            refused[i] = Some(refused[i].map_or(reason, |r| r.min(reason)));
        }

        let mut out = Self::default();
        for cluster in clusters {
            let owned = out.owned.entry(cluster.name.clone()).or_default();
            owned.local = cluster.local;
            for source in &cluster.sources {
                for cidr in source.allowed_pod_cidrs() {
                    owned.allowed.insert(*cidr, ());
                }
            }
        }
        for (r, reason) in records.iter().zip(refused) {
            let cluster = &clusters[r.cluster].name;
            if let Some(reason) = reason {
                out.refused
                    .insert((cluster.clone(), r.source, r.name.clone()), reason);
                continue;
            }
            let owned = out.owned.entry(cluster.clone()).or_default();
            for cidr in &r.cidrs {
                owned.cidrs.insert(*cidr, ());
                out.cidrs.insert(*cidr, cluster.clone());
            }
            owned.hosts.extend(&r.addresses);
            out.node_addresses.extend(&r.addresses);
        }
        out
    }

    /// Why the node `name` held by source `source` of `cluster` is refused, if it is.
    pub fn node(&self, cluster: &str, source: usize, name: &str) -> Option<Reason> {
        self.refused
            .get(&(cluster.to_owned(), source, name.to_owned()))
            .copied()
    }

    /// The refused node records: (cluster, node) → why, once per node.
    pub fn refused_nodes(&self) -> BTreeMap<(&str, &str), Reason> {
        self.refused
            .iter()
            .map(|((c, _, n), r)| ((c.as_str(), n.as_str()), *r))
            .collect()
    }

    /// Why an endpoint of `cluster` is refused, if it is (module docs).
    pub fn endpoint(&self, cluster: &str, ep: &api::IpcacheEntry) -> Option<Reason> {
        let ip = ep.ip;
        if reserved_address(ip) {
            return Some(Reason::EndpointReservedAddress);
        }
        if self.node_addresses.contains(&ip) {
            return Some(Reason::EndpointIsNodeAddress);
        }
        let Some(owned) = self.owned.get(cluster) else {
            return Some(Reason::EndpointOutsidePodCidrs);
        };
        if !owned.cidrs.contains(ip) {
            if !owned.allowed.contains(ip) {
                return Some(Reason::EndpointOutsidePodCidrs);
            }
            if !owned.local && self.cidrs.containing(ip).any(|(_, c)| c != cluster) {
                return Some(Reason::EndpointInOtherClusterCidr);
            }
        }
        match ep.host_ip {
            None => Some(Reason::EndpointWithoutHost),
            Some(host) if !owned.hosts.contains(&host) => Some(Reason::EndpointHostNotANode),
            Some(_) => None,
        }
    }
}

/// What two records of different clusters both claim.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `a`'s underlay address lies in `b`'s pod CIDR.
    AddressInCidr,
    SameAddress,
    CidrOverlap,
}

/// Resolves a conflict between records `a` and `b` of different clusters:
/// the local one wins, and between remote clusters both lose.
fn conflict(records: &[Record], a: usize, b: usize, kind: Kind, out: &mut Vec<(usize, Reason)>) {
    let reason = |loser: usize, winner_local: bool| match kind {
        Kind::AddressInCidr if loser == a => Reason::NodeAddressInPodCidr,
        Kind::AddressInCidr => Reason::NodeCidrContainsNodeAddress,
        Kind::SameAddress if winner_local => Reason::NodeAddressOfLocalCluster,
        Kind::SameAddress => Reason::NodeAddressOfOtherCluster,
        Kind::CidrOverlap if winner_local => Reason::NodeCidrOverlapsLocalCluster,
        Kind::CidrOverlap => Reason::NodeCidrOverlapsOtherCluster,
    };
    match (records[a].local, records[b].local) {
        (true, false) => out.push((b, reason(b, true))),
        (false, true) => out.push((a, reason(a, true))),
        _ => {
            out.push((a, reason(a, false)));
            out.push((b, reason(b, false)));
        }
    }
}

/// A connection's records as the reconciler may use them: refused ones
/// are hidden ([`Verdicts`]).
#[derive(Debug)]
pub struct Vetted<S> {
    stores: Arc<S>,
    cluster: String,
    source: usize,
    verdicts: Arc<Verdicts>,
}

impl<S> Vetted<S> {
    /// The connection's stores.
    pub fn stores(&self) -> &Arc<S> {
        &self.stores
    }
}

impl<S: SourceView> SourceView for Vetted<S> {
    fn endpoint(&self, ip: IpAddr) -> Option<Arc<api::IpcacheEntry>> {
        self.stores
            .endpoint(ip)
            .filter(|ep| self.verdicts.endpoint(&self.cluster, ep).is_none())
    }

    fn endpoints(&self) -> Vec<Arc<api::IpcacheEntry>> {
        let mut all = self.stores.endpoints();
        all.retain(|ep| self.verdicts.endpoint(&self.cluster, ep).is_none());
        all
    }

    fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.stores.node(name).filter(|_| {
            self.verdicts
                .node(&self.cluster, self.source, name)
                .is_none()
        })
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        let mut all = self.stores.nodes();
        all.retain(|n| {
            self.verdicts
                .node(&self.cluster, self.source, &n.name)
                .is_none()
        });
        all
    }

    fn allowed_pod_cidrs(&self) -> &[IpNet] {
        self.stores.allowed_pod_cidrs()
    }

    fn allowed_node_cidrs(&self) -> &[IpNet] {
        self.stores.allowed_node_cidrs()
    }
}

/// `clusters` seen through `verdicts`.
pub fn vet<S>(
    clusters: Vec<ActiveCluster<S>>,
    verdicts: &Arc<Verdicts>,
) -> Vec<ActiveCluster<Vetted<S>>> {
    clusters
        .into_iter()
        .map(|c| ActiveCluster {
            sources: c
                .sources
                .into_iter()
                .enumerate()
                .map(|(source, stores)| {
                    Arc::new(Vetted {
                        stores,
                        cluster: c.name.clone(),
                        source,
                        verdicts: verdicts.clone(),
                    })
                })
                .collect(),
            name: c.name,
            local: c.local,
        })
        .collect()
}

/// The records currently refused, by cluster and record (`node <name>`,
/// `endpoint <ip>`), with why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    records: BTreeMap<(String, String), Reason>,
}

impl Tally {
    /// Every refused node and endpoint of `clusters` under `verdicts`. An
    /// endpoint counts once per cluster, judged as held by the first
    /// connection that holds it.
    pub fn of<S: SourceView>(clusters: &[ActiveCluster<S>], verdicts: &Verdicts) -> Self {
        let mut records = BTreeMap::new();
        for ((cluster, node), reason) in verdicts.refused_nodes() {
            records.insert((cluster.to_owned(), format!("node {node}")), reason);
        }
        for cluster in clusters {
            let mut seen = BTreeSet::new();
            for source in &cluster.sources {
                for ep in source.endpoints() {
                    if !seen.insert(ep.ip) {
                        continue;
                    }
                    if let Some(reason) = verdicts.endpoint(&cluster.name, &ep) {
                        records.insert((cluster.name.clone(), endpoint_key(ep.ip)), reason);
                    }
                }
            }
        }
        Self { records }
    }

    /// Re-judges the endpoint `ip` of `cluster` (held by the first of
    /// `sources` that has it); returns its reason when it is newly refused.
    pub fn endpoint<S: SourceView>(
        &mut self,
        cluster: &str,
        sources: &[Arc<S>],
        ip: IpAddr,
        verdicts: &Verdicts,
    ) -> Option<Reason> {
        let key = (cluster.to_owned(), endpoint_key(ip));
        let reason = sources
            .iter()
            .find_map(|s| s.endpoint(ip))
            .and_then(|ep| verdicts.endpoint(cluster, &ep));
        match reason {
            Some(reason) => self.records.insert(key, reason).is_none().then_some(reason),
            None => {
                self.records.remove(&key);
                None
            }
        }
    }

    /// The records refused here and not in `before` (a record refused
    /// for another reason than before is not new).
    pub fn new_since<'a>(
        &'a self,
        before: &'a Tally,
    ) -> impl Iterator<Item = (&'a str, &'a str, Reason)> + 'a {
        self.records
            .iter()
            .filter(move |(k, _)| !before.records.contains_key(*k))
            .map(|((c, k), r)| (c.as_str(), k.as_str(), *r))
    }

    /// Counts per cluster, by reason.
    pub fn counts(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for ((cluster, _), reason) in &self.records {
            *out.entry(cluster.clone())
                .or_default()
                .entry(reason.as_str().to_owned())
                .or_default() += 1;
        }
        out
    }
}

fn endpoint_key(ip: IpAddr) -> String {
    format!("endpoint {ip}")
}
