//! Local sources: where this cluster's nodes, endpoints and services come
//! from (`docs/architecture.md` §3, step 1).
//!
//! Two sources are planned behind one trait, [`LocalSource`]:
//!
//! * **standalone** ([`crate::server::Standalone`], built): node agents open a
//!   session and register their node and endpoints over the gRPC API;
//!   `meshctl` declares services;
//! * **kubernetes** ([`crate::kubernetes::KubernetesSource`]): kube-rs
//!   watchers on Nodes, Namespaces, Pods, Services and EndpointSlices.
//!
//! A source only *declares*. It turns its input into the typed records of
//! [`crate::model`] and calls the write methods of a [`Registry`]; the registry
//! validates, allocates identities, persists and exports. The registry and
//! the export therefore do not change when a source is added.
//!
//! # What a source must guarantee
//!
//! * **Ownership.** Every write names an [`Owner`]. A source writes as
//!   [`Owner::Source`], or, where a record belongs to a narrower party (a
//!   node agent's session), as [`Owner::Session`], which may declare only its
//!   node and the endpoints on it. A session's records are removed with
//!   [`Registry::delete_node`] when the source decides the session is gone
//!   (the standalone source does so after `--session-grace`).
//! * **Order.** A node is upserted before endpoints on it: the registry
//!   refuses an endpoint whose node is not registered, or whose IPs lie
//!   outside the node's pod CIDRs. A source with independent streams
//!   applies its node listing first (the Kubernetes source starts the Pod
//!   reflector after the Node reflector's `InitDone`).
//! * **Synced point.** The source calls [`Registry::synced`] exactly when its
//!   first full listing is applied, and not before: until then the export
//!   keeps every key a previous apiserver left, writes no sync canary and
//!   `/readyz` stays 503, so remote clusters never treat a half-listed
//!   cluster as complete. The standalone source is synced as soon as it
//!   runs: its listing is the registry restored from etcd, and agents that
//!   do not come back are removed after the session grace. The Kubernetes
//!   source is synced when every reflector reached its first `InitDone`.
//! * **Resync.** A source that lists again (a reflector's `Init` after a
//!   watch error, or its first listing after a restart, when the registry
//!   holds what was restored from etcd) upserts each listed record
//!   (`InitApply`) and then calls [`Registry::retain`] with the complete set
//!   of listed keys of that kind (`InitDone`): the registry removes what the
//!   listing lacks, and nothing that is still listed ever disappears.
//! * **Validation is not the source's job.** A source parses its wire format
//!   only; the registry refuses bad values with
//!   [`RegistryError::Invalid`](crate::registry::RegistryError::Invalid),
//!   naming the field, the same for every source. The standalone source
//!   answers it as gRPC `InvalidArgument`; the Kubernetes source logs it
//!   and skip the object, as Cilium does with objects it cannot convert.
//! * **Shutdown.** [`LocalSource::run`] returns soon after `shutdown`
//!   completes, without deleting anything: the registry is persisted and a
//!   successor adopts it.

use std::future::Future;

pub use crate::registry::{Listing, Owner, Registry};

/// A local source of nodes, endpoints and services. See the module docs for
/// the contract.
pub trait LocalSource: Send + 'static {
    /// Why the source stopped other than by shutdown.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Feeds `registry` until `shutdown` completes. Calls
    /// [`Registry::synced`] once its first full listing is applied.
    ///
    /// # Errors
    ///
    /// When the source cannot go on (e.g. its listener failed).
    fn run(
        self,
        registry: Registry,
        shutdown: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
