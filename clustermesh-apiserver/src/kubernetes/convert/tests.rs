//! Objects in the JSON shapes the Kubernetes API serves (core/v1 and
//! discovery.k8s.io/v1, as in the API reference), and the records they
//! become.

use serde_json::json;

use super::*;

fn from<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("an object of the API's shape")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn a_dual_stack_node() {
    let n: Node = from(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "worker-1", "uid": "5f1c", "resourceVersion": "812",
                     "labels": {"kubernetes.io/hostname": "worker-1", "topology.kubernetes.io/zone": "a"},
                     "annotations": {"network.cilium.io/wg-pub-key": "6Jx1Zt8zKxBQ0sZbV5hQp8g2kXzGJwGm1Hk9bE3tV0o=",
                                     "node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"podCIDR": "10.1.1.0/24", "podCIDRs": ["10.1.1.0/24", "fd00:10:1:1::/64"],
                 "providerID": "kind://docker/c1/worker-1"},
        "status": {"addresses": [
            {"type": "InternalIP", "address": "172.18.0.3"},
            {"type": "InternalIP", "address": "fc00:f853:ccd:e793::3"},
            {"type": "Hostname", "address": "worker-1"}
        ]}
    }));
    let spec = node(&n).unwrap();
    assert_eq!(spec.name, "worker-1");
    assert_eq!(
        spec.internal_ips,
        [
            "172.18.0.3".parse::<IpAddr>().unwrap(),
            "fc00:f853:ccd:e793::3".parse().unwrap()
        ]
    );
    assert_eq!(
        spec.pod_cidrs,
        [
            "10.1.1.0/24".parse::<IpNet>().unwrap(),
            "fd00:10:1:1::/64".parse().unwrap()
        ]
    );
    assert_eq!(spec.labels["topology.kubernetes.io/zone"], "a");
    assert_eq!(
        spec.wireguard_public_key,
        "6Jx1Zt8zKxBQ0sZbV5hQp8g2kXzGJwGm1Hk9bE3tV0o="
    );
}

#[test]
fn a_node_with_only_the_old_single_cidr_and_a_bad_one() {
    let n: Node = from(json!({
        "metadata": {"name": "old"},
        "spec": {"podCIDR": "10.1.2.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.12"}]}
    }));
    assert_eq!(
        node(&n).unwrap().pod_cidrs,
        ["10.1.2.0/24".parse::<IpNet>().unwrap()]
    );
    let bad: Node =
        from(json!({"metadata": {"name": "bad"}, "spec": {"podCIDRs": ["10.1.2.0/33"]}}));
    assert_eq!(
        node(&bad).unwrap_err().to_string(),
        "node bad: spec.podCIDRs[0] \"10.1.2.0/33\": invalid IP address syntax"
    );
}

fn web_pod() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-7d9f8-abcde", "namespace": "shop", "uid": "0c2e-11",
                     "labels": {"app": "web", "pod-template-hash": "7d9f8", "tier": "front"}},
        "spec": {"nodeName": "worker-1", "serviceAccountName": "web-sa",
                 "containers": [{"name": "web", "image": "nginx", "ports": [
                     {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                     {"containerPort": 9000},
                     {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]},
        "status": {"phase": "Running", "podIP": "10.1.1.5",
                   "podIPs": [{"ip": "10.1.1.5"}, {"ip": "fd00:10:1:1::5"}]}
    })
}

#[test]
fn a_dual_stack_pod_with_its_namespace_labels() {
    let ns: Namespace = from(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop", "team": "a"}}
    }));
    let ns_labels = namespace_labels(&ns);
    let ep = pod(&from(web_pod()), &ns_labels).unwrap().unwrap();
    assert_eq!(ep.namespace, "shop");
    assert_eq!(ep.name, "web-7d9f8-abcde");
    assert_eq!(ep.uid, "0c2e-11");
    assert_eq!(ep.node, "worker-1");
    assert_eq!(ep.service_account, "web-sa");
    assert_eq!(
        ep.ips,
        [
            "10.1.1.5".parse::<IpAddr>().unwrap(),
            "fd00:10:1:1::5".parse().unwrap()
        ]
    );
    assert_eq!(
        ep.labels,
        labels(&[
            ("app", "web"),
            (
                "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
                "shop"
            ),
            ("io.cilium.k8s.namespace.labels.team", "a"),
            ("io.cilium.k8s.policy.serviceaccount", "web-sa"),
            ("tier", "front"),
        ]),
        "pod-template-hash differs per ReplicaSet and is left out"
    );
    assert_eq!(
        ep.named_ports,
        [
            NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp
            },
            NamedPort {
                name: "dns".into(),
                port: 5353,
                protocol: Protocol::Udp
            },
        ]
    );
}

#[test]
fn pods_that_are_not_endpoints() {
    let mut host = web_pod();
    host["spec"]["hostNetwork"] = json!(true);
    let mut pending = web_pod();
    pending["status"] = json!({"phase": "Pending"});
    let mut unscheduled = web_pod();
    unscheduled["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeName");
    let mut done = web_pod();
    done["status"]["phase"] = json!("Succeeded");
    for (what, p) in [
        ("host network", host),
        ("no IP", pending),
        ("unscheduled", unscheduled),
        ("finished", done),
    ] {
        assert_eq!(pod(&from(p), &Labels::new()).unwrap(), None, "{what}");
    }
}

#[test]
fn a_pod_without_service_account_or_pod_ips_list() {
    let mut p = web_pod();
    p["spec"]
        .as_object_mut()
        .unwrap()
        .remove("serviceAccountName");
    p["status"].as_object_mut().unwrap().remove("podIPs");
    let ep = pod(&from(p), &Labels::new()).unwrap().unwrap();
    assert_eq!(ep.service_account, "default");
    assert_eq!(ep.ips, ["10.1.1.5".parse::<IpAddr>().unwrap()]);
    let mut bad = web_pod();
    bad["status"]["podIPs"][1]["ip"] = json!("fd00::zz");
    assert_eq!(
        pod(&from(bad), &Labels::new()).unwrap_err().to_string(),
        "pod web-7d9f8-abcde: status.podIPs[1].ip \"fd00::zz\": invalid IP address syntax"
    );
}

fn web_service() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                     "annotations": {"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                 "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                 "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                           {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": 9100}]}
    })
}

fn slice(name: &str, family: &str, endpoints: serde_json::Value) -> EndpointSlice {
    from(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web",
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": family,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "metrics", "port": 9100, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
}

#[test]
fn a_global_service_with_the_ready_backends_of_its_slices() {
    let v4 = slice(
        "web-abc12",
        "IPv4",
        json!([
            {"addresses": ["10.1.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
             "nodeName": "worker-1", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"}},
            {"addresses": ["10.1.2.7"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            {"addresses": ["10.1.2.8"]}
        ]),
    );
    let v6 = slice(
        "web-def34",
        "IPv6",
        json!([{"addresses": ["fd00:10:1:1::5"], "conditions": {"ready": true}}]),
    );
    assert_eq!(slice_service(&v4), Some(("shop".into(), "web".into())));
    let spec = service(&from(web_service()), &[&v4, &v6]).unwrap().unwrap();
    assert!(spec.global && spec.shared);
    assert_eq!(spec.affinity, Affinity::Local);
    assert_eq!(
        spec.frontend_ips,
        [
            "10.96.0.10".parse::<IpAddr>().unwrap(),
            "fd00:96::10".parse().unwrap()
        ]
    );
    assert_eq!(spec.ports[0].target, TargetPort::Name("http".into()));
    assert_eq!(spec.ports[1].target, TargetPort::Number(9100));
    assert_eq!(spec.selector, labels(&[("app", "web")]));
    let tcp = |port| PortConfig {
        protocol: Protocol::Tcp,
        port,
    };
    let both: BTreeMap<String, PortConfig> = [
        ("http".to_owned(), tcp(8080)),
        ("metrics".to_owned(), tcp(9100)),
    ]
    .into();
    let want: StatedBackends = [
        ("10.1.1.5".parse().unwrap(), both.clone()),
        ("10.1.2.8".parse().unwrap(), both.clone()),
        ("fd00:10:1:1::5".parse().unwrap(), both),
    ]
    .into();
    assert_eq!(spec.backends, Some(want), "not-ready 10.1.2.7 is left out");
    assert_eq!(
        service(&from(web_service()), &[])
            .unwrap()
            .unwrap()
            .backends,
        Some(StatedBackends::new()),
        "without slices a service has no backends (not: every pod the selector matches)"
    );
}

#[test]
fn annotations_as_cilium_reads_them() {
    let with = |annotations: serde_json::Value| {
        let mut s = web_service();
        s["metadata"]["annotations"] = annotations;
        service(&from(s), &[])
    };
    let plain = with(json!({})).unwrap().unwrap();
    assert!(!plain.global && plain.shared && plain.affinity == Affinity::None);
    let legacy =
        with(json!({"io.cilium/global-service": "TRUE", "service.cilium.io/shared": "false"}))
            .unwrap()
            .unwrap();
    assert!(legacy.global && !legacy.shared);
    assert_eq!(
        with(json!({"service.cilium.io/affinity": "nearest"})).unwrap_err().to_string(),
        "service web: metadata.annotations[\"service.cilium.io/affinity\"] \"nearest\": not local, remote or none"
    );
}

#[test]
fn services_that_are_not_load_balanced() {
    let mut headless = web_service();
    headless["spec"]["clusterIP"] = json!("None");
    headless["spec"]["clusterIPs"] = json!(["None"]);
    assert_eq!(service(&from(headless), &[]).unwrap(), None);
    let external: Service = from(json!({
        "metadata": {"name": "ext", "namespace": "shop"},
        "spec": {"type": "ExternalName", "externalName": "db.example.org"}
    }));
    assert_eq!(service(&external, &[]).unwrap(), None);
}
