//! The narrow traits the stores depend on, and the types they exchange.
//!
//! Readers need only [`ListWatch`]; writers need [`KvWrite`] and [`Leases`]
//! (plus [`ListWatch`] to adopt what a previous writer left); identity
//! allocation needs [`Transactions`]. Two backends implement them: the etcd
//! one ([`crate::EtcdBackend`]) and an in-memory one for unit tests
//! ([`crate::MemoryBackend`]).

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

/// An etcd revision: the logical clock of the whole key space.
pub type Revision = i64;

/// An etcd lease id. Keys put with a lease vanish when the lease expires.
pub type LeaseId = i64;

/// One key with its value and metadata, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key. A key that is not UTF-8 is converted lossily (it then holds
    /// U+FFFD, which readers reject).
    pub key: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// Revision of the last modification of this key.
    pub mod_revision: Revision,
    /// Revision at which the key was created.
    pub create_revision: Revision,
    /// The lease the key is bound to, 0 when none.
    pub lease: LeaseId,
}

/// The result of listing a prefix: every key under it at one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The store's revision the listing was taken at. Watching from
    /// `revision + 1` sees every change after the listing and none before.
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or modified.
    Put(KeyValue),
    /// A key was deleted (explicitly or by lease expiry).
    Delete {
        /// The deleted key.
        key: String,
        /// The revision of the deletion.
        mod_revision: Revision,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// A stream of watch event batches. It ends with an error (or simply ends)
/// when the watch is broken: the server went away, the start revision was
/// compacted ([`BackendError::Compacted`]), or the server canceled it. The
/// consumer then lists again.
pub type WatchStream = BoxStream<'static, Result<Vec<WatchEvent>, BackendError>>;

/// Errors of the backends.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The requested start revision is older than the oldest one kept.
    #[error("revision {requested} is compacted (history starts at {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The compaction revision reported by the server.
        compacted: Revision,
    },
    /// The lease does not exist (expired, revoked, or the store lost its data).
    #[error("lease {lease:x} not found: expired, revoked or lost")]
    LeaseNotFound {
        /// The missing lease.
        lease: LeaseId,
    },
    /// An etcd request failed.
    #[error("etcd {op} of {key:?} failed")]
    Etcd {
        /// The operation (`get`, `put`, `watch`, ...).
        op: &'static str,
        /// The key or prefix.
        key: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request got no answer in time.
    #[error("etcd {op} of {key:?} timed out after {timeout:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The key or prefix.
        key: String,
        /// The request timeout.
        timeout: Duration,
    },
    /// The server canceled a watch for another reason than compaction.
    #[error("watch of {prefix:?} canceled by the server: {reason}")]
    WatchCanceled {
        /// The watched prefix.
        prefix: String,
        /// The server's reason.
        reason: String,
    },
    /// The store is unreachable (the in-memory backend's simulated outage).
    #[error("kvstore unavailable")]
    Unavailable,
}

/// Read side: list a prefix, then watch it from a revision.
#[async_trait]
pub trait ListWatch: Send + Sync + 'static {
    /// Lists every key under `prefix` at one revision.
    ///
    /// # Errors
    ///
    /// When the store cannot be reached or the request fails.
    async fn list(&self, prefix: &str) -> Result<Listing, BackendError>;

    /// Watches every key under `prefix`, starting at revision `from`
    /// (inclusive).
    ///
    /// # Errors
    ///
    /// When the watch cannot be established. A compacted `from` may be
    /// reported here or as the stream's first item.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, BackendError>;

    /// Reads one key.
    ///
    /// # Errors
    ///
    /// As [`ListWatch::list`].
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, BackendError> {
        let listing = self.list(key).await?;
        Ok(listing.kvs.into_iter().find(|kv| kv.key == key))
    }
}

/// Write side: put and delete single keys.
#[async_trait]
pub trait KvWrite: Send + Sync + 'static {
    /// Puts `value` under `key`, bound to `lease` when given. Returns the
    /// revision of the write.
    ///
    /// # Errors
    ///
    /// [`BackendError::LeaseNotFound`] when the lease is gone; otherwise when
    /// the store cannot be reached.
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision, BackendError>;

    /// Deletes `key`. Returns whether it existed.
    ///
    /// # Errors
    ///
    /// When the store cannot be reached.
    async fn delete(&self, key: &str) -> Result<bool, BackendError>;
}

/// Leases: keys bound to a lease vanish when it is no longer kept alive.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Grants a lease with time-to-live `ttl` (whole seconds, at least 1).
    ///
    /// # Errors
    ///
    /// When the store cannot be reached.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, BackendError>;

    /// Renews `lease` once; returns its new time-to-live.
    ///
    /// # Errors
    ///
    /// [`BackendError::LeaseNotFound`] when the lease is gone; otherwise when
    /// the store cannot be reached.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, BackendError>;

    /// Revokes `lease`, deleting every key bound to it.
    ///
    /// # Errors
    ///
    /// When the store cannot be reached. Revoking a lease that is already
    /// gone succeeds.
    async fn revoke(&self, lease: LeaseId) -> Result<(), BackendError>;
}

/// Compare-and-swap transactions, for allocators that must never hand out
/// one value twice.
#[async_trait]
pub trait Transactions: Send + Sync + 'static {
    /// Creates `key` with `value` only if it does not exist. Returns whether
    /// it was created.
    ///
    /// # Errors
    ///
    /// As [`KvWrite::put`].
    async fn create_if_absent(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, BackendError> {
        self.put_if_mod_revision(key, value, 0, lease).await
    }

    /// Puts `value` only if `key`'s mod revision is `expected` (0: the key
    /// does not exist). Returns whether it was written.
    ///
    /// # Errors
    ///
    /// As [`KvWrite::put`].
    async fn put_if_mod_revision(
        &self,
        key: &str,
        value: &[u8],
        expected: Revision,
        lease: Option<LeaseId>,
    ) -> Result<bool, BackendError>;

    /// Deletes `key` only if its mod revision is `expected`. Returns whether
    /// it was deleted.
    ///
    /// # Errors
    ///
    /// When the store cannot be reached.
    async fn delete_if_mod_revision(
        &self,
        key: &str,
        expected: Revision,
    ) -> Result<bool, BackendError>;
}

/// What a [`crate::SyncStore`] needs: adopt (list), write, and hold leases.
pub trait SyncBackend: ListWatch + KvWrite + Leases {}
impl<T: ListWatch + KvWrite + Leases> SyncBackend for T {}

/// Every capability; implemented by both backends.
pub trait Backend: ListWatch + KvWrite + Leases + Transactions {}
impl<T: ListWatch + KvWrite + Leases + Transactions> Backend for T {}

/// `error: cause: cause ...`: an error with all its sources, for log lines
/// and messages that should say why.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
