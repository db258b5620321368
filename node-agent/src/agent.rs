//! The agent's entry point: wires configuration, datapath, pod networking,
//! the apiserver session, and the status and metrics servers, and runs them
//! until shutdown.

use std::{future::Future, net::IpAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use api::agent::{AgentStatus, ClusterStatus};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn, Instrument as _};

use crate::{
    clusters::{self, EtcdConnector, Mesh},
    config::{Config, Encryption, EtcdSource, Routing},
    netlink::Netlink,
    pod::{PodDatapath, PodManager},
    reconcile::plan::LocalNode,
    reconcile::task::{Reconciler, TunnelState},
    registry::Registry,
    status::{self, StatusHub, StatusSource},
};

/// Name of the VXLAN device (external mode) in the node's namespace.
pub const VXLAN_DEVICE: &str = "mesh_vxlan";
/// Name of the WireGuard device in the node's namespace.
pub const WIREGUARD_DEVICE: &str = "mesh_wg";
/// How often the remote-cluster config directory is scanned.
const CONFIG_DIR_PERIOD: Duration = Duration::from_millis(500);

/// Snapshot source backed by the live components.
#[derive(Debug)]
pub struct LiveStatus {
    config: Config,
    hub: Arc<StatusHub>,
    pods: Arc<PodManager>,
    registry: Option<Registry>,
    mesh: Arc<Mesh>,
    services: Arc<std::sync::RwLock<api::agent::ServicesStatus>>,
}

/// Fills the store-derived fields of `status` from the cluster's stores.
fn fill_from_stores(status: &mut ClusterStatus, entry: &clusters::ClusterEntry) {
    let Some(stores) = entry.current.as_ref() else {
        return;
    };
    status.num_nodes = stores.nodes.len() as u64;
    status.num_endpoints = stores.endpoints.len() as u64;
    status.num_identities = stores.identities.len() as u64;
    status.num_shared_services = stores
        .services
        .exports(&stores.scope)
        .iter()
        .filter(|s| s.shared)
        .count() as u64;
    status.synced = stores.synced();
    status.rejected = stores.rejected();
    status.ready = status.connected && status.synced.all();
}

impl StatusSource for LiveStatus {
    async fn snapshot(&self) -> AgentStatus {
        AgentStatus {
            cluster_name: self.config.cluster_name.to_string(),
            cluster_id: self.config.cluster_id.get(),
            node_name: self.config.node_name.clone(),
            routing: self.config.routing,
            encryption: self.config.encryption,
            apiserver_connected: self.registry.as_ref().map(|r| r.status().connected),
            local_endpoints: self.pods.count().await as u64,
            clusters: {
                let mesh = self.mesh.snapshot();
                let mut clusters = self.hub.clusters();
                for c in &mut clusters {
                    if let Some(entry) = mesh.get(c.name.as_str()) {
                        fill_from_stores(c, entry);
                    }
                }
                clusters
            },
            reconcile: self.hub.reconcile(),
            services: self
                .services
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

/// Runs the agent with `config` until `shutdown` completes. The caller has
/// already entered the node's network namespace.
///
/// # Errors
///
/// Any setup failure (state directory, datapath load, sockets).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;

    let dp = datapath::Datapath::load_or_adopt(&config.bpffs)
        .with_context(|| format!("loading the datapath under {}", config.bpffs.display()))?;
    let endpoints = dp.endpoints().context("opening the endpoints map")?;
    let dp = Arc::new(std::sync::Mutex::new(PodDatapath {
        datapath: dp,
        endpoints,
    }));

    let host = Netlink::connect().context("netlink")?;
    let tunnel = setup_tunnel(&config, &dp).await?;
    let public_key = tunnel
        .wireguard
        .as_ref()
        .map(|wg| wg.public_key().to_base64())
        .unwrap_or_default();
    // With the Kubernetes source the apiserver reads the node and its pods
    // from the Kubernetes API: nothing is registered, and the WireGuard key
    // travels as an annotation of this node's Node object.
    let registers = config.source == crate::config::Source::Standalone;
    if let (crate::config::Source::Kubernetes { kubeconfig }, false) =
        (&config.source, public_key.is_empty())
    {
        let api = mesh_k8s::ApiConfig::from_flag(kubeconfig.clone());
        let (node, key) = (config.node_name.clone(), public_key.clone());
        let stop = stopped();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = crate::kubernetes::publish_wireguard_key(&api, &node, &key) => {}
                    () = stop => {}
                }
            }
            .in_current_span(),
        );
    }
    let registry = config.apiserver.clone().filter(|_| registers).map(|url| {
        let node = mesh_proto::v1::Node {
            name: config.node_name.clone(),
            internal_ips: vec![config.node_ip.to_string()],
            cilium_internal_ips: vec![crate::ipam::first_host(config.pod_cidr).to_string()],
            pod_cidrs: vec![config.pod_cidr.to_string()],
            wireguard_public_key: public_key,
            labels: Default::default(),
        };
        Registry::spawn(url, node, stopped())
    });
    let pods = Arc::new(
        PodManager::new(
            &config.state_dir,
            config.pod_cidr,
            config.pod_mtu(),
            host,
            dp.clone(),
            registry.clone(),
        )
        .context("pod networking state")?,
    );
    let restored = pods.restore().await.context("restoring endpoints")?;
    info!(restored, "endpoints of the previous run restored");

    let hub = Arc::new(StatusHub::default());
    let mesh = Arc::new(Mesh::default());
    let services_status = Arc::default();
    let live = Arc::new(LiveStatus {
        config: config.clone(),
        hub: hub.clone(),
        pods: pods.clone(),
        registry,
        mesh: mesh.clone(),
        services: Arc::clone(&services_status),
    });
    let service_tasks = crate::services::spawn(
        &config.bpffs,
        config.apiserver.clone(),
        mesh.clone(),
        services_status,
        config.cluster_name.clone(),
        config.cluster_id,
        config.sync_timeout,
        hub.clone(),
        config.trust,
        &stopped,
    )
    .context("opening the load balancer maps")?;
    let ipcache = dp
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .datapath
        .ipcache()
        .context("opening the ipcache map")?;
    let reconciler = Reconciler::new(
        ipcache,
        tunnel,
        LocalNode {
            cluster: config.cluster_name.to_string(),
            node_name: config.node_name.clone(),
            node_ip: config.node_ip,
            routing: config.routing,
            encryption: config.encryption,
        },
        mesh.clone(),
        hub.clone(),
        config.sync_timeout,
        config.trust,
    )?;
    let ctx = clusters::Context {
        mesh,
        hub,
        connector: Arc::new(EtcdConnector),
        local_name: config.cluster_name.clone(),
        local_id: config.cluster_id,
        max_connected: config.max_connected_clusters,
        backoff: (Duration::from_millis(200), Duration::from_secs(30)),
        cluster_config_wait: kvstore::CLUSTER_CONFIG_WAIT,
    };
    let local_source = match &config.etcd {
        EtcdSource::Endpoints(eps) => clusters::EtcdSource::Endpoints(eps.clone()),
        EtcdSource::ConfigFile(path) => clusters::EtcdSource::File(path.clone()),
    };
    let mut cluster_tasks =
        vec![ctx.spawn_cluster(config.cluster_name.clone(), local_source, true)];
    if let Some(dir) = config.clustermesh_config.clone() {
        cluster_tasks.push(tokio::spawn(clusters::watch_config_dir(
            ctx.clone(),
            dir,
            CONFIG_DIR_PERIOD,
        )));
    }
    cluster_tasks.extend(service_tasks);
    // Stopping the agent aborts the cluster tasks (stop keeps datapath state).
    let _abort_clusters: Vec<AbortOnDropHandle<()>> = cluster_tasks
        .into_iter()
        .map(AbortOnDropHandle::new)
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let stop = stopped();
        tasks.spawn(async move {
            reconciler.run(stop).await;
            Ok(())
        });
    }
    {
        let path = config.cni_socket.clone();
        let pods = pods.clone();
        let stop = stopped();
        tasks.spawn(async move {
            crate::cni::server::serve(&path, pods, stop)
                .await
                .with_context(|| format!("CNI socket {}", path.display()))
        });
    }
    {
        let path = config.status_socket.clone();
        let live = live.clone();
        let stop = stopped();
        tasks.spawn(async move {
            status::serve_status(&path, live, stop)
                .await
                .with_context(|| format!("status socket {}", path.display()))
        });
    }
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener {addr}"))?;
        let live = live.clone();
        let stop = stopped();
        tasks.spawn(async move {
            crate::metrics::serve(listener, live, stop).await;
            Ok(())
        });
    }
    info!(
        cluster = %config.cluster_name,
        node = %config.node_name,
        cni_socket = %config.cni_socket.display(),
        status_socket = %config.status_socket.display(),
        "node agent running"
    );
    tokio::select! {
        () = shutdown => info!("shutting down"),
        Some(res) = tasks.join_next() => {
            let _ = stop_tx.send(true);
            return res.context("server task panicked")?;
        }
    }
    let _ = stop_tx.send(true);
    while let Some(res) = tasks.join_next().await {
        res.context("server task panicked")??;
    }
    Ok(())
}

/// Sets up the devices of the routing and encryption mode and attaches the
/// datapath's programs to them:
///
/// * tunnel: the VXLAN device in external mode (stable MAC from cluster and
///   node name), `from_overlay` on it;
/// * WireGuard: the device with the key from the state dir; with native
///   routing `from_l3dev` on it; `rp_filter` off on it (decrypted packets
///   come from addresses routed elsewhere);
/// * native: `from_netdev` on the underlay device (the one holding
///   `--node-ip`), forwarding on.
///
/// Sysctls are written in the node's network namespace only (the agent's
/// threads all live there).
async fn setup_tunnel(
    config: &Config,
    dp: &std::sync::Mutex<PodDatapath>,
) -> anyhow::Result<TunnelState> {
    let attach = |ifname: &str, program: Option<datapath::HostDevice>| {
        let mut dp = dp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = match program {
            None => dp.datapath.attach_from_overlay(ifname),
            Some(kind) => dp.datapath.attach_from_host_device(ifname, kind),
        };
        result.with_context(|| format!("attaching the datapath to {ifname}"))
    };
    let netlink = tunnel::Netlink::connect().context("netlink for the tunnel layer")?;
    if config.routing == Routing::Tunnel {
        let mut vxlan =
            tunnel::VxlanConfig::for_node(&format!("{}/{}", config.cluster_name, config.node_name));
        vxlan.port = config.vxlan_port;
        let outcome = tunnel::ensure_vxlan(&netlink, VXLAN_DEVICE, &vxlan)
            .await
            .with_context(|| format!("VXLAN device {VXLAN_DEVICE}"))?;
        attach(VXLAN_DEVICE, None)?;
        info!(device = VXLAN_DEVICE, ?outcome, "VXLAN device ready");
    }
    let mut wireguard = None;
    if config.encryption == Encryption::Wireguard {
        let key = tunnel::PrivateKey::load_or_generate(&config.state_dir)
            .context("WireGuard private key")?;
        let mut wg_config = tunnel::WireguardConfig::new(WIREGUARD_DEVICE, key);
        wg_config.listen_port = config.wireguard_port;
        let wg = tunnel::WireguardDevice::open(&netlink, wg_config)
            .await
            .with_context(|| format!("WireGuard device {WIREGUARD_DEVICE}"))?;
        info!(device = WIREGUARD_DEVICE, backend = ?wg.backend(), public_key = %wg.public_key(), "WireGuard device ready");
        set_sysctl("net/ipv4/conf/all/rp_filter", "0")?;
        set_sysctl(&format!("net/ipv4/conf/{WIREGUARD_DEVICE}/rp_filter"), "0")?;
        if config.routing == Routing::Native {
            attach(WIREGUARD_DEVICE, Some(datapath::HostDevice::L3))?;
        }
        wireguard = Some(wg);
    }
    if config.routing == Routing::Native {
        let underlay = underlay_device(&netlink, IpAddr::V4(config.node_ip)).await?;
        attach(&underlay, Some(datapath::HostDevice::Ethernet))?;
        set_sysctl("net/ipv4/ip_forward", "1")?;
        set_sysctl("net/ipv4/conf/all/rp_filter", "0")?;
        set_sysctl(&format!("net/ipv4/conf/{underlay}/rp_filter"), "0")?;
        info!(device = %underlay, "native routing on the underlay device");
    }
    let mut params =
        tunnel::routes::TunnelParams::new(WIREGUARD_DEVICE, IpAddr::V4(config.node_ip));
    params.wireguard_port = config.wireguard_port;
    params.vxlan_port = config.vxlan_port;
    Ok(TunnelState {
        netlink,
        wireguard,
        mode: tunnel::routes::RoutingMode {
            routing: config.routing,
            encryption: config.encryption,
        },
        params,
    })
}

/// The device that holds `ip` in this namespace.
async fn underlay_device(netlink: &tunnel::Netlink, ip: IpAddr) -> anyhow::Result<String> {
    use futures::TryStreamExt as _;
    use rtnetlink::packet_route::{address::AddressAttribute, link::LinkAttribute};
    let addrs: Vec<_> = netlink
        .handle()
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing addresses")?;
    let index = addrs
        .iter()
        .find(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip))
        })
        .map(|m| m.header.index)
        .with_context(|| format!("no device in the node namespace holds --node-ip {ip}"))?;
    let link = netlink
        .handle()
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .context("reading the underlay link")?
        .with_context(|| format!("link {index} vanished"))?;
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .with_context(|| format!("link {index} has no name"))
}

/// Writes `/proc/sys/<key>` (of the calling thread's network namespace for
/// `net/` keys).
fn set_sysctl(key: &str, value: &str) -> anyhow::Result<()> {
    let path = std::path::Path::new("/proc/sys").join(key);
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == value => return Ok(()),
        Ok(_) => {}
        Err(e) => warn!(path = %path.display(), error = %e, "reading sysctl"),
    }
    std::fs::write(&path, value).with_context(|| format!("writing {value} to {}", path.display()))
}
