//! A Kubernetes API server for tests: plain HTTP on 127.0.0.1, the real wire protocol
//! (discovery, list with resourceVersion and `limit`/`continue` pages, newline-delimited
//! watch streams, bookmarks, label and field selectors, 410 Gone, metadata-only answers)
//! over objects the test
//! applies and deletes, and stop/start on the same port to play an outage.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Watch events kept for resuming watches; older resource versions get 410 Gone.
const HISTORY: usize = 10_000;
/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);
const METADATA_ACCEPT: &str = "as=PartialObjectMetadata";

/// The resource kinds the server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Pod,
}

impl Kind {
    fn from_kind(kind: &str) -> Option<Kind> {
        Some(match kind {
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "Node" => Kind::Node,
            "Pod" => Kind::Pod,
            _ => return None,
        })
    }

    fn from_plural(plural: &str) -> Option<Kind> {
        Some(match plural {
            "services" => Kind::Service,
            "endpointslices" => Kind::EndpointSlice,
            "nodes" => Kind::Node,
            "pods" => Kind::Pod,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

type ObjectKey = (Kind, String, String);

/// One change, as watches see it: the object before and after (`None`: absent).
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    before: Option<Value>,
    after: Option<Value>,
}

/// What live watches are told.
#[derive(Clone, Debug)]
enum Signal {
    Change(Arc<Change>),
    /// Every open watch ends with an ERROR event of code 410.
    Expire,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<ObjectKey, Value>,
    /// Whole objects as a list sends them, encoded once (the API server's watch cache
    /// does the same): a list of 250 000 endpoints costs copies, not serialisation.
    encoded: HashMap<ObjectKey, Bytes>,
    history: VecDeque<Arc<Change>>,
    /// Watches from a resource version below this one get 410 Gone.
    oldest: u64,
    /// Every request, as `METHOD path?query` (for assertions on selectors used).
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    signals: broadcast::Sender<Signal>,
    /// While true, list requests wait (the API server is up but slow to list).
    hold_lists: watch::Sender<bool>,
    /// While true, every request is dropped with its connection, unanswered.
    failing: std::sync::atomic::AtomicBool,
    /// The requests dropped so far: when, and the path.
    dropped: Mutex<Vec<(std::time::Instant, String)>>,
}

/// A fake API server; see the module doc.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop, which owns the open connections.
    running: Mutex<Option<JoinHandle<()>>>,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 (port from the OS) with no objects.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener)
    }

    /// Starts a server on a listener of the caller's (one bound in a network namespace,
    /// say); `restart` cannot bind its address again from here.
    pub fn start_on_std(listener: std::net::TcpListener) -> FakeApiServer {
        listener.set_nonblocking(true).expect("non-blocking");
        Self::start_on(TcpListener::from_std(listener).expect("a tokio listener"))
    }

    fn start_on(listener: TcpListener) -> FakeApiServer {
        let addr = listener.local_addr().expect("local addr");
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr)).expect("write kubeconfig");
        let server = FakeApiServer {
            addr,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rv: 100,
                    ..State::default()
                }),
                signals: broadcast::channel(4096).0,
                hold_lists: watch::channel(false).0,
                failing: false.into(),
                dropped: Mutex::default(),
            }),
            running: Mutex::new(None),
            _dir: dir,
            kubeconfig,
        };
        server.serve(listener);
        server
    }

    /// A kubeconfig file pointing at this server, as kubectl would read it.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            // Connections live in this task's JoinSet: aborting the task drops them
            // all at once, as a dying API server would.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            conns.spawn(serve_connection(shared.clone(), stream));
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        *self.running.lock().unwrap() = Some(task);
    }

    /// Stops listening and drops every connection (watches end abruptly).
    pub async fn stop(&self) {
        let task = self.running.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind");
        self.serve(listener);
    }

    /// Makes list requests wait until `release_lists`.
    pub fn hold_lists(&self) {
        self.shared.hold_lists.send_replace(true);
    }

    pub fn release_lists(&self) {
        self.shared.hold_lists.send_replace(false);
    }

    /// Creates or replaces an object (its `kind` field says which), as `kubectl apply`.
    pub fn apply(&self, object: Value) {
        self.change(object, true);
    }

    /// Changes an object without any watch hearing of it: an event lost in a broken
    /// watch. Only a relist (after `expire_watches`) reveals it.
    pub fn apply_quietly(&self, object: Value) {
        self.change(object, false);
    }

    fn change(&self, mut object: Value, tell: bool) {
        let kind = Kind::from_kind(object["kind"].as_str().expect("object kind"))
            .expect("a kind the fake server knows");
        let mut state = self.shared.state.lock().unwrap();
        state.rv += 1;
        let rv = state.rv;
        let meta = &mut object["metadata"];
        if kind.namespaced() && meta["namespace"].is_null() {
            meta["namespace"] = json!("default");
        }
        meta["resourceVersion"] = json!(rv.to_string());
        let key = object_key(kind, &object);
        state.encoded.remove(&key);
        let before = state.objects.insert(key, object.clone());
        if tell {
            record(&mut state, &self.shared.signals, kind, before, Some(object));
        }
    }

    /// Deletes an object; true if it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.remove(kind, namespace, name, true)
    }

    /// Deletes an object without any watch hearing of it (see `apply_quietly`).
    pub fn delete_quietly(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.remove(kind, namespace, name, false)
    }

    fn remove(&self, kind: Kind, namespace: &str, name: &str, tell: bool) -> bool {
        let ns = if kind.namespaced() { namespace } else { "" };
        let key = (kind, ns.to_string(), name.to_string());
        let mut state = self.shared.state.lock().unwrap();
        state.encoded.remove(&key);
        let Some(mut gone) = state.objects.remove(&key) else {
            return false;
        };
        state.rv += 1;
        gone["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        if tell {
            record(&mut state, &self.shared.signals, kind, Some(gone), None);
        }
        true
    }

    /// Forgets the event history and ends every open watch with 410 Gone: watchers
    /// must list again, as after an etcd compaction.
    pub fn expire_watches(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.history.clear();
        state.oldest = state.rv + 1;
        let _ = self.shared.signals.send(Signal::Expire);
    }

    /// From now on, drops every request with its connection, unanswered: an API server
    /// that is there but cannot serve (a client sees the connection close).
    pub fn fail_requests(&self, failing: bool) {
        self.shared
            .failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    /// The requests dropped so far, with when they came, oldest first.
    pub fn dropped_requests(&self) -> Vec<(std::time::Instant, String)> {
        self.shared.dropped.lock().unwrap().clone()
    }

    /// Every request so far, as `GET path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().requests.clone()
    }

    /// How many watches are open right now, of every kind.
    pub fn open_watches(&self) -> usize {
        self.shared.signals.receiver_count()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.running.lock().unwrap().take() {
            task.abort();
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: tokio::net::TcpStream) {
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move {
            if shared.failing.load(std::sync::atomic::Ordering::SeqCst) {
                let path = req.uri().path().to_string();
                shared
                    .dropped
                    .lock()
                    .unwrap()
                    .push((std::time::Instant::now(), path));
                // A service error makes hyper close the connection without an answer.
                return Err(std::io::Error::other("failing on purpose"));
            }
            Ok(handle(shared, req).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: tester\n  user: {{}}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n\
         current-context: fake\n"
    )
}

fn object_key(kind: Kind, object: &Value) -> ObjectKey {
    let meta = &object["metadata"];
    let ns = if kind.namespaced() {
        meta["namespace"].as_str().unwrap_or("default").to_string()
    } else {
        String::new()
    };
    let name = meta["name"].as_str().expect("metadata.name").to_string();
    (kind, ns, name)
}

fn record(
    state: &mut State,
    signals: &broadcast::Sender<Signal>,
    kind: Kind,
    before: Option<Value>,
    after: Option<Value>,
) {
    let change = Arc::new(Change {
        rv: state.rv,
        kind,
        before,
        after,
    });
    state.history.push_back(change.clone());
    if state.history.len() > HISTORY {
        let dropped = state.history.pop_front().expect("not empty");
        state.oldest = dropped.rv + 1;
    }
    let _ = signals.send(Signal::Change(change));
}

// ---- requests ----

/// What a request asks for, from its path and query.
struct Query {
    kind: Kind,
    namespace: Option<String>,
    watch: bool,
    resource_version: Option<String>,
    labels: Option<String>,
    fields: Option<String>,
    bookmarks: bool,
    timeout: Option<Duration>,
    metadata_only: bool,
    /// `limit`: at most this many items in one page.
    limit: Option<usize>,
    /// `continue`: the token of the page before, `namespace/name` of its last item.
    continue_after: Option<String>,
}

async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query_text = req.uri().query().unwrap_or("").to_string();
    shared
        .state
        .lock()
        .unwrap()
        .requests
        .push(format!("{} {path}?{query_text}", req.method()));
    if let Some(doc) = discovery_doc(&path) {
        return json_response(StatusCode::OK, &doc);
    }
    let Some((kind, namespace)) = resource_path(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route {path}"),
        );
    };
    let params: BTreeMap<String, String> = form_urlencoded::parse(query_text.as_bytes())
        .into_owned()
        .collect();
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let query = Query {
        kind,
        namespace,
        watch: params.get("watch").map(String::as_str) == Some("true"),
        resource_version: params.get("resourceVersion").cloned(),
        labels: params.get("labelSelector").cloned(),
        fields: params.get("fieldSelector").cloned(),
        bookmarks: params.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
        timeout: params
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs),
        metadata_only: accept.contains(METADATA_ACCEPT),
        limit: params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|&l| l > 0),
        continue_after: params.get("continue").cloned(),
    };
    if query.watch {
        watch_response(shared, query)
    } else {
        list_response(shared, query).await
    }
}

/// `/api/v1/services`, `/api/v1/namespaces/NS/pods`, `/apis/discovery.k8s.io/v1/...`.
fn resource_path(path: &str) -> Option<(Kind, Option<String>)> {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/apis/discovery.k8s.io/v1/"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (kind, ns) = match parts.as_slice() {
        [plural] => (Kind::from_plural(plural)?, None),
        ["namespaces", ns, plural] => (Kind::from_plural(plural)?, Some(ns.to_string())),
        _ => return None,
    };
    let right_group = path.starts_with("/apis/") == (kind == Kind::EndpointSlice);
    right_group.then_some((kind, ns))
}

fn discovery_doc(path: &str) -> Option<Value> {
    let resource = |kind: Kind| {
        json!({"name": kind.plural(), "singularName": kind.name().to_lowercase(),
               "namespaced": kind.namespaced(), "kind": kind.name(),
               "verbs": ["get", "list", "watch"]})
    };
    Some(match path {
        "/version" => json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"}),
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
            "name": "discovery.k8s.io",
            "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}}]}),
        "/api/v1" => json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
            "resources": [resource(Kind::Service), resource(Kind::Node), resource(Kind::Pod)]}),
        "/apis/discovery.k8s.io/v1" => json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": "discovery.k8s.io/v1", "resources": [resource(Kind::EndpointSlice)]}),
        _ => return None,
    })
}

async fn list_response(shared: Arc<Shared>, query: Query) -> Response<Body> {
    let mut held = shared.hold_lists.subscribe();
    let _ = held.wait_for(|hold| !hold).await;
    let mut state = shared.state.lock().unwrap();
    if let Some(rv) = too_old(&state, query.resource_version.as_deref()) {
        return gone(rv, state.oldest);
    }
    let state = &mut *state;
    // A page starts after the key the last one ended on.
    let from = match query.continue_after.as_deref().map(|t| t.split_once('/')) {
        Some(Some((ns, name))) => {
            std::ops::Bound::Excluded((query.kind, ns.to_string(), name.to_string()))
        }
        Some(None) => return status(StatusCode::BAD_REQUEST, "BadRequest", "bad continue"),
        None => std::ops::Bound::Included((query.kind, String::new(), String::new())),
    };
    let mut selected = state
        .objects
        .range((from, std::ops::Bound::Unbounded))
        .take_while(|((kind, _, _), _)| *kind == query.kind)
        .filter(|(_, object)| matches(&query, object));
    let mut items: Vec<Bytes> = Vec::new();
    let mut last = None;
    for (key, object) in selected.by_ref().take(query.limit.unwrap_or(usize::MAX)) {
        let encoded = if query.metadata_only {
            Bytes::from(serde_json::to_vec(&shape(&query, object)).expect("json"))
        } else {
            state
                .encoded
                .entry(key.clone())
                .or_insert_with(|| {
                    Bytes::from(serde_json::to_vec(&shape(&query, object)).expect("json"))
                })
                .clone()
        };
        items.push(encoded);
        last = Some(key);
    }
    let more = selected.next().is_some();
    let kind = if query.metadata_only {
        "PartialObjectMetadataList".to_string()
    } else {
        format!("{}List", query.kind.name())
    };
    let api_version = if query.metadata_only {
        "meta.k8s.io/v1"
    } else {
        query.kind.api_version()
    };
    let mut metadata = json!({"resourceVersion": state.rv.to_string()});
    if let (true, Some((_, ns, name))) = (more, last) {
        metadata["continue"] = json!(format!("{ns}/{name}"));
    }
    // The list's envelope around the encoded items, spliced in at the placeholder.
    let envelope = serde_json::to_string(
        &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": []}),
    )
    .expect("json");
    let at = envelope.find(r#""items":[]"#).expect("the items field") + r#""items":["#.len();
    let (head, tail) = envelope.split_at(at);
    let mut body = Vec::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 256);
    body.extend_from_slice(head.as_bytes());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(tail.as_bytes());
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .expect("response")
}

/// The requested resource version, when the history no longer reaches back to it.
fn too_old(state: &State, rv: Option<&str>) -> Option<u64> {
    let rv: u64 = rv?.parse().ok()?;
    (rv != 0 && rv + 1 < state.oldest).then_some(rv)
}

fn gone(rv: u64, oldest: u64) -> Response<Body> {
    status(
        StatusCode::GONE,
        "Expired",
        &format!("too old resource version: {rv} ({oldest})"),
    )
}

fn gone_event(message: &str) -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": "Expired", "code": 410}})
}

fn watch_response(shared: Arc<Shared>, query: Query) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let send = |value: Value| {
            let tx = tx.clone();
            async move {
                let mut line = serde_json::to_vec(&value).expect("json");
                line.push(b'\n');
                tx.send(Bytes::from(line)).await.is_ok()
            }
        };
        // Subscribe under the lock, so that no change falls between history and live.
        let start = (|| {
            let state = shared.state.lock().unwrap();
            if let Some(rv) = too_old(&state, query.resource_version.as_deref()) {
                return Err(rv);
            }
            let from: u64 = query
                .resource_version
                .as_deref()
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(0);
            let signals = shared.signals.subscribe();
            let backlog: Vec<Arc<Change>> = if from == 0 {
                // "0" or none: the current objects as ADDED, then changes.
                state
                    .objects
                    .iter()
                    .filter(|((k, _, _), _)| *k == query.kind)
                    .map(|((k, _, _), o)| {
                        Arc::new(Change {
                            rv: state.rv,
                            kind: *k,
                            before: None,
                            after: Some(o.clone()),
                        })
                    })
                    .collect()
            } else {
                state
                    .history
                    .iter()
                    .filter(|c| c.rv > from && c.kind == query.kind)
                    .cloned()
                    .collect()
            };
            Ok((signals, backlog, state.rv.max(from)))
        })();
        let (mut signals, backlog, mut last) = match start {
            Ok(start) => start,
            Err(rv) => {
                let _ = send(gone_event(&format!("too old resource version: {rv}"))).await;
                return;
            }
        };
        for change in backlog {
            if let Some(event) = event_for(&query, &change) {
                if !send(event).await {
                    return;
                }
            }
        }
        let end = query.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut bookmark = tokio::time::interval(BOOKMARK_EVERY);
        bookmark.tick().await;
        loop {
            let ended = async {
                match end {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = ended => return,
                _ = bookmark.tick(), if query.bookmarks => {
                    let rv = shared.state.lock().unwrap().rv.max(last);
                    let kind = if query.metadata_only { "PartialObjectMetadata" } else { query.kind.name() };
                    let event = json!({"type": "BOOKMARK", "object": {"kind": kind,
                        "apiVersion": query.kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if !send(event).await { return; }
                }
                signal = signals.recv() => match signal {
                    Ok(Signal::Change(change)) => {
                        if change.rv <= last || change.kind != query.kind {
                            continue;
                        }
                        last = change.rv;
                        if let Some(event) = event_for(&query, &change) {
                            if !send(event).await { return; }
                        }
                    }
                    Ok(Signal::Expire) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = send(gone_event("watch expired: too old resource version")).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("response")
}

/// The watch event a change makes for this watch: an object entering the selection is
/// ADDED, leaving it DELETED, as the API server does.
fn event_for(query: &Query, change: &Change) -> Option<Value> {
    let was = change.before.as_ref().filter(|o| matches(query, o));
    let is = change.after.as_ref().filter(|o| matches(query, o));
    let (kind, object) = match (was, is) {
        (None, Some(o)) => ("ADDED", o.clone()),
        (Some(_), Some(o)) => ("MODIFIED", o.clone()),
        (Some(_), None) => {
            let mut o = change.after.clone().or(change.before.clone())?;
            o["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", o)
        }
        (None, None) => return None,
    };
    Some(json!({"type": kind, "object": shape(query, &object)}))
}

/// The object as asked for: whole, or its metadata only (PartialObjectMetadata).
fn shape(query: &Query, object: &Value) -> Value {
    if query.metadata_only {
        json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
               "metadata": object["metadata"].clone()})
    } else {
        let mut o = object.clone();
        o["apiVersion"] = json!(query.kind.api_version());
        o
    }
}

fn matches(query: &Query, object: &Value) -> bool {
    let meta = &object["metadata"];
    if let Some(ns) = &query.namespace {
        if meta["namespace"].as_str() != Some(ns) {
            return false;
        }
    }
    let labels: BTreeMap<String, String> =
        serde_json::from_value(meta["labels"].clone()).unwrap_or_default();
    let label_ok = query
        .labels
        .as_deref()
        .is_none_or(|s| label_selector_matches(s, &labels));
    let field_ok = query.fields.as_deref().is_none_or(|s| {
        split_selector(s).iter().all(|req| {
            let (key, want, equal) = match req.split_once("!=") {
                Some((k, v)) => (k, v, false),
                None => match req.split_once("==").or_else(|| req.split_once('=')) {
                    Some((k, v)) => (k, v, true),
                    None => return false,
                },
            };
            let have = match key.trim() {
                "metadata.name" => meta["name"].as_str(),
                "metadata.namespace" => meta["namespace"].as_str(),
                _ => None,
            };
            (have == Some(want.trim())) == equal
        })
    });
    label_ok && field_ok
}

/// Splits a selector at the commas that are not inside `in (...)` lists.
fn split_selector(selector: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in selector.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Label selectors: `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`.
pub fn label_selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    split_selector(selector).iter().all(|req| {
        if let Some(key) = req.strip_prefix('!') {
            return !labels.contains_key(key.trim());
        }
        let set = |list: &str| -> Vec<String> {
            list.trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split(',')
                .map(|v| v.trim().to_string())
                .collect()
        };
        if let Some((key, list)) = req.split_once(" notin ") {
            return labels
                .get(key.trim())
                .is_none_or(|v| !set(list).contains(v));
        }
        if let Some((key, list)) = req.split_once(" in ") {
            return labels
                .get(key.trim())
                .is_some_and(|v| set(list).contains(v));
        }
        if let Some((key, value)) = req.split_once("!=") {
            return labels.get(key.trim()).map(String::as_str) != Some(value.trim());
        }
        if let Some((key, value)) = req.split_once("==").or_else(|| req.split_once('=')) {
            return labels.get(key.trim()).map(String::as_str) == Some(value.trim());
        }
        labels.contains_key(req.as_str())
    })
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).expect("json"))).boxed_unsync())
        .expect("response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}
