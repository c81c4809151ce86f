//! A scripted Kubernetes API server on 127.0.0.1 (plain HTTP), speaking the requests kube-rs
//! sends: GET, server-side apply PATCH, DELETE, and watch streams resumed from a
//! resourceVersion. A deployment controller of its own moves each Deployment's status the way
//! the real one does (observedGeneration, then new pods created, ready, old ones terminated;
//! or, for an image marked broken, ProgressDeadlineExceeded), one step per tick.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub authorization: String,
}

#[derive(Clone)]
struct WatchEvent {
    version: u64,
    kind: &'static str,
    key: (String, String),
    event_type: &'static str,
    object: Value,
}

/// Where a Deployment's rollout stands in the fake controller.
#[derive(Debug, Clone, Default)]
struct Pods {
    observed_generation: i64,
    old_ready: i64,
    new_created: i64,
    new_ready: i64,
    stalled_ticks: u32,
    failed: bool,
}

#[derive(Default)]
struct Inner {
    version: u64,
    /// (kind, namespace, name) -> object
    objects: BTreeMap<(&'static str, String, String), Value>,
    claims: BTreeSet<(String, String)>,
    pods: BTreeMap<(String, String), Pods>,
    history: Vec<WatchEvent>,
    /// Watches asking for an older version than this get 410 Gone.
    compacted_below: u64,
    /// How many of the next watch streams are cut after their first event.
    drop_next_watches: usize,
    /// Every watch stream breaks before its first event.
    break_watches: bool,
    /// Images whose pods never become ready.
    broken_images: BTreeSet<String>,
    /// Ticks without progress after which a rollout exceeds its deadline.
    deadline_ticks: u32,
    seen: Vec<Seen>,
}

#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<WatchEvent>,
    pub addr: SocketAddr,
    tasks: Arc<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if Arc::strong_count(&self.tasks) == 1 {
            for task in self.tasks.iter() {
                task.abort();
            }
        }
    }
}

impl FakeApiServer {
    /// Starts the server and its controller (one step every `tick`).
    pub async fn start(tick: Duration) -> FakeApiServer {
        let inner = Arc::new(Mutex::new(Inner {
            deadline_ticks: 8,
            ..Inner::default()
        }));
        let (events, _) = broadcast::channel(1024);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = FakeApiServer {
            inner,
            events,
            addr,
            tasks: Arc::new(Vec::new()),
        };
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(server.clone());
        let serve = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let controller = {
            let server = server.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(tick).await;
                    server.controller_step();
                }
            })
        };
        server.tasks = Arc::new(vec![serve, controller]);
        server
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// A kubeconfig whose context `scripted` points at this server (with a token); its current
    /// context points at a closed port, so a client that ignores the context fails.
    pub fn write_kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: scripted\n  cluster:\n    server: http://{}\n- name: nowhere\n  cluster:\n    server: http://127.0.0.1:9\ncontexts:\n- name: scripted\n  context:\n    cluster: scripted\n    user: tester\n    namespace: shop\n- name: elsewhere\n  context:\n    cluster: nowhere\n    user: tester\ncurrent-context: elsewhere\nusers:\n- name: tester\n  user:\n    token: test-token\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    pub fn add_claim(&self, namespace: &str, name: &str) {
        self.lock().claims.insert((namespace.into(), name.into()));
    }

    pub fn break_image(&self, image: &str) {
        self.lock().broken_images.insert(image.into());
    }

    pub fn break_every_watch(&self) {
        self.lock().break_watches = true;
    }

    pub fn drop_next_watches(&self, count: usize) {
        self.lock().drop_next_watches = count;
    }

    /// Forgets history: a watch from an older version than now gets 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.compacted_below = inner.version + 1;
        inner.history.clear();
    }

    pub fn object(&self, kind: &'static str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Changes an object "by hand" (as `kubectl edit` would): a new resourceVersion, and a new
    /// generation when the spec changed.
    pub fn edit(
        &self,
        kind: &'static str,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) {
        let mut inner = self.lock();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let mut object = inner.objects.get(&key).cloned().unwrap();
        let before = object["spec"].clone();
        change(&mut object);
        if object["spec"] != before {
            let generation = object["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            object["metadata"]["generation"] = json!(generation);
        }
        self.store(&mut inner, kind, namespace, name, object, "MODIFIED");
    }

    fn store(
        &self,
        inner: &mut Inner,
        kind: &'static str,
        namespace: &str,
        name: &str,
        mut object: Value,
        event_type: &'static str,
    ) -> Value {
        inner.version += 1;
        object["metadata"]["resourceVersion"] = json!(inner.version.to_string());
        let key = (kind, namespace.to_owned(), name.to_owned());
        if event_type == "DELETED" {
            inner.objects.remove(&key);
        } else {
            inner.objects.insert(key, object.clone());
        }
        let event = WatchEvent {
            version: inner.version,
            kind,
            key: (namespace.to_owned(), name.to_owned()),
            event_type,
            object: object.clone(),
        };
        inner.history.push(event.clone());
        let _ = self.events.send(event);
        object
    }

    /// One step of the deployment controller for every Deployment.
    fn controller_step(&self) {
        let mut inner = self.lock();
        let deployments: Vec<(String, String, Value)> = inner
            .objects
            .iter()
            .filter(|((kind, _, _), _)| *kind == "deployments")
            .map(|((_, ns, name), object)| (ns.clone(), name.clone(), object.clone()))
            .collect();
        for (namespace, name, mut object) in deployments {
            let key = (namespace.clone(), name.clone());
            let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
            let desired = object["spec"]["replicas"].as_i64().unwrap_or(1);
            let image = object["spec"]["template"]["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let broken = inner.broken_images.contains(&image);
            let deadline_ticks = inner.deadline_ticks;
            let mut pods = inner.pods.get(&key).cloned().unwrap_or_default();
            let before = pods.clone();
            if pods.observed_generation < generation {
                // A new template: the pods of the old ReplicaSets that were ready stay up
                // until new ones replace them; new pods that never got ready are gone.
                pods.old_ready += pods.new_ready;
                pods.new_created = 0;
                pods.new_ready = 0;
                pods.stalled_ticks = 0;
                pods.failed = false;
                pods.observed_generation = generation;
            } else if broken {
                if pods.new_created < 1 {
                    pods.new_created = 1;
                }
                pods.stalled_ticks += 1;
                if pods.stalled_ticks >= deadline_ticks {
                    pods.failed = true;
                }
            } else if pods.new_ready < pods.new_created {
                pods.new_ready = pods.new_created;
            } else if pods.new_created < desired {
                pods.new_created += 1;
            } else if pods.old_ready > 0 {
                pods.old_ready -= 1;
            }
            inner.pods.insert(key.clone(), pods.clone());
            if before.observed_generation == pods.observed_generation
                && before.new_created == pods.new_created
                && before.new_ready == pods.new_ready
                && before.old_ready == pods.old_ready
                && before.failed == pods.failed
            {
                continue;
            }
            let complete = !pods.failed && pods.new_ready == desired && pods.old_ready == 0;
            let progressing = if pods.failed {
                json!({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                       "message": format!("ReplicaSet \"{name}-{generation}\" has timed out progressing.")})
            } else if complete {
                json!({"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                       "message": format!("ReplicaSet \"{name}-{generation}\" has successfully progressed.")})
            } else {
                json!({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                       "message": format!("ReplicaSet \"{name}-{generation}\" is progressing.")})
            };
            object["status"] = json!({
                "observedGeneration": pods.observed_generation,
                "replicas": pods.old_ready + pods.new_created,
                "updatedReplicas": pods.new_created,
                "readyReplicas": pods.old_ready + pods.new_ready,
                "availableReplicas": pods.old_ready + pods.new_ready,
                "conditions": [progressing],
            });
            self.store(
                &mut inner,
                "deployments",
                &namespace,
                &name,
                object,
                "MODIFIED",
            );
        }
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 400 { "Success" } else { "Failure" },
        "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// Defaults the real API server adds, so that drift detection meets them.
fn add_defaults(kind: &str, object: &mut Value) {
    match kind {
        "deployments" => {
            let spec = &mut object["spec"];
            spec["revisionHistoryLimit"] = json!(10);
            let pod = &mut spec["template"]["spec"];
            pod["restartPolicy"] = json!("Always");
            pod["schedulerName"] = json!("default-scheduler");
            pod["securityContext"] = json!({});
            if let Some(containers) = pod["containers"].as_array_mut() {
                for container in containers {
                    container["terminationMessagePath"] = json!("/dev/termination-log");
                    container["terminationMessagePolicy"] = json!("File");
                }
            }
        }
        "services" => {
            object["spec"]["clusterIP"] = json!("10.96.0.17");
            object["spec"]["clusterIPs"] = json!(["10.96.0.17"]);
            object["spec"]["sessionAffinity"] = json!("None");
        }
        _ => {}
    }
}

async fn handle(
    State(server): State<FakeApiServer>,
    method: Method,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    server.lock().seen.push(Seen {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: query.clone(),
        content_type: header("content-type"),
        authorization: header("authorization"),
    });
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    // /apis/apps/v1/namespaces/NS/deployments[/NAME] or /api/v1/namespaces/NS/KIND[/NAME]
    let (namespace, kind, name) = match segments.as_slice() {
        [
            "apis",
            "apps",
            "v1",
            "namespaces",
            ns,
            "deployments",
            rest @ ..,
        ] => (*ns, "deployments", rest.first().copied()),
        ["api", "v1", "namespaces", ns, "services", rest @ ..] => {
            (*ns, "services", rest.first().copied())
        }
        [
            "api",
            "v1",
            "namespaces",
            ns,
            "persistentvolumeclaims",
            rest @ ..,
        ] => (*ns, "persistentvolumeclaims", rest.first().copied()),
        _ => return status(404, "NotFound", format!("no route {}", uri.path())),
    };
    let not_found = |name: &str| status(404, "NotFound", format!("{kind} \"{name}\" not found"));
    match (method, name) {
        (Method::GET, None) if query.get("watch").map(String::as_str) == Some("true") => {
            watch(&server, kind, namespace, &query)
        }
        (Method::GET, Some(name)) if kind == "persistentvolumeclaims" => {
            if server
                .lock()
                .claims
                .contains(&(namespace.into(), name.into()))
            {
                json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": name, "namespace": namespace}}),
                )
            } else {
                not_found(name)
            }
        }
        (Method::GET, Some(name)) => match server.object(kind, namespace, name) {
            Some(object) => json_response(StatusCode::OK, &object),
            None => not_found(name),
        },
        (Method::PATCH, Some(name)) => {
            if header("content-type") != "application/apply-patch+yaml" {
                return status(415, "UnsupportedMediaType", "only server-side apply".into());
            }
            let Ok(mut applied) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "body is not JSON".into());
            };
            let mut inner = server.lock();
            let key = (kind, namespace.to_owned(), name.to_owned());
            let existing = inner.objects.get(&key).cloned();
            add_defaults(kind, &mut applied);
            let (code, event) = match &existing {
                Some(old) => {
                    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    let changed = old["spec"] != applied["spec"];
                    applied["metadata"]["generation"] =
                        json!(if changed { generation + 1 } else { generation });
                    applied["metadata"]["uid"] = old["metadata"]["uid"].clone();
                    if let Some(status) = old.get("status") {
                        applied["status"] = status.clone();
                    }
                    if !changed && old["metadata"] == applied["metadata"] {
                        return json_response(StatusCode::OK, old);
                    }
                    (StatusCode::OK, "MODIFIED")
                }
                None => {
                    applied["metadata"]["generation"] = json!(1);
                    applied["metadata"]["uid"] = json!(format!("uid-{kind}-{name}"));
                    (StatusCode::CREATED, "ADDED")
                }
            };
            let stored = server.store(&mut inner, kind, namespace, name, applied, event);
            json_response(code, &stored)
        }
        (Method::DELETE, Some(name)) => {
            let mut inner = server.lock();
            let key = (kind, namespace.to_owned(), name.to_owned());
            let Some(object) = inner.objects.get(&key).cloned() else {
                drop(inner);
                return not_found(name);
            };
            inner.pods.remove(&(namespace.to_owned(), name.to_owned()));
            server.store(&mut inner, kind, namespace, name, object, "DELETED");
            status(200, "", format!("{kind} \"{name}\" deleted"))
        }
        _ => status(405, "MethodNotAllowed", "not scripted".into()),
    }
}

/// A watch stream: the events after `resourceVersion` from history, then live ones, one JSON
/// object per line; cut after the first event when the test asked for dropped watches.
fn watch(
    server: &FakeApiServer,
    kind: &'static str,
    namespace: &str,
    query: &BTreeMap<String, String>,
) -> Response {
    let name = query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_owned);
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut inner = server.lock();
    let broken = inner.break_watches;
    let cut_after_first = inner.drop_next_watches > 0;
    if cut_after_first {
        inner.drop_next_watches -= 1;
    }
    let namespace = namespace.to_owned();
    let matches = move |e: &WatchEvent| {
        e.kind == kind && e.key.0 == namespace && name.as_ref().is_none_or(|n| *n == e.key.1)
    };
    let mut backlog: VecDeque<Value> = VecDeque::new();
    if since < inner.compacted_below {
        backlog.push_back(
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {since} ({})", inner.compacted_below)}}),
        );
    } else {
        for event in inner
            .history
            .iter()
            .filter(|e| e.version > since && matches(e))
        {
            backlog.push_back(json!({"type": event.event_type, "object": event.object}));
        }
    }
    let expired = since < inner.compacted_below;
    let live = server.events.subscribe();
    drop(inner);
    let stream = futures::stream::unfold(
        (backlog, live, 0usize, expired),
        move |(mut backlog, mut live, sent, expired)| {
            let matches = matches.clone();
            async move {
                if broken {
                    return (sent == 0).then(|| {
                        (
                            Err(std::io::Error::other("watch broken by the test")),
                            (backlog, live, sent + 1, expired),
                        )
                    });
                }
                if cut_after_first && sent == 1 {
                    // Cut the connection mid-stream, as a restarted API server or a proxy does,
                    // once the event before has had time to reach the client.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return Some((
                        Err(std::io::Error::other("watch dropped by the test")),
                        (backlog, live, sent + 1, expired),
                    ));
                }
                if sent > 1 && cut_after_first {
                    return None;
                }
                let next = match backlog.pop_front() {
                    Some(event) => event,
                    None if expired => return None,
                    None => loop {
                        match live.recv().await {
                            Ok(event) if matches(&event) => {
                                break json!({"type": event.event_type, "object": event.object});
                            }
                            Ok(_) => {}
                            Err(_) => return None,
                        }
                    },
                };
                let line = format!("{next}\n");
                Some((Ok(Bytes::from(line)), (backlog, live, sent + 1, expired)))
            }
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}
