//! Every kvstore record and key a remote cluster can write: the decoders
//! must refuse or accept, never panic, and what they accept must encode
//! to something they read back as the same record.
//!
//! Input: one byte choosing the kind, then `key \n value`.

#![no_main]

use api::{
    ClusterConfig, ClusterEndpointSlice, ClusterId, ClusterService, IdentityRecord, IpcacheEntry,
    MaxConnectedClusters, Node, RemoteScope, Resource, ServiceExport,
};
use libfuzzer_sys::fuzz_target;

fn scope() -> RemoteScope {
    let max = MaxConnectedClusters::Max255;
    RemoteScope::new(
        "c1".parse().expect("valid name"),
        ClusterId::new(3, max).expect("valid id"),
        max,
    )
}

/// Decodes as `R`; what is accepted must survive encode → decode.
fn round_trip<R: Resource + PartialEq + std::fmt::Debug>(key: &str, value: &[u8]) {
    let scope = scope();
    if let Ok(record) = R::decode(key, value, &scope) {
        let again = R::decode(&record.key(), &record.encode(), &scope)
            .unwrap_or_else(|e| panic!("re-decoding {record:?}: {e}"));
        assert_eq!(again, record, "encode/decode round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let key = String::from_utf8_lossy(&rest[..split]);
    let value = rest.get(split + 1..).unwrap_or_default();
    match kind % 9 {
        0 => round_trip::<Node>(&key, value),
        1 => round_trip::<IpcacheEntry>(&key, value),
        2 => round_trip::<IdentityRecord>(&key, value),
        3 => round_trip::<ClusterService>(&key, value),
        4 => round_trip::<ServiceExport>(&key, value),
        5 => round_trip::<ClusterEndpointSlice>(&key, value),
        6 => {
            let _ = ClusterConfig::decode(&key, value, &scope().cluster);
        }
        7 => {
            let _ = api::keys::parse_node_key(&key);
            let _ = api::keys::parse_ip_key(&key);
            let _ = api::keys::parse_identity_key(&key);
            let _ = api::keys::parse_service_key(&key);
            let _ = api::keys::parse_service_export_key(&key);
            let _ = api::keys::parse_endpoint_slice_key(&key);
            let _ = api::keys::parse_cluster_config_key(&key);
            let _ = api::keys::parse_sync_canary_key(&key);
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(value) {
                let _ = text.parse::<api::LabelSet>();
                let _ = text.parse::<api::Timestamp>();
            }
        }
    }
});
