//! The narrow traits the stores depend on, and the types they exchange.
//!
//! Readers need only [`ListWatch`]; writers need [`KvWrite`] and [`Leases`]
//! (plus [`ListWatch`] to adopt what a previous writer left); identity
//! allocation needs [`Transactions`] (multi-key compare-and-swap, see
//! [`Txn`]). Two backends implement them: the etcd
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
    /// A transaction has more compares or operations than etcd accepts.
    #[error("transaction of {count} compares or operations exceeds the limit of {max}")]
    TxnTooLarge {
        /// The larger of the two counts.
        count: usize,
        /// [`MAX_TXN_OPS`].
        max: usize,
    },
    /// A transaction etcd would refuse.
    #[error("invalid transaction on {key:?}: {reason}")]
    InvalidTxn {
        /// The offending key.
        key: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The store is unreachable (the in-memory backend's simulated outage).
    #[error("kvstore unavailable")]
    Unavailable,
}

impl BackendError {
    /// Whether etcd refused the request because the client's user may not
    /// do it (authentication is on; `docs/architecture.md` §8).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Self::Etcd { source: etcd_client::Error::GRpcStatus(s), .. }
            if s.message().contains("permission denied"))
    }
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

/// Largest number of compares, and of operations, in one [`Txn`]: etcd's
/// default `--max-txn-ops`. Both backends refuse a larger transaction with
/// [`BackendError::TxnTooLarge`] before sending anything.
pub const MAX_TXN_OPS: usize = 128;

/// One condition of a [`Txn`]. Every compare is evaluated against the store
/// at the transaction's revision, atomically with the writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// `key` does not exist.
    Absent {
        /// The key.
        key: String,
    },
    /// `key`'s last modification was at `revision`. As in etcd, a missing key
    /// has mod revision 0, so `revision: 0` also means "absent".
    ModRevision {
        /// The key.
        key: String,
        /// The expected mod revision (0: absent).
        revision: Revision,
    },
    /// `key` exists and holds exactly `value`. Fails on a missing key, as
    /// etcd's value compare does.
    Value {
        /// The key.
        key: String,
        /// The expected value.
        value: Vec<u8>,
    },
    /// No key starting with `prefix` exists (etcd: a range compare of the
    /// create revision against 0). Lets a writer act only while nobody else
    /// holds a key under a prefix, e.g. a user of an identity.
    NoKeyWithPrefix {
        /// The prefix; must not be empty.
        prefix: String,
    },
}

impl Compare {
    /// [`Compare::Absent`].
    pub fn absent(key: impl Into<String>) -> Self {
        Self::Absent { key: key.into() }
    }

    /// [`Compare::ModRevision`].
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Self {
        Self::ModRevision {
            key: key.into(),
            revision,
        }
    }

    /// [`Compare::Value`].
    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self::Value {
            key: key.into(),
            value: value.into(),
        }
    }

    /// [`Compare::NoKeyWithPrefix`].
    pub fn no_key_with_prefix(prefix: impl Into<String>) -> Self {
        Self::NoKeyWithPrefix {
            prefix: prefix.into(),
        }
    }

    /// The key (or prefix) the compare reads.
    pub fn key(&self) -> &str {
        match self {
            Self::Absent { key } | Self::ModRevision { key, .. } | Self::Value { key, .. } => key,
            Self::NoKeyWithPrefix { prefix } => prefix,
        }
    }
}

/// One write of a [`Txn`], applied only when every compare holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Puts `value` under `key`, bound to `lease` when given.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease the key is bound to, if any.
        lease: Option<LeaseId>,
    },
    /// Deletes `key` (nothing happens when it does not exist).
    Delete {
        /// The key.
        key: String,
    },
}

impl TxnOp {
    /// [`TxnOp::Put`].
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: Option<LeaseId>) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    /// [`TxnOp::Delete`].
    pub fn delete(key: impl Into<String>) -> Self {
        Self::Delete { key: key.into() }
    }

    /// The key the operation writes.
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }
}

/// A multi-key transaction: if every compare holds, apply every operation,
/// all at one revision; otherwise change nothing. This is one etcd `Txn`
/// (without an else branch: a caller that lost reads again, because what it
/// needs to know depends on why it lost).
///
/// ```
/// use kvstore::{Compare, Txn, TxnOp};
///
/// // Create an identity and its reverse index together, or neither.
/// let txn = Txn::new()
///     .when([
///         Compare::absent("cilium/state/identities/v1/id/196864"),
///         Compare::absent("mesh/registry/v1/c1/identities/k8s:app=web;"),
///     ])
///     .and_then([
///         TxnOp::put("cilium/state/identities/v1/id/196864", "k8s:app=web;", None),
///         TxnOp::put("mesh/registry/v1/c1/identities/k8s:app=web;", "196864", None),
///     ]);
/// assert_eq!(txn.ops().len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction (it succeeds and writes nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds conditions; all of them must hold.
    #[must_use]
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }

    /// Adds operations applied when every condition holds.
    #[must_use]
    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.ops.extend(ops);
        self
    }

    /// The conditions.
    pub fn compares(&self) -> &[Compare] {
        &self.compares
    }

    /// The operations.
    pub fn ops(&self) -> &[TxnOp] {
        &self.ops
    }

    /// The first lease a put binds to, for error reports.
    pub(crate) fn first_lease(&self) -> Option<LeaseId> {
        self.ops.iter().find_map(|op| match op {
            TxnOp::Put { lease, .. } => *lease,
            TxnOp::Delete { .. } => None,
        })
    }

    /// A short description for error messages: the first key written, or
    /// compared when nothing is written.
    pub(crate) fn describe(&self) -> String {
        let first = self
            .ops
            .first()
            .map(TxnOp::key)
            .or_else(|| self.compares.first().map(Compare::key))
            .unwrap_or("");
        let more = (self.ops.len() + self.compares.len()).saturating_sub(1);
        if more == 0 {
            first.to_owned()
        } else {
            format!("{first} (+{more} more)")
        }
    }

    /// Checks what etcd would refuse, so that both backends refuse the same
    /// transactions: too many compares or operations, an empty prefix
    /// compare, or one key written twice.
    ///
    /// # Errors
    ///
    /// [`BackendError::TxnTooLarge`] or [`BackendError::InvalidTxn`].
    pub fn validate(&self) -> Result<(), BackendError> {
        let largest = self.compares.len().max(self.ops.len());
        if largest > MAX_TXN_OPS {
            return Err(BackendError::TxnTooLarge {
                count: largest,
                max: MAX_TXN_OPS,
            });
        }
        if let Some(c) = self
            .compares
            .iter()
            .find(|c| matches!(c, Compare::NoKeyWithPrefix { prefix } if prefix.is_empty()))
        {
            return Err(BackendError::InvalidTxn {
                key: c.key().to_owned(),
                reason: "a prefix compare needs a non-empty prefix",
            });
        }
        let mut written = std::collections::HashSet::new();
        for op in &self.ops {
            if !written.insert(op.key()) {
                return Err(BackendError::InvalidTxn {
                    key: op.key().to_owned(),
                    reason: "the key is written twice in one transaction",
                });
            }
        }
        Ok(())
    }
}

/// What a [`Txn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every compare held (and so every operation was applied).
    pub succeeded: bool,
    /// The store's revision after the transaction: on success with at least
    /// one change, the revision every written key now has as mod revision;
    /// otherwise the revision the compares were evaluated at.
    pub revision: Revision,
}

/// Transactions, for allocators that must never hand out one value twice.
///
/// Implementors provide [`Transactions::txn`]; the single-key helpers are
/// built on it.
#[async_trait]
pub trait Transactions: Send + Sync + 'static {
    /// Runs `txn` atomically; see [`Txn`].
    ///
    /// # Errors
    ///
    /// [`BackendError::TxnTooLarge`] / [`BackendError::InvalidTxn`] (nothing
    /// sent); [`BackendError::LeaseNotFound`] when the compares held but a
    /// put's lease is gone (nothing applied); otherwise when the store cannot
    /// be reached. A lost compare is not an error: `succeeded` is `false`.
    async fn txn(&self, txn: &Txn) -> Result<TxnOutcome, BackendError>;

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
        let txn = Txn::new()
            .when([Compare::absent(key)])
            .and_then([TxnOp::put(key, value, lease)]);
        Ok(self.txn(&txn).await?.succeeded)
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
    ) -> Result<bool, BackendError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, expected)])
            .and_then([TxnOp::put(key, value, lease)]);
        Ok(self.txn(&txn).await?.succeeded)
    }

    /// Deletes `key` only if its mod revision is `expected`. Returns whether
    /// it was deleted (never for `expected` 0: a missing key cannot be).
    ///
    /// # Errors
    ///
    /// When the store cannot be reached.
    async fn delete_if_mod_revision(
        &self,
        key: &str,
        expected: Revision,
    ) -> Result<bool, BackendError> {
        if expected == 0 {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key, expected)])
            .and_then([TxnOp::delete(key)]);
        Ok(self.txn(&txn).await?.succeeded)
    }
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
