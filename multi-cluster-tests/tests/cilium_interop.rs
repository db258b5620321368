//! A lab cluster connected to an external cluster whose etcd holds records
//! in the shapes a Cilium clustermesh-apiserver writes (Go field names and a
//! lowercase variant, `"Mask":null`, a service account, identities whose
//! local part is below 256, label strings without a trailing `;`, IPv4 and
//! IPv6, `cilium/.has-cluster-config`). The external etcd runs inside the
//! lab (in c2's control namespace, on its own ports), and `meshctl
//! clustermesh connect --destination-config` reads it from inside the lab;
//! the test then finds the external endpoints in c1's ipcache map.

use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshctl::lab::ip;
use multi_cluster_tests::{eventually, prerequisites, Lab};

/// The external etcd's client port in c2's control namespace (the lab's own
/// etcd uses 2379/2380 there).
const CLIENT_PORT: u16 = 23_790;
const PEER_PORT: u16 = 23_800;
/// The external cluster: name, ID 3.
const CLUSTER: &str = "cilium3";

/// Kills the external etcd when the test ends.
struct Etcd(Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_etcd(netns: &str, ip: IpAddr, data: &Path) -> Etcd {
    let client = format!("http://{ip}:{CLIENT_PORT}");
    let peer = format!("http://127.0.0.1:{PEER_PORT}");
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "etcd", "--name", "external"])
        .arg("--data-dir")
        .arg(data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("external={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the external etcd");
    Etcd(child)
}

/// Puts `records` into the external etcd, from inside `netns`, retrying the
/// connection until etcd listens (deadline 30 s).
fn put_records(netns: &str, endpoint: String, records: Vec<(String, String)>) {
    ip::in_netns(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let mut client = loop {
                let options = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(1))
                    .with_timeout(Duration::from_secs(2));
                if let Ok(mut c) =
                    etcd_client::Client::connect([endpoint.as_str()], Some(options)).await
                {
                    if c.status().await.is_ok() {
                        break c;
                    }
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the external etcd at {endpoint} never answered"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            for (key, value) in records {
                client.put(key, value, None).await.expect("put a record");
            }
        });
    })
    .expect("enter c2's control namespace");
}

fn cilium_records() -> Vec<(String, String)> {
    // 3 << 16 | 5 and | 200: local parts below 256, in Cilium's block.
    let (web, db) = (196_613, 196_808);
    let mut out: Vec<(String, String)> = vec![
        ("cilium/.has-cluster-config".into(), "true".into()),
        (
            format!("cilium/cluster-config/{CLUSTER}"),
            r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#.into(),
        ),
        (
            format!("cilium/state/nodes/v1/{CLUSTER}/k8s-node-1"),
            format!(r#"{{"Name":"k8s-node-1","Cluster":"{CLUSTER}","IPAddresses":[{{"Type":"InternalIP","IP":"192.168.3.11"}},{{"Type":"CiliumInternalIP","IP":"10.3.1.1"}}],"IPv4AllocCIDR":{{"IP":"10.3.1.0","Mask":"////AA=="}},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{{"IP":"fd00:10:3:1::","Mask":"//////////////////8AAA=="}},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,"Labels":{{}},"Annotations":{{}},"NodeIdentity":0,"WireguardPubKey":"","BootID":""}}"#),
        ),
        // A Go decoder accepts field names in any case.
        (
            format!("cilium/state/nodes/v1/{CLUSTER}/k8s-node-2"),
            format!(r#"{{"name":"k8s-node-2","cluster":"{CLUSTER}","ipAddresses":[{{"type":"InternalIP","ip":"192.168.3.12"}}],"ipv4AllocCIDR":{{"ip":"10.3.2.0","mask":"////AA=="}},"clusterID":3}}"#),
        ),
        (
            "cilium/state/ip/v1/default/10.3.1.7".into(),
            format!(r#"{{"IP":"10.3.1.7","Mask":null,"HostIP":"192.168.3.11","ID":{web},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"web-1","K8sServiceAccount":"default"}}"#),
        ),
        (
            "cilium/state/ip/v1/default/fd00:10:3:1::7".into(),
            format!(r#"{{"IP":"fd00:10:3:1::7","Mask":null,"HostIP":"192.168.3.11","ID":{web},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"web-1"}}"#),
        ),
        (
            "cilium/state/ip/v1/default/10.3.2.9".into(),
            format!(r#"{{"IP":"10.3.2.9","HostIP":"192.168.3.12","ID":{db},"Key":0}}"#),
        ),
        (
            format!("cilium/state/identities/v1/id/{web}"),
            format!("k8s:app=web;k8s:io.cilium.k8s.policy.cluster={CLUSTER};k8s:io.kubernetes.pod.namespace=default;"),
        ),
        (
            format!("cilium/state/identities/v1/id/{db}"),
            format!("k8s:app=db;k8s:io.cilium.k8s.policy.cluster={CLUSTER}"),
        ),
    ];
    for kind in ["nodes", "ip", "identities", "services"] {
        out.push((
            format!("cilium/synced/{CLUSTER}/cilium/state/{kind}/v1"),
            "2026-12-04T00:00:00Z".into(),
        ));
    }
    out
}

#[test]
fn an_external_cilium_cluster_reaches_the_ipcache_map() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::up("cil", &["--clusters", "2", "--nodes", "1"]);
    let state = lab.state();
    let c2 = state.cluster("c2").expect("c2").clone();
    let data = tempfile::tempdir().unwrap();
    let _etcd = start_etcd(&c2.control_netns, c2.control_ip.into(), data.path());
    let endpoint = format!("http://{}:{CLIENT_PORT}", c2.control_ip);
    put_records(&c2.control_netns, endpoint.clone(), cilium_records());

    let config = data.path().join("cilium3.yaml");
    std::fs::write(&config, format!("endpoints:\n- {endpoint}\n")).unwrap();
    let (ok, stdout, stderr) = lab.meshctl(&[
        "clustermesh",
        "connect",
        "--source",
        "c1",
        "--destination-config",
        config.to_str().unwrap(),
    ]);
    assert!(ok, "connect to {CLUSTER} failed:\n{stdout}\n{stderr}");

    let node = state.cluster("c1").expect("c1").nodes[0].clone();
    let want: [(IpAddr, u32, &str); 3] = [
        ("10.3.1.7".parse().unwrap(), 196_613, "192.168.3.11"),
        ("fd00:10:3:1::7".parse().unwrap(), 196_613, "192.168.3.11"),
        ("10.3.2.9".parse().unwrap(), 196_808, "192.168.3.12"),
    ];
    let mut last = String::new();
    eventually(
        "c1-n1's ipcache map to hold the external cluster's endpoints",
        Duration::from_secs(60),
        || {
            let ipcache = match datapath::Ipcache::open(&node.bpffs) {
                Ok(m) => m,
                Err(e) => {
                    last = e.to_string();
                    return false;
                }
            };
            want.iter().all(|(ip, identity, host)| {
                let prefix = ipnet::IpNet::from(*ip);
                match ipcache.get(prefix) {
                    Ok(Some(e)) => {
                        last = format!("{prefix}: {e:?}");
                        e.identity == *identity && e.tunnel_endpoint == Some(host.parse().unwrap())
                    }
                    other => {
                        last = format!("{prefix}: {other:?}");
                        false
                    }
                }
            })
        },
    );
    eprintln!("last entry checked: {last}");
    let status = lab.status_json();
    let c1 = status
        .as_array()
        .and_then(|a| a.iter().find(|c| c["cluster"] == "c1"))
        .expect("c1 in status")
        .clone();
    let remote = c1["remote_clusters"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == CLUSTER))
        .unwrap_or_else(|| panic!("{CLUSTER} not in c1's status: {c1:#}"));
    assert_eq!(remote["ready"], 1, "{remote:#}");
    assert_eq!(
        remote["nodes"], 2,
        "both nodes read (one in lowercase): {remote:#}"
    );
    assert_eq!(remote["endpoints"], 3, "{remote:#}");
    assert_eq!(remote["rejected"], 0, "nothing refused: {remote:#}");
}
