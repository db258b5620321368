//! etcd's users and roles for one cluster: least privilege, as Cilium
//! sets up its clustermesh etcd (`docs/architecture.md` §8).
//!
//! etcd's authentication is on and every client authenticates with its
//! certificate: etcd takes the certificate's common name as the user name.
//!
//! | user (certificate CN) | role | may |
//! |---|---|---|
//! | `root` | `root` | everything: kept with the CA, used only by `meshctl` to manage users |
//! | `apiserver` | `mesh-apiserver` | read and write `cilium/` and its private `mesh/registry/v1/<cluster>/` |
//! | `local` (the cluster's own agents) | `mesh-reader` | read what a reader needs (below) |
//! | `remote-<cluster>` (one per connected cluster) | `mesh-reader` | the same; deleting the user revokes it |
//!
//! `mesh-reader` may read the prefixes `cilium/state/`, `cilium/cache/`,
//! `cilium/synced/`, `cilium/cluster-config/` and the keys
//! `cilium/.heartbeat` and `cilium/.has-cluster-config`: everything the
//! agent's stores read, and nothing of the apiserver's private state. It
//! may write nothing. Cilium's layout is the same in spirit (its
//! `remote` role reads `cilium/`); ours also hides the apiserver's
//! `mesh/` prefix and cannot see keys a future writer puts elsewhere.
//!
//! [`Admin::enable`] is idempotent: it creates what is missing, makes each
//! role hold exactly its permissions (an extra grant is revoked), and turns
//! authentication on (etcd refuses that until `root` exists with the `root`
//! role). Users have no password: only a certificate of the cluster's CA
//! authenticates them.

use etcd_client::{Client, Permission, PermissionType, UserAddOptions};

use crate::config::{ConnectError, EtcdConfig};

/// The administrator's user (etcd's own `root`).
pub const ROOT_USER: &str = "root";
/// The clustermesh-apiserver's user.
pub const APISERVER_USER: &str = "apiserver";
/// The user of the cluster's own node agents.
pub const LOCAL_READER: &str = "local";

const ROOT_ROLE: &str = "root";
const APISERVER_ROLE: &str = "mesh-apiserver";
const READER_ROLE: &str = "mesh-reader";

/// The user with which cluster `cluster`'s agents read this etcd.
pub fn remote_reader(cluster: &str) -> String {
    format!("remote-{cluster}")
}

/// One permission: a key, or every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// The key, or the prefix.
    pub key: String,
    /// `key` is a prefix.
    pub prefix: bool,
    /// Writes are allowed too.
    pub write: bool,
}

impl Grant {
    fn read_prefix(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            prefix: true,
            write: false,
        }
    }

    fn read_key(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            prefix: false,
            write: false,
        }
    }

    fn write_prefix(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            prefix: true,
            write: true,
        }
    }

    fn range_end(&self) -> Vec<u8> {
        if self.prefix {
            prefix_end(self.key.as_bytes())
        } else {
            Vec::new()
        }
    }

    fn permission(&self) -> Permission {
        let kind = if self.write {
            PermissionType::Readwrite
        } else {
            PermissionType::Read
        };
        let permission = Permission::new(kind, self.key.as_bytes());
        if self.prefix {
            permission.with_prefix()
        } else {
            permission
        }
    }
}

/// The end of the range of keys starting with `prefix`, as etcd defines it.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What the apiserver of `cluster` may do.
pub fn apiserver_grants(cluster: &str) -> Vec<Grant> {
    vec![
        Grant::write_prefix("cilium/"),
        Grant::write_prefix(&api::keys::registry_prefix(cluster)),
    ]
}

/// What a reader (local agent or remote cluster) may do.
pub fn reader_grants() -> Vec<Grant> {
    vec![
        Grant::read_prefix(api::keys::STATE_PREFIX),
        Grant::read_prefix(api::keys::CACHE_PREFIX),
        Grant::read_prefix(api::keys::SYNCED_PREFIX),
        Grant::read_prefix(api::keys::CLUSTER_CONFIG_PREFIX),
        Grant::read_key(api::keys::HEARTBEAT_KEY),
        Grant::read_key(api::keys::HAS_CLUSTER_CONFIG_KEY),
    ]
}

/// A failed user or role operation.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The administrator could not connect.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// etcd refused an operation.
    #[error("etcd {op} {name:?} failed")]
    Etcd {
        /// What was done.
        op: &'static str,
        /// The user or role.
        name: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
}

/// A user as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Its name (a certificate CN).
    pub name: String,
    /// Its roles.
    pub roles: Vec<String>,
}

/// An administrator's connection (as `root`) to one cluster's etcd.
pub struct Admin {
    client: Client,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

/// etcd's "user name not found" / "role name not found".
fn not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().ends_with("name not found"))
}

impl Admin {
    /// Connects with `config` (whose certificate is `root`'s once
    /// authentication is on).
    ///
    /// # Errors
    ///
    /// [`AuthError::Connect`].
    pub async fn connect(config: &EtcdConfig) -> Result<Self, AuthError> {
        let client = Client::connect(&config.endpoints, Some(config.connect_options()))
            .await
            .map_err(|source| ConnectError::Client {
                endpoints: config.endpoints.join(","),
                origin: config.origin().to_owned(),
                source,
            })?;
        Ok(Self { client })
    }

    /// Sets up the users and roles of cluster `cluster` and turns
    /// authentication on (module docs). Running it again changes nothing,
    /// except to put back what someone changed.
    ///
    /// # Errors
    ///
    /// [`AuthError::Etcd`] naming the operation that failed.
    pub async fn enable(&mut self, cluster: &str) -> Result<(), AuthError> {
        self.ensure_role(APISERVER_ROLE, &apiserver_grants(cluster))
            .await?;
        self.ensure_role(READER_ROLE, &reader_grants()).await?;
        self.ensure_user(ROOT_USER, ROOT_ROLE).await?;
        self.ensure_user(APISERVER_USER, APISERVER_ROLE).await?;
        self.ensure_user(LOCAL_READER, READER_ROLE).await?;
        self.client
            .auth_enable()
            .await
            .map_err(|source| AuthError::Etcd {
                op: "auth enable",
                name: String::new(),
                source,
            })?;
        Ok(())
    }

    /// Adds the read-only user `user` (e.g. [`remote_reader`]).
    ///
    /// # Errors
    ///
    /// [`AuthError::Etcd`].
    pub async fn add_reader(&mut self, user: &str) -> Result<(), AuthError> {
        self.ensure_user(user, READER_ROLE).await
    }

    /// Deletes the user `user`: its certificate no longer authenticates.
    /// `Ok(false)` when there was no such user.
    ///
    /// # Errors
    ///
    /// [`AuthError::Etcd`].
    pub async fn revoke(&mut self, user: &str) -> Result<bool, AuthError> {
        match self.client.user_delete(user).await {
            Ok(_) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(source) => Err(AuthError::Etcd {
                op: "user delete",
                name: user.to_owned(),
                source,
            }),
        }
    }

    /// Every user with its roles, by name.
    ///
    /// # Errors
    ///
    /// [`AuthError::Etcd`].
    pub async fn users(&mut self) -> Result<Vec<User>, AuthError> {
        let etcd = |op| {
            move |source| AuthError::Etcd {
                op,
                name: String::new(),
                source,
            }
        };
        let names = self
            .client
            .user_list()
            .await
            .map_err(etcd("user list"))?
            .users()
            .to_vec();
        let mut users = Vec::with_capacity(names.len());
        for name in names {
            let roles = self
                .client
                .user_get(name.clone())
                .await
                .map_err(etcd("user get"))?
                .roles()
                .to_vec();
            users.push(User { name, roles });
        }
        users.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(users)
    }

    async fn ensure_user(&mut self, user: &str, role: &str) -> Result<(), AuthError> {
        let etcd = |op| {
            move |source| AuthError::Etcd {
                op,
                name: user.to_owned(),
                source,
            }
        };
        let roles = match self.client.user_get(user).await {
            Ok(found) => found.roles().to_vec(),
            Err(e) if not_found(&e) => {
                self.client
                    .user_add(user, "", Some(UserAddOptions::new().with_no_pwd()))
                    .await
                    .map_err(etcd("user add"))?;
                Vec::new()
            }
            Err(source) => return Err(etcd("user get")(source)),
        };
        for extra in roles.iter().filter(|r| *r != role) {
            self.client
                .user_revoke_role(user, extra.clone())
                .await
                .map_err(etcd("user revoke role"))?;
        }
        if !roles.iter().any(|r| r == role) {
            self.client
                .user_grant_role(user, role)
                .await
                .map_err(etcd("user grant role"))?;
        }
        Ok(())
    }

    async fn ensure_role(&mut self, role: &str, grants: &[Grant]) -> Result<(), AuthError> {
        let etcd = |op| {
            move |source| AuthError::Etcd {
                op,
                name: role.to_owned(),
                source,
            }
        };
        let held = match self.client.role_get(role).await {
            Ok(found) => found.permissions().to_vec(),
            Err(e) if not_found(&e) => {
                self.client.role_add(role).await.map_err(etcd("role add"))?;
                Vec::new()
            }
            Err(source) => return Err(etcd("role get")(source)),
        };
        let wanted = |p: &etcd_client::Permission| {
            grants.iter().any(|g| {
                g.key.as_bytes() == p.key()
                    && g.range_end() == p.range_end()
                    && (p.get_type() == PermissionType::Readwrite as i32) == g.write
                    && (g.write || p.get_type() == PermissionType::Read as i32)
            })
        };
        for extra in held.iter().filter(|p| !wanted(p)) {
            let mut options = etcd_client::RoleRevokePermissionOptions::new();
            if !extra.range_end().is_empty() {
                options = options.with_range_end(extra.range_end().to_vec());
            }
            self.client
                .role_revoke_permission(role, extra.key().to_vec(), Some(options))
                .await
                .map_err(etcd("role revoke permission"))?;
        }
        for grant in grants {
            let present = held.iter().any(|p| {
                wanted(p) && p.key() == grant.key.as_bytes() && p.range_end() == grant.range_end()
            });
            if !present {
                self.client
                    .role_grant_permission(role, grant.permission())
                    .await
                    .map_err(etcd("role grant permission"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_are_etcds() {
        assert_eq!(prefix_end(b"cilium/"), b"cilium0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }

    #[test]
    fn readers_see_nothing_of_the_apiserver_and_write_nothing() {
        let private = api::keys::registry_prefix("c1");
        for grant in reader_grants() {
            assert!(!grant.write, "{grant:?}");
            assert!(grant.key.starts_with("cilium/"), "{grant:?}");
            assert!(!private.starts_with(&grant.key), "{grant:?}");
        }
        assert!(apiserver_grants("c1")
            .iter()
            .any(|g| g.write && g.key == private));
    }
}
