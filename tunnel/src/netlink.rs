//! One rtnetlink connection bound to a network namespace, and the link
//! operations the tunnel layer (and the node agent's pod setup) need.
//!
//! A netlink socket belongs to the network namespace its creating thread was
//! in at `socket(2)` time; the socket keeps that namespace even when it is
//! later polled from other threads. [`Netlink::connect`] therefore opens it
//! in the calling thread's namespace (the node agent runs entirely inside the
//! node's), while [`Netlink::connect_in`] opens it on a short-lived thread of
//! its own that entered another namespace with `setns(CLONE_NEWNET)` (a
//! fresh thread, never a pooled one, so no other work ever runs there); the
//! connection itself is then driven by the caller's runtime like any other.

use std::{
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

/// Errors of netlink link and address operations.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("opening a rtnetlink socket")]
    Connect(#[source] std::io::Error),
    /// A netlink request failed.
    #[error("netlink: {op} {target}")]
    Request {
        /// What was attempted.
        op: &'static str,
        /// The link, route or rule concerned.
        target: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A link that must exist does not.
    #[error("link {name} does not exist")]
    NoSuchLink {
        /// The link name.
        name: String,
    },
    /// A link name the kernel would refuse (empty, longer than 15 bytes, `/`,
    /// whitespace, `.` or `..`).
    #[error("invalid link name {name:?}: 1 to 15 bytes, no '/', ':' or whitespace")]
    InvalidLinkName {
        /// The name.
        name: String,
    },
    /// No tokio runtime to run the netlink connection on.
    #[error("netlink needs a tokio runtime on the calling thread")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    /// The network namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    OpenNetns {
        /// The namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `setns` into the network namespace failed.
    #[error("cannot enter network namespace {path}")]
    Setns {
        /// The namespace path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The helper thread that opens the socket inside a namespace died or
    /// could not be started.
    #[error("netlink helper thread for network namespace {path} failed")]
    Thread {
        /// The namespace path.
        path: PathBuf,
    },
}

/// The kernel's maximum interface name length, without the NUL.
const IFNAMSIZ_MAX: usize = 15;

/// Checks a link name as the kernel's `dev_valid_name` does.
///
/// # Errors
///
/// [`NetlinkError::InvalidLinkName`] if the kernel would refuse it.
pub fn validate_link_name(name: &str) -> Result<(), NetlinkError> {
    let valid = !name.is_empty()
        && name.len() <= IFNAMSIZ_MAX
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if valid {
        Ok(())
    } else {
        Err(NetlinkError::InvalidLinkName {
            name: name.to_owned(),
        })
    }
}

/// The interesting parts of a link, as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND` (`"vxlan"`, `"tun"`, `"veth"`, ...), if any.
    pub kind: Option<String>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Hardware address (empty for L3 devices such as TUN).
    pub mac: Vec<u8>,
    /// Administratively up.
    pub up: bool,
}

/// An rtnetlink connection in the namespace of the thread that opened it.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace and
    /// spawns its connection task on the current tokio runtime. The task ends
    /// when every clone of this `Netlink` is dropped.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Connect`] if the socket cannot be opened,
    /// [`NetlinkError::NoRuntime`] outside a tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(NetlinkError::NoRuntime)?;
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        runtime.spawn(connection);
        Ok(Self { handle })
    }

    /// Opens a netlink socket inside the network namespace at `netns` (e.g.
    /// `/run/netns/pod1` or `/proc/<pid>/ns/net`) and spawns its connection
    /// task on the current tokio runtime; the calling thread stays in its own
    /// namespace.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::OpenNetns`], [`NetlinkError::Setns`],
    /// [`NetlinkError::Thread`], [`NetlinkError::Connect`], or
    /// [`NetlinkError::NoRuntime`] outside a tokio runtime.
    pub async fn connect_in(netns: &Path) -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(NetlinkError::NoRuntime)?;
        let path = netns.to_owned();
        let ns = File::open(&path).map_err(|source| NetlinkError::OpenNetns {
            path: path.clone(),
            source,
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread_path = path.clone();
        let thread_runtime = runtime.clone();
        std::thread::Builder::new()
            .name("netns-netlink".into())
            .spawn(move || {
                let result = setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetlinkError::Setns {
                        path: thread_path,
                        source,
                    })
                    .and_then(|()| {
                        // The connection's socket is registered with the
                        // runtime's reactor when it is created.
                        let _guard = thread_runtime.enter();
                        rtnetlink::new_connection().map_err(NetlinkError::Connect)
                    });
                let _ = tx.send(result);
            })
            .map_err(|_| NetlinkError::Thread { path: path.clone() })?;
        let (connection, handle, _) = rx.await.map_err(|_| NetlinkError::Thread { path })??;
        runtime.spawn(connection);
        Ok(Self { handle })
    }

    /// The underlying rtnetlink handle, for requests this crate has no helper
    /// for.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The link called `name`, or `None` if there is none.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`] if the kernel refuses the query for another
    /// reason than the link not existing.
    pub async fn link(&self, name: &str) -> Result<Option<LinkState>, NetlinkError> {
        Ok(self
            .link_message(name)
            .await?
            .as_ref()
            .map(LinkState::from_message))
    }

    /// The raw link message of `name`, or `None` if there is none.
    pub(crate) async fn link_message(
        &self,
        name: &str,
    ) -> Result<Option<LinkMessage>, NetlinkError> {
        validate_link_name(name)?;
        let result = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await;
        match result {
            Ok(message) => Ok(message),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(request_error("getting link", name, source)),
        }
    }

    /// The index of link `name`.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::NoSuchLink`] if it does not exist,
    /// [`NetlinkError::Request`] if the query fails.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.link(name)
            .await?
            .map(|link| link.index)
            .ok_or_else(|| NetlinkError::NoSuchLink {
                name: name.to_owned(),
            })
    }

    /// Deletes link `name`. Deleting a link that does not exist is not an
    /// error (idempotent teardown); returns whether a link was deleted.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`] if the kernel refuses.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(source) => Err(request_error("deleting link", name, source)),
        }
    }

    /// Sets the MTU of link `name` and brings it up.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::NoSuchLink`] or [`NetlinkError::Request`].
    pub async fn set_link_up(&self, name: &str, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        let mut builder = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.handle
            .link()
            .set(builder.build())
            .execute()
            .await
            .map_err(|source| request_error("setting mtu and up on link", name, source))
    }

    /// Adds `address` (with its prefix length) to link `name`; an address
    /// that is already there is left alone.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::NoSuchLink`] or [`NetlinkError::Request`].
    pub async fn add_address(&self, name: &str, address: IpNet) -> Result<(), NetlinkError> {
        let index = self.link_index(name).await?;
        match self
            .handle
            .address()
            .add(index, address.addr(), address.prefix_len())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(source) => Err(request_error(
                "adding address to link",
                &format!("{name} {address}"),
                source,
            )),
        }
    }

    /// The addresses configured on link `name`.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::NoSuchLink`] or [`NetlinkError::Request`].
    pub async fn addresses(&self, name: &str) -> Result<Vec<IpAddr>, NetlinkError> {
        let index = self.link_index(name).await?;
        let nets = self.dump_addresses(index, name).await?;
        Ok(nets.iter().map(IpNet::addr).collect())
    }

    /// The addresses, with their prefix lengths, configured on link `index`.
    ///
    /// # Errors
    ///
    /// [`NetlinkError::Request`] if the dump fails.
    pub async fn addresses_of(&self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        self.dump_addresses(index, &format!("#{index}")).await
    }

    async fn dump_addresses(&self, index: u32, link: &str) -> Result<Vec<IpNet>, NetlinkError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| request_error("listing addresses of link", link, source))?;
        Ok(messages
            .iter()
            .flat_map(|m| {
                m.attributes.iter().filter_map(move |attr| match attr {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }
}

impl LinkState {
    pub(crate) fn from_message(message: &LinkMessage) -> Self {
        let mut state = LinkState {
            index: message.header.index,
            name: String::new(),
            kind: None,
            mtu: None,
            mac: Vec::new(),
            up: message.header.flags.contains(LinkFlags::Up),
        };
        for attr in &message.attributes {
            match attr {
                LinkAttribute::IfName(name) => state.name.clone_from(name),
                LinkAttribute::Mtu(mtu) => state.mtu = Some(*mtu),
                LinkAttribute::Address(mac) => state.mac.clone_from(mac),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            state.kind = Some(kind_name(kind));
                        }
                    }
                }
                _ => {}
            }
        }
        state
    }
}

fn kind_name(kind: &InfoKind) -> String {
    kind.to_string()
}

/// The positive errno of a netlink error answer, if it is one.
pub fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

pub(crate) fn request_error(
    op: &'static str,
    target: &str,
    source: rtnetlink::Error,
) -> NetlinkError {
    NetlinkError::Request {
        op,
        target: target.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_are_checked_like_the_kernel_does() {
        for good in ["wg0", "mesh_vxlan", "a", "123456789012345"] {
            validate_link_name(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "a:b", "1234567890123456"] {
            assert!(validate_link_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
