//! The queue of changed records between a connection's store forwarders
//! and the reconciler.

use std::{net::IpAddr, sync::Mutex};

/// What changed in one connection's stores, for the reconciler's
/// incremental passes ([`crate::reconcile::task`]).
///
/// A change only *names* a record (an endpoint by IP, a node by name); the
/// reconciler reads the record's current value from the store, which is
/// updated before the event is sent. So a burst of changes to one record is
/// applied as one, a change applied twice is harmless, and a full pass that
/// reads the stores may simply drop what was queued before it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// The endpoint (ipcache record) with this IP.
    Endpoint(IpAddr),
    /// The node with this name.
    Node(String),
}

/// Changes of one connection, queued by the store forwarders and taken by
/// the reconciler. Bounded: past [`Changes::MAX_PENDING`] the queue is
/// dropped and a full pass requested instead, which reads the stores.
#[derive(Debug, Default)]
pub struct Changes(Mutex<Pending>);

/// What [`Changes::take`] hands over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Changed records, in arrival order (possibly repeated).
    pub changes: Vec<Change>,
    /// Apply by a full pass instead: a store synced (which changes which
    /// connections count) or the queue overflowed.
    pub full: bool,
}

impl Changes {
    /// Queue length past which a full pass is requested instead.
    pub const MAX_PENDING: usize = 65_536;

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a change of one record.
    pub fn push(&self, change: Change) {
        let mut pending = self.lock();
        if pending.full {
            // The full pass to come reads the stores after this change.
            return;
        }
        if pending.changes.len() >= Self::MAX_PENDING {
            pending.changes = Vec::new();
            pending.full = true;
            return;
        }
        pending.changes.push(change);
    }

    /// Asks for a full pass (a store synced).
    pub fn push_full(&self) {
        let mut pending = self.lock();
        pending.changes = Vec::new();
        pending.full = true;
    }

    /// Takes everything queued.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.lock())
    }

    /// Whether `f` holds for a queued change (without taking it).
    pub fn any(&self, f: impl Fn(&Change) -> bool) -> bool {
        let pending = self.lock();
        pending.full || pending.changes.iter().any(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_asks_for_a_full_pass_instead() {
        let changes = Changes::default();
        for i in 0..Changes::MAX_PENDING {
            changes.push(Change::Node(i.to_string()));
        }
        changes.push(Change::Node("one too many".into()));
        let pending = changes.take();
        assert!(pending.full);
        assert!(pending.changes.is_empty());
        assert_eq!(changes.take(), Pending::default());
    }
}
