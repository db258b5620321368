//! Protobuf requests → registry records, and back for the read RPCs.
//!
//! This is the standalone source's wire format and nothing more: it parses
//! text into typed values (an IP string into an [`IpAddr`], a `uint32` port
//! into a `u16`, an enum number into its variant) and fills in the wire
//! defaults (an empty `endpoint.node` is the session's node, an empty service
//! account is `default`, an absent `shared` is true). Each failure names the
//! field as a path into the message (`endpoint.ips[1]`). Every rule about the
//! values themselves is checked by the apiserver's registry, the same for
//! every source.

use std::net::IpAddr;

use ipnet::IpNet;

use std::collections::BTreeMap;

use crate::v1 as pb;
use crate::{
    model::{
        Affinity, EndpointSpec, NamedPort, NodeSpec, PortConfig, Protocol, ServicePort,
        ServiceSpec, TargetPort,
    },
    FieldError,
};

type Result<T> = std::result::Result<T, FieldError>;

fn ip(field: impl FnOnce() -> String, text: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| FieldError::new(field(), format!("{text:?} is not an IP address")))
}

fn ips(field: &str, texts: &[String]) -> Result<Vec<IpAddr>> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| ip(|| format!("{field}[{i}]"), t))
        .collect()
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
    api::names::validate_port(value)
        .map_err(|reason| FieldError::new(field(), format!("{value} {reason}")))
}

/// Parses the node of a `RegisterNode` request.
///
/// # Errors
///
/// The first field that does not parse.
pub fn node(node: Option<pb::Node>) -> Result<NodeSpec> {
    let node = node.ok_or_else(|| FieldError::new("node", "missing"))?;
    let pod_cidrs = node
        .pod_cidrs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.parse::<IpNet>().map_err(|_| {
                FieldError::new(
                    format!("node.pod_cidrs[{i}]"),
                    format!("{t:?} is not a CIDR"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NodeSpec {
        internal_ips: ips("node.internal_ips", &node.internal_ips)?,
        cilium_internal_ips: ips("node.cilium_internal_ips", &node.cilium_internal_ips)?,
        pod_cidrs,
        name: node.name,
        wireguard_public_key: node.wireguard_public_key,
        labels: node.labels.into_iter().collect(),
    })
}

/// Parses the endpoint of an `UpsertEndpoint` request of a session of
/// `session_node`.
///
/// # Errors
///
/// The first field that does not parse.
pub fn endpoint(session_node: &str, ep: Option<pb::Endpoint>) -> Result<EndpointSpec> {
    let ep = ep.ok_or_else(|| FieldError::new("endpoint", "missing"))?;
    let ips = ips("endpoint.ips", &ep.ips)?;
    let named_ports = ep
        .named_ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field = |f: &str| format!("endpoint.named_ports[{i}].{f}");
            Ok(NamedPort {
                name: p.name.clone(),
                port: port(|| field("port"), p.port)?,
                protocol: protocol(|| field("protocol"), p.protocol)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EndpointSpec {
        ips,
        named_ports,
        service_account: if ep.service_account.is_empty() {
            "default".to_owned()
        } else {
            ep.service_account
        },
        node: if ep.node.is_empty() {
            session_node.to_owned()
        } else {
            ep.node
        },
        namespace: ep.namespace,
        name: ep.name,
        uid: ep.uid,
        labels: ep.labels.into_iter().collect(),
    })
}

/// Parses the service of an `UpsertService` request.
///
/// # Errors
///
/// The first field that does not parse.
pub fn service(svc: Option<pb::Service>) -> Result<ServiceSpec> {
    let svc = svc.ok_or_else(|| FieldError::new("service", "missing"))?;
    let ports = svc
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let field = |f: &str| format!("service.ports[{i}].{f}");
            let number = port(|| field("port"), p.port)?;
            let target = match &p.target {
                None => TargetPort::Number(number),
                Some(pb::service_port::Target::TargetPortNumber(n)) => {
                    TargetPort::Number(port(|| field("target_port_number"), *n)?)
                }
                Some(pb::service_port::Target::TargetPortName(name)) => {
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
        frontend_ips: ips("service.frontend_ips", &svc.frontend_ips)?,
        ports,
        selector: svc.selector.into_iter().collect(),
        labels: svc.labels.into_iter().collect(),
        namespace: svc.namespace,
        name: svc.name,
        global: svc.global,
        shared: svc.shared.unwrap_or(true),
        affinity,
        backends: None,
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

/// A service with its backends, as `ListServices` and `WatchServices` send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredService {
    /// The service.
    pub spec: ServiceSpec,
    /// Its local backends: IP → port name → protocol and port.
    pub backends: BTreeMap<IpAddr, BTreeMap<String, PortConfig>>,
}

/// Registry view → protobuf.
pub fn registered_service_to_proto(
    spec: &ServiceSpec,
    backends: &BTreeMap<IpAddr, BTreeMap<String, PortConfig>>,
) -> pb::RegisteredService {
    pb::RegisteredService {
        service: Some(service_to_proto(spec)),
        backends: backends
            .iter()
            .map(|(ip, ports)| pb::Backend {
                ip: ip.to_string(),
                ports: ports
                    .iter()
                    .map(|(name, p)| pb::BackendPort {
                        name: name.clone(),
                        protocol: proto_protocol(p.protocol),
                        port: p.port.into(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Parses one entry of a `ListServicesResponse`.
///
/// # Errors
///
/// The first field that does not parse (paths start at `service` or
/// `backends[i]`).
pub fn registered_service(registered: pb::RegisteredService) -> Result<RegisteredService> {
    let spec = service(registered.service)?;
    let mut backends = BTreeMap::new();
    for (i, b) in registered.backends.iter().enumerate() {
        let mut by_name = BTreeMap::new();
        for (j, p) in b.ports.iter().enumerate() {
            let field = |f: &str| format!("backends[{i}].ports[{j}].{f}");
            by_name.insert(
                p.name.clone(),
                PortConfig {
                    protocol: protocol(|| field("protocol"), p.protocol)?,
                    port: port(|| field("port"), p.port)?,
                },
            );
        }
        backends.insert(ip(|| format!("backends[{i}].ip"), &b.ip)?, by_name);
    }
    Ok(RegisteredService { spec, backends })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> pb::RegisteredService {
        pb::RegisteredService {
            service: Some(pb::Service {
                namespace: "default".into(),
                name: "web".into(),
                frontend_ips: vec!["10.96.0.10".into()],
                ports: vec![pb::ServicePort {
                    name: "http".into(),
                    protocol: pb::Protocol::Tcp.into(),
                    port: 80,
                    target: Some(pb::service_port::Target::TargetPortNumber(8080)),
                }],
                global: true,
                affinity: pb::Affinity::Local.into(),
                ..pb::Service::default()
            }),
            backends: vec![pb::Backend {
                ip: "10.1.1.5".into(),
                ports: vec![pb::BackendPort {
                    name: "http".into(),
                    protocol: pb::Protocol::Tcp.into(),
                    port: 8080,
                }],
            }],
        }
    }

    #[test]
    fn a_registered_service_round_trips() {
        let parsed = registered_service(wire()).unwrap();
        assert!(
            parsed.spec.global && parsed.spec.shared,
            "absent shared is true"
        );
        assert_eq!(parsed.spec.affinity, Affinity::Local);
        let back = registered_service_to_proto(&parsed.spec, &parsed.backends);
        assert_eq!(registered_service(back).unwrap(), parsed);
    }

    #[test]
    fn refusals_name_the_field() {
        let mut bad = wire();
        bad.backends[0].ports[0].port = 0;
        let err = registered_service(bad).unwrap_err();
        assert_eq!(err.field, "backends[0].ports[0].port");
        let mut bad = wire();
        bad.backends[0].ip = "10.1.1".into();
        assert_eq!(registered_service(bad).unwrap_err().field, "backends[0].ip");
        let mut bad = wire();
        bad.service.as_mut().unwrap().affinity = 9;
        assert_eq!(
            registered_service(bad).unwrap_err().field,
            "service.affinity"
        );
    }
}
