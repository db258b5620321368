//! The plugin ↔ agent protocol on the CNI socket.
//!
//! One request per connection: the plugin writes one JSON [`AgentRequest`]
//! and shuts down its write half; the agent answers with one JSON
//! [`AgentResponse`] and closes. No framing beyond EOF is needed, and a
//! plugin killed by the runtime's timeout simply leaves a closed socket.
//!
//! **The pod's network namespace travels as a descriptor.** The plugin runs
//! in the container runtime's mount namespace, where `CNI_NETNS` names the
//! pod's namespace; the agent (in a pod of its own on Kubernetes) may see
//! another file at that path, or none. So the plugin opens `CNI_NETNS` and
//! sends the open descriptor with the first bytes of its request
//! (`SCM_RIGHTS`, [`send_request`]); the agent enters the namespace through
//! that descriptor ([`read_request`], [`netns_path`]) and keeps the path only
//! to name the namespace in results and records. A request without a
//! descriptor (a DEL whose namespace is already gone) falls back to the path.

use std::{
    collections::BTreeMap,
    io::{self, IoSlice, IoSliceMut, Write as _},
    mem::MaybeUninit,
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd as _, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::PathBuf,
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncReadExt as _, Interest};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::spec::{self, CniError, CniResult, ErrorCode, Interface, IpConfig, Route};

/// Largest request or response accepted, in bytes.
pub const MAX_MESSAGE: u64 = 64 * 1024;

/// Writes `body` to `stream`, with `netns` passed along the first bytes
/// (`SCM_RIGHTS`).
///
/// # Errors
///
/// When the socket refuses the write.
pub fn send_request(
    stream: &UnixStream,
    body: &[u8],
    netns: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds: Vec<BorrowedFd<'_>> = netns.into_iter().collect();
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(body)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptor went with the first bytes; the rest is plain data.
    let mut rest = stream;
    rest.write_all(&body[sent..])
}

/// Reads one request body (at most [`MAX_MESSAGE`] bytes) from `stream`
/// until EOF, with the descriptor that came along its first bytes, if any.
///
/// # Errors
///
/// When reading fails.
pub async fn read_request(
    stream: &mut tokio::net::UnixStream,
) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut first = vec![0u8; 16 * 1024];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let (read, fd) = loop {
        stream.readable().await?;
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = stream.try_io(Interest::READABLE, || {
            rustix::net::recvmsg(
                &*stream,
                &mut [IoSliceMut::new(&mut first)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)
        });
        match received {
            Ok(msg) => {
                // Only the first descriptor is ours; any other is closed
                // when the iterator drops it.
                let fd = control.drain().find_map(|m| match m {
                    RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
                    _ => None,
                });
                break (msg.bytes, fd);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    first.truncate(read);
    if read > 0 {
        stream
            .take(MAX_MESSAGE.saturating_sub(read as u64))
            .read_to_end(&mut first)
            .await?;
    }
    Ok((first, fd))
}

/// The path through which the agent reaches the pod's namespace: the
/// descriptor the plugin passed, as `/proc/self/fd/N` (opening it opens
/// the namespace, whatever this process's mount namespace holds at the
/// runtime's path), else the runtime's path.
pub fn netns_path(request: &AgentRequest, fd: Option<&OwnedFd>) -> Option<PathBuf> {
    match fd {
        Some(fd) => Some(PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))),
        None => request.netns.clone(),
    }
}

/// The operation the plugin asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PodCommand {
    /// Set up the pod's network.
    Add,
    /// Tear it down (idempotent).
    Del,
    /// Verify it.
    Check,
}

/// A request from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRequest {
    /// What to do.
    pub command: PodCommand,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (absent on some DELs).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// Pod namespace (`K8S_POD_NAMESPACE`, else `default`).
    pub pod_namespace: String,
    /// Pod name (`K8S_POD_NAME`, else the container ID).
    pub pod_name: String,
    /// Pod UID, if known.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// Pod labels (CNI args merged with runtime config).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What ADD set up (and CHECK verified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAttachment {
    /// Host-side veth.
    pub host_ifname: String,
    /// Its MAC.
    pub host_mac: String,
    /// Container-side interface.
    pub pod_ifname: String,
    /// Its MAC.
    pub pod_mac: String,
    /// Pod address (a /32).
    pub address: Ipv4Net,
    /// The pods' gateway (the node's router address).
    pub gateway: Ipv4Addr,
    /// Pod MTU.
    pub mtu: u32,
    /// Namespace path.
    pub netns: PathBuf,
    /// Security identity, when the apiserver allocated one.
    #[serde(default)]
    pub identity: Option<u32>,
}

impl PodAttachment {
    /// The CNI 1.0.0 result for this attachment (see
    /// [`CniResult::in_version`] for older versions).
    pub fn to_result(&self) -> CniResult {
        CniResult {
            cni_version: spec::CNI_VERSION.into(),
            interfaces: vec![
                Interface {
                    name: self.host_ifname.clone(),
                    mac: self.host_mac.clone(),
                    mtu: Some(self.mtu),
                    sandbox: None,
                },
                Interface {
                    name: self.pod_ifname.clone(),
                    mac: self.pod_mac.clone(),
                    mtu: Some(self.mtu),
                    sandbox: Some(self.netns.display().to_string()),
                },
            ],
            ips: vec![IpConfig {
                version: None,
                address: self.address,
                gateway: Some(self.gateway),
                interface: 1,
            }],
            routes: vec![Route {
                dst: Ipv4Net::default(),
                gw: Some(self.gateway),
            }],
            dns: serde_json::Map::new(),
        }
    }
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum AgentResponse {
    /// Done; ADD and CHECK carry the attachment.
    Ok {
        /// The attachment (ADD, CHECK).
        attachment: Option<PodAttachment>,
    },
    /// Failed, with the CNI error to report.
    Error {
        /// CNI error code.
        code: ErrorCode,
        /// Message.
        msg: String,
        /// Details.
        #[serde(default)]
        details: String,
    },
}

impl From<CniError> for AgentResponse {
    fn from(e: CniError) -> Self {
        Self::Error {
            code: e.code,
            msg: e.msg,
            details: e.details,
        }
    }
}
