//! Every program run with `BPF_PROG_TEST_RUN` on crafted packets: verdict,
//! rewritten headers, tunnel parameters, redirect target and drop events.
//! Needs root (bpf(2), bpffs); no network setup. `from_l3dev` is not here:
//! a test run on an L3 device still hands the program an Ethernet frame, so
//! it is tested on a real TUN device in `tests/host_devices.rs`.

mod common;

use common::packet::{self, checksum, l4_checksum_ok};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::programs::{TestRun, TestRunOptions};
use datapath::{
    Datapath, DropReason, Endpoint, Event, EventKind, IpcacheEntry, IpcacheFlags, Program,
    TracePoint,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const POD_MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa1];
const HOST_MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa2];
const POD_MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const HOST_MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb2];
const ID_A: u32 = (1 << 16) | 300;
const ID_B: u32 = (1 << 16) | 301;
const ID_REMOTE: u32 = (2 << 16) | 400;
/// Test packets enter on loopback (ifindex 1) unless the context says otherwise.
const LO: u32 = 1;
const VETH_B: u32 = 4242;
const VXLAN: u32 = 777;

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
}
fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

/// An IP packet with a UDP header (ports 1234 → 80) and a small payload.
fn ip_packet(src: IpAddr, dst: IpAddr, ttl: u8) -> Vec<u8> {
    let (src, dst) = (SocketAddr::new(src, 1234), SocketAddr::new(dst, 80));
    packet::l4_packet(packet::UDP, src, dst, ttl, b"mesh-test-payload")
}

fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let ethertype: u16 = if ip[0] >> 4 == 4 { 0x0800 } else { 0x86dd };
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// A `struct __sk_buff` for ctx_in: ifindex at offset 40, cb[5] at 48.
fn skb_ctx(ifindex: u32, cb: [u32; 5]) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    for (i, v) in cb.iter().enumerate() {
        ctx[48 + 4 * i..52 + 4 * i].copy_from_slice(&v.to_ne_bytes());
    }
    ctx
}

struct Fixture {
    // Field order = drop order: the datapath before its bpffs.
    dp: Datapath,
    events: datapath::EventStream,
    _bpffs: common::Bpffs,
}

struct Outcome {
    verdict: u32,
    data: Vec<u8>,
}

impl Fixture {
    /// Pod A (10.1.0.1, fd00:1::1) "behind" loopback, pod B (10.1.0.2,
    /// fd00:1::2) behind ifindex 4242, remote pods 10.2.0.0/16 and fd00:2::/64
    /// on node 192.168.1.2; tracing on.
    fn new() -> Self {
        let bpffs = common::Bpffs::new();
        let mut dp = common::load_test_datapath(bpffs.path()).expect("load");
        dp.set_trace(true).unwrap();
        dp.set_vxlan_ifindex(VXLAN).unwrap();
        let mut eps = dp.endpoints().unwrap();
        let a = Endpoint {
            ifindex: LO,
            identity: ID_A,
            endpoint_id: 1,
            pod_mac: POD_MAC_A,
            host_mac: HOST_MAC_A,
        };
        let b = Endpoint {
            ifindex: VETH_B,
            identity: ID_B,
            endpoint_id: 2,
            pod_mac: POD_MAC_B,
            host_mac: HOST_MAC_B,
        };
        for (ip, ep) in [
            (v4("10.1.0.1"), a),
            (v6("fd00:1::1"), a),
            (v4("10.1.0.2"), b),
            (v6("fd00:1::2"), b),
        ] {
            eps.insert(ip, ep).unwrap();
        }
        let mut ipc = dp.ipcache().unwrap();
        let remote = IpcacheEntry {
            identity: ID_REMOTE,
            tunnel_endpoint: Some(v4("192.168.1.2")),
            flags: IpcacheFlags::REMOTE_CLUSTER,
        };
        ipc.upsert("10.2.0.0/16".parse().unwrap(), remote).unwrap();
        ipc.upsert("fd00:2::/64".parse().unwrap(), remote).unwrap();
        let events = dp.events().unwrap();
        Self {
            dp,
            events,
            _bpffs: bpffs,
        }
    }

    fn run(&mut self, program: Program, data: &[u8], ctx: Option<&[u8]>) -> Outcome {
        let prog = self.dp.program(program).unwrap();
        let mut out = vec![0u8; data.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(data),
                data_out: Some(&mut out),
                ctx_in: ctx,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        Outcome {
            verdict: result.return_value,
            data: out,
        }
    }

    /// The one event the last run emitted.
    fn event(&mut self) -> Event {
        let event = self
            .events
            .try_next()
            .expect("an event")
            .expect("decodable event");
        assert!(self.events.try_next().is_none(), "exactly one event");
        event
    }

    fn no_event(&mut self) {
        assert!(self.events.try_next().is_none(), "no event expected");
    }
}

fn fixture() -> Option<Fixture> {
    common::require_root().then(Fixture::new)
}

/// Sends pod A → pod B; checks MACs, TTL and checksum, redirect target, trace.
#[tokio::test]
async fn from_pod_delivers_to_local_pod() {
    let Some(mut fx) = fixture() else { return };
    for (src, dst) in [
        (v4("10.1.0.1"), v4("10.1.0.2")),
        (v6("fd00:1::1"), v6("fd00:1::2")),
    ] {
        let ip = ip_packet(src, dst, 64);
        let out = fx.run(Program::FromPod, &frame(HOST_MAC_A, POD_MAC_A, &ip), None);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{src} -> {dst}");
        assert_eq!(&out.data[0..6], &POD_MAC_B, "destination MAC is pod B's");
        assert_eq!(
            &out.data[6..12],
            &HOST_MAC_B,
            "source MAC is pod B's gateway"
        );
        let l3 = &out.data[14..];
        if src.is_ipv4() {
            assert_eq!(l3[8], 63, "TTL decremented");
            assert_eq!(checksum(&l3[..20]), 0, "IPv4 header checksum still valid");
        } else {
            assert_eq!(l3[7], 63, "hop limit decremented");
        }
        let e = fx.event();
        assert_eq!(e.kind, EventKind::Trace(TracePoint::ToEndpoint));
        assert_eq!(e.target_ifindex, Some(VETH_B));
        assert_eq!(e.identity, ID_A);
        assert_eq!((e.src, e.dst), (Some(src), Some(dst)));
        assert_eq!((e.sport, e.dport, e.proto), (1234, 80, 17));
    }
}

/// Pod A → remote pod: tunnel key with the remote node and VNI = identity of A.
#[tokio::test]
async fn from_pod_tunnels_to_remote_node() {
    let Some(mut fx) = fixture() else { return };
    for (src, dst) in [
        (v4("10.1.0.1"), v4("10.2.3.4")),
        (v6("fd00:1::1"), v6("fd00:2::9")),
    ] {
        let ip = ip_packet(src, dst, 64);
        let out = fx.run(Program::FromPod, &frame(HOST_MAC_A, POD_MAC_A, &ip), None);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{src} -> {dst}");
        let e = fx.event();
        assert_eq!(e.kind, EventKind::Trace(TracePoint::ToOverlay));
        assert_eq!(
            e.tunnel_endpoint,
            Some("192.168.1.2".parse().unwrap()),
            "remote node IP"
        );
        assert_eq!(e.tunnel_id, ID_A, "VNI carries the source identity");
        assert_eq!(
            e.target_ifindex,
            Some(VXLAN),
            "redirected to the VXLAN device"
        );
        assert_eq!(
            out.data[14 + if src.is_ipv4() { 8 } else { 7 }],
            63,
            "TTL decremented"
        );
    }
}

#[tokio::test]
async fn from_pod_without_overlay_device_drops() {
    let Some(mut fx) = fixture() else { return };
    fx.dp.set_vxlan_ifindex(0).unwrap();
    let ip = ip_packet(v4("10.1.0.1"), v4("10.2.0.5"), 64);
    let out = fx.run(Program::FromPod, &frame(HOST_MAC_A, POD_MAC_A, &ip), None);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(fx.event().kind, EventKind::Drop(DropReason::NoOverlay));
}

/// Encrypted, natively routed and unknown destinations go to the stack unchanged.
#[tokio::test]
async fn from_pod_hands_encrypted_native_and_world_to_the_stack() {
    let Some(mut fx) = fixture() else { return };
    let mut ipc = fx.dp.ipcache().unwrap();
    let encrypted = IpcacheEntry {
        identity: ID_REMOTE,
        tunnel_endpoint: Some(v4("192.168.1.3")),
        flags: IpcacheFlags::REMOTE_CLUSTER | IpcacheFlags::ENCRYPT,
    };
    ipc.upsert("10.3.0.0/16".parse().unwrap(), encrypted)
        .unwrap();
    let native = IpcacheEntry {
        identity: ID_REMOTE,
        tunnel_endpoint: None,
        flags: IpcacheFlags::NONE,
    };
    ipc.upsert("10.4.0.0/16".parse().unwrap(), native).unwrap();
    for dst in ["10.3.0.1", "10.4.0.1", "8.8.8.8"] {
        let f = frame(
            HOST_MAC_A,
            POD_MAC_A,
            &ip_packet(v4("10.1.0.1"), v4(dst), 64),
        );
        let out = fx.run(Program::FromPod, &f, None);
        assert_eq!(out.verdict, TC_ACT_OK, "{dst}");
        assert_eq!(
            out.data, f,
            "{dst}: packet untouched (the kernel decrements TTL when routing)"
        );
        let e = fx.event();
        assert_eq!(e.kind, EventKind::Trace(TracePoint::ToStack), "{dst}");
        assert_eq!(e.tunnel_endpoint, None);
    }
}

#[tokio::test]
async fn from_pod_drops_spoofed_and_malformed_packets() {
    let Some(mut fx) = fixture() else { return };
    // Source is pod B's address, but the packet arrives on pod A's veth.
    let ip = ip_packet(v4("10.1.0.2"), v4("10.1.0.1"), 64);
    let out = fx.run(Program::FromPod, &frame(HOST_MAC_A, POD_MAC_A, &ip), None);
    assert_eq!(out.verdict, TC_ACT_SHOT);
    let e = fx.event();
    assert_eq!(e.kind, EventKind::Drop(DropReason::UnknownSource));
    assert_eq!(
        (e.src, e.dst),
        (Some(v4("10.1.0.2")), Some(v4("10.1.0.1"))),
        "drop event carries addresses"
    );

    // Unknown source address.
    let ip = ip_packet(v4("10.9.9.9"), v4("10.1.0.2"), 64);
    assert_eq!(
        fx.run(Program::FromPod, &frame(HOST_MAC_A, POD_MAC_A, &ip), None)
            .verdict,
        TC_ACT_SHOT
    );
    assert_eq!(fx.event().kind, EventKind::Drop(DropReason::UnknownSource));

    // TTL 1 cannot be forwarded.
    let ip = ip_packet(v4("10.1.0.1"), v4("10.1.0.2"), 1);
    assert_eq!(
        fx.run(Program::FromPod, &frame(HOST_MAC_A, POD_MAC_A, &ip), None)
            .verdict,
        TC_ACT_SHOT
    );
    assert_eq!(fx.event().kind, EventKind::Drop(DropReason::TtlExceeded));

    // A UDP packet cut short after its IP header: no room for the ports.
    // (A cut IPv4 header itself is refused by BPF_PROG_TEST_RUN already.)
    let ip = ip_packet(v4("10.1.0.1"), v4("10.1.0.2"), 64);
    let short = &frame(HOST_MAC_A, POD_MAC_A, &ip)[..14 + 20 + 2];
    assert_eq!(fx.run(Program::FromPod, short, None).verdict, TC_ACT_SHOT);
    assert_eq!(fx.event().kind, EventKind::Drop(DropReason::InvalidPacket));

    // A version nibble that is not 4.
    let mut bad = frame(HOST_MAC_A, POD_MAC_A, &ip);
    bad[14] = 0x55;
    assert_eq!(fx.run(Program::FromPod, &bad, None).verdict, TC_ACT_SHOT);
    assert_eq!(fx.event().kind, EventKind::Drop(DropReason::InvalidPacket));
}

#[tokio::test]
async fn from_pod_passes_arp_and_link_scoped_traffic() {
    let Some(mut fx) = fixture() else { return };
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&POD_MAC_A);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 20]);
    assert_eq!(fx.run(Program::FromPod, &arp, None).verdict, TC_ACT_OK);
    // IPv6 neighbour solicitation style: link-local source, multicast destination.
    let nd = ip_packet(v6("fe80::1:2"), v6("ff02::1:ff00:1"), 255);
    assert_eq!(
        fx.run(
            Program::FromPod,
            &frame([0x33, 0x33, 0, 0, 0, 1], POD_MAC_A, &nd),
            None
        )
        .verdict,
        TC_ACT_OK
    );
    fx.no_event();
}

/// Decapsulated frame for pod B: identity from the VNI, MACs rewritten.
#[tokio::test]
async fn from_overlay_delivers_with_identity_from_vni() {
    let Some(mut fx) = fixture() else { return };
    let remote = u32::from("192.168.1.2".parse::<Ipv4Addr>().unwrap());
    let ctx = skb_ctx(0, [ID_REMOTE, remote, 0, 0, 0]);
    for (src, dst) in [
        (v4("10.2.0.7"), v4("10.1.0.2")),
        (v6("fd00:2::7"), v6("fd00:1::2")),
    ] {
        let ip = ip_packet(src, dst, 63);
        // The inner destination MAC is whatever the sender wrote.
        let out = fx.run(
            Program::TestFromOverlay,
            &frame([0xee; 6], [0xdd; 6], &ip),
            Some(&ctx),
        );
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{src} -> {dst}");
        assert_eq!(&out.data[0..6], &POD_MAC_B);
        assert_eq!(&out.data[6..12], &HOST_MAC_B);
        assert_eq!(&out.data[14..], &ip[..], "IP packet unchanged");
        let e = fx.event();
        assert_eq!(e.kind, EventKind::Trace(TracePoint::ToEndpoint));
        assert_eq!(e.identity, ID_REMOTE, "source identity from the VNI");
        assert_eq!(e.tunnel_endpoint, Some("192.168.1.2".parse().unwrap()));
        assert_eq!(e.target_ifindex, Some(VETH_B));
    }

    // A destination that is no local pod is dropped with a reason.
    let ip = ip_packet(v4("10.2.0.7"), v4("10.1.0.99"), 63);
    let out = fx.run(
        Program::TestFromOverlay,
        &frame([0xee; 6], [0xdd; 6], &ip),
        Some(&ctx),
    );
    assert_eq!(out.verdict, TC_ACT_SHOT);
    let e = fx.event();
    assert_eq!(e.kind, EventKind::Drop(DropReason::UnknownEndpoint));
    assert_eq!((e.identity, e.dst), (ID_REMOTE, Some(v4("10.1.0.99"))));
}

/// The real from_overlay: a packet without tunnel metadata is dropped.
#[tokio::test]
async fn from_overlay_drops_without_tunnel_key() {
    let Some(mut fx) = fixture() else { return };
    let ip = ip_packet(v4("10.2.0.7"), v4("10.1.0.2"), 63);
    let out = fx.run(
        Program::FromOverlay,
        &frame([0xee; 6], [0xdd; 6], &ip),
        None,
    );
    assert_eq!(out.verdict, TC_ACT_SHOT);
    let e = fx.event();
    assert_eq!(e.kind, EventKind::Drop(DropReason::NoTunnelKey));
    assert_eq!(e.dst, Some(v4("10.1.0.2")));
}

/// Natively routed frame for pod B on an Ethernet device; others pass.
#[tokio::test]
async fn from_netdev_delivers_local_pods_only() {
    let Some(mut fx) = fixture() else { return };
    let ip = ip_packet(v4("10.2.0.7"), v4("10.1.0.2"), 64);
    let out = fx.run(Program::FromNetdev, &frame([0xee; 6], [0xdd; 6], &ip), None);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(&out.data[0..12], &[POD_MAC_B, HOST_MAC_B].concat()[..]);
    assert_eq!(out.data[14 + 8], 63);
    let e = fx.event();
    assert_eq!(
        (e.kind, e.identity),
        (EventKind::Trace(TracePoint::ToEndpoint), ID_REMOTE),
        "identity from ipcache"
    );

    let f = frame(
        [0xee; 6],
        [0xdd; 6],
        &ip_packet(v4("10.2.0.7"), v4("192.168.1.1"), 64),
    );
    let out = fx.run(Program::FromNetdev, &f, None);
    assert_eq!(
        (out.verdict, out.data),
        (TC_ACT_OK, f),
        "node traffic untouched"
    );
    fx.no_event();
}

/// Typed map round trips, and a restarted loader sees the same entries.
#[tokio::test]
async fn maps_round_trip_and_survive_reload() {
    let Some(fx) = fixture() else { return };
    let dir = fx._bpffs.path().to_owned();
    let ipc = fx.dp.ipcache().unwrap();
    let got = ipc
        .get("10.2.0.0/16".parse().unwrap())
        .unwrap()
        .expect("entry");
    assert_eq!(got.tunnel_endpoint, Some(v4("192.168.1.2")));
    assert!(got.flags.contains(IpcacheFlags::REMOTE_CLUSTER));
    assert_eq!(
        ipc.lookup(v4("10.2.200.1")).unwrap().map(|e| e.identity),
        Some(ID_REMOTE),
        "longest prefix match"
    );
    assert_eq!(ipc.lookup(v4("10.5.0.1")).unwrap(), None);
    let before: Vec<_> = ipc.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(before.len(), 2);

    let second = Datapath::load_or_adopt(&dir).expect("adopt");
    let after: Vec<_> = second
        .ipcache()
        .unwrap()
        .iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(before, after, "adopting never flushes");
    assert!(
        second.config().unwrap().flags & datapath::abi::CONFIG_F_TRACE != 0,
        "config adopted too"
    );

    let mut ipc = second.ipcache().unwrap();
    assert!(ipc.remove("10.2.0.0/16".parse().unwrap()).unwrap());
    assert!(!ipc.remove("10.2.0.0/16".parse().unwrap()).unwrap());
    let bad = IpcacheEntry {
        identity: 1,
        tunnel_endpoint: Some(v6("fd00::1")),
        flags: IpcacheFlags::NONE,
    };
    assert!(matches!(
        ipc.upsert("10.7.0.0/16".parse().unwrap(), bad),
        Err(datapath::maps::Error::TunnelEndpointNotIpv4(_))
    ));
    let mut eps = second.endpoints().unwrap();
    let too_big = Endpoint {
        ifindex: 3,
        identity: 1 << 24,
        endpoint_id: 9,
        pod_mac: [0; 6],
        host_mac: [0; 6],
    };
    assert!(matches!(
        eps.insert(v4("10.1.0.9"), too_big),
        Err(datapath::maps::Error::IdentityTooLarge(_))
    ));
    assert_eq!(eps.iter().count(), 4);
    assert_eq!(
        eps.get(v6("fd00:1::2")).unwrap().map(|e| e.ifindex),
        Some(VETH_B)
    );
}

// ---- services ----

use datapath::{Backend, Frontend, Protocol, ServiceFlags};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A TCP (ACK) or UDP packet with valid checksums.
fn l4_packet(proto: Protocol, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    packet::l4_packet(proto.number(), src, dst, 64, b"service-payload!")
}

/// (source, destination) socket addresses of an Ethernet frame's IP packet.
fn endpoints_of(frame: &[u8]) -> (SocketAddr, SocketAddr) {
    let h = packet::parse(&frame[14..]).expect("an IP packet");
    (h.src, h.dst)
}

/// Checks the IPv4 header checksum (if IPv4) and the L4 checksum.
fn assert_checksums(frame: &[u8], what: &str) {
    let ip = &frame[14..];
    if ip[0] >> 4 == 4 {
        assert_eq!(checksum(&ip[..20]), 0, "{what}: IPv4 header checksum");
    }
    assert!(l4_checksum_ok(ip), "{what}: TCP/UDP checksum");
}

/// Service fixtures: frontend (v4 or v6) with one backend on the local pod B
/// and one on a remote node (in the ipcache's 10.2.0.0/16 / fd00:2::/64).
fn service_setup(
    fx: &mut Fixture,
    v6: bool,
    proto: Protocol,
) -> (Frontend, SocketAddr, SocketAddr) {
    let (fe, local, remote) = if v6 {
        ("[fd00:96::10]:80", "[fd00:1::2]:8080", "[fd00:2::5]:8080")
    } else {
        ("10.96.0.10:80", "10.1.0.2:8080", "10.2.0.5:8080")
    };
    let frontend = Frontend {
        addr: sa(fe),
        proto,
    };
    let mut lb = fx.dp.load_balancer().unwrap();
    let update = lb
        .set_service(
            frontend,
            ServiceFlags::GLOBAL,
            &[Backend::new(sa(local), 1), Backend::new(sa(remote), 2)],
        )
        .unwrap();
    assert_eq!((update.table_members, update.backends_added), (2, 2));
    (frontend, sa(local), sa(remote))
}

/// Client pod A → frontend, many source ports: every packet goes to the
/// backend the Maglev table names for its flow (predicted in Rust with the
/// mirrored flow hash), with address, port and checksums rewritten; local
/// backend → delivered to pod B, remote → tunnel. Both backends are used.
#[tokio::test]
async fn from_pod_translates_frontend_to_maglev_backend() {
    let Some(mut fx) = fixture() else { return };
    for ipv6 in [false, true] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let (frontend, local, remote) = service_setup(&mut fx, ipv6, proto);
            let client_ip = if ipv6 {
                v6("fd00:1::1")
            } else {
                v4("10.1.0.1")
            };
            let mut seen = std::collections::BTreeSet::new();
            for sport in 40_000..40_016u16 {
                let client = SocketAddr::new(client_ip, sport);
                let ip = l4_packet(proto, client, frontend.addr);
                let out = fx.run(Program::FromPod, &frame(HOST_MAC_A, POD_MAC_A, &ip), None);
                let what = format!("{proto} {client} -> {frontend}");
                assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}");
                let (src, dst) = endpoints_of(&out.data);
                assert_eq!(src, client, "{what}: source untouched");
                assert!(dst == local || dst == remote, "{what}: went to {dst}");
                assert_checksums(&out.data, &what);
                let expected = expected_backend(&fx, frontend, client);
                assert_eq!(dst, expected, "{what}: the Maglev table's choice");
                let e = fx.event();
                if dst == local {
                    assert_eq!(e.kind, EventKind::Trace(TracePoint::ToEndpoint), "{what}");
                    assert_eq!(e.target_ifindex, Some(VETH_B));
                    assert_eq!(&out.data[0..6], &POD_MAC_B);
                } else {
                    assert_eq!(e.kind, EventKind::Trace(TracePoint::ToOverlay), "{what}");
                    assert_eq!(e.tunnel_endpoint, Some("192.168.1.2".parse().unwrap()));
                }
                assert_eq!(e.dst, Some(dst.ip()), "event shows the backend");
                seen.insert(dst);
            }
            assert_eq!(seen.len(), 2, "16 flows reached both backends: {seen:?}");
        }
    }
}

/// The backend a new flow gets, from a writer that built the table itself.
fn expected_backend(fx: &Fixture, frontend: Frontend, client: SocketAddr) -> SocketAddr {
    let mut lb = fx.dp.load_balancer().unwrap();
    let view = lb.service(&frontend).expect("service adopted");
    let backends: Vec<Backend> = view
        .backends
        .iter()
        .map(|(_, b)| Backend::new(b.addr, b.cluster_id))
        .collect();
    let flags = view.flags;
    let update = lb.set_service(frontend, flags, &backends).unwrap();
    assert!(update.table_rebuilt, "an adopted service is rebuilt once");
    lb.backend_for(&frontend, client).expect("a table").addr
}

/// A remote backend's reply arrives through the tunnel (from_overlay) and
/// reaches the client with the frontend as source; a local backend's reply
/// (here the client itself is the backend: a hairpin, the only local pod a
/// test run can send from) is reverse-translated in from_pod.
#[tokio::test]
async fn replies_get_the_frontend_back() {
    let Some(mut fx) = fixture() else { return };
    for ipv6 in [false, true] {
        let proto = Protocol::Tcp;
        let (frontend, _, remote) = service_setup(&mut fx, ipv6, proto);
        let client_ip = if ipv6 {
            v6("fd00:1::1")
        } else {
            v4("10.1.0.1")
        };
        // A client port whose flow goes to the remote backend.
        let client = (41_000..42_000u16)
            .map(|p| SocketAddr::new(client_ip, p))
            .find(|&c| expected_backend(&fx, frontend, c) == remote)
            .expect("some flow maps to the remote backend");
        let fwd = l4_packet(proto, client, frontend.addr);
        let out = fx.run(Program::FromPod, &frame(HOST_MAC_A, POD_MAC_A, &fwd), None);
        assert_eq!(endpoints_of(&out.data).1, remote);
        let _ = fx.event();

        let reply = l4_packet(proto, remote, client);
        let node = u32::from("192.168.1.2".parse::<Ipv4Addr>().unwrap());
        let ctx = skb_ctx(0, [ID_REMOTE, node, 0, 0, 0]);
        let out = fx.run(
            Program::TestFromOverlay,
            &frame([0xee; 6], [0xdd; 6], &reply),
            Some(&ctx),
        );
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            endpoints_of(&out.data),
            (frontend.addr, client),
            "reply source is the frontend"
        );
        assert_checksums(&out.data, "reverse-translated reply");
        assert_eq!(&out.data[0..6], &POD_MAC_A, "delivered to the client pod");
        assert_eq!(fx.event().src, Some(frontend.addr.ip()));

        // Hairpin: pod A is the only backend of a second frontend. Its
        // packet to the frontend comes back to it from the service loopback
        // address (not from itself: a martian), and its reply, sent to that
        // address, returns with the frontend as source, for TCP and UDP.
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let hairpin = Frontend {
                addr: SocketAddr::new(frontend.addr.ip(), 443),
                proto,
            };
            let me = SocketAddr::new(client_ip, 8443);
            fx.dp
                .load_balancer()
                .unwrap()
                .set_service(hairpin, ServiceFlags::NONE, &[Backend::new(me, 1)])
                .unwrap();
            let loopback: IpAddr = if ipv6 {
                datapath::SERVICE_LOOPBACK_V6.into()
            } else {
                datapath::SERVICE_LOOPBACK_V4.into()
            };
            let what = format!("{proto} hairpin {client} -> {hairpin}");
            let forward = frame(
                HOST_MAC_A,
                POD_MAC_A,
                &l4_packet(proto, client, hairpin.addr),
            );
            let out = fx.run(Program::FromPod, &forward, None);
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}");
            let from = SocketAddr::new(loopback, client.port());
            assert_eq!(
                endpoints_of(&out.data),
                (from, me),
                "{what}: source is the loopback"
            );
            assert_checksums(&out.data, &what);
            assert_eq!(&out.data[0..6], &POD_MAC_A, "{what}: back to the pod");
            let e = fx.event();
            assert_eq!(e.kind, EventKind::Trace(TracePoint::ToEndpoint), "{what}");
            let out = fx.run(
                Program::FromPod,
                &frame(HOST_MAC_A, POD_MAC_A, &l4_packet(proto, me, from)),
                None,
            );
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}: reply");
            assert_eq!(
                endpoints_of(&out.data),
                (hairpin.addr, client),
                "{what}: reply"
            );
            assert_checksums(&out.data, &format!("{what}: reply"));
            assert_eq!(&out.data[0..6], &POD_MAC_A, "{what}: reply to the pod");
            let _ = fx.event();
            // A second packet of the flow takes the same path (ct entries).
            let out = fx.run(Program::FromPod, &forward, None);
            assert_eq!(endpoints_of(&out.data), (from, me), "{what}: again");
            let _ = fx.event();
        }
    }
}

/// Destinations that are no frontend (other IP, other port, other protocol)
/// pass exactly as before; a frontend without backends drops.
#[tokio::test]
async fn unknown_frontend_untouched_and_empty_service_drops() {
    let Some(mut fx) = fixture() else { return };
    let (frontend, _, _) = service_setup(&mut fx, false, Protocol::Tcp);
    let client = sa("10.1.0.1:40000");
    for (proto, dst) in [
        (Protocol::Tcp, sa("10.96.0.99:80")),
        (Protocol::Tcp, sa("10.96.0.10:81")),
        (Protocol::Udp, frontend.addr),
    ] {
        let f = frame(HOST_MAC_A, POD_MAC_A, &l4_packet(proto, client, dst));
        let out = fx.run(Program::FromPod, &f, None);
        assert_eq!((out.verdict, &out.data), (TC_ACT_OK, &f), "{proto} {dst}");
        assert_eq!(fx.event().kind, EventKind::Trace(TracePoint::ToStack));
    }
    let mut lb = fx.dp.load_balancer().unwrap();
    let update = lb.set_service(frontend, ServiceFlags::NONE, &[]).unwrap();
    assert_eq!((update.table_members, update.backends_removed), (0, 2));
    let f = frame(
        HOST_MAC_A,
        POD_MAC_A,
        &l4_packet(Protocol::Tcp, client, frontend.addr),
    );
    assert_eq!(fx.run(Program::FromPod, &f, None).verdict, TC_ACT_SHOT);
    assert_eq!(fx.event().kind, EventKind::Drop(DropReason::NoBackend));
    assert!(lb.remove_service(frontend).unwrap());
    assert!(!lb.remove_service(frontend).unwrap());
    let out = fx.run(Program::FromPod, &f, None);
    assert_eq!(
        (out.verdict, &out.data),
        (TC_ACT_OK, &f),
        "removed: untouched"
    );
    let _ = fx.event();
}

/// A flow keeps its backend when the table changes under it; a new flow
/// follows the new table; a quarantined backend's flows are re-balanced.
#[tokio::test]
async fn flows_stick_to_their_backend_across_table_changes() {
    let Some(mut fx) = fixture() else { return };
    let frontend = Frontend {
        addr: sa("10.96.0.20:80"),
        proto: Protocol::Tcp,
    };
    let first = Backend::new(sa("10.2.0.5:8080"), 2);
    let mut lb = fx.dp.load_balancer().unwrap();
    lb.set_service(frontend, ServiceFlags::NONE, &[first])
        .unwrap();
    let more: Vec<Backend> = (6..10)
        .map(|i| Backend::new(sa(&format!("10.2.0.{i}:8080")), 2))
        .chain([first])
        .collect();
    // Build the future table in a scratch map set to pick a client whose
    // flow will map elsewhere once the backends are added.
    let future = datapath::maglev::build(
        lb.table_size(),
        &more
            .iter()
            .map(|b| datapath::maglev::Member {
                key: datapath::maglev::BackendKey {
                    cluster_id: b.cluster_id,
                    addr: b.addr,
                    proto: frontend.proto,
                },
                weight: 1,
            })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let client = (40_000..41_000u16)
        .map(|p| sa(&format!("10.1.0.1:{p}")))
        .find(|c| {
            let h = datapath::lb::flow_hash(*c, frontend.addr, frontend.proto);
            future.lookup(h).unwrap().addr != first.addr
        })
        .unwrap();
    let pkt = frame(
        HOST_MAC_A,
        POD_MAC_A,
        &l4_packet(Protocol::Tcp, client, frontend.addr),
    );
    let dst = |fx: &mut Fixture| {
        let out = fx.run(Program::FromPod, &pkt, None);
        let _ = fx.event();
        endpoints_of(&out.data).1
    };
    assert_eq!(dst(&mut fx), first.addr);

    let update = lb.set_service(frontend, ServiceFlags::NONE, &more).unwrap();
    assert!(update.table_rebuilt);
    assert_eq!(update.backends_added, 4);
    let moved_to = lb.backend_for(&frontend, client).unwrap().addr;
    assert_ne!(
        moved_to, first.addr,
        "the table now sends this flow elsewhere"
    );
    assert_eq!(dst(&mut fx), first.addr, "the live flow keeps its backend");

    // The same set again: nothing rebuilt, nothing written.
    let again = lb.set_service(frontend, ServiceFlags::NONE, &more).unwrap();
    assert!(!again.table_rebuilt && again.backends_added == 0 && again.backends_removed == 0);

    // Quarantine the flow's backend: the flow is balanced again.
    let quarantined: Vec<Backend> = more
        .iter()
        .map(|b| Backend {
            state: if b.addr == first.addr {
                datapath::BackendState::Quarantined
            } else {
                datapath::BackendState::Active
            },
            ..*b
        })
        .collect();
    lb.set_service(frontend, ServiceFlags::NONE, &quarantined)
        .unwrap();
    let now = dst(&mut fx);
    assert_ne!(now, first.addr, "quarantined backend's flow moved");
    assert_eq!(Some(now), lb.backend_for(&frontend, client).map(|k| k.addr));
}

/// Writer bookkeeping: validation before any write, ids and tables adopted
/// by a new writer, stale backends deleted, affinity by preference.
#[tokio::test]
async fn load_balancer_validates_adopts_and_prefers() {
    let Some(mut fx) = fixture() else { return };
    let (frontend, local, remote) = service_setup(&mut fx, false, Protocol::Tcp);
    let mut lb = fx.dp.load_balancer().unwrap();
    let view = lb.service(&frontend).expect("adopted");
    assert_eq!(view.backends.len(), 2);
    assert!(
        view.table.is_none(),
        "adopted: content unknown until rebuilt"
    );
    let id = view.service_id;

    assert!(matches!(
        lb.set_service(
            frontend,
            ServiceFlags::NONE,
            &[Backend::new(sa("[fd00::1]:80"), 1)]
        ),
        Err(datapath::lb::Error::FamilyMismatch { .. })
    ));
    let dup = Backend::new(local, 1);
    assert!(matches!(
        lb.set_service(frontend, ServiceFlags::NONE, &[dup, dup]),
        Err(datapath::lb::Error::Maglev {
            source: datapath::maglev::Error::DuplicateBackend(_),
            ..
        })
    ));
    assert_eq!(
        lb.service(&frontend).unwrap().backends.len(),
        2,
        "nothing written"
    );

    // affinity=local: the local backend preferred, the remote one kept.
    let preferred = Backend {
        preferred: true,
        ..Backend::new(local, 1)
    };
    let up = lb
        .set_service(
            frontend,
            ServiceFlags::AFFINITY_LOCAL,
            &[preferred, Backend::new(remote, 2)],
        )
        .unwrap();
    assert_eq!((up.service_id, up.table_members), (id, 1));
    for p in 40_000..40_010u16 {
        let c = SocketAddr::new(v4("10.1.0.1"), p);
        assert_eq!(lb.backend_for(&frontend, c).unwrap().addr, local);
        let out = fx.run(
            Program::FromPod,
            &frame(
                HOST_MAC_A,
                POD_MAC_A,
                &l4_packet(Protocol::Tcp, c, frontend.addr),
            ),
            None,
        );
        assert_eq!(
            endpoints_of(&out.data).1,
            local,
            "only the preferred backend"
        );
        let _ = fx.event();
    }
    // Drop the remote backend; a fresh writer sees one backend and flags.
    lb.set_service(frontend, ServiceFlags::AFFINITY_LOCAL, &[preferred])
        .unwrap();
    drop(lb);
    let lb = fx.dp.load_balancer().unwrap();
    let view = lb.service(&frontend).unwrap();
    assert_eq!(view.service_id, id);
    assert_eq!(view.flags, ServiceFlags::AFFINITY_LOCAL);
    assert_eq!(
        view.backends
            .iter()
            .map(|(_, b)| b.addr)
            .collect::<Vec<_>>(),
        [local]
    );
}

/// The object the agent loads has no test-only program: `test_from_overlay`
/// exists only in the test build of the object.
#[tokio::test]
async fn the_production_object_has_no_test_program() {
    if !common::require_root() {
        return;
    }
    let bpffs = common::Bpffs::new();
    let mut dp = Datapath::load_or_adopt(bpffs.path()).expect("load");
    assert!(dp.program(Program::FromOverlay).is_ok());
    assert!(
        dp.program(Program::TestFromOverlay).is_err(),
        "test_from_overlay is in the production object"
    );
}

/// The loader records its ABI version in `dp_config` and adopts only pins of
/// its own version (or of version 2 from before versions were recorded).
#[tokio::test]
async fn pins_of_another_abi_version_are_refused() {
    use aya::maps::{Array, Map, MapData};
    use datapath::abi::{DatapathConfig, DATAPATH_ABI_VERSION};
    if !common::require_root() {
        return;
    }
    let bpffs = common::Bpffs::new();
    let set_version = |version: u32| {
        let data = MapData::from_pin(bpffs.path().join("dp_config")).unwrap();
        let mut config: Array<MapData, DatapathConfig> = Array::try_from(Map::Array(data)).unwrap();
        let mut value = config.get(&0, 0).unwrap();
        assert_eq!(
            value.abi_version, DATAPATH_ABI_VERSION,
            "the loader records its version"
        );
        value.abi_version = version;
        config.set(0, value, 0).unwrap();
    };
    drop(Datapath::load_or_adopt(bpffs.path()).expect("load"));
    set_version(DATAPATH_ABI_VERSION + 1);
    match Datapath::load_or_adopt(bpffs.path()) {
        Err(datapath::Error::AbiVersion { found, want, .. }) => {
            assert_eq!(
                (found, want),
                (DATAPATH_ABI_VERSION + 1, DATAPATH_ABI_VERSION)
            );
        }
        other => panic!(
            "adopted pins of another ABI version: {:?}",
            other.map(|_| ())
        ),
    }
    // Recorded by no one (a loader before the check): adopted, and recorded.
    let data = MapData::from_pin(bpffs.path().join("dp_config")).unwrap();
    let mut config: Array<MapData, DatapathConfig> = Array::try_from(Map::Array(data)).unwrap();
    let mut value = config.get(&0, 0).unwrap();
    value.abi_version = 0;
    config.set(0, value, 0).unwrap();
    drop(Datapath::load_or_adopt(bpffs.path()).expect("a pre-check pin is adopted"));
    set_version(DATAPATH_ABI_VERSION);
}
