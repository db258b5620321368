//! The agent on a Kubernetes node (`--source kubernetes`): the apiserver
//! reads nodes and pods from the Kubernetes API, so the agent registers
//! nothing; without `--pod-cidr` it reads its pod CIDR from its own Node
//! object (`spec.podCIDRs`, allocated by the controller manager), before
//! the agent starts.

use std::{path::Path, time::Duration};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tracing::info;

/// Why the node's pod CIDR could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NodeCidrError {
    #[error(transparent)]
    Client(#[from] mesh_k8s::ClientError),
    #[error("read Node {node:?}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("Node {node:?} has no IPv4 pod CIDR in spec.podCIDRs after {waited:?} (is the controller manager allocating node CIDRs?); pass --pod-cidr instead")]
    NoCidr { node: String, waited: Duration },
}

/// The node's IPv4 pod CIDR from `spec.podCIDRs` (or the older
/// `spec.podCIDR`); the agent's IPAM takes one IPv4 range.
pub fn ipv4_pod_cidr(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .filter_map(|c| c.parse::<IpNet>().ok())
        .find_map(|c| match c {
            IpNet::V4(net) => Some(net.trunc()),
            IpNet::V6(_) => None,
        })
}

/// Reads node `name`'s IPv4 pod CIDR, waiting up to `wait` for the
/// controller manager to allocate one to a node that registered just now.
///
/// # Errors
///
/// See [`NodeCidrError`]; a Node that does not exist is an error at once.
pub async fn node_pod_cidr(
    kubeconfig: Option<&Path>,
    name: &str,
    wait: Duration,
) -> Result<Ipv4Net, NodeCidrError> {
    let api = mesh_k8s::ApiConfig::from_flag(kubeconfig.map(Path::to_owned));
    let nodes: Api<Node> = Api::all(api.client().await?);
    let started = tokio::time::Instant::now();
    loop {
        let node = nodes.get(name).await.map_err(|source| NodeCidrError::Get {
            node: name.to_owned(),
            source,
        })?;
        if let Some(cidr) = ipv4_pod_cidr(&node) {
            info!(node = name, %cidr, "pod CIDR read from the Node object");
            return Ok(cidr);
        }
        if started.elapsed() >= wait {
            return Err(NodeCidrError::NoCidr {
                node: name.to_owned(),
                waited: wait,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub use mesh_k8s::WIREGUARD_KEY_ANNOTATION;

/// Annotates node `name` with its WireGuard public `key` (base64), retrying
/// with backoff until the API server takes it: remote nodes encrypt to this
/// node only once they know the key.
pub async fn publish_wireguard_key(api: &mesh_k8s::ApiConfig, name: &str, key: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {WIREGUARD_KEY_ANNOTATION: key}}});
    let mut backoff =
        kvstore::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let result = match api.client().await {
            Err(e) => Err(kvstore::error_chain(&e)),
            Ok(client) => Api::<Node>::all(client)
                .patch(
                    name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .map(drop)
                .map_err(|e| kvstore::error_chain(&e)),
        };
        match result {
            Ok(()) => {
                info!(node = name, "WireGuard public key published on the Node");
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(node = name, %error, retry_in = ?delay, "publishing the WireGuard key on the Node failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(spec: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn the_first_ipv4_cidr_of_a_dual_stack_node() {
        let dual = node(serde_json::json!({"podCIDR": "fd00:10:1:1::/64",
            "podCIDRs": ["fd00:10:1:1::/64", "10.1.1.0/24"]}));
        assert_eq!(ipv4_pod_cidr(&dual), Some("10.1.1.0/24".parse().unwrap()));
        let old = node(serde_json::json!({"podCIDR": "10.1.2.0/24"}));
        assert_eq!(ipv4_pod_cidr(&old), Some("10.1.2.0/24".parse().unwrap()));
        let v6 = node(serde_json::json!({"podCIDRs": ["fd00:10:1:1::/64"]}));
        assert_eq!(ipv4_pod_cidr(&v6), None);
        assert_eq!(ipv4_pod_cidr(&node(serde_json::json!({}))), None);
    }

    #[tokio::test]
    async fn read_from_the_api_and_waited_for() {
        let api = testkit::FakeApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let missing = node_pod_cidr(Some(&kubeconfig), "worker-1", Duration::ZERO).await;
        assert!(
            matches!(missing, Err(NodeCidrError::Get { .. })),
            "{missing:?}"
        );
        api.apply(
            serde_json::json!({"kind": "Node", "metadata": {"name": "worker-1"}, "spec": {}}),
        );
        let none = node_pod_cidr(Some(&kubeconfig), "worker-1", Duration::ZERO)
            .await
            .unwrap_err();
        assert!(none.to_string().contains("no IPv4 pod CIDR"), "{none}");
        // Allocated while the agent waits: once it has read the Node
        // without a CIDR at least once more.
        let reads = || {
            api.requests()
                .iter()
                .filter(|r| r.starts_with("GET /api/v1/nodes/worker-1"))
                .count()
        };
        let before = reads();
        let allocate = async {
            testkit::wait_until(
                Duration::from_secs(10),
                "the agent to read the Node again",
                || async { reads() > before },
            )
            .await;
            api.apply(
                serde_json::json!({"kind": "Node", "metadata": {"name": "worker-1"},
                "spec": {"podCIDRs": ["10.1.1.0/24", "fd00:10:1:1::/64"]}}),
            );
        };
        let (cidr, ()) = tokio::join!(
            node_pod_cidr(Some(&kubeconfig), "worker-1", Duration::from_secs(10)),
            allocate
        );
        assert_eq!(cidr.unwrap(), "10.1.1.0/24".parse::<Ipv4Net>().unwrap());
    }

    #[tokio::test]
    async fn the_wireguard_key_is_annotated_on_the_node_once_it_exists() {
        let api = testkit::FakeApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let config = mesh_k8s::ApiConfig::Kubeconfig(kubeconfig);
        let key = "6Jx1Zt8zKxBQ0sZbV5hQp8g2kXzGJwGm1Hk9bE3tV0o=";
        let node = || api.get("Node", "", "worker-1");
        // The Node is registered while the agent retries.
        let register = async {
            testkit::wait_until(Duration::from_secs(10), "a refused patch", || async {
                api.requests()
                    .iter()
                    .any(|r| r.starts_with("PATCH /api/v1/nodes/worker-1"))
            })
            .await;
            api.apply(
                serde_json::json!({"kind": "Node", "metadata": {"name": "worker-1",
                "annotations": {"kept": "yes"}}}),
            );
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(publish_wireguard_key(&config, "worker-1", key), register)
        })
        .await
        .expect("the key to be published");
        let annotations = &node().expect("the node")["metadata"]["annotations"];
        assert_eq!(annotations[WIREGUARD_KEY_ANNOTATION], key);
        assert_eq!(
            annotations["kept"], "yes",
            "a merge patch keeps other annotations"
        );
    }
}
