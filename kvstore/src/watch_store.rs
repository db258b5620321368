//! The read side: mirror one remote cluster's records of one kind.
//!
//! A [`WatchStore`] lists its prefix, then watches it from the listing's
//! revision + 1, so it sees every change exactly once and none twice. It
//! keeps the decoded records (behind `Arc`, so readers hold no lock while
//! using them) and reports each change as an [`Event`]: `Upsert`, `Delete`,
//! and one `Synced` once the first listing is applied (and, when asked for,
//! the writer's sync canary exists: the remote export is complete).
//!
//! Every record is decoded and validated with [`Resource::decode`] against
//! the connection's [`RemoteScope`]. A record that fails is logged (field
//! `reason`) and counted by reason in [`WatchStats`], never applied and
//! never a panic. A key whose value turns invalid is treated as deleted: the
//! store only ever holds what the remote cluster currently, validly says.
//!
//! When the watch breaks (connection lost, etcd restarted, the start
//! revision compacted away) the store lists again and reconciles by **mark
//! and sweep**: everything held is marked stale, the listing un-marks what
//! still exists (emitting `Upsert` only for changed values), and only what
//! remains marked is reported deleted. A record that existed before and
//! after an outage is therefore never reported deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use api::{RemoteScope, Resource};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn, Instrument};

use crate::backend::{BackendError, KeyValue, ListWatch, WatchEvent};
use crate::retry::Backoff;

/// A change reported by a [`WatchStore`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event<R> {
    /// A record appeared or changed.
    Upsert(Arc<R>),
    /// A record disappeared (or became invalid); the last valid value.
    Delete(Arc<R>),
    /// The initial listing is applied (and the canary seen, if tracked).
    /// Sent once per store.
    Synced,
}

/// Tuning of a [`WatchStore`].
#[derive(Debug, Clone)]
pub struct WatchStoreConfig {
    /// Only report `Synced` once the writer's sync canary
    /// `cilium/synced/<cluster>/<base prefix>` exists (default false).
    pub wait_for_canary: bool,
    /// Capacity of the event channel (default 1024). A slow consumer slows
    /// the store down; it never loses events.
    pub event_buffer: usize,
    /// First delay before listing again after an error (default 100 ms).
    pub retry_min: Duration,
    /// Longest such delay (default 5 s); jittered.
    pub retry_max: Duration,
    /// Read the KVStoreMesh cache layout: the records under
    /// `cilium/cache/<kind>/v1/<cluster>/` and the canary
    /// `cilium/synced/<cluster>/cilium/cache/<kind>/v1`, where a cluster
    /// config with `"cached":true` says they are (default false: the
    /// cluster's own `R::prefix(cluster)` and canary).
    pub cached: bool,
}

impl Default for WatchStoreConfig {
    fn default() -> Self {
        Self {
            wait_for_canary: false,
            event_buffer: 1024,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            cached: false,
        }
    }
}

/// Counters of a [`WatchStore`], for metrics.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// `Upsert` events emitted.
    pub upserts: AtomicU64,
    /// `Delete` events emitted.
    pub deletes: AtomicU64,
    /// Puts whose decoded value equals the one held (nothing emitted).
    pub unchanged: AtomicU64,
    /// Listings done.
    pub lists: AtomicU64,
    /// Times the watch broke and the store listed again.
    pub restarts: AtomicU64,
    /// Of those, times because the revision was compacted.
    pub compactions: AtomicU64,
    /// Records rejected, in total.
    pub rejected: AtomicU64,
    rejected_by_reason: Mutex<BTreeMap<&'static str, u64>>,
}

impl WatchStats {
    /// Rejected records per [`api::ValidationError::reason`] (plus
    /// `key_not_utf8`).
    pub fn rejected_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.rejected_by_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn reject(&self, reason: &'static str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        *self
            .rejected_by_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct Shared<R> {
    entries: RwLock<HashMap<String, Arc<R>>>,
    synced: watch::Sender<bool>,
    stats: WatchStats,
    task: Mutex<Option<AbortHandle>>,
}

impl<R> Drop for Shared<R> {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// A reader of one kind of record of one remote cluster; see the module
/// docs. Clones share one mirror; the background task ends when the last
/// clone is dropped.
#[derive(Debug)]
pub struct WatchStore<R> {
    shared: Arc<Shared<R>>,
}

impl<R> Clone for WatchStore<R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// The receiving end of a [`WatchStore`]'s events.
pub type Events<R> = mpsc::Receiver<Event<R>>;

impl<R: Resource> WatchStore<R> {
    /// Starts mirroring `R` records of `scope.cluster` from `backend`.
    /// Must be called within a tokio runtime. Dropping the returned
    /// receiver is fine: the mirror stays up to date without events.
    pub fn spawn(
        backend: Arc<dyn ListWatch>,
        scope: RemoteScope,
        config: WatchStoreConfig,
    ) -> (Self, Events<R>) {
        let (tx, rx) = mpsc::channel(config.event_buffer.max(1));
        let shared = Arc::new(Shared {
            entries: RwLock::new(HashMap::new()),
            synced: watch::Sender::new(false),
            stats: WatchStats::default(),
            task: Mutex::new(None),
        });
        let (prefix, base) = if config.cached {
            let base = api::keys::cache_base_prefix(R::BASE_PREFIX)
                .unwrap_or_else(|| R::BASE_PREFIX.to_owned());
            (api::keys::cache_prefix::<R>(&scope.cluster), base)
        } else {
            (R::prefix(&scope.cluster), R::BASE_PREFIX.to_owned())
        };
        let canary = config
            .wait_for_canary
            .then(|| api::keys::sync_canary_key(&scope.cluster, &base));
        let span = tracing::info_span!(
            "watch_store",
            kind = R::KIND,
            cluster = %scope.cluster,
            prefix = %prefix
        );
        let runner = Runner {
            shared: Arc::downgrade(&shared),
            backend,
            scope,
            prefix,
            canary,
            config,
            events: Some(tx),
            synced_sent: false,
        };
        let task = tokio::spawn(runner.run().instrument(span));
        *shared
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task.abort_handle());
        (Self { shared }, rx)
    }

    /// The record under `key`, if held.
    pub fn get(&self, key: &str) -> Option<Arc<R>> {
        self.read().get(key).cloned()
    }

    /// Every record held.
    pub fn list(&self) -> Vec<Arc<R>> {
        self.read().values().cloned().collect()
    }

    /// Every key held.
    pub fn keys(&self) -> HashSet<String> {
        self.read().keys().cloned().collect()
    }

    /// Number of records held.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `Synced` was reached.
    pub fn is_synced(&self) -> bool {
        *self.shared.synced.borrow()
    }

    /// Waits until the store reached `Synced`.
    pub async fn wait_until_synced(&self) {
        let mut rx = self.shared.synced.subscribe();
        // The sender lives in `shared`, which `self` keeps alive.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The store's counters.
    pub fn stats(&self) -> &WatchStats {
        &self.shared.stats
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<R>>> {
        self.shared
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why one list-and-watch session ended.
enum End {
    /// The store was dropped.
    Dropped,
    /// The backend failed; list again.
    Broken(BackendError),
}

struct Runner<R> {
    shared: Weak<Shared<R>>,
    backend: Arc<dyn ListWatch>,
    scope: RemoteScope,
    prefix: String,
    canary: Option<String>,
    config: WatchStoreConfig,
    events: Option<mpsc::Sender<Event<R>>>,
    synced_sent: bool,
}

impl<R: Resource> Runner<R> {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        loop {
            let mut progressed = false;
            match self.session(&mut progressed).await {
                End::Dropped => return,
                End::Broken(error) => {
                    let Some(shared) = self.shared.upgrade() else {
                        return;
                    };
                    inc(&shared.stats.restarts);
                    if matches!(error, BackendError::Compacted { .. }) {
                        inc(&shared.stats.compactions);
                    }
                    drop(shared);
                    if progressed {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    warn!(error = %crate::backend::error_chain(&error), retry_in = ?delay, "list-and-watch broken, listing again");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One list, then watch until the watch breaks.
    async fn session(&mut self, progressed: &mut bool) -> End {
        let mut canary_seen = self.canary.is_none();
        let mut canary_from = 0;
        if let Some(canary) = &self.canary {
            match self.backend.list(canary).await {
                Ok(listing) => {
                    canary_seen = listing.kvs.iter().any(|kv| kv.key == *canary);
                    canary_from = listing.revision + 1;
                }
                Err(e) => return End::Broken(e),
            }
        }
        let listing = match self.backend.list(&self.prefix).await {
            Ok(listing) => listing,
            Err(e) => return End::Broken(e),
        };
        let revision = listing.revision;
        if self.apply_listing(listing.kvs).await.is_none() {
            return End::Dropped;
        }
        if canary_seen && self.mark_synced().await.is_none() {
            return End::Dropped;
        }
        let watch = match self.backend.watch(&self.prefix, revision + 1).await {
            Ok(w) => w,
            Err(e) => return End::Broken(e),
        };
        let mut stream = match (&self.canary, self.synced_sent) {
            (Some(canary), false) => match self.backend.watch(canary, canary_from).await {
                Ok(cw) => futures::stream::select(watch, cw).boxed(),
                Err(e) => return End::Broken(e),
            },
            _ => watch,
        };
        debug!(revision, "listed, watching");
        loop {
            let batch = match stream.next().await {
                Some(Ok(batch)) => batch,
                Some(Err(e)) => return End::Broken(e),
                None => {
                    return End::Broken(BackendError::WatchCanceled {
                        prefix: self.prefix.clone(),
                        reason: "watch stream ended".to_owned(),
                    })
                }
            };
            *progressed = true;
            for event in batch {
                if self.canary.as_deref() == Some(event.key()) {
                    if matches!(event, WatchEvent::Put(_)) && !self.synced_sent {
                        info!("sync canary appeared");
                        if self.mark_synced().await.is_none() {
                            return End::Dropped;
                        }
                    }
                    continue;
                }
                let applied = match event {
                    WatchEvent::Put(kv) => self.apply_put(kv).await,
                    WatchEvent::Delete { key, .. } => self.apply_delete(&key).await,
                };
                if applied.is_none() {
                    return End::Dropped;
                }
            }
        }
    }

    fn shared(&self) -> Option<Arc<Shared<R>>> {
        self.shared.upgrade()
    }

    async fn emit(&mut self, event: Event<R>) {
        if let Some(tx) = &self.events {
            if tx.send(event).await.is_err() {
                debug!("event receiver dropped; keeping the mirror only");
                self.events = None;
            }
        }
    }

    async fn mark_synced(&mut self) -> Option<()> {
        if !self.synced_sent {
            self.synced_sent = true;
            self.emit(Event::Synced).await;
            self.shared()?.synced.send_replace(true);
            info!(
                records = self.shared()?.entries.read().map_or(0, |e| e.len()),
                "synced"
            );
        }
        Some(())
    }

    /// Decodes and validates; `None` (logged and counted) when rejected.
    fn decode(&self, shared: &Shared<R>, kv: &KeyValue) -> Option<R> {
        if kv.key.contains(char::REPLACEMENT_CHARACTER) {
            shared.stats.reject("key_not_utf8");
            warn!(key = %kv.key, reason = "key_not_utf8", "rejected record");
            return None;
        }
        match R::decode(&kv.key, &kv.value, &self.scope) {
            Ok(record) => Some(record),
            Err(error) => {
                let reason = error.reason();
                shared.stats.reject(reason);
                warn!(key = %clip(&kv.key), reason, error = %crate::backend::error_chain(&error), "rejected record");
                None
            }
        }
    }

    /// Applies a put; returns `None` when the store was dropped.
    async fn apply_put(&mut self, kv: KeyValue) -> Option<()> {
        let shared = self.shared()?;
        let Some(record) = self.decode(&shared, &kv) else {
            drop(shared);
            // What the key now holds is invalid: the old value is gone.
            return self.apply_delete(&kv.key).await;
        };
        let record = Arc::new(record);
        let changed = {
            let mut entries = shared
                .entries
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match entries.get(&kv.key) {
                Some(held) if **held == *record => false,
                _ => {
                    entries.insert(kv.key, record.clone());
                    true
                }
            }
        };
        if changed {
            inc(&shared.stats.upserts);
            drop(shared);
            self.emit(Event::Upsert(record)).await;
        } else {
            inc(&shared.stats.unchanged);
        }
        Some(())
    }

    /// Applies a delete; returns `None` when the store was dropped.
    async fn apply_delete(&mut self, key: &str) -> Option<()> {
        let shared = self.shared()?;
        let removed = shared
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        if let Some(record) = removed {
            inc(&shared.stats.deletes);
            drop(shared);
            self.emit(Event::Delete(record)).await;
        }
        Some(())
    }

    /// Mark and sweep (module docs).
    async fn apply_listing(&mut self, kvs: Vec<KeyValue>) -> Option<()> {
        let shared = self.shared()?;
        inc(&shared.stats.lists);
        let mut stale: HashSet<String> = shared
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        drop(shared);
        for kv in kvs {
            stale.remove(&kv.key);
            self.apply_put(kv).await?;
        }
        if !stale.is_empty() {
            debug!(
                stale = stale.len(),
                "sweeping records the new listing lacks"
            );
        }
        for key in stale {
            self.apply_delete(&key).await?;
        }
        Some(())
    }
}

/// Shortens untrusted keys for logs.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
