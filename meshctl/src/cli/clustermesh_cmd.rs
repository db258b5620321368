//! `meshctl clustermesh ...`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use crate::clustermesh::{self, access::EtcdAdmin, config::EtcdConfig, status};
use crate::lab::{self, plan, Layout};
use crate::pki::ClusterPki;
use kvstore::auth;

use super::{load, print_json, Cli, Output};

/// `meshctl clustermesh ...`
#[derive(Debug, Subcommand)]
pub enum ClustermeshCommand {
    /// Certificates for a cluster's etcd, and its users and roles with
    /// authentication on (in a lab: etcd itself, restarted with mutual TLS).
    Enable {
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// Outside a lab: write the PKI here (root, apiserver and local
        /// client certificates included).
        #[arg(long)]
        pki_dir: Option<PathBuf>,
        /// Outside a lab: IP addresses etcd serves on (server certificate SANs).
        #[arg(long, value_delimiter = ',')]
        server_ip: Vec<std::net::IpAddr>,
        /// Outside a lab: the etcd (already running with the printed flags)
        /// whose users and roles to set up, as root.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
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
    /// cluster's agents read `--cluster`'s etcd, as its read-only user
    /// `remote-<reader>` (created).
    Export {
        /// The cluster to be read.
        #[arg(long)]
        cluster: String,
        /// Name of the reading cluster.
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
    /// Delete the read-only user `remote-<reader>` from `--cluster`'s etcd:
    /// the certificate `export` gave it no longer authenticates.
    Revoke {
        /// The cluster that was read.
        #[arg(long)]
        cluster: String,
        /// Name of the reading cluster.
        #[arg(long)]
        reader: String,
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

/// The administrator of an etcd outside a lab, reached from here.
fn external_admin<'a>(
    cluster: &'a str,
    pki: &'a ClusterPki,
    endpoints: &[String],
) -> EtcdAdmin<'a> {
    EtcdAdmin {
        cluster,
        pki,
        endpoints: endpoints.to_vec(),
        netns: None,
    }
}

pub(super) fn clustermesh_command(cli: &Cli, cmd: &ClustermeshCommand) -> Result<ExitCode> {
    match cmd {
        ClustermeshCommand::Enable {
            cluster,
            pki_dir: Some(dir),
            server_ip,
            endpoints,
        } => {
            if server_ip.is_empty() {
                bail!("--pki-dir needs --server-ip (the addresses etcd serves on)");
            }
            let pki = ClusterPki::new(dir);
            pki.enable(cluster, server_ip)?;
            for user in [auth::ROOT_USER, auth::APISERVER_USER, auth::LOCAL_READER] {
                pki.issue_client(user)?;
            }
            println!(
                "PKI of {cluster} in {}: run etcd with --client-cert-auth --trusted-ca-file {} --cert-file {} --key-file {}; the apiserver uses client-{}.crt, the agents client-{}.crt",
                dir.display(),
                pki.ca_cert().display(),
                pki.server().cert.display(),
                pki.server().key.display(),
                auth::APISERVER_USER,
                auth::LOCAL_READER,
            );
            if endpoints.is_empty() {
                println!("then run this again with --endpoints to set up etcd's users and roles");
            } else {
                external_admin(cluster, &pki, endpoints).enable()?;
                println!("etcd of {cluster}: users and roles set up, authentication on");
                // Configs for the cluster's own apiserver and agents.
                for (user, sub) in [
                    (auth::APISERVER_USER, "apiserver"),
                    (auth::LOCAL_READER, "local"),
                ] {
                    let client = pki.client(user);
                    let path = EtcdConfig {
                        endpoints: endpoints.clone(),
                        trusted_ca_file: Some(pki.ca_cert()),
                        cert_file: Some(client.cert),
                        key_file: Some(client.key),
                        allowed_pod_cidrs: Vec::new(),
                        allowed_node_cidrs: Vec::new(),
                    }
                    .install(&dir.join(sub), cluster)?;
                    println!("wrote {} (etcd user {user})", path.display());
                }
            }
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
            let user = auth::remote_reader(reader);
            let (pki, endpoints) = match pki_dir {
                Some(dir) => {
                    if endpoints.is_empty() {
                        bail!("--pki-dir needs --endpoints (the etcd URLs the reader dials)");
                    }
                    let pki = ClusterPki::new(dir);
                    external_admin(cluster, &pki, endpoints).add_reader(&user)?;
                    (pki, endpoints.clone())
                }
                None => {
                    let state = load(cli)?;
                    lab::add_reader(&state, cluster, &user)?;
                    let c = lab::find_cluster(&state, cluster)?;
                    (
                        Layout::new(&state.dir).pki(cluster),
                        vec![format!("https://{}:{}", c.control_ip, plan::ETCD_TLS_PORT)],
                    )
                }
            };
            let client = pki.issue_client(&user)?;
            let path = EtcdConfig {
                endpoints,
                trusted_ca_file: Some(pki.ca_cert()),
                cert_file: Some(client.cert),
                key_file: Some(client.key),
                allowed_pod_cidrs: Vec::new(),
                allowed_node_cidrs: Vec::new(),
            }
            .install(output, cluster)?;
            println!("wrote {}", path.display());
        }
        ClustermeshCommand::Revoke {
            cluster,
            reader,
            pki_dir,
            endpoints,
        } => {
            let user = auth::remote_reader(reader);
            let revoked = match pki_dir {
                Some(dir) => {
                    if endpoints.is_empty() {
                        bail!("--pki-dir needs --endpoints (the etcd to revoke the user in)");
                    }
                    external_admin(cluster, &ClusterPki::new(dir), endpoints).revoke(&user)?
                }
                None => lab::revoke_reader(&load(cli)?, cluster, &user)?,
            };
            if revoked {
                println!("etcd of {cluster}: user {user} deleted");
            } else {
                println!("etcd of {cluster}: there was no user {user}");
            }
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
