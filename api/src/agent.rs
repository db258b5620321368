//! The node agent's status document: what its status socket serves (one
//! JSON document per connection) and what `meshctl clustermesh status` and
//! `meshctl service list` read, with the settings it reports. One
//! definition for the writer and every reader, as Cilium shares
//! `api/v1/models` between its agent and its CLI; serde only, so a reader
//! links none of the agent's datapath.
//!
//! **The field names are a contract** with every client. Every struct reads
//! a missing field as its default, so a newer client still reads an older
//! agent's document. The per-cluster fields mirror Cilium's remote-cluster
//! status (`cilium-dbg status --verbose`), with the same names.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A value that is not one of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {what}: expected one of {expected}")]
pub struct UnknownValue {
    /// What was parsed.
    pub what: &'static str,
    /// The text given.
    pub value: String,
    /// The accepted spellings.
    pub expected: &'static str,
}

/// Spellings, `Display` and `FromStr` of a settings enum (serde uses the
/// same lowercase spellings).
macro_rules! spelled {
    ($ty:ident, $what:literal, $expected:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The spelling in flags, status documents and logs.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownValue {
                        what: $what,
                        value: s.to_owned(),
                        expected: $expected,
                    }),
                }
            }
        }
    };
}

/// How pod traffic crosses nodes (`--routing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// VXLAN in external mode; the source identity travels in the VNI.
    #[default]
    Tunnel,
    /// The underlay routes pod CIDRs (peered VPCs): remote pod CIDRs are
    /// routed via the remote node's underlay address.
    Native,
}

spelled!(Routing, "routing mode", "tunnel, native", { Tunnel => "tunnel", Native => "native" });

/// Node-to-node encryption (`--encryption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// In clear.
    #[default]
    None,
    /// WireGuard between nodes.
    Wireguard,
}

spelled!(Encryption, "encryption mode", "none, wireguard", { None => "none", Wireguard => "wireguard" });

/// `service.cilium.io/affinity`: which backends of a global service new
/// flows prefer. (Read also in the capitalised spelling the
/// clustermesh-apiserver used to persist.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Every backend alike.
    #[default]
    #[serde(alias = "None")]
    None,
    /// Local backends while any is active, then remote ones.
    #[serde(alias = "Local")]
    Local,
    /// Remote backends while any is active, then local ones.
    #[serde(alias = "Remote")]
    Remote,
}

spelled!(Affinity, "affinity", "none, local, remote", { None => "none", Local => "local", Remote => "remote" });

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Synced {
    /// Nodes.
    pub nodes: bool,
    /// Endpoints (ipcache).
    pub endpoints: bool,
    /// Identities.
    pub identities: bool,
    /// Services.
    pub services: bool,
}

impl Synced {
    /// Every kind synced.
    pub fn all(self) -> bool {
        self.nodes && self.endpoints && self.identities && self.services
    }
}

/// The state of one cluster's connection, as Cilium reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ClusterStatus {
    /// Cluster name.
    pub name: String,
    /// Connected and every kind synced.
    pub ready: bool,
    /// The etcd connection is up.
    pub connected: bool,
    /// Human-readable state, e.g. "connected", "waiting for initial sync",
    /// or the last error.
    pub status: String,
    /// Nodes held.
    pub num_nodes: u64,
    /// Endpoints (ipcache entries) held.
    pub num_endpoints: u64,
    /// Identities held.
    pub num_identities: u64,
    /// Shared global services held.
    pub num_shared_services: u64,
    /// Connection failures since the agent started.
    pub num_failures: u64,
    /// Time of the last failure (RFC 3339), if any.
    pub last_failure: Option<String>,
    /// Initial sync per kind.
    pub synced: Synced,
    /// Records refused by validation, by reason (counted as they arrive).
    pub rejected: BTreeMap<String, u64>,
    /// Records held but not used because they claim what the cluster does
    /// not own (an address of another cluster, a default route, ...), by
    /// reason: how many are refused now.
    pub not_owned: BTreeMap<String, u64>,
    /// The records are read from a KVStoreMesh cache (`"cached":true` in
    /// the cluster config: `cilium/cache/...`), as Cilium's `kvstoremesh`.
    pub kvstoremesh: bool,
    /// Where the cluster publishes its global services' backends:
    /// `services-only`, `services-and-endpointslices` or
    /// `endpointslices-only` (then read from its EndpointSlice records).
    pub endpoint_slices_export_mode: String,
}

/// Reconciler counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ReconcileStatus {
    /// Completed reconcile passes.
    pub runs: u64,
    /// Failed map or tunnel writes.
    pub errors: u64,
    /// Entries in the ipcache map owned by the reconciler.
    pub ipcache_entries: u64,
    /// Duration of the last pass, in seconds.
    pub last_duration_seconds: f64,
    /// Whether stale entries may be removed (every cluster synced, or the
    /// restart timeout passed).
    pub sweeping: bool,
    /// Prefixes claimed by more than one record in the last pass.
    pub conflicts: u64,
    /// Passes that applied queued changes through the index.
    pub incremental_passes: u64,
    /// Changes (endpoints, nodes) those passes applied.
    pub changes_applied: u64,
    /// Passes that recomputed everything (start, a connection added,
    /// removed or synced, the sweep starting, and every resync).
    pub full_passes: u64,
    /// Duration of the last full pass, in seconds.
    pub last_full_duration_seconds: f64,
    /// Periodic resyncs done.
    pub resyncs: u64,
    /// Map writes a resync had to make: the incremental passes left an
    /// entry wrong, or someone else wrote the map. Zero when all is well.
    pub resync_corrections: u64,
    /// The WireGuard device's last health check (with `--encryption
    /// wireguard`; absent otherwise).
    pub wireguard: Option<DeviceHealth>,
}

/// The outcome of a device's health check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct DeviceHealth {
    /// The device answered its last check.
    pub healthy: bool,
    /// `kernel` or `userspace`.
    pub backend: String,
    /// Why the last check failed, if it did.
    pub error: Option<String>,
    /// Failed checks since the agent started.
    pub failures: u64,
}

/// The whole status document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct AgentStatus {
    /// Local cluster name.
    pub cluster_name: String,
    /// Local cluster ID.
    pub cluster_id: u16,
    /// This node.
    pub node_name: String,
    /// Routing mode.
    pub routing: Routing,
    /// Encryption mode.
    pub encryption: Encryption,
    /// A session with the local apiserver is live (absent: none configured).
    pub apiserver_connected: Option<bool>,
    /// Pods on this node.
    pub local_endpoints: u64,
    /// Every cluster, the local one included, sorted by name.
    pub clusters: Vec<ClusterStatus>,
    /// Reconciler counters.
    pub reconcile: ReconcileStatus,
    /// Services programmed into the load balancer.
    pub services: ServicesStatus,
}

impl AgentStatus {
    /// Shared services over every cluster the agent reads: the global
    /// services it can balance to.
    pub fn global_services(&self) -> u64 {
        self.clusters.iter().map(|c| c.num_shared_services).sum()
    }
}

/// One backend in the status document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct BackendStatus {
    /// The cluster it runs in.
    pub cluster: String,
    /// `IP:port`.
    pub address: String,
    /// Takes new flows ahead of the others (affinity).
    pub preferred: bool,
}

/// One frontend in the status document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct FrontendStatus {
    /// `IP:port/PROTO`.
    pub frontend: String,
    /// The service port's name.
    pub port_name: String,
    /// Its backends, local ones first.
    pub backends: Vec<BackendStatus>,
}

/// One service in the status document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ServiceStatus {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `service.cilium.io/global`.
    pub global: bool,
    /// `service.cilium.io/shared`.
    pub shared: bool,
    /// `service.cilium.io/affinity`.
    pub affinity: Affinity,
    /// Every frontend with its backends.
    pub frontends: Vec<FrontendStatus>,
}

/// Counters and contents of the service reconciler, for the status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ServicesStatus {
    /// The local snapshot arrived and every cluster synced (or the sync
    /// timeout passed): the reconciler writes the maps.
    pub programming: bool,
    /// Frontends in the load balancer.
    pub frontends: u64,
    /// Failed `set_service`/`remove_service` calls.
    pub errors: u64,
    /// Frontend or backend IP claimed twice in the last pass.
    pub conflicts: u64,
    /// Every service of the last pass.
    pub services: Vec<ServiceStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_spell_as_flags_and_json() {
        for r in Routing::ALL {
            assert_eq!(r.as_str().parse::<Routing>(), Ok(*r));
            assert_eq!(serde_json::to_string(r).unwrap(), format!("\"{r}\""));
        }
        for e in Encryption::ALL {
            assert_eq!(e.as_str().parse::<Encryption>(), Ok(*e));
        }
        for a in Affinity::ALL {
            assert_eq!(a.to_string().parse::<Affinity>(), Ok(*a));
        }
        let err = "vxlan".parse::<Routing>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"vxlan\" is not a valid routing mode: expected one of tunnel, native"
        );
        // What the apiserver persisted before the spellings were shared.
        assert_eq!(
            serde_json::from_str::<Affinity>("\"Local\"").unwrap(),
            Affinity::Local
        );
    }

    #[test]
    fn an_older_document_reads_with_defaults() {
        let status: AgentStatus = serde_json::from_str(
            r#"{"cluster-name":"c1","routing":"native","clusters":[{"name":"c2"}]}"#,
        )
        .unwrap();
        assert_eq!(status.routing, Routing::Native);
        assert_eq!(status.encryption, Encryption::None);
        assert_eq!(status.clusters[0].name, "c2");
        assert!(!status.clusters[0].ready);
    }
}
