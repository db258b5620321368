//! The shared view of every cluster, and the claims that keep cluster IDs
//! unique.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use api::{ClusterId, ClusterName};
use tokio::sync::Notify;

use super::ClusterStores;

/// What the mesh knows about one cluster.
#[derive(Debug, Default, Clone)]
pub struct ClusterEntry {
    /// This node's own cluster.
    pub local: bool,
    /// The stores of the current connection.
    pub current: Option<Arc<ClusterStores>>,
    /// The stores of the previous connection, kept until `current` synced.
    pub previous: Option<Arc<ClusterStores>>,
    /// Refused (duplicate ID, wrong mode): does not hold up the sweep.
    pub refused: bool,
}

impl ClusterEntry {
    /// Whether the current connection has synced every kind.
    pub fn synced(&self) -> bool {
        self.current.as_ref().is_some_and(|s| s.synced().all())
    }

    /// The stores whose records count: the current ones, plus the previous
    /// ones while the current ones have not synced yet.
    pub fn sources(&self) -> impl Iterator<Item = &Arc<ClusterStores>> {
        let keep_previous = !self.synced();
        self.current
            .iter()
            .chain(self.previous.iter().filter(move |_| keep_previous))
    }
}

/// The shared view of every cluster, read by the reconciler and the status.
#[derive(Debug, Default)]
pub struct Mesh {
    clusters: RwLock<BTreeMap<ClusterName, ClusterEntry>>,
    /// Bumped (under the `clusters` write lock) by every change of
    /// `clusters`, so the reconciler knows when its view of which
    /// connections count is out of date.
    version: AtomicU64,
    /// Cluster ID → name of the cluster holding it.
    claims: Mutex<BTreeMap<ClusterId, ClusterName>>,
    changed: Notify,
    /// The service reconciler's own wake-up ([`crate::services`]).
    services_changed: Notify,
}

impl Mesh {
    /// Wakes the reconciler and the service reconciler.
    pub fn notify(&self) {
        self.changed.notify_one();
        self.services_changed.notify_one();
    }

    /// Like [`Mesh::changed`], for the service reconciler.
    pub async fn services_changed(&self) {
        self.services_changed.notified().await;
    }

    /// Wakes only the (ipcache) reconciler: an endpoint or node changed.
    pub fn notify_reconciler(&self) {
        self.changed.notify_one();
    }

    /// Waits for the next change (changes while nobody waits are kept as
    /// one pending wake-up, so none is lost and bursts coalesce).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// A copy of every cluster's entry.
    pub fn snapshot(&self) -> BTreeMap<ClusterName, ClusterEntry> {
        self.versioned_snapshot().1
    }

    /// The version of the cluster map: it changes whenever a cluster, a
    /// connection or a refusal does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// [`Mesh::version`] and [`Mesh::snapshot`], read together.
    pub fn versioned_snapshot(&self) -> (u64, BTreeMap<ClusterName, ClusterEntry>) {
        let map = self
            .clusters
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (self.version.load(Ordering::Acquire), map.clone())
    }

    fn write(&self, f: impl FnOnce(&mut BTreeMap<ClusterName, ClusterEntry>)) {
        let mut map = self
            .clusters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut map);
        self.version.fetch_add(1, Ordering::AcqRel);
        drop(map);
        self.notify();
    }

    /// Applies `f` to the entry of `cluster` (created if new).
    pub(crate) fn update(&self, cluster: &ClusterName, f: impl FnOnce(&mut ClusterEntry)) {
        self.write(|map| f(map.entry(cluster.clone()).or_default()));
    }

    /// Removes `cluster` (its config file is gone): its entries are drained
    /// by the next reconcile pass.
    pub fn remove(&self, cluster: &str) {
        self.write(|map| {
            map.remove(cluster);
        });
    }

    pub(super) fn claim(
        &self,
        cluster: &ClusterName,
        id: ClusterId,
    ) -> Result<ClaimGuard<'_>, ClusterName> {
        let mut claims = self
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match claims.get(&id) {
            Some(owner) if owner != cluster => Err(owner.clone()),
            _ => {
                claims.insert(id, cluster.clone());
                Ok(ClaimGuard { mesh: self, id })
            }
        }
    }
}

/// Releases a cluster ID claim when the connection ends (also on abort).
pub(super) struct ClaimGuard<'a> {
    mesh: &'a Mesh,
    id: ClusterId,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        self.mesh
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_refuse_a_second_owner_and_release_on_drop() {
        let mesh = Mesh::default();
        let (c2, c3): (ClusterName, ClusterName) = ("c2".parse().unwrap(), "c3".parse().unwrap());
        let id = ClusterId::new(2, api::MaxConnectedClusters::Max255).unwrap();
        let a = mesh.claim(&c2, id).unwrap();
        assert_eq!(mesh.claim(&c3, id).err(), Some(c2));
        drop(a);
        assert!(mesh.claim(&c3, id).is_ok());
    }
}
