//! Why a record read from a kvstore was refused.
//!
//! Every rejection names the key, the field, what was expected and what was
//! found, and maps to a stable snake_case [`reason`](ValidationError::reason)
//! that readers use as a metrics label.

use std::net::AddrParseError;
use std::ops::RangeInclusive;

use crate::cluster::{ClusterError, ClusterId, ClusterName};
use crate::keys::KeyError;
use crate::labels::LabelError;

/// A problem with one field of a record value, independent of its key.
///
/// It is what converting a wire-format value into a typed record can fail
/// with; [`ValidationError::Field`] adds the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// An IP address does not parse.
    #[error("{field} {value:?} is not a valid IP address")]
    InvalidIp {
        /// The field (e.g. `IPAddresses[1].IP`).
        field: String,
        /// The offending text (clipped).
        value: String,
        /// The parser's complaint.
        #[source]
        source: AddrParseError,
    },
    /// A CIDR is malformed (bad base64 mask, non-contiguous mask, family mismatch).
    #[error("{field} {value} is not a valid CIDR: {reason}")]
    InvalidCidr {
        /// The field (e.g. `IPv4AllocCIDR`).
        field: String,
        /// The offending value, rendered (clipped).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A cluster name field is not a valid cluster name.
    #[error("{field}: {source}")]
    InvalidClusterName {
        /// The field.
        field: &'static str,
        /// The rule the name breaks.
        #[source]
        source: ClusterError,
    },
    /// A cluster ID field is not a valid cluster ID.
    #[error("{field}: {source}")]
    InvalidClusterId {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        #[source]
        source: ClusterError,
    },
    /// A Kubernetes name (namespace, service, node) is malformed.
    #[error("{field} {value:?} is not a valid name: {reason}")]
    InvalidName {
        /// The field.
        field: &'static str,
        /// The offending name (clipped).
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A label set is malformed.
    #[error("{field}: {source}")]
    InvalidLabels {
        /// The field.
        field: &'static str,
        /// What is wrong with the labels.
        #[source]
        source: LabelError,
    },
    /// Any other field with a value outside its domain.
    #[error("{field} {value:?} is invalid: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// The offending value (clipped).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl FieldError {
    /// Stable snake_case label for metrics; see [`ValidationError::reason`].
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidIp { .. } | Self::InvalidCidr { .. } => "invalid_ip",
            Self::InvalidClusterName { .. } | Self::InvalidName { .. } => "invalid_name",
            Self::InvalidClusterId { .. } => "invalid_cluster_id",
            Self::InvalidLabels { .. } => "invalid_labels",
            Self::Invalid { .. } => "invalid_field",
        }
    }
}

/// Why a record read from a kvstore was refused.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// The value exceeds [`crate::MAX_VALUE_BYTES`]; checked before parsing.
    #[error("value of {key} is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// The key (clipped).
        key: String,
        /// The value's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The value is not UTF-8 (identities, whose value is a label string).
    #[error("value of {key} is not UTF-8")]
    NotUtf8 {
        /// The key (clipped).
        key: String,
        /// Where decoding stopped.
        #[source]
        source: std::str::Utf8Error,
    },
    /// The value is not JSON of the expected shape.
    #[error("value of {key} is not valid JSON for this record: {source}")]
    BadJson {
        /// The key (clipped).
        key: String,
        /// The decoder's complaint (line, column, what it expected).
        #[source]
        source: serde_json::Error,
    },
    /// The key is not a key of this kind of record.
    /// The value is not in the record's binary encoding (EndpointSlices:
    /// zstd-compressed protobuf).
    #[error("value of {key} is not {format}: {detail}")]
    BadBinary {
        /// The key (clipped).
        key: String,
        /// The expected encoding.
        format: &'static str,
        /// What the decoder said.
        detail: String,
    },
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    /// A field of the value is malformed.
    #[error("value of {key}: {source}")]
    Field {
        /// The key (clipped).
        key: String,
        /// The field and what is wrong with it.
        #[source]
        source: FieldError,
    },
    /// The key or value names another cluster than the connection's.
    #[error("{field} of {key} names cluster {got:?}, but this connection belongs to cluster {:?}", expected.as_str())]
    ClusterMismatch {
        /// The key (clipped).
        key: String,
        /// Where the cluster name was found (`key`, `Cluster`, `cluster`, a label).
        field: &'static str,
        /// The connection's cluster.
        expected: ClusterName,
        /// The name found (clipped).
        got: String,
    },
    /// The value's cluster ID is not the connection's.
    #[error("{field} of {key} is {got}, but this connection belongs to cluster ID {expected}")]
    ClusterIdMismatch {
        /// The key (clipped).
        key: String,
        /// The field (`ClusterID`, `clusterID`).
        field: &'static str,
        /// The connection's cluster ID.
        expected: ClusterId,
        /// The ID found.
        got: u32,
    },
    /// An identity's labels lack the policy-cluster label.
    #[error("labels of {key} lack k8s:{label}, expected k8s:{label}={expected}", label = crate::labels::POLICY_CLUSTER_LABEL)]
    MissingClusterLabel {
        /// The key (clipped).
        key: String,
        /// The connection's cluster.
        expected: ClusterName,
    },
    /// A numeric identity lies outside the cluster's range.
    #[error("identity {identity} in {field} of {key} is outside the range {}..={} of cluster {:?}", range.start(), range.end(), cluster.as_str())]
    IdentityOutOfRange {
        /// The key (clipped).
        key: String,
        /// Where the identity was found (`key`, `ID`).
        field: &'static str,
        /// The identity found.
        identity: u32,
        /// The connection's cluster.
        cluster: ClusterName,
        /// The cluster's range.
        range: RangeInclusive<u32>,
    },
    /// The key and the value disagree (name, namespace, IP).
    #[error("{field} {in_value:?} in the value of {key} differs from {in_key:?} in the key")]
    KeyMismatch {
        /// The key (clipped).
        key: String,
        /// The field of the value.
        field: &'static str,
        /// What the key says (clipped).
        in_key: String,
        /// What the value says (clipped).
        in_value: String,
    },
}

impl ValidationError {
    /// Every label [`reason`](Self::reason) can return, for registering
    /// metrics up front.
    pub const REASONS: &'static [&'static str] = &[
        "too_large",
        "bad_encoding",
        "invalid_key",
        "invalid_name",
        "invalid_ip",
        "invalid_cluster_id",
        "invalid_labels",
        "invalid_field",
        "cluster_mismatch",
        "identity_out_of_range",
        "key_mismatch",
    ];

    /// Stable snake_case label of the rule the record broke, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::NotUtf8 { .. } | Self::BadJson { .. } | Self::BadBinary { .. } => "bad_encoding",
            Self::InvalidKey(e) => e.reason(),
            Self::Field { source, .. } => source.reason(),
            Self::ClusterMismatch { .. }
            | Self::ClusterIdMismatch { .. }
            | Self::MissingClusterLabel { .. } => "cluster_mismatch",
            Self::IdentityOutOfRange { .. } => "identity_out_of_range",
            Self::KeyMismatch { .. } => "key_mismatch",
        }
    }

    /// The key of the refused record (clipped to a loggable length).
    pub fn key(&self) -> &str {
        match self {
            Self::InvalidKey(e) => e.key(),
            Self::TooLarge { key, .. }
            | Self::NotUtf8 { key, .. }
            | Self::BadJson { key, .. }
            | Self::BadBinary { key, .. }
            | Self::Field { key, .. }
            | Self::ClusterMismatch { key, .. }
            | Self::ClusterIdMismatch { key, .. }
            | Self::MissingClusterLabel { key, .. }
            | Self::IdentityOutOfRange { key, .. }
            | Self::KeyMismatch { key, .. } => key,
        }
    }
}
