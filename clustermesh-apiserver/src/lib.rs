//! The clustermesh-apiserver: the single writer of one cluster's state into
//! that cluster's etcd, in the Cilium clustermesh schema (DESIGN.md section 3).
//!
//! In standalone mode node agents register their node and endpoints over the
//! gRPC API of [`mesh_proto`] (package `mesh.v1`), each within a session, and
//! `meshctl` declares services. The apiserver
//!
//! 1. validates each request ([`convert`], [`registry`]) and refuses bad ones
//!    with `InvalidArgument` naming the field;
//! 2. allocates a security identity per label set with one etcd transaction
//!    (id key and reverse index together), records its use under a user key
//!    bound to its session lease, and releases identities that no apiserver
//!    of the cluster has used for the grace period ([`identity`]); several
//!    apiservers of one cluster may allocate concurrently;
//! 3. persists its registry under the private prefix
//!    `mesh/registry/v1/<cluster>/` ([`persist`]) so that a restart restores it;
//! 4. exports nodes, ipcache entries and global services with kvstore's
//!    SyncStores, plus the cluster config, heartbeat and sync canaries
//!    ([`export`]).
//!
//! A restarted apiserver restores its registry, and the SyncStores adopt the
//! keys its predecessor wrote: nothing still valid is rewritten, and no key
//! disappears and comes back.
//!
//! The binary is thin: it parses [`config::Args`] and calls [`run`].

pub mod config;
pub mod convert;
pub mod export;
pub mod health;
pub mod identity;
pub mod model;
pub mod persist;
pub mod registry;
pub mod server;
pub mod validate;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use api::cluster_identity_range;
use kvstore::SyncStoreConfig;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn, Instrument};

use crate::{
    config::Config,
    export::{ClusterInfo, Exporter},
    identity::{Allocator, AllocatorConfig},
    persist::Persistence,
    server::{RegistryService, State},
};

/// Errors that stop the apiserver from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("connect to etcd")]
    Connect(#[source] kvstore::ConnectError),
    #[error("read the persisted registry")]
    Load(#[source] persist::PersistError),
    #[error("load identities")]
    Identities(#[source] identity::IdentityError),
    #[error("write {what} to etcd")]
    Write {
        what: &'static str,
        #[source]
        source: kvstore::BackendError,
    },
    #[error("persist a renumbered endpoint")]
    Persist(#[source] persist::PersistError),
    #[error("bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Errors while serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("gRPC server")]
    Grpc(#[source] tonic::transport::Error),
}

/// A started apiserver: etcd connected, registry restored, export started,
/// listeners bound. Call [`Server::serve`] to answer requests.
pub struct Server {
    state: Arc<State>,
    grpc: TcpListener,
    health: Option<TcpListener>,
    drain_timeout: Duration,
    heartbeat_interval: Duration,
    backend: Arc<dyn kvstore::Backend>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("grpc", &self.grpc_addr())
            .field("health", &self.health_addr())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Connects to etcd, restores the registry and starts the export.
    ///
    /// # Errors
    ///
    /// See [`StartError`].
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with(config, SyncStoreConfig::default()).await
    }

    /// As [`Server::start`], with explicit SyncStore tuning (tests use short
    /// leases).
    ///
    /// # Errors
    ///
    /// See [`StartError`].
    pub async fn start_with(config: Config, stores: SyncStoreConfig) -> Result<Self, StartError> {
        let etcd = kvstore::connect(&config.etcd)
            .await
            .map_err(StartError::Connect)?;
        let backend: Arc<dyn kvstore::Backend> = Arc::new(etcd.clone());
        let cluster = config.cluster_name.as_str().to_owned();
        let info = ClusterInfo {
            name: config.cluster_name.clone(),
            id: config.cluster_id,
            max: config.max_connected_clusters,
        };
        let persistence = Persistence::new(backend.clone(), &cluster);
        let snapshot = persistence.load().await.map_err(StartError::Load)?;
        let range = cluster_identity_range(config.cluster_id, config.max_connected_clusters);
        let instance = format!("{:016x}", rand::random::<u64>());
        info!(instance = %instance, "identity allocation instance");
        let allocator = Arc::new(
            Allocator::load(
                backend.clone(),
                AllocatorConfig {
                    cluster: cluster.clone(),
                    range,
                    grace: config.identity_grace,
                    lease_ttl: config.identity_lease_ttl,
                    instance,
                },
            )
            .await
            .map_err(StartError::Identities)?,
        );
        let nodes: Vec<String> = snapshot.nodes.iter().map(|n| n.name.clone()).collect();
        let (registry, renumbered) = server::restore(snapshot, &allocator, &cluster)
            .await
            .map_err(StartError::Identities)?;
        for entry in &renumbered {
            persistence
                .put_endpoint(entry)
                .await
                .map_err(StartError::Persist)?;
        }
        export::write_cluster_config(backend.as_ref(), &info)
            .await
            .map_err(|source| StartError::Write {
                what: "cluster config",
                source,
            })?;
        let sync_backend: Arc<dyn kvstore::SyncBackend> = Arc::new(etcd);
        let exporter = Exporter::start(sync_backend, info.clone(), &stores);
        exporter.initial(&registry);
        info!(
            cluster = %info.name,
            nodes = registry.nodes().count(),
            endpoints = registry.endpoints().count(),
            services = registry.services().count(),
            "registry restored"
        );
        let state = Arc::new(State::new(
            info,
            registry,
            exporter,
            allocator,
            persistence,
            config.session_grace,
        ));
        state.counters.etcd_connected.store(true, Ordering::Relaxed);
        state.detach_restored(nodes);

        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "gRPC",
                addr: config.grpc_listen,
                source,
            })?;
        let health = match config.health_listen {
            None => None,
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| StartError::Bind {
                            what: "health",
                            addr,
                            source,
                        })?,
                )
            }
        };
        Ok(Self {
            state,
            grpc,
            health,
            drain_timeout: config.drain_timeout,
            heartbeat_interval: config.heartbeat_interval,
            backend,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bound health address, if enabled.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves gRPC and health until `shutdown` completes, then drains: stops
    /// accepting, waits up to the drain timeout for the export to be written,
    /// and stops the stores without deleting anything (a successor adopts).
    ///
    /// # Errors
    ///
    /// When the gRPC server fails.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RunError> {
        let Server {
            state,
            grpc,
            health,
            drain_timeout,
            heartbeat_interval,
            backend,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        if let Some(listener) = health {
            tasks.push(tokio::spawn(
                health::serve(listener, Arc::clone(&state)).in_current_span(),
            ));
        }
        tasks.push(tokio::spawn(
            Arc::clone(&state.allocator)
                .run(stop_rx.clone())
                .in_current_span(),
        ));
        tasks.push(tokio::spawn(
            background(Arc::clone(&state), backend, heartbeat_interval).in_current_span(),
        ));

        let service = mesh_proto::v1::registry_server::RegistryServer::new(RegistryService(
            Arc::clone(&state),
        ));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
        let stopping = Arc::clone(&state);
        // Session streams never finish by themselves: end them when shutdown
        // begins, or the graceful shutdown would wait for them forever.
        let shutdown = async move {
            shutdown.await;
            stopping.shut_down();
        };
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(RunError::Grpc);
        state.shut_down();

        info!("shutting down: draining the export");
        let _ = stop_tx.send(true);
        for task in &tasks {
            task.abort();
        }
        if tokio::time::timeout(drain_timeout, state.exporter.wait_idle())
            .await
            .is_err()
        {
            warn!(timeout = ?drain_timeout, "export not drained before the timeout");
        }
        if let Err(e) = state.allocator.shut_down().await {
            warn!(error = %kvstore::error_chain(&e), "revoking the identity session lease failed; its user keys expire with it");
        }
        result
    }
}

/// Readiness (initial export and identities canary), then the heartbeat.
async fn background(
    state: Arc<State>,
    backend: Arc<dyn kvstore::Backend>,
    heartbeat_interval: Duration,
) {
    state.exporter.wait_idle().await;
    let mut retry = Duration::from_millis(100);
    loop {
        match export::write_identities_canary(backend.as_ref(), &state.info.name).await {
            Ok(()) => break,
            Err(e) => {
                state.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "writing the identities sync canary failed, retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(5));
            }
        }
    }
    state.counters.ready.store(true, Ordering::Relaxed);
    info!("initial export synced");
    let mut tick = tokio::time::interval(heartbeat_interval);
    loop {
        tick.tick().await;
        let ok = export::write_heartbeat(backend.as_ref()).await;
        if let Err(e) = &ok {
            state.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "heartbeat write failed");
        }
        state
            .counters
            .etcd_connected
            .store(ok.is_ok(), Ordering::Relaxed);
    }
}

/// Starts the apiserver and serves until `shutdown` completes.
///
/// # Errors
///
/// See [`RunError`].
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let server = Server::start(config).await?;
    info!(grpc = %server.grpc_addr(), health = ?server.health_addr(), "serving");
    server.serve(shutdown).await
}
