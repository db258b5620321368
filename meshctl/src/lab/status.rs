//! `lab status`: the lab's clusters, nodes, pods, connections and processes.

use std::path::PathBuf;

use serde::Serialize;

use super::state::{ClusterState, Connection, Encryption, LabState, Role, Routing};
use super::supervise;

/// What `lab status` shows.
#[derive(Debug, Serialize)]
pub struct LabStatus {
    /// Lab name.
    pub name: String,
    /// Lab directory.
    pub dir: PathBuf,
    /// Routing mode.
    pub routing: Routing,
    /// Encryption mode.
    pub encryption: Encryption,
    /// Clusters and nodes.
    pub clusters: Vec<ClusterState>,
    /// Pods.
    pub pods: Vec<super::state::PodRecord>,
    /// Connections.
    pub connections: Vec<Connection>,
    /// Processes with their health.
    pub processes: Vec<ProcessStatus>,
}

/// One process in `lab status`.
#[derive(Debug, Serialize)]
pub struct ProcessStatus {
    /// What it is.
    pub role: Role,
    /// Its cluster.
    pub cluster: String,
    /// Its node or pod.
    pub member: Option<String>,
    /// PID.
    pub pid: i32,
    /// Whether it runs.
    pub running: bool,
    /// Its log.
    pub log: PathBuf,
}

/// The status of a lab.
pub fn status(lab: &LabState) -> LabStatus {
    LabStatus {
        name: lab.name.clone(),
        dir: lab.dir.clone(),
        routing: lab.routing,
        encryption: lab.encryption,
        clusters: lab.clusters.clone(),
        pods: lab.pods.clone(),
        connections: lab.connections.clone(),
        processes: lab
            .processes
            .iter()
            .map(|p| ProcessStatus {
                role: p.role,
                cluster: p.cluster.clone(),
                member: p.member.clone(),
                pid: p.pid,
                running: supervise::is_running(p),
                log: p.log.clone(),
            })
            .collect(),
    }
}
