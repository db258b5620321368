//! The etcd backend.
//!
//! `etcd-client` methods take `&mut self` while the stores share one backend
//! between tasks, so every call works on a clone of the (cheaply cloneable)
//! sub-client. Unary requests get a deadline here rather than a gRPC
//! timeout on the channel, because a channel timeout would also end
//! long-lived watch streams. Lists are paginated at one revision, so a large
//! prefix neither needs one huge response nor loses consistency. A
//! [`Txn`](crate::Txn) is exactly one etcd `Txn` request, so its compares and
//! writes are atomic on the server.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    CompareOp, EventType, GetOptions, KvClient, LeaseClient, PutOptions, WatchClient, WatchOptions,
};
use futures::StreamExt;

use crate::backend::{
    BackendError, Compare, KeyValue, KvWrite, LeaseId, Leases, ListWatch, Listing, Revision,
    Transactions, Txn, TxnOp, TxnOutcome, WatchEvent, WatchStream,
};

/// Keys fetched per list request.
const LIST_PAGE: i64 = 500;
/// Largest gRPC message accepted from etcd (a page of large values).
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// A connection to an etcd cluster; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct EtcdBackend {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    request_timeout: Duration,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdBackend {
    /// Wraps a connected client. Each unary request fails with
    /// [`BackendError::Timeout`] after `request_timeout`.
    pub fn new(client: &etcd_client::Client, request_timeout: Duration) -> Self {
        Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            lease: client.lease_client(),
            request_timeout,
        }
    }

    async fn call<T, F>(&self, op: &'static str, key: &str, fut: F) -> Result<T, BackendError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(BackendError::Etcd {
                op,
                key: key.to_owned(),
                source,
            }),
            Err(_) => Err(BackendError::Timeout {
                op,
                key: key.to_owned(),
                timeout: self.request_timeout,
            }),
        }
    }
}

fn convert(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        lease: kv.lease(),
    }
}

/// etcd reports a missing lease as a gRPC error on puts and revokes, and
/// etcd-client turns a keep-alive answer with TTL 0 into its own error.
fn is_lease_not_found(e: &BackendError) -> bool {
    match e {
        BackendError::Etcd {
            source: etcd_client::Error::GRpcStatus(s),
            ..
        } => s.message().contains("lease not found"),
        BackendError::Etcd {
            source: etcd_client::Error::LeaseKeepAliveError(m),
            ..
        } => m.contains("lease not found"),
        _ => false,
    }
}

fn map_lease_error(e: BackendError, lease: Option<LeaseId>) -> BackendError {
    match lease {
        Some(lease) if is_lease_not_found(&e) => BackendError::LeaseNotFound { lease },
        _ => e,
    }
}

/// The smallest key greater than every key with `prefix`, as etcd's
/// `with_prefix` computes it.
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

#[async_trait]
impl ListWatch for EtcdBackend {
    async fn list(&self, prefix: &str) -> Result<Listing, BackendError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut listing = Listing::default();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if listing.revision > 0 {
                opts = opts.with_revision(listing.revision);
            }
            let mut kv = self.kv.clone();
            let resp = self
                .call("list", prefix, kv.get(from.clone(), Some(opts)))
                .await?;
            if listing.revision == 0 {
                listing.revision = resp.header().map_or(0, |h| h.revision());
            }
            listing.kvs.extend(resp.kvs().iter().map(convert));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(listing),
            }
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, BackendError> {
        let mut client = self.watch.clone();
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let stream = self
            .call("watch", prefix, client.watch(prefix, Some(opts)))
            .await?;
        let prefix = prefix.to_owned();
        // The request half must live as long as the responses are read, or
        // the server sees the stream closed.
        let (sender, responses) = stream.split();
        let events =
            futures::stream::unfold(Some((sender, responses, prefix)), move |state| async move {
                let (sender, mut responses, prefix) = state?;
                loop {
                    match responses.message().await {
                        Ok(Some(resp)) => {
                            if resp.canceled() || resp.compact_revision() > 0 {
                                let err = if resp.compact_revision() > 0 {
                                    BackendError::Compacted {
                                        requested: from,
                                        compacted: resp.compact_revision(),
                                    }
                                } else {
                                    BackendError::WatchCanceled {
                                        prefix: prefix.clone(),
                                        reason: resp.cancel_reason().to_owned(),
                                    }
                                };
                                return Some((Err(err), None));
                            }
                            let events: Vec<WatchEvent> = resp
                                .events()
                                .iter()
                                .filter_map(|ev| {
                                    let kv = ev.kv()?;
                                    Some(match ev.event_type() {
                                        EventType::Put => WatchEvent::Put(convert(kv)),
                                        EventType::Delete => WatchEvent::Delete {
                                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                                            mod_revision: kv.mod_revision(),
                                        },
                                    })
                                })
                                .collect();
                            if events.is_empty() {
                                // Creation and progress notifications.
                                continue;
                            }
                            return Some((Ok(events), Some((sender, responses, prefix))));
                        }
                        Ok(None) => {
                            let err = BackendError::WatchCanceled {
                                prefix: prefix.clone(),
                                reason: "the server closed the watch stream".to_owned(),
                            };
                            return Some((Err(err), None));
                        }
                        Err(source) => {
                            let err = BackendError::Etcd {
                                op: "watch",
                                key: prefix.clone(),
                                source,
                            };
                            return Some((Err(err), None));
                        }
                    }
                }
            });
        Ok(events.boxed())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, BackendError> {
        let mut kv = self.kv.clone();
        let resp = self.call("get", key, kv.get(key, None)).await?;
        Ok(resp.kvs().first().map(convert))
    }
}

#[async_trait]
impl KvWrite for EtcdBackend {
    async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision, BackendError> {
        let mut kv = self.kv.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = self
            .call("put", key, kv.put(key, value, opts))
            .await
            .map_err(|e| map_lease_error(e, lease))?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn delete(&self, key: &str) -> Result<bool, BackendError> {
        let mut kv = self.kv.clone();
        let resp = self.call("delete", key, kv.delete(key, None)).await?;
        Ok(resp.deleted() > 0)
    }
}

#[async_trait]
impl Leases for EtcdBackend {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, BackendError> {
        let mut lease = self.lease.clone();
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self
            .call("lease grant", "", lease.grant(secs, None))
            .await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<Duration, BackendError> {
        let mut lease = self.lease.clone();
        let key = format!("lease {id:x}");
        let once = async move {
            let (mut keeper, mut responses) = lease.keep_alive(id).await?;
            keeper.keep_alive().await?;
            responses.message().await
        };
        let resp = self
            .call("lease keep-alive", &key, once)
            .await
            .map_err(|e| map_lease_error(e, Some(id)))?;
        match resp {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl().unsigned_abs())),
            _ => Err(BackendError::LeaseNotFound { lease: id }),
        }
    }

    async fn revoke(&self, id: LeaseId) -> Result<(), BackendError> {
        let mut lease = self.lease.clone();
        let key = format!("lease {id:x}");
        match self.call("lease revoke", &key, lease.revoke(id)).await {
            Err(e) if is_lease_not_found(&e) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Ok(()),
        }
    }
}

fn to_etcd_compare(compare: &Compare) -> etcd_client::Compare {
    use etcd_client::Compare as C;
    match compare {
        // A key that does not exist has create revision 0; one that does has
        // a positive one (unlike its version, which a compaction keeps).
        Compare::Absent { key } => C::create_revision(key.as_str(), CompareOp::Equal, 0),
        Compare::ModRevision { key, revision } => {
            C::mod_revision(key.as_str(), CompareOp::Equal, *revision)
        }
        Compare::Value { key, value } => C::value(key.as_str(), CompareOp::Equal, value.clone()),
        // A range compare holds when every key in the range satisfies it, and
        // trivially when the range is empty; every existing key fails it.
        Compare::NoKeyWithPrefix { prefix } => {
            C::create_revision(prefix.as_str(), CompareOp::Equal, 0)
                .with_range(prefix_end(prefix.as_bytes()))
        }
    }
}

fn to_etcd_op(op: &TxnOp) -> etcd_client::TxnOp {
    match op {
        TxnOp::Put { key, value, lease } => etcd_client::TxnOp::put(
            key.as_str(),
            value.clone(),
            lease.map(|l| PutOptions::new().with_lease(l)),
        ),
        TxnOp::Delete { key } => etcd_client::TxnOp::delete(key.as_str(), None),
    }
}

#[async_trait]
impl Transactions for EtcdBackend {
    async fn txn(&self, txn: &Txn) -> Result<TxnOutcome, BackendError> {
        txn.validate()?;
        let request = etcd_client::Txn::new()
            .when(
                txn.compares()
                    .iter()
                    .map(to_etcd_compare)
                    .collect::<Vec<_>>(),
            )
            .and_then(txn.ops().iter().map(to_etcd_op).collect::<Vec<_>>());
        let mut kv = self.kv.clone();
        let resp = self
            .call("txn", &txn.describe(), kv.txn(request))
            .await
            .map_err(|e| map_lease_error(e, txn.first_lease()))?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"a/b/"), b"a/b0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
