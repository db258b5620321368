//! The leases one writer binds its keys to, with the number of keys on
//! each: a key goes onto a live lease with room (at most `max_keys` per
//! lease, so that a lost lease does not take everything with it), and a new
//! lease is granted only when none has room.
//!
//! Plain data, like [`crate::work_queue`]: granting is the caller's (it
//! talks to the backend and serializes grants).

use std::collections::HashMap;

use crate::backend::LeaseId;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct LeasePool {
    keys: HashMap<LeaseId, usize>,
}

impl LeasePool {
    /// Binds one more key to a live lease with room, if there is one.
    pub(crate) fn take(&mut self, max_keys: usize) -> Option<LeaseId> {
        let max = max_keys.max(1);
        let (&lease, count) = self.keys.iter_mut().find(|(_, n)| **n < max)?;
        *count += 1;
        Some(lease)
    }

    /// Whether a live lease has room for a key.
    pub(crate) fn has_room(&self, max_keys: usize) -> bool {
        let max = max_keys.max(1);
        self.keys.values().any(|n| *n < max)
    }

    /// Adds a live lease holding `keys` keys (a new grant: 0; an adopted
    /// lease: the keys found on it).
    pub(crate) fn insert(&mut self, lease: LeaseId, keys: usize) {
        self.keys.insert(lease, keys);
    }

    /// One key left `lease`.
    pub(crate) fn release(&mut self, lease: LeaseId) {
        if let Some(n) = self.keys.get_mut(&lease) {
            *n = n.saturating_sub(1);
        }
    }

    /// Whether `lease` is live.
    pub(crate) fn contains(&self, lease: LeaseId) -> bool {
        self.keys.contains_key(&lease)
    }

    /// Forgets `lease` (expired or revoked); `false` when it was not live.
    pub(crate) fn remove(&mut self, lease: LeaseId) -> bool {
        self.keys.remove(&lease).is_some()
    }

    /// The live leases.
    pub(crate) fn leases(&self) -> Vec<LeaseId> {
        self.keys.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fill_a_lease_before_another_is_needed() {
        let mut pool = LeasePool::default();
        assert_eq!(pool.take(2), None, "no lease yet: the caller grants one");
        pool.insert(7, 0);
        assert_eq!(pool.take(2), Some(7));
        assert_eq!(pool.take(2), Some(7));
        assert!(!pool.has_room(2));
        assert_eq!(pool.take(2), None, "full");
        pool.release(7);
        assert!(pool.has_room(2));
        pool.insert(8, 2);
        assert!(pool.remove(7) && !pool.remove(7));
        assert!(!pool.contains(7) && pool.contains(8));
        assert_eq!(pool.leases(), [8]);
        assert_eq!(
            pool.take(0),
            None,
            "a lease holds at least one key, 8 holds two"
        );
    }
}
