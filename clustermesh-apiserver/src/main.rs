//! `clustermesh-apiserver`: parses flags, wires SIGTERM/SIGINT, calls
//! [`clustermesh_apiserver::run`]. See the crate README for the flags.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use clustermesh_apiserver::config::{Args, Config, ConfigError};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match Config::try_from(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("clustermesh-apiserver: {e}");
            return ExitCode::from(ConfigError::EXIT_CODE as u8);
        }
    };
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clustermesh-apiserver: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn serve(config: Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    };
    clustermesh_apiserver::run(config, shutdown)
        .await
        .context("clustermesh-apiserver failed")
}
