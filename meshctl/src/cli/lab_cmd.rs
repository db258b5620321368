//! `meshctl lab ...` and `meshctl probe`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::lab::state::{Encryption, Routing};
use crate::lab::{self, plan, pod, Binaries, Layout, UpOptions};
use crate::netprobe;
use crate::progress::Progress;

use super::{load, print_json, Cli, Output};

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

pub(super) fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
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

pub(super) fn lab_command(cli: &Cli, cmd: &LabCommand) -> Result<ExitCode> {
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

pub(super) fn render_lab_status(s: &lab::LabStatus) -> String {
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

pub(super) fn probe(args: &ProbeArgs) -> Result<ExitCode> {
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
