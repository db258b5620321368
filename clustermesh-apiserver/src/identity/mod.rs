//! Security identity allocation, safe with several apiservers per cluster.
//!
//! A label set maps to one numeric identity `cluster_id << 16 | local` (shift 15
//! with 511 clusters), `local` in 256..=65535. Three kinds of keys hold the
//! allocation, all in the cluster's etcd:
//!
//! ```text
//! cilium/state/identities/v1/id/<n>                           labels  (Cilium schema v1: what other clusters read)
//! mesh/registry/v1/<cluster>/identities/<labels>              <n>     reverse index (ours)
//! mesh/registry/v1/<cluster>/identity-users/<n>/<instance>    ""      one per apiserver using <n>, bound to its session lease
//! ```
//!
//! **Allocation is one transaction.** The id key and the index are created
//! together, conditioned on both being absent, with this apiserver's user key
//! in the same transaction. Two apiservers of one cluster therefore never
//! hand out one number twice (the id key's compare), and the same labels
//! always get the same number (the index's compare: the loser reads the index
//! again and uses the winner's number). Using an existing identity is a
//! transaction too: the user key is written only while the id key still
//! holds the labels and the index still names the number.
//!
//! **Users are counted in etcd**, as Cilium's allocator does with its
//! per-node "slave" keys: each apiserver counts its own endpoints per label
//! set in memory and, while the count is positive, holds one user key per
//! identity, bound to its session lease. A crashed apiserver's user keys
//! vanish with its lease; a graceful shutdown revokes the lease (the
//! successor adopts its endpoints' identities again at startup).
//!
//! **Garbage collection** runs in every apiserver. It lists the id keys, the
//! index and the user keys; an identity with no user key is observed with
//! the mod revisions of its id key and index entry, and released once it has
//! been seen unused, with the same revisions, for the grace period. The
//! release deletes the id key and the index entry in one transaction that
//! compares those revisions and that no user key exists under
//! `identity-users/<n>/`: a user that arrived after the listing, in any
//! apiserver, makes it fail, and the identity stays.
//!
//! **Tampering.** Each garbage-collection pass also compares every id key
//! with the index: an id key whose labels are not the ones the index maps
//! to its number was changed by another writer (possible only in an etcd
//! without authentication), and is written back, in a transaction that
//! compares both revisions; [`Allocator::restored`] counts them. An id key
//! nobody indexed and nobody uses is released by the collector as any
//! unused identity is.
//!
//! **Startup repair.** Older versions created the two keys in separate
//! steps, so etcd may hold an id key without an index entry, an index entry
//! whose id key is gone or holds other labels, or two id keys with the same
//! labels. [`Allocator::load`] resolves each label set deterministically
//! (see [`plan_repairs`]): the canonical number is the one the index names if
//! its id key holds the labels, else the lowest id key holding them; the
//! index is created or repointed to it, or deleted when no id key holds the
//! labels. Other id keys of the same labels are never handed out again and
//! the garbage collector releases them once unused.
//!
//! Everything here runs on the narrow [`kvstore::Backend`] traits, so the
//! unit tests drive it on [`kvstore::MemoryBackend`] with a paused clock, and
//! the integration tests on a real etcd.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    ops::RangeInclusive,
    sync::Arc,
    time::Duration,
};

use api::ClusterName;
use kvstore::{BackendError, LeaseId, Revision};
use tokio::{sync::Mutex, time::Instant};
use tracing::{info, warn};

use mesh_proto::model::Labels;

/// How many times one acquisition retries after losing a compare to a
/// concurrent writer before it gives up.
const MAX_CONTENDED: u32 = 64;
/// How many times startup repair lists and plans again after losing a race.
const REPAIR_PASSES: usize = 3;

/// Errors of identity allocation.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity backend: {operation}")]
    Backend {
        operation: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("no free identity left in {start}..={end}")]
    Exhausted { start: u32, end: u32 },
    #[error("identity of {labels:?} still contended after {attempts} attempts")]
    Contended { labels: String, attempts: u32 },
}

fn backend_err(operation: &'static str) -> impl FnOnce(BackendError) -> IdentityError {
    move |source| IdentityError::Backend { operation, source }
}

/// The identity label string of an endpoint, as Cilium writes it
/// ([`api::LabelSet::for_endpoint`]): the allocator's key.
///
/// # Errors
///
/// A label that is not valid label syntax (the registry checks endpoints'
/// labels with the same rules before they get here).
pub fn label_string(
    labels: &Labels,
    namespace: &str,
    cluster: &ClusterName,
) -> Result<String, api::LabelError> {
    let pairs = labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    Ok(api::LabelSet::for_endpoint(pairs, namespace, cluster)?.to_string())
}

/// The number an index entry names, if it is one.
fn parse_id(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The identity key of `id` (Cilium schema v1).
fn id_key(id: u32) -> String {
    api::keys::identity_key(api::NumericIdentity(id))
}

/// Prefix of `cluster`'s reverse index: `mesh/registry/v1/<cluster>/identities/`.
pub fn index_prefix(cluster: &str) -> String {
    format!("{}identities/", crate::persist::prefix(cluster))
}

/// Prefix of `cluster`'s user keys: `mesh/registry/v1/<cluster>/identity-users/`;
/// the users of identity `n` are under `<prefix><n>/`.
pub fn users_prefix(cluster: &str) -> String {
    format!("{}identity-users/", crate::persist::prefix(cluster))
}

/// The keys of one cluster's identities.
#[derive(Debug, Clone)]
struct Layout {
    index: String,
    users: String,
}

impl Layout {
    fn new(cluster: &str) -> Self {
        Self {
            index: index_prefix(cluster),
            users: users_prefix(cluster),
        }
    }

    fn index_key(&self, labels: &str) -> String {
        format!("{}{labels}", self.index)
    }

    fn users_of(&self, id: u32) -> String {
        format!("{}{id}/", self.users)
    }

    fn user_key(&self, id: u32, instance: &str) -> String {
        format!("{}{id}/{instance}", self.users)
    }
}

/// What an [`Allocator`] needs to know about its apiserver.
#[derive(Debug, Clone)]
pub struct AllocatorConfig {
    /// The cluster name (the private prefix).
    pub cluster: String,
    /// The cluster's identity range.
    pub range: RangeInclusive<u32>,
    /// How long an identity must be seen unused before it is released.
    pub grace: Duration,
    /// Time-to-live of the session lease the user keys are bound to.
    pub lease_ttl: Duration,
    /// This apiserver's id among the cluster's apiservers (the last segment
    /// of its user keys); unique per process.
    pub instance: String,
}

#[derive(Debug)]
struct Slot {
    id: u32,
    /// This apiserver's users; always positive (a slot goes with its last user).
    users: u64,
}

/// An identity seen without users, and since when.
#[derive(Debug)]
struct Unused {
    /// Mod revisions of its id key and index entry (0: none) when first seen.
    observed: (Revision, Revision),
    since: Instant,
}

#[derive(Debug)]
struct State {
    lease: LeaseId,
    /// Label sets this apiserver uses, with their number.
    in_use: HashMap<String, Slot>,
    /// Numbers known to be taken (a hint: the transaction decides).
    taken: HashSet<u32>,
    next: u32,
    /// Garbage collection's observations.
    unused: HashMap<u32, Unused>,
    /// Numbers whose user key could not be deleted; retried by the collector.
    unreleased: BTreeSet<u32>,
}

/// Reference-counting identity allocator; see the module docs.
pub struct Allocator {
    backend: Arc<dyn kvstore::Backend>,
    layout: Layout,
    config: AllocatorConfig,
    // A tokio mutex, held across backend calls: acquisition and release of one
    // label set must not interleave within this apiserver (a release racing
    // an acquisition would delete a user key just written).
    state: Mutex<State>,
    /// Id keys another writer changed, written back ([`Allocator::restored`]).
    restored: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Allocator {
    /// Grants the session lease, repairs what older versions left (see the
    /// module docs) and loads the numbers in use.
    ///
    /// # Errors
    ///
    /// When the backend cannot grant, list or write.
    pub async fn load(
        backend: Arc<dyn kvstore::Backend>,
        config: AllocatorConfig,
    ) -> Result<Self, IdentityError> {
        let lease = backend
            .grant(config.lease_ttl)
            .await
            .map_err(backend_err("grant the session lease"))?;
        let this = Self {
            layout: Layout::new(&config.cluster),
            backend,
            state: Mutex::new(State {
                lease,
                in_use: HashMap::new(),
                taken: HashSet::new(),
                next: *config.range.start(),
                unused: HashMap::new(),
                unreleased: BTreeSet::new(),
            }),
            config,
            restored: std::sync::atomic::AtomicU64::new(0),
        };
        let taken = this.repair().await?;
        this.state.lock().await.taken = taken;
        Ok(this)
    }

    /// Id keys another writer changed (their labels no longer the ones the
    /// index gives them), written back by the garbage collector.
    pub fn restored(&self) -> u64 {
        self.restored.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Number of label sets this apiserver uses.
    pub async fn count(&self) -> usize {
        self.state.lock().await.in_use.len()
    }

    /// This apiserver's id among the cluster's apiservers.
    pub fn instance(&self) -> &str {
        &self.config.instance
    }

    /// Keeps the session lease alive and collects garbage periodically until
    /// `shutdown`. Does not revoke the lease: see [`Allocator::shut_down`].
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let gc_period =
            (self.config.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
        let mut gc = tokio::time::interval(gc_period);
        gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut keepalive =
            tokio::time::interval((self.config.lease_ttl / 3).max(Duration::from_millis(100)));
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = keepalive.tick() => {
                    if let Err(e) = self.keep_alive().await {
                        warn!(error = %kvstore::error_chain(&e), "identity session lease keep-alive failed");
                    }
                }
                _ = gc.tick() => match self.collect_garbage().await {
                    Ok(0) => {}
                    Ok(n) => info!(released = n, "released unused identities"),
                    Err(e) => warn!(error = %kvstore::error_chain(&e), "identity garbage collection failed"),
                },
            }
        }
    }

    /// Revokes the session lease, deleting this apiserver's user keys: its
    /// successor adopts the identities again at startup, and meanwhile the
    /// grace period protects them from other apiservers' collectors.
    ///
    /// # Errors
    ///
    /// When etcd cannot be reached (the keys then expire with the lease).
    pub async fn shut_down(&self) -> Result<(), IdentityError> {
        let mut state = self.state.lock().await;
        state.in_use.clear();
        self.backend
            .revoke(state.lease)
            .await
            .map_err(backend_err("revoke the session lease"))
    }
}

mod allocate;
mod gc;
mod repair;

pub use repair::{plan_repairs, ListedId, ListedIndex, Repair};

#[cfg(test)]
mod tests;
