//! Every program run with `BPF_PROG_TEST_RUN` on crafted packets: verdict,
//! rewritten headers, tunnel parameters, redirect target and drop events.
//! Needs root (bpf(2), bpffs); no network setup except one namespace with a
//! TUN device for the L3 program.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IP packet with a UDP header (ports 1234 → 80) and a small payload.
fn ip_packet(src: IpAddr, dst: IpAddr, ttl: u8) -> Vec<u8> {
    let payload = b"mesh-test-payload";
    let udp_len = 8 + payload.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&1234u16.to_be_bytes());
    udp.extend_from_slice(&80u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, ttl, 17, 0, 0];
            ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip.extend_from_slice(&udp);
            ip
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(udp_len as u16).to_be_bytes());
            ip.push(17);
            ip.push(ttl);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&udp);
            ip
        }
        _ => panic!("mixed families"),
    }
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
        let mut dp = Datapath::load_or_adopt(bpffs.path()).expect("load");
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
