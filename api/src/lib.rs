//! The vocabulary of the mesh: cluster names and IDs, security identities,
//! labels, and the records clusters exchange through etcd.
//!
//! # The kvstore schema is a wire format
//!
//! Every key and value this crate builds or parses is **Cilium Cluster Mesh
//! schema v1**, shared with Cilium: a Cilium agent can read what our
//! clustermesh-apiserver writes, and our node agent can read a Cilium
//! clustermesh-apiserver. Field names, casing, `null` versus `[]`, omitted
//! fields and the label-string form are therefore fixed; [`keys`] lists the
//! key layout. Each record keeps a private "wire" struct that mirrors the Go
//! struct field for field (in Go's field order, so output matches Go byte for
//! byte where Go's output is deterministic), and a typed public struct with
//! parsed IPs, CIDRs, cluster names and label sets:
//!
//! | record | key | value |
//! |---|---|---|
//! | [`ClusterConfig`] | `cilium/cluster-config/<cluster>` | JSON |
//! | [`Node`] | `cilium/state/nodes/v1/<cluster>/<node>` | JSON |
//! | [`IpcacheEntry`] | `cilium/state/ip/v1/default/<ip>` | JSON |
//! | [`IdentityRecord`] | `cilium/state/identities/v1/id/<id>` | label string |
//! | [`ClusterService`] | `cilium/state/services/v1/<cluster>/<ns>/<name>` | JSON |
//! | [`ServiceExport`] | `cilium/state/serviceexports/v1/<cluster>/<ns>/<name>` | JSON |
//! | [`ClusterEndpointSlice`] | `cilium/state/endpointslices/v1/<cluster>/<ns>/<slice>` | zstd-compressed protobuf |
//!
//! Decoders are as tolerant as Cilium's Go decoder where that is harmless
//! (unknown fields are ignored, missing fields take their zero value, `null`
//! reads as an empty list or map); encoders produce exactly the schema's shape.
//!
//! # Validation model
//!
//! A remote cluster is not trusted. [`Resource::decode`] takes the key, the
//! raw value and the [`RemoteScope`] of the connection it came through, and
//! refuses the record with a [`ValidationError`] unless:
//!
//! * the value is at most [`MAX_VALUE_BYTES`] (checked before parsing);
//! * key and value parse, and every IP and CIDR in them parses;
//! * every cluster name in key and value is the connection's cluster, and
//!   every cluster ID is the connection's ID;
//! * every identity lies in the connection cluster's range
//!   ([`cluster_identity_range`]); ipcache entries may also use a reserved
//!   identity; an identity's labels carry `io.cilium.k8s.policy.cluster=<cluster>`;
//! * what the key says (node name, namespace, service name, IP, identity)
//!   equals what the value says.
//!
//! So a remote cluster can never publish state that claims to be another
//! cluster's. Each error names the key, the field, what was expected and what
//! was found, and [`ValidationError::reason`] gives a stable label for
//! metrics.
//!
//! ```
//! use api::{ClusterId, ClusterName, MaxConnectedClusters, RemoteScope, Resource, Node};
//! let max = MaxConnectedClusters::Max255;
//! let scope = RemoteScope::new("c1".parse().unwrap(), ClusterId::new(3, max).unwrap(), max);
//! let key = "cilium/state/nodes/v1/c2/node-1";
//! let err = Node::decode(key, br#"{"Name":"node-1","Cluster":"c2","ClusterID":3}"#, &scope).unwrap_err();
//! assert_eq!(err.reason(), "cluster_mismatch");
//! ```

pub mod agent;
pub mod cluster;
pub mod error;
mod go;
pub mod identity;
pub mod keys;
pub mod labels;
pub mod names;
pub mod records;
pub mod timestamp;

pub use agent::{Affinity, Encryption, Routing};
pub use cluster::{ClusterError, ClusterId, ClusterName, MaxConnectedClusters, RemoteScope};
pub use error::{FieldError, ValidationError};
pub use identity::{
    allocation_range, cluster_identity_range, IdentityError, NumericIdentity, ReservedIdentity,
};
pub use keys::KeyError;
pub use labels::{Label, LabelError, LabelSet, POD_NAMESPACE_LABEL, POLICY_CLUSTER_LABEL};
pub use records::{
    AddressType, BackendZone, ClientIpConfig, ClusterCapabilities, ClusterConfig,
    ClusterEndpointSlice, ClusterService, EndpointSlicesExportMode, IdentityRecord, IpcacheEntry,
    L4Addr, L4Protocol, NamedPort, Node, NodeAddress, PortConfiguration, ServiceExport,
    ServiceExportPort, ServiceImportType, SessionAffinity, SessionAffinityConfig,
};
pub use timestamp::{Timestamp, TimestampError};

/// Largest value a reader accepts, checked before parsing (512 KiB).
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// A record kind stored in the kvstore under one prefix per cluster.
///
/// The kvstore layer's stores are generic over it: the write side uses
/// [`key`](Self::key) and [`encode`](Self::encode), the read side lists
/// [`prefix`](Self::prefix) and runs [`decode`](Self::decode) on each entry.
pub trait Resource: Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    /// Kind name for logs and metrics: `"nodes"`, `"endpoints"`, `"identities"`, `"services"`, `"serviceexports"`.
    const KIND: &'static str;
    /// Cluster-less base prefix, as used in the sync canary key, e.g. `cilium/state/nodes/v1`,
    /// `cilium/state/ip/v1`, `cilium/state/identities/v1`, `cilium/state/services/v1`.
    const BASE_PREFIX: &'static str;
    /// Key prefix (ending in '/') under which the records of `cluster` live in that cluster's etcd:
    /// nodes `cilium/state/nodes/v1/<cluster>/`, ip `cilium/state/ip/v1/default/`,
    /// identities `cilium/state/identities/v1/id/`, services `cilium/state/services/v1/<cluster>/`, ...
    fn prefix(cluster: &ClusterName) -> String;
    /// The full etcd key of this record.
    fn key(&self) -> String;
    /// The value exactly as written to etcd.
    fn encode(&self) -> Vec<u8>;
    /// Decode `value` found under `key` in the etcd of `scope.cluster` and validate it:
    /// cluster name in key and value equals scope.cluster; numeric identity inside scope's cluster range
    /// (identities: also the policy-cluster label equals scope.cluster; ipcache: the entry's identity is
    /// either reserved or in the cluster's range); namespace/name/ip equal the key's; IPs and CIDRs parse;
    /// value size bounded (const MAX_VALUE_BYTES = 512 KiB) and checked BEFORE parsing.
    ///
    /// Keys of the KVStoreMesh cache layout (`cilium/cache/...`, see [`keys`])
    /// are accepted as well; their cluster segment is checked like any other.
    ///
    /// # Errors
    ///
    /// A [`ValidationError`] naming the first rule the record breaks.
    fn decode(key: &str, value: &[u8], scope: &RemoteScope) -> Result<Self, ValidationError>;
}

/// Shortens untrusted text for error messages: at most 128 characters, then `…`.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 128;
    match s.char_indices().nth(MAX) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}
