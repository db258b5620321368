//! A real etcd for integration tests.
//!
//! Each [`EtcdServer`] is a single-member etcd cluster listening on free
//! loopback ports, with its data dir in a temporary directory (on `/dev/shm`
//! when it exists, so fsync is cheap and tests stay fast). A test can SIGKILL
//! it ([`EtcdServer::kill`]), start it again on the same data dir and ports
//! ([`EtcdServer::restart`]), as after a crash, or on a fresh, empty data dir
//! ([`EtcdServer::restart_empty`]), as after a disaster that lost the data.
//! The process is killed when the value is dropped, also on a panic.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::pki::TestPki;

/// What etcd logs once it accepts client requests.
const READY_LINE: &str = "ready to serve client requests";

/// How an [`EtcdServer`] is started.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Serve clients over TLS and require a client certificate signed by the
    /// generated CA (see [`EtcdServer::pki`]).
    pub tls: bool,
    /// etcd's `--max-request-bytes`. The default, 8 MiB, admits the 2 MiB
    /// values that tests of size limits write.
    pub max_request_bytes: u64,
    /// How long to wait for etcd to report it is ready.
    pub ready_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            tls: false,
            max_request_bytes: 8 * 1024 * 1024,
            ready_timeout: Duration::from_secs(20),
        }
    }
}

impl EtcdOptions {
    /// The default options, with TLS and client certificates.
    pub fn tls() -> Self {
        Self {
            tls: true,
            ..Self::default()
        }
    }
}

/// A running (or deliberately killed) single-member etcd. See the module docs.
#[derive(Debug)]
pub struct EtcdServer {
    options: EtcdOptions,
    /// Holds the data dir, the logs and the certificates; removed on drop.
    root: TempDir,
    client_port: u16,
    peer_port: u16,
    pki: Option<TestPki>,
    child: Option<Child>,
    /// Number of times etcd was started, to name log files.
    starts: u32,
}

impl EtcdServer {
    /// Starts a plain-text etcd with the default options.
    ///
    /// # Panics
    ///
    /// When etcd cannot be started or does not become ready in time; the
    /// message includes the end of etcd's log. Call
    /// [`require_binary("etcd")`](crate::require_binary) first.
    pub async fn start() -> Self {
        Self::start_with(EtcdOptions::default()).await
    }

    /// Starts an etcd with `options` when the `etcd` binary is on `PATH`;
    /// otherwise prints a skip message and returns `None` (or panics under
    /// `MESH_TEST_STRICT=1`), as [`require_binary`](crate::require_binary).
    ///
    /// ```no_run
    /// # async fn demo() {
    /// let Some(etcd) = testkit::EtcdServer::start_or_skip(testkit::EtcdOptions::tls()).await
    /// else {
    ///     return;
    /// };
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// As [`EtcdServer::start`].
    pub async fn start_or_skip(options: EtcdOptions) -> Option<Self> {
        if crate::require_binary("etcd") {
            Some(Self::start_with(options).await)
        } else {
            None
        }
    }

    /// Starts an etcd with `options`.
    ///
    /// # Panics
    ///
    /// As [`EtcdServer::start`].
    pub async fn start_with(options: EtcdOptions) -> Self {
        let root = temp_root();
        let pki = options.tls.then(|| TestPki::generate(root.path()));
        let (client_port, peer_port) = free_port_pair();
        let mut server = Self {
            options,
            root,
            client_port,
            peer_port,
            pki,
            child: None,
            starts: 0,
        };
        server.spawn_and_wait().await;
        server
    }

    /// The client URL, `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client socket address, `127.0.0.1:PORT`.
    pub fn client_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The certificates, when started with TLS.
    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// The temporary directory holding data dir, logs and certificates; a
    /// convenient place for a test's own files (e.g. an etcd config file).
    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// The etcd data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills etcd with SIGKILL (no chance to flush or say goodbye) and reaps
    /// it. Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL is what `Child::kill` sends on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd if it runs and starts it again on the same data dir and
    /// ports: a crash and recovery.
    ///
    /// # Panics
    ///
    /// As [`EtcdServer::start`].
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn_and_wait().await;
    }

    /// Kills etcd if it runs and starts it on the same ports with an empty
    /// data dir: everything stored and every lease is gone, and revisions
    /// start again from 1.
    ///
    /// # Panics
    ///
    /// As [`EtcdServer::start`].
    pub async fn restart_empty(&mut self) {
        self.kill();
        let data = self.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .unwrap_or_else(|e| panic!("removing {}: {e}", data.display()));
        }
        self.spawn_and_wait().await;
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join(format!("etcd-{}.log", self.starts))
    }

    async fn spawn_and_wait(&mut self) {
        self.starts += 1;
        let log_path = self.log_path();
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone log file handle");
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg(format!(
                "--max-request-bytes={}",
                self.options.max_request_bytes
            ))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(pki) = &self.pki {
            cmd.arg(format!("--cert-file={}", pki.server.cert.display()))
                .arg(format!("--key-file={}", pki.server.key.display()))
                .arg(format!("--trusted-ca-file={}", pki.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd (is it on PATH?): {e}"));
        self.child = Some(child);
        self.wait_ready(&log_path).await;
    }

    async fn wait_ready(&mut self, log_path: &Path) {
        let deadline = tokio::time::Instant::now() + self.options.ready_timeout;
        loop {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            if log.contains(READY_LINE) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "etcd exited with {status} before it was ready; log {}:\n{}",
                    log_path.display(),
                    tail(&log)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill();
                panic!(
                    "timed out after {:?} waiting for etcd on {} to be ready; log:\n{}",
                    self.options.ready_timeout,
                    self.endpoint(),
                    tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn temp_root() -> TempDir {
    let shm = Path::new("/dev/shm");
    let mut builder = tempfile::Builder::new();
    builder.prefix("mesh-etcd-");
    let dir = if shm.is_dir() {
        builder.tempdir_in(shm)
    } else {
        builder.tempdir()
    };
    dir.unwrap_or_else(|e| panic!("creating a temporary directory for etcd: {e}"))
}

/// Two distinct free loopback ports. Both listeners are held until both are
/// chosen, so the two differ; another process could still take one before
/// etcd binds it, which is rare enough for tests.
fn free_port_pair() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    let ports = (
        a.local_addr().expect("local addr").port(),
        b.local_addr().expect("local addr").port(),
    );
    drop((a, b));
    ports
}
