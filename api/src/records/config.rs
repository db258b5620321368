//! The cluster config: `cilium/cluster-config/<cluster>`.
//!
//! Wire format (Cilium's `CiliumClusterConfig`):
//! `{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}`,
//! plus `"endpointSlicesExportMode":"endpointslices-only"` (or
//! `"services-and-endpointslices"`) from clusters that export EndpointSlices.
//! `syncedCanaries` and `cached` are omitted when false, `serviceExportsEnabled`
//! when unknown, `endpointSlicesExportMode` when services only; a missing
//! `maxConnectedClusters` means 255, as in Cilium.

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, ClusterName, MaxConnectedClusters, RemoteScope};
use crate::error::{FieldError, ValidationError};
use crate::go::{check_size, decode_json, encode_json};
use crate::keys;
use crate::records::at;

/// How a cluster exports the backends of its global services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EndpointSlicesExportMode {
    /// Only `cilium/state/services/v1/...` records (wire: the field is absent
    /// or `""`); every cluster before Cilium's service v2.
    #[default]
    ServicesOnly,
    /// Both service records and `cilium/state/endpointslices/v1/...` records.
    ServicesAndEndpointSlices,
    /// Only EndpointSlice records: the backends must be read from those.
    EndpointSlicesOnly,
}

impl EndpointSlicesExportMode {
    /// The wire spelling (`""` for services only).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ServicesOnly => "",
            Self::ServicesAndEndpointSlices => "services-and-endpointslices",
            Self::EndpointSlicesOnly => "endpointslices-only",
        }
    }

    /// A name for status documents and logs (`services-only` for the empty
    /// wire value).
    pub const fn name(self) -> &'static str {
        match self {
            Self::ServicesOnly => "services-only",
            other => other.as_str(),
        }
    }

    /// Whether global-service backends come from EndpointSlice records.
    pub const fn backends_from_endpoint_slices(self) -> bool {
        matches!(self, Self::EndpointSlicesOnly)
    }
}

/// What a cluster's kvstore offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterCapabilities {
    /// The cluster writes sync canaries (`cilium/synced/...`); readers may
    /// wait for them before declaring a prefix synced.
    pub synced_canaries: bool,
    /// The config was republished by a KVStoreMesh cache; the records live
    /// under `cilium/cache/...`.
    pub cached: bool,
    /// The ID mode of the mesh.
    pub max_connected_clusters: MaxConnectedClusters,
    /// Whether MCS service exports are published; `None` when the writer
    /// predates the field.
    pub service_exports_enabled: Option<bool>,
    /// Where the backends of global services are published.
    pub endpoint_slices_export_mode: EndpointSlicesExportMode,
}

/// The config every cluster publishes about itself; read first on connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct ClusterConfig {
    /// The cluster's ID.
    pub id: ClusterId,
    /// What the cluster's kvstore offers.
    pub capabilities: ClusterCapabilities,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Wire {
    #[serde(default, skip_serializing_if = "is_zero")]
    id: u32,
    #[serde(default)]
    capabilities: CapabilitiesWire,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CapabilitiesWire {
    #[serde(rename = "syncedCanaries", default, skip_serializing_if = "is_false")]
    synced_canaries: bool,
    #[serde(rename = "cached", default, skip_serializing_if = "is_false")]
    cached: bool,
    #[serde(
        rename = "maxConnectedClusters",
        default,
        skip_serializing_if = "is_zero"
    )]
    max_connected_clusters: u32,
    #[serde(
        rename = "serviceExportsEnabled",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    service_exports_enabled: Option<bool>,
    #[serde(
        rename = "endpointSlicesExportMode",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    endpoint_slices_export_mode: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl From<ClusterConfig> for Wire {
    fn from(c: ClusterConfig) -> Self {
        Self {
            id: c.id.into(),
            capabilities: CapabilitiesWire {
                synced_canaries: c.capabilities.synced_canaries,
                cached: c.capabilities.cached,
                max_connected_clusters: c.capabilities.max_connected_clusters.as_u32(),
                service_exports_enabled: c.capabilities.service_exports_enabled,
                endpoint_slices_export_mode: c
                    .capabilities
                    .endpoint_slices_export_mode
                    .as_str()
                    .to_owned(),
            },
        }
    }
}

impl TryFrom<Wire> for ClusterConfig {
    type Error = FieldError;

    fn try_from(w: Wire) -> Result<Self, FieldError> {
        let max = match w.capabilities.max_connected_clusters {
            0 => MaxConnectedClusters::Max255,
            n => MaxConnectedClusters::try_from(n).map_err(|source| {
                FieldError::InvalidClusterId {
                    field: "capabilities.maxConnectedClusters",
                    source,
                }
            })?,
        };
        let id = ClusterId::from_u32(w.id, max).map_err(|source| FieldError::InvalidClusterId {
            field: "id",
            source,
        })?;
        let mode = match w.capabilities.endpoint_slices_export_mode.as_str() {
            "" => EndpointSlicesExportMode::ServicesOnly,
            "services-and-endpointslices" => EndpointSlicesExportMode::ServicesAndEndpointSlices,
            "endpointslices-only" => EndpointSlicesExportMode::EndpointSlicesOnly,
            other => {
                return Err(FieldError::Invalid {
                    field: "capabilities.endpointSlicesExportMode".to_owned(),
                    value: crate::clip(other),
                    reason: "expected \"\", services-and-endpointslices or endpointslices-only",
                })
            }
        };
        Ok(Self {
            id,
            capabilities: ClusterCapabilities {
                synced_canaries: w.capabilities.synced_canaries,
                cached: w.capabilities.cached,
                max_connected_clusters: max,
                service_exports_enabled: w.capabilities.service_exports_enabled,
                endpoint_slices_export_mode: mode,
            },
        })
    }
}

impl ClusterConfig {
    /// The config our clustermesh-apiserver publishes: synced canaries on,
    /// not cached, service exports as given.
    pub fn new(id: ClusterId, max: MaxConnectedClusters, service_exports_enabled: bool) -> Self {
        Self {
            id,
            capabilities: ClusterCapabilities {
                synced_canaries: true,
                cached: false,
                max_connected_clusters: max,
                service_exports_enabled: Some(service_exports_enabled),
                endpoint_slices_export_mode: EndpointSlicesExportMode::ServicesOnly,
            },
        }
    }

    /// `cilium/cluster-config/<cluster>` (wire format).
    pub fn key(cluster: &ClusterName) -> String {
        keys::cluster_config_key(cluster)
    }

    /// The value as written to etcd.
    pub fn encode(&self) -> Vec<u8> {
        encode_json(&Wire::from(*self))
    }

    /// Decodes the config found under `key`, which must be `cluster`'s.
    ///
    /// # Errors
    ///
    /// A [`ValidationError`]: value too large, key of another cluster, bad
    /// JSON, an ID of 0 or beyond `maxConnectedClusters`, or a
    /// `maxConnectedClusters` other than 255 or 511.
    pub fn decode(key: &str, value: &[u8], cluster: &ClusterName) -> Result<Self, ValidationError> {
        check_size(key, value)?;
        let in_key = keys::parse_cluster_config_key(key)?;
        if in_key != *cluster {
            return Err(ValidationError::ClusterMismatch {
                key: crate::clip(key),
                field: "key",
                expected: cluster.clone(),
                got: in_key.to_string(),
            });
        }
        let wire: Wire = decode_json(key, value)?;
        Self::try_from(wire).map_err(at(key))
    }

    /// The scope of a connection to `cluster`, which published this config.
    pub fn scope(&self, cluster: ClusterName) -> RemoteScope {
        RemoteScope::new(cluster, self.id, self.capabilities.max_connected_clusters)
    }
}
