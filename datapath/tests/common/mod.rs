//! Shared by the datapath's tests and benchmarks: root checks, bpffs and
//! network namespace guards that clean up on drop (also when a test panics),
//! commands with timeouts, and the two-node topology.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use datapath::{netns, Datapath, Endpoint};

pub(crate) mod packet;
pub(crate) mod traffic;

/// The build of the datapath object with the test-only programs
/// (`test_from_overlay`); the agent's object does not have them.
pub(crate) static TEST_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath_test.o"));

/// Loads (or adopts) the datapath at `bpffs` from [`TEST_OBJECT`].
pub(crate) fn load_test_datapath(bpffs: &Path) -> Result<Datapath, datapath::Error> {
    let options = datapath::DatapathOptions {
        object: Some(TEST_OBJECT),
        ..datapath::DatapathOptions::default()
    };
    Datapath::load_or_adopt_with(bpffs, &options)
}

/// True when the test may run; false (after saying why) when it must skip.
/// With `MESH_TEST_STRICT=1` a missing requirement fails the test instead.
pub(crate) fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let msg = "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for bpffs and namespaces)";
    if std::env::var("MESH_TEST_STRICT").as_deref() == Ok("1") {
        panic!("MESH_TEST_STRICT=1 and this test {msg}");
    }
    eprintln!("skipping: this test {msg}");
    false
}

/// A bpffs mounted on a fresh temporary directory, unmounted on drop.
pub(crate) struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub(crate) fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("mdp-bpffs-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Lazy unmount: releases pins even if some fd is still open.
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Runs a command with a deadline; panics with its output on failure.
pub(crate) fn run(args: &[&str]) -> String {
    try_run(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command with a deadline.
pub(crate) fn try_run(args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .arg("20")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs a command inside a named network namespace.
pub(crate) fn ns(name: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", name];
    full.extend_from_slice(args);
    run(&full)
}

/// A named network namespace, deleted on drop.
pub(crate) struct Netns {
    pub name: String,
}

impl Netns {
    pub(crate) fn new(name: String) -> Self {
        let _ = try_run(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name]);
        ns(&name, &["ip", "link", "set", "lo", "up"]);
        Self { name }
    }

    pub(crate) fn path(&self) -> PathBuf {
        netns::named(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = try_run(&["ip", "netns", "del", &self.name]);
    }
}

/// Namespace prefix of one test run: `mdp-<suite>-<pid>-`. Leftovers of
/// earlier runs of the suite whose process is gone are deleted first.
pub(crate) fn prefix(suite: &str) -> String {
    let base = format!("mdp-{suite}-");
    if let Ok(list) = std::fs::read_dir("/run/netns") {
        for entry in list.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&base) else {
                continue;
            };
            let pid: Option<i32> = rest.split('-').next().and_then(|p| p.parse().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = try_run(&["ip", "netns", "del", &name]);
            }
        }
    }
    format!("{base}{}-", std::process::id())
}

/// Reads a MAC address from `ip -j link show`.
pub(crate) fn mac_of(netns: &str, ifname: &str) -> [u8; 6] {
    let out = ns(netns, &["cat", &format!("/sys/class/net/{ifname}/address")]);
    let mut mac = [0u8; 6];
    for (i, part) in out.trim().split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).expect("hex MAC");
    }
    mac
}

pub(crate) fn ifindex_of(netns: &str, ifname: &str) -> u32 {
    ns(netns, &["cat", &format!("/sys/class/net/{ifname}/ifindex")])
        .trim()
        .parse()
        .expect("ifindex")
}

/// A pod of the topology.
#[derive(Debug, Clone)]
pub(crate) struct Pod {
    pub ns: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
    pub host_if: String,
    pub identity: u32,
}

/// A node of the topology: its namespace and bpffs.
pub(crate) struct Node {
    pub ns: Netns,
    pub bpffs: Bpffs,
    pub underlay: IpAddr,
    pub pods: Vec<Pod>,
}

/// Two node namespaces joined by a veth underlay (192.168.77.1/.2), each with
/// a VXLAN device `mvx0` in external mode and two pods (MTU 1450). Fields
/// drop in reverse order of creation: pods, nodes (namespaces), then bpffs.
pub(crate) struct Topology {
    pub pod_ns: Vec<Netns>,
    pub nodes: Vec<Node>,
}

impl Topology {
    /// The topology with the datapath loaded and attached by this process
    /// and its maps filled.
    pub(crate) fn build(prefix: &str) -> Self {
        let topo = Self::network(prefix);
        topo.attach_all();
        topo.fill_maps();
        topo
    }

    /// Namespaces, devices and pods only: no datapath loaded yet.
    pub(crate) fn network(prefix: &str) -> Self {
        let mut nodes = Vec::new();
        let mut pod_ns = Vec::new();
        for n in 1..=2u8 {
            let ns_node = Netns::new(format!("{prefix}n{n}"));
            nodes.push(Node {
                ns: ns_node,
                bpffs: Bpffs::new(),
                underlay: format!("192.168.77.{n}").parse().unwrap(),
                pods: Vec::new(),
            });
        }
        let (n1, n2) = (nodes[0].ns.name.clone(), nodes[1].ns.name.clone());
        run(&[
            "ip", "-n", &n1, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns",
            &n2,
        ]);
        for (i, node) in nodes.iter().enumerate() {
            let name = &node.ns.name;
            let addr = format!("192.168.77.{}/24", i + 1);
            run(&["ip", "-n", name, "addr", "add", &addr, "dev", "ul0"]);
            run(&["ip", "-n", name, "link", "set", "ul0", "up"]);
            run(&[
                "ip", "-n", name, "link", "add", "mvx0", "type", "vxlan", "external", "dstport",
                "4789",
            ]);
            run(&["ip", "-n", name, "link", "set", "mvx0", "up"]);
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            let n = i + 1;
            for p in 1..=2usize {
                let pod_name = format!("{prefix}p{n}{p}");
                let pod = Netns::new(pod_name.clone());
                let host_if = format!("lxc{n}{p}");
                let v4 = format!("10.{n}.0.{}", 10 + p);
                let v6 = format!("fd00:{n}::{}", 10 + p);
                setup_pod(&node.ns.name, &pod_name, &host_if, &v4, &v6);
                node.pods.push(Pod {
                    ns: pod_name,
                    v4: v4.parse().unwrap(),
                    v6: v6.parse().unwrap(),
                    host_if,
                    // cluster 1 << 16 | local: distinct per pod, fits the VNI.
                    identity: (1 << 16) | (256 + (n * 10 + p) as u32),
                });
                pod_ns.push(pod);
            }
        }
        Self { pod_ns, nodes }
    }

    /// What a loader needs for each node: see [`load_and_attach`].
    pub(crate) fn loader_specs(&self) -> Vec<LoaderSpec> {
        self.nodes
            .iter()
            .map(|node| LoaderSpec {
                bpffs: node.bpffs.path().to_owned(),
                netns: node.ns.path(),
                pod_ifs: node.pods.iter().map(|p| p.host_if.clone()).collect(),
            })
            .collect()
    }

    /// Loads (or adopts) and attaches every node's datapath from this
    /// process, dropping the handles afterwards (the pins keep it all).
    pub(crate) fn attach_all(&self) -> Vec<datapath::AttachOutcome> {
        self.loader_specs()
            .iter()
            .flat_map(|spec| load_and_attach(spec).1)
            .collect()
    }

    /// Registers every pod in its node's endpoints and every pod of every
    /// node in each ipcache, through the pins (whoever loaded the datapath).
    pub(crate) fn fill_maps(&self) {
        for node in &self.nodes {
            let mut eps = datapath::Endpoints::open(node.bpffs.path()).unwrap();
            let mut ipc = datapath::Ipcache::open(node.bpffs.path()).unwrap();
            for pod in &node.pods {
                let ep = Endpoint {
                    ifindex: ifindex_of(&node.ns.name, &pod.host_if),
                    identity: pod.identity,
                    endpoint_id: pod.identity & 0xffff,
                    pod_mac: mac_of(&pod.ns, "eth0"),
                    host_mac: mac_of(&node.ns.name, &pod.host_if),
                };
                for ip in [pod.v4, pod.v6] {
                    eps.insert(ip, ep).unwrap();
                }
            }
            // Every pod of every node in the ipcache (the local ones too, as
            // the agent does; from_pod checks endpoints first).
            for other in &self.nodes {
                for pod in &other.pods {
                    let tunnel = (other.underlay != node.underlay).then_some(other.underlay);
                    for ip in [pod.v4, pod.v6] {
                        let entry = datapath::IpcacheEntry {
                            identity: pod.identity,
                            tunnel_endpoint: tunnel,
                            flags: datapath::IpcacheFlags::NONE,
                        };
                        ipc.upsert(ip.into(), entry).unwrap();
                    }
                }
            }
        }
    }

    pub(crate) fn all_pods(&self) -> Vec<Pod> {
        self.nodes.iter().flat_map(|n| n.pods.clone()).collect()
    }
}

/// One node as a loader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoaderSpec {
    /// The node's bpffs directory (pins).
    pub bpffs: PathBuf,
    /// The node's network namespace.
    pub netns: PathBuf,
    /// Host sides of the pods' veths.
    pub pod_ifs: Vec<String>,
}

/// Loads the datapath under `spec.bpffs` (adopting what is pinned there) and
/// attaches it inside the node's namespace: `from_overlay` on `mvx0`, then
/// `from_pod` on every pod veth. Returns the handle and each attach's outcome.
pub(crate) fn load_and_attach(spec: &LoaderSpec) -> (Datapath, Vec<datapath::AttachOutcome>) {
    let dir = spec.bpffs.clone();
    let pods = spec.pod_ifs.clone();
    netns::run_in(&spec.netns, move || {
        let mut dp = Datapath::load_or_adopt(&dir).expect("load the datapath");
        let mut outcomes = vec![dp.attach_from_overlay("mvx0").expect("attach overlay")];
        for host_if in &pods {
            outcomes.push(dp.attach_from_pod(host_if).expect("attach pod"));
        }
        (dp, outcomes)
    })
    .expect("enter node namespace")
}

/// A veth pair `host_if` (node) / `eth0` (pod), MTU 1450, with the pod's
/// addresses, gateway routes and static gateway neighbours as the crate
/// docs prescribe.
pub(crate) fn setup_pod(node: &str, pod: &str, host_if: &str, v4: &str, v6: &str) {
    run(&[
        "ip", "-n", node, "link", "add", host_if, "mtu", "1450", "type", "veth", "peer", "name",
        "eth0", "netns", pod,
    ]);
    run(&["ip", "-n", node, "link", "set", host_if, "up"]);
    let host_mac = mac_of(node, host_if)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for cmd in [
        "link set eth0 mtu 1450 up".to_owned(),
        format!("addr add {v4}/32 dev eth0"),
        format!("-6 addr add {v6}/128 dev eth0 nodad"),
        "route add 169.254.1.1 dev eth0 scope link".to_owned(),
        "route add default via 169.254.1.1 dev eth0".to_owned(),
        "-6 route add default via fe80::1 dev eth0".to_owned(),
        format!("neigh add 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"),
        format!("-6 neigh add fe80::1 lladdr {host_mac} dev eth0 nud permanent"),
    ] {
        let mut args = vec!["ip", "-n", pod];
        args.extend(cmd.split_whitespace());
        run(&args);
    }
    // Unprivileged-style ICMP echo sockets for the ping checks.
    ns(
        pod,
        &["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"],
    );
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub(crate) fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
