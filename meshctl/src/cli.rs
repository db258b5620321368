//! Flags and dispatch of the `meshctl` binary.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::clustermesh::{self, config::EtcdConfig, status};
use crate::lab::state::{Encryption, LabState, Routing};
use crate::lab::{self, plan, pod, Binaries, Layout, UpOptions};
use crate::netprobe;
use crate::pki::ClusterPki;
use crate::progress::Progress;

/// The mesh's command line.
#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Multi-cluster lab and clustermesh control for the mesh"
)]
pub struct Cli {
    /// Lab name (prefix of every namespace the lab makes).
    #[arg(long = "name", global = true, env = "MESH_LAB", default_value = plan::DEFAULT_LAB)]
    pub lab: String,
    /// Parent directory of lab directories.
    #[arg(long, global = true, env = "MESH_LAB_ROOT", default_value = lab::DEFAULT_ROOT)]
    pub lab_root: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A multi-cluster lab of network namespaces on this host.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Join clusters and show the state of the mesh.
    #[command(subcommand)]
    Clustermesh(ClustermeshCommand),
    /// Declare, delete and list services (global services across clusters).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Send one request to an echo server (run it in a pod with `lab exec`).
    Probe(ProbeArgs),
    /// Run an echo server (what every echo pod runs).
    #[command(hide = true)]
    EchoServer {
        /// Cluster to announce.
        #[arg(long)]
        cluster: String,
        /// Node to announce.
        #[arg(long)]
        node: String,
        /// Pod to announce.
        #[arg(long)]
        pod: String,
        /// TCP and UDP port.
        #[arg(long, default_value_t = plan::ECHO_PORT)]
        port: u16,
    },
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For programs.
    Json,
}

/// `meshctl lab ...`
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build the lab: namespaces, etcd, apiservers, agents, echo pods, connections.
    Up {
        /// Number of clusters.
        #[arg(long, default_value_t = 2)]
        clusters: u8,
        /// Nodes per cluster.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// How pod traffic crosses nodes.
        #[arg(long, value_enum, default_value_t = Routing::Tunnel)]
        routing: Routing,
        /// Node-to-node encryption.
        #[arg(long, value_enum, default_value_t = Encryption::None)]
        encryption: Encryption,
        /// Do not connect the clusters to each other.
        #[arg(long)]
        no_connect: bool,
        /// How long to wait for `clustermesh status` to be ready (0: do not wait).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3m")]
        wait_duration: Duration,
    },
    /// Remove everything the lab made.
    Down,
    /// Clusters, nodes, pods and process health.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Add or delete pods.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Send one request from one pod to another's echo server:
    /// `lab probe c1/echo-c1-n1 c2/echo-c2-n1 --proto tcp`.
    Probe {
        /// `<cluster>/<pod>` to send from.
        from: String,
        /// `<cluster>/<pod>` to send to (it must run an echo server for tcp/udp).
        to: String,
        /// Protocol.
        #[arg(long, value_enum, default_value_t = ProbeProto::Tcp)]
        proto: ProbeProto,
        /// Message to send.
        #[arg(long, default_value = "hello")]
        message: String,
        /// Give up after.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        timeout: Duration,
    },
    /// Run a command in a pod's network namespace: `lab exec c1/echo-c1-n1 -- ip addr`.
    Exec {
        /// `<cluster>/<pod>`.
        pod: String,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// `meshctl lab pod ...`
#[derive(Debug, Subcommand)]
pub enum PodCommand {
    /// Create a pod namespace and wire it with mesh-cni (CNI ADD).
    Add {
        /// `<cluster>/<node>/<name>`, e.g. `c1/n2/web`.
        pod: String,
        /// Labels, `k=v,k2=v2`.
        #[arg(long, value_parser = parse_labels, default_value = "")]
        labels: BTreeMap<String, String>,
        /// Also run an echo server in it.
        #[arg(long)]
        echo: bool,
    },
    /// CNI DEL and remove the pod namespace.
    Del {
        /// `<cluster>/<node>/<name>` or `<cluster>/<name>`.
        pod: String,
    },
}

/// `meshctl clustermesh ...`
#[derive(Debug, Subcommand)]
pub enum ClustermeshCommand {
    /// Certificates for a cluster's etcd, and (in a lab) etcd with mutual TLS.
    Enable {
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// Outside a lab: write the PKI here and start nothing.
        #[arg(long)]
        pki_dir: Option<PathBuf>,
        /// Outside a lab: IP addresses etcd serves on (server certificate SANs).
        #[arg(long, value_delimiter = ',')]
        server_ip: Vec<std::net::IpAddr>,
    },
    /// Let the agents of `--source` read `--destination` (and the other way round).
    Connect(ConnectArgs),
    /// Undo `connect`.
    Disconnect {
        /// The reading cluster.
        #[arg(long)]
        source: String,
        /// The cluster read.
        #[arg(long)]
        destination: String,
        /// Only source stops reading destination.
        #[arg(long)]
        unidirectional: bool,
    },
    /// Write a Cilium-style config (and a client certificate) with which another
    /// cluster's agents read `--cluster`'s etcd.
    Export {
        /// The cluster to be read.
        #[arg(long)]
        cluster: String,
        /// Name of the reading cluster (the client certificate's CN).
        #[arg(long)]
        reader: String,
        /// Directory to write `<cluster>` and its certificates into.
        #[arg(long)]
        output: PathBuf,
        /// Outside a lab: the PKI directory of `enable --pki-dir`.
        #[arg(long)]
        pki_dir: Option<PathBuf>,
        /// Outside a lab: etcd endpoints.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
    },
    /// The state of the mesh, from every node agent.
    Status {
        /// Only this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Wait until ready; non-zero exit with the reasons at the deadline.
        #[arg(long)]
        wait: bool,
        /// Deadline of `--wait`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
        wait_duration: Duration,
        /// Outside a lab: agent status sockets to read (`NODE=PATH` or `PATH`).
        #[arg(long = "status-socket")]
        status_sockets: Vec<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// `meshctl service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Declare (or replace) a service with the cluster's apiserver.
    Add(ServiceAddArgs),
    /// Delete a service.
    Del {
        /// The cluster.
        cluster: String,
        /// `<namespace>/<name>`.
        service: String,
        /// Outside a lab: the apiserver's gRPC URL.
        #[arg(long)]
        apiserver: Option<String>,
    },
    /// Every frontend with its backends per cluster, as the agents programmed it.
    List {
        /// Only this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// `meshctl service add`.
#[derive(Debug, Args)]
pub struct ServiceAddArgs {
    /// The cluster.
    pub cluster: String,
    /// `<namespace>/<name>`.
    pub service: String,
    /// `IP:PORT/PROTO`; repeat for more cluster IPs (same port and protocol).
    #[arg(long, required = true)]
    pub frontend: Vec<String>,
    /// Where backends listen: a port number or a named port of the endpoints.
    #[arg(long)]
    pub target_port: Option<String>,
    /// Port name; remote backends are matched to frontends by it.
    #[arg(long, default_value = "")]
    pub port_name: String,
    /// Endpoints of the namespace with these labels, `k=v,k2=v2`.
    #[arg(long, default_value = "")]
    pub selector: String,
    /// `service.cilium.io/global: "true"`: backends of every cluster.
    #[arg(long)]
    pub global: bool,
    /// `service.cilium.io/shared`: `--shared=false` keeps this cluster's
    /// backends out of the export (it still uses remote ones).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 1, require_equals = true)]
    pub shared: bool,
    /// `service.cilium.io/affinity`.
    #[arg(long, value_enum, default_value_t = crate::service::Affinity::None)]
    pub affinity: crate::service::Affinity,
    /// Outside a lab: the apiserver's gRPC URL.
    #[arg(long)]
    pub apiserver: Option<String>,
}

/// `meshctl clustermesh connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The reading cluster.
    #[arg(long)]
    pub source: String,
    /// The cluster read (a lab cluster).
    #[arg(
        long,
        required_unless_present = "destination_config",
        conflicts_with = "destination_config"
    )]
    pub destination: Option<String>,
    /// An external cluster, as a Cilium-style etcd config file.
    #[arg(long)]
    pub destination_config: Option<PathBuf>,
    /// With `--destination-config`: which cluster of that etcd.
    #[arg(long, requires = "destination_config")]
    pub destination_name: Option<String>,
    /// Only the source reads the destination.
    #[arg(long)]
    pub unidirectional: bool,
}

/// `meshctl probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Protocol.
    #[arg(value_enum)]
    pub proto: ProbeProto,
    /// Target IP (port 8080 for tcp/udp unless given as IP:PORT).
    pub target: String,
    /// Message to send.
    #[arg(long, default_value = "hello")]
    pub message: String,
    /// Give up after.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub timeout: Duration,
}

/// Probe protocols.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProbeProto {
    /// TCP echo.
    Tcp,
    /// UDP echo.
    Udp,
    /// ICMP echo.
    Icmp,
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("label {kv:?} is not k=v"))?;
            if k.is_empty() {
                return Err(format!("label {kv:?} has an empty key"));
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Runs a parsed command line; errors are printed with their causes.
pub fn run(cli: Cli) -> ExitCode {
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> Result<LabState> {
    plan::validate_lab_name(&cli.lab)?;
    Ok(LabState::load(
        &cli.lab,
        &lab::lab_dir(&cli.lab_root, &cli.lab),
    )?)
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("status serializes")
    );
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Lab(cmd) => lab_command(&cli, cmd),
        Command::Clustermesh(cmd) => clustermesh_command(&cli, cmd),
        Command::Service(cmd) => service_command(&cli, cmd),
        Command::Probe(args) => probe(args),
        Command::EchoServer {
            cluster,
            node,
            pod,
            port,
        } => {
            netprobe::run_echo_server(
                netprobe::EchoIdentity {
                    cluster: cluster.clone(),
                    node: node.clone(),
                    pod: pod.clone(),
                },
                *port,
            )
            .context("echo server")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn lab_command(cli: &Cli, cmd: &LabCommand) -> Result<ExitCode> {
    let progress = Progress::stderr();
    match cmd {
        LabCommand::Up {
            clusters,
            nodes,
            routing,
            encryption,
            no_connect,
            wait_duration,
        } => {
            let lab = lab::up(
                &UpOptions {
                    name: cli.lab.clone(),
                    root: cli.lab_root.clone(),
                    clusters: *clusters,
                    nodes: *nodes,
                    routing: *routing,
                    encryption: *encryption,
                    connect: !no_connect,
                    wait: (!wait_duration.is_zero()).then_some(*wait_duration),
                },
                &progress,
            )?;
            // Name the lab in the hints unless it is the default one, so
            // they work when pasted.
            let name = if lab.name == plan::DEFAULT_LAB {
                String::new()
            } else {
                format!(" --name {}", lab.name)
            };
            progress.note(format!(
                "lab {} is up: `meshctl lab status{name}`, `meshctl clustermesh status{name}`, \
                 `meshctl lab down{name}`; logs in {}",
                lab.name,
                Layout::new(&lab.dir).logs().display()
            ));
        }
        LabCommand::Down => {
            let report = lab::down(&cli.lab, &cli.lab_root, &progress)?;
            progress.note(format!(
                "lab {}: stopped {} processes, removed {} namespaces and {} bpffs mounts",
                cli.lab,
                report.processes,
                report.namespaces.len(),
                report.mounts.len()
            ));
        }
        LabCommand::Status { output } => {
            let state = load(cli)?;
            let status = lab::status(&state);
            match output {
                Output::Json => print_json(&status),
                Output::Text => print!("{}", render_lab_status(&status)),
            }
            if status.processes.iter().any(|p| !p.running) {
                return Ok(ExitCode::FAILURE);
            }
        }
        LabCommand::Pod(PodCommand::Add {
            pod: addr,
            labels,
            echo,
        }) => {
            let mut state = load(cli)?;
            let bins = Binaries::discover()?;
            let addr = plan::parse_pod_address(addr)?;
            let cluster = plan::cluster_name(addr.cluster);
            let record = pod::add(
                &mut state,
                &bins,
                &cluster,
                addr.node,
                &addr.pod,
                labels.clone(),
            )?;
            if *echo {
                let process = pod::start_echo(&state, &bins, &cluster, &addr.pod)?;
                state.record_process(process)?;
            }
            println!(
                "pod {cluster}/{} on {} in namespace {}: {}",
                record.name,
                record.node,
                record.netns,
                record
                    .ip
                    .map_or("no address".to_owned(), |ip| ip.to_string())
            );
        }
        LabCommand::Pod(PodCommand::Del { pod: addr }) => {
            let mut state = load(cli)?;
            let bins = Binaries::discover()?;
            let (cluster, name) = match plan::parse_pod_address(addr) {
                Ok(a) => (plan::cluster_name(a.cluster), a.pod),
                Err(_) => {
                    let (c, p) = plan::parse_cluster_pod(addr)?;
                    (plan::cluster_name(c), p)
                }
            };
            pod::del(&mut state, &bins, &cluster, &name)?;
        }
        LabCommand::Probe {
            from,
            to,
            proto,
            message,
            timeout,
        } => {
            let state = load(cli)?;
            let (fc, fpod) = plan::parse_cluster_pod(from)?;
            let (tc, tpod) = plan::parse_cluster_pod(to)?;
            let source = pod::lookup(&state, &plan::cluster_name(fc), &fpod)?.clone();
            let target = pod::lookup(&state, &plan::cluster_name(tc), &tpod)?.clone();
            let ip = target
                .ip
                .with_context(|| format!("pod {to} has no address"))?;
            let args = ProbeArgs {
                proto: *proto,
                target: ip.to_string(),
                message: message.clone(),
                timeout: *timeout,
            };
            println!(
                "{from} ({}) -> {to} ({ip}), {proto:?}",
                source.ip.map_or("-".into(), |i| i.to_string())
            );
            return lab::ip::in_netns(&source.netns, move || {
                probe(&args).map_err(|e| format!("{e:#}"))
            })?
            .map_err(anyhow::Error::msg);
        }
        LabCommand::Exec { pod: addr, command } => {
            let state = load(cli)?;
            let (c, name) = plan::parse_cluster_pod(addr)?;
            let status = pod::exec(&state, &plan::cluster_name(c), &name, command)?;
            return Ok(ExitCode::from(
                u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render_lab_status(s: &lab::LabStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Lab {} ({}), routing {}, encryption {}",
        s.name,
        s.dir.display(),
        s.routing.as_str(),
        s.encryption.as_str()
    );
    for c in &s.clusters {
        let _ = writeln!(
            out,
            "cluster {} (id {}): control {} {}, pods {}",
            c.name, c.id, c.control_netns, c.control_ip, c.pod_cidr
        );
        for n in &c.nodes {
            let _ = writeln!(
                out,
                "  node {}: {} {} pods {}",
                n.name, n.netns, n.ip, n.pod_cidr
            );
            for p in s.pods.iter().filter(|p| p.node == n.name) {
                let labels: Vec<String> =
                    p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(
                    out,
                    "    pod {}: {} {} [{}]",
                    p.name,
                    p.netns,
                    p.ip.map_or("-".to_owned(), |ip| ip.to_string()),
                    labels.join(",")
                );
            }
        }
    }
    for conn in &s.connections {
        let _ = writeln!(
            out,
            "connection: {} reads {}",
            conn.source, conn.destination
        );
    }
    for p in &s.processes {
        let _ = writeln!(
            out,
            "process {:?} {}{} pid {}: {} (log {})",
            p.role,
            p.cluster,
            p.member
                .as_deref()
                .map(|m| format!("/{m}"))
                .unwrap_or_default(),
            p.pid,
            if p.running { "running" } else { "NOT RUNNING" },
            p.log.display()
        );
    }
    out
}

fn clustermesh_command(cli: &Cli, cmd: &ClustermeshCommand) -> Result<ExitCode> {
    match cmd {
        ClustermeshCommand::Enable {
            cluster,
            pki_dir: Some(dir),
            server_ip,
        } => {
            if server_ip.is_empty() {
                bail!("--pki-dir needs --server-ip (the addresses etcd serves on)");
            }
            let pki = ClusterPki::new(dir);
            pki.enable(cluster, server_ip)?;
            pki.issue_client(lab::LOCAL_READER)?;
            println!(
                "PKI of {cluster} in {}: run etcd with --client-cert-auth --trusted-ca-file {} --cert-file {} --key-file {}",
                dir.display(),
                pki.ca_cert().display(),
                pki.server().cert.display(),
                pki.server().key.display()
            );
        }
        ClustermeshCommand::Enable { cluster, .. } => {
            let mut state = load(cli)?;
            lab::restart_etcd(&mut state, cluster)?;
            println!("cluster {cluster}: etcd runs with mutual TLS");
        }
        ClustermeshCommand::Connect(args) => {
            let mut state = load(cli)?;
            if let Some(file) = &args.destination_config {
                let name = clustermesh::connect_external(
                    &mut state,
                    &args.source,
                    file,
                    args.destination_name.as_deref(),
                )?;
                println!(
                    "{} reads external cluster {name}; for the other direction give that cluster the output of `meshctl clustermesh export --cluster {} --reader {name} --output DIR`",
                    args.source, args.source
                );
            } else {
                let destination = args.destination.as_deref().expect("clap requires it");
                lab::connect(&mut state, &args.source, destination, !args.unidirectional)?;
                let arrow = if args.unidirectional { "->" } else { "<->" };
                println!("connected {} {arrow} {destination}", args.source);
            }
        }
        ClustermeshCommand::Disconnect {
            source,
            destination,
            unidirectional,
        } => {
            let mut state = load(cli)?;
            let both = state.cluster(destination).is_some() && !unidirectional;
            if state.cluster(destination).is_some() {
                lab::disconnect(&mut state, source, destination, !unidirectional)?;
            } else {
                // An external cluster: only our side has files to remove.
                let src = lab::find_cluster(&state, source)?.clone();
                for node in &src.nodes {
                    clustermesh::config::uninstall(&node.clustermesh_dir, destination)?;
                }
                state
                    .connections
                    .retain(|c| !(c.source == *source && c.destination == *destination));
                state.save()?;
            }
            if both {
                println!("disconnected {source} <-> {destination}");
            } else {
                println!("disconnected {source} from {destination}");
            }
        }
        ClustermeshCommand::Export {
            cluster,
            reader,
            output,
            pki_dir,
            endpoints,
        } => {
            let (pki, endpoints) = match pki_dir {
                Some(dir) => {
                    if endpoints.is_empty() {
                        bail!("--pki-dir needs --endpoints (the etcd URLs the reader dials)");
                    }
                    (ClusterPki::new(dir), endpoints.clone())
                }
                None => {
                    let state = load(cli)?;
                    let c = lab::find_cluster(&state, cluster)?;
                    (
                        Layout::new(&state.dir).pki(cluster),
                        vec![format!("https://{}:{}", c.control_ip, plan::ETCD_TLS_PORT)],
                    )
                }
            };
            let client = pki.issue_client(reader)?;
            let path = EtcdConfig {
                endpoints,
                trusted_ca_file: Some(pki.ca_cert()),
                cert_file: Some(client.cert),
                key_file: Some(client.key),
            }
            .install(output, cluster)?;
            println!("wrote {}", path.display());
        }
        ClustermeshCommand::Status {
            cluster,
            wait,
            wait_duration,
            status_sockets,
            output,
        } => {
            let result = if status_sockets.is_empty() {
                let state = load(cli)?;
                if *wait {
                    status::wait_ready(&state, cluster.as_deref(), *wait_duration)
                } else {
                    Ok(status::lab_status(&state, cluster.as_deref())?)
                }
            } else {
                let nodes: Vec<status::NodeSource> = status_sockets
                    .iter()
                    .map(|s| {
                        let (node, path) = s.split_once('=').unwrap_or((s.as_str(), s.as_str()));
                        status::NodeSource {
                            node: node.to_owned(),
                            socket: PathBuf::from(path),
                            config_dir: None,
                            log: None,
                        }
                    })
                    .collect();
                let name = cluster.clone().unwrap_or_else(|| {
                    nodes
                        .iter()
                        .find_map(|n| status::read_agent_status(&n.socket).ok())
                        .map(|s| s.cluster_name)
                        .unwrap_or_default()
                });
                Ok(vec![status::aggregate(&name, &nodes, None)])
            };
            let statuses = match result {
                Ok(s) => s,
                Err(e @ status::StatusError::NotReady { .. }) => {
                    eprintln!("Error: {e}");
                    return Ok(ExitCode::FAILURE);
                }
                Err(e) => return Err(e.into()),
            };
            match output {
                Output::Json => print_json(&statuses),
                Output::Text => print!("{}", status::render(&statuses)),
            }
            if statuses.iter().any(|s| !s.ready) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The apiserver of `cluster`: `--apiserver` if given, else the lab's.
fn apiserver_of(
    cli: &Cli,
    cluster: &str,
    url: Option<&String>,
) -> Result<crate::service::Apiserver> {
    if let Some(url) = url {
        return Ok(crate::service::Apiserver {
            url: url.clone(),
            netns: None,
        });
    }
    let state = load(cli)?;
    let c = state
        .cluster(cluster)
        .with_context(|| format!("lab {} has no cluster {cluster}", state.name))?;
    Ok(crate::service::Apiserver {
        url: format!("http://{}:{}", c.control_ip, plan::APISERVER_GRPC_PORT),
        netns: Some(c.control_netns.clone()),
    })
}

fn service_command(cli: &Cli, cmd: &ServiceCommand) -> Result<ExitCode> {
    use crate::service;
    match cmd {
        ServiceCommand::Add(args) => {
            let (namespace, name) = service::parse_name(&args.service)?;
            let (frontend_ips, port, protocol) = service::parse_frontends(&args.frontend)?;
            let target = match &args.target_port {
                Some(t) => service::parse_target(t)?,
                None => mesh_proto::model::TargetPort::Number(port),
            };
            let request = service::ServiceRequest {
                namespace,
                name,
                frontend_ips,
                port,
                protocol,
                port_name: args.port_name.clone(),
                target,
                selector: service::parse_selector(&args.selector)?,
                global: args.global,
                shared: args.shared,
                affinity: args.affinity,
            };
            let api = apiserver_of(cli, &args.cluster, args.apiserver.as_ref())?;
            service::add(&api, &request)?;
            println!("service {} declared in {}", args.service, args.cluster);
        }
        ServiceCommand::Del {
            cluster,
            service: svc,
            apiserver,
        } => {
            let (namespace, name) = service::parse_name(svc)?;
            let api = apiserver_of(cli, cluster, apiserver.as_ref())?;
            if service::delete(&api, &namespace, &name)? {
                println!("service {svc} deleted from {cluster}");
            } else {
                eprintln!("Error: cluster {cluster} has no service {svc}");
                return Ok(ExitCode::FAILURE);
            }
        }
        ServiceCommand::List { cluster, output } => {
            let state = load(cli)?;
            let clusters: Vec<service::ClusterServices> = state
                .clusters
                .iter()
                .filter(|c| cluster.as_ref().is_none_or(|want| *want == c.name))
                .map(|c| {
                    let nodes: Vec<(String, PathBuf)> = c
                        .nodes
                        .iter()
                        .map(|n| (n.name.clone(), n.status_socket.clone()))
                        .collect();
                    service::cluster_services(&c.name, &nodes)
                })
                .collect();
            if let Some(want) = cluster {
                if clusters.is_empty() {
                    bail!("lab {} has no cluster {want}", state.name);
                }
            }
            match output {
                Output::Json => print_json(&clusters),
                Output::Text => print!("{}", service::render(&clusters)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn probe(args: &ProbeArgs) -> Result<ExitCode> {
    let addr: SocketAddr = match args.target.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let ip: Ipv4Addr = args
                .target
                .parse()
                .with_context(|| format!("target {:?} is not IP or IP:PORT", args.target))?;
            SocketAddr::from((ip, plan::ECHO_PORT))
        }
    };
    match args.proto {
        ProbeProto::Tcp | ProbeProto::Udp => {
            let reply = if matches!(args.proto, ProbeProto::Tcp) {
                netprobe::tcp_request(addr, &args.message, args.timeout)?
            } else {
                netprobe::udp_request(addr, &args.message, args.timeout)?
            };
            println!(
                "reply from cluster={} node={} pod={}: {}",
                reply.from.cluster, reply.from.node, reply.from.pod, reply.message
            );
        }
        ProbeProto::Icmp => {
            let SocketAddr::V4(v4) = addr else {
                bail!("icmp probes are IPv4 only");
            };
            let rtt = netprobe::icmp_echo(*v4.ip(), args.timeout)?;
            println!(
                "echo reply from {} in {:.2} ms",
                v4.ip(),
                rtt.as_secs_f64() * 1e3
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(
            parse_labels("app=web,tier=fe").unwrap(),
            BTreeMap::from([("app".into(), "web".into()), ("tier".into(), "fe".into())])
        );
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("app").unwrap_err().contains("not k=v"));
        assert!(parse_labels("=x").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "meshctl",
            "lab",
            "exec",
            "c1/echo-c1-n1",
            "--",
            "ip",
            "-br",
            "addr",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Lab(LabCommand::Exec { ref command, .. }) if command == &["ip", "-br", "addr"]
        ));
        assert!(
            Cli::try_parse_from(["meshctl", "clustermesh", "connect", "--source", "c1"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "meshctl",
            "service",
            "add",
            "c2",
            "default/web",
            "--frontend",
            "10.96.0.10:80/TCP",
            "--target-port",
            "8080",
            "--selector",
            "app=web",
            "--global",
            "--shared=false",
            "--affinity",
            "local",
        ])
        .unwrap();
        let Command::Service(ServiceCommand::Add(args)) = cli.command else {
            panic!("not service add");
        };
        assert!(args.global && !args.shared);
        assert_eq!(args.affinity, crate::service::Affinity::Local);
        let defaults = Cli::try_parse_from([
            "meshctl",
            "service",
            "add",
            "c1",
            "default/web",
            "--frontend",
            "10.96.0.10:80",
        ])
        .unwrap();
        let Command::Service(ServiceCommand::Add(args)) = defaults.command else {
            panic!("not service add");
        };
        assert!(!args.global && args.shared);
    }
}
