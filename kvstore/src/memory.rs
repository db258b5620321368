//! An in-memory backend for unit tests.
//!
//! It keeps etcd's semantics that the stores rely on: one global revision
//! bumped by every change, list at a revision, watch from any revision still
//! in the history (replayed, then live, with no gap), compaction (a watch
//! from a compacted revision fails with [`BackendError::Compacted`]), and
//! leases whose keys vanish, with delete events, when they are not kept
//! alive, and transactions exactly as etcd runs them (compares, then lease
//! checks, then every write at one revision, reported as one watch batch). Lease expiry runs on `tokio::time`, so tests drive it with
//! `tokio::time::pause`/`advance`.
//!
//! Faults a test can inject: [`MemoryBackend::set_available`] (an outage:
//! every request fails and every watch breaks), [`MemoryBackend::wipe`] (an
//! etcd that came back empty) and [`MemoryBackend::compact`].
//!
//! It is not a database: no MVCC reads at old revisions, everything under
//! one lock. Use real etcd ([`crate::EtcdBackend`]) for integration tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::backend::{
    BackendError, Compare, KeyValue, KvWrite, LeaseId, Leases, ListWatch, Listing, Revision,
    Transactions, Txn, TxnOp, TxnOutcome, WatchEvent, WatchStream,
};

type WatchSender = mpsc::UnboundedSender<Result<Vec<WatchEvent>, BackendError>>;

#[derive(Debug)]
struct Watcher {
    prefix: String,
    tx: WatchSender,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    expires: Instant,
    keys: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    revision: Revision,
    compacted: Revision,
    kvs: BTreeMap<String, KeyValue>,
    /// Every change after `compacted`, in revision order.
    history: Vec<(Revision, WatchEvent)>,
    watchers: Vec<Watcher>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    unavailable: bool,
    requests: u64,
}

impl State {
    fn check(&mut self) -> Result<(), BackendError> {
        self.requests += 1;
        if self.unavailable {
            Err(BackendError::Unavailable)
        } else {
            Ok(())
        }
    }

    /// Records the events of one revision and sends them to the watchers
    /// of their prefixes as one batch, as etcd does for one revision.
    fn emit(&mut self, events: Vec<WatchEvent>) {
        for event in &events {
            self.history.push((self.revision, event.clone()));
        }
        self.watchers.retain(|w| {
            let batch: Vec<WatchEvent> = events
                .iter()
                .filter(|e| e.key().starts_with(&w.prefix))
                .cloned()
                .collect();
            batch.is_empty() || w.tx.send(Ok(batch)).is_ok()
        });
    }

    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision, BackendError> {
        self.check_lease(lease)?;
        self.revision += 1;
        let event = self.put_at(key, value, lease, self.revision);
        self.emit(vec![event]);
        Ok(self.revision)
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), BackendError> {
        match lease {
            Some(lease) if !self.leases.contains_key(&lease) => {
                Err(BackendError::LeaseNotFound { lease })
            }
            _ => Ok(()),
        }
    }

    /// Writes `key` at `revision` (the caller checked the lease and bumps
    /// the store's revision); returns the event to emit.
    fn put_at(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        revision: Revision,
    ) -> WatchEvent {
        let create_revision = match self.kvs.get(key) {
            Some(old) => {
                if old.lease != 0 && Some(old.lease) != lease {
                    if let Some(l) = self.leases.get_mut(&old.lease) {
                        l.keys.remove(key);
                    }
                }
                old.create_revision
            }
            None => revision,
        };
        if let Some(lease) = lease {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.insert(key.to_owned());
            }
        }
        let kv = KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            mod_revision: revision,
            create_revision,
            lease: lease.unwrap_or(0),
        };
        self.kvs.insert(key.to_owned(), kv.clone());
        WatchEvent::Put(kv)
    }

    fn delete(&mut self, key: &str) -> bool {
        match self.delete_at(key, self.revision + 1) {
            Some(event) => {
                self.revision += 1;
                self.emit(vec![event]);
                true
            }
            None => false,
        }
    }

    /// Deletes `key` at `revision`, if it exists; returns the event to emit.
    fn delete_at(&mut self, key: &str, revision: Revision) -> Option<WatchEvent> {
        let old = self.kvs.remove(key)?;
        if let Some(l) = self.leases.get_mut(&old.lease) {
            l.keys.remove(key);
        }
        Some(WatchEvent::Delete {
            key: key.to_owned(),
            mod_revision: revision,
        })
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::Absent { key } => !self.kvs.contains_key(key),
            Compare::ModRevision { key, revision } => {
                self.kvs.get(key).map_or(0, |kv| kv.mod_revision) == *revision
            }
            Compare::Value { key, value } => self.kvs.get(key).is_some_and(|kv| kv.value == *value),
            Compare::NoKeyWithPrefix { prefix } => !self
                .kvs
                .range(prefix.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(prefix.as_str())),
        }
    }

    /// etcd's transaction semantics: compares first; then every put's lease
    /// must exist (else nothing is applied); then all writes at one
    /// revision, which moves only if something changed.
    fn txn(&mut self, txn: &Txn) -> Result<TxnOutcome, BackendError> {
        if !txn.compares().iter().all(|c| self.holds(c)) {
            return Ok(TxnOutcome {
                succeeded: false,
                revision: self.revision,
            });
        }
        for op in txn.ops() {
            if let TxnOp::Put { lease, .. } = op {
                self.check_lease(*lease)?;
            }
        }
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for op in txn.ops() {
            match op {
                TxnOp::Put { key, value, lease } => {
                    events.push(self.put_at(key, value, *lease, revision));
                }
                TxnOp::Delete { key } => events.extend(self.delete_at(key, revision)),
            }
        }
        if !events.is_empty() {
            self.revision = revision;
            self.emit(events);
        }
        Ok(TxnOutcome {
            succeeded: true,
            revision: self.revision,
        })
    }

    /// Deletes every key of the lease at one revision, as etcd does.
    fn revoke(&mut self, lease: LeaseId) {
        let Some(l) = self.leases.remove(&lease) else {
            return;
        };
        let revision = self.revision + 1;
        let events: Vec<WatchEvent> = l
            .keys
            .iter()
            .filter_map(|key| self.delete_at(key, revision))
            .collect();
        if !events.is_empty() {
            self.revision = revision;
            self.emit(events);
        }
    }

    fn break_watchers(&mut self) {
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(Err(BackendError::Unavailable));
        }
    }
}

/// The in-memory backend; see the module docs. Clones share one store.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    state: Arc<Mutex<State>>,
}

impl MemoryBackend {
    /// An empty store at revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Simulates an outage (`false`): every request fails with
    /// [`BackendError::Unavailable`] and every open watch ends with it.
    /// `true` ends the outage.
    pub fn set_available(&self, available: bool) {
        let mut state = self.lock();
        state.unavailable = !available;
        if !available {
            state.break_watchers();
        }
    }

    /// Simulates an etcd that came back empty: every key, lease and bit of
    /// history is gone, revisions restart at 0, open watches break.
    pub fn wipe(&self) {
        let mut state = self.lock();
        state.break_watchers();
        let unavailable = state.unavailable;
        let next_lease = state.next_lease;
        *state = State {
            unavailable,
            next_lease,
            ..State::default()
        };
    }

    /// Drops the history up to and including `revision`; a later watch from
    /// a revision at or below it fails with [`BackendError::Compacted`].
    pub fn compact(&self, revision: Revision) {
        let mut state = self.lock();
        state.compacted = state.compacted.max(revision);
        let compacted = state.compacted;
        state.history.retain(|(rev, _)| *rev > compacted);
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    /// A snapshot of every key and value.
    pub fn dump(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock()
            .kvs
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect()
    }

    /// Number of requests served or refused so far (to assert that a store
    /// wrote nothing).
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// Ids of the live leases.
    pub fn leases(&self) -> Vec<LeaseId> {
        self.lock().leases.keys().copied().collect()
    }

    /// Puts a key directly, bypassing outages (to prepare a scenario).
    pub fn seed(&self, key: &str, value: &[u8]) {
        let _ = self.lock().put(key, value, None);
    }

    /// Deletes a key directly, bypassing outages (to prepare a scenario).
    pub fn unseed(&self, key: &str) {
        self.lock().delete(key);
    }

    fn spawn_reaper(&self, lease: LeaseId) {
        let weak: Weak<Mutex<State>> = Arc::downgrade(&self.state);
        tokio::spawn(async move {
            loop {
                let Some(state) = weak.upgrade() else { return };
                let expires = {
                    let mut state = state
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let Some(l) = state.leases.get(&lease) else {
                        return;
                    };
                    if Instant::now() >= l.expires {
                        state.revoke(lease);
                        return;
                    }
                    l.expires
                };
                drop(state);
                tokio::time::sleep_until(expires).await;
            }
        });
    }
}

#[async_trait]
impl ListWatch for MemoryBackend {
    async fn list(&self, prefix: &str) -> Result<Listing, BackendError> {
        let mut state = self.lock();
        state.check()?;
        let kvs = state
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok(Listing {
            kvs,
            revision: state.revision,
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, BackendError> {
        let mut state = self.lock();
        state.check()?;
        let (tx, rx) = mpsc::unbounded_channel();
        if from <= state.compacted {
            let _ = tx.send(Err(BackendError::Compacted {
                requested: from,
                compacted: state.compacted,
            }));
        } else {
            let replay: Vec<WatchEvent> = state
                .history
                .iter()
                .filter(|(rev, ev)| *rev >= from && ev.key().starts_with(prefix))
                .map(|(_, ev)| ev.clone())
                .collect();
            if !replay.is_empty() {
                let _ = tx.send(Ok(replay));
            }
            state.watchers.push(Watcher {
                prefix: prefix.to_owned(),
                tx,
            });
        }
        Ok(UnboundedReceiverStream::new(rx).boxed())
    }
}

#[async_trait]
impl KvWrite for MemoryBackend {
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision, BackendError> {
        let mut state = self.lock();
        state.check()?;
        state.put(key, value, lease)
    }

    async fn delete(&self, key: &str) -> Result<bool, BackendError> {
        let mut state = self.lock();
        state.check()?;
        Ok(state.delete(key))
    }
}

#[async_trait]
impl Leases for MemoryBackend {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, BackendError> {
        let ttl = ttl.max(Duration::from_secs(1));
        let id = {
            let mut state = self.lock();
            state.check()?;
            state.next_lease += 1;
            let id = state.next_lease;
            state.leases.insert(
                id,
                Lease {
                    ttl,
                    expires: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        };
        self.spawn_reaper(id);
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, BackendError> {
        let mut state = self.lock();
        state.check()?;
        let now = Instant::now();
        match state.leases.get_mut(&lease) {
            Some(l) if l.expires > now => {
                l.expires = now + l.ttl;
                Ok(l.ttl)
            }
            _ => Err(BackendError::LeaseNotFound { lease }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), BackendError> {
        let mut state = self.lock();
        state.check()?;
        state.revoke(lease);
        Ok(())
    }
}

#[async_trait]
impl Transactions for MemoryBackend {
    async fn txn(&self, txn: &Txn) -> Result<TxnOutcome, BackendError> {
        txn.validate()?;
        let mut state = self.lock();
        state.check()?;
        state.txn(txn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(stream: &mut WatchStream) -> Result<Vec<WatchEvent>, BackendError> {
        tokio::time::timeout(Duration::from_secs(1), stream.next())
            .await
            .expect("a watch event within 1s")
            .expect("the stream is open")
    }

    #[tokio::test(start_paused = true)]
    async fn watch_replays_from_revision_then_goes_live() {
        let m = MemoryBackend::new();
        m.put("a/1", b"x", None).await.unwrap();
        let rev = m.put("a/2", b"y", None).await.unwrap();
        m.put("b/1", b"z", None).await.unwrap();
        let mut w = m.watch("a/", rev).await.unwrap();
        let first = next(&mut w).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].key(), "a/2");
        m.delete("a/1").await.unwrap();
        assert!(
            matches!(&next(&mut w).await.unwrap()[0], WatchEvent::Delete { key, .. } if key == "a/1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn compacted_watch_fails() {
        let m = MemoryBackend::new();
        let rev = m.put("a/1", b"x", None).await.unwrap();
        m.put("a/1", b"y", None).await.unwrap();
        m.compact(rev + 1);
        let mut w = m.watch("a/", rev).await.unwrap();
        assert!(matches!(
            next(&mut w).await,
            Err(BackendError::Compacted { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_deletes_keys_unless_kept_alive() {
        let m = MemoryBackend::new();
        let kept = m.grant(Duration::from_secs(10)).await.unwrap();
        let lost = m.grant(Duration::from_secs(10)).await.unwrap();
        m.put("a/kept", b"1", Some(kept)).await.unwrap();
        m.put("a/lost", b"1", Some(lost)).await.unwrap();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            m.keep_alive(kept).await.unwrap();
        }
        assert_eq!(m.dump().keys().collect::<Vec<_>>(), ["a/kept"]);
        assert!(matches!(
            m.keep_alive(lost).await,
            Err(BackendError::LeaseNotFound { .. })
        ));
        assert!(matches!(
            m.put("a/x", b"1", Some(lost)).await,
            Err(BackendError::LeaseNotFound { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn transactions_compare_mod_revision() {
        let m = MemoryBackend::new();
        assert!(m.create_if_absent("k", b"1", None).await.unwrap());
        assert!(!m.create_if_absent("k", b"2", None).await.unwrap());
        let rev = m.get("k").await.unwrap().unwrap().mod_revision;
        assert!(!m
            .put_if_mod_revision("k", b"3", rev - 1, None)
            .await
            .unwrap());
        assert!(m.put_if_mod_revision("k", b"3", rev, None).await.unwrap());
        assert!(!m.delete_if_mod_revision("k", rev).await.unwrap());
        let rev = m.get("k").await.unwrap().unwrap().mod_revision;
        assert!(m.delete_if_mod_revision("k", rev).await.unwrap());
        assert!(m.get("k").await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn outage_breaks_watches_and_fails_requests() {
        let m = MemoryBackend::new();
        let mut w = m.watch("", 1).await.unwrap();
        m.set_available(false);
        assert!(matches!(next(&mut w).await, Err(BackendError::Unavailable)));
        assert!(m.list("").await.is_err());
        m.set_available(true);
        assert!(m.list("").await.is_ok());
    }
}
