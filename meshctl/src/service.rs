//! `meshctl service`: declare services with a cluster's clustermesh-apiserver
//! (gRPC `UpsertService`/`DeleteService`) and show what the node agents
//! programmed from them.
//!
//! The flags are the equivalents of Cilium's service annotations:
//! `--global` is `service.cilium.io/global: "true"`, `--shared=false` is
//! `service.cilium.io/shared: "false"`, `--affinity` is
//! `service.cilium.io/affinity`. `list` reads the agents' status documents,
//! which carry every service each agent programmed with its frontends and
//! their backends per cluster (and which are preferred), so it shows the
//! merged, cross-cluster view rather than one apiserver's registry.
//!
//! In a lab, the apiserver of cluster `cN` listens inside the cluster's
//! control namespace; the calls are made from a thread that entered it
//! ([`crate::lab::ip::in_netns`]), so the host namespace is never touched.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mesh_proto::v1 as pb;
use serde::Serialize;

use api::agent::{AgentStatus, ServiceStatus};
/// `--affinity`: the agent's own type, so flag values and status agree.
pub use api::Affinity;
use mesh_proto::model::{Protocol, ServicePort, ServiceSpec, TargetPort};

use crate::clustermesh::status::read_agent_status;
use crate::lab::ip;

/// How long one apiserver call may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of `meshctl service`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A `--frontend` is not `IP:PORT/PROTO`.
    #[error("frontend {0:?} is not IP:PORT/PROTO (e.g. 10.96.0.10:80/TCP)")]
    Frontend(String),
    /// Frontends disagree on port or protocol.
    #[error("every --frontend must have the same port and protocol ({first} vs {other})")]
    FrontendPorts {
        /// The first frontend.
        first: String,
        /// The one that differs.
        other: String,
    },
    /// `<ns>/<name>` malformed.
    #[error("service {0:?} is not <namespace>/<name>")]
    Name(String),
    /// A selector is not `k=v,...`.
    #[error("selector {0:?} is not k=v[,k=v...]")]
    Selector(String),
    /// `--target-port` is neither a port number nor a name.
    #[error("target port {0:?} is neither a port number (1-65535) nor a port name")]
    TargetPort(String),
    /// The runtime for the call could not be built.
    #[error("starting the runtime for the apiserver call")]
    Runtime(#[source] std::io::Error),
    /// The apiserver's namespace could not be entered.
    #[error("entering the apiserver's namespace")]
    Netns(#[source] ip::IpError),
    /// Connecting failed.
    #[error("connecting to the apiserver at {url}")]
    Connect {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The apiserver refused or failed the call.
    #[error("the apiserver at {url} answered {op} with {code:?}: {message}")]
    Rpc {
        /// The URL.
        url: String,
        /// The call.
        op: &'static str,
        /// gRPC code.
        code: tonic::Code,
        /// Its message (names the invalid field).
        message: String,
    },
    /// The call took too long.
    #[error("the apiserver at {url} did not answer {op} within {RPC_TIMEOUT:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The call.
        op: &'static str,
    },
}

/// What `service add` declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRequest {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Frontend IPs.
    pub frontend_ips: Vec<IpAddr>,
    /// Frontend port.
    pub port: u16,
    /// `TCP` or `UDP` (or `SCTP`).
    pub protocol: Protocol,
    /// Port name (backends of other clusters are matched by it).
    pub port_name: String,
    /// Target port number or named port.
    pub target: TargetPort,
    /// Endpoint selector.
    pub selector: BTreeMap<String, String>,
    /// `service.cilium.io/global`.
    pub global: bool,
    /// `service.cilium.io/shared`.
    pub shared: bool,
    /// `service.cilium.io/affinity`.
    pub affinity: Affinity,
}

/// Parses `ns/name`.
///
/// # Errors
///
/// [`ServiceError::Name`].
pub fn parse_name(text: &str) -> Result<(String, String), ServiceError> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(ServiceError::Name(text.to_owned())),
    }
}

/// Parses `IP:PORT/PROTO` (`[v6]:PORT/PROTO` for IPv6; PROTO defaults to TCP).
///
/// # Errors
///
/// [`ServiceError::Frontend`].
pub fn parse_frontend(text: &str) -> Result<(SocketAddr, Protocol), ServiceError> {
    let bad = || ServiceError::Frontend(text.to_owned());
    let (addr, proto) = text.rsplit_once('/').unwrap_or((text, "TCP"));
    let protocol = match proto.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        _ => return Err(bad()),
    };
    let addr: SocketAddr = addr.parse().map_err(|_| bad())?;
    if addr.port() == 0 {
        return Err(bad());
    }
    Ok((addr, protocol))
}

/// Parses `--target-port`: a number is a port, anything else a port name.
///
/// # Errors
///
/// [`ServiceError::TargetPort`] for 0, a number above 65535 or an empty name.
pub fn parse_target(text: &str) -> Result<TargetPort, ServiceError> {
    if text.chars().all(|c| c.is_ascii_digit()) && !text.is_empty() {
        return match text.parse::<u16>() {
            Ok(n) if n != 0 => Ok(TargetPort::Number(n)),
            _ => Err(ServiceError::TargetPort(text.to_owned())),
        };
    }
    if text.is_empty() || text.contains(char::is_whitespace) {
        return Err(ServiceError::TargetPort(text.to_owned()));
    }
    Ok(TargetPort::Name(text.to_owned()))
}

/// Parses `k=v,k2=v2`.
///
/// # Errors
///
/// [`ServiceError::Selector`].
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, ServiceError> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(ServiceError::Selector(text.to_owned())),
        })
        .collect()
}

/// The frontend IPs, port and protocol of several `--frontend` values.
///
/// # Errors
///
/// [`ServiceError::Frontend`] or [`ServiceError::FrontendPorts`].
pub fn parse_frontends(texts: &[String]) -> Result<(Vec<IpAddr>, u16, Protocol), ServiceError> {
    let mut parsed = Vec::new();
    for t in texts {
        parsed.push((t, parse_frontend(t)?));
    }
    let Some(&(first_text, (first, proto))) = parsed.first() else {
        return Err(ServiceError::Frontend(String::new()));
    };
    let mut ips = Vec::new();
    for (text, (addr, p)) in &parsed {
        if addr.port() != first.port() || *p != proto {
            return Err(ServiceError::FrontendPorts {
                first: first_text.clone(),
                other: (*text).clone(),
            });
        }
        if !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    Ok((ips, first.port(), proto))
}

impl ServiceRequest {
    /// The service as the API models it.
    pub fn spec(&self) -> ServiceSpec {
        ServiceSpec {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            frontend_ips: self.frontend_ips.clone(),
            ports: vec![ServicePort {
                name: self.port_name.clone(),
                protocol: self.protocol,
                port: self.port,
                target: self.target.clone(),
            }],
            selector: self.selector.clone(),
            labels: Default::default(),
            global: self.global,
            shared: self.shared,
            affinity: self.affinity,
            backends: None,
        }
    }

    /// The gRPC message.
    pub fn to_proto(&self) -> pb::Service {
        mesh_proto::convert::service_to_proto(&self.spec())
    }
}

/// Where a cluster's apiserver is.
#[derive(Debug, Clone)]
pub struct Apiserver {
    /// `http://IP:PORT`.
    pub url: String,
    /// The network namespace to call from (a lab's control namespace).
    pub netns: Option<String>,
}

fn call<T, F, Fut>(api: &Apiserver, op: &'static str, f: F) -> Result<T, ServiceError>
where
    T: Send + 'static,
    F: FnOnce(pb::registry_client::RegistryClient<tonic::transport::Channel>) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let url = api.url.clone();
    let run = move || -> Result<T, ServiceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServiceError::Runtime)?;
        rt.block_on(async {
            let work = async {
                let endpoint =
                    tonic::transport::Endpoint::from_shared(url.clone()).map_err(|source| {
                        ServiceError::Connect {
                            url: url.clone(),
                            source,
                        }
                    })?;
                let channel = endpoint
                    .connect()
                    .await
                    .map_err(|source| ServiceError::Connect {
                        url: url.clone(),
                        source,
                    })?;
                let client = pb::registry_client::RegistryClient::new(channel);
                f(client).await.map_err(|s| ServiceError::Rpc {
                    url: url.clone(),
                    op,
                    code: s.code(),
                    message: s.message().to_owned(),
                })
            };
            tokio::time::timeout(RPC_TIMEOUT, work)
                .await
                .unwrap_or_else(|_| {
                    Err(ServiceError::Timeout {
                        url: url.clone(),
                        op,
                    })
                })
        })
    };
    match &api.netns {
        Some(netns) => ip::in_netns(netns, run).map_err(ServiceError::Netns)?,
        None => run(),
    }
}

/// Declares (or replaces) a service.
///
/// # Errors
///
/// A [`ServiceError`]; an invalid service is refused by the apiserver with a
/// message naming the field.
pub fn add(api: &Apiserver, request: &ServiceRequest) -> Result<(), ServiceError> {
    let service = request.to_proto();
    call(api, "UpsertService", move |mut c| async move {
        c.upsert_service(pb::UpsertServiceRequest {
            service: Some(service),
        })
        .await
        .map(|_| ())
    })
}

/// Deletes a service; `Ok(false)` when it did not exist.
///
/// # Errors
///
/// A [`ServiceError`].
pub fn delete(api: &Apiserver, namespace: &str, name: &str) -> Result<bool, ServiceError> {
    let req = pb::DeleteServiceRequest {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    call(api, "DeleteService", move |mut c| async move {
        c.delete_service(req).await.map(|r| r.into_inner().existed)
    })
}

/// The services of one cluster, as its agents report them.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterServices {
    /// The cluster.
    pub cluster: String,
    /// The node whose view is shown (the first that answered).
    pub node: Option<String>,
    /// Nodes that did not answer, with the reason.
    pub unreachable: Vec<(String, String)>,
    /// Nodes whose view differs from the one shown (still converging).
    pub differing: Vec<String>,
    /// The view.
    pub services: Vec<ServiceStatus>,
}

/// Reads the status of every `(node, socket)` of `cluster` and returns the
/// first answering node's services, noting nodes that differ.
pub fn cluster_services(cluster: &str, nodes: &[(String, PathBuf)]) -> ClusterServices {
    let mut out = ClusterServices {
        cluster: cluster.to_owned(),
        node: None,
        unreachable: Vec::new(),
        differing: Vec::new(),
        services: Vec::new(),
    };
    for (node, socket) in nodes {
        match read_agent_status(socket) {
            Ok(AgentStatus { services, .. }) => {
                if out.node.is_none() {
                    out.node = Some(node.clone());
                    out.services = services.services;
                } else if services.services != out.services {
                    out.differing.push(node.clone());
                }
            }
            Err(e) => out.unreachable.push((node.clone(), e.to_string())),
        }
    }
    out
}

/// Text table: one line per frontend, backends as `cluster/IP:port`, a `*`
/// marking preferred ones.
pub fn render(clusters: &[ClusterServices]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<24} {:<24} {:<26} BACKENDS (* preferred)",
        "CLUSTER", "SERVICE", "FRONTEND", "FLAGS"
    );
    for c in clusters {
        for s in &c.services {
            let mut flags = vec![if s.global { "global" } else { "local" }];
            if !s.shared {
                flags.push("shared=false");
            }
            let affinity = format!(
                "affinity={}",
                serde_json::to_value(s.affinity)
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or("none")
            );
            if s.affinity != Affinity::None {
                flags.push(&affinity);
            }
            for f in &s.frontends {
                let backends: Vec<String> = f
                    .backends
                    .iter()
                    .map(|b| {
                        format!(
                            "{}/{}{}",
                            b.cluster,
                            b.address,
                            if b.preferred { "*" } else { "" }
                        )
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "{:<8} {:<24} {:<24} {:<26} {}",
                    c.cluster,
                    format!("{}/{}", s.namespace, s.name),
                    f.frontend,
                    flags.join(","),
                    if backends.is_empty() {
                        "(none)".to_owned()
                    } else {
                        backends.join(" ")
                    }
                );
            }
        }
        for (node, why) in &c.unreachable {
            let _ = writeln!(out, "# {}: node {node} did not answer: {why}", c.cluster);
        }
        if !c.differing.is_empty() {
            let _ = writeln!(
                out,
                "# {}: nodes {} still converging to a different view",
                c.cluster,
                c.differing.join(", ")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontends_parse_and_must_agree() {
        assert_eq!(
            parse_frontend("10.96.0.10:80/udp").unwrap(),
            ("10.96.0.10:80".parse().unwrap(), Protocol::Udp)
        );
        assert_eq!(parse_frontend("[fd00::10]:443").unwrap().1, Protocol::Tcp);
        for bad in [
            "10.96.0.10",
            "10.96.0.10:0/TCP",
            "10.96.0.10:80/ICMP",
            "x:80/TCP",
        ] {
            assert!(parse_frontend(bad).is_err(), "{bad}");
        }
        let two = [
            "10.96.0.10:80/TCP".to_owned(),
            "[fd00::10]:80/TCP".to_owned(),
        ];
        assert_eq!(parse_frontends(&two).unwrap().0.len(), 2);
        let clash = [
            "10.96.0.10:80/TCP".to_owned(),
            "10.96.0.11:81/TCP".to_owned(),
        ];
        assert!(matches!(
            parse_frontends(&clash),
            Err(ServiceError::FrontendPorts { .. })
        ));
    }

    #[test]
    fn target_ports_names_and_selectors() {
        assert_eq!(parse_target("8080").unwrap(), TargetPort::Number(8080));
        assert_eq!(
            parse_target("http").unwrap(),
            TargetPort::Name("http".into())
        );
        assert!(parse_target("0").is_err());
        assert!(parse_target("70000").is_err());
        assert_eq!(parse_name("default/web").unwrap().1, "web");
        assert!(parse_name("web").is_err());
        assert!(parse_name("a/b/c").is_err());
        assert_eq!(parse_selector("app=web,tier=fe").unwrap().len(), 2);
        assert!(parse_selector("app").is_err());
    }

    #[test]
    fn the_request_carries_the_annotation_equivalents() {
        let r = ServiceRequest {
            namespace: "default".into(),
            name: "web".into(),
            frontend_ips: vec!["10.96.0.10".parse().unwrap()],
            port: 80,
            protocol: Protocol::Tcp,
            port_name: String::new(),
            target: TargetPort::Number(8080),
            selector: [("app".to_owned(), "web".to_owned())].into(),
            global: true,
            shared: false,
            affinity: Affinity::Remote,
        };
        let p = r.to_proto();
        assert!(p.global);
        assert_eq!(p.shared, Some(false));
        assert_eq!(p.affinity, i32::from(pb::Affinity::Remote));
        assert_eq!(p.ports[0].port, 80);
    }
}
