//! Remote-cluster config files in Cilium's format, and the checks `connect`
//! makes before joining two clusters.
//!
//! A node agent reads one file per remote cluster from its
//! `--clustermesh-config` directory, exactly as a Cilium agent reads
//! `/var/lib/cilium/clustermesh/`: the file is named after the cluster and holds
//!
//! ```yaml
//! endpoints:
//! - https://192.168.2.1:2379
//! trusted-ca-file: /path/c2.etcd-client-ca.crt
//! cert-file: /path/c2.etcd-client.crt
//! key-file: /path/c2.etcd-client.key
//! ```
//!
//! The certificates sit beside it as `<cluster>.etcd-client-ca.crt`,
//! `<cluster>.etcd-client.crt` and `<cluster>.etcd-client.key` (names with a dot,
//! which are never taken for a cluster config). The file is written to a
//! temporary name starting with `.` and renamed, so an agent watching the
//! directory never reads half a file.

use crate::file::FileError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Errors of config files and connect checks.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] crate::file::FileError),
    /// The file is not a Cilium etcd config.
    #[error("{path} is not a Cilium-style etcd config (endpoints, trusted-ca-file, cert-file, key-file)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_yaml::Error,
    },
    /// The file parses but lacks something.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Two clusters share a name.
    #[error("cannot connect {a} and {b}: both are named {name:?}; cluster names must be unique in a mesh")]
    DuplicateName {
        /// One cluster (by where it comes from).
        a: String,
        /// The other.
        b: String,
        /// The shared name.
        name: String,
    },
    /// Two clusters share an ID.
    #[error("cannot connect {a} and {b}: both have cluster ID {id}; cluster IDs must be unique in a mesh")]
    DuplicateId {
        /// One cluster.
        a: String,
        /// The other.
        b: String,
        /// The shared ID.
        id: u32,
    },
    /// Pod CIDRs overlap.
    #[error(
        "cannot connect {a} and {b}: pod CIDR {a_cidr} of {a} overlaps pod CIDR {b_cidr} of {b}"
    )]
    OverlappingCidrs {
        /// One cluster.
        a: String,
        /// Its CIDR.
        a_cidr: IpNet,
        /// The other.
        b: String,
        /// Its CIDR.
        b_cidr: IpNet,
    },
}

/// A Cilium-style etcd config file (FIXED: Cilium's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdConfig {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// CA that signed the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Client key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The mesh's extension (not Cilium's): the cluster's pod address
    /// space. Its nodes' pod CIDRs must lie inside; its endpoints may lie
    /// anywhere inside (the agent's ownership checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_pod_cidrs: Vec<ipnet::IpNet>,
    /// The mesh's extension: where the cluster's nodes' underlay addresses
    /// lie.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_node_cidrs: Vec<ipnet::IpNet>,
}

impl EtcdConfig {
    /// Reads and checks a config file; relative certificate paths are resolved
    /// against the file's directory.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the file cannot be read, does not parse, has no
    /// endpoints, or names certificate files that do not exist.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(FileError::at("read", path))?;
        let mut config: Self =
            serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let invalid = |problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        };
        if config.endpoints.is_empty() {
            return Err(invalid("no endpoints".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for (field, file) in [
            ("trusted-ca-file", &mut config.trusted_ca_file),
            ("cert-file", &mut config.cert_file),
            ("key-file", &mut config.key_file),
        ] {
            if let Some(file) = file {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
                if !file.exists() {
                    return Err(invalid(format!(
                        "{field} {} does not exist",
                        file.display()
                    )));
                }
            }
        }
        if config.cert_file.is_some() != config.key_file.is_some() {
            return Err(invalid("cert-file and key-file go together".into()));
        }
        Ok(config)
    }

    /// Writes this config for cluster `name` into an agent's config directory,
    /// copying the certificate files beside it under Cilium's names.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Io`].
    pub fn install(&self, dir: &Path, name: &str) -> Result<PathBuf, ConfigError> {
        let io = FileError::at;
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut installed = self.clone();
        for (suffix, file) in [
            ("etcd-client-ca.crt", &mut installed.trusted_ca_file),
            ("etcd-client.crt", &mut installed.cert_file),
            ("etcd-client.key", &mut installed.key_file),
        ] {
            if let Some(src) = file {
                let dst = dir.join(format!("{name}.{suffix}"));
                let tmp = dir.join(format!(".{name}.{suffix}.tmp"));
                std::fs::copy(&*src, &tmp).map_err(io("copy to", &tmp))?;
                std::fs::rename(&tmp, &dst).map_err(io("write", &dst))?;
                *file = Some(dst);
            }
        }
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let text = serde_yaml::to_string(&installed).expect("config serializes");
        std::fs::write(&tmp, text).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("write", &path))?;
        Ok(path)
    }
}

/// Removes cluster `name`'s config and certificates from an agent's directory.
/// Missing files are fine (disconnecting twice is harmless).
///
/// # Errors
///
/// [`ConfigError::Io`] for any other failure.
pub fn uninstall(dir: &Path, name: &str) -> Result<(), ConfigError> {
    // The config file goes first: the agent drops the cluster when it disappears.
    let files = [
        name.to_owned(),
        format!("{name}.etcd-client-ca.crt"),
        format!("{name}.etcd-client.crt"),
        format!("{name}.etcd-client.key"),
    ];
    for file in files {
        let path = dir.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(FileError {
                    action: "remove",
                    path,
                    source,
                }
                .into())
            }
        }
    }
    Ok(())
}

/// What `connect` knows about a cluster to check it against another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterFacts {
    /// Where this cluster comes from, for messages (e.g. `lab cluster c1` or a file).
    pub origin: String,
    /// Its name.
    pub name: String,
    /// Its ID.
    pub id: u32,
    /// Its pod CIDRs (IPv4 and IPv6).
    pub pod_cidrs: Vec<IpNet>,
}

/// Checks that `a` and `b` can join one mesh: distinct names, distinct IDs and
/// no overlapping pod CIDRs.
///
/// # Errors
///
/// The first clash found, naming both clusters and the clashing values.
pub fn check_compatible(a: &ClusterFacts, b: &ClusterFacts) -> Result<(), ConfigError> {
    if a.name == b.name {
        return Err(ConfigError::DuplicateName {
            a: a.origin.clone(),
            b: b.origin.clone(),
            name: a.name.clone(),
        });
    }
    if a.id == b.id {
        return Err(ConfigError::DuplicateId {
            a: a.name.clone(),
            b: b.name.clone(),
            id: a.id,
        });
    }
    for a_cidr in &a.pod_cidrs {
        for b_cidr in &b.pod_cidrs {
            if a_cidr.contains(b_cidr) || b_cidr.contains(a_cidr) {
                return Err(ConfigError::OverlappingCidrs {
                    a: a.name.clone(),
                    a_cidr: *a_cidr,
                    b: b.name.clone(),
                    b_cidr: *b_cidr,
                });
            }
        }
    }
    Ok(())
}

/// Checks every pair of a set of clusters (a whole mesh).
///
/// # Errors
///
/// See [`check_compatible`].
pub fn check_mesh(clusters: &[ClusterFacts]) -> Result<(), ConfigError> {
    for (i, a) in clusters.iter().enumerate() {
        for b in &clusters[i + 1..] {
            check_compatible(a, b)?;
        }
    }
    Ok(())
}

/// The cluster names configured in an agent's config directory (files whose
/// name has no dot and does not start with one).
pub fn configured_clusters(dir: &Path) -> BTreeMap<String, PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            (!name.contains('.')).then(|| (name, e.path()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str, id: u32, cidr: &str) -> ClusterFacts {
        ClusterFacts {
            origin: format!("cluster {name}"),
            name: name.into(),
            id,
            pod_cidrs: vec![cidr.parse().unwrap()],
        }
    }

    #[test]
    fn clashes_are_named() {
        let c1 = facts("c1", 1, "10.1.0.0/16");
        check_compatible(&c1, &facts("c2", 2, "10.2.0.0/16")).unwrap();
        let err = check_compatible(&c1, &facts("c1", 2, "10.2.0.0/16")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot connect cluster c1 and cluster c1: both are named \"c1\"; cluster names must be unique in a mesh"
        );
        let err = check_compatible(&c1, &facts("c2", 1, "10.2.0.0/16")).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot connect c1 and c2: both have cluster ID 1"),
            "{err}"
        );
        let err = check_compatible(&c1, &facts("c2", 2, "10.1.128.0/17")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot connect c1 and c2: pod CIDR 10.1.0.0/16 of c1 overlaps pod CIDR 10.1.128.0/17 of c2"
        );
        let mesh = [
            c1,
            facts("c2", 2, "10.2.0.0/16"),
            facts("c3", 2, "10.3.0.0/16"),
        ];
        assert!(matches!(
            check_mesh(&mesh),
            Err(ConfigError::DuplicateId { id: 2, .. })
        ));
    }

    #[test]
    fn install_load_uninstall() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        // The agent checks that TLS files hold PEM, so each holds a PEM block
        // that names the file.
        let pem = |f: &str| format!("-----BEGIN {f}-----\nAAAA\n-----END {f}-----\n");
        for f in ["ca.crt", "c.crt", "c.key"] {
            std::fs::write(src.join(f), pem(f)).unwrap();
        }
        let config = EtcdConfig {
            endpoints: vec!["https://192.168.2.1:2379".into()],
            trusted_ca_file: Some(src.join("ca.crt")),
            cert_file: Some(src.join("c.crt")),
            key_file: Some(src.join("c.key")),
            allowed_pod_cidrs: vec!["10.2.0.0/16".parse().unwrap()],
            allowed_node_cidrs: Vec::new(),
        };
        let agent = dir.path().join("agent");
        let path = config.install(&agent, "c2").unwrap();
        assert_eq!(path, agent.join("c2"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("trusted-ca-file:"), "{text}");
        assert!(text.contains("allowed-pod-cidrs:"), "{text}");
        assert!(
            !text.contains("allowed-node-cidrs"),
            "empty lists are left out: {text}"
        );
        // The agent reads what meshctl writes.
        let agent_view = kvstore::EtcdConfig::from_file(&path).unwrap();
        assert_eq!(agent_view.allowed_pod_cidrs, config.allowed_pod_cidrs);
        let loaded = EtcdConfig::load(&path).unwrap();
        assert_eq!(loaded.endpoints, config.endpoints);
        assert_eq!(loaded.allowed_pod_cidrs, config.allowed_pod_cidrs);
        assert_eq!(
            std::fs::read_to_string(loaded.cert_file.unwrap()).unwrap(),
            pem("c.crt")
        );
        assert_eq!(
            configured_clusters(&agent).into_keys().collect::<Vec<_>>(),
            ["c2"]
        );
        uninstall(&agent, "c2").unwrap();
        uninstall(&agent, "c2").unwrap();
        assert_eq!(std::fs::read_dir(&agent).unwrap().count(), 0);
    }

    #[test]
    fn load_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, "endpoints: []\n").unwrap();
        assert!(EtcdConfig::load(&path)
            .unwrap_err()
            .to_string()
            .ends_with("no endpoints"));
        std::fs::write(&path, "endpoints: [https://a:1]\ncert-file: nope.crt\n").unwrap();
        let err = EtcdConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("cert-file") && err.contains("does not exist"),
            "{err}"
        );
        std::fs::write(&path, "- not a map\n").unwrap();
        assert!(matches!(
            EtcdConfig::load(&path),
            Err(ConfigError::Parse { .. })
        ));
    }
}
