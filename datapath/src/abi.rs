//! The bytes shared with the eBPF programs: one `#[repr(C)]` struct per C
//! struct in `bpf/datapath.h`, with the same explicit padding.
//!
//! These layouts are what the pinned maps hold, so they outlive a process: a
//! change here is a change of the on-disk format of every node's maps (see the
//! header's comment). `tests/layout.rs` compiles the header with the host C
//! compiler and checks every size and field offset below against it.

#![expect(
    unsafe_code,
    reason = "aya::Pod is an unsafe trait: each map key and value below is a repr(C) struct of integers with explicit padding"
)]

/// `DATAPATH_ABI_VERSION`: the layout of every pinned map. A loader adopts
/// pins only of its own version (or of version 2 from before versions were
/// recorded, which has the same layout).
pub const DATAPATH_ABI_VERSION: u32 = 2;

/// Address family tag in keys and events (not `AF_*`: stable across systems).
pub const FAMILY_IPV4: u8 = 4;
/// See [`FAMILY_IPV4`].
pub const FAMILY_IPV6: u8 = 6;

/// Identity carried in the ipcache entry belongs to another cluster.
pub const IPCACHE_F_REMOTE_CLUSTER: u32 = 1 << 0;
/// Traffic to this prefix is encrypted: hand it to the kernel's routing (the
/// route points at the WireGuard device) instead of the VXLAN tunnel.
pub const IPCACHE_F_ENCRYPT: u32 = 1 << 1;

/// `datapath_config.flags`: emit a trace event for every forwarded packet.
pub const CONFIG_F_TRACE: u32 = 1 << 0;

/// Service affinity `local`.
pub const SERVICE_F_AFFINITY_LOCAL: u32 = 1 << 0;
/// Service affinity `remote`.
pub const SERVICE_F_AFFINITY_REMOTE: u32 = 1 << 1;
/// Service is `shared` across clusters.
pub const SERVICE_F_SHARED: u32 = 1 << 2;
/// Service is global (answers from the backends of every cluster).
pub const SERVICE_F_GLOBAL: u32 = 1 << 3;
/// `service_value.maglev_id` of a service without a table.
pub const MAGLEV_NO_TABLE: u32 = u32::MAX;

/// `backend_value.state`: in the Maglev table, takes new flows.
pub const BACKEND_STATE_ACTIVE: u8 = 0;
/// `backend_value.state`: no new flows; flows pinned in conntrack stay.
pub const BACKEND_STATE_TERMINATING: u8 = 1;
/// `backend_value.state`: no flows; pinned flows are re-balanced.
pub const BACKEND_STATE_QUARANTINED: u8 = 2;

/// `ct_key.dir`: the client's packet to the frontend.
pub const CT_FORWARD: u8 = 0;
/// `ct_key.dir`: the backend's reply to the client.
pub const CT_REVERSE: u8 = 1;
/// `CT_F_HAIRPIN`: a reverse entry of a flow whose client is its own backend.
pub const CT_F_HAIRPIN: u8 = 1 << 0;

/// Seed of the flow hash that picks a Maglev slot (`FLOW_HASH_SEED`).
pub const FLOW_HASH_SEED: u32 = 0x6d65_7368;

/// `policy_key.direction` for traffic into an endpoint.
pub const POLICY_INGRESS: u8 = 0;
/// `policy_key.direction` for traffic out of an endpoint.
pub const POLICY_EGRESS: u8 = 1;
/// `policy_value.verdict`: allow.
pub const POLICY_ALLOW: u8 = 1;
/// `policy_value.verdict`: deny.
pub const POLICY_DENY: u8 = 2;

/// `struct ipcache_key`: LPM trie key. `prefixlen` counts the 32 bits of
/// `family` and `pad` before the address bits.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// The part of [`IpcacheKey`] after `prefixlen`: aya's `lpm_trie::Key<K>`
/// supplies the prefix length itself.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpcacheKeyData {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// `struct ipcache_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    /// IPv4 underlay address of the hosting node in host byte order, 0 = none.
    pub tunnel_endpoint: u32,
    pub flags: u32,
    pub pad: u32,
}

/// `struct endpoint_key`: exact pod IP.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointKey {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// `struct endpoint_info`: a pod on this node.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointInfo {
    pub ifindex: u32,
    pub identity: u32,
    pub endpoint_id: u32,
    pub flags: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub pad: [u8; 4],
}

/// `struct service_key`: a frontend (IP, port in network order, protocol).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `struct service_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub service_id: u32,
    pub backend_count: u32,
    pub maglev_id: u32,
    pub flags: u32,
}

/// `struct backend_value` (key: a `u32` backend id).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BackendValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub cluster_id: u16,
    pub state: u8,
    pub pad: u8,
    pub service_id: u32,
}

/// `struct ct_key`: one direction of a translated flow.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub pad: u8,
}

/// `struct ct_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub flags: u8,
    pub pad: u8,
    pub service_id: u32,
    pub backend_id: u32,
}

/// `struct policy_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub identity: u32,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
}

/// `struct policy_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    pub verdict: u8,
    pub pad: [u8; 7],
    pub packets: u64,
    pub bytes: u64,
}

/// `struct datapath_config`: the single entry of the `dp_config` array.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DatapathConfig {
    pub flags: u32,
    pub vxlan_ifindex: u32,
    /// Slots per Maglev table; 0 disables service translation.
    pub maglev_size: u32,
    /// [`DATAPATH_ABI_VERSION`] of the loader that wrote the pinned maps
    /// (0: a loader from before the version was recorded, layout 2).
    pub abi_version: u32,
}

/// `struct event`: one ring buffer record.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RawEvent {
    pub kind: u8,
    pub reason: u8,
    pub family: u8,
    pub proto: u8,
    pub ifindex: u32,
    pub target_ifindex: u32,
    pub identity: u32,
    pub tunnel_endpoint: u32,
    pub tunnel_id: u32,
    pub pkt_len: u32,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

macro_rules! pod {
    ($($ty:ty),+ $(,)?) => {$(
        // SAFETY: a #[repr(C)] struct of integers and byte arrays whose padding
        // is explicit fields: every bit pattern is valid and no byte is
        // uninitialised, which is what aya::Pod requires.
        unsafe impl aya::Pod for $ty {}
    )+};
}
pod!(
    IpcacheKeyData,
    IpcacheValue,
    EndpointKey,
    EndpointInfo,
    ServiceKey,
    ServiceValue,
    BackendValue,
    CtKey,
    CtValue,
    PolicyKey,
    PolicyValue,
    DatapathConfig,
);
