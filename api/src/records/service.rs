//! Global services: `cilium/state/services/v1/<cluster>/<namespace>/<name>`.
//!
//! Wire format: Cilium's `ClusterService`:
//! `{"cluster","namespace","name","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{...},"labels":{},"selector":{},"includeExternal":true,"shared":true,"clusterID":3}`,
//! with `"hostnames":{"<backend ip>":"<hostname>"}` and
//! `"zones":{"<backend ip>":{"zone":"z1","forZones":[{"name":"z1"}]}}` after
//! `backends` when not empty.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, ClusterName, RemoteScope};
use crate::error::{FieldError, ValidationError};
use crate::go::{check_size, decode_json, encode_json, null_map, null_vec, parse_ip};
use crate::keys;
use crate::records::{
    at, cluster_field, cluster_id_field, expect_cluster, expect_cluster_id, expect_namespaced,
    L4Protocol,
};
use crate::Resource;

/// A port of a frontend or backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct L4Addr {
    /// The protocol.
    pub protocol: L4Protocol,
    /// The port number.
    pub port: u16,
}

/// Port name → port, for one frontend or backend IP.
pub type PortConfiguration = BTreeMap<String, L4Addr>;

/// The topology zone of a backend (Cilium's `BackendZone`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct BackendZone {
    /// The zone the backend runs in.
    pub zone: String,
    /// The zones the backend should serve (EndpointSlice hints), in order.
    pub for_zones: Vec<String>,
}

/// A service of one cluster as shared with the mesh: its frontends (cluster
/// IPs) and the backends this cluster contributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct ClusterService {
    /// The cluster publishing the service.
    pub cluster: ClusterName,
    /// The service's namespace.
    pub namespace: String,
    /// The service's name.
    pub name: String,
    /// Frontend IP → its ports.
    pub frontends: BTreeMap<IpAddr, PortConfiguration>,
    /// Backend IP → its ports.
    pub backends: BTreeMap<IpAddr, PortConfiguration>,
    /// Backend IP → its hostname (StatefulSet pods), where known.
    pub hostnames: BTreeMap<IpAddr, String>,
    /// Backend IP → its topology zone, where known.
    pub zones: BTreeMap<IpAddr, BackendZone>,
    /// The service's labels.
    pub labels: BTreeMap<String, String>,
    /// The service's pod selector.
    pub selector: BTreeMap<String, String>,
    /// Whether the service takes backends from other clusters (global).
    pub include_external: bool,
    /// Whether this cluster shares its backends with the others.
    pub shared: bool,
    /// The publishing cluster's ID.
    pub cluster_id: ClusterId,
}

type PortsWire = BTreeMap<String, L4AddrWire>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Wire {
    cluster: String,
    namespace: String,
    name: String,
    #[serde(deserialize_with = "null_map")]
    frontends: BTreeMap<String, PortsWire>,
    #[serde(deserialize_with = "null_map")]
    backends: BTreeMap<String, PortsWire>,
    #[serde(
        deserialize_with = "null_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    hostnames: BTreeMap<String, String>,
    #[serde(
        deserialize_with = "null_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    zones: BTreeMap<String, ZoneWire>,
    #[serde(deserialize_with = "null_map")]
    labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_map")]
    selector: BTreeMap<String, String>,
    #[serde(rename = "includeExternal")]
    include_external: bool,
    shared: bool,
    #[serde(rename = "clusterID")]
    cluster_id: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ZoneWire {
    zone: String,
    #[serde(rename = "forZones", with = "null_vec")]
    for_zones: Vec<ForZoneWire>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ForZoneWire {
    name: String,
}

/// Parses the backend-IP keys of `map` (field `field`), converting values.
fn by_backend_ip<W, T>(
    field: &str,
    map: BTreeMap<String, W>,
    convert: impl Fn(W) -> T,
) -> Result<BTreeMap<IpAddr, T>, FieldError> {
    map.into_iter()
        .map(|(ip, v)| Ok((parse_ip(&format!("{field} key"), &ip)?, convert(v))))
        .collect()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct L4AddrWire {
    #[serde(rename = "Protocol")]
    protocol: String,
    #[serde(rename = "Port")]
    port: u16,
}

fn ports_to_wire(m: BTreeMap<IpAddr, PortConfiguration>) -> BTreeMap<String, PortsWire> {
    m.into_iter()
        .map(|(ip, ports)| {
            let ports = ports
                .into_iter()
                .map(|(name, a)| {
                    let wire = L4AddrWire {
                        protocol: a.protocol.to_string(),
                        port: a.port,
                    };
                    (name, wire)
                })
                .collect();
            (ip.to_string(), ports)
        })
        .collect()
}

fn ports_from_wire(
    field: &str,
    m: BTreeMap<String, PortsWire>,
) -> Result<BTreeMap<IpAddr, PortConfiguration>, FieldError> {
    m.into_iter()
        .map(|(ip_text, ports)| {
            let ip = parse_ip(&format!("{field} key"), &ip_text)?;
            let ports = ports
                .into_iter()
                .map(|(name, a)| {
                    let protocol = L4Protocol::parse_field(
                        format!("{field}[{ip_text}][{name}].Protocol"),
                        &a.protocol,
                    )?;
                    Ok((
                        name,
                        L4Addr {
                            protocol,
                            port: a.port,
                        },
                    ))
                })
                .collect::<Result<_, FieldError>>()?;
            Ok((ip, ports))
        })
        .collect()
}

impl From<ClusterService> for Wire {
    fn from(s: ClusterService) -> Self {
        Self {
            cluster: s.cluster.into_string(),
            namespace: s.namespace,
            name: s.name,
            frontends: ports_to_wire(s.frontends),
            backends: ports_to_wire(s.backends),
            hostnames: s
                .hostnames
                .into_iter()
                .map(|(ip, h)| (ip.to_string(), h))
                .collect(),
            zones: s
                .zones
                .into_iter()
                .map(|(ip, z)| {
                    let wire = ZoneWire {
                        zone: z.zone,
                        for_zones: z
                            .for_zones
                            .into_iter()
                            .map(|name| ForZoneWire { name })
                            .collect(),
                    };
                    (ip.to_string(), wire)
                })
                .collect(),
            labels: s.labels,
            selector: s.selector,
            include_external: s.include_external,
            shared: s.shared,
            cluster_id: s.cluster_id.into(),
        }
    }
}

impl TryFrom<Wire> for ClusterService {
    type Error = FieldError;

    fn try_from(w: Wire) -> Result<Self, FieldError> {
        Ok(Self {
            cluster: cluster_field("cluster", w.cluster)?,
            namespace: w.namespace,
            name: w.name,
            frontends: ports_from_wire("frontends", w.frontends)?,
            backends: ports_from_wire("backends", w.backends)?,
            hostnames: by_backend_ip("hostnames", w.hostnames, |h| h)?,
            zones: by_backend_ip("zones", w.zones, |z| BackendZone {
                zone: z.zone,
                for_zones: z.for_zones.into_iter().map(|f| f.name).collect(),
            })?,
            labels: w.labels,
            selector: w.selector,
            include_external: w.include_external,
            shared: w.shared,
            cluster_id: cluster_id_field("clusterID", w.cluster_id)?,
        })
    }
}

impl ClusterService {
    /// A service without frontends or backends, global and shared.
    pub fn new(
        cluster: ClusterName,
        cluster_id: ClusterId,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            cluster,
            namespace: namespace.into(),
            name: name.into(),
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            hostnames: BTreeMap::new(),
            zones: BTreeMap::new(),
            labels: BTreeMap::new(),
            selector: BTreeMap::new(),
            include_external: true,
            shared: true,
            cluster_id,
        }
    }
}

impl Resource for ClusterService {
    const KIND: &'static str = "services";
    const BASE_PREFIX: &'static str = keys::SERVICES_BASE_PREFIX;

    fn prefix(cluster: &ClusterName) -> String {
        keys::services_prefix(cluster)
    }

    fn key(&self) -> String {
        keys::service_key(&self.cluster, &self.namespace, &self.name)
    }

    fn encode(&self) -> Vec<u8> {
        encode_json(&Wire::from(self.clone()))
    }

    fn decode(key: &str, value: &[u8], scope: &RemoteScope) -> Result<Self, ValidationError> {
        check_size(key, value)?;
        let parsed = keys::parse_service_key(key)?;
        expect_cluster(key, "key", &parsed.cluster, scope)?;
        let wire: Wire = decode_json(key, value)?;
        let svc = ClusterService::try_from(wire).map_err(at(key))?;
        let claimed = (&svc.cluster, svc.namespace.as_str(), svc.name.as_str());
        expect_namespaced(key, &parsed, claimed, scope)?;
        expect_cluster_id(key, "clusterID", svc.cluster_id, scope)?;
        Ok(svc)
    }
}
