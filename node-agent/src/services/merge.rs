//! Merging the local services with the remote clusters' exports into the
//! desired load-balancer state (Cilium's rules: see the module docs of
//! [`crate::services`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use api::agent::{Affinity, BackendStatus, FrontendStatus, ServiceStatus};
use api::{ClusterName, ClusterService};
use datapath::{Backend, Frontend, Protocol, ServiceFlags};
use tracing::warn;

use super::LocalService;
use crate::clusters::ClusterEntry;
use crate::reconcile::plan::SourceView as _;
use crate::trust::Verdicts;

/// What one frontend should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// `namespace/name` of the service.
    pub service: String,
    /// Service flags.
    pub flags: ServiceFlags,
    /// Every backend, sorted by (cluster, address).
    pub backends: Vec<Backend>,
}

/// The merged services of every cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredServices {
    /// Frontend → its desired state.
    pub frontends: BTreeMap<Frontend, DesiredFrontend>,
    /// Per service, for the status document.
    pub status: Vec<ServiceStatus>,
    /// Frontends claimed by two services, or backend IPs offered by two
    /// clusters (the first one wins).
    pub conflicts: u64,
    /// Remote backends left out because they are not accepted endpoints of
    /// the cluster that exports them: (cluster, `namespace/name`, IP).
    pub refused_backends: BTreeSet<(String, String, IpAddr)>,
}

/// One remote cluster's export of one service.
struct RemoteExport {
    cluster: String,
    cluster_id: u16,
    service: Arc<ClusterService>,
}

/// Every remote cluster's exported services by `(namespace, name)`, clusters
/// in name order, the current connection's records before the previous one's.
/// A backend that is not an accepted endpoint of its cluster
/// ([`crate::trust`]) is left out and recorded in `refused`.
fn remote_exports(
    clusters: &BTreeMap<ClusterName, ClusterEntry>,
    verdicts: &Verdicts,
    refused: &mut BTreeSet<(String, String, IpAddr)>,
) -> BTreeMap<(String, String), Vec<RemoteExport>> {
    let mut out: BTreeMap<(String, String), Vec<RemoteExport>> = BTreeMap::new();
    for (name, entry) in clusters.iter().filter(|(_, e)| !e.local && !e.refused) {
        let owns = |ip: &IpAddr| {
            entry
                .sources()
                .find_map(|s| s.endpoint(*ip))
                .is_some_and(|ep| verdicts.endpoint(name.as_str(), &ep).is_none())
        };
        for stores in entry.sources() {
            for mut service in stores.services.exports(&stores.scope) {
                let foreign: Vec<IpAddr> = service
                    .backends
                    .keys()
                    .filter(|ip| !owns(ip))
                    .copied()
                    .collect();
                if !foreign.is_empty() {
                    let id = format!("{}/{}", service.namespace, service.name);
                    let owned = Arc::make_mut(&mut service);
                    for ip in foreign {
                        owned.backends.remove(&ip);
                        refused.insert((name.to_string(), id.clone(), ip));
                    }
                }
                out.entry((service.namespace.clone(), service.name.clone()))
                    .or_default()
                    .push(RemoteExport {
                        cluster: name.to_string(),
                        cluster_id: stores.scope.cluster_id.get(),
                        service,
                    });
            }
        }
    }
    out
}

fn l4(protocol: api::L4Protocol) -> Option<Protocol> {
    match protocol {
        api::L4Protocol::Tcp => Some(Protocol::Tcp),
        api::L4Protocol::Udp => Some(Protocol::Udp),
        api::L4Protocol::Sctp | api::L4Protocol::Any => None,
    }
}

/// Merges the local services with the remote clusters' exports; see the
/// module docs for the rules. `local_cluster`/`local_id` name this cluster.
pub fn desired_services(
    local: &[LocalService],
    clusters: &BTreeMap<ClusterName, ClusterEntry>,
    local_cluster: &str,
    local_id: u16,
    verdicts: &Verdicts,
) -> DesiredServices {
    let mut out = DesiredServices::default();
    let remote = remote_exports(clusters, verdicts, &mut out.refused_backends);
    let mut ordered: Vec<&LocalService> = local.iter().collect();
    ordered.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for svc in ordered {
        let id = format!("{}/{}", svc.namespace, svc.name);
        let mut flags = ServiceFlags::NONE;
        if svc.global {
            flags = flags | ServiceFlags::GLOBAL;
        }
        if svc.shared {
            flags = flags | ServiceFlags::SHARED;
        }
        match svc.affinity {
            Affinity::Local => flags = flags | ServiceFlags::AFFINITY_LOCAL,
            Affinity::Remote => flags = flags | ServiceFlags::AFFINITY_REMOTE,
            Affinity::None => {}
        }
        let exports: &[RemoteExport] = if svc.global {
            remote
                .get(&(svc.namespace.clone(), svc.name.clone()))
                .map_or(&[], Vec::as_slice)
        } else {
            &[]
        };
        let mut status = ServiceStatus {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            global: svc.global,
            shared: svc.shared,
            affinity: svc.affinity,
            frontends: Vec::new(),
        };
        for fe_ip in &svc.frontend_ips {
            for p in &svc.ports {
                let frontend = Frontend {
                    addr: SocketAddr::new(*fe_ip, p.port),
                    proto: p.protocol,
                };
                if out.frontends.contains_key(&frontend) {
                    warn!(%frontend, service = %id, "frontend already used by another service; left out");
                    out.conflicts += 1;
                    continue;
                }
                let mut seen = BTreeSet::new();
                let mut backends = Vec::new();
                let mut fe_status = FrontendStatus {
                    frontend: frontend.to_string(),
                    port_name: p.name.clone(),
                    backends: Vec::new(),
                };
                let mut add = |ip: IpAddr,
                               port: u16,
                               cluster: &str,
                               cluster_id: u16,
                               preferred: bool,
                               conflicts: &mut u64| {
                    if ip.is_ipv4() != fe_ip.is_ipv4() {
                        return;
                    }
                    if !seen.insert(ip) {
                        if cluster != local_cluster {
                            *conflicts += 1;
                        }
                        return;
                    }
                    let addr = SocketAddr::new(ip, port);
                    backends.push(Backend {
                        preferred,
                        ..Backend::new(addr, cluster_id)
                    });
                    fe_status.backends.push(BackendStatus {
                        cluster: cluster.to_owned(),
                        address: addr.to_string(),
                        preferred,
                    });
                };
                for (ip, ports) in &svc.backends {
                    if let Some(&(proto, port)) = ports.get(&p.name) {
                        if proto == p.protocol {
                            let preferred = svc.global && svc.affinity == Affinity::Local;
                            add(
                                *ip,
                                port,
                                local_cluster,
                                local_id,
                                preferred,
                                &mut out.conflicts,
                            );
                        }
                    }
                }
                for export in exports {
                    for (ip, ports) in &export.service.backends {
                        let Some(l4addr) = ports.get(&p.name) else {
                            continue;
                        };
                        if l4(l4addr.protocol) != Some(p.protocol) || l4addr.port == 0 {
                            continue;
                        }
                        let preferred = svc.affinity == Affinity::Remote;
                        add(
                            *ip,
                            l4addr.port,
                            &export.cluster,
                            export.cluster_id,
                            preferred,
                            &mut out.conflicts,
                        );
                    }
                }
                backends.sort_by_key(|b| (b.cluster_id, b.addr));
                status.frontends.push(fe_status);
                out.frontends.insert(
                    frontend,
                    DesiredFrontend {
                        service: id.clone(),
                        flags,
                        backends,
                    },
                );
            }
        }
        out.status.push(status);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::ServicePort;

    use crate::clusters::test_support::{kv, memory_cluster, MAX};
    use api::{ClusterId, L4Addr, L4Protocol};

    fn export(cluster: &str, id: u16, name: &str, backends: &[(&str, u16)]) -> ClusterService {
        let mut s = ClusterService::new(
            cluster.parse().unwrap(),
            ClusterId::new(id, MAX).unwrap(),
            "default",
            name,
        );
        s.frontends.insert(
            "10.96.0.10".parse().unwrap(),
            [(
                "http".to_owned(),
                L4Addr {
                    protocol: L4Protocol::Tcp,
                    port: 80,
                },
            )]
            .into(),
        );
        for (ip, port) in backends {
            s.backends.insert(
                ip.parse().unwrap(),
                [(
                    "http".to_owned(),
                    L4Addr {
                        protocol: L4Protocol::Tcp,
                        port: *port,
                    },
                )]
                .into(),
            );
        }
        s
    }

    /// A cluster entry over real WatchStores on the in-memory backend: one
    /// node `<name>-n1` at 192.168.<id>.11 with pod CIDR 10.<id>.1.0/24,
    /// endpoints at `pods` on it, and `services`.
    async fn cluster(
        name: &str,
        id: u16,
        local: bool,
        pods: &[&str],
        services: &[ClusterService],
    ) -> ClusterEntry {
        let cluster_id = ClusterId::new(id, MAX).unwrap();
        let host: IpAddr = format!("192.168.{id}.11").parse().unwrap();
        let mut node = api::Node::new(format!("{name}-n1"), name.parse().unwrap(), cluster_id);
        node.set_address(api::AddressType::InternalIp, host);
        node.set_pod_cidrs([format!("10.{id}.1.0/24").parse().unwrap()]);
        let pods: Vec<api::IpcacheEntry> = pods
            .iter()
            .map(|ip| {
                api::IpcacheEntry::new(
                    ip.parse().unwrap(),
                    api::NumericIdentity(u32::from(id) << 16 | 300),
                    Some(host),
                )
            })
            .collect();
        let records = std::iter::once(kv(&node))
            .chain(pods.iter().map(kv))
            .chain(services.iter().map(kv));
        memory_cluster(name, id, local, records).await
    }

    fn verdicts(clusters: &BTreeMap<ClusterName, ClusterEntry>) -> Verdicts {
        Verdicts::judge(
            &crate::reconcile::plan::active_clusters(clusters),
            &crate::trust::Rules::default(),
        )
    }

    fn local(name: &str, global: bool, affinity: Affinity, backends: &[&str]) -> LocalService {
        LocalService {
            namespace: "default".into(),
            name: name.into(),
            frontend_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
            global,
            shared: true,
            affinity,
            backends: backends
                .iter()
                .map(|ip| {
                    (
                        ip.parse().unwrap(),
                        [("http".to_owned(), (Protocol::Tcp, 8080))].into(),
                    )
                })
                .collect(),
        }
    }

    fn frontend() -> Frontend {
        Frontend {
            addr: "10.96.0.10:80".parse().unwrap(),
            proto: Protocol::Tcp,
        }
    }

    /// (cluster id, address, preferred) of the frontend's backends.
    fn backends(d: &DesiredServices) -> Vec<(u16, String, bool)> {
        d.frontends[&frontend()]
            .backends
            .iter()
            .map(|b| (b.cluster_id, b.addr.to_string(), b.preferred))
            .collect()
    }

    /// c1 (local) and c2 exporting `remote`, with endpoints at `c2_pods`.
    async fn mesh(
        remote: &[ClusterService],
        c2_pods: &[&str],
    ) -> BTreeMap<ClusterName, ClusterEntry> {
        [
            (
                "c1".parse().unwrap(),
                cluster("c1", 1, true, &["10.1.1.5"], &[]).await,
            ),
            (
                "c2".parse().unwrap(),
                cluster("c2", 2, false, c2_pods, remote).await,
            ),
        ]
        .into()
    }

    /// What node c1/1 programs for its service `web` (backend 10.1.1.5).
    fn desired_web(
        clusters: &BTreeMap<ClusterName, ClusterEntry>,
        global: bool,
        affinity: Affinity,
    ) -> DesiredServices {
        desired_services(
            &[local("web", global, affinity, &["10.1.1.5"])],
            clusters,
            "c1",
            1,
            &verdicts(clusters),
        )
    }

    #[tokio::test]
    async fn a_global_service_merges_remote_backends_by_port_name() {
        let clusters = mesh(
            &[export("c2", 2, "web", &[("10.2.1.5", 9090)])],
            &["10.2.1.5"],
        )
        .await;
        let d = desired_web(&clusters, true, Affinity::None);
        assert_eq!(
            backends(&d),
            [
                (1, "10.1.1.5:8080".to_owned(), false),
                (2, "10.2.1.5:9090".to_owned(), false)
            ]
        );
        let f = &d.frontends[&frontend()];
        assert!(f
            .flags
            .contains(ServiceFlags::GLOBAL | ServiceFlags::SHARED));
        assert_eq!(d.status[0].frontends[0].backends[1].cluster, "c2");
    }

    #[tokio::test]
    async fn a_service_not_global_locally_takes_local_backends_only() {
        let clusters = mesh(
            &[export("c2", 2, "web", &[("10.2.1.5", 8080)])],
            &["10.2.1.5"],
        )
        .await;
        let d = desired_web(&clusters, false, Affinity::None);
        assert_eq!(backends(&d), [(1, "10.1.1.5:8080".to_owned(), false)]);
        assert!(!d.frontends[&frontend()]
            .flags
            .contains(ServiceFlags::GLOBAL));
    }

    #[tokio::test]
    async fn a_remote_global_service_without_local_counterpart_is_not_programmed() {
        let clusters = mesh(
            &[export("c2", 2, "web", &[("10.2.1.5", 8080)])],
            &["10.2.1.5"],
        )
        .await;
        let d = desired_services(&[], &clusters, "c1", 1, &verdicts(&clusters));
        assert!(d.frontends.is_empty());
        assert!(d.status.is_empty());
    }

    #[tokio::test]
    async fn affinity_marks_local_or_remote_backends_preferred() {
        let clusters = mesh(
            &[export("c2", 2, "web", &[("10.2.1.5", 8080)])],
            &["10.2.1.5"],
        )
        .await;
        let run = |affinity| {
            backends(&desired_web(&clusters, true, affinity))
                .into_iter()
                .map(|(c, _, p)| (c, p))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(Affinity::Local), [(1, true), (2, false)]);
        assert_eq!(run(Affinity::Remote), [(1, false), (2, true)]);
        assert_eq!(run(Affinity::None), [(1, false), (2, false)]);
    }

    /// c2 offers c1's pod (it even publishes an endpoint record for it) and
    /// an address it has no endpoint at: both are left out and counted, its
    /// own pod is taken.
    #[tokio::test]
    async fn a_remote_backend_that_is_not_an_endpoint_of_its_cluster_is_refused() {
        let clusters = mesh(
            &[export(
                "c2",
                2,
                "web",
                &[("10.1.1.5", 8080), ("10.2.1.5", 8080), ("10.2.1.6", 8080)],
            )],
            &["10.1.1.5", "10.2.1.5"],
        )
        .await;
        let d = desired_web(&clusters, true, Affinity::None);
        assert_eq!(
            backends(&d),
            [
                (1, "10.1.1.5:8080".to_owned(), false),
                (2, "10.2.1.5:8080".to_owned(), false)
            ]
        );
        assert_eq!(d.conflicts, 0);
        let refused: Vec<String> = d
            .refused_backends
            .iter()
            .map(|(c, s, ip)| format!("{c} {s} {ip}"))
            .collect();
        assert_eq!(
            refused,
            ["c2 default/web 10.1.1.5", "c2 default/web 10.2.1.6"]
        );
    }

    #[tokio::test]
    async fn a_frontend_claimed_by_two_services_goes_to_the_first() {
        let clusters = mesh(&[], &[]).await;
        let d = desired_services(
            &[
                local("b", false, Affinity::None, &["10.1.1.6"]),
                local("a", false, Affinity::None, &["10.1.1.5"]),
            ],
            &clusters,
            "c1",
            1,
            &verdicts(&clusters),
        );
        assert_eq!(d.frontends[&frontend()].service, "default/a");
        assert_eq!(d.conflicts, 1);
    }
}
