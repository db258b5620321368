//! ipcache entries: `cilium/state/ip/v1/default/<ip>`.
//!
//! Wire format: Cilium's `identity.IPIdentityPair`:
//! `{"IP","HostIP","ID","Key","Metadata","K8sNamespace","K8sPodName","K8sPodUID","K8sServiceAccount","NamedPorts"}`
//! with `K8sPodUID` and `NamedPorts` omitted when empty. The ipcache maps a
//! pod IP to its security identity and the node (`HostIP`) that hosts it.
//!
//! Cilium's struct also has `Mask` (after `IP`), which its writers set to
//! `null` for endpoint entries; a prefix entry (key `<ip>/<len>`) is never
//! exported by a clustermesh-apiserver. So a reader accepts `Mask` as `null`
//! or a full host mask and refuses a shorter one: one entry is one address.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterName, RemoteScope};
use crate::error::{FieldError, ValidationError};
use crate::go::{
    check_size, decode_json, encode_json, ip_text, null_vec, parse_ip, parse_optional_ip,
};
use crate::identity::NumericIdentity;
use crate::keys;
use crate::records::{at, each_element, expect_key_cluster, expect_same, L4Protocol};
use crate::{clip, Resource};

/// A named container port of the pod behind an ipcache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedPort {
    /// The port's name.
    pub name: String,
    /// The port number.
    pub port: u16,
    /// The protocol.
    pub protocol: L4Protocol,
}

/// One ipcache entry: pod IP → identity, hosting node, pod metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct IpcacheEntry {
    /// The pod's IP (also the last key segment).
    pub ip: IpAddr,
    /// The node hosting the pod: the tunnel endpoint to reach `ip`.
    pub host_ip: Option<IpAddr>,
    /// The pod's security identity.
    pub id: NumericIdentity,
    /// IPsec key index (wire field `Key`; 0: none).
    pub encryption_key: u8,
    /// Free-form metadata (`Metadata`).
    pub metadata: String,
    /// The pod's namespace.
    pub k8s_namespace: String,
    /// The pod's name.
    pub k8s_pod_name: String,
    /// The pod's UID (omitted from the value when empty).
    pub k8s_pod_uid: String,
    /// The pod's service account.
    pub k8s_service_account: String,
    /// The pod's named ports (omitted from the value when empty).
    pub named_ports: Vec<NamedPort>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Wire {
    #[serde(rename = "IP")]
    ip: String,
    /// Read only: see the module docs.
    #[serde(rename = "Mask", skip_serializing)]
    mask: Option<String>,
    #[serde(rename = "HostIP")]
    host_ip: String,
    #[serde(rename = "ID")]
    id: u32,
    #[serde(rename = "Key")]
    key: u8,
    #[serde(rename = "Metadata")]
    metadata: String,
    #[serde(rename = "K8sNamespace")]
    k8s_namespace: String,
    #[serde(rename = "K8sPodName")]
    k8s_pod_name: String,
    #[serde(rename = "K8sPodUID", skip_serializing_if = "String::is_empty")]
    k8s_pod_uid: String,
    #[serde(rename = "K8sServiceAccount")]
    k8s_service_account: String,
    #[serde(
        rename = "NamedPorts",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_vec::deserialize"
    )]
    named_ports: Vec<NamedPortWire>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct NamedPortWire {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "Protocol")]
    protocol: String,
}

impl From<IpcacheEntry> for Wire {
    fn from(e: IpcacheEntry) -> Self {
        Self {
            ip: e.ip.to_string(),
            mask: None,
            host_ip: ip_text(e.host_ip),
            id: e.id.0,
            key: e.encryption_key,
            metadata: e.metadata,
            k8s_namespace: e.k8s_namespace,
            k8s_pod_name: e.k8s_pod_name,
            k8s_pod_uid: e.k8s_pod_uid,
            k8s_service_account: e.k8s_service_account,
            named_ports: e
                .named_ports
                .into_iter()
                .map(|p| NamedPortWire {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol.to_string(),
                })
                .collect(),
        }
    }
}

impl TryFrom<Wire> for IpcacheEntry {
    type Error = FieldError;

    fn try_from(w: Wire) -> Result<Self, FieldError> {
        let named_ports = each_element("NamedPorts", w.named_ports, |at, p| {
            Ok(NamedPort {
                protocol: L4Protocol::parse_field(format!("{at}.Protocol"), &p.protocol)?,
                name: p.name,
                port: p.port,
            })
        })?;
        let ip = parse_ip("IP", &w.ip)?;
        if let Some(mask) = &w.mask {
            check_host_mask(ip, mask)?;
        }
        Ok(Self {
            ip,
            host_ip: parse_optional_ip("HostIP", &w.host_ip)?,
            id: NumericIdentity(w.id),
            encryption_key: w.key,
            metadata: w.metadata,
            k8s_namespace: w.k8s_namespace,
            k8s_pod_name: w.k8s_pod_name,
            k8s_pod_uid: w.k8s_pod_uid,
            k8s_service_account: w.k8s_service_account,
            named_ports,
        })
    }
}

/// A `Mask` must cover the whole address (Go's `net.IPMask` bytes, base64).
fn check_host_mask(ip: IpAddr, mask: &str) -> Result<(), FieldError> {
    use base64::Engine as _;
    let invalid = |reason| FieldError::Invalid {
        field: "Mask".to_owned(),
        value: clip(mask),
        reason,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(mask)
        .map_err(|_| invalid("the mask is not standard base64"))?;
    let full_length = match ip {
        IpAddr::V4(_) => bytes.len() == 4 || bytes.len() == 16,
        IpAddr::V6(_) => bytes.len() == 16,
    };
    if full_length && bytes.iter().all(|b| *b == 0xff) {
        Ok(())
    } else {
        Err(invalid(
            "only host entries are accepted (Mask null or all ones); a prefix entry is not an endpoint",
        ))
    }
}

impl IpcacheEntry {
    /// An entry for `ip` with identity `id` hosted on `host_ip`; pod metadata empty.
    pub fn new(ip: IpAddr, id: NumericIdentity, host_ip: Option<IpAddr>) -> Self {
        Self {
            ip,
            host_ip,
            id,
            encryption_key: 0,
            metadata: String::new(),
            k8s_namespace: String::new(),
            k8s_pod_name: String::new(),
            k8s_pod_uid: String::new(),
            k8s_service_account: String::new(),
            named_ports: Vec::new(),
        }
    }
}

impl Resource for IpcacheEntry {
    const KIND: &'static str = "endpoints";
    const BASE_PREFIX: &'static str = keys::IP_BASE_PREFIX;

    fn prefix(_cluster: &ClusterName) -> String {
        keys::ip_prefix()
    }

    fn key(&self) -> String {
        keys::ip_key(self.ip)
    }

    fn encode(&self) -> Vec<u8> {
        encode_json(&Wire::from(self.clone()))
    }

    fn decode(key: &str, value: &[u8], scope: &RemoteScope) -> Result<Self, ValidationError> {
        check_size(key, value)?;
        let parsed = keys::parse_ip_key(key)?;
        expect_key_cluster(key, parsed.cluster.as_ref(), scope)?;
        let wire: Wire = decode_json(key, value)?;
        let entry = IpcacheEntry::try_from(wire).map_err(at(key))?;
        expect_same(key, "IP", &parsed.ip, &entry.ip)?;
        let range = scope.identity_range();
        if !entry.id.is_reserved() && !range.contains(&entry.id.0) {
            return Err(ValidationError::IdentityOutOfRange {
                key: clip(key),
                field: "ID",
                identity: entry.id.0,
                cluster: scope.cluster.clone(),
                range,
            });
        }
        Ok(entry)
    }
}
