//! A work queue that holds each key at most once, as client-go's workqueue
//! (which Cilium's syncstore sits on): a key added while it is queued is
//! coalesced into the queued entry; a key added while it is being worked on
//! is marked dirty and queued again when the worker is [`done`] with it, so
//! one key is never worked on twice at once and a change during a write is
//! never lost.
//!
//! Plain data: the caller holds it under its own lock and does its own
//! waking.
//!
//! [`done`]: WorkQueue::done

use std::borrow::Borrow;
use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct WorkQueue<K> {
    queue: VecDeque<K>,
    queued: HashSet<K>,
    in_flight: HashSet<K>,
    /// Added while in flight: queued again by `done`.
    dirty: HashSet<K>,
}

impl<K> Default for WorkQueue<K> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: HashSet::new(),
            dirty: HashSet::new(),
        }
    }
}

impl<K: Clone + Eq + Hash> WorkQueue<K> {
    /// Adds `key`; `false` when it was coalesced (already queued, or
    /// already marked dirty while in flight).
    pub(crate) fn add(&mut self, key: K) -> bool {
        if self.in_flight.contains(&key) {
            return self.dirty.insert(key);
        }
        if self.queued.insert(key.clone()) {
            self.queue.push_back(key);
            true
        } else {
            false
        }
    }

    /// The next key to work on, now in flight.
    pub(crate) fn next(&mut self) -> Option<K> {
        let key = self.queue.pop_front()?;
        self.queued.remove(&key);
        self.in_flight.insert(key.clone());
        Some(key)
    }

    /// Marks `key` in flight without queueing it (work the caller decided
    /// on itself).
    pub(crate) fn start(&mut self, key: K) {
        self.in_flight.insert(key);
    }

    /// The worker is done with `key`; `true` when it was queued again
    /// because it changed meanwhile.
    pub(crate) fn done<Q>(&mut self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.in_flight.remove(key);
        if self.dirty.remove(key) {
            self.queued.insert(key.to_owned());
            self.queue.push_back(key.to_owned());
            true
        } else {
            false
        }
    }

    /// Nothing queued, in flight or dirty.
    pub(crate) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty() && self.dirty.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_held_once_and_a_change_in_flight_is_not_lost() {
        let k = |s: &str| s.to_owned();
        let mut q = WorkQueue::default();
        assert!(q.add(k("a")));
        assert!(!q.add(k("a")), "coalesced while queued");
        assert!(q.add(k("b")));
        assert_eq!(q.next(), Some(k("a")));
        assert!(q.add(k("a")), "changed while in flight: dirty");
        assert!(!q.add(k("a")), "dirty once");
        assert_eq!(q.next(), Some(k("b")), "a is not handed out twice at once");
        assert_eq!(q.next(), None);
        assert!(q.done("a"), "queued again");
        assert!(!q.done("b"));
        assert!(!q.is_idle());
        assert_eq!(q.next(), Some(k("a")));
        assert!(!q.done("a"));
        assert!(q.is_idle());
        q.start(k("canary"));
        assert!(!q.is_idle());
        q.done("canary");
        assert!(q.is_idle());
    }
}
