//! Traffic between pods for the netns tests: ICMP echo with ping sockets,
//! TCP and UDP echo exchanges, each run in the pods' namespaces with a
//! deadline on every wait.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use datapath::netns;
use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
    SockType, SockaddrIn, SockaddrIn6,
};

use super::Pod;

/// Deadline of every wait in an exchange.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

/// ICMP echo from `from` to `to` with a ping socket; true when the reply came.
pub(crate) fn ping(from: &Pod, to: IpAddr) -> Result<(), String> {
    netns::run_in(&netns::named(&from.ns), move || -> Result<(), String> {
        let (family, proto, req_type, reply_type) = match to {
            IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 8u8, 0u8),
            IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 128, 129),
        };
        let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, proto)
            .map_err(|e| e.to_string())?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )
        .map_err(|e| e.to_string())?;
        use std::os::fd::AsRawFd as _;
        let mut req = vec![req_type, 0, 0, 0, 0, 0, 0, 1];
        req.extend_from_slice(b"mesh-ping");
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let sent = match to {
                IpAddr::V4(v4) => sendto(
                    fd.as_raw_fd(),
                    &req,
                    &SockaddrIn::from(std::net::SocketAddrV4::new(v4, 0)),
                    MsgFlags::empty(),
                ),
                IpAddr::V6(v6) => sendto(
                    fd.as_raw_fd(),
                    &req,
                    &SockaddrIn6::from(std::net::SocketAddrV6::new(v6, 0, 0, 0)),
                    MsgFlags::empty(),
                ),
            };
            sent.map_err(|e| format!("send echo to {to}: {e}"))?;
            let mut buf = [0u8; 128];
            if let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                if n >= 8 && buf[0] == reply_type && &buf[8..n] == b"mesh-ping" {
                    return Ok(());
                }
            }
        }
        Err(format!("no echo reply from {to} within {TIMEOUT:?}"))
    })
    .map_err(|e| e.to_string())?
}

/// Runs `server` in `to`'s namespace and `client` in `from`'s, concurrently.
pub(crate) fn exchange<S, C>(from: &Pod, to: &Pod, server: S, client: C) -> Result<(), String>
where
    S: FnOnce(mpsc::Sender<()>) -> Result<(), String> + Send + 'static,
    C: FnOnce() -> Result<(), String> + Send,
{
    let (ready_tx, ready_rx) = mpsc::channel();
    let server_ns = netns::named(&to.ns);
    let server = std::thread::spawn(move || netns::run_in(&server_ns, move || server(ready_tx)));
    ready_rx
        .recv_timeout(TIMEOUT)
        .map_err(|_| "server did not start".to_owned())?;
    let client_result =
        netns::run_in(&netns::named(&from.ns), client).map_err(|e| e.to_string())?;
    let server_result = server
        .join()
        .map_err(|_| "server panicked".to_owned())?
        .map_err(|e| e.to_string())?;
    client_result.and(server_result)
}

/// Accepts one connection on `listener` within [`TIMEOUT`] (a client that
/// never arrives is an error naming the address, never a hang), blocking,
/// with a read timeout of [`TIMEOUT`].
pub(crate) fn accept_within(listener: &TcpListener) -> Result<(TcpStream, SocketAddr), String> {
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + TIMEOUT;
    let (conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(format!("accept on {local} within {TIMEOUT:?}: {e}")),
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok((conn, peer))
}

pub(crate) fn tcp_echo(from: &Pod, to: &Pod, dst: IpAddr) -> Result<(), String> {
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let expect = payload.clone();
    exchange(
        from,
        to,
        move |ready| {
            let listener =
                TcpListener::bind(SocketAddr::new(dst, 7001)).map_err(|e| e.to_string())?;
            ready.send(()).ok();
            let (mut conn, _) = accept_within(&listener)?;
            let mut buf = vec![0u8; 20_000];
            conn.read_exact(&mut buf)
                .map_err(|e| format!("server read: {e}"))?;
            conn.write_all(&buf)
                .map_err(|e| format!("server write: {e}"))
        },
        move || {
            let mut conn = TcpStream::connect_timeout(&SocketAddr::new(dst, 7001), TIMEOUT)
                .map_err(|e| format!("connect to {dst}: {e}"))?;
            conn.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            conn.write_all(&payload).map_err(|e| e.to_string())?;
            let mut back = vec![0u8; payload.len()];
            conn.read_exact(&mut back)
                .map_err(|e| format!("client read: {e}"))?;
            (back == expect)
                .then_some(())
                .ok_or_else(|| "echoed bytes differ".to_owned())
        },
    )
}

pub(crate) fn udp_echo(from: &Pod, to: &Pod, dst: IpAddr) -> Result<(), String> {
    exchange(
        from,
        to,
        move |ready| {
            let sock = UdpSocket::bind(SocketAddr::new(dst, 7002)).map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            ready.send(()).ok();
            let mut buf = [0u8; 1500];
            let (n, peer) = sock
                .recv_from(&mut buf)
                .map_err(|e| format!("udp server recv: {e}"))?;
            sock.send_to(&buf[..n], peer).map_err(|e| e.to_string())?;
            Ok(())
        },
        move || {
            let any: IpAddr = if dst.is_ipv4() {
                "0.0.0.0".parse().unwrap()
            } else {
                "::".parse().unwrap()
            };
            let sock = UdpSocket::bind(SocketAddr::new(any, 0)).map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .map_err(|e| e.to_string())?;
            let msg = b"mesh-udp-datagram";
            let deadline = Instant::now() + TIMEOUT;
            while Instant::now() < deadline {
                sock.send_to(msg, SocketAddr::new(dst, 7002))
                    .map_err(|e| e.to_string())?;
                let mut buf = [0u8; 64];
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    return (&buf[..n] == msg)
                        .then_some(())
                        .ok_or_else(|| "udp echo differs".to_owned());
                }
            }
            Err(format!("no udp echo from {dst}"))
        },
    )
}

/// ICMP, TCP and UDP from `a` to `b` and back, to both of the other pod's
/// addresses; one line per failed exchange.
pub(crate) fn both_ways(a: &Pod, b: &Pod, what: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (from, to) in [(a, b), (b, a)] {
        for dst in [to.v4, to.v6] {
            let label = format!("{what} {} -> {} ({dst})", from.ns, to.ns);
            if let Err(e) = ping(from, dst) {
                failures.push(format!("ICMP {label}: {e}"));
            }
            if let Err(e) = tcp_echo(from, to, dst) {
                failures.push(format!("TCP {label}: {e}"));
            }
            if let Err(e) = udp_echo(from, to, dst) {
                failures.push(format!("UDP {label}: {e}"));
            }
        }
    }
    failures
}
