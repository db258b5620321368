//! The agent's one seam to rtnetlink: a connection bound to a network
//! namespace, and the few link/address/route/neighbour operations pod
//! networking needs.
//!
//! A netlink socket belongs to the namespace of the thread that created it,
//! for its whole life. To talk to a pod's namespace, [`Netlink::connect_in`]
//! creates the socket on a short-lived thread of its own that entered that
//! namespace with `setns(CLONE_NEWNET)` (a fresh thread, never a pooled one,
//! so no other work ever runs in the pod's namespace); the connection itself
//! is then driven by the agent's runtime like any other.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use nix::sched::{setns, CloneFlags};
use rtnetlink::{
    packet_route::{
        link::{LinkAttribute, LinkMessage},
        neighbour::NeighbourState,
        route::RouteScope,
    },
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

/// Errors of netlink operations.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    OpenNetns {
        /// The namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `setns` into the namespace failed.
    #[error("cannot enter network namespace {path}")]
    Setns {
        /// The namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The helper thread that opens the socket died.
    #[error("netlink helper thread for {0} failed")]
    Thread(PathBuf),
    /// A request failed.
    #[error("netlink: {op} {target}")]
    Request {
        /// The operation (e.g. "add veth").
        op: &'static str,
        /// What it was applied to.
        target: String,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
}

/// A link as the agent needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC address (empty for L3 devices).
    pub mac: Vec<u8>,
    /// MTU.
    pub mtu: u32,
}

/// A netlink connection bound to one network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

fn request(
    op: &'static str,
    target: impl ToString,
) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let target = target.to_string();
    move |source| NetlinkError::Request { op, target, source }
}

/// Whether `e` is the kernel's `errno`.
pub fn is_errno(e: &rtnetlink::Error, errno: nix::errno::Errno) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.code.map(|c| c.get().abs()) == Some(errno as i32))
}

impl Netlink {
    /// Connects in the calling thread's network namespace. Must be called
    /// within a tokio runtime (the connection task is spawned on it).
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Connect`] when the socket cannot be opened.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Connects inside the network namespace at `netns` (e.g.
    /// `/run/netns/pod1` or `/proc/<pid>/ns/net`).
    ///
    /// # Errors
    ///
    /// [`NetlinkError::OpenNetns`], [`NetlinkError::Setns`] or
    /// [`NetlinkError::Connect`].
    pub async fn connect_in(netns: &Path) -> Result<Self, NetlinkError> {
        let path = netns.to_owned();
        let ns = File::open(&path).map_err(|source| NetlinkError::OpenNetns {
            path: path.clone(),
            source,
        })?;
        let rt = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("netns-netlink".into())
            .spawn(move || {
                let result = (|| {
                    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetlinkError::Setns {
                        path: thread_path,
                        source,
                    })?;
                    let _guard = rt.enter();
                    rtnetlink::new_connection().map_err(NetlinkError::Connect)
                })();
                let _ = tx.send(result);
            })
            .map_err(|_| NetlinkError::Thread(path.clone()))?;
        let (conn, handle, _) = rx.await.map_err(|_| NetlinkError::Thread(path))??;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The link named `name`, if it exists.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`] on any failure but "no such device".
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let res = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await;
        match res {
            Ok(Some(msg)) => Ok(Some(to_link(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, nix::errno::Errno::ENODEV) => Ok(None),
            Err(e) => Err(request("get link", name)(e)),
        }
    }

    /// Creates the veth pair `name` ↔ `peer` with `mtu`, both down.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`], e.g. when a name exists.
    pub async fn add_veth(&self, name: &str, peer: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).mtu(mtu).build())
            .execute()
            .await
            .map_err(request("add veth", name))
    }

    /// Moves link `index` into the namespace open as `netns`.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`].
    pub async fn move_to_netns(&self, index: u32, netns: &File) -> Result<(), NetlinkError> {
        use std::os::fd::AsRawFd;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(netns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(request("move to netns", index))
    }

    /// Renames link `index` to `name`, sets its MTU and brings it up.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`].
    pub async fn configure_link(
        &self,
        index: u32,
        name: Option<&str>,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        let mut msg = LinkUnspec::new_with_index(index).mtu(mtu);
        if let Some(name) = name {
            // A link is renamed while down, then brought up separately.
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .name(name.to_owned())
                        .build(),
                )
                .execute()
                .await
                .map_err(request("rename link", index))?;
        }
        msg = msg.up();
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(request("set link up", index))
    }

    /// Deletes link `name`; `Ok(false)` if it did not exist.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`].
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, nix::errno::Errno::ENODEV) => Ok(false),
            Err(e) => Err(request("delete link", name)(e)),
        }
    }

    /// Adds (or replaces) `addr/prefix` on link `index`.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`].
    pub async fn add_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .replace()
            .execute()
            .await
            .map_err(request("add address", addr))
    }

    /// The IPv4 addresses on link `index`.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`].
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(request("list addresses", index))?;
        Ok(msgs
            .iter()
            .flat_map(|m| {
                m.attributes.iter().filter_map(move |a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds (or replaces) the route `dst/prefix` out of link `index`,
    /// through `via` (on-link) or directly (scope link).
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`].
    pub async fn add_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        index: u32,
        via: Option<Ipv4Addr>,
    ) -> Result<(), NetlinkError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(index);
        b = match via {
            Some(gw) => b.gateway(gw).onlink(),
            None => b.scope(RouteScope::Link),
        };
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(request("add route", format!("{dst}/{prefix}")))
    }

    /// Adds (or replaces) a permanent neighbour entry `ip → mac` on `index`.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`].
    pub async fn add_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: &[u8],
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(request("add neighbour", ip))
    }
}

fn to_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Address(a) => link.mac.clone_from(a),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            _ => {}
        }
    }
    link
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
