//! Kubernetes API objects → the registry's records ([`mesh_proto::model`]).
//!
//! Pure functions of the objects, so the mapping is unit-tested with objects
//! in the JSON shapes the API serves. They parse the wire format only: what
//! the *values* must satisfy (names, label syntax, an IP inside its node's
//! pod CIDRs) is the registry's to check, the same for every source
//! ([`crate::registry`]). An object that cannot be a record at all (a
//! host-network pod, a pod without IPs, a headless service) gives `None`.
//!
//! Identity labels follow Cilium's names: the pod's labels (minus those that
//! differ per pod of one workload, which would give every pod an identity
//! of its own), `io.cilium.k8s.policy.serviceaccount`, and the namespace's
//! labels as `io.cilium.k8s.namespace.labels.<key>`; the registry adds the
//! namespace and cluster labels.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use mesh_proto::model::{
    Affinity, EndpointSpec, Labels, NamedPort, NodeSpec, PortConfig, Protocol, ServicePort,
    ServiceSpec, StatedBackends, TargetPort,
};

/// The identity label carrying a pod's service account (Cilium's name).
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// The prefix of namespace labels in identities (Cilium's name).
pub const NAMESPACE_LABEL_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Marks a service global (shared across the mesh).
pub const GLOBAL_ANNOTATION: &str = "service.cilium.io/global";
/// The annotation Cilium used for `global` before 1.13; still read.
pub const LEGACY_GLOBAL_ANNOTATION: &str = "io.cilium/global-service";
/// `"false"`: the service is global but exports no backends of this cluster.
pub const SHARED_ANNOTATION: &str = "service.cilium.io/shared";
/// `local`, `remote` or `none`: which backends a global service prefers.
pub const AFFINITY_ANNOTATION: &str = "service.cilium.io/affinity";
pub use mesh_k8s::WIREGUARD_KEY_ANNOTATION;
/// The label that ties an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Pod labels that differ between the pods of one workload; as Cilium's
/// default label filter, they are left out of identities.
const PER_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "job-name",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "batch.kubernetes.io/job-completion-index",
];

/// Why an object is not turned into a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A field does not parse (`field` is the path in the object).
    #[error("{kind} {name}: {field} {value:?}: {reason}")]
    Field {
        kind: &'static str,
        name: String,
        field: String,
        value: String,
        reason: String,
    },
}

fn field_error(
    kind: &'static str,
    name: &str,
    field: impl Into<String>,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> ConvertError {
    ConvertError::Field {
        kind,
        name: name.to_owned(),
        field: field.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn ip(kind: &'static str, name: &str, field: String, value: &str) -> Result<IpAddr, ConvertError> {
    value
        .parse()
        .map_err(|e: std::net::AddrParseError| field_error(kind, name, field, value, e.to_string()))
}

fn protocol(
    kind: &'static str,
    name: &str,
    field: String,
    value: Option<&str>,
) -> Result<Protocol, ConvertError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(field_error(
            kind,
            name,
            field,
            other,
            "not TCP, UDP or SCTP",
        )),
    }
}

fn port(kind: &'static str, name: &str, field: String, value: i32) -> Result<u16, ConvertError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| field_error(kind, name, field, value.to_string(), "not in 1..=65535"))
}

/// A Node: its InternalIP addresses, its pod CIDRs (`spec.podCIDRs`, or the
/// older single `spec.podCIDR`), its labels and the WireGuard public key its
/// agent annotated it with ([`WIREGUARD_KEY_ANNOTATION`]).
///
/// # Errors
///
/// An address or CIDR that does not parse.
pub fn node(node: &Node) -> Result<NodeSpec, ConvertError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut internal_ips = Vec::new();
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        if a.type_ == "InternalIP" {
            let field = format!("status.addresses[{i}].address");
            internal_ips.push(ip("node", &name, field, &a.address)?);
        }
    }
    let spec = node.spec.as_ref();
    let cidrs: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let pod_cidrs = cidrs
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            c.parse::<IpNet>().map_err(|e| {
                field_error(
                    "node",
                    &name,
                    format!("spec.podCIDRs[{i}]"),
                    c,
                    e.to_string(),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(NodeSpec {
        name,
        internal_ips,
        cilium_internal_ips: Vec::new(),
        pod_cidrs,
        // The registry checks that it is a 32-byte key.
        wireguard_public_key: node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(WIREGUARD_KEY_ANNOTATION))
            .cloned()
            .unwrap_or_default(),
        labels: node.metadata.labels.clone().unwrap_or_default(),
    })
}

/// The identity labels a namespace gives its pods.
pub fn namespace_labels(namespace: &Namespace) -> Labels {
    namespace
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (format!("{NAMESPACE_LABEL_PREFIX}{k}"), v.clone()))
        .collect()
}

/// A Pod as an endpoint, with the identity labels of its namespace
/// (`namespace_labels`); `None` for pods that are not endpoints: on the
/// host network, not scheduled, without IPs, or finished.
///
/// # Errors
///
/// An IP, port or protocol that does not parse.
pub fn pod(pod: &Pod, namespace_labels: &Labels) -> Result<Option<EndpointSpec>, ConvertError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(spec) = &pod.spec else {
        return Ok(None);
    };
    let status = pod.status.as_ref();
    let finished = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let Some(node) = spec.node_name.clone() else {
        return Ok(None);
    };
    if spec.host_network == Some(true) || finished {
        return Ok(None);
    }
    let mut ips = Vec::new();
    let pod_ips = status.and_then(|s| s.pod_ips.as_ref());
    for (i, p) in pod_ips.into_iter().flatten().enumerate() {
        ips.push(ip("pod", &name, format!("status.podIPs[{i}].ip"), &p.ip)?);
    }
    if ips.is_empty() {
        // Older API servers fill only the singular field.
        if let Some(one) = status.and_then(|s| s.pod_ip.as_deref()) {
            ips.push(ip("pod", &name, "status.podIP".into(), one)?);
        }
    }
    if ips.is_empty() {
        return Ok(None);
    }
    let mut named_ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, p) in container.ports.iter().flatten().enumerate() {
            let Some(port_name) = p.name.clone().filter(|n| !n.is_empty()) else {
                continue;
            };
            let field = |f: &str| format!("spec.containers[{c}].ports[{i}].{f}");
            let protocol = protocol("pod", &name, field("protocol"), p.protocol.as_deref())?;
            let number = port("pod", &name, field("containerPort"), p.container_port)?;
            // The API refuses duplicate names within a pod; keep the first.
            if seen.insert(port_name.clone()) {
                named_ports.push(NamedPort {
                    name: port_name,
                    port: number,
                    protocol,
                });
            }
        }
    }
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let mut labels: Labels = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| !PER_POD_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(namespace_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.insert(SERVICE_ACCOUNT_LABEL.to_owned(), service_account.clone());
    Ok(Some(EndpointSpec {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account,
        ips,
        labels,
        named_ports,
        node,
    }))
}

/// Whether an annotation says yes, as Cilium reads it (case-insensitive
/// `true`).
fn annotation_true(annotations: &BTreeMap<String, String>, key: &str) -> Option<bool> {
    annotations.get(key).map(|v| v.eq_ignore_ascii_case("true"))
}

/// A Service with the ready backends of its EndpointSlices; `None` for
/// services without a cluster IP (headless, ExternalName).
///
/// # Errors
///
/// A cluster IP, port, protocol or annotation that does not parse.
pub fn service(
    service: &Service,
    slices: &[&EndpointSlice],
) -> Result<Option<ServiceSpec>, ConvertError> {
    let name = service.metadata.name.clone().unwrap_or_default();
    let Some(spec) = &service.spec else {
        return Ok(None);
    };
    let cluster_ips: Vec<&String> = match &spec.cluster_ips {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let mut frontend_ips = Vec::new();
    for (i, c) in cluster_ips.into_iter().enumerate() {
        if c.is_empty() || c == "None" {
            continue;
        }
        frontend_ips.push(ip("service", &name, format!("spec.clusterIPs[{i}]"), c)?);
    }
    if frontend_ips.is_empty() {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let number = port("service", &name, field("port"), p.port)?;
        let target = match &p.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port("service", &name, field("targetPort"), *n)?)
            }
            Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol("service", &name, field("protocol"), p.protocol.as_deref())?,
            port: number,
            target,
        });
    }
    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let global = annotation_true(&annotations, GLOBAL_ANNOTATION)
        .or_else(|| annotation_true(&annotations, LEGACY_GLOBAL_ANNOTATION))
        .unwrap_or(false);
    let shared = annotation_true(&annotations, SHARED_ANNOTATION).unwrap_or(true);
    let affinity = match annotations.get(AFFINITY_ANNOTATION) {
        None => Affinity::None,
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "local" => Affinity::Local,
            "remote" => Affinity::Remote,
            "none" | "" => Affinity::None,
            _ => {
                return Err(field_error(
                    "service",
                    &name,
                    format!("metadata.annotations[{AFFINITY_ANNOTATION:?}]"),
                    v,
                    "not local, remote or none",
                ))
            }
        },
    };
    let backends = backends(&name, &ports, slices)?;
    Ok(Some(ServiceSpec {
        namespace: service.metadata.namespace.clone().unwrap_or_default(),
        name,
        frontend_ips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        labels: service.metadata.labels.clone().unwrap_or_default(),
        global,
        shared,
        affinity,
        backends: Some(backends),
    }))
}

/// The ready addresses of `slices`, each with the slice ports that match a
/// service port by name and protocol. An endpoint whose `ready` condition
/// is absent counts as ready, as the API documents.
fn backends(
    name: &str,
    ports: &[ServicePort],
    slices: &[&EndpointSlice],
) -> Result<StatedBackends, ConvertError> {
    let mut out = StatedBackends::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices name no address.
        }
        let slice_name = slice.metadata.name.as_deref().unwrap_or_default();
        let mut slice_ports = BTreeMap::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("endpointslice {slice_name}: ports[{i}].{f}");
            let Some(number) = p.port else { continue };
            let protocol = protocol("service", name, field("protocol"), p.protocol.as_deref())?;
            let port_name = p.name.clone().unwrap_or_default();
            if ports
                .iter()
                .any(|s| s.name == port_name && s.protocol == protocol)
            {
                let number = port("service", name, field("port"), number)?;
                slice_ports.insert(
                    port_name,
                    PortConfig {
                        protocol,
                        port: number,
                    },
                );
            }
        }
        if slice_ports.is_empty() {
            continue;
        }
        for (e, endpoint) in slice.endpoints.iter().enumerate() {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready);
            if ready == Some(false) {
                continue;
            }
            for (a, address) in endpoint.addresses.iter().enumerate() {
                let field = format!("endpointslice {slice_name}: endpoints[{e}].addresses[{a}]");
                let ip = ip("service", name, field, address)?;
                out.entry(ip)
                    .or_default()
                    .extend(slice_ports.iter().map(|(k, v)| (k.clone(), *v)));
            }
        }
    }
    Ok(out)
}

/// The service an EndpointSlice belongs to (`namespace`, `name`), from its
/// `kubernetes.io/service-name` label.
pub fn slice_service(slice: &EndpointSlice) -> Option<(String, String)> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((slice.metadata.namespace.clone()?, name.clone()))
}

#[cfg(test)]
mod tests;
