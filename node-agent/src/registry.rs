//! Keeps this node and its endpoints registered with the local
//! clustermesh-apiserver (gRPC `mesh.v1.Registry`, standalone mode).
//!
//! One task owns the session: connect → `OpenSession` → `RegisterNode` →
//! upsert every endpoint the agent holds and delete every endpoint removed
//! while disconnected → watch the session stream; when the stream ends,
//! back off with jitter and start over. Registrations are owned by the
//! session on the apiserver side, and a new session of the same node within
//! the apiserver's grace period takes them over, so an agent restart or a
//! short disconnect never withdraws a live endpoint.
//!
//! [`Registry`] is the handle the CNI path uses: `upsert_endpoint` needs a
//! live session (it returns the identity the apiserver allocated) and fails
//! fast otherwise, so the plugin can answer "try again later".

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use kvstore::retry::Backoff;
use mesh_proto::v1::{
    registry_client::RegistryClient, DeleteEndpointRequest, Endpoint, Node, RegisterNodeRequest,
    UpsertEndpointRequest,
};
use tokio::sync::{watch, Mutex};
use tonic::transport::Channel;
use tracing::{info, warn, Instrument};

/// How long one RPC may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of registry calls.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No live session (the apiserver is unreachable or the agent is
    /// still connecting).
    #[error("no session with the apiserver at {0}")]
    NotConnected(String),
    /// The apiserver refused or failed the call.
    #[error("apiserver {op} failed")]
    Rpc {
        /// The call.
        op: &'static str,
        /// Status.
        #[source]
        source: tonic::Status,
    },
    /// The call did not finish in time.
    #[error("apiserver {0} timed out")]
    Timeout(&'static str),
}

impl RegistryError {
    /// Whether retrying later may succeed (as opposed to a refused request).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::NotConnected(_) | Self::Timeout(_) => true,
            Self::Rpc { source, .. } => !matches!(
                source.code(),
                tonic::Code::InvalidArgument | tonic::Code::AlreadyExists
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Desired {
    endpoints: BTreeMap<(String, String), Endpoint>,
    /// Deleted while no session was live; deleted after reconnecting.
    tombstones: BTreeMap<(String, String), ()>,
}

#[derive(Debug, Clone)]
struct Session {
    client: RegistryClient<Channel>,
    id: String,
}

/// Handle to the registration task.
#[derive(Debug, Clone)]
pub struct Registry {
    url: String,
    desired: Arc<Mutex<Desired>>,
    session: watch::Receiver<Option<Session>>,
}

/// Observable state of the session, for status.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RegistryStatus {
    /// A session is live.
    pub connected: bool,
}

impl Registry {
    /// Starts the task that registers `node` at `url` until `shutdown`.
    pub fn spawn(
        url: String,
        node: Node,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Self {
        let desired = Arc::new(Mutex::new(Desired::default()));
        let (tx, rx) = watch::channel(None);
        let task = SessionTask {
            url: url.clone(),
            node,
            desired: desired.clone(),
            session: tx,
        };
        let span = tracing::info_span!("registry", apiserver = %url);
        tokio::spawn(
            async move {
                tokio::select! {
                    () = task.run() => {}
                    () = shutdown => {}
                }
            }
            .instrument(span),
        );
        Self {
            url,
            desired,
            session: rx,
        }
    }

    /// The session state.
    pub fn status(&self) -> RegistryStatus {
        RegistryStatus {
            connected: self.session.borrow().is_some(),
        }
    }

    /// Registers (or updates) `ep` and returns its identity. The endpoint
    /// is remembered and registered again after a reconnect.
    ///
    /// # Errors
    ///
    /// [`RegistryError::NotConnected`] without a session,
    /// [`RegistryError::Rpc`] when the apiserver refuses.
    pub async fn upsert_endpoint(&self, ep: Endpoint) -> Result<u32, RegistryError> {
        let key = (ep.namespace.clone(), ep.name.clone());
        let session = self.current()?;
        let identity = upsert(&session, ep.clone()).await?;
        let mut d = self.desired.lock().await;
        d.tombstones.remove(&key);
        d.endpoints.insert(key, ep);
        Ok(identity)
    }

    /// Remembers `ep` so that it is registered on the next session, without
    /// calling the apiserver now (agent restart: the endpoints of the
    /// previous run).
    pub async fn remember_endpoint(&self, ep: Endpoint) {
        let key = (ep.namespace.clone(), ep.name.clone());
        let mut d = self.desired.lock().await;
        d.tombstones.remove(&key);
        d.endpoints.insert(key, ep);
        drop(d);
        if let Ok(session) = self.current() {
            let d = self.desired.lock().await;
            let eps: Vec<Endpoint> = d.endpoints.values().cloned().collect();
            drop(d);
            for ep in eps {
                if let Err(e) = upsert(&session, ep).await {
                    warn!(error = %e, "re-registering a remembered endpoint failed");
                }
            }
        }
    }

    /// Deletes the endpoint `namespace/name`. Without a session the delete
    /// is remembered and done after reconnecting, so it never fails for
    /// lack of a connection.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Rpc`] when the apiserver fails the call.
    pub async fn delete_endpoint(&self, namespace: &str, name: &str) -> Result<(), RegistryError> {
        let key = (namespace.to_owned(), name.to_owned());
        {
            let mut d = self.desired.lock().await;
            d.endpoints.remove(&key);
            d.tombstones.insert(key.clone(), ());
        }
        let Ok(session) = self.current() else {
            return Ok(());
        };
        delete(&session, &key.0, &key.1).await?;
        self.desired.lock().await.tombstones.remove(&key);
        Ok(())
    }

    fn current(&self) -> Result<Session, RegistryError> {
        self.session
            .borrow()
            .clone()
            .ok_or_else(|| RegistryError::NotConnected(self.url.clone()))
    }
}

async fn upsert(session: &Session, ep: Endpoint) -> Result<u32, RegistryError> {
    let mut client = session.client.clone();
    let req = UpsertEndpointRequest {
        session_id: session.id.clone(),
        endpoint: Some(ep),
    };
    let resp = tokio::time::timeout(RPC_TIMEOUT, client.upsert_endpoint(req))
        .await
        .map_err(|_| RegistryError::Timeout("UpsertEndpoint"))?
        .map_err(|source| RegistryError::Rpc {
            op: "UpsertEndpoint",
            source,
        })?;
    Ok(resp.into_inner().identity)
}

async fn delete(session: &Session, namespace: &str, name: &str) -> Result<(), RegistryError> {
    let mut client = session.client.clone();
    let req = DeleteEndpointRequest {
        session_id: session.id.clone(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    tokio::time::timeout(RPC_TIMEOUT, client.delete_endpoint(req))
        .await
        .map_err(|_| RegistryError::Timeout("DeleteEndpoint"))?
        .map_err(|source| RegistryError::Rpc {
            op: "DeleteEndpoint",
            source,
        })?;
    Ok(())
}

struct SessionTask {
    url: String,
    node: Node,
    desired: Arc<Mutex<Desired>>,
    session: watch::Sender<Option<Session>>,
}

impl SessionTask {
    async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.session_once().await {
                Ok(()) => {
                    info!("session stream ended; reconnecting");
                    backoff.reset();
                }
                Err(e) => warn!(error = %e, "apiserver session failed"),
            }
            self.session.send_replace(None);
            backoff.wait().await;
        }
    }

    async fn session_once(&self) -> Result<(), RegistryError> {
        let channel = tonic::transport::Endpoint::from_shared(self.url.clone())
            .map_err(|e| RegistryError::Rpc {
                op: "connect",
                source: tonic::Status::invalid_argument(e.to_string()),
            })?
            .connect_timeout(RPC_TIMEOUT)
            .connect()
            .await
            .map_err(|e| RegistryError::Rpc {
                op: "connect",
                source: tonic::Status::unavailable(e.to_string()),
            })?;
        let mut client = RegistryClient::new(channel);
        let (opened, mut stream) = tokio::time::timeout(
            RPC_TIMEOUT,
            mesh_proto::open_session(&mut client, &self.node.name),
        )
        .await
        .map_err(|_| RegistryError::Timeout("OpenSession"))?
        .map_err(|source| RegistryError::Rpc {
            op: "OpenSession",
            source,
        })?;
        let session = Session {
            client: client.clone(),
            id: opened.session_id,
        };
        tokio::time::timeout(
            RPC_TIMEOUT,
            client.register_node(RegisterNodeRequest {
                session_id: session.id.clone(),
                node: Some(self.node.clone()),
            }),
        )
        .await
        .map_err(|_| RegistryError::Timeout("RegisterNode"))?
        .map_err(|source| RegistryError::Rpc {
            op: "RegisterNode",
            source,
        })?;
        let (eps, tombs): (Vec<Endpoint>, Vec<(String, String)>) = {
            let d = self.desired.lock().await;
            (
                d.endpoints.values().cloned().collect(),
                d.tombstones.keys().cloned().collect(),
            )
        };
        for ep in eps {
            upsert(&session, ep).await?;
        }
        for (ns, name) in tombs {
            delete(&session, &ns, &name).await?;
            self.desired.lock().await.tombstones.remove(&(ns, name));
        }
        info!(
            session = %session.id,
            took_over = opened.took_over,
            "registered node with the apiserver"
        );
        self.session.send_replace(Some(session));
        // Keepalives arrive every few seconds; three missed ones mean the
        // peer is gone even if TCP has not noticed.
        loop {
            match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
                Err(_) => return Err(RegistryError::Timeout("session keepalive")),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(source)) => {
                    return Err(RegistryError::Rpc {
                        op: "session stream",
                        source,
                    })
                }
            }
        }
    }
}
