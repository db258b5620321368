//! The node's WireGuard device and its peers.
//!
//! Two backends sit behind one [`WireguardDevice`]:
//!
//! * **kernel**: where the `wireguard` module exists, a kernel `wireguard`
//!   link configured over generic netlink with `wireguard-control`. The link
//!   and its peers outlive the agent; a restarted agent adopts both.
//! * **userspace**: elsewhere, boringtun (its `device` module) on a TUN device
//!   in the calling thread's network namespace, with one event thread
//!   (`n_threads = 1` was fastest on small machines, `docs/architecture.md` §7). It is
//!   configured through the WireGuard UAPI over a private socketpair (see
//!   [`uapi`] for why not the `/var/run/wireguard` socket). The TUN device is
//!   persistent (see `tun.rs`), so the interface, its addresses and routes
//!   survive an agent restart; the sessions are renegotiated.
//!
//! Peers are reconciled by diff ([`WireguardDevice::set_peers`]): new peers
//! are added, vanished ones removed, and a changed peer (endpoint or allowed
//! IPs) is removed and added again with its full configuration. boringtun
//! cannot modify a peer in place: it panics its event thread ("Modifying
//! existing peers is not yet supported") and the device is wedged. The kernel
//! backend is handled the same way so both behave alike.
//!
//! The current peers are reported from this module's own record of what it
//! configured, not read back from the device: boringtun's `get` does not
//! report public keys reliably.
//!
//! All operations act on the network namespace of the calling thread: the
//! TUN device, boringtun's UDP sockets (its event thread inherits the
//! caller's namespace) and netlink sockets are created there.

mod tun;
pub mod uapi;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::IntoRawFd as _;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use boringtun::device::{DeviceConfig, DeviceHandle};
use ipnet::IpNet;
use rtnetlink::LinkWireguard;

use crate::keys::{PrivateKey, PublicKey};
use crate::netlink::{errno, request_error, validate_link_name, Netlink, NetlinkError};
use uapi::{UapiClient, UapiError};

/// The default WireGuard listen port, the one Cilium uses.
pub const DEFAULT_LISTEN_PORT: u16 = 51871;

/// The default MTU of the WireGuard device: a 1500-byte underlay minus the
/// IPv6 + UDP + WireGuard overhead (80 bytes), as `wg-quick` chooses.
pub const DEFAULT_MTU: u32 = 1420;

/// The largest MTU of the userspace backend: boringtun reads TUN packets into
/// a buffer sized by the MTU it saw at start, which is 1500 for a device
/// handed over by descriptor.
pub const USERSPACE_MAX_MTU: u32 = 1500;

/// The smallest MTU accepted (IPv6's minimum link MTU).
pub const MIN_MTU: u32 = 1280;

/// How long stopping boringtun's event thread may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Which implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendPreference {
    /// The kernel module if it is available (or a kernel device already
    /// exists), else boringtun.
    #[default]
    Auto,
    /// Only the kernel module; fail without it.
    Kernel,
    /// Only boringtun, even where the kernel module exists.
    Userspace,
}

/// The implementation in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The kernel `wireguard` module.
    Kernel,
    /// boringtun on a TUN device.
    Userspace,
}

/// How to set the device up.
#[derive(Debug, Clone)]
pub struct WireguardConfig {
    /// Interface name (at most 15 bytes).
    pub name: String,
    /// UDP listen port; see [`DEFAULT_LISTEN_PORT`].
    pub listen_port: u16,
    /// Device MTU; see [`DEFAULT_MTU`].
    pub mtu: u32,
    /// Which backend to use.
    pub backend: BackendPreference,
    /// The node's private key (see [`PrivateKey::load_or_generate`]).
    pub private_key: PrivateKey,
}

impl WireguardConfig {
    /// Defaults for device `name`: port 51871, MTU 1420, automatic backend.
    pub fn new(name: impl Into<String>, private_key: PrivateKey) -> Self {
        Self {
            name: name.into(),
            listen_port: DEFAULT_LISTEN_PORT,
            mtu: DEFAULT_MTU,
            backend: BackendPreference::Auto,
            private_key,
        }
    }
}

/// One peer: a remote node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerConfig {
    /// The remote node's public key (`WireguardPubKey` of its node record).
    pub public_key: PublicKey,
    /// The remote node's underlay address and WireGuard port.
    pub endpoint: SocketAddr,
    /// What may come from, and is sent to, this peer through the tunnel.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerConfig {
    /// The same peer with allowed IPs truncated to their networks, sorted and
    /// deduplicated, so that equal configurations compare equal.
    pub fn normalized(mut self) -> Self {
        let set: BTreeSet<IpNet> = self.allowed_ips.iter().map(IpNet::trunc).collect();
        self.allowed_ips = set.into_iter().collect();
        self
    }
}

/// What one [`WireguardDevice::set_peers`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChanges {
    /// Peers that were not configured before.
    pub added: Vec<PublicKey>,
    /// Peers that are gone.
    pub removed: Vec<PublicKey>,
    /// Peers whose endpoint or allowed IPs changed (removed and added again).
    pub replaced: Vec<PublicKey>,
}

impl PeerChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.replaced.is_empty()
    }
}

/// Errors of the WireGuard device.
#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    /// A netlink operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The configuration is unusable.
    #[error("invalid wireguard config for {name}: {reason}")]
    InvalidConfig {
        /// The device.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A link with the name exists and is neither a wireguard nor a TUN device.
    #[error(
        "link {name} exists and is of kind {kind:?}; refusing to use it as a wireguard device"
    )]
    NameTaken {
        /// The link name.
        name: String,
        /// Its kind.
        kind: Option<String>,
    },
    /// The kernel backend was required but the kernel has no WireGuard.
    #[error(
        "the kernel has no wireguard support (module missing) and the kernel backend was required"
    )]
    KernelUnavailable,
    /// The link exists with the other backend than the one required.
    #[error("link {name} is a {found:?} wireguard device but {wanted:?} was required")]
    BackendMismatch {
        /// The link name.
        name: String,
        /// What the existing link is.
        found: Backend,
        /// What was required.
        wanted: BackendPreference,
    },
    /// The persistent TUN device could not be opened.
    #[error("opening tun device {name}")]
    Tun {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socketpair for the UAPI could not be made.
    #[error("creating the uapi socketpair for {name}")]
    Socketpair {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// boringtun failed to start.
    #[error("starting boringtun on {name}: {message}")]
    Boringtun {
        /// The device.
        name: String,
        /// boringtun's error, rendered (its error type is not `Send + Sync`
        /// friendly across versions, and is only informative).
        message: String,
    },
    /// A UAPI exchange with boringtun failed.
    #[error("configuring userspace wireguard device {name}: {action}")]
    Uapi {
        /// The device.
        name: String,
        /// What was being configured.
        action: String,
        /// The cause.
        #[source]
        source: UapiError,
    },
    /// A kernel WireGuard netlink exchange failed.
    #[error("configuring kernel wireguard device {name}: {action}")]
    Kernel {
        /// The device.
        name: String,
        /// What was being configured.
        action: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Two desired peers share a public key.
    #[error("peer {public_key} is listed twice in the desired peers")]
    DuplicatePeer {
        /// The key.
        public_key: PublicKey,
    },
    /// A desired peer has this device's own public key.
    #[error("peer {public_key} is this node's own key")]
    SelfPeer {
        /// The key.
        public_key: PublicKey,
    },
    /// A desired peer's endpoint has port 0.
    #[error("peer {public_key} has endpoint {endpoint} without a port")]
    InvalidEndpoint {
        /// The key.
        public_key: PublicKey,
        /// The endpoint.
        endpoint: SocketAddr,
    },
}

/// A WireGuard device in the current network namespace. Dropping it stops
/// the userspace event loop but leaves the link (and, for the kernel backend,
/// its peers) for the next agent to adopt; [`WireguardDevice::delete`]
/// removes the link.
#[derive(Debug)]
pub struct WireguardDevice {
    name: String,
    public_key: PublicKey,
    listen_port: u16,
    inner: Inner,
    peers: BTreeMap<PublicKey, PeerConfig>,
}

#[derive(Debug)]
enum Inner {
    Kernel(wireguard_control::InterfaceName),
    Userspace(Userspace),
}

struct Userspace {
    uapi: UapiClient,
    handle: Option<DeviceHandle>,
}

impl fmt::Debug for Userspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Userspace")
            .field("uapi", &self.uapi)
            .field("running", &self.handle.is_some())
            .finish()
    }
}

impl WireguardDevice {
    /// Creates or adopts the device `config.name` in the calling thread's
    /// network namespace, sets its key, listen port and MTU and brings it up.
    /// Must be called inside a tokio runtime (for netlink).
    ///
    /// # Errors
    ///
    /// [`WireguardError::InvalidConfig`] for a bad name, port or MTU,
    /// [`WireguardError::NameTaken`] if another kind of link has the name,
    /// [`WireguardError::KernelUnavailable`] /
    /// [`WireguardError::BackendMismatch`] when the required backend cannot
    /// be had, and the errors of the backend's setup.
    pub async fn open(netlink: &Netlink, config: WireguardConfig) -> Result<Self, WireguardError> {
        let name = config.name.clone();
        let invalid = |reason: String| WireguardError::InvalidConfig {
            name: name.clone(),
            reason,
        };
        validate_link_name(&name).map_err(|e| invalid(e.to_string()))?;
        if config.listen_port == 0 {
            return Err(invalid("listen port must not be 0".to_owned()));
        }
        if config.mtu < MIN_MTU {
            return Err(invalid(format!("mtu {} is below {MIN_MTU}", config.mtu)));
        }

        let backend = choose_backend(netlink, &name, config.backend).await?;
        if backend == Backend::Userspace && config.mtu > USERSPACE_MAX_MTU {
            return Err(invalid(format!(
                "mtu {} is above {USERSPACE_MAX_MTU}, the userspace backend's limit",
                config.mtu
            )));
        }
        let public_key = config.private_key.public_key();
        let mut device = match backend {
            Backend::Kernel => Self::open_kernel(&config, public_key)?,
            Backend::Userspace => Self::open_userspace(&config, public_key)?,
        };
        netlink.set_link_up(&name, Some(config.mtu)).await?;
        device.listen_port = config.listen_port;
        tracing::info!(device = %name, ?backend, public_key = %public_key, port = config.listen_port, "wireguard device ready");
        Ok(device)
    }

    fn open_kernel(
        config: &WireguardConfig,
        public_key: PublicKey,
    ) -> Result<Self, WireguardError> {
        use wireguard_control::{Backend as WgBackend, Device, DeviceUpdate, Key};
        let kernel_err = |action: &str| {
            let name = config.name.clone();
            let action = action.to_owned();
            move |source| WireguardError::Kernel {
                name,
                action,
                source,
            }
        };
        let iface: wireguard_control::InterfaceName =
            config
                .name
                .parse()
                .map_err(|e| WireguardError::InvalidConfig {
                    name: config.name.clone(),
                    reason: format!("{e}"),
                })?;
        DeviceUpdate::new()
            .set_private_key(Key(*config.private_key.as_bytes()))
            .set_listen_port(config.listen_port)
            .apply(&iface, WgBackend::Kernel)
            .map_err(kernel_err("setting private key and listen port"))?;
        // Adopt the peers a previous agent configured: they carry live
        // sessions. Peers without an endpoint were not made by us; drop them.
        let existing =
            Device::get(&iface, WgBackend::Kernel).map_err(kernel_err("reading peers"))?;
        let mut peers = BTreeMap::new();
        for info in existing.peers {
            let key = PublicKey::from(info.config.public_key.0);
            match info.config.endpoint {
                Some(endpoint) => {
                    let peer = PeerConfig {
                        public_key: key,
                        endpoint,
                        allowed_ips: info
                            .config
                            .allowed_ips
                            .iter()
                            .filter_map(|ip| IpNet::new(ip.address, ip.cidr).ok())
                            .collect(),
                    }
                    .normalized();
                    peers.insert(key, peer);
                }
                None => DeviceUpdate::new()
                    .remove_peer_by_key(&info.config.public_key)
                    .apply(&iface, WgBackend::Kernel)
                    .map_err(kernel_err("removing a peer without endpoint"))?,
            }
        }
        Ok(Self {
            name: config.name.clone(),
            public_key,
            listen_port: config.listen_port,
            inner: Inner::Kernel(iface),
            peers,
        })
    }

    fn open_userspace(
        config: &WireguardConfig,
        public_key: PublicKey,
    ) -> Result<Self, WireguardError> {
        let name = config.name.clone();
        let tun = tun::open_persistent(&name).map_err(|source| WireguardError::Tun {
            name: name.clone(),
            source,
        })?;
        let (ours, theirs) = UnixStream::pair().map_err(|source| WireguardError::Socketpair {
            name: name.clone(),
            source,
        })?;
        let uapi = UapiClient::new(ours).map_err(|source| WireguardError::Socketpair {
            name: name.clone(),
            source,
        })?;
        let device_config = DeviceConfig {
            n_threads: 1,
            use_connected_socket: true,
            use_multi_queue: false,
            // boringtun takes ownership of this end (and closes it on exit).
            uapi_fd: theirs.into_raw_fd(),
        };
        // boringtun takes ownership of the TUN descriptor passed as its name.
        let tun_fd = tun.into_raw_fd();
        let handle = DeviceHandle::new(&tun_fd.to_string(), device_config).map_err(|e| {
            WireguardError::Boringtun {
                name: name.clone(),
                message: e.to_string(),
            }
        })?;
        let mut device = Self {
            name,
            public_key,
            listen_port: config.listen_port,
            inner: Inner::Userspace(Userspace {
                uapi,
                handle: Some(handle),
            }),
            peers: BTreeMap::new(),
        };
        device.uapi_set(
            "setting private key and listen port",
            vec![
                format!("private_key={}", config.private_key.to_hex()),
                format!("listen_port={}", config.listen_port),
            ],
        )?;
        Ok(device)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's public key, to publish in its node record.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// The UDP listen port.
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Kernel(_) => Backend::Kernel,
            Inner::Userspace(_) => Backend::Userspace,
        }
    }

    /// The peers as configured by this device (sorted by public key).
    pub fn peers(&self) -> Vec<PeerConfig> {
        self.peers.values().cloned().collect()
    }

    /// Makes the device's peers equal to `desired`: adds new peers, removes
    /// vanished ones, and removes and re-adds changed ones. Peers already
    /// configured identically are not touched, so their sessions continue.
    /// Blocks for one UAPI or netlink round trip per change.
    ///
    /// On error the record ([`WireguardDevice::peers`]) reflects what was
    /// applied before the failure, so a retry continues from there.
    ///
    /// # Errors
    ///
    /// [`WireguardError::DuplicatePeer`], [`WireguardError::SelfPeer`] or
    /// [`WireguardError::InvalidEndpoint`] for a bad desired set (nothing is
    /// changed then), [`WireguardError::Uapi`] / [`WireguardError::Kernel`]
    /// if the device refuses.
    pub fn set_peers(
        &mut self,
        desired: impl IntoIterator<Item = PeerConfig>,
    ) -> Result<PeerChanges, WireguardError> {
        let mut wanted = BTreeMap::new();
        for peer in desired {
            let peer = peer.normalized();
            if peer.public_key == self.public_key {
                return Err(WireguardError::SelfPeer {
                    public_key: peer.public_key,
                });
            }
            if peer.endpoint.port() == 0 {
                return Err(WireguardError::InvalidEndpoint {
                    public_key: peer.public_key,
                    endpoint: peer.endpoint,
                });
            }
            if let Some(previous) = wanted.insert(peer.public_key, peer) {
                return Err(WireguardError::DuplicatePeer {
                    public_key: previous.public_key,
                });
            }
        }

        let mut changes = PeerChanges::default();
        let current: Vec<PublicKey> = self.peers.keys().copied().collect();
        for key in current {
            match wanted.get(&key) {
                None => {
                    self.remove_peer(key)?;
                    changes.removed.push(key);
                }
                Some(peer) if Some(peer) != self.peers.get(&key) => {
                    self.remove_peer(key)?;
                    changes.replaced.push(key);
                }
                Some(_) => {}
            }
        }
        for (key, peer) in wanted {
            if self.peers.contains_key(&key) {
                continue;
            }
            self.add_peer(peer)?;
            if !changes.replaced.contains(&key) {
                changes.added.push(key);
            }
        }
        if !changes.is_empty() {
            tracing::info!(device = %self.name, added = changes.added.len(), removed = changes.removed.len(), replaced = changes.replaced.len(), "wireguard peers changed");
        }
        Ok(changes)
    }

    fn remove_peer(&mut self, key: PublicKey) -> Result<(), WireguardError> {
        match &self.inner {
            Inner::Kernel(iface) => wireguard_control::DeviceUpdate::new()
                .remove_peer_by_key(&wireguard_control::Key(*key.as_bytes()))
                .apply(iface, wireguard_control::Backend::Kernel)
                .map_err(|source| WireguardError::Kernel {
                    name: self.name.clone(),
                    action: format!("removing peer {key}"),
                    source,
                })?,
            Inner::Userspace(_) => self.uapi_set(
                &format!("removing peer {key}"),
                vec![
                    format!("public_key={}", key.to_hex()),
                    "remove=true".to_owned(),
                ],
            )?,
        }
        self.peers.remove(&key);
        Ok(())
    }

    fn add_peer(&mut self, peer: PeerConfig) -> Result<(), WireguardError> {
        match &self.inner {
            Inner::Kernel(iface) => {
                let mut builder = wireguard_control::PeerConfigBuilder::new(
                    &wireguard_control::Key(*peer.public_key.as_bytes()),
                )
                .set_endpoint(peer.endpoint)
                .replace_allowed_ips();
                for net in &peer.allowed_ips {
                    builder = builder.add_allowed_ip(net.addr(), net.prefix_len());
                }
                wireguard_control::DeviceUpdate::new()
                    .add_peer(builder)
                    .apply(iface, wireguard_control::Backend::Kernel)
                    .map_err(|source| WireguardError::Kernel {
                        name: self.name.clone(),
                        action: format!("adding peer {}", peer.public_key),
                        source,
                    })?;
            }
            Inner::Userspace(_) => {
                let mut lines = vec![
                    format!("public_key={}", peer.public_key.to_hex()),
                    format!("endpoint={}", peer.endpoint),
                    "replace_allowed_ips=true".to_owned(),
                ];
                lines.extend(
                    peer.allowed_ips
                        .iter()
                        .map(|net| format!("allowed_ip={net}")),
                );
                self.uapi_set(&format!("adding peer {}", peer.public_key), lines)?;
            }
        }
        self.peers.insert(peer.public_key, peer);
        Ok(())
    }

    fn uapi_set(&mut self, action: &str, lines: Vec<String>) -> Result<(), WireguardError> {
        let Inner::Userspace(userspace) = &mut self.inner else {
            unreachable!("uapi_set is only called for the userspace backend");
        };
        userspace
            .uapi
            .set(&lines)
            .map_err(|source| WireguardError::Uapi {
                name: self.name.clone(),
                action: action.to_owned(),
                source,
            })
    }

    /// Checks that the device still answers: the kernel device through
    /// netlink, the userspace one through its UAPI socket (a wedged
    /// boringtun event loop does not answer).
    ///
    /// # Errors
    ///
    /// [`WireguardError::Kernel`] or [`WireguardError::Uapi`] naming the
    /// device when it does not answer.
    pub fn health_check(&mut self) -> Result<(), WireguardError> {
        let name = self.name.clone();
        match &mut self.inner {
            Inner::Kernel(iface) => {
                wireguard_control::Device::get(iface, wireguard_control::Backend::Kernel)
                    .map(drop)
                    .map_err(|source| WireguardError::Kernel {
                        name,
                        action: "querying device state".to_owned(),
                        source,
                    })
            }
            Inner::Userspace(userspace) => {
                userspace
                    .uapi
                    .get()
                    .map(drop)
                    .map_err(|source| WireguardError::Uapi {
                        name,
                        action: "querying device state".to_owned(),
                        source,
                    })
            }
        }
    }

    /// Stops the device and deletes its link (and with it every peer, address
    /// and route through it).
    ///
    /// # Errors
    ///
    /// [`WireguardError::Netlink`] if the link cannot be deleted.
    pub async fn delete(mut self, netlink: &Netlink) -> Result<(), WireguardError> {
        self.stop();
        netlink.delete_link(&self.name).await?;
        Ok(())
    }

    fn stop(&mut self) {
        let Inner::Userspace(userspace) = &mut self.inner else {
            return;
        };
        let Some(mut handle) = userspace.handle.take() else {
            return;
        };
        // Closing our end of the UAPI socketpair makes boringtun's event loop
        // see EOF on its end and exit; then its thread can be joined.
        userspace.uapi.shutdown();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let name = self.name.clone();
        std::thread::spawn(move || {
            handle.wait();
            drop(handle);
            let _ = done_tx.send(());
        });
        if done_rx.recv_timeout(STOP_TIMEOUT).is_err() {
            tracing::warn!(device = %name, "boringtun event thread did not stop within {STOP_TIMEOUT:?}; leaving it");
        }
    }
}

impl Drop for WireguardDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn choose_backend(
    netlink: &Netlink,
    name: &str,
    preference: BackendPreference,
) -> Result<Backend, WireguardError> {
    let existing = netlink.link(name).await?;
    let found = match existing.as_ref().map(|link| link.kind.as_deref()) {
        None => None,
        Some(Some("wireguard")) => Some(Backend::Kernel),
        Some(Some("tun")) => Some(Backend::Userspace),
        Some(kind) => {
            return Err(WireguardError::NameTaken {
                name: name.to_owned(),
                kind: kind.map(str::to_owned),
            })
        }
    };
    match (found, preference) {
        (Some(found), BackendPreference::Auto) => Ok(found),
        (Some(Backend::Kernel), BackendPreference::Kernel) => Ok(Backend::Kernel),
        (Some(Backend::Userspace), BackendPreference::Userspace) => Ok(Backend::Userspace),
        (Some(found), wanted) => Err(WireguardError::BackendMismatch {
            name: name.to_owned(),
            found,
            wanted,
        }),
        (None, BackendPreference::Userspace) => Ok(Backend::Userspace),
        (None, wanted) => match create_kernel_link(netlink, name).await? {
            true => Ok(Backend::Kernel),
            false if wanted == BackendPreference::Auto => {
                tracing::info!(
                    device = name,
                    "no kernel wireguard; using boringtun in userspace"
                );
                Ok(Backend::Userspace)
            }
            false => Err(WireguardError::KernelUnavailable),
        },
    }
}

/// Creates a kernel `wireguard` link; `Ok(false)` if the kernel has no
/// WireGuard.
async fn create_kernel_link(netlink: &Netlink, name: &str) -> Result<bool, NetlinkError> {
    match netlink
        .handle()
        .link()
        .add(LinkWireguard::new(name).build())
        .execute()
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(source) => Err(request_error("creating wireguard link", name, source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_peers_compare_by_networks() {
        let key = PrivateKey::generate().unwrap().public_key();
        let a = PeerConfig {
            public_key: key,
            endpoint: "192.168.1.2:51871".parse().unwrap(),
            allowed_ips: vec![
                "10.1.2.3/16".parse().unwrap(),
                "192.168.1.2/32".parse().unwrap(),
            ],
        };
        let b = PeerConfig {
            allowed_ips: vec![
                "192.168.1.2/32".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            ..a.clone()
        };
        assert_eq!(a.clone().normalized(), b.normalized());
        assert_eq!(
            a.normalized().allowed_ips,
            vec![
                "10.1.0.0/16".parse::<IpNet>().unwrap(),
                "192.168.1.2/32".parse().unwrap()
            ]
        );
    }
}
