//! Project automation, run as `cargo xtask <command>`.
//!
//! * `deps`: install the Debian packages the build and the tests need (idempotent).
//! * `test`: `deps`, then the whole test suite in strict mode: tests that need root, etcd or
//!   clang fail instead of skipping. This is the command `.ci/run` runs.
//! * `bench`: every benchmark of the workspace; each prints a ratio against a baseline
//!   measured in the same run.
//! * `fuzz`: builds the fuzz targets (`fuzz/`, cargo fuzz on stable with `--sanitizer none`;
//!   cargo-fuzz is installed from crates.io when missing) and runs each for a while. `test`
//!   runs each for [`FUZZ_SMOKE_SECONDS`] after the test suite.
//! * `demo`: `deps`, build, then a two-cluster lab (`meshctl lab up`), one cross-cluster
//!   request from a pod of `c1` to a pod of `c2`, and `meshctl clustermesh status`. The lab
//!   stays up for exploring; `target/debug/meshctl lab down --name demo` removes it.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Debian packages needed by the build (protoc for etcd-client and tonic, with the protobuf
/// well-known types `google/protobuf/*.proto` that etcd-client's protos import: Debian ships
/// those in `libprotobuf-dev`, which `protobuf-compiler` only recommends and
/// `--no-install-recommends` skips; clang and the kernel headers it pulls in for the eBPF
/// programs) and by the lab and the tests (etcd,
/// iproute2, tcpdump, iperf3 for the benchmarks, procps for `sysctl` inside namespaces,
/// bpftool for inspecting maps by hand).
const DEBIAN_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
    "clang",
    "bpftool",
    "iproute2",
    "iperf3",
    "tcpdump",
    "procps",
    // deploy/check.sh, run by the test suite: a venv for kubernetes-validate
    // (from PyPI) and shellcheck for the kind scripts.
    "python3-venv",
    "shellcheck",
    // multi-cluster-tests/tests/podman.rs: a real container runtime driving
    // mesh-cni (podman's CNI backend, runc, a busybox rootfs).
    "podman",
    "runc",
    "busybox-static",
];

/// The fuzz targets of `fuzz/` (one per decoder of remote or outside input).
const FUZZ_TARGETS: &[&str] = &["records", "etcd_config", "cni", "uapi", "grpc"];

/// How long `test` runs each fuzz target.
const FUZZ_SMOKE_SECONDS: u32 = 10;

#[derive(Debug, Parser)]
#[command(about = "Project automation for the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the Debian packages the build and the tests need.
    Deps,
    /// Install dependencies, then run the whole test suite (strict: nothing is skipped).
    Test {
        /// Extra arguments passed to `cargo test` after `--`, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run every benchmark (each prints its ratio against an in-run baseline).
    Bench,
    /// Build the fuzz targets and run each for a time or a number of executions.
    Fuzz {
        /// Seconds per target (ignored with `--runs`).
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Executions per target (e.g. 10000000), instead of a time.
        #[arg(long)]
        runs: Option<u64>,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Build, bring up a two-cluster lab, show a cross-cluster request and the mesh status.
    Demo {
        /// Encryption between nodes: `none` or `wireguard`.
        #[arg(long, default_value = "none")]
        encryption: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Deps => deps(),
        Cmd::Test { args } => {
            deps()?;
            test(&args)
        }
        Cmd::Bench => {
            deps()?;
            run(Command::new(cargo()).args(["bench", "--workspace"]))
        }
        Cmd::Fuzz {
            seconds,
            runs,
            targets,
        } => {
            deps()?;
            let limit = match runs {
                Some(n) => format!("-runs={n}"),
                None => format!("-max_total_time={seconds}"),
            };
            fuzz(&targets, &limit)
        }
        Cmd::Demo { encryption } => {
            deps()?;
            demo(&encryption)
        }
    }
}

/// The lab the demo brings up and leaves running.
const DEMO_LAB: &str = "demo";

fn demo(encryption: &str) -> Result<()> {
    if !is_root() {
        bail!("the lab needs root (network namespaces, eBPF): run `cargo xtask demo` as root");
    }
    // The same build as `cargo xtask test` (all targets: features are unified with the tests'
    // dev-dependencies), so running one after the other rebuilds nothing.
    run(Command::new(cargo()).args(["build", "--workspace", "--all-targets"]))?;
    let meshctl = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug/meshctl")
        .canonicalize()
        .context("finding target/debug/meshctl after the build")?;
    let meshctl = |args: &[&str]| -> Result<()> {
        eprintln!("\n$ meshctl {}", args.join(" "));
        run(Command::new(&meshctl).args(args))
    };
    meshctl(&[
        "lab",
        "up",
        "--name",
        DEMO_LAB,
        "--clusters",
        "2",
        "--nodes",
        "2",
        "--encryption",
        encryption,
    ])?;
    meshctl(&[
        "lab",
        "probe",
        "--name",
        DEMO_LAB,
        "c1/echo-c1-n1",
        "c2/echo-c2-n2",
    ])?;
    meshctl(&[
        "lab",
        "probe",
        "--name",
        DEMO_LAB,
        "c2/echo-c2-n1",
        "c1/echo-c1-n2",
        "--proto",
        "udp",
    ])?;
    meshctl(&["clustermesh", "status", "--name", DEMO_LAB])?;
    eprintln!(
        "\nthe lab is up: try `target/debug/meshctl lab status --name {DEMO_LAB}`; \
         remove it with `target/debug/meshctl lab down --name {DEMO_LAB}`"
    );
    Ok(())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Installs the missing Debian packages; does nothing when all are present.
fn deps() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask deps` as root (apt-get install)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", pkg])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| out.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

/// Builds everything once, then runs every test of the workspace in strict mode.
fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the test suite needs root (network namespaces, eBPF): run it as root");
    }
    run(Command::new(cargo()).args(["build", "--workspace", "--all-targets"]))?;
    run(Command::new(cargo())
        .args(["test", "--workspace", "--no-fail-fast", "--"])
        .args(args)
        .env("MESH_TEST_STRICT", "1"))?;
    if args.is_empty() {
        fuzz(&[], &format!("-max_total_time={FUZZ_SMOKE_SECONDS}"))?;
    }
    Ok(())
}

/// Builds the fuzz targets and runs `targets` (all when empty), each with
/// the libFuzzer `limit` (`-runs=N` or `-max_total_time=S`), on the seeds of
/// `fuzz/seeds/` and the corpus it grows in `fuzz/corpus/`. A crash fails.
fn fuzz(targets: &[String], limit: &str) -> Result<()> {
    let has_cargo_fuzz = Command::new(cargo())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_cargo_fuzz {
        run(Command::new(cargo()).args(["install", "cargo-fuzz", "--locked"]))?;
    }
    // `--sanitizer none`: cargo fuzz's only mode on stable Rust (coverage
    // instrumentation without AddressSanitizer, which the safe code here
    // needs least).
    run(Command::new(cargo()).args(["fuzz", "build", "--sanitizer", "none"]))?;
    let all: Vec<String> = FUZZ_TARGETS.iter().map(|t| (*t).to_owned()).collect();
    for target in if targets.is_empty() { &all } else { targets } {
        let corpus = format!("fuzz/corpus/{target}");
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {corpus}"))?;
        run(Command::new(cargo())
            .args(["fuzz", "run", "--sanitizer", "none", target, &corpus])
            .arg(format!("fuzz/seeds/{target}"))
            .args(["--", limit, "-print_final_stats=1"]))?;
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}
