//! Helpers that reproduce how Go's `encoding/json` writes Cilium's structs,
//! and the shared decode steps of every record.
//!
//! * A nil slice is written `null`; we write `null` for an empty list and read
//!   both `null` and `[]`.
//! * A nil map is written `null`; we always write `{}` (the shape of the
//!   schema's examples) and read both.
//! * A `net.IP` is written as its text, `""` when nil.
//! * A `net.IPNet` (Cilium's `cidr.CIDR`) is `{"IP":"10.1.0.0","Mask":"////AA=="}`,
//!   the mask being the raw mask bytes in standard padded base64.
//!
//! Reading follows Go's `json.Unmarshal` ([`json`]): field names match
//! case-insensitively, a repeated member overwrites, `null` is the zero value.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clip;
use crate::error::{FieldError, ValidationError};
use crate::MAX_VALUE_BYTES;

mod json;

/// `null` for an empty list, like a nil Go slice.
pub(crate) mod null_vec {
    use super::*;

    pub(crate) fn serialize<T: Serialize, S: Serializer>(
        v: &[T],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        if v.is_empty() {
            serializer.serialize_none()
        } else {
            serializer.collect_seq(v)
        }
    }

    pub(crate) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<T>, D::Error> {
        Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
    }
}

/// Reads `null` as an empty map.
pub(crate) fn null_map<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, V>, D::Error> {
    Ok(Option::<BTreeMap<String, V>>::deserialize(deserializer)?.unwrap_or_default())
}

/// A Go `net.IPNet` / Cilium `cidr.CIDR` on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GoCidr {
    #[serde(rename = "IP", default)]
    pub(crate) ip: String,
    #[serde(rename = "Mask", default)]
    pub(crate) mask: Option<String>,
}

impl From<&IpNet> for GoCidr {
    fn from(net: &IpNet) -> Self {
        let mask = match net.netmask() {
            IpAddr::V4(m) => STANDARD.encode(m.octets()),
            IpAddr::V6(m) => STANDARD.encode(m.octets()),
        };
        Self {
            ip: net.addr().to_string(),
            mask: Some(mask),
        }
    }
}

impl GoCidr {
    pub(crate) fn to_ipnet(&self, field: &str) -> Result<IpNet, FieldError> {
        let invalid = |reason| FieldError::InvalidCidr {
            field: field.to_owned(),
            value: clip(&format!("{{IP:{:?}, Mask:{:?}}}", self.ip, self.mask)),
            reason,
        };
        let ip = parse_ip(&format!("{field}.IP"), &self.ip)?;
        let mask = self
            .mask
            .as_deref()
            .ok_or_else(|| invalid("the mask is null"))?;
        let bytes = STANDARD
            .decode(mask)
            .map_err(|_| invalid("the mask is not standard base64"))?;
        let mask_ip = match (ip, bytes.len()) {
            (IpAddr::V4(_), 4) => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(bytes.as_slice()).map_err(|_| invalid("bad mask"))?,
            )),
            (IpAddr::V6(_), 16) => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(bytes.as_slice()).map_err(|_| invalid("bad mask"))?,
            )),
            _ => return Err(invalid(
                "the mask length does not match the address family (4 bytes for IPv4, 16 for IPv6)",
            )),
        };
        IpNet::with_netmask(ip, mask_ip).map_err(|_| invalid("the mask is not contiguous"))
    }
}

/// Parses an IP address field.
pub(crate) fn parse_ip(field: &str, value: &str) -> Result<IpAddr, FieldError> {
    value.parse().map_err(|source| FieldError::InvalidIp {
        field: field.to_owned(),
        value: clip(value),
        source,
    })
}

/// Parses a `net.IP` field that may be `""` (nil).
pub(crate) fn parse_optional_ip(field: &str, value: &str) -> Result<Option<IpAddr>, FieldError> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse_ip(field, value).map(Some)
    }
}

/// Parses a `net.IP` field that may be `""` and must be of one family;
/// `family` picks the address out of an [`IpAddr`] of the right family.
fn parse_optional_family<T>(
    field: &str,
    value: &str,
    family: fn(IpAddr) -> Option<T>,
    wrong_family: &'static str,
) -> Result<Option<T>, FieldError> {
    parse_optional_ip(field, value)?
        .map(|ip| {
            family(ip).ok_or_else(|| FieldError::Invalid {
                field: field.to_owned(),
                value: clip(value),
                reason: wrong_family,
            })
        })
        .transpose()
}

/// Parses a `net.IP` field that may be `""` and must be IPv4.
pub(crate) fn parse_optional_ipv4(
    field: &str,
    value: &str,
) -> Result<Option<Ipv4Addr>, FieldError> {
    let v4 = |ip| match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    };
    parse_optional_family(field, value, v4, "expected an IPv4 address")
}

/// Parses a `net.IP` field that may be `""` and must be IPv6.
pub(crate) fn parse_optional_ipv6(
    field: &str,
    value: &str,
) -> Result<Option<Ipv6Addr>, FieldError> {
    let v6 = |ip| match ip {
        IpAddr::V6(ip) => Some(ip),
        IpAddr::V4(_) => None,
    };
    parse_optional_family(field, value, v6, "expected an IPv6 address")
}

/// Renders an optional IP the way Go renders a nil-able `net.IP`.
pub(crate) fn ip_text(ip: Option<impl ToString>) -> String {
    ip.map(|ip| ip.to_string()).unwrap_or_default()
}

/// Refuses values over [`MAX_VALUE_BYTES`] before anything parses them.
pub(crate) fn check_size(key: &str, value: &[u8]) -> Result<(), ValidationError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(ValidationError::TooLarge {
            key: clip(key),
            size: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// Size check, then JSON decode into the wire struct with Go's rules
/// ([`json`]).
pub(crate) fn decode_json<W: DeserializeOwned>(
    key: &str,
    value: &[u8],
) -> Result<W, ValidationError> {
    check_size(key, value)?;
    json::from_slice(value).map_err(|source| ValidationError::BadJson {
        key: clip(key),
        source,
    })
}

/// Encodes a wire struct. The wire structs hold only strings, numbers, bools,
/// lists and string-keyed maps, which serde_json always serializes.
pub(crate) fn encode_json<W: Serialize>(wire: &W) -> Vec<u8> {
    serde_json::to_vec(wire).expect("wire structs contain only JSON-representable data")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_masks_are_go_base64() {
        let net: IpNet = "10.1.0.0/24".parse().unwrap();
        let wire = GoCidr::from(&net);
        assert_eq!(wire.ip, "10.1.0.0");
        assert_eq!(wire.mask.as_deref(), Some("////AA=="));
        assert_eq!(wire.to_ipnet("f").unwrap(), net);
        let v6: IpNet = "fd00:10:244::/64".parse().unwrap();
        assert_eq!(
            GoCidr::from(&v6).mask.as_deref(),
            Some("//////////8AAAAAAAAAAA==")
        );
        assert_eq!(GoCidr::from(&v6).to_ipnet("f").unwrap(), v6);
    }

    #[test]
    fn bad_cidrs_are_refused_with_reasons() {
        let cases = [
            ("10.1.0.0", None, "null"),
            ("10.1.0.0", Some("!!"), "base64"),
            ("10.1.0.0", Some("/wD/AA=="), "contiguous"),
            ("10.1.0.0", Some("//////////8AAAAAAAAAAA=="), "family"),
        ];
        for (ip, mask, needle) in cases {
            let wire = GoCidr {
                ip: ip.into(),
                mask: mask.map(Into::into),
            };
            let err = wire.to_ipnet("IPv4AllocCIDR").unwrap_err();
            assert_eq!(err.reason(), "invalid_ip");
            assert!(err.to_string().contains(needle), "{err}");
            assert!(err.to_string().contains("IPv4AllocCIDR"), "{err}");
        }
        let err = GoCidr {
            ip: "10.1.0.300".into(),
            mask: Some("////AA==".into()),
        }
        .to_ipnet("IPv4AllocCIDR")
        .unwrap_err();
        assert!(err.to_string().contains("10.1.0.300"), "{err}");
    }
}
