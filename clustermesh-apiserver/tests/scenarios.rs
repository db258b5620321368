//! Scenario tests in the style of Cilium's `clustermesh-apiserver` txtar
//! files: each `testdata/*.txtar` says which requests to send through the real
//! gRPC API and which etcd keys and values must then exist, exactly. They run
//! against a real etcd started by `testkit`.
//!
//! Script grammar (the `-- script --` section, one step per line, `#` comments):
//!
//! ```text
//! config session-grace=1s identity-grace=1s   before the first start only
//! start                                       start the apiserver, wait until ready
//! open S NODE                                 open session S for NODE
//! close S                                     end session S's stream
//! node S {json}                               RegisterNode (fields as in the .proto)
//! endpoint S {json}                           UpsertEndpoint
//! delete-endpoint S NS/NAME                   DeleteEndpoint
//! service {json}                              UpsertService
//! delete-service NS/NAME                      DeleteService
//! ... => CODE TEXT                            the step fails with CODE, message contains TEXT,
//!                                             and etcd's revision does not move
//! ... =>+ CODE TEXT                           as `=>`, but the request may write (queued IP claims)
//! expect SECTION                              wait until the keys under cilium/ (heartbeat
//!                                             excluded) are exactly SECTION, a JSON object
//!                                             key → value; "*" matches any value
//! expect-keys PREFIX SECTION                  as `expect`, for the keys under PREFIX
//! count PREFIX N                              wait until exactly N keys exist under PREFIX
//! seed KEY VALUE                              put KEY directly into etcd (e.g. what an older
//!                                             version left behind)
//! hold DURATION SECTION                       SECTION holds now and for DURATION
//! restart                                     stop and start again while watching etcd:
//!                                             no key under cilium/ is deleted, none under
//!                                             cilium/state/ is written
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use clustermesh_apiserver::config::Config;
use common::{Served, DEADLINE};
use futures::StreamExt as _;
use kvstore::{KvWrite as _, ListWatch as _, SyncStoreConfig};
use mesh_proto::v1 as pb;
use pb::registry_client::RegistryClient;
use serde_json::Value;
use tonic::transport::Channel;

mod common;

struct Harness {
    name: String,
    etcd: testkit::EtcdServer,
    backend: kvstore::EtcdBackend,
    config: Config,
    running: Option<Served>,
    sessions: HashMap<String, (String, tonic::Streaming<pb::SessionEvent>)>,
}

fn parse_txtar(text: &str) -> (String, BTreeMap<String, String>) {
    let mut comment = String::new();
    let mut sections = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("-- ").and_then(|l| l.strip_suffix(" --")) {
            if let Some((n, body)) = current.take() {
                sections.insert(n, body);
            }
            current = Some((name.trim().to_owned(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        } else {
            comment.push_str(line);
            comment.push('\n');
        }
    }
    if let Some((n, body)) = current {
        sections.insert(n, body);
    }
    (comment, sections)
}

fn strings(v: &Value, field: &str) -> Vec<String> {
    v.get(field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn string(v: &Value, field: &str) -> String {
    v.get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn map(v: &Value, field: &str) -> HashMap<String, String> {
    v.get(field)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn number(v: &Value, field: &str) -> u32 {
    v.get(field)
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn protocol(v: &Value) -> i32 {
    match v.get("protocol").and_then(Value::as_str) {
        Some("UDP") => pb::Protocol::Udp.into(),
        Some("SCTP") => pb::Protocol::Sctp.into(),
        Some("TCP") => pb::Protocol::Tcp.into(),
        Some("BOGUS") => 99,
        _ => pb::Protocol::Unspecified.into(),
    }
}

fn pb_node(v: &Value) -> pb::Node {
    pb::Node {
        name: string(v, "name"),
        internal_ips: strings(v, "internal_ips"),
        cilium_internal_ips: strings(v, "cilium_internal_ips"),
        pod_cidrs: strings(v, "pod_cidrs"),
        wireguard_public_key: string(v, "wireguard_public_key"),
        labels: map(v, "labels"),
    }
}

fn pb_endpoint(v: &Value) -> pb::Endpoint {
    pb::Endpoint {
        namespace: string(v, "namespace"),
        name: string(v, "name"),
        uid: string(v, "uid"),
        service_account: string(v, "service_account"),
        ips: strings(v, "ips"),
        labels: map(v, "labels"),
        named_ports: v
            .get("named_ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| pb::NamedPort {
                name: string(p, "name"),
                port: number(p, "port"),
                protocol: protocol(p),
            })
            .collect(),
        node: string(v, "node"),
    }
}

fn pb_service(v: &Value) -> pb::Service {
    pb::Service {
        namespace: string(v, "namespace"),
        name: string(v, "name"),
        frontend_ips: strings(v, "frontend_ips"),
        ports: v
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| pb::ServicePort {
                name: string(p, "name"),
                protocol: protocol(p),
                port: number(p, "port"),
                target: if let Some(n) = p.get("target_port_name").and_then(Value::as_str) {
                    Some(pb::service_port::Target::TargetPortName(n.to_owned()))
                } else {
                    p.get("target_port_number").map(|_| {
                        pb::service_port::Target::TargetPortNumber(number(p, "target_port_number"))
                    })
                },
            })
            .collect(),
        selector: map(v, "selector"),
        labels: map(v, "labels"),
        global: v.get("global").and_then(Value::as_bool).unwrap_or(false),
        shared: v.get("shared").and_then(Value::as_bool),
        affinity: match v.get("affinity").and_then(Value::as_str) {
            Some("local") => pb::Affinity::Local.into(),
            Some("remote") => pb::Affinity::Remote.into(),
            _ => pb::Affinity::None.into(),
        },
    }
}

fn split_ns(s: &str) -> (String, String) {
    let (ns, name) = s.split_once('/').expect("NS/NAME");
    (ns.to_owned(), name.to_owned())
}

fn decode_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn matches(expected: &BTreeMap<String, Value>, actual: &BTreeMap<String, Value>) -> bool {
    expected.len() == actual.len()
        && expected.iter().all(|(k, v)| {
            actual
                .get(k)
                .is_some_and(|a| v == &Value::String("*".into()) || v == a)
        })
}

impl Harness {
    async fn new(name: &str) -> Option<Self> {
        if !testkit::require_binary("etcd") {
            return None;
        }
        let etcd = testkit::EtcdServer::start().await;
        let mut config = common::config(&etcd, 3);
        let backend = kvstore::connect(&config.etcd).await.unwrap();
        config.session_grace = Duration::from_secs(2);
        config.identity_grace = Duration::from_secs(2);
        config.drain_timeout = Duration::from_secs(5);
        Some(Self {
            name: name.to_owned(),
            etcd,
            backend,
            config,
            running: None,
            sessions: HashMap::new(),
        })
    }

    fn client(&self) -> RegistryClient<Channel> {
        self.running
            .as_ref()
            .expect("apiserver not started")
            .client
            .clone()
    }

    async fn start(&mut self) {
        let stores = SyncStoreConfig {
            lease_ttl: Duration::from_secs(60),
            ..SyncStoreConfig::default()
        };
        let served = Served::start(self.config.clone(), stores).await;
        let probe = served.client.clone();
        testkit::wait_until(DEADLINE, "apiserver to report synced", || {
            let mut c = probe.clone();
            async move {
                c.status(pb::StatusRequest {})
                    .await
                    .is_ok_and(|s| s.into_inner().synced)
            }
        })
        .await;
        self.running = Some(served);
    }

    async fn stop(&mut self) {
        self.sessions.clear();
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }

    async fn state(&self) -> BTreeMap<String, Value> {
        self.state_under("cilium/").await
    }

    async fn state_under(&self, prefix: &str) -> BTreeMap<String, Value> {
        let listing = self.backend.list(prefix).await.unwrap();
        listing
            .kvs
            .into_iter()
            .filter(|kv| kv.key != api::keys::HEARTBEAT_KEY)
            .map(|kv| (kv.key, decode_value(&kv.value)))
            .collect()
    }

    async fn revision(&self) -> i64 {
        // A put to a throwaway key would move the revision; read it instead.
        self.backend.list("mesh-test/none").await.unwrap().revision
    }

    /// The id of session `s`; a name never opened is sent as a raw id.
    fn session_id(&self, s: &str) -> String {
        self.sessions
            .get(s)
            .map_or_else(|| s.to_owned(), |(id, _)| id.clone())
    }

    async fn expect(&self, prefix: &str, section: &str, text: &str) {
        let expected: BTreeMap<String, Value> = serde_json::from_str(text).unwrap_or_else(|e| {
            panic!("{}: section {section} is not a JSON object: {e}", self.name)
        });
        let what = format!(
            "{}: etcd to hold exactly section {section} under {prefix}",
            self.name
        );
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let actual = self.state_under(prefix).await;
            if matches(&expected, &actual) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}\nexpected: {}\nactual:   {}",
                    serde_json::to_string_pretty(&expected).unwrap(),
                    serde_json::to_string_pretty(&actual).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn hold(&self, duration: Duration, section: &str, text: &str) {
        let expected: BTreeMap<String, Value> = serde_json::from_str(text).unwrap();
        let until = tokio::time::Instant::now() + duration;
        while tokio::time::Instant::now() < until {
            let actual = self.state().await;
            assert!(
                matches(&expected, &actual),
                "{}: section {section} stopped holding\nexpected: {}\nactual:   {}",
                self.name,
                serde_json::to_string_pretty(&expected).unwrap(),
                serde_json::to_string_pretty(&actual).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Restarts the apiserver while watching cilium/: no delete, no rewrite
    /// of any cilium/state/ key.
    async fn restart(&mut self) {
        let from = self.revision().await + 1;
        let mut watch = self.backend.watch("cilium/", from).await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let watcher = tokio::spawn(async move {
            while let Some(event) = watch.next().await {
                match event {
                    Ok(batch) => sink.lock().unwrap().extend(batch),
                    Err(_) => break,
                }
            }
        });
        self.stop().await;
        self.start().await;
        // Let the new apiserver settle: its stores adopt, its canaries land.
        tokio::time::sleep(Duration::from_millis(500)).await;
        watcher.abort();
        let events = seen.lock().unwrap().clone();
        for event in &events {
            match event {
                kvstore::WatchEvent::Delete { key, .. } => {
                    panic!("{}: {key} was deleted during the restart", self.name)
                }
                kvstore::WatchEvent::Put(kv) if kv.key.starts_with("cilium/state/") => {
                    panic!("{}: {} was rewritten during the restart", self.name, kv.key)
                }
                kvstore::WatchEvent::Put(_) => {}
            }
        }
    }

    async fn step(&mut self, line: &str, sections: &BTreeMap<String, String>) {
        let (request, outcome) = match line.split_once(" =>") {
            Some((req, rest)) => (req.trim(), Some(rest)),
            None => (line, None),
        };
        let (verb, rest) = request.split_once(' ').unwrap_or((request, ""));
        let before = self.revision().await;
        let mut c = self.running.as_ref().map(|r| r.client.clone());
        let result: Result<(), tonic::Status> = match verb {
            "config" => {
                for kv in rest.split_whitespace() {
                    let (k, v) = kv.split_once('=').expect("config k=v");
                    let d = clustermesh_apiserver::config::parse_duration(v).unwrap();
                    match k {
                        "session-grace" => self.config.session_grace = d,
                        "identity-grace" => self.config.identity_grace = d,
                        other => panic!("{}: unknown config {other}", self.name),
                    }
                }
                Ok(())
            }
            "start" => {
                self.start().await;
                Ok(())
            }
            "restart" => {
                self.restart().await;
                Ok(())
            }
            "open" => {
                let (s, node) = rest.split_once(' ').expect("open S NODE");
                let mut client = self.client();
                mesh_proto::open_session(&mut client, node)
                    .await
                    .map(|(opened, stream)| {
                        self.sessions
                            .insert(s.to_owned(), (opened.session_id, stream));
                    })
            }
            "close" => {
                self.sessions.remove(rest);
                Ok(())
            }
            "node" => {
                let (s, json) = rest.split_once(' ').unwrap();
                let v: Value = serde_json::from_str(json).unwrap();
                c.as_mut()
                    .unwrap()
                    .register_node(pb::RegisterNodeRequest {
                        session_id: self.session_id(s),
                        node: Some(pb_node(&v)),
                    })
                    .await
                    .map(|_| ())
            }
            "endpoint" => {
                let (s, json) = rest.split_once(' ').unwrap();
                let v: Value = serde_json::from_str(json).unwrap();
                c.as_mut()
                    .unwrap()
                    .upsert_endpoint(pb::UpsertEndpointRequest {
                        session_id: self.session_id(s),
                        endpoint: Some(pb_endpoint(&v)),
                    })
                    .await
                    .map(|_| ())
            }
            "delete-endpoint" => {
                let (s, key) = rest.split_once(' ').unwrap();
                let (namespace, name) = split_ns(key);
                c.as_mut()
                    .unwrap()
                    .delete_endpoint(pb::DeleteEndpointRequest {
                        session_id: self.session_id(s),
                        namespace,
                        name,
                    })
                    .await
                    .map(|_| ())
            }
            "service" => {
                let v: Value = serde_json::from_str(rest).unwrap();
                c.as_mut()
                    .unwrap()
                    .upsert_service(pb::UpsertServiceRequest {
                        service: Some(pb_service(&v)),
                    })
                    .await
                    .map(|_| ())
            }
            "delete-service" => {
                let (namespace, name) = split_ns(rest);
                c.as_mut()
                    .unwrap()
                    .delete_service(pb::DeleteServiceRequest { namespace, name })
                    .await
                    .map(|_| ())
            }
            "expect" => {
                let text = sections
                    .get(rest)
                    .unwrap_or_else(|| panic!("{}: no section {rest}", self.name));
                self.expect("cilium/", rest, text).await;
                Ok(())
            }
            "expect-keys" => {
                let (prefix, section) = rest.split_once(' ').expect("expect-keys PREFIX SECTION");
                let text = sections
                    .get(section)
                    .unwrap_or_else(|| panic!("{}: no section {section}", self.name));
                self.expect(prefix, section, text).await;
                Ok(())
            }
            "count" => {
                let (prefix, n) = rest.split_once(' ').expect("count PREFIX N");
                let n: usize = n.parse().expect("count PREFIX N");
                let what = format!("{}: exactly {n} keys under {prefix}", self.name);
                let backend = self.backend.clone();
                testkit::wait_until(DEADLINE, &what, || {
                    let backend = backend.clone();
                    async move { backend.list(prefix).await.unwrap().kvs.len() == n }
                })
                .await;
                Ok(())
            }
            "seed" => {
                let (key, value) = rest.split_once(' ').expect("seed KEY VALUE");
                self.backend.put(key, value.as_bytes(), None).await.unwrap();
                Ok(())
            }
            "hold" => {
                let (d, section) = rest.split_once(' ').unwrap();
                let d = clustermesh_apiserver::config::parse_duration(d).unwrap();
                self.hold(d, section, &sections[section]).await;
                Ok(())
            }
            other => panic!("{}: unknown step {other}", self.name),
        };
        match (outcome, result) {
            (None, Ok(())) => {}
            (None, Err(e)) => panic!("{}: step `{line}` failed: {e}", self.name),
            (Some(_), Ok(())) => {
                panic!("{}: step `{line}` succeeded, expected an error", self.name)
            }
            (Some(outcome), Err(status)) => {
                let may_write = outcome.starts_with('+');
                let outcome = outcome.trim_start_matches('+').trim();
                let (code, text) = outcome.split_once(' ').unwrap_or((outcome, ""));
                assert_eq!(
                    format!("{:?}", status.code()),
                    code,
                    "{}: step `{line}`: {}",
                    self.name,
                    status.message()
                );
                assert!(
                    status.message().contains(text),
                    "{}: step `{line}`: message {:?} lacks {text:?}",
                    self.name,
                    status.message()
                );
                if !may_write {
                    assert_eq!(
                        self.revision().await,
                        before,
                        "{}: step `{line}` was refused but wrote to etcd",
                        self.name
                    );
                }
            }
        }
    }
}

async fn run_scenario(file: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let (_, sections) = parse_txtar(&text);
    let Some(mut h) = Harness::new(file).await else {
        return;
    };
    let script = sections
        .get("script")
        .unwrap_or_else(|| panic!("{file}: no script section"))
        .clone();
    for line in script.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        h.step(line, &sections).await;
    }
    h.stop().await;
    drop(h.etcd);
}

macro_rules! scenarios {
    ($($name:ident => $file:literal,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run_scenario($file).await;
            }
        )*
    };
}

scenarios! {
    nodes => "nodes.txtar",
    endpoints => "endpoints.txtar",
    identities => "identities.txtar",
    identity_orphans => "identity-orphans.txtar",
    services => "services.txtar",
    ip_conflict => "ip-conflict.txtar",
    session_grace => "session-grace.txtar",
    restart => "restart.txtar",
    invalid_requests => "invalid.txtar",
}
