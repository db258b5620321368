//! Certificates for a cluster's etcd, made with rcgen: one CA per cluster, a
//! server certificate for the addresses etcd listens on, and one client
//! certificate per reader (the cluster's own agents, and each remote cluster
//! that connects to it).
//!
//! Layout of a cluster's PKI directory (all PEM):
//!
//! | file | what |
//! |---|---|
//! | `ca.crt`, `ca.key` | the cluster's etcd CA |
//! | `server.crt`, `server.key` | etcd's server certificate |
//! | `client-<reader>.crt`, `client-<reader>.key` | a client certificate, CN `<reader>` |
//!
//! Keys are written with mode 0600. The CA key stays in the directory, so
//! `clustermesh connect` can issue a client certificate for a cluster that
//! joins later.

use crate::file::FileError;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Errors making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused.
    #[error("cannot generate {what}")]
    Generate {
        /// Which certificate.
        what: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] crate::file::FileError),
    /// The CA files do not parse.
    #[error("cannot load the CA in {dir}: run `meshctl clustermesh enable` first")]
    LoadCa {
        /// The PKI directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
}

/// A client certificate and key, as file paths.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// The PKI directory of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterPki {
    dir: PathBuf,
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io = FileError::at("write", path);
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    Ok(file.write_all(contents.as_bytes()).map_err(io)?)
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    Ok(std::fs::read_to_string(path).map_err(FileError::at("read", path))?)
}

impl ClusterPki {
    /// The PKI in `dir` (nothing is read or written yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The server certificate and key.
    pub fn server(&self) -> ClientFiles {
        ClientFiles {
            cert: self.dir.join("server.crt"),
            key: self.dir.join("server.key"),
        }
    }

    /// The client certificate files for `reader`.
    pub fn client(&self, reader: &str) -> ClientFiles {
        ClientFiles {
            cert: self.dir.join(format!("client-{reader}.crt")),
            key: self.dir.join(format!("client-{reader}.key")),
        }
    }

    /// Whether the CA exists.
    pub fn exists(&self) -> bool {
        self.ca_cert().exists() && self.dir.join("ca.key").exists()
    }

    /// Creates the CA and a server certificate for `cluster`'s etcd valid for
    /// `server_ips` and `localhost`, unless the CA exists already (then only the
    /// server certificate is re-issued, so existing client certificates stay valid).
    ///
    /// # Errors
    ///
    /// [`PkiError`].
    pub fn enable(&self, cluster: &str, server_ips: &[IpAddr]) -> Result<(), PkiError> {
        std::fs::create_dir_all(&self.dir).map_err(FileError::at("write", &self.dir))?;
        if !self.exists() {
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|source| {
                PkiError::Generate {
                    what: format!("CA of {cluster}"),
                    source,
                }
            })?;
            params
                .distinguished_name
                .push(DnType::CommonName, format!("{cluster} etcd CA"));
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().map_err(|source| PkiError::Generate {
                what: format!("CA key of {cluster}"),
                source,
            })?;
            let cert = params
                .self_signed(&key)
                .map_err(|source| PkiError::Generate {
                    what: format!("CA of {cluster}"),
                    source,
                })?;
            write_file(&self.dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
            write_file(&self.ca_cert(), &cert.pem(), 0o644)?;
        }
        let mut sans: Vec<SanType> = server_ips
            .iter()
            .map(|ip| SanType::IpAddress(*ip))
            .collect();
        sans.push(SanType::DnsName(
            "localhost"
                .try_into()
                .expect("localhost is a valid DNS name"),
        ));
        self.issue(
            &format!("{cluster} etcd server"),
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            &self.server(),
        )
    }

    /// Issues (or re-issues) the client certificate of `reader`.
    ///
    /// # Errors
    ///
    /// [`PkiError`], e.g. [`PkiError::LoadCa`] before [`Self::enable`].
    pub fn issue_client(&self, reader: &str) -> Result<ClientFiles, PkiError> {
        let files = self.client(reader);
        self.issue(
            reader,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            &files,
        )?;
        Ok(files)
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        files: &ClientFiles,
    ) -> Result<(), PkiError> {
        let load = |source| PkiError::LoadCa {
            dir: self.dir.clone(),
            source,
        };
        let ca_key = KeyPair::from_pem(&read_file(&self.dir.join("ca.key"))?).map_err(load)?;
        let issuer =
            Issuer::from_ca_cert_pem(&read_file(&self.ca_cert())?, ca_key).map_err(load)?;
        let generate = |source| PkiError::Generate {
            what: format!("certificate {common_name:?}"),
            source,
        };
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().map_err(generate)?;
        let cert = params.signed_by(&key, &issuer).map_err(generate)?;
        write_file(&files.key, &key.serialize_pem(), 0o600)?;
        write_file(&files.cert, &cert.pem(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enable_then_issue() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ClusterPki::new(dir.path().join("c1"));
        assert!(matches!(
            pki.issue_client("c2"),
            Err(PkiError::Io(FileError { action: "read", .. }))
        ));
        pki.enable("c1", &["192.168.1.1".parse().unwrap()]).unwrap();
        let ca_before = std::fs::read_to_string(pki.ca_cert()).unwrap();
        let client = pki.issue_client("c2").unwrap();
        assert!(std::fs::read_to_string(&client.cert)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        // Enabling again keeps the CA, so client certificates stay valid.
        pki.enable("c1", &["192.168.1.1".parse().unwrap()]).unwrap();
        assert_eq!(std::fs::read_to_string(pki.ca_cert()).unwrap(), ca_before);
        let mode = std::fs::metadata(&client.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
