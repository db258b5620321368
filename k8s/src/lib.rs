//! How the mesh's daemons reach the Kubernetes API.
//!
//! The clustermesh-apiserver's Kubernetes source and the node agent on a
//! Kubernetes node both run in a pod (the in-cluster service account) or,
//! for tests and development, with a kubeconfig file; this crate makes the
//! client either way, so the two agree on where the API is and say the
//! same thing when it cannot be reached.
//!
//! ```no_run
//! # async fn f() -> Result<(), mesh_k8s::ClientError> {
//! let client = mesh_k8s::ApiConfig::Kubeconfig("/etc/mesh/kubeconfig".into())
//!     .client()
//!     .await?;
//! # let _ = client; Ok(()) }
//! ```

use std::path::PathBuf;

pub use kube::Client;

/// The Node annotation holding the node's WireGuard public key (base64): the
/// node's agent writes it, the apiserver's Kubernetes source exports it in
/// the node record. Cilium's name.
pub const WIREGUARD_KEY_ANNOTATION: &str = "network.cilium.io/wg-pub-key";

/// Where the Kubernetes API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiConfig {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the token and
    /// CA mounted under `/var/run/secrets/kubernetes.io/serviceaccount`).
    InCluster,
    /// A kubeconfig file, its current context.
    Kubeconfig(PathBuf),
}

impl ApiConfig {
    /// `--kubeconfig` if given, else the in-cluster configuration.
    pub fn from_flag(kubeconfig: Option<PathBuf>) -> Self {
        kubeconfig.map_or(Self::InCluster, Self::Kubeconfig)
    }

    /// A client for this API.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub async fn client(&self) -> Result<Client, ClientError> {
        let config = match self {
            Self::InCluster => kube::Config::incluster().map_err(ClientError::InCluster)?,
            Self::Kubeconfig(path) => {
                let failed = |source| ClientError::Kubeconfig {
                    path: path.clone(),
                    source,
                };
                let file = kube::config::Kubeconfig::read_from(path).map_err(failed)?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(failed)?
            }
        };
        Client::try_from(config).map_err(ClientError::Client)
    }
}

/// Why a Kubernetes client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster configuration (is this running in a pod with a service account?)")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("create the Kubernetes client")]
    Client(#[source] kube::Error),
}
