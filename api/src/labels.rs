//! Labels and label sets, and their kvstore string form.
//!
//! A security identity stands for a set of labels such as `k8s:app=web`. In
//! the kvstore (key `cilium/state/identities/v1/id/<id>`) the set is stored as
//! a string, not JSON:
//!
//! ```text
//! k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;
//! ```
//!
//! Each label is written `source:key=value;` (the `=` is present even for an
//! empty value), sorted by key the way Cilium's `Labels.SortedList` sorts them.
//! This string is a wire format shared with Cilium: Cilium uses it as the
//! identity allocator's key, so two writers must produce it byte for byte.
//!
//! Reading accepts what Cilium's `NewLabelsFromSortedList` accepts, since a
//! Cilium cluster's identities are read back with it: labels are split on
//! `;` (a trailing `;` is optional, empty pieces are skipped); the source is
//! what precedes the first `:` (`$host` is `reserved:host`, a label without
//! `:` has source `unspec`, or `reserved` when it starts with `reserved.`);
//! key and value are split at the first `=` (no `=`: an empty value); a
//! label with an empty key is skipped, and a later label with the same key
//! replaces an earlier one, whatever their sources (Cilium keys the set by
//! label key).
//!
//! Keys and values follow Kubernetes label syntax: a key is an optional DNS
//! subdomain prefix and `/`, then a name of at most 63 characters
//! `[A-Za-z0-9._-]` starting and ending alphanumeric; a value is empty or
//! follows the same rule as the name.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clip;
use crate::names::{validate_dns_subdomain, validate_qualified_name_part};

/// Label key naming the cluster an identity belongs to; every identity of
/// the mesh carries it (source `k8s`).
pub const POLICY_CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";
/// Label key naming the namespace of a pod.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Source of labels derived from Kubernetes objects.
pub const SOURCE_K8S: &str = "k8s";
/// Source of the labels of reserved identities.
pub const SOURCE_RESERVED: &str = "reserved";
/// Source of a label written without one (Cilium's `LabelSourceUnspec`).
pub const SOURCE_UNSPEC: &str = "unspec";

/// Errors parsing or validating labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// The source is empty or has characters outside `[a-z0-9-]`.
    #[error("label source {source_name:?} is invalid: must be 1 to 63 characters of lowercase letters, digits and '-'")]
    InvalidSource {
        /// The offending source (clipped).
        source_name: String,
    },
    /// The key breaks Kubernetes label-key syntax.
    #[error("label key {key:?} is invalid: its {part} {reason}")]
    InvalidKey {
        /// The offending key (clipped).
        key: String,
        /// Which part of the key breaks a rule (the prefix or the name).
        part: &'static str,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The value breaks Kubernetes label-value syntax.
    #[error("value {value:?} of label {key:?} is invalid: {reason}")]
    InvalidValue {
        /// The key of the label (clipped).
        key: String,
        /// The offending value (clipped).
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

/// One label: `source:key=value`.
///
/// Fields are public for pattern matching; [`Label::new`] validates them, and
/// [`LabelSet`] only holds validated labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label {
    /// Where the label comes from (`k8s`, `reserved`, ...).
    pub source: String,
    /// The key, in Kubernetes label-key syntax.
    pub key: String,
    /// The value, in Kubernetes label-value syntax (may be empty).
    pub value: String,
}

impl Label {
    /// Validates and builds a label.
    ///
    /// # Errors
    ///
    /// [`LabelError::InvalidSource`], [`LabelError::InvalidKey`] or
    /// [`LabelError::InvalidValue`] naming the offending part.
    pub fn new(
        source: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, LabelError> {
        let label = Self {
            source: source.into(),
            key: key.into(),
            value: value.into(),
        };
        label.validate()?;
        Ok(label)
    }

    /// A `k8s:` label.
    ///
    /// # Errors
    ///
    /// As [`Label::new`].
    pub fn k8s(key: impl Into<String>, value: impl Into<String>) -> Result<Self, LabelError> {
        Self::new(SOURCE_K8S, key, value)
    }

    /// Checks source, key and value syntax.
    ///
    /// # Errors
    ///
    /// As [`Label::new`].
    pub fn validate(&self) -> Result<(), LabelError> {
        validate_source(&self.source)?;
        validate_key(&self.key)?;
        validate_value(&self.key, &self.value)
    }

    fn sort_key(&self) -> (&str, &str) {
        (&self.key, &self.source)
    }
}

impl fmt::Display for Label {
    /// The kvstore form of one label, `source:key=value;`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={};", self.source, self.key, self.value)
    }
}

impl PartialOrd for Label {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Label {
    /// By key, then source, then value: the order of Cilium's sorted list.
    fn cmp(&self, other: &Self) -> Ordering {
        self.sort_key()
            .cmp(&other.sort_key())
            .then_with(|| self.value.cmp(&other.value))
    }
}

fn validate_source(source: &str) -> Result<(), LabelError> {
    let ok = !source.is_empty()
        && source.len() <= 63
        && source
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LabelError::InvalidSource {
            source_name: clip(source),
        })
    }
}

/// Checks a label key against Kubernetes label-key syntax (an optional DNS
/// subdomain prefix and `/`, then a qualified name).
///
/// # Errors
///
/// [`LabelError::InvalidKey`] naming the part that breaks a rule.
pub fn validate_key(key: &str) -> Result<(), LabelError> {
    let invalid = |part, reason| LabelError::InvalidKey {
        key: clip(key),
        part,
        reason,
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            validate_dns_subdomain(prefix).map_err(|r| invalid("prefix before '/'", r))?;
            name
        }
        None => key,
    };
    validate_qualified_name_part(name).map_err(|r| invalid("name", r))
}

/// Checks the value of label `key` against Kubernetes label-value syntax
/// (empty, or a qualified name).
///
/// # Errors
///
/// [`LabelError::InvalidValue`].
pub fn validate_value(key: &str, value: &str) -> Result<(), LabelError> {
    if value.is_empty() {
        return Ok(());
    }
    validate_qualified_name_part(value).map_err(|reason| LabelError::InvalidValue {
        key: clip(key),
        value: clip(value),
        reason,
    })
}

/// A set of labels, sorted by key (then source), at most one label per
/// source and key.
///
/// Its [`Display`](fmt::Display) and [`FromStr`] implement the kvstore string
/// form (see the [module docs](self)); serde uses the same string.
///
/// ```
/// use api::LabelSet;
/// let s = "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;";
/// let set: LabelSet = s.parse().unwrap();
/// assert_eq!(set.cluster(), Some("c1"));
/// assert_eq!(set.to_string(), s);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LabelSet(Vec<Label>);

impl LabelSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from labels; a later label with the same source and key
    /// replaces an earlier one.
    ///
    /// # Errors
    ///
    /// The first label that fails [`Label::validate`].
    pub fn from_labels(labels: impl IntoIterator<Item = Label>) -> Result<Self, LabelError> {
        let mut set = Self::new();
        for label in labels {
            set.insert(label)?;
        }
        Ok(set)
    }

    /// Inserts a label, returning the one it replaced (same source and key).
    ///
    /// # Errors
    ///
    /// The label fails [`Label::validate`]; the set is unchanged.
    pub fn insert(&mut self, label: Label) -> Result<Option<Label>, LabelError> {
        label.validate()?;
        match self
            .0
            .binary_search_by(|l| l.sort_key().cmp(&label.sort_key()))
        {
            Ok(i) => Ok(Some(std::mem::replace(&mut self.0[i], label))),
            Err(i) => {
                self.0.insert(i, label);
                Ok(None)
            }
        }
    }

    /// The label with this source and key.
    pub fn get(&self, source: &str, key: &str) -> Option<&Label> {
        self.0
            .binary_search_by(|l| l.sort_key().cmp(&(key, source)))
            .ok()
            .map(|i| &self.0[i])
    }

    /// The identity labels of a pod, as Cilium derives them: each of its
    /// labels with source `k8s`, plus `k8s:io.kubernetes.pod.namespace` and
    /// `k8s:io.cilium.k8s.policy.cluster`, which replace pod labels of the
    /// same key.
    ///
    /// ```
    /// use api::LabelSet;
    /// let set = LabelSet::for_endpoint([("app", "web")], "default", &"c1".parse().unwrap()).unwrap();
    /// assert_eq!(
    ///     set.to_string(),
    ///     "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;"
    /// );
    /// ```
    ///
    /// # Errors
    ///
    /// A label, or the namespace as a label value, that fails
    /// [`Label::validate`].
    pub fn for_endpoint<'a>(
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        namespace: &str,
        cluster: &crate::ClusterName,
    ) -> Result<Self, LabelError> {
        let mut set = Self::from_labels(
            labels
                .into_iter()
                .map(|(k, v)| Label::k8s(k, v))
                .collect::<Result<Vec<_>, _>>()?,
        )?;
        set.insert(Label::k8s(POD_NAMESPACE_LABEL, namespace)?)?;
        set.insert(Label::k8s(POLICY_CLUSTER_LABEL, cluster.as_str())?)?;
        Ok(set)
    }

    /// The value of the `k8s:io.cilium.k8s.policy.cluster` label.
    pub fn cluster(&self) -> Option<&str> {
        self.get(SOURCE_K8S, POLICY_CLUSTER_LABEL)
            .map(|l| l.value.as_str())
    }

    /// The value of the `k8s:io.kubernetes.pod.namespace` label.
    pub fn namespace(&self) -> Option<&str> {
        self.get(SOURCE_K8S, POD_NAMESPACE_LABEL)
            .map(|l| l.value.as_str())
    }

    /// The labels in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Label> {
        self.0.iter()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a LabelSet {
    type Item = &'a Label;
    type IntoIter = std::slice::Iter<'a, Label>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for LabelSet {
    /// The kvstore form: every label as `source:key=value;`, sorted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|l| fmt::Display::fmt(l, f))
    }
}

impl Label {
    /// Parses one label as Cilium's `ParseLabel` does (see the [module
    /// docs](self)); `None` for a label with an empty key, which Cilium
    /// drops.
    fn parse_cilium(text: &str) -> Result<Option<Self>, LabelError> {
        const RESERVED_KEY_PREFIX: &str = "reserved.";
        let (source, rest) = if let Some(rest) = text.strip_prefix('$') {
            (SOURCE_RESERVED, rest)
        } else if let Some((source, rest)) = text.split_once(':') {
            (
                if source.is_empty() {
                    SOURCE_UNSPEC
                } else {
                    source
                },
                rest,
            )
        } else if let Some(rest) = text.strip_prefix(RESERVED_KEY_PREFIX) {
            (SOURCE_RESERVED, rest)
        } else {
            (SOURCE_UNSPEC, text)
        };
        let (key, value) = match rest.split_once('=') {
            // `reserved:=host`: Cilium reads the rest as the key.
            Some(("", key)) if source == SOURCE_RESERVED => (key, ""),
            Some((key, value)) => (key, value),
            None => (rest, ""),
        };
        if key.is_empty() {
            return Ok(None);
        }
        Self::new(source, key, value).map(Some)
    }
}

impl FromStr for LabelSet {
    type Err = LabelError;

    /// Parses the kvstore form as Cilium does (see the [module docs](self)):
    /// labels in any order (the set sorts them), each with a valid source,
    /// key and value.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = Self::new();
        for text in s.split(';').filter(|t| !t.is_empty()) {
            let Some(label) = Label::parse_cilium(text)? else {
                continue;
            };
            set.0.retain(|l| l.key != label.key);
            set.insert(label)?;
        }
        Ok(set)
    }
}

impl Serialize for LabelSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LabelSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str =
        "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;";

    #[test]
    fn example_round_trips() {
        let set: LabelSet = EXAMPLE.parse().unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set.cluster(), Some("c1"));
        assert_eq!(set.namespace(), Some("default"));
        assert_eq!(set.to_string(), EXAMPLE);
    }

    #[test]
    fn parse_sorts_by_key_like_cilium() {
        // Cilium sorts by key, not by source: `cilium:a` before `k8s:b`, and
        // `reserved:host` after `k8s:app`.
        let set: LabelSet = "reserved:host=;k8s:app=web;cilium-generated:zz=1;"
            .parse()
            .unwrap();
        assert_eq!(
            set.to_string(),
            "k8s:app=web;reserved:host=;cilium-generated:zz=1;"
        );
    }

    #[test]
    fn empty_value_keeps_equals_sign() {
        let set = LabelSet::from_labels([Label::new("reserved", "host", "").unwrap()]).unwrap();
        assert_eq!(set.to_string(), "reserved:host=;");
        assert_eq!(set.to_string().parse::<LabelSet>().unwrap(), set);
    }

    #[test]
    fn insert_dedups_by_source_and_key() {
        let mut set = LabelSet::new();
        assert_eq!(set.insert(Label::k8s("app", "a").unwrap()).unwrap(), None);
        assert_eq!(
            set.insert(Label::k8s("app", "b").unwrap()).unwrap(),
            Some(Label::k8s("app", "a").unwrap())
        );
        // Same key, other source: a distinct label.
        assert_eq!(
            set.insert(Label::new("container", "app", "c").unwrap())
                .unwrap(),
            None
        );
        assert_eq!(set.to_string(), "container:app=c;k8s:app=b;");
    }

    #[test]
    fn parse_reads_what_cilium_reads() {
        let cases: &[(&str, &str)] = &[
            // A missing trailing ';' and empty pieces.
            ("k8s:app=web", "k8s:app=web;"),
            ("k8s:app=web;;k8s:tier=db", "k8s:app=web;k8s:tier=db;"),
            ("", ""),
            (";", ""),
            // A missing source is `unspec`; `$` and `reserved.` mean reserved.
            ("app=web;", "unspec:app=web;"),
            (":app=web;", "unspec:app=web;"),
            ("$host;", "reserved:host=;"),
            ("reserved.world", "reserved:world=;"),
            ("reserved:=host;", "reserved:host=;"),
            // No '=' is an empty value; an empty key is dropped.
            ("k8s:app;", "k8s:app=;"),
            ("k8s:=web;k8s:app=x;", "k8s:app=x;"),
            // The same key twice: the later wins, whatever the source.
            ("k8s:app=a;k8s:app=b;", "k8s:app=b;"),
            ("k8s:app=a;container:app=c;", "container:app=c;"),
            // KVStoreMesh's test identity of cluster foo.
            (
                "key1=value1;key2=value2;k8s:io.cilium.k8s.policy.cluster=foo",
                "k8s:io.cilium.k8s.policy.cluster=foo;unspec:key1=value1;unspec:key2=value2;",
            ),
        ];
        for (input, want) in cases {
            let set: LabelSet = input.parse().unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(set.to_string(), *want, "{input:?}");
        }
    }

    #[test]
    fn parse_errors_name_the_offending_part() {
        let cases: &[(&str, &str)] = &[
            ("K8S:app=web;", "\"K8S\""),
            ("k8s:-app=web;", "\"-app\""),
            ("k8s:app=-web;", "\"-web\""),
            ("k8s:Ex.com/app=web;", "\"Ex.com/app\""),
            ("k8s:a/b/c=web;", "\"a/b/c\""),
            ("app=a:b;", "\"app=a\""),
        ];
        for (input, needle) in cases {
            let err = input.parse::<LabelSet>().unwrap_err();
            assert!(err.to_string().contains(needle), "{input}: {err}");
        }
        let long = format!("k8s:app={};", "v".repeat(64));
        assert!(matches!(
            long.parse::<LabelSet>(),
            Err(LabelError::InvalidValue { .. })
        ));
        let long_key = format!("k8s:{}=v;", "k".repeat(64));
        assert!(matches!(
            long_key.parse::<LabelSet>(),
            Err(LabelError::InvalidKey { .. })
        ));
    }

    #[test]
    fn prefixed_keys_are_accepted() {
        let s = "k8s:app.kubernetes.io/name=web;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default;";
        let set: LabelSet = s.parse().unwrap();
        assert_eq!(set.to_string(), s);
    }

    /// A small deterministic generator stands in for a property-test crate:
    /// many random valid sets, each formatted, parsed and formatted again.
    #[test]
    fn random_sets_round_trip_through_the_string_form() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        const FIRST: &[u8] = b"abcxyzABZ0189";
        const MIDDLE: &[u8] = b"abcAZ09-_.";
        let word = |next: &mut dyn FnMut(u64) -> u64, max_len: u64| {
            let len = 1 + next(max_len);
            (0..len)
                .map(|i| {
                    let alphabet = if i == 0 || i == len - 1 {
                        FIRST
                    } else {
                        MIDDLE
                    };
                    char::from(alphabet[next(alphabet.len() as u64) as usize])
                })
                .collect::<String>()
        };
        for _ in 0..500 {
            let mut set = LabelSet::new();
            for _ in 0..next(8) {
                let source = ["k8s", "reserved", "container", "cilium-generated"][next(4) as usize];
                let key = if next(3) == 0 {
                    format!("io.example/{}", word(&mut next, 20))
                } else {
                    word(&mut next, 30)
                };
                let value = if next(4) == 0 {
                    String::new()
                } else {
                    word(&mut next, 63)
                };
                set.insert(Label::new(source, key, value).unwrap()).unwrap();
            }
            let text = set.to_string();
            let parsed: LabelSet = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed, set, "{text}");
            assert_eq!(parsed.to_string(), text);
            let sorted = parsed.iter().zip(parsed.iter().skip(1)).all(|(a, b)| a < b);
            assert!(sorted, "{text} is not strictly sorted");
        }
    }
}
