//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), pure
//! Rust, no kernel involved.
//!
//! A table of `M` slots (`M` prime) is filled so that every backend owns about
//! `M / N` slots, and a change of the backend set moves few slots: each
//! backend has a *permutation* of the slots, given by an `offset` and a `skip`
//! derived from two independent hashes of the backend's [`BackendKey`]
//! (`offset = h1 % M`, `skip = h2 % (M - 1) + 1`; with `M` prime every skip
//! generates all slots). Backends take turns claiming the next still-free
//! slot of their permutation until the table is full.
//!
//! # Determinism is a contract
//!
//! Every node builds the tables of a service independently, and a flow that
//! moves between nodes (or an agent that restarts) must find the same backend
//! in the same slot. So the table depends only on the *set* of backends and
//! their weights, never on input order (backends are sorted by key first),
//! and the hashes are a fixed algorithm with fixed seeds ([`backend_hash`]),
//! never `RandomState` or std's `DefaultHasher` (whose algorithm may change
//! between Rust releases). Changing [`backend_hash`] or the key encoding is a
//! format change: nodes running different versions would disagree.
//!
//! # Weights
//!
//! A backend of weight `w` takes a turn in round `r` when
//! `floor((r + 1) * w / w_max) > floor(r * w / w_max)`: the heaviest backends
//! take a turn every round, a backend of half that weight every other round,
//! so slot shares follow the weights. With equal weights this is exactly the
//! paper's algorithm.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

/// The default table size: a prime, as in Cilium (`bpf-lb-maglev-table-size`).
/// `M` should be well above 100 × the largest backend count for the shares to
/// stay within a few percent of even.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

/// The largest accepted table size (a table is `M` `u32`s per service in the
/// kernel, and building costs `O(M log M)`).
pub const MAX_TABLE_SIZE: u32 = 1 << 20;

/// Errors of building a table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The table size is not prime (the permutations would not cover the table).
    #[error("maglev table size {0} is not a prime number")]
    NotPrime(u32),
    /// The table size is outside `2..=MAX_TABLE_SIZE`.
    #[error("maglev table size {size} is outside 2..={MAX_TABLE_SIZE}")]
    SizeOutOfRange { size: u32 },
    /// More backends than slots.
    #[error("{backends} backends do not fit a maglev table of {size} slots")]
    TooManyBackends { backends: usize, size: u32 },
    /// The same backend key twice in one set.
    #[error("backend {0} appears twice in one backend set")]
    DuplicateBackend(BackendKey),
    /// A weight of zero (leave the backend out instead).
    #[error("backend {0} has weight 0 (leave it out of the table instead)")]
    ZeroWeight(BackendKey),
}

/// Transport protocol of a frontend or backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl Protocol {
    /// The IP protocol number, as in packets and map keys.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    /// The protocol for an IP protocol number, if it is one of ours.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// What identifies a backend across the mesh: the same on every node, so it
/// is what Maglev hashes. Ordered, so a backend set has one canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// Cluster the backend runs in (pod IPs are unique across a mesh, but a
    /// key with the cluster stays unambiguous even if they were not).
    pub cluster_id: u16,
    /// Backend IP and port.
    pub addr: SocketAddr,
    /// Transport protocol.
    pub proto: Protocol,
}

impl BackendKey {
    /// The bytes that are hashed (a wire format, see the module docs):
    /// cluster id (big endian), family (4/6), 16 address bytes (IPv4 in the
    /// first four), port (big endian), protocol number.
    pub fn encode(&self) -> [u8; 22] {
        let mut b = [0u8; 22];
        b[0..2].copy_from_slice(&self.cluster_id.to_be_bytes());
        match self.addr.ip() {
            IpAddr::V4(v4) => {
                b[2] = 4;
                b[3..7].copy_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                b[2] = 6;
                b[3..19].copy_from_slice(&v6.octets());
            }
        }
        b[19..21].copy_from_slice(&self.addr.port().to_be_bytes());
        b[21] = self.proto.number();
        b
    }
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} (cluster {})",
            self.addr, self.proto, self.cluster_id
        )
    }
}

/// Seed of the hash that gives a backend's offset.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031; // "maglev01"
/// Seed of the hash that gives a backend's skip.
const SKIP_SEED: u64 = 0x6d61_676c_6576_3032; // "maglev02"

/// The splitmix64 / murmur3 64-bit finaliser: full avalanche.
const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The fixed 64-bit hash Maglev uses: 8-byte little-endian words, each mixed
/// with the state through the murmur3 finaliser, length folded in first.
/// Stable across processes, nodes and Rust versions (a format: see the
/// module docs). Different seeds give independent hashes.
pub fn backend_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = mix64(seed ^ (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix64(h ^ mix64(u64::from_le_bytes(word)))
            .rotate_left(27)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
    }
    mix64(h)
}

/// Whether `n` is prime (trial division; `n` is at most [`MAX_TABLE_SIZE`]).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n % 2 == 0 {
        return n == 2;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// A validated table size: prime, in `2..=MAX_TABLE_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableSize(u32);

impl TableSize {
    /// Validates `size`.
    ///
    /// # Errors
    ///
    /// [`Error::SizeOutOfRange`] or [`Error::NotPrime`].
    pub fn new(size: u32) -> Result<Self, Error> {
        if !(2..=MAX_TABLE_SIZE).contains(&size) {
            return Err(Error::SizeOutOfRange { size });
        }
        if !is_prime(size) {
            return Err(Error::NotPrime(size));
        }
        Ok(Self(size))
    }

    /// The number of slots.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl Default for TableSize {
    fn default() -> Self {
        Self(DEFAULT_TABLE_SIZE)
    }
}

/// One member of a backend set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// The backend.
    pub key: BackendKey,
    /// Relative weight, at least 1.
    pub weight: u32,
}

/// A filled Maglev table (the default is the empty table of no backends).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Table {
    members: Vec<Member>,
    slots: Vec<u32>,
}

impl Table {
    /// The backend set in canonical (sorted) order; slots index into it.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Every slot: an index into [`Table::members`]. Empty when there are no
    /// members.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The backend owning the slot `hash % M`, as the datapath looks it up.
    pub fn lookup(&self, hash: u32) -> Option<&BackendKey> {
        let m = u32::try_from(self.slots.len()).ok().filter(|&m| m > 0)?;
        let idx = self.slots[(hash % m) as usize];
        Some(&self.members[idx as usize].key)
    }

    /// How many slots each member owns, in member order.
    pub fn shares(&self) -> Vec<usize> {
        let mut shares = vec![0; self.members.len()];
        for &s in &self.slots {
            shares[s as usize] += 1;
        }
        shares
    }
}

/// Builds the table of `size` slots for a backend set (any order; weights
/// at least 1). An empty set gives an empty table.
///
/// # Errors
///
/// [`Error::TooManyBackends`] when the set is larger than the table,
/// [`Error::DuplicateBackend`] and [`Error::ZeroWeight`] for a bad set.
pub fn build(size: TableSize, members: &[Member]) -> Result<Table, Error> {
    let m = size.get();
    let mut members = members.to_vec();
    members.sort_unstable();
    if let Some(w) = members.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(Error::DuplicateBackend(w[0].key));
    }
    if let Some(z) = members.iter().find(|b| b.weight == 0) {
        return Err(Error::ZeroWeight(z.key));
    }
    if members.len() > m as usize {
        return Err(Error::TooManyBackends {
            backends: members.len(),
            size: m,
        });
    }
    if members.is_empty() {
        return Ok(Table {
            members,
            slots: Vec::new(),
        });
    }

    let m64 = u64::from(m);
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|b| {
            let key = b.key.encode();
            let offset = backend_hash(OFFSET_SEED, &key) % m64;
            let skip = backend_hash(SKIP_SEED, &key) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let w_max = u64::from(members.iter().map(|b| b.weight).max().unwrap_or(1));

    const FREE: u32 = u32::MAX;
    let mut slots = vec![FREE; m as usize];
    let mut next = vec![0u64; members.len()];
    let mut filled = 0u32;
    let mut round = 0u64;
    'fill: loop {
        for (i, member) in members.iter().enumerate() {
            let w = u64::from(member.weight);
            if (round + 1) * w / w_max == round * w / w_max {
                continue; // not this backend's turn in this round
            }
            let (offset, skip) = perms[i];
            // A permutation visits every slot within m steps, and a free
            // slot exists (filled < m), so this terminates.
            let slot = loop {
                let c = ((offset + next[i] * skip) % m64) as usize;
                next[i] += 1;
                if slots[c] == FREE {
                    break c;
                }
            };
            slots[slot] = i as u32;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
        round += 1;
    }
    Ok(Table { members, slots })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> BackendKey {
        BackendKey {
            cluster_id: (i % 3 + 1) as u16,
            addr: SocketAddr::new(
                IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                8080,
            ),
            proto: Protocol::Tcp,
        }
    }

    fn set(n: u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                key: key(i),
                weight: 1,
            })
            .collect()
    }

    #[test]
    fn table_size_must_be_prime_and_in_range() {
        assert!(TableSize::new(16_381).is_ok());
        assert!(TableSize::new(65_537).is_ok());
        assert_eq!(TableSize::new(16_383), Err(Error::NotPrime(16_383)));
        assert_eq!(TableSize::new(1), Err(Error::SizeOutOfRange { size: 1 }));
        assert!(matches!(
            TableSize::new(MAX_TABLE_SIZE + 1),
            Err(Error::SizeOutOfRange { .. })
        ));
        assert_eq!(TableSize::default().get(), DEFAULT_TABLE_SIZE);
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    }

    #[test]
    fn bad_sets_are_refused() {
        let size = TableSize::new(7).unwrap();
        assert_eq!(
            build(size, &set(8)),
            Err(Error::TooManyBackends {
                backends: 8,
                size: 7
            })
        );
        let mut dup = set(3);
        dup.push(dup[1]);
        assert_eq!(build(size, &dup), Err(Error::DuplicateBackend(key(1))));
        let mut zero = set(3);
        zero[2].weight = 0;
        assert_eq!(build(size, &zero), Err(Error::ZeroWeight(key(2))));
        let empty = build(size, &[]).unwrap();
        assert!(empty.slots().is_empty());
        assert_eq!(empty.lookup(5), None);
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_within_5_percent_of_even() {
        let size = TableSize::default();
        for n in [10u32, 100, 1000] {
            let table = build(size, &set(n)).unwrap();
            assert_eq!(table.slots().len(), DEFAULT_TABLE_SIZE as usize);
            assert!(table.slots().iter().all(|&s| s < n), "every slot owned");
            let even = f64::from(DEFAULT_TABLE_SIZE) / f64::from(n);
            for (i, share) in table.shares().into_iter().enumerate() {
                let dev = (share as f64 - even).abs() / even;
                assert!(
                    dev <= 0.05,
                    "{n} backends: backend {i} owns {share} slots, even is {even:.1} ({:.1}% off)",
                    dev * 100.0
                );
            }
        }
    }

    /// Slots that pointed to a surviving backend and now point elsewhere.
    fn moved_beyond_removed(before: &Table, after: &Table, removed: &BackendKey) -> usize {
        before
            .slots()
            .iter()
            .zip(after.slots())
            .filter(|(&b, &a)| {
                let was = &before.members()[b as usize].key;
                was != removed && *was != after.members()[a as usize].key
            })
            .count()
    }

    /// The paper's bound: removing one of N backends disturbs few slots of
    /// the others. Measured with this implementation (M = 16381, 65537 and
    /// 131071; worst of three victims): N = 10 → 0.01–0.05 × M/N extra slots,
    /// N = 100 → 0.4–1.3 × M/N, N = 1000 → 5.5–6.0 × M/N. The last is a
    /// property of the algorithm (with a thousand backends, each freed slot
    /// starts a chain of changed claims across the later rounds) and not of
    /// the table size, so 1000 backends are held to 7/N, the rest to 1.5/N.
    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        let size = TableSize::default();
        for (n, factor) in [(10u32, 1.5), (100, 1.5), (1000, 7.0)] {
            let full = set(n);
            let before = build(size, &full).unwrap();
            let limit = factor / f64::from(n) * f64::from(DEFAULT_TABLE_SIZE);
            for victim in [0, n / 2, n - 1] {
                let rest: Vec<Member> = full
                    .iter()
                    .copied()
                    .filter(|b| b.key != key(victim))
                    .collect();
                let after = build(size, &rest).unwrap();
                let moved = moved_beyond_removed(&before, &after, &key(victim));
                assert!(
                    moved as f64 <= limit,
                    "{n} backends, removing #{victim}: {moved} slots of surviving backends \
                     moved, limit {factor}/N of {DEFAULT_TABLE_SIZE} = {limit:.0}"
                );
                // The removed backend's slots all went to survivors.
                assert!(after
                    .slots()
                    .iter()
                    .all(|&s| after.members()[s as usize].key != key(victim)));
            }
        }
    }

    #[test]
    fn same_set_in_any_order_gives_the_identical_table() {
        let size = TableSize::new(4093).unwrap();
        let forward = set(50);
        let mut reversed = forward.clone();
        reversed.reverse();
        let mut shuffled = forward.clone();
        // A fixed permutation (no RNG needed): stride 7 over 50 elements.
        shuffled = (0..50).map(|i| shuffled[(i * 7) % 50]).collect();
        let a = build(size, &forward).unwrap();
        assert_eq!(a, build(size, &reversed).unwrap());
        assert_eq!(a, build(size, &shuffled).unwrap());
        // Pinned values: the hash is a cross-node format, so a change to it
        // (or to the key encoding) must be deliberate and fail here.
        assert_eq!(backend_hash(OFFSET_SEED, &key(1).encode()), PINNED_OFFSET);
        assert_eq!(&a.slots()[..8], PINNED_SLOTS);
    }

    const PINNED_OFFSET: u64 = 16_727_951_647_294_207_637;
    const PINNED_SLOTS: &[u32] = &[2, 47, 34, 7, 31, 17, 40, 45];

    #[test]
    fn weights_shape_the_shares() {
        let size = TableSize::default();
        let mut members = set(4);
        members[0].weight = 3; // 3 : 1 : 1 : 1
        let table = build(size, &members).unwrap();
        let shares = table.shares();
        let unit = f64::from(DEFAULT_TABLE_SIZE) / 6.0;
        assert!(
            (shares[0] as f64 / (3.0 * unit) - 1.0).abs() < 0.05,
            "{shares:?}"
        );
        for &s in &shares[1..] {
            assert!((s as f64 / unit - 1.0).abs() < 0.05, "{shares:?}");
        }
    }

    #[test]
    fn lookup_uses_hash_modulo_size() {
        let size = TableSize::new(13).unwrap();
        let table = build(size, &set(3)).unwrap();
        for h in [0u32, 12, 13, 1000, u32::MAX] {
            let slot = table.slots()[(h % 13) as usize];
            assert_eq!(table.lookup(h), Some(&table.members()[slot as usize].key));
        }
    }
}
