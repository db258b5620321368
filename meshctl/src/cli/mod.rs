//! Flags and dispatch of the `meshctl` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::lab::state::LabState;
use crate::lab::{self, plan};
use crate::netprobe;

mod clustermesh_cmd;
mod lab_cmd;
mod service_cmd;

use clustermesh_cmd::clustermesh_command;
pub use clustermesh_cmd::{ClustermeshCommand, ConnectArgs};
use lab_cmd::{lab_command, probe};
pub use lab_cmd::{LabCommand, PodCommand, ProbeArgs, ProbeProto};
use service_cmd::service_command;
pub use service_cmd::{ServiceAddArgs, ServiceCommand};

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::lab_cmd::parse_labels;
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
