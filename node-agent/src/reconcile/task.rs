//! The reconciler: keeps the datapath's ipcache map, the WireGuard peers and
//! the tunnel routes equal to the merged state of every cluster.
//!
//! # Incremental passes
//!
//! Each connection's store forwarders queue the endpoints and nodes that
//! changed ([`crate::clusters::Changes`]) and wake the reconciler. A pass
//! takes the queued changes and applies each through the [`Index`]: the
//! record's current value replaces the claims it made before, and only the
//! prefixes it touched are compared with the map and written. So an
//! endpoint registered in a remote cluster costs a few map operations
//! whatever the number of entries.
//!
//! # Full passes
//!
//! When the set of connections that count changes (a cluster added,
//! removed, refused or reconnected, a store synced, a queue overflowed, the
//! sweep started), or a map write failed, the queued changes are dropped, the index is rebuilt from
//! the stores, and [`desired_state`], computed from scratch, is diffed
//! against the map ([`diff`]). Every [`RESYNC_PERIOD`] the reconciler runs a
//! **resync**: it applies what is queued, re-reads the map, and diffs the
//! from-scratch desired state against it. In steady state that finds
//! nothing; every write it has to make is counted as a *resync correction*
//! (status `reconcile.resync-corrections`, metric
//! `mesh_agent_reconcile_resync_corrections_total`) and logged with its
//! prefix. Non-zero means that the incremental path missed something, or
//! that someone else wrote the map. A difference is only counted when it
//! survives applying the changes that were in flight while it was found, so
//! churn during the resync is not mistaken for a correction, and not when
//! the prefix's last write failed (that is counted in `errors` already).
//!
//! **Restart.** The ipcache map is pinned and adopted: at start the
//! reconciler reads what it holds (the previous run's entries) as the
//! actual state and adds and updates from the first pass on, but deletes
//! nothing until every cluster has synced (or `--sync-timeout` passed);
//! from then on it sweeps. Routes and WireGuard peers follow the same rule:
//! before the sweep they are only added.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use api::ClusterName;
use datapath::{Ipcache, IpcacheEntry};
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{info, warn};
use tunnel::{
    routes::{self, RoutingMode, TunnelParams},
    WireguardDevice,
};

use crate::{
    clusters::{Change, ClusterEntry, ClusterStores, Mesh, Pending},
    reconcile::plan::{
        active_clusters, desired_state, diff, ActiveCluster, Index, LocalNode, Op, Touched,
    },
    status::StatusHub,
    trust::{self, Rules, Tally, Verdicts, Vetted},
};

/// The `not-owned` reasons the reconciler judges (nodes and endpoints).
const JUDGED: &[&str] = &["node-", "endpoint-"];

/// How often a resync (full pass over a re-read map) runs.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(30);

/// How many corrected prefixes one resync names in its log line.
const LOGGED_CORRECTIONS: usize = 16;

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
    /// The incremental view, and the [`Mesh::version`] it was built at
    /// (`None`: not built yet).
    index: Option<(u64, Index<Vetted<ClusterStores>>)>,
    /// The ownership rules, the verdicts the index reads through, and the
    /// records they refuse ([`crate::trust`]).
    rules: Rules,
    verdicts: Arc<Verdicts>,
    tally: Tally,
    /// Prefixes whose last write failed (counted in `errors`; retried by
    /// the next write of the prefix or the next full pass, and not counted
    /// again as resync corrections).
    failed: BTreeSet<IpNet>,
}

/// Errors of the reconciler's setup.
#[derive(Debug, thiserror::Error)]
pub enum ReconcilerError {
    /// The pinned ipcache map cannot be read.
    #[error("reading the adopted ipcache map")]
    Adopt(#[source] datapath::maps::Error),
}

/// What a pass did, for the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassKind {
    Incremental { changes: u64 },
    Full,
    Resync { corrections: u64 },
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
        rules: Rules,
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
            index: None,
            rules,
            verdicts: Arc::default(),
            tally: Tally::default(),
            failed: BTreeSet::new(),
        })
    }

    /// Runs passes until `shutdown` completes. Nothing is removed on the way
    /// out: the next agent adopts the map.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut resync = tokio::time::interval_at(Instant::now() + RESYNC_PERIOD, RESYNC_PERIOD);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.check_device();
        loop {
            self.pass().await;
            let deadline = self.sync_deadline;
            tokio::select! {
                () = &mut shutdown => return,
                () = self.mesh.changed() => {}
                _ = resync.tick() => {
                    self.pass().await;
                    self.resync().await;
                    self.check_device();
                }
                () = tokio::time::sleep_until(deadline), if !self.sweeping => {}
            }
        }
    }

    /// Checks that the WireGuard device answers and reports it in the
    /// status (`reconcile.wireguard`), so a wedged userspace device shows.
    fn check_device(&mut self) {
        let Some(wg) = &mut self.tunnel.wireguard else {
            return;
        };
        let backend = match wg.backend() {
            tunnel::wireguard::Backend::Kernel => "kernel",
            tunnel::wireguard::Backend::Userspace => "userspace",
        };
        let result = wg.health_check();
        if let Err(e) = &result {
            warn!(error = %kvstore::error_chain(e), "the WireGuard device does not answer");
        }
        self.hub.update_reconcile(|r| {
            let failures =
                r.wireguard.as_ref().map_or(0, |h| h.failures) + u64::from(result.is_err());
            r.wireguard = Some(api::agent::DeviceHealth {
                healthy: result.is_ok(),
                backend: backend.to_owned(),
                error: result.err().map(|e| kvstore::error_chain(&e)),
                failures,
            });
        });
    }

    /// Applies whatever changed since the last pass: incrementally, or by a
    /// full pass when the connections that count changed or a write failed
    /// (module docs).
    pub async fn pass(&mut self) {
        let started = Instant::now();
        let structural = match &self.index {
            None => true,
            Some(_) if !self.failed.is_empty() => true,
            Some((version, _)) => {
                *version != self.mesh.version()
                    || (!self.sweeping && Instant::now() >= self.sync_deadline)
            }
        };
        if structural {
            return self.full_pass(started, None).await;
        }
        let Some((_, index)) = &self.index else {
            return;
        };
        let mut pending: Vec<(usize, usize, Pending)> = Vec::new();
        for (ci, cluster) in index.clusters().iter().enumerate() {
            for (si, source) in cluster.sources.iter().enumerate() {
                pending.push((ci, si, source.stores().changes.take()));
            }
        }
        let nodes_changed = pending
            .iter()
            .any(|(_, _, p)| p.changes.iter().any(|c| matches!(c, Change::Node(_))));
        // A node change can change what its cluster, or another, owns: then
        // every endpoint is judged again, by a full pass.
        let verdicts_changed = nodes_changed
            && Verdicts::judge(&unvetted(index.clusters()), &self.rules) != *self.verdicts;
        if verdicts_changed || pending.iter().any(|(_, _, p)| p.full) {
            // What was taken is in the stores the full pass reads.
            return self.full_pass(started, None).await;
        }
        let Some((_, index)) = &mut self.index else {
            return;
        };
        let mut touched = Touched::default();
        let mut applied = 0u64;
        let mut newly_refused = Vec::new();
        for (ci, si, p) in &pending {
            for change in &p.changes {
                index.apply(*ci, *si, change, &mut touched);
                if let Change::Endpoint(ip) = change {
                    let cluster = &index.clusters()[*ci];
                    let sources: Vec<_> =
                        cluster.sources.iter().map(|s| s.stores().clone()).collect();
                    if let Some(reason) =
                        self.tally
                            .endpoint(&cluster.name, &sources, *ip, &self.verdicts)
                    {
                        newly_refused.push((
                            cluster.name.clone(),
                            format!("endpoint {ip}"),
                            reason,
                        ));
                    }
                }
            }
            applied += p.changes.len() as u64;
        }
        if applied == 0 {
            return;
        }
        for (cluster, record, reason) in newly_refused {
            warn!(%cluster, %record, %reason, "record refused: the cluster does not own what it claims");
        }
        self.hub.set_not_owned(JUDGED, &self.tally.counts());
        let mut errors = self.write_touched(&touched.prefixes);
        if touched.remotes {
            let remotes = index_remotes(&self.index);
            errors += self.apply_tunnel(&remotes).await;
        }
        self.report(started, errors, PassKind::Incremental { changes: applied });
    }

    /// Compares the touched prefixes' desired entries with the map and
    /// writes the differences (deletions first, and only when sweeping).
    fn write_touched(&mut self, prefixes: &[IpNet]) -> u64 {
        let Some((_, index)) = &self.index else {
            return 0;
        };
        let ops = index.ops_for(prefixes, &self.actual, self.sweeping);
        self.write(ops)
    }

    /// A full pass: rebuilds the index, diffs the from-scratch desired state
    /// against `self.actual` and writes the difference. With `suspects`
    /// (a resync), only differences on those prefixes are counted as
    /// corrections.
    async fn full_pass(&mut self, started: Instant, suspects: Option<&BTreeSet<IpNet>>) {
        let (version, clusters) = self.mesh.versioned_snapshot();
        self.update_sweeping(&clusters);
        let active = active_clusters(&clusters);
        for source in active.iter().flat_map(|c| &c.sources) {
            // The stores read below already hold what these changes name.
            source.changes.take();
        }
        self.judge(&active);
        let active = trust::vet(active, &self.verdicts);
        let desired = desired_state(&active, &self.me);
        let index = Index::build(active, self.me.clone());
        self.index = Some((version, index));
        let ops = diff(&desired.ipcache, &self.actual, self.sweeping);
        let kind = match suspects {
            None => PassKind::Full,
            Some(suspects) => {
                let corrected: Vec<IpNet> = ops
                    .iter()
                    .map(|op| match op {
                        Op::Upsert(p, _) | Op::Delete(p) => *p,
                    })
                    .filter(|p| suspects.contains(p) && !self.failed.contains(p))
                    .collect();
                if !corrected.is_empty() {
                    warn!(
                        corrections = corrected.len(),
                        prefixes = ?&corrected[..corrected.len().min(LOGGED_CORRECTIONS)],
                        "the resync corrected ipcache entries the incremental passes left wrong"
                    );
                }
                PassKind::Resync {
                    corrections: corrected.len() as u64,
                }
            }
        };
        let mut errors = self.write(ops);
        errors += self.apply_tunnel(&desired.remotes).await;
        self.report(started, errors, kind);
    }

    /// The periodic check (module docs): re-reads the map and diffs the
    /// from-scratch desired state against it; a difference that is still
    /// there after the changes in flight are applied is a correction.
    pub async fn resync(&mut self) {
        let started = Instant::now();
        match read_map(&self.ipcache) {
            Ok(actual) => self.actual = actual,
            Err(e) => warn!(error = %e, "re-reading the ipcache map"),
        }
        self.last_plan = None;
        let clusters = self.mesh.snapshot();
        let active = active_clusters(&clusters);
        let verdicts = Arc::new(Verdicts::judge(&active, &self.rules));
        let desired = desired_state(&trust::vet(active, &verdicts), &self.me);
        let suspects: BTreeSet<IpNet> = diff(&desired.ipcache, &self.actual, self.sweeping)
            .into_iter()
            .map(|op| match op {
                Op::Upsert(p, _) | Op::Delete(p) => p,
            })
            .collect();
        if !suspects.is_empty() {
            // Let the forwarders queue what the stores hold already, then
            // apply it the normal way.
            tokio::task::yield_now().await;
            self.pass().await;
        }
        self.full_pass(started, Some(&suspects)).await;
    }

    /// Judges every record of `active` ([`crate::trust`]), logs each record
    /// refused now and not before, and reports the counts.
    fn judge(&mut self, active: &[ActiveCluster<ClusterStores>]) {
        let verdicts = Verdicts::judge(active, &self.rules);
        let tally = Tally::of(active, &verdicts);
        for (cluster, record, reason) in tally.new_since(&self.tally) {
            warn!(%cluster, %record, %reason, "record refused: the cluster does not own what it claims");
        }
        self.hub.set_not_owned(JUDGED, &tally.counts());
        self.verdicts = Arc::new(verdicts);
        self.tally = tally;
    }

    fn update_sweeping(&mut self, clusters: &BTreeMap<ClusterName, ClusterEntry>) {
        if self.sweeping {
            return;
        }
        if all_synced(clusters) {
            info!("every cluster synced; removing stale entries from now on");
            self.sweeping = true;
        } else if Instant::now() >= self.sync_deadline {
            warn!("sync timeout passed before every cluster synced; removing stale entries anyway");
            self.sweeping = true;
        }
    }

    /// Writes `ops` to the map and `self.actual`; returns the failures.
    fn write(&mut self, ops: Vec<Op<IpNet, IpcacheEntry>>) -> u64 {
        let mut errors = 0u64;
        for op in ops {
            match op {
                Op::Upsert(prefix, entry) => match self.ipcache.upsert(prefix, entry) {
                    Ok(()) => {
                        self.actual.insert(prefix, entry);
                        self.failed.remove(&prefix);
                    }
                    Err(e) => {
                        errors += 1;
                        self.failed.insert(prefix);
                        warn!(%prefix, error = %e, "ipcache upsert failed");
                    }
                },
                Op::Delete(prefix) => match self.ipcache.remove(prefix) {
                    Ok(_) => {
                        self.actual.remove(&prefix);
                        self.failed.remove(&prefix);
                    }
                    Err(e) => {
                        errors += 1;
                        self.failed.insert(prefix);
                        warn!(%prefix, error = %e, "ipcache delete failed");
                    }
                },
            }
        }
        errors
    }

    fn report(&self, started: Instant, errors: u64, kind: PassKind) {
        let took = started.elapsed().as_secs_f64();
        let entries = self.actual.len() as u64;
        let sweeping = self.sweeping;
        let conflicts = self.index.as_ref().map_or(0, |(_, i)| i.conflicts());
        self.hub.update_reconcile(|r| {
            r.runs += 1;
            r.errors += errors;
            r.ipcache_entries = entries;
            r.last_duration_seconds = took;
            r.sweeping = sweeping;
            r.conflicts = conflicts;
            match kind {
                PassKind::Incremental { changes } => {
                    r.incremental_passes += 1;
                    r.changes_applied += changes;
                }
                PassKind::Full | PassKind::Resync { .. } => {
                    r.full_passes += 1;
                    r.last_full_duration_seconds = took;
                }
            }
            if let PassKind::Resync { corrections } = kind {
                r.resyncs += 1;
                r.resync_corrections += corrections;
            }
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

/// The clusters of a vetted view, as their stores hold them.
fn unvetted<S>(clusters: &[ActiveCluster<Vetted<S>>]) -> Vec<ActiveCluster<S>> {
    clusters
        .iter()
        .map(|c| ActiveCluster {
            name: c.name.clone(),
            local: c.local,
            sources: c.sources.iter().map(|s| s.stores().clone()).collect(),
        })
        .collect()
}

fn index_remotes(
    index: &Option<(u64, Index<Vetted<ClusterStores>>)>,
) -> BTreeMap<String, routes::RemoteNode> {
    index
        .as_ref()
        .map(|(_, i)| i.remotes().clone())
        .unwrap_or_default()
}

/// Whether every cluster that is not refused has synced.
pub fn all_synced(clusters: &BTreeMap<ClusterName, ClusterEntry>) -> bool {
    clusters.values().all(|c| c.refused || c.synced())
}

fn read_map(ipcache: &Ipcache) -> Result<BTreeMap<IpNet, IpcacheEntry>, datapath::maps::Error> {
    ipcache.iter().collect()
}
