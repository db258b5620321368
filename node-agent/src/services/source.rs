//! The local cluster's services: the local apiserver's `WatchServices`
//! stream, parsed into [`LocalService`]s.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use api::agent::Affinity;
use datapath::Protocol;
use futures::StreamExt as _;
use kvstore::retry::Backoff;
use mesh_proto::v1 as pb;
use tracing::{info, warn};

use crate::clusters::Mesh;

/// How long connecting to the apiserver may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a service the apiserver sent cannot be used: the field that does
/// not parse ([`mesh_proto::convert::registered_service`]).
pub type ServiceError = mesh_proto::FieldError;

/// Errors of the apiserver stream.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The URL is not a valid endpoint.
    #[error("apiserver URL {url:?}")]
    Url {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting failed.
    #[error("connecting to the apiserver at {url}")]
    Connect {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The call or the stream failed.
    #[error("WatchServices on {url}")]
    Rpc {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: tonic::Status,
    },
    /// The stream ended.
    #[error("the apiserver at {url} ended the WatchServices stream")]
    Ended {
        /// The URL.
        url: String,
    },
}

/// One port of a service's frontends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (matches backend ports by name).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Frontend port.
    pub port: u16,
}

/// A service of the local cluster, as the apiserver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Cluster IPs.
    pub frontend_ips: Vec<IpAddr>,
    /// Ports (SCTP ports left out).
    pub ports: Vec<ServicePort>,
    /// `service.cilium.io/global`.
    pub global: bool,
    /// `service.cilium.io/shared`.
    pub shared: bool,
    /// `service.cilium.io/affinity`.
    pub affinity: Affinity,
    /// Local backends: IP → port name → (protocol, port).
    pub backends: BTreeMap<IpAddr, BTreeMap<String, (Protocol, u16)>>,
}

impl LocalService {
    /// Converts one entry of a `ListServicesResponse` (parsed by the
    /// apiserver's own parser); SCTP ports are left out: the datapath
    /// balances TCP and UDP only.
    ///
    /// # Errors
    ///
    /// A [`ServiceError`] naming the first invalid field.
    pub fn from_proto(registered: pb::RegisteredService) -> Result<Self, ServiceError> {
        use mesh_proto::model::Protocol as Wire;
        let l4 = |p: Wire| match p {
            Wire::Tcp => Some(Protocol::Tcp),
            Wire::Udp => Some(Protocol::Udp),
            Wire::Sctp => None,
        };
        let parsed = mesh_proto::convert::registered_service(registered)?;
        let svc = parsed.spec;
        let ports = svc
            .ports
            .iter()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone(),
                    protocol: l4(p.protocol)?,
                    port: p.port,
                })
            })
            .collect();
        let backends = parsed
            .backends
            .into_iter()
            .map(|(ip, ports)| {
                let by_name = ports
                    .into_iter()
                    .filter_map(|(name, p)| Some((name, (l4(p.protocol)?, p.port))))
                    .collect();
                (ip, by_name)
            })
            .collect();
        Ok(Self {
            namespace: svc.namespace,
            name: svc.name,
            frontend_ips: svc.frontend_ips,
            ports,
            global: svc.global,
            shared: svc.shared,
            affinity: svc.affinity,
            backends,
        })
    }
}

/// The local services, shared between the apiserver stream and the
/// reconciler. `None` until the first snapshot arrived.
#[derive(Debug, Default)]
pub struct LocalServices {
    snapshot: RwLock<Option<Arc<Vec<LocalService>>>>,
}

impl LocalServices {
    /// The latest snapshot, if one arrived.
    pub fn get(&self) -> Option<Arc<Vec<LocalService>>> {
        self.snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the snapshot; `false` when it equals the current one.
    pub fn set(&self, services: Vec<LocalService>) -> bool {
        let mut slot = self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_deref() == Some(&services) {
            return false;
        }
        *slot = Some(Arc::new(services));
        true
    }
}

/// Follows the apiserver's `WatchServices` stream at `url` into `local`,
/// waking the service reconciler through `mesh` on every change, until
/// `shutdown`. Invalid services are logged and left out. A failure keeps
/// the last snapshot and reconnects with jittered exponential backoff.
pub async fn watch_local_services(
    url: String,
    local: Arc<LocalServices>,
    mesh: Arc<Mesh>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    tokio::pin!(shutdown);
    loop {
        let mut received = false;
        let error = tokio::select! {
            () = &mut shutdown => return,
            e = follow(&url, &local, &mesh, &mut received) => e,
        };
        if received {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        warn!(error = %kvstore::error_chain(&error), ?delay, "local services stream broke; keeping the last snapshot");
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn follow(url: &str, local: &LocalServices, mesh: &Mesh, received: &mut bool) -> WatchError {
    let endpoint = match tonic::transport::Endpoint::from_shared(url.to_owned()) {
        Ok(e) => e.connect_timeout(CONNECT_TIMEOUT),
        Err(source) => {
            return WatchError::Url {
                url: url.to_owned(),
                source,
            }
        }
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(source) => {
            return WatchError::Connect {
                url: url.to_owned(),
                source,
            }
        }
    };
    let mut client = pb::registry_client::RegistryClient::new(channel);
    let mut stream = match client.watch_services(pb::WatchServicesRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(source) => {
            return WatchError::Rpc {
                url: url.to_owned(),
                source,
            }
        }
    };
    while let Some(message) = stream.next().await {
        let snapshot = match message {
            Ok(s) => s,
            Err(source) => {
                return WatchError::Rpc {
                    url: url.to_owned(),
                    source,
                }
            }
        };
        let mut services = Vec::with_capacity(snapshot.services.len());
        for registered in snapshot.services {
            match LocalService::from_proto(registered) {
                Ok(s) => services.push(s),
                Err(e) => warn!(error = %e, "local service left out"),
            }
        }
        if !*received {
            info!(services = services.len(), "local services received");
        }
        *received = true;
        if local.set(services) {
            mesh.notify();
        }
    }
    WatchError::Ended {
        url: url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_apiserver_records_are_refused_with_the_field() {
        let mut registered = pb::RegisteredService {
            service: Some(pb::Service {
                namespace: "default".into(),
                name: "web".into(),
                frontend_ips: vec!["10.96.0.300".into()],
                ..Default::default()
            }),
            backends: vec![],
        };
        let e = LocalService::from_proto(registered.clone()).unwrap_err();
        assert!(e.to_string().contains("frontend_ips"), "{e}");
        registered.service.as_mut().unwrap().frontend_ips = vec!["10.96.0.10".into()];
        registered.service.as_mut().unwrap().ports = vec![pb::ServicePort {
            name: "http".into(),
            protocol: 1,
            port: 70_000,
            target: None,
        }];
        let e = LocalService::from_proto(registered.clone()).unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
        registered.service.as_mut().unwrap().ports[0].port = 80;
        registered.service.as_mut().unwrap().affinity = 7;
        assert!(LocalService::from_proto(registered.clone()).is_err());
        registered.service.as_mut().unwrap().affinity = pb::Affinity::Local.into();
        let s = LocalService::from_proto(registered).unwrap();
        assert_eq!(s.affinity, Affinity::Local);
        assert!(s.shared, "unset shared means true");
    }
}
