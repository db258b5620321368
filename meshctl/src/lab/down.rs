//! `lab down`: remove everything a lab made, also after a crash.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::progress::Progress;

use super::ip;
use super::mounts::mounts_under;
use super::plan;
use super::state::{LabState, Role};
use super::supervise;
use super::{lab_dir, LabError};
use crate::file::FileError;

/// What `lab down` removed.
#[derive(Debug, Default, Serialize)]
pub struct DownReport {
    /// Processes stopped.
    pub processes: usize,
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// bpffs mounts removed.
    pub mounts: Vec<PathBuf>,
    /// Whether the lab directory was removed.
    pub removed_dir: bool,
}

/// Removes everything lab `name` made: recorded processes, any process left
/// in its namespaces, its namespaces, its bpffs mounts and its directory.
/// Removing a lab that does not exist is not an error.
///
/// # Errors
///
/// The first failure; what could be removed before it is gone, and running
/// `lab down` again continues.
pub fn down(name: &str, root: &Path, progress: &Progress) -> Result<DownReport, LabError> {
    plan::validate_lab_name(name)?;
    let dir = lab_dir(root, name);
    let mut report = DownReport::default();
    let namespaces: Vec<String> = ip::list_netns()?
        .into_iter()
        .filter(|n| plan::is_lab_netns(name, n))
        .collect();

    let step = progress.step(format!("stopping the processes of lab {name}"));
    if let Ok(lab) = LabState::load(name, &dir) {
        // Pods' servers first, then agents, apiservers, and etcd last.
        for role in [Role::Echo, Role::Agent, Role::Apiserver, Role::Etcd] {
            for record in lab.processes.iter().filter(|p| p.role == role) {
                if supervise::is_running(record) {
                    supervise::stop(record);
                    report.processes += 1;
                }
            }
        }
    }
    // Whatever still runs inside the lab's namespaces (a crashed lab's
    // processes, or anything started by hand in them) is the lab's too.
    for ns in &namespaces {
        for pid in ip::netns_pids(ns)? {
            supervise::stop_pid(pid, None);
            report.processes += 1;
        }
    }
    step.done();

    let step = progress.step(format!("removing {} namespaces", namespaces.len()));
    // Pods before nodes before the underlay, so no veth outlives its peer's namespace by long.
    let mut ordered = namespaces.clone();
    ordered.sort_by_key(|n| std::cmp::Reverse(n.matches('-').count()));
    for ns in ordered {
        ip::del_netns(&ns)?;
        report.namespaces.push(ns);
    }
    step.done();

    if dir.exists() {
        let step = progress.step(format!("removing {}", dir.display()));
        for mount in mounts_under(&dir) {
            nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
                LabError::Mount {
                    action: "unmount",
                    path: mount.clone(),
                    source,
                }
            })?;
            report.mounts.push(mount);
        }
        std::fs::remove_dir_all(&dir).map_err(FileError::at("remove", &dir))?;
        report.removed_dir = true;
        // The parent too, when this was its last lab (ENOTEMPTY otherwise: fine).
        let _ = std::fs::remove_dir(root);
        step.done();
    }
    Ok(report)
}
