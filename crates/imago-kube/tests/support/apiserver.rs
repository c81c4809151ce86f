//! A scripted Kubernetes API server on 127.0.0.1 (plain HTTP), speaking the requests kube-rs
//! sends: GET, LIST with a label selector, server-side apply PATCH, DELETE, and watch streams
//! resumed from a resourceVersion. A deployment controller of its own moves each Deployment's
//! pods and status the way the real one does (observedGeneration, then a pod of the new
//! template created, then ready, until there are enough; then old pods deleted one by one; or,
//! for an image marked broken, a pod that never gets ready and ProgressDeadlineExceeded), one
//! step per tick; a Deployment with `spec.paused` stands still (condition `DeploymentPaused`).
//! Pods carry the pod template's labels plus `pod-template-hash`.
//!
//! Shared by imago-kube's tests and imago-cli's end-to-end tests (`#[path]` module there).

#![allow(dead_code)]

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

/// Where a Deployment's rollout stands in the fake controller (its pods are objects).
#[derive(Debug, Clone, Default)]
struct Rollout {
    observed_generation: i64,
    stalled_ticks: u32,
    failed: bool,
}

/// The annotation that ties a fake pod to its Deployment (the real link is ownerReferences
/// through a ReplicaSet, which this server does not model).
const POD_OWNER: &str = "fake.imago.dev/deployment";

#[derive(Default)]
struct Inner {
    version: u64,
    /// (kind, namespace, name) -> object
    objects: BTreeMap<(&'static str, String, String), Value>,
    claims: BTreeSet<(String, String)>,
    rollouts: BTreeMap<(String, String), Rollout>,
    /// Pods made so far: their names and addresses.
    pod_count: u64,
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

    /// Ticks without progress after which a rollout exceeds its deadline (8 by default).
    pub fn set_deadline_ticks(&self, ticks: u32) {
        self.lock().deadline_ticks = ticks;
    }

    /// The pods of Deployment `name`.
    pub fn pods(&self, namespace: &str, name: &str) -> Vec<Value> {
        let inner = self.lock();
        pods_of(&inner, namespace, name)
            .into_iter()
            .map(|(_, pod)| pod)
            .collect()
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

    /// Deletes an object "by hand" (as `kubectl delete` would); a Deployment's pods follow.
    pub fn remove(&self, kind: &'static str, namespace: &str, name: &str) {
        let mut inner = self.lock();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let object = inner.objects.get(&key).cloned().unwrap();
        if kind == "deployments" {
            inner
                .rollouts
                .remove(&(namespace.to_owned(), name.to_owned()));
            for (pod, _) in pods_of(&inner, namespace, name) {
                self.delete_pod(&mut inner, namespace, &pod);
            }
        }
        self.store(&mut inner, kind, namespace, name, object, "DELETED");
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
        for (namespace, name, object) in deployments {
            self.step_deployment(&mut inner, &namespace, &name, object);
        }
    }

    fn step_deployment(&self, inner: &mut Inner, namespace: &str, name: &str, mut object: Value) {
        let key = (namespace.to_owned(), name.to_owned());
        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
        let desired = object["spec"]["replicas"].as_i64().unwrap_or(1);
        let template = object["spec"]["template"].clone();
        let hash = template_hash(&template);
        let image = template["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let broken = inner.broken_images.contains(&image);
        let deadline_ticks = inner.deadline_ticks;
        let mut rollout = inner.rollouts.get(&key).cloned().unwrap_or_default();
        let pods = pods_of(inner, namespace, name);
        let is_new = |pod: &Value| pod["metadata"]["labels"]["pod-template-hash"] == hash;
        let is_ready = |pod: &Value| pod["status"]["conditions"][0]["status"] == "True";
        let new: Vec<&(String, Value)> = pods.iter().filter(|(_, p)| is_new(p)).collect();
        let old: Vec<&(String, Value)> = pods.iter().filter(|(_, p)| !is_new(p)).collect();
        let mut changed = false;
        // `spec.paused` (kubectl rollout pause, imago pause): the real controller observes
        // the generation and moves no pod, and checks no progress deadline, until resumed.
        let paused = object["spec"]["paused"] == json!(true);
        if paused {
            if rollout.observed_generation < generation {
                rollout.observed_generation = generation;
                changed = true;
            }
        } else if rollout.observed_generation < generation {
            // A new template: the ready pods of older templates stay until new ones replace
            // them; pods of older templates that never got ready go at once.
            for (pod, _) in old.iter().filter(|(_, p)| !is_ready(p)) {
                self.delete_pod(inner, namespace, pod);
            }
            rollout = Rollout {
                observed_generation: generation,
                ..Rollout::default()
            };
            changed = true;
        } else if broken {
            if new.is_empty() {
                self.create_pod(inner, namespace, name, &template, &hash);
            }
            rollout.stalled_ticks += 1;
            if rollout.stalled_ticks >= deadline_ticks && !rollout.failed {
                rollout.failed = true;
                changed = true;
            }
        } else if let Some((pod, _)) = new.iter().find(|(_, p)| !is_ready(p)) {
            self.set_ready(inner, namespace, pod);
        } else if (new.len() as i64) < desired {
            self.create_pod(inner, namespace, name, &template, &hash);
        } else if (new.len() as i64) > desired {
            self.delete_pod(inner, namespace, &new[0].0);
        } else if let Some((pod, _)) = old.first() {
            self.delete_pod(inner, namespace, pod);
        }
        inner.rollouts.insert(key, rollout.clone());
        let pods = pods_of(inner, namespace, name);
        let updated = pods.iter().filter(|(_, p)| is_new(p)).count() as i64;
        let ready = pods.iter().filter(|(_, p)| is_ready(p)).count() as i64;
        let total = pods.len() as i64;
        let complete = !rollout.failed && updated == desired && total == desired && ready == total;
        let progressing = if paused {
            json!({"type": "Progressing", "status": "Unknown", "reason": "DeploymentPaused",
                   "message": "Deployment is paused"})
        } else if rollout.failed {
            json!({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                   "message": format!("ReplicaSet \"{name}-{hash}\" has timed out progressing.")})
        } else if complete {
            json!({"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                   "message": format!("ReplicaSet \"{name}-{hash}\" has successfully progressed.")})
        } else {
            json!({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                   "message": format!("ReplicaSet \"{name}-{hash}\" is progressing.")})
        };
        let status = json!({
            "observedGeneration": rollout.observed_generation,
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "conditions": [progressing],
        });
        if changed || object["status"] != status {
            object["status"] = status;
            self.store(inner, "deployments", namespace, name, object, "MODIFIED");
        }
    }

    fn create_pod(
        &self,
        inner: &mut Inner,
        namespace: &str,
        owner: &str,
        template: &Value,
        hash: &str,
    ) {
        inner.pod_count += 1;
        let n = inner.pod_count;
        let name = format!("{owner}-{hash}-{n}");
        let mut labels = template["metadata"]["labels"].clone();
        labels["pod-template-hash"] = json!(hash);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels,
                "annotations": {POD_OWNER: owner}, "uid": format!("uid-pod-{n}")},
            "spec": template["spec"],
            "status": {"phase": "Pending", "podIP": format!("10.244.{}.{}", n / 250, n % 250 + 1),
                "conditions": [{"type": "Ready", "status": "False"}]},
        });
        self.store(inner, "pods", namespace, &name, pod, "ADDED");
    }

    fn set_ready(&self, inner: &mut Inner, namespace: &str, pod: &str) {
        let key = ("pods", namespace.to_owned(), pod.to_owned());
        let Some(mut object) = inner.objects.get(&key).cloned() else {
            return;
        };
        object["status"]["phase"] = json!("Running");
        object["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        self.store(inner, "pods", namespace, pod, object, "MODIFIED");
    }

    fn delete_pod(&self, inner: &mut Inner, namespace: &str, pod: &str) {
        let key = ("pods", namespace.to_owned(), pod.to_owned());
        if let Some(object) = inner.objects.get(&key).cloned() {
            self.store(inner, "pods", namespace, pod, object, "DELETED");
        }
    }
}

/// The pods of Deployment `owner`, by name.
fn pods_of(inner: &Inner, namespace: &str, owner: &str) -> Vec<(String, Value)> {
    inner
        .objects
        .iter()
        .filter(|((kind, ns, _), pod)| {
            *kind == "pods" && ns == namespace && pod["metadata"]["annotations"][POD_OWNER] == owner
        })
        .map(|((_, _, name), pod)| (name.clone(), pod.clone()))
        .collect()
}

/// The `pod-template-hash` of a pod template: equal templates, equal hashes.
fn template_hash(template: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut hasher);
    format!("{:010x}", hasher.finish() & 0xff_ffff_ffff)
}

/// Whether `object`'s labels satisfy `selector` (`k=v,k2=v2`; equality terms only).
fn selected(object: &Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|selector| {
        selector.split(',').filter(|t| !t.is_empty()).all(|term| {
            term.split_once('=')
                .is_some_and(|(k, v)| object["metadata"]["labels"][k] == v)
        })
    })
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
        ["api", "v1", "namespaces", ns, "pods", rest @ ..] => (*ns, "pods", rest.first().copied()),
        _ => return status(404, "NotFound", format!("no route {}", uri.path())),
    };
    let not_found = |name: &str| status(404, "NotFound", format!("{kind} \"{name}\" not found"));
    match (method, name) {
        (Method::GET, None) if query.get("watch").map(String::as_str) == Some("true") => {
            watch(&server, kind, namespace, &query)
        }
        (Method::GET, None) => {
            let inner = server.lock();
            let items: Vec<Value> = inner
                .objects
                .iter()
                .filter(|((k, ns, _), object)| {
                    *k == kind && ns == namespace && selected(object, query.get("labelSelector"))
                })
                .map(|(_, object)| object.clone())
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": inner.version.to_string()}, "items": items}),
            )
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
            if server.object(kind, namespace, name).is_none() {
                return not_found(name);
            }
            // Its ReplicaSets' pods follow a Deployment (background deletion).
            server.remove(kind, namespace, name);
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
