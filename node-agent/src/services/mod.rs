//! Services: the local cluster's services (all of them, from the local
//! apiserver) merged with the global services other clusters export, turned
//! into the datapath's load-balancer state.
//!
//! # Where services come from
//!
//! * **Local services** come from the local clustermesh-apiserver's
//!   `WatchServices` stream ([`watch_local_services`]): every service with
//!   its local backends, global or not, `shared=false` included. The local
//!   etcd holds only what the cluster *exports* (global services, without
//!   local backends when `shared=false`), so it cannot be the source of the
//!   local view. The stream sends a full snapshot on every change; a broken
//!   stream keeps the last snapshot and reconnects with jittered backoff.
//! * **Remote services** are the `cilium/state/services/v1/<cluster>/...`
//!   records of every other cluster, read by the cluster tasks
//!   ([`crate::clusters`]) and validated against that cluster's name and ID.
//!
//! # Merging (Cilium's rules)
//!
//! As in Cilium's service cache (`correlateEndpoints`), a service is merged
//! by namespace and name, and only where the **local** service exists and is
//! global: a remote cluster's global service with no local counterpart is not
//! programmed, and a local service that is not global gets local backends
//! only, whatever other clusters export. Frontends are always the local
//! service's. Remote backends are matched to a frontend port by port name
//! and protocol. A backend IP already present (the local cluster's, or an
//! earlier cluster's by name) is not added twice.
//!
//! `shared=false` is applied by the apiserver that exports the service (its
//! backends stay out of the export); locally such a service still imports
//! remote backends. Affinity marks backends `preferred`
//! ([`datapath::Backend::preferred`]): `local` the local ones, `remote` the
//! remote ones, `none` none; the datapath puts only preferred backends into
//! the Maglev table while any is active and falls back to all of them
//! otherwise.
//!
//! # Programming
//!
//! [`ServiceReconciler`] holds the node's one [`LoadBalancer`] and writes by
//! diff: a frontend whose flags and backend set are unchanged is not touched
//! (so its Maglev table is not rebuilt), a changed one gets one
//! [`LoadBalancer::set_service`], a vanished one one
//! [`LoadBalancer::remove_service`].
//!
//! **Restart.** The load balancer adopts the pinned maps, so packets keep
//! being translated with the previous run's services. The reconciler writes
//! nothing until the local snapshot has arrived and every cluster has synced
//! (or `--sync-timeout` passed): a partial view would otherwise remove
//! remote backends, or whole services, that are still live.

mod merge;
mod source;
mod task;

pub use merge::{desired_services, DesiredFrontend, DesiredServices};
pub use source::{
    watch_local_services, LocalService, LocalServices, ServiceError, ServicePort, WatchError,
};
pub use task::ServiceReconciler;

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use api::agent::ServicesStatus;
use api::ClusterName;
use datapath::LoadBalancer;
use tracing::{info, Instrument as _};

use crate::{clusters::Mesh, status::StatusHub, trust::Rules};

/// Spawns the local-services stream (when an apiserver is configured) and
/// the service reconciler; both end with `shutdown`.
///
/// # Errors
///
/// When the load balancer's maps cannot be opened under `bpffs`.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site, each argument distinct"
)]
pub fn spawn<F>(
    bpffs: &std::path::Path,
    apiserver: Option<String>,
    mesh: Arc<Mesh>,
    status: Arc<RwLock<ServicesStatus>>,
    local_cluster: ClusterName,
    local_id: api::ClusterId,
    sync_timeout: Duration,
    hub: Arc<StatusHub>,
    rules: Rules,
    shutdown: impl Fn() -> F,
) -> Result<Vec<tokio::task::JoinHandle<()>>, datapath::lb::Error>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let lb = LoadBalancer::open(bpffs)?;
    let local = Arc::new(LocalServices::default());
    let mut tasks = Vec::new();
    if let Some(url) = apiserver {
        let span = tracing::info_span!("local_services", apiserver = %url);
        tasks.push(tokio::spawn(
            watch_local_services(url, local.clone(), mesh.clone(), shutdown()).instrument(span),
        ));
    } else {
        info!("no --apiserver: no services are programmed");
    }
    let reconciler = ServiceReconciler::new(
        lb,
        local,
        mesh,
        status,
        local_cluster.to_string(),
        local_id.get(),
        sync_timeout,
        hub,
        rules,
    );
    tasks.push(tokio::spawn(
        reconciler
            .run(shutdown())
            .instrument(tracing::info_span!("services")),
    ));
    Ok(tasks)
}
