//! Routing decisions of the tunnel layer, and their application by diff.
//!
//! [`plan`] is a pure function from the remote nodes and the routing mode to
//! the routes, policy rules and WireGuard peers this node needs (see the
//! crate docs for the modes). [`apply_routes`] and [`apply_rules`] then make
//! the kernel's state equal to the plan by diff.
//!
//! Every route and rule this crate installs carries the routing protocol
//! number [`ROUTE_PROTOCOL`] (`proto 201` in `ip route`). Reconciliation only
//! ever lists, compares and removes entries with that tag, so routes made by
//! the administrator, DHCP, the kernel or another agent are never touched,
//! and a restarted agent recognises (and keeps) what its predecessor
//! installed instead of flushing and re-adding it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::packet_route::{AddressFamily, IpProtocol};
use rtnetlink::{IpVersion, RouteMessageBuilder};

use crate::keys::PublicKey;
use crate::netlink::{errno, request_error, Netlink, NetlinkError};
use crate::wireguard::PeerConfig;

/// The routing protocol number that tags every route and rule of the tunnel
/// layer (unassigned in iproute2's `rt_protos`; the kernel only stores it).
pub const ROUTE_PROTOCOL: u8 = 201;

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// The default table for the "VXLAN through WireGuard" routes.
pub const DEFAULT_ENCRYPTION_TABLE: u32 = 2004;

/// The default priority of the rule that sends VXLAN traffic to that table
/// (before the main table's rule at 32766).
pub const DEFAULT_ENCRYPTION_RULE_PRIORITY: u32 = 1000;

pub use api::{Encryption, Routing};

/// The mode of the tunnel layer (the agent's `--routing` and `--encryption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingMode {
    /// Tunnel or native routing.
    pub routing: Routing,
    /// Encryption on top.
    pub encryption: Encryption,
}

/// What the tunnel layer needs to know about a remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    /// A name for logs and rejections, e.g. `cluster/node`.
    pub name: String,
    /// The node's underlay address (its `InternalIP`).
    pub underlay_ip: IpAddr,
    /// The node's pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// Its WireGuard public key, if it published one.
    pub wireguard_public_key: Option<PublicKey>,
}

/// Device names, addresses, ports and table numbers of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelParams {
    /// This node's underlay address: the source of VXLAN packets routed into
    /// WireGuard (the remote peer only accepts its peer's underlay address
    /// there; without it the kernel would pick the WireGuard device's own
    /// address).
    pub local_underlay_ip: IpAddr,
    /// The WireGuard device.
    pub wireguard_device: String,
    /// The WireGuard port of remote nodes.
    pub wireguard_port: u16,
    /// The VXLAN UDP port.
    pub vxlan_port: u16,
    /// The table of the "VXLAN through WireGuard" routes.
    pub encryption_table: u32,
    /// The priority of the rule selecting that table.
    pub encryption_rule_priority: u32,
}

impl TunnelParams {
    /// Defaults: port 51871 and 4789, table 2004, rule priority 1000.
    pub fn new(wireguard_device: impl Into<String>, local_underlay_ip: IpAddr) -> Self {
        Self {
            local_underlay_ip,
            wireguard_device: wireguard_device.into(),
            wireguard_port: crate::wireguard::DEFAULT_LISTEN_PORT,
            vxlan_port: crate::vxlan::DEFAULT_VXLAN_PORT,
            encryption_table: DEFAULT_ENCRYPTION_TABLE,
            encryption_rule_priority: DEFAULT_ENCRYPTION_RULE_PRIORITY,
        }
    }
}

/// Where a route sends packets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NextHop {
    /// Via a gateway, the kernel picks the device.
    Gateway(IpAddr),
    /// Straight into a device (scope link).
    Device(String),
}

/// A route of the tunnel layer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// Table number.
    pub table: u32,
    /// Destination prefix.
    pub destination: IpNet,
    /// Next hop.
    pub next_hop: NextHop,
    /// Preferred source address (`src` in `ip route`).
    pub source: Option<IpAddr>,
}

/// A policy rule of the tunnel layer: UDP to `dport` looks up `table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// IPv4 or IPv6.
    pub ipv6: bool,
    /// Rule priority.
    pub priority: u32,
    /// UDP destination port matched.
    pub udp_dport: u16,
    /// Table looked up.
    pub table: u32,
}

/// A remote node (or part of it) that the plan leaves out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The node's name.
    pub node: String,
    /// Why.
    pub reason: String,
}

/// Everything the tunnel layer should install for a set of remote nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Routes (all tagged [`ROUTE_PROTOCOL`] when applied).
    pub routes: BTreeSet<Route>,
    /// Policy rules.
    pub rules: BTreeSet<Rule>,
    /// WireGuard peers (empty without encryption).
    pub peers: Vec<PeerConfig>,
    /// What was left out.
    pub rejected: Vec<Rejected>,
}

/// Computes the routes, rules and peers for `remotes` in `mode`.
///
/// * tunnel, no encryption: nothing; the eBPF datapath sets the tunnel key
///   and redirects to the VXLAN device, no route is involved.
/// * tunnel + WireGuard: per remote node, `underlay/32 dev <wg>` in the
///   encryption table, and one rule per address family "UDP to the VXLAN port
///   looks up the encryption table"; so VXLAN packets (identity in the VNI)
///   enter WireGuard while WireGuard's own UDP packets to the same address
///   (another port) take the main table and leave by the underlay, with no
///   routing loop. Peer allowed IPs: the node's underlay address.
/// * native: `pod_cidr via underlay` in the main table.
/// * native + WireGuard: `pod_cidr dev <wg>` in the main table; peer allowed
///   IPs: the node's pod CIDRs.
///
/// Routes through WireGuard are planned even for a node without a public key,
/// so that its traffic is dropped by WireGuard (no peer) rather than sent in
/// clear; the missing peer is listed in [`Plan::rejected`]. Nodes are
/// processed by name, and a pod CIDR or public key claimed by a second node
/// is rejected for that node, so the plan does not depend on input order.
pub fn plan(mode: RoutingMode, remotes: &[RemoteNode], params: &TunnelParams) -> Plan {
    let mut plan = Plan::default();
    let mut nodes: Vec<&RemoteNode> = remotes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut cidr_owner: BTreeMap<IpNet, &str> = BTreeMap::new();
    let mut key_owner: BTreeMap<PublicKey, &str> = BTreeMap::new();
    let wg = || NextHop::Device(params.wireguard_device.clone());
    let mut reject = |node: &RemoteNode, reason: String| {
        plan.rejected.push(Rejected {
            node: node.name.clone(),
            reason,
        });
    };

    let mut routes = BTreeSet::new();
    let mut rules = BTreeSet::new();
    let mut peers = Vec::new();
    for node in nodes {
        let underlay_net = IpNet::from(node.underlay_ip);
        let mut cidrs = Vec::new();
        if mode.routing == Routing::Native {
            for cidr in node.pod_cidrs.iter().map(IpNet::trunc) {
                if cidr.addr().is_ipv4() != node.underlay_ip.is_ipv4()
                    && mode.encryption == Encryption::None
                {
                    reject(
                        node,
                        format!(
                            "pod cidr {cidr} and underlay {} differ in address family",
                            node.underlay_ip
                        ),
                    );
                    continue;
                }
                if let Some(owner) = cidr_owner.get(&cidr) {
                    reject(
                        node,
                        format!("pod cidr {cidr} is already routed to node {owner}"),
                    );
                    continue;
                }
                cidr_owner.insert(cidr, &node.name);
                cidrs.push(cidr);
            }
        }

        let allowed_ips = match (mode.routing, mode.encryption) {
            (_, Encryption::None) => {
                routes.extend(cidrs.iter().map(|&destination| Route {
                    table: MAIN_TABLE,
                    destination,
                    next_hop: NextHop::Gateway(node.underlay_ip),
                    source: None,
                }));
                continue;
            }
            (Routing::Tunnel, Encryption::Wireguard) => {
                routes.insert(Route {
                    table: params.encryption_table,
                    destination: underlay_net,
                    next_hop: wg(),
                    source: (params.local_underlay_ip.is_ipv4() == node.underlay_ip.is_ipv4())
                        .then_some(params.local_underlay_ip),
                });
                rules.insert(Rule {
                    ipv6: node.underlay_ip.is_ipv6(),
                    priority: params.encryption_rule_priority,
                    udp_dport: params.vxlan_port,
                    table: params.encryption_table,
                });
                vec![underlay_net]
            }
            (Routing::Native, Encryption::Wireguard) => {
                routes.extend(cidrs.iter().map(|&destination| Route {
                    table: MAIN_TABLE,
                    destination,
                    next_hop: wg(),
                    source: None,
                }));
                cidrs
            }
        };
        let Some(public_key) = node.wireguard_public_key else {
            reject(
                node,
                "no wireguard public key; its traffic is dropped until it publishes one".to_owned(),
            );
            continue;
        };
        if let Some(owner) = key_owner.get(&public_key) {
            reject(
                node,
                format!("wireguard public key {public_key} is already used by node {owner}"),
            );
            continue;
        }
        key_owner.insert(public_key, &node.name);
        peers.push(
            PeerConfig {
                public_key,
                endpoint: SocketAddr::new(node.underlay_ip, params.wireguard_port),
                allowed_ips,
            }
            .normalized(),
        );
    }
    plan.routes = routes;
    plan.rules = rules;
    plan.peers = peers;
    plan
}

/// Errors of route and rule reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A netlink operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A desired route exists already but was not made by the tunnel layer;
    /// it is not replaced.
    #[error("route {route:?} conflicts with an existing route not made by the tunnel layer")]
    Conflict {
        /// The route.
        route: Route,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A route the kernel cannot express (e.g. IPv6 prefix via IPv4 gateway).
    #[error("route {route:?} cannot be expressed: {reason}")]
    Invalid {
        /// The route.
        route: Route,
        /// Why.
        reason: String,
    },
}

/// What a reconciliation changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes<T> {
    /// Entries added.
    pub added: Vec<T>,
    /// Entries removed.
    pub removed: Vec<T>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Self {
            added: Vec::new(),
            removed: Vec::new(),
        }
    }
}

fn protocol() -> RouteProtocol {
    RouteProtocol::from(ROUTE_PROTOCOL)
}

/// The routes of the tunnel layer (tagged [`ROUTE_PROTOCOL`]) now in the
/// kernel, in every table, IPv4 and IPv6.
///
/// # Errors
///
/// [`NetlinkError`] if the dump fails.
pub async fn installed_routes(netlink: &Netlink) -> Result<BTreeSet<Route>, NetlinkError> {
    let names = link_names(netlink).await?;
    let mut routes = BTreeSet::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let messages: Vec<RouteMessage> = netlink
            .handle()
            .route()
            .get(match version {
                IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            })
            .execute()
            .try_collect()
            .await
            .map_err(|source| request_error("listing routes", "all tables", source))?;
        routes.extend(
            messages
                .iter()
                .filter(|m| m.header.protocol == protocol())
                .filter_map(|m| parse_route(m, &names)),
        );
    }
    Ok(routes)
}

async fn link_names(netlink: &Netlink) -> Result<BTreeMap<u32, String>, NetlinkError> {
    let links: Vec<_> = netlink
        .handle()
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| request_error("listing links", "all", source))?;
    Ok(links
        .iter()
        .map(crate::netlink::LinkState::from_message)
        .map(|link| (link.index, link.name))
        .collect())
}

fn parse_route(message: &RouteMessage, names: &BTreeMap<u32, String>) -> Option<Route> {
    let mut table = u32::from(message.header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    let mut source = None;
    for attr in &message.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(address) => destination = route_ip(address),
            RouteAttribute::Gateway(address) => gateway = route_ip(address),
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::PrefSource(address) => source = route_ip(address),
            _ => {}
        }
    }
    let destination = match destination {
        Some(ip) => IpNet::new(ip, message.header.destination_prefix_length).ok()?,
        None if message.header.address_family == AddressFamily::Inet6 => "::/0".parse().ok()?,
        None => "0.0.0.0/0".parse().ok()?,
    };
    let next_hop = match (gateway, oif) {
        (Some(gateway), _) => NextHop::Gateway(gateway),
        (None, Some(index)) => NextHop::Device(names.get(&index)?.clone()),
        (None, None) => return None,
    };
    Some(Route {
        table,
        destination,
        next_hop,
        source,
    })
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

async fn route_message(netlink: &Netlink, route: &Route) -> Result<RouteMessage, RouteError> {
    let invalid = |reason: String| RouteError::Invalid {
        route: route.clone(),
        reason,
    };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination.addr(), route.destination.prefix_len())
        .map_err(|e| invalid(e.to_string()))?
        .table_id(route.table)
        .protocol(protocol());
    if let Some(source) = route.source {
        builder = builder
            .pref_source(source)
            .map_err(|e| invalid(e.to_string()))?;
    }
    builder = match &route.next_hop {
        NextHop::Gateway(gateway) => builder
            .gateway(*gateway)
            .map_err(|e| invalid(e.to_string()))?,
        NextHop::Device(name) => builder
            .output_interface(netlink.link_index(name).await?)
            .scope(RouteScope::Link),
    };
    Ok(builder.build())
}

/// Deletes one of the tunnel layer's routes; one already gone is fine.
async fn delete_route(netlink: &Netlink, route: &Route) -> Result<(), RouteError> {
    let message = route_message(netlink, route).await?;
    match netlink.handle().route().del(message).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
        Err(source) => Err(request_error("deleting route", &format!("{route:?}"), source).into()),
    }
}

/// Adds one route; [`RouteError::Conflict`] if an equal route (not ours, as
/// ours were listed) is in the way.
async fn add_route(netlink: &Netlink, route: &Route) -> Result<(), RouteError> {
    let message = route_message(netlink, route).await?;
    match netlink.handle().route().add(message).execute().await {
        Ok(()) => Ok(()),
        Err(source) if errno(&source) == Some(libc::EEXIST) => Err(RouteError::Conflict {
            route: route.clone(),
            source,
        }),
        Err(source) => Err(request_error("adding route", &format!("{route:?}"), source).into()),
    }
}

/// Makes the tunnel layer's routes equal to `desired`: removes tagged routes
/// that are not desired, adds desired ones that are missing. Untagged routes
/// are never removed; a desired route that collides with one is an error
/// ([`RouteError::Conflict`]), reported after the other routes were applied.
///
/// # Errors
///
/// The first [`RouteError`] met; later routes are still attempted.
pub async fn apply_routes(
    netlink: &Netlink,
    desired: &BTreeSet<Route>,
) -> Result<Changes<Route>, RouteError> {
    let installed = installed_routes(netlink).await?;
    let mut changes = Changes::default();
    let mut first_error = None;
    // A failed change is kept (the first one) and the others still go ahead.
    let mut note =
        |result: Result<(), RouteError>, route: &Route, done: &mut Vec<Route>| match result {
            Ok(()) => done.push(route.clone()),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        };
    for route in installed.difference(desired) {
        note(
            delete_route(netlink, route).await,
            route,
            &mut changes.removed,
        );
    }
    for route in desired.difference(&installed) {
        note(add_route(netlink, route).await, route, &mut changes.added);
    }
    if !changes.added.is_empty() || !changes.removed.is_empty() {
        tracing::info!(
            added = changes.added.len(),
            removed = changes.removed.len(),
            "tunnel routes changed"
        );
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(changes),
    }
}

/// The rules of the tunnel layer (tagged [`ROUTE_PROTOCOL`]) now in the
/// kernel.
///
/// # Errors
///
/// [`NetlinkError`] if the dump fails.
pub async fn installed_rules(netlink: &Netlink) -> Result<BTreeSet<Rule>, NetlinkError> {
    let mut rules = BTreeSet::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let ipv6 = version == IpVersion::V6;
        let messages: Vec<RuleMessage> = netlink
            .handle()
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(|source| {
                request_error("listing rules", if ipv6 { "ipv6" } else { "ipv4" }, source)
            })?;
        rules.extend(messages.iter().filter_map(|m| parse_rule(m, ipv6)));
    }
    Ok(rules)
}

fn parse_rule(message: &RuleMessage, ipv6: bool) -> Option<Rule> {
    let mut ours = false;
    let mut priority = 0;
    let mut table = u32::from(message.header.table);
    let mut udp = false;
    let mut dport = None;
    for attr in &message.attributes {
        match attr {
            RuleAttribute::Protocol(p) => ours = *p == protocol(),
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::IpProtocol(p) => udp = *p == IpProtocol::Udp,
            RuleAttribute::DestinationPortRange(range) if range.start == range.end => {
                dport = Some(range.start)
            }
            _ => {}
        }
    }
    (ours && udp).then_some(Rule {
        ipv6,
        priority,
        udp_dport: dport?,
        table,
    })
}

fn rule_message(rule: &Rule) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = if rule.ipv6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    message.header.action = RuleAction::ToTable;
    message.header.table = 0;
    message.attributes = vec![
        RuleAttribute::Table(rule.table),
        RuleAttribute::Priority(rule.priority),
        RuleAttribute::Protocol(protocol()),
        RuleAttribute::IpProtocol(IpProtocol::Udp),
        RuleAttribute::DestinationPortRange(RulePortRange {
            start: rule.udp_dport,
            end: rule.udp_dport,
        }),
    ];
    message
}

/// Makes the tunnel layer's policy rules equal to `desired`, like
/// [`apply_routes`] does for routes.
///
/// # Errors
///
/// [`RouteError::Netlink`] if the kernel refuses a change.
pub async fn apply_rules(
    netlink: &Netlink,
    desired: &BTreeSet<Rule>,
) -> Result<Changes<Rule>, RouteError> {
    let installed = installed_rules(netlink).await?;
    let mut changes = Changes::default();
    for rule in installed.difference(desired) {
        match netlink
            .handle()
            .rule()
            .del(rule_message(rule))
            .execute()
            .await
        {
            Ok(()) => changes.removed.push(*rule),
            Err(e) if errno(&e) == Some(libc::ENOENT) => changes.removed.push(*rule),
            Err(source) => {
                return Err(request_error("deleting rule", &format!("{rule:?}"), source).into())
            }
        }
    }
    for rule in desired.difference(&installed) {
        let mut request = netlink.handle().rule().add();
        *request.message_mut() = rule_message(rule);
        match request.execute().await {
            Ok(()) => changes.added.push(*rule),
            Err(source) => {
                return Err(request_error("adding rule", &format!("{rule:?}"), source).into())
            }
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn node(name: &str, underlay: &str, cidrs: &[&str], key: Option<PublicKey>) -> RemoteNode {
        RemoteNode {
            name: name.to_owned(),
            underlay_ip: underlay.parse().unwrap(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            wireguard_public_key: key,
        }
    }

    fn key() -> PublicKey {
        PrivateKey::generate().unwrap().public_key()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn mode(routing: Routing, encryption: Encryption) -> RoutingMode {
        RoutingMode {
            routing,
            encryption,
        }
    }

    #[test]
    fn plain_vxlan_needs_no_routes_rules_or_peers() {
        let remotes = [node("c2/n1", "192.168.2.1", &["10.2.1.0/24"], Some(key()))];
        let plan = plan(
            mode(Routing::Tunnel, Encryption::None),
            &remotes,
            &TunnelParams::new("wg0", "192.168.1.1".parse().unwrap()),
        );
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn vxlan_over_wireguard_routes_underlay_into_wg_for_vxlan_port_only() {
        let k = key();
        let remotes = [node("c2/n1", "192.168.2.1", &["10.2.1.0/24"], Some(k))];
        let params = TunnelParams::new("wg0", "192.168.1.1".parse().unwrap());
        let plan = plan(
            mode(Routing::Tunnel, Encryption::Wireguard),
            &remotes,
            &params,
        );
        assert_eq!(
            plan.routes,
            BTreeSet::from([Route {
                table: DEFAULT_ENCRYPTION_TABLE,
                destination: net("192.168.2.1/32"),
                next_hop: NextHop::Device("wg0".into()),
                source: Some("192.168.1.1".parse().unwrap()),
            }])
        );
        assert_eq!(
            plan.rules,
            BTreeSet::from([Rule {
                ipv6: false,
                priority: DEFAULT_ENCRYPTION_RULE_PRIORITY,
                udp_dport: 4789,
                table: DEFAULT_ENCRYPTION_TABLE,
            }])
        );
        assert_eq!(
            plan.peers,
            vec![PeerConfig {
                public_key: k,
                endpoint: "192.168.2.1:51871".parse().unwrap(),
                allowed_ips: vec![net("192.168.2.1/32")],
            }]
        );
        assert!(plan.rejected.is_empty());
    }

    #[test]
    fn native_routes_pod_cidrs_via_underlay() {
        let remotes = [
            node("c2/n1", "192.168.2.1", &["10.2.1.7/24"], None),
            node(
                "c2/n2",
                "192.168.2.2",
                &["10.2.2.0/24", "fd00:2:2::/64"],
                None,
            ),
        ];
        let plan = plan(
            mode(Routing::Native, Encryption::None),
            &remotes,
            &TunnelParams::new("wg0", "192.168.1.1".parse().unwrap()),
        );
        let via = |cidr: &str, gw: &str| Route {
            table: MAIN_TABLE,
            destination: net(cidr),
            next_hop: NextHop::Gateway(gw.parse().unwrap()),
            source: None,
        };
        assert_eq!(
            plan.routes,
            BTreeSet::from([
                via("10.2.1.0/24", "192.168.2.1"),
                via("10.2.2.0/24", "192.168.2.2")
            ])
        );
        assert!(plan.peers.is_empty() && plan.rules.is_empty());
        assert_eq!(plan.rejected.len(), 1, "{:?}", plan.rejected);
        assert!(plan.rejected[0].reason.contains("fd00:2:2::/64"));
    }

    #[test]
    fn native_with_wireguard_routes_pod_cidrs_into_wg() {
        let k = key();
        let remotes = [node("c2/n1", "192.168.2.1", &["10.2.1.0/24"], Some(k))];
        let plan = plan(
            mode(Routing::Native, Encryption::Wireguard),
            &remotes,
            &TunnelParams::new("wg0", "192.168.1.1".parse().unwrap()),
        );
        assert_eq!(
            plan.routes,
            BTreeSet::from([Route {
                table: MAIN_TABLE,
                destination: net("10.2.1.0/24"),
                next_hop: NextHop::Device("wg0".into()),
                source: None,
            }])
        );
        assert_eq!(plan.peers[0].allowed_ips, vec![net("10.2.1.0/24")]);
        assert!(plan.rules.is_empty());
    }

    #[test]
    fn node_without_key_keeps_its_route_but_gets_no_peer() {
        let remotes = [node("c2/n1", "192.168.2.1", &["10.2.1.0/24"], None)];
        let plan = plan(
            mode(Routing::Native, Encryption::Wireguard),
            &remotes,
            &TunnelParams::new("wg0", "192.168.1.1".parse().unwrap()),
        );
        assert_eq!(
            plan.routes.len(),
            1,
            "fail closed: traffic must still enter wg"
        );
        assert!(plan.peers.is_empty());
        assert_eq!(plan.rejected[0].node, "c2/n1");
    }

    #[test]
    fn conflicts_are_rejected_independently_of_input_order() {
        let k = key();
        let a = node("c2/a", "192.168.2.1", &["10.2.1.0/24"], Some(k));
        let b = node(
            "c2/b",
            "192.168.2.2",
            &["10.2.1.0/24", "10.2.9.0/24"],
            Some(k),
        );
        let m = mode(Routing::Native, Encryption::Wireguard);
        let params = TunnelParams::new("wg0", "192.168.1.1".parse().unwrap());
        let forward = plan(m, &[a.clone(), b.clone()], &params);
        let backward = plan(m, &[b, a], &params);
        assert_eq!(forward, backward);
        assert_eq!(forward.peers.len(), 1);
        assert_eq!(
            forward.peers[0].endpoint,
            "192.168.2.1:51871".parse().unwrap()
        );
        let reasons: Vec<&str> = forward.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("already routed to node c2/a")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("already used by node c2/a")),
            "{reasons:?}"
        );
        // b's unique CIDR is still routed (into wg, where no peer accepts it).
        assert!(forward
            .routes
            .iter()
            .any(|r| r.destination == net("10.2.9.0/24")));
    }

    #[test]
    fn route_messages_round_trip_through_the_parser() {
        let names = BTreeMap::from([(7, "wg0".to_owned())]);
        let mut message = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix("10.2.0.0".parse().unwrap(), 16)
            .unwrap()
            .table_id(2004)
            .protocol(protocol())
            .output_interface(7)
            .build();
        assert_eq!(
            parse_route(&message, &names),
            Some(Route {
                table: 2004,
                destination: net("10.2.0.0/16"),
                next_hop: NextHop::Device("wg0".into()),
                source: None,
            })
        );
        message
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        assert_eq!(parse_route(&message, &names), None, "no next hop");
    }
}
