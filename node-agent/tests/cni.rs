//! CNI round trip against a real agent: the `node-agent` binary runs in a
//! private node namespace (`--netns`), the `mesh-cni` binary is invoked
//! exactly as a container runtime does (environment + config on stdin), and
//! the test checks the pod's namespace through `ip` and the datapath's
//! `endpoints` map through its pin. Needs root and iproute2.

mod common;

use common::ip;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::Duration,
};

struct Lab {
    node_ns: String,
    pod_ns: Vec<String>,
    dir: tempfile::TempDir,
    agent: Option<Child>,
}

impl Lab {
    fn new() -> Self {
        let tag = testkit::unique_name("mag");
        let lab = Self {
            node_ns: format!("{tag}-n"),
            pod_ns: vec![format!("{tag}-p0"), format!("{tag}-p1")],
            dir: tempfile::tempdir().expect("tempdir"),
            agent: None,
        };
        remove_leftovers();
        for ns in std::iter::once(&lab.node_ns).chain(&lab.pod_ns) {
            ip(&["netns", "add", ns]);
        }
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_agent(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args([
                "--cluster-name=c1",
                "--cluster-id=1",
                "--node-name=n1",
                "--node-ip=192.168.1.2",
                "--pod-cidr=10.1.1.0/24",
                // Not contacted by this test (no remote clusters, no apiserver).
                "--etcd-endpoints=http://127.0.0.1:2379",
            ])
            .arg(format!("--netns={}", self.node_ns))
            .arg(format!("--bpffs={}", self.path("bpf").display()))
            .arg(format!("--state-dir={}", self.path("state").display()))
            .arg(format!("--cni-socket={}", self.path("cni.sock").display()))
            .arg(format!(
                "--status-socket={}",
                self.path("status.sock").display()
            ))
            .env_remove("MESH_APISERVER")
            .spawn()
            .expect("start node-agent");
        self.agent = Some(child);
    }

    fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    async fn wait_ready(&self) {
        let status = self.path("status.sock");
        testkit::eventually!(Duration::from_secs(30), "the agent's status socket", {
            std::os::unix::net::UnixStream::connect(&status).is_ok()
        });
    }

    fn cni(&self, command: &str, container: &str, netns: Option<&str>, conf: &str) -> Output {
        common::run_mesh_cni(command, container, netns, "app=web,tier=fe", conf)
    }

    fn conf(&self) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"mesh","type":"mesh-cni","agentSocket":"{}"}}"#,
            self.path("cni.sock").display()
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agent();
        for ns in std::iter::once(&self.node_ns).chain(&self.pod_ns) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // The agent mounts bpffs there; a run that failed before it did has
        // nothing to unmount, which is fine (and must not print an error).
        let _ = nix::mount::umount2(&self.path("bpf"), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Namespaces of a crashed earlier run of this suite (prefix `mag-`).
fn remove_leftovers() {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let pid_alive = name
            .strip_prefix("mag-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if name.starts_with("mag-") && !pid_alive {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?} / stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn pod_ip(result: &serde_json::Value) -> Ipv4Addr {
    let addr = result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address");
    addr.trim_end_matches("/32").parse().expect("pod address")
}

#[tokio::test(flavor = "multi_thread")]
async fn cni_add_check_del_version_round_trip() {
    if !testkit::require_root() || !testkit::require_binary("ip") {
        return;
    }
    let mut lab = Lab::new();
    lab.start_agent();
    lab.wait_ready().await;
    let conf = lab.conf();
    let pod0 = lab.pod_ns[0].clone();
    let pod1 = lab.pod_ns[1].clone();

    // VERSION.
    let out = lab.cni("VERSION", "", None, "");
    assert!(out.status.success());
    assert_eq!(
        json(&out)["supportedVersions"],
        serde_json::json!(["0.3.1", "0.4.0", "1.0.0"])
    );

    // ADD.
    let out = lab.cni("ADD", "ctr0", Some(&pod0), &conf);
    assert!(
        out.status.success(),
        "ADD failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let result = json(&out);
    assert_eq!(result["cniVersion"], "1.0.0");
    let ip0 = pod_ip(&result);
    assert!(
        "10.1.1.0/24"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(&ip0),
        "{ip0} outside the pod CIDR"
    );
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    let host_if = result["interfaces"][0]["name"].as_str().unwrap().to_owned();

    // The pod's namespace looks as the datapath expects.
    let addr = ip(&["-n", &pod0, "-j", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&ip0.to_string()), "{addr}");
    assert!(addr.contains("\"mtu\":1450"), "tunnel MTU expected: {addr}");
    let routes = ip(&["-n", &pod0, "route", "show"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    let neigh = ip(&["-n", &pod0, "neigh", "show", "169.254.1.1"]);
    assert!(neigh.contains("PERMANENT"), "{neigh}");
    let host_link = ip(&["-n", &lab.node_ns, "-j", "link", "show", "dev", &host_if]);
    let ifindex = json_ifindex(&host_link);

    // The endpoints map has the pod at its veth.
    let endpoints = datapath::Endpoints::open(&lab.path("bpf")).expect("endpoints pin");
    let ep = endpoints
        .get(ip0.into())
        .expect("read endpoints map")
        .expect("pod in the endpoints map");
    assert_eq!(ep.ifindex, ifindex);

    // CHECK succeeds and prints nothing.
    let out = lab.cni("CHECK", "ctr0", Some(&pod0), &conf);
    assert!(
        out.status.success(),
        "CHECK failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());

    // A restarted agent keeps the allocation: the next pod gets another address.
    lab.stop_agent();
    lab.start_agent();
    lab.wait_ready().await;
    let out = lab.cni("ADD", "ctr1", Some(&pod1), &conf);
    assert!(
        out.status.success(),
        "ADD 2 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ip1 = pod_ip(&json(&out));
    assert_ne!(ip0, ip1, "an address was handed out twice across a restart");
    assert!(
        endpoints.get(ip0.into()).unwrap().is_some(),
        "restart removed pod 0"
    );

    // DEL, and DEL again.
    for _ in 0..2 {
        let out = lab.cni("DEL", "ctr0", Some(&pod0), &conf);
        assert!(
            out.status.success(),
            "DEL failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        endpoints.get(ip0.into()).unwrap().is_none(),
        "DEL left the map entry"
    );
    let gone = Command::new("ip")
        .args(["-n", &pod0, "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "DEL left eth0 in the pod");
    // CHECK after DEL fails with a CNI error document.
    let out = lab.cni("CHECK", "ctr0", Some(&pod0), &conf);
    assert!(!out.status.success());
    assert!(json(&out)["code"].as_u64().unwrap() >= 100);

    // Bad input: the spec's codes.
    let out = lab.cni("ADD", "ctr2", Some(&pod1), "{not json");
    assert_eq!(json(&out)["code"], 6);
    let out = lab.cni(
        "ADD",
        "ctr2",
        Some(&pod1),
        r#"{"cniVersion":"1.0.0","type":"mesh-cni"}"#,
    );
    assert_eq!(
        json(&out)["code"],
        7,
        "missing name is an invalid network config"
    );
    let out = lab.cni("ADD", "ctr2", None, &conf);
    assert_eq!(
        json(&out)["code"],
        4,
        "missing CNI_NETNS is an invalid environment"
    );
    let out = lab.cni("ADD", "ctr2", Some("mag-does-not-exist"), &conf);
    assert_eq!(
        json(&out)["code"],
        3,
        "unknown namespace is an unknown container"
    );

    let out = lab.cni("DEL", "ctr1", Some(&pod1), &conf);
    assert!(out.status.success());
}

fn json_ifindex(link_json: &str) -> u32 {
    let v: serde_json::Value = serde_json::from_str(link_json).expect("ip -j output");
    v[0]["ifindex"].as_u64().expect("ifindex") as u32
}

/// A runtime in a mount namespace of its own (as containerd or podman on a
/// node whose agent runs in a pod): `CNI_NETNS` names a path that holds the
/// pod's namespace only in the runtime's mount namespace. In the agent's,
/// the same path is an empty regular file, so the agent could not enter the
/// namespace by path (`setns` would fail with EINVAL); it enters it through
/// the descriptor the plugin passes. The configuration is CNI 0.4.0.
#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_in_another_mount_namespace_is_served_through_the_descriptor() {
    if !testkit::require_root()
        || !testkit::require_binary("ip")
        || !testkit::require_binary("unshare")
    {
        return;
    }
    let mut lab = Lab::new();
    lab.start_agent();
    lab.wait_ready().await;
    let pod = lab.pod_ns[0].clone();
    let runtime_path = lab.path("runtime-netns");
    std::fs::write(&runtime_path, b"").expect("the mount point");
    let conf = format!(
        r#"{{"cniVersion":"0.4.0","name":"mesh","type":"mesh-cni","agentSocket":"{}"}}"#,
        lab.path("cni.sock").display()
    );
    // unshare: a private mount namespace where the pod's namespace is
    // bind-mounted at runtime_path; then the plugin runs in it.
    let in_runtime = |command: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" "$2" && exec "$3""#)
            .arg("sh")
            .arg(format!("/run/netns/{pod}"))
            .arg(&runtime_path)
            .arg(env!("CARGO_BIN_EXE_mesh-cni"));
        common::cni_env(&mut cmd, command, "rt0", runtime_path.to_str(), "app=web");
        common::feed(cmd, &conf)
    };

    let out = in_runtime("ADD");
    assert!(
        out.status.success(),
        "ADD failed: {} / {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result = json(&out);
    assert_eq!(result["cniVersion"], "0.4.0");
    assert_eq!(
        result["ips"][0]["version"], "4",
        "0.4.0 results name the family"
    );
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        runtime_path.display().to_string(),
        "the result names the namespace as the runtime does"
    );
    let ip0 = pod_ip(&result);
    let addr = ip(&["-n", &pod, "-j", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&ip0.to_string()), "{addr}");
    let here = std::fs::metadata(&runtime_path).expect("the path in the agent's view");
    assert!(
        here.is_file() && here.len() == 0,
        "in the agent's mount namespace the runtime's path is no namespace"
    );

    let out = in_runtime("CHECK");
    assert!(
        out.status.success(),
        "CHECK failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = in_runtime("DEL");
    assert!(
        out.status.success(),
        "DEL failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let gone = Command::new("ip")
        .args(["-n", &pod, "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "DEL left eth0 in the pod");
}
