//! Every ownership rule and the conflict rule, on plain records.

use std::collections::BTreeMap;

use api::{AddressType, ClusterId, IpcacheEntry, MaxConnectedClusters, NumericIdentity};

use super::*;

/// One connection's records.
#[derive(Debug, Default)]
struct Source {
    nodes: Vec<Arc<Node>>,
    endpoints: Vec<Arc<IpcacheEntry>>,
    allowed: Vec<IpNet>,
    allowed_nodes: Vec<IpNet>,
}

impl SourceView for Source {
    fn endpoint(&self, ip: IpAddr) -> Option<Arc<IpcacheEntry>> {
        self.endpoints.iter().find(|e| e.ip == ip).cloned()
    }
    fn endpoints(&self) -> Vec<Arc<IpcacheEntry>> {
        self.endpoints.clone()
    }
    fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.iter().find(|n| n.name == name).cloned()
    }
    fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.clone()
    }
    fn allowed_pod_cidrs(&self) -> &[IpNet] {
        &self.allowed
    }
    fn allowed_node_cidrs(&self) -> &[IpNet] {
        &self.allowed_nodes
    }
}

fn node(cluster: &str, name: &str, ip: &str, cidrs: &[&str]) -> Arc<Node> {
    let id = ClusterId::new(
        cluster[1..].parse().unwrap_or(9),
        MaxConnectedClusters::Max255,
    )
    .unwrap();
    let mut n = Node::new(name, cluster.parse().unwrap(), id);
    n.set_address(AddressType::InternalIp, ip.parse().unwrap());
    n.set_pod_cidrs(cidrs.iter().map(|c| c.parse().unwrap()));
    Arc::new(n)
}

fn pod(ip: &str, host: Option<&str>) -> Arc<IpcacheEntry> {
    Arc::new(IpcacheEntry::new(
        ip.parse().unwrap(),
        NumericIdentity(70_000),
        host.map(|h| h.parse().unwrap()),
    ))
}

/// A cluster of one connection.
fn cluster(name: &str, local: bool, nodes: Vec<Arc<Node>>) -> ActiveCluster<Source> {
    ActiveCluster {
        name: name.to_owned(),
        local,
        sources: vec![Arc::new(Source {
            nodes,
            ..Source::default()
        })],
    }
}

/// c1 (local) with two nodes, c2 and c3 with one each: all legitimate.
fn mesh() -> Vec<ActiveCluster<Source>> {
    vec![
        cluster(
            "c1",
            true,
            vec![
                node(
                    "c1",
                    "n1",
                    "192.168.1.11",
                    &["10.1.1.0/24", "fd00:1:1::/64"],
                ),
                node("c1", "n2", "192.168.1.12", &["10.1.2.0/24"]),
            ],
        ),
        cluster(
            "c2",
            false,
            vec![node("c2", "m1", "192.168.2.11", &["10.2.1.0/24"])],
        ),
        cluster(
            "c3",
            false,
            vec![node("c3", "k1", "192.168.3.11", &["10.3.1.0/24"])],
        ),
    ]
}

/// `mesh()` with `extra` added to cluster `into`.
fn with(into: &str, extra: Arc<Node>) -> Vec<ActiveCluster<Source>> {
    let mut clusters = mesh();
    let c = clusters.iter_mut().find(|c| c.name == into).unwrap();
    let mut nodes = c.sources[0].nodes.clone();
    nodes.push(extra);
    c.sources = vec![Arc::new(Source {
        nodes,
        ..Source::default()
    })];
    clusters
}

fn refused(clusters: &[ActiveCluster<Source>]) -> BTreeMap<(String, String), Reason> {
    Verdicts::judge(clusters, &Rules::default())
        .refused_nodes()
        .into_iter()
        .map(|((c, n), r)| ((c.to_owned(), n.to_owned()), r))
        .collect()
}

fn one(cluster: &str, name: &str, reason: Reason) -> BTreeMap<(String, String), Reason> {
    BTreeMap::from([((cluster.to_owned(), name.to_owned()), reason)])
}

#[test]
fn legitimate_clusters_are_accepted_whole() {
    let clusters = mesh();
    let v = Verdicts::judge(&clusters, &Rules::default());
    assert!(v.refused_nodes().is_empty());
    assert_eq!(
        v.endpoint("c2", &pod("10.2.1.5", Some("192.168.2.11"))),
        None
    );
    assert_eq!(
        v.endpoint("c1", &pod("fd00:1:1::5", Some("192.168.1.11"))),
        None
    );
}

#[test]
fn a_node_cidr_on_its_own() {
    for (cidr, reason) in [
        ("0.0.0.0/0", Reason::NodeCidrDefaultRoute),
        ("::/0", Reason::NodeCidrDefaultRoute),
        ("10.0.0.0/8", Reason::NodeCidrTooShort),
        ("fd00::/32", Reason::NodeCidrTooShort),
        ("127.0.0.0/16", Reason::NodeCidrReserved),
        ("169.254.42.0/24", Reason::NodeCidrReserved),
        ("224.1.0.0/16", Reason::NodeCidrReserved),
        ("fe80::/64", Reason::NodeCidrReserved),
        ("::ffff:10.9.0.0/120", Reason::NodeCidrReserved),
        ("192.168.2.0/24", Reason::NodeCidrContainsNodeAddress),
    ] {
        let clusters = with("c2", node("c2", "evil", "192.168.2.99", &[cidr]));
        assert_eq!(refused(&clusters), one("c2", "evil", reason), "{cidr}");
    }
    let clusters = with("c2", node("c2", "evil", "127.0.0.1", &["10.2.9.0/24"]));
    assert_eq!(
        refused(&clusters),
        one("c2", "evil", Reason::NodeAddressReserved)
    );
}

#[test]
fn the_local_cluster_wins_every_conflict() {
    for (ip, cidr, reason) in [
        // c1's whole pod CIDR, and a part of one of its nodes' CIDRs.
        (
            "192.168.2.99",
            "10.1.0.0/16",
            Reason::NodeCidrOverlapsLocalCluster,
        ),
        (
            "192.168.2.99",
            "10.1.2.128/25",
            Reason::NodeCidrOverlapsLocalCluster,
        ),
        (
            "192.168.2.99",
            "fd00:1:1::/80",
            Reason::NodeCidrOverlapsLocalCluster,
        ),
        // c1's underlay.
        (
            "192.168.2.99",
            "192.168.1.0/24",
            Reason::NodeCidrContainsNodeAddress,
        ),
        // A c1 node's address, and an address inside c1's pod CIDR.
        (
            "192.168.1.11",
            "10.2.9.0/24",
            Reason::NodeAddressOfLocalCluster,
        ),
        ("10.1.1.200", "10.2.9.0/24", Reason::NodeAddressInPodCidr),
    ] {
        let clusters = with("c2", node("c2", "evil", ip, &[cidr]));
        assert_eq!(refused(&clusters), one("c2", "evil", reason), "{ip} {cidr}");
    }
}

#[test]
fn between_remote_clusters_both_records_lose() {
    let both = |reason_evil, reason_k1| {
        BTreeMap::from([
            (("c2".to_owned(), "evil".to_owned()), reason_evil),
            (("c3".to_owned(), "k1".to_owned()), reason_k1),
        ])
    };
    let clusters = with("c2", node("c2", "evil", "192.168.2.99", &["10.3.1.0/25"]));
    assert_eq!(
        refused(&clusters),
        both(
            Reason::NodeCidrOverlapsOtherCluster,
            Reason::NodeCidrOverlapsOtherCluster
        )
    );
    let clusters = with("c2", node("c2", "evil", "192.168.3.11", &["10.2.9.0/24"]));
    assert_eq!(
        refused(&clusters),
        both(
            Reason::NodeAddressOfOtherCluster,
            Reason::NodeAddressOfOtherCluster
        )
    );
    let clusters = with("c2", node("c2", "evil", "10.3.1.1", &["10.2.9.0/24"]));
    assert_eq!(
        refused(&clusters),
        both(
            Reason::NodeAddressInPodCidr,
            Reason::NodeCidrContainsNodeAddress
        )
    );
}

#[test]
fn a_refused_record_takes_nothing_away() {
    // A default route is refused on its own, so its overlap with c3 does
    // not count against c3.
    let clusters = with(
        "c2",
        node("c2", "evil", "192.168.2.99", &["0.0.0.0/0", "10.3.1.0/24"]),
    );
    assert_eq!(
        refused(&clusters),
        one("c2", "evil", Reason::NodeCidrDefaultRoute)
    );
}

#[test]
fn verdicts_do_not_depend_on_the_order_records_arrive() {
    let hostile = [
        node("c2", "a", "192.168.2.21", &["10.3.1.0/25"]),
        node("c2", "b", "192.168.3.11", &["10.2.7.0/24"]),
        node("c2", "c", "192.168.2.23", &["10.1.0.0/16"]),
        node("c2", "d", "192.168.2.24", &["10.2.8.0/24"]),
    ];
    let judged = |order: &[usize], clusters_reversed: bool| {
        let mut clusters = mesh();
        let mut nodes = clusters[1].sources[0].nodes.clone();
        nodes.extend(order.iter().map(|&i| hostile[i].clone()));
        clusters[1].sources = vec![Arc::new(Source {
            nodes,
            ..Source::default()
        })];
        if clusters_reversed {
            clusters[1..].reverse();
        }
        refused(&clusters)
    };
    let expected = judged(&[0, 1, 2, 3], false);
    assert_eq!(expected.len(), 4, "a, b, c and c3's k1: {expected:?}");
    assert!(!expected.contains_key(&("c2".to_owned(), "d".to_owned())));
    for (order, reversed) in [
        ([3, 2, 1, 0], false),
        ([1, 3, 0, 2], true),
        ([2, 0, 3, 1], true),
    ] {
        assert_eq!(judged(&order, reversed), expected, "{order:?} {reversed}");
    }
}

#[test]
fn an_endpoint_lies_in_its_own_cluster_and_on_its_own_node() {
    let mut clusters = mesh();
    clusters[1].sources = vec![Arc::new(Source {
        nodes: clusters[1].sources[0].nodes.clone(),
        allowed: ["10.2.0.0/16", "172.20.0.0/16", "10.3.0.0/16"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect(),
        ..Source::default()
    })];
    let v = Verdicts::judge(&clusters, &Rules::default());
    let host = Some("192.168.2.11");
    for (ip, host, want) in [
        ("10.2.1.5", host, None),
        ("172.20.4.4", host, None),
        ("10.1.2.2", host, Some(Reason::EndpointOutsidePodCidrs)),
        ("0.0.0.0", host, Some(Reason::EndpointReservedAddress)),
        ("169.254.42.1", host, Some(Reason::EndpointReservedAddress)),
        ("fe80::1", host, Some(Reason::EndpointReservedAddress)),
        ("192.168.1.11", host, Some(Reason::EndpointIsNodeAddress)),
        ("10.3.1.7", host, Some(Reason::EndpointInOtherClusterCidr)),
        ("10.2.1.5", None, Some(Reason::EndpointWithoutHost)),
        (
            "10.2.1.5",
            Some("192.168.1.11"),
            Some(Reason::EndpointHostNotANode),
        ),
    ] {
        assert_eq!(v.endpoint("c2", &pod(ip, host)), want, "{ip} on {host:?}");
    }
    assert_eq!(
        v.endpoint("c9", &pod("10.2.1.5", host)),
        Some(Reason::EndpointOutsidePodCidrs),
        "an unknown cluster owns nothing"
    );
}

#[test]
fn an_endpoint_on_a_refused_node_is_refused() {
    let clusters = with("c2", node("c2", "evil", "192.168.2.99", &["10.1.0.0/16"]));
    let v = Verdicts::judge(&clusters, &Rules::default());
    assert_eq!(
        v.endpoint("c2", &pod("10.1.1.5", Some("192.168.2.99"))),
        Some(Reason::EndpointOutsidePodCidrs)
    );
    assert_eq!(
        v.endpoint("c2", &pod("10.2.1.5", Some("192.168.2.99"))),
        Some(Reason::EndpointHostNotANode)
    );
}

#[test]
fn the_vetted_view_hides_refused_records_and_the_tally_counts_them() {
    let mut clusters = with("c2", node("c2", "evil", "192.168.2.99", &["0.0.0.0/0"]));
    clusters[1].sources = vec![Arc::new(Source {
        nodes: clusters[1].sources[0].nodes.clone(),
        endpoints: vec![
            pod("10.2.1.5", Some("192.168.2.11")),
            pod("10.1.2.2", Some("192.168.2.11")),
            pod("10.2.1.6", Some("192.168.2.99")),
        ],
        ..Source::default()
    })];
    let verdicts = Arc::new(Verdicts::judge(&clusters, &Rules::default()));
    let tally = Tally::of(&clusters, &verdicts);
    assert_eq!(
        tally.counts()["c2"],
        BTreeMap::from([
            ("endpoint-host-not-a-node".to_owned(), 1),
            ("endpoint-outside-pod-cidrs".to_owned(), 1),
            ("node-cidr-default-route".to_owned(), 1),
        ])
    );
    let vetted = vet(clusters, &verdicts);
    let c2 = &vetted[1].sources[0];
    let ips: Vec<IpAddr> = c2.endpoints().iter().map(|e| e.ip).collect();
    assert_eq!(ips, ["10.2.1.5".parse::<IpAddr>().unwrap()]);
    assert!(c2.endpoint("10.1.2.2".parse().unwrap()).is_none());
    let names: Vec<String> = c2.nodes().iter().map(|n| n.name.clone()).collect();
    assert_eq!(names, ["m1"]);
    assert!(c2.node("evil").is_none());

    // Re-judging one endpoint: only a new refusal is reported.
    let mut again = tally.clone();
    let sources = vetted[1]
        .sources
        .iter()
        .map(|s| s.stores().clone())
        .collect::<Vec<_>>();
    assert_eq!(
        again.endpoint("c2", &sources, "10.1.2.2".parse().unwrap(), &verdicts),
        None,
        "already counted"
    );
    assert_eq!(again, tally);
    assert_eq!(again.new_since(&tally).count(), 0);
    let fresh = Tally::default();
    assert_eq!(tally.new_since(&fresh).count(), 3);
}

/// Every cluster's address spaces pinned, as `connect` writes them in a lab.
fn pinned(mut clusters: Vec<ActiveCluster<Source>>) -> Vec<ActiveCluster<Source>> {
    for c in &mut clusters {
        let n = &c.name[1..];
        c.sources = vec![Arc::new(Source {
            nodes: c.sources[0].nodes.clone(),
            allowed: vec![
                format!("10.{n}.0.0/16").parse().unwrap(),
                format!("fd00:{n}::/32").parse().unwrap(),
            ],
            allowed_nodes: vec![format!("192.168.{n}.0/24").parse().unwrap()],
            ..Source::default()
        })];
    }
    clusters
}

#[test]
fn with_pinned_address_spaces_only_the_claimant_loses() {
    assert!(refused(&pinned(mesh())).is_empty());
    for (ip, cidr, reason) in [
        (
            "192.168.2.99",
            "10.3.1.0/25",
            Reason::NodeCidrOutsideAllowed,
        ),
        (
            "192.168.2.99",
            "10.1.0.0/16",
            Reason::NodeCidrOutsideAllowed,
        ),
        (
            "192.168.3.11",
            "10.2.9.0/24",
            Reason::NodeAddressOutsideAllowed,
        ),
        ("10.3.1.1", "10.2.9.0/24", Reason::NodeAddressOutsideAllowed),
    ] {
        let clusters = pinned(with("c2", node("c2", "evil", ip, &[cidr])));
        assert_eq!(refused(&clusters), one("c2", "evil", reason), "{ip} {cidr}");
    }
}
