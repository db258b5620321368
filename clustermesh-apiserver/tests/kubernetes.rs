//! The Kubernetes source, end to end: the real `clustermesh-apiserver`
//! binary with `--source kubernetes` against a real etcd and the in-test
//! API server of `testkit` (no Kubernetes API server can be installed on
//! these machines). Objects are in the JSON shapes the API serves; the
//! assertions are on the etcd keys the binary writes.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::Duration,
};

use kvstore::{ListWatch as _, Revision};
use serde_json::{json, Value};
use testkit::FakeApiServer;

const DEADLINE: Duration = Duration::from_secs(30);

/// The apiserver process, killed when dropped.
struct Apiserver(Child);

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_apiserver(
    etcd: &testkit::EtcdServer,
    kubeconfig: &std::path::Path,
    extra: &[&str],
) -> Apiserver {
    let log = std::fs::File::create(
        etcd.dir()
            .join(format!("apiserver-{}.log", testkit::unique_name("k"))),
    )
    .expect("apiserver log file");
    let child = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .args([
            "--cluster-name=c1",
            "--cluster-id=1",
            &format!("--etcd-endpoints={}", etcd.endpoint()),
            "--source=kubernetes",
            &format!("--kubeconfig={}", kubeconfig.display()),
            "--grpc-listen=127.0.0.1:0",
            "--health-listen=127.0.0.1:0",
        ])
        .args(extra)
        .env_clear()
        .env("RUST_LOG", "info,clustermesh_apiserver=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start clustermesh-apiserver");
    Apiserver(child)
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn node(name: &str, cidr: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}
    })
}

fn pod(name: &str, node: &str, ip: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "labels": {"app": app, "pod-template-hash": format!("h{name}")}},
        "spec": {"nodeName": node, "serviceAccountName": "web-sa",
                 "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn service(name: &str, ip: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}
    })
}

/// `(address, ready)` pairs of the web service's one slice.
fn slice(endpoints: &[(&str, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x7k2p", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

/// Every key under `cilium/` and the private registry, with its value and
/// mod revision; the heartbeat (rewritten on a timer) is left out.
async fn keys(backend: &kvstore::EtcdBackend) -> BTreeMap<String, (String, Revision)> {
    let mut out = BTreeMap::new();
    for prefix in ["cilium/", "mesh/registry/"] {
        for kv in backend.list(prefix).await.expect("list etcd").kvs {
            if kv.key != "cilium/.heartbeat" {
                out.insert(
                    kv.key.clone(),
                    (
                        String::from_utf8_lossy(&kv.value).into_owned(),
                        kv.mod_revision,
                    ),
                );
            }
        }
    }
    out
}

async fn value(backend: &kvstore::EtcdBackend, key: &str) -> Option<Value> {
    let listing = backend.list(key).await.expect("read etcd");
    let kv = listing.kvs.into_iter().find(|kv| kv.key == key)?;
    Some(
        serde_json::from_slice(&kv.value)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&kv.value))),
    )
}

async fn wait_value(
    backend: &kvstore::EtcdBackend,
    key: &str,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    testkit::wait_for(DEADLINE, &format!("{what} at {key}"), || async {
        value(backend, key).await.filter(&want)
    })
    .await
}

async fn wait_gone(backend: &kvstore::EtcdBackend, key: &str, what: &str) {
    testkit::wait_until(DEADLINE, &format!("{what}: {key} deleted"), || async {
        value(backend, key).await.is_none()
    })
    .await;
}

fn backend_ips(service: &Value) -> Vec<String> {
    service["backends"]
        .as_object()
        .map(|b| b.keys().cloned().collect())
        .unwrap_or_default()
}

/// Namespace `shop`, node `worker-1` and its pod `web-1` (10.1.1.5).
fn one_pod(api: &FakeApiServer) {
    api.apply(namespace("shop", json!({})));
    api.apply(node("worker-1", "10.1.1.0/24", "192.168.1.11"));
    api.apply(pod("web-1", "worker-1", "10.1.1.5", "web"));
}

/// A real etcd, a client of it, and the in-test API server with a
/// kubeconfig for it; `None` when etcd is missing (and skipping is allowed).
struct World {
    etcd: testkit::EtcdServer,
    backend: kvstore::EtcdBackend,
    api: FakeApiServer,
    kubeconfig: std::path::PathBuf,
}

impl World {
    async fn start() -> Option<Self> {
        if !testkit::require_binary("etcd") {
            return None;
        }
        let etcd = testkit::EtcdServer::start().await;
        let backend = kvstore::connect(
            &kvstore::EtcdConfig::from_endpoints([etcd.endpoint()], &kvstore::TlsPaths::default())
                .expect("the test etcd's endpoint is valid"),
        )
        .await
        .expect("connect to the test etcd");
        let api = FakeApiServer::start().await;
        let kubeconfig = etcd.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        Some(Self {
            etcd,
            backend,
            api,
            kubeconfig,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_become_records_and_a_relist_rewrites_nothing() {
    let Some(World {
        etcd,
        backend,
        api,
        kubeconfig,
    }) = World::start().await
    else {
        return;
    };
    api.apply(namespace(
        "shop",
        json!({"kubernetes.io/metadata.name": "shop", "team": "a"}),
    ));
    let mut worker1 = node("worker-1", "10.1.1.0/24", "192.168.1.11");
    worker1["metadata"]["annotations"] =
        json!({"network.cilium.io/wg-pub-key": "6Jx1Zt8zKxBQ0sZbV5hQp8g2kXzGJwGm1Hk9bE3tV0o="});
    api.apply(worker1);
    api.apply(node("worker-2", "10.1.2.0/24", "192.168.1.12"));
    api.apply(pod("web-1", "worker-1", "10.1.1.5", "web"));
    api.apply(pod("web-2", "worker-2", "10.1.2.5", "web"));
    let mut host = pod("agent-x", "worker-1", "192.168.1.11", "agent");
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(host);
    api.apply(service(
        "web",
        "10.96.0.10",
        json!({"service.cilium.io/global": "true"}),
    ));
    api.apply(slice(&[("10.1.1.5", true), ("10.1.2.5", false)]));
    api.apply(service("internal", "10.96.0.11", json!({})));
    let _apiserver = start_apiserver(&etcd, &kubeconfig, &[]);

    // Nodes, endpoints (ready or not: both are pods), identity, the global
    // service with its ready backend only, and the canaries.
    let n1 = wait_value(
        &backend,
        "cilium/state/nodes/v1/c1/worker-1",
        "node worker-1",
        |_| true,
    )
    .await;
    assert_eq!(n1["IPv4AllocCIDR"]["IP"], "10.1.1.0");
    assert_eq!(n1["IPAddresses"][0]["IP"], "192.168.1.11");
    assert_eq!(
        n1["WireguardPubKey"], "6Jx1Zt8zKxBQ0sZbV5hQp8g2kXzGJwGm1Hk9bE3tV0o=",
        "the key the node's agent annotated"
    );
    let ep = wait_value(
        &backend,
        "cilium/state/ip/v1/default/10.1.1.5",
        "web-1's ipcache entry",
        |_| true,
    )
    .await;
    assert_eq!(ep["HostIP"], "192.168.1.11");
    assert_eq!(ep["K8sNamespace"], "shop");
    assert_eq!(ep["K8sPodName"], "web-1");
    assert_eq!(ep["K8sServiceAccount"], "web-sa");
    let identity = ep["ID"].as_u64().expect("a numeric identity");
    let labels = wait_value(
        &backend,
        &format!("cilium/state/identities/v1/id/{identity}"),
        "web-1's identity",
        |_| true,
    )
    .await;
    assert_eq!(
        labels,
        json!("k8s:app=web;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop;\
               k8s:io.cilium.k8s.namespace.labels.team=a;k8s:io.cilium.k8s.policy.cluster=c1;\
               k8s:io.cilium.k8s.policy.serviceaccount=web-sa;k8s:io.kubernetes.pod.namespace=shop;"),
        "Cilium's identity labels, without the per-pod pod-template-hash"
    );
    wait_value(
        &backend,
        "cilium/state/ip/v1/default/10.1.2.5",
        "web-2's ipcache entry",
        |_| true,
    )
    .await;
    let web = wait_value(
        &backend,
        "cilium/state/services/v1/c1/shop/web",
        "the global service",
        |_| true,
    )
    .await;
    assert_eq!(
        backend_ips(&web),
        ["10.1.1.5"],
        "only the ready backend: {web}"
    );
    assert_eq!(web["backends"]["10.1.1.5"]["http"]["Port"], 8080);
    assert_eq!(web["frontends"]["10.96.0.10"]["http"]["Port"], 80);
    for prefix in ["nodes", "ip", "identities", "services"] {
        wait_value(
            &backend,
            &format!("cilium/synced/c1/cilium/state/{prefix}/v1"),
            "a sync canary",
            |_| true,
        )
        .await;
    }
    let before = keys(&backend).await;
    assert!(
        !before.contains_key("cilium/state/services/v1/c1/shop/internal"),
        "not global, not exported"
    );
    assert!(
        !before
            .keys()
            .any(|k| k.contains("192.168.1.11") && k.starts_with("cilium/state/ip/")),
        "the host-network pod is no endpoint"
    );

    // The history expires: every watcher gets 410 Gone and lists again.
    // Nothing that did not change is written again.
    let lists = |api: &FakeApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET") && !r.contains("watch=true"))
            .count()
    };
    let listed = lists(&api);
    api.expire_history();
    testkit::wait_until(
        DEADLINE,
        "every watcher to list again after 410 Gone",
        || async { lists(&api) >= listed + 5 },
    )
    .await;
    // A barrier: changes made after the relist arrive after it.
    api.apply(pod("web-3", "worker-1", "10.1.1.6", "web"));
    api.apply(slice(&[
        ("10.1.1.5", true),
        ("10.1.2.5", false),
        ("10.1.1.6", true),
    ]));
    wait_value(
        &backend,
        "cilium/state/services/v1/c1/shop/web",
        "web-3 as a backend",
        |v| backend_ips(v).len() == 2,
    )
    .await;
    wait_value(
        &backend,
        "cilium/state/ip/v1/default/10.1.1.6",
        "web-3's ipcache entry",
        |_| true,
    )
    .await;
    let after = keys(&backend).await;
    for (key, (value, revision)) in &before {
        if key == "cilium/state/services/v1/c1/shop/web"
            || key.starts_with("mesh/registry/v1/c1/services/")
        {
            continue; // changed by the barrier
        }
        assert_eq!(
            after.get(key),
            Some(&(value.clone(), *revision)),
            "{key} was rewritten by the relist"
        );
    }

    // A namespace's labels are its pods' identity labels: changing them
    // gives the pods a new identity.
    api.apply(namespace(
        "shop",
        json!({"kubernetes.io/metadata.name": "shop", "team": "b"}),
    ));
    let moved = wait_value(
        &backend,
        "cilium/state/ip/v1/default/10.1.1.5",
        "web-1's new identity",
        |v| v["ID"].as_u64() != Some(identity),
    )
    .await;
    let labels = wait_value(
        &backend,
        &format!("cilium/state/identities/v1/id/{}", moved["ID"]),
        "the new identity",
        |_| true,
    )
    .await;
    assert!(
        labels
            .as_str()
            .is_some_and(|l| l.contains("k8s:io.cilium.k8s.namespace.labels.team=b;")),
        "{labels}"
    );

    // A dropped watch resumes where it was; a readiness change is seen.
    api.drop_watches();
    api.apply(slice(&[
        ("10.1.1.5", false),
        ("10.1.2.5", true),
        ("10.1.1.6", true),
    ]));
    wait_value(
        &backend,
        "cilium/state/services/v1/c1/shop/web",
        "readiness to move",
        |v| backend_ips(v) == ["10.1.1.6", "10.1.2.5"],
    )
    .await;

    // Deletions remove their keys.
    api.delete("Pod", "shop", "web-1");
    wait_gone(
        &backend,
        "cilium/state/ip/v1/default/10.1.1.5",
        "a deleted pod",
    )
    .await;
    api.delete("Node", "", "worker-2");
    wait_gone(
        &backend,
        "cilium/state/nodes/v1/c1/worker-2",
        "a deleted node",
    )
    .await;
    wait_gone(
        &backend,
        "cilium/state/ip/v1/default/10.1.2.5",
        "the pod of a deleted node",
    )
    .await;
    api.delete("Service", "shop", "web");
    wait_gone(
        &backend,
        "cilium/state/services/v1/c1/shop/web",
        "a deleted service",
    )
    .await;
    assert!(
        value(&backend, "cilium/state/nodes/v1/c1/worker-1")
            .await
            .is_some(),
        "the node that was not deleted stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_apiserver_rewrites_nothing_and_sweeps_what_went_meanwhile() {
    let Some(World {
        etcd,
        backend,
        api,
        kubeconfig,
    }) = World::start().await
    else {
        return;
    };
    one_pod(&api);
    api.apply(pod("web-2", "worker-1", "10.1.1.7", "web"));
    let first = start_apiserver(&etcd, &kubeconfig, &[]);
    wait_value(
        &backend,
        "cilium/state/ip/v1/default/10.1.1.7",
        "web-2",
        |_| true,
    )
    .await;
    wait_value(
        &backend,
        "cilium/synced/c1/cilium/state/ip/v1",
        "the ipcache canary",
        |_| true,
    )
    .await;
    drop(first);
    // While no apiserver runs, web-2 goes.
    api.delete("Pod", "shop", "web-2");
    let before = keys(&backend).await;
    let _second = start_apiserver(&etcd, &kubeconfig, &[]);
    wait_gone(
        &backend,
        "cilium/state/ip/v1/default/10.1.1.7",
        "a pod deleted while down",
    )
    .await;
    let after = keys(&backend).await;
    for key in [
        "cilium/state/ip/v1/default/10.1.1.5",
        "cilium/state/nodes/v1/c1/worker-1",
    ] {
        assert_eq!(
            after.get(key),
            before.get(key),
            "{key} was rewritten by the successor"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_among_replicas_and_a_successor_when_it_dies() {
    let Some(World {
        etcd,
        backend,
        api,
        kubeconfig,
    }) = World::start().await
    else {
        return;
    };
    one_pod(&api);
    let elect = |id: &str| {
        vec![
            "--leader-elect".to_owned(),
            "--leader-election-namespace=mesh-system".to_owned(),
            format!("--leader-election-identity={id}"),
        ]
    };
    let a_args = elect("replica-a");
    let a = start_apiserver(
        &etcd,
        &kubeconfig,
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let holder = |api: &FakeApiServer| {
        api.get("Lease", "mesh-system", "clustermesh-apiserver")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    };
    testkit::wait_until(DEADLINE, "replica-a to take the lease", || async {
        holder(&api).as_deref() == Some("replica-a")
    })
    .await;
    let b_args = elect("replica-b");
    let _b = start_apiserver(
        &etcd,
        &kubeconfig,
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let entry = wait_value(
        &backend,
        "cilium/state/ip/v1/default/10.1.1.5",
        "the leader's export",
        |_| true,
    )
    .await;
    let before = keys(&backend).await;
    // replica-b waits: it must not take the lease while replica-a renews it.
    let lease = api
        .get("Lease", "mesh-system", "clustermesh-apiserver")
        .unwrap();
    let renewed = lease["metadata"]["resourceVersion"].clone();
    testkit::wait_until(DEADLINE, "replica-a to renew the lease", || async {
        api.get("Lease", "mesh-system", "clustermesh-apiserver")
            .unwrap()["metadata"]["resourceVersion"]
            != renewed
    })
    .await;
    assert_eq!(holder(&api).as_deref(), Some("replica-a"));

    // The leader dies; replica-b takes over after the lease duration and
    // adopts the keys: the entry keeps its value and revision.
    drop(a);
    testkit::wait_until(
        Duration::from_secs(40),
        "replica-b to take the lease",
        || async { holder(&api).as_deref() == Some("replica-b") },
    )
    .await;
    api.apply(pod("web-2", "worker-1", "10.1.1.6", "web"));
    wait_value(
        &backend,
        "cilium/state/ip/v1/default/10.1.1.6",
        "the new leader's export",
        |_| true,
    )
    .await;
    let after = keys(&backend).await;
    let key = "cilium/state/ip/v1/default/10.1.1.5";
    assert_eq!(
        after.get(key),
        before.get(key),
        "the successor rewrote {key} ({entry})"
    );
    let lease = api
        .get("Lease", "mesh-system", "clustermesh-apiserver")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
}
