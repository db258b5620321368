//! Pod networking through the CNI: the `mesh-cni` plugin side ([`plugin`]),
//! the CNI 1.0.0 formats it speaks ([`spec`]), the plugin ↔ agent protocol
//! ([`protocol`]) and the agent's socket server ([`server`]).

pub mod plugin;
pub mod protocol;
pub mod server;
pub mod spec;
