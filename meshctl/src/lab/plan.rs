//! The lab's names and address plan (`docs/architecture.md` §9), as pure functions.
//!
//! Everything the lab creates in the kernel is named from the lab name, so that
//! `lab down` and the clean-up of a crashed lab find exactly what one lab made:
//!
//! | object | name |
//! |---|---|
//! | underlay namespace (holds the bridge) | `<lab>-underlay` |
//! | bridge in it | `br0` |
//! | control namespace of cluster N (etcd, apiserver) | `<lab>-cN-ctl` |
//! | namespace of node M of cluster N | `<lab>-cN-nM` |
//! | namespace of pod P on that node | `<lab>-cN-nM-P` |
//! | veth end in the underlay namespace | `cN-ctl`, `cN-nM` |
//! | veth end in the control or node namespace | `eth0` |
//!
//! Lab names are `[a-z][a-z0-9]{0,9}`: without a `-`, the text before the first
//! `-` of a namespace name is exactly its lab, so lab `mesh` never claims the
//! namespaces of a lab `mesh2`.
//!
//! Addresses: cluster N uses 192.168.N.0/24 of the underlay; its control
//! namespace is 192.168.N.1 and node M is 192.168.N.(10+M). Every underlay address
//! is configured as a /16, so all clusters share one L2 segment (the bridge) and
//! reach each other without a router, as nodes of peered VPCs would. The pod CIDR
//! of cluster N is 10.N.0.0/16 and node M gets 10.N.M.0/24.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The default lab name.
pub const DEFAULT_LAB: &str = "mesh";
/// Most clusters a lab can hold (the third octet of 192.168.N.0/24 and 10.N.0.0/16).
pub const MAX_CLUSTERS: u8 = 200;
/// Most nodes per cluster (192.168.N.(10+M) must stay below .255).
pub const MAX_NODES: u8 = 200;
/// Port of every lab etcd's mutual-TLS client listener, on the control IP.
pub const ETCD_TLS_PORT: u16 = 2379;
/// Port of every lab etcd's mutual-TLS client listener on loopback of the
/// control namespace: the apiserver's, and the administrator's.
pub const ETCD_LOCAL_PORT: u16 = 2381;
/// Port of every lab etcd's plain HTTP `/health` and `/metrics` listener,
/// on loopback of the control namespace (no key-value API).
pub const ETCD_METRICS_PORT: u16 = 2382;
/// Port of every lab clustermesh-apiserver's gRPC listener, on the control IP.
pub const APISERVER_GRPC_PORT: u16 = 9870;
/// Port of every lab clustermesh-apiserver's health listener, on the control IP.
pub const APISERVER_HEALTH_PORT: u16 = 9871;
/// Port of the echo server in every `echo-*` pod, TCP and UDP.
pub const ECHO_PORT: u16 = 8080;
/// Name of the bridge in the underlay namespace.
pub const BRIDGE: &str = "br0";
/// Name of the underlay interface inside control and node namespaces.
pub const UNDERLAY_IF: &str = "eth0";

/// A name given by the user that the lab cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// The lab name does not match `[a-z][a-z0-9]{0,9}`.
    #[error("invalid lab name {0:?}: use 1 to 10 characters [a-z0-9], starting with a letter")]
    Lab(String),
    /// The pod name is not a DNS label of at most 30 characters.
    #[error(
        "invalid pod name {0:?}: use 1 to 30 characters [a-z0-9-], not starting or ending with '-'"
    )]
    Pod(String),
    /// More clusters or nodes than the address plan has room for.
    #[error("a lab holds 1 to {max} {what}, not {got}")]
    Count {
        /// `clusters` or `nodes`.
        what: &'static str,
        /// The upper bound.
        max: u8,
        /// What was asked for.
        got: u32,
    },
    /// A `<cluster>/<node>/<pod>` or `<cluster>/<pod>` address that does not parse.
    #[error("invalid {expected} address {got:?}")]
    Address {
        /// The expected shape.
        expected: &'static str,
        /// What was given.
        got: String,
    },
}

/// Checks a lab name.
///
/// # Errors
///
/// [`NameError::Lab`] when it does not match `[a-z][a-z0-9]{0,9}`.
pub fn validate_lab_name(name: &str) -> Result<(), NameError> {
    let mut chars = name.chars();
    let ok = name.len() <= 10
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(NameError::Lab(name.to_owned()))
    }
}

/// Checks a pod name (it becomes part of a namespace name and of a CNI container ID).
///
/// # Errors
///
/// [`NameError::Pod`] when it is not a DNS label of at most 30 characters.
pub fn validate_pod_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 30
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Pod(name.to_owned()))
    }
}

/// Checks cluster and node counts against the address plan.
///
/// # Errors
///
/// [`NameError::Count`] when either is 0 or above its maximum.
pub fn validate_counts(clusters: u32, nodes: u32) -> Result<(), NameError> {
    for (what, max, got) in [
        ("clusters", MAX_CLUSTERS, clusters),
        ("nodes", MAX_NODES, nodes),
    ] {
        if got == 0 || got > u32::from(max) {
            return Err(NameError::Count { what, max, got });
        }
    }
    Ok(())
}

/// Whether `netns` is a namespace of lab `lab` (see the module docs for why this is exact).
pub fn is_lab_netns(lab: &str, netns: &str) -> bool {
    netns
        .split_once('-')
        .is_some_and(|(prefix, _)| prefix == lab)
}

/// The namespace holding the underlay bridge.
pub fn underlay_netns(lab: &str) -> String {
    format!("{lab}-underlay")
}

/// Name of cluster number `n` (1-based); its cluster ID is `n`.
pub fn cluster_name(n: u8) -> String {
    format!("c{n}")
}

/// Name of node number `m` (1-based) of a cluster.
///
/// Node names are unique in the whole lab (they carry the cluster), as the node
/// agent derives per-node kernel names (e.g. its WireGuard device) from them.
pub fn node_name(cluster: u8, m: u8) -> String {
    format!("c{cluster}-n{m}")
}

/// The control namespace of cluster `n`.
pub fn control_netns(lab: &str, n: u8) -> String {
    format!("{lab}-c{n}-ctl")
}

/// The namespace of node `m` of cluster `n`.
pub fn node_netns(lab: &str, n: u8, m: u8) -> String {
    format!("{lab}-c{n}-n{m}")
}

/// The namespace of pod `pod` on node `m` of cluster `n`.
pub fn pod_netns(lab: &str, n: u8, m: u8, pod: &str) -> String {
    format!("{lab}-c{n}-n{m}-{pod}")
}

/// The veth end in the underlay namespace for cluster `n`'s control namespace.
pub fn control_port(n: u8) -> String {
    format!("c{n}-ctl")
}

/// The veth end in the underlay namespace for node `m` of cluster `n`.
pub fn node_port(n: u8, m: u8) -> String {
    format!("c{n}-n{m}")
}

/// Underlay IP of cluster `n`'s control namespace.
pub fn control_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, n, 1)
}

/// Underlay IP of node `m` of cluster `n`.
pub fn node_ip(n: u8, m: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, n, 10 + m)
}

/// Prefix length of every underlay address (one flat L2 segment, see module docs).
pub const UNDERLAY_PREFIX: u8 = 16;

/// The underlay addresses of cluster `n`'s nodes and control namespace.
pub fn cluster_node_cidr(n: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(192, 168, n, 0), 24).expect("24 is a valid prefix length")
}

/// Pod CIDR of cluster `n`.
pub fn cluster_pod_cidr(n: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, n, 0, 0), 16).expect("16 is a valid prefix length")
}

/// Pod CIDR of node `m` of cluster `n`.
pub fn node_pod_cidr(n: u8, m: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, n, m, 0), 24).expect("24 is a valid prefix length")
}

/// Name of the echo pod on node `m` of cluster `n`.
pub fn echo_pod(n: u8, m: u8) -> String {
    format!("echo-c{n}-n{m}")
}

/// A parsed `<cluster>/<node>/<pod>` address, with 1-based numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddress {
    /// Cluster number (`c<N>`).
    pub cluster: u8,
    /// Node number within the cluster (`n<M>`).
    pub node: u8,
    /// Pod name.
    pub pod: String,
}

fn parse_number(text: &str, prefix: char) -> Option<u8> {
    text.strip_prefix(prefix)?.parse().ok().filter(|n| *n > 0)
}

/// Parses `c<N>/n<M>/<pod>` (the node may also be written `c<N>-n<M>`).
///
/// # Errors
///
/// [`NameError::Address`] or [`NameError::Pod`].
pub fn parse_pod_address(text: &str) -> Result<PodAddress, NameError> {
    let bad = || NameError::Address {
        expected: "<cluster>/<node>/<pod> (e.g. c1/n2/web)",
        got: text.to_owned(),
    };
    let mut parts = text.split('/');
    let (Some(c), Some(n), Some(pod), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let cluster = parse_number(c, 'c').ok_or_else(bad)?;
    let node_text = n.strip_prefix(&format!("{c}-")).unwrap_or(n);
    let node = parse_number(node_text, 'n').ok_or_else(bad)?;
    validate_pod_name(pod)?;
    Ok(PodAddress {
        cluster,
        node,
        pod: pod.to_owned(),
    })
}

/// Parses `c<N>/<pod>` into the cluster number and pod name.
///
/// # Errors
///
/// [`NameError::Address`] or [`NameError::Pod`].
pub fn parse_cluster_pod(text: &str) -> Result<(u8, String), NameError> {
    let bad = || NameError::Address {
        expected: "<cluster>/<pod> (e.g. c1/echo-c1-n1)",
        got: text.to_owned(),
    };
    let (c, pod) = text.split_once('/').ok_or_else(bad)?;
    let cluster = parse_number(c, 'c').ok_or_else(bad)?;
    validate_pod_name(pod)?;
    Ok((cluster, pod.to_owned()))
}

/// Parses a cluster name of the lab (`c<N>`) into its number.
///
/// # Errors
///
/// [`NameError::Address`] when it is not `c<N>`.
pub fn parse_cluster(text: &str) -> Result<u8, NameError> {
    parse_number(text, 'c').ok_or_else(|| NameError::Address {
        expected: "lab cluster name c<N>",
        got: text.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        assert!(validate_lab_name("mesh").is_ok());
        assert!(validate_lab_name("t42").is_ok());
        for bad in ["", "Mesh", "me-sh", "1mesh", "abcdefghijk"] {
            assert_eq!(
                validate_lab_name(bad),
                Err(NameError::Lab(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn lab_membership_is_exact() {
        assert!(is_lab_netns("mesh", "mesh-c1-n1"));
        assert!(is_lab_netns("mesh", "mesh-underlay"));
        assert!(!is_lab_netns("mesh", "mesh2-c1-n1"));
        assert!(!is_lab_netns("mesh", "mesh"));
        assert!(!is_lab_netns("mesh", "other-c1-n1"));
    }

    #[test]
    fn address_plan() {
        assert_eq!(control_ip(2).to_string(), "192.168.2.1");
        assert_eq!(node_ip(2, 1).to_string(), "192.168.2.11");
        assert_eq!(cluster_pod_cidr(3).to_string(), "10.3.0.0/16");
        assert_eq!(node_pod_cidr(3, 2).to_string(), "10.3.2.0/24");
        assert!(cluster_pod_cidr(3).contains(&node_pod_cidr(3, 200)));
        assert_eq!(node_netns("mesh", 1, 2), "mesh-c1-n2");
        assert_eq!(pod_netns("mesh", 1, 2, "web"), "mesh-c1-n2-web");
        // Interface names must fit IFNAMSIZ - 1.
        assert!(node_port(MAX_CLUSTERS, MAX_NODES).len() <= 15);
        assert!(control_port(MAX_CLUSTERS).len() <= 15);
        assert_eq!(node_ip(MAX_CLUSTERS, MAX_NODES).octets()[3], 210);
    }

    #[test]
    fn pod_addresses() {
        assert_eq!(
            parse_pod_address("c1/n2/web-1").unwrap(),
            PodAddress {
                cluster: 1,
                node: 2,
                pod: "web-1".into()
            }
        );
        assert_eq!(parse_pod_address("c1/c1-n2/web").unwrap().node, 2);
        for bad in [
            "c1/n2",
            "c1/n2/web/x",
            "x1/n2/web",
            "c0/n1/web",
            "c1/nx/web",
        ] {
            assert!(
                matches!(parse_pod_address(bad), Err(NameError::Address { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            parse_pod_address("c1/n1/-web"),
            Err(NameError::Pod("-web".into()))
        );
        assert_eq!(parse_cluster_pod("c2/echo").unwrap(), (2, "echo".into()));
        assert!(parse_cluster_pod("c2").is_err());
        assert_eq!(parse_cluster("c7").unwrap(), 7);
    }

    #[test]
    fn counts() {
        assert!(validate_counts(2, 2).is_ok());
        assert!(validate_counts(0, 2).is_err());
        assert!(validate_counts(2, 201).is_err());
    }
}
