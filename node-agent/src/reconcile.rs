//! The reconciler's core: desired state versus what the datapath (or the
//! tunnel) holds, as a list of operations. Pure, so every rule is unit-tested
//! without a kernel:
//!
//! * only differences are written (an unchanged entry is never rewritten, so
//!   a packet never sees it missing);
//! * deletions happen only when `sweep` is allowed: after an agent restart
//!   the adopted maps hold the previous run's entries, and they must stay
//!   until every cluster has synced (or the sync timeout passed), or live
//!   traffic would lose its entries while the lists are still arriving;
//! * for WireGuard peers a changed peer is removed and added again, because
//!   boringtun cannot modify a peer in place ([`peer_ops`]).

use std::collections::BTreeMap;

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<K, V> {
    /// Insert or replace.
    Upsert(K, V),
    /// Remove.
    Delete(K),
}

/// The operations that turn `actual` into `desired`. Deletions are left out
/// unless `sweep` is true. Deletions come first, so that a replaced prefix
/// never has two owners in a map with limited room.
pub fn diff<K, V>(desired: &BTreeMap<K, V>, actual: &BTreeMap<K, V>, sweep: bool) -> Vec<Op<K, V>>
where
    K: Ord + Clone,
    V: PartialEq + Clone,
{
    let mut ops = Vec::new();
    if sweep {
        ops.extend(
            actual
                .keys()
                .filter(|k| !desired.contains_key(k))
                .map(|k| Op::Delete(k.clone())),
        );
    }
    ops.extend(
        desired
            .iter()
            .filter(|(k, v)| actual.get(k) != Some(v))
            .map(|(k, v)| Op::Upsert(k.clone(), v.clone())),
    );
    ops
}

/// Like [`diff`], but a changed value becomes a delete followed by an
/// upsert (for WireGuard peers under boringtun). Peers are always swept:
/// a stale peer only costs a handshake, never a map entry of live traffic.
pub fn peer_ops<K, V>(desired: &BTreeMap<K, V>, actual: &BTreeMap<K, V>) -> Vec<Op<K, V>>
where
    K: Ord + Clone,
    V: PartialEq + Clone,
{
    let mut ops = Vec::new();
    for (k, v) in actual {
        match desired.get(k) {
            None => ops.push(Op::Delete(k.clone())),
            Some(d) if d != v => ops.push(Op::Delete(k.clone())),
            Some(_) => {}
        }
    }
    for (k, v) in desired {
        if actual.get(k) != Some(v) {
            ops.push(Op::Upsert(k.clone(), v.clone()));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, u32)]) -> BTreeMap<&'static str, u32> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn unchanged_entries_are_not_written() {
        let d = map(&[("a", 1), ("b", 2)]);
        assert!(diff(&d, &d.clone(), true).is_empty());
    }

    #[test]
    fn new_and_changed_are_upserted_vanished_deleted_first() {
        let desired = map(&[("a", 1), ("b", 3), ("c", 4)]);
        let actual = map(&[("a", 1), ("b", 2), ("z", 9)]);
        assert_eq!(
            diff(&desired, &actual, true),
            vec![Op::Delete("z"), Op::Upsert("b", 3), Op::Upsert("c", 4)]
        );
    }

    #[test]
    fn nothing_is_deleted_before_the_sweep_is_allowed() {
        // Restart: the adopted map holds the previous run's entries, the
        // clusters have synced only partly.
        let desired = map(&[("a", 1)]);
        let actual = map(&[("a", 1), ("b", 2), ("c", 3)]);
        assert!(diff(&desired, &actual, false).is_empty());
        assert_eq!(
            diff(&desired, &actual, true),
            vec![Op::Delete("b"), Op::Delete("c")]
        );
    }

    #[test]
    fn a_changed_peer_is_removed_then_added() {
        let desired = map(&[("k1", 2), ("k2", 5)]);
        let actual = map(&[("k1", 1), ("k3", 7)]);
        assert_eq!(
            peer_ops(&desired, &actual),
            vec![
                Op::Delete("k1"),
                Op::Delete("k3"),
                Op::Upsert("k1", 2),
                Op::Upsert("k2", 5)
            ]
        );
        assert!(peer_ops(&desired, &desired.clone()).is_empty());
    }
}
