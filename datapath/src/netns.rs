//! Running code inside a network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread* only,
//! so [`run_in`] does it on a fresh scoped thread: the caller's thread (and
//! any tokio worker) stays where it was. Only the network namespace is
//! entered: bpffs and every other mount stay those of the caller, which is
//! why pins made inside `run_in` land in the caller's bpffs (unlike under
//! `ip netns exec`, which remounts `/sys`).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};

/// Errors of [`run_in`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `setns(2)` failed (not a network namespace, or no CAP_SYS_ADMIN).
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The closure panicked on the namespace thread.
    #[error("the task in network namespace {path} panicked")]
    Panicked { path: PathBuf },
}

/// The path `ip netns add NAME` creates for a named namespace.
pub fn named(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `f` on a new thread inside the network namespace at `netns` (e.g.
/// [`named`] or `/proc/PID/ns/net`) and returns its result.
///
/// # Errors
///
/// [`Error::Open`] / [`Error::Enter`] when the namespace cannot be entered,
/// [`Error::Panicked`] when `f` panics.
pub fn run_in<T, F>(netns: &Path, f: F) -> Result<T, Error>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let file = File::open(netns).map_err(|source| Error::Open {
        path: netns.to_owned(),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
                    path: netns.to_owned(),
                    source,
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| Error::Panicked {
                path: netns.to_owned(),
            })?
    })
}
