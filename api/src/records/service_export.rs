//! MCS service exports: `cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>`.
//!
//! Wire format (Cilium's `MCSAPIServiceSpec`, the fields the schema fixes):
//! `{"cluster","name","namespace","exportCreationTimestamp","ports":[{"name","protocol","port"}],"type":"ClusterSetIP"}`.
//! Cilium also writes `annotations`, `labels`, `sessionAffinity` and
//! `sessionAffinityConfig`; they are read and ignored.

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
    /// The port number.
    pub port: u16,
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
    /// Whether the service has a clusterset IP.
    pub service_type: ServiceImportType,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Wire {
    cluster: String,
    name: String,
    namespace: String,
    #[serde(rename = "exportCreationTimestamp")]
    export_creation_timestamp: Option<String>,
    #[serde(with = "null_vec")]
    ports: Vec<PortWire>,
    #[serde(rename = "type")]
    service_type: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct PortWire {
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    protocol: String,
    port: u16,
}

impl From<ServiceExport> for Wire {
    fn from(e: ServiceExport) -> Self {
        Self {
            cluster: e.cluster.into_string(),
            name: e.name,
            namespace: e.namespace,
            export_creation_timestamp: e.export_creation_timestamp.map(|t| t.to_string()),
            ports: e
                .ports
                .into_iter()
                .map(|p| PortWire {
                    name: p.name,
                    protocol: p.protocol.to_string(),
                    port: p.port,
                })
                .collect(),
            service_type: e.service_type.as_str().to_owned(),
        }
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
                port: p.port,
            })
        })?;
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
