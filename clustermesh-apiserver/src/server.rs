//! The standalone source: the gRPC API (`mesh.v1.Registry`) through which
//! node agents register their node and endpoints and `meshctl` declares
//! services. It implements [`LocalSource`]; every write goes through the
//! [`Registry`] handle, which validates, allocates, persists and exports.
//! This module owns only what is particular to the gRPC front end: parsing
//! the messages ([`crate::convert`]), sessions, and mapping
//! [`RegistryError`] to gRPC status codes.
//!
//! Sessions: a node agent's `OpenSession` stream owns its node; its writes
//! are made as [`Owner::Session`]. When the stream ends (the agent's receiver
//! is dropped), a timer of `session_grace` starts; a new session for the same
//! node name cancels it and takes over without deleting anything; otherwise
//! the node and its endpoints go. Nodes restored from etcd at start get the
//! same timer, so an agent that does not come back is removed.
//!
//! The source is synced as soon as it runs: its first full listing is the
//! registry restored from etcd.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::Ordering, Arc, Mutex as StdMutex},
    time::Duration,
};

use futures::Stream;
use mesh_proto::v1 as pb;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tonic::{Request, Response, Status};
use tracing::{info, warn, Instrument};

use crate::{
    registry::{EndpointEntry, FieldError, Owner, Registry, RegistryError, Table},
    source::LocalSource,
};
use mesh_proto::convert;
use mesh_proto::model::ObjectKey;

/// How often a session stream carries a keepalive.
const KEEPALIVE: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct NodeSession {
    /// The session that owns the node now.
    current: String,
    /// Whether that session's stream is open.
    live: bool,
}

#[derive(Debug, Default)]
struct Sessions {
    /// Session id → node name, for every session that still owns its node.
    by_id: HashMap<String, String>,
    by_node: HashMap<String, NodeSession>,
}

/// The standalone source, its gRPC listener bound.
///
/// Read-only (with another source, [`Standalone::bind_read_only`]) it
/// serves only the reads (lists, `WatchServices`, `Status`) that node
/// agents and `meshctl` make, refuses every write with
/// `FailedPrecondition`, and neither restores sessions nor says when the
/// registry is synced: the other source does.
#[derive(Debug)]
pub struct Standalone {
    listener: TcpListener,
    session_grace: Duration,
    writable: bool,
}

impl Standalone {
    /// Binds the gRPC listener.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn bind(addr: SocketAddr, session_grace: Duration) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            session_grace,
            writable: true,
        })
    }

    /// Binds the gRPC listener of a read-only API, for another source.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn bind_read_only(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            session_grace: Duration::ZERO,
            writable: false,
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

impl LocalSource for Standalone {
    type Error = tonic::transport::Error;

    async fn run(
        self,
        registry: Registry,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), Self::Error> {
        let state = Arc::new(State {
            registry: registry.clone(),
            sessions: StdMutex::new(Sessions::default()),
            session_grace: self.session_grace,
            shutdown: watch::Sender::new(false),
            writable: self.writable,
        });
        if self.writable {
            let restored: Vec<String> = registry
                .read()
                .await
                .nodes()
                .map(|n| n.name.clone())
                .collect();
            state.detach_restored(restored);
            registry.synced().await;
        }

        let service = pb::registry_server::RegistryServer::new(RegistryService(Arc::clone(&state)));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(self.listener);
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
            .await;
        state.shut_down();
        result
    }
}

/// The state of the gRPC front end.
struct State {
    registry: Registry,
    sessions: StdMutex<Sessions>,
    session_grace: Duration,
    /// Set when the server shuts down: session streams end, grace timers are
    /// dropped (a successor restores the nodes and starts its own).
    shutdown: watch::Sender<bool>,
    /// Whether writes are served ([`Standalone::bind_read_only`]).
    writable: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The gRPC status of a refused or failed registry write.
fn status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(e) => invalid(e),
        e @ RegistryError::NotOwner { .. } => Status::permission_denied(e.to_string()),
        RegistryError::Persist(e) => Status::unavailable(format!("etcd: {e}")),
        RegistryError::Identity(e) => Status::unavailable(format!("identity allocation: {e}")),
    }
}

impl State {
    /// Ends every session stream and grace timer; nothing is removed.
    fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node a session owns, if the session is current.
    fn session_node(&self, session_id: &str) -> Result<String, Status> {
        self.sessions()
            .by_id
            .get(session_id)
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "session_id: {session_id:?} is not an open session (ended or taken over)"
                ))
            })
    }

    /// Starts the grace timer of every node restored from etcd: their agents
    /// have one grace period to open a session again.
    fn detach_restored(self: &Arc<Self>, nodes: Vec<String>) {
        for node in nodes {
            let id = new_session_id();
            {
                let mut sessions = self.sessions();
                sessions.by_id.insert(id.clone(), node.clone());
                sessions.by_node.insert(
                    node.clone(),
                    NodeSession {
                        current: id.clone(),
                        live: true,
                    },
                );
            }
            self.session_ended(node, id);
        }
    }

    fn open(&self, node: &str) -> (String, bool) {
        let id = new_session_id();
        let mut sessions = self.sessions();
        let took_over = match sessions.by_node.insert(
            node.to_owned(),
            NodeSession {
                current: id.clone(),
                live: true,
            },
        ) {
            Some(previous) => {
                sessions.by_id.remove(&previous.current);
                true
            }
            None => false,
        };
        sessions.by_id.insert(id.clone(), node.to_owned());
        (id, took_over)
    }

    /// The stream of session `id` ended: remove the node after the grace
    /// period unless a new session took it over meanwhile.
    fn session_ended(self: &Arc<Self>, node: String, id: String) {
        {
            let mut sessions = self.sessions();
            match sessions.by_node.get_mut(&node) {
                Some(s) if s.current == id => s.live = false,
                _ => return,
            }
        }
        info!(node = %node, grace = ?self.session_grace, "session ended; node removed after the grace period unless it reconnects");
        let state = Arc::clone(self);
        let mut shutdown = self.shutdown.subscribe();
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(state.session_grace) => {}
                    () = stopped(&mut shutdown) => return,
                }
                {
                    let mut sessions = state.sessions();
                    match sessions.by_node.get(&node) {
                        Some(s) if s.current == id && !s.live => {
                            sessions.by_node.remove(&node);
                            sessions.by_id.remove(&id);
                        }
                        _ => return,
                    }
                }
                info!(node = %node, "grace period over, removing the node and its endpoints");
                let owner = Owner::Session { node: node.clone() };
                if let Err(e) = state.registry.delete_node(&owner, &node).await {
                    warn!(node = %node, error = %e, "removing an expired node failed");
                }
            }
            .in_current_span(),
        );
    }
}

/// Completes once shutdown has begun.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here.
    let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
}

impl State {
    /// Refuses a write when another source owns the records.
    fn writable(&self) -> Result<(), Status> {
        if self.writable {
            Ok(())
        } else {
            Err(Status::failed_precondition(
                "this apiserver's records come from its Kubernetes source; its API is read-only",
            ))
        }
    }
}

fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The gRPC service over the shared [`State`].
#[derive(Debug)]
struct RegistryService(Arc<State>);

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::SessionEvent, Status>> + Send>>;
type ServicesStream = Pin<Box<dyn Stream<Item = Result<pb::ListServicesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    type OpenSessionStream = SessionStream;
    type WatchServicesStream = ServicesStream;

    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<SessionStream>, Status> {
        self.0.writable()?;
        let node = request.into_inner().node_name;
        api::names::validate_dns_subdomain(&node)
            .map_err(|reason| invalid(FieldError::new("node_name", reason)))?;
        let (id, took_over) = self.0.open(&node);
        info!(node = %node, took_over, "session opened");
        let (tx, rx) = mpsc::channel(4);
        let opened = pb::SessionEvent {
            event: Some(pb::session_event::Event::Opened(pb::SessionOpened {
                session_id: id.clone(),
                took_over,
                grace_millis: u64::try_from(self.0.session_grace.as_millis()).unwrap_or(u64::MAX),
            })),
        };
        // Capacity 4: the first send cannot fail for lack of room.
        let _ = tx.try_send(Ok(opened));
        let state = Arc::clone(&self.0);
        let mut shutdown = self.0.shutdown.subscribe();
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(KEEPALIVE);
                tick.tick().await;
                loop {
                    tokio::select! {
                        () = stopped(&mut shutdown) => return,
                        _ = tx.closed() => break,
                        _ = tick.tick() => {
                            let keepalive = pb::SessionEvent {
                                event: Some(pb::session_event::Event::Keepalive(pb::Keepalive {})),
                            };
                            if tx.send(Ok(keepalive)).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                state.session_ended(node, id);
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        self.0.writable()?;
        let req = request.into_inner();
        let owner = Owner::Session {
            node: self.0.session_node(&req.session_id)?,
        };
        let spec = convert::node(req.node).map_err(invalid)?;
        self.0
            .registry
            .upsert_node(&owner, spec)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RegisterNodeResponse {}))
    }

    async fn upsert_endpoint(
        &self,
        request: Request<pb::UpsertEndpointRequest>,
    ) -> Result<Response<pb::UpsertEndpointResponse>, Status> {
        self.0.writable()?;
        let req = request.into_inner();
        let node = self.0.session_node(&req.session_id)?;
        let spec = convert::endpoint(&node, req.endpoint).map_err(invalid)?;
        let owner = Owner::Session { node };
        let upserted = self
            .0
            .registry
            .upsert_endpoint(&owner, spec)
            .await
            .map_err(status)?;
        match upserted.conflicts.first() {
            None => Ok(Response::new(pb::UpsertEndpointResponse {
                identity: upserted.identity,
            })),
            Some(conflict) => Err(Status::invalid_argument(conflict.to_string())),
        }
    }

    async fn delete_endpoint(
        &self,
        request: Request<pb::DeleteEndpointRequest>,
    ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
        self.0.writable()?;
        let req = request.into_inner();
        let owner = Owner::Session {
            node: self.0.session_node(&req.session_id)?,
        };
        let existed = self
            .0
            .registry
            .delete_endpoint(&owner, &ObjectKey::new(&req.namespace, &req.name))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteEndpointResponse { existed }))
    }

    async fn upsert_service(
        &self,
        request: Request<pb::UpsertServiceRequest>,
    ) -> Result<Response<pb::UpsertServiceResponse>, Status> {
        self.0.writable()?;
        let spec = convert::service(request.into_inner().service).map_err(invalid)?;
        self.0
            .registry
            .upsert_service(&Owner::Source, spec)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UpsertServiceResponse {}))
    }

    async fn delete_service(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        self.0.writable()?;
        let req = request.into_inner();
        let existed = self
            .0
            .registry
            .delete_service(&Owner::Source, &ObjectKey::new(&req.namespace, &req.name))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteServiceResponse { existed }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let registry = self.0.registry.read().await;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: registry.nodes().map(convert::node_to_proto).collect(),
        }))
    }

    async fn list_endpoints(
        &self,
        request: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let node = request.into_inner().node;
        let registry = self.0.registry.read().await;
        let endpoints = registry
            .endpoints()
            .filter(|e| node.is_empty() || e.spec.node == node)
            .map(|e: &EndpointEntry| pb::RegisteredEndpoint {
                endpoint: Some(convert::endpoint_to_proto(&e.spec)),
                identity: e.identity,
                owned_ips: registry.owned_ips(e).map(|ip| ip.to_string()).collect(),
            })
            .collect();
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn list_services(
        &self,
        _request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let registry = self.0.registry.read().await;
        Ok(Response::new(services_snapshot(&registry)))
    }

    async fn watch_services(
        &self,
        _request: Request<pb::WatchServicesRequest>,
    ) -> Result<Response<ServicesStream>, Status> {
        let (tx, rx) = mpsc::channel(1);
        let state = Arc::clone(&self.0);
        let mut generation = self.0.registry.watch_services();
        let mut shutdown = self.0.shutdown.subscribe();
        tokio::spawn(
            async move {
                loop {
                    // Mark the current generation seen before reading, so a
                    // change during the read triggers another snapshot.
                    generation.borrow_and_update();
                    let snapshot = services_snapshot(&*state.registry.read().await);
                    tokio::select! {
                        () = stopped(&mut shutdown) => return,
                        sent = tx.send(Ok(snapshot)) => if sent.is_err() { return },
                    }
                    tokio::select! {
                        () = stopped(&mut shutdown) => return,
                        () = tx.closed() => return,
                        changed = generation.changed() => if changed.is_err() { return },
                    }
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let state = &self.0;
        let registry = &state.registry;
        let synced = registry.counters().ready.load(Ordering::Relaxed);
        let kinds = registry
            .exported_counts()
            .await
            .into_iter()
            .map(|(kind, exported)| pb::KindStatus {
                kind: kind.to_owned(),
                exported,
                synced,
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            cluster_name: registry.info().name.to_string(),
            cluster_id: registry.info().id.get().into(),
            etcd_connected: registry.counters().etcd_connected.load(Ordering::Relaxed),
            synced,
            kinds,
            sessions: state.sessions().by_id.len() as u64,
            etcd_errors: registry.etcd_errors(),
        }))
    }
}

/// Every service with its selected local backends (`ListServices`, and each
/// message of `WatchServices`).
fn services_snapshot(registry: &Table) -> pb::ListServicesResponse {
    let services = registry
        .services()
        .filter_map(|s| registry.service_view(&s.key()))
        .map(|view| convert::registered_service_to_proto(view.spec, &view.backends))
        .collect();
    pb::ListServicesResponse { services }
}
