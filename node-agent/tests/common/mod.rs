//! A two-cluster lab for the agent's integration tests and benchmark: per
//! cluster one real etcd (testkit) and one clustermesh-apiserver (the real
//! library, in this process), and one node namespace running the real
//! `node-agent` binary; pods created through the real `mesh-cni` binary.
//!
//! etcd and the apiservers listen on the host's loopback; each node
//! namespace reaches them through a relay that listens on the *node's*
//! loopback at the same port (a socket bound on a thread that entered the
//! namespace), so the test never changes the host's network namespace.
//!
//! Namespaces are named `mag2-<pid>-<n>-...`; leftovers of a crashed run are
//! removed at start, and everything is removed on drop (also on panic).

#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use nix::sched::{setns, CloneFlags};
use tokio::sync::oneshot;

pub(crate) const PREFIX: &str = "mag2";

/// Runs the `mesh-cni` binary as a container runtime does: the CNI
/// environment (pod `default/<container>` with `MESH_LABELS=labels`), the
/// network config on stdin.
pub(crate) fn run_mesh_cni(
    command: &str,
    container: &str,
    netns: Option<&str>,
    labels: &str,
    conf: &str,
) -> Output {
    let netns = netns.map(|ns| format!("/run/netns/{ns}"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-cni"));
    cni_env(&mut cmd, command, container, netns.as_deref(), labels);
    feed(cmd, conf)
}

/// The CNI environment of one invocation, on `cmd` (`mesh-cni` itself or a
/// wrapper that ends in it); `netns` is the `CNI_NETNS` path.
pub(crate) fn cni_env(
    cmd: &mut Command,
    command: &str,
    container: &str,
    netns: Option<&str>,
    labels: &str,
) {
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container};MESH_LABELS={labels}"),
        );
    if let Some(path) = netns {
        cmd.env("CNI_NETNS", path);
    }
}

/// Runs `cmd` with `conf` on stdin; its output.
pub(crate) fn feed(mut cmd: Command, conf: &str) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run mesh-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.as_bytes())
        .expect("write config");
    child.wait_with_output().expect("mesh-cni output")
}

/// One cluster: etcd, apiserver, one node with its agent.
pub(crate) struct ClusterLab {
    pub name: String,
    pub id: u16,
    pub etcd: testkit::EtcdServer,
    pub apiserver: SocketAddr,
    stop_apiserver: Option<oneshot::Sender<()>>,
    pub node_ns: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub dir: PathBuf,
    pub agent: Option<Child>,
    pub encryption: &'static str,
}

pub(crate) struct Lab {
    pub tag: String,
    pub a: ClusterLab,
    pub b: ClusterLab,
    pub pods: Vec<String>,
    _tmp: tempfile::TempDir,
}

pub(crate) fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Namespaces of a crashed earlier run of this suite.
fn remove_leftovers() {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let prefix = format!("{PREFIX}-");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let pid_alive = name
            .strip_prefix(&prefix)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if name.starts_with(&prefix) && !pid_alive {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Root, `ip` and `etcd` present (or skip / fail under MESH_TEST_STRICT).
pub(crate) fn requirements() -> bool {
    testkit::require_root() && testkit::require_binary("ip") && testkit::require_binary("etcd")
}

/// A lab with both agents running and ready for both clusters, and one pod
/// namespace per node (`pa` on c1, `pb` on c2); `None` when a requirement
/// is missing (see [`requirements`]).
pub(crate) async fn started_lab(encryption: &'static str) -> Option<(Lab, String, String)> {
    if !requirements() {
        return None;
    }
    let mut lab = Lab::new(encryption).await;
    let pa = lab.pod_ns("pa");
    let pb = lab.pod_ns("pb");
    lab.a.start_agent();
    lab.b.start_agent();
    lab.a.wait_ready(&["c1", "c2"]).await;
    lab.b.wait_ready(&["c1", "c2"]).await;
    Some((lab, pa, pb))
}

/// Binds `127.0.0.1:port` inside `ns` and relays every connection to
/// `target` on the host's loopback.
fn relay(ns: &str, port: u16, target: SocketAddr) {
    let path = format!("/run/netns/{ns}");
    let listener = std::thread::spawn(move || -> std::io::Result<StdListener> {
        let f = File::open(&path)?;
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let l = StdListener::bind(("127.0.0.1", port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .expect("relay thread")
    .expect("bind relay in the node namespace");
    let listener = tokio::net::TcpListener::from_std(listener).expect("relay listener");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
}

async fn start_apiserver(
    name: &str,
    id: u16,
    etcd: &testkit::EtcdServer,
) -> (SocketAddr, oneshot::Sender<()>) {
    let max = api::MaxConnectedClusters::Max255;
    let etcd_config =
        kvstore::EtcdConfig::from_endpoints([etcd.endpoint()], &kvstore::TlsPaths::default())
            .expect("etcd config");
    let config = clustermesh_apiserver::config::Config::new(
        name.parse().expect("cluster name"),
        api::ClusterId::new(id, max).expect("cluster id"),
        etcd_config,
    );
    let server = clustermesh_apiserver::Server::start(config)
        .await
        .expect("start apiserver");
    let addr = server.grpc_addr();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = server
            .serve(async {
                let _ = rx.await;
            })
            .await;
    });
    (addr, tx)
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in endpoint")
}

impl Lab {
    /// Two clusters `c1` (ID 1, node 192.168.1.2, pods 10.1.1.0/24) and `c2`
    /// (ID 2, node 192.168.2.2, pods 10.2.1.0/24), nodes joined by one veth.
    /// Agents are not started yet.
    pub(crate) async fn new(encryption: &'static str) -> Self {
        remove_leftovers();
        let tag = testkit::unique_name(PREFIX);
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut clusters = Vec::new();
        for (name, id) in [("c1", 1u16), ("c2", 2)] {
            let etcd = testkit::EtcdServer::start().await;
            let (apiserver, stop) = start_apiserver(name, id, &etcd).await;
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(dir.join("clustermesh")).expect("config dir");
            clusters.push(ClusterLab {
                name: name.to_owned(),
                id,
                etcd,
                apiserver,
                stop_apiserver: Some(stop),
                node_ns: format!("{tag}-n{id}"),
                node_ip: Ipv4Addr::new(192, 168, id as u8, 2),
                pod_cidr: format!("10.{id}.1.0/24"),
                dir,
                agent: None,
                encryption,
            });
        }
        let b = clusters.pop().expect("c2");
        let a = clusters.pop().expect("c1");
        let lab = Self {
            tag,
            a,
            b,
            pods: Vec::new(),
            _tmp: tmp,
        };
        for c in [&lab.a, &lab.b] {
            ip(&["netns", "add", &c.node_ns]);
            ip(&["-n", &c.node_ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link",
            "add",
            "mag2tmpa",
            "netns",
            &lab.a.node_ns,
            "type",
            "veth",
            "peer",
            "name",
            "mag2tmpb",
            "netns",
            &lab.b.node_ns,
        ]);
        for (c, tmp_name) in [(&lab.a, "mag2tmpa"), (&lab.b, "mag2tmpb")] {
            ip(&["-n", &c.node_ns, "link", "set", tmp_name, "name", "eth0"]);
            ip(&[
                "-n",
                &c.node_ns,
                "addr",
                "add",
                &format!("{}/16", c.node_ip),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &c.node_ns, "link", "set", "eth0", "up"]);
        }
        // Each node reaches both etcds and its own apiserver on its loopback.
        for c in [&lab.a, &lab.b] {
            for e in [&lab.a.etcd, &lab.b.etcd] {
                relay(&c.node_ns, e.client_addr().port(), e.client_addr());
            }
            relay(&c.node_ns, c.apiserver.port(), c.apiserver);
        }
        // Each cluster has the other's config file.
        for (c, other) in [(&lab.a, &lab.b), (&lab.b, &lab.a)] {
            lab.write_remote_config(c, other);
        }
        lab
    }

    pub(crate) fn write_remote_config(&self, c: &ClusterLab, other: &ClusterLab) {
        let port = port_of(&other.etcd.endpoint());
        std::fs::write(
            c.dir.join("clustermesh").join(&other.name),
            format!("endpoints:\n- http://127.0.0.1:{port}\n"),
        )
        .expect("write clustermesh config");
    }

    pub(crate) fn remove_remote_config(&self, c: &ClusterLab, other: &ClusterLab) {
        std::fs::remove_file(c.dir.join("clustermesh").join(&other.name))
            .expect("remove clustermesh config");
    }

    /// A pod namespace of this lab.
    pub(crate) fn pod_ns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.tag);
        ip(&["netns", "add", &ns]);
        self.pods.push(ns.clone());
        ns
    }
}

impl ClusterLab {
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts the agent in the node's namespace (it reaches the etcds and
    /// its apiserver through the relays).
    pub(crate) fn start_agent(&mut self) {
        let netns = self.node_ns.clone();
        self.spawn_agent(Some(&netns));
    }

    /// Starts the agent in the caller's network namespace: it reaches the
    /// etcds and its apiserver directly, with no relay in between. For the
    /// benchmark, which runs in a private namespace of its own; pods cannot
    /// be attached to such an agent (its node has no underlay device).
    pub(crate) fn start_agent_in_current_netns(&mut self) {
        self.spawn_agent(None);
    }

    fn spawn_agent(&mut self, netns: Option<&str>) {
        let etcd_port = port_of(&self.etcd.endpoint());
        let log = File::create(self.path(&format!("agent-{}.log", self.agent_runs())))
            .expect("create the agent's log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_node-agent"));
        if let Some(ns) = netns {
            command.arg(format!("--netns={ns}"));
        }
        let child = command
            .arg(format!("--cluster-name={}", self.name))
            .arg(format!("--cluster-id={}", self.id))
            .arg("--node-name=node1")
            .arg(format!("--node-ip={}", self.node_ip))
            .arg(format!("--pod-cidr={}", self.pod_cidr))
            .arg(format!("--etcd-endpoints=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--apiserver=http://127.0.0.1:{}",
                self.apiserver.port()
            ))
            .arg(format!(
                "--clustermesh-config={}",
                self.path("clustermesh").display()
            ))
            .arg(format!("--encryption={}", self.encryption))
            .arg("--sync-timeout=30")
            .arg(format!("--bpffs={}", self.path("bpf").display()))
            .arg(format!("--state-dir={}", self.path("state").display()))
            .arg(format!("--cni-socket={}", self.path("cni.sock").display()))
            .arg(format!(
                "--status-socket={}",
                self.path("status.sock").display()
            ))
            .env("RUST_LOG", "info")
            // The agent logs to stdout; both streams go to the log file.
            .stdout(log.try_clone().map_or_else(|_| Stdio::null(), Stdio::from))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start node-agent");
        self.agent = Some(child);
    }

    fn agent_runs(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("agent-"))
                })
                .count()
            })
            .unwrap_or(0)
    }

    pub(crate) fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    pub(crate) fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The agent's status document, if the socket answers.
    pub(crate) fn status(&self) -> Option<serde_json::Value> {
        let mut s = std::os::unix::net::UnixStream::connect(self.path("status.sock")).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        serde_json::from_slice(&buf).ok()
    }

    /// The status of `cluster` in this agent's status document.
    pub(crate) fn cluster_status(&self, cluster: &str) -> Option<serde_json::Value> {
        self.status()?["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == cluster)
            .cloned()
    }

    pub(crate) async fn wait_ready(&self, clusters: &[&str]) {
        let what = format!("agent of {} ready for {clusters:?}", self.name);
        testkit::eventually!(Duration::from_secs(60), what, {
            clusters.iter().all(|c| {
                self.cluster_status(c)
                    .is_some_and(|s| s["ready"] == serde_json::Value::Bool(true))
            })
        });
    }

    pub(crate) fn ipcache(&self) -> datapath::Ipcache {
        datapath::Ipcache::open(&self.path("bpf")).expect("ipcache pin")
    }

    /// Runs `mesh-cni` as a runtime does.
    pub(crate) fn cni(&self, command: &str, container: &str, netns: &str) -> Output {
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"mesh","type":"mesh-cni","agentSocket":"{}"}}"#,
            self.path("cni.sock").display()
        );
        run_mesh_cni(
            command,
            container,
            Some(netns),
            &format!("app={container}"),
            &conf,
        )
    }

    /// CNI ADD; returns the pod's address.
    pub(crate) fn add_pod(&self, container: &str, netns: &str) -> Ipv4Addr {
        let out = self.cni("ADD", container, netns);
        assert!(
            out.status.success(),
            "ADD {container} failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("CNI result");
        v["ips"][0]["address"]
            .as_str()
            .expect("ips[0].address")
            .trim_end_matches("/32")
            .parse()
            .expect("pod address")
    }

    pub(crate) fn del_pod(&self, container: &str, netns: &str) {
        let out = self.cni("DEL", container, netns);
        assert!(
            out.status.success(),
            "DEL {container} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// The agent's log so far (for assertion messages).
    pub(crate) fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.agent_runs() {
            out.push_str(
                &std::fs::read_to_string(self.path(&format!("agent-{i}.log"))).unwrap_or_default(),
            );
        }
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        self.stop_agent();
        if let Some(stop) = self.stop_apiserver.take() {
            let _ = stop.send(());
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node_ns])
            .status();
        // The agent mounts bpffs there; a run that failed before it did has
        // nothing to unmount, which is fine (and must not print an error).
        let _ = nix::mount::umount2(&self.path("bpf"), nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.a.stop_agent();
        self.b.stop_agent();
        for ns in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a fresh thread inside network namespace `ns`.
pub(crate) fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// A TCP echo server on `addr` inside `ns`, serving until the process ends.
pub(crate) fn echo_server(ns: &str, addr: SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    in_netns(ns, move || {
        let listener = StdListener::bind(addr).expect("bind echo server");
        tx.send(()).expect("ready");
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("echo server did not start");
}

/// Connects from `ns` to `addr`, sends `payload` and returns the echo.
pub(crate) fn tcp_exchange(ns: &str, addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let payload = payload.to_vec();
    in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&payload)?;
        let mut got = vec![0u8; payload.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    })
    .join()
    .expect("client thread")
}
