//! kvstore keys: builders and parsers.
//!
//! **Wire format (FIXED).** Every key here is Cilium Cluster Mesh schema v1,
//! shared byte for byte with Cilium agents, clustermesh-apiservers and
//! KVStoreMesh. Changing one breaks interoperability with every reader and
//! writer of the mesh.
//!
//! | record | key in the cluster's own etcd | key in a KVStoreMesh cache |
//! |---|---|---|
//! | cluster config | `cilium/cluster-config/<cluster>` | same key, `"cached":true` |
//! | node | `cilium/state/nodes/v1/<cluster>/<node>` | `cilium/cache/nodes/v1/<cluster>/<node>` |
//! | ipcache entry | `cilium/state/ip/v1/default/<ip>` | `cilium/cache/ip/v1/<cluster>/<ip>` |
//! | identity | `cilium/state/identities/v1/id/<id>` | `cilium/cache/identities/v1/<cluster>/id/<id>` |
//! | service | `cilium/state/services/v1/<cluster>/<ns>/<name>` | `cilium/cache/services/v1/<cluster>/<ns>/<name>` |
//! | service export | `cilium/state/serviceexports/v1/<cluster>/<ns>/<name>` | `cilium/cache/serviceexports/v1/<cluster>/<ns>/<name>` |
//! | EndpointSlice | `cilium/state/endpointslices/v1/<cluster>/<ns>/<slice>` | `cilium/cache/endpointslices/v1/<cluster>/<ns>/<slice>` |
//! | sync canary | `cilium/synced/<cluster>/<base prefix>` | `cilium/synced/<cluster>/cilium/cache/<kind>/v1` |
//! | heartbeat | `cilium/.heartbeat` | |
//! | cluster config required | `cilium/.has-cluster-config` | |
//!
//! Parsers accept both the state and the cache layout; where the key carries
//! a cluster name, it is returned so that the caller can check it.

use std::net::{AddrParseError, IpAddr};

use crate::cluster::{ClusterError, ClusterName};
use crate::identity::NumericIdentity;
use crate::names::{validate_dns_label, validate_dns_subdomain};
use crate::{clip, Resource};

/// Root of the records a cluster publishes about itself.
pub const STATE_PREFIX: &str = "cilium/state/";
/// Root of the records KVStoreMesh caches from remote clusters.
pub const CACHE_PREFIX: &str = "cilium/cache/";
/// Nodes (wire format).
pub const NODES_BASE_PREFIX: &str = "cilium/state/nodes/v1";
/// ipcache entries (wire format).
pub const IP_BASE_PREFIX: &str = "cilium/state/ip/v1";
/// The address space segment of ipcache keys (wire format).
pub const IP_ADDRESS_SPACE: &str = "default";
/// Identities (wire format).
pub const IDENTITIES_BASE_PREFIX: &str = "cilium/state/identities/v1";
/// Global services (wire format).
pub const SERVICES_BASE_PREFIX: &str = "cilium/state/services/v1";
/// MCS service exports (wire format).
pub const SERVICE_EXPORTS_BASE_PREFIX: &str = "cilium/state/serviceexports/v1";
/// EndpointSlices of global services (wire format; Cilium's service v2).
pub const ENDPOINT_SLICES_BASE_PREFIX: &str = "cilium/state/endpointslices/v1";
/// Cluster configs, one key per cluster (wire format).
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config/";
/// Sync canaries (wire format).
pub const SYNCED_PREFIX: &str = "cilium/synced/";
/// The heartbeat key, rewritten every minute with an RFC 3339 timestamp (wire format).
pub const HEARTBEAT_KEY: &str = "cilium/.heartbeat";
/// Written when a clustermesh etcd is set up (wire format; the value is
/// ignored): its presence tells a reader that the cluster config will be
/// there, so a missing one is waited for rather than taken as a cluster
/// without one.
pub const HAS_CLUSTER_CONFIG_KEY: &str = "cilium/.has-cluster-config";
/// The clustermesh-apiserver's private state (not part of Cilium's
/// schema; never readable by another cluster): `mesh/registry/v1/<cluster>/`.
pub const REGISTRY_BASE_PREFIX: &str = "mesh/registry/v1";

/// A key that does not fit the layout of its record kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is outside the record kind's prefixes.
    #[error("key {key:?} does not start with {expected}")]
    WrongPrefix {
        /// The key (clipped).
        key: String,
        /// The accepted prefixes.
        expected: String,
    },
    /// The key has the wrong number of segments, or an empty one.
    #[error("key {key:?} does not have the layout {layout}")]
    Malformed {
        /// The key (clipped).
        key: String,
        /// The expected layout.
        layout: &'static str,
    },
    /// The cluster segment is not a valid cluster name.
    #[error("cluster segment of key {key:?}: {source}")]
    InvalidCluster {
        /// The key (clipped).
        key: String,
        /// The rule the name breaks.
        #[source]
        source: ClusterError,
    },
    /// A name segment (node, namespace, service) is malformed.
    #[error("{segment} {value:?} in key {key:?} is not a valid name: {reason}")]
    InvalidName {
        /// The key (clipped).
        key: String,
        /// Which segment.
        segment: &'static str,
        /// The segment's text (clipped).
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The identity segment is not a canonical decimal `u32`.
    #[error("identity {value:?} in key {key:?} is not a decimal number without leading zeros that fits 32 bits")]
    InvalidIdentity {
        /// The key (clipped).
        key: String,
        /// The segment's text (clipped).
        value: String,
    },
    /// The IP segment parses but is not spelled as the writers spell it
    /// (`2001:db8:0::1` for `2001:db8::1`): two keys for one IP would be
    /// two records, so only the canonical form is a key.
    #[error("IP {value:?} in key {key:?} is not in canonical form, expected {canonical:?}")]
    NonCanonicalIp {
        /// The key (clipped).
        key: String,
        /// The segment's text (clipped).
        value: String,
        /// The canonical spelling of the same address.
        canonical: String,
    },
    /// The IP segment does not parse.
    #[error("IP {value:?} in key {key:?} is not a valid IP address")]
    InvalidIp {
        /// The key (clipped).
        key: String,
        /// The segment's text (clipped).
        value: String,
        /// The parser's complaint.
        #[source]
        source: AddrParseError,
    },
}

impl KeyError {
    /// Stable snake_case label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::WrongPrefix { .. } | Self::Malformed { .. } | Self::InvalidIdentity { .. } => {
                "invalid_key"
            }
            Self::InvalidCluster { .. } | Self::InvalidName { .. } => "invalid_name",
            Self::InvalidIp { .. } | Self::NonCanonicalIp { .. } => "invalid_ip",
        }
    }

    /// The offending key (clipped).
    pub fn key(&self) -> &str {
        match self {
            Self::WrongPrefix { key, .. }
            | Self::Malformed { key, .. }
            | Self::InvalidCluster { key, .. }
            | Self::InvalidName { key, .. }
            | Self::InvalidIdentity { key, .. }
            | Self::InvalidIp { key, .. }
            | Self::NonCanonicalIp { key, .. } => key,
        }
    }
}

// ---- builders ---------------------------------------------------------------

/// `cilium/state/nodes/v1/<cluster>/`
pub fn nodes_prefix(cluster: &ClusterName) -> String {
    format!("{NODES_BASE_PREFIX}/{cluster}/")
}

/// `cilium/state/nodes/v1/<cluster>/<node>`
pub fn node_key(cluster: &ClusterName, node: &str) -> String {
    format!("{NODES_BASE_PREFIX}/{cluster}/{node}")
}

/// `cilium/state/ip/v1/default/`
pub fn ip_prefix() -> String {
    format!("{IP_BASE_PREFIX}/{IP_ADDRESS_SPACE}/")
}

/// `cilium/state/ip/v1/default/<ip>`
pub fn ip_key(ip: IpAddr) -> String {
    format!("{IP_BASE_PREFIX}/{IP_ADDRESS_SPACE}/{ip}")
}

/// `cilium/state/identities/v1/id/`
pub fn identities_prefix() -> String {
    format!("{IDENTITIES_BASE_PREFIX}/id/")
}

/// `cilium/state/identities/v1/id/<id>`
pub fn identity_key(id: NumericIdentity) -> String {
    format!("{IDENTITIES_BASE_PREFIX}/id/{id}")
}

/// `cilium/state/services/v1/<cluster>/`
pub fn services_prefix(cluster: &ClusterName) -> String {
    format!("{SERVICES_BASE_PREFIX}/{cluster}/")
}

/// `cilium/state/services/v1/<cluster>/<namespace>/<name>`
pub fn service_key(cluster: &ClusterName, namespace: &str, name: &str) -> String {
    format!("{SERVICES_BASE_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `cilium/state/serviceexports/v1/<cluster>/`
pub fn service_exports_prefix(cluster: &ClusterName) -> String {
    format!("{SERVICE_EXPORTS_BASE_PREFIX}/{cluster}/")
}

/// `cilium/state/serviceexports/v1/<cluster>/<namespace>/<name>`
pub fn service_export_key(cluster: &ClusterName, namespace: &str, name: &str) -> String {
    format!("{SERVICE_EXPORTS_BASE_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `cilium/state/endpointslices/v1/<cluster>/`
pub fn endpoint_slices_prefix(cluster: &ClusterName) -> String {
    format!("{ENDPOINT_SLICES_BASE_PREFIX}/{cluster}/")
}

/// `cilium/state/endpointslices/v1/<cluster>/<namespace>/<slice>`
pub fn endpoint_slice_key(cluster: &ClusterName, namespace: &str, name: &str) -> String {
    format!("{ENDPOINT_SLICES_BASE_PREFIX}/{cluster}/{namespace}/{name}")
}

/// `mesh/registry/v1/<cluster>/`: the apiserver's private state.
pub fn registry_prefix(cluster: &str) -> String {
    format!("{REGISTRY_BASE_PREFIX}/{cluster}/")
}

/// `cilium/cluster-config/<cluster>`.
pub fn cluster_config_key(cluster: &ClusterName) -> String {
    format!("{CLUSTER_CONFIG_PREFIX}{cluster}")
}

/// `cilium/synced/<cluster>/<base prefix>`, e.g.
/// `cilium/synced/c1/cilium/state/nodes/v1`: written once the first full
/// export of `base_prefix` is in etcd.
pub fn sync_canary_key(cluster: &ClusterName, base_prefix: &str) -> String {
    format!("{SYNCED_PREFIX}{cluster}/{base_prefix}")
}

/// The KVStoreMesh counterpart of a state base prefix:
/// `cilium/state/nodes/v1` becomes `cilium/cache/nodes/v1`. `None` for a
/// prefix outside `cilium/state/`.
pub fn cache_base_prefix(base_prefix: &str) -> Option<String> {
    base_prefix
        .strip_prefix(STATE_PREFIX)
        .map(|rest| format!("{CACHE_PREFIX}{rest}"))
}

/// The prefix under which KVStoreMesh caches `cluster`'s records of kind `R`,
/// e.g. `cilium/cache/nodes/v1/<cluster>/`, `cilium/cache/ip/v1/<cluster>/`,
/// `cilium/cache/identities/v1/<cluster>/id/`.
pub fn cache_prefix<R: Resource>(cluster: &ClusterName) -> String {
    let base = cache_base_prefix(R::BASE_PREFIX).unwrap_or_else(|| R::BASE_PREFIX.to_owned());
    if R::BASE_PREFIX == IDENTITIES_BASE_PREFIX {
        format!("{base}/{cluster}/id/")
    } else {
        format!("{base}/{cluster}/")
    }
}

// ---- parsers ----------------------------------------------------------------

/// A parsed node key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKey {
    /// The cluster segment.
    pub cluster: ClusterName,
    /// The node name segment.
    pub name: String,
}

/// A parsed ipcache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpKey {
    /// The cluster segment (cache layout only).
    pub cluster: Option<ClusterName>,
    /// The IP.
    pub ip: IpAddr,
}

/// A parsed identity key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKey {
    /// The cluster segment (cache layout only).
    pub cluster: Option<ClusterName>,
    /// The identity.
    pub id: NumericIdentity,
}

/// A parsed service or service-export key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacedKey {
    /// The cluster segment.
    pub cluster: ClusterName,
    /// The namespace segment.
    pub namespace: String,
    /// The name segment.
    pub name: String,
}

const NODE_LAYOUT: &str = "cilium/{state,cache}/nodes/v1/<cluster>/<node>";
const IP_LAYOUT: &str = "cilium/state/ip/v1/default/<ip> or cilium/cache/ip/v1/<cluster>/<ip>";
const IDENTITY_LAYOUT: &str =
    "cilium/state/identities/v1/id/<id> or cilium/cache/identities/v1/<cluster>/id/<id>";
const SERVICE_LAYOUT: &str = "<prefix>/<cluster>/<namespace>/<name>";
const CLUSTER_CONFIG_LAYOUT: &str = "cilium/cluster-config/<cluster>";
const CANARY_LAYOUT: &str = "cilium/synced/<cluster>/<base prefix>";

/// Strips the state or the cache form of `base` (plus '/') from `key`;
/// returns the rest and whether it was the cache form.
fn strip_base<'k>(key: &'k str, base: &str) -> Result<(&'k str, bool), KeyError> {
    let state = format!("{base}/");
    let Some(cache) = cache_base_prefix(base) else {
        return strip_exact(key, &state).map(|rest| (rest, false));
    };
    if let Some(rest) = key.strip_prefix(state.as_str()) {
        return Ok((rest, false));
    }
    if let Some(rest) = key
        .strip_prefix(cache.as_str())
        .and_then(|r| r.strip_prefix('/'))
    {
        return Ok((rest, true));
    }
    Err(KeyError::WrongPrefix {
        key: clip(key),
        expected: format!("{state:?} or \"{cache}/\""),
    })
}

/// `key` without `prefix`, or [`KeyError::WrongPrefix`] naming `prefix`.
fn strip_exact<'k>(key: &'k str, prefix: &str) -> Result<&'k str, KeyError> {
    key.strip_prefix(prefix)
        .ok_or_else(|| KeyError::WrongPrefix {
            key: clip(key),
            expected: format!("{prefix:?}"),
        })
}

/// Splits `rest` into exactly `N` non-empty '/'-separated segments.
fn segments<'k, const N: usize>(
    key: &str,
    rest: &'k str,
    layout: &'static str,
) -> Result<[&'k str; N], KeyError> {
    let malformed = || KeyError::Malformed {
        key: clip(key),
        layout,
    };
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(malformed());
    }
    parts.try_into().map_err(|_| malformed())
}

fn cluster_segment(key: &str, segment: &str) -> Result<ClusterName, KeyError> {
    ClusterName::new(segment).map_err(|source| KeyError::InvalidCluster {
        key: clip(key),
        source,
    })
}

fn name_segment(
    key: &str,
    segment: &'static str,
    value: &str,
    check: fn(&str) -> Result<(), &'static str>,
) -> Result<String, KeyError> {
    check(value).map_err(|reason| KeyError::InvalidName {
        key: clip(key),
        segment,
        value: clip(value),
        reason,
    })?;
    Ok(value.to_owned())
}

/// The IP of a key segment, which must be in the canonical textual form
/// [`ip_key`] writes: `Display` of [`IpAddr`], i.e. RFC 5952 for IPv6
/// (lowercase, longest run of zero groups compressed, no leading zeros) and
/// the dotted quad without leading zeros for IPv4, as Go's `net/netip`
/// formats them. As [`identity_segment`] refuses `0256` for `256`, one
/// address has exactly one key.
fn ip_segment(key: &str, value: &str) -> Result<IpAddr, KeyError> {
    let ip: IpAddr = value.parse().map_err(|source| KeyError::InvalidIp {
        key: clip(key),
        value: clip(value),
        source,
    })?;
    let canonical = ip.to_string();
    if canonical != value {
        return Err(KeyError::NonCanonicalIp {
            key: clip(key),
            value: clip(value),
            canonical,
        });
    }
    Ok(ip)
}

fn identity_segment(key: &str, value: &str) -> Result<NumericIdentity, KeyError> {
    let invalid = || KeyError::InvalidIdentity {
        key: clip(key),
        value: clip(value),
    };
    let canonical =
        value.bytes().all(|b| b.is_ascii_digit()) && !(value.len() > 1 && value.starts_with('0'));
    if !canonical {
        return Err(invalid());
    }
    value.parse().map(NumericIdentity).map_err(|_| invalid())
}

/// Parses `cilium/{state,cache}/nodes/v1/<cluster>/<node>`.
///
/// # Errors
///
/// A [`KeyError`] naming the prefix, layout or segment that is wrong; the node
/// name must be a DNS subdomain (Kubernetes node-name syntax).
pub fn parse_node_key(key: &str) -> Result<NodeKey, KeyError> {
    let (rest, _) = strip_base(key, NODES_BASE_PREFIX)?;
    let [cluster, name] = segments(key, rest, NODE_LAYOUT)?;
    Ok(NodeKey {
        cluster: cluster_segment(key, cluster)?,
        name: name_segment(key, "node name", name, validate_dns_subdomain)?,
    })
}

/// Parses `cilium/state/ip/v1/default/<ip>` or `cilium/cache/ip/v1/<cluster>/<ip>`.
///
/// # Errors
///
/// A [`KeyError`] naming the prefix, layout or segment that is wrong; an IP
/// that parses but is not in canonical form is [`KeyError::NonCanonicalIp`].
pub fn parse_ip_key(key: &str) -> Result<IpKey, KeyError> {
    let (rest, cache) = strip_base(key, IP_BASE_PREFIX)?;
    let [space, ip] = segments(key, rest, IP_LAYOUT)?;
    let cluster = if cache {
        Some(cluster_segment(key, space)?)
    } else if space == IP_ADDRESS_SPACE {
        None
    } else {
        return Err(KeyError::Malformed {
            key: clip(key),
            layout: IP_LAYOUT,
        });
    };
    Ok(IpKey {
        cluster,
        ip: ip_segment(key, ip)?,
    })
}

/// Parses `cilium/state/identities/v1/id/<id>` or
/// `cilium/cache/identities/v1/<cluster>/id/<id>`.
///
/// # Errors
///
/// A [`KeyError`] naming the prefix, layout or segment that is wrong.
pub fn parse_identity_key(key: &str) -> Result<IdentityKey, KeyError> {
    let (rest, cache) = strip_base(key, IDENTITIES_BASE_PREFIX)?;
    let malformed = || KeyError::Malformed {
        key: clip(key),
        layout: IDENTITY_LAYOUT,
    };
    let (cluster, id) = if cache {
        let [cluster, id_marker, id] = segments(key, rest, IDENTITY_LAYOUT)?;
        if id_marker != "id" {
            return Err(malformed());
        }
        (Some(cluster_segment(key, cluster)?), id)
    } else {
        let [id_marker, id] = segments(key, rest, IDENTITY_LAYOUT)?;
        if id_marker != "id" {
            return Err(malformed());
        }
        (None, id)
    };
    Ok(IdentityKey {
        cluster,
        id: identity_segment(key, id)?,
    })
}

fn parse_namespaced(
    key: &str,
    base: &str,
    name_rule: fn(&str) -> Result<(), &'static str>,
) -> Result<NamespacedKey, KeyError> {
    let (rest, _) = strip_base(key, base)?;
    let [cluster, namespace, name] = segments(key, rest, SERVICE_LAYOUT)?;
    Ok(NamespacedKey {
        cluster: cluster_segment(key, cluster)?,
        namespace: name_segment(key, "namespace", namespace, validate_dns_label)?,
        name: name_segment(key, "name", name, name_rule)?,
    })
}

/// Parses `cilium/{state,cache}/services/v1/<cluster>/<namespace>/<name>`.
///
/// # Errors
///
/// A [`KeyError`] naming the prefix, layout or segment that is wrong;
/// namespace and name must be DNS labels.
pub fn parse_service_key(key: &str) -> Result<NamespacedKey, KeyError> {
    parse_namespaced(key, SERVICES_BASE_PREFIX, validate_dns_label)
}

/// Parses `cilium/{state,cache}/serviceexports/v1/<cluster>/<namespace>/<name>`.
///
/// # Errors
///
/// As [`parse_service_key`].
pub fn parse_service_export_key(key: &str) -> Result<NamespacedKey, KeyError> {
    parse_namespaced(key, SERVICE_EXPORTS_BASE_PREFIX, validate_dns_label)
}

/// Parses `cilium/{state,cache}/endpointslices/v1/<cluster>/<namespace>/<slice>`.
///
/// # Errors
///
/// As [`parse_service_key`], except that the slice name is a DNS subdomain
/// (Kubernetes object-name syntax: generated slice names may have dots).
pub fn parse_endpoint_slice_key(key: &str) -> Result<NamespacedKey, KeyError> {
    parse_namespaced(key, ENDPOINT_SLICES_BASE_PREFIX, validate_dns_subdomain)
}

/// Parses `cilium/cluster-config/<cluster>`.
///
/// # Errors
///
/// A [`KeyError`] for another prefix, extra segments or an invalid name.
pub fn parse_cluster_config_key(key: &str) -> Result<ClusterName, KeyError> {
    let rest = strip_exact(key, CLUSTER_CONFIG_PREFIX)?;
    let [cluster] = segments(key, rest, CLUSTER_CONFIG_LAYOUT)?;
    cluster_segment(key, cluster)
}

/// Parses `cilium/synced/<cluster>/<base prefix>` into the cluster and the
/// base prefix (e.g. `cilium/state/nodes/v1`).
///
/// # Errors
///
/// A [`KeyError`] for another prefix, a missing base prefix or an invalid
/// cluster name.
pub fn parse_sync_canary_key(key: &str) -> Result<(ClusterName, &str), KeyError> {
    let rest = strip_exact(key, SYNCED_PREFIX)?;
    match rest.split_once('/') {
        Some((cluster, base)) if !base.is_empty() && !base.ends_with('/') => {
            Ok((cluster_segment(key, cluster)?, base))
        }
        _ => Err(KeyError::Malformed {
            key: clip(key),
            layout: CANARY_LAYOUT,
        }),
    }
}
