//! The lab's namespaces: the underlay bridge in a namespace of its own,
//! and per cluster a control namespace and one per node, each plugged into
//! the bridge.

use std::net::Ipv4Addr;

use super::ip::{self, IpError};
use super::plan;
use super::state::{ClusterState, LabState};
use super::LabError;

/// Builds the whole topology of a planned lab: the underlay, and every
/// cluster's control and node namespaces plugged into it.
///
/// # Errors
///
/// The failing `ip` command.
pub fn build_topology(lab: &LabState) -> Result<(), LabError> {
    create_underlay(&lab.name)?;
    for cluster in &lab.clusters {
        create_cluster_netns(&lab.name, cluster)?;
    }
    Ok(())
}

pub(super) fn create_underlay(lab: &str) -> Result<(), IpError> {
    let ns = plan::underlay_netns(lab);
    ip::add_netns(&ns)?;
    ip::ip_in(&ns, &["link", "add", plan::BRIDGE, "type", "bridge"])?;
    ip::ip_in(&ns, &["link", "set", plan::BRIDGE, "up"])?;
    Ok(())
}

/// Creates namespace `netns` with `eth0` plugged into the underlay bridge as `port`.
pub(super) fn plug(lab: &str, netns: &str, port: &str, ip_addr: Ipv4Addr) -> Result<(), IpError> {
    let underlay = plan::underlay_netns(lab);
    ip::add_netns(netns)?;
    ip::add_veth(&underlay, port, netns, plan::UNDERLAY_IF)?;
    ip::ip_in(
        &underlay,
        &["link", "set", port, "master", plan::BRIDGE, "up"],
    )?;
    let cidr = format!("{ip_addr}/{}", plan::UNDERLAY_PREFIX);
    ip::ip_in(netns, &["addr", "add", &cidr, "dev", plan::UNDERLAY_IF])?;
    ip::ip_in(netns, &["link", "set", plan::UNDERLAY_IF, "up"])?;
    Ok(())
}

pub(super) fn create_cluster_netns(lab: &str, cluster: &ClusterState) -> Result<(), IpError> {
    plug(
        lab,
        &cluster.control_netns,
        &plan::control_port(cluster.id),
        cluster.control_ip,
    )?;
    for node in &cluster.nodes {
        plug(
            lab,
            &node.netns,
            &plan::node_port(cluster.id, node.number),
            node.ip,
        )?;
        // A node routes for its pods; these sysctls exist only in the node's namespace.
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            ip::sysctl_in(&node.netns, key, value)?;
        }
    }
    Ok(())
}
