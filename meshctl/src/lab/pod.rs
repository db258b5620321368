//! Pods of the lab: a network namespace wired by the `mesh-cni` plugin, called
//! exactly as a container runtime calls a CNI plugin (CNI spec 1.0.0): the
//! network configuration on stdin, the `CNI_*` variables in the environment,
//! the result as JSON on stdout. The plugin runs in the node's namespace, which
//! plays the role of the host.
//!
//! The pod's identity travels as a Kubernetes runtime passes it:
//! `K8S_POD_NAMESPACE`/`K8S_POD_NAME` in `CNI_ARGS`; its labels as the
//! `runtimeConfig.labels` map of the network configuration (what a runtime
//! fills from a capability), which `mesh-cni` reads.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use super::ip::{self, netns_path};
use super::state::{LabState, PodRecord, ProcessRecord, Role};
use super::supervise::{self, Spec};
use super::{find_cluster, plan, Binaries, LabError, Layout, READY_TIMEOUT};

/// Kubernetes namespace of lab pods.
pub const POD_NAMESPACE: &str = "default";
/// Interface name of a pod's network device.
pub const POD_IF: &str = "eth0";

/// Errors of pod operations.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The plugin could not be run.
    #[error("cannot run CNI plugin {plugin}")]
    Spawn {
        /// The plugin.
        plugin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The plugin reported an error (CNI error JSON or a failed exit).
    #[error("CNI {command} of pod {pod} failed ({status}): {message}")]
    Plugin {
        /// ADD, DEL or CHECK.
        command: &'static str,
        /// The pod.
        pod: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// The plugin's error message (`msg` and `details`), or its output.
        message: String,
    },
    /// The plugin's ADD result has no IPv4 address.
    #[error("CNI ADD of pod {pod} returned no IPv4 address: {output}")]
    NoAddress {
        /// The pod.
        pod: String,
        /// What it printed.
        output: String,
    },
    /// A pod of this name exists already in the cluster.
    #[error("cluster {cluster} has a pod named {pod} already (on node {node})")]
    Exists {
        /// The cluster.
        cluster: String,
        /// The pod.
        pod: String,
        /// Where it is.
        node: String,
    },
    /// No such pod.
    #[error("cluster {cluster} has no pod named {pod} (pods: {have})")]
    NotFound {
        /// The cluster.
        cluster: String,
        /// The pod.
        pod: String,
        /// The pods it has.
        have: String,
    },
    /// No such node.
    #[error("cluster {cluster} has no node n{node}")]
    NoNode {
        /// The cluster.
        cluster: String,
        /// The node number.
        node: u8,
    },
    /// The state file records a pod on a node the cluster does not have
    /// (an edited or stale state file).
    #[error("pod {pod} of cluster {cluster} is recorded on node {node}, which the cluster does not have")]
    StaleNode {
        /// The cluster.
        cluster: String,
        /// The pod.
        pod: String,
        /// The recorded node name.
        node: String,
    },
}

fn network_config(
    cni_socket: &Path,
    labels: &BTreeMap<String, String>,
    cni_version: &str,
) -> serde_json::Value {
    json!({
        "cniVersion": cni_version,
        "name": "mesh",
        "type": "mesh-cni",
        "agentSocket": cni_socket,
        "runtimeConfig": { "labels": labels },
    })
}

/// Runs the CNI plugin for `pod` as a runtime would; returns its stdout.
#[expect(
    clippy::too_many_arguments,
    reason = "one CNI invocation has this many inputs"
)]
fn run_cni(
    command: &'static str,
    bins: &Binaries,
    node_netns: &str,
    cni_socket: &Path,
    pod: &str,
    pod_netns: &str,
    container_id: &str,
    labels: &BTreeMap<String, String>,
) -> Result<String, PodError> {
    let config = network_config(cni_socket, labels, "1.0.0");
    let cni_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id}"
    );
    let cni_path = bins.cni.parent().unwrap_or(Path::new("/"));
    let spawn = |source| PodError::Spawn {
        plugin: bins.cni.clone(),
        source,
    };
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(node_netns).display()))
        .arg("--")
        .arg(&bins.cni)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns_path(pod_netns))
        .env("CNI_IFNAME", POD_IF)
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", cni_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(config.to_string().as_bytes())
        .map_err(spawn)?;
    let out = child.wait_with_output().map_err(spawn)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // CNI errors are JSON on stdout: {"code", "msg", "details"}.
        let message = serde_json::from_str::<serde_json::Value>(&stdout)
            .ok()
            .and_then(|v| {
                let msg = v.get("msg")?.as_str()?.to_owned();
                Some(match v.get("details").and_then(|d| d.as_str()) {
                    Some(d) if !d.is_empty() => format!("{msg}: {d}"),
                    _ => msg,
                })
            })
            .unwrap_or_else(|| {
                format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))
                    .trim()
                    .to_owned()
            });
        return Err(PodError::Plugin {
            command,
            pod: pod.to_owned(),
            status: out.status,
            message,
        });
    }
    Ok(stdout)
}

/// The first IPv4 address of a CNI result (`ips[].address`, a CIDR).
fn result_ipv4(output: &str) -> Option<Ipv4Addr> {
    let value: serde_json::Value = serde_json::from_str(output).ok()?;
    value.get("ips")?.as_array()?.iter().find_map(|entry| {
        let cidr = entry.get("address")?.as_str()?;
        cidr.split('/').next()?.parse().ok()
    })
}

fn container_id(lab: &str, cluster: &str, pod: &str) -> String {
    format!("{lab}-{cluster}-{pod}")
}

/// Adds pod `name` on node `node` of `cluster`: its namespace, then CNI ADD.
/// The pod is recorded before ADD, so a failed ADD is cleaned by `pod del` or
/// `lab down`.
///
/// # Errors
///
/// [`PodError`] (e.g. a duplicate name, or the plugin's error), or kernel errors.
pub fn add(
    lab: &mut LabState,
    bins: &Binaries,
    cluster: &str,
    node: u8,
    name: &str,
    labels: BTreeMap<String, String>,
) -> Result<PodRecord, LabError> {
    plan::validate_pod_name(name)?;
    let c = find_cluster(lab, cluster)?.clone();
    let n = c
        .nodes
        .iter()
        .find(|n| n.number == node)
        .ok_or_else(|| PodError::NoNode {
            cluster: cluster.to_owned(),
            node,
        })?
        .clone();
    if let Some(existing) = lab.pod(cluster, name) {
        return Err(PodError::Exists {
            cluster: cluster.to_owned(),
            pod: name.to_owned(),
            node: existing.node.clone(),
        }
        .into());
    }
    let mut record = PodRecord {
        cluster: cluster.to_owned(),
        node: n.name.clone(),
        name: name.to_owned(),
        netns: plan::pod_netns(&lab.name, c.id, n.number, name),
        container_id: container_id(&lab.name, cluster, name),
        ip: None,
        labels,
    };
    lab.pods.push(record.clone());
    lab.save()?;
    ip::add_netns(&record.netns)?;
    let output = run_cni(
        "ADD",
        bins,
        &n.netns,
        &n.cni_socket,
        name,
        &record.netns,
        &record.container_id,
        &record.labels,
    )?;
    let addr = result_ipv4(&output).ok_or_else(|| PodError::NoAddress {
        pod: name.to_owned(),
        output: output.clone(),
    })?;
    record.ip = Some(addr);
    if let Some(p) = lab
        .pods
        .iter_mut()
        .find(|p| p.cluster == cluster && p.name == name)
    {
        p.ip = Some(addr);
    }
    lab.save()?;
    Ok(record)
}

/// Deletes a pod: stops its processes, CNI DEL, removes its namespace.
///
/// # Errors
///
/// [`PodError::NotFound`], the plugin's error, or kernel errors.
pub fn del(lab: &mut LabState, bins: &Binaries, cluster: &str, name: &str) -> Result<(), LabError> {
    let record = lookup(lab, cluster, name)?.clone();
    for process in lab
        .processes
        .iter()
        .filter(|p| p.cluster == cluster && p.member.as_deref() == Some(name))
    {
        supervise::stop(process);
    }
    lab.processes
        .retain(|p| !(p.cluster == cluster && p.member.as_deref() == Some(name)));
    let c = find_cluster(lab, cluster)?;
    let node = c
        .nodes
        .iter()
        .find(|n| n.name == record.node)
        .ok_or_else(|| PodError::StaleNode {
            cluster: cluster.to_owned(),
            pod: name.to_owned(),
            node: record.node.clone(),
        })?
        .clone();
    if ip::netns_exists(&record.netns) {
        // DEL must succeed even when ADD never completed (CNI spec).
        run_cni(
            "DEL",
            bins,
            &node.netns,
            &node.cni_socket,
            name,
            &record.netns,
            &record.container_id,
            &record.labels,
        )?;
        for pid in ip::netns_pids(&record.netns)? {
            supervise::stop_pid(pid, None);
        }
        ip::del_netns(&record.netns)?;
    }
    lab.pods
        .retain(|p| !(p.cluster == cluster && p.name == name));
    lab.save()?;
    Ok(())
}

/// The pod `name` of `cluster`.
///
/// # Errors
///
/// [`PodError::NotFound`] listing the cluster's pods.
pub fn lookup<'a>(lab: &'a LabState, cluster: &str, name: &str) -> Result<&'a PodRecord, PodError> {
    lab.pod(cluster, name).ok_or_else(|| PodError::NotFound {
        cluster: cluster.to_owned(),
        pod: name.to_owned(),
        have: lab
            .pods
            .iter()
            .filter(|p| p.cluster == cluster)
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Starts the echo server in pod `name` (TCP and UDP on [`plan::ECHO_PORT`]) and
/// waits until it accepts connections.
///
/// # Errors
///
/// [`LabError`] when it does not start or not become ready.
pub fn start_echo(
    lab: &LabState,
    bins: &Binaries,
    cluster: &str,
    name: &str,
) -> Result<ProcessRecord, LabError> {
    let pod = lookup(lab, cluster, name)?.clone();
    let record = supervise::start(&Spec {
        role: Role::Echo,
        cluster: cluster.to_owned(),
        member: Some(name.to_owned()),
        netns: Some(pod.netns.clone()),
        program: bins.meshctl.clone(),
        args: vec![
            "echo-server".into(),
            format!("--cluster={cluster}"),
            format!("--node={}", pod.node),
            format!("--pod={name}"),
            format!("--port={}", plan::ECHO_PORT),
        ],
        log: Layout::new(&lab.dir)
            .logs()
            .join(format!("echo-{cluster}-{name}.log")),
        env: vec![],
    })?;
    let what = format!(
        "echo server of pod {cluster}/{name} to accept TCP on port {}",
        plan::ECHO_PORT
    );
    let netns = pod.netns.clone();
    supervise::wait_ready(&what, &record, READY_TIMEOUT, || {
        ip::in_netns(&netns, || {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, plan::ECHO_PORT));
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        })
        .map_err(|e| e.to_string())
    })?;
    Ok(record)
}

/// Runs `argv` inside pod `name`'s network namespace (host mount namespace,
/// so the pod sees the host's files and programs) and returns its exit status.
///
/// # Errors
///
/// [`PodError::NotFound`] or a spawn error.
pub fn exec(
    lab: &LabState,
    cluster: &str,
    name: &str,
    argv: &[String],
) -> Result<std::process::ExitStatus, LabError> {
    let pod = lookup(lab, cluster, name)?;
    Command::new("nsenter")
        .arg(format!("--net={}", netns_path(&pod.netns).display()))
        .arg("--")
        .args(argv)
        .status()
        .map_err(|source| {
            PodError::Spawn {
                plugin: PathBuf::from(argv.first().map_or("", String::as_str)),
                source,
            }
            .into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cni_result() {
        let out = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],
            "ips":[{"address":"fd00::5/64","interface":0},{"address":"10.1.2.7/24","gateway":"10.1.2.1","interface":0}]}"#;
        assert_eq!(result_ipv4(out), Some(Ipv4Addr::new(10, 1, 2, 7)));
        assert_eq!(result_ipv4(r#"{"ips":[]}"#), None);
        assert_eq!(result_ipv4("not json"), None);
    }

    #[test]
    fn network_config_carries_labels() {
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let config = network_config(Path::new("/run/x/cni.sock"), &labels, "1.0.0");
        assert_eq!(config["type"], "mesh-cni");
        assert_eq!(config["agentSocket"], "/run/x/cni.sock");
        assert_eq!(config["runtimeConfig"]["labels"]["app"], "web");
    }
}
