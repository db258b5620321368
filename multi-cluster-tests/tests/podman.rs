//! A real container runtime drives `mesh-cni`: Debian's podman 4 with its
//! CNI network backend and runc starts a container (a busybox rootfs, no
//! image) on a lab node of c1, through a network whose only plugin is
//! `mesh-cni` talking to that node's agent. The container reaches a pod of
//! c2, its endpoint reaches c2's maps, and `podman rm -f` takes it away.
//! Podman runs in the host's namespaces, as on a real node; everything it
//! stores is under a temporary directory.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use multi_cluster_tests::{bin_dir, eventually, prerequisites, Lab};

const CONVERGE: Duration = Duration::from_secs(30);

/// Podman with a private configuration, storage and CNI network `meshnet`.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    /// Writes the configuration: the CNI network (`mesh-cni` at
    /// `agent_socket`), the plugin directory, a busybox rootfs.
    fn new(agent_socket: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |s: &str| dir.path().join(s);
        for d in [
            "net.d",
            "bin",
            "rootfs/bin",
            "rootfs/etc",
            "rootfs/proc",
            "rootfs/sys",
            "rootfs/dev",
            "rootfs/tmp",
        ] {
            std::fs::create_dir_all(p(d)).expect("podman dirs");
        }
        std::os::unix::fs::symlink(bin_dir().join("mesh-cni"), p("bin/mesh-cni"))
            .expect("plugin link");
        std::fs::write(
            p("net.d/meshnet.conflist"),
            format!(
                r#"{{"cniVersion":"1.0.0","name":"meshnet","plugins":[{{"type":"mesh-cni","agentSocket":"{}"}}]}}"#,
                agent_socket.display()
            ),
        )
        .expect("conflist");
        std::fs::write(
            p("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
                p("bin").display(),
                p("net.d").display()
            ),
        )
        .expect("containers.conf");
        std::fs::copy("/bin/busybox", p("rootfs/bin/busybox")).expect("busybox");
        for applet in ["sh", "nc", "sleep", "ip"] {
            std::os::unix::fs::symlink("busybox", p(&format!("rootfs/bin/{applet}")))
                .expect("applet");
        }
        Self { dir }
    }

    fn path(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .arg(format!("--root={}", self.path("root").display()))
            .arg(format!("--runroot={}", self.path("runroot").display()))
            .arg("--storage-driver=vfs")
            .args(args)
            .output()
            .expect("run podman")
    }

    /// `podman run` of the rootfs on `meshnet` with `args` (options, then
    /// the command). The sandbox's hard limits are below podman's default
    /// ulimits for root, so they are set explicitly.
    fn run_container(&self, options: &[&str], command: &[&str]) -> Output {
        let rootfs = self.path("rootfs");
        let mut args = vec![
            "run",
            "--network=meshnet",
            "--ulimit=nofile=1024:4096",
            "--ulimit=nproc=1000:1000",
        ];
        args.extend_from_slice(options);
        args.extend(["--rootfs", rootfs.to_str().expect("UTF-8 path")]);
        args.extend_from_slice(command);
        self.run(&args)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Whatever a failed test left: containers and their namespaces.
        let _ = self.run(&["rm", "--all", "--force", "--time=0"]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn in_ipcache(bpffs: &Path, ip: Ipv4Addr) -> bool {
    let map = datapath::Ipcache::open(bpffs).expect("open the ipcache pin");
    matches!(
        map.get(ipnet::IpNet::from(std::net::IpAddr::V4(ip))),
        Ok(Some(_))
    )
}

fn in_endpoints(bpffs: &Path, ip: Ipv4Addr) -> bool {
    let map = datapath::Endpoints::open(bpffs).expect("open the endpoints pin");
    matches!(map.get(ip.into()), Ok(Some(_)))
}

#[test]
fn a_podman_container_reaches_another_cluster_and_leaves_nothing_behind() {
    if !prerequisites() || !testkit::require_binary("podman") || !testkit::require_binary("runc") {
        return;
    }
    if !Path::new("/bin/busybox").is_file()
        && !testkit::skip_or_fail("this test needs /bin/busybox (Debian package busybox-static)")
    {
        return;
    }
    let lab = Lab::up("pdm", &["--clusters", "2", "--nodes", "1"]);
    let state = lab.state();
    let c1 = &state.cluster("c1").expect("c1").nodes[0];
    let c2 = &state.cluster("c2").expect("c2").nodes[0];
    let target = state
        .pods
        .iter()
        .find(|p| p.name == "echo-c2-n1")
        .and_then(|p| p.ip)
        .expect("c2's echo pod has an address");
    let podman = Podman::new(&c1.cni_socket);

    // A container on c1-n1 talks to c2's echo pod.
    let out = podman.run_container(
        &["--rm", "--name=mesh-client"],
        &["sh", "-c", &format!("echo hello | nc -w 5 {target} 8080")],
    );
    assert!(out.status.success(), "podman run failed: {}", text(&out));
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.contains("cluster=c2 node=c2-n1 pod=echo-c2-n1 msg=hello"),
        "no reply from c2's pod: {}",
        text(&out)
    );

    // A long-running container: its endpoint reaches c2's ipcache, and
    // `podman rm -f` removes it there and from c1-n1's endpoints map.
    let out = podman.run_container(&["--detach", "--name=mesh-idle"], &["sleep", "600"]);
    assert!(out.status.success(), "podman run -d failed: {}", text(&out));
    let out = podman.run(&[
        "inspect",
        "--format={{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        "mesh-idle",
    ]);
    let ip: Ipv4Addr = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("the container's address ({e}): {}", text(&out)));
    assert!(
        "10.1.1.0/24"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(&ip),
        "{ip} is not from c1-n1's pod CIDR"
    );
    assert!(
        in_endpoints(&c1.bpffs, ip),
        "{ip} is not in c1-n1's endpoints map"
    );
    eventually(&format!("c2 to learn {ip}"), CONVERGE, || {
        in_ipcache(&c2.bpffs, ip)
    });

    let out = podman.run(&["rm", "--force", "--time=0", "mesh-idle"]);
    assert!(out.status.success(), "podman rm -f failed: {}", text(&out));
    assert!(
        !in_endpoints(&c1.bpffs, ip),
        "{ip} is still in c1-n1's endpoints map"
    );
    eventually(&format!("c2 to forget {ip}"), CONVERGE, || {
        !in_ipcache(&c2.bpffs, ip)
    });
    let leftovers = lab.down_and_leftovers();
    assert!(leftovers.is_empty(), "lab down left {leftovers:?}");
}
