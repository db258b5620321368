//! The clustermesh-apiserver: the single writer of one cluster's state into
//! that cluster's etcd, in the Cilium clustermesh schema (`docs/architecture.md` §4).
//!
//! The state comes from a *local source* ([`source`]): one trait,
//! [`source::LocalSource`], with two implementations: the standalone source
//! ([`server::Standalone`]), where node agents register their node and
//! endpoints over the gRPC API of [`mesh_proto`] (package `mesh.v1`), each
//! within a session, and `meshctl` declares services; and the Kubernetes
//! source ([`kubernetes`]), kube-rs watchers on Nodes, Namespaces, Pods,
//! Services and EndpointSlices, with leader election among replicas.
//!
//! Every source writes through the [`registry::Registry`] handle, which
//!
//! 1. validates each record ([`registry`]) and refuses bad ones with an error
//!    naming the field (gRPC `InvalidArgument`), the same for every source;
//! 2. allocates a security identity per label set with one etcd transaction
//!    (id key and reverse index together), records its use under a user key
//!    bound to its session lease, and releases identities that no apiserver
//!    of the cluster has used for the grace period ([`identity`]); several
//!    apiservers of one cluster may allocate concurrently;
//! 3. persists its registry under the private prefix
//!    `mesh/registry/v1/<cluster>/` ([`persist`]) so that a restart restores it;
//! 4. exports nodes, ipcache entries and global services with kvstore's
//!    SyncStores, plus the cluster config, heartbeat and sync canaries
//!    ([`export`]); the canaries wait for the source's synced signal.
//!
//! A restarted apiserver restores its registry, and the SyncStores adopt the
//! keys its predecessor wrote: nothing still valid is rewritten, and no key
//! disappears and comes back.
//!
//! The binary is thin: it parses [`config::Args`] and calls [`run`].

pub mod config;
pub mod export;
pub mod health;
pub mod identity;
pub mod kubernetes;
pub mod persist;
pub mod registry;
pub mod server;
pub mod source;

use std::{future::Future, net::SocketAddr, sync::atomic::Ordering, sync::Arc, time::Duration};

use kvstore::SyncStoreConfig;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn, Instrument};

use crate::{
    config::{Config, Source},
    kubernetes::KubernetesSource,
    registry::Registry,
    server::Standalone,
    source::LocalSource,
};

/// Errors that stop the apiserver from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("connect to etcd")]
    Connect(#[source] kvstore::ConnectError),
    #[error("open the registry")]
    Registry(#[source] registry::OpenError),
    #[error("kubernetes client")]
    KubernetesClient(#[source] kubernetes::ClientError),
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
    /// The standalone source's gRPC server failed.
    #[error("gRPC server")]
    Grpc(#[source] tonic::transport::Error),
    /// The Kubernetes source failed.
    #[error("kubernetes source")]
    Kubernetes(#[source] kubernetes::SourceError),
    #[error("kubernetes client")]
    KubernetesClient(#[source] kubernetes::ClientError),
    /// Another replica took the leader election lease: this one stopped
    /// writing and exits, to run again as a candidate.
    #[error("lost the leader election lease")]
    LostLeadership,
}

/// The source chosen by `--source`, ready to run: one variant per source
/// built. Adding a source adds a variant here and nothing in the registry or
/// the export.
#[derive(Debug)]
enum ConfiguredSource {
    Standalone(Standalone),
    Kubernetes(KubernetesSource),
}

/// A started apiserver: etcd connected, registry restored, export started,
/// listeners bound. Call [`Server::serve`] to run the source and answer
/// requests.
pub struct Server {
    registry: Registry,
    source: ConfiguredSource,
    health: Option<TcpListener>,
    background: Background,
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
    /// Connects to etcd, restores the registry, starts the export and binds
    /// the listeners of the configured source.
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
        let client = match &config.source {
            Source::Standalone => None,
            Source::Kubernetes { api, .. } => {
                Some(api.client().await.map_err(StartError::KubernetesClient)?)
            }
        };
        Self::start_with_client(config, stores, client).await
    }

    /// As [`Server::start_with`], with the Kubernetes client made already
    /// (by leader election, which needs it before etcd is connected).
    async fn start_with_client(
        config: Config,
        stores: SyncStoreConfig,
        client: Option<kube::Client>,
    ) -> Result<Self, StartError> {
        let etcd = kvstore::connect(&config.etcd)
            .await
            .map_err(StartError::Connect)?;
        let backend: Arc<dyn kvstore::Backend> = Arc::new(etcd.clone());
        let registry = Registry::open(backend.clone(), Arc::new(etcd), &config, &stores)
            .await
            .map_err(StartError::Registry)?;
        let bind_failed = |source| StartError::Bind {
            what: "gRPC",
            addr: config.grpc_listen,
            source,
        };
        let source = match client {
            None => ConfiguredSource::Standalone(
                Standalone::bind(config.grpc_listen, config.session_grace)
                    .await
                    .map_err(bind_failed)?,
            ),
            Some(client) => ConfiguredSource::Kubernetes(KubernetesSource::new(
                client,
                Standalone::bind_read_only(config.grpc_listen)
                    .await
                    .map_err(bind_failed)?,
            )),
        };
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
            registry,
            source,
            health,
            background: Background {
                backend,
                heartbeat_interval: config.heartbeat_interval,
                drain_timeout: config.drain_timeout,
            },
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        match &self.source {
            ConfiguredSource::Standalone(s) => s.local_addr(),
            ConfiguredSource::Kubernetes(s) => s.grpc_addr(),
        }
    }

    /// The bound health address, if enabled.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs the source and serves health until `shutdown` completes, then
    /// drains: waits up to the drain timeout for the export to be written,
    /// and stops the stores without deleting anything (a successor adopts).
    ///
    /// # Errors
    ///
    /// When the source fails (for the standalone source: its gRPC server).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RunError> {
        let Server {
            registry,
            source,
            health,
            background,
        } = self;
        match source {
            ConfiguredSource::Standalone(source) => background
                .drive(registry, source, health, shutdown)
                .await
                .map_err(RunError::Grpc),
            ConfiguredSource::Kubernetes(source) => background
                .drive(registry, source, health, shutdown)
                .await
                .map_err(RunError::Kubernetes),
        }
    }
}

/// What runs beside the source: health, identity GC, readiness, heartbeat.
struct Background {
    backend: Arc<dyn kvstore::Backend>,
    heartbeat_interval: Duration,
    drain_timeout: Duration,
}

impl Background {
    /// Runs `source` on `registry` with the background tasks until `shutdown`
    /// completes and the source returned, then drains the export.
    async fn drive<S: LocalSource>(
        self,
        registry: Registry,
        source: S,
        health: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), S::Error> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        if let Some(listener) = health {
            tasks.push(tokio::spawn(
                health::serve(listener, registry.clone()).in_current_span(),
            ));
        }
        tasks.push(tokio::spawn(
            Arc::clone(registry.allocator())
                .run(stop_rx)
                .in_current_span(),
        ));
        tasks.push(tokio::spawn(
            readiness_and_heartbeat(registry.clone(), self.backend, self.heartbeat_interval)
                .in_current_span(),
        ));

        let result = source.run(registry.clone(), shutdown).await;

        info!("shutting down: draining the export");
        let _ = stop_tx.send(true);
        for task in &tasks {
            task.abort();
        }
        if tokio::time::timeout(self.drain_timeout, registry.exporter().wait_idle())
            .await
            .is_err()
        {
            warn!(timeout = ?self.drain_timeout, "export not drained before the timeout");
        }
        if let Err(e) = registry.allocator().shut_down().await {
            warn!(error = %kvstore::error_chain(&e), "revoking the identity session lease failed; its user keys expire with it");
        }
        result
    }
}

/// Readiness (the source synced, the initial export and the identities
/// canary written), then the heartbeat.
async fn readiness_and_heartbeat(
    registry: Registry,
    backend: Arc<dyn kvstore::Backend>,
    heartbeat_interval: Duration,
) {
    registry.wait_synced().await;
    registry.exporter().wait_idle().await;
    let counters = registry.counters();
    let mut retry =
        kvstore::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match export::write_identities_canary(backend.as_ref(), &registry.info().name).await {
            Ok(()) => break,
            Err(e) => {
                counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
                let delay = retry.next_delay();
                warn!(error = %e, retry_in = ?delay, "writing the identities sync canary failed, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
    counters.ready.store(true, Ordering::Relaxed);
    info!("initial export synced");
    let mut tick = tokio::time::interval(heartbeat_interval);
    loop {
        tick.tick().await;
        let ok = export::write_heartbeat(backend.as_ref()).await;
        if let Err(e) = &ok {
            counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "heartbeat write failed");
        }
        counters.etcd_connected.store(ok.is_ok(), Ordering::Relaxed);
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
    let Source::Kubernetes {
        api,
        leader_election: Some(lease),
    } = &config.source
    else {
        let server = Server::start(config).await?;
        info!(grpc = %server.grpc_addr(), health = ?server.health_addr(), "serving");
        return server.serve(shutdown).await;
    };
    // Only the leader connects to etcd: a candidate waits for the lease
    // first, and a leader that loses it stops and exits.
    let client = api.client().await.map_err(RunError::KubernetesClient)?;
    let mut shutdown = std::pin::pin!(shutdown);
    let elector = kubernetes::lease::Elector::new(client.clone(), lease.clone());
    let mut leadership = tokio::select! {
        leadership = elector.acquire() => leadership,
        () = &mut shutdown => return Ok(()),
    };
    let server =
        Server::start_with_client(config, SyncStoreConfig::default(), Some(client)).await?;
    info!(grpc = %server.grpc_addr(), health = ?server.health_addr(), "serving as the leader");
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            () = &mut shutdown => {}
            () = leadership.lost() => { let _ = lost_tx.send(()); }
        }
    };
    server.serve(stop).await?;
    match lost_rx.await {
        Ok(()) => Err(RunError::LostLeadership),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
