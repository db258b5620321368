//! The kernel seam of the lab: network namespaces, links, addresses and
//! sysctls, through the `ip` tool of iproute2, plus [`in_netns`] to run a
//! closure on a thread inside a namespace.
//!
//! Why `ip` rather than rtnetlink: the lab creates dozens of objects across
//! dozens of namespaces. `ip -n NAME` enters each namespace per call without
//! this process (or any of its threads) leaving the host namespace, `ip netns
//! add` creates the `/run/netns/NAME` bind mounts that `nsenter`, `ip netns pids`
//! and the node agent's `--netns NAME` resolve, and `ip -j` gives JSON to find
//! leftovers. Every call is one short-lived process whose command line and error
//! are reported as they were, which is what an operator debugging a lab wants to
//! see. The node agent, which owns a datapath, uses rtnetlink; a lab driver does
//! not need to.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `ip netns add` puts its namespace bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

/// A failed kernel operation of the lab.
#[derive(Debug, thiserror::Error)]
pub enum IpError {
    /// The command could not be started (e.g. `ip` missing).
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// `ip -j` printed something that is not the JSON we expect.
    #[error("cannot parse the JSON output of `{command}`")]
    Json {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Opening or entering a namespace failed.
    #[error("cannot enter network namespace {netns}")]
    Enter {
        /// The namespace name.
        netns: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tokio runtime could not start.
    #[error("cannot start an async runtime")]
    Runtime(#[source] std::io::Error),
}

/// Runs the future `f` makes to completion on a runtime of its own, from
/// inside network namespace `netns` when given (the lab's addresses exist
/// only there), else in this one.
///
/// # Errors
///
/// [`IpError::Enter`] or [`IpError::Runtime`]; the future's own result is
/// returned inside `Ok`.
pub fn block_on<T, Fut, F>(netns: Option<&str>, f: F) -> Result<T, IpError>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T>,
    F: FnOnce() -> Fut + Send + 'static,
{
    let run = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|runtime| runtime.block_on(f()))
            .map_err(IpError::Runtime)
    };
    match netns {
        Some(netns) => in_netns(netns, run)?,
        None => run(),
    }
}

/// Runs a command, returning its stdout; a non-zero exit is an [`IpError::Failed`].
///
/// # Errors
///
/// [`IpError::Spawn`] or [`IpError::Failed`].
pub fn run(program: &str, args: &[&str]) -> Result<String, IpError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| IpError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(IpError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS`.
///
/// # Errors
///
/// See [`run`].
pub fn ip(args: &[&str]) -> Result<String, IpError> {
    run("ip", args)
}

/// Runs `ip -n NETNS ARGS`.
///
/// # Errors
///
/// See [`run`].
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String, IpError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// The path of a named network namespace.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// Every named network namespace (`ip netns list`).
///
/// # Errors
///
/// See [`run`].
pub fn list_netns() -> Result<Vec<String>, IpError> {
    // `ip -j netns list` prints nothing at all (not `[]`) when there are none.
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Whether the named namespace exists.
pub fn netns_exists(netns: &str) -> bool {
    netns_path(netns).exists()
}

/// Creates a named namespace with its loopback up; an existing one is an error
/// (the caller cleans leftovers first).
///
/// # Errors
///
/// See [`run`].
pub fn add_netns(netns: &str) -> Result<(), IpError> {
    ip(&["netns", "add", netns])?;
    ip_in(netns, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a named namespace (its veth ends go with it).
///
/// # Errors
///
/// See [`run`].
pub fn del_netns(netns: &str) -> Result<(), IpError> {
    ip(&["netns", "del", netns]).map(drop)
}

/// PIDs of processes in the namespace (`ip netns pids`).
///
/// # Errors
///
/// See [`run`].
pub fn netns_pids(netns: &str) -> Result<Vec<i32>, IpError> {
    let out = ip(&["netns", "pids", netns])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Names of the links in a namespace.
///
/// # Errors
///
/// See [`run`]; [`IpError::Json`].
pub fn links(netns: &str) -> Result<Vec<String>, IpError> {
    #[derive(serde::Deserialize)]
    struct Link {
        ifname: String,
    }
    let out = ip_in(netns, &["-j", "link", "show"])?;
    let parsed: Vec<Link> = serde_json::from_str(&out).map_err(|source| IpError::Json {
        command: format!("ip -n {netns} -j link show"),
        source,
    })?;
    Ok(parsed.into_iter().map(|l| l.ifname).collect())
}

/// Creates a veth pair: `outer` in namespace `outer_ns`, `inner` in `inner_ns`.
///
/// # Errors
///
/// See [`run`].
pub fn add_veth(outer_ns: &str, outer: &str, inner_ns: &str, inner: &str) -> Result<(), IpError> {
    ip_in(
        outer_ns,
        &[
            "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", inner_ns,
        ],
    )
    .map(drop)
}

/// Sets a sysctl inside a namespace (never in the host's).
///
/// # Errors
///
/// See [`run`].
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<(), IpError> {
    let net = format!("--net={}", netns_path(netns).display());
    let assignment = format!("{key}={value}");
    run("nsenter", &[&net, "--", "sysctl", "-q", "-w", &assignment]).map(drop)
}

/// Runs `f` on a new thread that has entered network namespace `netns`, and
/// returns its result. The calling thread (and the rest of the process) stays
/// in its own namespace: `setns(CLONE_NEWNET)` only moves the calling thread.
///
/// # Errors
///
/// [`IpError::Enter`] when the namespace cannot be opened or entered.
pub fn in_netns<T, F>(netns: &str, f: F) -> Result<T, IpError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = netns_path(netns);
    let enter_error = |source| IpError::Enter {
        netns: netns.to_owned(),
        source,
    };
    let file = File::open(&path).map_err(enter_error)?;
    let joined = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        Ok(f())
    })
    .join();
    match joined {
        Ok(result) => result.map_err(enter_error),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
