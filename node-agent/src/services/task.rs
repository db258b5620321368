//! The service reconciler: writes the desired services into the node's
//! load balancer, by diff.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use api::agent::ServicesStatus;
use datapath::{Backend, Frontend, LoadBalancer, ServiceFlags};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{desired_services, LocalServices};
use crate::{
    clusters::Mesh,
    reconcile::plan::active_clusters,
    status::StatusHub,
    trust::{Reason, Rules, Verdicts},
};

/// The service reconciler task.
#[derive(Debug)]
pub struct ServiceReconciler {
    lb: LoadBalancer,
    /// What was last written per frontend (flags, backends).
    actual: BTreeMap<Frontend, (ServiceFlags, Vec<Backend>)>,
    local: Arc<LocalServices>,
    mesh: Arc<Mesh>,
    status: Arc<RwLock<ServicesStatus>>,
    local_cluster: String,
    local_id: u16,
    sync_deadline: Instant,
    ready: bool,
    hub: Arc<StatusHub>,
    rules: Rules,
    /// Backends refused in the last pass (each is logged once).
    refused: BTreeSet<(String, String, IpAddr)>,
}

impl ServiceReconciler {
    /// Prepares the task over an opened load balancer.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, each argument distinct"
    )]
    pub fn new(
        lb: LoadBalancer,
        local: Arc<LocalServices>,
        mesh: Arc<Mesh>,
        status: Arc<RwLock<ServicesStatus>>,
        local_cluster: String,
        local_id: u16,
        sync_timeout: Duration,
        hub: Arc<StatusHub>,
        rules: Rules,
    ) -> Self {
        Self {
            lb,
            actual: BTreeMap::new(),
            local,
            mesh,
            status,
            local_cluster,
            local_id,
            sync_deadline: Instant::now() + sync_timeout,
            ready: false,
            hub,
            rules,
            refused: BTreeSet::new(),
        }
    }

    /// Runs passes on every change until `shutdown`. Nothing is removed on
    /// the way out: the next agent adopts the maps.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            self.pass();
            let deadline = self.sync_deadline;
            tokio::select! {
                () = &mut shutdown => return,
                () = self.mesh.services_changed() => {}
                () = tokio::time::sleep_until(deadline), if !self.ready => {}
            }
        }
    }

    /// One pass: compute, diff, write.
    pub fn pass(&mut self) {
        let clusters = self.mesh.snapshot();
        let Some(local) = self.local.get() else {
            return;
        };
        if !self.ready {
            if crate::reconcile::task::all_synced(&clusters) {
                info!("local services received and every cluster synced; programming services");
            } else if Instant::now() >= self.sync_deadline {
                warn!(
                    "sync timeout passed before every cluster synced; programming services anyway"
                );
            } else {
                return;
            }
            self.ready = true;
        }
        let verdicts = Verdicts::judge(&active_clusters(&clusters), &self.rules);
        let desired = desired_services(
            &local,
            &clusters,
            &self.local_cluster,
            self.local_id,
            &verdicts,
        );
        self.report_refused(&desired.refused_backends);
        let mut errors = 0u64;
        if self.actual.is_empty() {
            // First pass: frontends adopted from the previous run that are
            // no longer wanted.
            let adopted: Vec<Frontend> = self.lb.services().map(|(f, _)| f).collect();
            for frontend in adopted {
                if !desired.frontends.contains_key(&frontend) {
                    self.remove(frontend, &mut errors);
                }
            }
        }
        let vanished: Vec<Frontend> = self
            .actual
            .keys()
            .filter(|f| !desired.frontends.contains_key(f))
            .copied()
            .collect();
        for frontend in vanished {
            self.remove(frontend, &mut errors);
        }
        for (frontend, want) in &desired.frontends {
            if self
                .actual
                .get(frontend)
                .is_some_and(|(flags, backends)| *flags == want.flags && *backends == want.backends)
            {
                continue;
            }
            match self.lb.set_service(*frontend, want.flags, &want.backends) {
                Ok(update) => {
                    info!(
                        %frontend,
                        service = %want.service,
                        backends = want.backends.len(),
                        members = update.table_members,
                        rebuilt = update.table_rebuilt,
                        "service programmed"
                    );
                    self.actual
                        .insert(*frontend, (want.flags, want.backends.clone()));
                }
                Err(e) => {
                    errors += 1;
                    warn!(%frontend, service = %want.service, error = %kvstore::error_chain(&e), "programming service failed");
                }
            }
        }
        let frontends = self.actual.len() as u64;
        let mut status = self
            .status
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        status.programming = true;
        status.frontends = frontends;
        status.errors += errors;
        status.conflicts = desired.conflicts;
        status.services = desired.status;
    }

    /// Logs the backends refused now and not before, and reports the counts
    /// (`not-owned`).
    fn report_refused(&mut self, refused: &BTreeSet<(String, String, IpAddr)>) {
        for (cluster, service, ip) in refused.difference(&self.refused) {
            warn!(%cluster, %service, backend = %ip, reason = %Reason::ServiceBackendNotAnEndpoint,
                "backend refused: not an endpoint of the cluster that exports it");
        }
        let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (cluster, _, _) in refused {
            *counts
                .entry(cluster.clone())
                .or_default()
                .entry(Reason::ServiceBackendNotAnEndpoint.as_str().to_owned())
                .or_default() += 1;
        }
        self.hub.set_not_owned(&["service-"], &counts);
        self.refused.clone_from(refused);
    }

    fn remove(&mut self, frontend: Frontend, errors: &mut u64) {
        match self.lb.remove_service(frontend) {
            Ok(_) => {
                info!(%frontend, "service removed");
                self.actual.remove(&frontend);
            }
            Err(e) => {
                *errors += 1;
                warn!(%frontend, error = %kvstore::error_chain(&e), "removing service failed");
            }
        }
    }
}
