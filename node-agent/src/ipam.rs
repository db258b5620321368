//! Pod address management from the node's pod CIDR, persisted in the state
//! directory so that a restarted agent never hands out an address twice.
//!
//! Layout (as the reference `host-local` CNI IPAM plugin does it): one file per
//! allocated address, `<state>/ipam/<cidr>/<ip>`, whose content names the
//! owner (`<container id>\n<ifname>\n`). A file is created atomically with
//! its content (written to a temporary file, then hard-linked to its final
//! name, which fails if the name exists), so a crash leaves either no
//! allocation or a complete one. `last_reserved_ip` makes allocation
//! round-robin: a just-released address is handed out again only after every
//! other one, so remote clusters that still cache the old owner for a moment
//! do not send its traffic to a new pod.
//!
//! The network address, the broadcast address and the node's router address
//! (the first host address, the pods' gateway) are never handed out.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

const LAST_RESERVED: &str = "last_reserved_ip";

/// Who holds an address: one interface of one container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl Owner {
    fn encode(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }

    fn decode(s: &str) -> Option<Self> {
        let mut lines = s.lines();
        let container_id = lines.next()?.trim().to_owned();
        let ifname = lines.next()?.trim().to_owned();
        (!container_id.is_empty() && !ifname.is_empty()).then_some(Self {
            container_id,
            ifname,
        })
    }
}

/// Errors of the allocator.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The state directory could not be read or written.
    #[error("ipam state {path}: {op}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Every address is taken.
    #[error("no free address left in {cidr} ({allocated} allocated)")]
    Exhausted {
        /// The pod CIDR.
        cidr: Ipv4Net,
        /// How many are in use.
        allocated: usize,
    },
    /// The pod CIDR has no usable host address besides the router's.
    #[error("pod CIDR {0} is too small")]
    TooSmall(Ipv4Net),
}

/// A persistent allocator over one CIDR. Not synchronised: the agent keeps
/// it behind one lock (allocations are rare and quick).
#[derive(Debug)]
pub struct Ipam {
    dir: PathBuf,
    cidr: Ipv4Net,
    router: Ipv4Addr,
    allocated: BTreeMap<Ipv4Addr, Owner>,
    last: Option<Ipv4Addr>,
}

impl Ipam {
    /// Opens (creating if needed) the allocator for `cidr` under `state_dir`
    /// and loads its allocations.
    ///
    /// # Errors
    ///
    /// [`IpamError::Io`] when the directory cannot be created or read,
    /// [`IpamError::TooSmall`] for a CIDR without pod addresses.
    pub fn open(state_dir: &Path, cidr: Ipv4Net) -> Result<Self, IpamError> {
        let cidr = cidr.trunc();
        if cidr.prefix_len() > 29 {
            return Err(IpamError::TooSmall(cidr));
        }
        let dir = state_dir
            .join("ipam")
            .join(cidr.to_string().replace('/', "_"));
        fs::create_dir_all(&dir).map_err(|source| IpamError::Io {
            path: dir.clone(),
            op: "create directory",
            source,
        })?;
        let router = first_host(cidr);
        let mut allocated = BTreeMap::new();
        let entries = fs::read_dir(&dir).map_err(|source| IpamError::Io {
            path: dir.clone(),
            op: "list",
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| IpamError::Io {
                path: dir.clone(),
                op: "list",
                source,
            })?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let path = entry.path();
            let text = fs::read_to_string(&path).map_err(|source| IpamError::Io {
                path: path.clone(),
                op: "read",
                source,
            })?;
            // An unreadable owner still holds its address: never hand it out.
            let owner = Owner::decode(&text).unwrap_or(Owner {
                container_id: String::new(),
                ifname: String::new(),
            });
            allocated.insert(ip, owner);
        }
        let last = fs::read_to_string(dir.join(LAST_RESERVED))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|ip| cidr.contains(ip));
        Ok(Self {
            dir,
            cidr,
            router,
            allocated,
            last,
        })
    }

    /// The router (gateway) address of the pods: the first host address.
    pub fn router(&self) -> Ipv4Addr {
        self.router
    }

    /// The CIDR.
    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The address held by `owner`, if any.
    pub fn lookup(&self, owner: &Owner) -> Option<Ipv4Addr> {
        self.allocated
            .iter()
            .find_map(|(ip, o)| (o == owner).then_some(*ip))
    }

    /// Every allocation.
    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &Owner)> {
        self.allocated.iter().map(|(ip, o)| (*ip, o))
    }

    /// Allocates an address for `owner`; returns the one it already holds
    /// if any (a retried ADD).
    ///
    /// # Errors
    ///
    /// [`IpamError::Exhausted`] when no address is free, [`IpamError::Io`]
    /// when the allocation cannot be persisted.
    pub fn allocate(&mut self, owner: &Owner) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = self.lookup(owner) {
            return Ok(ip);
        }
        let first = u32::from(self.router) + 1;
        let last = u32::from(self.cidr.broadcast()) - 1;
        let size = last - first + 1;
        let start = self
            .last
            .map(u32::from)
            .filter(|l| (first..=last).contains(l))
            .map_or(first, |l| if l == last { first } else { l + 1 });
        for i in 0..size {
            let candidate = Ipv4Addr::from(first + (start - first + i) % size);
            if self.allocated.contains_key(&candidate) {
                continue;
            }
            if self.persist(candidate, owner)? {
                self.allocated.insert(candidate, owner.clone());
                self.last = Some(candidate);
                self.write_last(candidate)?;
                return Ok(candidate);
            }
            // Another writer created the file first: respect it.
            self.allocated.insert(
                candidate,
                Owner {
                    container_id: String::new(),
                    ifname: String::new(),
                },
            );
        }
        Err(IpamError::Exhausted {
            cidr: self.cidr,
            allocated: self.allocated.len(),
        })
    }

    /// Releases what `owner` holds; `Ok(None)` when it held nothing (a
    /// repeated DEL).
    ///
    /// # Errors
    ///
    /// [`IpamError::Io`] when the allocation file cannot be removed.
    pub fn release(&mut self, owner: &Owner) -> Result<Option<Ipv4Addr>, IpamError> {
        let Some(ip) = self.lookup(owner) else {
            return Ok(None);
        };
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IpamError::Io {
                    path,
                    op: "remove",
                    source,
                })
            }
        }
        self.allocated.remove(&ip);
        Ok(Some(ip))
    }

    /// Creates `<dir>/<ip>` with `owner` atomically; `Ok(false)` if it exists.
    fn persist(&self, ip: Ipv4Addr, owner: &Owner) -> Result<bool, IpamError> {
        let target = self.dir.join(ip.to_string());
        let tmp = self.dir.join(format!(".tmp-{ip}-{}", std::process::id()));
        let io_err = |path: &Path, op| {
            let path = path.to_owned();
            move |source| IpamError::Io { path, op, source }
        };
        {
            let mut f = fs::File::create(&tmp).map_err(io_err(&tmp, "create"))?;
            f.write_all(owner.encode().as_bytes())
                .map_err(io_err(&tmp, "write"))?;
            f.sync_all().map_err(io_err(&tmp, "sync"))?;
        }
        let linked = match fs::hard_link(&tmp, &target) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                return Err(IpamError::Io {
                    path: target,
                    op: "link",
                    source,
                });
            }
        };
        fs::remove_file(&tmp).map_err(io_err(&tmp, "remove"))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir, "sync directory"))?;
        Ok(linked)
    }

    fn write_last(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(LAST_RESERVED);
        let tmp = self.dir.join(format!(".{LAST_RESERVED}.tmp"));
        fs::write(&tmp, ip.to_string())
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| IpamError::Io {
                path,
                op: "write",
                source,
            })
    }
}

/// The first host address of `cidr` (network address + 1).
pub fn first_host(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(c: &str) -> Owner {
        Owner {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn allocates_skipping_network_router_and_broadcast() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), "10.1.1.0/29".parse().unwrap()).unwrap();
        assert_eq!(ipam.router(), Ipv4Addr::new(10, 1, 1, 1));
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&owner(&format!("c{i}"))).unwrap())
            .collect();
        assert_eq!(
            got,
            (2..=6)
                .map(|d| Ipv4Addr::new(10, 1, 1, d))
                .collect::<Vec<_>>()
        );
        let err = ipam.allocate(&owner("c9")).unwrap_err();
        assert!(
            matches!(err, IpamError::Exhausted { allocated: 5, .. }),
            "{err}"
        );
    }

    #[test]
    fn add_is_idempotent_and_del_twice_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), "10.1.1.0/24".parse().unwrap()).unwrap();
        let a = ipam.allocate(&owner("a")).unwrap();
        assert_eq!(ipam.allocate(&owner("a")).unwrap(), a);
        assert_eq!(ipam.release(&owner("a")).unwrap(), Some(a));
        assert_eq!(ipam.release(&owner("a")).unwrap(), None);
    }

    #[test]
    fn a_restarted_allocator_never_hands_out_an_address_twice() {
        let dir = tempfile::tempdir().unwrap();
        let cidr: Ipv4Net = "10.1.1.0/28".parse().unwrap();
        let mut first = Ipam::open(dir.path(), cidr).unwrap();
        let a = first.allocate(&owner("a")).unwrap();
        let b = first.allocate(&owner("b")).unwrap();
        first.release(&owner("a")).unwrap();
        drop(first);

        let mut second = Ipam::open(dir.path(), cidr).unwrap();
        assert_eq!(second.lookup(&owner("b")), Some(b));
        assert_eq!(second.lookup(&owner("a")), None);
        // Round-robin continues after b: neither b (held) nor a (just
        // released) comes next.
        let c = second.allocate(&owner("c")).unwrap();
        assert_ne!(c, b);
        assert_ne!(c, a);
        assert_eq!(u32::from(c), u32::from(b) + 1);
        // Every address of the CIDR once: no duplicates ever.
        let mut seen = vec![b, c];
        while let Ok(ip) = second.allocate(&owner(&format!("x{}", seen.len()))) {
            assert!(!seen.contains(&ip), "{ip} handed out twice");
            seen.push(ip);
        }
        assert_eq!(seen.len(), 16 - 3);
    }

    #[test]
    fn a_foreign_or_corrupt_file_still_holds_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let cidr: Ipv4Net = "10.1.1.0/29".parse().unwrap();
        let sub = dir.path().join("ipam").join("10.1.1.0_29");
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join("10.1.1.2"), "").unwrap();
        let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
        assert_eq!(
            ipam.allocate(&owner("a")).unwrap(),
            Ipv4Addr::new(10, 1, 1, 3)
        );
    }
}
