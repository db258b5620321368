//! Who may read and write a cluster's etcd: the users and roles of
//! [`kvstore::auth`], managed as etcd's `root` with a certificate of the
//! cluster's CA (`meshctl clustermesh enable`, `export --reader`,
//! `disconnect`, `revoke`).

use kvstore::auth::{self, Admin, AuthError};
use kvstore::{EtcdConfig, TlsPaths};

use crate::lab::ip::{self, IpError};
use crate::pki::{ClusterPki, PkiError};

/// Errors managing a cluster's etcd users.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The administrator's certificate.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The administrator's connection settings.
    #[error("etcd settings of {cluster}")]
    Config {
        /// The cluster.
        cluster: String,
        /// Why.
        #[source]
        source: kvstore::ConfigError,
    },
    /// etcd refused or could not be reached.
    #[error("managing the etcd users of {cluster}")]
    Auth {
        /// The cluster.
        cluster: String,
        /// Why.
        #[source]
        source: Box<AuthError>,
    },
    /// The namespace to reach etcd from could not be entered.
    #[error("reaching the etcd of {cluster}")]
    Netns {
        /// The cluster.
        cluster: String,
        /// Why.
        #[source]
        source: IpError,
    },
}

/// One cluster's etcd, as its administrator reaches it.
#[derive(Debug, Clone)]
pub struct EtcdAdmin<'a> {
    /// The cluster.
    pub cluster: &'a str,
    /// Its PKI (the CA issues `root`'s certificate).
    pub pki: &'a ClusterPki,
    /// etcd's client URLs.
    pub endpoints: Vec<String>,
    /// The network namespace to connect from (a lab's control namespace).
    pub netns: Option<&'a str>,
}

impl EtcdAdmin<'_> {
    /// Sets up the users and roles and turns authentication on
    /// ([`Admin::enable`]; idempotent).
    ///
    /// # Errors
    ///
    /// [`AccessError`].
    pub fn enable(&self) -> Result<(), AccessError> {
        let cluster = self.cluster.to_owned();
        self.run(move |mut admin| async move { admin.enable(&cluster).await })
    }

    /// Adds the read-only user `user` (its certificate CN).
    ///
    /// # Errors
    ///
    /// [`AccessError`].
    pub fn add_reader(&self, user: &str) -> Result<(), AccessError> {
        let user = user.to_owned();
        self.run(move |mut admin| async move { admin.add_reader(&user).await })
    }

    /// Deletes the user `user`; `Ok(false)` when there was none.
    ///
    /// # Errors
    ///
    /// [`AccessError`].
    pub fn revoke(&self, user: &str) -> Result<bool, AccessError> {
        let user = user.to_owned();
        self.run(move |mut admin| async move { admin.revoke(&user).await })
    }

    fn run<T, Fut>(&self, op: impl FnOnce(Admin) -> Fut + Send + 'static) -> Result<T, AccessError>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T, AuthError>>,
    {
        let root = self.pki.issue_client(auth::ROOT_USER)?;
        let config = EtcdConfig::from_endpoints(
            self.endpoints.clone(),
            &TlsPaths {
                trusted_ca_file: Some(self.pki.ca_cert()),
                cert_file: Some(root.cert),
                key_file: Some(root.key),
            },
        )
        .map_err(|source| AccessError::Config {
            cluster: self.cluster.to_owned(),
            source,
        })?;
        let cluster = self.cluster.to_owned();
        let outcome = ip::block_on(self.netns, move || async move {
            op(Admin::connect(&config).await?).await
        })
        .map_err(|source| AccessError::Netns {
            cluster: cluster.clone(),
            source,
        })?;
        outcome.map_err(|source| AccessError::Auth {
            cluster,
            source: Box::new(source),
        })
    }
}
