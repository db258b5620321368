//! Test harness shared by the mesh's crates.
//!
//! Integration tests in this workspace run against real components (`docs/architecture.md`
//! §10): a real etcd on a free loopback port, real netlink in a private
//! namespace. This crate holds the pieces every such test needs, so that each
//! crate's tests read as scenarios rather than plumbing:
//!
//! * [`EtcdServer`]: a throw-away etcd (plain or mutual TLS) with a temporary
//!   data dir, that a test can SIGKILL, restart on the same data dir, or
//!   restart empty, and that is killed when dropped.
//! * [`require_root`] / [`require_binary`]: skip a test with a message naming
//!   what is missing, unless `MESH_TEST_STRICT=1` (CI), where a missing
//!   prerequisite fails the test instead.
//! * [`wait_until`] / [`wait_for`] and the [`eventually!`] macro: wait for a
//!   condition with a deadline; on timeout panic saying what was awaited.
//!   Tests never sleep for a fixed time to "let things settle".
//! * [`TcpProxy`]: a loopback proxy a test can cut, to take one client
//!   away from a server while others keep talking to it.
//! * [`FakeApiServer`]: an in-test Kubernetes API server speaking the
//!   list/watch protocol (resourceVersions, chunked watch streams,
//!   bookmarks, `410 Gone`, dropped watches), since no real one can be
//!   installed on the project's machines.
//! * [`unique_name`]: names that do not collide between tests of one run or
//!   with leftovers of a crashed run (network namespaces, keys, prefixes).
//!
//! Tests panic with context rather than return errors, so the helpers here
//! panic too.

mod etcd;
pub mod kube_api;
mod pki;
mod proxy;

pub use etcd::{EtcdOptions, EtcdServer};
pub use kube_api::FakeApiServer;
pub use pki::{TestPki, TlsFiles};
pub use proxy::TcpProxy;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The environment variable that turns skips into failures (set by CI).
pub const STRICT_ENV: &str = "MESH_TEST_STRICT";

/// Whether missing prerequisites must fail tests instead of skipping them.
pub fn strict() -> bool {
    std::env::var(STRICT_ENV).is_ok_and(|v| v == "1")
}

/// A missing prerequisite (`what` says which): prints a skip message and
/// returns `false`, or panics under `MESH_TEST_STRICT=1`.
pub fn skip_or_fail(what: &str) -> bool {
    if strict() {
        panic!("{what}, and {STRICT_ENV}=1 forbids skipping this test");
    }
    eprintln!("SKIPPED: {what} (set {STRICT_ENV}=1 to make this a failure)");
    false
}

/// Returns `true` when the test runs as root; otherwise prints a skip message
/// and returns `false` (or panics under `MESH_TEST_STRICT=1`).
///
/// ```no_run
/// if !testkit::require_root() {
///     return;
/// }
/// ```
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        skip_or_fail("this test needs root")
    }
}

/// Returns `true` when `name` is an executable on `PATH`; otherwise prints a
/// skip message naming the binary and returns `false` (or panics under
/// `MESH_TEST_STRICT=1`).
pub fn require_binary(name: &str) -> bool {
    if find_binary(name).is_some() {
        true
    } else {
        skip_or_fail(&format!("this test needs the `{name}` binary on PATH"))
    }
}

/// The full path of executable `name` on `PATH`, if any.
pub fn find_binary(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A name unique within this machine for the current run: `prefix`, the
/// process id and a per-process counter, e.g. `kvst-4242-7`. Short enough for
/// interface and namespace names when `prefix` is at most 4 characters.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// The interval between two checks of a waited-for condition.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `check` returns `true`, checking every 20 ms, for at most
/// `deadline`.
///
/// # Panics
///
/// When the deadline passes, with a message saying what was awaited (`what`)
/// and for how long.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(deadline, what, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await;
}

/// Waits until `check` returns `Some(value)` and returns the value; checks
/// every 20 ms, for at most `deadline`.
///
/// # Panics
///
/// When the deadline passes, with a message saying what was awaited.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for a boolean condition with a deadline, panicking with a formatted
/// message on timeout.
///
/// ```no_run
/// # async fn demo(count: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
/// use std::time::Duration;
/// testkit::eventually!(Duration::from_secs(5), "3 events, saw some", {
///     count.load(std::sync::atomic::Ordering::SeqCst) == 3
/// });
/// # }
/// ```
#[macro_export]
macro_rules! eventually {
    ($deadline:expr, $what:expr, $cond:expr) => {
        $crate::wait_until($deadline, &::std::format!("{}", $what), || async { $cond }).await
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name("t"), unique_name("t"));
    }

    #[test]
    fn finds_sh_but_not_nonsense() {
        assert!(find_binary("sh").is_some());
        assert!(find_binary("no-such-binary-for-mesh-tests").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_returns_once_true() {
        let start = tokio::time::Instant::now();
        let mut calls = 0;
        wait_until(Duration::from_secs(1), "the third call", || {
            calls += 1;
            let done = calls >= 3;
            async move { done }
        })
        .await;
        assert_eq!(calls, 3);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 1s waiting for nothing")]
    async fn wait_until_panics_with_what() {
        wait_until(Duration::from_secs(1), "nothing", || async { false }).await;
    }
}
