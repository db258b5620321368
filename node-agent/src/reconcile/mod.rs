//! Keeping the datapath's ipcache map, the WireGuard peers and the tunnel
//! routes equal to the merged state of every cluster, in two parts:
//!
//! * [`plan`]: pure. The desired state, computed from scratch
//!   ([`plan::desired_state`]) or change by change ([`plan::Index`]), and the
//!   operations that turn what is there into it ([`plan::diff`]). Every rule
//!   is unit-tested without a kernel.
//! * [`task`]: the reconciler task that takes queued changes and connection
//!   changes, asks the plan what to write and writes it ([`task::Reconciler`]).

pub mod plan;
pub mod task;
