//! The Kubernetes source (`--source kubernetes`): kube-rs watchers on Nodes,
//! Namespaces, Pods, Services and EndpointSlices feed the [`Registry`], as
//! the standalone source's gRPC writes do (`docs/architecture.md` §3).
//!
//! # How objects become records
//!
//! [`convert`] maps one object (with what it depends on: a pod with its
//! namespace's labels, a service with its EndpointSlices) to one record;
//! [`state::Objects`] keeps the objects and the records last applied, and
//! after each event recomputes only the records that event can change (a
//! namespace: its pods; a slice: its service) and writes the differences.
//! A record that did not change is never written again, so a relist (a
//! watcher's `Init` after `410 Gone` or a dropped connection) writes
//! nothing for what did not change, and a restarted apiserver, whose
//! registry is restored from etcd, rewrites nothing that is still listed.
//!
//! # Order and the synced point
//!
//! A watcher's relist is buffered from `Init` to `InitDone` and applied as
//! one change: what the new listing lacks is deleted then, never before.
//! Endpoints are applied only once Nodes and Namespaces have been listed
//! (the registry refuses an endpoint whose node it does not know); an
//! endpoint refused for a node that arrives later is retried when the node
//! is applied. When all five watchers have listed once, the source calls
//! [`Registry::synced`]; records restored from etcd that no listing holds
//! are removed then ([`Registry::retain`]).
//!
//! # Errors
//!
//! An object that cannot become a record is logged and skipped, as Cilium
//! does; watch errors are retried by the watchers with backoff. The
//! gRPC API stays up, read-only ([`crate::server::Standalone::bind_read_only`]):
//! node agents read their cluster's services from it.

pub mod convert;
pub mod lease;
mod state;

use std::{fmt::Debug, future::Future, pin::pin};

use futures::{stream::BoxStream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use serde::de::DeserializeOwned;
use tracing::warn;

use crate::{registry::Registry, server::Standalone, source::LocalSource};

pub use mesh_k8s::{ApiConfig, ClientError};
pub use state::Kind;

/// The Kubernetes source, its client made and its read-only gRPC API bound.
pub struct KubernetesSource {
    client: Client,
    grpc: Standalone,
}

impl Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("grpc", &self.grpc)
            .finish_non_exhaustive()
    }
}

impl KubernetesSource {
    pub fn new(client: Client, grpc: Standalone) -> Self {
        Self { client, grpc }
    }

    /// The bound address of the read-only gRPC API.
    pub fn grpc_addr(&self) -> std::net::SocketAddr {
        self.grpc.local_addr()
    }
}

/// Why the source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("gRPC server")]
    Grpc(#[source] tonic::transport::Error),
}

impl LocalSource for KubernetesSource {
    type Error = SourceError;

    async fn run(
        self,
        registry: Registry,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), SourceError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let grpc = self.grpc.run(registry.clone(), stopped(stop_rx.clone()));
        let watch = watch_all(self.client, registry, stopped(stop_rx));
        let shutdown = async {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let (grpc, (), ()) = tokio::join!(grpc, watch, shutdown);
        grpc.map_err(SourceError::Grpc)
    }
}

/// One watcher event, tagged with its kind. Events pass by value from the
/// watch streams to [`state::Objects::apply`] one at a time, so the size
/// difference between kinds costs nothing worth a box per event.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "moved once per event, never stored in bulk"
)]
pub enum Event {
    Node(watcher::Event<Node>),
    Namespace(watcher::Event<Namespace>),
    Pod(watcher::Event<Pod>),
    Service(watcher::Event<Service>),
    EndpointSlice(watcher::Event<EndpointSlice>),
}

fn watch<K>(
    api: Api<K>,
    tag: fn(watcher::Event<K>) -> Event,
    kind: Kind,
) -> BoxStream<'static, Event>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| async move {
            match event {
                Ok(event) => Some(tag(event)),
                Err(e) => {
                    warn!(kind = %kind, error = %kvstore::error_chain(&e), "watch failed; retrying");
                    None
                }
            }
        })
        .boxed()
}

/// Watches the five kinds until `shutdown` and applies every event.
async fn watch_all(client: Client, registry: Registry, shutdown: impl Future<Output = ()>) {
    let events = futures::stream::select_all([
        watch(Api::<Node>::all(client.clone()), Event::Node, Kind::Nodes),
        watch(
            Api::<Namespace>::all(client.clone()),
            Event::Namespace,
            Kind::Namespaces,
        ),
        watch(Api::<Pod>::all(client.clone()), Event::Pod, Kind::Pods),
        watch(
            Api::<Service>::all(client.clone()),
            Event::Service,
            Kind::Services,
        ),
        watch(
            Api::<EndpointSlice>::all(client),
            Event::EndpointSlice,
            Kind::EndpointSlices,
        ),
    ]);
    let mut objects = state::Objects::new(registry).await;
    let mut events = pin!(events.take_until(shutdown));
    while let Some(event) = events.next().await {
        objects.apply(event).await;
    }
}
