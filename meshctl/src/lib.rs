//! `meshctl`, the mesh's command line: a multi-cluster lab on one Linux host
//! ([`lab`]), and the clustermesh commands that join clusters and show the
//! state of the mesh ([`clustermesh`]), services ([`service`]), in the spirit of cilium-cli and subctl.
//!
//! The binary is thin: [`cli`] parses flags and calls into these modules,
//! which the end-to-end tests (`multi-cluster-tests/`) use directly too.

pub mod cli;
pub mod clustermesh;
pub mod file;
pub mod lab;
pub mod netprobe;
pub mod pki;
pub mod progress;
pub mod service;
