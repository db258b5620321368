//! MCS service exports: `cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>`.
//!
//! Wire format: Cilium's `MCSAPIServiceSpec`, every field in Go's order:
//! `{"cluster","name","namespace","annotations","labels","exportCreationTimestamp",
//! "ports":[{"name","protocol","appProtocol","port"}],"type":"ClusterSetIP",
//! "sessionAffinity":"None","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":10800}},
//! "ipFamilies":["IPv4"],"internalTrafficPolicy":"Cluster","trafficDistribution":"PreferClose"}`,
//! where `annotations`, `labels`, `appProtocol`, `sessionAffinityConfig`,
//! `ipFamilies`, `internalTrafficPolicy` and `trafficDistribution` are
//! omitted when empty. Cilium refuses an export without `sessionAffinity`,
//! so it is always written (`None` by default); reading, a missing one is
//! `None`. Values Cilium's `validate` refuses are refused with the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterName, RemoteScope};
use crate::error::{FieldError, ValidationError};
use crate::go::{check_size, decode_json, encode_json, null_vec};
use crate::keys;
use crate::records::{
    at, cluster_field, each_element, expect_cluster, expect_namespaced, L4Protocol,
};
use crate::timestamp::Timestamp;
use crate::{clip, Resource};

/// The MCS `ServiceImport` type of an exported service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ServiceImportType {
    /// `ClusterSetIP`: one virtual IP for the service across the clusterset.
    #[default]
    ClusterSetIp,
    /// `Headless`: no virtual IP.
    Headless,
}

impl ServiceImportType {
    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ClusterSetIp => "ClusterSetIP",
            Self::Headless => "Headless",
        }
    }
}

/// A port of an exported service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceExportPort {
    /// The port's name (omitted from the value when empty, as Kubernetes does).
    pub name: String,
    /// The protocol.
    pub protocol: L4Protocol,
    /// The application protocol (`appProtocol`), when given.
    pub app_protocol: Option<String>,
    /// The port number.
    pub port: u16,
}

/// Session affinity of an exported service (Kubernetes `ServiceAffinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SessionAffinity {
    /// `None`: no affinity.
    #[default]
    None,
    /// `ClientIP`: a client sticks to one backend.
    ClientIp,
}

impl SessionAffinity {
    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::ClientIp => "ClientIP",
        }
    }
}

/// `sessionAffinityConfig` (Kubernetes `SessionAffinityConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SessionAffinityConfig {
    /// `clientIP`; `None` when the object is absent.
    pub client_ip: Option<ClientIpConfig>,
}

/// `sessionAffinityConfig.clientIP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClientIpConfig {
    /// `timeoutSeconds`, when given.
    pub timeout_seconds: Option<i32>,
}

/// A service exported under the Kubernetes Multi-Cluster Services API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct ServiceExport {
    /// The exporting cluster.
    pub cluster: ClusterName,
    /// The service's name.
    pub name: String,
    /// The service's namespace.
    pub namespace: String,
    /// When the `ServiceExport` object was created (`null` when unknown).
    pub export_creation_timestamp: Option<Timestamp>,
    /// The service's ports.
    pub ports: Vec<ServiceExportPort>,
    /// The exported annotations (`ServiceExport.spec.exportedAnnotations`).
    pub annotations: BTreeMap<String, String>,
    /// The exported labels (`ServiceExport.spec.exportedLabels`).
    pub labels: BTreeMap<String, String>,
    /// The service's session affinity.
    pub session_affinity: SessionAffinity,
    /// The session affinity's settings, when given.
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// The service's IP families (`IPv4`, `IPv6`), in order.
    pub ip_families: Vec<String>,
    /// `Cluster` or `Local`, when given.
    pub internal_traffic_policy: Option<String>,
    /// `PreferClose`, `PreferSameZone` or `PreferSameNode`, when given.
    pub traffic_distribution: Option<String>,
    /// Whether the service has a clusterset IP.
    pub service_type: ServiceImportType,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Wire {
    cluster: String,
    name: String,
    namespace: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(rename = "exportCreationTimestamp")]
    export_creation_timestamp: Option<String>,
    #[serde(with = "null_vec")]
    ports: Vec<PortWire>,
    #[serde(rename = "type")]
    service_type: String,
    #[serde(rename = "sessionAffinity")]
    session_affinity: String,
    #[serde(
        rename = "sessionAffinityConfig",
        skip_serializing_if = "Option::is_none"
    )]
    session_affinity_config: Option<AffinityConfigWire>,
    #[serde(rename = "ipFamilies", skip_serializing_if = "Vec::is_empty")]
    ip_families: Vec<String>,
    #[serde(
        rename = "internalTrafficPolicy",
        skip_serializing_if = "Option::is_none"
    )]
    internal_traffic_policy: Option<String>,
    #[serde(
        rename = "trafficDistribution",
        skip_serializing_if = "Option::is_none"
    )]
    traffic_distribution: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct PortWire {
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    protocol: String,
    #[serde(rename = "appProtocol", skip_serializing_if = "Option::is_none")]
    app_protocol: Option<String>,
    port: u16,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct AffinityConfigWire {
    #[serde(rename = "clientIP", skip_serializing_if = "Option::is_none")]
    client_ip: Option<ClientIpWire>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ClientIpWire {
    #[serde(rename = "timeoutSeconds", skip_serializing_if = "Option::is_none")]
    timeout_seconds: Option<i32>,
}

impl From<ServiceExport> for Wire {
    fn from(e: ServiceExport) -> Self {
        Self {
            cluster: e.cluster.into_string(),
            name: e.name,
            namespace: e.namespace,
            annotations: e.annotations,
            labels: e.labels,
            export_creation_timestamp: e.export_creation_timestamp.map(|t| t.to_string()),
            ports: e
                .ports
                .into_iter()
                .map(|p| PortWire {
                    name: p.name,
                    protocol: p.protocol.to_string(),
                    app_protocol: p.app_protocol,
                    port: p.port,
                })
                .collect(),
            service_type: e.service_type.as_str().to_owned(),
            session_affinity: e.session_affinity.as_str().to_owned(),
            session_affinity_config: e.session_affinity_config.map(|c| AffinityConfigWire {
                client_ip: c.client_ip.map(|ip| ClientIpWire {
                    timeout_seconds: ip.timeout_seconds,
                }),
            }),
            ip_families: e.ip_families,
            internal_traffic_policy: e.internal_traffic_policy,
            traffic_distribution: e.traffic_distribution,
        }
    }
}

/// `value` of `field` must be one of `allowed` (Cilium's `validate`).
fn one_of(
    field: &str,
    value: &str,
    allowed: &[&str],
    reason: &'static str,
) -> Result<(), FieldError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(FieldError::Invalid {
            field: field.to_owned(),
            value: clip(value),
            reason,
        })
    }
}

impl TryFrom<Wire> for ServiceExport {
    type Error = FieldError;

    fn try_from(w: Wire) -> Result<Self, FieldError> {
        let export_creation_timestamp = w
            .export_creation_timestamp
            .map(|t| {
                t.parse::<Timestamp>().map_err(|_| FieldError::Invalid {
                    field: "exportCreationTimestamp".to_owned(),
                    value: clip(&t),
                    reason: "expected an RFC 3339 timestamp",
                })
            })
            .transpose()?;
        let ports = each_element("ports", w.ports, |at, p| {
            Ok(ServiceExportPort {
                protocol: L4Protocol::parse_field(format!("{at}.protocol"), &p.protocol)?,
                name: p.name,
                app_protocol: p.app_protocol,
                port: p.port,
            })
        })?;
        let session_affinity = match w.session_affinity.as_str() {
            "" | "None" => SessionAffinity::None,
            "ClientIP" => SessionAffinity::ClientIp,
            other => {
                return Err(FieldError::Invalid {
                    field: "sessionAffinity".to_owned(),
                    value: clip(other),
                    reason: "expected None or ClientIP",
                })
            }
        };
        each_element("ipFamilies", w.ip_families.clone(), |at, f| {
            one_of(at, &f, &["IPv4", "IPv6"], "expected IPv4 or IPv6")
        })?;
        if let Some(p) = &w.internal_traffic_policy {
            one_of(
                "internalTrafficPolicy",
                p,
                &["Cluster", "Local"],
                "expected Cluster or Local",
            )?;
        }
        if let Some(d) = &w.traffic_distribution {
            one_of(
                "trafficDistribution",
                d,
                &["PreferClose", "PreferSameZone", "PreferSameNode"],
                "expected PreferClose, PreferSameZone or PreferSameNode",
            )?;
        }
        let service_type = match w.service_type.as_str() {
            "ClusterSetIP" => ServiceImportType::ClusterSetIp,
            "Headless" => ServiceImportType::Headless,
            other => {
                return Err(FieldError::Invalid {
                    field: "type".to_owned(),
                    value: clip(other),
                    reason: "expected ClusterSetIP or Headless",
                })
            }
        };
        Ok(Self {
            cluster: cluster_field("cluster", w.cluster)?,
            name: w.name,
            namespace: w.namespace,
            export_creation_timestamp,
            ports,
            service_type,
            annotations: w.annotations,
            labels: w.labels,
            session_affinity,
            session_affinity_config: w.session_affinity_config.map(|c| SessionAffinityConfig {
                client_ip: c.client_ip.map(|ip| ClientIpConfig {
                    timeout_seconds: ip.timeout_seconds,
                }),
            }),
            ip_families: w.ip_families,
            internal_traffic_policy: w.internal_traffic_policy,
            traffic_distribution: w.traffic_distribution,
        })
    }
}

impl Resource for ServiceExport {
    const KIND: &'static str = "serviceexports";
    const BASE_PREFIX: &'static str = keys::SERVICE_EXPORTS_BASE_PREFIX;

    fn prefix(cluster: &ClusterName) -> String {
        keys::service_exports_prefix(cluster)
    }

    fn key(&self) -> String {
        keys::service_export_key(&self.cluster, &self.namespace, &self.name)
    }

    fn encode(&self) -> Vec<u8> {
        encode_json(&Wire::from(self.clone()))
    }

    fn decode(key: &str, value: &[u8], scope: &RemoteScope) -> Result<Self, ValidationError> {
        check_size(key, value)?;
        let parsed = keys::parse_service_export_key(key)?;
        expect_cluster(key, "key", &parsed.cluster, scope)?;
        let wire: Wire = decode_json(key, value)?;
        let export = ServiceExport::try_from(wire).map_err(at(key))?;
        let claimed = (
            &export.cluster,
            export.namespace.as_str(),
            export.name.as_str(),
        );
        expect_namespaced(key, &parsed, claimed, scope)?;
        Ok(export)
    }
}
