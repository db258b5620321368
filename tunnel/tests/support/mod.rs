//! Private network namespaces for the tunnel tests.
//!
//! Every namespace is named `mtun-<pid>-<n>`; leftovers of crashed runs (any
//! `mtun-*` whose pid is not alive) are deleted when a test starts, and a
//! [`Namespaces`] guard deletes its own when dropped, also when the test
//! panics. Nothing here touches the host's network namespace: commands run
//! with `ip netns exec`, and Rust code runs on a dedicated thread that entered
//! the namespace with `setns` (per thread).

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

pub(crate) const PREFIX: &str = "mtun";

/// Whether the test may run: root, and the binaries it needs.
pub(crate) fn prerequisites(binaries: &[&str]) -> bool {
    testkit::require_root() && binaries.iter().all(|b| testkit::require_binary(b))
}

/// Runs a command to completion, panicking with its output on failure.
pub(crate) fn sh(args: &[&str]) -> String {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command inside namespace `ns`.
pub(crate) fn ns_sh(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

/// Deletes `mtun-<pid>-*` namespaces whose process is gone.
fn clean_leftovers() {
    let list = sh(&["ip", "netns", "list"]);
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let mut parts = name.splitn(3, '-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Namespaces owned by one test, deleted on drop.
#[derive(Debug, Default)]
pub(crate) struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    pub(crate) fn new() -> Self {
        clean_leftovers();
        Self::default()
    }

    /// Creates a fresh namespace with loopback up.
    pub(crate) fn add(&mut self) -> String {
        let name = testkit::unique_name(PREFIX);
        sh(&["ip", "netns", "add", &name]);
        self.names.push(name.clone());
        ns_sh(&name, &["ip", "link", "set", "lo", "up"]);
        name
    }

    /// Joins `a` and `b` with a veth pair `dev_a`/`dev_b` carrying the given
    /// addresses (CIDR notation), IPv6 disabled so captures only show what the
    /// test sends.
    pub(crate) fn veth(
        &self,
        a: &str,
        dev_a: &str,
        addr_a: &str,
        b: &str,
        dev_b: &str,
        addr_b: &str,
    ) {
        sh(&[
            "ip", "link", "add", dev_a, "netns", a, "type", "veth", "peer", "name", dev_b, "netns",
            b,
        ]);
        for (ns, dev, addr) in [(a, dev_a, addr_a), (b, dev_b, addr_b)] {
            ns_sh(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
                ],
            );
            ns_sh(ns, &["ip", "addr", "add", addr, "dev", dev]);
            ns_sh(ns, &["ip", "link", "set", dev, "up"]);
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn enter(ns: &str) {
    let file = File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("opening netns {ns}: {e}"));
    setns(file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
}

/// Runs `f` on a new thread inside namespace `ns` and returns its result,
/// waiting at most `deadline`.
pub(crate) fn in_ns<R: Send + 'static>(
    ns: &str,
    deadline: Duration,
    what: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let ns = ns.to_owned();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        enter(&ns);
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(deadline) {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

type Job<S> = Box<dyn FnOnce(&tokio::runtime::Runtime, &mut S) + Send>;

/// A thread living in a namespace with a current-thread tokio runtime and a
/// state `S` that never leaves it (netlink connection, WireGuard device).
pub(crate) struct NsThread<S> {
    jobs: Option<mpsc::Sender<Job<S>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<S: 'static> NsThread<S> {
    pub(crate) fn start(
        ns: &str,
        init: impl FnOnce(&tokio::runtime::Runtime) -> S + Send + 'static,
    ) -> Self {
        let ns = ns.to_owned();
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut state = init(&runtime);
            while let Ok(job) = rx.recv() {
                job(&runtime, &mut state);
            }
            drop(state);
        });
        Self {
            jobs: Some(tx),
            thread: Some(thread),
        }
    }

    /// Runs `f` with the state on the namespace thread; waits at most 30 s.
    pub(crate) fn run<R: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&tokio::runtime::Runtime, &mut S) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = mpsc::channel();
        let job: Job<S> = Box::new(move |rt, state| {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(rt, state)));
            let _ = tx.send(result);
        });
        self.jobs
            .as_ref()
            .unwrap()
            .send(job)
            .expect("namespace thread is gone");
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("timed out after 30s waiting for {what}"),
        }
    }
}

impl<S> Drop for NsThread<S> {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server in a namespace: answers each connection with the number of
/// bytes it received before EOF. Stops when dropped.
pub(crate) struct CountingServer {
    stop: Arc<AtomicBool>,
}

impl CountingServer {
    pub(crate) fn start(ns: &str, addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let listener = in_ns(
            ns,
            Duration::from_secs(5),
            "binding the test server",
            move || {
                let listener = TcpListener::bind(addr).unwrap();
                listener.set_nonblocking(true).unwrap();
                listener
            },
        );
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(10)))
                            .unwrap();
                        let mut buf = Vec::new();
                        if conn.read_to_end(&mut buf).is_ok() {
                            let _ = conn.write_all(buf.len().to_string().as_bytes());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { stop }
    }
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends `payload` over TCP from namespace `ns` to `to` and returns the byte
/// count the server reported, or an error string (connect timeout 2 s).
pub(crate) fn tcp_exchange(ns: &str, to: SocketAddr, payload: Vec<u8>) -> Result<usize, String> {
    in_ns(ns, Duration::from_secs(20), "a tcp exchange", move || {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map_err(|e| format!("connect {to}: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(&payload)
            .map_err(|e| format!("write: {e}"))?;
        conn.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)
            .map_err(|e| format!("read: {e}"))?;
        answer
            .trim()
            .parse()
            .map_err(|e| format!("answer {answer:?}: {e}"))
    })
}

/// Retries a TCP exchange until it succeeds (handshakes take a moment), for
/// at most `deadline`.
pub(crate) fn tcp_exchange_eventually(
    ns: &str,
    to: SocketAddr,
    payload: &[u8],
    deadline: Duration,
) -> usize {
    let until = Instant::now() + deadline;
    loop {
        match tcp_exchange(ns, to, payload.to_vec()) {
            Ok(n) => return n,
            Err(e) if Instant::now() >= until => {
                panic!("timed out after {deadline:?} waiting for a tcp exchange with {to}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A tcpdump writing a pcap of one device in a namespace.
pub(crate) struct Capture {
    child: Child,
    pub path: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `dev` in `ns` and waits until it listens.
    pub(crate) fn start(ns: &str, dev: &str, path: PathBuf) -> Self {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "tcpdump",
                "--immediate-mode",
                "-i",
                dev,
                "-n",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            panic!("timed out after 10s waiting for tcpdump to listen on {dev}");
        }
        Self { child, path }
    }

    /// Stops tcpdump (SIGINT, so it flushes) and returns the captured frames.
    pub(crate) fn finish(mut self) -> Vec<Vec<u8>> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // `ip netns exec` execs tcpdump, so the pid is tcpdump's.
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < until,
                "timed out after 10s waiting for tcpdump to exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        read_pcap(&std::fs::read(&self.path).unwrap())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The frames of a classic little-endian pcap file.
pub(crate) fn read_pcap(data: &[u8]) -> Vec<Vec<u8>> {
    assert!(data.len() >= 24, "pcap shorter than its header");
    assert_eq!(
        &data[..4],
        &[0xd4, 0xc3, 0xb2, 0xa1],
        "not a little-endian pcap"
    );
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let caplen = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        at += 16;
        frames.push(data[at..at + caplen].to_vec());
        at += caplen;
    }
    frames
}

/// What an Ethernet frame is, as far as the capture assertions care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Arp,
    Udp { sport: u16, dport: u16 },
    OtherIpv4 { protocol: u8 },
    Other { ethertype: u16 },
}

pub(crate) fn classify(frame: &[u8]) -> Frame {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    match ethertype {
        0x0806 => Frame::Arp,
        0x0800 => {
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            match ip[9] {
                17 => Frame::Udp {
                    sport: u16::from_be_bytes([ip[ihl], ip[ihl + 1]]),
                    dport: u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]),
                },
                protocol => Frame::OtherIpv4 { protocol },
            }
        }
        ethertype => Frame::Other { ethertype },
    }
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
