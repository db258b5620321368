//! Real packets through the attached programs: two node namespaces joined by
//! a veth underlay, VXLAN in external mode, two pods per node. ICMP, TCP and
//! UDP between pods on one node and across nodes, both directions, IPv4 and
//! IPv6; the VNI on the underlay; a loader process SIGKILLed and replaced
//! under a TCP stream.
//! Needs root. Namespaces are named `mdp-nt-<pid>-*` and removed on drop.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{
    traffic::{self, ping, TIMEOUT},
    Pod, Topology,
};
use datapath::{netns, AttachOutcome, Endpoint, IpcacheEntry};
use nix::sys::socket::{
    recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
    SockaddrIn,
};

/// One node's ipcache, endpoints and link pin names, sorted.
type NodeMaps = (
    Vec<(ipnet::IpNet, IpcacheEntry)>,
    Vec<(IpAddr, Endpoint)>,
    Vec<String>,
);

fn topology(tag: &str) -> Option<Topology> {
    if !common::require_root() {
        return None;
    }
    let prefix = format!("{}{tag}-", common::prefix("nt"));
    Some(Topology::build(&prefix))
}

#[test]
fn pods_talk_on_one_node_and_across_nodes() {
    let Some(topo) = topology("a") else { return };
    let pods = topo.all_pods();
    let (p11, p12, p21) = (&pods[0], &pods[1], &pods[2]);
    let mut failures = traffic::both_ways(p11, p12, "same node");
    failures.extend(traffic::both_ways(p11, p21, "across nodes"));
    assert!(
        failures.is_empty(),
        "failed exchanges:\n{}",
        failures.join("\n")
    );
}

/// Captures on node 2's underlay while pod 1.1 pings pod 2.1: the VXLAN
/// header's VNI is pod 1.1's identity.
#[test]
fn vni_on_the_underlay_is_the_source_identity() {
    let Some(topo) = topology("v") else { return };
    let pods = topo.all_pods();
    let (p11, p21) = (pods[0].clone(), pods[2].clone());
    let node2 = topo.nodes[1].ns.path();
    let (ready_tx, ready_rx) = mpsc::channel();
    let capture = std::thread::spawn(move || {
        netns::run_in(&node2, move || -> Result<Vec<u32>, String> {
            let fd = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .map_err(|e| e.to_string())?;
            setsockopt(
                &fd,
                sockopt::ReceiveTimeout,
                &nix::sys::time::TimeVal::new(0, 200_000),
            )
            .map_err(|e| e.to_string())?;
            ready_tx.send(()).ok();
            use std::os::fd::AsRawFd as _;
            let mut vnis = Vec::new();
            let deadline = Instant::now() + TIMEOUT;
            while Instant::now() < deadline && vnis.is_empty() {
                let mut buf = [0u8; 2048];
                let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                    continue;
                };
                // Outer Ethernet (14) + IPv4 (20, no options) + UDP (8) + VXLAN (8).
                let f = &buf[..n];
                if n >= 50
                    && f[12..14] == [0x08, 0x00]
                    && f[23] == 17
                    && f[36..38] == 4789u16.to_be_bytes()
                {
                    vnis.push(u32::from_be_bytes([0, f[46], f[47], f[48]]));
                }
            }
            Ok(vnis)
        })
    });
    ready_rx.recv_timeout(TIMEOUT).expect("capture started");
    ping(&p11, p21.v4).expect("ping across nodes");
    let vnis = capture
        .join()
        .expect("capture thread")
        .expect("netns")
        .expect("capture");
    assert_eq!(
        vnis.first(),
        Some(&p11.identity),
        "VNI of the first VXLAN packet on node 2's underlay"
    );
}

/// Runs the loader process of [`loader_restart_under_sigkill`]: this very
/// test binary, re-executed to run only [`loader_child`].
const LOADER_CHILD_ENV: &str = "MDP_LOADER_CHILD";
/// How long a loader process waits for its load and attach.
const LOADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A loader process: loads the datapath of every node, attaches it, says
/// `loader-child ready` and holds its fds until it is killed.
struct Loader {
    child: Child,
    /// The outcomes it printed, one line per node.
    attached: Vec<String>,
}

impl Loader {
    fn start(topo: &Topology) -> Self {
        let specs: Vec<serde_json::Value> = topo
            .loader_specs()
            .into_iter()
            .map(|s| {
                serde_json::json!({
                    "bpffs": s.bpffs,
                    "netns": s.netns,
                    "pod_ifs": s.pod_ifs,
                })
            })
            .collect();
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args(["--exact", "loader_child", "--ignored", "--nocapture"])
            .env(LOADER_CHILD_ENV, serde_json::Value::from(specs).to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the loader process");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut loader = Self {
            child,
            attached: Vec::new(),
        };
        let deadline = Instant::now() + LOADER_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!(
                    "loader process not ready within {LOADER_TIMEOUT:?} ({e}; exit status {:?})",
                    loader.child.try_wait()
                ),
            };
            if line == "loader-child ready" {
                return loader;
            }
            if let Some(outcomes) = line.strip_prefix("loader-child attached ") {
                loader.attached.push(outcomes.to_owned());
            }
        }
    }

    /// SIGKILL: no destructor runs, the kernel closes every fd.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Not a test of its own (ignored, so `cargo test` never runs it): the
/// body of the loader process that [`loader_restart_under_sigkill`] starts.
/// Loads and attaches the nodes named in `MDP_LOADER_CHILD`, reports, and
/// holds every handle (programs, maps) as an agent does, until SIGKILL.
#[test]
#[ignore = "the loader process of loader_restart_under_sigkill, started by it"]
fn loader_child() {
    let spec = std::env::var(LOADER_CHILD_ENV)
        .expect("loader_child runs only as loader_restart_under_sigkill's child process");
    // Never outlive the test that started us.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).expect("PR_SET_PDEATHSIG");
    let nodes: serde_json::Value = serde_json::from_str(&spec).expect("loader spec is JSON");
    let mut held = Vec::new();
    for node in nodes.as_array().expect("a list of nodes") {
        let field = |k: &str| node[k].as_str().expect("string field").to_owned();
        let spec = common::LoaderSpec {
            bpffs: field("bpffs").into(),
            netns: field("netns").into(),
            pod_ifs: node["pod_ifs"]
                .as_array()
                .expect("pod_ifs")
                .iter()
                .map(|p| p.as_str().expect("ifname").to_owned())
                .collect(),
        };
        let (dp, outcomes) = common::load_and_attach(&spec);
        println!("loader-child attached {outcomes:?}");
        held.push(dp);
    }
    println!("loader-child ready");
    std::io::stdout().flush().expect("flush stdout");
    // Hold the attachments until the parent kills this process (the test is
    // about what survives the loader's death); 120 s is only a backstop.
    std::thread::sleep(Duration::from_secs(120));
}

/// The pinned state a restart must keep: each node's ipcache, endpoints
/// and link pin names, sorted.
fn pinned_state(topo: &Topology) -> Vec<NodeMaps> {
    topo.nodes
        .iter()
        .map(|n| {
            let ipc = datapath::Ipcache::open(n.bpffs.path()).unwrap();
            let eps = datapath::Endpoints::open(n.bpffs.path()).unwrap();
            let mut a: Vec<_> = ipc.iter().collect::<Result<_, _>>().unwrap();
            let mut b: Vec<_> = eps.iter().collect::<Result<_, _>>().unwrap();
            let mut links: Vec<String> = std::fs::read_dir(n.bpffs.path().join("links"))
                .expect("links pinned")
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            a.sort_by_key(|(k, _)| k.to_string());
            b.sort_by_key(|(k, _)| k.to_string());
            links.sort();
            (a, b, links)
        })
        .collect()
}

/// A separate loader process loads, pins and attaches both nodes' datapaths
/// (this process only fills the maps through the pins). While a TCP stream
/// flows from pod 1.1 to pod 2.1 it is SIGKILLed; the stream runs on with no
/// loader at all for a moment; then a new loader process adopts the pins
/// and swaps its programs into the pinned links. The stream is not
/// interrupted and the maps and pins are unchanged.
#[test]
fn loader_restart_under_sigkill() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::network(&format!("{}r-", common::prefix("nt")));
    let mut first = Loader::start(&topo);
    let created = format!("{:?}", [AttachOutcome::Created; 3]);
    assert_eq!(
        first.attached,
        [created.as_str(); 2],
        "first loader creates"
    );
    topo.fill_maps();
    let pods = topo.all_pods();
    let (p11, p21) = (pods[0].clone(), pods[2].clone());
    let before = pinned_state(&topo);

    let dst = p21.v4;
    let (ready_tx, ready_rx) = mpsc::channel();
    let server_ns = netns::named(&p21.ns);
    // Server: counts bytes, records the longest pause between reads.
    let server = std::thread::spawn(move || {
        netns::run_in(&server_ns, move || -> Result<(u64, Duration), String> {
            let listener =
                TcpListener::bind(SocketAddr::new(dst, 7003)).map_err(|e| e.to_string())?;
            ready_tx.send(()).ok();
            let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            let (mut total, mut max_gap, mut last) = (0u64, Duration::ZERO, Instant::now());
            let mut buf = vec![0u8; 65536];
            loop {
                let n = conn
                    .read(&mut buf)
                    .map_err(|e| format!("stream read after {total} bytes: {e}"))?;
                if n == 0 {
                    return Ok((total, max_gap));
                }
                total += n as u64;
                max_gap = max_gap.max(last.elapsed());
                last = Instant::now();
            }
        })
    });
    ready_rx.recv_timeout(TIMEOUT).expect("server started");
    let client_ns = netns::named(&p11.ns);
    let (restarted_tx, restarted_rx) = mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        netns::run_in(&client_ns, move || -> Result<u64, String> {
            let mut conn = TcpStream::connect_timeout(&SocketAddr::new(dst, 7003), TIMEOUT)
                .map_err(|e| format!("connect: {e}"))?;
            conn.set_write_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            let chunk = vec![0x5au8; 16 * 1024];
            let mut sent = 0u64;
            let mut stop_at: Option<Instant> = None;
            let deadline = Instant::now() + LOADER_TIMEOUT + Duration::from_secs(10);
            loop {
                conn.write_all(&chunk)
                    .map_err(|e| format!("stream write after {sent} bytes: {e}"))?;
                sent += chunk.len() as u64;
                // Keep streaming for a second after the restart finished.
                if stop_at.is_none() && restarted_rx.try_recv().is_ok() {
                    stop_at = Some(Instant::now() + Duration::from_secs(1));
                }
                if stop_at.is_some_and(|t| Instant::now() > t) || Instant::now() > deadline {
                    return Ok(sent);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    });

    // Let the stream run under the first loader, then hold a window with
    // no loader at all.
    std::thread::sleep(Duration::from_millis(500));
    first.kill();
    // No loader process at all: the pinned links keep forwarding.
    std::thread::sleep(Duration::from_millis(300));
    let second = Loader::start(&topo);
    restarted_tx.send(()).unwrap();
    let replaced = format!("{:?}", [AttachOutcome::Replaced; 3]);
    assert_eq!(
        second.attached,
        [replaced.as_str(); 2],
        "the new loader swaps its programs into the pinned links"
    );

    let sent = client
        .join()
        .expect("client thread")
        .expect("client netns")
        .expect("client stream");
    let (received, max_gap) = server
        .join()
        .expect("server thread")
        .expect("server netns")
        .expect("server stream");
    assert_eq!(received, sent, "every byte arrived");
    assert!(
        max_gap < Duration::from_millis(500),
        "stream stalled for {max_gap:?} (a retransmission timeout)"
    );
    assert_eq!(pinned_state(&topo), before, "maps and pins unchanged");
    eprintln!("SIGKILL and restart under load: {sent} bytes, longest pause {max_gap:?}");
}

/// A line server on port 8080 in `pod`'s namespace: answers every line with
/// its name, until `stop` is set. Returns when it listens.
fn name_server(
    pod: &Pod,
    name: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::io::{BufRead, BufReader};
    let (ready_tx, ready_rx) = mpsc::channel();
    let ns = netns::named(&pod.ns);
    let handle = std::thread::spawn(move || {
        netns::run_in(&ns, move || {
            let listener = TcpListener::bind("0.0.0.0:8080").expect("bind 8080");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).ok();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        std::thread::spawn(move || {
                            conn.set_nonblocking(false).ok();
                            conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
                            let mut w = conn.try_clone().expect("clone stream");
                            for line in BufReader::new(conn).lines() {
                                if line.is_err() || writeln!(w, "{name}").is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
        .expect("server namespace");
    });
    ready_rx.recv_timeout(TIMEOUT).expect("server listening");
    handle
}

/// Sends a line, returns the answering backend's name.
fn ask(conn: &mut TcpStream) -> Result<String, String> {
    conn.write_all(b"who\n").map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        conn.read_exact(&mut byte)
            .map_err(|e| format!("read after {answer:?}: {e}"))?;
        answer.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&answer).trim().to_owned())
}

/// Connects from inside the caller's namespace, optionally from a fixed
/// source address, with a deadline on connect (SO_SNDTIMEO) and reads.
fn connect(dst: SocketAddr, from: Option<SocketAddr>) -> Result<TcpStream, String> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| e.to_string())?;
    let timeout = nix::sys::time::TimeVal::new(TIMEOUT.as_secs() as i64, 0);
    setsockopt(&fd, sockopt::SendTimeout, &timeout).map_err(|e| e.to_string())?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(|e| e.to_string())?;
    use std::os::fd::AsRawFd as _;
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SockaddrIn::from(v4),
        SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    if let Some(from) = from {
        nix::sys::socket::bind(fd.as_raw_fd(), &v4(from))
            .map_err(|e| format!("bind {from}: {e}"))?;
    }
    nix::sys::socket::connect(fd.as_raw_fd(), &v4(dst))
        .map_err(|e| format!("connect {dst}: {e}"))?;
    Ok(TcpStream::from(fd))
}

/// A pod connects to a service frontend over TCP: new connections are
/// answered by the backend on its own node and by the one on the other node
/// (replies reverse-translated in from_pod and in from_overlay), and a
/// connection that lives across the addition of a backend (which moves its
/// Maglev slot to the new backend) keeps talking to its first backend.
#[test]
fn service_frontend_reaches_local_and_remote_backends() {
    use datapath::{maglev, Backend, Frontend, LoadBalancer, Protocol, ServiceFlags};
    let Some(topo) = topology("s") else { return };
    let pods = topo.all_pods();
    let (p11, p12, p21, p22) = (&pods[0], &pods[1], &pods[2], &pods[3]);
    let frontend = Frontend {
        addr: "10.96.0.10:80".parse().unwrap(),
        proto: Protocol::Tcp,
    };
    let backend = |p: &Pod, cluster| Backend::new(SocketAddr::new(p.v4, 8080), cluster);
    let before = [backend(p12, 1), backend(p21, 1)];
    let after = [backend(p12, 1), backend(p21, 1), backend(p22, 1)];
    let mut lbs: Vec<LoadBalancer> = topo
        .nodes
        .iter()
        .map(|n| LoadBalancer::open(n.bpffs.path()).expect("load balancer"))
        .collect();
    for lb in &mut lbs {
        lb.set_service(frontend, ServiceFlags::GLOBAL, &before)
            .unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let servers: Vec<_> = [(p12, "p12"), (p21, "p21"), (p22, "p22")]
        .into_iter()
        .map(|(p, name)| name_server(p, name, stop.clone()))
        .collect();

    // A source port whose flow the new table sends elsewhere than the old.
    let future = maglev::build(
        lbs[0].table_size(),
        &after
            .iter()
            .map(|b| maglev::Member {
                key: maglev::BackendKey {
                    cluster_id: b.cluster_id,
                    addr: b.addr,
                    proto: Protocol::Tcp,
                },
                weight: 1,
            })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let long_lived = (45_000..46_000u16)
        .map(|p| SocketAddr::new(p11.v4, p))
        .find(|&c| {
            let h = datapath::lb::flow_hash(c, frontend.addr, Protocol::Tcp);
            Some(future.lookup(h).unwrap()) != lbs[0].backend_for(&frontend, c).as_ref()
        })
        .expect("a flow that moves");
    let first = lbs[0].backend_for(&frontend, long_lived).unwrap().addr;

    let result = netns::run_in(&netns::named(&p11.ns), || -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let mut conn = connect(frontend.addr, None)?;
            seen.insert(ask(&mut conn)?);
            if seen.len() == 2 {
                break;
            }
        }
        if seen != ["p12".to_owned(), "p21".to_owned()].into() {
            return Err(format!("64 connections reached only {seen:?}"));
        }

        let mut conn = connect(frontend.addr, Some(long_lived))?;
        let name = ask(&mut conn)?;
        let expected = if first.ip() == p12.v4 { "p12" } else { "p21" };
        if name != expected {
            return Err(format!(
                "long-lived flow answered by {name}, table says {expected}"
            ));
        }
        for lb in &mut lbs {
            let up = lb
                .set_service(frontend, ServiceFlags::GLOBAL, &after)
                .map_err(|e| e.to_string())?;
            assert!(up.table_rebuilt && up.backends_added == 1);
        }
        for i in 0..5 {
            let again = ask(&mut conn)?;
            if again != name {
                return Err(format!(
                    "after adding a backend, exchange {i} answered by {again}"
                ));
            }
        }
        // New connections reach the new backend too.
        let mut reached_new = false;
        for _ in 0..64 {
            if ask(&mut connect(frontend.addr, None)?)? == "p22" {
                reached_new = true;
                break;
            }
        }
        reached_new
            .then_some(())
            .ok_or_else(|| "64 new connections never reached the added backend".to_owned())
    })
    .expect("client namespace");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in servers {
        s.join().expect("server thread");
    }
    result.expect("service exchanges");
}

/// A pod calls a service whose only backend is the pod itself (hairpin), over
/// TCP and UDP, IPv4 and IPv6, through the real kernel: the exchange
/// completes, the server sees the service loopback address as its peer (the
/// pod's own address would be a martian), and the client sees the frontend.
#[test]
fn a_pod_reaches_its_own_service() {
    use datapath::{Backend, Frontend, LoadBalancer, Protocol, ServiceFlags};
    use std::net::UdpSocket;
    let Some(topo) = topology("h") else { return };
    let pods = topo.all_pods();
    let pod = &pods[0];
    let mut lb = LoadBalancer::open(topo.nodes[0].bpffs.path()).expect("load balancer");
    let mut failures = Vec::new();
    for (ip, vip, loopback) in [
        (
            pod.v4,
            "10.96.0.20".parse::<IpAddr>().unwrap(),
            IpAddr::from(datapath::SERVICE_LOOPBACK_V4),
        ),
        (
            pod.v6,
            "fd00:96::20".parse().unwrap(),
            IpAddr::from(datapath::SERVICE_LOOPBACK_V6),
        ),
    ] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let frontend = Frontend {
                addr: SocketAddr::new(vip, 80),
                proto,
            };
            let backend = SocketAddr::new(ip, 7003);
            lb.set_service(frontend, ServiceFlags::NONE, &[Backend::new(backend, 1)])
                .unwrap();
            let what = format!("{proto} {ip} -> {frontend} -> itself");
            let result = traffic::exchange(
                pod,
                pod,
                move |ready| -> Result<(), String> {
                    let peer = match proto {
                        Protocol::Tcp => {
                            let listener = TcpListener::bind(backend).map_err(|e| e.to_string())?;
                            ready.send(()).ok();
                            let (mut conn, peer) = traffic::accept_within(&listener)?;
                            let mut buf = [0u8; 5];
                            conn.read_exact(&mut buf).map_err(|e| e.to_string())?;
                            conn.write_all(&buf).map_err(|e| e.to_string())?;
                            peer
                        }
                        Protocol::Udp => {
                            let sock = UdpSocket::bind(backend).map_err(|e| e.to_string())?;
                            sock.set_read_timeout(Some(TIMEOUT))
                                .map_err(|e| e.to_string())?;
                            ready.send(()).ok();
                            let mut buf = [0u8; 64];
                            let (n, peer) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
                            sock.send_to(&buf[..n], peer).map_err(|e| e.to_string())?;
                            peer
                        }
                    };
                    (peer.ip() == loopback)
                        .then_some(())
                        .ok_or_else(|| format!("the server saw peer {peer}, not {loopback}"))
                },
                move || -> Result<(), String> {
                    match proto {
                        Protocol::Tcp => {
                            let mut conn = TcpStream::connect_timeout(&frontend.addr, TIMEOUT)
                                .map_err(|e| format!("connect: {e}"))?;
                            conn.set_read_timeout(Some(TIMEOUT))
                                .map_err(|e| e.to_string())?;
                            conn.write_all(b"hello").map_err(|e| e.to_string())?;
                            let mut back = [0u8; 5];
                            conn.read_exact(&mut back)
                                .map_err(|e| format!("read: {e}"))?;
                            (&back == b"hello")
                                .then_some(())
                                .ok_or_else(|| "echo differs".to_owned())
                        }
                        Protocol::Udp => {
                            let any: IpAddr = if vip.is_ipv4() { "0.0.0.0" } else { "::" }
                                .parse()
                                .unwrap();
                            let sock = UdpSocket::bind(SocketAddr::new(any, 0))
                                .map_err(|e| e.to_string())?;
                            sock.set_read_timeout(Some(TIMEOUT))
                                .map_err(|e| e.to_string())?;
                            sock.send_to(b"hello", frontend.addr)
                                .map_err(|e| e.to_string())?;
                            let mut buf = [0u8; 64];
                            let (n, from) =
                                sock.recv_from(&mut buf).map_err(|e| format!("recv: {e}"))?;
                            (from == frontend.addr && &buf[..n] == b"hello")
                                .then_some(())
                                .ok_or_else(|| format!("reply from {from}: {:?}", &buf[..n]))
                        }
                    }
                },
            );
            if let Err(e) = result {
                failures.push(format!("{what}: {e}"));
            }
            lb.remove_service(frontend).unwrap();
        }
    }
    assert!(
        failures.is_empty(),
        "hairpin exchanges failed:\n{}",
        failures.join("\n")
    );
}
