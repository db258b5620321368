//! The write side: export one cluster's records of one kind into etcd.
//!
//! A [`SyncStore`] is the single writer of a prefix. The caller states what
//! should exist ([`SyncStore::upsert`], [`SyncStore::delete`]) and returns
//! at once; a bounded pool of workers makes etcd agree:
//!
//! * **Coalescing.** The store keeps the desired value per key, not a log of
//!   calls. A key changed ten times while a write is queued or in flight is
//!   written once more, with its latest value.
//! * **Skip unchanged.** It remembers what it wrote (value and lease); a
//!   desired value equal to the written one on a live lease costs nothing.
//! * **Leases.** Every key is bound to a lease that a background task keeps
//!   alive, so the keys of a writer that dies vanish after the TTL. A lease
//!   holds at most `max_keys_per_lease` keys, after which a new one is
//!   granted, so one lost lease does not take everything with it and
//!   revoking one stays cheap.
//! * **Retry.** Failed writes are retried with jittered exponential backoff
//!   (`backon`), re-reading the desired value before each attempt.
//! * **Sync canary.** After [`SyncStore::synced`] (the caller's initial
//!   state is complete) and once all of it is in etcd, the store writes
//!   `cilium/synced/<cluster>/<base prefix>` with an RFC 3339 timestamp, so
//!   readers know the export is complete and stale entries can go.
//! * **Recovery.** When a lease is lost (expired during a long outage, or
//!   etcd came back with an empty data dir) every key bound to it is written
//!   again, and the canary after them.
//! * **Adoption.** At start the store lists its prefix and takes over what a
//!   previous incarnation left: equal values on a lease that is still alive
//!   (the lease is adopted and kept alive) are not written again; keys
//!   nobody upserts are deleted only after [`SyncStore::synced`]. A
//!   restarted apiserver therefore neither flaps nor deletes live keys.
//! * **Tamper guard.** The store watches its prefix ([`guard`]): a key of
//!   its own that someone else changed or deleted is written back, and a key
//!   it never wrote is deleted (after [`SyncStore::synced`]), each counted.
//!   With etcd's RBAC in place nobody else can write there; the guard
//!   protects clusters whose etcd has no authentication.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use api::{ClusterName, Resource};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

use crate::backend::{BackendError, LeaseId, Revision, SyncBackend};
use crate::lease_pool::LeasePool;
use crate::retry::Backoff;
use crate::work_queue::WorkQueue;

mod guard;

/// Tuning of a [`SyncStore`].
#[derive(Debug, Clone)]
pub struct SyncStoreConfig {
    /// Time-to-live of the session leases (default 15 minutes, as Cilium).
    pub lease_ttl: Duration,
    /// How often leases are renewed (default: a third of the TTL, at most
    /// 10 s, so that a lease lost to an emptied etcd is noticed soon).
    pub keepalive_interval: Option<Duration>,
    /// Keys bound to one lease before a new one is granted (default 1000).
    pub max_keys_per_lease: usize,
    /// Concurrent writes (default 32).
    pub concurrency: usize,
    /// First retry delay (default 50 ms); doubles up to `retry_max`, jittered.
    pub retry_min: Duration,
    /// Longest retry delay (default 5 s).
    pub retry_max: Duration,
    /// Write the sync canary after [`SyncStore::synced`] (default true).
    pub write_canary: bool,
    /// Watch the prefix and undo what others write there (default true).
    pub guard: bool,
}

impl Default for SyncStoreConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15 * 60),
            keepalive_interval: None,
            max_keys_per_lease: 1000,
            concurrency: 32,
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            write_canary: true,
            guard: true,
        }
    }
}

impl SyncStoreConfig {
    fn keepalive_every(&self) -> Duration {
        self.keepalive_interval
            .unwrap_or_else(|| (self.lease_ttl / 3).min(Duration::from_secs(10)))
            .max(Duration::from_millis(100))
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.retry_min, self.retry_max)
    }
}

/// Counters of a [`SyncStore`], for metrics.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Keys written (puts that succeeded).
    pub puts: AtomicU64,
    /// Keys deleted.
    pub deletes: AtomicU64,
    /// Upserts dropped because the value was already desired or written.
    pub skipped_unchanged: AtomicU64,
    /// Changes merged into one already queued for the same key.
    pub coalesced: AtomicU64,
    /// Failed etcd requests (each retried).
    pub errors: AtomicU64,
    /// Leases granted.
    pub leases_granted: AtomicU64,
    /// Leases found lost (their keys were written again).
    pub leases_lost: AtomicU64,
    /// Keys adopted from a previous writer at start.
    pub adopted: AtomicU64,
    /// Times the sync canary was written.
    pub canaries: AtomicU64,
    /// Own keys another writer changed or deleted, written back.
    pub tampered_restored: AtomicU64,
    /// Keys another writer put under the prefix, deleted.
    pub foreign_removed: AtomicU64,
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone)]
struct Written {
    value: Arc<[u8]>,
    lease: LeaseId,
    /// The revision of the write (0 when unknown).
    revision: Revision,
}

#[derive(Debug, Default)]
struct State {
    /// What the caller wants in etcd (and the canary, once due).
    wanted: HashMap<String, Arc<[u8]>>,
    /// What this store believes is in etcd.
    written: HashMap<String, Written>,
    /// Keys to reconcile.
    queue: WorkQueue<String>,
    /// Adopted keys the caller has not claimed; deleted after `synced`.
    unclaimed: HashSet<String>,
    /// Live leases and the number of keys bound to each.
    leases: LeasePool,
    /// The caller called `synced`.
    synced: bool,
    /// The canary is wanted (set when everything else was written).
    canary_due: bool,
    /// Values being written right now (their watch events are ours).
    in_flight: HashMap<String, Arc<[u8]>>,
    /// The revision of the adoption listing (the guard watches after it).
    listed_at: Revision,
}

impl State {
    /// Forgets the written keys bound to `lease` and queues the wanted ones.
    fn lose_lease(&mut self, lease: LeaseId, canary_key: &str) -> usize {
        if !self.leases.remove(lease) {
            return 0;
        }
        let lost: Vec<String> = self
            .written
            .iter()
            .filter(|(_, w)| w.lease == lease)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &lost {
            self.written.remove(key);
        }
        // The canary goes again only after everything else is back.
        if self.canary_due && !self.written.contains_key(canary_key) {
            self.canary_due = false;
            self.wanted.remove(canary_key);
        }
        for key in &lost {
            if self.wanted.contains_key(key) {
                self.queue.add(key.clone());
            }
        }
        lost.len()
    }
}

/// The part of the store that does not depend on the record type.
struct Shared {
    backend: Arc<dyn SyncBackend>,
    prefix: String,
    canary_key: String,
    config: SyncStoreConfig,
    state: Mutex<State>,
    /// Wakes workers when keys are queued.
    work: Notify,
    /// Wakes `wait_idle` callers when the store may have become idle.
    idle: Notify,
    /// Serializes lease grants.
    grant: tokio::sync::Mutex<()>,
    /// Becomes true once adoption is done and workers may write.
    ready: watch::Sender<bool>,
    stats: SyncStats,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .field("canary_key", &self.canary_key)
            .finish_non_exhaustive()
    }
}

/// The write side of one kind of record for one cluster; see the module
/// docs. Not `Clone`: there is one writer per prefix.
#[derive(Debug)]
pub struct SyncStore<R> {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    _record: PhantomData<fn(R)>,
}

impl<R: Resource> SyncStore<R> {
    /// Starts the store for `cluster`'s records of kind `R`: adopts what is
    /// under `R::prefix(cluster)`, then writes what the caller upserts.
    /// Must be called within a tokio runtime.
    pub fn start(
        backend: Arc<dyn SyncBackend>,
        cluster: &ClusterName,
        config: SyncStoreConfig,
    ) -> Self {
        let prefix = R::prefix(cluster);
        let canary_key = api::keys::sync_canary_key(cluster, R::BASE_PREFIX);
        let span = tracing::info_span!("sync_store", kind = R::KIND, cluster = %cluster);
        Self::start_raw(backend, prefix, canary_key, config, span)
    }

    fn start_raw(
        backend: Arc<dyn SyncBackend>,
        prefix: String,
        canary_key: String,
        config: SyncStoreConfig,
        span: tracing::Span,
    ) -> Self {
        let workers = config.concurrency.max(1);
        let shared = Arc::new(Shared {
            backend,
            prefix,
            canary_key,
            config,
            state: Mutex::new(State::default()),
            work: Notify::new(),
            idle: Notify::new(),
            grant: tokio::sync::Mutex::new(()),
            ready: watch::Sender::new(false),
            stats: SyncStats::default(),
        });
        let mut tasks = Vec::with_capacity(workers + 3);
        tasks.push(tokio::spawn(adopt(shared.clone()).instrument(span.clone())));
        if shared.config.guard {
            tasks.push(tokio::spawn(
                guard::run(shared.clone()).instrument(span.clone()),
            ));
        }
        tasks.push(tokio::spawn(
            keep_alive(shared.clone()).instrument(span.clone()),
        ));
        for _ in 0..workers {
            tasks.push(tokio::spawn(
                worker(shared.clone()).instrument(span.clone()),
            ));
        }
        Self {
            shared,
            tasks,
            _record: PhantomData,
        }
    }

    /// Desires `record` in etcd under `record.key()`. Returns at once.
    pub fn upsert(&self, record: &R) {
        let key = record.key();
        if !key.starts_with(&self.shared.prefix) {
            warn!(key = %key, prefix = %self.shared.prefix, "record key outside the store's prefix, not exported");
            return;
        }
        let value: Arc<[u8]> = record.encode().into();
        let mut state = self.shared.lock();
        state.unclaimed.remove(&key);
        if state.wanted.get(&key).is_some_and(|v| *v == value) {
            inc(&self.shared.stats.skipped_unchanged);
            return;
        }
        state.wanted.insert(key.clone(), value);
        self.shared.enqueue(&mut state, key);
    }

    /// Desires that `record`'s key does not exist.
    pub fn delete(&self, record: &R) {
        self.delete_key(&record.key());
    }

    /// Desires that `key` does not exist.
    pub fn delete_key(&self, key: &str) {
        let mut state = self.shared.lock();
        state.unclaimed.remove(key);
        let was_wanted = state.wanted.remove(key).is_some();
        if was_wanted || state.written.contains_key(key) {
            self.shared.enqueue(&mut state, key.to_owned());
        }
    }

    /// Tells the store that the caller's initial state is complete: stale
    /// adopted keys may now be deleted, and the sync canary is written once
    /// everything is in etcd.
    pub fn synced(&self) {
        let mut state = self.shared.lock();
        if state.synced {
            return;
        }
        state.synced = true;
        let stale: Vec<String> = state.unclaimed.drain().collect();
        for key in stale {
            self.shared.enqueue(&mut state, key);
        }
        drop(state);
        // Workers decide about the canary when they find nothing to do.
        self.shared.work.notify_one();
    }

    /// Waits until everything desired is written (and, after
    /// [`SyncStore::synced`], the canary too). Changes made meanwhile are
    /// waited for as well.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }

    fn is_idle(&self) -> bool {
        let state = self.shared.lock();
        let canary_done = !state.synced
            || !self.shared.config.write_canary
            || state.written.contains_key(&self.shared.canary_key);
        *self.shared.ready.borrow() && state.queue.is_idle() && canary_done
    }

    /// Number of records desired (the canary not counted).
    pub fn len(&self) -> usize {
        let state = self.shared.lock();
        state.wanted.len() - usize::from(state.wanted.contains_key(&self.shared.canary_key))
    }

    /// Whether no record is desired.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The store's counters.
    pub fn stats(&self) -> &SyncStats {
        &self.shared.stats
    }

    /// The sync canary key of this store.
    pub fn canary_key(&self) -> &str {
        &self.shared.canary_key
    }

    /// Ids of the leases currently held.
    pub fn leases(&self) -> Vec<LeaseId> {
        self.shared.lock().leases.leases()
    }

    /// Stops writing and renewing, leaving the keys in etcd until their
    /// leases expire, so that a successor (e.g. the restarted process) can
    /// adopt them without a flap.
    pub fn stop(self) {
        // Drop aborts the tasks.
    }

    /// Stops and revokes every lease: the exported keys and the canary
    /// vanish now (a deliberate disconnect).
    ///
    /// # Errors
    ///
    /// The first failed revocation; the remaining leases are still tried.
    pub async fn revoke(self) -> Result<(), BackendError> {
        for task in &self.tasks {
            task.abort();
        }
        let leases = self.shared.lock().leases.leases();
        let mut result = Ok(());
        for lease in leases {
            if let Err(e) = self.shared.backend.revoke(lease).await {
                result = result.and(Err(e));
            }
        }
        result
    }
}

impl<R> Drop for SyncStore<R> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enqueue(&self, state: &mut State, key: String) {
        if state.queue.add(key) {
            self.work.notify_one();
        } else {
            inc(&self.stats.coalesced);
        }
    }

    /// Takes the next key to reconcile, or schedules the canary when all
    /// is written after `synced`.
    fn next_key(&self) -> Option<String> {
        let mut state = self.lock();
        if let Some(key) = state.queue.next() {
            return Some(key);
        }
        if state.synced && self.config.write_canary && !state.canary_due && state.queue.is_idle() {
            state.canary_due = true;
            let stamp = api::Timestamp::now().to_string();
            state
                .wanted
                .insert(self.canary_key.clone(), stamp.into_bytes().into());
            state.queue.start(self.canary_key.clone());
            return Some(self.canary_key.clone());
        }
        None
    }

    fn finish(&self, key: &str) {
        let mut state = self.lock();
        if state.queue.done(key) {
            drop(state);
            self.work.notify_one();
        } else if state.queue.is_idle() {
            drop(state);
            // Another worker may now schedule the canary.
            self.work.notify_one();
            self.idle.notify_waiters();
        }
    }

    /// A lease with room for one more key, granting one if needed.
    async fn lease_for_new_key(&self) -> Result<LeaseId, BackendError> {
        loop {
            let max = self.config.max_keys_per_lease;
            if let Some(lease) = self.lock().leases.take(max) {
                return Ok(lease);
            }
            let _grant = self.grant.lock().await;
            if self.lock().leases.has_room(max) {
                continue;
            }
            let lease = self.backend.grant(self.config.lease_ttl).await?;
            inc(&self.stats.leases_granted);
            debug!(lease = format_args!("{lease:x}"), "granted lease");
            self.lock().leases.insert(lease, 0);
        }
    }

    fn lease_lost(&self, lease: LeaseId) {
        let lost = self.lock().lose_lease(lease, &self.canary_key);
        inc(&self.stats.leases_lost);
        warn!(
            lease = format_args!("{lease:x}"),
            keys = lost,
            "lease lost, writing its keys again"
        );
        self.work.notify_one();
    }

    /// Makes etcd agree with the desired state of `key`, retrying until it
    /// does (or the store is dropped).
    async fn reconcile(&self, key: &str) {
        let mut backoff = self.config.backoff();
        let mut wrote = false;
        // A lease reserved for this key by an earlier failed attempt.
        let mut reserved: Option<LeaseId> = None;
        loop {
            let (desired, current) = {
                let state = self.lock();
                let current = state
                    .written
                    .get(key)
                    .filter(|w| state.leases.contains(w.lease))
                    .cloned();
                (state.wanted.get(key).cloned(), current)
            };
            let result = match (desired, current) {
                (Some(value), current) => {
                    if current.as_ref().is_some_and(|w| w.value == value) {
                        if !wrote {
                            inc(&self.stats.skipped_unchanged);
                        }
                        return;
                    }
                    self.put(key, value, current, &mut reserved).await
                }
                (None, _) => {
                    let known = self.lock().written.contains_key(key);
                    if !known {
                        return;
                    }
                    self.remove(key).await
                }
            };
            match result {
                Ok(()) => wrote = true,
                Err(BackendError::LeaseNotFound { lease }) => {
                    if reserved == Some(lease) {
                        reserved = None;
                    }
                    self.lease_lost(lease);
                }
                Err(error) => {
                    inc(&self.stats.errors);
                    let delay = backoff.next_delay();
                    warn!(key = %key, error = %crate::backend::error_chain(&error), retry_in = ?delay, "write failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        value: Arc<[u8]>,
        current: Option<Written>,
        reserved: &mut Option<LeaseId>,
    ) -> Result<(), BackendError> {
        let lease = match (&current, *reserved) {
            (Some(w), _) => w.lease,
            (None, Some(lease)) if self.lock().leases.contains(lease) => lease,
            (None, _) => {
                let lease = self.lease_for_new_key().await?;
                *reserved = Some(lease);
                lease
            }
        };
        self.lock().in_flight.insert(key.to_owned(), value.clone());
        let put = self.backend.put(key, &value, Some(lease)).await;
        self.lock().in_flight.remove(key);
        let revision = put?;
        *reserved = None;
        let mut state = self.lock();
        let old = state.written.insert(
            key.to_owned(),
            Written {
                value,
                lease,
                revision,
            },
        );
        if let Some(old) = old.filter(|o| o.lease != lease) {
            state.leases.release(old.lease);
        }
        drop(state);
        if key == self.canary_key {
            inc(&self.stats.canaries);
            info!(key = %key, "sync canary written");
        } else {
            inc(&self.stats.puts);
        }
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<(), BackendError> {
        self.backend.delete(key).await?;
        let mut state = self.lock();
        if let Some(old) = state.written.remove(key) {
            state.leases.release(old.lease);
        }
        drop(state);
        inc(&self.stats.deletes);
        Ok(())
    }
}

async fn worker(shared: Arc<Shared>) {
    let mut ready = shared.ready.subscribe();
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    loop {
        let notified = shared.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match shared.next_key() {
            Some(key) => {
                shared.reconcile(&key).await;
                shared.finish(&key);
            }
            None => notified.await,
        }
    }
}

/// Lists the prefix and takes over what a previous writer left (module docs).
async fn adopt(shared: Arc<Shared>) {
    let mut backoff = shared.config.backoff();
    let listing = loop {
        match shared.backend.list(&shared.prefix).await {
            Ok(listing) => break listing,
            Err(error) => {
                inc(&shared.stats.errors);
                let delay = backoff.next_delay();
                warn!(error = %crate::backend::error_chain(&error), retry_in = ?delay, "listing existing keys failed");
                tokio::time::sleep(delay).await;
            }
        }
    };
    let mut per_lease: HashMap<LeaseId, usize> = HashMap::new();
    for kv in &listing.kvs {
        if kv.lease != 0 {
            *per_lease.entry(kv.lease).or_default() += 1;
        }
    }
    // A lease still alive is adopted; keys on any other lease (or none) are
    // remembered with a lease we do not hold, so they are written again.
    let mut alive = HashMap::new();
    for (lease, keys) in per_lease {
        match shared.backend.keep_alive(lease).await {
            Ok(_) => {
                alive.insert(lease, keys);
            }
            Err(error) => {
                debug!(lease = format_args!("{lease:x}"), error = %crate::backend::error_chain(&error), "not adopting lease")
            }
        }
    }
    {
        let mut state = shared.lock();
        for kv in listing.kvs {
            inc(&shared.stats.adopted);
            if !state.wanted.contains_key(&kv.key) {
                state.unclaimed.insert(kv.key.clone());
            }
            state.written.insert(
                kv.key,
                Written {
                    value: kv.value.into(),
                    lease: kv.lease,
                    revision: kv.mod_revision,
                },
            );
        }
        state.listed_at = listing.revision;
        info!(
            keys = state.written.len(),
            leases = alive.len(),
            "adopted existing keys"
        );
        for (lease, keys) in alive {
            state.leases.insert(lease, keys);
        }
        if state.synced {
            let stale: Vec<String> = state.unclaimed.drain().collect();
            for key in stale {
                state.queue.add(key);
            }
        }
    }
    shared.ready.send_replace(true);
    shared.work.notify_waiters();
    shared.idle.notify_waiters();
}

/// Renews every lease periodically; a lease found gone is written again.
async fn keep_alive(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.keepalive_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let leases = shared.lock().leases.leases();
        for lease in leases {
            match shared.backend.keep_alive(lease).await {
                Ok(_) => {}
                Err(BackendError::LeaseNotFound { .. }) => shared.lease_lost(lease),
                Err(error) => {
                    inc(&shared.stats.errors);
                    warn!(lease = format_args!("{lease:x}"), error = %crate::backend::error_chain(&error), "lease keep-alive failed");
                }
            }
        }
    }
}
