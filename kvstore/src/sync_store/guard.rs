//! The tamper guard: the store watches its own prefix and undoes what
//! another writer does there.
//!
//! An event is the store's own when its value is the one wanted or being
//! written, or when it is not newer than the store's last write of the key.
//! Anything else is someone else's:
//!
//! * a key the store wants, changed to another value or deleted while its
//!   lease lives: it is written again (`tampered_restored`). A deletion
//!   whose lease is gone is a lost lease, which the store recovers from
//!   anyway, and is not counted;
//! * a key the store never wrote: deleted (`foreign_removed`); before
//!   [`super::SyncStore::synced`] it is only remembered, as adopted keys
//!   are, since the caller may still claim it.
//!
//! When the watch breaks (etcd restarted, history compacted) the guard
//! lists the prefix again and compares every key, so nothing done while it
//! was blind stays.

use std::sync::Arc;

use futures::StreamExt as _;
use tracing::{debug, warn};

use super::{inc, Shared, Written};
use crate::backend::{BackendError, KeyValue, Revision, WatchEvent};

/// Watches the prefix until the store is dropped.
pub(super) async fn run(shared: Arc<Shared>) {
    let mut ready = shared.ready.subscribe();
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let mut from = shared.lock().listed_at + 1;
    let mut backoff = shared.config.backoff();
    loop {
        match shared.backend.watch(&shared.prefix, from).await {
            Ok(mut stream) => {
                while let Some(batch) = stream.next().await {
                    let Ok(events) = batch else { break };
                    for event in events {
                        from = from.max(revision(&event) + 1);
                        shared.check(event).await;
                    }
                    backoff.reset();
                }
            }
            Err(error) => {
                debug!(error = %crate::backend::error_chain(&error), "tamper guard: watch failed");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
        match shared.backend.list(&shared.prefix).await {
            Ok(listing) => {
                shared.check_listing(&listing.kvs).await;
                from = listing.revision + 1;
            }
            Err(error) => {
                debug!(error = %crate::backend::error_chain(&error), "tamper guard: listing failed");
            }
        }
    }
}

fn revision(event: &WatchEvent) -> Revision {
    match event {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
    }
}

impl Shared {
    async fn check(&self, event: WatchEvent) {
        match event {
            WatchEvent::Put(kv) => self.check_put(&kv),
            WatchEvent::Delete { key, mod_revision } => {
                self.check_delete(&key, mod_revision).await;
            }
        }
    }

    /// Compares a listing with what the store wants: every key of it is
    /// checked as a put, and a wanted key it lacks as a deletion.
    async fn check_listing(&self, kvs: &[KeyValue]) {
        for kv in kvs {
            self.check_put(kv);
        }
        let missing: Vec<(String, Revision)> = {
            let state = self.lock();
            state
                .written
                .iter()
                .filter(|(k, _)| state.wanted.contains_key(*k) && *k != &self.canary_key)
                .filter(|(k, _)| kvs.binary_search_by(|kv| kv.key.as_str().cmp(k)).is_err())
                .map(|(k, w)| (k.clone(), w.revision + 1))
                .collect()
        };
        for (key, revision) in missing {
            self.check_delete(&key, revision).await;
        }
    }

    fn check_put(&self, kv: &KeyValue) {
        let mut state = self.lock();
        let ours = |state: &super::State| {
            state.wanted.get(&kv.key).is_some_and(|v| **v == *kv.value)
                || state
                    .in_flight
                    .get(&kv.key)
                    .is_some_and(|v| **v == *kv.value)
                || state
                    .written
                    .get(&kv.key)
                    .is_some_and(|w| kv.mod_revision <= w.revision || *w.value == *kv.value)
        };
        if ours(&state) {
            return;
        }
        if state.wanted.contains_key(&kv.key) {
            warn!(key = %kv.key, "tamper guard: another writer changed an exported key; writing it back");
            inc(&self.stats.tampered_restored);
            // Record what etcd holds now, so the worker puts the wanted
            // value again (on the key's own lease when it is still ours).
            if let Some(w) = state.written.get_mut(&kv.key) {
                w.value = kv.value.clone().into();
                w.revision = kv.mod_revision;
            }
        } else {
            if !state.synced {
                // The caller may still claim it, as an adopted key.
                state.unclaimed.insert(kv.key.clone());
                state.written.insert(kv.key.clone(), foreign(kv));
                return;
            }
            warn!(key = %kv.key, "tamper guard: another writer put a key under the exported prefix; deleting it");
            inc(&self.stats.foreign_removed);
            state.written.insert(kv.key.clone(), foreign(kv));
        }
        self.enqueue(&mut state, kv.key.clone());
    }

    async fn check_delete(&self, key: &str, mod_revision: Revision) {
        let lease = {
            let state = self.lock();
            match (state.wanted.contains_key(key), state.written.get(key)) {
                (true, Some(w)) if w.revision < mod_revision => w.lease,
                _ => return,
            }
        };
        // A deletion by lease expiry is the lease's, not a writer's: the
        // keep-alive task recovers from it.
        match self.backend.keep_alive(lease).await {
            Err(BackendError::LeaseNotFound { .. }) => return,
            Err(error) => {
                debug!(key, error = %crate::backend::error_chain(&error), "tamper guard: lease check failed");
            }
            Ok(_) => {}
        }
        let mut state = self.lock();
        if state
            .written
            .get(key)
            .is_none_or(|w| w.revision >= mod_revision)
        {
            return;
        }
        warn!(
            key,
            "tamper guard: another writer deleted an exported key; writing it back"
        );
        inc(&self.stats.tampered_restored);
        if let Some(old) = state.written.remove(key) {
            state.leases.release(old.lease);
        }
        self.enqueue(&mut state, key.to_owned());
    }
}

/// A key someone else wrote, as the store remembers it to delete it.
fn foreign(kv: &KeyValue) -> Written {
    Written {
        value: kv.value.clone().into(),
        lease: kv.lease,
        revision: kv.mod_revision,
    }
}
