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

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use api::agent::{Affinity, BackendStatus, FrontendStatus, ServiceStatus, ServicesStatus};
use api::{ClusterName, ClusterService};
use backon::{BackoffBuilder, ExponentialBuilder};
use datapath::{Backend, Frontend, LoadBalancer, Protocol, ServiceFlags};
use futures::StreamExt as _;
use mesh_proto::v1 as pb;
use tokio::time::Instant;
use tracing::{info, warn, Instrument as _};

use crate::clusters::{ClusterEntry, Mesh};

/// How long connecting to the apiserver may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a service the apiserver sent cannot be used: the field that does
/// not parse ([`mesh_proto::convert::registered_service`]).
pub type ServiceError = mesh_proto::FieldError;

/// Errors of the apiserver stream.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The URL is not a valid endpoint.
    #[error("apiserver URL {url:?}")]
    Url {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting failed.
    #[error("connecting to the apiserver at {url}")]
    Connect {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The call or the stream failed.
    #[error("WatchServices on {url}")]
    Rpc {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: tonic::Status,
    },
    /// The stream ended.
    #[error("the apiserver at {url} ended the WatchServices stream")]
    Ended {
        /// The URL.
        url: String,
    },
}

/// One port of a service's frontends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (matches backend ports by name).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Frontend port.
    pub port: u16,
}

/// A service of the local cluster, as the apiserver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Cluster IPs.
    pub frontend_ips: Vec<IpAddr>,
    /// Ports (SCTP ports left out).
    pub ports: Vec<ServicePort>,
    /// `service.cilium.io/global`.
    pub global: bool,
    /// `service.cilium.io/shared`.
    pub shared: bool,
    /// `service.cilium.io/affinity`.
    pub affinity: Affinity,
    /// Local backends: IP → port name → (protocol, port).
    pub backends: BTreeMap<IpAddr, BTreeMap<String, (Protocol, u16)>>,
}

impl LocalService {
    /// Converts one entry of a `ListServicesResponse` (parsed by the
    /// apiserver's own parser); SCTP ports are left out: the datapath
    /// balances TCP and UDP only.
    ///
    /// # Errors
    ///
    /// A [`ServiceError`] naming the first invalid field.
    pub fn from_proto(registered: pb::RegisteredService) -> Result<Self, ServiceError> {
        use mesh_proto::model::Protocol as Wire;
        let l4 = |p: Wire| match p {
            Wire::Tcp => Some(Protocol::Tcp),
            Wire::Udp => Some(Protocol::Udp),
            Wire::Sctp => None,
        };
        let parsed = mesh_proto::convert::registered_service(registered)?;
        let svc = parsed.spec;
        let ports = svc
            .ports
            .iter()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone(),
                    protocol: l4(p.protocol)?,
                    port: p.port,
                })
            })
            .collect();
        let backends = parsed
            .backends
            .into_iter()
            .map(|(ip, ports)| {
                let by_name = ports
                    .into_iter()
                    .filter_map(|(name, p)| Some((name, (l4(p.protocol)?, p.port))))
                    .collect();
                (ip, by_name)
            })
            .collect();
        Ok(Self {
            namespace: svc.namespace,
            name: svc.name,
            frontend_ips: svc.frontend_ips,
            ports,
            global: svc.global,
            shared: svc.shared,
            affinity: svc.affinity,
            backends,
        })
    }
}

/// The local services, shared between the apiserver stream and the
/// reconciler. `None` until the first snapshot arrived.
#[derive(Debug, Default)]
pub struct LocalServices {
    snapshot: RwLock<Option<Arc<Vec<LocalService>>>>,
}

impl LocalServices {
    /// The latest snapshot, if one arrived.
    pub fn get(&self) -> Option<Arc<Vec<LocalService>>> {
        self.snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the snapshot; `false` when it equals the current one.
    pub fn set(&self, services: Vec<LocalService>) -> bool {
        let mut slot = self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_deref() == Some(&services) {
            return false;
        }
        *slot = Some(Arc::new(services));
        true
    }
}

/// Follows the apiserver's `WatchServices` stream at `url` into `local`,
/// waking the service reconciler through `mesh` on every change, until
/// `shutdown`. Invalid services are logged and left out. A failure keeps
/// the last snapshot and reconnects with jittered exponential backoff.
pub async fn watch_local_services(
    url: String,
    local: Arc<LocalServices>,
    mesh: Arc<Mesh>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let builder = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times();
    let mut backoff = builder.build();
    tokio::pin!(shutdown);
    loop {
        let mut received = false;
        let error = tokio::select! {
            () = &mut shutdown => return,
            e = follow(&url, &local, &mesh, &mut received) => e,
        };
        if received {
            backoff = builder.build();
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        warn!(error = %kvstore::error_chain(&error), ?delay, "local services stream broke; keeping the last snapshot");
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn follow(url: &str, local: &LocalServices, mesh: &Mesh, received: &mut bool) -> WatchError {
    let endpoint = match tonic::transport::Endpoint::from_shared(url.to_owned()) {
        Ok(e) => e.connect_timeout(CONNECT_TIMEOUT),
        Err(source) => {
            return WatchError::Url {
                url: url.to_owned(),
                source,
            }
        }
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(source) => {
            return WatchError::Connect {
                url: url.to_owned(),
                source,
            }
        }
    };
    let mut client = pb::registry_client::RegistryClient::new(channel);
    let mut stream = match client.watch_services(pb::WatchServicesRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(source) => {
            return WatchError::Rpc {
                url: url.to_owned(),
                source,
            }
        }
    };
    while let Some(message) = stream.next().await {
        let snapshot = match message {
            Ok(s) => s,
            Err(source) => {
                return WatchError::Rpc {
                    url: url.to_owned(),
                    source,
                }
            }
        };
        let mut services = Vec::with_capacity(snapshot.services.len());
        for registered in snapshot.services {
            match LocalService::from_proto(registered) {
                Ok(s) => services.push(s),
                Err(e) => warn!(error = %e, "local service left out"),
            }
        }
        if !*received {
            info!(services = services.len(), "local services received");
        }
        *received = true;
        if local.set(services) {
            mesh.notify();
        }
    }
    WatchError::Ended {
        url: url.to_owned(),
    }
}

/// What one frontend should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// `namespace/name` of the service.
    pub service: String,
    /// Service flags.
    pub flags: ServiceFlags,
    /// Every backend, sorted by (cluster, address).
    pub backends: Vec<Backend>,
}

/// The merged services of every cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredServices {
    /// Frontend → its desired state.
    pub frontends: BTreeMap<Frontend, DesiredFrontend>,
    /// Per service, for the status document.
    pub status: Vec<ServiceStatus>,
    /// Frontends claimed by two services, or backend IPs offered by two
    /// clusters (the first one wins).
    pub conflicts: u64,
}

/// One remote cluster's export of one service.
struct RemoteExport {
    cluster: String,
    cluster_id: u16,
    service: Arc<ClusterService>,
}

/// Every remote cluster's exported services by `(namespace, name)`, clusters
/// in name order, the current connection's records before the previous one's.
fn remote_exports(
    clusters: &BTreeMap<ClusterName, ClusterEntry>,
) -> BTreeMap<(String, String), Vec<RemoteExport>> {
    let mut out: BTreeMap<(String, String), Vec<RemoteExport>> = BTreeMap::new();
    for (name, entry) in clusters.iter().filter(|(_, e)| !e.local && !e.refused) {
        for stores in entry.sources() {
            for service in stores.services.exports(&stores.scope) {
                out.entry((service.namespace.clone(), service.name.clone()))
                    .or_default()
                    .push(RemoteExport {
                        cluster: name.to_string(),
                        cluster_id: stores.scope.cluster_id.get(),
                        service,
                    });
            }
        }
    }
    out
}

fn l4(protocol: api::L4Protocol) -> Option<Protocol> {
    match protocol {
        api::L4Protocol::Tcp => Some(Protocol::Tcp),
        api::L4Protocol::Udp => Some(Protocol::Udp),
        api::L4Protocol::Sctp | api::L4Protocol::Any => None,
    }
}

/// Merges the local services with the remote clusters' exports; see the
/// module docs for the rules. `local_cluster`/`local_id` name this cluster.
pub fn desired_services(
    local: &[LocalService],
    clusters: &BTreeMap<ClusterName, ClusterEntry>,
    local_cluster: &str,
    local_id: u16,
) -> DesiredServices {
    let remote = remote_exports(clusters);
    let mut out = DesiredServices::default();
    let mut ordered: Vec<&LocalService> = local.iter().collect();
    ordered.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for svc in ordered {
        let id = format!("{}/{}", svc.namespace, svc.name);
        let mut flags = ServiceFlags::NONE;
        if svc.global {
            flags = flags | ServiceFlags::GLOBAL;
        }
        if svc.shared {
            flags = flags | ServiceFlags::SHARED;
        }
        match svc.affinity {
            Affinity::Local => flags = flags | ServiceFlags::AFFINITY_LOCAL,
            Affinity::Remote => flags = flags | ServiceFlags::AFFINITY_REMOTE,
            Affinity::None => {}
        }
        let exports: &[RemoteExport] = if svc.global {
            remote
                .get(&(svc.namespace.clone(), svc.name.clone()))
                .map_or(&[], Vec::as_slice)
        } else {
            &[]
        };
        let mut status = ServiceStatus {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            global: svc.global,
            shared: svc.shared,
            affinity: svc.affinity,
            frontends: Vec::new(),
        };
        for fe_ip in &svc.frontend_ips {
            for p in &svc.ports {
                let frontend = Frontend {
                    addr: SocketAddr::new(*fe_ip, p.port),
                    proto: p.protocol,
                };
                if out.frontends.contains_key(&frontend) {
                    warn!(%frontend, service = %id, "frontend already used by another service; left out");
                    out.conflicts += 1;
                    continue;
                }
                let mut seen = BTreeSet::new();
                let mut backends = Vec::new();
                let mut fe_status = FrontendStatus {
                    frontend: frontend.to_string(),
                    port_name: p.name.clone(),
                    backends: Vec::new(),
                };
                let mut add = |ip: IpAddr,
                               port: u16,
                               cluster: &str,
                               cluster_id: u16,
                               preferred: bool,
                               conflicts: &mut u64| {
                    if ip.is_ipv4() != fe_ip.is_ipv4() {
                        return;
                    }
                    if !seen.insert(ip) {
                        if cluster != local_cluster {
                            *conflicts += 1;
                        }
                        return;
                    }
                    let addr = SocketAddr::new(ip, port);
                    backends.push(Backend {
                        preferred,
                        ..Backend::new(addr, cluster_id)
                    });
                    fe_status.backends.push(BackendStatus {
                        cluster: cluster.to_owned(),
                        address: addr.to_string(),
                        preferred,
                    });
                };
                for (ip, ports) in &svc.backends {
                    if let Some(&(proto, port)) = ports.get(&p.name) {
                        if proto == p.protocol {
                            let preferred = svc.global && svc.affinity == Affinity::Local;
                            add(
                                *ip,
                                port,
                                local_cluster,
                                local_id,
                                preferred,
                                &mut out.conflicts,
                            );
                        }
                    }
                }
                for export in exports {
                    for (ip, ports) in &export.service.backends {
                        let Some(l4addr) = ports.get(&p.name) else {
                            continue;
                        };
                        if l4(l4addr.protocol) != Some(p.protocol) || l4addr.port == 0 {
                            continue;
                        }
                        let preferred = svc.affinity == Affinity::Remote;
                        add(
                            *ip,
                            l4addr.port,
                            &export.cluster,
                            export.cluster_id,
                            preferred,
                            &mut out.conflicts,
                        );
                    }
                }
                backends.sort_by_key(|b| (b.cluster_id, b.addr));
                status.frontends.push(fe_status);
                out.frontends.insert(
                    frontend,
                    DesiredFrontend {
                        service: id.clone(),
                        flags,
                        backends,
                    },
                );
            }
        }
        out.status.push(status);
    }
    out
}

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
}

impl ServiceReconciler {
    /// Prepares the task over an opened load balancer.
    pub fn new(
        lb: LoadBalancer,
        local: Arc<LocalServices>,
        mesh: Arc<Mesh>,
        status: Arc<RwLock<ServicesStatus>>,
        local_cluster: String,
        local_id: u16,
        sync_timeout: Duration,
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
            if crate::reconciler::all_synced(&clusters) {
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
        let desired = desired_services(&local, &clusters, &self.local_cluster, self.local_id);
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
    );
    tasks.push(tokio::spawn(
        reconciler
            .run(shutdown())
            .instrument(tracing::info_span!("services")),
    ));
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::clusters::test_support::{kv, memory_cluster, MAX};
    use api::{ClusterId, L4Addr, L4Protocol};

    fn export(cluster: &str, id: u16, name: &str, backends: &[(&str, u16)]) -> ClusterService {
        let mut s = ClusterService::new(
            cluster.parse().unwrap(),
            ClusterId::new(id, MAX).unwrap(),
            "default",
            name,
        );
        s.frontends.insert(
            "10.96.0.10".parse().unwrap(),
            [(
                "http".to_owned(),
                L4Addr {
                    protocol: L4Protocol::Tcp,
                    port: 80,
                },
            )]
            .into(),
        );
        for (ip, port) in backends {
            s.backends.insert(
                ip.parse().unwrap(),
                [(
                    "http".to_owned(),
                    L4Addr {
                        protocol: L4Protocol::Tcp,
                        port: *port,
                    },
                )]
                .into(),
            );
        }
        s
    }

    /// A cluster entry over real WatchStores on the in-memory backend.
    async fn cluster(
        name: &str,
        id: u16,
        local: bool,
        services: &[ClusterService],
    ) -> ClusterEntry {
        memory_cluster(name, id, local, services.iter().map(kv)).await
    }

    fn local(name: &str, global: bool, affinity: Affinity, backends: &[&str]) -> LocalService {
        LocalService {
            namespace: "default".into(),
            name: name.into(),
            frontend_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
            global,
            shared: true,
            affinity,
            backends: backends
                .iter()
                .map(|ip| {
                    (
                        ip.parse().unwrap(),
                        [("http".to_owned(), (Protocol::Tcp, 8080))].into(),
                    )
                })
                .collect(),
        }
    }

    fn frontend() -> Frontend {
        Frontend {
            addr: "10.96.0.10:80".parse().unwrap(),
            proto: Protocol::Tcp,
        }
    }

    /// (cluster id, address, preferred) of the frontend's backends.
    fn backends(d: &DesiredServices) -> Vec<(u16, String, bool)> {
        d.frontends[&frontend()]
            .backends
            .iter()
            .map(|b| (b.cluster_id, b.addr.to_string(), b.preferred))
            .collect()
    }

    async fn mesh(remote: &[ClusterService]) -> BTreeMap<ClusterName, ClusterEntry> {
        [
            ("c1".parse().unwrap(), cluster("c1", 1, true, &[]).await),
            ("c2".parse().unwrap(), cluster("c2", 2, false, remote).await),
        ]
        .into()
    }

    /// What node c1/1 programs for its service `web` (backend 10.1.1.5).
    fn desired_web(
        clusters: &BTreeMap<ClusterName, ClusterEntry>,
        global: bool,
        affinity: Affinity,
    ) -> DesiredServices {
        desired_services(
            &[local("web", global, affinity, &["10.1.1.5"])],
            clusters,
            "c1",
            1,
        )
    }

    #[tokio::test]
    async fn a_global_service_merges_remote_backends_by_port_name() {
        let clusters = mesh(&[export("c2", 2, "web", &[("10.2.1.5", 9090)])]).await;
        let d = desired_web(&clusters, true, Affinity::None);
        assert_eq!(
            backends(&d),
            [
                (1, "10.1.1.5:8080".to_owned(), false),
                (2, "10.2.1.5:9090".to_owned(), false)
            ]
        );
        let f = &d.frontends[&frontend()];
        assert!(f
            .flags
            .contains(ServiceFlags::GLOBAL | ServiceFlags::SHARED));
        assert_eq!(d.status[0].frontends[0].backends[1].cluster, "c2");
    }

    #[tokio::test]
    async fn a_service_not_global_locally_takes_local_backends_only() {
        let clusters = mesh(&[export("c2", 2, "web", &[("10.2.1.5", 8080)])]).await;
        let d = desired_web(&clusters, false, Affinity::None);
        assert_eq!(backends(&d), [(1, "10.1.1.5:8080".to_owned(), false)]);
        assert!(!d.frontends[&frontend()]
            .flags
            .contains(ServiceFlags::GLOBAL));
    }

    #[tokio::test]
    async fn a_remote_global_service_without_local_counterpart_is_not_programmed() {
        let clusters = mesh(&[export("c2", 2, "web", &[("10.2.1.5", 8080)])]).await;
        let d = desired_services(&[], &clusters, "c1", 1);
        assert!(d.frontends.is_empty());
        assert!(d.status.is_empty());
    }

    #[tokio::test]
    async fn affinity_marks_local_or_remote_backends_preferred() {
        let clusters = mesh(&[export("c2", 2, "web", &[("10.2.1.5", 8080)])]).await;
        let run = |affinity| {
            backends(&desired_web(&clusters, true, affinity))
                .into_iter()
                .map(|(c, _, p)| (c, p))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(Affinity::Local), [(1, true), (2, false)]);
        assert_eq!(run(Affinity::Remote), [(1, false), (2, true)]);
        assert_eq!(run(Affinity::None), [(1, false), (2, false)]);
    }

    #[tokio::test]
    async fn a_backend_ip_offered_twice_is_taken_once_local_first() {
        let clusters = mesh(&[export(
            "c2",
            2,
            "web",
            &[("10.1.1.5", 8080), ("10.2.1.5", 8080)],
        )])
        .await;
        let d = desired_web(&clusters, true, Affinity::None);
        assert_eq!(
            backends(&d),
            [
                (1, "10.1.1.5:8080".to_owned(), false),
                (2, "10.2.1.5:8080".to_owned(), false)
            ]
        );
        assert_eq!(d.conflicts, 1);
    }

    #[tokio::test]
    async fn a_frontend_claimed_by_two_services_goes_to_the_first() {
        let clusters = mesh(&[]).await;
        let d = desired_services(
            &[
                local("b", false, Affinity::None, &["10.1.1.6"]),
                local("a", false, Affinity::None, &["10.1.1.5"]),
            ],
            &clusters,
            "c1",
            1,
        );
        assert_eq!(d.frontends[&frontend()].service, "default/a");
        assert_eq!(d.conflicts, 1);
    }

    #[test]
    fn invalid_apiserver_records_are_refused_with_the_field() {
        let mut registered = pb::RegisteredService {
            service: Some(pb::Service {
                namespace: "default".into(),
                name: "web".into(),
                frontend_ips: vec!["10.96.0.300".into()],
                ..Default::default()
            }),
            backends: vec![],
        };
        let e = LocalService::from_proto(registered.clone()).unwrap_err();
        assert!(e.to_string().contains("frontend_ips"), "{e}");
        registered.service.as_mut().unwrap().frontend_ips = vec!["10.96.0.10".into()];
        registered.service.as_mut().unwrap().ports = vec![pb::ServicePort {
            name: "http".into(),
            protocol: 1,
            port: 70_000,
            target: None,
        }];
        let e = LocalService::from_proto(registered.clone()).unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
        registered.service.as_mut().unwrap().ports[0].port = 80;
        registered.service.as_mut().unwrap().affinity = 7;
        assert!(LocalService::from_proto(registered.clone()).is_err());
        registered.service.as_mut().unwrap().affinity = pb::Affinity::Local.into();
        let s = LocalService::from_proto(registered).unwrap();
        assert_eq!(s.affinity, Affinity::Local);
        assert!(s.shared, "unset shared means true");
    }
}
