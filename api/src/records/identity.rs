//! Identities: `cilium/state/identities/v1/id/<numeric id>`.
//!
//! Wire format: the value is the label string, not JSON:
//! `k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;`.

use crate::cluster::{ClusterName, RemoteScope};
use crate::error::{FieldError, ValidationError};
use crate::go::check_size;
use crate::identity::NumericIdentity;
use crate::keys;
use crate::labels::{LabelSet, POLICY_CLUSTER_LABEL};
use crate::records::{at, expect_key_cluster};
use crate::{clip, Resource};

/// A security identity and the labels it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdentityRecord {
    /// The identity (the key's last segment).
    pub id: NumericIdentity,
    /// Its labels (the value).
    pub labels: LabelSet,
}

impl Resource for IdentityRecord {
    const KIND: &'static str = "identities";
    const BASE_PREFIX: &'static str = keys::IDENTITIES_BASE_PREFIX;

    fn prefix(_cluster: &ClusterName) -> String {
        keys::identities_prefix()
    }

    fn key(&self) -> String {
        keys::identity_key(self.id)
    }

    fn encode(&self) -> Vec<u8> {
        self.labels.to_string().into_bytes()
    }

    fn decode(key: &str, value: &[u8], scope: &RemoteScope) -> Result<Self, ValidationError> {
        check_size(key, value)?;
        let parsed = keys::parse_identity_key(key)?;
        expect_key_cluster(key, parsed.cluster.as_ref(), scope)?;
        let range = scope.identity_range();
        if !range.contains(&parsed.id.0) {
            return Err(ValidationError::IdentityOutOfRange {
                key: clip(key),
                field: "key",
                identity: parsed.id.0,
                cluster: scope.cluster.clone(),
                range,
            });
        }
        let text = std::str::from_utf8(value).map_err(|source| ValidationError::NotUtf8 {
            key: clip(key),
            source,
        })?;
        let labels: LabelSet = text
            .parse()
            .map_err(|source| FieldError::InvalidLabels {
                field: "labels",
                source,
            })
            .map_err(at(key))?;
        // Every cluster label, whatever its source, must name the cluster:
        // a selector with the `any` source matches them all.
        if let Some(foreign) = labels
            .iter()
            .find(|l| l.key == POLICY_CLUSTER_LABEL && l.value != scope.cluster.as_str())
        {
            return Err(ValidationError::ClusterMismatch {
                key: clip(key),
                field: "label io.cilium.k8s.policy.cluster",
                expected: scope.cluster.clone(),
                got: clip(&foreign.value),
            });
        }
        match labels.cluster() {
            None => Err(ValidationError::MissingClusterLabel {
                key: clip(key),
                expected: scope.cluster.clone(),
            }),
            Some(c) if c != scope.cluster.as_str() => Err(ValidationError::ClusterMismatch {
                key: clip(key),
                field: "label k8s:io.cilium.k8s.policy.cluster",
                expected: scope.cluster.clone(),
                got: clip(c),
            }),
            Some(_) => Ok(Self {
                id: parsed.id,
                labels,
            }),
        }
    }
}
