//! Typed handles on the pinned maps.
//!
//! Each handle opens the map from its pin under the datapath's bpffs
//! directory, so the agent can hold them independently of the [`Datapath`]
//! that loaded the programs, and a restarted agent opens the very same maps.
//!
//! [`Datapath`]: crate::Datapath

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData, MapError};
use ipnet::IpNet;

use crate::abi::{
    EndpointInfo, EndpointKey, IpcacheKeyData, IpcacheValue, FAMILY_IPV4, FAMILY_IPV6,
    IPCACHE_F_ENCRYPT, IPCACHE_F_REMOTE_CLUSTER,
};

/// Largest identity the VXLAN VNI (24 bits) can carry.
pub const MAX_IDENTITY: u32 = 0x00ff_ffff;

/// Errors of the typed map handles.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pin is missing or is not the expected kind of map.
    #[error("cannot open pinned map {name} at {path}")]
    Open {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    /// A map syscall failed.
    #[error("{op} of {key} in map {name} failed")]
    Op {
        name: &'static str,
        op: &'static str,
        key: String,
        #[source]
        source: Box<MapError>,
    },
    /// The VXLAN underlay is IPv4 (the tunnel key is set with an IPv4 remote).
    #[error("tunnel endpoint {0} is not an IPv4 address: the VXLAN underlay is IPv4")]
    TunnelEndpointNotIpv4(IpAddr),
    /// The identity does not fit in the VNI.
    #[error("identity {0} does not fit the 24-bit VNI (max {MAX_IDENTITY})")]
    IdentityTooLarge(u32),
    /// A key read back from the kernel has an unknown family byte or prefix.
    #[error("map {name} holds a malformed key (family {family}, prefix length {prefixlen})")]
    MalformedKey {
        name: &'static str,
        family: u8,
        prefixlen: u32,
    },
}

pub(crate) fn open<T>(dir: &Path, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    let open =
        || -> Result<T, MapError> { T::try_from(Map::from_map_data(MapData::from_pin(&path)?)?) };
    open().map_err(|source| Error::Open {
        name,
        path: path.clone(),
        source: Box::new(source),
    })
}

/// A miss: aya reports it as `KeyNotFound` for lookups and as `ENOENT` from
/// the syscall for deletes.
pub(crate) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

pub(crate) fn addr_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (FAMILY_IPV4, addr)
        }
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets()),
    }
}

pub(crate) fn bytes_addr(family: u8, addr: [u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_IPV4 => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        FAMILY_IPV6 => Some(IpAddr::V6(Ipv6Addr::from(addr))),
        _ => None,
    }
}

crate::flags::flag_set! {
    /// Flags of an ipcache entry (`IPCACHE_F_*` in `datapath.h`).
    pub struct IpcacheFlags;
    /// The identity belongs to another cluster.
    REMOTE_CLUSTER = IPCACHE_F_REMOTE_CLUSTER;
    /// Encrypt: `from_pod` hands the packet to the kernel's routing (towards
    /// the WireGuard device) even when a tunnel endpoint is known.
    ENCRYPT = IPCACHE_F_ENCRYPT;
}

/// What the datapath knows about a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpcacheEntry {
    /// Security identity of the addresses in the prefix.
    pub identity: u32,
    /// Underlay (IPv4) address of the node hosting the prefix; `None` means no
    /// tunnel: native routing, or the world.
    pub tunnel_endpoint: Option<IpAddr>,
    /// Flags.
    pub flags: IpcacheFlags,
}

impl IpcacheEntry {
    fn to_value(self) -> Result<IpcacheValue, Error> {
        let tunnel_endpoint = match self.tunnel_endpoint {
            None => 0,
            Some(IpAddr::V4(v4)) => u32::from(v4),
            Some(other @ IpAddr::V6(_)) => return Err(Error::TunnelEndpointNotIpv4(other)),
        };
        Ok(IpcacheValue {
            identity: self.identity,
            tunnel_endpoint,
            flags: self.flags.bits(),
            pad: 0,
        })
    }

    fn from_value(v: IpcacheValue) -> Self {
        Self {
            identity: v.identity,
            tunnel_endpoint: (v.tunnel_endpoint != 0)
                .then(|| IpAddr::V4(Ipv4Addr::from(v.tunnel_endpoint))),
            flags: IpcacheFlags::from_bits(v.flags),
        }
    }
}

/// The `ipcache` LPM trie: IPv4 and IPv6 prefixes → identity, tunnel endpoint, flags.
#[derive(Debug)]
pub struct Ipcache {
    map: LpmTrie<MapData, IpcacheKeyData, IpcacheValue>,
}

const IPCACHE: &str = "ipcache";
/// Bits of `family` + `pad` that precede the address in every ipcache key.
const FAMILY_BITS: u32 = 32;

fn ipcache_key(prefix: IpNet) -> Key<IpcacheKeyData> {
    let prefix = prefix.trunc();
    let (family, addr) = addr_bytes(prefix.addr());
    Key::new(
        FAMILY_BITS + u32::from(prefix.prefix_len()),
        IpcacheKeyData {
            family,
            pad: [0; 3],
            addr,
        },
    )
}

impl Ipcache {
    /// Opens the pinned `ipcache` map under `bpffs_dir`.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] when the pin is missing or not an LPM trie of this layout.
    pub fn open(bpffs_dir: &Path) -> Result<Self, Error> {
        Ok(Self {
            map: open(bpffs_dir, IPCACHE)?,
        })
    }

    /// Inserts or replaces the entry for `prefix` (host bits are cleared).
    ///
    /// # Errors
    ///
    /// [`Error::TunnelEndpointNotIpv4`] for an IPv6 tunnel endpoint, [`Error::Op`]
    /// when the kernel refuses (e.g. the map is full).
    pub fn upsert(&mut self, prefix: IpNet, entry: IpcacheEntry) -> Result<(), Error> {
        let value = entry.to_value()?;
        self.map
            .insert(&ipcache_key(prefix), value, 0)
            .map_err(|source| Error::Op {
                name: IPCACHE,
                op: "upsert",
                key: prefix.to_string(),
                source: Box::new(source),
            })
    }

    /// Removes the entry for exactly `prefix`; `Ok(false)` when there was none.
    ///
    /// # Errors
    ///
    /// [`Error::Op`] when the kernel fails otherwise.
    pub fn remove(&mut self, prefix: IpNet) -> Result<bool, Error> {
        match self.map.remove(&ipcache_key(prefix)) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(source) => Err(Error::Op {
                name: IPCACHE,
                op: "remove",
                key: prefix.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// The entry stored for exactly `prefix`.
    ///
    /// The kernel's lookup is a longest-prefix match, so this walks the keys;
    /// use [`Ipcache::lookup`] for what the datapath would see for an address.
    ///
    /// # Errors
    ///
    /// [`Error::Op`] or [`Error::MalformedKey`] while walking the map.
    pub fn get(&self, prefix: IpNet) -> Result<Option<IpcacheEntry>, Error> {
        let prefix = prefix.trunc();
        for item in self.iter() {
            let (p, entry) = item?;
            if p == prefix {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// Longest-prefix match for one address, as `from_pod` does it.
    ///
    /// # Errors
    ///
    /// [`Error::Op`] when the kernel fails for another reason than a miss.
    pub fn lookup(&self, ip: IpAddr) -> Result<Option<IpcacheEntry>, Error> {
        match self.map.get(&ipcache_key(IpNet::from(ip)), 0) {
            Ok(v) => Ok(Some(IpcacheEntry::from_value(v))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(Error::Op {
                name: IPCACHE,
                op: "lookup",
                key: ip.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Every entry. The map may change while it is walked (kernel semantics).
    pub fn iter(&self) -> impl Iterator<Item = Result<(IpNet, IpcacheEntry), Error>> + '_ {
        self.map.iter().map(|item| {
            let (key, value) = item.map_err(|source| Error::Op {
                name: IPCACHE,
                op: "iterate",
                key: String::new(),
                source: Box::new(source),
            })?;
            let prefixlen = key.prefix_len();
            let data = key.data();
            let malformed = || Error::MalformedKey {
                name: IPCACHE,
                family: data.family,
                prefixlen,
            };
            let ip = bytes_addr(data.family, data.addr).ok_or_else(malformed)?;
            let bits = prefixlen
                .checked_sub(FAMILY_BITS)
                .and_then(|b| u8::try_from(b).ok())
                .ok_or_else(malformed)?;
            let net = IpNet::new(ip, bits).map_err(|_| malformed())?;
            Ok((net, IpcacheEntry::from_value(value)))
        })
    }
}

/// A pod on this node, as the datapath needs it to deliver packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Interface index of the host side of the pod's veth (node namespace).
    pub ifindex: u32,
    /// The pod's security identity (carried in the VNI, at most [`MAX_IDENTITY`]).
    pub identity: u32,
    /// Agent-local endpoint id (part of the policy key).
    pub endpoint_id: u32,
    /// MAC of the pod's `eth0`.
    pub pod_mac: [u8; 6],
    /// MAC of the host side of the veth: the pod's gateway MAC.
    pub host_mac: [u8; 6],
}

/// The `endpoints` hash: local pod IP → [`Endpoint`].
#[derive(Debug)]
pub struct Endpoints {
    map: HashMap<MapData, EndpointKey, EndpointInfo>,
}

const ENDPOINTS: &str = "endpoints";

fn endpoint_key(ip: IpAddr) -> EndpointKey {
    let (family, addr) = addr_bytes(ip);
    EndpointKey {
        family,
        pad: [0; 3],
        addr,
    }
}

impl Endpoints {
    /// Opens the pinned `endpoints` map under `bpffs_dir`.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] when the pin is missing or not a hash of this layout.
    pub fn open(bpffs_dir: &Path) -> Result<Self, Error> {
        Ok(Self {
            map: open(bpffs_dir, ENDPOINTS)?,
        })
    }

    /// Inserts or replaces the endpoint for `ip`.
    ///
    /// # Errors
    ///
    /// [`Error::IdentityTooLarge`] when the identity does not fit the VNI,
    /// [`Error::Op`] when the kernel refuses (e.g. the map is full).
    pub fn insert(&mut self, ip: IpAddr, ep: Endpoint) -> Result<(), Error> {
        if ep.identity > MAX_IDENTITY {
            return Err(Error::IdentityTooLarge(ep.identity));
        }
        let info = EndpointInfo {
            ifindex: ep.ifindex,
            identity: ep.identity,
            endpoint_id: ep.endpoint_id,
            flags: 0,
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
            pad: [0; 4],
        };
        self.map
            .insert(endpoint_key(ip), info, 0)
            .map_err(|source| Error::Op {
                name: ENDPOINTS,
                op: "insert",
                key: ip.to_string(),
                source: Box::new(source),
            })
    }

    /// Removes the endpoint for `ip`; `Ok(false)` when there was none.
    ///
    /// # Errors
    ///
    /// [`Error::Op`] when the kernel fails otherwise.
    pub fn remove(&mut self, ip: IpAddr) -> Result<bool, Error> {
        match self.map.remove(&endpoint_key(ip)) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(source) => Err(Error::Op {
                name: ENDPOINTS,
                op: "remove",
                key: ip.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// The endpoint for `ip`.
    ///
    /// # Errors
    ///
    /// [`Error::Op`] when the kernel fails for another reason than a miss.
    pub fn get(&self, ip: IpAddr) -> Result<Option<Endpoint>, Error> {
        match self.map.get(&endpoint_key(ip), 0) {
            Ok(info) => Ok(Some(endpoint_from(info))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(Error::Op {
                name: ENDPOINTS,
                op: "get",
                key: ip.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Every endpoint.
    pub fn iter(&self) -> impl Iterator<Item = Result<(IpAddr, Endpoint), Error>> + '_ {
        self.map.iter().map(|item| {
            let (key, info) = item.map_err(|source| Error::Op {
                name: ENDPOINTS,
                op: "iterate",
                key: String::new(),
                source: Box::new(source),
            })?;
            let ip = bytes_addr(key.family, key.addr).ok_or(Error::MalformedKey {
                name: ENDPOINTS,
                family: key.family,
                prefixlen: 0,
            })?;
            Ok((ip, endpoint_from(info)))
        })
    }
}

fn endpoint_from(info: EndpointInfo) -> Endpoint {
    Endpoint {
        ifindex: info.ifindex,
        identity: info.identity,
        endpoint_id: info.endpoint_id,
        pod_mac: info.pod_mac,
        host_mac: info.host_mac,
    }
}
