//! The lab's state file, `<lab dir>/state.json`: what the lab is (clusters,
//! nodes, addresses, options) and what it started (processes with their PID
//! and start time, pods, connections).
//!
//! The file is the lab's memory between `meshctl` invocations. Clean-up does
//! not trust it alone: a lab that crashed half-way may have made objects it
//! never recorded, so `lab down` also discovers namespaces by name and
//! processes by namespace (see `lab::down`). The file is written atomically
//! (write to a temporary file, then rename) so a crash never leaves half a file.

use crate::file::FileError;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// File name of the state file inside the lab directory.
pub const STATE_FILE: &str = "state.json";

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] crate::file::FileError),
    /// The file is not a lab state.
    #[error("lab state file {path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// There is no lab of this name.
    #[error("there is no lab named {name} (no {path}); run `meshctl lab up --name {name}`")]
    NoLab {
        /// The lab name.
        name: String,
        /// The state file looked for.
        path: PathBuf,
    },
}

pub use api::{Encryption, Routing};

/// The whole lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Lab name (prefix of every namespace).
    pub name: String,
    /// Lab directory.
    pub dir: PathBuf,
    /// Routing mode of every agent.
    pub routing: Routing,
    /// Encryption mode of every agent.
    pub encryption: Encryption,
    /// The clusters.
    pub clusters: Vec<ClusterState>,
    /// Every process the lab started.
    #[serde(default)]
    pub processes: Vec<ProcessRecord>,
    /// Every pod.
    #[serde(default)]
    pub pods: Vec<PodRecord>,
    /// Directed connections: `source` reads `destination`.
    #[serde(default)]
    pub connections: Vec<Connection>,
}

/// One cluster of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// Cluster name (`c<N>`).
    pub name: String,
    /// Cluster ID (`N`).
    pub id: u8,
    /// Control namespace (etcd, apiserver).
    pub control_netns: String,
    /// Underlay IP of the control namespace.
    pub control_ip: Ipv4Addr,
    /// The cluster's pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// The nodes.
    pub nodes: Vec<NodeState>,
}

/// One node of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    /// Node name (unique in the lab).
    pub name: String,
    /// Node number within the cluster.
    pub number: u8,
    /// The node's namespace.
    pub netns: String,
    /// Underlay IP.
    pub ip: Ipv4Addr,
    /// Pod CIDR of this node.
    pub pod_cidr: Ipv4Net,
    /// The agent's remote-cluster config directory.
    pub clustermesh_dir: PathBuf,
    /// The agent's status socket.
    pub status_socket: PathBuf,
    /// The agent's CNI socket.
    pub cni_socket: PathBuf,
    /// The bpffs mounted for this node's agent.
    pub bpffs: PathBuf,
    /// The agent's state directory.
    pub state_dir: PathBuf,
}

/// What a lab process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A cluster's etcd.
    Etcd,
    /// A cluster's clustermesh-apiserver.
    Apiserver,
    /// A node agent.
    Agent,
    /// An echo server in a pod.
    Echo,
}

/// One process the lab started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// What it is.
    pub role: Role,
    /// Its cluster.
    pub cluster: String,
    /// Its node or pod, where it has one.
    pub member: Option<String>,
    /// PID.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22), so a
    /// recycled PID is never mistaken for it.
    pub start_time: u64,
    /// Its log file.
    pub log: PathBuf,
    /// The command line, for the record.
    pub command: Vec<String>,
}

/// One pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    /// Cluster name.
    pub cluster: String,
    /// Node name.
    pub node: String,
    /// Pod name (unique in its cluster).
    pub name: String,
    /// The pod's namespace.
    pub netns: String,
    /// The CNI container ID.
    pub container_id: String,
    /// The address the CNI plugin gave it.
    pub ip: Option<Ipv4Addr>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A directed connection: the agents of `source` read `destination`'s etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// The reading cluster.
    pub source: String,
    /// The cluster read.
    pub destination: String,
}

impl LabState {
    /// Reads the state of the lab in `dir`.
    ///
    /// # Errors
    ///
    /// [`StateError::NoLab`] when there is none, otherwise I/O or parse errors.
    pub fn load(name: &str, dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NoLab {
                    name: name.to_owned(),
                    path,
                });
            }
            Err(source) => {
                return Err(FileError {
                    action: "read",
                    path,
                    source,
                }
                .into())
            }
        };
        serde_json::from_str(&text).map_err(|source| StateError::Corrupt { path, source })
    }

    /// Adds a started process and writes the state at once, so that if
    /// `meshctl` dies right after, `lab down` still finds and stops it.
    ///
    /// # Errors
    ///
    /// [`StateError::Io`].
    pub fn record_process(&mut self, record: ProcessRecord) -> Result<(), StateError> {
        self.processes.push(record);
        self.save()
    }

    /// Writes the state atomically.
    ///
    /// # Errors
    ///
    /// [`StateError::Io`].
    pub fn save(&self) -> Result<(), StateError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let io = FileError::at("write", &path);
        let text = serde_json::to_string_pretty(self).expect("lab state serializes");
        std::fs::write(&tmp, text).map_err(io)?;
        Ok(std::fs::rename(&tmp, &path).map_err(io)?)
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&ClusterState> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The pod `name` of cluster `cluster`.
    pub fn pod(&self, cluster: &str, name: &str) -> Option<&PodRecord> {
        self.pods
            .iter()
            .find(|p| p.cluster == cluster && p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = LabState::load("x", dir.path()).unwrap_err();
        assert!(matches!(missing, StateError::NoLab { .. }), "{missing}");
        let state = LabState {
            name: "x".into(),
            dir: dir.path().to_owned(),
            routing: Routing::Native,
            encryption: Encryption::Wireguard,
            clusters: vec![],
            processes: vec![],
            pods: vec![],
            connections: vec![Connection {
                source: "c1".into(),
                destination: "c2".into(),
            }],
        };
        state.save().unwrap();
        let back = LabState::load("x", dir.path()).unwrap();
        assert_eq!(back.routing, Routing::Native);
        assert_eq!(back.connections, state.connections);
        std::fs::write(dir.path().join(STATE_FILE), "{").unwrap();
        assert!(matches!(
            LabState::load("x", dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }
}
