//! Numeric security identities.
//!
//! Cilium gives every distinct label set a 32-bit identity. Identities
//! 1..=255 are reserved (host, world, ...) and carry no cluster part.
//! Everything a cluster with ID N > 0 allocates carries N in its upper bits,
//! so that identities of different clusters never collide; the whole block
//! belongs to the cluster, local part 0 included:
//!
//! ```text
//! maxConnectedClusters=255: cluster N owns N << 16 ..= (N + 1) << 16 - 1
//! maxConnectedClusters=511: cluster N owns N << 15 ..= (N + 1) << 15 - 1
//! ```
//!
//! This is Cilium's `GetMinimalAllocationIdentity` / `GetMaximumAllocationIdentity`
//! for a cluster ID above 0 (there is no reserved gap at the bottom of the
//! block), and Cilium agents publish identities anywhere in it. A reader
//! checks that every identity a remote cluster publishes lies inside that
//! cluster's block ([`cluster_identity_range`]), so no cluster can claim
//! another cluster's identities. Our own allocator hands out only
//! [`allocation_range`], which starts at local part [`MIN_LOCAL_IDENTITY`] so
//! that the local part of an identity we allocate never reads like a
//! reserved identity; that is a choice of the writer, not a rule readers
//! apply.

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, MaxConnectedClusters};

/// The smallest local part our allocator hands out ([`allocation_range`]).
/// Readers accept every local part, 0 included.
pub const MIN_LOCAL_IDENTITY: u16 = 256;

/// Errors building an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The local part is outside the range of the ID mode.
    #[error("local identity {local} is out of range: expected 0..={max} with maxConnectedClusters={mode}")]
    LocalOutOfRange {
        /// The offending local part.
        local: u16,
        /// The largest allowed local part.
        max: u32,
        /// The ID mode.
        mode: MaxConnectedClusters,
    },
    /// The number is not one of the reserved identities this crate knows.
    #[error("identity {0} is not a known reserved identity (1..=8)")]
    NotReserved(u32),
}

/// A numeric security identity as found in the ipcache and in identity keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NumericIdentity(pub u32);

impl NumericIdentity {
    /// Builds `cluster_id << shift | local` for the mode `max`.
    ///
    /// ```
    /// use api::{ClusterId, MaxConnectedClusters, NumericIdentity};
    /// let c3 = ClusterId::new(3, MaxConnectedClusters::Max255).unwrap();
    /// let id = NumericIdentity::from_parts(c3, 0x0133, MaxConnectedClusters::Max255).unwrap();
    /// assert_eq!(id.0, 196915);
    /// assert_eq!(id.cluster_id(MaxConnectedClusters::Max255), Some(c3));
    /// ```
    ///
    /// # Errors
    ///
    /// [`IdentityError::LocalOutOfRange`] when `local` is above the mode's
    /// maximum (65535, or 32767 with 511 clusters).
    pub fn from_parts(
        cluster_id: ClusterId,
        local: u16,
        max: MaxConnectedClusters,
    ) -> Result<Self, IdentityError> {
        if u32::from(local) > max.max_local_identity() {
            return Err(IdentityError::LocalOutOfRange {
                local,
                max: max.max_local_identity(),
                mode: max,
            });
        }
        Ok(Self(
            u32::from(cluster_id) << max.identity_shift() | u32::from(local),
        ))
    }

    /// The identity as a number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The cluster encoded in the upper bits, if those bits form a valid
    /// cluster ID of mode `max` (`None` for reserved identities, and for
    /// numbers whose upper bits exceed the mode, such as node-local identities).
    pub fn cluster_id(self, max: MaxConnectedClusters) -> Option<ClusterId> {
        ClusterId::from_u32(self.0 >> max.identity_shift(), max).ok()
    }

    /// The local part (the bits below the cluster ID).
    pub const fn local(self, max: MaxConnectedClusters) -> u32 {
        self.0 & max.max_local_identity()
    }

    /// Whether this is one of the reserved identities 1..=255.
    pub const fn is_reserved(self) -> bool {
        self.0 >= 1 && self.0 <= 255
    }

    /// The reserved identity this is, if it is a known one.
    pub fn reserved(self) -> Option<ReservedIdentity> {
        ReservedIdentity::try_from(self).ok()
    }
}

impl fmt::Display for NumericIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u32> for NumericIdentity {
    fn from(n: u32) -> Self {
        Self(n)
    }
}

/// The identities that belong to `cluster_id` in mode `max`, Cilium's
/// allocation block: `cluster_id << shift ..= cluster_id << shift | max_local`.
///
/// ```
/// use api::{cluster_identity_range, ClusterId, MaxConnectedClusters::*};
/// let r = cluster_identity_range(ClusterId::new(3, Max255).unwrap(), Max255);
/// assert_eq!(r, (3 << 16)..=(4 << 16) - 1);
/// let r = cluster_identity_range(ClusterId::new(300, Max511).unwrap(), Max511);
/// assert_eq!(r, (300 << 15)..=(301 << 15) - 1);
/// ```
pub fn cluster_identity_range(
    cluster_id: ClusterId,
    max: MaxConnectedClusters,
) -> RangeInclusive<u32> {
    let base = u32::from(cluster_id) << max.identity_shift();
    base..=(base | max.max_local_identity())
}

/// The identities our allocator hands out for `cluster_id`: the cluster's
/// block from local part [`MIN_LOCAL_IDENTITY`] on.
///
/// ```
/// use api::{allocation_range, ClusterId, MaxConnectedClusters::*};
/// let r = allocation_range(ClusterId::new(3, Max255).unwrap(), Max255);
/// assert_eq!(r, (3 << 16 | 256)..=(3 << 16 | 65535));
/// ```
pub fn allocation_range(cluster_id: ClusterId, max: MaxConnectedClusters) -> RangeInclusive<u32> {
    let block = cluster_identity_range(cluster_id, max);
    (block.start() | u32::from(MIN_LOCAL_IDENTITY))..=*block.end()
}

/// The reserved identities of Cilium that the mesh uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ReservedIdentity {
    /// The local host.
    Host = 1,
    /// Anything outside the mesh.
    World = 2,
    /// Endpoints not managed by the mesh.
    Unmanaged = 3,
    /// Health-check endpoints.
    Health = 4,
    /// Endpoints whose identity is not resolved yet.
    Init = 5,
    /// Nodes of this or other clusters.
    RemoteNode = 6,
    /// The Kubernetes API server.
    KubeApiserver = 7,
    /// The ingress proxy.
    Ingress = 8,
}

impl ReservedIdentity {
    /// All known reserved identities, in numeric order.
    pub const ALL: [Self; 8] = [
        Self::Host,
        Self::World,
        Self::Unmanaged,
        Self::Health,
        Self::Init,
        Self::RemoteNode,
        Self::KubeApiserver,
        Self::Ingress,
    ];

    /// Cilium's name of the identity (the key of its `reserved:` label).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::World => "world",
            Self::Unmanaged => "unmanaged",
            Self::Health => "health",
            Self::Init => "init",
            Self::RemoteNode => "remote-node",
            Self::KubeApiserver => "kube-apiserver",
            Self::Ingress => "ingress",
        }
    }

    /// The identity number.
    pub const fn identity(self) -> NumericIdentity {
        NumericIdentity(self as u32)
    }
}

impl fmt::Display for ReservedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<ReservedIdentity> for NumericIdentity {
    fn from(r: ReservedIdentity) -> Self {
        r.identity()
    }
}

impl TryFrom<NumericIdentity> for ReservedIdentity {
    type Error = IdentityError;

    fn try_from(id: NumericIdentity) -> Result<Self, Self::Error> {
        Self::ALL
            .into_iter()
            .find(|r| r.identity() == id)
            .ok_or(IdentityError::NotReserved(id.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MaxConnectedClusters::*;

    fn cid(n: u16, max: MaxConnectedClusters) -> ClusterId {
        ClusterId::new(n, max).unwrap()
    }

    #[test]
    fn parts_round_trip_in_both_modes() {
        for (max, c, local) in [
            (Max255, 1, 256),
            (Max255, 255, 65535),
            (Max255, 3, 0x0133),
            (Max511, 1, 256),
            (Max511, 511, 32767),
            (Max511, 300, 1000),
        ] {
            let id = NumericIdentity::from_parts(cid(c, max), local, max).unwrap();
            assert_eq!(id.cluster_id(max), Some(cid(c, max)));
            assert_eq!(id.local(max), u32::from(local));
            assert!(cluster_identity_range(cid(c, max), max).contains(&id.0));
            assert!(!id.is_reserved());
        }
        assert_eq!(
            NumericIdentity::from_parts(cid(255, Max255), 65535, Max255)
                .unwrap()
                .0,
            0x00ff_ffff
        );
        assert_eq!(
            NumericIdentity::from_parts(cid(511, Max511), 32767, Max511)
                .unwrap()
                .0,
            0x00ff_ffff
        );
    }

    #[test]
    fn local_part_limits() {
        // Cilium's block starts at N << shift: local parts 0..=255 belong
        // to the cluster too (they are not reserved identities).
        for local in [0, 1, 255] {
            let id = NumericIdentity::from_parts(cid(1, Max255), local, Max255).unwrap();
            assert_eq!(id.0, 1 << 16 | u32::from(local));
            assert!(!id.is_reserved());
            assert!(cluster_identity_range(cid(1, Max255), Max255).contains(&id.0));
            assert!(!allocation_range(cid(1, Max255), Max255).contains(&id.0));
        }
        let err = NumericIdentity::from_parts(cid(1, Max511), 32768, Max511).unwrap_err();
        assert_eq!(
            err,
            IdentityError::LocalOutOfRange {
                local: 32768,
                max: 32767,
                mode: Max511
            }
        );
        assert!(err.to_string().contains("32768"), "{err}");
    }

    #[test]
    fn blocks_are_ciliums() {
        // GetMinimalAllocationIdentity / GetMaximumAllocationIdentity.
        let r = cluster_identity_range(cid(255, Max255), Max255);
        assert_eq!(r, 0x00ff_0000..=0x00ff_ffff);
        let r = cluster_identity_range(cid(511, Max511), Max511);
        assert_eq!(r, 511 << 15..=0x00ff_ffff);
        // The KVStoreMesh test data's identity of cluster 255.
        assert!(cluster_identity_range(cid(255, Max255), Max255).contains(&16_711_681));
    }

    #[test]
    fn ranges_of_neighbours_do_not_overlap() {
        for max in [Max255, Max511] {
            let a = cluster_identity_range(cid(1, max), max);
            let b = cluster_identity_range(cid(2, max), max);
            assert_eq!(a.end() + 1, *b.start());
        }
    }

    #[test]
    fn reserved_identities() {
        for (n, name) in [
            (1, "host"),
            (2, "world"),
            (3, "unmanaged"),
            (4, "health"),
            (5, "init"),
            (6, "remote-node"),
            (7, "kube-apiserver"),
            (8, "ingress"),
        ] {
            let r = NumericIdentity(n).reserved().unwrap();
            assert_eq!(r.name(), name);
            assert_eq!(NumericIdentity::from(r), NumericIdentity(n));
            assert!(NumericIdentity(n).is_reserved());
        }
        assert!(NumericIdentity(200).is_reserved());
        assert_eq!(NumericIdentity(200).reserved(), None);
        assert!(!NumericIdentity(0).is_reserved());
        assert!(!NumericIdentity(256).is_reserved());
        assert_eq!(NumericIdentity(42).cluster_id(Max255), None);
        // Node-local identities (bit 24) have no cluster.
        assert_eq!(NumericIdentity(1 << 24 | 5).cluster_id(Max255), None);
        assert_eq!(NumericIdentity(1 << 24 | 5).cluster_id(Max511), None);
    }
}
