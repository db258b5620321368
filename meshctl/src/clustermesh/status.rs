//! `meshctl clustermesh status`: the state of the mesh as the node agents see
//! it, aggregated per cluster in the spirit of `cilium clustermesh status`.
//!
//! Each agent serves one JSON document per connection on its status socket,
//! with one entry per cluster it reads (its own and each remote), in Cilium's
//! field names (`name`, `ready`, `connected`, `status`, `num-nodes`, ...).
//! The document types are the agent's own ([`api::agent`]), so
//! writer and reader cannot drift apart.
//! `configured` comes from the agent's config directory (what `connect` wrote),
//! `connected` and `ready` from the agent. A cluster is ready when every node
//! answers, reads exactly the clusters it is configured for, and every one of
//! them is connected and ready (synced).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::agent::AgentStatus;
use serde::Serialize;

use super::config::configured_clusters;
use crate::lab::state::LabState;

/// How long one status socket read may take.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors of status collection.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The socket did not answer.
    #[error("cannot read agent status from {socket}")]
    Socket {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not the expected JSON.
    #[error("agent status from {socket} is not valid status JSON")]
    Json {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// `--wait` reached its deadline.
    #[error("clustermesh not ready after {waited:?}:\n  {}", reasons.join("\n  "))]
    NotReady {
        /// How long we waited.
        waited: Duration,
        /// Why not, one line per problem.
        reasons: Vec<String>,
    },
    /// No such cluster.
    #[error("lab {lab} has no cluster {cluster}")]
    NoCluster {
        /// The lab.
        lab: String,
        /// The cluster.
        cluster: String,
    },
}

/// Reads one agent's status.
///
/// # Errors
///
/// [`StatusError::Socket`] or [`StatusError::Json`].
pub fn read_agent_status(socket: &Path) -> Result<AgentStatus, StatusError> {
    let io = |source| StatusError::Socket {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    stream.set_read_timeout(Some(SOCKET_TIMEOUT)).map_err(io)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(io)?;
    serde_json::from_str(&text).map_err(|source| StatusError::Json {
        socket: socket.to_owned(),
        source,
    })
}

/// One node to ask.
#[derive(Debug, Clone)]
pub struct NodeSource {
    /// Node name.
    pub node: String,
    /// Its status socket.
    pub socket: PathBuf,
    /// Its remote-cluster config directory, when known.
    pub config_dir: Option<PathBuf>,
    /// Where its log is, for hints.
    pub log: Option<PathBuf>,
}

/// Per remote cluster, counted over the local cluster's nodes.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RemoteSummary {
    /// Remote cluster name.
    pub name: String,
    /// Nodes with a config file for it.
    pub configured: usize,
    /// Nodes connected to its etcd.
    pub connected: usize,
    /// Nodes synced with it.
    pub ready: usize,
    /// Its nodes, as the local nodes see them (maximum over nodes).
    pub nodes: u64,
    /// Its endpoints (maximum over nodes).
    pub endpoints: u64,
    /// Its identities (maximum over nodes).
    pub identities: u64,
    /// Its shared services (maximum over nodes).
    pub services: u64,
    /// Records from it dropped by validation (sum over nodes).
    pub rejected: u64,
    /// Connection failures (sum over nodes).
    pub failures: u64,
}

/// One problem, with what to do about it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// Node concerned.
    pub node: String,
    /// What is wrong.
    pub message: String,
    /// What to run or read next.
    pub hint: String,
}

/// The status of one cluster of the mesh.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterMeshStatus {
    /// The cluster.
    pub cluster: String,
    /// Whether everything below is as it should be.
    pub ready: bool,
    /// Nodes of the cluster.
    pub nodes: usize,
    /// Nodes that answered their status socket.
    pub nodes_answering: usize,
    /// Nodes connected to (and synced with) every cluster they are configured for.
    pub nodes_connected_to_all: usize,
    /// Per remote cluster.
    pub remote_clusters: Vec<RemoteSummary>,
    /// Shared services of every cluster the nodes read (maximum over nodes).
    pub global_services: u64,
    /// Records dropped by validation, over all remote clusters and nodes.
    pub rejected: u64,
    /// What is wrong, with hints.
    pub errors: Vec<Problem>,
    /// The raw agent documents, by node.
    pub agents: BTreeMap<String, AgentStatus>,
}

/// Aggregates the status of `cluster` from its nodes. `expected` is the set of
/// remote clusters the nodes should read (from the lab's connections) when known.
pub fn aggregate(
    cluster: &str,
    nodes: &[NodeSource],
    expected: Option<&BTreeSet<String>>,
) -> ClusterMeshStatus {
    let mut remotes: BTreeMap<String, RemoteSummary> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut agents = BTreeMap::new();
    let mut answering = 0;
    let mut connected_to_all = 0;
    let mut global_services = 0;
    let log_hint = |n: &NodeSource| match &n.log {
        Some(log) => format!("read the agent log {}", log.display()),
        None => "read the node agent's log".to_owned(),
    };
    for node in nodes {
        let configured: BTreeSet<String> = node
            .config_dir
            .as_deref()
            .map(|d| configured_clusters(d).into_keys().collect())
            .unwrap_or_default();
        for name in &configured {
            remotes
                .entry(name.clone())
                .or_insert_with(|| RemoteSummary {
                    name: name.clone(),
                    ..RemoteSummary::default()
                })
                .configured += 1;
        }
        if let Some(expected) = expected {
            for missing in expected.difference(&configured) {
                errors.push(Problem {
                    node: node.node.clone(),
                    message: format!("remote cluster {missing} is not configured"),
                    hint: format!(
                        "meshctl clustermesh connect --source {cluster} --destination {missing}"
                    ),
                });
            }
        }
        let status = match read_agent_status(&node.socket) {
            Ok(status) => status,
            Err(e) => {
                errors.push(Problem {
                    node: node.node.clone(),
                    message: format!("agent does not answer: {e}"),
                    hint: format!(
                        "check that the agent runs (meshctl lab status), {}",
                        log_hint(node)
                    ),
                });
                continue;
            }
        };
        answering += 1;
        global_services = global_services.max(status.global_services());
        let mut all_ok = true;
        if status.apiserver_connected == Some(false) {
            all_ok = false;
            errors.push(Problem {
                node: node.node.clone(),
                message: format!("no session with the clustermesh-apiserver of {cluster}"),
                hint: format!(
                    "check that the apiserver of {cluster} runs (meshctl lab status), {}",
                    log_hint(node)
                ),
            });
        }
        if status.reconcile.errors > 0 {
            errors.push(Problem {
                node: node.node.clone(),
                message: format!("{} failed datapath writes", status.reconcile.errors),
                hint: log_hint(node),
            });
        }
        if let Some(wg) = status.reconcile.wireguard.as_ref().filter(|h| !h.healthy) {
            all_ok = false;
            errors.push(Problem {
                node: node.node.clone(),
                message: format!(
                    "the {} WireGuard device does not answer: {}",
                    wg.backend,
                    wg.error.as_deref().unwrap_or("no reason given")
                ),
                hint: format!("encrypted traffic of this node is down; {}", log_hint(node)),
            });
        }
        let mut seen = BTreeSet::new();
        for c in &status.clusters {
            if c.name == cluster {
                if !c.ready {
                    all_ok = false;
                    errors.push(Problem {
                        node: node.node.clone(),
                        message: format!("own cluster {cluster} not ready: {}", c.status),
                        hint: format!(
                            "check etcd of {cluster} (meshctl lab status), {}",
                            log_hint(node)
                        ),
                    });
                }
                continue;
            }
            seen.insert(c.name.clone());
            let entry = remotes
                .entry(c.name.clone())
                .or_insert_with(|| RemoteSummary {
                    name: c.name.clone(),
                    ..RemoteSummary::default()
                });
            entry.connected += usize::from(c.connected);
            entry.ready += usize::from(c.ready);
            entry.nodes = entry.nodes.max(c.num_nodes);
            entry.endpoints = entry.endpoints.max(c.num_endpoints);
            entry.identities = entry.identities.max(c.num_identities);
            entry.services = entry.services.max(c.num_shared_services);
            entry.rejected += c.rejected.values().sum::<u64>() + c.not_owned.values().sum::<u64>();
            entry.failures += c.num_failures;
            if !c.ready {
                all_ok = false;
                let state = if c.connected {
                    "connected but not synced"
                } else {
                    "not connected"
                };
                errors.push(Problem {
                    node: node.node.clone(),
                    message: format!("remote cluster {} {state}: {}", c.name, c.status),
                    hint: format!(
                        "check that etcd of {} runs and is reachable from {} (meshctl lab status), {}",
                        c.name,
                        node.node,
                        log_hint(node)
                    ),
                });
            }
            if node.config_dir.is_some() && !configured.contains(&c.name) {
                all_ok = false;
                errors.push(Problem {
                    node: node.node.clone(),
                    message: format!(
                        "still reads remote cluster {} that is no longer configured",
                        c.name
                    ),
                    hint: format!("wait for the agent to drop it, or {}", log_hint(node)),
                });
            }
        }
        for missing in configured.difference(&seen) {
            all_ok = false;
            errors.push(Problem {
                node: node.node.clone(),
                message: format!(
                    "remote cluster {missing} is configured but the agent does not report it"
                ),
                hint: format!(
                    "the agent may not have read its config directory yet; {}",
                    log_hint(node)
                ),
            });
        }
        if all_ok {
            connected_to_all += 1;
        }
        agents.insert(node.node.clone(), status);
    }
    let rejected = remotes.values().map(|r| r.rejected).sum();
    ClusterMeshStatus {
        cluster: cluster.to_owned(),
        ready: errors.is_empty() && answering == nodes.len(),
        nodes: nodes.len(),
        nodes_answering: answering,
        nodes_connected_to_all: connected_to_all,
        remote_clusters: remotes.into_values().collect(),
        global_services,
        rejected,
        errors,
        agents,
    }
}

/// The status of every cluster of a lab (or only `cluster`).
///
/// # Errors
///
/// [`StatusError::NoCluster`].
pub fn lab_status(
    lab: &LabState,
    cluster: Option<&str>,
) -> Result<Vec<ClusterMeshStatus>, StatusError> {
    if let Some(name) = cluster {
        if lab.cluster(name).is_none() {
            return Err(StatusError::NoCluster {
                lab: lab.name.clone(),
                cluster: name.to_owned(),
            });
        }
    }
    Ok(lab
        .clusters
        .iter()
        .filter(|c| cluster.is_none_or(|name| c.name == name))
        .map(|c| {
            let expected: BTreeSet<String> = lab
                .connections
                .iter()
                .filter(|conn| conn.source == c.name)
                .map(|conn| conn.destination.clone())
                .collect();
            let nodes: Vec<NodeSource> = c
                .nodes
                .iter()
                .map(|n| NodeSource {
                    node: n.name.clone(),
                    socket: n.status_socket.clone(),
                    config_dir: Some(n.clustermesh_dir.clone()),
                    log: lab
                        .processes
                        .iter()
                        .find(|p| p.member.as_deref() == Some(n.name.as_str()))
                        .map(|p| p.log.clone()),
                })
                .collect();
            aggregate(&c.name, &nodes, Some(&expected))
        })
        .collect())
}

/// Polls [`lab_status`] until every selected cluster is ready.
///
/// # Errors
///
/// [`StatusError::NotReady`] with every problem at the deadline.
pub fn wait_ready(
    lab: &LabState,
    cluster: Option<&str>,
    timeout: Duration,
) -> Result<Vec<ClusterMeshStatus>, StatusError> {
    let started = Instant::now();
    loop {
        let statuses = lab_status(lab, cluster)?;
        if statuses.iter().all(|s| s.ready) {
            return Ok(statuses);
        }
        if started.elapsed() >= timeout {
            return Err(StatusError::NotReady {
                waited: timeout,
                reasons: statuses
                    .iter()
                    .flat_map(|s| {
                        s.errors.iter().map(move |p| {
                            format!("{}/{}: {} (hint: {})", s.cluster, p.node, p.message, p.hint)
                        })
                    })
                    .collect(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Renders statuses for a terminal, like `cilium clustermesh status`.
pub fn render(statuses: &[ClusterMeshStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for s in statuses {
        let mark = if s.ready { "✅" } else { "❌" };
        let _ = writeln!(out, "{mark} Cluster {}", s.cluster);
        let _ = writeln!(
            out,
            "   {}/{} nodes answering, {}/{} nodes connected to all clusters",
            s.nodes_answering, s.nodes, s.nodes_connected_to_all, s.nodes
        );
        for r in &s.remote_clusters {
            let rmark = if r.ready == s.nodes && r.configured == s.nodes {
                "✅"
            } else {
                "❌"
            };
            let _ = writeln!(
                out,
                "   {rmark} {}: {}/{} configured, {}/{} connected, {}/{} ready; {} nodes, {} endpoints, {} identities, {} services, {} rejected, {} failures",
                r.name, r.configured, s.nodes, r.connected, s.nodes, r.ready, s.nodes,
                r.nodes, r.endpoints, r.identities, r.services, r.rejected, r.failures
            );
        }
        let _ = writeln!(
            out,
            "   global services: {}, rejected records: {}",
            s.global_services, s.rejected
        );
        for p in &s.errors {
            let _ = writeln!(out, "   ⚠ {}: {}\n     hint: {}", p.node, p.message, p.hint);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Serves `doc` once per connection on a real Unix socket, as an agent does.
    fn serve(dir: &Path, name: &str, doc: serde_json::Value) -> PathBuf {
        let path = dir.join(name);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = std::io::Write::write_all(&mut stream, doc.to_string().as_bytes());
            }
        });
        path
    }

    fn remote(name: &str, ready: bool) -> serde_json::Value {
        serde_json::json!({"name": name, "ready": ready, "connected": ready,
            "status": if ready { "synced" } else { "dial tcp: connection refused" },
            "num-nodes": 2, "num-endpoints": 3, "num-identities": 1, "num-shared-services": 1,
            "rejected": {"cluster-mismatch": 1}})
    }

    #[test]
    fn aggregates_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg");
        std::fs::create_dir(&cfg).unwrap();
        std::fs::write(cfg.join("c2"), "endpoints: [https://x:1]\n").unwrap();
        let n1 = serve(
            dir.path(),
            "n1.sock",
            serde_json::json!({"node-name": "n1", "cluster-name": "c1", "apiserver-connected": true,
            "clusters": [remote("c1", true), remote("c2", true)]}),
        );
        let n2 = serve(
            dir.path(),
            "n2.sock",
            serde_json::json!({"node-name": "n2",
            "clusters": [remote("c1", true), remote("c2", false)]}),
        );
        let source = |node: &str, socket: &Path| NodeSource {
            node: node.into(),
            socket: socket.to_owned(),
            config_dir: Some(cfg.clone()),
            log: None,
        };
        let expected = BTreeSet::from(["c2".to_owned()]);
        let s = aggregate(
            "c1",
            &[source("n1", &n1), source("n2", &n2)],
            Some(&expected),
        );
        assert!(!s.ready);
        assert_eq!(s.nodes_answering, 2);
        assert_eq!(s.nodes_connected_to_all, 1);
        assert_eq!(
            s.remote_clusters,
            [RemoteSummary {
                name: "c2".into(),
                configured: 2,
                connected: 1,
                ready: 1,
                nodes: 2,
                endpoints: 3,
                identities: 1,
                services: 1,
                rejected: 2,
                failures: 0
            }]
        );
        assert_eq!(s.global_services, 2);
        assert_eq!(s.agents["n1"].node_name, "n1");
        assert_eq!(s.errors.len(), 1);
        assert!(
            s.errors[0].message.contains("c2 not connected: dial tcp"),
            "{:?}",
            s.errors
        );

        let s = aggregate("c1", &[source("n1", &n1)], Some(&expected));
        assert!(s.ready, "{:?}", s.errors);

        // A node that does not answer, and a missing configuration.
        let gone = dir.path().join("gone.sock");
        let expected = BTreeSet::from(["c2".to_owned(), "c3".to_owned()]);
        let s = aggregate(
            "c1",
            &[source("n1", &n1), source("n3", &gone)],
            Some(&expected),
        );
        assert!(!s.ready);
        assert_eq!(s.nodes_answering, 1);
        let text = render(&[s]);
        assert!(
            text.contains("remote cluster c3 is not configured"),
            "{text}"
        );
        assert!(
            text.contains("meshctl clustermesh connect --source c1 --destination c3"),
            "{text}"
        );
        assert!(text.contains("n3: agent does not answer"), "{text}");
    }
}
