//! The lab's traffic tools: the echo server every `echo-*` pod runs, and the
//! TCP, UDP and ICMP probes that tests and `meshctl probe` send to it.
//!
//! The echo protocol is line based and says who answered, so a test can check
//! that a reply came from the pod it addressed and not from one the datapath
//! sent it to by mistake: for each line (TCP) or datagram (UDP) `M` the server
//! answers `cluster=<c> node=<n> pod=<p> msg=<M>`.
//!
//! ICMP uses a raw socket (the lab has no `ping` binary) through `nix`'s safe
//! wrappers.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
    SockType, SockaddrIn,
};
use nix::sys::time::TimeVal;

/// Who an echo server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoIdentity {
    /// Cluster name.
    pub cluster: String,
    /// Node name.
    pub node: String,
    /// Pod name.
    pub pod: String,
}

/// A parsed echo reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReply {
    /// Who answered.
    pub from: EchoIdentity,
    /// The message echoed.
    pub message: String,
}

/// Errors of probes.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A socket operation failed.
    #[error("{proto} probe to {addr}: {action}")]
    Io {
        /// tcp, udp or icmp.
        proto: &'static str,
        /// The target.
        addr: String,
        /// What failed.
        action: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The reply is not an echo reply.
    #[error("{proto} probe to {addr}: unexpected reply {reply:?}")]
    BadReply {
        /// tcp or udp.
        proto: &'static str,
        /// The target.
        addr: String,
        /// What came back.
        reply: String,
    },
    /// No ICMP echo reply in time.
    #[error("icmp probe to {addr}: no echo reply within {timeout:?}")]
    IcmpTimeout {
        /// The target.
        addr: Ipv4Addr,
        /// How long we waited.
        timeout: Duration,
    },
}

impl EchoIdentity {
    fn reply(&self, message: &str) -> String {
        format!(
            "cluster={} node={} pod={} msg={message}",
            self.cluster, self.node, self.pod
        )
    }
}

impl EchoReply {
    /// Parses `cluster=<c> node=<n> pod=<p> msg=<M>`.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim_end_matches(['\r', '\n']);
        let rest = line.strip_prefix("cluster=")?;
        let (cluster, rest) = rest.split_once(" node=")?;
        let (node, rest) = rest.split_once(" pod=")?;
        let (pod, message) = rest.split_once(" msg=")?;
        Some(Self {
            from: EchoIdentity {
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                pod: pod.to_owned(),
            },
            message: message.to_owned(),
        })
    }
}

/// Runs the echo server on `port` (TCP and UDP, all addresses) until killed.
///
/// # Errors
///
/// When a socket cannot be bound.
pub fn run_echo_server(identity: EchoIdentity, port: u16) -> std::io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let tcp = TcpListener::bind(addr)?;
    let udp = UdpSocket::bind(addr)?;
    eprintln!(
        "echo server {}/{}/{} on tcp and udp port {port}",
        identity.cluster, identity.node, identity.pod
    );
    let udp_identity = identity.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                continue;
            };
            let message = String::from_utf8_lossy(&buf[..n]);
            let reply = udp_identity.reply(message.trim_end_matches('\n'));
            let _ = udp.send_to(reply.as_bytes(), peer);
        }
    });
    for stream in tcp.incoming() {
        let Ok(stream) = stream else { continue };
        let identity = identity.clone();
        std::thread::spawn(move || {
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                if writeln!(writer, "{}", identity.reply(&line)).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// An open TCP echo session, for long-lived streams.
#[derive(Debug)]
pub struct TcpSession {
    addr: SocketAddr,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpSession {
    /// Connects to an echo server.
    ///
    /// # Errors
    ///
    /// [`ProbeError::Io`].
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ProbeError> {
        let io = |action| {
            move |source| ProbeError::Io {
                proto: "tcp",
                addr: addr.to_string(),
                action,
                source,
            }
        };
        let writer = TcpStream::connect_timeout(&addr, timeout).map_err(io("connect"))?;
        writer
            .set_read_timeout(Some(timeout))
            .map_err(io("set timeout"))?;
        let reader = BufReader::new(writer.try_clone().map_err(io("clone"))?);
        Ok(Self {
            addr,
            writer,
            reader,
        })
    }

    /// Sends one line and reads its echo.
    ///
    /// # Errors
    ///
    /// [`ProbeError`] on I/O failure, timeout or a malformed reply.
    pub fn request(&mut self, message: &str) -> Result<EchoReply, ProbeError> {
        let addr = self.addr.to_string();
        let io = |action| {
            let addr = addr.clone();
            move |source| ProbeError::Io {
                proto: "tcp",
                addr,
                action,
                source,
            }
        };
        writeln!(self.writer, "{message}").map_err(io("send"))?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(io("receive"))?;
        if n == 0 {
            return Err(io("receive")(std::io::ErrorKind::UnexpectedEof.into()));
        }
        EchoReply::parse(&line).ok_or(ProbeError::BadReply {
            proto: "tcp",
            addr,
            reply: line,
        })
    }
}

/// One TCP request to an echo server.
///
/// # Errors
///
/// [`ProbeError`].
pub fn tcp_request(
    addr: SocketAddr,
    message: &str,
    timeout: Duration,
) -> Result<EchoReply, ProbeError> {
    TcpSession::connect(addr, timeout)?.request(message)
}

/// One UDP request to an echo server (one retry per second until `timeout`,
/// as a first datagram may be lost while neighbours resolve).
///
/// # Errors
///
/// [`ProbeError`].
pub fn udp_request(
    addr: SocketAddr,
    message: &str,
    timeout: Duration,
) -> Result<EchoReply, ProbeError> {
    let io = |action| {
        move |source| ProbeError::Io {
            proto: "udp",
            addr: addr.to_string(),
            action,
            source,
        }
    };
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(io("bind"))?;
    socket.connect(addr).map_err(io("connect"))?;
    let started = Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        socket.send(message.as_bytes()).map_err(io("send"))?;
        let left = timeout.saturating_sub(started.elapsed());
        socket
            .set_read_timeout(Some(
                left.clamp(Duration::from_millis(10), Duration::from_secs(1)),
            ))
            .map_err(io("set timeout"))?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                return EchoReply::parse(&reply).ok_or(ProbeError::BadReply {
                    proto: "udp",
                    addr: addr.to_string(),
                    reply,
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && started.elapsed() < timeout => {}
            Err(e) => return Err(io("receive")(e)),
        }
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).expect("folded to 16 bits"))
}

/// Sends ICMP echo requests to `addr` (one per second) until a matching echo
/// reply arrives or `timeout` passes; returns the round-trip time.
///
/// # Errors
///
/// [`ProbeError`] (raw sockets need root).
pub fn icmp_echo(addr: Ipv4Addr, timeout: Duration) -> Result<Duration, ProbeError> {
    let io = |action| {
        move |e: nix::Error| ProbeError::Io {
            proto: "icmp",
            addr: addr.to_string(),
            action,
            source: e.into(),
        }
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )
    .map_err(io("open raw socket"))?;
    let ident = u16::try_from(std::process::id() & 0xffff).expect("masked to 16 bits");
    let target = SockaddrIn::from(SocketAddrV4::new(addr, 0));
    let started = Instant::now();
    let mut seq: u16 = 0;
    let mut buf = [0u8; 2048];
    loop {
        seq = seq.wrapping_add(1);
        let mut packet = vec![8u8, 0, 0, 0];
        packet.extend_from_slice(&ident.to_be_bytes());
        packet.extend_from_slice(&seq.to_be_bytes());
        packet.extend_from_slice(b"mesh-lab-icmp-probe");
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        let sent = Instant::now();
        sendto(fd.as_raw_fd(), &packet, &target, MsgFlags::empty()).map_err(io("send"))?;
        let round_end = sent + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            let end = round_end.min(started + timeout);
            if now >= end {
                break;
            }
            let wait = end - now;
            let tv = TimeVal::new(
                i64::try_from(wait.as_secs()).unwrap_or(1),
                i64::from(wait.subsec_micros()).max(1000),
            );
            setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(io("set timeout"))?;
            let (n, from) = match recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf) {
                Ok(r) => r,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io("receive")(e)),
            };
            // Raw IPv4 sockets return the IP header first.
            let Some(header_len) = buf.first().map(|b| usize::from(b & 0x0f) * 4) else {
                continue;
            };
            let icmp = &buf[header_len.min(n)..n];
            let from_target = from.is_some_and(|f| f.ip() == addr);
            if from_target
                && icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == ident.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                return Ok(sent.elapsed());
            }
        }
        if started.elapsed() >= timeout {
            return Err(ProbeError::IcmpTimeout { addr, timeout });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_round_trip() {
        let id = EchoIdentity {
            cluster: "c1".into(),
            node: "c1-n2".into(),
            pod: "echo-c1-n2".into(),
        };
        let parsed = EchoReply::parse(&format!("{}\n", id.reply("hello world"))).unwrap();
        assert_eq!(parsed.from, id);
        assert_eq!(parsed.message, "hello world");
        assert!(EchoReply::parse("garbage").is_none());
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // Example from RFC 1071 section 3: sum of these words is 0xddf2, checksum 0x220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), 0x220d);
    }

    #[test]
    fn echo_server_over_loopback() {
        // Port 0 is not possible for a fixed-port server; pick a free one.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let id = EchoIdentity {
            cluster: "c9".into(),
            node: "c9-n1".into(),
            pod: "p".into(),
        };
        let server_id = id.clone();
        std::thread::spawn(move || run_echo_server(server_id, port));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut session = loop {
            match TcpSession::connect(addr, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("echo server did not start: {e}"),
            }
        };
        for i in 0..3 {
            let reply = session.request(&format!("m{i}")).unwrap();
            assert_eq!(reply.from, id);
            assert_eq!(reply.message, format!("m{i}"));
        }
        let reply = udp_request(addr, "dgram", Duration::from_secs(5)).unwrap();
        assert_eq!((reply.from, reply.message.as_str()), (id, "dgram"));
    }
}
