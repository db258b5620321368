//! The agent's entry point: wires configuration, datapath, pod networking,
//! the apiserver session, and the status and metrics servers, and runs them
//! until shutdown.

use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::info;

use crate::{
    config::Config,
    netlink::Netlink,
    pod::{PodDatapath, PodManager},
    registry::Registry,
    status::{self, AgentStatus, StatusHub, StatusSource},
};

/// Snapshot source backed by the live components.
#[derive(Debug)]
pub struct LiveStatus {
    config: Config,
    hub: Arc<StatusHub>,
    pods: Arc<PodManager>,
    registry: Option<Registry>,
}

impl StatusSource for LiveStatus {
    async fn snapshot(&self) -> AgentStatus {
        AgentStatus {
            cluster_name: self.config.cluster_name.clone(),
            cluster_id: self.config.cluster_id,
            node_name: self.config.node_name.clone(),
            routing: format!("{:?}", self.config.routing).to_lowercase(),
            encryption: format!("{:?}", self.config.encryption).to_lowercase(),
            apiserver_connected: self.registry.as_ref().map(|r| r.status().connected),
            local_endpoints: self.pods.count().await as u64,
            clusters: self.hub.clusters(),
            reconcile: self.hub.reconcile(),
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
    let registry = config.apiserver.clone().map(|url| {
        let node = mesh_proto::v1::Node {
            name: config.node_name.clone(),
            internal_ips: vec![config.node_ip.to_string()],
            cilium_internal_ips: vec![crate::ipam::first_host(config.pod_cidr).to_string()],
            pod_cidrs: vec![config.pod_cidr.to_string()],
            wireguard_public_key: String::new(),
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
    let live = Arc::new(LiveStatus {
        config: config.clone(),
        hub,
        pods: pods.clone(),
        registry,
    });
    let mut tasks = tokio::task::JoinSet::new();
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
            status::serve_metrics(listener, live, stop)
                .await
                .context("metrics")
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
