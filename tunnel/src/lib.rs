//! The tunnel layer of the mesh: how pod traffic gets from one node to
//! another.
//!
//! Everything here acts on the network namespace of the calling thread, which
//! for the node agent is the node's namespace. (`setns` is per thread: a
//! caller that switches namespaces must do so on a dedicated thread before it
//! opens a [`Netlink`] connection or a [`WireguardDevice`].)
//!
//! # Modes
//!
//! | `--routing` | `--encryption` | data path | configured here |
//! |---|---|---|---|
//! | tunnel | none | eBPF sets the tunnel key (remote node, identity in the VNI) and redirects to the VXLAN device | [`ensure_vxlan`]: one VXLAN device in external mode; no routes, no peers |
//! | tunnel | wireguard | as above, then the VXLAN packet (UDP to port 4789 of the remote node) is routed into the WireGuard device, encrypted, and sent as UDP to port 51871 | the VXLAN device; a [`WireguardDevice`] with one peer per remote node, allowed IPs = its underlay /32; per remote node `underlay/32 dev wg src <own underlay>` in table 2004; one rule "UDP dport 4789 → table 2004" |
//! | native | none | the kernel routes pod CIDRs to the remote node's underlay address (peered VPCs) | `pod_cidr via underlay` per remote node |
//! | native | wireguard | the kernel routes remote pod CIDRs into the WireGuard device | a [`WireguardDevice`], peers with allowed IPs = the node's pod CIDRs; `pod_cidr dev wg` per remote node |
//!
//! Why VXLAN goes *through* WireGuard instead of pods' packets going to
//! WireGuard directly: the security identity travels in the VNI, so the
//! receiving node's ingress program reads it the same way whether the
//! packet was encrypted or not; there is one datapath, and encryption is a
//! routing decision. The policy rule matches only UDP to the VXLAN port, so
//! WireGuard's own packets to the same remote address (port 51871) still
//! leave through the underlay and there is no routing loop, without
//! firewall marks (which boringtun sets only on some of its sockets).
//!
//! # Parts
//!
//! * [`keys`]: the node's key pair, private key in a 0600 file, reused.
//! * [`vxlan`]: the external-mode VXLAN device, created or adopted.
//! * [`wireguard`]: the WireGuard device (kernel or boringtun) and its peers,
//!   reconciled by diff.
//! * [`routes`]: the pure routing decisions ([`routes::plan`]) and their
//!   application by diff, touching only routes and rules tagged with the
//!   tunnel layer's routing protocol number.
//! * [`netlink`]: the rtnetlink connection and small link helpers.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tunnel::{routes, Netlink, PrivateKey, VxlanConfig, WireguardConfig, WireguardDevice};
//!
//! let netlink = Netlink::connect()?;
//! tunnel::ensure_vxlan(&netlink, "mesh_vxlan", &VxlanConfig::for_node("c1/node-1")).await?;
//! let key = PrivateKey::load_or_generate("/var/lib/mesh".as_ref())?;
//! let mut wg = WireguardDevice::open(&netlink, WireguardConfig::new("mesh_wg", key)).await?;
//! println!("WireguardPubKey: {}", wg.public_key());
//!
//! let mode = routes::RoutingMode {
//!     routing: routes::Routing::Tunnel,
//!     encryption: routes::Encryption::Wireguard,
//! };
//! let remotes: Vec<routes::RemoteNode> = Vec::new(); // from the node records
//! let plan = routes::plan(mode, &remotes, &routes::TunnelParams::new("mesh_wg", "192.168.1.2".parse()?));
//! wg.set_peers(plan.peers)?;
//! routes::apply_routes(&netlink, &plan.routes).await?;
//! routes::apply_rules(&netlink, &plan.rules).await?;
//! # Ok(())
//! # }
//! ```

pub mod keys;
pub mod netlink;
pub mod routes;
pub mod vxlan;
pub mod wireguard;

pub use keys::{KeyError, PrivateKey, PublicKey};
pub use netlink::{LinkState, Netlink, NetlinkError};
pub use vxlan::{ensure_vxlan, VxlanConfig, VxlanError, VxlanOutcome};
pub use wireguard::{
    Backend, BackendPreference, PeerChanges, PeerConfig, WireguardConfig, WireguardDevice,
    WireguardError,
};
