//! The typed records of the API: what the local source declares (node agents
//! and meshctl in standalone mode), which the clustermesh-apiserver's
//! registry checks, holds and exports, and which the node agent is sent
//! back as services.
//!
//! These are neither the protobuf messages (which accept anything and are
//! parsed in [`crate::convert`]) nor the exported Cilium records (which the
//! apiserver renders from them). They are also what the apiserver persists
//! under its private prefix, so they derive serde: the persisted JSON is our
//! format, versioned by the `v1` in the prefix.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Labels as declared (no source prefix), sorted by key.
pub type Labels = BTreeMap<String, String>;

/// A transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The spelling of the Cilium records.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub internal_ips: Vec<IpAddr>,
    pub cilium_internal_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub wireguard_public_key: String,
    pub labels: Labels,
}

impl NodeSpec {
    /// The underlay address that carries traffic for `ip`: the first internal
    /// IP of the same family, else the first internal IP.
    pub fn host_ip_for(&self, ip: IpAddr) -> Option<IpAddr> {
        self.internal_ips
            .iter()
            .find(|h| h.is_ipv4() == ip.is_ipv4())
            .or_else(|| self.internal_ips.first())
            .copied()
    }
}

/// A named container port of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// `namespace/name` of an endpoint or a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A registered endpoint (pod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    pub named_ports: Vec<NamedPort>,
    pub node: String,
}

impl EndpointSpec {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

/// Where a service port's backends listen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target: TargetPort,
}

pub use api::Affinity;

/// A declared service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub frontend_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: Labels,
    pub labels: Labels,
    pub global: bool,
    pub shared: bool,
    pub affinity: Affinity,
    /// Backends the source states outright, by IP and service port name
    /// (the Kubernetes source: the ready endpoints of the service's
    /// EndpointSlices). `None`: the registry selects the registered
    /// endpoints that match `selector` (standalone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<StatedBackends>,
}

/// Backends stated by a source: IP → service port name → where it listens.
pub type StatedBackends = BTreeMap<IpAddr, BTreeMap<String, PortConfig>>;

impl ServiceSpec {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    /// Whether an endpoint's labels satisfy the selector. An empty selector
    /// selects nothing, as for a Kubernetes service without selector, and
    /// a service whose backends are stated selects nothing either.
    pub fn selects(&self, endpoint: &EndpointSpec) -> bool {
        self.backends.is_none()
            && endpoint.namespace == self.namespace
            && !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| endpoint.labels.get(k) == Some(v))
    }
}

/// A port of one backend: protocol and the port it listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    pub protocol: Protocol,
    pub port: u16,
}

/// Resolves a service port against an endpoint: a target number is taken as
/// is, a target name must be a named port of the endpoint with the same
/// protocol; `None` when the endpoint does not serve this port.
pub fn resolve_target(port: &ServicePort, endpoint: &EndpointSpec) -> Option<PortConfig> {
    match &port.target {
        TargetPort::Number(n) => Some(PortConfig {
            protocol: port.protocol,
            port: *n,
        }),
        TargetPort::Name(name) => endpoint
            .named_ports
            .iter()
            .find(|p| &p.name == name && p.protocol == port.protocol)
            .map(|p| PortConfig {
                protocol: p.protocol,
                port: p.port,
            }),
    }
}
