//! Cluster names, cluster IDs and the scope of a remote-cluster connection.
//!
//! A cluster is known to the mesh by a name (DNS-label-like, at most 32
//! characters) and a numeric ID (1..=255, or 1..=511 when the mesh runs with
//! `maxConnectedClusters=511`). The ID is baked into every security identity
//! the cluster allocates (see [`crate::identity`]), so the two numbering modes
//! must never be mixed up: [`ClusterId::new`] takes the mode explicitly.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clip;

/// Longest cluster name Cilium accepts.
pub const MAX_CLUSTER_NAME_LEN: usize = 32;

/// Errors of the cluster vocabulary: names, IDs and the ID mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The name is the empty string.
    #[error("cluster name is empty")]
    EmptyName,
    /// The name is longer than [`MAX_CLUSTER_NAME_LEN`].
    #[error("cluster name {name:?} is {len} characters long, at most {MAX_CLUSTER_NAME_LEN} are allowed")]
    NameTooLong {
        /// The offending name (clipped).
        name: String,
        /// Its length in characters.
        len: usize,
    },
    /// The name contains a character outside `[-a-z0-9]`.
    #[error("cluster name {name:?} contains {ch:?} at position {position}: only lowercase letters, digits and '-' are allowed")]
    NameInvalidCharacter {
        /// The offending name (clipped).
        name: String,
        /// The first character that is not allowed.
        ch: char,
        /// Its position (in characters, from 0).
        position: usize,
    },
    /// The name starts or ends with '-'.
    #[error("cluster name {name:?} must start and end with a lowercase letter or a digit")]
    NameBadEdge {
        /// The offending name.
        name: String,
    },
    /// The cluster ID is 0 or above the mode's maximum.
    #[error("cluster ID {id} is out of range: expected 1..={max} (maxConnectedClusters={max})")]
    IdOutOfRange {
        /// The offending ID.
        id: u32,
        /// The largest ID of the mode.
        max: u16,
    },
    /// `maxConnectedClusters` is neither 255 nor 511.
    #[error("maxConnectedClusters {got} is not supported: expected 255 or 511")]
    UnsupportedMaxConnectedClusters {
        /// The offending value.
        got: u32,
    },
}

/// A validated cluster name: at most 32 characters matching
/// `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$`.
///
/// It appears in kvstore keys (`cilium/state/nodes/v1/<cluster>/...`) and in
/// the `io.cilium.k8s.policy.cluster` label of every identity.
///
/// ```
/// use api::ClusterName;
/// let name: ClusterName = "cluster-1".parse().unwrap();
/// assert_eq!(name.as_str(), "cluster-1");
/// assert!("Cluster-1".parse::<ClusterName>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterName(String);

impl ClusterName {
    /// Validates `name` and wraps it.
    ///
    /// # Errors
    ///
    /// A [`ClusterError`] naming the rule the name breaks (empty, too long,
    /// a character outside `[-a-z0-9]`, or a leading/trailing '-').
    pub fn new(name: impl Into<String>) -> Result<Self, ClusterError> {
        let name = name.into();
        validate_cluster_name(&name)?;
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Consumes the name, returning the inner string.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn validate_cluster_name(name: &str) -> Result<(), ClusterError> {
    if name.is_empty() {
        return Err(ClusterError::EmptyName);
    }
    let len = name.chars().count();
    if len > MAX_CLUSTER_NAME_LEN {
        return Err(ClusterError::NameTooLong {
            name: clip(name),
            len,
        });
    }
    if let Some((position, ch)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(ClusterError::NameInvalidCharacter {
            name: clip(name),
            ch,
            position,
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(ClusterError::NameBadEdge {
            name: name.to_owned(),
        });
    }
    Ok(())
}

impl FromStr for ClusterName {
    type Err = ClusterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = ClusterError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterName({:?})", self.0)
    }
}

/// A name is its text: equal, ordered and hashed as the string, so maps keyed
/// by [`ClusterName`] are looked up with a `&str`.
impl std::borrow::Borrow<str> for ClusterName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ClusterName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ClusterName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl Serialize for ClusterName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ClusterName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// How many clusters a mesh can hold; decides how identities split into
/// cluster bits and local bits (Cilium's `maxConnectedClusters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MaxConnectedClusters {
    /// Cluster IDs 1..=255, identity = `cluster_id << 16 | local`.
    #[default]
    Max255,
    /// Cluster IDs 1..=511, identity = `cluster_id << 15 | local`.
    Max511,
}

impl MaxConnectedClusters {
    /// The largest cluster ID of this mode (255 or 511).
    pub const fn max_cluster_id(self) -> u16 {
        match self {
            Self::Max255 => 255,
            Self::Max511 => 511,
        }
    }

    /// The number the mode is known by (`maxConnectedClusters` in the cluster config).
    pub const fn as_u32(self) -> u32 {
        self.max_cluster_id() as u32
    }

    /// By how many bits the cluster ID is shifted in an identity (16 or 15).
    pub const fn identity_shift(self) -> u32 {
        match self {
            Self::Max255 => 16,
            Self::Max511 => 15,
        }
    }

    /// The largest local part of an identity (65535 or 32767).
    pub const fn max_local_identity(self) -> u32 {
        (1 << self.identity_shift()) - 1
    }
}

impl TryFrom<u32> for MaxConnectedClusters {
    type Error = ClusterError;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            255 => Ok(Self::Max255),
            511 => Ok(Self::Max511),
            got => Err(ClusterError::UnsupportedMaxConnectedClusters { got }),
        }
    }
}

impl fmt::Display for MaxConnectedClusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u32())
    }
}

impl Serialize for MaxConnectedClusters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.as_u32())
    }
}

impl<'de> Deserialize<'de> for MaxConnectedClusters {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(deserializer)?;
        Self::try_from(n).map_err(serde::de::Error::custom)
    }
}

/// A cluster ID: 1..=255, or 1..=511 in [`MaxConnectedClusters::Max511`] mode.
/// 0 is reserved (a cluster without mesh).
///
/// ```
/// use api::{ClusterId, MaxConnectedClusters};
/// assert!(ClusterId::new(255, MaxConnectedClusters::Max255).is_ok());
/// assert!(ClusterId::new(256, MaxConnectedClusters::Max255).is_err());
/// assert!(ClusterId::new(256, MaxConnectedClusters::Max511).is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(u16);

impl ClusterId {
    /// Validates `id` against the mode `max`.
    ///
    /// # Errors
    ///
    /// [`ClusterError::IdOutOfRange`] when `id` is 0 or above `max`.
    pub fn new(id: u16, max: MaxConnectedClusters) -> Result<Self, ClusterError> {
        Self::from_u32(u32::from(id), max)
    }

    /// Like [`ClusterId::new`] for an ID read as a wider integer (JSON numbers).
    ///
    /// # Errors
    ///
    /// [`ClusterError::IdOutOfRange`] when `id` is 0 or above `max`.
    pub fn from_u32(id: u32, max: MaxConnectedClusters) -> Result<Self, ClusterError> {
        let limit = max.max_cluster_id();
        match u16::try_from(id) {
            Ok(small) if small >= 1 && small <= limit => Ok(Self(small)),
            _ => Err(ClusterError::IdOutOfRange { id, max: limit }),
        }
    }

    /// The ID as a number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<ClusterId> for u32 {
    fn from(id: ClusterId) -> u32 {
        u32::from(id.0)
    }
}

/// The cluster a kvstore connection belongs to: everything read through it
/// must claim to be this cluster's, and its identities must lie in this
/// cluster's range.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteScope {
    /// The cluster's name.
    pub cluster: ClusterName,
    /// The cluster's ID.
    pub cluster_id: ClusterId,
    /// The ID mode of the mesh.
    pub max_connected: MaxConnectedClusters,
}

impl RemoteScope {
    /// Bundles a cluster's name, ID and mode.
    pub fn new(
        cluster: ClusterName,
        cluster_id: ClusterId,
        max_connected: MaxConnectedClusters,
    ) -> Self {
        Self {
            cluster,
            cluster_id,
            max_connected,
        }
    }

    /// The identities this cluster may allocate.
    pub fn identity_range(&self) -> std::ops::RangeInclusive<u32> {
        crate::identity::cluster_identity_range(self.cluster_id, self.max_connected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_length_limit_is_32() {
        let ok = "a".repeat(32);
        assert_eq!(ClusterName::new(ok.clone()).unwrap().as_str(), ok);
        let err = ClusterName::new("a".repeat(33)).unwrap_err();
        assert_eq!(
            err,
            ClusterError::NameTooLong {
                name: "a".repeat(33),
                len: 33
            }
        );
        assert!(err.to_string().contains("33 characters"), "{err}");
    }

    #[test]
    fn name_edges_and_characters() {
        for ok in ["a", "0", "c1", "a-b", "a--b", "123", "x-1-y"] {
            assert!(ClusterName::new(ok).is_ok(), "{ok} must be accepted");
        }
        assert_eq!(ClusterName::new(""), Err(ClusterError::EmptyName));
        for bad_edge in ["-a", "a-", "-", "--"] {
            assert!(
                matches!(
                    ClusterName::new(bad_edge),
                    Err(ClusterError::NameBadEdge { .. })
                ),
                "{bad_edge} must be refused for its edge"
            );
        }
        let err = ClusterName::new("Cluster1").unwrap_err();
        assert_eq!(
            err,
            ClusterError::NameInvalidCharacter {
                name: "Cluster1".into(),
                ch: 'C',
                position: 0
            }
        );
        assert!(err.to_string().contains("\"Cluster1\""), "{err}");
        for bad in ["a_b", "a.b", "a b", "a/b", "é"] {
            assert!(
                matches!(
                    ClusterName::new(bad),
                    Err(ClusterError::NameInvalidCharacter { .. })
                ),
                "{bad} must be refused for its characters"
            );
        }
    }

    #[test]
    fn name_serde_validates() {
        let name: ClusterName = serde_json::from_str("\"c1\"").unwrap();
        assert_eq!(name, "c1");
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"c1\"");
        let err = serde_json::from_str::<ClusterName>("\"C1\"").unwrap_err();
        assert!(err.to_string().contains("\"C1\""), "{err}");
    }

    #[test]
    fn cluster_id_ranges() {
        use MaxConnectedClusters::*;
        assert!(ClusterId::new(0, Max255).is_err());
        assert!(ClusterId::new(0, Max511).is_err());
        assert_eq!(ClusterId::new(1, Max255).unwrap().get(), 1);
        assert_eq!(ClusterId::new(255, Max255).unwrap().get(), 255);
        assert_eq!(
            ClusterId::new(256, Max255),
            Err(ClusterError::IdOutOfRange { id: 256, max: 255 })
        );
        assert_eq!(ClusterId::new(511, Max511).unwrap().get(), 511);
        assert!(ClusterId::new(512, Max511).is_err());
        assert!(ClusterId::from_u32(65536 + 3, Max511).is_err());
    }

    #[test]
    fn max_connected_from_numbers() {
        assert_eq!(
            MaxConnectedClusters::try_from(255),
            Ok(MaxConnectedClusters::Max255)
        );
        assert_eq!(
            MaxConnectedClusters::try_from(511),
            Ok(MaxConnectedClusters::Max511)
        );
        assert_eq!(
            MaxConnectedClusters::try_from(256),
            Err(ClusterError::UnsupportedMaxConnectedClusters { got: 256 })
        );
        assert_eq!(MaxConnectedClusters::Max511.max_local_identity(), 32767);
        assert_eq!(MaxConnectedClusters::Max255.max_local_identity(), 65535);
    }
}
