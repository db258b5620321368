//! Joining lab clusters: installing (and removing) the remote-cluster
//! configs in the agents of a cluster, after the clash checks.

use crate::clustermesh::config::{self, ClusterFacts};

use super::daemons::etcd_config_for;
use super::state::{ClusterState, Connection, LabState};
use super::LabError;

/// Finds a lab cluster by name.
///
/// # Errors
///
/// [`LabError::NoCluster`].
pub fn find_cluster<'a>(lab: &'a LabState, name: &str) -> Result<&'a ClusterState, LabError> {
    lab.cluster(name).ok_or_else(|| LabError::NoCluster {
        lab: lab.name.clone(),
        cluster: name.to_owned(),
        have: lab
            .clusters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The (source, destination) pairs to act on: `source → destination`, and
/// back when `both`.
fn directions(
    lab: &LabState,
    source: &str,
    destination: &str,
    both: bool,
) -> Result<Vec<(ClusterState, ClusterState)>, LabError> {
    let a = find_cluster(lab, source)?.clone();
    let b = find_cluster(lab, destination)?.clone();
    let mut directions = vec![(a.clone(), b.clone())];
    if both {
        directions.push((b, a));
    }
    Ok(directions)
}

/// What `connect` knows about a lab cluster.
pub fn cluster_facts(lab: &LabState, cluster: &ClusterState) -> ClusterFacts {
    ClusterFacts {
        origin: format!("lab {} cluster {}", lab.name, cluster.name),
        name: cluster.name.clone(),
        id: u32::from(cluster.id),
        pod_cidrs: vec![cluster.pod_cidr.into()],
    }
}

/// Connects lab clusters: the agents of `source` read `destination`'s etcd,
/// and (when `both`) the other way round. Each direction writes the
/// destination's config and a client certificate issued by the destination's
/// CA into every source agent's `--clustermesh-config` directory.
///
/// # Errors
///
/// [`LabError::NoCluster`], the clash errors of
/// [`config::check_compatible`], or I/O errors.
pub fn connect(
    lab: &mut LabState,
    source: &str,
    destination: &str,
    both: bool,
) -> Result<(), LabError> {
    let directions = directions(lab, source, destination, both)?;
    let (a, b) = &directions[0];
    config::check_compatible(&cluster_facts(lab, a), &cluster_facts(lab, b))?;
    for (src, dst) in directions {
        let config = etcd_config_for(lab, &dst, &src.name)?;
        for node in &src.nodes {
            config.install(&node.clustermesh_dir, &dst.name)?;
        }
        let conn = Connection {
            source: src.name.clone(),
            destination: dst.name.clone(),
        };
        if !lab.connections.contains(&conn) {
            lab.connections.push(conn);
        }
    }
    lab.save()?;
    Ok(())
}

/// Removes what [`connect`] wrote (both directions unless `unidirectional`).
///
/// # Errors
///
/// [`LabError::NoCluster`] or I/O errors.
pub fn disconnect(
    lab: &mut LabState,
    source: &str,
    destination: &str,
    both: bool,
) -> Result<(), LabError> {
    for (src, dst) in directions(lab, source, destination, both)? {
        for node in &src.nodes {
            config::uninstall(&node.clustermesh_dir, &dst.name)?;
        }
        lab.connections
            .retain(|c| !(c.source == src.name && c.destination == dst.name));
    }
    lab.save()?;
    Ok(())
}
