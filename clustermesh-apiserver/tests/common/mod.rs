//! What the apiserver's integration tests share: a config reading a real
//! etcd, and a served apiserver with its gRPC client that stops within a
//! deadline.

#![allow(dead_code, reason = "each test binary uses a part")]

use std::{net::SocketAddr, time::Duration};

use clustermesh_apiserver::{config::Config, Server};
use kvstore::SyncStoreConfig;
use mesh_proto::v1::registry_client::RegistryClient;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub(crate) const DEADLINE: Duration = Duration::from_secs(15);

/// The config of cluster `c1` with ID `id`, reading `etcd` in plain text.
pub(crate) fn config(etcd: &testkit::EtcdServer, id: u16) -> Config {
    let etcd_config =
        kvstore::EtcdConfig::from_endpoints([etcd.endpoint()], &kvstore::TlsPaths::default())
            .expect("the test etcd's endpoint is valid");
    Config::new(
        "c1".parse().expect("valid cluster name"),
        api::ClusterId::new(id, api::MaxConnectedClusters::Max255).expect("valid cluster ID"),
        etcd_config,
    )
}

/// An apiserver serving in a task of this runtime.
pub(crate) struct Served {
    pub(crate) client: RegistryClient<Channel>,
    pub(crate) health: Option<SocketAddr>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Served {
    /// Starts an apiserver and waits until its gRPC port accepts a client.
    pub(crate) async fn start(config: Config, stores: SyncStoreConfig) -> Self {
        let server = Server::start_with(config, stores)
            .await
            .unwrap_or_else(|e| panic!("apiserver start: {e:#}"));
        let addr = server.grpc_addr();
        let health = server.health_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .expect("apiserver serves until stopped");
        });
        let client = testkit::wait_for(DEADLINE, "apiserver gRPC to accept", || async move {
            RegistryClient::connect(format!("http://{addr}")).await.ok()
        })
        .await;
        Self {
            client,
            health,
            stop,
            task,
        }
    }

    /// Stops the apiserver and waits until it has (within [`DEADLINE`]).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("apiserver to stop within the deadline")
            .expect("apiserver task not to panic");
    }
}
