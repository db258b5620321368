//! The registry's in-memory table: nodes, endpoints with their IP claims,
//! services.
//!
//! It is sans-IO: every mutation returns what it made dirty (node names, IPs,
//! services), and the exporter renders exactly those keys again from the new
//! state. That keeps a single endpoint change O(endpoints of its namespace)
//! instead of a full re-export, which matters at 20,000 endpoints.
//!
//! IP ownership follows Cilium: the first endpoint to claim an IP owns it; a
//! later claimant waits in line and becomes the owner when every earlier claim
//! is gone. Claims are ordered by a sequence number that is persisted with the
//! endpoint, so the order survives a restart.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use mesh_proto::model::{
    resolve_target, EndpointSpec, NodeSpec, ObjectKey, PortConfig, ServiceSpec,
};

pub use mesh_proto::FieldError;

/// A registered endpoint with what the apiserver decided about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub spec: EndpointSpec,
    /// Numeric security identity of its labels.
    pub identity: u32,
    /// Claim sequence number per IP: lower claims first.
    pub claims: BTreeMap<IpAddr, u64>,
}

/// The keys a mutation changed; each must be rendered again and exported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    pub nodes: BTreeSet<String>,
    pub ips: BTreeSet<IpAddr>,
    pub services: BTreeSet<ObjectKey>,
}

impl Dirty {
    pub fn merge(&mut self, other: Dirty) {
        self.nodes.extend(other.nodes);
        self.ips.extend(other.ips);
        self.services.extend(other.services);
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.ips.is_empty() && self.services.is_empty()
    }
}

/// An IP an endpoint claimed but another endpoint owns. The endpoint is
/// registered all the same and waits in line for the IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Position of the IP in the endpoint's `ips`.
    pub index: usize,
    pub ip: IpAddr,
    /// The endpoint that owns the IP now.
    pub owner: ObjectKey,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "endpoint.ips[{}]: {} is already owned by endpoint {}; this endpoint is registered \
             and takes the IP over when that endpoint is deleted",
            self.index, self.ip, self.owner
        )
    }
}

/// What an endpoint upsert did.
#[derive(Debug, Default)]
pub struct EndpointUpsert {
    pub dirty: Dirty,
    /// The entry it replaced (its identity must be released by the caller).
    pub previous: Option<EndpointEntry>,
    /// IPs held by an earlier endpoint; this one waits for them.
    pub conflicts: Vec<Conflict>,
}

/// One exported ipcache entry, before rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpView<'a> {
    pub ip: IpAddr,
    pub host_ip: Option<IpAddr>,
    pub endpoint: &'a EndpointEntry,
}

/// One service with its local backends: IP → port name → port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView<'a> {
    pub spec: &'a ServiceSpec,
    pub backends: BTreeMap<IpAddr, BTreeMap<String, PortConfig>>,
}

/// Nodes, endpoints and services of this cluster.
#[derive(Debug, Default)]
pub struct Table {
    nodes: BTreeMap<String, NodeSpec>,
    endpoints: BTreeMap<ObjectKey, EndpointEntry>,
    /// IP → claims in order (sequence → endpoint); the first is the owner.
    claims: BTreeMap<IpAddr, BTreeMap<u64, ObjectKey>>,
    services: BTreeMap<ObjectKey, ServiceSpec>,
    next_claim: u64,
}

impl Table {
    pub fn nodes(&self) -> impl Iterator<Item = &NodeSpec> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.get(name)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointEntry> {
        self.endpoints.values()
    }

    pub fn endpoint(&self, key: &ObjectKey) -> Option<&EndpointEntry> {
        self.endpoints.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.values()
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&ServiceSpec> {
        self.services.get(key)
    }

    /// All IPs that have at least one claim.
    pub fn claimed_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.claims.keys().copied()
    }

    /// Adds or replaces a node. Its endpoints' ipcache entries are dirty
    /// because their host IP may have changed.
    pub fn upsert_node(&mut self, node: NodeSpec) -> Dirty {
        let mut dirty = Dirty::default();
        if self.nodes.get(&node.name) == Some(&node) {
            return dirty;
        }
        dirty.nodes.insert(node.name.clone());
        for entry in self.endpoints.values().filter(|e| e.spec.node == node.name) {
            dirty.ips.extend(entry.spec.ips.iter().copied());
        }
        self.nodes.insert(node.name.clone(), node);
        dirty
    }

    /// Removes a node and every endpoint on it; returns the removed endpoints
    /// so the caller can release their identities.
    pub fn remove_node(&mut self, name: &str) -> (Dirty, Vec<EndpointEntry>) {
        let mut dirty = Dirty::default();
        let keys: Vec<ObjectKey> = self
            .endpoints
            .values()
            .filter(|e| e.spec.node == name)
            .map(|e| e.spec.key())
            .collect();
        let mut removed = Vec::with_capacity(keys.len());
        for key in keys {
            let (d, entry) = self.delete_endpoint(&key);
            dirty.merge(d);
            removed.extend(entry);
        }
        if self.nodes.remove(name).is_some() {
            dirty.nodes.insert(name.to_owned());
        }
        (dirty, removed)
    }

    /// Checks what depends on the registry: the node is registered and every IP
    /// lies in one of its pod CIDRs.
    ///
    /// # Errors
    ///
    /// The offending field of `endpoint`.
    pub fn check_endpoint(&self, spec: &EndpointSpec) -> Result<(), FieldError> {
        let node = self.nodes.get(&spec.node).ok_or_else(|| {
            FieldError::new(
                "endpoint.node",
                format!("node {:?} is not registered", spec.node),
            )
        })?;
        for (i, ip) in spec.ips.iter().enumerate() {
            if !node.pod_cidrs.iter().any(|cidr| cidr.contains(ip)) {
                return Err(FieldError::new(
                    format!("endpoint.ips[{i}]"),
                    format!("{ip} is outside the pod CIDRs of node {:?}", node.name),
                ));
            }
        }
        Ok(())
    }

    /// Adds or replaces an endpoint with its allocated identity.
    ///
    /// # Errors
    ///
    /// As [`Table::check_endpoint`]; nothing changes then.
    pub fn upsert_endpoint(
        &mut self,
        spec: EndpointSpec,
        identity: u32,
    ) -> Result<EndpointUpsert, FieldError> {
        self.check_endpoint(&spec)?;
        let key = spec.key();
        let mut out = EndpointUpsert::default();
        let previous = self.endpoints.remove(&key);
        let mut claims = BTreeMap::new();
        if let Some(prev) = &previous {
            // Keep the claim order of IPs the endpoint still has; drop the rest.
            for (ip, seq) in &prev.claims {
                if spec.ips.contains(ip) {
                    claims.insert(*ip, *seq);
                } else {
                    self.unclaim(*ip, *seq);
                    out.dirty.ips.insert(*ip);
                }
            }
        }
        for ip in &spec.ips {
            if !claims.contains_key(ip) {
                let seq = self.next_claim;
                self.next_claim += 1;
                self.claims.entry(*ip).or_default().insert(seq, key.clone());
                claims.insert(*ip, seq);
            }
            out.dirty.ips.insert(*ip);
        }
        for (index, ip) in spec.ips.iter().enumerate() {
            if let Some(owner) = self.owner(*ip).filter(|owner| **owner != key) {
                out.conflicts.push(Conflict {
                    index,
                    ip: *ip,
                    owner: owner.clone(),
                });
            }
        }
        self.services_touching(&spec, previous.as_ref().map(|p| &p.spec), &mut out.dirty);
        self.endpoints.insert(
            key,
            EndpointEntry {
                spec,
                identity,
                claims,
            },
        );
        out.previous = previous;
        Ok(out)
    }

    /// Puts back a persisted endpoint as it was, claim order included.
    pub fn restore_endpoint(&mut self, entry: EndpointEntry) {
        let key = entry.spec.key();
        for (ip, seq) in &entry.claims {
            self.claims
                .entry(*ip)
                .or_default()
                .insert(*seq, key.clone());
            self.next_claim = self.next_claim.max(seq + 1);
        }
        self.endpoints.insert(key, entry);
    }

    /// Removes an endpoint; a waiting claimant of each of its IPs moves up.
    pub fn delete_endpoint(&mut self, key: &ObjectKey) -> (Dirty, Option<EndpointEntry>) {
        let mut dirty = Dirty::default();
        let Some(entry) = self.endpoints.remove(key) else {
            return (dirty, None);
        };
        for (ip, seq) in &entry.claims {
            self.unclaim(*ip, *seq);
            dirty.ips.insert(*ip);
        }
        self.services_touching(&entry.spec, None, &mut dirty);
        (dirty, Some(entry))
    }

    /// Adds or replaces a service.
    pub fn upsert_service(&mut self, spec: ServiceSpec) -> Dirty {
        let mut dirty = Dirty::default();
        dirty.services.insert(spec.key());
        self.services.insert(spec.key(), spec);
        dirty
    }

    /// Removes a service; `None` when it did not exist.
    pub fn delete_service(&mut self, key: &ObjectKey) -> Option<Dirty> {
        self.services.remove(key).map(|_| Dirty {
            services: BTreeSet::from([key.clone()]),
            ..Dirty::default()
        })
    }

    /// The endpoint that owns `ip`, if any.
    pub fn owner(&self, ip: IpAddr) -> Option<&ObjectKey> {
        self.claims.get(&ip).and_then(|c| c.values().next())
    }

    /// IPs of an endpoint that it owns (that are exported for it).
    pub fn owned_ips<'a>(&'a self, entry: &'a EndpointEntry) -> impl Iterator<Item = IpAddr> + 'a {
        let key = entry.spec.key();
        entry
            .spec
            .ips
            .iter()
            .copied()
            .filter(move |ip| self.owner(*ip) == Some(&key))
    }

    /// The ipcache entry of `ip`: its owner, with the owner's node's host IP.
    pub fn ip_view(&self, ip: IpAddr) -> Option<IpView<'_>> {
        let endpoint = self.endpoints.get(self.owner(ip)?)?;
        let host_ip = self
            .nodes
            .get(&endpoint.spec.node)
            .and_then(|n| n.host_ip_for(ip));
        Some(IpView {
            ip,
            host_ip,
            endpoint,
        })
    }

    /// A service with its local backends: those its source stated, else
    /// the endpoints its selector selects.
    pub fn service_view(&self, key: &ObjectKey) -> Option<ServiceView<'_>> {
        let spec = self.services.get(key)?;
        if let Some(stated) = &spec.backends {
            return Some(ServiceView {
                spec,
                backends: stated.clone(),
            });
        }
        let mut backends = BTreeMap::new();
        let in_namespace = self
            .endpoints
            .range(ObjectKey::new(&spec.namespace, "")..)
            .take_while(|(k, _)| k.namespace == spec.namespace)
            .map(|(_, e)| e);
        for entry in in_namespace.filter(|e| spec.selects(&e.spec)) {
            let ports: BTreeMap<String, PortConfig> = spec
                .ports
                .iter()
                .filter_map(|p| resolve_target(p, &entry.spec).map(|c| (p.name.clone(), c)))
                .collect();
            if ports.is_empty() {
                continue;
            }
            for ip in self.owned_ips(entry) {
                backends.insert(ip, ports.clone());
            }
        }
        Some(ServiceView { spec, backends })
    }

    fn unclaim(&mut self, ip: IpAddr, seq: u64) {
        if let Some(claims) = self.claims.get_mut(&ip) {
            claims.remove(&seq);
            if claims.is_empty() {
                self.claims.remove(&ip);
            }
        }
    }

    /// Marks the services in the endpoint's namespace that select it now or
    /// selected its previous version.
    fn services_touching(
        &self,
        spec: &EndpointSpec,
        previous: Option<&EndpointSpec>,
        dirty: &mut Dirty,
    ) {
        let in_namespace = self
            .services
            .range(ObjectKey::new(&spec.namespace, "")..)
            .take_while(|(k, _)| k.namespace == spec.namespace);
        for (key, service) in in_namespace {
            if service.selects(spec) || previous.is_some_and(|p| service.selects(p)) {
                dirty.services.insert(key.clone());
            }
        }
        // Endpoints that lost or gained ownership of a shared IP change the
        // backends of services selecting the other claimants too.
        for ip in &spec.ips {
            for other in self.claims.get(ip).into_iter().flat_map(|c| c.values()) {
                if let Some(other) = self.endpoints.get(other) {
                    for service in self.services.values().filter(|s| s.selects(&other.spec)) {
                        dirty.services.insert(service.key());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::model::{Affinity, NamedPort, Protocol, ServicePort, TargetPort};

    fn node(name: &str, cidr: &str, host: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            internal_ips: vec![host.parse().unwrap()],
            cilium_internal_ips: vec![],
            pod_cidrs: vec![cidr.parse().unwrap()],
            wireguard_public_key: String::new(),
            labels: Labels::new(),
        }
    }

    fn endpoint(name: &str, ip: &str, app: &str) -> EndpointSpec {
        EndpointSpec {
            namespace: "default".into(),
            name: name.into(),
            uid: String::new(),
            service_account: "default".into(),
            ips: vec![ip.parse().unwrap()],
            labels: [("app".to_owned(), app.to_owned())].into(),
            named_ports: vec![NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            node: "n1".into(),
        }
    }

    use mesh_proto::model::Labels;

    fn registry() -> Table {
        let mut r = Table::default();
        r.upsert_node(node("n1", "10.1.1.0/24", "192.168.1.1"));
        r
    }

    #[test]
    fn first_claimant_keeps_ip_second_takes_over_after_delete() {
        let mut r = registry();
        let a = r
            .upsert_endpoint(endpoint("a", "10.1.1.5", "web"), 1)
            .unwrap();
        assert!(a.conflicts.is_empty());
        let b = r
            .upsert_endpoint(endpoint("b", "10.1.1.5", "db"), 2)
            .unwrap();
        assert_eq!(
            b.conflicts,
            [Conflict {
                index: 0,
                ip: "10.1.1.5".parse().unwrap(),
                owner: ObjectKey::new("default", "a")
            }]
        );
        let ip = "10.1.1.5".parse().unwrap();
        assert_eq!(r.ip_view(ip).unwrap().endpoint.identity, 1);
        // Re-upserting the owner keeps its place in line.
        r.upsert_endpoint(endpoint("a", "10.1.1.5", "web"), 1)
            .unwrap();
        assert_eq!(r.ip_view(ip).unwrap().endpoint.identity, 1);
        let (dirty, _) = r.delete_endpoint(&ObjectKey::new("default", "a"));
        assert!(dirty.ips.contains(&ip));
        assert_eq!(r.ip_view(ip).unwrap().endpoint.identity, 2);
        r.delete_endpoint(&ObjectKey::new("default", "b"));
        assert!(r.ip_view(ip).is_none());
    }

    #[test]
    fn endpoint_outside_pod_cidr_is_refused() {
        let mut r = registry();
        let err = r
            .upsert_endpoint(endpoint("a", "10.2.0.1", "web"), 1)
            .unwrap_err();
        assert_eq!(err.field, "endpoint.ips[0]");
        assert!(r.endpoints().next().is_none());
    }

    #[test]
    fn backends_by_selector_and_named_port() {
        let mut r = registry();
        r.upsert_endpoint(endpoint("a", "10.1.1.5", "web"), 1)
            .unwrap();
        r.upsert_endpoint(endpoint("b", "10.1.1.6", "db"), 2)
            .unwrap();
        let svc = ServiceSpec {
            namespace: "default".into(),
            name: "web".into(),
            frontend_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target: TargetPort::Name("http".into()),
                },
                ServicePort {
                    name: "metrics".into(),
                    protocol: Protocol::Tcp,
                    port: 9090,
                    target: TargetPort::Number(9100),
                },
            ],
            selector: [("app".to_owned(), "web".to_owned())].into(),
            labels: Labels::new(),
            global: true,
            shared: true,
            affinity: Affinity::None,
            backends: None,
        };
        r.upsert_service(svc);
        let key = ObjectKey::new("default", "web");
        let view = r.service_view(&key).unwrap();
        let ports = &view.backends[&"10.1.1.5".parse().unwrap()];
        assert_eq!(view.backends.len(), 1);
        assert_eq!(ports["http"].port, 8080);
        assert_eq!(ports["metrics"].port, 9100);
        // A relabelled endpoint makes the service dirty and joins it.
        let up = r
            .upsert_endpoint(endpoint("b", "10.1.1.6", "web"), 1)
            .unwrap();
        assert!(up.dirty.services.contains(&key));
        assert_eq!(r.service_view(&key).unwrap().backends.len(), 2);
    }

    #[test]
    fn removing_a_node_removes_its_endpoints() {
        let mut r = registry();
        r.upsert_endpoint(endpoint("a", "10.1.1.5", "web"), 1)
            .unwrap();
        let (dirty, removed) = r.remove_node("n1");
        assert_eq!(removed.len(), 1);
        assert!(dirty.nodes.contains("n1"));
        assert!(r.ip_view("10.1.1.5".parse().unwrap()).is_none());
    }
}
