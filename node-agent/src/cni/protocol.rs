//! The plugin ↔ agent protocol on the CNI socket.
//!
//! One request per connection: the plugin writes one JSON [`AgentRequest`]
//! and shuts down its write half; the agent answers with one JSON
//! [`AgentResponse`] and closes. No framing beyond EOF is needed, and a
//! plugin killed by the runtime's timeout simply leaves a closed socket.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::spec::{self, CniError, CniResult, ErrorCode, Interface, IpConfig, Route};

/// Largest request or response accepted, in bytes.
pub const MAX_MESSAGE: u64 = 64 * 1024;

/// The operation the plugin asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PodCommand {
    /// Set up the pod's network.
    Add,
    /// Tear it down (idempotent).
    Del,
    /// Verify it.
    Check,
}

/// A request from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRequest {
    /// What to do.
    pub command: PodCommand,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (absent on some DELs).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// Pod namespace (`K8S_POD_NAMESPACE`, else `default`).
    pub pod_namespace: String,
    /// Pod name (`K8S_POD_NAME`, else the container ID).
    pub pod_name: String,
    /// Pod UID, if known.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// Pod labels (CNI args merged with runtime config).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What ADD set up (and CHECK verified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAttachment {
    /// Host-side veth.
    pub host_ifname: String,
    /// Its MAC.
    pub host_mac: String,
    /// Container-side interface.
    pub pod_ifname: String,
    /// Its MAC.
    pub pod_mac: String,
    /// Pod address (a /32).
    pub address: Ipv4Net,
    /// The pods' gateway (the node's router address).
    pub gateway: Ipv4Addr,
    /// Pod MTU.
    pub mtu: u32,
    /// Namespace path.
    pub netns: PathBuf,
    /// Security identity, when the apiserver allocated one.
    #[serde(default)]
    pub identity: Option<u32>,
}

impl PodAttachment {
    /// The CNI 1.0.0 result for this attachment (see
    /// [`CniResult::in_version`] for older versions).
    pub fn to_result(&self) -> CniResult {
        CniResult {
            cni_version: spec::CNI_VERSION.into(),
            interfaces: vec![
                Interface {
                    name: self.host_ifname.clone(),
                    mac: self.host_mac.clone(),
                    mtu: Some(self.mtu),
                    sandbox: None,
                },
                Interface {
                    name: self.pod_ifname.clone(),
                    mac: self.pod_mac.clone(),
                    mtu: Some(self.mtu),
                    sandbox: Some(self.netns.display().to_string()),
                },
            ],
            ips: vec![IpConfig {
                version: None,
                address: self.address,
                gateway: Some(self.gateway),
                interface: 1,
            }],
            routes: vec![Route {
                dst: Ipv4Net::default(),
                gw: Some(self.gateway),
            }],
            dns: serde_json::Map::new(),
        }
    }
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum AgentResponse {
    /// Done; ADD and CHECK carry the attachment.
    Ok {
        /// The attachment (ADD, CHECK).
        attachment: Option<PodAttachment>,
    },
    /// Failed, with the CNI error to report.
    Error {
        /// CNI error code.
        code: ErrorCode,
        /// Message.
        msg: String,
        /// Details.
        #[serde(default)]
        details: String,
    },
}

impl From<CniError> for AgentResponse {
    fn from(e: CniError) -> Self {
        Self::Error {
            code: e.code,
            msg: e.msg,
            details: e.details,
        }
    }
}
