//! The clusters of the mesh as this node sees them: one task per cluster
//! (the local one included), and the directory watcher that starts, restarts
//! and removes them.
//!
//! # One task owns one cluster
//!
//! A cluster task connects to the cluster's etcd (TLS as its config file
//! says), reads `cilium/cluster-config/<name>`, claims the cluster's name and
//! ID in the [`Mesh`] (a second cluster with the same ID, or a remote
//! cluster with the local cluster's ID, is refused with a clear status), and
//! starts one [`WatchStore`](kvstore::WatchStore) per kind (nodes, ipcache, identities, services)
//! validating every record against the connection's [`RemoteScope`](api::RemoteScope). The
//! stores list, watch and, when a watch breaks, list again with mark and
//! sweep on their own; the task then only probes the connection (heartbeat
//! key, cluster config) so that the status says whether the cluster is
//! reachable, and reconnects from scratch when the cluster's ID changes.
//! Every failure is counted and retried with jittered exponential backoff.
//!
//! # Stop keeps, remove drains
//!
//! Stopping the agent stops the tasks and leaves the datapath as it is (the
//! next agent adopts the pinned maps). Removing a config file removes the
//! cluster from the [`Mesh`], so the reconciler's next pass deletes its
//! entries. A *changed* config file restarts the task, and the stores of the
//! old connection stay in the mesh ([`ClusterEntry::previous`]) until the new
//! ones have synced, so a reconnect never withdraws a live entry.
//!
//! # The config directory
//!
//! One file per remote cluster in Cilium's etcd config format; the file name
//! is the cluster name. Names with a `.` are skipped: a cluster name never
//! has one, and Cilium's layout keeps each cluster's certificates beside its
//! config as `<cluster>.etcd-client.crt` and the like; so are dotfiles
//! (Kubernetes secret volumes keep `..data` links there). The directory is polled (once a second by
//! default) and files are compared by content, which also catches secret
//! volumes that swap a symlink rather than write a file.

mod changes;
mod config_dir;
mod connector;
mod error;
mod mesh;
mod session;
mod stores;

pub use changes::{Change, Changes, Pending};
pub use config_dir::watch_config_dir;
pub use connector::{Connection, Connector, EtcdConnector, EtcdSource};
pub use error::ClusterError;
pub use mesh::{ClusterEntry, Mesh};
pub use session::Context;
pub use stores::{ClusterStores, ServiceSource};

#[cfg(test)]
pub(crate) use stores::test_support;
