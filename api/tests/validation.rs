//! One rejection per validation rule: each asserts the metrics reason and
//! that the message names the offending value.

use std::fs;
use std::path::PathBuf;

use api::{
    ClusterConfig, ClusterId, ClusterName, ClusterService, IdentityRecord, IpcacheEntry,
    MaxConnectedClusters, Node, RemoteScope, Resource, ServiceExport, ValidationError,
    MAX_VALUE_BYTES,
};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

fn scope() -> RemoteScope {
    let max = MaxConnectedClusters::Max255;
    RemoteScope::new("c1".parse().unwrap(), ClusterId::new(3, max).unwrap(), max)
}

/// `fixture` with `edit` applied.
fn edited(name: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = fixture(name);
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[track_caller]
fn refused<R: Resource>(
    key: &str,
    value: &[u8],
    reason: &str,
    needles: &[&str],
) -> ValidationError {
    let err = match R::decode(key, value, &scope()) {
        Ok(r) => panic!("{key} must be refused with {reason}, got {r:?}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert_eq!(err.reason(), reason, "{key}: {msg}");
    assert!(
        ValidationError::REASONS.contains(&err.reason()),
        "{} missing from REASONS",
        err.reason()
    );
    for needle in needles {
        assert!(msg.contains(needle), "message {msg:?} must name {needle:?}");
    }
    err
}

const NODE_KEY: &str = "cilium/state/nodes/v1/c1/node-1";
const IP_KEY: &str = "cilium/state/ip/v1/default/10.1.0.5";
const ID_KEY: &str = "cilium/state/identities/v1/id/196915";
const SVC_KEY: &str = "cilium/state/services/v1/c1/default/web";
const EXPORT_KEY: &str = "cilium/state/serviceexports/v1/c1/default/web";

#[test]
fn too_large_is_checked_before_parsing() {
    // 2 MiB of garbage: refused for its size, the parser never sees it.
    let big = vec![b'x'; 2 * 1024 * 1024];
    let size = big.len().to_string();
    refused::<Node>(NODE_KEY, &big, "too_large", &[&size, NODE_KEY]);
    refused::<IpcacheEntry>(IP_KEY, &big, "too_large", &[&size]);
    refused::<IdentityRecord>(ID_KEY, &big, "too_large", &[&size]);
    refused::<ClusterService>(SVC_KEY, &big, "too_large", &[&size]);
    refused::<ServiceExport>(EXPORT_KEY, &big, "too_large", &[&size]);
    let err =
        ClusterConfig::decode("cilium/cluster-config/c1", &big, &scope().cluster).unwrap_err();
    assert_eq!(err.reason(), "too_large");
    // Exactly at the limit is not too large (it fails later, as bad JSON).
    let at_limit = vec![b' '; MAX_VALUE_BYTES];
    refused::<Node>(NODE_KEY, &at_limit, "bad_encoding", &[NODE_KEY]);
}

#[test]
fn bad_encoding() {
    refused::<Node>(NODE_KEY, b"{not json", "bad_encoding", &[NODE_KEY, "JSON"]);
    refused::<IpcacheEntry>(IP_KEY, b"[1,2,3]", "bad_encoding", &[IP_KEY]);
    // A field of the wrong type.
    let v = edited("service.json", |v| v["clusterID"] = "three".into());
    refused::<ClusterService>(SVC_KEY, &v, "bad_encoding", &[SVC_KEY]);
    // A port beyond 16 bits.
    let v = edited("ipcache.json", |v| {
        v["NamedPorts"][0]["Port"] = 70000.into()
    });
    refused::<IpcacheEntry>(IP_KEY, &v, "bad_encoding", &["70000"]);
    refused::<IdentityRecord>(ID_KEY, b"k8s:app=\xff;", "bad_encoding", &[ID_KEY, "UTF-8"]);
}

#[test]
fn cluster_mismatch_in_key() {
    let node = serde_json::to_vec(&fixture("node.json")).unwrap();
    refused::<Node>(
        "cilium/state/nodes/v1/c2/node-1",
        &node,
        "cluster_mismatch",
        &["\"c2\"", "\"c1\""],
    );
    let entry = serde_json::to_vec(&fixture("ipcache.json")).unwrap();
    refused::<IpcacheEntry>(
        "cilium/cache/ip/v1/c2/10.1.0.5",
        &entry,
        "cluster_mismatch",
        &["\"c2\""],
    );
    refused::<IdentityRecord>(
        "cilium/cache/identities/v1/c2/id/196915",
        b"k8s:io.cilium.k8s.policy.cluster=c1;",
        "cluster_mismatch",
        &["\"c2\""],
    );
    let svc = serde_json::to_vec(&fixture("service.json")).unwrap();
    refused::<ClusterService>(
        "cilium/state/services/v1/c2/default/web",
        &svc,
        "cluster_mismatch",
        &["\"c2\""],
    );
    let err = ClusterConfig::decode("cilium/cluster-config/c2", br#"{"id":3}"#, &scope().cluster)
        .unwrap_err();
    assert_eq!(err.reason(), "cluster_mismatch");
    assert!(err.to_string().contains("\"c2\""), "{err}");
}

#[test]
fn cluster_mismatch_in_value() {
    let v = edited("node.json", |v| v["Cluster"] = "c2".into());
    refused::<Node>(NODE_KEY, &v, "cluster_mismatch", &["Cluster", "\"c2\""]);
    let v = edited("node.json", |v| v["ClusterID"] = 4.into());
    refused::<Node>(
        NODE_KEY,
        &v,
        "cluster_mismatch",
        &["ClusterID", "is 4", "ID 3"],
    );
    let v = edited("service.json", |v| v["cluster"] = "c2".into());
    refused::<ClusterService>(SVC_KEY, &v, "cluster_mismatch", &["\"c2\""]);
    let v = edited("service.json", |v| v["clusterID"] = 9.into());
    refused::<ClusterService>(SVC_KEY, &v, "cluster_mismatch", &["clusterID", "is 9"]);
    let v = edited("service-export.json", |v| v["cluster"] = "c2".into());
    refused::<ServiceExport>(EXPORT_KEY, &v, "cluster_mismatch", &["\"c2\""]);
}

#[test]
fn identity_labels_must_name_the_cluster() {
    refused::<IdentityRecord>(
        ID_KEY,
        b"k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c2;",
        "cluster_mismatch",
        &["\"c2\"", "io.cilium.k8s.policy.cluster"],
    );
    refused::<IdentityRecord>(
        ID_KEY,
        b"k8s:app=web;",
        "cluster_mismatch",
        &["lack k8s:io.cilium.k8s.policy.cluster", "=c1"],
    );
    // A second cluster label under another source: policies that select
    // with the `any` source would match it.
    for other in ["unspec", "any", "cilium", "reserved"] {
        let value =
            format!("k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;{other}:io.cilium.k8s.policy.cluster=c9;");
        refused::<IdentityRecord>(
            ID_KEY,
            value.as_bytes(),
            "cluster_mismatch",
            &["\"c9\"", "io.cilium.k8s.policy.cluster"],
        );
    }
}

#[test]
fn identity_out_of_range() {
    // Cluster 4's identity published by cluster 3.
    let foreign = (4 << 16 | 300).to_string();
    refused::<IdentityRecord>(
        &format!("cilium/state/identities/v1/id/{foreign}"),
        b"k8s:io.cilium.k8s.policy.cluster=c1;",
        "identity_out_of_range",
        &[&foreign, "196608..=262143"],
    );
    // The last identity of cluster 2's block, one below cluster 3's first.
    refused::<IdentityRecord>(
        &format!("cilium/state/identities/v1/id/{}", (3 << 16) - 1),
        b"k8s:io.cilium.k8s.policy.cluster=c1;",
        "identity_out_of_range",
        &["196607"],
    );
    // A local part below 256 is cluster 3's own (Cilium's block starts at
    // 3 << 16): accepted, for identities and for ipcache entries.
    for local in [0, 5, 255] {
        let id = 3 << 16 | local;
        let key = format!("cilium/state/identities/v1/id/{id}");
        IdentityRecord::decode(&key, b"k8s:io.cilium.k8s.policy.cluster=c1;", &scope())
            .unwrap_or_else(|e| panic!("identity {id}: {e}"));
        let v = edited("ipcache.json", |v| v["ID"] = id.into());
        IpcacheEntry::decode(IP_KEY, &v, &scope())
            .unwrap_or_else(|e| panic!("ipcache entry with identity {id}: {e}"));
    }
    // Reserved identities are not allocated by a cluster.
    refused::<IdentityRecord>(
        "cilium/state/identities/v1/id/2",
        b"reserved:world=;",
        "identity_out_of_range",
        &["identity 2"],
    );
    let v = edited("ipcache.json", |v| v["ID"] = (4 << 16 | 300).into());
    refused::<IpcacheEntry>(IP_KEY, &v, "identity_out_of_range", &[&foreign, "ID"]);
    let v = edited("ipcache.json", |v| v["ID"] = 0.into());
    refused::<IpcacheEntry>(IP_KEY, &v, "identity_out_of_range", &["identity 0 in ID"]);
    // Node-local identities (bit 24) never cross clusters.
    let local = (1 << 24 | 3).to_string();
    let v = edited("ipcache.json", |v| v["ID"] = (1 << 24 | 3).into());
    refused::<IpcacheEntry>(IP_KEY, &v, "identity_out_of_range", &[&local]);
}

#[test]
fn invalid_ip() {
    let v = edited("ipcache.json", |v| v["IP"] = "10.1.0.300".into());
    refused::<IpcacheEntry>(IP_KEY, &v, "invalid_ip", &["\"10.1.0.300\"", "IP"]);
    let v = edited("ipcache.json", |v| v["HostIP"] = "node-1".into());
    refused::<IpcacheEntry>(IP_KEY, &v, "invalid_ip", &["HostIP", "\"node-1\""]);
    let v = edited("ipcache.json", |v| v["IP"] = "".into());
    refused::<IpcacheEntry>(IP_KEY, &v, "invalid_ip", &["IP \"\""]);
    let v = serde_json::to_vec(&fixture("ipcache.json")).unwrap();
    refused::<IpcacheEntry>(
        "cilium/state/ip/v1/default/10.1.0.300",
        &v,
        "invalid_ip",
        &["\"10.1.0.300\""],
    );
    // The key must spell the IP canonically even when the value agrees
    // with it: `2001:db8:0::5` and `2001:db8::5` would be two records.
    let v = edited("ipcache.json", |v| v["IP"] = "fd00:10:1::5".into());
    refused::<IpcacheEntry>(
        "cilium/state/ip/v1/default/fd00:10:1:0::5",
        &v,
        "invalid_ip",
        &[
            "\"cilium/state/ip/v1/default/fd00:10:1:0::5\"",
            "canonical",
            "\"fd00:10:1::5\"",
        ],
    );
    let v = edited("node.json", |v| {
        v["IPAddresses"][1]["IP"] = "10.1.0.1.1".into()
    });
    refused::<Node>(
        NODE_KEY,
        &v,
        "invalid_ip",
        &["IPAddresses[1].IP", "\"10.1.0.1.1\""],
    );
    let v = edited("node.json", |v| {
        v["IPv4AllocCIDR"]["Mask"] = "/wD/AA==".into()
    });
    refused::<Node>(
        NODE_KEY,
        &v,
        "invalid_ip",
        &["IPv4AllocCIDR", "/wD/AA==", "contiguous"],
    );
    let v = edited("node.json", |v| v["IPv4AllocCIDR"]["IP"] = "fd00::".into());
    refused::<Node>(NODE_KEY, &v, "invalid_ip", &["IPv4AllocCIDR", "fd00::"]);
    let v = edited("node.json", |v| v["IPv4HealthIP"] = "fd00::1".into());
    refused::<Node>(
        NODE_KEY,
        &v,
        "invalid_field",
        &["IPv4HealthIP", "fd00::1", "IPv4"],
    );
    let v = edited("service.json", |v| {
        let backends = v["backends"].as_object_mut().unwrap();
        let ports = backends.remove("10.1.0.5").unwrap();
        backends.insert("backend-1".into(), ports);
    });
    refused::<ClusterService>(SVC_KEY, &v, "invalid_ip", &["backends", "\"backend-1\""]);
}

#[test]
fn key_mismatch() {
    let v = edited("ipcache.json", |v| v["IP"] = "10.1.0.6".into());
    refused::<IpcacheEntry>(
        IP_KEY,
        &v,
        "key_mismatch",
        &["\"10.1.0.6\"", "\"10.1.0.5\""],
    );
    let v = edited("node.json", |v| v["Name"] = "node-2".into());
    refused::<Node>(
        NODE_KEY,
        &v,
        "key_mismatch",
        &["Name", "\"node-2\"", "\"node-1\""],
    );
    let v = edited("service.json", |v| v["namespace"] = "kube-system".into());
    refused::<ClusterService>(
        SVC_KEY,
        &v,
        "key_mismatch",
        &["namespace", "\"kube-system\""],
    );
    let v = edited("service.json", |v| v["name"] = "db".into());
    refused::<ClusterService>(SVC_KEY, &v, "key_mismatch", &["name", "\"db\"", "\"web\""]);
    let v = edited("service-export.json", |v| v["name"] = "db".into());
    refused::<ServiceExport>(EXPORT_KEY, &v, "key_mismatch", &["\"db\""]);
    let v = edited("service-export.json", |v| v["namespace"] = "prod".into());
    refused::<ServiceExport>(EXPORT_KEY, &v, "key_mismatch", &["\"prod\""]);
}

#[test]
fn invalid_name() {
    let node = serde_json::to_vec(&fixture("node.json")).unwrap();
    refused::<Node>(
        "cilium/state/nodes/v1/Cluster-1/node-1",
        &node,
        "invalid_name",
        &["\"Cluster-1\""],
    );
    refused::<Node>(
        "cilium/state/nodes/v1/c1/node_1",
        &node,
        "invalid_name",
        &["\"node_1\""],
    );
    let v = edited("node.json", |v| v["Cluster"] = "c1-".into());
    refused::<Node>(NODE_KEY, &v, "invalid_name", &["Cluster", "\"c1-\""]);
    let long = "a".repeat(33);
    let v = edited("service.json", |v| v["cluster"] = long.clone().into());
    refused::<ClusterService>(SVC_KEY, &v, "invalid_name", &[&long, "33 characters"]);
    let svc = serde_json::to_vec(&fixture("service.json")).unwrap();
    refused::<ClusterService>(
        "cilium/state/services/v1/c1/Default/web",
        &svc,
        "invalid_name",
        &["namespace", "\"Default\""],
    );
}

#[test]
fn invalid_labels() {
    let err = refused::<IdentityRecord>(
        ID_KEY,
        b"k8s:app=-web;k8s:io.cilium.k8s.policy.cluster=c1;",
        "invalid_labels",
        &[ID_KEY, "\"-web\""],
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the label error is the source"
    );
    refused::<IdentityRecord>(ID_KEY, b"K8S:app=web;", "invalid_labels", &["\"K8S\""]);
}

#[test]
fn invalid_key() {
    let node = serde_json::to_vec(&fixture("node.json")).unwrap();
    refused::<Node>(
        "cilium/state/services/v1/c1/default/web",
        &node,
        "invalid_key",
        &["cilium/state/nodes/v1/"],
    );
    refused::<Node>(
        "cilium/state/nodes/v1/c1",
        &node,
        "invalid_key",
        &["<cluster>/<node>"],
    );
    refused::<IdentityRecord>(
        "cilium/state/identities/v1/id/web",
        b"",
        "invalid_key",
        &["\"web\""],
    );
}

#[test]
fn invalid_cluster_id() {
    let v = edited("node.json", |v| v["ClusterID"] = 0.into());
    refused::<Node>(
        NODE_KEY,
        &v,
        "invalid_cluster_id",
        &["ClusterID", "cluster ID 0"],
    );
    let v = edited("service.json", |v| v["clusterID"] = 600.into());
    refused::<ClusterService>(SVC_KEY, &v, "invalid_cluster_id", &["clusterID", "600"]);
    let c1: ClusterName = "c1".parse().unwrap();
    for (value, needles) in [
        (&br#"{"id":0}"#[..], &["id", "cluster ID 0"][..]),
        (
            br#"{"id":256,"capabilities":{"maxConnectedClusters":255}}"#,
            &["256", "1..=255"],
        ),
        (
            br#"{"id":3,"capabilities":{"maxConnectedClusters":300}}"#,
            &["maxConnectedClusters", "300"],
        ),
    ] {
        let err = ClusterConfig::decode("cilium/cluster-config/c1", value, &c1).unwrap_err();
        assert_eq!(err.reason(), "invalid_cluster_id", "{err}");
        for needle in needles {
            assert!(err.to_string().contains(needle), "{err} must name {needle}");
        }
    }
}

#[test]
fn invalid_field() {
    let v = edited("ipcache.json", |v| {
        v["NamedPorts"][0]["Protocol"] = "FOO".into()
    });
    refused::<IpcacheEntry>(
        IP_KEY,
        &v,
        "invalid_field",
        &["NamedPorts[0].Protocol", "\"FOO\""],
    );
    let v = edited("service.json", |v| {
        v["frontends"]["10.96.0.10"]["http"]["Protocol"] = "tcp".into()
    });
    refused::<ClusterService>(
        SVC_KEY,
        &v,
        "invalid_field",
        &["frontends[10.96.0.10][http].Protocol", "\"tcp\""],
    );
    let v = edited("service-export.json", |v| v["type"] = "LoadBalancer".into());
    refused::<ServiceExport>(
        EXPORT_KEY,
        &v,
        "invalid_field",
        &["type", "\"LoadBalancer\""],
    );
    let v = edited("service-export.json", |v| {
        v["exportCreationTimestamp"] = "yesterday".into()
    });
    refused::<ServiceExport>(
        EXPORT_KEY,
        &v,
        "invalid_field",
        &["exportCreationTimestamp", "\"yesterday\""],
    );
}

#[test]
fn hostile_values_are_clipped_in_messages() {
    let huge_name = "x".repeat(100_000);
    let v = edited("node.json", |v| v["Name"] = huge_name.clone().into());
    let err = refused::<Node>(NODE_KEY, &v, "key_mismatch", &["…"]);
    assert!(
        err.to_string().len() < 1_000,
        "message is {} bytes",
        err.to_string().len()
    );
}

#[test]
fn every_reason_is_listed() {
    let mut seen: Vec<&str> = ValidationError::REASONS.to_vec();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(
        seen.len(),
        ValidationError::REASONS.len(),
        "duplicates in REASONS"
    );
    assert!(seen
        .iter()
        .all(|r| r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
}
