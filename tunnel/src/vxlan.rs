//! The node's VXLAN device in external (collect-metadata) mode.
//!
//! In external mode the device has no fixed VNI or remote: the eBPF program on
//! each pod's host-side veth sets a tunnel key per packet (remote node
//! address, and the source security identity as the VNI, as Cilium does) and
//! redirects to this device; on receive, the program on the device's ingress
//! reads the identity back from the tunnel key. One device therefore serves
//! every remote node of every cluster.
//!
//! [`ensure_vxlan`] is idempotent so an agent restart adopts the device it
//! made before instead of tearing it down (which would drop packets of
//! established flows): attributes the kernel can change in place (MTU, MAC,
//! up) are set; a device whose immutable attributes differ (UDP port,
//! external mode, underlay device) is recreated; a link of another kind with
//! the same name is refused, never deleted.
//!
//! The MAC is stable, derived from the node's identity by [`stable_mac`]: the
//! inner destination MAC of a VXLAN frame must be the receiving device's MAC or
//! the kernel drops the frame (`docs/architecture.md` §7), so a MAC that changed on every
//! restart would have to be re-announced to every remote node.

use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{LinkMessageBuilder, LinkVxlan};

use crate::netlink::{request_error, validate_link_name, LinkState, Netlink, NetlinkError};

/// The IANA VXLAN port, which Cilium also uses.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// How the VXLAN device should look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    /// UDP destination port of the encapsulation (also the local listen port).
    pub port: u16,
    /// MTU of the device; `None` leaves the kernel's choice (underlay MTU
    /// minus 50 when an underlay device is given, else 1450).
    pub mtu: Option<u32>,
    /// Hardware address; see [`stable_mac`].
    pub mac: [u8; 6],
    /// Underlay device to bind the tunnel to (`dev` in `ip link`); `None`
    /// lets the routing table pick per packet.
    pub underlay: Option<String>,
}

impl VxlanConfig {
    /// The defaults for a node: port 4789, the kernel's MTU, no underlay
    /// binding, and the MAC derived from `node_identity` (for example
    /// `"<cluster>/<node>"`).
    pub fn for_node(node_identity: &str) -> Self {
        Self {
            port: DEFAULT_VXLAN_PORT,
            mtu: None,
            mac: stable_mac(node_identity),
            underlay: None,
        }
    }
}

/// The VXLAN device as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanState {
    /// The link.
    pub link: LinkState,
    /// UDP port.
    pub port: Option<u16>,
    /// External (collect-metadata) mode.
    pub external: bool,
    /// Source-address learning (off in external mode).
    pub learning: Option<bool>,
    /// The fixed VNI, which an external device has none of.
    pub vni: Option<u32>,
    /// Index of the underlay device, if bound.
    pub underlay_index: Option<u32>,
}

/// What [`ensure_vxlan`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VxlanOutcome {
    /// There was no such device; it was created.
    Created,
    /// A matching device existed and was adopted (MTU, MAC, up set).
    Adopted,
    /// A VXLAN device with other immutable attributes existed; it was
    /// deleted and created again.
    Recreated,
}

/// Errors of VXLAN device management.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    /// A netlink operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A link with the device's name exists but is not a VXLAN device; it is
    /// not ours to delete.
    #[error("link {name} exists and is of kind {kind:?}, not vxlan; refusing to replace it")]
    NotVxlan {
        /// The link name.
        name: String,
        /// Its kind.
        kind: Option<String>,
    },
    /// The MAC is multicast or all zeros, which a device cannot have.
    #[error("vxlan mac {mac:02x?} is not a unicast address")]
    InvalidMac {
        /// The address.
        mac: [u8; 6],
    },
    /// Port 0 is not a valid VXLAN port.
    #[error("vxlan udp port must not be 0")]
    InvalidPort,
}

/// A locally administered unicast MAC derived deterministically from
/// `node_identity` (FNV-1a, stable across releases and architectures).
pub fn stable_mac(node_identity: &str) -> [u8; 6] {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = node_identity
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    let b = hash.to_be_bytes();
    // Locally administered (bit 1 set), unicast (bit 0 clear).
    [(b[0] | 0x02) & 0xfe, b[1], b[2], b[3], b[4], b[5]]
}

/// Creates the VXLAN device `name` in external mode, or adopts an existing one
/// (see the module docs), sets its MTU and MAC and brings it up.
///
/// # Errors
///
/// [`VxlanError::NotVxlan`] if the name is taken by another kind of link,
/// [`VxlanError::InvalidMac`] / [`VxlanError::InvalidPort`] on a bad config,
/// [`VxlanError::Netlink`] if the kernel refuses.
pub async fn ensure_vxlan(
    netlink: &Netlink,
    name: &str,
    config: &VxlanConfig,
) -> Result<VxlanOutcome, VxlanError> {
    validate_link_name(name)?;
    if config.port == 0 {
        return Err(VxlanError::InvalidPort);
    }
    if config.mac[0] & 0x01 != 0 || config.mac == [0; 6] {
        return Err(VxlanError::InvalidMac { mac: config.mac });
    }
    let underlay_index = match &config.underlay {
        Some(dev) => Some(netlink.link_index(dev).await?),
        None => None,
    };

    let outcome = match vxlan_state(netlink, name).await? {
        None => VxlanOutcome::Created,
        Some(Err(kind)) => {
            return Err(VxlanError::NotVxlan {
                name: name.to_owned(),
                kind,
            })
        }
        Some(Ok(state)) => {
            if state.port == Some(config.port)
                && state.external
                && state.underlay_index == underlay_index
            {
                VxlanOutcome::Adopted
            } else {
                tracing::warn!(
                    device = name,
                    ?state,
                    "vxlan device has other immutable attributes than configured; recreating it"
                );
                netlink.delete_link(name).await?;
                VxlanOutcome::Recreated
            }
        }
    };

    if outcome != VxlanOutcome::Adopted {
        let mut builder = LinkMessageBuilder::<LinkVxlan>::new(name)
            .port(config.port)
            .collect_metadata(true)
            .learning(false);
        if let Some(index) = underlay_index {
            builder = builder.dev(index);
        }
        netlink
            .handle()
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(|source| request_error("creating vxlan link", name, source))?;
    }

    // MAC, MTU and up are applied in one request, for new and adopted devices.
    let index = netlink.link_index(name).await?;
    let mut builder = rtnetlink::LinkUnspec::new_with_index(index)
        .address(config.mac.to_vec())
        .up();
    if let Some(mtu) = config.mtu {
        builder = builder.mtu(mtu);
    }
    netlink
        .handle()
        .link()
        .set(builder.build())
        .execute()
        .await
        .map_err(|source| request_error("setting mac, mtu and up on vxlan link", name, source))?;
    tracing::info!(
        device = name,
        ?outcome,
        port = config.port,
        "vxlan device ready"
    );
    Ok(outcome)
}

/// Reads link `name` back: `None` if it does not exist, `Some(Err(kind))` if it
/// is not a VXLAN device, else its VXLAN attributes.
///
/// # Errors
///
/// [`NetlinkError`] if the query fails.
pub async fn vxlan_state(
    netlink: &Netlink,
    name: &str,
) -> Result<Option<Result<VxlanState, Option<String>>>, NetlinkError> {
    let Some(message) = netlink.link_message(name).await? else {
        return Ok(None);
    };
    let link = LinkState::from_message(&message);
    if link.kind.as_deref() != Some("vxlan") {
        return Ok(Some(Err(link.kind)));
    }
    Ok(Some(Ok(parse_vxlan(link, &message))))
}

fn parse_vxlan(link: LinkState, message: &LinkMessage) -> VxlanState {
    let mut state = VxlanState {
        link,
        port: None,
        external: false,
        learning: None,
        vni: None,
        underlay_index: None,
    };
    let infos = message.attributes.iter().filter_map(|attr| match attr {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    });
    for info in infos.flatten() {
        let LinkInfo::Data(InfoData::Vxlan(attrs)) = info else {
            continue;
        };
        for attr in attrs {
            match attr {
                InfoVxlan::Port(port) => state.port = Some(*port),
                InfoVxlan::CollectMetadata(on) => state.external = *on,
                InfoVxlan::Learning(on) => state.learning = Some(*on),
                // The kernel reports VNI 0 for an external device.
                InfoVxlan::Id(vni) if *vni != 0 => state.vni = Some(*vni),
                InfoVxlan::Link(index) if *index != 0 => state.underlay_index = Some(*index),
                _ => {}
            }
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_mac_is_deterministic_unicast_and_local() {
        let a = stable_mac("c1/node-1");
        assert_eq!(a, stable_mac("c1/node-1"));
        assert_ne!(a, stable_mac("c1/node-2"));
        assert_ne!(a, stable_mac("c2/node-1"));
        assert_eq!(a[0] & 0x01, 0, "multicast bit set in {a:02x?}");
        assert_eq!(
            a[0] & 0x02,
            0x02,
            "locally administered bit clear in {a:02x?}"
        );
        // Pinned: the derivation is part of the node's contract with its peers.
        assert_eq!(stable_mac(""), [0xca, 0xf2, 0x9c, 0xe4, 0x84, 0x22]);
    }
}
