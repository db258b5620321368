//! Real packets through the programs that deliver kernel-routed traffic to
//! pods: `from_netdev` on the underlay of two natively routed nodes, and
//! `from_l3dev` on a TUN device (the L3 device WireGuard decrypts into) that
//! the test itself reads and writes, as boringtun would. In both setups the
//! node namespaces have no route to their own pods, so only the program can
//! deliver. Needs root. Namespaces are named `mdp-hd-<pid>-*` and removed on
//! drop.

mod common;

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::{packet, run, traffic, Bpffs, Netns, Topology};
use datapath::{
    netns, AttachOutcome, Backend, Datapath, Endpoint, Frontend, HostDevice, IpcacheEntry,
    IpcacheFlags, LoadBalancer, Protocol, ServiceFlags,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Native routing instead of VXLAN: every node routes the other node's pod
/// addresses via its underlay address, the ipcache has no tunnel endpoints
/// (so `from_pod` hands remote traffic to the kernel) and `from_netdev`
/// runs on the underlay device `ul0`.
fn route_natively(topo: &Topology) {
    for (i, node) in topo.nodes.iter().enumerate() {
        let name = &node.ns.name;
        let me = i + 1;
        let peer = 3 - me;
        common::ns(
            name,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
        run(&[
            "ip",
            "-n",
            name,
            "-6",
            "addr",
            "add",
            &format!("fd77::{me}/64"),
            "dev",
            "ul0",
            "nodad",
        ]);
        let (v4_net, v4_via) = (format!("10.{peer}.0.0/24"), format!("192.168.77.{peer}"));
        let (v6_net, v6_via) = (format!("fd00:{peer}::/64"), format!("fd77::{peer}"));
        run(&[
            "ip", "-n", name, "route", "add", &v4_net, "via", &v4_via, "dev", "ul0",
        ]);
        run(&[
            "ip", "-n", name, "-6", "route", "add", &v6_net, "via", &v6_via, "dev", "ul0",
        ]);
        let mut ipc = datapath::Ipcache::open(node.bpffs.path()).unwrap();
        for other in topo.nodes.iter().filter(|o| o.underlay != node.underlay) {
            for pod in &other.pods {
                for ip in [pod.v4, pod.v6] {
                    let entry = IpcacheEntry {
                        identity: pod.identity,
                        tunnel_endpoint: None,
                        flags: IpcacheFlags::NONE,
                    };
                    ipc.upsert(ip.into(), entry).unwrap();
                }
            }
        }
        let dir = node.bpffs.path().to_owned();
        let outcome = netns::run_in(&node.ns.path(), move || {
            Datapath::load_or_adopt(&dir)
                .expect("adopt in node namespace")
                .attach_from_host_device("ul0", HostDevice::Ethernet)
                .expect("attach from_netdev")
        })
        .expect("enter node namespace");
        assert_eq!(outcome, AttachOutcome::Created);
    }
}

/// ICMP, TCP and UDP across two natively routed nodes, both directions,
/// IPv4 and IPv6: the sender's `from_pod` hands the packet to the kernel,
/// which routes it over the underlay; the receiver's `from_netdev` delivers
/// it (its node has no route to its own pods).
#[test]
fn native_routing_delivers_through_from_netdev() {
    if !common::require_root() {
        return;
    }
    let topo = Topology::build(&format!("{}n-", common::prefix("hd")));
    route_natively(&topo);
    let pods = topo.all_pods();
    let failures = traffic::both_ways(&pods[0], &pods[2], "native routing");
    assert!(
        failures.is_empty(),
        "failed exchanges:\n{}",
        failures.join("\n")
    );
}

/// The TUN device: a non-persistent TUN (`IFF_TUN | IFF_NO_PI`, so every
/// read and write is one bare IP packet) that lives as long as its fd.
struct Tun {
    file: File,
}

impl Tun {
    /// Creates `name` in the network namespace at `netns`; non-blocking.
    #[expect(unsafe_code, reason = "TUNSETIFF is an ioctl with no safe wrapper")]
    fn create(netns: &Path, name: &str) -> Self {
        let name = name.to_owned();
        let file = netns::run_in(netns, move || -> std::io::Result<File> {
            use std::os::unix::fs::OpenOptionsExt as _;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")?;
            // SAFETY: ifreq is plain old data; all zeroes is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            assert!(name.len() < req.ifr_name.len(), "interface name too long");
            for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *dst = src as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: the fd is an open /dev/net/tun; TUNSETIFF reads and
            // writes one `struct ifreq`, which `req` is and outlives the call.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(file)
        })
        .expect("enter node namespace")
        .expect("create TUN device (needs /dev/net/tun and CAP_NET_ADMIN)");
        Self { file }
    }

    /// Hands a UDP packet (TTL 64) to the kernel as if it came out of the
    /// tunnel.
    fn inject_udp(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let packet = Packet {
            src,
            dst,
            ttl: 64,
            payload: payload.to_vec(),
        }
        .build();
        let n = self.file.write(&packet).expect("write to TUN");
        assert_eq!(n, packet.len(), "TUN takes whole packets");
    }

    /// The first packet the kernel routes into the device that `wanted`
    /// accepts (the node's stack may send others, e.g. IPv6 MLD).
    fn receive(&mut self, what: &str, wanted: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let mut buf = [0u8; 2048];
            match self.file.read(&mut buf) {
                Ok(n) => {
                    let packet = Packet::parse(&buf[..n]);
                    if packet.as_ref().is_some_and(&wanted) {
                        return packet.unwrap();
                    }
                    seen.push(packet.map_or_else(|| format!("{n} bytes"), |p| p.describe()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no {what} out of the TUN within {TIMEOUT:?}; saw {seen:?}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("read from TUN: {e}"),
            }
        }
    }
}

/// A UDP packet read from or written to the TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Packet {
    src: SocketAddr,
    dst: SocketAddr,
    ttl: u8,
    payload: Vec<u8>,
}

impl Packet {
    /// The IPv4 or IPv6 packet with valid IP and UDP checksums.
    fn build(&self) -> Vec<u8> {
        packet::l4_packet(packet::UDP, self.src, self.dst, self.ttl, &self.payload)
    }

    /// A UDP packet with valid checksums; `None` for anything else.
    fn parse(ip: &[u8]) -> Option<Self> {
        let h = packet::parse(ip)?;
        let ipv4_ok = ip[0] >> 4 != 4 || packet::checksum(&ip[..h.l4_offset]) == 0;
        if h.proto != packet::UDP || !ipv4_ok || !packet::l4_checksum_ok(ip) {
            return None;
        }
        Some(Self {
            src: h.src,
            dst: h.dst,
            ttl: h.ttl,
            payload: ip.get(h.l4_offset + 8..)?.to_vec(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "UDP {} -> {} ({} bytes)",
            self.src,
            self.dst,
            self.payload.len()
        )
    }
}

/// One node namespace with one pod and a TUN device `mtun0` carrying
/// `from_l3dev`, set up for WireGuard mode: the remote pod prefixes
/// 10.9.0.0/16 and fd00:9::/64 are routed into the TUN and flagged
/// `ENCRYPT` in the ipcache. Fields drop in order: the TUN (closing its fd
/// deletes it), the datapath, the namespaces, then the bpffs.
struct L3Node {
    tun: Tun,
    _dp: Datapath,
    pod_ns: Netns,
    _node_ns: Netns,
    bpffs: Bpffs,
}

const POD_V4: &str = "10.1.0.11";
const POD_V6: &str = "fd00:1::11";
const REMOTE_V4: &str = "10.9.0.5";
const REMOTE_V6: &str = "fd00:9::5";
const REMOTE_IDENTITY: u32 = (2 << 16) | 400;

impl L3Node {
    /// `tag` keeps the namespaces of concurrent tests apart.
    fn build(tag: &str) -> Self {
        let prefix = format!("{}{tag}-", common::prefix("hd"));
        let node_ns = Netns::new(format!("{prefix}n1"));
        let pod_ns = Netns::new(format!("{prefix}p11"));
        let bpffs = Bpffs::new();
        let node = node_ns.name.clone();
        common::setup_pod(&node, &pod_ns.name, "lxc11", POD_V4, POD_V6);
        let tun = Tun::create(&node_ns.path(), "mtun0");
        common::ns(
            &node,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
        for cmd in [
            &["link", "set", "mtun0", "mtu", "1420", "up"][..],
            &["route", "add", "10.9.0.0/16", "dev", "mtun0"],
            &["-6", "route", "add", "fd00:9::/64", "dev", "mtun0"],
        ] {
            let mut args = vec!["ip", "-n", &node];
            args.extend_from_slice(cmd);
            run(&args);
        }

        let dp = Datapath::load_or_adopt(bpffs.path()).expect("load datapath");
        let mut eps = dp.endpoints().unwrap();
        let ep = Endpoint {
            ifindex: common::ifindex_of(&node, "lxc11"),
            identity: (1 << 16) | 311,
            endpoint_id: 311,
            pod_mac: common::mac_of(&pod_ns.name, "eth0"),
            host_mac: common::mac_of(&node, "lxc11"),
        };
        let mut ipc = dp.ipcache().unwrap();
        for ip in [POD_V4, POD_V6] {
            eps.insert(ip.parse().unwrap(), ep).unwrap();
        }
        for prefix in ["10.9.0.0/16", "fd00:9::/64"] {
            let entry = IpcacheEntry {
                identity: REMOTE_IDENTITY,
                tunnel_endpoint: None,
                flags: IpcacheFlags::REMOTE_CLUSTER | IpcacheFlags::ENCRYPT,
            };
            ipc.upsert(prefix.parse().unwrap(), entry).unwrap();
        }
        let dir = bpffs.path().to_owned();
        let outcomes = netns::run_in(&node_ns.path(), move || {
            let mut dp = Datapath::load_or_adopt(&dir).expect("adopt in node namespace");
            [
                dp.attach_from_pod("lxc11").expect("attach from_pod"),
                dp.attach_from_host_device("mtun0", HostDevice::L3)
                    .expect("attach from_l3dev"),
            ]
        })
        .expect("enter node namespace");
        assert_eq!(outcomes, [AttachOutcome::Created; 2]);
        Self {
            tun,
            _dp: dp,
            pod_ns,
            _node_ns: node_ns,
            bpffs,
        }
    }
}

/// A datagram's sender and payload, and the socket that got it.
type Received = (SocketAddr, Vec<u8>, UdpSocket);

/// Binds a UDP socket to `local` in `netns` (connected to `peer` when
/// given, and sending it `send_first` when given) and returns the first
/// datagram it receives with its sender, or an error after [`TIMEOUT`].
/// Returns once the socket is bound (and the first datagram sent).
fn udp_receiver(
    netns: &Path,
    local: SocketAddr,
    peer: Option<SocketAddr>,
    send_first: Option<&'static [u8]>,
) -> JoinHandle<Result<Received, String>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let netns = netns.to_owned();
    let handle = std::thread::spawn(move || {
        netns::run_in(&netns, move || {
            let sock = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
            sock.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            if let Some(peer) = peer {
                sock.connect(peer)
                    .map_err(|e| format!("connect {peer}: {e}"))?;
            }
            if let Some(msg) = send_first {
                sock.send(msg).map_err(|e| format!("send: {e}"))?;
            }
            ready_tx.send(()).ok();
            let mut buf = [0u8; 2048];
            let (n, from) = sock
                .recv_from(&mut buf)
                .map_err(|e| format!("no datagram on {local} within {TIMEOUT:?}: {e}"))?;
            Ok((from, buf[..n].to_vec(), sock))
        })
        .map_err(|e| e.to_string())?
    });
    ready_rx
        .recv_timeout(TIMEOUT)
        .expect("UDP socket bound in the pod");
    handle
}

/// What a [`udp_receiver`] got; panics with its error.
fn received(receiver: JoinHandle<Result<Received, String>>) -> Received {
    receiver
        .join()
        .expect("receiver thread")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A packet from a remote pod written into the TUN (as WireGuard hands a
/// decrypted packet to the kernel) reaches the local pod through
/// `from_l3dev`, IPv4 and IPv6, with the hop limit decremented; the pod's
/// reply leaves through `from_pod` and the node's route into the TUN.
#[test]
fn l3_device_delivers_to_pods_and_replies_leave_through_it() {
    if !common::require_root() {
        return;
    }
    let mut node = L3Node::build("t");
    let pod = node.pod_ns.path();
    for (local, remote) in [(POD_V4, REMOTE_V4), (POD_V6, REMOTE_V6)] {
        let local = SocketAddr::new(local.parse().unwrap(), 7100);
        let remote = SocketAddr::new(remote.parse().unwrap(), 5555);
        let receiver = udp_receiver(&pod, local, None, None);
        node.tun.inject_udp(remote, local, b"through the tunnel");
        let (from, payload, sock) = received(receiver);
        assert_eq!((from, &payload[..]), (remote, &b"through the tunnel"[..]));

        // The reply: from_pod finds the remote prefix flagged ENCRYPT and
        // hands it to the node, whose route sends it into the TUN.
        sock.send_to(b"reply", remote).expect("reply from the pod");
        let out = node
            .tun
            .receive("reply to the remote pod", |p| p.dst == remote);
        assert_eq!((out.src, &out.payload[..]), (local, &b"reply"[..]));
        assert_eq!(out.ttl, 63, "the node routed the reply once");
    }
}

/// A pod asks a service whose only backend is remote behind the TUN: the
/// request leaves `from_pod` translated to the backend (read from the TUN,
/// checksums valid); the backend's answer, written into the TUN, is
/// reverse-translated by `from_l3dev`, so the pod's socket (connected to
/// the frontend, which filters by peer) receives it from the frontend.
#[test]
fn l3_device_reverse_translates_service_replies() {
    if !common::require_root() {
        return;
    }
    let mut node = L3Node::build("s");
    let pod = node.pod_ns.path();
    let mut lb = LoadBalancer::open(node.bpffs.path()).expect("load balancer");
    for (client, frontend, backend) in [
        (POD_V4, "10.96.0.10:80", "10.9.0.5:8080"),
        (POD_V6, "[fd00:96::10]:80", "[fd00:9::5]:8080"),
    ] {
        let client = SocketAddr::new(client.parse().unwrap(), 7200);
        let frontend = Frontend {
            addr: frontend.parse().unwrap(),
            proto: Protocol::Udp,
        };
        let backend: SocketAddr = backend.parse().unwrap();
        lb.set_service(frontend, ServiceFlags::GLOBAL, &[Backend::new(backend, 2)])
            .expect("set service");

        let receiver = udp_receiver(&pod, client, Some(frontend.addr), Some(b"question"));
        let request = node
            .tun
            .receive("request to the backend", |p| p.src == client);
        assert_eq!(
            (request.dst, &request.payload[..]),
            (backend, &b"question"[..]),
            "translated to the backend"
        );
        node.tun.inject_udp(backend, client, b"answer");
        let (from, payload, _sock) = received(receiver);
        assert_eq!(
            (from, &payload[..]),
            (frontend.addr, &b"answer"[..]),
            "the answer comes from the frontend"
        );
    }
}
