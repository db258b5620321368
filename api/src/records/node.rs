//! Nodes: `cilium/state/nodes/v1/<cluster>/<node>`.
//!
//! Wire format: Cilium's `nodeTypes.Node`, whose Go fields have no JSON tags,
//! so the keys are the Go field names (`Name`, `IPv4AllocCIDR`, ...). CIDRs
//! are `{"IP":"10.1.0.0","Mask":"////AA=="}` with the mask bytes in base64;
//! unset IPs are `""`; empty lists are `null`. Cilium versions before 1.16
//! also write `NodeIdentity` (between `Annotations` and `WireguardPubKey`);
//! it is kept when present and written back only then.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, ClusterName, RemoteScope};
use crate::error::{FieldError, ValidationError};
use crate::go::{
    check_size, decode_json, encode_json, ip_text, null_map, null_vec, parse_ip,
    parse_optional_ipv4, parse_optional_ipv6, GoCidr,
};
use crate::keys;
use crate::records::{
    at, cluster_field, cluster_id_field, each_element, expect_cluster, expect_cluster_id,
    expect_same,
};
use crate::Resource;

/// The kind of a node address (Cilium's `addressing.AddressType`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AddressType {
    /// `InternalIP`: the node's address on the underlay.
    InternalIp,
    /// `ExternalIP`
    ExternalIp,
    /// `CiliumInternalIP`: the node's address inside the pod CIDR (router IP).
    CiliumInternalIp,
    /// Any other type, kept verbatim.
    Other(String),
}

impl AddressType {
    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::InternalIp => "InternalIP",
            Self::ExternalIp => "ExternalIP",
            Self::CiliumInternalIp => "CiliumInternalIP",
            Self::Other(s) => s,
        }
    }
}

impl From<&str> for AddressType {
    fn from(s: &str) -> Self {
        match s {
            "InternalIP" => Self::InternalIp,
            "ExternalIP" => Self::ExternalIp,
            "CiliumInternalIP" => Self::CiliumInternalIp,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for AddressType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One address of a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddress {
    /// What the address is for.
    pub kind: AddressType,
    /// The address.
    pub ip: IpAddr,
}

/// A node of a cluster, as published for the other clusters: its addresses
/// (tunnel endpoint), pod CIDRs, health and ingress IPs, WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct Node {
    /// The node's name (Kubernetes node-name syntax).
    pub name: String,
    /// The cluster the node belongs to.
    pub cluster: ClusterName,
    /// The node's addresses, in order.
    pub ip_addresses: Vec<NodeAddress>,
    /// The primary IPv4 pod CIDR.
    pub ipv4_alloc_cidr: Option<IpNet>,
    /// Further IPv4 pod CIDRs.
    pub ipv4_secondary_alloc_cidrs: Vec<IpNet>,
    /// The primary IPv6 pod CIDR.
    pub ipv6_alloc_cidr: Option<IpNet>,
    /// Further IPv6 pod CIDRs.
    pub ipv6_secondary_alloc_cidrs: Vec<IpNet>,
    /// IPv4 address of the node's health endpoint.
    pub ipv4_health_ip: Option<Ipv4Addr>,
    /// IPv6 address of the node's health endpoint.
    pub ipv6_health_ip: Option<Ipv6Addr>,
    /// IPv4 address of the node's ingress endpoint.
    pub ipv4_ingress_ip: Option<Ipv4Addr>,
    /// IPv6 address of the node's ingress endpoint.
    pub ipv6_ingress_ip: Option<Ipv6Addr>,
    /// The cluster's ID.
    pub cluster_id: ClusterId,
    /// Where the record comes from (`custom-resource`, `kvstore`, `local`, ...).
    pub source: String,
    /// IPsec key index (0: none).
    pub encryption_key: u8,
    /// The node's labels.
    pub labels: BTreeMap<String, String>,
    /// The node's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The node's own security identity (`NodeIdentity`), as older Cilium
    /// versions publish it; `None` when the record has no such field.
    pub node_identity: Option<u32>,
    /// The node's WireGuard public key, base64 (empty: none).
    pub wireguard_pub_key: String,
    /// The node's boot ID.
    pub boot_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Wire {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Cluster")]
    cluster: String,
    #[serde(rename = "IPAddresses", with = "null_vec")]
    ip_addresses: Vec<AddressWire>,
    #[serde(rename = "IPv4AllocCIDR")]
    ipv4_alloc_cidr: Option<GoCidr>,
    #[serde(rename = "IPv4SecondaryAllocCIDRs", with = "null_vec")]
    ipv4_secondary_alloc_cidrs: Vec<GoCidr>,
    #[serde(rename = "IPv6AllocCIDR")]
    ipv6_alloc_cidr: Option<GoCidr>,
    #[serde(rename = "IPv6SecondaryAllocCIDRs", with = "null_vec")]
    ipv6_secondary_alloc_cidrs: Vec<GoCidr>,
    #[serde(rename = "IPv4HealthIP")]
    ipv4_health_ip: String,
    #[serde(rename = "IPv6HealthIP")]
    ipv6_health_ip: String,
    #[serde(rename = "IPv4IngressIP")]
    ipv4_ingress_ip: String,
    #[serde(rename = "IPv6IngressIP")]
    ipv6_ingress_ip: String,
    #[serde(rename = "ClusterID")]
    cluster_id: u32,
    #[serde(rename = "Source")]
    source: String,
    #[serde(rename = "EncryptionKey")]
    encryption_key: u8,
    #[serde(rename = "Labels", deserialize_with = "null_map")]
    labels: BTreeMap<String, String>,
    #[serde(rename = "Annotations", deserialize_with = "null_map")]
    annotations: BTreeMap<String, String>,
    #[serde(rename = "NodeIdentity", skip_serializing_if = "Option::is_none")]
    node_identity: Option<u32>,
    #[serde(rename = "WireguardPubKey")]
    wireguard_pub_key: String,
    #[serde(rename = "BootID")]
    boot_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct AddressWire {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "IP")]
    ip: String,
}

impl From<Node> for Wire {
    fn from(n: Node) -> Self {
        let cidr = |c: &Option<IpNet>| c.as_ref().map(GoCidr::from);
        let cidrs = |v: &[IpNet]| v.iter().map(GoCidr::from).collect();
        Self {
            ip_addresses: n
                .ip_addresses
                .iter()
                .map(|a| AddressWire {
                    kind: a.kind.to_string(),
                    ip: a.ip.to_string(),
                })
                .collect(),
            ipv4_alloc_cidr: cidr(&n.ipv4_alloc_cidr),
            ipv4_secondary_alloc_cidrs: cidrs(&n.ipv4_secondary_alloc_cidrs),
            ipv6_alloc_cidr: cidr(&n.ipv6_alloc_cidr),
            ipv6_secondary_alloc_cidrs: cidrs(&n.ipv6_secondary_alloc_cidrs),
            ipv4_health_ip: ip_text(n.ipv4_health_ip),
            ipv6_health_ip: ip_text(n.ipv6_health_ip),
            ipv4_ingress_ip: ip_text(n.ipv4_ingress_ip),
            ipv6_ingress_ip: ip_text(n.ipv6_ingress_ip),
            cluster_id: n.cluster_id.into(),
            name: n.name,
            cluster: n.cluster.into_string(),
            source: n.source,
            encryption_key: n.encryption_key,
            labels: n.labels,
            annotations: n.annotations,
            node_identity: n.node_identity,
            wireguard_pub_key: n.wireguard_pub_key,
            boot_id: n.boot_id,
        }
    }
}

fn cidr_family(field: &str, net: IpNet, want_v4: bool) -> Result<IpNet, FieldError> {
    if matches!(net, IpNet::V4(_)) == want_v4 {
        Ok(net)
    } else {
        Err(FieldError::InvalidCidr {
            field: field.to_owned(),
            value: net.to_string(),
            reason: if want_v4 {
                "expected an IPv4 CIDR"
            } else {
                "expected an IPv6 CIDR"
            },
        })
    }
}

fn primary_cidr(field: &str, c: Option<GoCidr>, v4: bool) -> Result<Option<IpNet>, FieldError> {
    c.map(|c| c.to_ipnet(field).and_then(|n| cidr_family(field, n, v4)))
        .transpose()
}

fn secondary_cidrs(field: &str, cs: Vec<GoCidr>, v4: bool) -> Result<Vec<IpNet>, FieldError> {
    each_element(field, cs, |at, c| {
        c.to_ipnet(at).and_then(|n| cidr_family(at, n, v4))
    })
}

impl TryFrom<Wire> for Node {
    type Error = FieldError;

    fn try_from(w: Wire) -> Result<Self, FieldError> {
        let ip_addresses = each_element("IPAddresses", w.ip_addresses, |at, a| {
            Ok(NodeAddress {
                ip: parse_ip(&format!("{at}.IP"), &a.ip)?,
                kind: AddressType::from(a.kind.as_str()),
            })
        })?;
        Ok(Self {
            name: w.name,
            cluster: cluster_field("Cluster", w.cluster)?,
            ip_addresses,
            ipv4_alloc_cidr: primary_cidr("IPv4AllocCIDR", w.ipv4_alloc_cidr, true)?,
            ipv4_secondary_alloc_cidrs: secondary_cidrs(
                "IPv4SecondaryAllocCIDRs",
                w.ipv4_secondary_alloc_cidrs,
                true,
            )?,
            ipv6_alloc_cidr: primary_cidr("IPv6AllocCIDR", w.ipv6_alloc_cidr, false)?,
            ipv6_secondary_alloc_cidrs: secondary_cidrs(
                "IPv6SecondaryAllocCIDRs",
                w.ipv6_secondary_alloc_cidrs,
                false,
            )?,
            ipv4_health_ip: parse_optional_ipv4("IPv4HealthIP", &w.ipv4_health_ip)?,
            ipv6_health_ip: parse_optional_ipv6("IPv6HealthIP", &w.ipv6_health_ip)?,
            ipv4_ingress_ip: parse_optional_ipv4("IPv4IngressIP", &w.ipv4_ingress_ip)?,
            ipv6_ingress_ip: parse_optional_ipv6("IPv6IngressIP", &w.ipv6_ingress_ip)?,
            cluster_id: cluster_id_field("ClusterID", w.cluster_id)?,
            source: w.source,
            encryption_key: w.encryption_key,
            labels: w.labels,
            annotations: w.annotations,
            node_identity: w.node_identity,
            wireguard_pub_key: w.wireguard_pub_key,
            boot_id: w.boot_id,
        })
    }
}

impl Node {
    /// A node with no addresses or CIDRs yet, source `custom-resource`.
    pub fn new(name: impl Into<String>, cluster: ClusterName, cluster_id: ClusterId) -> Self {
        Self {
            name: name.into(),
            cluster,
            ip_addresses: Vec::new(),
            ipv4_alloc_cidr: None,
            ipv4_secondary_alloc_cidrs: Vec::new(),
            ipv6_alloc_cidr: None,
            ipv6_secondary_alloc_cidrs: Vec::new(),
            ipv4_health_ip: None,
            ipv6_health_ip: None,
            ipv4_ingress_ip: None,
            ipv6_ingress_ip: None,
            cluster_id,
            source: "custom-resource".to_owned(),
            encryption_key: 0,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            node_identity: None,
            wireguard_pub_key: String::new(),
            boot_id: String::new(),
        }
    }

    /// All pod CIDRs: IPv4 primary and secondaries, then IPv6 primary and
    /// secondaries.
    pub fn pod_cidrs(&self) -> Vec<IpNet> {
        self.ipv4_alloc_cidr
            .iter()
            .chain(&self.ipv4_secondary_alloc_cidrs)
            .chain(self.ipv6_alloc_cidr.iter())
            .chain(&self.ipv6_secondary_alloc_cidrs)
            .copied()
            .collect()
    }

    /// Replaces all pod CIDRs: per family, the first becomes the primary and
    /// the rest the secondaries.
    pub fn set_pod_cidrs(&mut self, cidrs: impl IntoIterator<Item = IpNet>) {
        let (v4, v6): (Vec<IpNet>, Vec<IpNet>) =
            cidrs.into_iter().partition(|n| matches!(n, IpNet::V4(_)));
        let split = |mut v: Vec<IpNet>| {
            if v.is_empty() {
                (None, v)
            } else {
                let first = v.remove(0);
                (Some(first), v)
            }
        };
        (self.ipv4_alloc_cidr, self.ipv4_secondary_alloc_cidrs) = split(v4);
        (self.ipv6_alloc_cidr, self.ipv6_secondary_alloc_cidrs) = split(v6);
    }

    /// The first address of `kind` in the family of `ipv4`.
    pub fn address(&self, kind: &AddressType, ipv4: bool) -> Option<IpAddr> {
        self.ip_addresses
            .iter()
            .find(|a| a.kind == *kind && a.ip.is_ipv4() == ipv4)
            .map(|a| a.ip)
    }

    /// Sets the address of `kind` in `ip`'s family, replacing an existing one.
    pub fn set_address(&mut self, kind: AddressType, ip: IpAddr) {
        match self
            .ip_addresses
            .iter_mut()
            .find(|a| a.kind == kind && a.ip.is_ipv4() == ip.is_ipv4())
        {
            Some(a) => a.ip = ip,
            None => self.ip_addresses.push(NodeAddress { kind, ip }),
        }
    }

    /// The node's IPv4 underlay address (`InternalIP`): its tunnel endpoint.
    pub fn internal_ipv4(&self) -> Option<Ipv4Addr> {
        match self.address(&AddressType::InternalIp, true) {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        }
    }

    /// The node's IPv6 underlay address (`InternalIP`).
    pub fn internal_ipv6(&self) -> Option<Ipv6Addr> {
        match self.address(&AddressType::InternalIp, false) {
            Some(IpAddr::V6(ip)) => Some(ip),
            _ => None,
        }
    }

    /// The node's IPv4 router address inside its pod CIDR (`CiliumInternalIP`).
    pub fn cilium_internal_ipv4(&self) -> Option<Ipv4Addr> {
        match self.address(&AddressType::CiliumInternalIp, true) {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        }
    }
}

impl Resource for Node {
    const KIND: &'static str = "nodes";
    const BASE_PREFIX: &'static str = keys::NODES_BASE_PREFIX;

    fn prefix(cluster: &ClusterName) -> String {
        keys::nodes_prefix(cluster)
    }

    fn key(&self) -> String {
        keys::node_key(&self.cluster, &self.name)
    }

    fn encode(&self) -> Vec<u8> {
        encode_json(&Wire::from(self.clone()))
    }

    fn decode(key: &str, value: &[u8], scope: &RemoteScope) -> Result<Self, ValidationError> {
        check_size(key, value)?;
        let parsed = keys::parse_node_key(key)?;
        expect_cluster(key, "key", &parsed.cluster, scope)?;
        let wire: Wire = decode_json(key, value)?;
        let node = Node::try_from(wire).map_err(at(key))?;
        expect_cluster(key, "Cluster", &node.cluster, scope)?;
        expect_cluster_id(key, "ClusterID", node.cluster_id, scope)?;
        expect_same(key, "Name", parsed.name.as_str(), node.name.as_str())?;
        Ok(node)
    }
}
