//! The bytes shared with the eBPF programs: one `#[repr(C)]` struct per C
//! struct in `bpf/datapath.h`, with the same explicit padding.
//!
//! These layouts are what the pinned maps hold, so they outlive a process: a
//! change here is a change of the on-disk format of every node's maps (see the
//! header's comment). `tests/layout.rs` compiles the header with the host C
//! compiler and checks every size and field offset below against it.

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
    pub backend_count: u32,
    pub maglev_id: u32,
    pub flags: u32,
    pub rev_nat_id: u32,
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
    PolicyKey,
    PolicyValue,
    DatapathConfig,
);
