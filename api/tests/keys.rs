//! Key builders and parsers round trip, and produce the fixed wire layout.

use api::keys::{self, IdentityKey, IpKey, NamespacedKey, NodeKey};
use api::{
    ClusterConfig, ClusterId, ClusterName, ClusterService, IdentityRecord, IpcacheEntry,
    MaxConnectedClusters, Node, NumericIdentity, Resource, ServiceExport,
};

fn c1() -> ClusterName {
    "c1".parse().unwrap()
}

#[test]
fn resource_constants_are_the_wire_prefixes() {
    assert_eq!(Node::KIND, "nodes");
    assert_eq!(Node::BASE_PREFIX, "cilium/state/nodes/v1");
    assert_eq!(Node::prefix(&c1()), "cilium/state/nodes/v1/c1/");
    assert_eq!(IpcacheEntry::KIND, "endpoints");
    assert_eq!(IpcacheEntry::BASE_PREFIX, "cilium/state/ip/v1");
    assert_eq!(IpcacheEntry::prefix(&c1()), "cilium/state/ip/v1/default/");
    assert_eq!(IdentityRecord::KIND, "identities");
    assert_eq!(IdentityRecord::BASE_PREFIX, "cilium/state/identities/v1");
    assert_eq!(
        IdentityRecord::prefix(&c1()),
        "cilium/state/identities/v1/id/"
    );
    assert_eq!(ClusterService::KIND, "services");
    assert_eq!(ClusterService::BASE_PREFIX, "cilium/state/services/v1");
    assert_eq!(
        ClusterService::prefix(&c1()),
        "cilium/state/services/v1/c1/"
    );
    assert_eq!(ServiceExport::KIND, "serviceexports");
    assert_eq!(ServiceExport::BASE_PREFIX, "cilium/state/serviceexports/v1");
    assert_eq!(
        ServiceExport::prefix(&c1()),
        "cilium/state/serviceexports/v1/c1/"
    );
}

#[test]
fn node_keys_round_trip() {
    let key = keys::node_key(&c1(), "node-1.zone-a");
    assert_eq!(key, "cilium/state/nodes/v1/c1/node-1.zone-a");
    assert_eq!(
        keys::parse_node_key(&key).unwrap(),
        NodeKey {
            cluster: c1(),
            name: "node-1.zone-a".into()
        }
    );
    let cache = format!("{}node-1.zone-a", keys::cache_prefix::<Node>(&c1()));
    assert_eq!(cache, "cilium/cache/nodes/v1/c1/node-1.zone-a");
    assert_eq!(keys::parse_node_key(&cache).unwrap().name, "node-1.zone-a");
}

#[test]
fn ip_keys_round_trip() {
    for ip in ["10.1.0.5", "fd00:10:244:1::d643", "::1"] {
        let ip = ip.parse().unwrap();
        let key = keys::ip_key(ip);
        assert_eq!(key, format!("cilium/state/ip/v1/default/{ip}"));
        assert_eq!(
            keys::parse_ip_key(&key).unwrap(),
            IpKey { cluster: None, ip }
        );
        let cache = format!("{}{ip}", keys::cache_prefix::<IpcacheEntry>(&c1()));
        assert_eq!(cache, format!("cilium/cache/ip/v1/c1/{ip}"));
        assert_eq!(
            keys::parse_ip_key(&cache).unwrap(),
            IpKey {
                cluster: Some(c1()),
                ip
            }
        );
    }
}

#[test]
fn identity_keys_round_trip() {
    for n in [1, 256, 196915, u32::MAX] {
        let id = NumericIdentity(n);
        let key = keys::identity_key(id);
        assert_eq!(key, format!("cilium/state/identities/v1/id/{n}"));
        assert_eq!(
            keys::parse_identity_key(&key).unwrap(),
            IdentityKey { cluster: None, id }
        );
        let cache = format!("{}{n}", keys::cache_prefix::<IdentityRecord>(&c1()));
        assert_eq!(cache, format!("cilium/cache/identities/v1/c1/id/{n}"));
        assert_eq!(
            keys::parse_identity_key(&cache).unwrap(),
            IdentityKey {
                cluster: Some(c1()),
                id
            }
        );
    }
}

#[test]
fn namespaced_keys_round_trip() {
    let expected = NamespacedKey {
        cluster: c1(),
        namespace: "kube-system".into(),
        name: "dns".into(),
    };
    let key = keys::service_key(&c1(), "kube-system", "dns");
    assert_eq!(key, "cilium/state/services/v1/c1/kube-system/dns");
    assert_eq!(keys::parse_service_key(&key).unwrap(), expected);
    let key = keys::service_export_key(&c1(), "kube-system", "dns");
    assert_eq!(key, "cilium/state/serviceexports/v1/c1/kube-system/dns");
    assert_eq!(keys::parse_service_export_key(&key).unwrap(), expected);
    // A service key is not a service-export key and vice versa.
    assert!(keys::parse_service_export_key("cilium/state/services/v1/c1/a/b").is_err());
    assert_eq!(
        keys::cache_prefix::<ClusterService>(&c1()),
        "cilium/cache/services/v1/c1/"
    );
    assert_eq!(
        keys::cache_prefix::<ServiceExport>(&c1()),
        "cilium/cache/serviceexports/v1/c1/"
    );
}

#[test]
fn cluster_config_canary_and_heartbeat_keys() {
    let key = ClusterConfig::key(&c1());
    assert_eq!(key, "cilium/cluster-config/c1");
    assert_eq!(keys::parse_cluster_config_key(&key).unwrap(), c1());
    assert!(keys::parse_cluster_config_key("cilium/cluster-config/c1/x").is_err());

    let canary = keys::sync_canary_key(&c1(), Node::BASE_PREFIX);
    assert_eq!(canary, "cilium/synced/c1/cilium/state/nodes/v1");
    assert_eq!(
        keys::parse_sync_canary_key(&canary).unwrap(),
        (c1(), "cilium/state/nodes/v1")
    );
    let cache_base = keys::cache_base_prefix(IpcacheEntry::BASE_PREFIX).unwrap();
    assert_eq!(cache_base, "cilium/cache/ip/v1");
    assert_eq!(
        keys::sync_canary_key(&c1(), &cache_base),
        "cilium/synced/c1/cilium/cache/ip/v1"
    );
    assert!(keys::parse_sync_canary_key("cilium/synced/c1").is_err());
    assert!(keys::parse_sync_canary_key("cilium/synced/c1/").is_err());
    assert_eq!(keys::HEARTBEAT_KEY, "cilium/.heartbeat");
    assert_eq!(keys::cache_base_prefix("other/prefix"), None);
}

#[test]
fn every_record_key_lies_under_its_prefix() {
    let max = MaxConnectedClusters::Max255;
    let id = ClusterId::new(3, max).unwrap();
    let node = Node::new("n1", c1(), id);
    assert!(node.key().starts_with(&Node::prefix(&c1())));
    let svc = ClusterService::new(c1(), id, "ns", "svc");
    assert!(svc.key().starts_with(&ClusterService::prefix(&c1())));
    let entry = IpcacheEntry::new("10.0.0.1".parse().unwrap(), NumericIdentity(6), None);
    assert!(entry.key().starts_with(&IpcacheEntry::prefix(&c1())));
}

#[test]
fn malformed_keys_are_refused() {
    type Parser = fn(&str) -> Result<(), api::KeyError>;
    let node: Parser = |k| keys::parse_node_key(k).map(drop);
    let ip: Parser = |k| keys::parse_ip_key(k).map(drop);
    let id: Parser = |k| keys::parse_identity_key(k).map(drop);
    let svc: Parser = |k| keys::parse_service_key(k).map(drop);
    let cases: &[(&str, Parser, &str)] = &[
        ("cilium/state/nodes/v1/c1", node, "invalid_key"),
        ("cilium/state/nodes/v1/c1/", node, "invalid_key"),
        ("cilium/state/nodes/v1/c1/a/b", node, "invalid_key"),
        ("cilium/state/nodes/v2/c1/a", node, "invalid_key"),
        ("cilium/state/nodes/v1/C1/a", node, "invalid_name"),
        ("cilium/state/nodes/v1/c1/Node_1", node, "invalid_name"),
        ("cilium/state/ip/v1/other/10.0.0.1", ip, "invalid_key"),
        ("cilium/state/ip/v1/default/10.0.0.300", ip, "invalid_ip"),
        ("cilium/state/identities/v1/id/abc", id, "invalid_key"),
        ("cilium/state/identities/v1/id/0070", id, "invalid_key"),
        ("cilium/state/identities/v1/id/+70", id, "invalid_key"),
        (
            "cilium/state/identities/v1/id/4294967296",
            id,
            "invalid_key",
        ),
        (
            "cilium/state/identities/v1/value/k8s:a=b;/node",
            id,
            "invalid_key",
        ),
        (
            "cilium/state/services/v1/c1/Default/web",
            svc,
            "invalid_name",
        ),
        ("cilium/state/services/v1/c1/default", svc, "invalid_key"),
    ];
    for (key, parse, reason) in cases {
        let err = parse(key).unwrap_err();
        assert_eq!(err.reason(), *reason, "{key}: {err}");
        assert!(
            err.to_string().contains(key),
            "{key}: message {err} must name the key"
        );
    }
}

#[test]
fn ip_keys_require_the_canonical_form() {
    // Canonical: what `ip_key` writes (RFC 5952, dotted quad), as Go's
    // formatter writes it. A single zero group is not compressed; IPv4-mapped
    // addresses keep the dotted quad.
    for ip in [
        "10.1.0.5",
        "0.0.0.0",
        "::",
        "::1",
        "2001:db8::1",
        "2001:db8:0:1:1:1:1:1",
        "2001:db8::1:0:0:1",
        "::ffff:10.1.0.5",
    ] {
        let key = format!("cilium/state/ip/v1/default/{ip}");
        let parsed = keys::parse_ip_key(&key).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(parsed.ip.to_string(), ip);
        assert_eq!(keys::ip_key(parsed.ip), key);
    }
    for (spelling, canonical) in [
        ("2001:db8:0::1", "2001:db8::1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:0db8::1", "2001:db8::1"),
        ("2001:db8::0:1", "2001:db8::1"),
        ("2001:db8::1:0:0:0:1", "2001:db8:0:1::1"),
        ("2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),
        ("2001:db8:0:0:1::1", "2001:db8::1:0:0:1"),
        ("2001:db8:0:0:0:0:0:0", "2001:db8::"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("::ffff:a01:5", "::ffff:10.1.0.5"),
        ("fd00:10:1:0::5", "fd00:10:1::5"),
    ] {
        for key in [
            format!("cilium/state/ip/v1/default/{spelling}"),
            format!("cilium/cache/ip/v1/c1/{spelling}"),
        ] {
            let err = keys::parse_ip_key(&key).unwrap_err();
            assert_eq!(err.reason(), "invalid_ip", "{key}: {err}");
            assert_eq!(err.key(), key);
            let msg = err.to_string();
            assert!(msg.contains(&key), "{msg:?} must name the key");
            assert!(
                msg.contains(&format!("{canonical:?}")),
                "{msg:?} must name the canonical form {canonical}"
            );
        }
    }
    // An IPv4 address with leading zeros does not parse at all (octal in
    // some parsers): still `invalid_ip`.
    let err = keys::parse_ip_key("cilium/state/ip/v1/default/010.1.0.5").unwrap_err();
    assert_eq!(err.reason(), "invalid_ip", "{err}");
}
