//! EndpointSlices: `cilium/state/endpointslices/v1/<cluster>/<namespace>/<slice>`.
//!
//! Clusters running Cilium's service v2 export the backends of their global
//! services as EndpointSlices instead of (`endpointslices-only`) or beside
//! (`services-and-endpointslices`) the `cilium/state/services/v1` records;
//! the cluster config announces which ([`EndpointSlicesExportMode`]). The key
//! names the slice; the service it belongs to is its
//! `kubernetes.io/service-name` label, and a service may have several slices.
//!
//! # Wire format
//!
//! Not JSON: the value is Cilium's `ClusterEndpointSlice` message encoded as
//! protobuf (proto2, the generated Kubernetes encoding of its slim
//! `discovery/v1` types) and then compressed as one or more zstd frames:
//!
//! ```text
//! ClusterEndpointSlice { 1 cluster, 2 clusterID, 3 namespace, 4 name, 5 labels (map),
//!                        6 annotations (map), 7 addressType, 8 endpoints, 9 ports }
//! Endpoint             { 1 addresses, 2 conditions, 5 deprecatedTopology (map),
//!                        6 nodeName, 7 zone, 8 hints }
//! EndpointConditions   { 1 ready, 2 serving, 3 terminating }
//! EndpointHints        { 1 forZones }   ForZone { 1 name }
//! EndpointPort         { 1 name, 2 protocol, 3 port }
//! ```
//!
//! Decoding checks what Cilium's `validate` checks (cluster, namespace and
//! name set, address type `IPv4` or `IPv6`, every address of that family)
//! plus the scope rules every record has: the cluster and ID are the
//! connection's, namespace and name match the key. Decompression stops at
//! [`MAX_DECODED_BYTES`] (Cilium's bound), and a frame may not ask for a
//! larger window, so a small hostile value cannot make the reader allocate
//! much.
//!
//! [`EndpointSlicesExportMode`]: crate::EndpointSlicesExportMode

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::IpAddr;

use prost::Message as _;

use crate::cluster::{ClusterId, ClusterName, RemoteScope};
use crate::error::{FieldError, ValidationError};
use crate::go::{check_size, parse_ip};
use crate::keys;
use crate::records::{
    at, cluster_field, cluster_id_field, each_element, expect_cluster, expect_cluster_id,
    expect_namespaced, L4Addr, L4Protocol, PortConfiguration,
};
use crate::{clip, Resource};

/// Largest decompressed value a reader accepts (16 MiB, as Cilium's decoder).
pub const MAX_DECODED_BYTES: usize = 16 << 20;

/// The label naming the service a slice belongs to (Kubernetes').
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The address family of a slice's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SliceAddressType {
    /// `IPv4`
    Ipv4,
    /// `IPv6`
    Ipv6,
}

impl SliceAddressType {
    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }
}

/// The conditions of one endpoint; `None` is "unknown", which Kubernetes
/// reads as ready, serving and not terminating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SliceConditions {
    /// Ready to receive traffic.
    pub ready: Option<bool>,
    /// Serving (ready, whether terminating or not).
    pub serving: Option<bool>,
    /// Terminating.
    pub terminating: Option<bool>,
}

/// One endpoint (usually one pod) of a slice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SliceEndpoint {
    /// Its addresses, all of the slice's family.
    pub addresses: Vec<IpAddr>,
    /// Its conditions, when the record carries them.
    pub conditions: Option<SliceConditions>,
    /// The v1beta1 topology map, kept as read.
    pub deprecated_topology: BTreeMap<String, String>,
    /// The node hosting it.
    pub node_name: Option<String>,
    /// Its zone.
    pub zone: Option<String>,
    /// The zones it should serve (topology hints), when the record has hints.
    pub for_zones: Option<Vec<Option<String>>>,
}

impl SliceEndpoint {
    /// Whether the endpoint takes new traffic: not known to be unready.
    pub fn is_ready(&self) -> bool {
        self.conditions.and_then(|c| c.ready) != Some(false)
    }
}

/// One port of a slice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SlicePort {
    /// The port's name (the service port's), when set.
    pub name: Option<String>,
    /// The protocol as written (`TCP` when absent).
    pub protocol: Option<L4Protocol>,
    /// The port number; `None` means every port.
    pub port: Option<u16>,
}

/// An EndpointSlice of a global service, as a cluster exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEndpointSlice {
    /// The exporting cluster.
    pub cluster: ClusterName,
    /// Its ID.
    pub cluster_id: ClusterId,
    /// The namespace.
    pub namespace: String,
    /// The slice's name.
    pub name: String,
    /// The slice's labels ([`SERVICE_NAME_LABEL`] names its service).
    pub labels: BTreeMap<String, String>,
    /// The slice's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The family of every address.
    pub address_type: SliceAddressType,
    /// The endpoints.
    pub endpoints: Vec<SliceEndpoint>,
    /// The ports every endpoint serves.
    pub ports: Vec<SlicePort>,
}

// ---- the protobuf messages (private: the wire mirror) ------------------------

#[derive(Clone, PartialEq, prost::Message)]
struct SliceWire {
    #[prost(string, optional, tag = "1")]
    cluster: Option<String>,
    #[prost(uint32, optional, tag = "2")]
    cluster_id: Option<u32>,
    #[prost(string, optional, tag = "3")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "4")]
    name: Option<String>,
    #[prost(btree_map = "string, string", tag = "5")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "6")]
    annotations: BTreeMap<String, String>,
    #[prost(string, optional, tag = "7")]
    address_type: Option<String>,
    #[prost(message, repeated, tag = "8")]
    endpoints: Vec<EndpointWire>,
    #[prost(message, repeated, tag = "9")]
    ports: Vec<PortWire>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EndpointWire {
    #[prost(string, repeated, tag = "1")]
    addresses: Vec<String>,
    #[prost(message, optional, tag = "2")]
    conditions: Option<ConditionsWire>,
    #[prost(btree_map = "string, string", tag = "5")]
    deprecated_topology: BTreeMap<String, String>,
    #[prost(string, optional, tag = "6")]
    node_name: Option<String>,
    #[prost(string, optional, tag = "7")]
    zone: Option<String>,
    #[prost(message, optional, tag = "8")]
    hints: Option<HintsWire>,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
struct ConditionsWire {
    #[prost(bool, optional, tag = "1")]
    ready: Option<bool>,
    #[prost(bool, optional, tag = "2")]
    serving: Option<bool>,
    #[prost(bool, optional, tag = "3")]
    terminating: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HintsWire {
    #[prost(message, repeated, tag = "1")]
    for_zones: Vec<ForZoneWire>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ForZoneWire {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PortWire {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    protocol: Option<String>,
    #[prost(int32, optional, tag = "3")]
    port: Option<i32>,
}

impl From<&ClusterEndpointSlice> for SliceWire {
    fn from(s: &ClusterEndpointSlice) -> Self {
        Self {
            cluster: Some(s.cluster.to_string()),
            cluster_id: Some(s.cluster_id.into()),
            namespace: Some(s.namespace.clone()),
            name: Some(s.name.clone()),
            labels: s.labels.clone(),
            annotations: s.annotations.clone(),
            address_type: Some(s.address_type.as_str().to_owned()),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointWire {
                    addresses: e.addresses.iter().map(ToString::to_string).collect(),
                    conditions: e.conditions.map(|c| ConditionsWire {
                        ready: c.ready,
                        serving: c.serving,
                        terminating: c.terminating,
                    }),
                    deprecated_topology: e.deprecated_topology.clone(),
                    node_name: e.node_name.clone(),
                    zone: e.zone.clone(),
                    hints: e.for_zones.as_ref().map(|zones| HintsWire {
                        for_zones: zones
                            .iter()
                            .map(|name| ForZoneWire { name: name.clone() })
                            .collect(),
                    }),
                })
                .collect(),
            ports: s
                .ports
                .iter()
                .map(|p| PortWire {
                    name: p.name.clone(),
                    protocol: p.protocol.map(|p| p.as_str().to_owned()),
                    port: p.port.map(i32::from),
                })
                .collect(),
        }
    }
}

/// A required string field: Cilium's `validate` refuses it empty.
fn required(field: &'static str, value: Option<String>) -> Result<String, FieldError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| FieldError::Invalid {
            field: field.to_owned(),
            value: String::new(),
            reason: "must be set",
        })
}

impl TryFrom<SliceWire> for ClusterEndpointSlice {
    type Error = FieldError;

    fn try_from(w: SliceWire) -> Result<Self, FieldError> {
        let address_type = match w.address_type.as_deref().unwrap_or_default() {
            "IPv4" => SliceAddressType::Ipv4,
            "IPv6" => SliceAddressType::Ipv6,
            other => {
                return Err(FieldError::Invalid {
                    field: "addressType".to_owned(),
                    value: clip(other),
                    reason: "expected IPv4 or IPv6",
                })
            }
        };
        let endpoints = each_element("endpoints", w.endpoints, |at, e| {
            let addresses = each_element(&format!("{at}.addresses"), e.addresses, |at, a| {
                let ip = parse_ip(at, &a)?;
                if ip.is_ipv4() != (address_type == SliceAddressType::Ipv4) {
                    return Err(FieldError::Invalid {
                        field: at.to_owned(),
                        value: clip(&a),
                        reason: "the address is not of the slice's addressType",
                    });
                }
                Ok(ip)
            })?;
            Ok(SliceEndpoint {
                addresses,
                conditions: e.conditions.map(|c| SliceConditions {
                    ready: c.ready,
                    serving: c.serving,
                    terminating: c.terminating,
                }),
                deprecated_topology: e.deprecated_topology,
                node_name: e.node_name,
                zone: e.zone,
                for_zones: e
                    .hints
                    .map(|h| h.for_zones.into_iter().map(|z| z.name).collect()),
            })
        })?;
        let ports = each_element("ports", w.ports, |at, p| {
            let protocol = p
                .protocol
                .map(|text| L4Protocol::parse_field(format!("{at}.protocol"), &text))
                .transpose()?;
            let port =
                p.port
                    .map(|n| {
                        u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                            FieldError::Invalid {
                                field: format!("{at}.port"),
                                value: n.to_string(),
                                reason: "expected a port number 1..=65535",
                            }
                        })
                    })
                    .transpose()?;
            Ok(SlicePort {
                name: p.name,
                protocol,
                port,
            })
        })?;
        Ok(Self {
            cluster: cluster_field("cluster", required("cluster", w.cluster)?)?,
            cluster_id: cluster_id_field("clusterID", w.cluster_id.unwrap_or_default())?,
            namespace: required("namespace", w.namespace)?,
            name: required("name", w.name)?,
            labels: w.labels,
            annotations: w.annotations,
            address_type,
            endpoints,
            ports,
        })
    }
}

/// The zstd frames of `value`, decompressed, at most [`MAX_DECODED_BYTES`].
fn decompress(value: &[u8]) -> Result<Vec<u8>, String> {
    use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
    use ruzstd::decoding::{FrameDecoder, StreamingDecoder};

    let mut input = value;
    let mut out = Vec::new();
    while !input.is_empty() {
        let mut frame = FrameDecoder::new();
        frame.set_max_window_size(MAX_DECODED_BYTES as u64);
        let decoder = match StreamingDecoder::new_with_decoder(&mut input, frame) {
            Ok(d) => d,
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                // A skippable frame (its magic number is already read).
                input = input
                    .get(length as usize..)
                    .ok_or("a skippable frame is longer than the value")?;
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        let budget = MAX_DECODED_BYTES + 1 - out.len();
        decoder
            .take(budget as u64)
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
        if out.len() > MAX_DECODED_BYTES {
            return Err(format!(
                "it decompresses to more than {MAX_DECODED_BYTES} bytes"
            ));
        }
    }
    Ok(out)
}

impl ClusterEndpointSlice {
    /// The service the slice belongs to (its [`SERVICE_NAME_LABEL`]).
    pub fn service_name(&self) -> Option<&str> {
        self.labels.get(SERVICE_NAME_LABEL).map(String::as_str)
    }

    /// The backends the slice offers, as a service record's `backends`:
    /// every address of every ready endpoint, with each named port that
    /// has a number (protocol TCP when unset, as in Kubernetes).
    pub fn backends(&self) -> impl Iterator<Item = (IpAddr, PortConfiguration)> + '_ {
        let ports: PortConfiguration = self
            .ports
            .iter()
            .filter_map(|p| {
                let port = p.port?;
                let protocol = p.protocol.unwrap_or(L4Protocol::Tcp);
                Some((
                    p.name.clone().unwrap_or_default(),
                    L4Addr { protocol, port },
                ))
            })
            .collect();
        self.endpoints
            .iter()
            .filter(|e| e.is_ready())
            .flat_map(|e| e.addresses.iter().copied())
            .map(move |ip| (ip, ports.clone()))
    }
}

impl Resource for ClusterEndpointSlice {
    const KIND: &'static str = "endpointslices";
    const BASE_PREFIX: &'static str = keys::ENDPOINT_SLICES_BASE_PREFIX;

    fn prefix(cluster: &ClusterName) -> String {
        keys::endpoint_slices_prefix(cluster)
    }

    fn key(&self) -> String {
        keys::endpoint_slice_key(&self.cluster, &self.namespace, &self.name)
    }

    /// Protobuf, then one zstd frame, as Cilium writes it.
    fn encode(&self) -> Vec<u8> {
        let message = SliceWire::from(self).encode_to_vec();
        ruzstd::encoding::compress_to_vec(
            message.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        )
    }

    fn decode(key: &str, value: &[u8], scope: &RemoteScope) -> Result<Self, ValidationError> {
        check_size(key, value)?;
        let parsed = keys::parse_endpoint_slice_key(key)?;
        expect_cluster(key, "key", &parsed.cluster, scope)?;
        let bad = |format, detail| ValidationError::BadBinary {
            key: clip(key),
            format,
            detail,
        };
        let message = decompress(value).map_err(|e| bad("zstd-compressed", e))?;
        let wire = SliceWire::decode(message.as_slice())
            .map_err(|e| bad("a ClusterEndpointSlice protobuf message", e.to_string()))?;
        let slice = Self::try_from(wire).map_err(at(key))?;
        let claimed = (
            &slice.cluster,
            slice.namespace.as_str(),
            slice.name.as_str(),
        );
        expect_namespaced(key, &parsed, claimed, scope)?;
        expect_cluster_id(key, "clusterID", slice.cluster_id, scope)?;
        Ok(slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MaxConnectedClusters;

    const KEY: &str = "cilium/state/endpointslices/v1/cluster3/test/echo-kvlm2";

    fn scope() -> RemoteScope {
        let max = MaxConnectedClusters::Max255;
        RemoteScope::new(
            "cluster3".parse().unwrap(),
            ClusterId::new(3, max).unwrap(),
            max,
        )
    }

    /// The shape of Cilium's `endpointslices.txtar` record.
    fn wire() -> SliceWire {
        SliceWire {
            cluster: Some("cluster3".into()),
            cluster_id: Some(3),
            namespace: Some("test".into()),
            name: Some("echo-kvlm2".into()),
            labels: [(SERVICE_NAME_LABEL.to_owned(), "echo".to_owned())].into(),
            annotations: BTreeMap::new(),
            address_type: Some("IPv4".into()),
            endpoints: vec![
                EndpointWire {
                    addresses: vec!["10.244.1.1".into()],
                    conditions: Some(ConditionsWire {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    deprecated_topology: BTreeMap::new(),
                    node_name: Some("nodeport-worker".into()),
                    zone: Some("zone1".into()),
                    hints: Some(HintsWire {
                        for_zones: vec![ForZoneWire {
                            name: Some("zone1".into()),
                        }],
                    }),
                },
                EndpointWire {
                    addresses: vec!["10.244.1.2".into()],
                    conditions: Some(ConditionsWire {
                        ready: Some(false),
                        serving: Some(false),
                        terminating: Some(false),
                    }),
                    deprecated_topology: BTreeMap::new(),
                    node_name: Some("nodeport-worker".into()),
                    zone: None,
                    hints: None,
                },
            ],
            ports: vec![PortWire {
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                port: Some(8080),
            }],
        }
    }

    fn value(w: &SliceWire) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(
            w.encode_to_vec().as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        )
    }

    #[test]
    fn ciliums_record_decodes_and_round_trips() {
        let bytes = value(&wire());
        let slice = ClusterEndpointSlice::decode(KEY, &bytes, &scope()).unwrap();
        assert_eq!(slice.service_name(), Some("echo"));
        assert_eq!(slice.endpoints.len(), 2);
        let backends: Vec<_> = slice.backends().collect();
        assert_eq!(backends.len(), 1, "the unready endpoint offers no backend");
        assert_eq!(backends[0].0, "10.244.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            backends[0].1["http"],
            L4Addr {
                protocol: L4Protocol::Tcp,
                port: 8080
            }
        );
        assert_eq!(slice.key(), KEY);
        // Round trip: the same message comes back, field for field.
        let again = ClusterEndpointSlice::decode(KEY, &slice.encode(), &scope()).unwrap();
        assert_eq!(again, slice);
        let message = decompress(&slice.encode()).unwrap();
        assert_eq!(SliceWire::decode(message.as_slice()).unwrap(), wire());
    }

    #[test]
    fn several_frames_and_skippable_frames_are_read() {
        let message = wire().encode_to_vec();
        let (a, b) = message.split_at(message.len() / 2);
        let level = ruzstd::encoding::CompressionLevel::Uncompressed;
        let mut bytes = ruzstd::encoding::compress_to_vec(a, level);
        // A skippable frame: magic 0x184D2A50, length 3, three bytes.
        bytes.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        bytes.extend(ruzstd::encoding::compress_to_vec(b, level));
        ClusterEndpointSlice::decode(KEY, &bytes, &scope()).unwrap();
    }

    #[test]
    fn hostile_values_are_refused_with_the_reason() {
        let refuse = |bytes: &[u8], needle: &str| {
            let err = ClusterEndpointSlice::decode(KEY, bytes, &scope()).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
            err.reason()
        };
        assert_eq!(refuse(b"not zstd", "zstd"), "bad_encoding");
        let garbage = ruzstd::encoding::compress_to_vec(
            &[0xff_u8; 40][..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert_eq!(refuse(&garbage, "protobuf"), "bad_encoding");
        // A zstd bomb: 17 MiB of zeros compresses to a few KiB.
        let bomb = ruzstd::encoding::compress_to_vec(
            std::io::repeat(0).take(17 << 20),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert!(bomb.len() < 512 * 1024);
        assert_eq!(refuse(&bomb, "more than"), "bad_encoding");
        let mut w = wire();
        w.cluster = Some("cluster4".into());
        assert_eq!(refuse(&value(&w), "cluster4"), "cluster_mismatch");
        let mut w = wire();
        w.cluster_id = Some(4);
        assert_eq!(refuse(&value(&w), "clusterID"), "cluster_mismatch");
        let mut w = wire();
        w.name = Some("other".into());
        assert_eq!(refuse(&value(&w), "other"), "key_mismatch");
        let mut w = wire();
        w.address_type = Some("FQDN".into());
        assert_eq!(refuse(&value(&w), "addressType"), "invalid_field");
        let mut w = wire();
        w.endpoints[0].addresses[0] = "fd00::1".into();
        assert_eq!(
            refuse(&value(&w), "endpoints[0].addresses[0]"),
            "invalid_field"
        );
        let mut w = wire();
        w.endpoints[1].addresses[0] = "10.244.1.300".into();
        assert_eq!(refuse(&value(&w), "10.244.1.300"), "invalid_ip");
        let mut w = wire();
        w.ports[0].port = Some(70_000);
        assert_eq!(refuse(&value(&w), "ports[0].port"), "invalid_field");
        let mut w = wire();
        w.namespace = None;
        assert_eq!(refuse(&value(&w), "namespace"), "invalid_field");
    }
}
