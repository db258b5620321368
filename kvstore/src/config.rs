//! Connection settings, from a Cilium-style etcd config file or given
//! directly, and [`connect`].
//!
//! The file format is Cilium's (one file per remote cluster):
//!
//! ```yaml
//! endpoints:
//! - https://c1.mesh.example:2379
//! trusted-ca-file: ca.crt      # relative paths are relative to this file's directory
//! cert-file: client.crt
//! key-file: client.key
//! ```
//!
//! The whole file is validated when it is read, and the certificate files are
//! read then too, so a broken config is reported once, naming the file and the
//! key, rather than as a connection failure later.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use serde::Deserialize;

use crate::backend::{BackendError, ListWatch};
use crate::etcd::EtcdBackend;

/// Errors in connection settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read etcd config {path}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not the expected YAML.
    #[error("etcd config {path} is not valid YAML with the expected keys")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_yaml::Error,
    },
    /// No endpoint is given.
    #[error("etcd config {origin}: `endpoints` is missing or empty")]
    NoEndpoints {
        /// The config file, or "settings" when given directly.
        origin: String,
    },
    /// An endpoint is not an http:// or https:// URL.
    #[error("etcd config {origin}: endpoint {endpoint:?} in `endpoints` must start with http:// or https://")]
    InvalidEndpoint {
        /// The config file, or "settings".
        origin: String,
        /// The offending endpoint.
        endpoint: String,
    },
    /// Endpoints mix http:// and https://, or TLS files are set for
    /// plain-text endpoints.
    #[error("etcd config {origin}: endpoint {endpoint:?} is plain http but TLS files are configured (use https://)")]
    PlainEndpointWithTls {
        /// The config file, or "settings".
        origin: String,
        /// The offending endpoint.
        endpoint: String,
    },
    /// https:// endpoints without `trusted-ca-file`.
    #[error("etcd config {origin}: https endpoints need `trusted-ca-file`")]
    MissingCa {
        /// The config file, or "settings".
        origin: String,
    },
    /// Only one of `cert-file` and `key-file` is set.
    #[error("etcd config {origin}: `{present}` is set but `{missing}` is not")]
    HalfIdentity {
        /// The config file, or "settings".
        origin: String,
        /// The key that is set.
        present: &'static str,
        /// The key that is missing.
        missing: &'static str,
    },
    /// A certificate or key file cannot be read.
    #[error("etcd config {origin}: cannot read `{key}` file {file}")]
    ReadTlsFile {
        /// The config file, or "settings".
        origin: String,
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An entry of `allowed-pod-cidrs` or `allowed-node-cidrs` is not a CIDR.
    #[error("etcd config {origin}: {value:?} in `{key}` is not a CIDR (e.g. 10.20.0.0/16)")]
    InvalidCidr {
        /// The config file.
        origin: String,
        /// The key.
        key: &'static str,
        /// The offending entry.
        value: String,
    },
    /// A certificate or key file holds no PEM block.
    #[error("etcd config {origin}: `{key}` file {file} is not PEM")]
    NotPem {
        /// The config file, or "settings".
        origin: String,
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        file: PathBuf,
    },
}

/// Largest config or TLS file read, in bytes.
const MAX_FILE: u64 = 1 << 20;

/// Reads a regular file of at most [`MAX_FILE`] bytes: a device, a FIFO or
/// a huge file named by a config is an error, never a hang (the type is
/// checked before opening, which blocks on a FIFO).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE} bytes"),
        ));
    }
    Ok(bytes)
}

/// Errors connecting to etcd.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The client could not be set up (bad URL, bad TLS material).
    #[error("cannot set up an etcd client for {endpoints} ({origin})")]
    Client {
        /// The endpoints, comma separated.
        endpoints: String,
        /// The config file, or "settings".
        origin: String,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer a first request: unreachable, TLS handshake
    /// refused (e.g. no or a wrong client certificate), or no leader.
    #[error("etcd at {endpoints} ({origin}) refused or did not answer a first request")]
    Unreachable {
        /// The endpoints, comma separated.
        endpoints: String,
        /// The config file, or "settings".
        origin: String,
        /// The failed request.
        #[source]
        source: BackendError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileFormat {
    #[serde(default)]
    endpoints: Vec<String>,
    trusted_ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    /// The mesh's extensions (Cilium does not read them): the cluster's pod
    /// address space, and its nodes' underlay addresses.
    #[serde(default)]
    allowed_pod_cidrs: Vec<String>,
    #[serde(default)]
    allowed_node_cidrs: Vec<String>,
}

/// TLS material, read from files.
#[derive(Clone)]
pub struct TlsMaterial {
    ca_pem: Vec<u8>,
    /// Client certificate and key, PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("client_identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Validated connection settings for one etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs.
    pub endpoints: Vec<String>,
    tls: Option<TlsMaterial>,
    origin: String,
    /// Deadline of each unary request (default 10 s).
    pub request_timeout: Duration,
    /// Deadline of establishing a connection (default 5 s).
    pub connect_timeout: Duration,
    /// `allowed-pod-cidrs:` of the config file (the mesh's extension of
    /// Cilium's format): the cluster's pod address space. Its nodes' pod
    /// CIDRs must lie inside, and its endpoints may lie anywhere inside (for
    /// pods that take VPC addresses).
    pub allowed_pod_cidrs: Vec<ipnet::IpNet>,
    /// `allowed-node-cidrs:`: where the cluster's nodes' underlay addresses
    /// must lie.
    pub allowed_node_cidrs: Vec<ipnet::IpNet>,
}

/// Paths of TLS files for [`EtcdConfig::from_endpoints`], as a config file
/// would give them.
#[derive(Debug, Clone, Default)]
pub struct TlsPaths {
    /// `trusted-ca-file`.
    pub trusted_ca_file: Option<PathBuf>,
    /// `cert-file`.
    pub cert_file: Option<PathBuf>,
    /// `key-file`.
    pub key_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// Reads and validates a Cilium-style etcd config file (module docs).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the file and, where one is at fault, the key.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let bytes = read_bounded(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&String::from_utf8_lossy(&bytes), path)
    }

    /// Validates the text of a config file found at `path` (relative TLS
    /// paths are resolved against its directory, and the TLS files read).
    ///
    /// # Errors
    ///
    /// As [`EtcdConfig::from_file`].
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileFormat = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let resolve = |p: Option<PathBuf>| p.map(|p| base.join(p));
        let paths = TlsPaths {
            trusted_ca_file: resolve(file.trusted_ca_file),
            cert_file: resolve(file.cert_file),
            key_file: resolve(file.key_file),
        };
        let origin = path.display().to_string();
        let cidrs = |key: &'static str, list: &[String]| {
            list.iter()
                .map(|c| {
                    c.parse::<ipnet::IpNet>()
                        .map_err(|_| ConfigError::InvalidCidr {
                            origin: origin.clone(),
                            key,
                            value: c.clone(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let allowed_pod_cidrs = cidrs("allowed-pod-cidrs", &file.allowed_pod_cidrs)?;
        let allowed_node_cidrs = cidrs("allowed-node-cidrs", &file.allowed_node_cidrs)?;
        Ok(Self {
            allowed_pod_cidrs,
            allowed_node_cidrs,
            ..Self::build(file.endpoints, &paths, origin)?
        })
    }

    /// Settings from endpoints and optional TLS files (paths used as given).
    ///
    /// # Errors
    ///
    /// As [`EtcdConfig::from_file`].
    pub fn from_endpoints<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
        tls: &TlsPaths,
    ) -> Result<Self, ConfigError> {
        let endpoints = endpoints.into_iter().map(Into::into).collect();
        Self::build(endpoints, tls, "settings".to_owned())
    }

    /// Where the settings came from: the config file, or "settings".
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether clients present a client certificate.
    pub fn has_client_identity(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.identity.is_some())
    }

    fn build(
        endpoints: Vec<String>,
        paths: &TlsPaths,
        origin: String,
    ) -> Result<Self, ConfigError> {
        if endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints { origin });
        }
        let mut any_https = false;
        for endpoint in &endpoints {
            if endpoint.starts_with("https://") {
                any_https = true;
            } else if !endpoint.starts_with("http://") {
                return Err(ConfigError::InvalidEndpoint {
                    origin,
                    endpoint: endpoint.clone(),
                });
            }
        }
        let read = |key: &'static str, file: &Path| -> Result<Vec<u8>, ConfigError> {
            let bytes = read_bounded(file).map_err(|source| ConfigError::ReadTlsFile {
                origin: origin.clone(),
                key,
                file: file.to_owned(),
                source,
            })?;
            if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
                return Err(ConfigError::NotPem {
                    origin: origin.clone(),
                    key,
                    file: file.to_owned(),
                });
            }
            Ok(bytes)
        };
        let identity = match (&paths.cert_file, &paths.key_file) {
            (Some(cert), Some(key)) => Some((read("cert-file", cert)?, read("key-file", key)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::HalfIdentity {
                    origin,
                    present: "cert-file",
                    missing: "key-file",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::HalfIdentity {
                    origin,
                    present: "key-file",
                    missing: "cert-file",
                })
            }
        };
        let ca = match &paths.trusted_ca_file {
            Some(file) => Some(read("trusted-ca-file", file)?),
            None => None,
        };
        let tls = match ca {
            Some(ca_pem) => Some(TlsMaterial { ca_pem, identity }),
            None if any_https => return Err(ConfigError::MissingCa { origin }),
            None if identity.is_some() => return Err(ConfigError::MissingCa { origin }),
            None => None,
        };
        if tls.is_some() {
            if let Some(plain) = endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(ConfigError::PlainEndpointWithTls {
                    origin,
                    endpoint: plain.clone(),
                });
            }
        }
        Ok(Self {
            endpoints,
            tls,
            origin,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            allowed_pod_cidrs: Vec::new(),
            allowed_node_cidrs: Vec::new(),
        })
    }

    pub(crate) fn connect_options(&self) -> ConnectOptions {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            let mut tls_opts = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                tls_opts = tls_opts.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls_opts);
        }
        opts
    }
}

/// Connects to etcd and checks the connection with a first request, so that
/// an unreachable server or a refused TLS handshake is reported here.
///
/// # Errors
///
/// [`ConnectError::Client`] when the client cannot be built,
/// [`ConnectError::Unreachable`] when the first request fails.
pub async fn connect(config: &EtcdConfig) -> Result<EtcdBackend, ConnectError> {
    let endpoints = config.endpoints.join(",");
    let client = etcd_client::Client::connect(&config.endpoints, Some(config.connect_options()))
        .await
        .map_err(|source| ConnectError::Client {
            endpoints: endpoints.clone(),
            origin: config.origin.clone(),
            source,
        })?;
    let backend = EtcdBackend::new(&client, config.request_timeout);
    backend
        .get(api::keys::HEARTBEAT_KEY)
        .await
        .map_err(|source| ConnectError::Unreachable {
            endpoints,
            origin: config.origin.clone(),
            source,
        })?;
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_cilium_file_with_relative_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "ca.crt", PEM);
        write(dir, "client.crt", PEM);
        write(dir, "client.key", PEM);
        let cfg = write(
            dir,
            "c1",
            "endpoints:\n- https://127.0.0.1:2379\ntrusted-ca-file: ca.crt\ncert-file: client.crt\nkey-file: client.key\nallowed-pod-cidrs: [172.20.0.0/16, 'fd00:20::/48']\n",
        );
        let config = EtcdConfig::from_file(&cfg).unwrap();
        assert_eq!(config.endpoints, ["https://127.0.0.1:2379"]);
        let allowed: Vec<String> = config
            .allowed_pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(allowed, ["172.20.0.0/16", "fd00:20::/48"]);
        assert!(config.has_client_identity());
        assert_eq!(config.origin(), cfg.display().to_string());
    }

    #[test]
    fn errors_name_file_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "ca.crt", PEM);
        write(dir, "notpem", "hello");
        let cases = [
            ("endpoints: []\n", "`endpoints` is missing or empty"),
            (
                "endpoints: [\"tcp://x\"]\n",
                "must start with http:// or https://",
            ),
            (
                "endpoints: [\"https://x\"]\n",
                "https endpoints need `trusted-ca-file`",
            ),
            (
                "endpoints: [\"https://x\"]\ntrusted-ca-file: ca.crt\ncert-file: ca.crt\n",
                "`cert-file` is set but `key-file` is not",
            ),
            (
                "endpoints: [\"https://x\"]\ntrusted-ca-file: missing.crt\n",
                "cannot read `trusted-ca-file` file",
            ),
            (
                "endpoints: [\"https://x\"]\ntrusted-ca-file: notpem\n",
                "`trusted-ca-file` file",
            ),
            (
                "endpoints: [\"http://x\"]\ntrusted-ca-file: ca.crt\n",
                "is plain http but TLS files are configured",
            ),
            (
                "endpoints: {a: 1}\n",
                "is not valid YAML with the expected keys",
            ),
            (
                "endpoints: [\"https://x\"]\ntrusted-ca-file: /dev/zero\n",
                "cannot read `trusted-ca-file` file /dev/zero",
            ),
            (
                "endpoints: [\"http://x\"]\nallowed-pod-cidrs: [10.0.0.0/33]\n",
                "\"10.0.0.0/33\" in `allowed-pod-cidrs` is not a CIDR",
            ),
        ];
        for (text, want) in cases {
            let path = write(dir, "cfg", text);
            let err = EtcdConfig::from_file(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
            assert!(
                err.contains(&path.display().to_string()),
                "{err:?} names the file"
            );
        }
        let err = EtcdConfig::from_file(&dir.join("absent")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }

    #[test]
    fn plain_endpoints_need_no_files() {
        let config =
            EtcdConfig::from_endpoints(["http://127.0.0.1:2379"], &TlsPaths::default()).unwrap();
        assert!(!config.has_client_identity());
        assert_eq!(config.origin(), "settings");
    }
}
