//! The agent's configuration: command-line flags with `MESH_*` environment
//! fallbacks, parsed once and validated whole.
//!
//! Every flag is read by clap as a plain string and then checked here, so that
//! one run reports *every* invalid or missing value at once instead of stopping
//! at the first (an operator fixing a unit file should not have to iterate).
//! The binary exits with [`EXIT_CONFIG`] (64, `EX_USAGE`) on any of them.
//! Tests build a [`Flags`] value with [`clap::Parser::try_parse_from`] or by
//! hand and call [`Config::from_flags`]; nothing here reads the environment
//! except through clap's `env` fallbacks.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use api::{ClusterId, ClusterName, MaxConnectedClusters};
use clap::Parser;
use ipnet::Ipv4Net;

/// Exit code of the binary on invalid configuration (`EX_USAGE` of sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Pod MTU with VXLAN encapsulation (1500 minus 50 bytes of VXLAN overhead).
pub const MTU_TUNNEL: u32 = 1450;
/// Pod MTU when traffic leaves through WireGuard (1500 minus 80 bytes, as
/// `wg-quick` uses).
pub const MTU_WIREGUARD: u32 = 1420;
/// Pod MTU with VXLAN carried through WireGuard: the WireGuard device's
/// 1420 minus the 50 bytes of VXLAN inside it.
pub const MTU_TUNNEL_WIREGUARD: u32 = 1370;
/// Pod MTU with native routing and no encryption.
pub const MTU_NATIVE: u32 = 1500;

/// The raw flags. Every value is a string so that validation can report all
/// problems at once; use [`Config::from_flags`] to get a typed [`Config`].
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "node-agent",
    version,
    about = "Per-node agent of the mesh: imports every cluster's state into eBPF maps and tunnel peers"
)]
pub struct Flags {
    /// Name of the cluster this node belongs to.
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Numeric ID of this cluster (1..=255, or 1..=511 with --max-connected-clusters 511).
    #[arg(long, env = "MESH_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Maximum number of connected clusters: 255 or 511 (decides the identity layout).
    #[arg(long, env = "MESH_MAX_CONNECTED_CLUSTERS", default_value = "255")]
    pub max_connected_clusters: String,
    /// Name of this node (DNS-1123 subdomain).
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Underlay IPv4 address of this node: the tunnel endpoint of its pods.
    #[arg(long, env = "MESH_NODE_IP")]
    pub node_ip: Option<String>,
    /// IPv4 pod CIDR of this node, e.g. 10.1.1.0/24; the CNI IPAM allocates from it.
    #[arg(long, env = "MESH_POD_CIDR")]
    pub pod_cidr: Option<String>,
    /// Where this cluster's nodes and endpoints come from: `standalone` (the
    /// agent registers its node and pods with the apiserver) or `kubernetes`
    /// (the apiserver reads them from the Kubernetes API; without
    /// --pod-cidr the agent reads its pod CIDR from its Node object).
    #[arg(long, env = "MESH_SOURCE", default_value = "standalone")]
    pub source: String,
    /// With --source kubernetes: the kubeconfig file to use instead of the
    /// pod's in-cluster service account.
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<String>,
    /// gRPC address of the local clustermesh-apiserver, e.g. http://192.168.1.10:9090.
    /// Without it the node and its endpoints are not published.
    #[arg(long, env = "MESH_APISERVER")]
    pub apiserver: Option<String>,
    /// Comma-separated etcd URLs of the local cluster (exclusive with --etcd-config).
    #[arg(long, env = "MESH_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
    /// Cilium-style etcd config file of the local cluster (exclusive with --etcd-endpoints).
    #[arg(long, env = "MESH_ETCD_CONFIG")]
    pub etcd_config: Option<String>,
    /// Directory with one etcd config file per remote cluster; the file name is the cluster name.
    #[arg(long, env = "MESH_CLUSTERMESH_CONFIG")]
    pub clustermesh_config: Option<String>,
    /// How pod traffic reaches remote nodes: tunnel (VXLAN) or native (routed underlay).
    #[arg(long, env = "MESH_ROUTING", default_value = "tunnel")]
    pub routing: String,
    /// Node-to-node encryption: none or wireguard.
    #[arg(long, env = "MESH_ENCRYPTION", default_value = "none")]
    pub encryption: String,
    /// bpffs directory where the datapath pins its maps and links.
    #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf/mesh")]
    pub bpffs: String,
    /// State directory (IPAM allocations, WireGuard key).
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/mesh")]
    pub state_dir: String,
    /// Unix socket the mesh-cni plugin talks to.
    #[arg(long, env = "MESH_CNI_SOCKET", default_value = "/run/mesh/cni.sock")]
    pub cni_socket: String,
    /// Unix socket serving the agent status as one JSON document per connection.
    #[arg(
        long,
        env = "MESH_STATUS_SOCKET",
        default_value = "/run/mesh/status.sock"
    )]
    pub status_socket: String,
    /// TCP address serving Prometheus metrics on /metrics, e.g. 127.0.0.1:9962.
    #[arg(long, env = "MESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Network namespace (a name under /run/netns) to enter before starting.
    #[arg(long, env = "MESH_NETNS")]
    pub netns: Option<String>,
    /// How long a starting agent waits for every cluster to sync before it
    /// removes stale datapath entries anyway, in seconds.
    #[arg(long, env = "MESH_SYNC_TIMEOUT", default_value = "60")]
    pub sync_timeout: String,
    /// UDP port of the VXLAN device.
    #[arg(long, env = "MESH_VXLAN_PORT", default_value = "4789")]
    pub vxlan_port: String,
    /// UDP port of the WireGuard device.
    #[arg(long, env = "MESH_WIREGUARD_PORT", default_value = "51871")]
    pub wireguard_port: String,
    /// Shortest IPv4 pod CIDR a node of any cluster may announce; a shorter
    /// one refuses the node (see `trust`).
    #[arg(long, env = "MESH_MIN_POD_CIDR_PREFIX_V4", default_value = "16")]
    pub min_pod_cidr_prefix_v4: String,
    /// Shortest IPv6 pod CIDR a node of any cluster may announce.
    #[arg(long, env = "MESH_MIN_POD_CIDR_PREFIX_V6", default_value = "48")]
    pub min_pod_cidr_prefix_v6: String,
}

pub use api::{Encryption, Routing};

/// Where this cluster's nodes and endpoints come from (`--source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The agent registers its node and pods with the apiserver.
    Standalone,
    /// The apiserver reads nodes and pods from the Kubernetes API; the agent
    /// registers nothing.
    Kubernetes {
        /// `None`: the in-cluster service account.
        kubeconfig: Option<PathBuf>,
    },
}

/// Where the local cluster's etcd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdSource {
    /// Plain endpoint URLs, no TLS.
    Endpoints(Vec<String>),
    /// A Cilium-style config file (`endpoints`, `trusted-ca-file`, ...).
    ConfigFile(PathBuf),
}

/// The validated configuration of one agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// Local cluster name.
    pub cluster_name: ClusterName,
    /// Local cluster ID.
    pub cluster_id: ClusterId,
    /// 255 or 511.
    pub max_connected_clusters: MaxConnectedClusters,
    /// This node's name.
    pub node_name: String,
    /// This node's underlay address.
    pub node_ip: Ipv4Addr,
    /// This node's pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// Where nodes and endpoints come from.
    pub source: Source,
    /// gRPC URL of the local apiserver: the node and its pods are
    /// registered there (standalone source) and its services read.
    pub apiserver: Option<String>,
    /// The local cluster's etcd.
    pub etcd: EtcdSource,
    /// Remote-cluster config directory.
    pub clustermesh_config: Option<PathBuf>,
    /// Routing mode.
    pub routing: Routing,
    /// Encryption mode.
    pub encryption: Encryption,
    /// bpffs pin directory.
    pub bpffs: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// CNI socket path.
    pub cni_socket: PathBuf,
    /// Status socket path.
    pub status_socket: PathBuf,
    /// Metrics listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// Network namespace name to enter.
    pub netns: Option<String>,
    /// Restart sync timeout.
    pub sync_timeout: Duration,
    /// VXLAN UDP port.
    pub vxlan_port: u16,
    /// WireGuard UDP port.
    pub wireguard_port: u16,
    /// The ownership rules' tunables.
    pub trust: crate::trust::Rules,
}

impl Config {
    /// Validates `flags` whole.
    ///
    /// # Errors
    ///
    /// [`ConfigErrors`] listing every missing or invalid value.
    pub fn from_flags(flags: &Flags) -> Result<Self, ConfigErrors> {
        let mut errs = Vec::new();
        let max_connected_clusters = check(
            &mut errs,
            "--max-connected-clusters",
            Some(&flags.max_connected_clusters),
            |v| match v {
                "255" => Ok(MaxConnectedClusters::Max255),
                "511" => Ok(MaxConnectedClusters::Max511),
                _ => Err("must be 255 or 511".into()),
            },
        )
        .unwrap_or(MaxConnectedClusters::Max255);
        let cluster_name = check(
            &mut errs,
            "--cluster-name",
            flags.cluster_name.as_deref(),
            |v| ClusterName::new(v).map_err(|e| e.to_string()),
        );
        let cluster_id = check(
            &mut errs,
            "--cluster-id",
            flags.cluster_id.as_deref(),
            |v| {
                let id: u16 = v.parse().map_err(|_| "not a number".to_owned())?;
                ClusterId::new(id, max_connected_clusters).map_err(|_| {
                    format!("must be in 1..={}", max_connected_clusters.max_cluster_id())
                })
            },
        );
        let node_name = check(&mut errs, "--node-name", flags.node_name.as_deref(), |v| {
            api::names::validate_dns_subdomain(v)
                .map(|()| v.to_owned())
                .map_err(str::to_owned)
        });
        let node_ip = check(&mut errs, "--node-ip", flags.node_ip.as_deref(), |v| {
            let ip: Ipv4Addr = v.parse().map_err(|_| "not an IPv4 address".to_owned())?;
            if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
                return Err("not a unicast address usable on the underlay".into());
            }
            Ok(ip)
        });
        let pod_cidr = check(&mut errs, "--pod-cidr", flags.pod_cidr.as_deref(), |v| {
            let net: Ipv4Net = v
                .parse()
                .map_err(|_| "not an IPv4 CIDR such as 10.1.1.0/24".to_owned())?;
            if net.network() != net.addr() {
                return Err(format!("host bits set (the network is {})", net.trunc()));
            }
            if net.prefix_len() > 29 {
                return Err("prefix longer than /29 leaves no pod addresses".into());
            }
            Ok(net)
        });
        let source = match flags.source.as_str() {
            "standalone" => {
                if flags.kubeconfig.is_some() {
                    errs.push(ConfigError::Conflict {
                        flags: "--kubeconfig needs --source kubernetes",
                    });
                }
                Source::Standalone
            }
            "kubernetes" => Source::Kubernetes {
                kubeconfig: flags.kubeconfig.as_ref().map(PathBuf::from),
            },
            other => {
                errs.push(ConfigError::Invalid {
                    flag: "--source",
                    value: other.to_owned(),
                    reason: "not \"standalone\" or \"kubernetes\"".into(),
                });
                Source::Standalone
            }
        };
        let apiserver = flags.apiserver.as_deref().and_then(|v| {
            check(&mut errs, "--apiserver", Some(v), |v| {
                validate_url(v).map(|()| v.to_owned())
            })
        });
        let etcd = match (&flags.etcd_endpoints, &flags.etcd_config) {
            (Some(_), Some(_)) => {
                errs.push(ConfigError::Conflict {
                    flags: "--etcd-endpoints and --etcd-config",
                });
                None
            }
            (None, None) => {
                errs.push(ConfigError::Missing {
                    flag: "--etcd-endpoints or --etcd-config",
                });
                None
            }
            (Some(list), None) => check(&mut errs, "--etcd-endpoints", Some(list), |v| {
                let eps: Vec<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                if eps.is_empty() {
                    return Err("no endpoint given".into());
                }
                for ep in &eps {
                    validate_url(ep).map_err(|e| format!("{ep:?}: {e}"))?;
                }
                Ok(EtcdSource::Endpoints(eps))
            }),
            (None, Some(path)) => check(&mut errs, "--etcd-config", Some(path), |v| {
                non_empty_path(v).map(EtcdSource::ConfigFile)
            }),
        };
        let clustermesh_config = flags
            .clustermesh_config
            .as_deref()
            .and_then(|v| check(&mut errs, "--clustermesh-config", Some(v), non_empty_path));
        let routing = check(&mut errs, "--routing", Some(&flags.routing), |v| {
            v.parse::<Routing>()
                .map_err(|_| "must be tunnel or native".into())
        });
        let encryption = check(&mut errs, "--encryption", Some(&flags.encryption), |v| {
            v.parse::<Encryption>()
                .map_err(|_| "must be none or wireguard".into())
        });
        let bpffs = check(&mut errs, "--bpffs", Some(&flags.bpffs), absolute_path);
        let state_dir = check(
            &mut errs,
            "--state-dir",
            Some(&flags.state_dir),
            absolute_path,
        );
        let cni_socket = check(
            &mut errs,
            "--cni-socket",
            Some(&flags.cni_socket),
            absolute_path,
        );
        let status_socket = check(
            &mut errs,
            "--status-socket",
            Some(&flags.status_socket),
            absolute_path,
        );
        let metrics_listen = flags.metrics_listen.as_deref().and_then(|v| {
            check(&mut errs, "--metrics-listen", Some(v), |v| {
                v.parse::<SocketAddr>()
                    .map_err(|_| "not an address such as 127.0.0.1:9962".to_owned())
            })
        });
        let netns = flags.netns.as_deref().and_then(|v| {
            check(&mut errs, "--netns", Some(v), |v| {
                if v.is_empty() || v == "." || v == ".." || v.contains('/') || v.contains('\0') {
                    return Err("not a namespace name under /run/netns".into());
                }
                Ok(v.to_owned())
            })
        });
        let sync_timeout = check(
            &mut errs,
            "--sync-timeout",
            Some(&flags.sync_timeout),
            |v| {
                let secs: u64 = v
                    .parse()
                    .map_err(|_| "not a number of seconds".to_owned())?;
                if secs == 0 || secs > 3600 {
                    return Err("must be in 1..=3600 seconds".into());
                }
                Ok(Duration::from_secs(secs))
            },
        );
        let vxlan_port = check(&mut errs, "--vxlan-port", Some(&flags.vxlan_port), port);
        let wireguard_port = check(
            &mut errs,
            "--wireguard-port",
            Some(&flags.wireguard_port),
            port,
        );
        if let (Some(a), Some(b)) = (vxlan_port, wireguard_port) {
            if a == b {
                errs.push(ConfigError::Conflict {
                    flags: "--vxlan-port and --wireguard-port (same port)",
                });
            }
        }
        let defaults = crate::trust::Rules::default();
        let trust = crate::trust::Rules {
            min_prefix_v4: check(
                &mut errs,
                "--min-pod-cidr-prefix-v4",
                Some(&flags.min_pod_cidr_prefix_v4),
                prefix_len(32),
            )
            .unwrap_or(defaults.min_prefix_v4),
            min_prefix_v6: check(
                &mut errs,
                "--min-pod-cidr-prefix-v6",
                Some(&flags.min_pod_cidr_prefix_v6),
                prefix_len(128),
            )
            .unwrap_or(defaults.min_prefix_v6),
        };
        if let (Some(ip), Some(cidr)) = (node_ip, pod_cidr) {
            if cidr.contains(&ip) {
                errs.push(ConfigError::Invalid {
                    flag: "--node-ip",
                    value: ip.to_string(),
                    reason: format!("lies inside the pod CIDR {cidr}"),
                });
            }
        }
        match (
            cluster_name,
            cluster_id,
            node_name,
            node_ip,
            pod_cidr,
            etcd,
            routing,
            encryption,
            bpffs,
            state_dir,
            cni_socket,
            status_socket,
            sync_timeout,
            vxlan_port,
            wireguard_port,
        ) {
            (
                Some(cluster_name),
                Some(cluster_id),
                Some(node_name),
                Some(node_ip),
                Some(pod_cidr),
                Some(etcd),
                Some(routing),
                Some(encryption),
                Some(bpffs),
                Some(state_dir),
                Some(cni_socket),
                Some(status_socket),
                Some(sync_timeout),
                Some(vxlan_port),
                Some(wireguard_port),
            ) if errs.is_empty() => Ok(Self {
                cluster_name,
                cluster_id,
                max_connected_clusters,
                node_name,
                node_ip,
                pod_cidr,
                source,
                apiserver,
                etcd,
                clustermesh_config,
                routing,
                encryption,
                bpffs,
                state_dir,
                cni_socket,
                status_socket,
                metrics_listen,
                netns,
                sync_timeout,
                vxlan_port,
                wireguard_port,
                trust,
            }),
            _ => Err(ConfigErrors(errs)),
        }
    }

    /// The MTU of pod interfaces in this mode: WireGuard overhead wins over
    /// VXLAN's (VXLAN packets travel inside WireGuard and the datapath
    /// redirects without an MTU check, so the smaller of the two must hold).
    pub fn pod_mtu(&self) -> u32 {
        match (self.encryption, self.routing) {
            (Encryption::Wireguard, Routing::Tunnel) => MTU_TUNNEL_WIREGUARD,
            (Encryption::Wireguard, Routing::Native) => MTU_WIREGUARD,
            (Encryption::None, Routing::Tunnel) => MTU_TUNNEL,
            (Encryption::None, Routing::Native) => MTU_NATIVE,
        }
    }
}

/// One invalid or missing configuration value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required value was not given.
    #[error("{flag} is required")]
    Missing {
        /// The flag (and its alternatives).
        flag: &'static str,
    },
    /// A value does not parse or is out of range.
    #[error("{flag}: invalid value {value:?}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// Two values exclude each other.
    #[error("conflicting values: {flags}")]
    Conflict {
        /// The flags in conflict.
        flags: &'static str,
    },
}

/// Every problem found in one configuration, in flag order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problems)", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Runs `parse` on a present value; records a [`ConfigError`] for a missing
/// or invalid one.
fn check<T>(
    errs: &mut Vec<ConfigError>,
    flag: &'static str,
    value: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    let Some(value) = value else {
        errs.push(ConfigError::Missing { flag });
        return None;
    };
    match parse(value.trim()) {
        Ok(v) => Some(v),
        Err(reason) => {
            errs.push(ConfigError::Invalid {
                flag,
                value: value.to_owned(),
                reason,
            });
            None
        }
    }
}

fn validate_url(v: &str) -> Result<(), String> {
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
        .ok_or_else(|| "must start with http:// or https://".to_owned())?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| "must name a port, e.g. http://127.0.0.1:2379".to_owned())?;
    if host.is_empty() {
        return Err("no host".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number"))?;
    Ok(())
}

fn non_empty_path(v: &str) -> Result<PathBuf, String> {
    if v.is_empty() {
        return Err("empty path".into());
    }
    Ok(PathBuf::from(v))
}

fn absolute_path(v: &str) -> Result<PathBuf, String> {
    let p = non_empty_path(v)?;
    if !p.is_absolute() {
        return Err("must be an absolute path".into());
    }
    Ok(p)
}

fn prefix_len(max: u8) -> impl FnOnce(&str) -> Result<u8, String> {
    move |v| match v.parse::<u8>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be a prefix length in 1..={max}")),
    }
}

fn port(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(0) | Err(_) => Err("must be a port in 1..=65535".into()),
        Ok(p) => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["node-agent"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).expect("clap accepts the flags")
    }

    const GOOD: &[&str] = &[
        "--cluster-name=c1",
        "--cluster-id=1",
        "--node-name=n1",
        "--node-ip=192.168.1.2",
        "--pod-cidr=10.1.1.0/24",
        "--etcd-endpoints=http://192.168.1.10:2379",
    ];

    #[test]
    fn the_source_and_its_kubeconfig() {
        let with = |extra: &[&str]| Config::from_flags(&flags(&[GOOD, extra].concat()));
        assert_eq!(with(&[]).unwrap().source, Source::Standalone);
        assert_eq!(
            with(&["--source=kubernetes", "--kubeconfig=/etc/kube/config"])
                .unwrap()
                .source,
            Source::Kubernetes {
                kubeconfig: Some("/etc/kube/config".into())
            }
        );
        let errs = with(&["--source=k8s"]).unwrap_err().to_string();
        assert!(errs.contains("--source: invalid value \"k8s\""), "{errs}");
        let errs = with(&["--kubeconfig=/x"]).unwrap_err().to_string();
        assert!(
            errs.contains("--kubeconfig needs --source kubernetes"),
            "{errs}"
        );
    }

    #[test]
    fn good_flags_give_a_config_with_defaults() {
        let c = Config::from_flags(&flags(GOOD)).expect("valid");
        assert_eq!(c.cluster_name, "c1");
        assert_eq!(c.cluster_id.get(), 1);
        assert_eq!(c.node_ip, Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(c.pod_cidr.to_string(), "10.1.1.0/24");
        assert_eq!(
            c.etcd,
            EtcdSource::Endpoints(vec!["http://192.168.1.10:2379".into()])
        );
        assert_eq!(c.routing, Routing::Tunnel);
        assert_eq!(c.encryption, Encryption::None);
        assert_eq!(c.pod_mtu(), MTU_TUNNEL);
        assert_eq!(c.sync_timeout, Duration::from_secs(60));
        assert!(c.apiserver.is_none());
    }

    #[test]
    fn the_minimum_pod_cidr_prefixes_are_flags() {
        let c = Config::from_flags(&flags(GOOD)).unwrap();
        assert_eq!(c.trust, crate::trust::Rules::default());
        let mut args = GOOD.to_vec();
        args.extend(["--min-pod-cidr-prefix-v4=20", "--min-pod-cidr-prefix-v6=64"]);
        let c = Config::from_flags(&flags(&args)).unwrap();
        assert_eq!((c.trust.min_prefix_v4, c.trust.min_prefix_v6), (20, 64));
        let mut args = GOOD.to_vec();
        args.extend(["--min-pod-cidr-prefix-v4=33", "--min-pod-cidr-prefix-v6=0"]);
        let err = Config::from_flags(&flags(&args)).unwrap_err().to_string();
        assert!(
            err.contains("--min-pod-cidr-prefix-v4") && err.contains("1..=32"),
            "{err}"
        );
        assert!(
            err.contains("--min-pod-cidr-prefix-v6") && err.contains("1..=128"),
            "{err}"
        );
    }

    #[test]
    fn mtu_follows_the_mode() {
        let mut args = GOOD.to_vec();
        args.push("--encryption=wireguard");
        // VXLAN inside WireGuard: 1420 - 50.
        assert_eq!(Config::from_flags(&flags(&args)).unwrap().pod_mtu(), 1370);
        args.push("--routing=native");
        assert_eq!(Config::from_flags(&flags(&args)).unwrap().pod_mtu(), 1420);
        let mut args = GOOD.to_vec();
        args.push("--routing=native");
        assert_eq!(Config::from_flags(&flags(&args)).unwrap().pod_mtu(), 1500);
    }

    #[test]
    fn every_invalid_value_is_reported_at_once() {
        let f = flags(&[
            "--cluster-name=Bad_Name",
            "--cluster-id=300",
            "--node-ip=127.0.0.1",
            "--pod-cidr=10.1.1.5/24",
            "--routing=carrier-pigeon",
            "--encryption=rot13",
            "--state-dir=relative/dir",
            "--metrics-listen=nowhere",
        ]);
        let errs = Config::from_flags(&f).unwrap_err();
        let text = errs.to_string();
        for needle in [
            "--cluster-name: invalid value \"Bad_Name\"",
            "--cluster-id: invalid value \"300\": must be in 1..=255",
            "--node-name is required",
            "--node-ip: invalid value \"127.0.0.1\": not a unicast address",
            "--pod-cidr: invalid value \"10.1.1.5/24\": host bits set (the network is 10.1.1.0/24)",
            "--etcd-endpoints or --etcd-config is required",
            "--routing: invalid value \"carrier-pigeon\"",
            "--encryption: invalid value \"rot13\"",
            "--state-dir: invalid value \"relative/dir\": must be an absolute path",
            "--metrics-listen: invalid value \"nowhere\"",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert_eq!(errs.0.len(), 10, "{text}");
    }

    #[test]
    fn cross_field_checks() {
        let mut args = GOOD.to_vec();
        args.extend_from_slice(&[
            "--etcd-config=/etc/mesh/etcd.yaml",
            "--vxlan-port=4789",
            "--wireguard-port=4789",
        ]);
        let text = Config::from_flags(&flags(&args)).unwrap_err().to_string();
        assert!(
            text.contains("--etcd-endpoints and --etcd-config"),
            "{text}"
        );
        assert!(text.contains("--vxlan-port and --wireguard-port"), "{text}");

        let mut args = GOOD.to_vec();
        args[3] = "--node-ip=10.1.1.9";
        let text = Config::from_flags(&flags(&args)).unwrap_err().to_string();
        assert!(
            text.contains("lies inside the pod CIDR 10.1.1.0/24"),
            "{text}"
        );
    }

    #[test]
    fn cluster_id_range_follows_max_connected_clusters() {
        let mut args = GOOD.to_vec();
        args[1] = "--cluster-id=400";
        assert!(Config::from_flags(&flags(&args)).is_err());
        args.push("--max-connected-clusters=511");
        assert_eq!(
            Config::from_flags(&flags(&args)).unwrap().cluster_id.get(),
            400
        );
        args[1] = "--cluster-id=0";
        assert!(Config::from_flags(&flags(&args)).is_err());
    }
}
