//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! `leaderelection` does it: several apiserver replicas run, only the holder
//! of the lease connects to etcd and writes.
//!
//! * A candidate reads the lease. It takes it when nobody holds it, or when
//!   the holder's record has not changed for `lease_duration` *as this
//!   candidate observed it* (its own monotonic clock: no trust in clock
//!   agreement between nodes), by replacing it with its own identity under
//!   the resourceVersion it read. Two candidates racing both send a
//!   replace; the API server accepts one and answers `409 Conflict` to the
//!   other.
//! * The leader renews every `retry_period`. When it could not renew for
//!   `renew_deadline` (shorter than the lease duration, so it stops before
//!   anyone else may start), it has lost the lease: [`Leadership::lost`]
//!   completes and the apiserver stops writing and exits, to be restarted
//!   as a candidate.
//! * A successor adopts the etcd keys its predecessor wrote (the export's
//!   SyncStores adopt what is unchanged), so a change of leader does not
//!   make keys flap.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Api, PostParams},
    Client,
};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

/// Where the lease is and how it is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The lease record last seen, and when this candidate first saw it.
#[derive(Debug)]
struct Observed {
    holder: Option<String>,
    resource_version: Option<String>,
    at: Instant,
}

/// A candidate for the lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

/// Why one attempt to take or renew the lease did not succeed.
#[derive(Debug, thiserror::Error)]
enum Attempt {
    #[error("held by {0}")]
    HeldBy(String),
    #[error("another candidate changed the lease first")]
    Conflict,
    #[error("Kubernetes API")]
    Api(#[source] kube::Error),
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// Waits until this candidate holds the lease, then renews it in the
    /// background.
    pub async fn acquire(mut self) -> Leadership {
        let mut waiting_on: Option<String> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(()) => break,
                Err(Attempt::HeldBy(holder)) => {
                    if waiting_on.as_ref() != Some(&holder) {
                        info!(lease = %self.config.name, %holder, "waiting for the lease");
                        waiting_on = Some(holder);
                    }
                }
                Err(e) => {
                    warn!(lease = %self.config.name, error = %kvstore::error_chain(&e), "taking the lease failed")
                }
            }
            tokio::time::sleep(jittered(self.config.retry_period)).await;
        }
        info!(lease = %self.config.name, identity = %self.config.identity, "leading");
        let (lost_tx, lost_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut last_renewal = Instant::now();
            loop {
                tokio::time::sleep(self.config.retry_period).await;
                match self.try_acquire_or_renew().await {
                    Ok(()) => last_renewal = Instant::now(),
                    Err(e) => {
                        warn!(lease = %self.config.name, error = %kvstore::error_chain(&e), "renewing the lease failed");
                        if last_renewal.elapsed() >= self.config.renew_deadline
                            || matches!(e, Attempt::HeldBy(_))
                        {
                            warn!(lease = %self.config.name, "lost the lease");
                            let _ = lost_tx.send(true);
                            return;
                        }
                    }
                }
            }
        });
        Leadership {
            lost: lost_rx,
            _renewal: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// One attempt, as client-go's `tryAcquireOrRenew`.
    async fn try_acquire_or_renew(&mut self) -> Result<(), Attempt> {
        let now = MicroTime(Timestamp::now());
        let duration = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let lease = match self.api.get_opt(&self.config.name).await {
            Ok(lease) => lease,
            Err(e) => return Err(Attempt::Api(e)),
        };
        let Some(mut lease) = lease else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 409) => Err(Attempt::Conflict),
                Err(e) => Err(Attempt::Api(e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let version = lease.metadata.resource_version.clone();
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.resource_version != version);
        if changed {
            self.observed = Some(Observed {
                holder: holder.clone(),
                resource_version: version,
                at: Instant::now(),
            });
        }
        let ours = holder.as_deref() == Some(self.config.identity.as_str());
        if let Some(other) = holder.as_ref().filter(|_| !ours) {
            let held_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.lease_duration, Duration::from_secs);
            let seen_at = self.observed.as_ref().map_or_else(Instant::now, |o| o.at);
            if seen_at.elapsed() < held_for {
                return Err(Attempt::HeldBy(other.clone()));
            }
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now);
        // The replace carries the resourceVersion read above: the API
        // server refuses it (409) if anyone wrote the lease since.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observed = Some(Observed {
                    holder: Some(self.config.identity.clone()),
                    resource_version: written.metadata.resource_version,
                    at: Instant::now(),
                });
                Ok(())
            }
            Err(e) if is_status(&e, 409) => Err(Attempt::Conflict),
            Err(e) => Err(Attempt::Api(e)),
        }
    }
}

/// Up to a fifth more than `period`, so candidates do not move in step.
fn jittered(period: Duration) -> Duration {
    period + period.mul_f64(rand::random::<f64>() / 5.0)
}

/// The lease, held: renewed in the background until lost or dropped.
#[derive(Debug)]
pub struct Leadership {
    lost: watch::Receiver<bool>,
    _renewal: tokio_util::task::AbortOnDropHandle<()>,
}

impl Leadership {
    /// Completes when the lease is lost.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }
}
