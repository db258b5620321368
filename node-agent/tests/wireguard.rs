//! The cross-cluster TCP exchange with `--encryption wireguard` (VXLAN
//! carried through boringtun): a capture on the underlay sees only UDP of
//! the WireGuard port and never the payload. Needs root, iproute2, etcd and
//! tcpdump.

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use common::{echo_server, tcp_exchange};
use ipnet::IpNet;

const MARKER: &[u8] = b"MESH-PAYLOAD-MARKER-7f3a9c";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wireguard_carries_the_exchange_encrypted() {
    if !testkit::require_binary("tcpdump") {
        return;
    }
    let Some((lab, pa, pb)) = common::started_lab("wireguard").await else {
        return;
    };
    let ip_a = lab.a.add_pod("wg-a", &pa);
    let ip_b = lab.b.add_pod("wg-b", &pb);
    for (c, ip) in [(&lab.b, ip_a), (&lab.a, ip_b)] {
        let map = c.ipcache();
        let prefix = IpNet::from(IpAddr::V4(ip));
        let what = format!("{ip} in {}'s ipcache", c.name);
        testkit::wait_until(Duration::from_secs(20), &what, || {
            let present = map.get(prefix).unwrap().is_some();
            async move { present }
        })
        .await;
    }
    // Both nodes published their public keys through the apiserver.
    for c in [&lab.a, &lab.b] {
        let addr = ip(&["-n", &c.node_ns, "-j", "link", "show", "mesh_wg"]);
        assert!(
            addr.contains("mesh_wg"),
            "no WireGuard device on {}",
            c.name
        );
    }

    let pcap = lab.b.path("underlay.pcap");
    let mut capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.b.node_ns,
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-n",
            "-U",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpdump");
    testkit::eventually!(Duration::from_secs(10), "tcpdump writing its capture", {
        std::fs::metadata(&pcap).is_ok_and(|m| m.len() > 0)
    });

    let server = SocketAddr::new(IpAddr::V4(ip_a), 7100);
    echo_server(&pa, server);
    let payload: Vec<u8> = MARKER
        .iter()
        .copied()
        .cycle()
        .take(MARKER.len() * 40)
        .collect();
    // The first exchange may wait for the WireGuard handshake.
    let got = testkit::wait_for(
        Duration::from_secs(20),
        "TCP exchange through WireGuard",
        || {
            let r = tcp_exchange(&pb, server, &payload).ok();
            async move { r }
        },
    )
    .await;
    assert_eq!(got, payload);

    // tcpdump writes each packet as it sees it (`-U`): wait until the file
    // holds at least the exchanged bytes (the payload both ways, which the
    // ciphertext cannot be shorter than) before stopping it, so the marker
    // check below looks at the whole exchange.
    let captured_enough = 24 + 2 * payload.len() as u64;
    testkit::eventually!(
        Duration::from_secs(10),
        format!("the capture to hold at least {captured_enough} bytes"),
        std::fs::metadata(&pcap).is_ok_and(|m| m.len() >= captured_enough)
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(capture.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = capture.wait();
    let bytes = std::fs::read(&pcap).expect("read capture");
    assert!(
        !bytes.windows(MARKER.len()).any(|w| w == MARKER),
        "the payload marker is visible on the underlay"
    );
    let text = Command::new("tcpdump")
        .args(["-r"])
        .arg(&pcap)
        .args(["-n", "ip"])
        .output()
        .expect("read capture with tcpdump");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() >= 4,
        "too few packets captured ({} bytes):\n{text}\n{}",
        bytes.len(),
        String::from_utf8_lossy(
            &Command::new("tcpdump")
                .arg("-r")
                .arg(&pcap)
                .arg("-n")
                .output()
                .map(|o| [o.stdout, o.stderr].concat())
                .unwrap_or_default()
        )
    );
    for line in &lines {
        assert!(
            line.contains(".51871 >") || line.contains(".51871:"),
            "packet not to or from the WireGuard port: {line}"
        );
        assert!(line.contains("UDP"), "not UDP: {line}");
    }
}

fn ip(args: &[&str]) -> String {
    common::ip(args)
}
