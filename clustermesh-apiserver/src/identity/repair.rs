//! Startup repair: orphaned id keys and index entries of a crash between
//! the steps of an older allocator, resolved the same way by every apiserver.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use kvstore::{Compare, Revision, Txn, TxnOp};
use tracing::{info, warn};

use super::{backend_err, id_key, parse_id, Allocator, IdentityError, Layout, REPAIR_PASSES};

/// An id key as listed: its labels and mod revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedId {
    pub labels: String,
    pub revision: Revision,
}

/// An index entry as listed: the number it names (`None` when unparsable)
/// and its mod revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedIndex {
    pub id: Option<u32>,
    pub revision: Revision,
}

/// One startup repair of the index of one label set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub labels: String,
    /// `create`, `repoint` or `delete`, for the log.
    pub action: &'static str,
    /// Conditioned on the listed revisions of every key it relies on.
    pub txn: Txn,
}

/// Plans the repairs of the index of `cluster` against the id keys of its
/// range: the resolution rules of the module docs, in label order. Pure, so
/// that two apiservers starting together plan the same; the revisions in the
/// compares make the second one's transactions fail harmlessly.
pub fn plan_repairs(
    cluster: &str,
    ids: &BTreeMap<u32, ListedId>,
    index: &BTreeMap<String, ListedIndex>,
) -> Vec<Repair> {
    let layout = Layout::new(cluster);
    let mut holders: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (id, listed) in ids {
        holders.entry(&listed.labels).or_default().push(*id);
    }
    let labels: BTreeSet<&str> = holders
        .keys()
        .copied()
        .chain(index.keys().map(String::as_str))
        .collect();
    let mut plan = Vec::new();
    for labels in labels {
        let held = holders.get(labels).map(Vec::as_slice).unwrap_or_default();
        let entry = index.get(labels);
        let named = entry.and_then(|e| e.id);
        if named.is_some_and(|n| held.contains(&n)) {
            continue;
        }
        let index_key = layout.index_key(labels);
        let (action, txn) = match (entry, held.first()) {
            (_, Some(&canonical)) => {
                let index_compare = entry.map_or_else(
                    || Compare::absent(&index_key),
                    |e| Compare::mod_revision(&index_key, e.revision),
                );
                let action = if entry.is_some() { "repoint" } else { "create" };
                let txn = Txn::new()
                    .when([
                        index_compare,
                        Compare::mod_revision(id_key(canonical), ids[&canonical].revision),
                    ])
                    .and_then([TxnOp::put(&index_key, canonical.to_string(), None)]);
                (action, txn)
            }
            (Some(e), None) => {
                let mut compares = vec![Compare::mod_revision(&index_key, e.revision)];
                if let Some(n) = named {
                    let revision = ids.get(&n).map_or(0, |l| l.revision);
                    compares.push(Compare::mod_revision(id_key(n), revision));
                }
                let txn = Txn::new()
                    .when(compares)
                    .and_then([TxnOp::delete(&index_key)]);
                ("delete", txn)
            }
            (None, None) => continue,
        };
        plan.push(Repair {
            labels: labels.to_owned(),
            action,
            txn,
        });
    }
    plan
}

impl Allocator {
    /// The id keys of the range.
    pub(super) async fn list_ids(&self) -> Result<BTreeMap<u32, ListedId>, IdentityError> {
        let listing = self
            .backend
            .list(&api::keys::identities_prefix())
            .await
            .map_err(backend_err("list identities"))?;
        Ok(listing
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let id = api::keys::parse_identity_key(&kv.key).ok()?.id.0;
                self.config.range.contains(&id).then(|| {
                    let labels = String::from_utf8_lossy(&kv.value).into_owned();
                    (
                        id,
                        ListedId {
                            labels,
                            revision: kv.mod_revision,
                        },
                    )
                })
            })
            .collect())
    }

    /// The index entries.
    pub(super) async fn list_index(&self) -> Result<BTreeMap<String, ListedIndex>, IdentityError> {
        let listing = self
            .backend
            .list(&self.layout.index)
            .await
            .map_err(backend_err("list identity index"))?;
        Ok(listing
            .kvs
            .into_iter()
            .map(|kv| {
                let labels = kv.key[self.layout.index.len()..].to_owned();
                let id = parse_id(&kv.value);
                (
                    labels,
                    ListedIndex {
                        id,
                        revision: kv.mod_revision,
                    },
                )
            })
            .collect())
    }

    /// Startup repair; returns the numbers taken.
    pub(super) async fn repair(&self) -> Result<HashSet<u32>, IdentityError> {
        let mut ids = self.list_ids().await?;
        for pass in 1..=REPAIR_PASSES {
            let index = self.list_index().await?;
            let plan = plan_repairs(&self.config.cluster, &ids, &index);
            let mut lost = 0;
            for repair in &plan {
                let outcome = self
                    .backend
                    .txn(&repair.txn)
                    .await
                    .map_err(backend_err("repair identity index"))?;
                if outcome.succeeded {
                    info!(labels = %repair.labels, action = repair.action, "repaired identity index");
                } else {
                    lost += 1;
                }
            }
            if lost == 0 {
                break;
            }
            if pass == REPAIR_PASSES {
                warn!(
                    lost,
                    "identity index repair kept losing to a concurrent writer; acquisition repairs the rest"
                );
            } else {
                ids = self.list_ids().await?;
            }
        }
        Ok(ids.into_keys().collect())
    }
}
