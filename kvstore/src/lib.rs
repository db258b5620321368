//! Typed, validated stores over etcd in the clustermesh key schema.
//!
//! Clusters of the mesh exchange state through etcd, in Cilium Cluster Mesh's
//! key schema ([`api::keys`]): each cluster's clustermesh-apiserver *exports*
//! its nodes, endpoints, identities and services into its own etcd, and
//! every node agent of every other cluster *imports* them. This crate is the
//! layer between: it must never lose an entry, never invent one, and never
//! let a remote cluster write state that claims to be another's.
//!
//! # The store model
//!
//! **Narrow backends.** Stores depend on the smallest trait they need
//! ([`ListWatch`] to read; [`KvWrite`] and [`Leases`] to write;
//! [`Transactions`] to allocate: a multi-key [`Txn`] of compares and writes,
//! one etcd `Txn`, so that an allocator can create or delete several keys
//! together or not at all). [`EtcdBackend`] implements them on
//! `etcd-client`; [`MemoryBackend`] implements them in memory for unit tests
//! that run on a paused clock.
//!
//! **List, then watch, with a synced point.** A [`WatchStore`] lists its
//! prefix and then watches it from the listing's revision + 1: the listing
//! is a consistent snapshot and the watch continues exactly where it ends.
//! It reports [`Event::Upsert`], [`Event::Delete`] and, once the first
//! listing is applied, [`Event::Synced`]: before it, absence means nothing;
//! after it, absence means deleted.
//!
//! **Canaries.** A writer that has just started has not exported everything
//! yet, so a reader that synced against it would delete live entries. The
//! writer therefore writes a *sync canary* `cilium/synced/<cluster>/<base
//! prefix>` (an RFC 3339 timestamp) once its first full export is in etcd,
//! and a reader can hold its `Synced` back until the canary exists
//! ([`WatchStoreConfig::wait_for_canary`]).
//!
//! **Mark and sweep.** When a watch breaks (connection lost, etcd
//! restarted, history compacted), the reader lists again, marks everything
//! it holds stale, un-marks what the new listing contains and reports only
//! the rest as deleted. A record that exists before and after an outage is
//! never reported deleted.
//!
//! **Leases.** Every exported key is bound to a lease that the writer keeps
//! alive, so a dead writer's keys vanish after the lease TTL and readers see
//! them deleted. A lease holds a bounded number of keys. When a lease is lost
//! (expired during a long partition, or etcd came back empty) the writer
//! writes everything that was bound to it again, then the canary.
//!
//! **Coalescing.** A [`SyncStore`] keeps the *desired* value per key rather
//! than a queue of calls: a key that changes ten times while its write waits
//! is written once, with the last value; a value equal to what was written is
//! not written at all. A bounded pool of workers writes, retrying with
//! jittered backoff. At start the writer adopts what its predecessor left
//! under its prefix (and the predecessor's lease, if still alive), so a
//! restarted apiserver rewrites nothing unchanged and deletes stale keys
//! only after its own initial sync.
//!
//! **Validation.** Readers decode every value with [`api::Resource::decode`]
//! against the connection's [`api::RemoteScope`]. Rejected records are
//! logged and counted by reason ([`WatchStats::rejected_by_reason`]); a
//! remote cluster cannot crash or mislead a reader.
//!
//! # Observability
//!
//! Each store runs in a span (`sync_store` / `watch_store`, fields `kind`,
//! `cluster`, and `prefix` for readers). Log fields are stable: `key`,
//! `reason`, `error`, `lease`, `retry_in`, `revision`. Counters are plain
//! atomics in [`SyncStats`] and [`WatchStats`], for the binaries to render.
//!
//! # Connecting
//!
//! [`EtcdConfig::from_file`] reads Cilium's etcd config format and
//! [`connect`] returns an [`EtcdBackend`] after a first successful request.

pub mod auth;
mod backend;
mod cluster;
mod config;
mod etcd;
mod lease_pool;
mod memory;
pub mod retry;
#[cfg(test)]
mod store_tests;
mod sync_store;
mod watch_store;
mod work_queue;

pub use backend::{
    error_chain, Backend, BackendError, Compare, KeyValue, KvWrite, LeaseId, Leases, ListWatch,
    Listing, Revision, SyncBackend, Transactions, Txn, TxnOp, TxnOutcome, WatchEvent, WatchStream,
    MAX_TXN_OPS,
};
pub use cluster::{
    read_cluster_config, read_required_cluster_config, ClusterConfigError, CLUSTER_CONFIG_WAIT,
};
pub use config::{connect, ConfigError, ConnectError, EtcdConfig, TlsMaterial, TlsPaths};
pub use etcd::EtcdBackend;
pub use memory::MemoryBackend;
pub use sync_store::{SyncStats, SyncStore, SyncStoreConfig};
pub use watch_store::{Event, Events, WatchStats, WatchStore, WatchStoreConfig};
