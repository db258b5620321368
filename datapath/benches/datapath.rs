//! Datapath benchmarks (`cargo bench -p datapath`, as root).
//!
//! 1. `BPF_PROG_TEST_RUN` with a high repeat count: the kernel's average
//!    ns per packet for `from_pod` (local delivery, tunnel) and the delivery
//!    code of `from_overlay`.
//! 2. Maglev: time to build one table of 1,000 backends at 65,537 slots.
//! 3. `from_pod` on a packet to a service frontend (established flow:
//!    conntrack hit, DNAT, checksums) against the same program on a packet
//!    straight to the backend pod, one syscall per packet for both (a
//!    translated packet is no longer addressed to the frontend, so the
//!    kernel's in-place repetitions cannot be used), same run, ratio printed.
//! 4. iperf3, one TCP stream for a few seconds, pod → pod across two node
//!    namespaces through the programs (external-mode VXLAN), and in the same
//!    run a plain kernel VXLAN device node → node over the same veth
//!    underlay; three alternating pairs of runs, each pair's ratio and the
//!    median (goal ≥ 0.90).
//!
//! `cargo bench -p datapath -- iperf` runs only the benchmarks whose name
//! contains a given word (`test_run`, `maglev`, `service`, `iperf`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    net::IpAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};
use aya::programs::{TestRun, TestRunOptions};
use datapath::{Datapath, Endpoint, IpcacheEntry, IpcacheFlags, Program};

const REPEAT: u32 = 1_000_000;
const IPERF_SECONDS: &str = "5";
/// Alternating pairs of iperf3 runs (eBPF path, then kernel VXLAN).
const IPERF_RUNS: u32 = 3;

type Bench = fn() -> anyhow::Result<()>;

/// The benchmarks by name: `cargo bench -p datapath -- NAME...` runs those
/// whose name contains one of the words (all without a word).
const BENCHES: &[(&str, Bench)] = &[
    ("test_run", test_run_bench),
    ("maglev", maglev_bench),
    ("service", service_bench),
    ("iperf", iperf_bench),
];

fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping datapath benchmarks: they need root (bpf(2), network namespaces)");
        return Ok(());
    }
    // cargo passes `--bench`; words are filters.
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for (name, bench) in BENCHES {
        if words.is_empty() || words.iter().any(|w| name.contains(w.as_str())) {
            bench()?;
        }
    }
    Ok(())
}

fn frame(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0xa2, 0x02, 0, 0, 0, 0, 0xa1, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 64, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x50]); // TCP ports 12345 -> 80
    f.resize(14 + 64, 0);
    f
}

/// Repetitions per syscall: the kernel runs them on one skb without
/// resetting it, and the programs decrement the TTL (64) on every pass.
const BATCH: u32 = 60;

/// Average ns per packet over `REPEAT` runs, in batches of `BATCH`; fails
/// unless every batch ends in TC_ACT_REDIRECT.
fn ns_per_packet(
    dp: &mut Datapath,
    program: Program,
    data: &[u8],
    ctx: Option<&[u8]>,
) -> anyhow::Result<f64> {
    ns_per_packet_batched(dp, program, data, ctx, BATCH)
}

fn ns_per_packet_batched(
    dp: &mut Datapath,
    program: Program,
    data: &[u8],
    ctx: Option<&[u8]>,
    batch: u32,
) -> anyhow::Result<f64> {
    let prog = dp.program(program)?;
    let mut out = vec![0u8; data.len() + 64];
    let mut total_ns = 0u128;
    for _ in 0..REPEAT / batch {
        let r = prog.test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            ctx_in: ctx,
            repeat: batch,
            ..TestRunOptions::default()
        })?;
        if r.return_value != 7 {
            bail!(
                "{}: verdict {}, expected TC_ACT_REDIRECT",
                program.name(),
                r.return_value
            );
        }
        // The kernel reports the average duration of one repetition.
        total_ns += r.duration.as_nanos() * u128::from(batch);
    }
    Ok(total_ns as f64 / f64::from(REPEAT / batch * batch))
}

/// Time per Maglev table build, 1,000 backends, 65,537 slots.
fn maglev_bench() -> anyhow::Result<()> {
    use datapath::maglev::{self, BackendKey, Member, TableSize};
    let size = TableSize::new(65_537)?;
    let members: Vec<Member> = (0..1_000u32)
        .map(|i| Member {
            key: BackendKey {
                cluster_id: (i % 4 + 1) as u16,
                addr: std::net::SocketAddr::new(
                    IpAddr::from([10, (i % 4 + 1) as u8, (i >> 8) as u8, i as u8]),
                    8080,
                ),
                proto: datapath::Protocol::Tcp,
            },
            weight: 1,
        })
        .collect();
    const BUILDS: u32 = 50;
    let _warm = maglev::build(size, &members)?;
    let start = std::time::Instant::now();
    let mut check = 0u64;
    for _ in 0..BUILDS {
        let table = maglev::build(size, &members)?;
        check += u64::from(table.slots()[0]);
    }
    let per = start.elapsed() / BUILDS;
    println!(
        "Maglev table build, 1,000 backends, 65,537 slots: {:.2} ms per build ({BUILDS} builds, checksum {check})",
        per.as_secs_f64() * 1e3
    );
    Ok(())
}

/// A datapath on a fresh bpffs with two local pods: 10.1.0.1 behind
/// loopback (where test packets enter) and 10.1.0.2 behind ifindex 4242.
fn two_pods() -> anyhow::Result<(common::Bpffs, Datapath)> {
    let bpffs = common::Bpffs::new();
    let dp = common::load_test_datapath(bpffs.path())?;
    let mut eps = dp.endpoints()?;
    for (ip, ifindex, identity) in [("10.1.0.1", 1, 0x10100), ("10.1.0.2", 4242, 0x10101)] {
        let ep = Endpoint {
            ifindex,
            identity,
            endpoint_id: 1,
            pod_mac: [2; 6],
            host_mac: [4; 6],
        };
        eps.insert(ip.parse()?, ep)?;
    }
    Ok((bpffs, dp))
}

/// from_pod with service translation vs without, same run.
fn service_bench() -> anyhow::Result<()> {
    let (_bpffs, mut dp) = two_pods()?;
    let mut lb = dp.load_balancer()?;
    // 100 services with 10 backends each; the measured one has its backends
    // on the local pod's ports 8000..8010.
    for s in 0..100u32 {
        let frontend = datapath::Frontend {
            addr: std::net::SocketAddr::new(IpAddr::from([10, 96, 0, s as u8]), 80),
            proto: datapath::Protocol::Tcp,
        };
        let backends: Vec<datapath::Backend> = (0..10u16)
            .map(|b| {
                let ip = if s == 10 {
                    IpAddr::from([10, 1, 0, 2])
                } else {
                    IpAddr::from([10, 2, s as u8, b as u8])
                };
                datapath::Backend::new(std::net::SocketAddr::new(ip, 8000 + b), 1)
            })
            .collect();
        lb.set_service(frontend, datapath::ServiceFlags::NONE, &backends)?;
    }
    let direct = frame([10, 1, 0, 1], [10, 1, 0, 2]);
    let service = frame([10, 1, 0, 1], [10, 96, 0, 10]);
    let plain = ns_per_packet_batched(&mut dp, Program::FromPod, &direct, None, 1)?;
    let translated = ns_per_packet_batched(&mut dp, Program::FromPod, &service, None, 1)?;
    println!(
        "BPF_PROG_TEST_RUN from_pod, {REPEAT} runs of one packet each, 100 services x 10 backends:"
    );
    println!("  to the backend pod directly          {plain:>6.1} ns/packet");
    println!("  to the service frontend (DNAT, ct)   {translated:>6.1} ns/packet");
    println!("  ratio service / direct: {:.2}", translated / plain);
    Ok(())
}

fn test_run_bench() -> anyhow::Result<()> {
    let (_bpffs, mut dp) = two_pods()?;
    dp.set_vxlan_ifindex(777)?;
    let mut ipc = dp.ipcache()?;
    // A realistically filled ipcache: 10k remote /32s and a /16 per cluster.
    for i in 0..10_000u32 {
        let ip = IpAddr::from([10, 2, (i / 250) as u8, (i % 250) as u8]);
        let entry = IpcacheEntry {
            identity: 0x20000 | (i % 60_000),
            tunnel_endpoint: Some("192.168.1.2".parse()?),
            flags: IpcacheFlags::REMOTE_CLUSTER,
        };
        ipc.upsert(ip.into(), entry)?;
    }
    let local = frame([10, 1, 0, 1], [10, 1, 0, 2]);
    let remote = frame([10, 1, 0, 1], [10, 2, 7, 7]);
    let mut ctx = [0u8; 192];
    ctx[48..52].copy_from_slice(&0x20005u32.to_ne_bytes());
    ctx[52..56].copy_from_slice(&u32::from(std::net::Ipv4Addr::new(192, 168, 1, 2)).to_ne_bytes());
    let overlay = frame([10, 2, 7, 7], [10, 1, 0, 2]);

    println!("BPF_PROG_TEST_RUN, {REPEAT} repetitions (batches of {BATCH}), 64-byte TCP/IPv4 packets, 10k ipcache entries:");
    for (name, program, data, ctx) in [
        ("from_pod -> local pod", Program::FromPod, &local, None),
        ("from_pod -> VXLAN tunnel", Program::FromPod, &remote, None),
        (
            "from_overlay -> local pod",
            Program::TestFromOverlay,
            &overlay,
            Some(&ctx[..]),
        ),
    ] {
        let ns = ns_per_packet(&mut dp, program, data, ctx)?;
        println!("  {name:<28} {ns:>6.1} ns/packet");
    }
    Ok(())
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run: server in `server_ns` bound to `addr`, client in `client_ns`.
fn iperf(server_ns: &str, client_ns: &str, addr: IpAddr) -> anyhow::Result<f64> {
    let _server = KillOnDrop(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                server_ns,
                "timeout",
                "60",
                "iperf3",
                "-s",
                "-1",
                "-B",
                &addr.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start iperf3 server (Debian package iperf3)")?,
    );
    let mut last_err = String::new();
    for _ in 0..50 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                client_ns,
                "timeout",
                "30",
                "iperf3",
                "-J",
                "-t",
                IPERF_SECONDS,
                "-c",
            ])
            .arg(addr.to_string())
            .output()
            .context("run iperf3 client")?;
        if out.status.success() {
            let json: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
            // iperf3 -J may exit 0 with an error in the JSON, e.g. when the
            // server does not listen yet: retry those like a failed run.
            if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps);
            }
        }
        // The server may not listen yet.
        last_err = String::from_utf8_lossy(&out.stdout)
            .chars()
            .take(300)
            .collect();
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("iperf3 client kept failing: {last_err}")
}

fn iperf_bench() -> anyhow::Result<()> {
    let prefix = format!("{}b-", common::prefix("bench"));
    let topo = common::Topology::build(&prefix);
    let (n1, n2) = (topo.nodes[0].ns.name.clone(), topo.nodes[1].ns.name.clone());
    // Baseline: a classic kernel VXLAN device per node over the same underlay.
    for (ns, local, remote, addr) in [
        (&n1, "192.168.77.1", "192.168.77.2", "172.31.0.1/24"),
        (&n2, "192.168.77.2", "192.168.77.1", "172.31.0.2/24"),
    ] {
        common::run(&[
            "ip", "-n", ns, "link", "add", "kvx0", "type", "vxlan", "id", "42", "local", local,
            "remote", remote, "dstport", "4790", "dev", "ul0",
        ]);
        common::run(&["ip", "-n", ns, "addr", "add", addr, "dev", "kvx0"]);
        common::run(&["ip", "-n", ns, "link", "set", "kvx0", "up"]);
    }
    let pods = topo.all_pods();
    let (p11, p21) = (&pods[0], &pods[2]);
    // Alternating runs, so that drift (thermal, other load) hits both alike.
    let mut ratios = Vec::new();
    println!("iperf3, one TCP stream, {IPERF_SECONDS} s per run, same veth underlay, Gbit/s:");
    println!("  run  pod->pod eBPF+VXLAN external  node->node kernel VXLAN  ratio");
    for run in 1..=IPERF_RUNS {
        let mesh = iperf(&p21.ns, &p11.ns, p21.v4)?;
        let kernel = iperf(&n2, &n1, "172.31.0.2".parse()?)?;
        ratios.push(mesh / kernel);
        println!(
            "  {run:>3}  {:>26.2}  {:>23.2}  {:>5.2}",
            mesh / 1e9,
            kernel / 1e9,
            mesh / kernel
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "  median ratio: {:.2} (goal >= 0.90; min {:.2}, max {:.2})",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
    Ok(())
}
