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
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ops::RangeInclusive,
    sync::Arc,
    time::Duration,
};

use api::ClusterName;
use kvstore::{BackendError, Compare, LeaseId, Revision, Txn, TxnOp};
use tokio::{sync::Mutex, time::Instant};
use tracing::{error, info, warn};

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

/// An id key as listed: its labels and mod revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedId {
    pub labels: String,
    pub revision: Revision,
}

/// An index entry as listed: the number it names (`None` when unparsable)
/// and its mod revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedIndex {
    pub id: Option<u32>,
    pub revision: Revision,
}

/// One startup repair of the index of one label set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub labels: String,
    /// `create`, `repoint` or `delete`, for the log.
    pub action: &'static str,
    /// Conditioned on the listed revisions of every key it relies on.
    pub txn: Txn,
}

/// Plans the repairs of the index of `cluster` against the id keys of its
/// range: the resolution rules of the module docs, in label order. Pure, so
/// that two apiservers starting together plan the same; the revisions in the
/// compares make the second one's transactions fail harmlessly.
pub fn plan_repairs(
    cluster: &str,
    ids: &BTreeMap<u32, ListedId>,
    index: &BTreeMap<String, ListedIndex>,
) -> Vec<Repair> {
    let layout = Layout::new(cluster);
    let mut holders: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (id, listed) in ids {
        holders.entry(&listed.labels).or_default().push(*id);
    }
    let labels: BTreeSet<&str> = holders
        .keys()
        .copied()
        .chain(index.keys().map(String::as_str))
        .collect();
    let mut plan = Vec::new();
    for labels in labels {
        let held = holders.get(labels).map(Vec::as_slice).unwrap_or_default();
        let entry = index.get(labels);
        let named = entry.and_then(|e| e.id);
        if named.is_some_and(|n| held.contains(&n)) {
            continue;
        }
        let index_key = layout.index_key(labels);
        let (action, txn) = match (entry, held.first()) {
            (_, Some(&canonical)) => {
                let index_compare = entry.map_or_else(
                    || Compare::absent(&index_key),
                    |e| Compare::mod_revision(&index_key, e.revision),
                );
                let action = if entry.is_some() { "repoint" } else { "create" };
                let txn = Txn::new()
                    .when([
                        index_compare,
                        Compare::mod_revision(id_key(canonical), ids[&canonical].revision),
                    ])
                    .and_then([TxnOp::put(&index_key, canonical.to_string(), None)]);
                (action, txn)
            }
            (Some(e), None) => {
                let mut compares = vec![Compare::mod_revision(&index_key, e.revision)];
                if let Some(n) = named {
                    let revision = ids.get(&n).map_or(0, |l| l.revision);
                    compares.push(Compare::mod_revision(id_key(n), revision));
                }
                let txn = Txn::new()
                    .when(compares)
                    .and_then([TxnOp::delete(&index_key)]);
                ("delete", txn)
            }
            (None, None) => continue,
        };
        plan.push(Repair {
            labels: labels.to_owned(),
            action,
            txn,
        });
    }
    plan
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
        };
        let taken = this.repair().await?;
        this.state.lock().await.taken = taken;
        Ok(this)
    }

    /// The id keys of the range.
    async fn list_ids(&self) -> Result<BTreeMap<u32, ListedId>, IdentityError> {
        let listing = self
            .backend
            .list(&api::keys::identities_prefix())
            .await
            .map_err(backend_err("list identities"))?;
        Ok(listing
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let id = api::keys::parse_identity_key(&kv.key).ok()?.id.0;
                self.config.range.contains(&id).then(|| {
                    let labels = String::from_utf8_lossy(&kv.value).into_owned();
                    (
                        id,
                        ListedId {
                            labels,
                            revision: kv.mod_revision,
                        },
                    )
                })
            })
            .collect())
    }

    /// The index entries.
    async fn list_index(&self) -> Result<BTreeMap<String, ListedIndex>, IdentityError> {
        let listing = self
            .backend
            .list(&self.layout.index)
            .await
            .map_err(backend_err("list identity index"))?;
        Ok(listing
            .kvs
            .into_iter()
            .map(|kv| {
                let labels = kv.key[self.layout.index.len()..].to_owned();
                let id = parse_id(&kv.value);
                (
                    labels,
                    ListedIndex {
                        id,
                        revision: kv.mod_revision,
                    },
                )
            })
            .collect())
    }

    /// Startup repair; returns the numbers taken.
    async fn repair(&self) -> Result<HashSet<u32>, IdentityError> {
        let mut ids = self.list_ids().await?;
        for pass in 1..=REPAIR_PASSES {
            let index = self.list_index().await?;
            let plan = plan_repairs(&self.config.cluster, &ids, &index);
            let mut lost = 0;
            for repair in &plan {
                let outcome = self
                    .backend
                    .txn(&repair.txn)
                    .await
                    .map_err(backend_err("repair identity index"))?;
                if outcome.succeeded {
                    info!(labels = %repair.labels, action = repair.action, "repaired identity index");
                } else {
                    lost += 1;
                }
            }
            if lost == 0 {
                break;
            }
            if pass == REPAIR_PASSES {
                warn!(
                    lost,
                    "identity index repair kept losing to a concurrent writer; acquisition repairs the rest"
                );
            } else {
                ids = self.list_ids().await?;
            }
        }
        Ok(ids.into_keys().collect())
    }

    /// Counts a restored user of `labels` whose number was `id`: `true` when
    /// the identity still holds (id key and index agree); `false` when it is
    /// gone or renumbered (then call [`Allocator::acquire`]).
    ///
    /// # Errors
    ///
    /// Backend failures.
    pub async fn adopt(&self, labels: &str, id: u32) -> Result<bool, IdentityError> {
        let mut state = self.state.lock().await;
        if let Some(slot) = state.in_use.get_mut(labels) {
            if slot.id != id {
                return Ok(false);
            }
            slot.users += 1;
            return Ok(true);
        }
        let txn = Txn::new()
            .when([
                Compare::value(id_key(id), labels),
                Compare::value(self.layout.index_key(labels), id.to_string()),
            ])
            .and_then([self.user_op(id, state.lease)]);
        if !self.txn_renewing(&mut state, txn, "adopt identity").await? {
            return Ok(false);
        }
        state.unreleased.remove(&id);
        state.taken.insert(id);
        state
            .in_use
            .insert(labels.to_owned(), Slot { id, users: 1 });
        Ok(true)
    }

    /// The identity of `labels`, allocated if needed; counts one user.
    ///
    /// # Errors
    ///
    /// Backend failures, no free number left in the range, or a label set
    /// still contended after many attempts.
    pub async fn acquire(&self, labels: &str) -> Result<u32, IdentityError> {
        let mut state = self.state.lock().await;
        if let Some(slot) = state.in_use.get_mut(labels) {
            slot.users += 1;
            return Ok(slot.id);
        }
        let id = self.claim(&mut state, labels).await?;
        state.unreleased.remove(&id);
        state.taken.insert(id);
        state
            .in_use
            .insert(labels.to_owned(), Slot { id, users: 1 });
        Ok(id)
    }

    fn user_op(&self, id: u32, lease: LeaseId) -> TxnOp {
        TxnOp::put(
            self.layout.user_key(id, &self.config.instance),
            Vec::new(),
            Some(lease),
        )
    }

    /// Runs `txn`, whose puts use the session lease; when the lease turns out
    /// to be lost, renews it and runs the transaction again with the new one.
    async fn txn_renewing(
        &self,
        state: &mut State,
        txn: Txn,
        operation: &'static str,
    ) -> Result<bool, IdentityError> {
        match self.backend.txn(&txn).await {
            Ok(outcome) => Ok(outcome.succeeded),
            Err(BackendError::LeaseNotFound { lease }) if lease == state.lease => {
                self.renew_lease(state).await?;
                let renewed =
                    Txn::new()
                        .when(txn.compares().to_vec())
                        .and_then(txn.ops().iter().map(|op| match op {
                            TxnOp::Put { key, value, lease } if lease.is_some() => {
                                TxnOp::put(key.clone(), value.clone(), Some(state.lease))
                            }
                            other => other.clone(),
                        }));
                let outcome = self
                    .backend
                    .txn(&renewed)
                    .await
                    .map_err(backend_err(operation))?;
                Ok(outcome.succeeded)
            }
            Err(e) => Err(backend_err(operation)(e)),
        }
    }

    /// Makes this apiserver a user of `labels`' identity, creating it if it
    /// has none; returns the number.
    async fn claim(&self, state: &mut State, labels: &str) -> Result<u32, IdentityError> {
        let index_key = self.layout.index_key(labels);
        let mut contended = 0;
        let mut refreshed = false;
        loop {
            if contended >= MAX_CONTENDED {
                return Err(IdentityError::Contended {
                    labels: labels.to_owned(),
                    attempts: contended,
                });
            }
            let index = self
                .backend
                .get(&index_key)
                .await
                .map_err(backend_err("read identity index"))?;
            if let Some(index) = index {
                let named = parse_id(&index.value);
                if let Some(id) = named {
                    let txn = Txn::new()
                        .when([
                            Compare::value(id_key(id), labels),
                            Compare::mod_revision(&index_key, index.mod_revision),
                        ])
                        .and_then([self.user_op(id, state.lease)]);
                    if self.txn_renewing(state, txn, "use identity").await? {
                        return Ok(id);
                    }
                }
                // The index moved meanwhile, or is stale (its id key is gone
                // or holds other labels): delete it if it still is, retry.
                let id_revision = match named {
                    Some(id) => match self
                        .backend
                        .get(&id_key(id))
                        .await
                        .map_err(backend_err("read identity"))?
                    {
                        None => Some(0),
                        Some(kv) if kv.value != labels.as_bytes() => Some(kv.mod_revision),
                        // It holds our labels: only the index moved; retry.
                        Some(_) => None,
                    },
                    None => Some(0),
                };
                if let Some(id_revision) = id_revision {
                    let mut compares = vec![Compare::mod_revision(&index_key, index.mod_revision)];
                    if let Some(id) = named {
                        compares.push(Compare::mod_revision(id_key(id), id_revision));
                    }
                    let txn = Txn::new()
                        .when(compares)
                        .and_then([TxnOp::delete(&index_key)]);
                    let outcome = self
                        .backend
                        .txn(&txn)
                        .await
                        .map_err(backend_err("delete stale identity index"))?;
                    if outcome.succeeded {
                        warn!(labels, "deleted a stale identity index entry");
                    }
                }
                contended += 1;
                continue;
            }
            let Some(candidate) = self.next_free(state) else {
                if refreshed {
                    return Err(IdentityError::Exhausted {
                        start: *self.config.range.start(),
                        end: *self.config.range.end(),
                    });
                }
                // The hint may hold numbers released by another apiserver.
                state.taken = self.list_ids().await?.into_keys().collect();
                refreshed = true;
                continue;
            };
            let id_key = id_key(candidate);
            let txn = Txn::new()
                .when([Compare::absent(&id_key), Compare::absent(&index_key)])
                .and_then([
                    TxnOp::put(&id_key, labels, None),
                    TxnOp::put(&index_key, candidate.to_string(), None),
                    self.user_op(candidate, state.lease),
                ]);
            if self.txn_renewing(state, txn, "create identity").await? {
                return Ok(candidate);
            }
            // Lost: the number is taken, or the labels got an index (the next
            // round reads it and uses the winner's number).
            let exists = self
                .backend
                .get(&id_key)
                .await
                .map_err(backend_err("read identity"))?
                .is_some();
            if exists {
                state.taken.insert(candidate);
            } else {
                contended += 1;
            }
        }
    }

    /// The next number after the cursor that is not known to be taken.
    fn next_free(&self, state: &mut State) -> Option<u32> {
        let (start, end) = (*self.config.range.start(), *self.config.range.end());
        let span = u64::from(end - start) + 1;
        for _ in 0..span {
            let candidate = state.next;
            state.next = if candidate >= end {
                start
            } else {
                candidate + 1
            };
            if !state.taken.contains(&candidate) {
                return Some(candidate);
            }
        }
        None
    }

    /// Drops one user of `labels`; the last one deletes this apiserver's user
    /// key, so that the garbage collector of any apiserver may release the
    /// identity once no other apiserver uses it either.
    pub async fn release(&self, labels: &str) {
        let mut state = self.state.lock().await;
        let Some(slot) = state.in_use.get_mut(labels) else {
            return;
        };
        slot.users -= 1;
        if slot.users > 0 {
            return;
        }
        let id = slot.id;
        state.in_use.remove(labels);
        // The grace period starts now, whatever the collector saw before.
        state.unused.remove(&id);
        let key = self.layout.user_key(id, &self.config.instance);
        if let Err(e) = self.backend.delete(&key).await {
            warn!(id, error = %kvstore::error_chain(&e), "deleting an identity user key failed; retried by garbage collection");
            state.unreleased.insert(id);
        }
    }

    /// Releases every identity that nobody has used, in any apiserver, for the
    /// grace period; returns how many.
    ///
    /// # Errors
    ///
    /// The first backend failure (the rest is retried next time).
    pub async fn collect_garbage(&self) -> Result<usize, IdentityError> {
        let mut state = self.state.lock().await;
        let in_use: HashSet<u32> = state.in_use.values().map(|s| s.id).collect();
        for id in std::mem::take(&mut state.unreleased) {
            if in_use.contains(&id) {
                continue;
            }
            let key = self.layout.user_key(id, &self.config.instance);
            if let Err(e) = self.backend.delete(&key).await {
                state.unreleased.insert(id);
                return Err(backend_err("delete identity user key")(e));
            }
        }
        let ids = self.list_ids().await?;
        let index = self.list_index().await?;
        let users: HashSet<u32> = self
            .backend
            .list(&self.layout.users)
            .await
            .map_err(backend_err("list identity users"))?
            .kvs
            .iter()
            .filter_map(|kv| {
                let rest = &kv.key[self.layout.users.len()..];
                rest.split_once('/')?.0.parse().ok()
            })
            .collect();
        let now = Instant::now();
        state.unused.retain(|id, _| ids.contains_key(id));
        let mut released = 0;
        for (id, listed) in &ids {
            if users.contains(id) || in_use.contains(id) {
                state.unused.remove(id);
                continue;
            }
            let entry = index.get(&listed.labels);
            let observed = (listed.revision, entry.map_or(0, |e| e.revision));
            match state.unused.get(id) {
                Some(u) if u.observed == observed => {
                    if now.duration_since(u.since) < self.config.grace {
                        continue;
                    }
                }
                _ => {
                    state.unused.insert(
                        *id,
                        Unused {
                            observed,
                            since: now,
                        },
                    );
                    continue;
                }
            }
            let index_key = self.layout.index_key(&listed.labels);
            let mut ops = vec![TxnOp::delete(id_key(*id))];
            if entry.is_some_and(|e| e.id == Some(*id)) {
                ops.push(TxnOp::delete(&index_key));
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(id_key(*id), observed.0),
                    Compare::mod_revision(&index_key, observed.1),
                    Compare::no_key_with_prefix(self.layout.users_of(*id)),
                ])
                .and_then(ops);
            let outcome = self
                .backend
                .txn(&txn)
                .await
                .map_err(backend_err("release identity"))?;
            state.unused.remove(id);
            if outcome.succeeded {
                info!(id, labels = %listed.labels, "released an unused identity");
                state.taken.remove(id);
                released += 1;
            }
        }
        Ok(released)
    }

    /// Renews the session lease once; a lost lease is replaced (see
    /// [`Allocator::run`]).
    ///
    /// # Errors
    ///
    /// When etcd cannot be reached (the lease may still be alive).
    pub async fn keep_alive(&self) -> Result<(), IdentityError> {
        let lease = self.state.lock().await.lease;
        match self.backend.keep_alive(lease).await {
            Ok(_) => Ok(()),
            Err(BackendError::LeaseNotFound { .. }) => {
                let mut state = self.state.lock().await;
                if state.lease == lease {
                    self.renew_lease(&mut state).await?;
                }
                Ok(())
            }
            Err(e) => Err(backend_err("keep the session lease alive")(e)),
        }
    }

    /// The lease is gone (expired during a partition, or etcd lost its
    /// data), and with it this apiserver's user keys: grant a new one and
    /// write them again. An identity released meanwhile is created again
    /// with its number if that is still free.
    async fn renew_lease(&self, state: &mut State) -> Result<(), IdentityError> {
        let lease = self
            .backend
            .grant(self.config.lease_ttl)
            .await
            .map_err(backend_err("grant the session lease"))?;
        warn!(
            lease,
            identities = state.in_use.len(),
            "session lease lost; writing the identity user keys again"
        );
        state.lease = lease;
        for (labels, slot) in &state.in_use {
            let id_key = id_key(slot.id);
            let index_key = self.layout.index_key(labels);
            let user = self.user_op(slot.id, lease);
            let reuse = Txn::new()
                .when([
                    Compare::value(&id_key, labels.as_str()),
                    Compare::value(&index_key, slot.id.to_string()),
                ])
                .and_then([user.clone()]);
            let recreate = Txn::new()
                .when([Compare::absent(&id_key), Compare::absent(&index_key)])
                .and_then([
                    TxnOp::put(&id_key, labels.as_str(), None),
                    TxnOp::put(&index_key, slot.id.to_string(), None),
                    user,
                ]);
            let mut done = false;
            for txn in [reuse, recreate] {
                done = self
                    .backend
                    .txn(&txn)
                    .await
                    .map_err(backend_err("write identity user key"))?
                    .succeeded;
                if done {
                    break;
                }
            }
            if !done {
                error!(
                    id = slot.id,
                    labels = %labels,
                    "identity was released while the session lease was lost and its number or labels are taken now; its endpoints keep a stale number until they register again"
                );
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests;
