//! The node agent of the mesh and its CNI plugin.
//!
//! The agent runs on every node, inside the node's network namespace but in
//! the host's mount namespace (so the datapath's bpffs pins outlive it). It
//!
//! * sets up pod networking for the `mesh-cni` plugin ([`cni`], [`pod`]):
//!   addresses from the node's pod CIDR ([`ipam`], persisted), veth pairs
//!   through rtnetlink ([`netlink`]), the datapath's `endpoints` map and
//!   `from_pod` program;
//! * keeps its node and endpoints registered with the local
//!   clustermesh-apiserver ([`registry`]);
//! * reads every cluster's nodes, endpoints, identities and services, the
//!   local one included, one task per cluster ([`clusters`]);
//! * keeps the ipcache map, WireGuard peers and tunnel routes equal to their
//!   merged state ([`reconcile`]: plan and task);
//! * programs the load balancer with the local cluster's services merged
//!   with the global services of the other clusters ([`services`]);
//! * reports per-cluster status and metrics ([`status`]).
//!
//! Configuration is parsed and validated whole in [`config`]; [`agent::run`]
//! is the entry point the binary calls.

pub mod agent;
pub mod clusters;
pub mod cni;
pub mod config;
pub mod ipam;
pub mod kubernetes;
pub mod metrics;
pub mod netlink;
pub mod pod;
pub mod reconcile;

pub mod registry;
pub mod services;
pub mod status;
pub mod trust;
mod unix;
