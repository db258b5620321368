//! The apiserver's state and its gRPC API (`mesh.v1.Registry`).
//!
//! Every mutation runs under one async lock over the [`Registry`]: validate,
//! allocate the identity, apply, persist, hand the dirty keys to the exporter,
//! answer. Serialising mutations keeps the persisted registry, the identity
//! reference counts and the export in the same order as the requests, which is
//! what makes a restart exact. Reads take the same lock briefly.
//!
//! Sessions: a node agent's `OpenSession` stream owns its node. When the
//! stream ends (the agent's receiver is dropped), a timer of `session_grace`
//! starts; a new session for the same node name cancels it and takes over
//! without deleting anything; otherwise the node and its endpoints go.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex as StdMutex,
    },
    time::Duration,
};

use futures::Stream;
use mesh_proto::v1 as pb;
use tokio::sync::{mpsc, watch, Mutex};
use tonic::{Request, Response, Status};
use tracing::{info, warn, Instrument};

use crate::{
    convert,
    export::{ClusterInfo, Exporter},
    identity::{label_string, Allocator},
    model::{EndpointSpec, ObjectKey},
    persist::{PersistError, Persistence},
    registry::{EndpointEntry, FieldError, Registry},
    validate,
};

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

/// Counters shown by `Status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub etcd_errors: AtomicU64,
    pub etcd_connected: AtomicBool,
    pub ready: AtomicBool,
}

/// The shared state behind the gRPC service and the background tasks.
pub struct State {
    pub(crate) info: ClusterInfo,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) exporter: Exporter,
    pub(crate) allocator: Arc<Allocator>,
    persistence: Persistence,
    sessions: StdMutex<Sessions>,
    session_grace: Duration,
    pub(crate) counters: Counters,
    /// Set when the server shuts down: session streams end, grace timers are
    /// dropped (a successor restores the nodes and starts its own).
    shutdown: watch::Sender<bool>,
    /// Bumped whenever a service or the backends it selects changed; each
    /// `WatchServices` stream sends a fresh snapshot when it moves.
    services_generation: watch::Sender<u64>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("cluster", &self.info.name)
            .finish_non_exhaustive()
    }
}

fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

impl State {
    pub(crate) fn new(
        info: ClusterInfo,
        registry: Registry,
        exporter: Exporter,
        allocator: Arc<Allocator>,
        persistence: Persistence,
        session_grace: Duration,
    ) -> Self {
        Self {
            info,
            registry: Mutex::new(registry),
            exporter,
            allocator,
            persistence,
            sessions: StdMutex::new(Sessions::default()),
            session_grace,
            counters: Counters::default(),
            shutdown: watch::Sender::new(false),
            services_generation: watch::Sender::new(0),
        }
    }

    /// Hands the dirty keys of a mutation to the exporter and wakes the
    /// `WatchServices` streams when a service's view changed.
    fn publish(&self, registry: &Registry, dirty: &crate::registry::Dirty) {
        self.exporter.apply(registry, dirty);
        if !dirty.services.is_empty() {
            self.services_generation
                .send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Ends every session stream and grace timer; nothing is removed.
    pub(crate) fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist_failed(&self, e: PersistError) -> Status {
        self.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "registry write to etcd failed");
        Status::unavailable(format!("etcd: {e}"))
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
    pub(crate) fn detach_restored(self: &Arc<Self>, nodes: Vec<String>) {
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
                if let Err(e) = state.remove_node(&node).await {
                    warn!(node = %node, error = %e, "removing an expired node failed");
                }
            }
            .in_current_span(),
        );
    }

    async fn remove_node(&self, node: &str) -> Result<(), Status> {
        let mut registry = self.registry.lock().await;
        let (dirty, removed) = registry.remove_node(node);
        for entry in &removed {
            self.persistence
                .delete_endpoint(&entry.spec.key())
                .await
                .map_err(|e| self.persist_failed(e))?;
            self.allocator.release(&self.labels_of(&entry.spec)).await;
        }
        self.persistence
            .delete_node(node)
            .await
            .map_err(|e| self.persist_failed(e))?;
        self.publish(&registry, &dirty);
        Ok(())
    }

    pub(crate) fn labels_of(&self, spec: &EndpointSpec) -> String {
        label_string(&spec.labels, &spec.namespace, self.info.name.as_str())
    }

    async fn upsert_endpoint(&self, node: &str, ep: Option<pb::Endpoint>) -> Result<u32, Status> {
        let spec = convert::endpoint(node, ep).map_err(invalid)?;
        let mut registry = self.registry.lock().await;
        registry.check_endpoint(&spec).map_err(invalid)?;
        let labels = self.labels_of(&spec);
        let identity = self.allocator.acquire(&labels).await.map_err(|e| {
            self.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
            Status::unavailable(format!("identity allocation: {e}"))
        })?;
        let key = spec.key();
        let outcome = match registry.upsert_endpoint(spec, identity) {
            Ok(outcome) => outcome,
            Err(e) => {
                self.allocator.release(&labels).await;
                return Err(invalid(e));
            }
        };
        if let Some(previous) = &outcome.previous {
            self.allocator
                .release(&self.labels_of(&previous.spec))
                .await;
        }
        let entry = registry.endpoint(&key).cloned();
        if let Some(entry) = entry {
            self.persistence
                .put_endpoint(&entry)
                .await
                .map_err(|e| self.persist_failed(e))?;
        }
        self.publish(&registry, &outcome.dirty);
        match outcome.conflicts.first() {
            None => Ok(identity),
            Some(c) => Err(Status::invalid_argument(format!(
                "endpoint.ips[{}]: {} is already owned by endpoint {}; this endpoint is registered \
                 and takes the IP over when that endpoint is deleted",
                c.index, c.ip, c.owner
            ))),
        }
    }

    async fn delete_endpoint(&self, node: &str, key: ObjectKey) -> Result<bool, Status> {
        let mut registry = self.registry.lock().await;
        match registry.endpoint(&key) {
            None => return Ok(false),
            Some(entry) if entry.spec.node != node => {
                return Err(Status::permission_denied(format!(
                    "endpoint {key} belongs to node {:?}, not to this session's node {node:?}",
                    entry.spec.node
                )))
            }
            Some(_) => {}
        }
        let (dirty, removed) = registry.delete_endpoint(&key);
        self.persistence
            .delete_endpoint(&key)
            .await
            .map_err(|e| self.persist_failed(e))?;
        if let Some(entry) = removed {
            self.allocator.release(&self.labels_of(&entry.spec)).await;
        }
        self.publish(&registry, &dirty);
        Ok(true)
    }

    /// Counts of what is exported now, per kind of [`crate::export::KINDS`].
    pub async fn exported_counts(&self) -> [(&'static str, u64); 4] {
        [
            ("nodes", self.exporter.nodes.len() as u64),
            ("ipcache", self.exporter.ips.len() as u64),
            ("identities", self.allocator.count().await as u64),
            ("services", self.exporter.services.len() as u64),
        ]
    }

    /// Failed etcd requests: registry writes, identity allocation, export.
    pub fn etcd_errors(&self) -> u64 {
        self.counters.etcd_errors.load(Ordering::Relaxed) + self.exporter.errors()
    }
}

/// Completes once shutdown has begun.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here.
    let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
}

fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The gRPC service over a shared [`State`].
#[derive(Debug)]
pub struct RegistryService(pub Arc<State>);

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
        let node = request.into_inner().node_name;
        validate::dns_subdomain(&node)
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
        let req = request.into_inner();
        let node = self.0.session_node(&req.session_id)?;
        let spec = convert::node(&node, req.node).map_err(invalid)?;
        let mut registry = self.0.registry.lock().await;
        self.0
            .persistence
            .put_node(&spec)
            .await
            .map_err(|e| self.0.persist_failed(e))?;
        let dirty = registry.upsert_node(spec);
        self.0.publish(&registry, &dirty);
        Ok(Response::new(pb::RegisterNodeResponse {}))
    }

    async fn upsert_endpoint(
        &self,
        request: Request<pb::UpsertEndpointRequest>,
    ) -> Result<Response<pb::UpsertEndpointResponse>, Status> {
        let req = request.into_inner();
        let node = self.0.session_node(&req.session_id)?;
        let identity = self.0.upsert_endpoint(&node, req.endpoint).await?;
        Ok(Response::new(pb::UpsertEndpointResponse { identity }))
    }

    async fn delete_endpoint(
        &self,
        request: Request<pb::DeleteEndpointRequest>,
    ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
        let req = request.into_inner();
        let node = self.0.session_node(&req.session_id)?;
        let existed = self
            .0
            .delete_endpoint(&node, ObjectKey::new(&req.namespace, &req.name))
            .await?;
        Ok(Response::new(pb::DeleteEndpointResponse { existed }))
    }

    async fn upsert_service(
        &self,
        request: Request<pb::UpsertServiceRequest>,
    ) -> Result<Response<pb::UpsertServiceResponse>, Status> {
        let spec = convert::service(request.into_inner().service).map_err(invalid)?;
        let mut registry = self.0.registry.lock().await;
        self.0
            .persistence
            .put_service(&spec)
            .await
            .map_err(|e| self.0.persist_failed(e))?;
        let dirty = registry.upsert_service(spec);
        self.0.publish(&registry, &dirty);
        Ok(Response::new(pb::UpsertServiceResponse {}))
    }

    async fn delete_service(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        let req = request.into_inner();
        let key = ObjectKey::new(&req.namespace, &req.name);
        let mut registry = self.0.registry.lock().await;
        let Some(dirty) = registry.delete_service(&key) else {
            return Ok(Response::new(pb::DeleteServiceResponse { existed: false }));
        };
        self.0
            .persistence
            .delete_service(&key)
            .await
            .map_err(|e| self.0.persist_failed(e))?;
        self.0.publish(&registry, &dirty);
        Ok(Response::new(pb::DeleteServiceResponse { existed: true }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let registry = self.0.registry.lock().await;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: registry.nodes().map(convert::node_to_proto).collect(),
        }))
    }

    async fn list_endpoints(
        &self,
        request: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let node = request.into_inner().node;
        let registry = self.0.registry.lock().await;
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
        let registry = self.0.registry.lock().await;
        Ok(Response::new(services_snapshot(&registry)))
    }

    async fn watch_services(
        &self,
        _request: Request<pb::WatchServicesRequest>,
    ) -> Result<Response<ServicesStream>, Status> {
        let (tx, rx) = mpsc::channel(1);
        let state = Arc::clone(&self.0);
        let mut generation = self.0.services_generation.subscribe();
        let mut shutdown = self.0.shutdown.subscribe();
        tokio::spawn(
            async move {
                loop {
                    // Mark the current generation seen before reading, so a
                    // change during the read triggers another snapshot.
                    generation.borrow_and_update();
                    let snapshot = services_snapshot(&*state.registry.lock().await);
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
        let synced = state.counters.ready.load(Ordering::Relaxed);
        let kinds = state
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
            cluster_name: state.info.name.to_string(),
            cluster_id: state.info.id.get().into(),
            etcd_connected: state.counters.etcd_connected.load(Ordering::Relaxed),
            synced,
            kinds,
            sessions: state.sessions().by_id.len() as u64,
            etcd_errors: state.etcd_errors(),
        }))
    }
}

/// Every service with its selected local backends (`ListServices`, and each
/// message of `WatchServices`).
fn services_snapshot(registry: &Registry) -> pb::ListServicesResponse {
    let services = registry
        .services()
        .filter_map(|s| registry.service_view(&s.key()))
        .map(|view| pb::RegisteredService {
            service: Some(convert::service_to_proto(view.spec)),
            backends: view
                .backends
                .iter()
                .map(|(ip, ports)| pb::Backend {
                    ip: ip.to_string(),
                    ports: ports
                        .iter()
                        .map(|(name, p)| pb::BackendPort {
                            name: name.clone(),
                            protocol: convert::protocol_to_proto(p.protocol),
                            port: p.port.into(),
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    pb::ListServicesResponse { services }
}

/// Puts the persisted registry back: nodes, services, endpoints with their
/// identities (adopted when the number still holds, allocated otherwise).
///
/// # Errors
///
/// When an identity cannot be allocated.
pub(crate) async fn restore(
    snapshot: crate::persist::Snapshot,
    allocator: &Allocator,
    cluster: &str,
) -> Result<(Registry, Vec<EndpointEntry>), crate::identity::IdentityError> {
    let mut registry = Registry::default();
    let mut renumbered = Vec::new();
    for node in snapshot.nodes {
        registry.upsert_node(node);
    }
    for service in snapshot.services {
        registry.upsert_service(service);
    }
    for mut entry in snapshot.endpoints {
        let labels = label_string(&entry.spec.labels, &entry.spec.namespace, cluster);
        if !allocator.adopt(&labels, entry.identity).await? {
            entry.identity = allocator.acquire(&labels).await?;
            renumbered.push(entry.clone());
        }
        registry.restore_endpoint(entry);
    }
    Ok((registry, renumbered))
}
