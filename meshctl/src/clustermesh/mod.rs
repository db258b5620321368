//! `meshctl clustermesh`: joining clusters and showing the state of the mesh.
//!
//! * [`access`]: the users and roles of a cluster's etcd (least privilege).
//! * [`config`]: Cilium-format remote-cluster config files and the clash
//!   checks (`connect` refuses duplicate names, IDs and overlapping pod CIDRs).
//! * [`external`]: reads an external cluster's name, ID and pod CIDRs from its
//!   etcd, for `connect --destination-config`.
//! * [`status`]: aggregates the node agents' status sockets.

pub mod access;
pub mod config;
pub mod external;
pub mod status;

use std::path::Path;

use crate::lab::state::{Connection, LabState};
use crate::lab::{cluster_facts, find_cluster, LabError};
use config::EtcdConfig;

/// Errors of connecting to an external cluster.
#[derive(Debug, thiserror::Error)]
pub enum ExternalConnectError {
    /// The lab side.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The config file.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Reading the external cluster.
    #[error(transparent)]
    External(#[from] external::ExternalError),
}

/// Connects lab cluster `source` to the external cluster behind the
/// Cilium-style etcd config `file`: reads the external cluster's name, ID and
/// pod CIDRs from its etcd (from inside `source`'s control namespace, where
/// the lab's agents reach it from too: lab addresses exist only inside the
/// lab), refuses a clash with any lab cluster, then installs
/// the config into every node agent of `source`. Returns the external
/// cluster's name. (The other direction is the external cluster's to set up,
/// with a config from `meshctl clustermesh export`.)
///
/// # Errors
///
/// [`ExternalConnectError`].
pub fn connect_external(
    lab: &mut LabState,
    source: &str,
    file: &Path,
    name: Option<&str>,
) -> Result<String, ExternalConnectError> {
    let src = find_cluster(lab, source)?.clone();
    let etcd = EtcdConfig::load(file)?;
    let facts = external::read_facts(file, name, Some(&src.control_netns))?;
    for cluster in &lab.clusters {
        config::check_compatible(&cluster_facts(lab, cluster), &facts)?;
    }
    for node in &src.nodes {
        etcd.install(&node.clustermesh_dir, &facts.name)?;
    }
    let conn = Connection {
        source: src.name.clone(),
        destination: facts.name.clone(),
    };
    if !lab.connections.contains(&conn) {
        lab.connections.push(conn);
    }
    lab.save().map_err(LabError::from)?;
    Ok(facts.name)
}
