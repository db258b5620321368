//! Local endpoints (pods): what CNI ADD, CHECK and DEL do on the agent side.
//!
//! ADD: allocate an address (IPAM) → register the endpoint with the
//! apiserver (its identity) → create the veth pair, move one end into the
//! pod's namespace, configure it as the datapath expects (a /32 address, the
//! link-local gateway `169.254.1.1` with a permanent neighbour entry for the
//! host side's MAC, the mode's MTU) → add the pod to the datapath's
//! `endpoints` map → attach `from_pod` to the host side → persist a record.
//! Any failure undoes what was done, so a retried ADD starts clean.
//!
//! DEL undoes everything and succeeds when there is nothing left to undo
//! (the CNI spec asks DEL to be idempotent).
//!
//! Records under `<state>/endpoints/` let a restarted agent re-attach its
//! pods' programs and re-register them with the apiserver without the
//! runtime calling ADD again.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::{
    cni::{
        protocol::{netns_path, AgentRequest, PodAttachment},
        spec::{CniError, ErrorCode, CODE_AGENT_FAILURE},
    },
    ipam::{Ipam, IpamError, Owner},
    netlink::{format_mac, Netlink, NetlinkError},
    registry::{Registry, RegistryError},
};

/// The pods' gateway, the same on every node (datapath contract).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Identity of an endpoint whose identity is not known (no apiserver):
/// Cilium's reserved `init` identity.
pub const IDENTITY_INIT: u32 = 5;

/// Errors of endpoint operations.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// Address allocation failed.
    #[error("ipam")]
    Ipam(#[from] IpamError),
    /// A netlink operation failed.
    #[error("pod network setup")]
    Netlink(#[from] NetlinkError),
    /// The apiserver did not register the endpoint.
    #[error("endpoint registration")]
    Registry(#[from] RegistryError),
    /// The datapath refused.
    #[error("datapath: {op}")]
    Datapath {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The pod's namespace does not exist.
    #[error("network namespace {0} does not exist")]
    NoNetns(PathBuf),
    /// CHECK found a difference.
    #[error("check failed: {0}")]
    Check(String),
    /// A MAC address is not six bytes (`aa:bb:cc:dd:ee:ff`): a link without
    /// an Ethernet address, or a corrupt endpoint record.
    #[error("{what} {value:?} is not a MAC address")]
    BadMac {
        /// Whose MAC.
        what: String,
        /// What was found.
        value: String,
    },
    /// A record could not be written or read.
    #[error("endpoint record {path}")]
    Record {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl PodError {
    /// The CNI error to answer with.
    pub fn to_cni(&self) -> CniError {
        let code = match self {
            Self::Registry(e) if e.is_transient() => ErrorCode::TryAgainLater,
            Self::NoNetns(_) => ErrorCode::UnknownContainer,
            Self::Ipam(IpamError::Exhausted { .. }) => ErrorCode::TryAgainLater,
            _ => CODE_AGENT_FAILURE,
        };
        let mut details = String::new();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(self);
        while let Some(s) = src {
            if !details.is_empty() {
                details.push_str(": ");
            }
            details.push_str(&s.to_string());
            src = s.source();
        }
        CniError::new(code, self.to_string(), details)
    }
}

fn dp_err<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl FnOnce(E) -> PodError {
    move |e| PodError::Datapath {
        op,
        source: Box::new(e),
    }
}

/// What the agent remembers about a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Endpoint id (datapath).
    pub endpoint_id: u32,
    /// The attachment.
    pub attachment: PodAttachment,
}

/// The datapath handles the endpoint path needs.
#[derive(Debug)]
pub struct PodDatapath {
    /// The loaded datapath (attach, detach).
    pub datapath: datapath::Datapath,
    /// The endpoints map.
    pub endpoints: datapath::Endpoints,
}

/// Everything ADD/DEL/CHECK need, behind one lock: CNI operations are rare,
/// and serialising them removes every interleaving question.
#[derive(Debug)]
pub struct PodManager {
    inner: Mutex<Inner>,
    mtu: u32,
    records_dir: PathBuf,
}

#[derive(Debug)]
struct Inner {
    ipam: Ipam,
    host: Netlink,
    dp: Arc<std::sync::Mutex<PodDatapath>>,
    registry: Option<Registry>,
}

impl PodManager {
    /// A manager allocating from `pod_cidr`, persisting under `state_dir`.
    ///
    /// # Errors
    ///
    /// [`PodError::Ipam`] / [`PodError::Record`] when the state directory
    /// is unusable.
    pub fn new(
        state_dir: &Path,
        pod_cidr: Ipv4Net,
        mtu: u32,
        host: Netlink,
        dp: Arc<std::sync::Mutex<PodDatapath>>,
        registry: Option<Registry>,
    ) -> Result<Self, PodError> {
        let ipam = Ipam::open(state_dir, pod_cidr)?;
        let records_dir = state_dir.join("endpoints");
        fs::create_dir_all(&records_dir).map_err(|source| PodError::Record {
            path: records_dir.clone(),
            source,
        })?;
        Ok(Self {
            inner: Mutex::new(Inner {
                ipam,
                host,
                dp,
                registry,
            }),
            mtu,
            records_dir,
        })
    }

    /// Number of local endpoints.
    pub async fn count(&self) -> usize {
        self.records().map(|r| r.len()).unwrap_or_default()
    }

    /// Handles one plugin request.
    ///
    /// # Errors
    ///
    /// See [`PodError`].
    /// `netns` is the pod's namespace as the plugin opened it
    /// ([`crate::cni::protocol`]); without it the request's path is used.
    pub async fn handle(
        &self,
        req: &AgentRequest,
        netns: Option<&OwnedFd>,
    ) -> Result<Option<PodAttachment>, PodError> {
        use crate::cni::protocol::PodCommand;
        let mut inner = self.inner.lock().await;
        let netns = netns_path(req, netns);
        match req.command {
            PodCommand::Add => self.add(&mut inner, req, netns).await.map(Some),
            PodCommand::Del => self.del(&mut inner, req).await.map(|()| None),
            PodCommand::Check => self.check(&inner, req, netns).await.map(Some),
        }
    }

    async fn add(
        &self,
        inner: &mut Inner,
        req: &AgentRequest,
        netns: Option<PathBuf>,
    ) -> Result<PodAttachment, PodError> {
        let netns = netns.ok_or_else(|| PodError::NoNetns(PathBuf::new()))?;
        if !netns.exists() {
            return Err(PodError::NoNetns(netns));
        }
        let owner = Owner {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        let ip = inner.ipam.allocate(&owner)?;
        let endpoint_id = u32::from(ip) - u32::from(inner.ipam.cidr().network());
        match self
            .add_allocated(inner, req, &netns, ip, endpoint_id)
            .await
        {
            Ok(att) => Ok(att),
            Err(e) => {
                warn!(container = %req.container_id, error = %e, "ADD failed; undoing");
                let host_ifname = host_ifname(&req.container_id, &req.ifname);
                undo(inner, &host_ifname, ip).await;
                if let Some(reg) = &inner.registry {
                    let _ = reg.delete_endpoint(&req.pod_namespace, &req.pod_name).await;
                }
                if let Err(e) = inner.ipam.release(&owner) {
                    warn!(error = %e, "releasing the address of a failed ADD");
                }
                Err(e)
            }
        }
    }

    async fn add_allocated(
        &self,
        inner: &mut Inner,
        req: &AgentRequest,
        netns: &Path,
        ip: Ipv4Addr,
        endpoint_id: u32,
    ) -> Result<PodAttachment, PodError> {
        let identity = match &inner.registry {
            Some(reg) => reg.upsert_endpoint(proto_endpoint(req, ip)).await?,
            None => IDENTITY_INIT,
        };
        let host_if = host_ifname(&req.container_id, &req.ifname);
        let tmp_if = host_if.replacen("lxc", "tmp", 1);
        // Leftovers of an interrupted earlier attempt.
        inner.host.delete_link(&host_if).await?;
        inner.host.delete_link(&tmp_if).await?;
        let pod = Netlink::connect_in(netns).await?;
        pod.delete_link(&req.ifname).await?;

        inner.host.add_veth(&host_if, &tmp_if, self.mtu).await?;
        let tmp = inner
            .host
            .link(&tmp_if)
            .await?
            .ok_or_else(|| PodError::Check(format!("veth peer {tmp_if} vanished")))?;
        let ns_file = fs::File::open(netns).map_err(|_| PodError::NoNetns(netns.to_owned()))?;
        inner.host.move_to_netns(tmp.index, &ns_file).await?;
        let host = inner
            .host
            .link(&host_if)
            .await?
            .ok_or_else(|| PodError::Check(format!("host veth {host_if} vanished")))?;
        inner
            .host
            .configure_link(host.index, None, self.mtu)
            .await?;

        let moved = pod.link(&tmp_if).await?.ok_or_else(|| {
            PodError::Check(format!("{tmp_if} did not arrive in {}", netns.display()))
        })?;
        pod.configure_link(moved.index, Some(&req.ifname), self.mtu)
            .await?;
        if let Some(lo) = pod.link("lo").await? {
            pod.configure_link(lo.index, None, 65536).await?;
        }
        pod.add_address(moved.index, ip, 32).await?;
        pod.add_neighbour(moved.index, GATEWAY, &host.mac).await?;
        pod.add_route(GATEWAY, 32, moved.index, None).await?;
        pod.add_route(Ipv4Addr::UNSPECIFIED, 0, moved.index, Some(GATEWAY))
            .await?;
        // The node reaches its own pods through the kernel (health checks,
        // host-network clients); replies come back through from_pod.
        inner.host.add_route(ip, 32, host.index, None).await?;
        inner.host.add_neighbour(host.index, ip, &moved.mac).await?;

        let ep = datapath::Endpoint {
            ifindex: host.index,
            identity,
            endpoint_id,
            pod_mac: mac6(&moved.mac, || format!("MAC of {}", req.ifname))?,
            host_mac: mac6(&host.mac, || format!("MAC of {host_if}"))?,
        };
        install_endpoint(inner, ip, ep, &host_if)?;
        let attachment = PodAttachment {
            host_ifname: host_if,
            host_mac: format_mac(&host.mac),
            pod_ifname: req.ifname.clone(),
            pod_mac: format_mac(&moved.mac),
            address: Ipv4Net::new(ip, 32).unwrap_or_default(),
            gateway: GATEWAY,
            mtu: self.mtu,
            // The runtime's name for it: the descriptor is gone after this
            // request.
            netns: req.netns.clone().unwrap_or_else(|| netns.to_owned()),
            identity: Some(identity),
        };
        self.write_record(&EndpointRecord {
            container_id: req.container_id.clone(),
            pod_namespace: req.pod_namespace.clone(),
            pod_name: req.pod_name.clone(),
            pod_uid: req.pod_uid.clone(),
            labels: req.labels.clone(),
            endpoint_id,
            attachment: attachment.clone(),
        })?;
        info!(
            container = %req.container_id,
            pod = %format!("{}/{}", req.pod_namespace, req.pod_name),
            %ip, identity, "endpoint added"
        );
        Ok(attachment)
    }

    async fn del(&self, inner: &mut Inner, req: &AgentRequest) -> Result<(), PodError> {
        let owner = Owner {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
        };
        let record = self.read_record(&req.container_id, &req.ifname);
        let host_if = host_ifname(&req.container_id, &req.ifname);
        if let Some(ip) = inner.ipam.lookup(&owner) {
            undo(inner, &host_if, ip).await;
        } else {
            inner.host.delete_link(&host_if).await?;
        }
        if let Some(reg) = &inner.registry {
            let (ns, name) = record
                .as_ref()
                .map(|r| (r.pod_namespace.clone(), r.pod_name.clone()))
                .unwrap_or_else(|| (req.pod_namespace.clone(), req.pod_name.clone()));
            reg.delete_endpoint(&ns, &name).await?;
        }
        inner.ipam.release(&owner)?;
        let path = self.record_path(&req.container_id, &req.ifname);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PodError::Record { path, source }),
        }
        info!(container = %req.container_id, "endpoint deleted");
        Ok(())
    }

    async fn check(
        &self,
        inner: &Inner,
        req: &AgentRequest,
        netns: Option<PathBuf>,
    ) -> Result<PodAttachment, PodError> {
        let record = self
            .read_record(&req.container_id, &req.ifname)
            .ok_or_else(|| {
                PodError::Check(format!("no endpoint for container {}", req.container_id))
            })?;
        let att = record.attachment;
        let host =
            inner.host.link(&att.host_ifname).await?.ok_or_else(|| {
                PodError::Check(format!("host veth {} is missing", att.host_ifname))
            })?;
        let ip = att.address.addr();
        let ep = {
            let dp = inner
                .dp
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            dp.endpoints
                .get(IpAddr::V4(ip))
                .map_err(dp_err("read endpoint"))?
        };
        match ep {
            Some(ep) if ep.ifindex == host.index => {}
            Some(ep) => {
                return Err(PodError::Check(format!(
                    "endpoints map has ifindex {} for {ip}, veth is {}",
                    ep.ifindex, host.index
                )))
            }
            None => return Err(PodError::Check(format!("{ip} is not in the endpoints map"))),
        }
        let netns = netns.unwrap_or_else(|| att.netns.clone());
        if !netns.exists() {
            return Err(PodError::NoNetns(netns));
        }
        let pod = Netlink::connect_in(&netns).await?;
        let link = pod
            .link(&req.ifname)
            .await?
            .ok_or_else(|| PodError::Check(format!("{} is missing in the pod", req.ifname)))?;
        if link.mtu != Some(att.mtu) {
            let found = link
                .mtu
                .map_or_else(|| "no MTU".to_owned(), |m| format!("MTU {m}"));
            return Err(PodError::Check(format!(
                "{} has {found}, expected MTU {}",
                req.ifname, att.mtu
            )));
        }
        if !pod.addresses(link.index).await?.contains(&(ip, 32)) {
            return Err(PodError::Check(format!(
                "{ip}/32 is not on {} in the pod",
                req.ifname
            )));
        }
        Ok(att)
    }

    /// Restores the endpoints of a previous run: re-attaches `from_pod` to
    /// every pod whose veth still exists, re-adds it to the endpoints map and
    /// remembers it for the apiserver session; cleans up pods whose veth is
    /// gone. Returns how many were restored.
    ///
    /// # Errors
    ///
    /// [`PodError::Record`] when the records cannot be listed.
    pub async fn restore(&self) -> Result<usize, PodError> {
        let mut inner = self.inner.lock().await;
        let mut restored = 0;
        for rec in self.records()? {
            let att = &rec.attachment;
            let ip = att.address.addr();
            match inner.host.link(&att.host_ifname).await? {
                Some(host) => {
                    let macs = parse_mac(&att.pod_mac)
                        .ok_or_else(|| PodError::BadMac {
                            what: format!("recorded pod MAC of {}", rec.container_id),
                            value: att.pod_mac.clone(),
                        })
                        .and_then(|pod_mac| {
                            Ok((
                                pod_mac,
                                mac6(&host.mac, || format!("MAC of {}", att.host_ifname))?,
                            ))
                        });
                    let (pod_mac, host_mac) = match macs {
                        Ok(macs) => macs,
                        Err(e) => {
                            // Never a zero MAC in the datapath: the pod keeps
                            // what its predecessor programmed until it is re-added.
                            warn!(container = %rec.container_id, error = %e, "endpoint record not restored");
                            continue;
                        }
                    };
                    let ep = datapath::Endpoint {
                        ifindex: host.index,
                        identity: att.identity.unwrap_or(IDENTITY_INIT),
                        endpoint_id: rec.endpoint_id,
                        pod_mac,
                        host_mac,
                    };
                    install_endpoint(&inner, ip, ep, &att.host_ifname)?;
                    if let Some(reg) = &inner.registry {
                        let req = AgentRequest {
                            command: crate::cni::protocol::PodCommand::Add,
                            container_id: rec.container_id.clone(),
                            netns: Some(att.netns.clone()),
                            ifname: att.pod_ifname.clone(),
                            pod_namespace: rec.pod_namespace.clone(),
                            pod_name: rec.pod_name.clone(),
                            pod_uid: rec.pod_uid.clone(),
                            labels: rec.labels.clone(),
                        };
                        reg.remember_endpoint(proto_endpoint(&req, ip)).await;
                    }
                    restored += 1;
                }
                None => {
                    warn!(container = %rec.container_id, "veth of a recorded pod is gone; cleaning up");
                    let req = AgentRequest {
                        command: crate::cni::protocol::PodCommand::Del,
                        container_id: rec.container_id.clone(),
                        netns: None,
                        ifname: att.pod_ifname.clone(),
                        pod_namespace: rec.pod_namespace.clone(),
                        pod_name: rec.pod_name.clone(),
                        pod_uid: None,
                        labels: BTreeMap::new(),
                    };
                    self.del(&mut inner, &req).await?;
                }
            }
        }
        Ok(restored)
    }

    fn record_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.records_dir
            .join(format!("{container_id}-{ifname}.json"))
    }

    fn read_record(&self, container_id: &str, ifname: &str) -> Option<EndpointRecord> {
        let bytes = fs::read(self.record_path(container_id, ifname)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every recorded endpoint.
    ///
    /// # Errors
    ///
    /// [`PodError::Record`] when the directory cannot be listed.
    pub fn records(&self) -> Result<Vec<EndpointRecord>, PodError> {
        let err = |source| PodError::Record {
            path: self.records_dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.records_dir).map_err(err)? {
            let path = entry.map_err(err)?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match fs::read(&path).map(|b| serde_json::from_slice::<EndpointRecord>(&b)) {
                    Ok(Ok(r)) => out.push(r),
                    _ => warn!(path = %path.display(), "unreadable endpoint record skipped"),
                }
            }
        }
        Ok(out)
    }

    fn write_record(&self, rec: &EndpointRecord) -> Result<(), PodError> {
        let path = self.record_path(&rec.container_id, &rec.attachment.pod_ifname);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(rec).unwrap_or_default();
        fs::write(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| PodError::Record { path, source })
    }
}

/// Adds the pod to the endpoints map, then attaches `from_pod` to its host
/// veth (in this order, as the datapath requires: until the entry exists the
/// program drops the pod's packets).
fn install_endpoint(
    inner: &Inner,
    ip: Ipv4Addr,
    ep: datapath::Endpoint,
    host_if: &str,
) -> Result<(), PodError> {
    let mut dp = inner
        .dp
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    dp.endpoints
        .insert(IpAddr::V4(ip), ep)
        .map_err(dp_err("insert endpoint"))?;
    dp.datapath
        .attach_from_pod(host_if)
        .map_err(dp_err("attach from_pod"))?;
    Ok(())
}

/// Removes the datapath state and the veth of a pod at `ip`; logs failures
/// (used on DEL and to roll back a failed ADD, where the first error matters).
async fn undo(inner: &mut Inner, host_if: &str, ip: Ipv4Addr) {
    {
        let mut dp = inner
            .dp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = dp.datapath.detach(host_if) {
            warn!(error = %e, host_if, "detaching from_pod");
        }
        if let Err(e) = dp.endpoints.remove(IpAddr::V4(ip)) {
            warn!(error = %e, %ip, "removing endpoint from the map");
        }
    }
    if let Err(e) = inner.host.delete_link(host_if).await {
        warn!(error = %e, host_if, "deleting host veth");
    }
}

fn proto_endpoint(req: &AgentRequest, ip: Ipv4Addr) -> mesh_proto::v1::Endpoint {
    mesh_proto::v1::Endpoint {
        namespace: req.pod_namespace.clone(),
        name: req.pod_name.clone(),
        uid: req.pod_uid.clone().unwrap_or_default(),
        service_account: String::new(),
        ips: vec![ip.to_string()],
        labels: req.labels.clone().into_iter().collect(),
        named_ports: Vec::new(),
        node: String::new(),
    }
}

/// The host-side veth name of a pod: `lxc` + 12 hex digits of a stable
/// hash (FNV-1a) of container ID and interface, within the 15-byte limit.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("lxc{:012x}", h & 0xffff_ffff_ffff)
}

/// A link's MAC as six bytes, or [`PodError::BadMac`] naming `what`.
fn mac6(mac: &[u8], what: impl FnOnce() -> String) -> Result<[u8; 6], PodError> {
    <[u8; 6]>::try_from(mac).map_err(|_| PodError::BadMac {
        what: what(),
        value: format_mac(mac),
    })
}

/// Parses `aa:bb:cc:dd:ee:ff` (what [`format_mac`] writes); `None` for
/// anything else.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifnames_are_stable_short_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert_ne!(a, host_ifname("abd", "eth0"));
        assert_ne!(a, host_ifname("abc", "eth1"));
    }

    #[test]
    fn macs_round_trip_and_bad_ones_are_refused() {
        let m = [0x02, 0xab, 0, 1, 0xff, 0x10];
        assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        for bad in [
            "",
            "02:ab:00:01:ff",
            "02:ab:00:01:ff:10:11",
            "02:ab:00:01:ff:zz",
            "2:ab:0:1:ff:10",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert!(mac6(&[1, 2, 3], || "x".into()).is_err());
        assert_eq!(mac6(&m, || "x".into()).unwrap(), m);
    }
}
