//! Garbage collection of identities nobody uses, and the session lease
//! that binds this apiserver's user keys.

use std::collections::HashSet;

use kvstore::{BackendError, Compare, Txn, TxnOp};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{backend_err, id_key, Allocator, IdentityError, State, Unused};

impl Allocator {
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
        self.restore_tampered(&ids, &index).await?;
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

    /// Writes back every id key whose labels are not the ones the index maps
    /// to its number (module docs, *Tampering*).
    async fn restore_tampered(
        &self,
        ids: &std::collections::BTreeMap<u32, super::repair::ListedId>,
        index: &std::collections::BTreeMap<String, super::repair::ListedIndex>,
    ) -> Result<(), IdentityError> {
        for (labels, entry) in index {
            let Some(id) = entry.id else { continue };
            let Some(listed) = ids.get(&id) else { continue };
            if listed.labels == *labels {
                continue;
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(id_key(id), listed.revision),
                    Compare::mod_revision(self.layout.index_key(labels), entry.revision),
                ])
                .and_then([TxnOp::put(id_key(id), labels.as_bytes().to_vec(), None)]);
            let outcome = self
                .backend
                .txn(&txn)
                .await
                .map_err(backend_err("restore a tampered identity"))?;
            if outcome.succeeded {
                warn!(id, labels = %labels, found = %listed.labels, "another writer changed an identity's labels; wrote them back");
                self.restored
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
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
    pub(super) async fn renew_lease(&self, state: &mut State) -> Result<(), IdentityError> {
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
}
