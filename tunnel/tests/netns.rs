//! Real netlink, real TUN devices and real packets, in private network
//! namespaces (`mtun-*`). Needs root; skipped otherwise unless
//! `MESH_TEST_STRICT=1`.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use support::{
    classify, contains, ns_sh, prerequisites, tcp_exchange, tcp_exchange_eventually, Capture,
    CountingServer, Frame, Namespaces, NsThread,
};
use tunnel::routes::{self, NextHop, RemoteNode, Route, Routing, RoutingMode, Rule, TunnelParams};
use tunnel::vxlan::{vxlan_state, VxlanOutcome};
use tunnel::{
    ensure_vxlan, Backend, BackendPreference, Netlink, NetlinkError, PeerConfig, PrivateKey,
    VxlanConfig, VxlanError, WireguardConfig, WireguardDevice,
};

const WG_PORT: u16 = 51871;
const MARKER: &[u8] = b"MESH-TUNNEL-PAYLOAD-MARKER-7f3a";

struct Node {
    netlink: Netlink,
    wg: Option<WireguardDevice>,
}

fn node_thread(ns: &str) -> NsThread<Node> {
    NsThread::start(ns, |rt| Node {
        netlink: rt.block_on(async { Netlink::connect() }).unwrap(),
        wg: None,
    })
}

async fn read_vxlan(nl: &Netlink) -> tunnel::vxlan::VxlanState {
    vxlan_state(nl, "mesh_vxlan")
        .await
        .unwrap()
        .expect("mesh_vxlan exists")
        .expect("mesh_vxlan is a vxlan device")
}

#[test]
fn connect_in_talks_to_the_namespace_and_leaves_the_caller_where_it_was() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let mut namespaces = Namespaces::new();
    let ns = namespaces.add();
    ns_sh(&ns, &["ip", "link", "add", "probe0", "type", "bridge"]);
    let netns = std::path::PathBuf::from(format!("/var/run/netns/{ns}"));
    let own_ns = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let before = own_ns();
        let nl = Netlink::connect_in(&netns).await.unwrap();
        assert_eq!(own_ns(), before, "the calling thread changed namespace");
        let probe = nl
            .link("probe0")
            .await
            .unwrap()
            .expect("probe0 in the namespace");
        assert_eq!(probe.kind.as_deref(), Some("bridge"));
        assert!(nl.delete_link("probe0").await.unwrap());
        assert_eq!(nl.link("probe0").await.unwrap(), None);
        assert!(!nl.delete_link("probe0").await.unwrap());

        let missing = netns.with_file_name(format!("{ns}-missing"));
        assert!(matches!(
            Netlink::connect_in(&missing).await,
            Err(NetlinkError::OpenNetns { path, .. }) if path == missing
        ));
        // A namespace file of another kind: setns(CLONE_NEWNET) refuses it.
        let uts = std::path::Path::new("/proc/self/ns/uts");
        assert!(matches!(
            Netlink::connect_in(uts).await,
            Err(NetlinkError::Setns { .. })
        ));
    });
}

#[test]
fn vxlan_is_created_adopted_and_recreated_with_the_right_attributes() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let mut namespaces = Namespaces::new();
    let ns = namespaces.add();
    ns_sh(&ns, &["ip", "link", "add", "taken", "type", "bridge"]);
    let node = node_thread(&ns);
    node.run("vxlan scenario", |rt, node| {
        rt.block_on(async {
            let nl = &node.netlink;
            let mut config = VxlanConfig::for_node("c1/node-1");
            config.mtu = Some(1450);

            assert_eq!(
                ensure_vxlan(nl, "mesh_vxlan", &config).await.unwrap(),
                VxlanOutcome::Created
            );
            let state = read_vxlan(nl).await;
            assert!(state.external, "not in external mode: {state:?}");
            assert_eq!(state.port, Some(4789));
            assert_eq!(state.learning, Some(false));
            assert_eq!(state.vni, None);
            assert_eq!(state.link.mac, config.mac.to_vec());
            assert_eq!(state.link.mtu, Some(1450));
            assert!(state.link.up);
            let index = state.link.index;

            // Idempotent: the same device is adopted, not recreated.
            assert_eq!(
                ensure_vxlan(nl, "mesh_vxlan", &config).await.unwrap(),
                VxlanOutcome::Adopted
            );
            let again = read_vxlan(nl).await;
            assert_eq!(again.link.index, index, "adopting must keep the device");

            // Mutable attributes change in place.
            config.mtu = Some(1400);
            assert_eq!(
                ensure_vxlan(nl, "mesh_vxlan", &config).await.unwrap(),
                VxlanOutcome::Adopted
            );
            let state = read_vxlan(nl).await;
            assert_eq!((state.link.index, state.link.mtu), (index, Some(1400)));

            // An immutable attribute (the port) forces a new device.
            config.port = 8472;
            assert_eq!(
                ensure_vxlan(nl, "mesh_vxlan", &config).await.unwrap(),
                VxlanOutcome::Recreated
            );
            let state = read_vxlan(nl).await;
            assert_eq!(state.port, Some(8472));
            assert!(state.external);

            // Someone else's link is never replaced.
            let err = ensure_vxlan(nl, "taken", &config).await.unwrap_err();
            assert!(matches!(err, VxlanError::NotVxlan { .. }), "{err}");
            assert_eq!(
                nl.link("taken").await.unwrap().unwrap().kind.as_deref(),
                Some("bridge")
            );

            assert!(nl.delete_link("mesh_vxlan").await.unwrap());
            assert!(
                !nl.delete_link("mesh_vxlan").await.unwrap(),
                "second delete is a no-op"
            );
            assert!(nl.link("mesh_vxlan").await.unwrap().is_none());
        })
    });
}

/// Two nodes joined by a veth underlay, each with a WireGuard device (named
/// alike: the UAPI goes over a socketpair, not a shared path).
struct Pair {
    _namespaces: Namespaces,
    a: String,
    b: String,
    node_a: NsThread<Node>,
    node_b: NsThread<Node>,
    key_a: tunnel::PublicKey,
    key_b: tunnel::PublicKey,
    _state: tempfile::TempDir,
}

fn wireguard_pair() -> Pair {
    let mut namespaces = Namespaces::new();
    let a = namespaces.add();
    let b = namespaces.add();
    namespaces.veth(&a, "ua", "192.168.77.1/24", &b, "ub", "192.168.77.2/24");
    let state = tempfile::tempdir().unwrap();
    let node_a = node_thread(&a);
    let node_b = node_thread(&b);
    let mut keys = Vec::new();
    for (node, dir, address) in [
        (&node_a, "a", "10.99.0.1/24"),
        (&node_b, "b", "10.99.0.2/24"),
    ] {
        let state_dir = state.path().join(dir);
        keys.push(node.run("opening the wireguard device", move |rt, node| {
            rt.block_on(async {
                let key = PrivateKey::load_or_generate(&state_dir).unwrap();
                let mut config = WireguardConfig::new("mesh_wg", key);
                config.listen_port = WG_PORT;
                let wg = WireguardDevice::open(&node.netlink, config).await.unwrap();
                node.netlink
                    .add_address("mesh_wg", address.parse().unwrap())
                    .await
                    .unwrap();
                let public = wg.public_key();
                node.wg = Some(wg);
                public
            })
        }));
    }
    Pair {
        _namespaces: namespaces,
        a,
        b,
        node_a,
        node_b,
        key_a: keys[0],
        key_b: keys[1],
        _state: state,
    }
}

/// Asserts that the underlay carried nothing but ARP and WireGuard UDP
/// between the WireGuard ports, enough of it for `payload_len` bytes, and
/// never the payload marker.
fn assert_only_wireguard(frames: &[Vec<u8>], payload_len: usize) {
    let mut wireguard_frames = 0;
    for frame in frames {
        assert!(
            !contains(frame, MARKER),
            "the payload marker crossed the underlay in clear"
        );
        match classify(frame) {
            Frame::Arp => {}
            Frame::Udp { sport, dport } if sport == WG_PORT && dport == WG_PORT => {
                wireguard_frames += 1
            }
            other => panic!("unexpected frame on the underlay (traffic in clear?): {other:?}"),
        }
    }
    assert!(
        wireguard_frames > payload_len / 1500,
        "only {wireguard_frames} wireguard frames for {payload_len} bytes"
    );
}

fn set_peers(node: &NsThread<Node>, peers: Vec<PeerConfig>) -> tunnel::PeerChanges {
    node.run("setting peers", move |_, node| {
        node.wg.as_mut().unwrap().set_peers(peers).unwrap()
    })
}

fn peer(key: tunnel::PublicKey, endpoint: &str, allowed: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: key,
        endpoint: endpoint.parse().unwrap(),
        allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

#[test]
fn wireguard_carries_tcp_encrypted_and_survives_peer_changes() {
    if !prerequisites(&["ip", "tcpdump"]) {
        return;
    }
    let pair = wireguard_pair();
    let backend = pair
        .node_a
        .run("backend", |_, node| node.wg.as_ref().unwrap().backend());
    if !std::path::Path::new("/sys/module/wireguard").exists() {
        assert_eq!(
            backend,
            Backend::Userspace,
            "no kernel module, so boringtun"
        );
    }

    let changes = set_peers(
        &pair.node_a,
        vec![peer(pair.key_b, "192.168.77.2:51871", &["10.99.0.2/32"])],
    );
    assert_eq!(changes.added, vec![pair.key_b]);
    set_peers(
        &pair.node_b,
        vec![peer(pair.key_a, "192.168.77.1:51871", &["10.99.0.1/32"])],
    );
    // Same desired set again: nothing to do, the session is kept.
    let again = set_peers(
        &pair.node_a,
        vec![peer(pair.key_b, "192.168.77.2:51871", &["10.99.0.2/32"])],
    );
    assert!(again.is_empty(), "{again:?}");

    let _server = CountingServer::start(&pair.b, "0.0.0.0:7777".parse().unwrap());
    let to_b: SocketAddr = "10.99.0.2:7777".parse().unwrap();
    let capture = Capture::start(&pair.b, "ub", pair._state.path().join("underlay.pcap"));
    let payload: Vec<u8> = MARKER
        .iter()
        .copied()
        .cycle()
        .take(MARKER.len() * 4000)
        .collect();
    let received = tcp_exchange_eventually(&pair.a, to_b, &payload, Duration::from_secs(10));
    assert_eq!(received, payload.len(), "bytes through the tunnel");
    let frames = capture.finish();

    assert_only_wireguard(&frames, payload.len());

    // A second address on B's device is outside what A accepts from B ...
    pair.node_b.run("adding 10.99.1.2", |rt, node| {
        rt.block_on(
            node.netlink
                .add_address("mesh_wg", "10.99.1.2/24".parse().unwrap()),
        )
        .unwrap()
    });
    ns_sh(
        &pair.a,
        &["ip", "route", "add", "10.99.1.0/24", "dev", "mesh_wg"],
    );
    let to_b2: SocketAddr = "10.99.1.2:7777".parse().unwrap();
    assert!(
        tcp_exchange(&pair.a, to_b2, b"x".to_vec()).is_err(),
        "replies from 10.99.1.2 must be dropped before the change"
    );

    // ... until A's peer for B is changed: removed and added again, which
    // boringtun survives (modifying in place would panic its event thread).
    let changed = set_peers(
        &pair.node_a,
        vec![peer(
            pair.key_b,
            "192.168.77.2:51871",
            &["10.99.0.2/32", "10.99.1.0/24"],
        )],
    );
    assert_eq!(changed.replaced, vec![pair.key_b]);
    assert!(changed.added.is_empty() && changed.removed.is_empty());
    assert_eq!(
        tcp_exchange_eventually(&pair.a, to_b2, MARKER, Duration::from_secs(10)),
        MARKER.len()
    );
    assert_eq!(
        tcp_exchange_eventually(&pair.a, to_b, MARKER, Duration::from_secs(10)),
        MARKER.len()
    );
    pair.node_a.run("health check", |_, node| {
        node.wg.as_mut().unwrap().health_check().unwrap()
    });
    let reported = pair
        .node_a
        .run("peers", |_, node| node.wg.as_ref().unwrap().peers());
    assert_eq!(
        reported,
        vec![peer(
            pair.key_b,
            "192.168.77.2:51871",
            &["10.99.0.2/32", "10.99.1.0/24"]
        )]
    );

    // Removing the peer cuts the tunnel.
    let removed = set_peers(&pair.node_a, vec![]);
    assert_eq!(removed.removed, vec![pair.key_b]);
    assert!(
        tcp_exchange(&pair.a, to_b, b"x".to_vec()).is_err(),
        "no peer, no traffic"
    );

    // Bad desired sets are typed errors and change nothing.
    let dup = vec![
        peer(pair.key_b, "192.168.77.2:51871", &[]),
        peer(pair.key_b, "192.168.77.2:51871", &[]),
    ];
    let err = pair.node_a.run("duplicate peers", move |_, node| {
        node.wg.as_mut().unwrap().set_peers(dup).unwrap_err()
    });
    assert!(
        matches!(err, tunnel::WireguardError::DuplicatePeer { .. }),
        "{err}"
    );
    let me = pair.key_a;
    let err = pair.node_a.run("self peer", move |_, node| {
        node.wg
            .as_mut()
            .unwrap()
            .set_peers(vec![peer(me, "192.168.77.1:51871", &[])])
            .unwrap_err()
    });
    assert!(
        matches!(err, tunnel::WireguardError::SelfPeer { .. }),
        "{err}"
    );
}

#[test]
fn userspace_device_is_adopted_after_restart_and_deleted_on_request() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let mut namespaces = Namespaces::new();
    let ns = namespaces.add();
    let state = tempfile::tempdir().unwrap();
    let node = node_thread(&ns);
    let dir = state.path().to_owned();
    node.run("restart scenario", move |rt, node| {
        rt.block_on(async {
            let nl = &node.netlink;
            let open = |dir: std::path::PathBuf| async move {
                let mut config =
                    WireguardConfig::new("mesh_wg", PrivateKey::load_or_generate(&dir).unwrap());
                config.backend = BackendPreference::Userspace;
                WireguardDevice::open(nl, config).await.unwrap()
            };
            let first = open(dir.clone()).await;
            let key = first.public_key();
            nl.add_address("mesh_wg", "10.98.0.1/24".parse().unwrap())
                .await
                .unwrap();
            let index = nl.link_index("mesh_wg").await.unwrap();
            drop(first); // agent exits: the persistent TUN stays with its address

            let link = nl
                .link("mesh_wg")
                .await
                .unwrap()
                .expect("the tun device outlives the agent");
            assert_eq!((link.index, link.kind.as_deref()), (index, Some("tun")));
            let mut second = open(dir.clone()).await;
            assert_eq!(second.public_key(), key, "the key file is reused");
            assert_eq!(
                nl.link_index("mesh_wg").await.unwrap(),
                index,
                "same device adopted"
            );
            assert!(nl
                .addresses("mesh_wg")
                .await
                .unwrap()
                .contains(&"10.98.0.1".parse().unwrap()));
            second.health_check().unwrap();

            // The kernel backend cannot be forced onto the userspace device.
            drop(second);
            let mut config =
                WireguardConfig::new("mesh_wg", PrivateKey::load_or_generate(&dir).unwrap());
            config.backend = BackendPreference::Kernel;
            let err = WireguardDevice::open(nl, config).await.unwrap_err();
            assert!(
                matches!(err, tunnel::WireguardError::BackendMismatch { .. }),
                "{err}"
            );

            let third = open(dir).await;
            third.delete(nl).await.unwrap();
            assert!(nl.link("mesh_wg").await.unwrap().is_none());
        })
    });
}

#[test]
fn route_and_rule_diffs_touch_only_their_own_entries() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let mut namespaces = Namespaces::new();
    let a = namespaces.add();
    let b = namespaces.add();
    namespaces.veth(&a, "ua", "192.168.78.1/24", &b, "ub", "192.168.78.2/24");
    // A stand-in for the WireGuard device (no dummy module here): a veth
    // pair, both ends up so device routes are accepted.
    ns_sh(
        &a,
        &[
            "ip",
            "link",
            "add",
            "mesh_wg",
            "type",
            "veth",
            "peer",
            "name",
            "mesh_wg_peer",
        ],
    );
    ns_sh(&a, &["ip", "link", "set", "mesh_wg", "up"]);
    ns_sh(&a, &["ip", "link", "set", "mesh_wg_peer", "up"]);
    // Routes and a rule that are not ours.
    ns_sh(
        &a,
        &["ip", "route", "add", "10.55.0.0/16", "via", "192.168.78.2"],
    );
    ns_sh(
        &a,
        &[
            "ip",
            "route",
            "add",
            "10.56.0.0/16",
            "via",
            "192.168.78.2",
            "proto",
            "static",
            "table",
            "2004",
        ],
    );
    ns_sh(
        &a,
        &[
            "ip", "rule", "add", "priority", "1000", "ipproto", "udp", "dport", "4789", "table",
            "2005",
        ],
    );
    let foreign_routes = || {
        ns_sh(
            &a,
            &["ip", "route", "show", "table", "all", "proto", "static"],
        )
    };
    let foreign_before = foreign_routes();
    let node = node_thread(&a);

    let mode = RoutingMode {
        routing: Routing::Tunnel,
        encryption: routes::Encryption::Wireguard,
    };
    let params = TunnelParams::new("mesh_wg", "192.168.78.1".parse().unwrap());
    let remotes = vec![
        RemoteNode {
            name: "c2/n1".into(),
            underlay_ip: "192.168.78.2".parse().unwrap(),
            pod_cidrs: vec!["10.2.1.0/24".parse().unwrap()],
            wireguard_public_key: None,
        },
        RemoteNode {
            name: "c2/n2".into(),
            underlay_ip: "192.168.78.3".parse().unwrap(),
            pod_cidrs: vec![],
            wireguard_public_key: None,
        },
    ];
    let tunnel_plan = routes::plan(mode, &remotes, &params);
    let native_plan = routes::plan(
        RoutingMode {
            routing: Routing::Native,
            encryption: routes::Encryption::None,
        },
        &remotes,
        &params,
    );
    let (plan_routes, plan_rules) = (tunnel_plan.routes.clone(), tunnel_plan.rules.clone());
    node.run("route scenario", move |rt, node| {
        rt.block_on(async {
            let nl = &node.netlink;
            let changes = routes::apply_routes(nl, &plan_routes).await.unwrap();
            assert_eq!(changes.added.len(), 2);
            assert_eq!(routes::installed_routes(nl).await.unwrap(), plan_routes);
            let rules = routes::apply_rules(nl, &plan_rules).await.unwrap();
            assert_eq!(rules.added.len(), 1);
            assert_eq!(routes::installed_rules(nl).await.unwrap(), plan_rules);

            // Idempotent.
            let again = routes::apply_routes(nl, &plan_routes).await.unwrap();
            assert!(
                again.added.is_empty() && again.removed.is_empty(),
                "{again:?}"
            );

            // Switching to native routing swaps our routes, leaves the rest.
            let native = routes::apply_routes(nl, &native_plan.routes).await.unwrap();
            assert_eq!((native.added.len(), native.removed.len()), (1, 2));
            assert_eq!(
                routes::installed_routes(nl).await.unwrap(),
                BTreeSet::from([Route {
                    table: routes::MAIN_TABLE,
                    destination: "10.2.1.0/24".parse().unwrap(),
                    next_hop: NextHop::Gateway("192.168.78.2".parse().unwrap()),
                    source: None,
                }])
            );
            routes::apply_rules(nl, &BTreeSet::<Rule>::new())
                .await
                .unwrap();
            assert!(routes::installed_rules(nl).await.unwrap().is_empty());

            // A desired route equal to a foreign one is a conflict, not a takeover.
            let clash = BTreeSet::from([Route {
                table: routes::MAIN_TABLE,
                destination: "10.55.0.0/16".parse().unwrap(),
                next_hop: NextHop::Gateway("192.168.78.2".parse().unwrap()),
                source: None,
            }]);
            let err = routes::apply_routes(nl, &clash).await.unwrap_err();
            assert!(matches!(err, routes::RouteError::Conflict { .. }), "{err}");

            // Empty plan: everything of ours goes.
            routes::apply_routes(nl, &BTreeSet::new()).await.unwrap();
            assert!(routes::installed_routes(nl).await.unwrap().is_empty());
        })
    });
    assert_eq!(
        foreign_routes(),
        foreign_before,
        "foreign routes were touched"
    );
    let rules = ns_sh(&a, &["ip", "rule", "show"]);
    assert!(
        rules.contains("lookup 2005"),
        "foreign rule was removed: {rules}"
    );
    let main = ns_sh(&a, &["ip", "route", "show", "10.55.0.0/16"]);
    assert!(
        main.contains("via 192.168.78.2"),
        "foreign main route was removed: {main}"
    );
}

/// "Encryption on top of tunnel routing": VXLAN packets between the nodes are
/// routed into WireGuard by the plan's rule and table, so the underlay sees
/// only WireGuard. (The test's VXLAN device has a fixed VNI and remote, as
/// the external-mode device needs the eBPF datapath to set tunnel keys; the
/// routing of the outer packets is the same.)
#[test]
fn vxlan_over_wireguard_by_plan_leaves_only_wireguard_on_the_underlay() {
    if !prerequisites(&["ip", "tcpdump"]) {
        return;
    }
    let pair = wireguard_pair();
    let sides = [
        (
            &pair.node_a,
            &pair.a,
            "192.168.77.2",
            pair.key_b,
            "10.97.0.1/24",
        ),
        (
            &pair.node_b,
            &pair.b,
            "192.168.77.1",
            pair.key_a,
            "10.97.0.2/24",
        ),
    ];
    for (node, ns, remote, remote_key, overlay) in sides {
        let local = if remote == "192.168.77.1" {
            "192.168.77.2"
        } else {
            "192.168.77.1"
        };
        ns_sh(
            ns,
            &[
                "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "remote", remote,
                "dstport", "4789",
            ],
        );
        ns_sh(ns, &["ip", "link", "set", "vx0", "mtu", "1370", "up"]);
        ns_sh(ns, &["ip", "addr", "add", overlay, "dev", "vx0"]);
        let remotes = vec![RemoteNode {
            name: format!("c2/{remote}"),
            underlay_ip: remote.parse().unwrap(),
            pod_cidrs: vec![],
            wireguard_public_key: Some(remote_key),
        }];
        let mode = RoutingMode {
            routing: Routing::Tunnel,
            encryption: routes::Encryption::Wireguard,
        };
        let plan = routes::plan(
            mode,
            &remotes,
            &TunnelParams::new("mesh_wg", local.parse().unwrap()),
        );
        assert!(plan.rejected.is_empty(), "{:?}", plan.rejected);
        node.run("applying the plan", move |rt, node| {
            node.wg.as_mut().unwrap().set_peers(plan.peers).unwrap();
            rt.block_on(async {
                routes::apply_routes(&node.netlink, &plan.routes)
                    .await
                    .unwrap();
                routes::apply_rules(&node.netlink, &plan.rules)
                    .await
                    .unwrap();
            });
        });
    }

    let _server = CountingServer::start(&pair.b, "0.0.0.0:7777".parse().unwrap());
    let capture = Capture::start(&pair.b, "ub", pair._state.path().join("vxlan.pcap"));
    let payload: Vec<u8> = MARKER
        .iter()
        .copied()
        .cycle()
        .take(MARKER.len() * 2000)
        .collect();
    let to_b: SocketAddr = "10.97.0.2:7777".parse().unwrap();
    let received = tcp_exchange_eventually(&pair.a, to_b, &payload, Duration::from_secs(10));
    assert_eq!(
        received,
        payload.len(),
        "bytes through vxlan over wireguard"
    );
    let frames = capture.finish();
    assert_only_wireguard(&frames, payload.len());
}
