//! Acquiring, adopting and releasing identities: one transaction each.

use kvstore::{BackendError, Compare, LeaseId, Txn, TxnOp};
use tracing::warn;

use super::{backend_err, id_key, parse_id, Allocator, IdentityError, Slot, State, MAX_CONTENDED};

impl Allocator {
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

    pub(super) fn user_op(&self, id: u32, lease: LeaseId) -> TxnOp {
        TxnOp::put(
            self.layout.user_key(id, &self.config.instance),
            Vec::new(),
            Some(lease),
        )
    }

    /// Runs `txn`, whose puts use the session lease; when the lease turns out
    /// to be lost, renews it and runs the transaction again with the new one.
    pub(super) async fn txn_renewing(
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
    pub(super) async fn claim(
        &self,
        state: &mut State,
        labels: &str,
    ) -> Result<u32, IdentityError> {
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
    pub(super) fn next_free(&self, state: &mut State) -> Option<u32> {
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
}
