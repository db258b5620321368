//! The objects the watchers hold, the records last applied to the
//! registry, and the recomputation that turns one into the other (module
//! docs of [`super`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{runtime::watcher, ResourceExt};
use mesh_proto::model::{EndpointSpec, Labels, NodeSpec, ObjectKey, ServiceSpec};
use tracing::{debug, info, warn};

use super::{convert, Event};
use crate::registry::{Owner, Registry};

/// The kinds the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Nodes,
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Nodes => "nodes",
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
        })
    }
}

fn key_of<K: kube::Resource>(object: &K) -> ObjectKey {
    ObjectKey::new(&object.namespace().unwrap_or_default(), &object.name_any())
}

/// The objects of one kind, as its watcher reported them.
struct Watched<K> {
    objects: BTreeMap<ObjectKey, K>,
    /// The listing in progress, between `Init` and `InitDone`.
    relist: Option<BTreeMap<ObjectKey, K>>,
    /// A listing has completed once.
    listed: bool,
}

impl<K: kube::Resource> Watched<K> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }

    /// Applies one event; returns the keys whose object may have changed.
    /// A listing is buffered and replaces the objects at `InitDone`.
    fn event(&mut self, event: watcher::Event<K>) -> Vec<ObjectKey> {
        match event {
            watcher::Event::Apply(object) => {
                let key = key_of(&object);
                self.objects.insert(key.clone(), object);
                vec![key]
            }
            watcher::Event::Delete(object) => {
                let key = key_of(&object);
                self.objects.remove(&key);
                vec![key]
            }
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(object) => {
                let key = key_of(&object);
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, object);
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listing = self.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.objects, listing);
                self.listed = true;
                let keys: BTreeSet<ObjectKey> = old
                    .into_keys()
                    .chain(self.objects.keys().cloned())
                    .collect();
                keys.into_iter().collect()
            }
        }
    }
}

/// Everything the source holds.
pub(super) struct Objects {
    registry: Registry,
    nodes: Watched<Node>,
    namespaces: Watched<Namespace>,
    pods: Watched<Pod>,
    services: Watched<Service>,
    slices: Watched<EndpointSlice>,
    /// EndpointSlice → its service, and the reverse.
    slice_service: BTreeMap<ObjectKey, ObjectKey>,
    service_slices: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// What the registry holds from this source (seeded with what it
    /// restored from etcd).
    applied_nodes: BTreeMap<String, NodeSpec>,
    applied_endpoints: BTreeMap<ObjectKey, EndpointSpec>,
    applied_services: BTreeMap<ObjectKey, ServiceSpec>,
    endpoints_open: bool,
    services_open: bool,
    synced: bool,
}

impl Objects {
    pub(super) async fn new(registry: Registry) -> Self {
        let (applied_nodes, applied_endpoints, applied_services) = {
            let table = registry.read().await;
            (
                table.nodes().map(|n| (n.name.clone(), n.clone())).collect(),
                table
                    .endpoints()
                    .map(|e| (e.spec.key(), e.spec.clone()))
                    .collect(),
                table.services().map(|s| (s.key(), s.clone())).collect(),
            )
        };
        Self {
            registry,
            nodes: Watched::new(),
            namespaces: Watched::new(),
            pods: Watched::new(),
            services: Watched::new(),
            slices: Watched::new(),
            slice_service: BTreeMap::new(),
            service_slices: BTreeMap::new(),
            applied_nodes,
            applied_endpoints,
            applied_services,
            endpoints_open: false,
            services_open: false,
            synced: false,
        }
    }

    /// Applies one watcher event: records the object and writes the
    /// records it changes.
    pub(super) async fn apply(&mut self, event: Event) {
        match event {
            Event::Node(e) => {
                let first = !self.nodes.listed;
                let mut keys = self.nodes.event(e);
                if first && self.nodes.listed {
                    // Nodes restored from etcd that the first listing lacks
                    // were deleted while no apiserver watched.
                    keys.extend(self.applied_nodes.keys().map(|n| ObjectKey::new("", n)));
                    keys.sort();
                    keys.dedup();
                }
                for key in keys {
                    self.node(&key.name).await;
                }
            }
            Event::Namespace(e) => {
                let keys = self.namespaces.event(e);
                for key in keys {
                    let pods: Vec<ObjectKey> = self
                        .pods
                        .objects
                        .range(ObjectKey::new(&key.name, "")..)
                        .take_while(|(k, _)| k.namespace == key.name)
                        .map(|(k, _)| k.clone())
                        .collect();
                    self.endpoints(pods).await;
                }
            }
            Event::Pod(e) => {
                let keys = self.pods.event(e);
                self.endpoints(keys).await;
            }
            Event::Service(e) => {
                let keys = self.services.event(e);
                self.services(keys).await;
            }
            Event::EndpointSlice(e) => {
                let keys = self.slices.event(e);
                let services = self.index_slices(keys);
                self.services(services).await;
            }
        }
        self.open_gates().await;
    }

    /// Opens the endpoint and service gates once what they depend on is
    /// listed, and says synced once every kind is.
    async fn open_gates(&mut self) {
        if !self.endpoints_open && self.nodes.listed && self.namespaces.listed && self.pods.listed {
            self.endpoints_open = true;
            let keys: BTreeSet<ObjectKey> = self
                .applied_endpoints
                .keys()
                .chain(self.pods.objects.keys())
                .cloned()
                .collect();
            self.endpoints(keys).await;
        }
        if !self.services_open && self.services.listed && self.slices.listed {
            self.services_open = true;
            let keys: BTreeSet<ObjectKey> = self
                .applied_services
                .keys()
                .chain(self.services.objects.keys())
                .cloned()
                .collect();
            self.services(keys).await;
        }
        if !self.synced && self.endpoints_open && self.services_open {
            // Nodes restored from etcd that the listing lacks went when the
            // node listing was applied; the registry may say it is complete.
            self.synced = true;
            info!(
                nodes = self.applied_nodes.len(),
                endpoints = self.applied_endpoints.len(),
                services = self.applied_services.len(),
                "every kind listed: the registry is synced"
            );
            self.registry.synced().await;
        }
    }

    /// Brings the registry's node `name` in line with its object.
    async fn node(&mut self, name: &str) {
        if !self.nodes.listed {
            return;
        }
        let key = ObjectKey::new("", name);
        let desired = match self.nodes.objects.get(&key).map(convert::node) {
            None => None,
            Some(Ok(spec)) => Some(spec),
            Some(Err(e)) => {
                warn!(error = %e, "node skipped: it cannot be a record");
                return;
            }
        };
        if desired.as_ref() == self.applied_nodes.get(name) {
            return;
        }
        match desired {
            Some(spec) => {
                if let Err(e) = self
                    .registry
                    .upsert_node(&Owner::Source, spec.clone())
                    .await
                {
                    warn!(node = name, error = %kvstore::error_chain(&e), "node not applied");
                    return;
                }
                debug!(node = name, "node applied");
                self.applied_nodes.insert(name.to_owned(), spec);
                // Endpoints refused while their node was unknown.
                let waiting: Vec<ObjectKey> = self
                    .pods
                    .objects
                    .iter()
                    .filter(|(k, p)| {
                        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name)
                            && !self.applied_endpoints.contains_key(*k)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                self.endpoints(waiting).await;
            }
            None => {
                if let Err(e) = self.registry.delete_node(&Owner::Source, name).await {
                    warn!(node = name, error = %kvstore::error_chain(&e), "node not deleted");
                    return;
                }
                debug!(node = name, "node deleted with its endpoints");
                self.applied_nodes.remove(name);
                self.applied_endpoints.retain(|_, e| e.node != name);
            }
        }
    }

    fn namespace_labels(&self, namespace: &str) -> Labels {
        self.namespaces
            .objects
            .get(&ObjectKey::new("", namespace))
            .map(convert::namespace_labels)
            .unwrap_or_default()
    }

    /// Brings the registry's endpoints `keys` in line with their pods.
    async fn endpoints(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        if !self.endpoints_open {
            return;
        }
        for key in keys {
            let desired = match self.pods.objects.get(&key) {
                None => None,
                Some(pod) => match convert::pod(pod, &self.namespace_labels(&key.namespace)) {
                    Ok(spec) => spec,
                    Err(e) => {
                        warn!(error = %e, "pod skipped: it cannot be an endpoint");
                        continue;
                    }
                },
            };
            if desired.as_ref() == self.applied_endpoints.get(&key) {
                continue;
            }
            match desired {
                Some(spec) => {
                    match self
                        .registry
                        .upsert_endpoint(&Owner::Source, spec.clone())
                        .await
                    {
                        Ok(upserted) => {
                            for conflict in &upserted.conflicts {
                                warn!(endpoint = %key, %conflict, "endpoint waits for an IP another endpoint holds");
                            }
                            self.applied_endpoints.insert(key, spec);
                        }
                        Err(e) => {
                            warn!(endpoint = %key, error = %kvstore::error_chain(&e), "endpoint not applied");
                        }
                    }
                }
                None => match self.registry.delete_endpoint(&Owner::Source, &key).await {
                    Ok(_) => {
                        self.applied_endpoints.remove(&key);
                    }
                    Err(e) => {
                        warn!(endpoint = %key, error = %kvstore::error_chain(&e), "endpoint not deleted");
                    }
                },
            }
        }
    }

    /// Updates the slice ↔ service index for changed slices; returns the
    /// services whose slices changed.
    fn index_slices(&mut self, keys: Vec<ObjectKey>) -> BTreeSet<ObjectKey> {
        let mut services = BTreeSet::new();
        for key in keys {
            if let Some(old) = self.slice_service.remove(&key) {
                if let Some(set) = self.service_slices.get_mut(&old) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.service_slices.remove(&old);
                    }
                }
                services.insert(old);
            }
            let owner = self
                .slices
                .objects
                .get(&key)
                .and_then(convert::slice_service);
            if let Some((namespace, name)) = owner {
                let service = ObjectKey::new(&namespace, &name);
                self.slice_service.insert(key.clone(), service.clone());
                self.service_slices
                    .entry(service.clone())
                    .or_default()
                    .insert(key);
                services.insert(service);
            }
        }
        services
    }

    /// Brings the registry's services `keys` in line with their objects.
    async fn services(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        if !self.services_open {
            return;
        }
        for key in keys {
            let desired = match self.services.objects.get(&key) {
                None => None,
                Some(service) => {
                    let slices: Vec<&EndpointSlice> = self
                        .service_slices
                        .get(&key)
                        .into_iter()
                        .flatten()
                        .filter_map(|k| self.slices.objects.get(k))
                        .collect();
                    match convert::service(service, &slices) {
                        Ok(spec) => spec,
                        Err(e) => {
                            warn!(error = %e, "service skipped: it cannot be a record");
                            continue;
                        }
                    }
                }
            };
            if desired.as_ref() == self.applied_services.get(&key) {
                continue;
            }
            let result = match &desired {
                Some(spec) => self
                    .registry
                    .upsert_service(&Owner::Source, spec.clone())
                    .await
                    .map(|()| true),
                None => self.registry.delete_service(&Owner::Source, &key).await,
            };
            match result {
                Ok(_) => match desired {
                    Some(spec) => {
                        self.applied_services.insert(key, spec);
                    }
                    None => {
                        self.applied_services.remove(&key);
                    }
                },
                Err(e) => {
                    warn!(service = %key, error = %kvstore::error_chain(&e), "service not applied");
                }
            }
        }
    }
}
