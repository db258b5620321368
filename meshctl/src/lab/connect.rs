//! Joining lab clusters: installing (and removing) the remote-cluster
//! configs in the agents of a cluster, after the clash checks.

use crate::clustermesh::config::{self, ClusterFacts};

use kvstore::auth;

use super::daemons::{etcd_admin, etcd_config_for};
use super::state::{ClusterState, Connection, LabState};
use super::{LabError, Layout};

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
/// and (when `both`) the other way round. Each direction creates the
/// read-only user `remote-<source>` in the destination's etcd and writes
/// the destination's config with a client certificate of that name, issued
/// by the destination's CA, into every source agent's
/// `--clustermesh-config` directory.
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
        // The source reads as its own user, which the destination creates.
        let reader = auth::remote_reader(&src.name);
        let pki = Layout::new(&lab.dir).pki(&dst.name);
        etcd_admin(&dst, &pki).add_reader(&reader)?;
        let config = etcd_config_for(lab, &dst, &reader)?;
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

/// Removes what [`connect`] wrote (both directions unless `unidirectional`)
/// and revokes the source's user in the destination's etcd, so the
/// certificate it was given no longer authenticates.
///
/// # Errors
///
/// [`LabError::NoCluster`], I/O errors, or [`LabError::Access`].
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
        let pki = Layout::new(&lab.dir).pki(&dst.name);
        etcd_admin(&dst, &pki).revoke(&auth::remote_reader(&src.name))?;
        lab.connections
            .retain(|c| !(c.source == src.name && c.destination == dst.name));
    }
    lab.save()?;
    Ok(())
}

/// Adds the read-only user `user` to lab cluster `cluster`'s etcd.
///
/// # Errors
///
/// [`LabError::NoCluster`] or [`LabError::Access`].
pub fn add_reader(lab: &LabState, cluster: &str, user: &str) -> Result<(), LabError> {
    let c = find_cluster(lab, cluster)?;
    let pki = Layout::new(&lab.dir).pki(cluster);
    Ok(etcd_admin(c, &pki).add_reader(user)?)
}

/// Deletes the user `user` from lab cluster `cluster`'s etcd; `Ok(false)`
/// when there was none.
///
/// # Errors
///
/// [`LabError::NoCluster`] or [`LabError::Access`].
pub fn revoke_reader(lab: &LabState, cluster: &str, user: &str) -> Result<bool, LabError> {
    let c = find_cluster(lab, cluster)?;
    let pki = Layout::new(&lab.dir).pki(cluster);
    Ok(etcd_admin(c, &pki).revoke(user)?)
}
