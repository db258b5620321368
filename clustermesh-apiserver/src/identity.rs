//! Security identity allocation.
//!
//! A label set maps to one numeric identity `cluster_id << 16 | local` (shift 15
//! with 511 clusters), `local` in 256..=65535. The identity key
//! `cilium/state/identities/v1/id/<n>` (value: the label string) *is* the
//! record other clusters read; beside it we keep a reverse index under our
//! private prefix, `mesh/registry/v1/<cluster>/identities/<labels>` → `<n>`.
//! Allocation creates both keys only if absent (see [`KvIdentityBackend`]), so:
//!
//! * two apiservers of one cluster never hand out one number twice (the id key
//!   is create-if-absent), and
//! * the same labels always get the same number (the index is
//!   create-if-absent too; the losing writer reads the winner's number).
//!
//! Counting users and releasing unused identities after a grace period is done
//! here, in memory; the storage is behind the narrow [`IdentityBackend`] trait so
//! that this logic is unit-tested on paused time with an in-memory backend.
//!
//! Known limit: with two apiservers of one cluster, each counts only its own
//! users; one may release an identity the other still uses. Run one writer per
//! cluster (as Cilium's clustermesh-apiserver does) until users are tracked in
//! etcd too.

use std::{
    collections::{BTreeMap, HashMap},
    ops::RangeInclusive,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use tokio::{sync::Mutex, time::Instant};

use crate::model::Labels;

/// Errors of identity allocation.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity backend: {operation}")]
    Backend {
        operation: &'static str,
        #[source]
        source: kvstore::BackendError,
    },
    #[error("identity key {key:?} holds an unparsable value {value:?}")]
    Corrupt { key: String, value: String },
    #[error("no free identity left in {start}..={end}")]
    Exhausted { start: u32, end: u32 },
}

/// What a create-if-absent attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Both keys were created: the number is ours.
    Created,
    /// The labels already have this number.
    Exists(u32),
    /// The number is taken by other labels.
    Taken,
}

/// Storage of identities: the narrowest interface allocation needs.
#[async_trait]
pub trait IdentityBackend: Send + Sync + 'static {
    /// Every identity of `range` with its label string.
    async fn list(&self, range: RangeInclusive<u32>) -> Result<Vec<(u32, String)>, IdentityError>;
    /// Atomically creates `id → labels` and `labels → id` if neither exists.
    async fn create(&self, id: u32, labels: &str) -> Result<CreateOutcome, IdentityError>;
    /// Deletes `id` and its index entry if `id` still maps to `labels`.
    async fn delete(&self, id: u32, labels: &str) -> Result<(), IdentityError>;
}

/// The identity label string of an endpoint, as Cilium writes it: `k8s:`
/// source, sorted by key, each `source:key=value;`, with the namespace and
/// cluster labels added.
pub fn label_string(labels: &Labels, namespace: &str, cluster: &str) -> String {
    let mut all: BTreeMap<&str, &str> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    all.insert("io.kubernetes.pod.namespace", namespace);
    all.insert("io.cilium.k8s.policy.cluster", cluster);
    all.iter().map(|(k, v)| format!("k8s:{k}={v};")).collect()
}

#[derive(Debug)]
struct Slot {
    id: u32,
    users: u64,
    /// Set while unused: when the identity is released.
    release_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    by_labels: HashMap<String, Slot>,
    /// Numbers known to be taken (by us or by another writer).
    taken: HashMap<u32, String>,
    next: u32,
}

/// Reference-counting allocator over an [`IdentityBackend`].
#[derive(Debug)]
pub struct Allocator<B> {
    backend: B,
    range: RangeInclusive<u32>,
    grace: Duration,
    // A tokio mutex, held across backend calls: allocation and release of one
    // label set must not interleave (a release racing an allocation that just
    // found the labels' number would delete a live identity).
    state: Mutex<State>,
}

impl<B: IdentityBackend> Allocator<B> {
    /// Loads the identities of `range` from the backend; those nobody adopts
    /// (see [`Allocator::adopt`]) are released one grace period from now.
    ///
    /// # Errors
    ///
    /// When the backend cannot list.
    pub async fn load(
        backend: B,
        range: RangeInclusive<u32>,
        grace: Duration,
    ) -> Result<Self, IdentityError> {
        let existing = backend.list(range.clone()).await?;
        let release_at = Instant::now() + grace;
        let mut state = State {
            next: *range.start(),
            ..State::default()
        };
        for (id, labels) in existing {
            state.taken.insert(id, labels.clone());
            state.by_labels.insert(
                labels,
                Slot {
                    id,
                    users: 0,
                    release_at: Some(release_at),
                },
            );
        }
        Ok(Self {
            backend,
            range,
            grace,
            state: Mutex::new(state),
        })
    }

    /// The identity of `labels` if it is known, without counting a user.
    pub async fn lookup(&self, labels: &str) -> Option<u32> {
        self.state.lock().await.by_labels.get(labels).map(|s| s.id)
    }

    /// Counts a restored user of `labels` whose number was `id`; `false` when
    /// the labels have no identity or another number (then call `acquire`).
    pub async fn adopt(&self, labels: &str, id: u32) -> bool {
        let mut state = self.state.lock().await;
        match state.by_labels.get_mut(labels) {
            Some(slot) if slot.id == id => {
                slot.users += 1;
                slot.release_at = None;
                true
            }
            _ => false,
        }
    }

    /// The identity of `labels`, allocated if needed; counts one user.
    ///
    /// # Errors
    ///
    /// Backend failures, or no free number left in the range.
    pub async fn acquire(&self, labels: &str) -> Result<u32, IdentityError> {
        let mut state = self.state.lock().await;
        if let Some(slot) = state.by_labels.get_mut(labels) {
            slot.users += 1;
            slot.release_at = None;
            return Ok(slot.id);
        }
        let span = u64::from(self.range.end() - self.range.start()) + 1;
        let mut tried = 0u64;
        while tried < span {
            let candidate = state.next;
            state.next = if candidate >= *self.range.end() {
                *self.range.start()
            } else {
                candidate + 1
            };
            tried += 1;
            if state.taken.contains_key(&candidate) {
                continue;
            }
            let id = match self.backend.create(candidate, labels).await? {
                CreateOutcome::Created => candidate,
                CreateOutcome::Exists(id) => id,
                CreateOutcome::Taken => {
                    state.taken.insert(candidate, String::new());
                    continue;
                }
            };
            state.taken.insert(id, labels.to_owned());
            state.by_labels.insert(
                labels.to_owned(),
                Slot {
                    id,
                    users: 1,
                    release_at: None,
                },
            );
            return Ok(id);
        }
        Err(IdentityError::Exhausted {
            start: *self.range.start(),
            end: *self.range.end(),
        })
    }

    /// Drops one user of `labels`; the last one starts the grace period.
    pub async fn release(&self, labels: &str) {
        let mut state = self.state.lock().await;
        if let Some(slot) = state.by_labels.get_mut(labels) {
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 {
                slot.release_at = Some(Instant::now() + self.grace);
            }
        }
    }

    /// Deletes every identity whose grace period is over; returns how many.
    ///
    /// # Errors
    ///
    /// The first backend failure (the remaining ones are retried next time).
    pub async fn collect_garbage(&self) -> Result<usize, IdentityError> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let due: Vec<(String, u32)> = state
            .by_labels
            .iter()
            .filter(|(_, s)| s.users == 0 && s.release_at.is_some_and(|t| t <= now))
            .map(|(l, s)| (l.clone(), s.id))
            .collect();
        for (labels, id) in &due {
            self.backend.delete(*id, labels).await?;
            state.by_labels.remove(labels);
            state.taken.remove(id);
        }
        Ok(due.len())
    }

    /// Number of identities held (used or in their grace period).
    pub async fn count(&self) -> usize {
        self.state.lock().await.by_labels.len()
    }

    /// Runs [`Allocator::collect_garbage`] periodically until `shutdown`.
    pub async fn run_gc(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let period = (self.grace / 2).clamp(Duration::from_millis(50), Duration::from_secs(10));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            match self.collect_garbage().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(released = n, "released unused identities"),
                Err(e) => tracing::warn!(error = %e, "identity garbage collection failed"),
            }
        }
    }
}

/// Identities in a kvstore backend (etcd): the Cilium id keys plus our
/// private reverse index.
///
/// kvstore offers single-key compare-and-swap, so a creation is three steps,
/// each safe against a concurrent writer: (1) the index names the labels'
/// number → done; (2) create the id key of a free number if absent (else the
/// number is taken); (3) create the index if absent; if another writer won
/// the labels meanwhile, delete our id key again and use theirs. A crash
/// between (2) and (3) leaves an id key without index, which the next
/// [`Allocator::load`] picks up by its labels.
#[derive(Clone)]
pub struct KvIdentityBackend {
    backend: Arc<dyn kvstore::Backend>,
    index_prefix: String,
}

impl std::fmt::Debug for KvIdentityBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvIdentityBackend")
            .field("index_prefix", &self.index_prefix)
            .finish_non_exhaustive()
    }
}

/// Prefix of the Cilium identity keys (a wire format: Cilium schema v1).
pub const ID_PREFIX: &str = "cilium/state/identities/v1/id/";

impl KvIdentityBackend {
    /// Backend for `cluster`, whose index lives under
    /// `mesh/registry/v1/<cluster>/identities/`.
    pub fn new(backend: Arc<dyn kvstore::Backend>, cluster: &str) -> Self {
        Self {
            backend,
            index_prefix: format!("{}identities/", crate::persist::prefix(cluster)),
        }
    }

    fn index_key(&self, labels: &str) -> String {
        format!("{}{labels}", self.index_prefix)
    }

    async fn read_index(&self, labels: &str) -> Result<Option<u32>, IdentityError> {
        let key = self.index_key(labels);
        let Some(kv) = self
            .backend
            .get(&key)
            .await
            .map_err(backend_err("read identity index"))?
        else {
            return Ok(None);
        };
        let value = String::from_utf8_lossy(&kv.value).into_owned();
        value
            .parse()
            .map(Some)
            .map_err(|_| IdentityError::Corrupt { key, value })
    }

    async fn delete_id_if(&self, id: u32, labels: &str) -> Result<(), IdentityError> {
        let key = format!("{ID_PREFIX}{id}");
        if let Some(kv) = self
            .backend
            .get(&key)
            .await
            .map_err(backend_err("read identity"))?
        {
            if kv.value == labels.as_bytes() {
                self.backend
                    .delete_if_mod_revision(&key, kv.mod_revision)
                    .await
                    .map_err(backend_err("delete identity"))?;
            }
        }
        Ok(())
    }
}

fn backend_err(operation: &'static str) -> impl FnOnce(kvstore::BackendError) -> IdentityError {
    move |source| IdentityError::Backend { operation, source }
}

#[async_trait]
impl IdentityBackend for KvIdentityBackend {
    async fn list(&self, range: RangeInclusive<u32>) -> Result<Vec<(u32, String)>, IdentityError> {
        let listing = self
            .backend
            .list(ID_PREFIX)
            .await
            .map_err(backend_err("list identities"))?;
        let mut out = Vec::new();
        for kv in listing.kvs {
            let value = String::from_utf8_lossy(&kv.value).into_owned();
            let Ok(id) = kv.key[ID_PREFIX.len()..].parse::<u32>() else {
                return Err(IdentityError::Corrupt { key: kv.key, value });
            };
            if range.contains(&id) {
                out.push((id, value));
            }
        }
        Ok(out)
    }

    async fn create(&self, id: u32, labels: &str) -> Result<CreateOutcome, IdentityError> {
        if let Some(existing) = self.read_index(labels).await? {
            return Ok(CreateOutcome::Exists(existing));
        }
        let id_key = format!("{ID_PREFIX}{id}");
        let created = self
            .backend
            .create_if_absent(&id_key, labels.as_bytes(), None)
            .await
            .map_err(backend_err("create identity"))?;
        if !created {
            // Ours from an interrupted earlier attempt? Then finish it.
            let kv = self
                .backend
                .get(&id_key)
                .await
                .map_err(backend_err("read identity"))?;
            if kv.is_none_or(|kv| kv.value != labels.as_bytes()) {
                return Ok(CreateOutcome::Taken);
            }
        }
        let indexed = self
            .backend
            .create_if_absent(&self.index_key(labels), id.to_string().as_bytes(), None)
            .await
            .map_err(backend_err("create identity index"))?;
        if indexed {
            return Ok(CreateOutcome::Created);
        }
        match self.read_index(labels).await? {
            Some(winner) if winner == id => Ok(CreateOutcome::Created),
            Some(winner) => {
                self.delete_id_if(id, labels).await?;
                Ok(CreateOutcome::Exists(winner))
            }
            // The winner was released in between: our id key stands, retry.
            None => Ok(CreateOutcome::Taken),
        }
    }

    async fn delete(&self, id: u32, labels: &str) -> Result<(), IdentityError> {
        let index = self.index_key(labels);
        if let Some(kv) = self
            .backend
            .get(&index)
            .await
            .map_err(backend_err("read identity index"))?
        {
            if kv.value == id.to_string().as_bytes() {
                self.backend
                    .delete_if_mod_revision(&index, kv.mod_revision)
                    .await
                    .map_err(backend_err("delete identity index"))?;
            }
        }
        self.delete_id_if(id, labels).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// Two maps behind one lock: the in-memory equivalent of the etcd txn.
    type Maps = (BTreeMap<u32, String>, BTreeMap<String, u32>);
    #[derive(Debug, Default, Clone)]
    struct Memory(Arc<StdMutex<Maps>>);

    #[async_trait]
    impl IdentityBackend for Memory {
        async fn list(&self, r: RangeInclusive<u32>) -> Result<Vec<(u32, String)>, IdentityError> {
            let m = self.0.lock().unwrap();
            Ok(m.0.range(r).map(|(k, v)| (*k, v.clone())).collect())
        }
        async fn create(&self, id: u32, labels: &str) -> Result<CreateOutcome, IdentityError> {
            let mut m = self.0.lock().unwrap();
            if let Some(existing) = m.1.get(labels) {
                return Ok(CreateOutcome::Exists(*existing));
            }
            if m.0.contains_key(&id) {
                return Ok(CreateOutcome::Taken);
            }
            m.0.insert(id, labels.to_owned());
            m.1.insert(labels.to_owned(), id);
            Ok(CreateOutcome::Created)
        }
        async fn delete(&self, id: u32, labels: &str) -> Result<(), IdentityError> {
            let mut m = self.0.lock().unwrap();
            if m.0.get(&id).map(String::as_str) == Some(labels) {
                m.0.remove(&id);
                m.1.remove(labels);
            }
            Ok(())
        }
    }

    const RANGE: RangeInclusive<u32> = (3 << 16 | 256)..=(3 << 16 | 0xffff);
    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn label_string_is_sorted_with_cluster_and_namespace() {
        let labels: Labels = [("app".to_owned(), "web".to_owned())].into();
        assert_eq!(
            label_string(&labels, "default", "c1"),
            "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn same_labels_same_number_and_release_after_grace() {
        let backend = Memory::default();
        let a = Allocator::load(backend.clone(), RANGE, GRACE)
            .await
            .unwrap();
        let web = a.acquire("k8s:app=web;").await.unwrap();
        assert_eq!(web, 3 << 16 | 256);
        assert_eq!(a.acquire("k8s:app=web;").await.unwrap(), web);
        let db = a.acquire("k8s:app=db;").await.unwrap();
        assert_ne!(db, web);
        a.release("k8s:app=web;").await;
        a.release("k8s:app=web;").await;
        tokio::time::advance(GRACE / 2).await;
        assert_eq!(a.collect_garbage().await.unwrap(), 0);
        // Reused within the grace period: kept, same number.
        assert_eq!(a.acquire("k8s:app=web;").await.unwrap(), web);
        a.release("k8s:app=web;").await;
        tokio::time::advance(GRACE).await;
        assert_eq!(a.collect_garbage().await.unwrap(), 1);
        assert!(!backend.0.lock().unwrap().0.contains_key(&web));
        assert!(backend.0.lock().unwrap().0.contains_key(&db));
    }

    #[tokio::test(start_paused = true)]
    async fn two_allocators_never_share_a_number() {
        let backend = Memory::default();
        let a = Allocator::load(backend.clone(), RANGE, GRACE)
            .await
            .unwrap();
        let b = Allocator::load(backend.clone(), RANGE, GRACE)
            .await
            .unwrap();
        let x = a.acquire("k8s:app=x;").await.unwrap();
        // b does not know x's number yet: its first candidate is taken.
        let y = b.acquire("k8s:app=y;").await.unwrap();
        assert_ne!(x, y);
        // The same labels through the other allocator get the same number.
        assert_eq!(b.acquire("k8s:app=x;").await.unwrap(), x);
    }

    #[tokio::test(start_paused = true)]
    async fn restart_adopts_and_releases_the_unadopted() {
        let backend = Memory::default();
        let a = Allocator::load(backend.clone(), RANGE, GRACE)
            .await
            .unwrap();
        let web = a.acquire("k8s:app=web;").await.unwrap();
        let old = a.acquire("k8s:app=old;").await.unwrap();
        drop(a);
        let b = Allocator::load(backend.clone(), RANGE, GRACE)
            .await
            .unwrap();
        assert!(b.adopt("k8s:app=web;", web).await);
        tokio::time::advance(GRACE).await;
        assert_eq!(b.collect_garbage().await.unwrap(), 1);
        assert_eq!(b.acquire("k8s:app=web;").await.unwrap(), web);
        assert!(!backend.0.lock().unwrap().0.contains_key(&old));
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_range_is_an_error() {
        let backend = Memory::default();
        let a = Allocator::load(backend, 256..=257, GRACE).await.unwrap();
        a.acquire("a").await.unwrap();
        a.acquire("b").await.unwrap();
        assert!(matches!(
            a.acquire("c").await,
            Err(IdentityError::Exhausted { .. })
        ));
    }
}
