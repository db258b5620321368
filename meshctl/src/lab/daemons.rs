//! The lab's processes: per cluster a PKI and an etcd with mutual TLS, a
//! clustermesh-apiserver, and a node agent per node, all in the lab's
//! namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::clustermesh::access::EtcdAdmin;
use crate::clustermesh::config::EtcdConfig;
use crate::pki::ClusterPki;
use kvstore::auth;

use super::connect::find_cluster;
use super::ip;
use super::mounts::mount_bpffs;
use super::plan;
use super::state::{ClusterState, LabState, NodeState, ProcessRecord, Role};
use super::supervise::{self, Spec};
use super::{find_program, Binaries, LabError, Layout, LOCAL_READER, READY_TIMEOUT};
use crate::file::FileError;

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
        // What the cluster owns, pinned at connect (`crate::clustermesh::access`
        // sets who may read; these say what a reader accepts from it).
        allowed_pod_cidrs: vec![plan::cluster_pod_cidr(cluster.id).into()],
        allowed_node_cidrs: vec![plan::cluster_node_cidr(cluster.id).into()],
    })
}

/// `clustermesh enable` for a lab cluster: PKI, then etcd with mutual TLS
/// on the control IP and on the control namespace's loopback (the
/// apiserver's), `/health` in plain HTTP on loopback, and then its users and
/// roles with authentication on ([`crate::clustermesh::access`]): every
/// client is a user named by its certificate, and may do only what its role
/// allows.
///
/// # Errors
///
/// [`LabError`] when certificates cannot be made, etcd does not become
/// healthy or refuses the users and roles.
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
    std::fs::create_dir_all(&data).map_err(FileError::at("create", &data))?;
    let server = pki.server();
    let peer = "http://127.0.0.1:2380";
    let local = local_etcd_endpoint();
    let tls = format!("https://{}:{}", cluster.control_ip, plan::ETCD_TLS_PORT);
    let metrics = format!("http://127.0.0.1:{}", plan::ETCD_METRICS_PORT);
    let args = [
        ("--name", cluster.name.clone()),
        ("--data-dir", data.display().to_string()),
        ("--listen-client-urls", format!("{local},{tls}")),
        ("--advertise-client-urls", tls),
        ("--listen-metrics-urls", metrics),
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
    etcd_admin(cluster, &pki).enable()?;
    Ok(record)
}

/// The URL of a lab etcd's loopback listener, inside its control namespace.
fn local_etcd_endpoint() -> String {
    format!("https://127.0.0.1:{}", plan::ETCD_LOCAL_PORT)
}

/// The administrator of a lab cluster's etcd, from its control namespace.
pub(super) fn etcd_admin<'a>(cluster: &'a ClusterState, pki: &'a ClusterPki) -> EtcdAdmin<'a> {
    EtcdAdmin {
        cluster: &cluster.name,
        pki,
        endpoints: vec![local_etcd_endpoint()],
        netns: Some(&cluster.control_netns),
    }
}

/// Waits until a cluster's etcd answers `/health` on its metrics listener.
///
/// # Errors
///
/// [`LabError::Supervise`] when it exits or the deadline passes.
pub fn wait_etcd(cluster: &ClusterState, record: &ProcessRecord) -> Result<(), LabError> {
    let what = format!(
        "etcd of {} to answer /health on 127.0.0.1:{} in {}",
        cluster.name,
        plan::ETCD_METRICS_PORT,
        cluster.control_netns
    );
    let netns = cluster.control_netns.clone();
    supervise::wait_ready(&what, record, READY_TIMEOUT, || {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, plan::ETCD_METRICS_PORT));
        let body = ip::in_netns(&netns, move || http_get(addr, "/health"))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(body.contains("\"health\":\"true\""))
    })?;
    Ok(())
}

/// A minimal HTTP/1.0 GET, enough for health endpoints; returns the whole response.
pub(super) fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

pub(super) fn start_apiserver(
    lab: &LabState,
    cluster: &ClusterState,
    bins: &Binaries,
) -> Result<ProcessRecord, LabError> {
    let layout = Layout::new(&lab.dir);
    let grpc = SocketAddr::from((cluster.control_ip, plan::APISERVER_GRPC_PORT));
    let health = SocketAddr::from((cluster.control_ip, plan::APISERVER_HEALTH_PORT));
    // The apiserver is the one writer: etcd's user `apiserver`.
    let pki = layout.pki(&cluster.name);
    let client = pki.issue_client(auth::APISERVER_USER)?;
    let etcd_config = EtcdConfig {
        endpoints: vec![local_etcd_endpoint()],
        trusted_ca_file: Some(pki.ca_cert()),
        cert_file: Some(client.cert),
        key_file: Some(client.key),
        allowed_pod_cidrs: Vec::new(),
        allowed_node_cidrs: Vec::new(),
    }
    .install(
        &layout.cluster(&cluster.name).join("apiserver-etcd"),
        &cluster.name,
    )?;
    let args = vec![
        format!("--cluster-name={}", cluster.name),
        format!("--cluster-id={}", cluster.id),
        format!("--etcd-config={}", etcd_config.display()),
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

pub(super) fn start_agent(
    lab: &LabState,
    cluster: &ClusterState,
    node: &NodeState,
    bins: &Binaries,
) -> Result<ProcessRecord, LabError> {
    let layout = Layout::new(&lab.dir);
    let node_dir = layout.node(&node.name);
    for dir in [&node.clustermesh_dir, &node.state_dir, &node.bpffs] {
        std::fs::create_dir_all(dir).map_err(FileError::at("create", dir))?;
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
pub(super) fn mesh_daemon_env() -> Vec<(String, String)> {
    vec![
        ("RUST_LOG".into(), "info".into()),
        ("NO_COLOR".into(), "1".into()),
    ]
}
