//! Harness of the mesh's end-to-end tests (`docs/architecture.md` §10, tier 3).
//!
//! Each test brings up a real lab with the real `meshctl` binary (so the
//! processes it starts are detached from the test, as they are for a user),
//! drives traffic between the echo pods from threads that entered the pods'
//! network namespaces, asserts on `meshctl clustermesh status -o json`, and
//! takes the lab down again from a drop guard, also when the test fails.
//!
//! Labs are serialized within a test binary ([`LAB_LOCK`]): on two cores,
//! two labs at once only make both slower, and the node agents' WireGuard
//! UAPI sockets are host-global paths.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshctl::lab::state::{LabState, PodRecord};
use meshctl::lab::{self, ip, plan};
use meshctl::netprobe::{self, EchoReply};

/// Serializes labs within one test binary.
pub static LAB_LOCK: Mutex<()> = Mutex::new(());

/// The programs a lab needs, next to the test binary (`target/<profile>/`).
const PROGRAMS: [&str; 4] = ["meshctl", "node-agent", "clustermesh-apiserver", "mesh-cni"];

/// Timeout of one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// `target/<profile>/`, where cargo puts the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_owned()
}

/// Whether this machine can run a lab: root, etcd, and the workspace's
/// binaries built. Prints why not and returns `false` (or panics under
/// `MESH_TEST_STRICT=1`).
pub fn prerequisites() -> bool {
    if !testkit::require_root() || !testkit::require_binary("etcd") {
        return false;
    }
    for program in PROGRAMS {
        let path = bin_dir().join(program);
        if !path.is_file() {
            let what = format!(
                "this test needs {} (run `cargo build --workspace` first; `cargo xtask test` does)",
                path.display()
            );
            if testkit::strict() {
                panic!("{what}, and MESH_TEST_STRICT=1 forbids skipping this test");
            }
            eprintln!("SKIPPED: {what}");
            return false;
        }
    }
    true
}

/// Runs `meshctl ARGS` for lab `name`; returns (success, stdout, stderr).
pub fn meshctl(name: &str, root: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin_dir().join("meshctl"))
        .args(args)
        .env("MESH_LAB", name)
        .env("MESH_LAB_ROOT", root)
        .env("MESH_BIN_DIR", bin_dir())
        .output()
        .expect("run meshctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running lab, taken down when dropped.
#[derive(Debug)]
pub struct Lab {
    /// Lab name.
    pub name: String,
    /// Parent of the lab directory.
    pub root: PathBuf,
    _lock: MutexGuard<'static, ()>,
}

impl Lab {
    /// Brings up a lab with `meshctl lab up ARGS` (it waits for clustermesh
    /// status to be ready). Panics with meshctl's output when that fails.
    pub fn up(tag: &str, args: &[&str]) -> Self {
        let lock = LAB_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Unique per test and process; lab names are [a-z][a-z0-9]{0,9}.
        let name = format!("{tag}{}", std::process::id() % 100_000);
        let root = std::env::temp_dir().join("mesh-e2e");
        let lab = Self {
            name,
            root,
            _lock: lock,
        };
        let mut all = vec!["lab", "up", "--wait-duration", "120s"];
        all.extend_from_slice(args);
        let started = Instant::now();
        let (ok, _, stderr) = meshctl(&lab.name, &lab.root, &all);
        assert!(
            ok,
            "meshctl lab up {args:?} failed:\n{stderr}\n{}",
            lab.logs_tail()
        );
        eprintln!(
            "lab {} up ({args:?}) in {:.1}s",
            lab.name,
            started.elapsed().as_secs_f64()
        );
        lab
    }

    /// The lab's state file.
    pub fn state(&self) -> LabState {
        LabState::load(&self.name, &lab::lab_dir(&self.root, &self.name)).expect("lab state")
    }

    /// Runs `meshctl ARGS` against this lab.
    pub fn meshctl(&self, args: &[&str]) -> (bool, String, String) {
        meshctl(&self.name, &self.root, args)
    }

    /// `meshctl clustermesh status -o json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let (_, stdout, stderr) = self.meshctl(&["clustermesh", "status", "-o", "json"]);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("status -o json is not JSON ({e}): {stdout}\n{stderr}"))
    }

    /// Waits until `meshctl clustermesh status --wait` succeeds.
    pub fn wait_ready(&self, within: &str) {
        let (ok, stdout, stderr) =
            self.meshctl(&["clustermesh", "status", "--wait", "--wait-duration", within]);
        assert!(
            ok,
            "clustermesh not ready within {within}:\n{stdout}\n{stderr}"
        );
    }

    /// The last lines of every log of the lab (for failure messages).
    pub fn logs_tail(&self) -> String {
        let logs = lab::Layout::new(lab::lab_dir(&self.root, &self.name)).logs();
        let Ok(entries) = std::fs::read_dir(&logs) else {
            return String::new();
        };
        let mut out = String::new();
        for entry in entries.flatten() {
            let tail = meshctl::lab::supervise::log_tail(&entry.path(), 8);
            out.push_str(&format!("--- {}\n{tail}\n", entry.path().display()));
        }
        out
    }

    /// Takes the lab down now and returns what is left of it (should be nothing).
    pub fn down_and_leftovers(self) -> Vec<String> {
        let state = self.state();
        let (ok, _, stderr) = self.meshctl(&["lab", "down"]);
        assert!(ok, "lab down failed: {stderr}");
        leftovers(&self.name, &self.root, &state)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let (ok, _, stderr) = self.meshctl(&["lab", "down"]);
        if !ok {
            eprintln!("lab down {} failed: {stderr}", self.name);
        }
    }
}

/// Everything of lab `name` that still exists: namespaces, processes,
/// mounts, files.
pub fn leftovers(name: &str, root: &Path, state: &LabState) -> Vec<String> {
    let mut left: Vec<String> = ip::list_netns()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| plan::is_lab_netns(name, n))
        .map(|n| format!("namespace {n}"))
        .collect();
    for p in &state.processes {
        if meshctl::lab::supervise::is_running(p) {
            left.push(format!("process {} ({:?} {})", p.pid, p.role, p.cluster));
        }
    }
    let dir = lab::lab_dir(root, name);
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir_text = dir.display().to_string();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&dir_text))
            .map(|l| format!("mount {l}")),
    );
    // Processes whose command line names the lab directory (agents, etcd).
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir_text) {
                left.push(format!("process {:?}", entry.file_name()));
            }
        }
    }
    left
}

/// Which protocol to probe with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// ICMP echo.
    Icmp,
    /// TCP echo on port 8080.
    Tcp,
    /// UDP echo on port 8080.
    Udp,
}

/// Sends one probe from pod `from` to pod `to`; for TCP and UDP checks that the
/// reply names `to`. Returns a description of the failure, if any.
pub fn probe(from: &PodRecord, to: &PodRecord, proto: Proto, message: &str) -> Result<(), String> {
    let target = to.ip.expect("pod has an address");
    let expected = (to.cluster.clone(), to.node.clone(), to.name.clone());
    let message = message.to_owned();
    let desc = format!(
        "{proto:?} {}/{} -> {}/{} ({target})",
        from.cluster, from.name, to.cluster, to.name
    );
    let result = ip::in_netns(&from.netns, move || -> Result<(), String> {
        let addr = SocketAddr::from((target, plan::ECHO_PORT));
        let reply: EchoReply = match proto {
            Proto::Icmp => {
                return netprobe::icmp_echo(target, PROBE_TIMEOUT)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            Proto::Tcp => netprobe::tcp_request(addr, &message, PROBE_TIMEOUT),
            Proto::Udp => netprobe::udp_request(addr, &message, PROBE_TIMEOUT),
        }
        .map_err(|e| e.to_string())?;
        let got = (reply.from.cluster, reply.from.node, reply.from.pod);
        if got != expected || reply.message != message {
            return Err(format!("reply from {got:?} with {:?}", reply.message));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    result.map_err(|e| format!("{desc}: {e}"))
}

/// Probes every ordered pair of distinct pods with every protocol; returns
/// every failure.
pub fn all_pairs(pods: &[PodRecord], protos: &[Proto], message: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for from in pods {
        for to in pods {
            if from.cluster == to.cluster && from.name == to.name {
                continue;
            }
            for proto in protos {
                if let Err(e) = probe(from, to, *proto, message) {
                    failures.push(e);
                }
            }
        }
    }
    failures
}

/// Polls `check` until it returns `true`, panicking after `timeout` with `what`.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The echo pods of a lab state, `echo-*` only.
pub fn echo_pods(state: &LabState) -> Vec<PodRecord> {
    state
        .pods
        .iter()
        .filter(|p| p.name.starts_with("echo-"))
        .cloned()
        .collect()
}

/// An underlay capture on the bridge, for checking what crosses the wire.
#[derive(Debug)]
pub struct Capture {
    child: std::process::Child,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump` on the underlay bridge of lab `name`, writing to `file`.
    pub fn start(name: &str, file: &Path) -> Self {
        let netns = ip::netns_path(&plan::underlay_netns(name));
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args([
                "--",
                "tcpdump",
                "-i",
                plan::BRIDGE,
                "-n",
                // Without immediate mode tcpdump buffers in the kernel and
                // SIGINT loses what it held: the file stays empty.
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-Z",
                "root",
                "-w",
            ])
            .arg(file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start tcpdump (apt-get install tcpdump)");
        let capture = Self {
            child,
            file: file.to_owned(),
        };
        // tcpdump creates the file once it listens.
        eventually(
            "tcpdump to start capturing",
            Duration::from_secs(10),
            || capture.file.exists(),
        );
        capture
    }

    /// Stops the capture and returns the captured bytes (pcap).
    pub fn stop(mut self) -> Vec<u8> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        std::fs::read(&self.file).expect("read capture")
    }
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The lab pod addresses, for messages.
pub fn describe(pods: &[PodRecord]) -> String {
    pods.iter()
        .map(|p| {
            format!(
                "{}/{}={}",
                p.cluster,
                p.name,
                p.ip.unwrap_or(Ipv4Addr::UNSPECIFIED)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}
