//! Process supervision for the lab: start etcd, apiservers, agents and echo
//! servers as real, detached processes, find them again by PID *and* start
//! time, wait for their health with deadlines, and stop them.
//!
//! Processes that must live in a network namespace are started through
//! `nsenter --net=/run/netns/NAME`, which enters only the network namespace:
//! the host mount namespace stays, so bpffs pins and the lab directory are the
//! same paths for every process (unlike `ip netns exec`, which remounts `/sys`).
//! Each process gets its own process group, so a Ctrl-C on `meshctl` does not
//! take the lab down with it, and writes stdout and stderr to its log file.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::ip::netns_path;
use super::state::{ProcessRecord, Role};

/// How long a stopped process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Errors of process supervision.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The log file could not be opened.
    #[error("cannot open log file {path}")]
    Log {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The started process cannot be identified in `/proc` (its start time
    /// is what tells it from a later process with a recycled PID).
    #[error("started {program} as PID {pid}, but /proc/{pid}/stat has no start time")]
    NoStartTime {
        /// The program.
        program: String,
        /// Its PID.
        pid: i32,
    },
    /// The process exited while we waited for it to become healthy.
    #[error("{what} exited while waiting for it to become ready; last lines of {log}:\n{tail}")]
    Exited {
        /// What it is.
        what: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// It did not become healthy in time.
    #[error("timed out after {waited:?} waiting for {what}{last}; see {log}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        waited: Duration,
        /// The last error of the check, formatted as `" (last error: ...)"`.
        last: String,
        /// The log to read.
        log: PathBuf,
    },
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// What it is.
    pub role: Role,
    /// Its cluster.
    pub cluster: String,
    /// Its node or pod.
    pub member: Option<String>,
    /// Network namespace to run in, through `nsenter` (`None`: the program enters
    /// it itself, or runs in the host namespace).
    pub netns: Option<String>,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Log file (appended to).
    pub log: PathBuf,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// Starts a process, detached in its own process group.
///
/// # Errors
///
/// [`SuperviseError::Log`] or [`SuperviseError::Spawn`].
pub fn start(spec: &Spec) -> Result<ProcessRecord, SuperviseError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(|source| SuperviseError::Log {
            path: spec.log.clone(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| SuperviseError::Log {
        path: spec.log.clone(),
        source,
    })?;
    let mut argv: Vec<String> = Vec::new();
    if let Some(netns) = &spec.netns {
        argv.push("nsenter".into());
        argv.push(format!("--net={}", netns_path(netns).display()));
        argv.push("--".into());
    }
    argv.push(spec.program.display().to_string());
    argv.extend(spec.args.iter().cloned());
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(|source| SuperviseError::Spawn {
            program: argv[0].clone(),
            source,
        })?;
    let pid = i32::try_from(child.id()).expect("PIDs fit in i32");
    // The child is not waited for: it outlives this `meshctl` and is found
    // again by PID and start time.
    drop(child);
    let start_time = start_time(pid).ok_or_else(|| SuperviseError::NoStartTime {
        program: argv[0].clone(),
        pid,
    })?;
    Ok(ProcessRecord {
        role: spec.role,
        cluster: spec.cluster.clone(),
        member: spec.member.clone(),
        pid,
        start_time,
        log: spec.log.clone(),
        command: argv,
    })
}

/// The start time of `pid` (clock ticks since boot) and whether it is a zombie.
fn stat(pid: i32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); start time is field 22.
    let zombie = fields.first()? == &"Z";
    Some((fields.get(19)?.parse().ok()?, zombie))
}

/// The start time of `pid`, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|(t, _)| t)
}

/// Whether the recorded process still runs (same PID, same start time, not a zombie).
pub fn is_running(record: &ProcessRecord) -> bool {
    stat(record.pid).is_some_and(|(t, zombie)| !zombie && t == record.start_time)
}

/// Stops a recorded process: SIGTERM, then SIGKILL after [`STOP_GRACE`].
/// A process that is gone already (or whose PID now belongs to another
/// process) is left alone.
pub fn stop(record: &ProcessRecord) {
    if is_running(record) {
        stop_pid(record.pid, Some(record.start_time));
    }
}

/// SIGTERM, wait up to [`STOP_GRACE`], SIGKILL, wait for the PID to go away.
/// `start_time`, when given, guards against a recycled PID.
pub fn stop_pid(pid: i32, start_time: Option<u64>) {
    let same = || match (stat(pid), start_time) {
        (Some((_, true)), _) | (None, _) => false,
        (Some((t, false)), Some(expected)) => t == expected,
        (Some((_, false)), None) => true,
    };
    let target = Pid::from_raw(pid);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while same() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if same() {
        let _ = kill(target, Signal::SIGKILL);
        let deadline = Instant::now() + STOP_GRACE;
        while same() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGKILLs a recorded process (for tests of crash recovery).
pub fn kill_hard(record: &ProcessRecord) {
    if is_running(record) {
        let _ = kill(Pid::from_raw(record.pid), Signal::SIGKILL);
        let deadline = Instant::now() + STOP_GRACE;
        while is_running(record) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The last `lines` lines of a log file (for error messages).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `check` until it returns `Ok(true)` or `timeout` passes, failing early
/// when `process` exits. `what` names the awaited condition in the error.
///
/// # Errors
///
/// [`SuperviseError::Exited`] or [`SuperviseError::Timeout`].
pub fn wait_ready<E: std::fmt::Display>(
    what: &str,
    process: &ProcessRecord,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool, E>,
) -> Result<(), SuperviseError> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!(" (last error: {e})"),
        }
        if !is_running(process) {
            return Err(SuperviseError::Exited {
                what: what.to_owned(),
                log: process.log.clone(),
                tail: log_tail(&process.log, 15),
            });
        }
        if started.elapsed() >= timeout {
            return Err(SuperviseError::Timeout {
                what: what.to_owned(),
                waited: timeout,
                last,
                log: process.log.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, args: &[&str]) -> Spec {
        Spec {
            role: Role::Echo,
            cluster: "c1".into(),
            member: None,
            netns: None,
            program: "sh".into(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            log: dir.join("log"),
            env: vec![],
        }
    }

    #[test]
    fn start_wait_stop() {
        let dir = tempfile::tempdir().unwrap();
        let record = start(&spec(dir.path(), &["-c", "echo hello; exec sleep 60"])).unwrap();
        assert!(is_running(&record));
        wait_ready("hello in the log", &record, Duration::from_secs(10), || {
            Ok::<_, String>(log_tail(&record.log, 1) == "hello")
        })
        .unwrap();
        let timeout = wait_ready("never", &record, Duration::from_millis(200), || {
            Err::<bool, _>("nope")
        })
        .unwrap_err();
        assert!(
            timeout
                .to_string()
                .contains("waiting for never (last error: nope)"),
            "{timeout}"
        );
        stop(&record);
        assert!(!is_running(&record));
        // A recycled PID (other start time) is not ours.
        let other = ProcessRecord {
            start_time: record.start_time + 1,
            ..record
        };
        assert!(!is_running(&other));
    }

    #[test]
    fn early_exit_is_reported_with_log() {
        let dir = tempfile::tempdir().unwrap();
        let record = start(&spec(dir.path(), &["-c", "echo boom >&2; exit 3"])).unwrap();
        let err = wait_ready("ready", &record, Duration::from_secs(10), || {
            Ok::<_, String>(false)
        })
        .unwrap_err();
        assert!(
            matches!(&err, SuperviseError::Exited { tail, .. } if tail.contains("boom")),
            "{err}"
        );
    }
}
