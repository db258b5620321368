//! The order of a service update, without a kernel: [`Book::plan`]'s steps
//! are run against a model of the three maps that reads them as the
//! datapath does, and after every step a new flow must reach either the old
//! backend set or the new one. The maps themselves are exercised as root in
//! `tests/prog_test_run.rs` and `tests/netns.rs`.

use std::collections::{BTreeSet, HashSet};

use super::book::{Ids, Step};
use super::*;

const SIZE: u32 = 13;

fn book(tables: u32) -> Book {
    Book::new(TableSize::new(SIZE).expect("prime"), tables, HashMap::new())
}

fn frontend() -> Frontend {
    Frontend {
        addr: "10.96.0.1:80".parse().expect("address"),
        proto: Protocol::Tcp,
    }
}

fn backend(host: u8) -> Backend {
    Backend::new(SocketAddr::from(([10, 0, 0, host], 8080)), 1)
}

fn backends(hosts: &[u8]) -> Vec<Backend> {
    hosts.iter().copied().map(backend).collect()
}

/// The three maps as the datapath reads them.
#[derive(Debug, Default)]
struct Kernel {
    services: HashMap<Frontend, ServiceValue>,
    backends: HashMap<u32, BackendValue>,
    maglev: HashMap<u32, u32>,
}

impl Kernel {
    fn apply(&mut self, plan: &Plan, step: &Step) {
        match step {
            Step::PutBackend {
                id, key, backend, ..
            } => {
                self.backends
                    .insert(*id, backend_value(key, backend, plan.service_id));
            }
            Step::WriteTable { slot, ids } => {
                for (index, &id) in (slot * SIZE..).zip(ids) {
                    self.maglev.insert(index, id);
                }
            }
            Step::PutService(value) => {
                self.services.insert(plan.frontend, *value);
            }
            Step::DeleteBackend { id, .. } => {
                self.backends.remove(id);
            }
        }
    }

    /// The backends a new flow to `frontend` can reach, or what is broken.
    fn reachable(&self, frontend: &Frontend) -> Result<BTreeSet<SocketAddr>, String> {
        let mut reached = BTreeSet::new();
        let Some(service) = self.services.get(frontend) else {
            return Ok(reached);
        };
        if service.backend_count == 0 {
            return match service.maglev_id {
                MAGLEV_NO_TABLE => Ok(reached),
                t => Err(format!("no backends but table {t}")),
            };
        }
        let base = service.maglev_id * SIZE;
        for index in base..base + SIZE {
            let id = self
                .maglev
                .get(&index)
                .ok_or(format!("slot {index} unset"))?;
            let b = self
                .backends
                .get(id)
                .ok_or(format!("slot {index} names missing backend {id}"))?;
            if b.service_id != service.service_id {
                return Err(format!("backend {id} is of service {}", b.service_id));
            }
            let ip = bytes_addr(b.family, b.addr).ok_or("bad backend address")?;
            reached.insert(SocketAddr::new(ip, u16::from_be(b.port)));
        }
        match reached.len() == service.backend_count as usize {
            true => Ok(reached),
            false => Err(format!(
                "table reaches {} backends, the entry says {}",
                reached.len(),
                service.backend_count
            )),
        }
    }
}

/// The active backends, which is what the table holds when none is preferred.
fn wanted(desired: &[Backend]) -> BTreeSet<SocketAddr> {
    desired
        .iter()
        .filter(|b| b.state == BackendState::Active)
        .map(|b| b.addr)
        .collect()
}

/// Plans `desired` and runs it, the kernel refusing step `fail_at` (which is
/// then neither performed nor recorded, as `set_service` does); checks after
/// every step that a new flow reaches the old set or the new one. `None`
/// when the failure was hit.
fn run(
    book: &mut Book,
    kernel: &mut Kernel,
    flags: ServiceFlags,
    desired: &[Backend],
    fail_at: Option<usize>,
) -> Option<ServiceUpdate> {
    let f = frontend();
    let before = kernel.reachable(&f).expect("consistent before the update");
    let after = wanted(desired);
    let mut plan = book.plan(f, flags, desired).expect("plan");
    book.begin(&plan);
    let steps = std::mem::take(&mut plan.steps);
    for (i, step) in steps.iter().enumerate() {
        if Some(i) == fail_at {
            return None;
        }
        kernel.apply(&plan, step);
        let now = kernel
            .reachable(&f)
            .unwrap_or_else(|e| panic!("after step {i} ({step:?}): {e}"));
        assert!(
            now == before || now == after,
            "after step {i} ({step:?}) a flow reaches {now:?}: neither {before:?} nor {after:?}"
        );
        book.record(&mut plan, step);
    }
    Some(book.finish(&plan, &steps))
}

/// The kind of each step, for order assertions.
fn kinds(steps: &[Step]) -> Vec<&'static str> {
    steps
        .iter()
        .map(|s| match s {
            Step::PutBackend { new: true, .. } => "put-new",
            Step::PutBackend { new: false, .. } => "put-changed",
            Step::WriteTable { .. } => "table",
            Step::PutService(_) => "service",
            Step::DeleteBackend { .. } => "delete",
        })
        .collect()
}

fn steps_for(book: &Book, flags: ServiceFlags, desired: &[Backend]) -> Vec<Step> {
    book.plan(frontend(), flags, desired).expect("plan").steps
}

#[test]
fn a_new_service_writes_its_backends_then_its_table_then_its_entry() {
    let b = book(2);
    let steps = steps_for(&b, ServiceFlags::NONE, &backends(&[1, 2, 3]));
    assert_eq!(
        kinds(&steps),
        ["put-new", "put-new", "put-new", "table", "service"]
    );
    let put: HashSet<u32> = steps
        .iter()
        .filter_map(|s| match s {
            Step::PutBackend { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    let Step::WriteTable { slot, ids } = &steps[3] else {
        unreachable!("checked above")
    };
    assert_eq!(*slot, 0);
    assert_eq!(ids.len(), SIZE as usize);
    assert_eq!(ids.iter().copied().collect::<HashSet<_>>(), put);
    assert!(matches!(
        steps[4],
        Step::PutService(ServiceValue {
            backend_count: 3,
            maglev_id: 0,
            ..
        })
    ));
}

#[test]
fn an_unchanged_service_needs_no_write() {
    let (mut b, mut k) = (book(2), Kernel::default());
    let update = run(&mut b, &mut k, ServiceFlags::NONE, &backends(&[1, 2]), None).expect("ran");
    assert!(update.table_rebuilt);
    assert_eq!(update.backends_added, 2);
    assert_eq!(steps_for(&b, ServiceFlags::NONE, &backends(&[2, 1])), []);
}

#[test]
fn a_replaced_backend_is_written_before_and_deleted_after_the_switch() {
    let (mut b, mut k) = (book(2), Kernel::default());
    run(
        &mut b,
        &mut k,
        ServiceFlags::NONE,
        &backends(&[1, 2, 3]),
        None,
    )
    .expect("ran");
    let steps = steps_for(&b, ServiceFlags::NONE, &backends(&[1, 2, 4]));
    assert_eq!(kinds(&steps), ["put-new", "table", "service", "delete"]);
    assert!(matches!(steps[1], Step::WriteTable { slot: 1, .. }));
    assert!(matches!(
        &steps[3],
        Step::DeleteBackend { key, .. } if key.addr == backend(3).addr
    ));
    let update = run(
        &mut b,
        &mut k,
        ServiceFlags::NONE,
        &backends(&[1, 2, 4]),
        None,
    )
    .expect("ran");
    assert_eq!((update.backends_added, update.backends_removed), (1, 1));
    assert_eq!(b.free_tables, BTreeSet::from([0]), "the old table is free");
    assert_eq!(k.backends.len(), 3, "no backend left behind");
}

#[test]
fn a_state_change_rewrites_the_backend_under_its_id() {
    let (mut b, mut k) = (book(2), Kernel::default());
    run(&mut b, &mut k, ServiceFlags::NONE, &backends(&[1, 2]), None).expect("ran");
    let id = b.services[&frontend()]
        .backends
        .values()
        .next()
        .expect("one")
        .0;
    let mut drained = backends(&[1, 2]);
    drained[0].state = BackendState::Terminating;
    let steps = steps_for(&b, ServiceFlags::NONE, &drained);
    assert_eq!(kinds(&steps), ["put-changed", "table", "service"]);
    assert!(matches!(steps[0], Step::PutBackend { id: i, .. } if i == id));
    let update = run(&mut b, &mut k, ServiceFlags::NONE, &drained, None).expect("ran");
    assert_eq!((update.table_members, update.backends_added), (1, 0));
    assert_eq!(
        k.backends.len(),
        2,
        "the draining backend stays for its flows"
    );
}

#[test]
fn a_weight_change_rebuilds_only_the_table() {
    let (mut b, mut k) = (book(2), Kernel::default());
    run(&mut b, &mut k, ServiceFlags::NONE, &backends(&[1, 2]), None).expect("ran");
    let mut heavier = backends(&[1, 2]);
    heavier[0].weight = 3;
    assert_eq!(
        kinds(&steps_for(&b, ServiceFlags::NONE, &heavier)),
        ["table", "service"]
    );
}

#[test]
fn new_flags_only_rewrite_the_entry() {
    let (mut b, mut k) = (book(2), Kernel::default());
    run(&mut b, &mut k, ServiceFlags::NONE, &backends(&[1, 2]), None).expect("ran");
    let steps = steps_for(&b, ServiceFlags::GLOBAL, &backends(&[1, 2]));
    assert_eq!(kinds(&steps), ["service"]);
    assert!(matches!(steps[0], Step::PutService(v) if v.maglev_id == 0
        && v.flags == ServiceFlags::GLOBAL.bits()));
}

#[test]
fn no_backends_point_the_entry_at_no_table_before_the_backends_go() {
    let (mut b, mut k) = (book(2), Kernel::default());
    run(&mut b, &mut k, ServiceFlags::NONE, &backends(&[1, 2]), None).expect("ran");
    let steps = steps_for(&b, ServiceFlags::NONE, &[]);
    assert_eq!(kinds(&steps), ["service", "delete", "delete"]);
    assert!(matches!(steps[0], Step::PutService(v)
        if v.backend_count == 0 && v.maglev_id == MAGLEV_NO_TABLE));
    run(&mut b, &mut k, ServiceFlags::NONE, &[], None).expect("ran");
    assert_eq!(b.free_tables, BTreeSet::from([0, 1]));
    assert!(k.backends.is_empty());
    assert_eq!(steps_for(&b, ServiceFlags::NONE, &[]), []);
}

#[test]
fn a_failure_at_any_step_leaves_a_working_service_and_the_next_call_finishes() {
    let mut drained = backends(&[2, 3, 4]);
    drained[1].state = BackendState::Terminating;
    let history: Vec<Vec<Backend>> = vec![
        backends(&[1, 2, 3]),
        backends(&[2, 3, 4]),
        drained,
        vec![],
        backends(&[5]),
    ];
    for (last, desired) in history.iter().enumerate() {
        let steps = {
            let (mut b, mut k) = (book(2), Kernel::default());
            for earlier in &history[..last] {
                run(&mut b, &mut k, ServiceFlags::NONE, earlier, None).expect("ran");
            }
            steps_for(&b, ServiceFlags::NONE, desired).len()
        };
        for fail_at in 0..steps {
            let (mut b, mut k) = (book(2), Kernel::default());
            for earlier in &history[..last] {
                run(&mut b, &mut k, ServiceFlags::NONE, earlier, None).expect("ran");
            }
            assert!(run(&mut b, &mut k, ServiceFlags::NONE, desired, Some(fail_at)).is_none());
            run(&mut b, &mut k, ServiceFlags::NONE, desired, None).expect("the retry ran");
            let context = format!("update {last}, failed at step {fail_at}");
            assert_eq!(k.reachable(&frontend()), Ok(wanted(desired)), "{context}");
            let known: HashSet<u32> = b.services[&frontend()]
                .backends
                .values()
                .map(|(id, _)| *id)
                .collect();
            let in_kernel: HashSet<u32> = k.backends.keys().copied().collect();
            assert_eq!(
                known, in_kernel,
                "{context}: the book says what the map holds"
            );
            assert_eq!(known.len(), desired.len(), "{context}");
            let in_use = usize::from(!wanted(desired).is_empty());
            assert_eq!(
                b.free_tables.len(),
                2 - in_use,
                "{context}: no table leaked"
            );
        }
    }
}

#[test]
fn a_full_table_array_fails_before_anything_is_written() {
    let (mut b, mut k) = (book(1), Kernel::default());
    run(&mut b, &mut k, ServiceFlags::NONE, &backends(&[1, 2]), None).expect("ran");
    // The one table is in use, so a new table has nowhere to go.
    let err = b
        .plan(frontend(), ServiceFlags::NONE, &backends(&[1, 3]))
        .expect_err("no free table");
    assert!(matches!(err, Error::TablesExhausted { tables: 1 }), "{err}");
    let other = Frontend {
        addr: "10.96.0.2:80".parse().expect("address"),
        proto: Protocol::Tcp,
    };
    assert!(b.plan(other, ServiceFlags::NONE, &backends(&[1])).is_err());
    // Draining every backend needs no table, so it still works.
    assert!(b.plan(frontend(), ServiceFlags::NONE, &[]).is_ok());
}

#[test]
fn bad_requests_are_refused_by_the_plan() {
    let b = book(1);
    let mut zero = backends(&[1]);
    zero[0].weight = 0;
    let v6 = [Backend::new("[fd00::1]:80".parse().expect("address"), 1)];
    for (desired, what) in [
        (backends(&[1, 1]), "duplicate"),
        (zero, "zero weight"),
        (v6.to_vec(), "family"),
    ] {
        assert!(
            b.plan(frontend(), ServiceFlags::NONE, &desired).is_err(),
            "{what} accepted"
        );
    }
}

#[test]
fn ids_skip_those_in_use_and_are_never_zero() {
    let ids = Ids::new("backend", HashSet::from([1, 2, 4]));
    assert_eq!(ids.peek(3).expect("free"), [5, 6, 7]);
    let wrapped = Ids::new("backend", HashSet::from([u32::MAX, 2]));
    assert_eq!(wrapped.peek(2).expect("free"), [1, 3]);
}
