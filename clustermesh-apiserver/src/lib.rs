//! The clustermesh-apiserver: the single writer of one cluster's state into that
//! cluster's etcd, in the Cilium clustermesh schema (DESIGN.md section 3).

pub mod config;
pub mod convert;
pub mod identity;
pub mod model;
pub mod persist;
pub mod registry;
pub mod validate;
