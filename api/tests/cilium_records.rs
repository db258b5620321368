//! Records in the shapes Cilium's own components write them (its Go types and
//! the clustermesh-apiserver / KVStoreMesh test data, re-typed here as our own
//! records: IPv4 and IPv6, the state and the KVStoreMesh cache layouts): each
//! decodes under its key, and encoding it again loses nothing.

use std::net::IpAddr;

use api::records::endpoint_slice::{
    SliceAddressType, SliceConditions, SliceEndpoint, SlicePort, SERVICE_NAME_LABEL,
};
use api::{
    ClusterConfig, ClusterEndpointSlice, ClusterId, ClusterName, ClusterService,
    EndpointSlicesExportMode, IdentityRecord, IpcacheEntry, L4Protocol, MaxConnectedClusters, Node,
    RemoteScope, Resource, ServiceExport, SessionAffinity,
};
use serde_json::Value;

fn cluster3() -> ClusterName {
    "cluster3".parse().unwrap()
}

fn scope() -> RemoteScope {
    let max = MaxConnectedClusters::Max255;
    RemoteScope::new(cluster3(), ClusterId::new(3, max).unwrap(), max)
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON: {e}: {}", String::from_utf8_lossy(bytes)))
}

/// How the value written back relates to the value read.
enum Back {
    /// The same JSON.
    Same,
    /// This JSON (the input spelled field names another way, or carried a
    /// field whose null Go reads as absent).
    As(&'static str),
}

/// Decodes `value` under `key` as `R`, re-encodes it and compares; then
/// decodes the encoding again and expects the same record.
fn round_trip<R: Resource>(key: &str, value: &str, back: Back) -> R {
    let record = R::decode(key, value.as_bytes(), &scope())
        .unwrap_or_else(|e| panic!("{key}: {e} ({})", e.reason()));
    let encoded = record.encode();
    let want = match back {
        Back::Same => json(value.as_bytes()),
        Back::As(v) => json(v.as_bytes()),
    };
    assert_eq!(json(&encoded), want, "{key}: encoding what was read");
    let again = R::decode(key, &encoded, &scope())
        .unwrap_or_else(|e| panic!("{key}: our own encoding: {e}"));
    assert_eq!(again, record, "{key}: decode(encode(x)) == x");
    record
}

#[test]
fn nodes() {
    // ciliumnodes.txtar's shape: Go field names, null secondaries, the
    // WireGuard key annotation, NodeIdentity of Cilium < 1.16.
    let v4 = r#"{"Name":"test-node-1","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.2"},{"Type":"ExternalIP","IP":"10.0.0.2"},{"Type":"CiliumInternalIP","IP":"10.244.0.75"}],"IPv4AllocCIDR":{"IP":"10.244.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.0.12","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,"Labels":{"kubernetes.io/hostname":"test-node-1"},"Annotations":{"network.cilium.io/wg-pub-key":"6pnHsNDJRnVAsEzn8JhKyjzZuFf5mHqpyQYMMdwG0X0="},"NodeIdentity":0,"WireguardPubKey":"6pnHsNDJRnVAsEzn8JhKyjzZuFf5mHqpyQYMMdwG0X0=","BootID":"b1c8f9a0-4d45-4d6f-9f24-8a7bd2cfa1e9"}"#;
    let node: Node = round_trip("cilium/state/nodes/v1/cluster3/test-node-1", v4, Back::Same);
    assert_eq!(node.internal_ipv4().unwrap().to_string(), "172.18.0.2");
    assert_eq!(node.node_identity, Some(0));

    // Dual stack with IPv6 secondaries, in the KVStoreMesh cache.
    let v6 = r#"{"Name":"test-node-2","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"fc00:c111::3"},{"Type":"InternalIP","IP":"172.18.0.3"}],"IPv4AllocCIDR":{"IP":"10.244.1.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244:1::","Mask":"//////////////////8AAA=="},"IPv6SecondaryAllocCIDRs":[{"IP":"fd00:10:245:1::","Mask":"//////////////////8AAA=="}],"IPv4HealthIP":"","IPv6HealthIP":"fd00:10:244:1::7","IPv4IngressIP":"","IPv6IngressIP":"fd00:10:244:1::8","ClusterID":3,"Source":"kvstore","EncryptionKey":0,"Labels":{},"Annotations":{},"WireguardPubKey":"","BootID":""}"#;
    let node: Node = round_trip("cilium/cache/nodes/v1/cluster3/test-node-2", v6, Back::Same);
    assert_eq!(node.pod_cidrs().len(), 3);
    assert_eq!(node.internal_ipv6().unwrap().to_string(), "fc00:c111::3");

    // A Cilium agent accepts field names in any case (Go's encoding/json).
    let lower = r#"{"name":"n3","cluster":"cluster3","ipAddresses":[{"type":"InternalIP","ip":"172.18.0.4"}],"clusterid":3,"labels":null}"#;
    round_trip::<Node>(
        "cilium/state/nodes/v1/cluster3/n3",
        lower,
        Back::As(
            r#"{"Name":"n3","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.4"}],"IPv4AllocCIDR":null,"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"","EncryptionKey":0,"Labels":{},"Annotations":{},"WireguardPubKey":"","BootID":""}"#,
        ),
    );
}

#[test]
fn ipcache_entries() {
    // ciliumendpoints.txtar's shape: Mask null (read as absent), Key 5, a
    // service account.
    let v4 = r#"{"IP":"10.244.2.74","Mask":null,"HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"bar","K8sPodName":"cep-002","K8sServiceAccount":"default"}"#;
    let entry: IpcacheEntry = round_trip(
        "cilium/state/ip/v1/default/10.244.2.74",
        v4,
        Back::As(
            r#"{"IP":"10.244.2.74","HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"bar","K8sPodName":"cep-002","K8sServiceAccount":"default"}"#,
        ),
    );
    assert_eq!(entry.encryption_key, 5);

    // IPv6, a full host mask, named ports, an identity whose local part is
    // below 256 (Cilium's block for cluster 3 starts at 3 << 16).
    let low = 3 << 16 | 7;
    let v6 = format!(
        r#"{{"IP":"fd00:10:244:2::4a","Mask":"/////////////////////w==","HostIP":"fc00:c111::2","ID":{low},"Key":0,"Metadata":"","K8sNamespace":"bar","K8sPodName":"cep-003","K8sServiceAccount":"sa","NamedPorts":[{{"Name":"http","Port":8080,"Protocol":"TCP"}}]}}"#
    );
    let back = v6.replace(r#""Mask":"/////////////////////w==","#, "");
    let record = IpcacheEntry::decode(
        "cilium/state/ip/v1/default/fd00:10:244:2::4a",
        v6.as_bytes(),
        &scope(),
    )
    .unwrap();
    assert_eq!(record.id.0, low);
    assert_eq!(json(&record.encode()), json(back.as_bytes()));

    // KVStoreMesh's cache: only IP and ID, everything else zero.
    let cached: IpcacheEntry = round_trip(
        "cilium/cache/ip/v1/cluster3/1.1.1.1",
        r#"{"IP":"1.1.1.1","ID":196609}"#,
        Back::As(
            r#"{"IP":"1.1.1.1","HostIP":"","ID":196609,"Key":0,"Metadata":"","K8sNamespace":"","K8sPodName":"","K8sServiceAccount":""}"#,
        ),
    );
    assert_eq!(cached.host_ip, None);

    // A prefix entry is not an endpoint.
    let err = IpcacheEntry::decode(
        "cilium/state/ip/v1/default/10.244.2.74",
        br#"{"IP":"10.244.2.74","Mask":"////AA==","ID":199475}"#,
        &scope(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("Mask"), "{err}");
}

#[test]
fn identities() {
    let key = "cilium/state/identities/v1/id/196915";
    let value = "k8s:app=baz;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=bar;";
    let state = IdentityRecord::decode(key, value.as_bytes(), &scope()).unwrap();
    assert_eq!(state.encode(), value.as_bytes());
    assert_eq!(state.labels.cluster(), Some("cluster3"));
    // KVStoreMesh's test data: no sources, no trailing ';', a local part of 1.
    let key = format!("cilium/cache/identities/v1/cluster3/id/{}", 3 << 16 | 1);
    let record = IdentityRecord::decode(
        &key,
        b"key1=value1;key2=value2;k8s:io.cilium.k8s.policy.cluster=cluster3",
        &scope(),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(record.encode()).unwrap(),
        "k8s:io.cilium.k8s.policy.cluster=cluster3;unspec:key1=value1;unspec:key2=value2;"
    );
}

#[test]
fn services() {
    // globalnamespace-services.txtar's shape, plus hostnames and zones.
    let v4 = r#"{"cluster":"cluster3","namespace":"ns-alpha","name":"echo-service","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.10":{"http":{"Protocol":"TCP","Port":8080}},"10.244.1.11":{"http":{"Protocol":"TCP","Port":8080}}},"hostnames":{"10.244.1.10":"echo-0"},"zones":{"10.244.1.10":{"zone":"zone-a","forZones":[{"name":"zone-a"}]},"10.244.1.11":{"zone":"zone-b","forZones":null}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":3}"#;
    let svc: ClusterService = round_trip(
        "cilium/state/services/v1/cluster3/ns-alpha/echo-service",
        v4,
        Back::Same,
    );
    let be: IpAddr = "10.244.1.10".parse().unwrap();
    assert_eq!(svc.hostnames[&be], "echo-0");
    assert_eq!(svc.zones[&be].for_zones, ["zone-a"]);

    // IPv6 in the cache layout, hostnames and zones absent (omitted, as Go's omitempty).
    let v6 = r#"{"cluster":"cluster3","namespace":"default","name":"web","frontends":{"fd00:10:96::a":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"fd00:10:244:1::a":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{},"includeExternal":false,"shared":false,"clusterID":3}"#;
    round_trip::<ClusterService>(
        "cilium/cache/services/v1/cluster3/default/web",
        v6,
        Back::Same,
    );
}

#[test]
fn service_exports() {
    // serviceexports.txtar's shapes: every field Cilium's MCSAPIServiceSpec has.
    let full = r#"{"cluster":"cluster3","name":"basic","namespace":"default","annotations":{"a":"b"},"labels":{"c":"d"},"exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[{"name":"http","protocol":"TCP","appProtocol":"kubernetes.io/h2c","port":80},{"protocol":"UDP","port":53}],"type":"ClusterSetIP","sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":42}},"ipFamilies":["IPv4","IPv6"],"internalTrafficPolicy":"Cluster","trafficDistribution":"PreferClose"}"#;
    let export: ServiceExport = round_trip(
        "cilium/state/serviceexports/v1/cluster3/default/basic",
        full,
        Back::Same,
    );
    assert_eq!(export.session_affinity, SessionAffinity::ClientIp);
    assert_eq!(
        export
            .session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds),
        Some(42)
    );
    assert_eq!(
        export.ports[0].app_protocol.as_deref(),
        Some("kubernetes.io/h2c")
    );
    let minimal = r#"{"cluster":"cluster3","name":"headless","namespace":"default","exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":null,"type":"Headless","sessionAffinity":"None"}"#;
    round_trip::<ServiceExport>(
        "cilium/cache/serviceexports/v1/cluster3/default/headless",
        minimal,
        Back::Same,
    );
    // What Cilium's validate refuses, we refuse, naming the field.
    for (field, bad) in [
        ("sessionAffinity", r#""sessionAffinity":"Sticky""#),
        ("ipFamilies[0]", r#""ipFamilies":["IPv5"]"#),
        (
            "internalTrafficPolicy",
            r#""internalTrafficPolicy":"Everywhere""#,
        ),
        ("trafficDistribution", r#""trafficDistribution":"Anywhere""#),
    ] {
        let value = minimal.replace(r#""sessionAffinity":"None""#, bad);
        let err = ServiceExport::decode(
            "cilium/state/serviceexports/v1/cluster3/default/headless",
            value.as_bytes(),
            &scope(),
        )
        .unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
}

#[test]
fn cluster_configs() {
    let cases: &[(&str, bool, EndpointSlicesExportMode)] = &[
        (
            r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#,
            false,
            EndpointSlicesExportMode::ServicesOnly,
        ),
        (
            r#"{"id":3,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":true}}"#,
            true,
            EndpointSlicesExportMode::ServicesOnly,
        ),
        (
            r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false,"endpointSlicesExportMode":"endpointslices-only"}}"#,
            false,
            EndpointSlicesExportMode::EndpointSlicesOnly,
        ),
        (
            r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"endpointSlicesExportMode":"services-and-endpointslices"}}"#,
            false,
            EndpointSlicesExportMode::ServicesAndEndpointSlices,
        ),
    ];
    let key = "cilium/cluster-config/cluster3";
    for (value, cached, mode) in cases {
        let config = ClusterConfig::decode(key, value.as_bytes(), &cluster3())
            .unwrap_or_else(|e| panic!("{value}: {e}"));
        assert_eq!(config.capabilities.cached, *cached, "{value}");
        assert_eq!(
            config.capabilities.endpoint_slices_export_mode, *mode,
            "{value}"
        );
        assert_eq!(json(&config.encode()), json(value.as_bytes()), "{value}");
    }
    let err = ClusterConfig::decode(
        key,
        br#"{"id":3,"capabilities":{"endpointSlicesExportMode":"slices-please"}}"#,
        &cluster3(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("endpointSlicesExportMode"),
        "{err}"
    );
}

fn slice(address_type: SliceAddressType, addresses: &[&str]) -> ClusterEndpointSlice {
    let ready = |ready| SliceConditions {
        ready: Some(ready),
        serving: Some(ready),
        terminating: Some(false),
    };
    ClusterEndpointSlice {
        cluster: cluster3(),
        cluster_id: ClusterId::new(3, MaxConnectedClusters::Max255).unwrap(),
        namespace: "test".into(),
        name: "echo-kvlm2".into(),
        labels: [(SERVICE_NAME_LABEL.to_owned(), "echo".to_owned())].into(),
        annotations: Default::default(),
        address_type,
        endpoints: addresses
            .iter()
            .enumerate()
            .map(|(i, a)| SliceEndpoint {
                addresses: vec![a.parse().unwrap()],
                conditions: Some(ready(i == 0)),
                node_name: Some("nodeport-worker".into()),
                zone: (i == 0).then(|| "zone1".to_owned()),
                for_zones: (i == 0).then(|| vec![Some("zone1".to_owned())]),
                ..Default::default()
            })
            .collect(),
        ports: vec![SlicePort {
            name: Some("http".into()),
            protocol: Some(L4Protocol::Tcp),
            port: Some(8080),
        }],
    }
}

#[test]
fn endpoint_slices() {
    // endpointslices.txtar's record (one ready, one unready endpoint), IPv4
    // in the state layout and IPv6 in the cache layout.
    for (key, record) in [
        (
            "cilium/state/endpointslices/v1/cluster3/test/echo-kvlm2",
            slice(SliceAddressType::Ipv4, &["10.244.1.1", "10.244.1.2"]),
        ),
        (
            "cilium/cache/endpointslices/v1/cluster3/test/echo-kvlm2",
            slice(
                SliceAddressType::Ipv6,
                &["fd00:10:244:1::1", "fd00:10:244:1::2"],
            ),
        ),
    ] {
        let bytes = record.encode();
        assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
        let decoded = ClusterEndpointSlice::decode(key, &bytes, &scope())
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(decoded, record, "{key}");
        assert_eq!(decoded.service_name(), Some("echo"));
        let backends: Vec<IpAddr> = decoded.backends().map(|(ip, _)| ip).collect();
        assert_eq!(
            backends,
            [record.endpoints[0].addresses[0]],
            "{key}: ready only"
        );
    }
}
