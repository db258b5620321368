//! A multi-cluster lab on one Linux host (DESIGN.md section 6).
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

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::clustermesh::config::{self, ClusterFacts, ConfigError, EtcdConfig};
use crate::pki::{ClusterPki, PkiError};
use crate::progress::Progress;
use ip::IpError;
use state::{
    ClusterState, Connection, Encryption, LabState, NodeState, ProcessRecord, Role, Routing,
    StateError,
};
use supervise::{Spec, SuperviseError};

/// Default parent of lab directories.
pub const DEFAULT_ROOT: &str = "/run/mesh-lab";
/// How long one process gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Client certificate name of a cluster's own agents.
pub const LOCAL_READER: &str = "local";

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
    /// A needed program is missing.
    #[error("cannot find the `{name}` program (looked in {looked}); build it with `cargo build --workspace` or put it on PATH")]
    MissingBinary {
        /// The program.
        name: String,
        /// Where we looked.
        looked: String,
    },
    /// A file system operation on the lab directory.
    #[error("cannot {action} {path}")]
    Io {
        /// What was done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LabError {
    let path = path.to_owned();
    move |source| LabError::Io {
        action,
        path,
        source,
    }
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
            meshctl: std::env::current_exe().map_err(io_error("locate", Path::new("meshctl")))?,
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
    std::fs::create_dir_all(&logs).map_err(io_error("create", &logs))?;
    lab.save()?;
    Ok(())
}

/// Builds the whole topology of a planned lab: the underlay, and every
/// cluster's control and node namespaces plugged into it.
///
/// # Errors
///
/// The failing `ip` command.
pub fn build_topology(lab: &LabState) -> Result<(), LabError> {
    create_underlay(&lab.name)?;
    for cluster in &lab.clusters {
        create_cluster_netns(&lab.name, cluster)?;
    }
    Ok(())
}

fn wait_status(
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

fn same_shape(a: &LabState, b: &LabState) -> bool {
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

fn create_underlay(lab: &str) -> Result<(), IpError> {
    let ns = plan::underlay_netns(lab);
    ip::add_netns(&ns)?;
    ip::ip_in(&ns, &["link", "add", plan::BRIDGE, "type", "bridge"])?;
    ip::ip_in(&ns, &["link", "set", plan::BRIDGE, "up"])?;
    Ok(())
}

/// Creates namespace `netns` with `eth0` plugged into the underlay bridge as `port`.
fn plug(lab: &str, netns: &str, port: &str, ip_addr: Ipv4Addr) -> Result<(), IpError> {
    let underlay = plan::underlay_netns(lab);
    ip::add_netns(netns)?;
    ip::add_veth(&underlay, port, netns, plan::UNDERLAY_IF)?;
    ip::ip_in(
        &underlay,
        &["link", "set", port, "master", plan::BRIDGE, "up"],
    )?;
    let cidr = format!("{ip_addr}/{}", plan::UNDERLAY_PREFIX);
    ip::ip_in(netns, &["addr", "add", &cidr, "dev", plan::UNDERLAY_IF])?;
    ip::ip_in(netns, &["link", "set", plan::UNDERLAY_IF, "up"])?;
    Ok(())
}

fn create_cluster_netns(lab: &str, cluster: &ClusterState) -> Result<(), IpError> {
    plug(
        lab,
        &cluster.control_netns,
        &plan::control_port(cluster.id),
        cluster.control_ip,
    )?;
    for node in &cluster.nodes {
        plug(
            lab,
            &node.netns,
            &plan::node_port(cluster.id, node.number),
            node.ip,
        )?;
        // A node routes for its pods; these sysctls exist only in the node's namespace.
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ip::sysctl_in(&node.netns, key, value)?;
        }
    }
    Ok(())
}

/// The Cilium-style config with which `reader` reaches `cluster`'s etcd,
/// issuing `reader`'s client certificate from `cluster`'s CA.
pub fn etcd_config_for(
    lab: &LabState,
    cluster: &ClusterState,
    reader: &str,
) -> Result<EtcdConfig, LabError> {
    let pki = Layout::new(&lab.dir).pki(&cluster.name);
    let client = pki.issue_client(reader)?;
    Ok(EtcdConfig {
        endpoints: vec![format!(
            "https://{}:{}",
            cluster.control_ip,
            plan::ETCD_TLS_PORT
        )],
        trusted_ca_file: Some(pki.ca_cert()),
        cert_file: Some(client.cert),
        key_file: Some(client.key),
    })
}

/// `clustermesh enable` for a lab cluster: PKI, then etcd with TLS and
/// client-certificate auth on the control IP (plus a plain listener on the
/// control namespace's loopback, reachable only by the local apiserver).
///
/// # Errors
///
/// [`LabError`] when certificates cannot be made or etcd does not become healthy.
pub fn enable_cluster(
    lab: &LabState,
    cluster: &ClusterState,
    etcd: &Path,
) -> Result<ProcessRecord, LabError> {
    let layout = Layout::new(&lab.dir);
    let pki = layout.pki(&cluster.name);
    pki.enable(
        &cluster.name,
        &[cluster.control_ip.into(), Ipv4Addr::LOCALHOST.into()],
    )?;
    let data = layout.cluster(&cluster.name).join("etcd");
    std::fs::create_dir_all(&data).map_err(io_error("create", &data))?;
    let server = pki.server();
    let peer = "http://127.0.0.1:2380";
    let local = format!("http://127.0.0.1:{}", plan::ETCD_LOCAL_PORT);
    let tls = format!("https://{}:{}", cluster.control_ip, plan::ETCD_TLS_PORT);
    let args = [
        ("--name", cluster.name.clone()),
        ("--data-dir", data.display().to_string()),
        ("--listen-client-urls", format!("{local},{tls}")),
        ("--advertise-client-urls", tls),
        ("--listen-peer-urls", peer.to_owned()),
        ("--initial-advertise-peer-urls", peer.to_owned()),
        ("--initial-cluster", format!("{}={peer}", cluster.name)),
        ("--client-cert-auth", "true".to_owned()),
        ("--trusted-ca-file", pki.ca_cert().display().to_string()),
        ("--cert-file", server.cert.display().to_string()),
        ("--key-file", server.key.display().to_string()),
        ("--logger", "zap".to_owned()),
        ("--log-outputs", "stderr".to_owned()),
    ];
    let record = supervise::start(&Spec {
        role: Role::Etcd,
        cluster: cluster.name.clone(),
        member: None,
        netns: Some(cluster.control_netns.clone()),
        program: etcd.to_owned(),
        args: args.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        log: layout.logs().join(format!("etcd-{}.log", cluster.name)),
        env: vec![],
    })?;
    wait_etcd(cluster, &record)?;
    Ok(record)
}

/// Waits until a cluster's etcd answers `/health` on its local listener.
///
/// # Errors
///
/// [`LabError::Supervise`] when it exits or the deadline passes.
pub fn wait_etcd(cluster: &ClusterState, record: &ProcessRecord) -> Result<(), LabError> {
    let what = format!(
        "etcd of {} to answer /health on 127.0.0.1:{} in {}",
        cluster.name,
        plan::ETCD_LOCAL_PORT,
        cluster.control_netns
    );
    let netns = cluster.control_netns.clone();
    supervise::wait_ready(&what, record, READY_TIMEOUT, || {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, plan::ETCD_LOCAL_PORT));
        let body = ip::in_netns(&netns, move || http_get(addr, "/health"))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(body.contains("\"health\":\"true\""))
    })?;
    Ok(())
}

/// A minimal HTTP/1.0 GET, enough for health endpoints; returns the whole response.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn start_apiserver(
    lab: &LabState,
    cluster: &ClusterState,
    bins: &Binaries,
) -> Result<ProcessRecord, LabError> {
    let layout = Layout::new(&lab.dir);
    let grpc = SocketAddr::from((cluster.control_ip, plan::APISERVER_GRPC_PORT));
    let health = SocketAddr::from((cluster.control_ip, plan::APISERVER_HEALTH_PORT));
    let args = vec![
        format!("--cluster-name={}", cluster.name),
        format!("--cluster-id={}", cluster.id),
        format!(
            "--etcd-endpoints=http://127.0.0.1:{}",
            plan::ETCD_LOCAL_PORT
        ),
        format!("--grpc-listen={grpc}"),
        format!("--health-listen={health}"),
        "--source=standalone".to_owned(),
    ];
    let record = supervise::start(&Spec {
        role: Role::Apiserver,
        cluster: cluster.name.clone(),
        member: None,
        netns: Some(cluster.control_netns.clone()),
        program: bins.apiserver.clone(),
        args,
        log: layout
            .logs()
            .join(format!("apiserver-{}.log", cluster.name)),
        env: mesh_daemon_env(),
    })?;
    let what = format!(
        "clustermesh-apiserver of {} to accept gRPC connections on {grpc}",
        cluster.name
    );
    let netns = cluster.control_netns.clone();
    supervise::wait_ready(&what, &record, READY_TIMEOUT, || {
        ip::in_netns(&netns, move || {
            TcpStream::connect_timeout(&grpc, Duration::from_secs(1)).is_ok()
        })
        .map_err(|e| e.to_string())
    })?;
    Ok(record)
}

fn start_agent(
    lab: &LabState,
    cluster: &ClusterState,
    node: &NodeState,
    bins: &Binaries,
) -> Result<ProcessRecord, LabError> {
    let layout = Layout::new(&lab.dir);
    let node_dir = layout.node(&node.name);
    for dir in [&node.clustermesh_dir, &node.state_dir, &node.bpffs] {
        std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    }
    mount_bpffs(&node.bpffs)?;
    // The agent reads its own cluster like any other: over mTLS, with a
    // client certificate of its own cluster's CA.
    let local_config = etcd_config_for(lab, cluster, LOCAL_READER)?
        .install(&node_dir.join("local-etcd"), &cluster.name)?;
    let args = vec![
        format!("--netns={}", node.netns),
        format!("--cluster-name={}", cluster.name),
        format!("--cluster-id={}", cluster.id),
        format!("--node-name={}", node.name),
        format!("--node-ip={}", node.ip),
        format!("--pod-cidr={}", node.pod_cidr),
        format!(
            "--apiserver=http://{}:{}",
            cluster.control_ip,
            plan::APISERVER_GRPC_PORT
        ),
        format!("--etcd-config={}", local_config.display()),
        format!("--clustermesh-config={}", node.clustermesh_dir.display()),
        format!("--routing={}", lab.routing.as_str()),
        format!("--encryption={}", lab.encryption.as_str()),
        format!("--bpffs={}", node.bpffs.display()),
        format!("--state-dir={}", node.state_dir.display()),
        format!("--cni-socket={}", node.cni_socket.display()),
        format!("--status-socket={}", node.status_socket.display()),
    ];
    let record = supervise::start(&Spec {
        role: Role::Agent,
        cluster: cluster.name.clone(),
        member: Some(node.name.clone()),
        netns: None,
        program: bins.agent.clone(),
        args,
        log: layout.logs().join(format!("agent-{}.log", node.name)),
        env: mesh_daemon_env(),
    })?;
    let what = format!(
        "node agent {} to serve its status on {}",
        node.name,
        node.status_socket.display()
    );
    let socket = node.status_socket.clone();
    supervise::wait_ready(&what, &record, READY_TIMEOUT, || {
        crate::clustermesh::status::read_agent_status(&socket).map(|_| true)
    })?;
    Ok(record)
}

fn mount_bpffs(path: &Path) -> Result<(), LabError> {
    if mounts_under(path).iter().any(|m| m == path) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| LabError::Mount {
        action: "mount",
        path: path.to_owned(),
        source,
    })
}

/// Mount points at or below `dir` (from `/proc/self/mountinfo`), deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

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
    let a = find_cluster(lab, source)?.clone();
    let b = find_cluster(lab, destination)?.clone();
    config::check_compatible(&cluster_facts(lab, &a), &cluster_facts(lab, &b))?;
    let mut directions = vec![(a.clone(), b.clone())];
    if both {
        directions.push((b, a));
    }
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
    let a = find_cluster(lab, source)?.clone();
    let b = find_cluster(lab, destination)?.clone();
    let mut directions = vec![(a.clone(), b.clone())];
    if both {
        directions.push((b, a));
    }
    for (src, dst) in directions {
        for node in &src.nodes {
            config::uninstall(&node.clustermesh_dir, &dst.name)?;
        }
        lab.connections
            .retain(|c| !(c.source == src.name && c.destination == dst.name));
    }
    lab.save()?;
    Ok(())
}

/// What `lab down` removed.
#[derive(Debug, Default, Serialize)]
pub struct DownReport {
    /// Processes stopped.
    pub processes: usize,
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// bpffs mounts removed.
    pub mounts: Vec<PathBuf>,
    /// Whether the lab directory was removed.
    pub removed_dir: bool,
}

/// Removes everything lab `name` made: recorded processes, any process left
/// in its namespaces, its namespaces, its bpffs mounts and its directory.
/// Removing a lab that does not exist is not an error.
///
/// # Errors
///
/// The first failure; what could be removed before it is gone, and running
/// `lab down` again continues.
pub fn down(name: &str, root: &Path, progress: &Progress) -> Result<DownReport, LabError> {
    plan::validate_lab_name(name)?;
    let dir = lab_dir(root, name);
    let mut report = DownReport::default();
    let namespaces: Vec<String> = ip::list_netns()?
        .into_iter()
        .filter(|n| plan::is_lab_netns(name, n))
        .collect();

    let step = progress.step(format!("stopping the processes of lab {name}"));
    if let Ok(lab) = LabState::load(name, &dir) {
        // Pods' servers first, then agents, apiservers, and etcd last.
        for role in [Role::Echo, Role::Agent, Role::Apiserver, Role::Etcd] {
            for record in lab.processes.iter().filter(|p| p.role == role) {
                if supervise::is_running(record) {
                    supervise::stop(record);
                    report.processes += 1;
                }
            }
        }
    }
    // Whatever still runs inside the lab's namespaces (a crashed lab's
    // processes, or anything started by hand in them) is the lab's too.
    for ns in &namespaces {
        for pid in ip::netns_pids(ns)? {
            supervise::stop_pid(pid, None);
            report.processes += 1;
        }
    }
    step.done();

    let step = progress.step(format!("removing {} namespaces", namespaces.len()));
    // Pods before nodes before the underlay, so no veth outlives its peer's namespace by long.
    let mut ordered = namespaces.clone();
    ordered.sort_by_key(|n| std::cmp::Reverse(n.matches('-').count()));
    for ns in ordered {
        ip::del_netns(&ns)?;
        report.namespaces.push(ns);
    }
    step.done();

    if dir.exists() {
        let step = progress.step(format!("removing {}", dir.display()));
        for mount in mounts_under(&dir) {
            nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
                LabError::Mount {
                    action: "unmount",
                    path: mount.clone(),
                    source,
                }
            })?;
            report.mounts.push(mount);
        }
        std::fs::remove_dir_all(&dir).map_err(io_error("remove", &dir))?;
        report.removed_dir = true;
        // The parent too, when this was its last lab (ENOTEMPTY otherwise: fine).
        let _ = std::fs::remove_dir(root);
        step.done();
    }
    Ok(report)
}

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
    pub pods: Vec<state::PodRecord>,
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

/// Restarts a cluster's etcd on its data directory (after a crash, or a test's
/// SIGKILL), replacing its process record.
///
/// # Errors
///
/// [`LabError`] when it does not come back healthy.
pub fn restart_etcd(lab: &mut LabState, cluster: &str) -> Result<(), LabError> {
    let etcd = find_program("etcd")?;
    let c = find_cluster(lab, cluster)?.clone();
    for record in lab
        .processes
        .iter()
        .filter(|p| p.role == Role::Etcd && p.cluster == cluster)
    {
        supervise::stop(record);
    }
    let record = enable_cluster(lab, &c, &etcd)?;
    lab.processes
        .retain(|p| !(p.role == Role::Etcd && p.cluster == cluster));
    lab.record_process(record)?;
    Ok(())
}

/// The environment of the mesh's own daemons (apiserver, agents): info logs
/// without colour codes, since they go to log files.
fn mesh_daemon_env() -> Vec<(String, String)> {
    vec![
        ("RUST_LOG".into(), "info".into()),
        ("NO_COLOR".into(), "1".into()),
    ]
}

#[cfg(test)]
mod tests {
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
        config::check_mesh(&facts).unwrap();
    }
}
