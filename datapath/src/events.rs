//! The `events` ring buffer, decoded.
//!
//! Every drop emits an [`Event`] with a [`DropReason`]; when tracing is on
//! ([`Datapath::set_trace`](crate::Datapath::set_trace)) every forwarding
//! decision emits one with a [`TracePoint`] and its redirect target. The ring
//! buffer has one consumer position shared by all readers, so a node has one
//! reader (the agent), which fans events out (e.g. to `meshctl observe`).

#![expect(
    unsafe_code,
    reason = "decoding ring-buffer records (read_unaligned) and polling the ring's descriptor"
)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    pin::Pin,
    task::{ready, Context, Poll},
};

use aya::maps::{Map, MapData, MapError, RingBuf};
use futures::Stream;
use std::os::fd::AsRawFd as _;
use tokio::io::{unix::AsyncFd, Interest};

use crate::abi::{RawEvent, FAMILY_IPV4, FAMILY_IPV6};

/// Errors of the event stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pinned ring buffer could not be opened.
    #[error("cannot open the events ring buffer at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    /// Registering the ring buffer with the tokio reactor, or polling it, failed.
    #[error("cannot poll the events ring buffer")]
    Poll(#[source] std::io::Error),
    /// A record of the wrong size: the programs and this crate disagree.
    #[error("event record of {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
}

/// Why a packet was dropped (`DROP_*` in `datapath.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Truncated or malformed headers.
    InvalidPacket,
    /// `from_pod`: the source address is not the pod behind this veth.
    UnknownSource,
    /// `from_overlay`: the destination is not a pod on this node.
    UnknownEndpoint,
    /// `from_overlay`: the packet carries no tunnel metadata.
    NoTunnelKey,
    /// TTL or hop limit exhausted.
    TtlExceeded,
    /// A tunnel was needed but no VXLAN device is attached.
    NoOverlay,
    /// A helper failed to rewrite the packet.
    HeaderRewrite,
    /// Denied by policy.
    PolicyDenied,
    /// `from_pod`: a service frontend without a usable backend.
    NoBackend,
    /// A code this version does not know (newer programs).
    Other(u8),
}

impl DropReason {
    fn from_code(code: u8) -> Self {
        match code {
            1 => Self::InvalidPacket,
            2 => Self::UnknownSource,
            3 => Self::UnknownEndpoint,
            4 => Self::NoTunnelKey,
            5 => Self::TtlExceeded,
            6 => Self::NoOverlay,
            7 => Self::HeaderRewrite,
            8 => Self::PolicyDenied,
            9 => Self::NoBackend,
            other => Self::Other(other),
        }
    }
}

/// Where a forwarded packet went (`TRACE_*` in `datapath.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TracePoint {
    /// Redirected to a local pod.
    ToEndpoint,
    /// Tunnel key set and redirected to the VXLAN device.
    ToOverlay,
    /// Handed to the kernel's routing.
    ToStack,
    /// A code this version does not know.
    Other(u8),
}

impl TracePoint {
    fn from_code(code: u8) -> Self {
        match code {
            1 => Self::ToEndpoint,
            2 => Self::ToOverlay,
            3 => Self::ToStack,
            other => Self::Other(other),
        }
    }
}

/// What happened to the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Dropped.
    Drop(DropReason),
    /// Forwarded (only when tracing is on).
    Trace(TracePoint),
    /// An event kind this version does not know.
    Other { kind: u8, reason: u8 },
}

/// One decoded datapath event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Event {
    /// Drop or trace, with its reason.
    pub kind: EventKind,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    /// Redirect target (a pod's veth or the VXLAN device), if any.
    pub target_ifindex: Option<u32>,
    /// Source identity, 0 when unknown.
    pub identity: u32,
    /// Tunnel peer (remote node), if the packet was or would be tunnelled.
    pub tunnel_endpoint: Option<Ipv4Addr>,
    /// VNI set or read, 0 when none.
    pub tunnel_id: u32,
    /// Packet length in bytes.
    pub len: u32,
    /// IP protocol number (0 when the packet is not IP).
    pub proto: u8,
    /// Source and destination address; `None` when the packet is not IP.
    pub src: Option<IpAddr>,
    /// See `src`.
    pub dst: Option<IpAddr>,
    /// TCP/UDP source port (host order), 0 otherwise.
    pub sport: u16,
    /// TCP/UDP destination port (host order), 0 otherwise.
    pub dport: u16,
}

impl Event {
    /// Decodes one ring buffer record.
    ///
    /// # Errors
    ///
    /// [`Error::Size`] when the record is not a `struct event`.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let expected = std::mem::size_of::<RawEvent>();
        if bytes.len() != expected {
            return Err(Error::Size {
                got: bytes.len(),
                expected,
            });
        }
        // SAFETY: the length equals size_of::<RawEvent>(), RawEvent is a
        // repr(C) struct of integers and byte arrays (every bit pattern is
        // valid), and read_unaligned does not need the buffer to be aligned.
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Ok(Self::from_raw(&raw))
    }

    fn from_raw(raw: &RawEvent) -> Self {
        let addr = |bytes: [u8; 16]| match raw.family {
            FAMILY_IPV4 => Some(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            FAMILY_IPV6 => Some(IpAddr::V6(Ipv6Addr::from(bytes))),
            _ => None,
        };
        let kind = match raw.kind {
            1 => EventKind::Drop(DropReason::from_code(raw.reason)),
            2 => EventKind::Trace(TracePoint::from_code(raw.reason)),
            kind => EventKind::Other {
                kind,
                reason: raw.reason,
            },
        };
        Self {
            kind,
            ifindex: raw.ifindex,
            target_ifindex: (raw.target_ifindex != 0).then_some(raw.target_ifindex),
            identity: raw.identity,
            tunnel_endpoint: (raw.tunnel_endpoint != 0)
                .then(|| Ipv4Addr::from(raw.tunnel_endpoint)),
            tunnel_id: raw.tunnel_id,
            len: raw.pkt_len,
            proto: raw.proto,
            src: addr(raw.saddr),
            dst: addr(raw.daddr),
            sport: u16::from_be(raw.sport),
            dport: u16::from_be(raw.dport),
        }
    }
}

/// An async stream of [`Event`]s from the pinned ring buffer.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("fd", &self.ring.as_raw_fd())
            .finish()
    }
}

impl EventStream {
    /// Opens the pinned `events` ring buffer under `bpffs_dir`. Must be called
    /// inside a tokio runtime with I/O enabled.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] when the pin is missing, [`Error::Poll`] when it cannot
    /// be registered with the reactor.
    pub fn open(bpffs_dir: &Path) -> Result<Self, Error> {
        let path = bpffs_dir.join("events");
        let ring = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .and_then(RingBuf::try_from)
            .map_err(|source| Error::Open {
                path,
                source: Box::new(source),
            })?;
        // SAFETY: the RingBuf owns its map fd and its mmap; the fd stays open
        // and unchanged until the AsyncFd (which owns the RingBuf) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| Error::Poll(e.into()))?;
        Ok(Self { ring })
    }

    /// The next event already in the ring, without waiting.
    pub fn try_next(&mut self) -> Option<Result<Event, Error>> {
        self.ring.get_mut().next().map(|item| Event::decode(&item))
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.try_next() {
                return Poll::Ready(Some(event));
            }
            // Clear readiness, then look at the ring again before sleeping, so
            // a record written between the two is never missed.
            let mut guard = match ready!(this.ring.poll_read_ready_mut(cx)) {
                Ok(guard) => guard,
                Err(e) => return Poll::Ready(Some(Err(Error::Poll(e)))),
            };
            guard.clear_ready();
        }
    }
}
