//! `lab up`: plan the lab's state, then build it step by step, recording
//! each step before the next; running it twice is harmless.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::progress::Progress;

use super::connect::connect;
use super::daemons::{enable_cluster, start_agent, start_apiserver};
use super::down::down;
use super::ip;
use super::state::{ClusterState, Encryption, LabState, NodeState, Routing};
use super::supervise;
use super::topology::{create_cluster_netns, create_underlay};
use super::{lab_dir, Binaries, LabError, Layout};
use super::{plan, pod};
use crate::file::FileError;

/// Options of `lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Lab name.
    pub name: String,
    /// Parent of lab directories.
    pub root: PathBuf,
    /// Number of clusters.
    pub clusters: u8,
    /// Nodes per cluster.
    pub nodes: u8,
    /// Routing mode.
    pub routing: Routing,
    /// Encryption mode.
    pub encryption: Encryption,
    /// Whether to connect all clusters to each other.
    pub connect: bool,
    /// How long to wait for `clustermesh status` to be ready at the end
    /// (`None`: do not wait).
    pub wait: Option<Duration>,
}

/// The plan of a lab: its state before anything was made.
pub fn plan_state(opts: &UpOptions, dir: &Path) -> LabState {
    let layout = Layout::new(dir);
    let clusters = (1..=opts.clusters)
        .map(|n| ClusterState {
            name: plan::cluster_name(n),
            id: n,
            control_netns: plan::control_netns(&opts.name, n),
            control_ip: plan::control_ip(n),
            pod_cidr: plan::cluster_pod_cidr(n),
            nodes: (1..=opts.nodes)
                .map(|m| {
                    let name = plan::node_name(n, m);
                    let node_dir = layout.node(&name);
                    NodeState {
                        number: m,
                        netns: plan::node_netns(&opts.name, n, m),
                        ip: plan::node_ip(n, m),
                        pod_cidr: plan::node_pod_cidr(n, m),
                        clustermesh_dir: node_dir.join("clustermesh"),
                        status_socket: node_dir.join("status.sock"),
                        cni_socket: node_dir.join("cni.sock"),
                        bpffs: layout.bpffs(&name),
                        state_dir: node_dir.join("state"),
                        name,
                    }
                })
                .collect(),
        })
        .collect();
    LabState {
        name: opts.name.clone(),
        dir: dir.to_owned(),
        routing: opts.routing,
        encryption: opts.encryption,
        clusters,
        processes: Vec::new(),
        pods: Vec::new(),
        connections: Vec::new(),
    }
}

/// Brings a lab up (see the module docs). An existing lab of this name with the
/// same shape whose processes all run is left as it is; anything else of that
/// name (a crashed lab, another shape) is removed first.
///
/// # Errors
///
/// [`LabError`] of the failed step; the half-made lab stays for inspection
/// and is removed by the next `lab up` or `lab down`.
pub fn up(opts: &UpOptions, progress: &Progress) -> Result<LabState, LabError> {
    plan::validate_lab_name(&opts.name)?;
    plan::validate_counts(u32::from(opts.clusters), u32::from(opts.nodes))?;
    let bins = Binaries::discover()?;
    let dir = lab_dir(&opts.root, &opts.name);
    let wanted = plan_state(opts, &dir);

    if let Ok(existing) = LabState::load(&opts.name, &dir) {
        if same_shape(&existing, &wanted) && healthy(&existing) {
            progress.note(format!(
                "lab {} is up already ({} clusters x {} nodes); nothing to rebuild",
                opts.name, opts.clusters, opts.nodes
            ));
            wait_status(&existing, opts.wait, progress)?;
            return Ok(existing);
        }
    }
    if dir.exists()
        || ip::list_netns()?
            .iter()
            .any(|n| plan::is_lab_netns(&opts.name, n))
    {
        progress
            .step(format!("removing the previous lab {}", opts.name))
            .run(|| down(&opts.name, &opts.root, &Progress::quiet()))?;
    }

    let mut lab = wanted;

    create_lab_dir(&lab)?;
    progress
        .step(format!(
            "underlay: bridge {} in namespace {}",
            plan::BRIDGE,
            plan::underlay_netns(&lab.name)
        ))
        .run(|| create_underlay(&lab.name))?;
    for cluster in &lab.clusters {
        progress
            .step(format!(
                "cluster {}: namespaces {} and {} node(s), underlay 192.168.{}.0/24, pods {}",
                cluster.name,
                cluster.control_netns,
                cluster.nodes.len(),
                cluster.id,
                cluster.pod_cidr
            ))
            .run(|| create_cluster_netns(&lab.name, cluster))?;
    }
    for cluster in lab.clusters.clone() {
        let record = progress
            .step(format!(
                "cluster {}: certificates and etcd (mTLS) on {}:{}",
                cluster.name,
                cluster.control_ip,
                plan::ETCD_TLS_PORT
            ))
            .run(|| enable_cluster(&lab, &cluster, &bins.etcd))?;
        lab.record_process(record)?;
    }
    for cluster in lab.clusters.clone() {
        let record = progress
            .step(format!(
                "cluster {}: clustermesh-apiserver on {}:{}",
                cluster.name,
                cluster.control_ip,
                plan::APISERVER_GRPC_PORT
            ))
            .run(|| start_apiserver(&lab, &cluster, &bins))?;
        lab.record_process(record)?;
    }
    for cluster in lab.clusters.clone() {
        for node in &cluster.nodes {
            let record = progress
                .step(format!(
                    "node {}: agent in {} ({}, {}, routing {}, encryption {})",
                    node.name,
                    node.netns,
                    node.ip,
                    node.pod_cidr,
                    lab.routing.as_str(),
                    lab.encryption.as_str()
                ))
                .run(|| start_agent(&lab, &cluster, node, &bins))?;
            lab.record_process(record)?;
        }
    }
    if opts.connect {
        let names: Vec<String> = lab.clusters.iter().map(|c| c.name.clone()).collect();
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                progress
                    .step(format!("clustermesh connect {a} <-> {b}"))
                    .run(|| connect(&mut lab, a, b, true))?;
            }
        }
    }
    for cluster in lab.clusters.clone() {
        for node in &cluster.nodes {
            let name = plan::echo_pod(cluster.id, node.number);
            progress
                .step(format!(
                    "pod {}/{}/{name} with an echo server on port {}",
                    cluster.name,
                    node.name,
                    plan::ECHO_PORT
                ))
                .run(|| {
                    let labels = BTreeMap::from([("app".to_owned(), "echo".to_owned())]);
                    pod::add(&mut lab, &bins, &cluster.name, node.number, &name, labels)?;
                    let record = pod::start_echo(&lab, &bins, &cluster.name, &name)?;
                    lab.record_process(record)?;
                    Ok::<_, LabError>(())
                })?;
        }
    }
    wait_status(&lab, opts.wait, progress)?;
    Ok(lab)
}

/// Creates the lab directory and writes the planned state, so that even a
/// crash in the next step leaves a lab `down` can find.
///
/// # Errors
///
/// I/O errors.
pub fn create_lab_dir(lab: &LabState) -> Result<(), LabError> {
    let logs = Layout::new(&lab.dir).logs();
    std::fs::create_dir_all(&logs).map_err(FileError::at("create", &logs))?;
    lab.save()?;
    Ok(())
}

pub(super) fn wait_status(
    lab: &LabState,
    wait: Option<Duration>,
    progress: &Progress,
) -> Result<(), LabError> {
    if let Some(wait) = wait {
        progress
            .step("waiting for clustermesh status to be ready")
            .run(|| crate::clustermesh::status::wait_ready(lab, None, wait).map(drop))?;
    }
    Ok(())
}

pub(super) fn same_shape(a: &LabState, b: &LabState) -> bool {
    a.routing == b.routing
        && a.encryption == b.encryption
        && a.clusters.len() == b.clusters.len()
        && a.clusters
            .iter()
            .zip(&b.clusters)
            .all(|(x, y)| x.nodes.len() == y.nodes.len())
}

/// Whether every recorded process runs and every namespace exists.
pub fn healthy(lab: &LabState) -> bool {
    !lab.processes.is_empty()
        && lab.processes.iter().all(supervise::is_running)
        && lab.clusters.iter().all(|c| {
            ip::netns_exists(&c.control_netns) && c.nodes.iter().all(|n| ip::netns_exists(&n.netns))
        })
}
