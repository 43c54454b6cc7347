//! An in-process stand-in for the Kubernetes API server, plugged into
//! `kube::Client::new` as a tower service (no socket at all): it answers
//! lists and watches from seeded objects, keeps a Lease, applies status
//! patches and whole objects (ConfigMaps), accepts Events, and records every request so tests can assert
//! exactly what the controller sent.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Generous bound for anything that should happen "soon": only a hung test waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;
/// Feeds one open watch response.
type WatchSender = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// One request the controller made.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: Value,
}

impl Recorded {
    /// The query parameters, decoded.
    pub fn params(&self) -> BTreeMap<String, String> {
        url_decode_pairs(&self.query)
    }
}

#[derive(Default)]
struct State {
    /// Collection path (e.g. `/api/v1/pods`, cluster-wide) -> objects.
    collections: BTreeMap<String, Vec<Value>>,
    /// Open watch bodies per collection path.
    watchers: BTreeMap<String, Vec<WatchSender>>,
    lease: Option<Value>,
    /// Collection path -> turns true when its held lists may be answered.
    held_lists: BTreeMap<String, watch::Receiver<bool>>,
    requests: Vec<Recorded>,
    resource_version: u64,
}

/// The fake API server; clone freely.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    revision: Arc<watch::Sender<usize>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            revision: Arc::new(watch::channel(0).0),
        }
    }
}

impl FakeApi {
    /// Adds an object to the collection at `path` (cluster-wide path, e.g.
    /// `/apis/networking.serving.volcano.sh/v1alpha1/modelroutes`).
    pub fn seed(&self, path: &str, object: Value) {
        self.state
            .lock()
            .collections
            .entry(path.to_owned())
            .or_default()
            .push(object);
    }

    /// Starts with this Lease in place (another replica's, say).
    pub fn seed_lease(&self, lease: Value) {
        self.state.lock().lease = Some(lease);
    }

    /// Holds back the answers to lists (not watches) of `path` until the
    /// returned hold is released. A held request is recorded as it arrives,
    /// so [`Self::wait_for`] tells a test it is waiting.
    pub fn hold_lists(&self, path: &str) -> ListHold {
        let (release, released) = watch::channel(false);
        self.state
            .lock()
            .held_lists
            .insert(path.to_owned(), released);
        ListHold(release)
    }

    /// A `kube::Client` talking to this fake.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Sends a watch event to every open watch of `path`.
    pub async fn push_event(&self, path: &str, event_type: &str, object: Value) {
        let senders = {
            let mut state = self.state.lock();
            state.resource_version += 1;
            let collection = state.collections.entry(path.to_owned()).or_default();
            let name = object["metadata"]["name"].clone();
            collection.retain(|existing| existing["metadata"]["name"] != name);
            if event_type != "DELETED" {
                collection.push(object.clone());
            }
            state.watchers.get(path).cloned().unwrap_or_default()
        };
        let line = format!("{}\n", json!({"type": event_type, "object": object}));
        for sender in senders {
            let _ = sender
                .send(Ok(Frame::data(Bytes::from(line.clone()))))
                .await;
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().requests.clone()
    }

    /// Waits for a request matching `wanted` (already made or future) and returns it.
    pub async fn wait_for(
        &self,
        what: &str,
        mut wanted: impl FnMut(&Recorded) -> bool,
    ) -> Recorded {
        let mut revision = self.revision.subscribe();
        let wait = async {
            loop {
                revision.borrow_and_update();
                if let Some(found) = self.requests().into_iter().find(|request| wanted(request)) {
                    return found;
                }
                if revision.changed().await.is_err() {
                    panic!("fake API dropped");
                }
            }
        };
        match tokio::time::timeout(DEADLINE, wait).await {
            Ok(found) => found,
            Err(_) => panic!(
                "no request for {what} within {DEADLINE:?}; requests: {:#?}",
                self.requests()
                    .iter()
                    .map(|request| format!("{} {}?{}", request.method, request.path, request.query))
                    .collect::<Vec<_>>()
            ),
        }
    }

    async fn handle(&self, request: Request<kube::client::Body>) -> Response<ResponseBody> {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        let recorded = Recorded {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        };
        let is_list = recorded.method == Method::GET && !recorded.params().contains_key("watch");
        let held = is_list
            .then(|| {
                self.state
                    .lock()
                    .held_lists
                    .get(&cluster_wide(&recorded.path))
                    .cloned()
            })
            .flatten();
        if let Some(mut released) = held {
            self.record(recorded.clone());
            let _ = released.wait_for(|released| *released).await;
            return self.respond(&recorded);
        }
        let response = self.respond(&recorded);
        let applied_status = (recorded.method == Method::PATCH
            && recorded.path.ends_with("/status")
            && response.status() == StatusCode::OK)
            .then(|| self.stored(&recorded.path))
            .flatten();
        // The stored object, as the create's response holds it.
        let created = (recorded.method == Method::POST
            && response.status() == StatusCode::CREATED
            && !recorded.path.ends_with("/events"))
        .then(|| {
            let state = self.state.lock();
            let objects = state.collections.get(&cluster_wide(&recorded.path))?;
            objects.last().cloned()
        })
        .flatten();
        self.record(recorded.clone());
        // Like the API server, a status change and a creation reach the watches.
        if let Some(object) = applied_status {
            self.push_event(&cluster_wide(&recorded.path), "MODIFIED", object)
                .await;
        }
        if let Some(object) = created {
            self.push_event(&cluster_wide(&recorded.path), "ADDED", object)
                .await;
        }
        response
    }

    fn record(&self, recorded: Recorded) {
        self.state.lock().requests.push(recorded);
        self.revision.send_modify(|revision| *revision += 1);
    }

    fn respond(&self, request: &Recorded) -> Response<ResponseBody> {
        let path = request.path.as_str();
        if path.contains("/leases/") || path.ends_with("/leases") {
            return self.lease(request);
        }
        if path.ends_with("/events") && request.method == Method::POST {
            return json_response(StatusCode::CREATED, request.body.clone());
        }
        if request.method == Method::POST {
            return self.create(request);
        }
        if path.ends_with("/status") && request.method == Method::PATCH {
            return self.patch_status(request);
        }
        if request.method == Method::PATCH || request.method == Method::DELETE {
            return self.apply_or_delete(request);
        }
        if request.method == Method::GET {
            let collection = cluster_wide(path);
            if request.params().get("watch").map(String::as_str) == Some("true") {
                let (sender, receiver) = mpsc::channel(16);
                self.state
                    .lock()
                    .watchers
                    .entry(collection)
                    .or_default()
                    .push(sender);
                let stream = ReceiverStream::new(receiver);
                return Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
                    .unwrap_or_else(|_| not_found());
            }
            let state = self.state.lock();
            let items = state
                .collections
                .get(&collection)
                .cloned()
                .unwrap_or_default();
            return json_response(
                StatusCode::OK,
                json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "metadata": {"resourceVersion": state.resource_version.to_string()},
                    "items": items,
                }),
            );
        }
        not_found()
    }

    /// The stored object a `.../{name}/status` path names.
    fn stored(&self, path: &str) -> Option<Value> {
        let (collection, namespace, name) = object_path(path)?;
        let state = self.state.lock();
        state
            .collections
            .get(&collection)?
            .iter()
            .find(|object| object["metadata"]["name"] == name && namespace_of(object) == namespace)
            .cloned()
    }

    fn patch_status(&self, request: &Recorded) -> Response<ResponseBody> {
        let Some((collection, namespace, name)) = object_path(&request.path) else {
            return not_found();
        };
        let mut state = self.state.lock();
        let Some(object) = state.collections.get_mut(&collection).and_then(|objects| {
            objects.iter_mut().find(|object| {
                object["metadata"]["name"] == name && namespace_of(object) == namespace
            })
        }) else {
            return not_found();
        };
        object["status"] = request.body["status"].clone();
        json_response(StatusCode::OK, object.clone())
    }

    /// A create: stored as sent (in the namespace of its path); 409 when
    /// an object of that name exists.
    fn create(&self, request: &Recorded) -> Response<ResponseBody> {
        let mut object = request.body.clone();
        if let Some((_, rest)) = request.path.split_once("/namespaces/") {
            let namespace = rest.split('/').next().unwrap_or_default();
            object["metadata"]["namespace"] = namespace.into();
        }
        let mut state = self.state.lock();
        state.resource_version += 1;
        object["metadata"]["resourceVersion"] = state.resource_version.to_string().into();
        let objects = state
            .collections
            .entry(cluster_wide(&request.path))
            .or_default();
        let taken = objects.iter().any(|existing| {
            existing["metadata"]["name"] == object["metadata"]["name"]
                && namespace_of(existing) == namespace_of(&object)
        });
        if taken {
            return json_response(
                StatusCode::CONFLICT,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409}),
            );
        }
        objects.push(object.clone());
        json_response(StatusCode::CREATED, object)
    }

    /// Server-side apply of a whole object (the controller's ConfigMaps):
    /// stores the body as the object; DELETE removes it.
    fn apply_or_delete(&self, request: &Recorded) -> Response<ResponseBody> {
        let Some((collection, namespace, name)) = object_path(&request.path) else {
            return not_found();
        };
        let mut state = self.state.lock();
        state.resource_version += 1;
        let resource_version = state.resource_version.to_string();
        let objects = state.collections.entry(collection).or_default();
        let existing = objects.iter().position(|object| {
            object["metadata"]["name"] == name && namespace_of(object) == namespace
        });
        if request.method == Method::DELETE {
            return match existing {
                Some(index) => json_response(StatusCode::OK, objects.remove(index)),
                None => not_found(),
            };
        }
        let mut object = request.body.clone();
        object["metadata"]["resourceVersion"] = json!(resource_version);
        match existing {
            Some(index) => objects[index] = object.clone(),
            None => objects.push(object.clone()),
        }
        json_response(StatusCode::OK, object)
    }

    fn lease(&self, request: &Recorded) -> Response<ResponseBody> {
        let mut state = self.state.lock();
        match request.method {
            Method::GET => match &state.lease {
                Some(lease) => json_response(StatusCode::OK, lease.clone()),
                None => not_found(),
            },
            Method::POST => {
                let mut lease = request.body.clone();
                lease["metadata"]["resourceVersion"] = json!("1");
                state.lease = Some(lease.clone());
                json_response(StatusCode::CREATED, lease)
            }
            Method::PATCH => {
                let Some(lease) = state.lease.as_mut() else {
                    return not_found();
                };
                if let Some(spec) = request.body["spec"].as_object() {
                    if !lease["spec"].is_object() {
                        lease["spec"] = json!({});
                    }
                    for (key, value) in spec {
                        if value.is_null() {
                            if let Some(existing) = lease["spec"].as_object_mut() {
                                existing.remove(key);
                            }
                        } else {
                            lease["spec"][key] = value.clone();
                        }
                    }
                }
                json_response(StatusCode::OK, lease.clone())
            }
            _ => not_found(),
        }
    }
}

/// Releases the lists [`FakeApi::hold_lists`] holds back; dropping it does too.
pub struct ListHold(watch::Sender<bool>);

impl ListHold {
    pub fn release(&self) {
        self.0.send_replace(true);
    }
}

impl Drop for ListHold {
    fn drop(&mut self) {
        self.release();
    }
}

/// `.../namespaces/{ns}/{plural}/{name}[/status]` -> (cluster-wide collection, ns, name).
fn object_path(path: &str) -> Option<(String, String, String)> {
    let path = path.trim_end_matches("/status");
    let Some((prefix, rest)) = path.split_once("/namespaces/") else {
        // Cluster-scoped: /apis/group/version/plural/name, namespace "".
        let (collection, name) = path.rsplit_once('/')?;
        return (collection.starts_with("/apis/") && collection.matches('/').count() == 4)
            .then(|| (collection.to_owned(), String::new(), name.to_owned()));
    };
    let mut parts = rest.split('/');
    let namespace = parts.next()?.to_owned();
    let plural = parts.next()?;
    let name = parts.next()?.to_owned();
    Some((format!("{prefix}/{plural}"), namespace, name))
}

/// An object's namespace; "" for a cluster-scoped one.
fn namespace_of(object: &Value) -> &str {
    object["metadata"]["namespace"].as_str().unwrap_or_default()
}

/// `/apis/g/v/namespaces/ns/plural` -> `/apis/g/v/plural`: the fake keeps one collection per kind.
fn cluster_wide(path: &str) -> String {
    match path.split_once("/namespaces/") {
        Some((prefix, rest)) => match rest.split_once('/') {
            Some((_, plural)) => {
                format!("{prefix}/{}", plural.split('/').next().unwrap_or_default())
            }
            None => path.to_owned(),
        },
        None => path.to_owned(),
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(Full::new(Bytes::from(
            body.to_string(),
        ))))
        .unwrap_or_else(|_| Response::new(BodyExt::boxed_unsync(Full::new(Bytes::new()))))
}

fn not_found() -> Response<ResponseBody> {
    json_response(
        StatusCode::NOT_FOUND,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404,
        }),
    )
}

fn url_decode_pairs(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        let escaped = (byte == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (byte, escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                index += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                index += 1;
            }
            (other, None) => {
                out.push(other);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
