//! An in-test Kubernetes API server: enough of the list/watch protocol, as
//! the real API server speaks it, to drive kube-rs watchers and clients.
//!
//! No Kubernetes API server can be installed on the project's machines, so
//! code that talks to Kubernetes is tested against this one. It speaks
//! plain HTTP/1.1 on a loopback port and holds objects as JSON:
//!
//! * `GET` on a collection lists (`{"kind":"…List","metadata":
//!   {"resourceVersion":…},"items":[…]}`); with `watch=true` and a
//!   `resourceVersion` it streams, chunked, one JSON event per line
//!   (`ADDED`, `MODIFIED`, `DELETED`, and `BOOKMARK` when asked for with
//!   `allowWatchBookmarks`) from that version on;
//! * a watch from a version older than the history it keeps is answered
//!   with an `ERROR` event carrying a `410 Gone` Status, as etcd compaction
//!   makes the real server do ([`FakeApiServer::expire_history`]);
//! * `GET`, `POST`, `PUT` (refused with `409 Conflict` when the body's
//!   `metadata.resourceVersion` is not the stored one), `PATCH` (JSON merge
//!   patch) and `DELETE` on objects, `404` with a Status body for what does
//!   not exist;
//! * [`FakeApiServer::drop_watches`] ends every open watch stream, as a
//!   dropped connection or an API server restart does.
//!
//! Resources: core `v1` nodes, namespaces, pods, services;
//! `discovery.k8s.io/v1` endpointslices; `coordination.k8s.io/v1` leases.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, service::service_fn, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, watch},
};
use tokio_stream::StreamExt as _;

/// A resource type: where it lives in the API and how its lists are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Resource {
    /// `v1` or `group/version`.
    api_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const RESOURCES: &[Resource] = &[
    Resource {
        api_version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
    },
    Resource {
        api_version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    Resource {
        api_version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    Resource {
        api_version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    Resource {
        api_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Resource {
        api_version: "coordination.k8s.io/v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
    },
];

fn resource_of_kind(kind: &str) -> Resource {
    *RESOURCES
        .iter()
        .find(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve kind {kind:?}"))
}

/// `(resource, namespace, name)`; the namespace is empty for cluster-scoped.
type ObjectId = (Resource, String, String);

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
struct Change {
    resource_version: u64,
    resource: Resource,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    objects: BTreeMap<ObjectId, Value>,
    resource_version: u64,
    /// Every change after `oldest`; a watch from before it gets `410 Gone`.
    history: Vec<Change>,
    oldest: u64,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    generation: watch::Sender<u64>,
    requests: Mutex<Vec<String>>,
}

/// The server; dropped, it stops.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self._task.abort();
    }
}

fn name_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let namespace = meta["namespace"].as_str().unwrap_or_default().to_owned();
    let name = meta["name"]
        .as_str()
        .expect("an object needs metadata.name")
        .to_owned();
    (namespace, name)
}

impl FakeApiServer {
    /// Starts the server on a free loopback port. Must run inside a tokio
    /// runtime.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the fake API server");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes: broadcast::channel(4096).0,
            generation: watch::channel(0).0,
            requests: Mutex::new(Vec::new()),
        });
        let serving = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = Arc::clone(&serving);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            shared,
            _task: task,
        }
    }

    /// The server's URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server to `path`.
    ///
    /// # Panics
    ///
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).expect("write the kubeconfig");
    }

    /// Creates or replaces an object (its `kind` says which resource);
    /// returns its new resourceVersion.
    ///
    /// # Panics
    ///
    /// When the object has no `kind` or `metadata.name`, or a kind this
    /// server does not serve.
    pub fn apply(&self, mut object: Value) -> u64 {
        let resource = resource_of_kind(object["kind"].as_str().expect("an object needs a kind"));
        let (namespace, name) = name_of(&object);
        let mut store = self.shared.store.lock().unwrap();
        let id = (resource, namespace, name);
        let kind = if store.objects.contains_key(&id) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        object["apiVersion"] = json!(resource.api_version);
        commit(&self.shared, &mut store, id, kind, object);
        store.resource_version
    }

    /// Deletes an object; `false` when it did not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let resource = resource_of_kind(kind);
        let mut store = self.shared.store.lock().unwrap();
        let id = (resource, namespace.to_owned(), name.to_owned());
        let Some(object) = store.objects.get(&id).cloned() else {
            return false;
        };
        commit(&self.shared, &mut store, id, "DELETED", object);
        true
    }

    /// An object as stored.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let id = (
            resource_of_kind(kind),
            namespace.to_owned(),
            name.to_owned(),
        );
        self.shared.store.lock().unwrap().objects.get(&id).cloned()
    }

    /// Forgets the history of changes (as etcd compaction does): every
    /// watch resuming from an older version gets `410 Gone` and must list
    /// again. Open watches are ended.
    pub fn expire_history(&self) {
        {
            let mut store = self.shared.store.lock().unwrap();
            store.history.clear();
            // Past the newest version: a resume from exactly that one would
            // still be served, and every watcher must relist.
            store.resource_version += 1;
            store.oldest = store.resource_version;
        }
        self.drop_watches();
    }

    /// Ends every open watch stream, as a dropped connection does.
    pub fn drop_watches(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// The requests served so far (`METHOD path?query`), oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().resource_version
    }
}

/// One change of `id`: a new resourceVersion stamped on `object`, which is
/// stored (or, for `DELETED`, no longer is), kept in the history and sent to
/// the open watches. Returns the object as stamped.
fn commit(
    shared: &Shared,
    store: &mut Store,
    id: ObjectId,
    kind: &'static str,
    mut object: Value,
) -> Value {
    store.resource_version += 1;
    object["metadata"]["resourceVersion"] = json!(store.resource_version.to_string());
    let (resource, namespace, _) = id.clone();
    if kind == "DELETED" {
        store.objects.remove(&id);
    } else {
        store.objects.insert(id, object.clone());
    }
    let change = Change {
        resource_version: store.resource_version,
        resource,
        namespace,
        kind,
        object: object.clone(),
    };
    store.history.push(change.clone());
    let _ = shared.changes.send(change);
    object
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// What a path names.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let find = |plural: &str| {
        RESOURCES
            .iter()
            .find(|r| r.api_version == api_version && r.plural == plural)
            .copied()
    };
    match rest {
        [plural] => Some(Target {
            resource: find(plural)?,
            namespace: None,
            name: None,
        }),
        ["namespaces", ns, plural] => Some(Target {
            resource: find(plural)?,
            namespace: Some((*ns).to_owned()),
            name: None,
        }),
        ["namespaces", ns, plural, name] => Some(Target {
            resource: find(plural)?,
            namespace: Some((*ns).to_owned()),
            name: Some((*name).to_owned()),
        }),
        [plural, name] => Some(Target {
            resource: find(plural)?,
            namespace: None,
            name: Some((*name).to_owned()),
        }),
        _ => None,
    }
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    shared.requests.lock().unwrap().push(format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str())
    ));
    let Some(target) = parse_path(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no resource at {path}"),
        );
    };
    let params = query(&req);
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    match (method, &target.name) {
        (Method::GET, None) if params.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch_stream(shared, &target, &params)
        }
        (Method::GET, None) => list(shared, &target),
        (Method::GET, Some(name)) => {
            let store = shared.store.lock().unwrap();
            let id = (
                target.resource,
                target.namespace.clone().unwrap_or_default(),
                name.clone(),
            );
            match store.objects.get(&id) {
                Some(object) => full(StatusCode::OK, object),
                None => not_found(&target, name),
            }
        }
        (Method::POST, None) => write(shared, &target, &body, true),
        (Method::PATCH, Some(name)) => patch(shared, &target, name, &body),
        (Method::PUT, Some(_)) => write(shared, &target, &body, false),
        (Method::DELETE, Some(name)) => {
            let mut store = shared.store.lock().unwrap();
            let id = (
                target.resource,
                target.namespace.clone().unwrap_or_default(),
                name.clone(),
            );
            match store.objects.get(&id).cloned() {
                None => not_found(&target, name),
                Some(object) => {
                    let object = commit(shared, &mut store, id, "DELETED", object);
                    full(StatusCode::OK, &object)
                }
            }
        }
        (method, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} {path} is not served by the fake API server"),
        ),
    }
}

fn not_found(target: &Target, name: &str) -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{} {name:?} not found", target.resource.plural),
    )
}

fn list(shared: &Shared, target: &Target) -> Response<Body> {
    let store = shared.store.lock().unwrap();
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((r, ns, _), _)| {
            *r == target.resource && target.namespace.as_ref().is_none_or(|n| n == ns)
        })
        .map(|(_, v)| v)
        .collect();
    full(
        StatusCode::OK,
        &json!({"kind": format!("{}List", target.resource.kind), "apiVersion": target.resource.api_version,
                "metadata": {"resourceVersion": store.resource_version.to_string()}, "items": items}),
    )
}

fn write(shared: &Shared, target: &Target, body: &[u8], create: bool) -> Response<Body> {
    let mut object: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value".into(),
        );
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let id = (target.resource, namespace.clone(), name.clone());
    let mut store = shared.store.lock().unwrap();
    let existing = store.objects.get(&id);
    if create && existing.is_some() {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} {name:?} already exists", target.resource.plural),
        );
    }
    if !create {
        let Some(existing) = existing else {
            return not_found(target, &name);
        };
        let sent = object["metadata"]["resourceVersion"].as_str();
        if sent.is_some_and(|v| Some(v) != existing["metadata"]["resourceVersion"].as_str()) {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified; \
                     please apply your changes to the latest version and try again",
                    target.resource.plural
                ),
            );
        }
    }
    if target.resource.namespaced {
        object["metadata"]["namespace"] = json!(namespace);
    }
    object["kind"] = json!(target.resource.kind);
    object["apiVersion"] = json!(target.resource.api_version);
    let kind = if create { "ADDED" } else { "MODIFIED" };
    let object = commit(shared, &mut store, id, kind, object);
    full(
        if create {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &object,
    )
}

/// RFC 7386 JSON merge patch (`application/merge-patch+json`): objects
/// merge key by key, `null` deletes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn patch(shared: &Shared, target: &Target, name: &str, body: &[u8]) -> Response<Body> {
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let id = (target.resource, namespace.clone(), name.to_owned());
    let mut store = shared.store.lock().unwrap();
    let Some(mut object) = store.objects.get(&id).cloned() else {
        return not_found(target, name);
    };
    merge(&mut object, &patch);
    let object = commit(shared, &mut store, id, "MODIFIED", object);
    full(StatusCode::OK, &object)
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_stream(
    shared: &Arc<Shared>,
    target: &Target,
    params: &BTreeMap<String, String>,
) -> Response<Body> {
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let matches = {
        let resource = target.resource;
        let namespace = target.namespace.clone();
        move |c: &Change| {
            c.resource == resource && namespace.as_ref().is_none_or(|n| *n == c.namespace)
        }
    };
    // Subscribe before reading the history, so nothing falls between.
    let mut changes = shared.changes.subscribe();
    let mut generation = shared.generation.subscribe();
    let (backlog, newest) = {
        let store = shared.store.lock().unwrap();
        if from != 0 && from < store.oldest {
            let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({})", store.oldest),
                "reason": "Expired", "code": 410});
            let _ = tx.try_send(event_line("ERROR", &gone));
            (Vec::new(), None)
        } else {
            let backlog: Vec<Bytes> = store
                .history
                .iter()
                .filter(|c| c.resource_version > from && matches(c))
                .map(|c| event_line(c.kind, &c.object))
                .collect();
            (backlog, Some(store.resource_version))
        }
    };
    let resource = target.resource;
    if let Some(snapshot) = newest {
        let mut last = snapshot;
        tokio::spawn(async move {
            for line in backlog {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = &mut deadline => return,
                    _ = generation.changed() => return,
                    _ = tick.tick(), if bookmarks => {
                        let mark = json!({"kind": resource.kind, "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": last.to_string(),
                                         "annotations": {"k8s.io/initial-events-end": "true"}}});
                        if tx.send(event_line("BOOKMARK", &mark)).await.is_err() {
                            return;
                        }
                    }
                    change = changes.recv() => match change {
                        Ok(c) => {
                            // Already sent from the history, or not ours.
                            if c.resource_version <= snapshot || !matches(&c) {
                                continue;
                            }
                            last = c.resource_version;
                            if tx.send(event_line(c.kind, &c.object)).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    },
                }
            }
        });
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|line| Ok::<_, Infallible>(Frame::data(line)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("a valid response")
}
