//! The bpffs mounts of the lab's agents (in the host mount namespace, so
//! pins outlive an agent).

use std::path::{Path, PathBuf};

use super::LabError;

pub(super) fn mount_bpffs(path: &Path) -> Result<(), LabError> {
    if mounts_under(path).iter().any(|m| m == path) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| LabError::Mount {
        action: "mount",
        path: path.to_owned(),
        source,
    })
}

/// Mount points at or below `dir` (from `/proc/self/mountinfo`), deepest first.
pub(super) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}
