//! Crafted IPv4 and IPv6 packets with real checksums, and the parsing and
//! checksum verification of packets a program or the kernel produced.

use std::net::{IpAddr, SocketAddr};

/// IP protocol numbers.
pub(crate) const TCP: u8 = 6;
pub(crate) const UDP: u8 = 17;

/// The Internet checksum (RFC 1071) of `bytes`: 0 over data that includes a
/// correct checksum.
pub(crate) fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo header of `ip` (a whole IPv4 or IPv6 packet) for its L4
/// part, and the IP header's length.
pub(crate) fn pseudo_header(ip: &[u8]) -> (Vec<u8>, usize) {
    let mut ph = Vec::new();
    if ip[0] >> 4 == 4 {
        let hl = usize::from(ip[0] & 0xf) * 4;
        ph.extend_from_slice(&ip[12..20]);
        ph.extend_from_slice(&[0, ip[9]]);
        ph.extend_from_slice(&((ip.len() - hl) as u16).to_be_bytes());
        (ph, hl)
    } else {
        ph.extend_from_slice(&ip[8..40]);
        ph.extend_from_slice(&((ip.len() - 40) as u32).to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, ip[6]]);
        (ph, 40)
    }
}

/// Whether the TCP/UDP checksum of an IP packet verifies (a real one's
/// complement sum over pseudo header, header and payload).
pub(crate) fn l4_checksum_ok(ip: &[u8]) -> bool {
    let (mut all, hl) = pseudo_header(ip);
    all.extend_from_slice(&ip[hl..]);
    checksum(&all) == 0
}

/// An IPv4 or IPv6 packet carrying TCP (an ACK with a 20-byte header) or
/// UDP with `payload`, TTL / hop limit `ttl`, and valid IP and L4 checksums.
pub(crate) fn l4_packet(
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    let csum_at = match proto {
        TCP => {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&2000u32.to_be_bytes()); // ack
            l4.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
            16
        }
        UDP => {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        }
        other => panic!("l4_packet builds TCP or UDP, not protocol {other}"),
    };
    l4.extend_from_slice(payload);
    let mut ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, ttl, proto, 0, 0];
            ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[proto, ttl]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip
        }
        _ => panic!("mixed address families"),
    };
    let hl = ip.len();
    ip.extend_from_slice(&l4);
    let (mut all, _) = pseudo_header(&ip);
    all.extend_from_slice(&ip[hl..]);
    // A computed UDP checksum of 0 is sent as 0xffff (0 means "none").
    let c = match checksum(&all) {
        0 if proto == UDP => 0xffff,
        c => c,
    };
    ip[hl + csum_at..hl + csum_at + 2].copy_from_slice(&c.to_be_bytes());
    ip
}

/// What [`parse`] reads from an IP packet's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Headers {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Offset of the TCP/UDP header.
    pub l4_offset: usize,
}

/// Addresses, ports (of TCP/UDP; others read as if they had ports), TTL
/// and L4 offset of an IPv4 (options honoured) or IPv6 (no extension
/// headers) packet; `None` when it is shorter than its headers.
pub(crate) fn parse(ip: &[u8]) -> Option<Headers> {
    let (src, dst, proto, ttl, hl): (IpAddr, IpAddr, u8, u8, usize) = match ip.first()? >> 4 {
        4 if ip.len() >= 20 => {
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            (
                s.into(),
                d.into(),
                ip[9],
                ip[8],
                usize::from(ip[0] & 0xf) * 4,
            )
        }
        6 if ip.len() >= 40 => {
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            (s.into(), d.into(), ip[6], ip[7], 40)
        }
        _ => return None,
    };
    let ports = ip.get(hl..hl + 4)?;
    Some(Headers {
        src: SocketAddr::new(src, u16::from_be_bytes([ports[0], ports[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([ports[2], ports[3]])),
        proto,
        ttl,
        l4_offset: hl,
    })
}
