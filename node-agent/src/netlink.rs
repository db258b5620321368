//! The agent's one seam to rtnetlink: a connection bound to a network
//! namespace, and the few link/address/route/neighbour operations pod
//! networking needs.
//!
//! The connection, its errors, the namespace handling and the link lookup
//! and deletion are the tunnel layer's ([`tunnel::Netlink`]); this module
//! adds only what pod setup needs on top. A netlink socket belongs to the
//! namespace of the thread that created it, for its whole life, so
//! [`Netlink::connect_in`] opens the socket for a pod's namespace on a
//! short-lived thread that entered it; the connection itself is then driven
//! by the agent's runtime like any other.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use ipnet::IpNet;
use rtnetlink::{
    packet_route::{neighbour::NeighbourState, route::RouteScope},
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

/// Errors of netlink operations: those of the tunnel layer's connection,
/// which opens, and enters namespaces, the same way.
pub use tunnel::NetlinkError;

/// A link as the agent needs to know it (index, name, MAC, MTU, ...).
pub use tunnel::LinkState as Link;

/// A netlink connection bound to one network namespace: the tunnel layer's
/// [`tunnel::Netlink`], plus the veth, address, route and neighbour
/// operations of pod networking.
#[derive(Debug, Clone)]
pub struct Netlink {
    conn: tunnel::Netlink,
}

fn request(
    op: &'static str,
    target: impl ToString,
) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let target = target.to_string();
    move |source| NetlinkError::Request { op, target, source }
}

impl Netlink {
    /// Connects in the calling thread's network namespace. Must be called
    /// within a tokio runtime (the connection task is spawned on it).
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Connect`] when the socket cannot be opened,
    /// [`NetlinkError::NoRuntime`] outside a tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        tunnel::Netlink::connect().map(|conn| Self { conn })
    }

    /// Connects inside the network namespace at `netns` (e.g.
    /// `/run/netns/pod1` or `/proc/<pid>/ns/net`).
    ///
    /// # Errors
    ///
    /// See [`tunnel::Netlink::connect_in`].
    pub async fn connect_in(netns: &Path) -> Result<Self, NetlinkError> {
        tunnel::Netlink::connect_in(netns)
            .await
            .map(|conn| Self { conn })
    }

    fn handle(&self) -> &Handle {
        self.conn.handle()
    }

    /// The link named `name`, if it exists.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::InvalidLinkName`] for a name the kernel would refuse,
    /// [`NetlinkError::Request`] on any failure but "no such device".
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        self.conn.link(name).await
    }

    /// Creates the veth pair `name` ↔ `peer` with `mtu`, both down.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`], e.g. when a name exists.
    pub async fn add_veth(&self, name: &str, peer: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.handle()
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
        let change = LinkUnspec::new_with_index(index).setns_by_fd(netns.as_raw_fd());
        self.set_link(change, "move to netns").await
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
        if let Some(name) = name {
            // A link is renamed while down, then brought up separately.
            let rename = LinkUnspec::new_with_index(index).name(name.to_owned());
            self.set_link(rename, "rename link").await?;
        }
        let up = LinkUnspec::new_with_index(index).mtu(mtu).up();
        self.set_link(up, "set link up").await
    }

    /// Applies one change to an existing link (`RTM_SETLINK`).
    async fn set_link(
        &self,
        change: LinkMessageBuilder<LinkUnspec>,
        op: &'static str,
    ) -> Result<(), NetlinkError> {
        let message = change.build();
        let index = message.header.index;
        self.handle()
            .link()
            .set(message)
            .execute()
            .await
            .map_err(request(op, index))
    }

    /// Deletes link `name`; `Ok(false)` if it did not exist.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::InvalidLinkName`] or [`NetlinkError::Request`].
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        self.conn.delete_link(name).await
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
        self.handle()
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
        let nets = self.conn.addresses_of(index).await?;
        Ok(nets
            .iter()
            .filter_map(|net| match net {
                IpNet::V4(v4) => Some((v4.addr(), v4.prefix_len())),
                IpNet::V6(_) => None,
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
        self.handle()
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
        self.handle()
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

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
