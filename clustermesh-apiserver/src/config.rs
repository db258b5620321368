//! Command-line flags and their validation.
//!
//! Flags are parsed by clap as plain strings and validated here in one pass, so
//! that a bad invocation is answered with *every* invalid value at once (and the
//! binary exits with 64, `EX_USAGE`), not one error per attempt. Every flag has an
//! environment fallback `MESH_<FLAG>`; tests build a [`Config`] value directly and
//! never touch the environment.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use api::{ClusterId, ClusterName, MaxConnectedClusters};
use clap::Parser;
use kvstore::{EtcdConfig, TlsPaths};

use crate::kubernetes::{lease::LeaseConfig, ApiConfig};

/// The flags of the `clustermesh-apiserver` binary, before validation.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "clustermesh-apiserver",
    about = "Exports this cluster's nodes, endpoints, identities and services into its etcd"
)]
pub struct Args {
    /// This cluster's name (at most 32 characters, lowercase alphanumerics and '-').
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    pub cluster_name: String,
    /// This cluster's ID, 1..=255 (1..=511 with --max-connected-clusters 511).
    #[arg(long, env = "MESH_CLUSTER_ID")]
    pub cluster_id: String,
    /// 255 or 511: the size of the mesh, which decides the identity layout.
    #[arg(long, env = "MESH_MAX_CONNECTED_CLUSTERS", default_value = "255")]
    pub max_connected_clusters: String,
    /// etcd client URLs, comma separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "MESH_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// A Cilium-style etcd config file (`endpoints:`, `trusted-ca-file:`,
    /// `cert-file:`, `key-file:`); alternative to --etcd-endpoints.
    #[arg(long, env = "MESH_ETCD_CONFIG")]
    pub etcd_config: Option<PathBuf>,
    /// Address of the gRPC registry API.
    #[arg(long, env = "MESH_GRPC_LISTEN", default_value = "0.0.0.0:9870")]
    pub grpc_listen: String,
    /// Address of the HTTP /healthz, /readyz and /metrics endpoints; "" disables it.
    #[arg(long, env = "MESH_HEALTH_LISTEN", default_value = "0.0.0.0:9871")]
    pub health_listen: String,
    /// Where nodes, endpoints and services come from: `standalone` (node agents
    /// register over gRPC). `kubernetes` is planned but not built yet.
    #[arg(long, env = "MESH_SOURCE", default_value = "standalone")]
    pub source: String,
    /// How long a node's registrations outlive its ended session (e.g. 30s, 2m).
    /// Kubernetes source: the kubeconfig file to use instead of the pod's
    /// in-cluster service account.
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes source: elect one leader among replicas with a
    /// coordination.k8s.io Lease; only the leader connects to etcd.
    #[arg(long, env = "MESH_LEADER_ELECT")]
    pub leader_elect: bool,
    /// The namespace of the leader election Lease.
    #[arg(
        long,
        env = "MESH_LEADER_ELECTION_NAMESPACE",
        default_value = "mesh-system"
    )]
    pub leader_election_namespace: String,
    /// The name of the leader election Lease.
    #[arg(
        long,
        env = "MESH_LEADER_ELECTION_LEASE_NAME",
        default_value = "clustermesh-apiserver"
    )]
    pub leader_election_lease_name: String,
    /// This replica's identity in the Lease (default: the host name, which
    /// is the pod name in Kubernetes).
    #[arg(long, env = "MESH_LEADER_ELECTION_IDENTITY")]
    pub leader_election_identity: Option<String>,
    #[arg(long, env = "MESH_SESSION_GRACE", default_value = "30s")]
    pub session_grace: String,
    /// How long an identity nobody uses is kept before it is released.
    #[arg(long, env = "MESH_IDENTITY_GRACE", default_value = "5m")]
    pub identity_grace: String,
    /// Time-to-live of the session lease this apiserver's identity user keys are
    /// bound to: how long a crashed apiserver's identities count as used.
    #[arg(long, env = "MESH_IDENTITY_LEASE_TTL", default_value = "30s")]
    pub identity_lease_ttl: String,
    /// How long shutdown waits for in-flight work and the final etcd writes.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "10s")]
    pub drain_timeout: String,
}

/// The local source of nodes, endpoints and services ([`crate::source`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Node agents register over gRPC; meshctl declares services.
    Standalone,
    /// Watchers on the Kubernetes API ([`crate::kubernetes`]).
    Kubernetes {
        api: ApiConfig,
        /// `None`: this is the only replica.
        leader_election: Option<LeaseConfig>,
    },
}

/// The validated configuration of one apiserver.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster_name: ClusterName,
    pub cluster_id: ClusterId,
    pub max_connected_clusters: MaxConnectedClusters,
    pub etcd: EtcdConfig,
    pub grpc_listen: SocketAddr,
    pub health_listen: Option<SocketAddr>,
    pub source: Source,
    pub session_grace: Duration,
    pub identity_grace: Duration,
    /// Time-to-live of the identity session lease (whole seconds, at least 1).
    pub identity_lease_ttl: Duration,
    pub drain_timeout: Duration,
    /// How often `cilium/.heartbeat` is rewritten (one minute, as Cilium does).
    pub heartbeat_interval: Duration,
}

impl Config {
    /// A configuration with the defaults of the binary (gRPC on an ephemeral
    /// loopback port, no health listener), for tests and embedders.
    pub fn new(cluster_name: ClusterName, cluster_id: ClusterId, etcd: EtcdConfig) -> Self {
        Self {
            cluster_name,
            cluster_id,
            max_connected_clusters: MaxConnectedClusters::Max255,
            etcd,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            health_listen: None,
            source: Source::Standalone,
            session_grace: Duration::from_secs(30),
            identity_grace: Duration::from_secs(300),
            identity_lease_ttl: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(60),
        }
    }
}

/// One invalid flag value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidFlag {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for InvalidFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--{} {:?}: {}", self.flag, self.value, self.reason)
    }
}

/// Every invalid value of one invocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError(pub Vec<InvalidFlag>);

impl ConfigError {
    /// The exit code for a bad configuration (`EX_USAGE`).
    pub const EXIT_CODE: i32 = 64;
}

#[derive(Default)]
struct Collector(Vec<InvalidFlag>);

impl Collector {
    fn push(&mut self, flag: &'static str, value: &str, reason: impl Into<String>) {
        self.0.push(InvalidFlag {
            flag,
            value: value.to_owned(),
            reason: reason.into(),
        });
    }

    fn duration(&mut self, flag: &'static str, value: &str) -> Duration {
        parse_duration(value).unwrap_or_else(|reason| {
            self.push(flag, value, reason);
            Duration::ZERO
        })
    }

    fn addr(&mut self, flag: &'static str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(addr) => Some(addr),
            Err(e) => {
                self.push(flag, value, format!("not an IP:port address: {e}"));
                None
            }
        }
    }
}

/// The Lease of `--leader-elect`.
fn lease_config(args: &Args, bad: &mut Collector) -> Option<LeaseConfig> {
    let namespace = &args.leader_election_namespace;
    if let Err(e) = api::names::validate_dns_label(namespace) {
        bad.push("leader-election-namespace", namespace, e.to_string());
    }
    let name = &args.leader_election_lease_name;
    if let Err(e) = api::names::validate_dns_subdomain(name) {
        bad.push("leader-election-lease-name", name, e.to_string());
    }
    let identity = match &args.leader_election_identity {
        Some(id) => id.clone(),
        // The pod name, in Kubernetes.
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
    };
    if identity.is_empty() {
        bad.push(
            "leader-election-identity",
            "",
            "required when the host has no name",
        );
        return None;
    }
    Some(LeaseConfig::new(namespace.clone(), name.clone(), identity))
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let mut bad = Collector::default();

        let cluster_name = ClusterName::new(args.cluster_name.clone())
            .map_err(|e| bad.push("cluster-name", &args.cluster_name, e.to_string()))
            .ok();
        let max_connected_clusters = match args.max_connected_clusters.as_str() {
            "255" => MaxConnectedClusters::Max255,
            "511" => MaxConnectedClusters::Max511,
            other => {
                bad.push("max-connected-clusters", other, "must be 255 or 511");
                MaxConnectedClusters::Max255
            }
        };
        let cluster_id = match args.cluster_id.parse::<u32>() {
            Ok(id) => ClusterId::from_u32(id, max_connected_clusters)
                .map_err(|_| {
                    bad.push(
                        "cluster-id",
                        &args.cluster_id,
                        format!("must be in 1..={}", max_connected_clusters.max_cluster_id()),
                    )
                })
                .ok(),
            Err(_) => {
                bad.push("cluster-id", &args.cluster_id, "not a number");
                None
            }
        };

        let etcd = etcd_config(&args, &mut bad);
        let grpc_listen = bad.addr("grpc-listen", &args.grpc_listen);
        let health_listen = if args.health_listen.is_empty() {
            None
        } else {
            bad.addr("health-listen", &args.health_listen)
        };
        let source = match args.source.as_str() {
            "standalone" => {
                if args.kubeconfig.is_some() || args.leader_elect {
                    bad.push(
                        "source",
                        "standalone",
                        "--kubeconfig and --leader-elect need --source kubernetes",
                    );
                }
                Some(Source::Standalone)
            }
            "kubernetes" => Some(Source::Kubernetes {
                api: ApiConfig::from_flag(args.kubeconfig.clone()),
                leader_election: args
                    .leader_elect
                    .then(|| lease_config(&args, &mut bad))
                    .flatten(),
            }),
            other => {
                bad.push(
                    "source",
                    other,
                    "unknown source; use \"standalone\" or \"kubernetes\"",
                );
                None
            }
        };
        let session_grace = bad.duration("session-grace", &args.session_grace);
        let identity_grace = bad.duration("identity-grace", &args.identity_grace);
        let identity_lease_ttl = bad.duration("identity-lease-ttl", &args.identity_lease_ttl);
        if identity_lease_ttl < Duration::from_secs(1)
            && parse_duration(&args.identity_lease_ttl).is_ok()
        {
            bad.push(
                "identity-lease-ttl",
                &args.identity_lease_ttl,
                "must be at least 1s",
            );
        }
        let drain_timeout = bad.duration("drain-timeout", &args.drain_timeout);

        match (cluster_name, cluster_id, etcd, grpc_listen, source) {
            (Some(cluster_name), Some(cluster_id), Some(etcd), Some(grpc_listen), Some(source))
                if bad.0.is_empty() =>
            {
                Ok(Config {
                    cluster_name,
                    cluster_id,
                    max_connected_clusters,
                    etcd,
                    grpc_listen,
                    health_listen,
                    source,
                    session_grace,
                    identity_grace,
                    identity_lease_ttl,
                    drain_timeout,
                    heartbeat_interval: Duration::from_secs(60),
                })
            }
            _ => Err(ConfigError(bad.0)),
        }
    }
}

fn etcd_config(args: &Args, bad: &mut Collector) -> Option<EtcdConfig> {
    for endpoint in &args.etcd_endpoints {
        let ok = ["http://", "https://"]
            .iter()
            .find_map(|scheme| endpoint.strip_prefix(scheme))
            .is_some_and(|rest| !rest.is_empty());
        if !ok {
            bad.push("etcd-endpoints", endpoint, "not an http:// or https:// URL");
            return None;
        }
    }
    match (&args.etcd_config, args.etcd_endpoints.is_empty()) {
        (Some(path), true) => EtcdConfig::from_file(path)
            .map_err(|e| bad.push("etcd-config", &path.display().to_string(), e.to_string()))
            .ok(),
        (None, false) => {
            EtcdConfig::from_endpoints(args.etcd_endpoints.clone(), &TlsPaths::default())
                .map_err(|e| {
                    bad.push(
                        "etcd-endpoints",
                        &args.etcd_endpoints.join(","),
                        e.to_string(),
                    )
                })
                .ok()
        }
        (None, true) => {
            bad.push(
                "etcd-endpoints",
                "",
                "one of --etcd-endpoints or --etcd-config is required",
            );
            None
        }
        (Some(path), false) => {
            bad.push(
                "etcd-config",
                &path.display().to_string(),
                "give either --etcd-endpoints or --etcd-config, not both",
            );
            None
        }
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h` (one number, one unit).
///
/// # Errors
///
/// A reason when the text is not a number followed by one of the units.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| "missing unit (ms, s, m or h)".to_owned())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "expected a number followed by ms, s, m or h".to_owned())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("unknown unit {unit:?} (use ms, s, m or h)")),
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| "too large".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["clustermesh-apiserver"];
        argv.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(argv).expect("clap parse"))
    }

    #[test]
    fn valid_flags_parse() {
        let config = args(&[
            "--cluster-name=c1",
            "--cluster-id=3",
            "--etcd-endpoints=http://127.0.0.1:2379,http://127.0.0.1:2380",
            "--session-grace=500ms",
            "--health-listen=",
        ])
        .unwrap();
        assert_eq!(config.cluster_name, "c1");
        assert_eq!(config.cluster_id.get(), 3);
        assert_eq!(config.etcd.endpoints.len(), 2);
        assert_eq!(config.session_grace, Duration::from_millis(500));
        assert_eq!(config.health_listen, None);
    }

    #[test]
    fn every_invalid_value_is_reported_at_once() {
        let err = args(&[
            "--cluster-name=Bad_Name",
            "--cluster-id=300",
            "--max-connected-clusters=256",
            "--etcd-endpoints=127.0.0.1:2379",
            "--grpc-listen=nowhere",
            "--source=k8s",
            "--session-grace=30",
        ])
        .unwrap_err();
        let flags: Vec<_> = err.0.iter().map(|e| e.flag).collect();
        assert_eq!(
            flags,
            [
                "cluster-name",
                "max-connected-clusters",
                "cluster-id",
                "etcd-endpoints",
                "grpc-listen",
                "source",
                "session-grace"
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("--cluster-id \"300\": must be in 1..=255"),
            "{text}"
        );
        assert!(text.contains("--source \"k8s\": unknown source"), "{text}");
    }

    #[test]
    fn unknown_source_is_refused() {
        let err = args(&[
            "--cluster-name=c1",
            "--cluster-id=1",
            "--etcd-endpoints=http://127.0.0.1:2379",
            "--source=agents",
        ])
        .unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(
            err.to_string(),
            "invalid configuration:\n  --source \"agents\": unknown source; use \"standalone\" or \"kubernetes\""
        );
    }

    #[test]
    fn the_kubernetes_source_and_its_lease() {
        let base = [
            "--cluster-name=c1",
            "--cluster-id=1",
            "--etcd-endpoints=http://127.0.0.1:2379",
        ];
        let with = |extra: &[&str]| args(&[&base[..], extra].concat());
        let config = with(&[
            "--source=kubernetes",
            "--kubeconfig=/etc/kube/config",
            "--leader-elect",
            "--leader-election-identity=pod-a",
        ])
        .unwrap();
        let Source::Kubernetes {
            api,
            leader_election: Some(lease),
        } = config.source
        else {
            panic!(
                "not the kubernetes source with a lease: {:?}",
                config.source
            );
        };
        assert_eq!(api, ApiConfig::Kubeconfig("/etc/kube/config".into()));
        assert_eq!(
            (
                lease.namespace.as_str(),
                lease.name.as_str(),
                lease.identity.as_str()
            ),
            ("mesh-system", "clustermesh-apiserver", "pod-a")
        );
        assert_eq!(
            with(&["--source=kubernetes"]).unwrap().source,
            Source::Kubernetes {
                api: ApiConfig::InCluster,
                leader_election: None
            }
        );
        let err = with(&["--leader-elect"]).unwrap_err().to_string();
        assert!(err.contains("need --source kubernetes"), "{err}");
        let err = with(&[
            "--source=kubernetes",
            "--leader-elect",
            "--leader-election-namespace=Not_A_Label",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--leader-election-namespace \"Not_A_Label\""),
            "{err}"
        );
    }

    #[test]
    fn cluster_id_up_to_511_with_511_clusters() {
        let config = args(&[
            "--cluster-name=c1",
            "--cluster-id=400",
            "--max-connected-clusters=511",
            "--etcd-endpoints=http://127.0.0.1:2379",
        ])
        .unwrap();
        assert_eq!(config.cluster_id.get(), 400);
    }

    #[test]
    fn etcd_config_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.yaml");
        std::fs::write(&path, "endpoints:\n- http://10.0.0.1:2379\n").unwrap();
        let config = args(&[
            "--cluster-name=c1",
            "--cluster-id=1",
            &format!("--etcd-config={}", path.display()),
        ])
        .unwrap();
        assert_eq!(config.etcd.endpoints, ["http://10.0.0.1:2379"]);
        let err = args(&[
            "--cluster-name=c1",
            "--cluster-id=1",
            "--etcd-config=/nonexistent/etcd.yaml",
        ])
        .unwrap_err();
        assert_eq!(err.0[0].flag, "etcd-config");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("s").is_err());
    }
}
