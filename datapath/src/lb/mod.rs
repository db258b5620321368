//! Service load balancing: the typed writer of the `services`, `backends` and
//! `maglev` maps, and the mirror of the datapath's flow hash.
//!
//! [`LoadBalancer`] is the one writer per node (the agent holds it; it is
//! not `Clone`). [`LoadBalancer::set_service`] takes the *whole* desired state
//! of one frontend (its backends with their cluster, state, weight and
//! preference) and makes the maps say exactly that, in an order that never
//! shows a packet a half-written service:
//!
//! 1. new and changed backends are written to `backends` (fresh ids);
//! 2. if the set of table members changed, a new Maglev table is built
//!    ([`crate::maglev`]) and written into a *free* table of the `maglev`
//!    array; an unchanged set reuses the table (no build, no write);
//! 3. the `services` entry is replaced in one map update: from the next
//!    packet on, the new table and backend count are used;
//! 4. the old table is freed, and backends no longer wanted are deleted.
//!
//! The order is computed before anything is written: `lb/book.rs` plans the
//! steps from what the writer knows of the maps, and records each one the
//! kernel took, so a failed write leaves a record that says what the maps
//! hold (its unit tests run every plan against a model of the maps and fail
//! it at every step).
//!
//! # What goes into the table
//!
//! Only [`BackendState::Active`] backends take new flows. If any active
//! backend is `preferred`, only the preferred ones are in the table and the
//! others are kept as fallback: this is how `affinity` is applied (the agent
//! marks local backends preferred for `affinity=local`, remote ones for
//! `remote`, none for `none`), the way Cilium does it. Non-members stay in
//! `backends`, so flows already pinned to them in conntrack continue
//! ([`BackendState::Terminating`] likewise); a
//! [`BackendState::Quarantined`] backend's flows are re-balanced.
//!
//! # Ids
//!
//! Service ids are stable per frontend while it exists. Backend ids belong to
//! one service and are not reused while this writer lives (and are allocated
//! above every id found in the maps when it is opened), so a conntrack entry
//! naming a backend that was deleted, or that belongs to another service, is
//! recognised by the datapath and the flow is balanced again.
//!
//! # Restarts
//!
//! [`LoadBalancer::open`] adopts what the pinned maps hold (services, their
//! backends and table numbers) and deletes backends of no service (left by a
//! writer that died between steps). Weights and preferences are not stored in
//! the kernel, so the first `set_service` of an adopted service rebuilds its
//! table once; it is identical if the backend set is (Maglev is
//! deterministic), so no flow moves.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    path::Path,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};

use crate::{
    abi::{
        BackendValue, DatapathConfig, ServiceKey, ServiceValue, BACKEND_STATE_ACTIVE,
        BACKEND_STATE_QUARANTINED, BACKEND_STATE_TERMINATING, FLOW_HASH_SEED, MAGLEV_NO_TABLE,
        SERVICE_F_AFFINITY_LOCAL, SERVICE_F_AFFINITY_REMOTE, SERVICE_F_GLOBAL, SERVICE_F_SHARED,
    },
    maglev::{self, BackendKey, Table, TableSize},
    maps::{self, addr_bytes, bytes_addr, is_not_found},
};

use book::{Book, Plan, ServiceState, Step};

mod book;
#[cfg(test)]
mod tests;

pub use crate::maglev::Protocol;

const SERVICES: &str = "services";
const BACKENDS: &str = "backends";
const MAGLEV: &str = "maglev";
const CONFIG: &str = "dp_config";

/// Errors of the load balancer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pinned map could not be opened or a map operation failed.
    #[error(transparent)]
    Map(#[from] maps::Error),
    /// The datapath was loaded without a Maglev table size.
    #[error("the datapath under {path} has no maglev table size configured (load it first)")]
    NotConfigured { path: std::path::PathBuf },
    /// A backend's address family differs from the frontend's (no NAT46).
    #[error("backend {backend} of frontend {frontend} is not of the frontend's address family")]
    FamilyMismatch {
        frontend: Frontend,
        backend: SocketAddr,
    },
    /// Port 0 in a frontend or backend.
    #[error("port 0 in {addr} (frontend {frontend})")]
    ZeroPort {
        frontend: Frontend,
        addr: SocketAddr,
    },
    /// The backend set is not valid for a Maglev table.
    #[error("invalid backend set for frontend {frontend}")]
    Maglev {
        frontend: Frontend,
        #[source]
        source: maglev::Error,
    },
    /// Every Maglev table is in use.
    #[error("all {tables} maglev tables are in use (load the datapath with more tables)")]
    TablesExhausted { tables: u32 },
    /// The 32-bit id space is used up.
    #[error("no free {what} id")]
    IdsExhausted { what: &'static str },
}

/// A service frontend: the address and port clients connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// Frontend IP (a cluster IP) and port.
    pub addr: SocketAddr,
    /// Transport protocol (backends use the same).
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

/// How a backend takes part (`BACKEND_STATE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendState {
    /// Takes new flows.
    #[default]
    Active,
    /// Takes no new flows; flows already pinned to it stay (draining).
    Terminating,
    /// Takes no flows; flows pinned to it are balanced again.
    Quarantined,
}

impl BackendState {
    const fn code(self) -> u8 {
        match self {
            Self::Active => BACKEND_STATE_ACTIVE,
            Self::Terminating => BACKEND_STATE_TERMINATING,
            Self::Quarantined => BACKEND_STATE_QUARANTINED,
        }
    }

    const fn from_code(code: u8) -> Self {
        match code {
            BACKEND_STATE_ACTIVE => Self::Active,
            BACKEND_STATE_TERMINATING => Self::Terminating,
            _ => Self::Quarantined,
        }
    }
}

/// One backend of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Backend (pod) IP and target port.
    pub addr: SocketAddr,
    /// Cluster the backend runs in.
    pub cluster_id: u16,
    /// Whether it takes new flows.
    pub state: BackendState,
    /// Relative weight in the Maglev table, at least 1.
    pub weight: u32,
    /// Affinity: when any active backend is preferred, only preferred ones
    /// take new flows (see the module docs).
    pub preferred: bool,
}

impl Backend {
    /// An active backend of weight 1, not preferred.
    pub const fn new(addr: SocketAddr, cluster_id: u16) -> Self {
        Self {
            addr,
            cluster_id,
            state: BackendState::Active,
            weight: 1,
            preferred: false,
        }
    }
}

crate::flags::flag_set! {
    /// Service flags (`SERVICE_F_*`). The datapath does not act on them (the
    /// table contents carry affinity); they are stored so the maps say what
    /// the service is, e.g. for `meshctl`.
    pub struct ServiceFlags;
    /// `affinity: local`.
    AFFINITY_LOCAL = SERVICE_F_AFFINITY_LOCAL;
    /// `affinity: remote`.
    AFFINITY_REMOTE = SERVICE_F_AFFINITY_REMOTE;
    /// `shared` (exported to other clusters).
    SHARED = SERVICE_F_SHARED;
    /// `global`.
    GLOBAL = SERVICE_F_GLOBAL;
}

/// What [`LoadBalancer::set_service`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceUpdate {
    /// The service's id (stable while the frontend exists).
    pub service_id: u32,
    /// Backends in the Maglev table now (0: packets to the frontend drop).
    pub table_members: usize,
    /// Whether a Maglev table was built and written (false: members unchanged).
    pub table_rebuilt: bool,
    /// Backends newly written.
    pub backends_added: usize,
    /// Backends deleted.
    pub backends_removed: usize,
}

/// A service as the load balancer holds it.
#[derive(Debug, Clone)]
pub struct ServiceView<'a> {
    /// The service id.
    pub service_id: u32,
    /// Its flags.
    pub flags: ServiceFlags,
    /// Every backend with its id, in key order.
    pub backends: Vec<(u32, Backend)>,
    /// The Maglev table in use, if one was built by this writer.
    pub table: Option<&'a Table>,
}

/// The writer of the services, backends and Maglev maps of one node.
pub struct LoadBalancer {
    services_map: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends_map: BpfHashMap<MapData, u32, BackendValue>,
    maglev_map: Array<MapData, u32>,
    book: Book,
}

impl fmt::Debug for LoadBalancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadBalancer")
            .field("table_size", &self.book.size)
            .field("tables", &self.book.tables)
            .field("free_tables", &self.book.free_tables.len())
            .field("services", &self.book.services)
            .finish_non_exhaustive()
    }
}

fn op_error(
    name: &'static str,
    op: &'static str,
    key: impl fmt::Display,
    source: MapError,
) -> Error {
    Error::Map(maps::Error::Op {
        name,
        op,
        key: key.to_string(),
        source: Box::new(source),
    })
}

fn service_key(f: &Frontend) -> ServiceKey {
    let (family, addr) = addr_bytes(f.addr.ip());
    ServiceKey {
        addr,
        port: f.addr.port().to_be(),
        proto: f.proto.number(),
        family,
    }
}

fn frontend_of(k: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: SocketAddr::new(bytes_addr(k.family, k.addr)?, u16::from_be(k.port)),
        proto: Protocol::from_number(k.proto)?,
    })
}

fn backend_value(key: &BackendKey, b: &Backend, service_id: u32) -> BackendValue {
    let (family, addr) = addr_bytes(key.addr.ip());
    BackendValue {
        addr,
        port: key.addr.port().to_be(),
        proto: key.proto.number(),
        family,
        cluster_id: key.cluster_id,
        state: b.state.code(),
        pad: 0,
        service_id,
    }
}

impl LoadBalancer {
    /// Opens the pinned maps under `bpffs_dir` (the datapath must have been
    /// loaded there) and adopts the services they hold.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] when a pin is missing or a map cannot be read,
    /// [`Error::NotConfigured`] when the datapath set no table size.
    pub fn open(bpffs_dir: &Path) -> Result<Self, Error> {
        let config: Array<MapData, DatapathConfig> = maps::open(bpffs_dir, CONFIG)?;
        let config = config
            .get(&0, 0)
            .map_err(|e| op_error(CONFIG, "get", 0, e))?;
        let size = TableSize::new(config.maglev_size).map_err(|_| Error::NotConfigured {
            path: bpffs_dir.to_owned(),
        })?;
        let services_map: BpfHashMap<MapData, ServiceKey, ServiceValue> =
            maps::open(bpffs_dir, SERVICES)?;
        let mut backends_map: BpfHashMap<MapData, u32, BackendValue> =
            maps::open(bpffs_dir, BACKENDS)?;
        let maglev_map: Array<MapData, u32> = maps::open(bpffs_dir, MAGLEV)?;
        let tables = maglev_map.len() / size.get();

        let mut services = HashMap::new();
        let mut by_id = HashMap::new();
        for item in services_map.iter() {
            let (key, value) = item.map_err(|e| op_error(SERVICES, "iterate", "", e))?;
            let frontend = frontend_of(&key).ok_or(maps::Error::MalformedKey {
                name: SERVICES,
                family: key.family,
                prefixlen: 0,
            })?;
            by_id.insert(value.service_id, frontend);
            services.insert(
                frontend,
                ServiceState {
                    id: value.service_id,
                    flags: ServiceFlags::from_bits(value.flags),
                    backends: BTreeMap::new(),
                    maglev_id: (value.maglev_id != MAGLEV_NO_TABLE && value.maglev_id < tables)
                        .then_some(value.maglev_id),
                    table: None,
                    written: Some(value),
                },
            );
        }
        let mut orphans = Vec::new();
        for item in backends_map.iter() {
            let (id, v) = item.map_err(|e| op_error(BACKENDS, "iterate", "", e))?;
            let state = by_id
                .get(&v.service_id)
                .and_then(|f| services.get_mut(f).map(|s| (f, s)));
            let (Some((frontend, state)), Some(ip)) = (state, bytes_addr(v.family, v.addr)) else {
                orphans.push(id);
                continue;
            };
            let addr = SocketAddr::new(ip, u16::from_be(v.port));
            let key = BackendKey {
                cluster_id: v.cluster_id,
                addr,
                proto: frontend.proto,
            };
            let backend = Backend {
                state: BackendState::from_code(v.state),
                ..Backend::new(addr, v.cluster_id)
            };
            state.backends.insert(key, (id, backend));
        }
        for id in orphans {
            remove_backend(&mut backends_map, id)?;
        }
        let book = Book::new(size, tables, services);
        tracing::debug!(
            services = book.services.len(),
            backends = book.backend_ids.len(),
            "load balancer adopted the pinned maps"
        );
        Ok(Self {
            services_map,
            backends_map,
            maglev_map,
            book,
        })
    }

    /// Slots per Maglev table.
    pub fn table_size(&self) -> TableSize {
        self.book.size
    }

    /// Makes the maps hold exactly this service: `backends` is the full
    /// desired set (any order). See the module docs for the write order and
    /// for how state, weight and `preferred` decide the table.
    ///
    /// # Errors
    ///
    /// [`Error::FamilyMismatch`], [`Error::ZeroPort`] and [`Error::Maglev`]
    /// (duplicate backend, zero weight, more backends than slots) for a bad
    /// request, and [`Error::TablesExhausted`] or [`Error::IdsExhausted`]
    /// when the maps cannot take it, before anything is written;
    /// [`Error::Map`] when a write fails. After a map error packets still see
    /// a consistent service (the old one, or the new one with surplus
    /// backends); call again to finish.
    pub fn set_service(
        &mut self,
        frontend: Frontend,
        flags: ServiceFlags,
        backends: &[Backend],
    ) -> Result<ServiceUpdate, Error> {
        let mut plan = self.book.plan(frontend, flags, backends)?;
        self.book.begin(&plan);
        let steps = std::mem::take(&mut plan.steps);
        for step in &steps {
            self.perform(&plan, step)?;
            self.book.record(&mut plan, step);
        }
        let update = self.book.finish(&plan, &steps);
        tracing::debug!(
            %frontend,
            service_id = update.service_id,
            members = update.table_members,
            rebuilt = update.table_rebuilt,
            added = update.backends_added,
            removed = update.backends_removed,
            "service written"
        );
        Ok(update)
    }

    /// Makes one map write of `plan`.
    fn perform(&mut self, plan: &Plan, step: &Step) -> Result<(), Error> {
        match step {
            Step::PutBackend {
                id, key, backend, ..
            } => self
                .backends_map
                .insert(id, backend_value(key, backend, plan.service_id), 0)
                .map_err(|e| op_error(BACKENDS, "insert", key, e)),
            Step::WriteTable { slot, ids } => {
                let base = slot * self.book.size.get();
                for (index, &id) in (base..).zip(ids) {
                    self.maglev_map
                        .set(index, id, 0)
                        .map_err(|e| op_error(MAGLEV, "set", index, e))?;
                }
                Ok(())
            }
            Step::PutService(value) => self
                .services_map
                .insert(service_key(&plan.frontend), value, 0)
                .map_err(|e| op_error(SERVICES, "insert", plan.frontend, e)),
            Step::DeleteBackend { id, .. } => remove_backend(&mut self.backends_map, *id),
        }
    }

    /// Removes a service: its entry first (new packets to the frontend are
    /// no longer translated), then its backends and table. Conntrack entries
    /// age out of the LRU map. `Ok(false)` when there was no such service.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] when a map operation fails.
    pub fn remove_service(&mut self, frontend: Frontend) -> Result<bool, Error> {
        let Some(state) = self.book.services.get_mut(&frontend) else {
            return Ok(false);
        };
        match self.services_map.remove(&service_key(&frontend)) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(op_error(SERVICES, "remove", frontend, e)),
        }
        state.written = None;
        let backends: Vec<(BackendKey, u32)> = state
            .backends
            .iter()
            .map(|(k, (id, _))| (*k, *id))
            .collect();
        for (key, id) in backends {
            remove_backend(&mut self.backends_map, id)?;
            self.book.forget_backend(&frontend, &key);
        }
        self.book.forget(&frontend);
        Ok(true)
    }

    /// One service.
    pub fn service(&self, frontend: &Frontend) -> Option<ServiceView<'_>> {
        self.book.services.get(frontend).map(view)
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = (Frontend, ServiceView<'_>)> + '_ {
        self.book.services.iter().map(|(f, s)| (*f, view(s)))
    }

    /// The backend the datapath picks for a *new* flow from `client` to
    /// `frontend` (existing flows keep theirs), from the table this writer
    /// built; `None` without one.
    pub fn backend_for(&self, frontend: &Frontend, client: SocketAddr) -> Option<BackendKey> {
        let table = self.book.services.get(frontend)?.table.as_ref()?;
        table
            .lookup(flow_hash(client, frontend.addr, frontend.proto))
            .copied()
    }
}

fn view(s: &ServiceState) -> ServiceView<'_> {
    ServiceView {
        service_id: s.id,
        flags: s.flags,
        backends: s.backends.values().copied().collect(),
        table: s.table.as_ref().filter(|t| !t.members().is_empty()),
    }
}

fn remove_backend(map: &mut BpfHashMap<MapData, u32, BackendValue>, id: u32) -> Result<(), Error> {
    match map.remove(&id) {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(op_error(BACKENDS, "remove", id, e)),
    }
}

fn murmur_step(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// The IPv4 service loopback address: the source `from_pod` gives a pod's
/// packet to its own service when the backend chosen is the pod itself
/// (hairpin), as Cilium's `--ipv4-service-loopback-address` (`service_loopback`
/// in `bpf/datapath.c`). Replies to it are translated back in `from_pod`.
pub const SERVICE_LOOPBACK_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 42, 1);

/// The IPv6 service loopback address: `fe80::1`, the pods' IPv6 gateway
/// (as Cilium's `--ipv6-service-loopback-address`); see [`SERVICE_LOOPBACK_V4`].
pub const SERVICE_LOOPBACK_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The flow hash `from_pod` computes to pick a Maglev slot (`flow_hash` in
/// `bpf/datapath.c`, defined at `FLOW_HASH_SEED` in `bpf/datapath.h`): the
/// slot of a new flow from `src` to `dst` is `flow_hash(..) % M`. Words are
/// read in native byte order, as the program does on this host.
pub fn flow_hash(src: SocketAddr, dst: SocketAddr, proto: Protocol) -> u32 {
    let (family, saddr) = addr_bytes(src.ip());
    let (_, daddr) = addr_bytes(dst.ip());
    let mut h = FLOW_HASH_SEED;
    for chunk in saddr.chunks_exact(4).chain(daddr.chunks_exact(4)) {
        h = murmur_step(h, u32::from_ne_bytes(chunk.try_into().expect("4 bytes")));
    }
    let (sp, dp) = (src.port().to_be_bytes(), dst.port().to_be_bytes());
    h = murmur_step(h, u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]));
    h = murmur_step(h, u32::from(proto.number()) | (u32::from(family) << 8));
    h ^= 40;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
