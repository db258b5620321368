//! `node-agent`: parses flags, enters the node's network namespace, and runs
//! the agent until SIGTERM or SIGINT.

use std::{fs::File, process::ExitCode};

use clap::Parser;
use node_agent::config::{Config, Flags, EXIT_CONFIG};

fn main() -> ExitCode {
    let flags = match Flags::try_parse() {
        Ok(f) => f,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut flags = flags;
    if let Err(e) = pod_cidr_from_node(&mut flags) {
        eprintln!("node-agent: {e:#}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let config = match Config::from_flags(&flags) {
        Ok(c) => c,
        Err(errs) => {
            eprintln!("node-agent: {errs}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    // setns is per thread: enter the node's namespace on the main thread
    // before the runtime exists, so every worker thread inherits it.
    if let Some(name) = &config.netns {
        let path = std::path::Path::new("/run/netns").join(name);
        let entered = File::open(&path)
            .map_err(anyhow::Error::from)
            .and_then(|f| {
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(anyhow::Error::from)
            });
        if let Err(e) = entered {
            eprintln!(
                "node-agent: cannot enter network namespace {}: {e:#}",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("node-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(node_agent::agent::run(config, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// With `--source kubernetes` and no `--pod-cidr`, reads the pod CIDR from
/// this node's Node object, on a runtime of its own that ends before the
/// agent enters its network namespace.
fn pod_cidr_from_node(flags: &mut Flags) -> anyhow::Result<()> {
    let (true, None, Some(node)) = (
        flags.source == "kubernetes",
        &flags.pod_cidr,
        flags.node_name.clone(),
    ) else {
        return Ok(());
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let kubeconfig = flags.kubeconfig.as_ref().map(std::path::PathBuf::from);
    let cidr = runtime.block_on(node_agent::kubernetes::node_pod_cidr(
        kubeconfig.as_deref(),
        &node,
        std::time::Duration::from_secs(60),
    ))?;
    flags.pod_cidr = Some(cidr.to_string());
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent runs until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
