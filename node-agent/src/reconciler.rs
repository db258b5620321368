//! The reconciler: keeps the datapath's ipcache map, the WireGuard peers and
//! the tunnel routes equal to the merged state of every cluster.
//!
//! One task runs passes: whenever a cluster task or a store reports a
//! change ([`Mesh::changed`], coalesced), and every [`RESYNC_PERIOD`] to
//! repair what someone else changed. A pass computes
//! [`desired_state`], diffs it against what the map holds and writes only
//! the difference ([`diff`]).
//!
//! **Restart.** The ipcache map is pinned and adopted: at start the
//! reconciler reads what it holds (the previous run's entries) as the
//! actual state and adds and updates from the first pass on, but deletes
//! nothing until every cluster has synced (or `--sync-timeout` passed);
//! from then on it sweeps. Routes and WireGuard peers follow the same rule:
//! before the sweep they are only added.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use datapath::{Ipcache, IpcacheEntry};
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{info, warn};
use tunnel::{
    routes::{self, RoutingMode, TunnelParams},
    WireguardDevice,
};

use crate::{
    clusters::{ClusterEntry, Mesh},
    reconcile::{desired_state, diff, LocalNode, Op},
    status::StatusHub,
};

/// How often a pass runs without any change reported.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(30);

/// The tunnel layer's part of the reconciler.
#[derive(Debug)]
pub struct TunnelState {
    /// Connection in the node's namespace.
    pub netlink: tunnel::Netlink,
    /// The WireGuard device (with `--encryption wireguard`).
    pub wireguard: Option<WireguardDevice>,
    /// Routing and encryption.
    pub mode: RoutingMode,
    /// Device names, ports, tables.
    pub params: TunnelParams,
}

/// The reconciler task's state.
#[derive(Debug)]
pub struct Reconciler {
    ipcache: Ipcache,
    actual: BTreeMap<IpNet, IpcacheEntry>,
    tunnel: TunnelState,
    me: LocalNode,
    mesh: Arc<Mesh>,
    hub: Arc<StatusHub>,
    sync_deadline: Instant,
    sweeping: bool,
    last_plan: Option<routes::Plan>,
}

/// Errors of the reconciler's setup.
#[derive(Debug, thiserror::Error)]
pub enum ReconcilerError {
    /// The pinned ipcache map cannot be read.
    #[error("reading the adopted ipcache map")]
    Adopt(#[source] datapath::maps::Error),
}

impl Reconciler {
    /// Adopts `ipcache` (its entries are the previous run's) and prepares
    /// the task.
    ///
    /// # Errors
    ///
    /// [`ReconcilerError::Adopt`] when the map cannot be iterated.
    pub fn new(
        ipcache: Ipcache,
        tunnel: TunnelState,
        me: LocalNode,
        mesh: Arc<Mesh>,
        hub: Arc<StatusHub>,
        sync_timeout: Duration,
    ) -> Result<Self, ReconcilerError> {
        let actual = read_map(&ipcache).map_err(ReconcilerError::Adopt)?;
        info!(entries = actual.len(), "adopted the ipcache map");
        Ok(Self {
            ipcache,
            actual,
            tunnel,
            me,
            mesh,
            hub,
            sync_deadline: Instant::now() + sync_timeout,
            sweeping: false,
            last_plan: None,
        })
    }

    /// Runs passes until `shutdown` completes. Nothing is removed on the way
    /// out: the next agent adopts the map.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            self.pass().await;
            let deadline = self.sync_deadline;
            tokio::select! {
                () = &mut shutdown => return,
                () = self.mesh.changed() => {}
                () = tokio::time::sleep(RESYNC_PERIOD) => {
                    match read_map(&self.ipcache) {
                        Ok(actual) => self.actual = actual,
                        Err(e) => warn!(error = %e, "re-reading the ipcache map"),
                    }
                    self.last_plan = None;
                }
                () = tokio::time::sleep_until(deadline), if !self.sweeping => {}
            }
        }
    }

    /// One pass; see the module docs.
    pub async fn pass(&mut self) {
        let started = Instant::now();
        let clusters = self.mesh.snapshot();
        if !self.sweeping {
            if all_synced(&clusters) {
                info!("every cluster synced; removing stale entries from now on");
                self.sweeping = true;
            } else if Instant::now() >= self.sync_deadline {
                warn!("sync timeout passed before every cluster synced; removing stale entries anyway");
                self.sweeping = true;
            }
        }
        let desired = desired_state(&clusters, &self.me);
        let mut errors = 0u64;
        for op in diff(&desired.ipcache, &self.actual, self.sweeping) {
            match op {
                Op::Upsert(prefix, entry) => match self.ipcache.upsert(prefix, entry) {
                    Ok(()) => {
                        self.actual.insert(prefix, entry);
                    }
                    Err(e) => {
                        errors += 1;
                        warn!(%prefix, error = %e, "ipcache upsert failed");
                    }
                },
                Op::Delete(prefix) => match self.ipcache.remove(prefix) {
                    Ok(_) => {
                        self.actual.remove(&prefix);
                    }
                    Err(e) => {
                        errors += 1;
                        warn!(%prefix, error = %e, "ipcache delete failed");
                    }
                },
            }
        }
        errors += self.apply_tunnel(&desired.remotes).await;
        let took = started.elapsed();
        let entries = self.actual.len() as u64;
        let sweeping = self.sweeping;
        self.hub.update_reconcile(|r| {
            r.runs += 1;
            r.errors += errors;
            r.ipcache_entries = entries;
            r.last_duration_seconds = took.as_secs_f64();
            r.sweeping = sweeping;
            r.conflicts = desired.conflicts;
        });
    }

    /// Routes, rules and peers; returns the number of failures.
    async fn apply_tunnel(&mut self, remotes: &BTreeMap<String, routes::RemoteNode>) -> u64 {
        let nodes: Vec<routes::RemoteNode> = remotes.values().cloned().collect();
        let mut plan = routes::plan(self.tunnel.mode, &nodes, &self.tunnel.params);
        if self.last_plan.as_ref() == Some(&plan) {
            return 0;
        }
        for r in &plan.rejected {
            warn!(node = %r.node, reason = %r.reason, "remote node left out of the tunnel plan");
        }
        let mut errors = 0;
        if !self.sweeping {
            // Only add before the sweep: keep what the previous run installed.
            match routes::installed_routes(&self.tunnel.netlink).await {
                Ok(installed) => plan.routes.extend(installed),
                Err(e) => {
                    errors += 1;
                    warn!(error = %e, "listing installed routes");
                }
            }
            match routes::installed_rules(&self.tunnel.netlink).await {
                Ok(installed) => plan.rules.extend(installed),
                Err(e) => {
                    errors += 1;
                    warn!(error = %e, "listing installed rules");
                }
            }
            if let Some(wg) = &self.tunnel.wireguard {
                for peer in wg.peers() {
                    if !plan.peers.iter().any(|p| p.public_key == peer.public_key) {
                        plan.peers.push(peer);
                    }
                }
            }
        }
        if let Some(wg) = &mut self.tunnel.wireguard {
            match wg.set_peers(plan.peers.clone()) {
                Ok(changes) if !changes.is_empty() => info!(
                    added = changes.added.len(),
                    removed = changes.removed.len(),
                    replaced = changes.replaced.len(),
                    "wireguard peers updated"
                ),
                Ok(_) => {}
                Err(e) => {
                    errors += 1;
                    warn!(error = %e, "setting wireguard peers");
                }
            }
        }
        if let Err(e) = routes::apply_routes(&self.tunnel.netlink, &plan.routes).await {
            errors += 1;
            warn!(error = %e, "applying tunnel routes");
        }
        if let Err(e) = routes::apply_rules(&self.tunnel.netlink, &plan.rules).await {
            errors += 1;
            warn!(error = %e, "applying tunnel rules");
        }
        // Remember the plan only when it was fully applied and final, so a
        // failure or the pre-sweep merge is retried on the next pass.
        self.last_plan = (errors == 0 && self.sweeping)
            .then(|| routes::plan(self.tunnel.mode, &nodes, &self.tunnel.params));
        errors
    }
}

/// Whether every cluster that is not refused has synced.
pub fn all_synced(clusters: &BTreeMap<String, ClusterEntry>) -> bool {
    clusters.values().all(|c| c.refused || c.synced())
}

fn read_map(ipcache: &Ipcache) -> Result<BTreeMap<IpNet, IpcacheEntry>, datapath::maps::Error> {
    ipcache.iter().collect()
}
