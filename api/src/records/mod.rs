//! The records of the kvstore schema (`docs/architecture.md` §4) and their
//! validation.
//!
//! Each record has a typed public struct and a private wire struct that
//! mirrors Cilium's Go struct field for field. serde on the public struct goes
//! through the wire struct, so `serde_json::to_value(&node)` produces exactly
//! what Cilium writes. [`crate::Resource::decode`] adds the checks that need
//! the key and the connection's [`RemoteScope`].

use std::fmt;
use std::str::FromStr;

use crate::clip;
use crate::cluster::{ClusterId, ClusterName, RemoteScope};
use crate::error::{FieldError, ValidationError};

mod config;
pub mod endpoint_slice;
mod identity;
mod ipcache;
mod node;
mod service;
mod service_export;

pub use config::{ClusterCapabilities, ClusterConfig, EndpointSlicesExportMode};
pub use endpoint_slice::ClusterEndpointSlice;
pub use identity::IdentityRecord;
pub use ipcache::{IpcacheEntry, NamedPort};
pub use node::{AddressType, Node, NodeAddress};
pub use service::{BackendZone, ClusterService, L4Addr, PortConfiguration};
pub use service_export::{
    ClientIpConfig, ServiceExport, ServiceExportPort, ServiceImportType, SessionAffinity,
    SessionAffinityConfig,
};

/// A layer-4 protocol as Cilium and Kubernetes spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4Protocol {
    /// `TCP`
    Tcp,
    /// `UDP`
    Udp,
    /// `SCTP`
    Sctp,
    /// `ANY` (Cilium: any protocol)
    Any,
}

impl L4Protocol {
    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Any => "ANY",
        }
    }

    /// Parses the wire spelling of the field `field`.
    pub(crate) fn parse_field(field: impl Into<String>, value: &str) -> Result<Self, FieldError> {
        value.parse().map_err(|()| FieldError::Invalid {
            field: field.into(),
            value: clip(value),
            reason: "expected TCP, UDP, SCTP or ANY",
        })
    }
}

impl FromStr for L4Protocol {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            "ANY" => Ok(Self::Any),
            _ => Err(()),
        }
    }
}

impl fmt::Display for L4Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Converts a field error into a validation error for `key`.
pub(crate) fn at(key: &str) -> impl FnOnce(FieldError) -> ValidationError + '_ {
    move |source| ValidationError::Field {
        key: clip(key),
        source,
    }
}

/// Converts each element of the wire list `list`, handing `convert` the
/// element's own field path (`list[i]`) so that an error names the element.
pub(crate) fn each_element<W, T>(
    list: &str,
    elements: Vec<W>,
    mut convert: impl FnMut(&str, W) -> Result<T, FieldError>,
) -> Result<Vec<T>, FieldError> {
    elements
        .into_iter()
        .enumerate()
        .map(|(i, element)| convert(&format!("{list}[{i}]"), element))
        .collect()
}

/// Parses a cluster-name field.
pub(crate) fn cluster_field(field: &'static str, value: String) -> Result<ClusterName, FieldError> {
    ClusterName::new(value).map_err(|source| FieldError::InvalidClusterName { field, source })
}

/// Parses a cluster-ID field; the widest mode (511) bounds it here, the
/// scope check pins it to the connection's ID.
pub(crate) fn cluster_id_field(field: &'static str, value: u32) -> Result<ClusterId, FieldError> {
    ClusterId::from_u32(value, crate::MaxConnectedClusters::Max511)
        .map_err(|source| FieldError::InvalidClusterId { field, source })
}

/// The cluster named by `field` must be the connection's.
pub(crate) fn expect_cluster(
    key: &str,
    field: &'static str,
    got: &ClusterName,
    scope: &RemoteScope,
) -> Result<(), ValidationError> {
    if *got == scope.cluster {
        Ok(())
    } else {
        Err(ValidationError::ClusterMismatch {
            key: clip(key),
            field,
            expected: scope.cluster.clone(),
            got: got.to_string(),
        })
    }
}

/// The cluster ID named by `field` must be the connection's.
pub(crate) fn expect_cluster_id(
    key: &str,
    field: &'static str,
    got: ClusterId,
    scope: &RemoteScope,
) -> Result<(), ValidationError> {
    if got == scope.cluster_id {
        Ok(())
    } else {
        Err(ValidationError::ClusterIdMismatch {
            key: clip(key),
            field,
            expected: scope.cluster_id,
            got: got.into(),
        })
    }
}

/// What the key says must equal what the value says.
pub(crate) fn expect_same<T: PartialEq + fmt::Display + ?Sized>(
    key: &str,
    field: &'static str,
    in_key: &T,
    in_value: &T,
) -> Result<(), ValidationError> {
    if in_key == in_value {
        Ok(())
    } else {
        Err(ValidationError::KeyMismatch {
            key: clip(key),
            field,
            in_key: clip(&in_key.to_string()),
            in_value: clip(&in_value.to_string()),
        })
    }
}

/// A key in the cache layout carries a cluster; it must be the connection's.
pub(crate) fn expect_key_cluster(
    key: &str,
    cluster: Option<&ClusterName>,
    scope: &RemoteScope,
) -> Result<(), ValidationError> {
    cluster.map_or(Ok(()), |c| expect_cluster(key, "key", c, scope))
}

/// The checks shared by the records keyed `<prefix>/<cluster>/<namespace>/<name>`:
/// the value's cluster, namespace and name against the scope and the key.
pub(crate) fn expect_namespaced(
    key: &str,
    parsed: &crate::keys::NamespacedKey,
    value: (&ClusterName, &str, &str),
    scope: &RemoteScope,
) -> Result<(), ValidationError> {
    let (cluster, namespace, name) = value;
    expect_cluster(key, "cluster", cluster, scope)?;
    expect_same(key, "namespace", parsed.namespace.as_str(), namespace)?;
    expect_same(key, "name", parsed.name.as_str(), name)
}
