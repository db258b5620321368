//! The lab's own layers, without agents: the namespace topology and underlay
//! addressing, each cluster's etcd with mutual TLS (reachable across clusters
//! with the right client certificate, refused with another CA's), reading an
//! "external" cluster's facts through a Cilium-style config, and `lab down`
//! leaving nothing behind. Needs root and etcd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvstore::KvWrite as _;
use meshctl::clustermesh::access::EtcdAdmin;
use meshctl::clustermesh::config::{self, ConfigError, EtcdConfig};
use meshctl::clustermesh::external::{self, ExternalError};
use meshctl::lab::state::{ClusterState, Encryption, LabState, Routing};
use meshctl::lab::{self, ip, plan, supervise, UpOptions};
use meshctl::netprobe;
use meshctl::progress::Progress;

/// Removes the lab even when the test fails.
struct Guard {
    name: String,
    root: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.name, &self.root, &Progress::quiet()) {
            eprintln!("cleaning lab {}: {e}", self.name);
        }
    }
}

/// A lab name unique to this process (lab names are `[a-z][a-z0-9]{0,9}`).
fn lab_name() -> String {
    format!("i{}", std::process::id() % 1_000_000_000)
}

/// A kvstore client of `config`, made and used inside `netns`.
fn in_netns_with<T: Send + 'static, Fut>(
    netns: &str,
    config: &EtcdConfig,
    f: impl FnOnce(Result<kvstore::EtcdBackend, kvstore::ConnectError>) -> Fut + Send + 'static,
) -> T
where
    Fut: std::future::Future<Output = T>,
{
    let config = kvstore::EtcdConfig::from_endpoints(
        config.endpoints.clone(),
        &kvstore::TlsPaths {
            trusted_ca_file: config.trusted_ca_file.clone(),
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
        },
    )
    .unwrap();
    ip::block_on(Some(netns), move || async move {
        f(kvstore::connect(&config).await).await
    })
    .expect("enter the namespace")
}

/// Writes `kvs` into `cluster`'s etcd as its `root` user.
fn put_as_root(state: &LabState, cluster: &ClusterState, kvs: Vec<(String, String)>) {
    let root = lab::etcd_config_for(state, cluster, kvstore::auth::ROOT_USER).unwrap();
    in_netns_with(&cluster.control_netns, &root, |client| async move {
        let client = client.expect("root connects");
        for (k, v) in kvs {
            client
                .put(&k, v.as_bytes(), None)
                .await
                .expect("put as root");
        }
    });
}

/// Reads the facts through `config` installed as a file, from inside `netns`.
fn read_facts_from(netns: &str, config: EtcdConfig) -> Result<config::ClusterFacts, ExternalError> {
    let dir = tempfile::tempdir().unwrap();
    let path = config.install(dir.path(), "external").unwrap();
    external::read_facts(&path, None, Some(netns))
}

fn lab_objects(name: &str, root: &Path) -> Vec<String> {
    let mut left: Vec<String> = ip::list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| plan::is_lab_netns(name, n))
        .map(|n| format!("namespace {n}"))
        .collect();
    let dir = lab::lab_dir(root, name);
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&dir.display().to_string()))
            .map(|l| format!("mount {l}")),
    );
    left
}

#[test]
fn topology_mtls_etcd_and_down() {
    if !testkit::require_root() || !testkit::require_binary("etcd") {
        return;
    }
    let root = std::env::temp_dir().join("mesh-lab-infra-test");
    let name = lab_name();
    let _guard = Guard {
        name: name.clone(),
        root: root.clone(),
    };
    let opts = UpOptions {
        name: name.clone(),
        root: root.clone(),
        clusters: 2,
        nodes: 1,
        routing: Routing::Tunnel,
        encryption: Encryption::None,
        connect: false,
        wait: None,
    };
    // A crashed earlier run with the same name is cleaned first.
    lab::down(&name, &root, &Progress::quiet()).unwrap();
    let mut state: LabState = lab::plan_state(&opts, &lab::lab_dir(&root, &name));
    lab::create_lab_dir(&state).unwrap();
    lab::build_topology(&state).unwrap();

    // Underlay: every namespace reaches every other across clusters; the bridge
    // namespace holds exactly the bridge and one port per namespace.
    let c1n1 = state.clusters[0].nodes[0].netns.clone();
    for target in [
        plan::node_ip(2, 1),
        plan::control_ip(1),
        plan::control_ip(2),
    ] {
        let rtt = ip::in_netns(&c1n1, move || {
            netprobe::icmp_echo(target, Duration::from_secs(5))
        })
        .unwrap();
        rtt.unwrap_or_else(|e| panic!("{c1n1} -> {target}: {e}"));
    }
    let mut ports = ip::links(&plan::underlay_netns(&name)).unwrap();
    ports.sort();
    assert_eq!(ports, ["br0", "c1-ctl", "c1-n1", "c2-ctl", "c2-n1", "lo"]);

    // etcd with mutual TLS per cluster.
    let etcd = testkit::find_binary("etcd").unwrap();
    for i in 0..state.clusters.len() {
        let cluster = state.clusters[i].clone();
        let record = lab::enable_cluster(&state, &cluster, &etcd).unwrap();
        state.processes.push(record);
    }
    state.save().unwrap();
    let c2 = state.clusters[1].clone();
    put_as_root(
        &state,
        &c2,
        vec![
            (
                "cilium/cluster-config/c2".into(),
                r#"{"id":2,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}"#
                    .into(),
            ),
            (
                "cilium/state/nodes/v1/c2/c2-n1".into(),
                r#"{"Name":"c2-n1","Cluster":"c2","IPv4AllocCIDR":{"IP":"10.2.1.0","Mask":"////AA=="},"ClusterID":2}"#
                    .into(),
            ),
        ],
    );

    // c1's node reads c2's etcd over mTLS as c2's user remote-c1, with the
    // certificate c2's CA issued for it.
    let c2_pki = lab::Layout::new(&state.dir).pki("c2");
    let admin = EtcdAdmin {
        cluster: "c2",
        pki: &c2_pki,
        endpoints: vec![format!("https://127.0.0.1:{}", plan::ETCD_LOCAL_PORT)],
        netns: Some(&c2.control_netns),
    };
    admin.add_reader("remote-c1").unwrap();
    let good = lab::etcd_config_for(&state, &c2, "remote-c1").unwrap();
    let facts = read_facts_from(&c1n1, good.clone()).expect("mTLS read of c2 from c1-n1");
    assert_eq!(facts.name, "c2");
    assert_eq!(facts.id, 2);
    assert_eq!(facts.pod_cidrs, ["10.2.1.0/24".parse().unwrap()]);
    // The same facts clash with c2 itself, and not with c1.
    let c1_facts = lab::cluster_facts(&state, &state.clusters[0]);
    config::check_compatible(&c1_facts, &facts).unwrap();
    let c2_facts = lab::cluster_facts(&state, &c2);
    assert!(matches!(
        config::check_compatible(&c2_facts, &facts),
        Err(ConfigError::DuplicateName { .. })
    ));

    // A client certificate from c1's CA is refused by c2's etcd, and so is no certificate.
    let c1 = state.clusters[0].clone();
    let rogue_client = lab::etcd_config_for(&state, &c1, "c1").unwrap();
    let rogue = EtcdConfig {
        cert_file: rogue_client.cert_file,
        key_file: rogue_client.key_file,
        ..good.clone()
    };
    let err = read_facts_from(&c1n1, rogue).unwrap_err();
    assert!(matches!(err, ExternalError::Connect { .. }), "{err}");
    let anonymous = EtcdConfig {
        cert_file: None,
        key_file: None,
        ..good.clone()
    };
    let err = read_facts_from(&c1n1, anonymous).unwrap_err();
    assert!(matches!(err, ExternalError::Connect { .. }), "{err}");

    // The reader writes nothing; a certificate of c2's CA for a name that is
    // no user reads nothing; and neither loopback listener of c2's control
    // namespace is a way around that.
    in_netns_with(&c1n1, &good, |client| async move {
        let err = client
            .unwrap()
            .put("cilium/state/nodes/v1/c2/x", b"{}", None)
            .await
            .unwrap_err();
        assert!(err.is_permission_denied(), "{err}");
    });
    let stranger = lab::etcd_config_for(&state, &c2, "remote-c9").unwrap();
    let err = read_facts_from(&c1n1, stranger).unwrap_err();
    assert!(matches!(err, ExternalError::Connect { .. }), "{err}");
    for port in [plan::ETCD_LOCAL_PORT, plan::ETCD_METRICS_PORT] {
        let plain = EtcdConfig {
            endpoints: vec![format!("http://127.0.0.1:{port}")],
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            allowed_pod_cidrs: Vec::new(),
            allowed_node_cidrs: Vec::new(),
        };
        let refused = in_netns_with(&c2.control_netns, &plain, |client| async move {
            match client {
                Err(_) => true,
                Ok(c) => c.put("cilium/x", b"x", None).await.is_err(),
            }
        });
        assert!(refused, "plain text on 127.0.0.1:{port} is refused");
    }
    assert!(admin.revoke("remote-c1").unwrap());
    let err = read_facts_from(&c1n1, good.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            ExternalError::Read { .. } | ExternalError::Connect { .. }
        ),
        "{err}"
    );
    admin.add_reader("remote-c1").unwrap();

    // The config file installs in Cilium's layout and loads back.
    let agent_dir = state.clusters[0].nodes[0].clustermesh_dir.clone();
    let path = good.install(&agent_dir, "c2").unwrap();
    let loaded = EtcdConfig::load(&path).unwrap();
    assert_eq!(loaded.endpoints, good.endpoints);
    assert_eq!(
        external::read_facts(&path, None, Some(&c1n1)).unwrap().name,
        "c2",
        "installed config works"
    );

    // etcd SIGKILLed comes back on its data directory with the data.
    let etcd_c2 = state
        .processes
        .iter()
        .find(|p| p.cluster == "c2")
        .unwrap()
        .clone();
    supervise::kill_hard(&etcd_c2);
    assert!(read_facts_from(&c1n1, good.clone()).is_err());
    lab::restart_etcd(&mut state, "c2").unwrap();
    assert_eq!(read_facts_from(&c1n1, good).unwrap().id, 2);

    // Down: processes, namespaces, mounts, files: nothing left.
    let pids: Vec<_> = state.processes.clone();
    let report = lab::down(&name, &root, &Progress::quiet()).unwrap();
    assert_eq!(report.namespaces.len(), 5, "{report:?}");
    assert!(
        lab_objects(&name, &root).is_empty(),
        "{:?}",
        lab_objects(&name, &root)
    );
    for p in pids {
        assert!(!supervise::is_running(&p), "process {} survived", p.pid);
    }
    // Down again is harmless.
    lab::down(&name, &root, &Progress::quiet()).unwrap();
}
