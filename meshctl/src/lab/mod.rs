//! A multi-cluster lab on one Linux host (`docs/architecture.md` §9).
//!
//! `lab up` builds, in order: the underlay (a bridge in a namespace of its own),
//! per cluster a control namespace and one namespace per node (each with a veth
//! to the bridge), per cluster a PKI and an etcd with mutual TLS, a
//! clustermesh-apiserver, one node agent per node, the connections between all
//! clusters, and an echo pod per node. Every step is recorded in the lab's
//! state file before the next one starts, and every kernel object is named
//! with the lab name as prefix (see [`plan`]), so `lab down` (or the next
//! `lab up` after a crash) removes exactly what the lab made: the processes it
//! started and any process still inside its namespaces, its namespaces (their
//! links go with them), its bpffs mounts, and its directory. The host's own
//! network namespace is never touched.
//!
//! The lab directory is `/run/mesh-lab/<name>/` by default: `/run` is a tmpfs
//! that lives exactly as long as the namespaces it describes (both vanish at
//! reboot), and etcd's fsyncs are cheap there.

pub mod ip;
pub mod plan;
pub mod pod;
pub mod state;
pub mod supervise;

use crate::file::FileError;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clustermesh::config::ConfigError;
use crate::pki::{ClusterPki, PkiError};

use ip::IpError;
use state::StateError;
use supervise::SuperviseError;

mod connect;
mod daemons;
mod down;
mod mounts;
mod status;
mod topology;
mod up;

pub use connect::{add_reader, cluster_facts, connect, disconnect, find_cluster, revoke_reader};
pub use daemons::{enable_cluster, etcd_config_for, restart_etcd, wait_etcd};
pub use down::{down, DownReport};
pub use status::{status, LabStatus, ProcessStatus};
pub use topology::build_topology;
pub use up::{create_lab_dir, healthy, plan_state, up, UpOptions};

/// Default parent of lab directories.
pub const DEFAULT_ROOT: &str = "/run/mesh-lab";

/// How long one process gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The etcd user (certificate CN) of a cluster's own agents.
pub const LOCAL_READER: &str = kvstore::auth::LOCAL_READER;

/// Errors of lab operations.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A name or count the lab cannot use.
    #[error(transparent)]
    Name(#[from] plan::NameError),
    /// A kernel operation failed.
    #[error(transparent)]
    Ip(#[from] IpError),
    /// The state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// A process.
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    /// Certificates.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Remote-cluster configs and connect checks.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A pod operation.
    #[error(transparent)]
    Pod(#[from] pod::PodError),
    /// Clustermesh status (e.g. not ready in time).
    #[error(transparent)]
    Status(#[from] crate::clustermesh::status::StatusError),
    /// Setting up who may use a cluster's etcd.
    #[error(transparent)]
    Access(#[from] crate::clustermesh::access::AccessError),
    /// A needed program is missing.
    #[error("cannot find the `{name}` program (looked in {looked}); build it with `cargo build --workspace` or put it on PATH")]
    MissingBinary {
        /// The program.
        name: String,
        /// Where we looked.
        looked: String,
    },
    /// A file system operation on the lab directory.
    #[error(transparent)]
    Io(#[from] crate::file::FileError),
    /// A cluster that is not in the lab.
    #[error("lab {lab} has no cluster {cluster} (it has {have})")]
    NoCluster {
        /// The lab.
        lab: String,
        /// The cluster asked for.
        cluster: String,
        /// What it has.
        have: String,
    },
    /// Mounting or unmounting a bpffs failed.
    #[error("cannot {action} bpffs at {path}")]
    Mount {
        /// `mount` or `unmount`.
        action: &'static str,
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// The programs the lab runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// etcd.
    pub etcd: PathBuf,
    /// The clustermesh-apiserver.
    pub apiserver: PathBuf,
    /// The node agent.
    pub agent: PathBuf,
    /// The CNI plugin.
    pub cni: PathBuf,
    /// `meshctl` itself (runs the echo servers).
    pub meshctl: PathBuf,
}

impl Binaries {
    /// Finds each program in `MESH_BIN_DIR`, beside the running `meshctl`, then on `PATH`.
    ///
    /// # Errors
    ///
    /// [`LabError::MissingBinary`] naming the first one not found.
    pub fn discover() -> Result<Self, LabError> {
        Ok(Self {
            etcd: find_program("etcd")?,
            apiserver: find_program("clustermesh-apiserver")?,
            agent: find_program("node-agent")?,
            cni: find_program("mesh-cni")?,
            meshctl: std::env::current_exe()
                .map_err(FileError::at("locate", Path::new("meshctl")))?,
        })
    }
}

/// Finds program `name` in `MESH_BIN_DIR`, beside the running executable, then on `PATH`.
///
/// # Errors
///
/// [`LabError::MissingBinary`].
pub fn find_program(name: &str) -> Result<PathBuf, LabError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
        dirs.push(dir.into());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        dirs.push(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::MissingBinary {
            name: name.to_owned(),
            looked: "MESH_BIN_DIR, beside meshctl, PATH".to_owned(),
        })
}

/// The directory of lab `name` under `root`.
pub fn lab_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

/// Paths inside a lab directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Layout of the lab in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// Log directory.
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    /// A cluster's directory.
    pub fn cluster(&self, cluster: &str) -> PathBuf {
        self.dir.join("clusters").join(cluster)
    }
    /// A cluster's PKI.
    pub fn pki(&self, cluster: &str) -> ClusterPki {
        ClusterPki::new(self.cluster(cluster).join("pki"))
    }
    /// A node's directory.
    pub fn node(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
    /// Where a node's bpffs is mounted.
    pub fn bpffs(&self, node: &str) -> PathBuf {
        self.dir.join("bpffs").join(node)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::state::{Encryption, Routing};
    use super::*;

    #[test]
    fn plan_has_every_node() {
        let opts = UpOptions {
            name: "t".into(),
            root: "/r".into(),
            clusters: 3,
            nodes: 2,
            routing: Routing::Tunnel,
            encryption: Encryption::None,
            connect: true,
            wait: None,
        };
        let lab = plan_state(&opts, Path::new("/r/t"));
        assert_eq!(lab.clusters.len(), 3);
        let c3 = &lab.clusters[2];
        assert_eq!(c3.control_netns, "t-c3-ctl");
        assert_eq!(c3.nodes[1].netns, "t-c3-n2");
        assert_eq!(c3.nodes[1].ip.to_string(), "192.168.3.12");
        assert_eq!(
            c3.nodes[1].status_socket,
            Path::new("/r/t/nodes/c3-n2/status.sock")
        );
        let facts: Vec<_> = lab
            .clusters
            .iter()
            .map(|c| cluster_facts(&lab, c))
            .collect();
        crate::clustermesh::config::check_mesh(&facts).unwrap();
    }
}
