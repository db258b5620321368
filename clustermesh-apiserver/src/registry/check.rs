//! What the registry checks of every record, whichever source declared it.
//!
//! The records of [`crate::model`] are typed (an IP is an [`std::net::IpAddr`]),
//! so a front end's only job is to parse its wire format ([`crate::convert`]
//! for the gRPC API); every rule about the *values* lives here, so the
//! standalone and the Kubernetes source refuse the same record with the same
//! [`FieldError`]. Field paths are those of the `mesh.v1` messages
//! (`endpoint.ips[1]`), which mirror the model field for field.
//!
//! Checks against the registry's contents (node registered, IP inside the
//! node's pod CIDRs) are in [`super::Table::check_endpoint`].

use std::{collections::BTreeSet, net::IpAddr};

use base64::Engine as _;

use super::{FieldError, Owner};
use api::names::{validate_dns_label, validate_dns_subdomain, validate_port, validate_port_name};

use mesh_proto::model::{EndpointSpec, Labels, NodeSpec, ServiceSpec, TargetPort};

type Result<T = ()> = std::result::Result<T, FieldError>;

fn check<T, E: ToString>(field: impl FnOnce() -> String, r: std::result::Result<T, E>) -> Result {
    r.map(|_| ())
        .map_err(|reason| FieldError::new(field(), reason.to_string()))
}

fn port(field: impl FnOnce() -> String, port: u16) -> Result {
    check(
        field,
        validate_port(port.into()).map_err(|reason| format!("{port} {reason}")),
    )
}

/// Labels with the syntax identity labels have ([`api::Label::validate`]).
fn labels(field: &str, labels: &Labels) -> Result {
    for (k, v) in labels {
        check(|| format!("{field}[{k:?}]"), api::labels::validate_key(k))?;
        check(
            || format!("{field}[{k:?}]"),
            api::labels::validate_value(k, v),
        )?;
    }
    Ok(())
}

/// A port name not used by an earlier port of the same record.
fn unique<'a>(
    names: &mut BTreeSet<&'a str>,
    field: impl FnOnce() -> String,
    name: &'a str,
) -> Result {
    if names.insert(name) {
        Ok(())
    } else {
        Err(FieldError::new(
            field(),
            format!("duplicate port name {name:?}"),
        ))
    }
}

fn one_per_family(field: &str, ips: &[IpAddr]) -> Result {
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

/// A session may declare only its own node.
fn owned_node(field: &str, owner: &Owner, node: &str) -> Result {
    match owner {
        Owner::Session { node: own } if own != node => Err(FieldError::new(
            field,
            format!("the session belongs to node {own:?}, not {node:?}"),
        )),
        _ => Ok(()),
    }
}

/// Checks a node declared by `owner`.
///
/// # Errors
///
/// The first invalid field.
pub(super) fn node(owner: &Owner, node: &NodeSpec) -> Result {
    check(|| "node.name".into(), validate_dns_subdomain(&node.name))?;
    owned_node("node.name", owner, &node.name)?;
    if node.internal_ips.is_empty() {
        return Err(FieldError::new(
            "node.internal_ips",
            "at least one is required",
        ));
    }
    for (i, net) in node.pod_cidrs.iter().enumerate() {
        if net.trunc() != *net {
            return Err(FieldError::new(
                format!("node.pod_cidrs[{i}]"),
                format!("{net} has host bits set (network is {})", net.trunc()),
            ));
        }
    }
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
    labels("node.labels", &node.labels)
}

/// Checks an endpoint declared by `owner`.
///
/// # Errors
///
/// The first invalid field.
pub(super) fn endpoint(owner: &Owner, ep: &EndpointSpec) -> Result {
    check(
        || "endpoint.namespace".into(),
        validate_dns_label(&ep.namespace),
    )?;
    check(|| "endpoint.name".into(), validate_dns_subdomain(&ep.name))?;
    if ep.uid.len() > 128 || ep.uid.contains(['/', ';', '"']) {
        return Err(FieldError::new(
            "endpoint.uid",
            "at most 128 characters without '/', ';' or '\"'",
        ));
    }
    check(
        || "endpoint.service_account".into(),
        validate_dns_subdomain(&ep.service_account),
    )?;
    owned_node("endpoint.node", owner, &ep.node)?;
    if ep.ips.is_empty() {
        return Err(FieldError::new("endpoint.ips", "at least one is required"));
    }
    one_per_family("endpoint.ips", &ep.ips)?;
    let mut names = BTreeSet::new();
    for (i, p) in ep.named_ports.iter().enumerate() {
        let field = |f: &str| format!("endpoint.named_ports[{i}].{f}");
        check(|| field("name"), validate_port_name(&p.name))?;
        unique(&mut names, || field("name"), &p.name)?;
        port(|| field("port"), p.port)?;
    }
    labels("endpoint.labels", &ep.labels)
}

/// Checks a service.
///
/// # Errors
///
/// The first invalid field.
pub(super) fn service(svc: &ServiceSpec) -> Result {
    check(
        || "service.namespace".into(),
        validate_dns_label(&svc.namespace),
    )?;
    check(|| "service.name".into(), validate_dns_label(&svc.name))?;
    one_per_family("service.frontend_ips", &svc.frontend_ips)?;
    let mut names = BTreeSet::new();
    for (i, p) in svc.ports.iter().enumerate() {
        let field = |f: &str| format!("service.ports[{i}].{f}");
        if p.name.is_empty() {
            if svc.ports.len() > 1 {
                return Err(FieldError::new(
                    field("name"),
                    "required when the service has more than one port",
                ));
            }
        } else {
            check(|| field("name"), validate_port_name(&p.name))?;
        }
        unique(&mut names, || field("name"), &p.name)?;
        port(|| field("port"), p.port)?;
        match &p.target {
            TargetPort::Number(n) => port(|| field("target_port_number"), *n)?,
            TargetPort::Name(name) => {
                check(|| field("target_port_name"), validate_port_name(name))?;
            }
        }
    }
    for (ip, ports) in svc.backends.iter().flatten() {
        for (name, p) in ports {
            let field = || format!("service.backends[{ip}][{name:?}]");
            if !names.contains(name.as_str()) {
                return Err(FieldError::new(field(), "names no port of the service"));
            }
            port(field, p.port)?;
        }
    }
    labels("service.selector", &svc.selector)?;
    labels("service.labels", &svc.labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::model::{Affinity, NamedPort, Protocol, ServicePort};

    fn endpoint_spec() -> EndpointSpec {
        EndpointSpec {
            namespace: "default".into(),
            name: "a".into(),
            uid: String::new(),
            service_account: "default".into(),
            ips: vec!["10.1.1.5".parse().unwrap()],
            labels: Labels::new(),
            named_ports: vec![NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            node: "n1".into(),
        }
    }

    #[test]
    fn a_session_declares_only_its_own_node() {
        let session = Owner::Session { node: "n2".into() };
        let err = endpoint(&session, &endpoint_spec()).unwrap_err();
        assert_eq!(err.field, "endpoint.node");
        assert_eq!(err.reason, "the session belongs to node \"n2\", not \"n1\"");
        endpoint(&Owner::Source, &endpoint_spec()).unwrap();
        endpoint(&Owner::Session { node: "n1".into() }, &endpoint_spec()).unwrap();
    }

    #[test]
    fn values_a_typed_record_can_still_get_wrong() {
        let mut ep = endpoint_spec();
        ep.named_ports[0].port = 0;
        let err = endpoint(&Owner::Source, &ep).unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpoint.named_ports[0].port: 0 is not a port in 1..=65535"
        );
        let mut ep = endpoint_spec();
        ep.ips.push("10.1.1.6".parse().unwrap());
        let err = endpoint(&Owner::Source, &ep).unwrap_err();
        assert_eq!(err.field, "endpoint.ips[1]");

        let node_spec = NodeSpec {
            name: "n1".into(),
            internal_ips: vec!["192.168.1.1".parse().unwrap()],
            cilium_internal_ips: vec![],
            pod_cidrs: vec!["10.1.1.1/24".parse().unwrap()],
            wireguard_public_key: String::new(),
            labels: Labels::new(),
        };
        let err = node(&Owner::Source, &node_spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node.pod_cidrs[0]: 10.1.1.1/24 has host bits set (network is 10.1.1.0/24)"
        );

        let svc = ServiceSpec {
            namespace: "default".into(),
            name: "web".into(),
            frontend_ips: vec![],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target: TargetPort::Name("Not-A-Name".into()),
            }],
            selector: Labels::new(),
            labels: Labels::new(),
            global: true,
            shared: true,
            affinity: Affinity::None,
            backends: None,
        };
        let err = service(&svc).unwrap_err();
        assert_eq!(err.field, "service.ports[0].target_port_name");
    }
}
