//! Protobuf requests → validated registry records.
//!
//! Every check here is syntactic and needs no state; each failure names the
//! field as a path into the request (`endpoint.ips[1]`) so that the gRPC status
//! tells the caller exactly what to fix. Checks against the registry (node
//! registered, IP inside the node's pod CIDRs) live in [`crate::registry`].

use std::{collections::BTreeSet, net::IpAddr};

use base64::Engine as _;
use ipnet::IpNet;
use mesh_proto::v1 as pb;

use crate::{
    model::{
        Affinity, EndpointSpec, Labels, NamedPort, NodeSpec, Protocol, ServicePort, ServiceSpec,
        TargetPort,
    },
    registry::FieldError,
    validate,
};

type Result<T> = std::result::Result<T, FieldError>;

fn check(field: impl FnOnce() -> String, r: std::result::Result<(), String>) -> Result<()> {
    r.map_err(|reason| FieldError::new(field(), reason))
}

fn ip(field: impl FnOnce() -> String, text: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| FieldError::new(field(), format!("{text:?} is not an IP address")))
}

fn labels(field: &str, map: &std::collections::HashMap<String, String>) -> Result<Labels> {
    for (k, v) in map {
        check(|| format!("{field}[{k:?}]"), validate::label_key(k))?;
        check(|| format!("{field}[{k:?}]"), validate::label_value(v))?;
    }
    Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn protocol(field: impl FnOnce() -> String, value: i32) -> Result<Protocol> {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Unspecified | pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(pb::Protocol::Sctp) => Ok(Protocol::Sctp),
        Err(_) => Err(FieldError::new(
            field(),
            format!("unknown protocol {value}"),
        )),
    }
}

fn port(field: impl FnOnce() -> String, value: u32) -> Result<u16> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| FieldError::new(field(), format!("{value} is not a port in 1..=65535")))
}

fn one_per_family(field: &str, ips: &[IpAddr]) -> Result<()> {
    for (i, ip) in ips.iter().enumerate() {
        if ips[..i].iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                "at most one IPv4 and one IPv6 address",
            ));
        }
    }
    Ok(())
}

/// Validates a node of a `RegisterNode` request for the session's node.
///
/// # Errors
///
/// The first invalid field.
pub fn node(session_node: &str, node: Option<pb::Node>) -> Result<NodeSpec> {
    let node = node.ok_or_else(|| FieldError::new("node", "missing"))?;
    check(|| "node.name".into(), validate::dns_subdomain(&node.name))?;
    if node.name != session_node {
        return Err(FieldError::new(
            "node.name",
            format!("the session belongs to node {session_node:?}"),
        ));
    }
    let internal_ips = node
        .internal_ips
        .iter()
        .enumerate()
        .map(|(i, t)| ip(|| format!("node.internal_ips[{i}]"), t))
        .collect::<Result<Vec<_>>>()?;
    if internal_ips.is_empty() {
        return Err(FieldError::new(
            "node.internal_ips",
            "at least one is required",
        ));
    }
    let cilium_internal_ips = node
        .cilium_internal_ips
        .iter()
        .enumerate()
        .map(|(i, t)| ip(|| format!("node.cilium_internal_ips[{i}]"), t))
        .collect::<Result<Vec<_>>>()?;
    let pod_cidrs = node
        .pod_cidrs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let net: IpNet = t.parse().map_err(|_| {
                FieldError::new(
                    format!("node.pod_cidrs[{i}]"),
                    format!("{t:?} is not a CIDR"),
                )
            })?;
            if net.trunc() != net {
                return Err(FieldError::new(
                    format!("node.pod_cidrs[{i}]"),
                    format!("{t} has host bits set (network is {})", net.trunc()),
                ));
            }
            Ok(net)
        })
        .collect::<Result<Vec<_>>>()?;
    if !node.wireguard_public_key.is_empty() {
        let key = base64::engine::general_purpose::STANDARD
            .decode(&node.wireguard_public_key)
            .ok();
        if key.map(|k| k.len()) != Some(32) {
            return Err(FieldError::new(
                "node.wireguard_public_key",
                "not a base64 32-byte key",
            ));
        }
    }
    Ok(NodeSpec {
        name: node.name,
        internal_ips,
        cilium_internal_ips,
        pod_cidrs,
        wireguard_public_key: node.wireguard_public_key,
        labels: labels("node.labels", &node.labels)?,
    })
}

/// Validates an endpoint of an `UpsertEndpoint` request for the session's node.
///
/// # Errors
///
/// The first invalid field.
pub fn endpoint(session_node: &str, ep: Option<pb::Endpoint>) -> Result<EndpointSpec> {
    let ep = ep.ok_or_else(|| FieldError::new("endpoint", "missing"))?;
    check(
        || "endpoint.namespace".into(),
        validate::dns_label(&ep.namespace, 63),
    )?;
    check(|| "endpoint.name".into(), validate::dns_subdomain(&ep.name))?;
    if ep.uid.len() > 128 || ep.uid.contains(['/', ';', '"']) {
        return Err(FieldError::new(
            "endpoint.uid",
            "at most 128 characters without '/', ';' or '\"'",
        ));
    }
    let service_account = if ep.service_account.is_empty() {
        "default".to_owned()
    } else {
        check(
            || "endpoint.service_account".into(),
            validate::dns_subdomain(&ep.service_account),
        )?;
        ep.service_account
    };
    let node = if ep.node.is_empty() {
        session_node.to_owned()
    } else if ep.node != session_node {
        return Err(FieldError::new(
            "endpoint.node",
            format!(
                "the session belongs to node {session_node:?}, not {:?}",
                ep.node
            ),
        ));
    } else {
        ep.node
    };
    let ips = ep
        .ips
        .iter()
        .enumerate()
        .map(|(i, t)| ip(|| format!("endpoint.ips[{i}]"), t))
        .collect::<Result<Vec<_>>>()?;
    if ips.is_empty() {
        return Err(FieldError::new("endpoint.ips", "at least one is required"));
    }
    one_per_family("endpoint.ips", &ips)?;
    let mut names = BTreeSet::new();
    let named_ports = ep
        .named_ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field = || format!("endpoint.named_ports[{i}]");
            check(|| format!("{}.name", field()), validate::port_name(&p.name))?;
            if !names.insert(p.name.clone()) {
                return Err(FieldError::new(
                    format!("{}.name", field()),
                    format!("duplicate port name {:?}", p.name),
                ));
            }
            Ok(NamedPort {
                name: p.name.clone(),
                port: port(|| format!("{}.port", field()), p.port)?,
                protocol: protocol(|| format!("{}.protocol", field()), p.protocol)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EndpointSpec {
        namespace: ep.namespace,
        name: ep.name,
        uid: ep.uid,
        service_account,
        ips,
        labels: labels("endpoint.labels", &ep.labels)?,
        named_ports,
        node,
    })
}

/// Validates a service of an `UpsertService` request.
///
/// # Errors
///
/// The first invalid field.
pub fn service(svc: Option<pb::Service>) -> Result<ServiceSpec> {
    let svc = svc.ok_or_else(|| FieldError::new("service", "missing"))?;
    check(
        || "service.namespace".into(),
        validate::dns_label(&svc.namespace, 63),
    )?;
    check(|| "service.name".into(), validate::dns_label(&svc.name, 63))?;
    let frontend_ips = svc
        .frontend_ips
        .iter()
        .enumerate()
        .map(|(i, t)| ip(|| format!("service.frontend_ips[{i}]"), t))
        .collect::<Result<Vec<_>>>()?;
    one_per_family("service.frontend_ips", &frontend_ips)?;
    let mut names = BTreeSet::new();
    let ports = svc
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field = |f: &str| format!("service.ports[{i}].{f}");
            if p.name.is_empty() {
                if svc.ports.len() > 1 {
                    return Err(FieldError::new(
                        field("name"),
                        "required when the service has more than one port",
                    ));
                }
            } else {
                check(|| field("name"), validate::port_name(&p.name))?;
            }
            if !names.insert(p.name.clone()) {
                return Err(FieldError::new(
                    field("name"),
                    format!("duplicate port name {:?}", p.name),
                ));
            }
            let number = port(|| field("port"), p.port)?;
            let target = match &p.target {
                None => TargetPort::Number(number),
                Some(pb::service_port::Target::TargetPortNumber(n)) => {
                    TargetPort::Number(port(|| field("target_port_number"), *n)?)
                }
                Some(pb::service_port::Target::TargetPortName(name)) => {
                    check(|| field("target_port_name"), validate::port_name(name))?;
                    TargetPort::Name(name.clone())
                }
            };
            Ok(ServicePort {
                name: p.name.clone(),
                protocol: protocol(|| field("protocol"), p.protocol)?,
                port: number,
                target,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let affinity = match pb::Affinity::try_from(svc.affinity) {
        Ok(pb::Affinity::None) => Affinity::None,
        Ok(pb::Affinity::Local) => Affinity::Local,
        Ok(pb::Affinity::Remote) => Affinity::Remote,
        Err(_) => {
            return Err(FieldError::new(
                "service.affinity",
                format!("unknown affinity {}", svc.affinity),
            ))
        }
    };
    Ok(ServiceSpec {
        selector: labels("service.selector", &svc.selector)?,
        labels: labels("service.labels", &svc.labels)?,
        namespace: svc.namespace,
        name: svc.name,
        frontend_ips,
        ports,
        global: svc.global,
        shared: svc.shared.unwrap_or(true),
        affinity,
    })
}

fn proto_protocol(p: Protocol) -> i32 {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Sctp => pb::Protocol::Sctp,
    }
    .into()
}

/// Registry record → protobuf, for the List RPCs.
pub fn node_to_proto(n: &NodeSpec) -> pb::Node {
    pb::Node {
        name: n.name.clone(),
        internal_ips: n.internal_ips.iter().map(ToString::to_string).collect(),
        cilium_internal_ips: n
            .cilium_internal_ips
            .iter()
            .map(ToString::to_string)
            .collect(),
        pod_cidrs: n.pod_cidrs.iter().map(ToString::to_string).collect(),
        wireguard_public_key: n.wireguard_public_key.clone(),
        labels: n.labels.clone().into_iter().collect(),
    }
}

/// Registry record → protobuf, for the List RPCs.
pub fn endpoint_to_proto(e: &EndpointSpec) -> pb::Endpoint {
    pb::Endpoint {
        namespace: e.namespace.clone(),
        name: e.name.clone(),
        uid: e.uid.clone(),
        service_account: e.service_account.clone(),
        ips: e.ips.iter().map(ToString::to_string).collect(),
        labels: e.labels.clone().into_iter().collect(),
        named_ports: e
            .named_ports
            .iter()
            .map(|p| pb::NamedPort {
                name: p.name.clone(),
                port: p.port.into(),
                protocol: proto_protocol(p.protocol),
            })
            .collect(),
        node: e.node.clone(),
    }
}

/// Registry record → protobuf, for the List RPCs.
pub fn service_to_proto(s: &ServiceSpec) -> pb::Service {
    pb::Service {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        frontend_ips: s.frontend_ips.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name.clone(),
                protocol: proto_protocol(p.protocol),
                port: p.port.into(),
                target: Some(match &p.target {
                    TargetPort::Number(n) => {
                        pb::service_port::Target::TargetPortNumber((*n).into())
                    }
                    TargetPort::Name(n) => pb::service_port::Target::TargetPortName(n.clone()),
                }),
            })
            .collect(),
        selector: s.selector.clone().into_iter().collect(),
        labels: s.labels.clone().into_iter().collect(),
        global: s.global,
        shared: Some(s.shared),
        affinity: match s.affinity {
            Affinity::None => pb::Affinity::None,
            Affinity::Local => pb::Affinity::Local,
            Affinity::Remote => pb::Affinity::Remote,
        }
        .into(),
    }
}

/// Protocol of the model → protobuf enum value.
pub fn protocol_to_proto(p: Protocol) -> i32 {
    proto_protocol(p)
}
