//! `meshctl service ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::lab::plan;

use super::{load, print_json, Cli, Output};

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

/// The apiserver of `cluster`: `--apiserver` if given, else the lab's.
pub(super) fn apiserver_of(
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

pub(super) fn service_command(cli: &Cli, cmd: &ServiceCommand) -> Result<ExitCode> {
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
