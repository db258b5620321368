//! The mesh's data plane: eBPF programs in C (`bpf/datapath.c`), compiled by
//! clang from `build.rs`, embedded in this crate, and loaded, attached and fed
//! with aya.
//!
//! # Programs
//!
//! All are `tc` (sched_cls, direct action) programs attached at *ingress*
//! through TCX links:
//!
//! | program | attached to | does |
//! |---|---|---|
//! | `from_pod` | host side of every pod veth | parse Ethernet + IPv4/IPv6; drop if the source IP is not this veth's pod; a reply of a translated flow gets the frontend back as source, a packet to a service frontend gets a backend as destination (see [Services](#services)); destination a local pod → rewrite MACs, decrement TTL, `bpf_redirect_peer` into the pod; ipcache says remote node with a tunnel endpoint → tunnel key (remote = node IP, VNI = source identity) and `bpf_redirect` to the VXLAN device; ipcache flag `ENCRYPT`, no tunnel endpoint (native routing) or unknown (world) → `TC_ACT_OK`, the node's routing table decides |
//! | `from_overlay` | the VXLAN device (external mode) | read the tunnel key, source identity = VNI, deliver to the local pod by destination IP with `bpf_redirect_peer`; unknown pod → drop (`UnknownEndpoint`) |
//! | `from_netdev` | an Ethernet device where natively routed pod traffic arrives | destination a local pod → rewrite MACs, deliver to it; else `TC_ACT_OK` |
//! | `from_l3dev` | an L3 device (WireGuard / TUN) where decrypted traffic arrives | like `from_netdev`, after prepending the Ethernet header a veth needs |
//! | `test_from_overlay` | never attached; only in the test build of the object ([`DatapathOptions::object`]) | `from_overlay`'s delivery code with the VNI and remote taken from `skb->cb[0..2]`, because `BPF_PROG_TEST_RUN` cannot attach tunnel metadata to a test packet |
//!
//! `from_overlay`, `from_netdev` and `from_l3dev` reverse-translate replies
//! of translated flows before delivering to a pod. The places where policy
//! (egress in `from_pod`, ingress before every delivery to a pod) slots in
//! are marked `slot:` in the C source; its map exists and is pinned already.
//!
//! # Maps
//!
//! Pinned by name under the bpffs directory given to
//! [`Datapath::load_or_adopt`]; a restarted loader adopts them and never
//! flushes them. Layouts are in `bpf/datapath.h` and [`abi`].
//!
//! | map | type | key → value | Rust |
//! |---|---|---|---|
//! | `ipcache` | LPM trie | family + IPv4/IPv6 prefix → identity, tunnel endpoint, flags | [`Ipcache`] |
//! | `endpoints` | hash | local pod IP → veth ifindex, pod MAC, gateway MAC, endpoint id, identity | [`Endpoints`] |
//! | `services` | hash | (frontend IP, port, proto) → service id, backend count, Maglev table number, flags | [`LoadBalancer`] |
//! | `backends` | hash | backend id → IP, port, proto, cluster id, state, service id | [`LoadBalancer`] |
//! | `maglev` | array | table `t`, slot `s` at `t × M + s` → backend id | [`LoadBalancer`], [`maglev`] |
//! | `lb_ct` | LRU hash | flow (5-tuple + direction) → backend, or frontend to restore | [`abi::CtKey`] / [`abi::CtValue`] |
//! | `policy` | hash | (endpoint, identity, port, proto, direction) → verdict, counters | [`abi::PolicyKey`] / [`abi::PolicyValue`] |
//! | `dp_config` | array (1 entry) | VXLAN ifindex, trace flag, Maglev table size | [`Datapath::set_trace`], [`Datapath::attach_from_overlay`] |
//! | `events` | ring buffer | drop and trace [`Event`]s | [`Datapath::events`] |
//!
//! Byte order: addresses in keys are network order (IPv4 in the first four
//! bytes, the rest zero); `tunnel_endpoint` is host order because that is what
//! `bpf_tunnel_key.remote_ipv4` takes; ports are network order.
//!
//! # Packet paths
//!
//! * Pod → pod, same node: pod `eth0` → veth → `from_pod` on the host side →
//!   `bpf_redirect_peer` → the other pod's `eth0` ingress. No routing, no
//!   neighbour lookup in the node namespace.
//! * Pod → pod, across nodes (tunnel): `from_pod` sets the tunnel key and
//!   redirects to the VXLAN device, which encapsulates to the remote node
//!   (UDP 4789); there `from_overlay` on the VXLAN device's ingress delivers to
//!   the pod. The inner destination MAC does not matter, because the program
//!   runs before the stack would discard a frame not addressed to the device.
//! * Encrypted or natively routed: `from_pod` returns `TC_ACT_OK`, the node's
//!   routes (set by the agent) send it to the WireGuard device or the underlay;
//!   on the receiving node `from_l3dev` / `from_netdev` delivers it to the pod.
//!
//! # Services
//!
//! A service is a frontend (IP, port, TCP/UDP) with backends (pod IP, port,
//! cluster). The agent writes them through [`LoadBalancer::set_service`]
//! (whole desired state per frontend; write order and affinity in [`lb`]);
//! Maglev tables are built in Rust ([`maglev`]) and are identical on every
//! node for the same backend set.
//!
//! **Forward** (`from_pod`, TCP/UDP with ports, i.e. not a later fragment):
//! `services` lookup on (destination, port, proto). On a hit, `lb_ct` is
//! asked for the flow's `CT_FORWARD` entry (key: the packet as the client
//! sent it); if it names a backend that still exists, belongs to this
//! service and is not quarantined, the flow keeps it. Otherwise the backend
//! is `maglev[maglev_id × M + flow_hash % M]` ([`lb::flow_hash`] is the
//! Rust mirror), and the choice is recorded. A `CT_REVERSE` entry keyed by
//! the reply as the backend will send it (backend → client) records the
//! frontend. The destination address and port are rewritten with
//! `bpf_skb_store_bytes`, the IPv4 header checksum with `bpf_l3_csum_replace`
//! and the TCP/UDP checksum (pseudo header included; IPv6 through
//! `bpf_csum_diff`) with `bpf_l4_csum_replace`. Then the packet takes the
//! normal path with the backend as destination: local backend → its veth,
//! remote → the tunnel (or the kernel for encryption/native routing). A
//! frontend with no usable backend drops with [`DropReason::NoBackend`].
//!
//! **Replies** are translated back on the client's node, wherever they
//! enter it, always before delivery to the client pod: a local backend's
//! reply in `from_pod` on the backend's veth; a remote backend's reply,
//! which leaves the backend's node untranslated (that node has no entry),
//! in `from_overlay` (VXLAN) or `from_netdev` / `from_l3dev` (native
//! routing, WireGuard). The `CT_REVERSE` entry gives the frontend address
//! and port, written as the source with the same checksum updates.
//!
//! **Hairpin**: a pod may reach its own service and be picked as the
//! backend (replicas, health checks). Translated to itself, the packet would
//! carry the pod's own address as source and destination, which the pod's
//! kernel drops as a martian. So, as Cilium does, such a flow is also
//! source-translated to the service loopback address ([`SERVICE_LOOPBACK_V4`]
//! `169.254.42.1`, [`SERVICE_LOOPBACK_V6`] `fe80::1`, the source port kept),
//! and its `CT_REVERSE` entry (flag `CT_F_HAIRPIN`) is keyed by the reply to
//! that address: the pod's reply leaves through its default route (IPv6: its
//! gateway `fe80::1`, which is why that link-local destination is not passed
//! to the stack for TCP/UDP) into `from_pod`, which restores the frontend as
//! source and the pod as destination and delivers it back.
//!
//! **Conntrack** entries have no timeout: the LRU map evicts the least
//! recently used when full (size: [`DatapathOptions::conntrack_entries`],
//! two entries per flow). Every forward packet looks its entry up and
//! recreates a missing reverse entry, so a live flow is never evicted
//! half-way. Limits: no NAT46 (backends have the frontend's family); ICMP
//! errors about a translated flow are not translated; two flows that differ
//! only in the frontend but share client port and backend collide in the
//! reverse direction (as with any DNAT without SNAT).
//!
//! **Why one flat `maglev` array** rather than an array of maps: aya 0.14
//! can create map-in-map, but an inner map's geometry is fixed by the
//! object's template, while the table size is a load-time option here;
//! with one array, the table size is `dp_config.maglev_size`, the array's
//! `max_entries` is set at load ([`DatapathOptions`]), the verifier sees
//! plain array lookups, and a service switches to a freshly written table
//! by one `services` update, with no inner-map file descriptors to manage
//! across restarts. The price is memory allocated up front
//! (`tables × M × 8` bytes: 16 MiB for the default 128 tables of 16381),
//! and a table is written with one syscall per slot.
//!
//! # What the host must look like
//!
//! This crate configures no device, route or sysctl; the node agent (or the
//! lab, or a test) does, and the programs expect exactly this:
//!
//! * **Pods.** A veth pair per pod, host side in the node namespace (any
//!   name), `eth0` in the pod. Pod addresses are host routes: IPv4 `/32`,
//!   IPv6 `/128` (`nodad`). The pod's gateway is link-local and the same for
//!   every pod: `169.254.1.1` and `fe80::1`. Routes in the pod:
//!   `169.254.1.1 dev eth0 scope link`, `default via 169.254.1.1 dev eth0`,
//!   `default via fe80::1 dev eth0`.
//! * **Neighbours: static entries, no ARP/ND from BPF.** At pod setup add
//!   permanent neighbour entries in the pod for both gateways with the MAC of
//!   the host side of the veth (`ip neigh add 169.254.1.1 lladdr HOSTMAC dev eth0
//!   nud permanent`, same for `fe80::1`). The pod then never resolves its
//!   gateway; `from_pod` passes ARP and link-scoped IPv6 (ND) to the stack
//!   untouched, and writes the pod's own MAC as destination when delivering,
//!   so the node namespace needs no neighbour entries for pods. Register the
//!   pod with [`Endpoints::insert`] (both MACs, host-side ifindex) *before*
//!   attaching `from_pod` to its veth.
//! * **MTU.** `bpf_redirect` skips the MTU check, so the pod's `eth0` (and the
//!   host side) must already fit the tunnel: 1450 with VXLAN over a 1500
//!   underlay, 1420 with WireGuard.
//! * **VXLAN.** One device per node in external (collect-metadata) mode:
//!   `ip link add NAME type vxlan external dstport 4789`, up, default MTU
//!   (1450 over 1500). Its name is the agent's choice; [`Datapath::attach_from_overlay`]
//!   records its ifindex for `from_pod`. The tunnel endpoint in the ipcache
//!   is the remote node's IPv4 underlay address.
//! * **Sysctls (node namespace).** None for the tunnel and same-node paths
//!   (packets are redirected, never routed by the node). For native routing
//!   and WireGuard the node routes pod traffic: `net.ipv4.ip_forward=1`,
//!   `net.ipv6.conf.all.forwarding=1`, and `rp_filter=0` on the receiving device.
//!
//! # Restarts
//!
//! Maps are pinned under the caller's bpffs directory and links (TCX) under
//! its `links/` subdirectory, named `PROGRAM:IFINDEX:IFNAME`. A restarted
//! loader adopts the maps, and attaching again replaces the program inside the
//! pinned link atomically (`BPF_LINK_UPDATE`), so traffic never sees a moment
//! without a program. Pins of a device that was deleted and recreated (new
//! ifindex) are replaced.
//!
//! # Adding a map
//!
//! 1. Define the key and value structs in `bpf/datapath.h` with explicit
//!    padding, and the map in `bpf/datapath.c` with
//!    `__uint(pinning, LIBBPF_PIN_BY_NAME)`.
//! 2. Mirror the structs in [`abi`] (`#[repr(C)]`, same field order, add them to
//!    the `pod!` list) and add them to the checks in `tests/layout.rs`.
//! 3. Add the name and sizes to `PINNED_MAPS` in this file (and to
//!    `check_map_entries` if its size comes from [`DatapathOptions`]), so an adopted pin
//!    with another layout is refused instead of misread.
//! 4. Write a typed handle in [`maps`] that opens the pin (see [`Endpoints`]).
//! 5. A changed layout of an existing map is a format change: bump
//!    `DATAPATH_ABI_VERSION` (in the header and in [`abi`]; the loader refuses
//!    pins of another version) and migrate or rename the map.

pub mod abi;
mod attach;
pub mod events;
mod flags;
pub mod lb;
pub mod maglev;
pub mod maps;
pub mod netns;

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::{ProgramError, SchedClassifier},
    Ebpf, EbpfLoader,
};

pub use attach::{AttachOutcome, Error as AttachError, HostDevice};
pub use events::{DropReason, Event, EventKind, EventStream, TracePoint};
pub use lb::{
    Backend, BackendState, Frontend, LoadBalancer, Protocol, ServiceFlags, ServiceUpdate,
    ServiceView, SERVICE_LOOPBACK_V4, SERVICE_LOOPBACK_V6,
};
pub use maps::{Endpoint, Endpoints, Ipcache, IpcacheEntry, IpcacheFlags};

use abi::{DatapathConfig, CONFIG_F_TRACE};

/// The compiled `bpf/datapath.c`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath.o"));

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Pinned maps with their key and value sizes, checked when a pin is adopted.
const PINNED_MAPS: &[(&str, usize, usize)] = &[
    ("maglev", size_of::<u32>(), size_of::<u32>()),
    ("lb_ct", size_of::<abi::CtKey>(), size_of::<abi::CtValue>()),
    (
        "ipcache",
        size_of::<abi::IpcacheKey>(),
        size_of::<abi::IpcacheValue>(),
    ),
    (
        "endpoints",
        size_of::<abi::EndpointKey>(),
        size_of::<abi::EndpointInfo>(),
    ),
    (
        "services",
        size_of::<abi::ServiceKey>(),
        size_of::<abi::ServiceValue>(),
    ),
    ("backends", size_of::<u32>(), size_of::<abi::BackendValue>()),
    (
        "policy",
        size_of::<abi::PolicyKey>(),
        size_of::<abi::PolicyValue>(),
    ),
    ("dp_config", size_of::<u32>(), size_of::<DatapathConfig>()),
];

/// Sizes chosen at load time. They shape pinned maps, so a restarted loader
/// must pass the same values (a pin of another geometry is refused with
/// [`Error::IncompatibleMap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Slots per Maglev table (prime; default 16381).
    pub maglev_table_size: maglev::TableSize,
    /// Maglev tables in the `maglev` array: one per service with backends,
    /// plus one spare so a service can be switched to a new table
    /// atomically. Memory: `tables × size × 8` bytes, allocated at load.
    pub maglev_tables: u32,
    /// Entries of the `lb_ct` LRU map (two per translated flow).
    pub conntrack_entries: u32,
    /// The compiled object to load instead of the embedded one (default
    /// `None`). The tests and benchmarks load the build with the test-only
    /// programs, `$OUT_DIR/datapath_test.o`; the agent never sets it.
    pub object: Option<&'static [u8]>,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            maglev_table_size: maglev::TableSize::default(),
            maglev_tables: 128,
            conntrack_entries: 65_536,
            object: None,
        }
    }
}

impl DatapathOptions {
    fn maglev_entries(&self) -> Result<u32, Error> {
        let size = self.maglev_table_size.get();
        self.maglev_tables
            .checked_mul(size)
            .filter(|_| self.maglev_tables >= 2)
            .ok_or(Error::MaglevGeometry {
                tables: self.maglev_tables,
                size,
            })
    }
}

/// The programs in the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// Host side of a pod's veth.
    FromPod,
    /// The VXLAN device.
    FromOverlay,
    /// An Ethernet device receiving natively routed pod traffic.
    FromNetdev,
    /// An L3 device (WireGuard / TUN) receiving pod traffic.
    FromL3dev,
    /// `from_overlay` for `BPF_PROG_TEST_RUN` (identity and remote in `cb`);
    /// only in the test build of the object ([`DatapathOptions::object`]).
    TestFromOverlay,
}

impl Program {
    /// Every program.
    pub const ALL: [Program; 5] = [
        Self::FromPod,
        Self::FromOverlay,
        Self::FromNetdev,
        Self::FromL3dev,
        Self::TestFromOverlay,
    ];

    /// The function name in the C source (also the kernel's program name).
    pub const fn name(self) -> &'static str {
        match self {
            Self::FromPod => "from_pod",
            Self::FromOverlay => "from_overlay",
            Self::FromNetdev => "from_netdev",
            Self::FromL3dev => "from_l3dev",
            Self::TestFromOverlay => "test_from_overlay",
        }
    }
}

/// Errors of loading and configuring the datapath.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory could not be created or inspected.
    #[error("cannot prepare bpffs directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Mounting bpffs failed (needs CAP_SYS_ADMIN).
    #[error("cannot mount bpffs at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// aya could not load the object or create/adopt its maps.
    #[error("cannot load the datapath object with maps pinned under {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A pinned map exists with another layout than this build's.
    #[error(
        "pinned map {path} has key/value sizes {found_key}/{found_value}, this build expects \
         {want_key}/{want_value}; remove the pin to recreate it (this drops its entries)"
    )]
    IncompatibleMap {
        path: PathBuf,
        want_key: usize,
        want_value: usize,
        found_key: u32,
        found_value: u32,
    },
    /// The pins were written by a loader of another datapath ABI version
    /// (`dp_config.abi_version`): their entries may not mean what this build
    /// reads.
    #[error(
        "the pinned maps under {dir} were written by datapath ABI version {found}, this build \
         is version {want}; remove the pins to start over (this drops their entries)"
    )]
    AbiVersion { dir: PathBuf, want: u32, found: u32 },
    /// A pinned map has another number of entries than the options ask for.
    #[error(
        "pinned map {path} has {found} entries, the options ask for {want}; load with the \
         options it was created with, or remove the pin (this drops its entries)"
    )]
    MapEntries {
        path: PathBuf,
        want: u32,
        found: u32,
    },
    /// The Maglev geometry does not fit a map (fewer than two tables, or
    /// more than `u32::MAX` slots in all).
    #[error(
        "{tables} maglev tables of {size} slots: need at least 2 tables and at most 2^32 slots"
    )]
    MaglevGeometry { tables: u32, size: u32 },
    /// Reading the info of a pinned map failed.
    #[error("cannot inspect pinned map {path}")]
    MapInfo {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The kernel refused a program (verifier log in the source).
    #[error("cannot load program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    /// A map the object must contain is missing or has the wrong type.
    #[error("map {name} is missing from the object or has the wrong type")]
    MissingMap { name: &'static str },
    /// Writing the config map failed.
    #[error("cannot write the datapath config")]
    Config(#[source] Box<aya::maps::MapError>),
    /// A typed map could not be opened.
    #[error(transparent)]
    Map(#[from] maps::Error),
    /// The event stream could not be opened.
    #[error(transparent)]
    Events(#[from] events::Error),
}

/// The loaded programs and the pinned maps of one node.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
}

impl Datapath {
    /// Loads the embedded object with its maps pinned under `bpffs_dir`.
    ///
    /// Mounts bpffs at `bpffs_dir` (in the caller's mount namespace) unless it
    /// already is one. Maps already pinned there are adopted as they are:
    /// their contents are never flushed, so a restarted agent keeps
    /// forwarding with the state its predecessor wrote. The attachable
    /// programs are loaded into the kernel; attach them with the `attach_*`
    /// methods.
    ///
    /// # Errors
    ///
    /// [`Error::Dir`] / [`Error::Mount`] for the directory, [`Error::IncompatibleMap`]
    /// when an adopted pin has another layout, [`Error::Load`] / [`Error::Program`]
    /// when the kernel refuses the object (e.g. no CAP_BPF).
    pub fn load_or_adopt(bpffs_dir: &Path) -> Result<Self, Error> {
        Self::load_or_adopt_with(bpffs_dir, &DatapathOptions::default())
    }

    /// [`Datapath::load_or_adopt`] with explicit map sizes.
    ///
    /// # Errors
    ///
    /// As [`Datapath::load_or_adopt`], plus [`Error::MaglevGeometry`] for
    /// impossible options and [`Error::MapEntries`] when an adopted pin was
    /// created with other sizes.
    pub fn load_or_adopt_with(bpffs_dir: &Path, options: &DatapathOptions) -> Result<Self, Error> {
        let maglev_entries = options.maglev_entries()?;
        ensure_bpffs(bpffs_dir)?;
        check_pinned_maps(bpffs_dir)?;
        check_abi_version(bpffs_dir)?;
        check_map_entries(bpffs_dir, "maglev", maglev_entries)?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs_dir)
            .map_max_entries("maglev", maglev_entries)
            .map_max_entries("lb_ct", options.conntrack_entries)
            .load(options.object.unwrap_or(OBJECT))
            .map_err(|source| Error::Load {
                path: bpffs_dir.to_owned(),
                source: Box::new(source),
            })?;
        let mut dp = Self {
            ebpf,
            dir: bpffs_dir.to_owned(),
        };
        let size = options.maglev_table_size.get();
        dp.update_config(|c| {
            c.maglev_size = size;
            c.abi_version = abi::DATAPATH_ABI_VERSION;
        })?;
        for program in [
            Program::FromPod,
            Program::FromOverlay,
            Program::FromNetdev,
            Program::FromL3dev,
        ] {
            dp.program(program)?;
        }
        tracing::debug!(dir = %bpffs_dir.display(), "datapath loaded");
        Ok(dp)
    }

    /// The bpffs directory holding the pins.
    pub fn bpffs_dir(&self) -> &Path {
        &self.dir
    }

    /// A program, loaded into the kernel on first use (for attaching, or for
    /// `aya::programs::TestRun::test_run` in tests and benchmarks).
    ///
    /// # Errors
    ///
    /// [`Error::Program`] when the verifier refuses it.
    pub fn program(&mut self, program: Program) -> Result<&mut SchedClassifier, Error> {
        let name = program.name();
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::Program {
                name,
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(prog)
    }

    /// The ipcache map.
    ///
    /// # Errors
    ///
    /// [`maps::Error::Open`] when the pin cannot be opened.
    pub fn ipcache(&self) -> Result<Ipcache, Error> {
        Ok(Ipcache::open(&self.dir)?)
    }

    /// The local endpoints map.
    ///
    /// # Errors
    ///
    /// [`maps::Error::Open`] when the pin cannot be opened.
    pub fn endpoints(&self) -> Result<Endpoints, Error> {
        Ok(Endpoints::open(&self.dir)?)
    }

    /// The writer of the services, backends and Maglev maps (one per node:
    /// see [`LoadBalancer`]).
    ///
    /// # Errors
    ///
    /// [`lb::Error`] when the pins cannot be opened or read.
    pub fn load_balancer(&self) -> Result<LoadBalancer, lb::Error> {
        LoadBalancer::open(&self.dir)
    }

    /// An async stream of drop and trace events. Call inside a tokio runtime;
    /// keep one reader per node (the ring buffer's consumer is shared).
    ///
    /// # Errors
    ///
    /// [`events::Error`] when the ring buffer cannot be opened or registered.
    pub fn events(&self) -> Result<EventStream, Error> {
        Ok(EventStream::open(&self.dir)?)
    }

    /// Turns trace events (one per forwarded packet) on or off. Costly: for
    /// debugging and tests.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the config map cannot be written.
    pub fn set_trace(&mut self, on: bool) -> Result<(), Error> {
        self.update_config(|c| {
            if on {
                c.flags |= CONFIG_F_TRACE;
            } else {
                c.flags &= !CONFIG_F_TRACE;
            }
        })
    }

    /// Points `from_pod`'s tunnel path at the VXLAN device with this ifindex
    /// (0: none, tunnelled packets are dropped with `NoOverlay`).
    /// [`Datapath::attach_from_overlay`] does this itself; this is for
    /// `BPF_PROG_TEST_RUN` harnesses that have no device.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the config map cannot be written.
    pub fn set_vxlan_ifindex(&mut self, ifindex: u32) -> Result<(), Error> {
        self.update_config(|c| c.vxlan_ifindex = ifindex)
    }

    /// The current contents of the config map.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when it cannot be read.
    pub fn config(&self) -> Result<DatapathConfig, Error> {
        let map: Array<&MapData, DatapathConfig> = self
            .ebpf
            .map("dp_config")
            .ok_or(Error::MissingMap { name: "dp_config" })?
            .try_into()
            .map_err(|_| Error::MissingMap { name: "dp_config" })?;
        map.get(&0, 0).map_err(|e| Error::Config(Box::new(e)))
    }

    fn update_config(&mut self, f: impl FnOnce(&mut DatapathConfig)) -> Result<(), Error> {
        let mut config = self.config()?;
        f(&mut config);
        let map: &mut Map = self
            .ebpf
            .map_mut("dp_config")
            .ok_or(Error::MissingMap { name: "dp_config" })?;
        let mut map: Array<&mut MapData, DatapathConfig> = map
            .try_into()
            .map_err(|_| Error::MissingMap { name: "dp_config" })?;
        map.set(0, config, 0)
            .map_err(|e| Error::Config(Box::new(e)))
    }
}

/// Mounts bpffs at `dir` unless it already is a bpffs.
fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| Error::Dir {
        path: dir.to_owned(),
        source: std::io::Error::from(e),
    })?;
    if fs.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpffs"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Error::Mount {
        path: dir.to_owned(),
        source,
    })?;
    tracing::info!(dir = %dir.display(), "mounted bpffs");
    Ok(())
}

/// Refuses to adopt a pinned map created with another number of entries.
fn check_map_entries(dir: &Path, name: &str, want: u32) -> Result<(), Error> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(&path).map_err(|source| Error::MapInfo {
        path: path.clone(),
        source: Box::new(source),
    })?;
    if info.max_entries() != want {
        return Err(Error::MapEntries {
            path,
            want,
            found: info.max_entries(),
        });
    }
    Ok(())
}

/// Refuses to adopt a pinned map whose layout differs from this build's.
/// Refuses pins written by a loader of another ABI version (see
/// [`abi::DATAPATH_ABI_VERSION`]); 0 is a loader from before the version was
/// recorded, whose layout is version 2.
fn check_abi_version(dir: &Path) -> Result<(), Error> {
    let path = dir.join("dp_config");
    if !path.exists() {
        return Ok(());
    }
    let map_error = |source| Error::MapInfo {
        path: path.clone(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(&path).map_err(map_error)?;
    let config: Array<MapData, DatapathConfig> =
        Array::try_from(Map::Array(data)).map_err(|source| Error::Config(Box::new(source)))?;
    let found = config
        .get(&0, 0)
        .map_err(|source| Error::Config(Box::new(source)))?
        .abi_version;
    let want = abi::DATAPATH_ABI_VERSION;
    if found == want || (found == 0 && want == 2) {
        Ok(())
    } else {
        Err(Error::AbiVersion {
            dir: dir.to_owned(),
            want,
            found,
        })
    }
}

fn check_pinned_maps(dir: &Path) -> Result<(), Error> {
    for &(name, want_key, want_value) in PINNED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| Error::MapInfo {
            path: path.clone(),
            source: Box::new(source),
        })?;
        if info.key_size() as usize != want_key || info.value_size() as usize != want_value {
            return Err(Error::IncompatibleMap {
                path,
                want_key,
                want_value,
                found_key: info.key_size(),
                found_value: info.value_size(),
            });
        }
    }
    Ok(())
}
