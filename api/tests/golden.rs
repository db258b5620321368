//! Golden tests: every example of the kvstore schema (`docs/architecture.md` §4,
//! fixtures under `tests/fixtures/`) decodes, validates and encodes back to
//! equal JSON; values Cilium writes with its Go encoder are read as well.

use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;

use api::keys;
use api::{
    AddressType, ClusterConfig, ClusterId, ClusterName, ClusterService, IdentityRecord,
    IpcacheEntry, L4Protocol, MaxConnectedClusters, Node, NumericIdentity, RemoteScope, Resource,
    ServiceExport, ServiceImportType,
};
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON: {e}: {}", String::from_utf8_lossy(bytes)))
}

fn c1() -> ClusterName {
    "c1".parse().unwrap()
}

fn scope() -> RemoteScope {
    let max = MaxConnectedClusters::Max255;
    RemoteScope::new(c1(), ClusterId::new(3, max).unwrap(), max)
}

/// Decodes `fixture` under `key`, checks the record's key and that encoding
/// (through `Resource::encode` and through serde) gives the same JSON back.
fn golden<R>(key: &str, fixture_name: &str) -> R
where
    R: Resource + serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = fixture(fixture_name);
    let record = R::decode(key, &bytes, &scope())
        .unwrap_or_else(|e| panic!("{fixture_name} under {key}: {e} ({})", e.reason()));
    assert_eq!(record.key(), key, "{fixture_name}: key round trip");
    assert!(
        key.starts_with(&R::prefix(&c1())),
        "{key} is not under {}",
        R::prefix(&c1())
    );
    assert_eq!(
        json(&record.encode()),
        json(&bytes),
        "{fixture_name}: encode must give the same JSON"
    );
    assert_eq!(
        serde_json::to_value(&record).unwrap(),
        json(&bytes),
        "{fixture_name}: serde must give the same JSON"
    );
    let via_serde: R = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(via_serde, record, "{fixture_name}: serde decode");
    record
}

#[test]
fn cluster_config() {
    let key = "cilium/cluster-config/c1";
    for (name, cached) in [
        ("cluster-config.json", false),
        ("cluster-config-cached.json", true),
    ] {
        let bytes = fixture(name);
        let config = ClusterConfig::decode(key, &bytes, &c1()).unwrap();
        assert_eq!(config.id.get(), 3);
        assert!(config.capabilities.synced_canaries);
        assert_eq!(config.capabilities.cached, cached);
        assert_eq!(
            config.capabilities.max_connected_clusters,
            MaxConnectedClusters::Max255
        );
        assert_eq!(config.capabilities.service_exports_enabled, Some(false));
        assert_eq!(ClusterConfig::key(&c1()), key);
        assert_eq!(json(&config.encode()), json(&bytes), "{name}");
        assert_eq!(config.scope(c1()), scope());
    }
    let ours = ClusterConfig::new(
        ClusterId::new(3, MaxConnectedClusters::Max255).unwrap(),
        MaxConnectedClusters::Max255,
        false,
    );
    assert_eq!(json(&ours.encode()), json(&fixture("cluster-config.json")));
}

#[test]
fn cluster_config_go_omissions() {
    // Go omits false booleans, a zero maxConnectedClusters (meaning 255) and a
    // nil serviceExportsEnabled.
    let config = ClusterConfig::decode("cilium/cluster-config/c1", br#"{"id":7}"#, &c1()).unwrap();
    assert_eq!(config.id.get(), 7);
    assert!(!config.capabilities.synced_canaries);
    assert_eq!(
        config.capabilities.max_connected_clusters,
        MaxConnectedClusters::Max255
    );
    assert_eq!(config.capabilities.service_exports_enabled, None);
    assert_eq!(
        json(&config.encode()),
        json(br#"{"id":7,"capabilities":{"maxConnectedClusters":255}}"#)
    );
    let wide = ClusterConfig::decode(
        "cilium/cluster-config/c1",
        br#"{"id":300,"capabilities":{"maxConnectedClusters":511}}"#,
        &c1(),
    )
    .unwrap();
    assert_eq!(wide.id.get(), 300);
}

#[test]
fn node() {
    let node: Node = golden("cilium/state/nodes/v1/c1/node-1", "node.json");
    assert_eq!(node.internal_ipv4(), Some("192.168.1.2".parse().unwrap()));
    assert_eq!(
        node.cilium_internal_ipv4(),
        Some("10.1.0.1".parse().unwrap())
    );
    assert_eq!(node.pod_cidrs(), vec!["10.1.0.0/24".parse().unwrap()]);
    assert_eq!(node.ipv4_health_ip, None);
    assert_eq!(node.cluster_id.get(), 3);
    assert_eq!(
        node.wireguard_pub_key,
        "pYpOqNqQhC0j3dF3bYJvXGkq0mJ8pVZ4Q0x2bL7yN1c="
    );

    // The same node built through the typed API encodes to the example.
    let mut built = Node::new("node-1", c1(), scope().cluster_id);
    built.set_address(AddressType::InternalIp, "192.168.1.2".parse().unwrap());
    built.set_address(AddressType::CiliumInternalIp, "10.1.0.1".parse().unwrap());
    built.set_pod_cidrs(["10.1.0.0/24".parse().unwrap()]);
    built.wireguard_pub_key = node.wireguard_pub_key.clone();
    assert_eq!(built, node);
    assert_eq!(json(&built.encode()), json(&fixture("node.json")));
}

#[test]
fn node_dual_stack() {
    let node: Node = golden(
        "cilium/state/nodes/v1/c1/node-2.example.internal",
        "node-dual-stack.json",
    );
    let cidrs: Vec<String> = node.pod_cidrs().iter().map(ToString::to_string).collect();
    assert_eq!(cidrs, ["10.1.1.0/24", "10.2.0.0/23", "fd00:10:1:1::/64"]);
    assert_eq!(node.internal_ipv6(), Some("fc00:c111::3".parse().unwrap()));
    assert_eq!(
        node.ipv6_health_ip,
        Some("fd00:10:1:1::20".parse().unwrap())
    );
    assert_eq!(node.encryption_key, 7);

    let mut rebuilt = node.clone();
    rebuilt.set_pod_cidrs(node.pod_cidrs());
    assert_eq!(rebuilt, node);
}

#[test]
fn node_as_cilium_writes_it() {
    // Cilium writes `null` for a nil map; we read it as empty and write `{}`.
    let mut value = json(&fixture("node.json"));
    value["Annotations"] = Value::Null;
    value["Labels"] = Value::Null;
    value["IPAddresses"] = Value::Array(vec![]);
    value["NodeIdentity"] = Value::from(0); // older Cilium versions: kept
    value["SomethingNew"] = Value::from(1); // a field no version has: ignored
    let bytes = serde_json::to_vec(&value).unwrap();
    let node = Node::decode("cilium/state/nodes/v1/c1/node-1", &bytes, &scope()).unwrap();
    assert!(node.annotations.is_empty() && node.labels.is_empty());
    assert!(node.ip_addresses.is_empty());
    let out = json(&node.encode());
    assert_eq!(out["Annotations"], json(b"{}"));
    assert_eq!(
        out["IPAddresses"],
        Value::Null,
        "empty slices are null, as in Go"
    );
    assert_eq!(out["NodeIdentity"], Value::from(0));
    assert!(out.get("SomethingNew").is_none());
    let plain = Node::decode(
        "cilium/state/nodes/v1/c1/node-1",
        &fixture("node.json"),
        &scope(),
    )
    .unwrap();
    assert!(json(&plain.encode()).get("NodeIdentity").is_none());
}

#[test]
fn ipcache_entry() {
    let entry: IpcacheEntry = golden("cilium/state/ip/v1/default/10.1.0.5", "ipcache.json");
    assert_eq!(entry.id, NumericIdentity(196915));
    assert_eq!(entry.named_ports.len(), 1);
    assert_eq!(entry.named_ports[0].protocol, L4Protocol::Tcp);
    assert_eq!(entry.host_ip, Some("192.168.1.2".parse().unwrap()));

    // K8sPodUID and NamedPorts are omitted when empty.
    let minimal: IpcacheEntry = golden(
        "cilium/state/ip/v1/default/fd00:10:1::5",
        "ipcache-minimal.json",
    );
    let out = json(&minimal.encode());
    assert!(out.get("K8sPodUID").is_none() && out.get("NamedPorts").is_none());
    assert!(out.get("K8sNamespace").is_some());
}

#[test]
fn ipcache_entry_with_reserved_identity() {
    // Cilium publishes e.g. remote-node entries with a reserved identity.
    let bytes = br#"{"IP":"10.1.0.1","HostIP":"192.168.1.2","ID":6,"Key":0,"Metadata":"","K8sNamespace":"","K8sPodName":"","K8sServiceAccount":""}"#;
    let entry =
        IpcacheEntry::decode("cilium/state/ip/v1/default/10.1.0.1", bytes, &scope()).unwrap();
    assert_eq!(entry.id.reserved(), Some(api::ReservedIdentity::RemoteNode));
}

#[test]
fn identity() {
    let key = "cilium/state/identities/v1/id/196915";
    let bytes = fixture("identity.txt");
    let record = IdentityRecord::decode(key, &bytes, &scope()).unwrap();
    assert_eq!(record.id, NumericIdentity(196915));
    assert_eq!(record.labels.cluster(), Some("c1"));
    assert_eq!(record.labels.namespace(), Some("default"));
    assert_eq!(record.key(), key);
    // Not JSON: the label string, byte for byte.
    assert_eq!(record.encode(), bytes);
    assert!(key.starts_with(&IdentityRecord::prefix(&c1())));
}

#[test]
fn identity_in_511_mode() {
    let max = MaxConnectedClusters::Max511;
    let id300 = ClusterId::new(300, max).unwrap();
    let scope = RemoteScope::new(c1(), id300, max);
    let id = NumericIdentity::from_parts(id300, 1000, max).unwrap();
    let key = keys::identity_key(id);
    let record = IdentityRecord::decode(
        &key,
        b"k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;",
        &scope,
    )
    .unwrap();
    assert_eq!(record.id.cluster_id(max), Some(id300));
}

#[test]
fn service() {
    let svc: ClusterService = golden("cilium/state/services/v1/c1/default/web", "service.json");
    let frontend: IpAddr = "10.96.0.10".parse().unwrap();
    assert_eq!(svc.frontends[&frontend]["http"].port, 80);
    assert!(svc.include_external && svc.shared);
    assert_eq!(svc.cluster_id.get(), 3);
}

#[test]
fn service_json_is_in_go_key_order() {
    // Go sorts map keys as strings: "10.1.0.10" before "10.1.0.5".
    let mut svc = ClusterService::new(c1(), scope().cluster_id, "default", "web");
    let port = api::L4Addr {
        protocol: L4Protocol::Tcp,
        port: 8080,
    };
    for ip in ["10.1.0.5", "10.1.0.10"] {
        svc.backends
            .insert(ip.parse().unwrap(), [("http".to_owned(), port)].into());
    }
    let text = String::from_utf8(svc.encode()).unwrap();
    assert!(
        text.contains(
            r#""backends":{"10.1.0.10":{"http":{"Protocol":"TCP","Port":8080}},"10.1.0.5":"#
        ),
        "{text}"
    );
    assert!(
        text.starts_with(r#"{"cluster":"c1","namespace":"default","name":"web","frontends":{}"#),
        "{text}"
    );
}

#[test]
fn service_export() {
    let export: ServiceExport = golden(
        "cilium/state/serviceexports/v1/c1/default/web",
        "service-export.json",
    );
    assert_eq!(export.service_type, ServiceImportType::ClusterSetIp);
    assert_eq!(
        export.export_creation_timestamp.unwrap().to_string(),
        "2026-01-01T00:00:00Z"
    );
}

#[test]
fn service_export_as_cilium_writes_it() {
    // Annotations are kept; an empty sessionAffinity (Cilium's headless
    // test data) reads as None, which is what is written back.
    let bytes = br#"{"cluster":"c1","name":"headless","namespace":"default","annotations":{"a":"b"},"exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[{"name":"http","protocol":"TCP","port":80}],"type":"Headless","sessionAffinity":""}"#;
    let export = ServiceExport::decode(
        "cilium/state/serviceexports/v1/c1/default/headless",
        bytes,
        &scope(),
    )
    .unwrap();
    assert_eq!(export.service_type, ServiceImportType::Headless);
    assert_eq!(
        json(&export.encode()),
        json(br#"{"cluster":"c1","name":"headless","namespace":"default","annotations":{"a":"b"},"exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[{"name":"http","protocol":"TCP","port":80}],"type":"Headless","sessionAffinity":"None"}"#)
    );
}

#[test]
fn cache_layout_keys_decode_too() {
    let node = fixture("node.json");
    let n = Node::decode("cilium/cache/nodes/v1/c1/node-1", &node, &scope()).unwrap();
    assert_eq!(n.name, "node-1");
    let entry = fixture("ipcache.json");
    IpcacheEntry::decode("cilium/cache/ip/v1/c1/10.1.0.5", &entry, &scope()).unwrap();
    IdentityRecord::decode(
        "cilium/cache/identities/v1/c1/id/196915",
        &fixture("identity.txt"),
        &scope(),
    )
    .unwrap();
    ClusterService::decode(
        "cilium/cache/services/v1/c1/default/web",
        &fixture("service.json"),
        &scope(),
    )
    .unwrap();
    ServiceExport::decode(
        "cilium/cache/serviceexports/v1/c1/default/web",
        &fixture("service-export.json"),
        &scope(),
    )
    .unwrap();
}
