//! What the load balancer knows of its maps, and the plan of one update.
//!
//! [`Book`] is the writer's record of the `services`, `backends` and `maglev`
//! maps (services, their backend ids, which Maglev tables are free) without
//! the maps themselves, so the order of an update is computed, and tested,
//! without a kernel: [`Book::plan`] turns the desired state of one frontend
//! into [`Step`]s; [`super::LoadBalancer::set_service`] performs them one by
//! one and calls [`Book::record`] after each one the kernel took. A step that
//! fails leaves the book saying exactly what the maps hold, and the next plan
//! starts from there.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{Backend, BackendState, Error, Frontend, ServiceFlags, ServiceUpdate};
use crate::{
    abi::{ServiceValue, MAGLEV_NO_TABLE},
    maglev::{self, BackendKey, Member, Table, TableSize},
};

/// One service as the writer knows it.
#[derive(Debug)]
pub(super) struct ServiceState {
    pub(super) id: u32,
    pub(super) flags: ServiceFlags,
    pub(super) backends: BTreeMap<BackendKey, (u32, Backend)>,
    /// The table number in use (`None`: no table).
    pub(super) maglev_id: Option<u32>,
    /// The content of that table, when this writer built it.
    pub(super) table: Option<Table>,
    /// The `services` value last written (`None`: not in the kernel yet).
    pub(super) written: Option<ServiceValue>,
}

/// An id space: ids are handed out upwards from `next`, never 0, and not
/// reused while claimed.
#[derive(Debug)]
pub(super) struct Ids {
    what: &'static str,
    next: u32,
    used: HashSet<u32>,
}

impl Ids {
    /// The space with `used` claimed; new ids start above the largest.
    pub(super) fn new(what: &'static str, used: HashSet<u32>) -> Self {
        let next = used.iter().max().map_or(1, |m| m.wrapping_add(1));
        Self { what, next, used }
    }

    /// The `n` ids the next `n` claims take, in order, without claiming them.
    pub(super) fn peek(&self, n: usize) -> Result<Vec<u32>, Error> {
        let mut ids = Vec::with_capacity(n);
        let mut next = self.next;
        // Among `used + n` consecutive candidates at least `n` are free.
        for _ in 0..self.used.len() + n {
            if ids.len() == n {
                break;
            }
            let id = next.max(1);
            next = id.wrapping_add(1);
            if !self.used.contains(&id) {
                ids.push(id);
            }
        }
        if ids.len() < n {
            return Err(Error::IdsExhausted { what: self.what });
        }
        Ok(ids)
    }

    fn claim(&mut self, id: u32) {
        self.used.insert(id);
        self.next = id.wrapping_add(1);
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }

    pub(super) fn len(&self) -> usize {
        self.used.len()
    }
}

/// One map write of a service update. A plan's steps come in this order:
/// every `PutBackend`, at most one `WriteTable`, at most one `PutService`,
/// then every `DeleteBackend`; so a packet sees the old service or the new
/// one, never a table naming a backend that is not there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Write a backend: `new` for a fresh id, else its state changed.
    PutBackend {
        id: u32,
        key: BackendKey,
        backend: Backend,
        new: bool,
    },
    /// Fill the free table `slot`: the backend id of each of its slots.
    WriteTable { slot: u32, ids: Vec<u32> },
    /// Replace the service entry: from the next packet on it is used.
    PutService(ServiceValue),
    /// Delete a backend no longer wanted.
    DeleteBackend { id: u32, key: BackendKey },
}

/// The steps that make the maps hold one frontend's desired state.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) frontend: Frontend,
    pub(super) service_id: u32,
    pub(super) steps: Vec<Step>,
    flags: ServiceFlags,
    /// The service id is claimed by this plan.
    new_service: bool,
    /// Weight or preference changes: nothing the kernel stores.
    reweighed: Vec<(BackendKey, u32, Backend)>,
    /// The table `WriteTable` writes; installed when `PutService` lands.
    table: Option<Table>,
    members: usize,
}

/// The writer's record of the maps.
#[derive(Debug)]
pub(super) struct Book {
    pub(super) size: TableSize,
    pub(super) tables: u32,
    pub(super) services: HashMap<Frontend, ServiceState>,
    pub(super) free_tables: BTreeSet<u32>,
    pub(super) backend_ids: Ids,
    pub(super) service_ids: Ids,
}

impl Book {
    /// The record of maps with `tables` tables of `size` slots holding
    /// `services` (adopted from pins, or none).
    pub(super) fn new(
        size: TableSize,
        tables: u32,
        services: HashMap<Frontend, ServiceState>,
    ) -> Self {
        let used_tables: HashSet<u32> = services.values().filter_map(|s| s.maglev_id).collect();
        let backend_ids = services
            .values()
            .flat_map(|s| s.backends.values().map(|(id, _)| *id))
            .collect();
        let service_ids = services.values().map(|s| s.id).collect();
        Self {
            size,
            tables,
            free_tables: (0..tables).filter(|t| !used_tables.contains(t)).collect(),
            services,
            backend_ids: Ids::new("backend", backend_ids),
            service_ids: Ids::new("service", service_ids),
        }
    }

    /// The steps that make the maps hold exactly this service. A bad request
    /// or a full table array fails here, before anything is written.
    pub(super) fn plan(
        &self,
        frontend: Frontend,
        flags: ServiceFlags,
        backends: &[Backend],
    ) -> Result<Plan, Error> {
        let desired = validate(&frontend, backends)?;
        let members = table_members(&desired);
        let current = self.services.get(&frontend);
        let unchanged = current.is_some_and(|s| {
            s.table.as_ref().map(Table::members) == Some(&members[..])
                && (s.maglev_id.is_some() || members.is_empty())
        });
        let table = if unchanged || members.is_empty() {
            None
        } else {
            Some(
                maglev::build(self.size, &members)
                    .map_err(|source| Error::Maglev { frontend, source })?,
            )
        };
        let slot = match table {
            Some(_) => Some(*self.free_tables.first().ok_or(Error::TablesExhausted {
                tables: self.tables,
            })?),
            None => None,
        };
        let (service_id, new_service) = match current {
            Some(s) => (s.id, false),
            None => (self.service_ids.peek(1)?[0], true),
        };

        // 1. Backends: new ones get ids, changed ones are rewritten.
        let known = |key: &BackendKey| current.and_then(|s| s.backends.get(key).copied());
        let fresh = desired.keys().filter(|k| known(k).is_none()).count();
        let mut fresh = self.backend_ids.peek(fresh)?.into_iter();
        let mut steps = Vec::new();
        let mut reweighed = Vec::new();
        let mut ids = HashMap::with_capacity(desired.len());
        for (&key, &backend) in &desired {
            let id = match known(&key) {
                Some((id, old)) if old == backend => id,
                Some((id, old)) if old.state == backend.state => {
                    reweighed.push((key, id, backend));
                    id
                }
                Some((id, _)) => {
                    steps.push(Step::PutBackend {
                        id,
                        key,
                        backend,
                        new: false,
                    });
                    id
                }
                None => {
                    let id = fresh
                        .next()
                        .ok_or(Error::IdsExhausted { what: "backend" })?;
                    steps.push(Step::PutBackend {
                        id,
                        key,
                        backend,
                        new: true,
                    });
                    id
                }
            };
            ids.insert(key, id);
        }

        // 2. The table, into a free slot of the maglev array.
        let maglev_id = match (slot, &table) {
            (Some(slot), Some(table)) => {
                // Members are drawn from `desired`, so each has an id.
                let member_ids: Vec<u32> = table.members().iter().map(|m| ids[&m.key]).collect();
                let ids = table
                    .slots()
                    .iter()
                    .map(|&m| member_ids[m as usize])
                    .collect();
                steps.push(Step::WriteTable { slot, ids });
                Some(slot)
            }
            _ if members.is_empty() => None,
            _ => current.and_then(|s| s.maglev_id),
        };

        // 3. The service entry: one update switches packets over.
        let value = ServiceValue {
            service_id,
            backend_count: members.len() as u32,
            maglev_id: maglev_id.unwrap_or(MAGLEV_NO_TABLE),
            flags: flags.bits(),
        };
        if table.is_some() || current.and_then(|s| s.written) != Some(value) {
            steps.push(Step::PutService(value));
        }

        // 4. Backends no longer wanted (the old table is freed by step 3).
        if let Some(s) = current {
            steps.extend(
                s.backends
                    .iter()
                    .filter(|(k, _)| !desired.contains_key(k))
                    .map(|(&key, &(id, _))| Step::DeleteBackend { id, key }),
            );
        }
        Ok(Plan {
            frontend,
            service_id,
            steps,
            flags,
            new_service,
            reweighed,
            table,
            members: members.len(),
        })
    }

    /// Records what needs no map write: a new service's id, and weight or
    /// preference changes.
    pub(super) fn begin(&mut self, plan: &Plan) {
        if plan.new_service {
            self.service_ids.claim(plan.service_id);
        }
        let state = self
            .services
            .entry(plan.frontend)
            .or_insert_with(|| ServiceState {
                id: plan.service_id,
                flags: plan.flags,
                backends: BTreeMap::new(),
                maglev_id: None,
                table: None,
                written: None,
            });
        for &(key, id, backend) in &plan.reweighed {
            state.backends.insert(key, (id, backend));
        }
    }

    /// Records that the kernel took `step` of `plan`.
    pub(super) fn record(&mut self, plan: &mut Plan, step: &Step) {
        let Some(state) = self.services.get_mut(&plan.frontend) else {
            return;
        };
        match *step {
            Step::PutBackend {
                id,
                key,
                backend,
                new,
            } => {
                if new {
                    self.backend_ids.claim(id);
                }
                state.backends.insert(key, (id, backend));
            }
            // The slot stays free until the service points at it: a table
            // written but never used is simply overwritten by the next plan.
            Step::WriteTable { .. } => {}
            Step::PutService(value) => {
                state.written = Some(value);
                let maglev_id = (value.maglev_id != MAGLEV_NO_TABLE).then_some(value.maglev_id);
                if state.maglev_id != maglev_id {
                    if let Some(old) = state.maglev_id {
                        self.free_tables.insert(old);
                    }
                    if let Some(new) = maglev_id {
                        self.free_tables.remove(&new);
                    }
                    state.maglev_id = maglev_id;
                }
                if let Some(table) = plan.table.take() {
                    state.table = Some(table);
                }
            }
            Step::DeleteBackend { id, key } => {
                state.backends.remove(&key);
                self.backend_ids.release(id);
            }
        }
    }

    /// Records that every step of `plan` landed.
    pub(super) fn finish(&mut self, plan: &Plan, steps: &[Step]) -> ServiceUpdate {
        if let Some(state) = self.services.get_mut(&plan.frontend) {
            state.flags = plan.flags;
            if plan.members == 0 {
                state.table = Some(Table::default());
            }
        }
        let count = |f: fn(&Step) -> bool| steps.iter().filter(|s| f(s)).count();
        ServiceUpdate {
            service_id: plan.service_id,
            table_members: plan.members,
            table_rebuilt: count(|s| matches!(s, Step::WriteTable { .. })) > 0,
            backends_added: count(|s| matches!(s, Step::PutBackend { new: true, .. })),
            backends_removed: count(|s| matches!(s, Step::DeleteBackend { .. })),
        }
    }

    /// Forgets a service whose entry and backends were removed.
    pub(super) fn forget(&mut self, frontend: &Frontend) {
        let Some(state) = self.services.remove(frontend) else {
            return;
        };
        for (id, _) in state.backends.values() {
            self.backend_ids.release(*id);
        }
        if let Some(t) = state.maglev_id {
            self.free_tables.insert(t);
        }
        self.service_ids.release(state.id);
    }

    /// Records that one backend of a service being removed is gone.
    pub(super) fn forget_backend(&mut self, frontend: &Frontend, key: &BackendKey) {
        if let Some((id, _)) = self
            .services
            .get_mut(frontend)
            .and_then(|s| s.backends.remove(key))
        {
            self.backend_ids.release(id);
        }
    }
}

fn validate(
    frontend: &Frontend,
    backends: &[Backend],
) -> Result<BTreeMap<BackendKey, Backend>, Error> {
    if frontend.addr.port() == 0 {
        return Err(Error::ZeroPort {
            frontend: *frontend,
            addr: frontend.addr,
        });
    }
    let mut desired = BTreeMap::new();
    for b in backends {
        if b.addr.is_ipv4() != frontend.addr.is_ipv4() {
            return Err(Error::FamilyMismatch {
                frontend: *frontend,
                backend: b.addr,
            });
        }
        if b.addr.port() == 0 {
            return Err(Error::ZeroPort {
                frontend: *frontend,
                addr: b.addr,
            });
        }
        let key = BackendKey {
            cluster_id: b.cluster_id,
            addr: b.addr,
            proto: frontend.proto,
        };
        let bad = |source| Error::Maglev {
            frontend: *frontend,
            source,
        };
        if b.weight == 0 {
            return Err(bad(maglev::Error::ZeroWeight(key)));
        }
        if desired.insert(key, *b).is_some() {
            return Err(bad(maglev::Error::DuplicateBackend(key)));
        }
    }
    Ok(desired)
}

/// Active backends, only the preferred ones if any active one is, sorted.
fn table_members(desired: &BTreeMap<BackendKey, Backend>) -> Vec<Member> {
    let active = || {
        desired
            .iter()
            .filter(|(_, b)| b.state == BackendState::Active)
    };
    let any_preferred = active().any(|(_, b)| b.preferred);
    active()
        .filter(|(_, b)| b.preferred || !any_preferred)
        .map(|(k, b)| Member {
            key: *k,
            weight: b.weight,
        })
        .collect()
}
