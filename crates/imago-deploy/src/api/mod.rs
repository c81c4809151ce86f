//! The controller's HTTP API and console: everything the CLI shows, as JSON under `/v1`, the
//! rollback action, `/metrics`, the OpenAPI document, and the console page at `/`.
//!
//! Every request reads the state database afresh, so the API never disagrees with the CLI, and
//! it does so on tokio's blocking pool: SQLite and the instance listing never hold up the async
//! workers that run the health probes. Actions go through the same functions as the CLI
//! ([`crate::actions`]). Who may do what is [`auth`]'s.

pub mod auth;
mod console;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use imago_runtime::{Instance, Provider, RootfsCache};
use imago_store::Store;
use serde::{Deserialize, Serialize};

use crate::DeployError;
use crate::controller::{LABEL_REVISION, LABEL_SERVICE};
use crate::daemon::DeployHome;
use crate::state::{Event, StateDb};
use crate::status::{self, service_status};

/// The OpenAPI 3.1 document of every route below.
pub const OPENAPI: &str = include_str!("openapi.json");

/// A definition file to plan, as `POST /v1/plan` received it.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// The file's text (`imago.toml`).
    pub text: String,
    /// The directory its relative paths (image contexts) resolve against, on this host; `None`:
    /// none (a file whose images copy nothing from a context, or uses stored images).
    pub dir: Option<PathBuf>,
}

/// Plans a definition file exactly as `imago plan --json` does and returns that document, or
/// the error `imago plan` would print. Planning resolves images and may check-build them, which
/// the binary owns (deploy does not link the builder): the CLI hands the controller this hook.
pub type Planner = Arc<dyn Fn(PlanInput) -> Result<serde_json::Value, String> + Send + Sync>;

/// What the API serves and how it guards it.
#[derive(Clone)]
pub struct ApiConfig {
    pub db_path: PathBuf,
    pub provider: Arc<dyn Provider>,
    /// The image store, which a rollback checks for its image; without it, rollback answers 503.
    pub store: Option<Store>,
    /// The home whose data plane is asked for open connections (metrics).
    pub home: Option<DeployHome>,
    /// The unpacked images, which the drift check compares; without it, drift answers 503.
    pub rootfs: Option<RootfsCache>,
    /// The token of write actions (and of everything when `token_for_reads`); `None` refuses
    /// every write.
    pub token: Option<String>,
    /// Reads need the token too: the API listens beyond loopback.
    pub token_for_reads: bool,
    /// Actions answer 403.
    pub read_only: bool,
    /// The cluster engines, whose tasks the status lists for services on cluster targets.
    pub engines: Option<crate::controller::EngineFactory>,
    /// `POST /v1/plan`; without it, that answers 503.
    pub planner: Option<Planner>,
}

impl ApiConfig {
    /// An API over `db_path` and `provider` with nothing else: reads only, no token.
    pub fn new(db_path: PathBuf, provider: Arc<dyn Provider>) -> ApiConfig {
        ApiConfig {
            db_path,
            provider,
            store: None,
            home: None,
            rootfs: None,
            token: None,
            token_for_reads: false,
            read_only: false,
            engines: None,
            planner: None,
        }
    }
}

/// Whether an API on `addr` needs the token for reads: anything but a loopback address does.
pub fn needs_token_for_reads(addr: SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

#[derive(Clone)]
struct Api {
    config: Arc<ApiConfig>,
    limiter: Arc<auth::FailureLimiter>,
    /// The one poller behind every event stream.
    hub: Arc<stream::Hub>,
}

impl Api {
    fn instances(&self) -> Result<Vec<Instance>, DeployError> {
        self.config
            .provider
            .list()
            .map_err(|e| DeployError::Runtime(e.to_string()))
    }

    /// Adds the tasks of services on cluster targets, as `imago status` does.
    fn add_cluster_tasks(
        &self,
        db: &StateDb,
        services: &mut [status::ServiceStatus],
    ) -> Result<(), DeployError> {
        let Some(factory) = &self.config.engines else {
            return Ok(());
        };
        status::add_cluster_tasks(
            db,
            services,
            &mut crate::drift::ClusterEngines::new(factory),
        )
    }
}

/// The routes of the router, as method and path: the OpenAPI test checks that it documents
/// exactly these.
struct Routes {
    router: Router<Api>,
    listed: Vec<(Method, &'static str)>,
}

impl Routes {
    fn add(mut self, method: Method, path: &'static str, handler: MethodRouter<Api>) -> Routes {
        self.listed.push((method, path));
        self.router = self.router.route(path, handler);
        self
    }
}

fn routes() -> Routes {
    Routes {
        router: Router::new(),
        listed: Vec::new(),
    }
    .add(Method::GET, "/v1/info", get(info))
    .add(Method::GET, "/v1/status", get(status_document))
    .add(Method::GET, "/v1/overview", get(overview))
    .add(Method::GET, "/v1/services", get(services))
    .add(Method::GET, "/v1/services/{name}", get(service))
    .add(Method::GET, "/v1/services/{name}/releases", get(releases))
    .add(
        Method::GET,
        "/v1/services/{name}/instances",
        get(service_instances),
    )
    .add(Method::POST, "/v1/services/{name}/rollback", post(rollback))
    .add(Method::POST, "/v1/services/{name}/restart", post(restart))
    .add(Method::POST, "/v1/services/{name}/pause", post(pause))
    .add(Method::POST, "/v1/services/{name}/resume", post(resume))
    .add(Method::GET, "/v1/instances", get(instances))
    .add(Method::GET, "/v1/instances/{id}/logs", get(logs))
    .add(Method::GET, "/v1/events", get(events))
    .add(Method::GET, "/v1/events/stream", get(stream::events_stream))
    .add(Method::GET, "/v1/drift", get(drift))
    .add(Method::POST, "/v1/plan", post(plan))
    .add(Method::GET, "/v1/openapi.json", get(openapi))
    .add(Method::GET, "/metrics", get(metrics))
}

/// The API's routes, served as `config` says. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()`, so that the failure limiter knows its
/// clients (without it every client counts as one).
pub fn router(config: ApiConfig) -> Router {
    let api = Api {
        config: Arc::new(config),
        limiter: Arc::default(),
        hub: Arc::default(),
    };
    routes()
        .router
        .merge(console::routes())
        .layer(axum::middleware::from_fn_with_state(api.clone(), guard))
        .with_state(api)
}

/// The documented routes as (method, path), for the OpenAPI test.
#[cfg(test)]
fn listed_routes() -> Vec<(Method, &'static str)> {
    routes().listed
}

/// The gate in front of every route: the token where it is needed, the failure limiter, and
/// read-only mode.
async fn guard(State(api): State<Api>, request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let write = !matches!(*request.method(), Method::GET | Method::HEAD);
    let needs_token =
        write || (api.config.token_for_reads && !console::is_asset(request.uri().path()));
    if needs_token {
        if let Some(wait) = api.limiter.blocked(client) {
            let mut response = StatusCode::TOO_MANY_REQUESTS.into_response();
            if let Ok(secs) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, secs);
            }
            return response;
        }
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let valid = match (&api.config.token, presented) {
            (Some(expected), Some(presented)) => auth::token_matches(expected, presented.trim()),
            _ => false,
        };
        if !valid {
            api.limiter.failed(client);
            // No detail: whether a token was missing, malformed or wrong is not said.
            let mut response = StatusCode::UNAUTHORIZED.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    if write && api.config.read_only {
        return error_response(StatusCode::FORBIDDEN, "the API is read-only".to_owned());
    }
    next.run(request).await
}

/// Runs `query` on a fresh connection, on the blocking pool, and answers with its JSON, a 404
/// for `Ok(None)`, or the status [`DeployError`] maps to.
async fn answer<T, Q>(api: Api, query: Q) -> Response
where
    T: Serialize + Send + 'static,
    Q: FnOnce(&Api, &mut StateDb) -> Result<Option<T>, DeployError> + Send + 'static,
{
    match blocking(api, query).await {
        Ok(Some(value)) => Json(value).into_response(),
        Ok(None) => error_response(StatusCode::NOT_FOUND, "not found".to_owned()),
        Err(response) => response,
    }
}

/// Runs `query` on the blocking pool with a fresh database connection.
async fn blocking<T, Q>(api: Api, query: Q) -> Result<T, Response>
where
    T: Send + 'static,
    Q: FnOnce(&Api, &mut StateDb) -> Result<T, DeployError> + Send + 'static,
{
    let result = tokio::task::spawn_blocking(move || {
        StateDb::open(&api.config.db_path).and_then(|mut db| query(&api, &mut db))
    })
    .await;
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(deploy_error(e)),
        Err(e) => Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request task failed: {e}"),
        )),
    }
}

fn deploy_error(e: DeployError) -> Response {
    let status = match &e {
        DeployError::NoService(_) | DeployError::UnknownRelease { .. } => StatusCode::NOT_FOUND,
        DeployError::NothingToRollBackTo(_)
        | DeployError::ImageGone { .. }
        | DeployError::PauseUnsupported { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, e.to_string())
}

fn error_response(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({"error": message}))).into_response()
}

/// The same document as `imago status --json`; the controller answering is the one running.
async fn status_document(State(api): State<Api>) -> Response {
    answer(api, |api, db| {
        let instances = api.instances()?;
        let mut document = status::status_document(db, None, &instances, true)?;
        api.add_cluster_tasks(db, &mut document.services)?;
        Ok(Some(document))
    })
    .await
}

async fn services(State(api): State<Api>) -> Response {
    answer(api, |api, db| {
        let instances = api.instances()?;
        let mut services = status::status_document(db, None, &instances, true)?.services;
        api.add_cluster_tasks(db, &mut services)?;
        Ok(Some(services))
    })
    .await
}

async fn service(State(api): State<Api>, Path(name): Path<String>) -> Response {
    answer(api, move |api, db| {
        if db.desired(&name)?.is_none() {
            return Ok(None);
        }
        let instances = api.instances()?;
        let mut service = service_status(db, &name, &instances)?;
        api.add_cluster_tasks(db, std::slice::from_mut(&mut service))?;
        Ok(Some(service))
    })
    .await
}

/// What the API allows, for the console: actions are disabled when it is read-only.
#[derive(Debug, Serialize)]
pub struct ApiInfo {
    pub version: &'static str,
    pub read_only: bool,
    pub token_for_reads: bool,
}

async fn info(State(api): State<Api>) -> Response {
    Json(ApiInfo {
        version: env!("CARGO_PKG_VERSION"),
        read_only: api.config.read_only || api.config.token.is_none(),
        token_for_reads: api.config.token_for_reads,
    })
    .into_response()
}

/// A release with how its rollout ended (none while it rolls out or when it was superseded).
#[derive(Debug, Serialize)]
pub struct ReleaseView {
    #[serde(flatten)]
    pub release: crate::state::Release,
    pub outcome: Option<crate::state::Outcome>,
}

async fn releases(State(api): State<Api>, Path(name): Path<String>) -> Response {
    answer(api, move |_, db| {
        if db.desired(&name)?.is_none() {
            return Ok(None);
        }
        let mut last: HashMap<u64, crate::state::Outcome> = HashMap::new();
        for outcome in db.outcomes(&name)? {
            last.insert(outcome.number, outcome);
        }
        let views: Vec<ReleaseView> = db
            .history(&name)?
            .into_iter()
            .map(|release| ReleaseView {
                outcome: last.remove(&release.number),
                release,
            })
            .collect();
        Ok(Some(views))
    })
    .await
}

/// One row of the overview: what an operator watches during a deploy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OverviewRow {
    pub name: String,
    pub release: Option<u64>,
    pub digest: Option<imago_oci::Digest>,
    /// "rolling out", or how the desired release's rollout ended ("complete", "failed", ...).
    pub state: String,
    /// The engine target the service runs on; `None` for local instances.
    pub target: Option<String>,
    /// Instances of the desired release that pass their health check (or, without one, run).
    pub ready: u32,
    pub desired: u32,
    /// Every instance of the service the runtime lists, of any release, alive.
    pub running: u32,
    pub last_event: Option<Event>,
    pub drift_events: u64,
    pub fault: Option<String>,
    /// Its rollouts are paused: nothing is launched or retired until resumed.
    pub paused: bool,
}

/// The overview of every service, built from one database connection and one instance list.
pub fn overview_rows(
    db: &StateDb,
    instances: &[Instance],
) -> Result<Vec<OverviewRow>, DeployError> {
    let readiness = db.readiness()?;
    let drift = db.event_counts("drift")?;
    let mut rows = Vec::new();
    for name in db.services()? {
        let desired = db.desired(&name)?;
        let state = match &desired {
            Some(release) => match db.rollout(&name)? {
                Some(rollout) if rollout.target_release == release.number => {
                    "rolling out".to_owned()
                }
                _ => match db.outcome_of(&name, release.number)? {
                    Some(outcome) => outcome.outcome.as_str().to_owned(),
                    None => "rolling out".to_owned(),
                },
            },
            None => "no release".to_owned(),
        };
        let ours: Vec<&Instance> = instances
            .iter()
            .filter(|i| i.labels.get(LABEL_SERVICE) == Some(&name) && i.is_active())
            .collect();
        let ready = desired.as_ref().map_or(0, |release| {
            let gated = release.spec.health.is_some();
            ours.iter()
                .filter(|i| i.labels.get(LABEL_REVISION) == Some(&release.revision))
                .filter(|i| !gated || readiness.contains_key(&i.id))
                .count()
        });
        rows.push(OverviewRow {
            release: desired.as_ref().map(|r| r.number),
            digest: desired.as_ref().map(|r| r.image_digest.clone()),
            target: desired
                .as_ref()
                .and_then(|r| r.spec.cluster_target())
                .map(|t| t.name.clone()),
            desired: desired.as_ref().map_or(0, |r| r.spec.replicas),
            ready: u32::try_from(ready).unwrap_or(u32::MAX),
            running: u32::try_from(ours.len()).unwrap_or(u32::MAX),
            last_event: db.recent_events(&name, 1)?.pop(),
            drift_events: drift.get(&name).copied().unwrap_or(0),
            fault: db.service_fault(&name)?.map(|(reason, _)| reason),
            paused: db.paused(&name)?.is_some(),
            state,
            name,
        });
    }
    Ok(rows)
}

async fn overview(State(api): State<Api>) -> Response {
    answer(api, |api, db| {
        let instances = api.instances()?;
        Ok(Some(overview_rows(db, &instances)?))
    })
    .await
}

/// One instance as the console shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstanceView {
    pub id: String,
    pub service: Option<String>,
    /// The newest release of its service with its revision.
    pub release: Option<u64>,
    pub revision: Option<String>,
    pub status: String,
    pub address: Option<String>,
    pub engine: String,
    pub image: imago_oci::Digest,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    /// Since when it passes its health check, as the controller recorded it.
    pub ready_since_ms: Option<u64>,
}

fn instance_views(
    db: &StateDb,
    instances: &[Instance],
    only: Option<&str>,
) -> Result<Vec<InstanceView>, DeployError> {
    let readiness = db.readiness()?;
    let mut release_of: HashMap<(String, String), u64> = HashMap::new();
    for name in db.services()? {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        for release in db.history(&name)? {
            release_of.insert((name.clone(), release.revision), release.number);
        }
    }
    let mut views: Vec<InstanceView> = instances
        .iter()
        .filter(|i| only.is_none() || i.labels.get(LABEL_SERVICE).map(String::as_str) == only)
        .map(|i| {
            let service = i.labels.get(LABEL_SERVICE).cloned();
            let revision = i.labels.get(LABEL_REVISION).cloned();
            let release = service
                .clone()
                .zip(revision.clone())
                .and_then(|key| release_of.get(&key).copied());
            InstanceView {
                id: i.id.clone(),
                service,
                release,
                revision,
                status: i.status_text(),
                address: i.address.map(|a| a.to_string()),
                engine: i.engine.to_string(),
                image: i.image.clone(),
                created_ms: i.created_ms,
                started_ms: i.started_ms,
                ready_since_ms: readiness.get(&i.id).copied(),
            }
        })
        .collect();
    views.sort_by(|a, b| (&a.service, a.created_ms).cmp(&(&b.service, b.created_ms)));
    Ok(views)
}

async fn instances(State(api): State<Api>) -> Response {
    answer(api, |api, db| {
        let instances = api.instances()?;
        Ok(Some(instance_views(db, &instances, None)?))
    })
    .await
}

async fn service_instances(State(api): State<Api>, Path(name): Path<String>) -> Response {
    answer(api, move |api, db| {
        if db.desired(&name)?.is_none() {
            return Ok(None);
        }
        let instances = api.instances()?;
        Ok(Some(instance_views(db, &instances, Some(&name))?))
    })
    .await
}

#[derive(Deserialize)]
struct LogQuery {
    lines: Option<usize>,
}

/// The last lines an instance wrote (stdout and stderr, as the runtime retained them).
async fn logs(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    let lines = q.lines.unwrap_or(100).min(10_000);
    let result = blocking(api, move |api, _| {
        let known = api.instances()?.iter().any(|i| i.id == id);
        if !known {
            return Ok(None);
        }
        let bytes = api
            .config
            .provider
            .logs(&id)
            .map_err(|e| DeployError::Runtime(e.to_string()))?;
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        Ok(Some(all[all.len().saturating_sub(lines)..].join("\n")))
    })
    .await;
    match result {
        Ok(Some(text)) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
        }
        Ok(None) => error_response(StatusCode::NOT_FOUND, "not found".to_owned()),
        Err(response) => response,
    }
}

/// Filters of the event log.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EventQuery {
    /// Only events after this sequence number.
    #[serde(default)]
    pub since: u64,
    pub service: Option<String>,
    /// Only events of this kind ("drift", "rollout", ...).
    pub kind: Option<String>,
    /// At most this many, the newest.
    pub limit: Option<usize>,
}

impl EventQuery {
    fn run(&self, db: &StateDb) -> Result<Vec<Event>, DeployError> {
        let mut events = db.events(self.service.as_deref(), self.since)?;
        if let Some(kind) = &self.kind {
            events.retain(|e| &e.kind == kind);
        }
        if let Some(limit) = self.limit {
            events.drain(..events.len().saturating_sub(limit));
        }
        Ok(events)
    }
}

async fn events(State(api): State<Api>, Query(q): Query<EventQuery>) -> Response {
    answer(api, move |_, db| Ok(Some(q.run(db)?))).await
}

async fn drift(State(api): State<Api>) -> Response {
    let Some(cache) = api.config.rootfs.clone() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "this API has no rootfs cache to check drift against".to_owned(),
        );
    };
    answer(api, move |api, db| {
        let instances = api.instances()?;
        // Not deep: hashing every file is `imago drift --deep`'s, not a page load's.
        Ok(Some(
            crate::drift::check(db, &instances, &cache, false, "api")?.findings,
        ))
    })
    .await
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    let result = blocking(api, |api, db| {
        let instances = api.instances()?;
        let connections = api
            .config
            .home
            .as_ref()
            .and_then(|home| crate::dataplane::status(home).ok().flatten())
            .map(|plane| {
                let mut counts = BTreeMap::new();
                for endpoint in plane.endpoints {
                    *counts.entry(endpoint.service).or_insert(0) +=
                        endpoint.open_connections as u64;
                }
                counts
            });
        crate::metrics::render(db, &instances, connections.as_ref(), crate::metrics::live())
    })
    .await;
    match result {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(response) => response,
    }
}

/// What a rollback asks for.
#[derive(Debug, Default, Deserialize)]
pub struct RollbackRequest {
    /// The release to restore; by default the last completed one with another revision.
    pub to: Option<u64>,
}

/// What a rollback recorded: the controller rolls the release out from its next pass on.
#[derive(Debug, Serialize)]
pub struct RollbackAccepted {
    pub service: String,
    pub release: u64,
    pub restores: u64,
}

async fn rollback(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request: RollbackRequest = if body.is_empty() {
        RollbackRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, format!("bad request body: {e}"));
            }
        }
    };
    let Some(store) = api.config.store.clone() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "this API has no image store to roll back from".to_owned(),
        );
    };
    let result = blocking(api, move |_, db| {
        crate::actions::rollback(db, &store, &name, request.to, "api")
            .map(|(release, restores)| (name, release.number, restores))
    })
    .await;
    match result {
        Ok((service, release, restores)) => (
            StatusCode::ACCEPTED,
            Json(RollbackAccepted {
                service,
                release,
                restores,
            }),
        )
            .into_response(),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct PlanQuery {
    /// Where the file's relative paths resolve; by default an empty directory.
    dir: Option<PathBuf>,
}

/// `imago plan --json` of the definition file in the body. It needs the token like an action
/// (planning may check-build the file's images, running its `run` steps), but changes nothing.
async fn plan(State(api): State<Api>, Query(q): Query<PlanQuery>, body: String) -> Response {
    let Some(planner) = api.config.planner.clone() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "this API has no planner (only `imago serve` plans)".to_owned(),
        );
    };
    if let Some(dir) = q.dir.as_ref().filter(|d| !d.is_absolute() || !d.is_dir()) {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!(
                "dir {} is not an absolute path of a directory",
                dir.display()
            ),
        );
    }
    let result = tokio::task::spawn_blocking(move || {
        planner(PlanInput {
            text: body,
            dir: q.dir,
        })
    })
    .await;
    match result {
        Ok(Ok(document)) => Json(document).into_response(),
        Ok(Err(message)) => error_response(StatusCode::UNPROCESSABLE_ENTITY, message),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request task failed: {e}"),
        ),
    }
}

/// What a restart recorded: the controller rolls the release out from its next pass on.
#[derive(Debug, Serialize)]
pub struct RestartAccepted {
    pub service: String,
    pub release: u64,
    /// The restart generation of the new release.
    pub restart: u64,
}

async fn restart(State(api): State<Api>, Path(name): Path<String>) -> Response {
    let result = blocking(api, move |_, db| {
        crate::actions::restart(db, &name, "api").map(|release| (name, release))
    })
    .await;
    match result {
        Ok((service, release)) => (
            StatusCode::ACCEPTED,
            Json(RestartAccepted {
                service,
                release: release.number,
                restart: release.restart,
            }),
        )
            .into_response(),
        Err(response) => response,
    }
}

/// Whether a service's rollouts are paused now, and whether the request changed that.
#[derive(Debug, Serialize)]
pub struct PauseState {
    pub service: String,
    pub paused: bool,
    pub changed: bool,
}

async fn set_paused(api: Api, name: String, pause: bool) -> Response {
    answer(api, move |_, db| {
        let changed = crate::actions::set_paused(db, &name, pause, "api")?;
        Ok(Some(PauseState {
            service: name,
            paused: pause,
            changed,
        }))
    })
    .await
}

async fn pause(State(api): State<Api>, Path(name): Path<String>) -> Response {
    set_paused(api, name, true).await
}

async fn resume(State(api): State<Api>, Path(name): Path<String>) -> Response {
    set_paused(api, name, false).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::instance_spec;
    use crate::spec::ServiceSpec;
    use imago_oci::Digest;
    use imago_runtime::{Engine, FakeProvider, InstanceSpec, RuntimeError};
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    /// A database with one completed release of `web` and a provider running one of its
    /// instances.
    fn web_deployed(dir: &std::path::Path) -> (PathBuf, Arc<FakeProvider>) {
        let path = dir.join("state.db");
        let mut db = StateDb::open(&path).unwrap();
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "web"})).unwrap();
        let (release, _) = db
            .record_release("web", &spec, &Digest::of(b"v1"), "apply", None, "test")
            .unwrap();
        db.record_outcome("web", 1, crate::state::ReleaseOutcome::Complete, "", "test")
            .unwrap();
        let fake = Arc::new(FakeProvider::new());
        fake.launch(&instance_spec(&release, Engine::default()).unwrap())
            .unwrap();
        (path, fake)
    }

    async fn serve(router: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    #[tokio::test]
    async fn serves_status_releases_and_events_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let (path, fake) = web_deployed(dir.path());
        let addr = serve(router(ApiConfig::new(path.clone(), fake.clone()))).await;

        let (status, body) = get(addr, "/v1/services/web").await;
        assert!(status.contains("200"), "{status}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["desired"]["number"], 1);
        assert_eq!(json["outcome"]["outcome"], "complete");
        assert_eq!(json["instances"].as_array().unwrap().len(), 1, "{json}");
        let array_len = |body: &str| {
            serde_json::from_str::<serde_json::Value>(body)
                .unwrap()
                .as_array()
                .unwrap()
                .len()
        };
        let (_, body) = get(addr, "/v1/services/web/releases").await;
        assert_eq!(array_len(&body), 1);
        let (_, body) = get(addr, "/v1/events?since=0").await;
        assert_eq!(array_len(&body), 2);
        let (status, _) = get(addr, "/v1/services/nope").await;
        assert!(status.contains("404"), "{status}");

        // /v1/status is the document `imago status --json` prints, built by the same code.
        let (_, body) = get(addr, "/v1/status").await;
        let served: serde_json::Value = serde_json::from_str(&body).unwrap();
        let db = StateDb::open(&path).unwrap();
        let local = status::status_document(&db, None, &fake.list().unwrap(), true).unwrap();
        assert_eq!(served, serde_json::to_value(&local).unwrap());
        assert_eq!(served["services"][0]["instances"][0]["status"], "running");
    }

    /// Lists instances only after a delay, like a slow disk under the instance directories.
    struct SlowList(Arc<FakeProvider>, Duration);

    impl Provider for SlowList {
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, RuntimeError> {
            self.0.launch(spec)
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, RuntimeError> {
            self.0.stop(id, grace)
        }
        fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.0.remove(id)
        }
        fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
            std::thread::sleep(self.1);
            self.0.list()
        }
        fn inspect(&self, id: &str) -> Result<Instance, RuntimeError> {
            self.0.inspect(id)
        }
        fn logs(&self, id: &str) -> Result<Vec<u8>, RuntimeError> {
            self.0.logs(id)
        }
    }

    /// The controller's runtime also runs the health probes: a slow request must not stall
    /// them. On a single-threaded runtime, a timer keeps ticking while requests that take
    /// 1 s each are answered: served on the runtime's thread, a request would hold a 10 ms
    /// timer up for about that second; 800 ms is more than a loaded host's scheduling delays
    /// (150 ms against requests of 300 ms was not).
    #[tokio::test(flavor = "current_thread")]
    async fn slow_requests_never_block_the_runtime_they_are_served_on() {
        let dir = tempfile::tempdir().unwrap();
        let (path, fake) = web_deployed(dir.path());
        let slow = Arc::new(SlowList(fake, Duration::from_secs(1)));
        let addr = serve(router(ApiConfig::new(path, slow))).await;

        let requests = tokio::spawn(async move {
            for _ in 0..3 {
                let (status, _) = get(addr, "/v1/status").await;
                assert!(status.contains("200"), "{status}");
            }
        });
        let mut longest = Duration::ZERO;
        while !requests.is_finished() {
            let before = Instant::now();
            tokio::time::sleep(Duration::from_millis(10)).await;
            longest = longest.max(before.elapsed());
        }
        requests.await.unwrap();
        assert!(
            longest < Duration::from_millis(800),
            "a 10 ms timer waited {longest:?} behind an API request"
        );
    }

    // ---- the token, the limiter, read-only mode, actions ----------------------------------

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    /// One request from `from` (a loopback address of the client's choosing, so that tests can
    /// be several clients) with an optional bearer token and JSON body.
    async fn request_from(
        from: std::net::IpAddr,
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Reply {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let body = body.unwrap_or("");
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Reply {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }

    async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Reply {
        request_from(
            "127.0.0.1".parse().unwrap(),
            addr,
            method,
            path,
            token,
            body,
        )
        .await
    }

    async fn serve_with_clients(router: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        addr
    }

    const TOKEN: &str = "0123456789abcdef";

    /// `web` with releases 1 (complete) and 2 (complete), both images in a real store, and
    /// the API over them with the token.
    fn two_releases(dir: &std::path::Path) -> (ApiConfig, Arc<FakeProvider>) {
        let (path, fake) = web_deployed(dir);
        let mut db = StateDb::open(&path).unwrap();
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "web", "replicas": 2})).unwrap();
        db.record_release("web", &spec, &Digest::of(b"v2"), "apply", None, "test")
            .unwrap();
        db.record_outcome("web", 2, crate::state::ReleaseOutcome::Complete, "", "test")
            .unwrap();
        let store = Store::open(&dir.join("store")).unwrap();
        assert_eq!(store.put_blob(b"v1").unwrap(), Digest::of(b"v1"));
        assert_eq!(store.put_blob(b"v2").unwrap(), Digest::of(b"v2"));
        let mut config = ApiConfig::new(path.clone(), fake.clone());
        config.store = Some(store);
        config.token = Some(TOKEN.to_owned());
        config.planner = Some(test_planner(path, fake.clone()));
        (config, fake)
    }

    /// A planner made of the pieces `imago plan` plans with, for services of a stored image
    /// (every image here is `Digest::of(b"v3")`): the binary's planner also builds and pulls.
    fn test_planner(db_path: PathBuf, fake: Arc<FakeProvider>) -> Planner {
        Arc::new(move |input: PlanInput| {
            let path = input.dir.unwrap_or_default().join("imago.toml");
            let specs = crate::services::parse_services(&path, &input.text, &[])
                .map_err(|e| e.to_string())?;
            let limits = crate::spec::validate_all(&specs).map_err(|e| e.to_string())?;
            let db = StateDb::open(&db_path).map_err(|e| e.to_string())?;
            let running = fake.list().map_err(|e| e.to_string())?;
            let mut plans = Vec::new();
            for (name, spec) in &specs {
                let current = db.desired(name).map_err(|e| e.to_string())?;
                plans.push(
                    crate::plan::plan_service(
                        name,
                        spec,
                        limits[name],
                        current.as_ref(),
                        Some(Digest::of(b"v3")),
                        &running,
                    )
                    .map_err(|e| e.to_string())?,
                );
            }
            serde_json::to_value(plans).map_err(|e| e.to_string())
        })
    }

    /// A definition of `web` (deployed) and `api` (new), for `POST /v1/plan`.
    const PLAN_TOML: &str =
        "[service.web]\nimage = \"web\"\nreplicas = 3\n\n[service.api]\nimage = \"api\"\n";

    #[tokio::test]
    async fn actions_need_the_token_and_reads_need_it_only_beyond_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = two_releases(dir.path());
        let addr = serve_with_clients(router(config.clone())).await;
        let rollback = "/v1/services/web/rollback";

        assert_eq!(
            request(addr, "GET", "/v1/services", None, None)
                .await
                .status,
            200
        );
        for token in [None, Some("wrong"), Some("0123456789abcdeX"), Some("")] {
            let reply = request(addr, "POST", rollback, token, None).await;
            assert_eq!(reply.status, 401, "token {token:?}");
            assert!(reply.body.is_empty(), "a 401 says nothing: {}", reply.body);
            assert!(
                reply.head.contains("www-authenticate: Bearer"),
                "{}",
                reply.head
            );
        }
        // Nothing was recorded by the refused attempts.
        let db = StateDb::open(&config.db_path).unwrap();
        assert_eq!(db.history("web").unwrap().len(), 2);

        let mut beyond = config.clone();
        beyond.token_for_reads = true;
        let addr = serve_with_clients(router(beyond)).await;
        for path in ["/v1/services", "/v1/events", "/metrics", "/v1/openapi.json"] {
            assert_eq!(
                request(addr, "GET", path, None, None).await.status,
                401,
                "{path}"
            );
            assert_eq!(
                request(addr, "GET", path, Some(TOKEN), None).await.status,
                200,
                "{path}"
            );
        }
        // The console's files carry no data: the page loads and then asks for the token.
        for path in ["/", "/console.js", "/console.css"] {
            let reply = request(addr, "GET", path, None, None).await;
            assert_eq!(reply.status, 200, "{path}");
            assert!(
                reply.head.contains("content-security-policy"),
                "{}",
                reply.head
            );
        }
        assert!(needs_token_for_reads("0.0.0.0:7878".parse().unwrap()));
        assert!(needs_token_for_reads("10.1.2.3:7878".parse().unwrap()));
        assert!(!needs_token_for_reads("127.0.0.1:7878".parse().unwrap()));
        assert!(!needs_token_for_reads("[::1]:7878".parse().unwrap()));
    }

    #[tokio::test]
    async fn failed_attempts_are_limited_per_client() {
        let dir = tempfile::tempdir().unwrap();
        let (mut config, _) = two_releases(dir.path());
        config.token_for_reads = true;
        let addr = serve_with_clients(router(config)).await;
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        for _ in 0..auth::MAX_FAILURES {
            let reply = request_from(a, addr, "GET", "/v1/status", Some("guess"), None).await;
            assert_eq!(reply.status, 401);
        }
        // Over the limit, even the right token is refused for the rest of the window.
        let reply = request_from(a, addr, "GET", "/v1/status", Some(TOKEN), None).await;
        assert_eq!(reply.status, 429, "{}", reply.head);
        assert!(reply.head.contains("retry-after:"), "{}", reply.head);
        // Another client is not held back by the first one's failures.
        let reply = request_from(b, addr, "GET", "/v1/status", Some(TOKEN), None).await;
        assert_eq!(reply.status, 200);
    }

    #[tokio::test]
    async fn read_only_mode_answers_actions_with_403_and_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut config, _) = two_releases(dir.path());
        config.read_only = true;
        let db_path = config.db_path.clone();
        let addr = serve_with_clients(router(config)).await;
        for action in ["rollback", "restart", "pause", "resume"] {
            let path = format!("/v1/services/web/{action}");
            let reply = request(addr, "POST", &path, Some(TOKEN), None).await;
            assert_eq!(reply.status, 403, "{action}: {}", reply.body);
            assert_eq!(request(addr, "POST", &path, None, None).await.status, 401);
        }
        assert_eq!(
            request(addr, "GET", "/v1/services", None, None)
                .await
                .status,
            200
        );
        let info: serde_json::Value =
            serde_json::from_str(&request(addr, "GET", "/v1/info", None, None).await.body).unwrap();
        assert_eq!(info["read_only"], true);
        let db = StateDb::open(&db_path).unwrap();
        assert_eq!(db.history("web").unwrap().len(), 2);
        assert_eq!(db.paused("web").unwrap(), None);
    }

    #[tokio::test]
    async fn pause_resume_and_restart_are_recorded_as_the_cli_records_them() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = two_releases(dir.path());
        let db_path = config.db_path.clone();
        let addr = serve_with_clients(router(config)).await;
        let json = |reply: Reply| {
            assert!(reply.status < 300, "{}: {}", reply.status, reply.body);
            serde_json::from_str::<serde_json::Value>(&reply.body).unwrap()
        };
        let post = |path: &'static str| request(addr, "POST", path, Some(TOKEN), None);

        let paused = json(post("/v1/services/web/pause").await);
        assert_eq!(
            (paused["paused"].clone(), paused["changed"].clone()),
            (true.into(), true.into())
        );
        let again = json(post("/v1/services/web/pause").await);
        assert_eq!(
            again["changed"], false,
            "pausing a paused service changes nothing"
        );
        let db = StateDb::open(&db_path).unwrap();
        assert_eq!(db.paused("web").unwrap().unwrap().actor, "api");
        let status = json(request(addr, "GET", "/v1/services/web", None, None).await);
        assert_eq!(status["paused"]["actor"], "api");
        let overview = json(request(addr, "GET", "/v1/overview", None, None).await);
        assert_eq!(overview[0]["paused"], true);
        let resumed = json(post("/v1/services/web/resume").await);
        assert_eq!(
            (resumed["paused"].clone(), resumed["changed"].clone()),
            (false.into(), true.into())
        );
        assert_eq!(db.paused("web").unwrap(), None);
        let kinds: Vec<String> = db
            .events(Some("web"), 0)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| *k == "pause").count(),
            1,
            "{kinds:?}"
        );
        assert_eq!(
            kinds.iter().filter(|k| *k == "resume").count(),
            1,
            "{kinds:?}"
        );

        let before = db.desired("web").unwrap().unwrap();
        let accepted = json(post("/v1/services/web/restart").await);
        assert_eq!(accepted["release"], before.number + 1);
        assert_eq!(accepted["restart"], 1);
        let after = db.desired("web").unwrap().unwrap();
        assert_eq!(
            (&after.image_digest, &after.config_hash, after.restart),
            (&before.image_digest, &before.config_hash, 1)
        );
        assert_ne!(after.revision, before.revision);
        for action in ["pause", "restart"] {
            let path = format!("/v1/services/nope/{action}");
            assert_eq!(
                request(addr, "POST", &path, Some(TOKEN), None).await.status,
                404
            );
        }
    }

    #[tokio::test]
    async fn plan_answers_the_planners_document_or_its_error_and_needs_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = two_releases(dir.path());
        let addr = serve_with_clients(router(config.clone())).await;
        let reply = request(addr, "POST", "/v1/plan", Some(TOKEN), Some(PLAN_TOML)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let plans: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(plans[0]["service"], "api");
        assert_eq!(plans[0]["action"], "first release");
        assert_eq!(plans[1]["service"], "web");
        assert_eq!(plans[1]["action"], "new release");
        assert_eq!(plans[1]["current_release"], 2);
        assert!(!plans[1]["rollout"]["waves"].as_array().unwrap().is_empty());
        let bad = request(
            addr,
            "POST",
            "/v1/plan",
            Some(TOKEN),
            Some("[service.x]\nreplicas = \"many\"\n"),
        )
        .await;
        assert_eq!(bad.status, 422, "{}", bad.body);
        assert!(
            bad.body.contains("imago.toml"),
            "the error names the file: {}",
            bad.body
        );
        assert_eq!(
            request(addr, "POST", "/v1/plan", None, Some(PLAN_TOML))
                .await
                .status,
            401
        );
        let relative = request(
            addr,
            "POST",
            "/v1/plan?dir=relative",
            Some(TOKEN),
            Some(PLAN_TOML),
        )
        .await;
        assert_eq!(relative.status, 400, "{}", relative.body);
        // Nothing was recorded.
        let db = StateDb::open(&config.db_path).unwrap();
        assert_eq!(db.history("web").unwrap().len(), 2);
        assert!(db.history("api").unwrap().is_empty());
    }

    #[tokio::test]
    async fn rollback_records_the_release_the_cli_would() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = two_releases(dir.path());
        let db_path = config.db_path.clone();
        let store = config.store.clone().unwrap();
        let addr = serve_with_clients(router(config)).await;

        // Default target: the last completed release with another revision.
        let reply = request(addr, "POST", "/v1/services/web/rollback", Some(TOKEN), None).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        let accepted: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(accepted["release"], 3);
        assert_eq!(accepted["restores"], 1);
        let db = StateDb::open(&db_path).unwrap();
        let three = db.release("web", 3).unwrap();
        let one = db.release("web", 1).unwrap();
        assert_eq!(db.desired("web").unwrap().unwrap().number, 3);
        assert_eq!(three.revision, one.revision);
        assert_eq!(three.rollback_of, Some(1));
        assert_eq!(three.reason, "rollback to release 1");
        assert_eq!(
            db.events(Some("web"), 0).unwrap().last().unwrap().actor,
            "api"
        );

        // An explicit target, with a body.
        let reply = request(
            addr,
            "POST",
            "/v1/services/web/rollback",
            Some(TOKEN),
            Some(r#"{"to": 2}"#),
        )
        .await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        assert_eq!(db.desired("web").unwrap().unwrap().rollback_of, Some(2));

        // Errors name what is wrong, with the status that fits.
        let reply = request(
            addr,
            "POST",
            "/v1/services/nope/rollback",
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(reply.status, 404, "{}", reply.body);
        let reply = request(
            addr,
            "POST",
            "/v1/services/web/rollback",
            Some(TOKEN),
            Some(r#"{"to": 9}"#),
        )
        .await;
        assert_eq!(reply.status, 404, "{}", reply.body);
        let reply = request(
            addr,
            "POST",
            "/v1/services/web/rollback",
            Some(TOKEN),
            Some("{nope"),
        )
        .await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        std::fs::remove_file(store.blob_path(&Digest::of(b"v1"))).unwrap();
        let reply = request(
            addr,
            "POST",
            "/v1/services/web/rollback",
            Some(TOKEN),
            Some(r#"{"to": 1}"#),
        )
        .await;
        assert_eq!(reply.status, 409, "{}", reply.body);
        assert!(
            reply.body.contains("no longer in the store"),
            "{}",
            reply.body
        );
        assert!(
            reply.body.contains(&Digest::of(b"v1").to_string()),
            "{}",
            reply.body
        );
    }

    #[tokio::test]
    async fn events_filter_by_service_kind_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = two_releases(dir.path());
        let db = StateDb::open(&config.db_path).unwrap();
        for i in 0..5 {
            db.event(Some("web"), "drift", &format!("drift {i}"), "test")
                .unwrap();
        }
        db.event(Some("other"), "drift", "elsewhere", "test")
            .unwrap();
        let addr = serve_with_clients(router(config)).await;
        let events = |body: String| -> Vec<Event> {
            serde_json::from_str::<Vec<serde_json::Value>>(&body)
                .unwrap()
                .into_iter()
                .map(|v| Event {
                    seq: v["seq"].as_u64().unwrap(),
                    at_ms: v["at_ms"].as_u64().unwrap(),
                    service: v["service"].as_str().map(str::to_owned),
                    kind: v["kind"].as_str().unwrap().to_owned(),
                    message: v["message"].as_str().unwrap().to_owned(),
                    actor: v["actor"].as_str().unwrap().to_owned(),
                })
                .collect()
        };
        let got = events(
            request(
                addr,
                "GET",
                "/v1/events?service=web&kind=drift&limit=2",
                None,
                None,
            )
            .await
            .body,
        );
        let messages: Vec<&str> = got.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["drift 3", "drift 4"]);
        let got = events(
            request(addr, "GET", "/v1/events?kind=drift", None, None)
                .await
                .body,
        );
        assert_eq!(got.len(), 6);
        let since = got[4].seq;
        let got = events(
            request(
                addr,
                "GET",
                &format!("/v1/events?since={since}"),
                None,
                None,
            )
            .await
            .body,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message, "elsewhere");
        // The overview counts the drift events of each service.
        let overview: serde_json::Value =
            serde_json::from_str(&request(addr, "GET", "/v1/overview", None, None).await.body)
                .unwrap();
        assert_eq!(overview[0]["name"], "web");
        assert_eq!(overview[0]["drift_events"], 5);
        assert_eq!(overview[0]["release"], 2);
        assert_eq!(overview[0]["desired"], 2);
        assert_eq!(overview[0]["state"], "complete");
    }

    /// Reads a streamed response until `until` holds for what arrived, or fails after 5 s.
    async fn read_until(
        stream: &mut tokio::net::TcpStream,
        seen: &mut String,
        until: impl Fn(&str) -> bool,
    ) {
        use tokio::io::AsyncReadExt;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 4096];
        while !until(seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("the stream did not deliver; so far:\n{seen}"))
                .unwrap();
            assert!(n > 0, "the stream ended; so far:\n{seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }

    #[tokio::test]
    async fn the_event_stream_sends_new_events_and_overview_changes() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (config, fake) = two_releases(dir.path());
        let db_path = config.db_path.clone();
        let addr = serve_with_clients(router(config)).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /v1/events/stream?service=web HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut seen = String::new();
        read_until(&mut stream, &mut seen, |s| {
            s.contains("event: overview") && s.contains("event: event")
        })
        .await;
        assert!(seen.contains("text/event-stream"), "{seen}");
        assert!(seen.contains(r#""running":1"#), "{seen}");

        // A new event arrives without a new request...
        let db = StateDb::open(&db_path).unwrap();
        db.event(Some("web"), "drift", "instance x died", "test")
            .unwrap();
        db.event(Some("other"), "drift", "not for this stream", "test")
            .unwrap();
        read_until(&mut stream, &mut seen, |s| s.contains("instance x died")).await;
        // ... and so does a change no event records: a second instance starts.
        let release = db.release("web", 2).unwrap();
        fake.launch(&instance_spec(&release, Engine::default()).unwrap())
            .unwrap();
        read_until(&mut stream, &mut seen, |s| s.contains(r#""running":2"#)).await;
        assert!(!seen.contains("not for this stream"), "{seen}");
    }

    /// A database of `services` deployed services (one instance each in the fake provider)
    /// and `events` events spread over them, every tenth a drift event.
    fn crowded(
        dir: &std::path::Path,
        services: usize,
        events: usize,
    ) -> (PathBuf, Arc<FakeProvider>) {
        let path = dir.join("state.db");
        let mut db = StateDb::open(&path).unwrap();
        let fake = Arc::new(FakeProvider::new());
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "web"})).unwrap();
        for i in 0..services {
            let name = format!("svc{i:03}");
            let (release, _) = db
                .record_release(&name, &spec, &Digest::of(b"v1"), "apply", None, "test")
                .unwrap();
            db.record_outcome(&name, 1, crate::state::ReleaseOutcome::Complete, "", "test")
                .unwrap();
            fake.launch(&instance_spec(&release, Engine::default()).unwrap())
                .unwrap();
        }
        let have = db.last_event_seq().unwrap() as usize;
        for i in have..events {
            let kind = if i % 10 == 0 { "drift" } else { "launch" };
            db.event(
                Some(&format!("svc{:03}", i % services)),
                kind,
                &format!("event {i}"),
                "test",
            )
            .unwrap();
        }
        (path, fake)
    }

    fn median(mut samples: Vec<Duration>) -> Duration {
        samples.sort();
        samples[samples.len() / 2]
    }

    /// Fifty open consoles share one poller: their streams cost the database one read per
    /// interval, whatever their number. Counted by the reads of the instance list.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_streams_share_one_poller_and_each_gets_every_event() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counting(Arc<FakeProvider>, Arc<AtomicUsize>);
        impl Provider for Counting {
            fn launch(&self, spec: &InstanceSpec) -> Result<Instance, RuntimeError> {
                self.0.launch(spec)
            }
            fn stop(&self, id: &str, grace: Duration) -> Result<Instance, RuntimeError> {
                self.0.stop(id, grace)
            }
            fn remove(&self, id: &str) -> Result<(), RuntimeError> {
                self.0.remove(id)
            }
            fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
                self.1.fetch_add(1, Ordering::SeqCst);
                self.0.list()
            }
            fn inspect(&self, id: &str) -> Result<Instance, RuntimeError> {
                self.0.inspect(id)
            }
            fn logs(&self, id: &str) -> Result<Vec<u8>, RuntimeError> {
                self.0.logs(id)
            }
        }
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (path, fake) = crowded(dir.path(), 3, 10);
        let lists = Arc::new(AtomicUsize::new(0));
        let provider = Arc::new(Counting(fake, lists.clone()));
        let addr = serve_with_clients(router(ApiConfig::new(path.clone(), provider))).await;
        let mut streams = Vec::new();
        for _ in 0..50 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /v1/events/stream?service=svc001 HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            streams.push(s);
        }
        // Each stream's own first read (the newest events and the overview) is done...
        let mut seen: Vec<String> = vec![String::new(); streams.len()];
        for (s, seen) in streams.iter_mut().zip(&mut seen) {
            read_until(s, seen, |t| t.contains("event: overview")).await;
        }
        // ... and from then on one poller serves them all.
        let before = lists.load(Ordering::SeqCst);
        let db = StateDb::open(&path).unwrap();
        db.event(Some("svc001"), "drift", "for every console", "test")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2600)).await;
        let polls = lists.load(Ordering::SeqCst) - before;
        // 2.6 s is five or six polls; fifty streams polling on their own would be ~260.
        assert!(
            polls <= 8,
            "{polls} instance listings in 2.6 s for 50 streams"
        );
        for (s, seen) in streams.iter_mut().zip(&mut seen) {
            read_until(s, seen, |t| t.contains("for every console")).await;
            for block in seen.split("\n\n").filter(|b| b.contains("event: event")) {
                assert!(
                    block.contains(r#""service":"svc001""#),
                    "not asked for: {block}"
                );
            }
        }
    }

    /// The console's costs with a crowded database: the overview with 100 services and 10,000
    /// events, and a controller pass with and without 50 open event streams. A benchmark, not
    /// a check: `scripts/bench-console` runs it (debug or release) and prints the medians.
    #[test]
    #[ignore = "a benchmark: scripts/bench-console"]
    fn bench_console() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (path, fake) = crowded(dir.path(), 100, 10_000);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let addr = runtime.block_on(serve_with_clients(router(ApiConfig::new(
            path.clone(),
            fake.clone(),
        ))));
        let http_overview = || {
            median(
                (0..41)
                    .map(|_| {
                        let started = Instant::now();
                        let reply =
                            runtime.block_on(request(addr, "GET", "/v1/overview", None, None));
                        assert_eq!(reply.status, 200);
                        started.elapsed()
                    })
                    .collect(),
            )
        };
        // What a request does, without HTTP: a fresh connection, the rows.
        let instances = fake.list().unwrap();
        let rows_only = || {
            median(
                (0..41)
                    .map(|_| {
                        let started = Instant::now();
                        let db = StateDb::open(&path).unwrap();
                        assert_eq!(overview_rows(&db, &instances).unwrap().len(), 100);
                        started.elapsed()
                    })
                    .collect(),
            )
        };
        // Measured with and without indexes on the events table (service, seq), (kind, service)
        // and on release_outcomes (service, number): no difference, so there are none.
        let (http, rows) = (http_overview(), rows_only());
        let quick = std::env::var_os("IMAGO_BENCH_OVERVIEW_ONLY").is_some();
        let mut controller = crate::controller::Controller::new(
            StateDb::open(&path).unwrap(),
            fake.clone(),
            runtime.handle().clone(),
            Engine::Embedded,
        );
        let mut passes = |n: usize| -> Duration {
            median(
                (0..n)
                    .map(|_| {
                        let started = Instant::now();
                        controller.pass().unwrap();
                        let took = started.elapsed();
                        std::thread::sleep(Duration::from_millis(20));
                        took
                    })
                    .collect(),
            )
        };
        println!(
            "| overview, 100 services, 10,000 events: GET /v1/overview | {:.1} ms | rows alone {:.1} ms |",
            http.as_secs_f64() * 1000.0,
            rows.as_secs_f64() * 1000.0
        );
        if quick {
            return;
        }
        passes(3);
        let alone = passes(60);
        let streams: Vec<tokio::net::TcpStream> = runtime.block_on(async {
            let mut streams = Vec::new();
            for _ in 0..50 {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                streams.push(s);
            }
            streams
        });
        // Read what they are sent, as browsers would.
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                runtime.spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 65536];
                    while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        let with_streams = passes(60);
        for r in readers {
            r.abort();
        }
        println!(
            "| controller pass, 100 services, no event stream | {:.2} ms |",
            alone.as_secs_f64() * 1000.0
        );
        println!(
            "| controller pass, 100 services, 50 event streams | {:.2} ms |",
            with_streams.as_secs_f64() * 1000.0
        );
    }

    // ---- metrics ---------------------------------------------------------------------------

    #[tokio::test]
    async fn metrics_are_prometheus_text_counted_from_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = two_releases(dir.path());
        let db = StateDb::open(&config.db_path).unwrap();
        db.event(Some("web"), "drift", "died", "test").unwrap();
        db.event(Some("web"), "drift", "died again", "test")
            .unwrap();
        crate::metrics::live().observe_pass(Duration::from_millis(3));
        crate::metrics::live().observe_health_check("http", "healthy", Duration::from_millis(1));
        let addr = serve_with_clients(router(config)).await;
        let reply = request(addr, "GET", "/metrics", None, None).await;
        assert_eq!(reply.status, 200);
        assert!(
            reply.head.contains("application/openmetrics-text"),
            "{}",
            reply.head
        );
        let lines = reply.body.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .map(|s| s.value.clone())
                .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", reply.body))
        };
        use prometheus_parse::Value;
        // prometheus-parse reads the Prometheus 0.0.4 text format, where a counter's samples
        // carry the family's name; OpenMetrics adds `_total` to them, so it types them as
        // untyped. The TYPE lines say what they are.
        for family in [
            "imago_rollouts counter",
            "imago_drift_events counter",
            "imago_instances gauge",
        ] {
            assert!(
                reply.body.contains(&format!("# TYPE {family}\n")),
                "{}",
                reply.body
            );
        }
        let number = |value: Value| match value {
            Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => n,
            other => panic!("not a number: {other:?}"),
        };
        assert_eq!(
            number(value(
                "imago_rollouts_total",
                &[("service", "web"), ("outcome", "complete")]
            )),
            2.0
        );
        assert_eq!(
            number(value("imago_drift_events_total", &[("service", "web")])),
            2.0
        );
        assert!(matches!(
            value("imago_instances", &[("service", "web"), ("release", "1"), ("state", "running")]),
            Value::Gauge(n) if n == 1.0
        ));
        for histogram in [
            "imago_rollout_duration_seconds",
            "imago_controller_pass_duration_seconds",
            "imago_health_check_duration_seconds",
        ] {
            assert!(
                scrape.samples.iter().any(|s| s.metric == histogram
                    && matches!(&s.value, Value::Histogram(b) if !b.is_empty())),
                "no histogram {histogram} in\n{}",
                reply.body
            );
        }
    }

    // ---- the OpenAPI document ----------------------------------------------------------------

    /// Checks `value` against `schema` for the keywords the document uses (type, required,
    /// properties, items, enum, allOf, oneOf, minimum, pattern prefix, $ref to components);
    /// returns the first mismatch.
    fn check_schema(
        doc: &serde_json::Value,
        schema: &serde_json::Value,
        value: &serde_json::Value,
        at: &str,
    ) -> Result<(), String> {
        use serde_json::Value as V;
        if let Some(reference) = schema["$ref"].as_str() {
            let name = reference.strip_prefix("#/components/schemas/").unwrap();
            let target = &doc["components"]["schemas"][name];
            assert!(!target.is_null(), "undefined schema {reference}");
            return check_schema(doc, target, value, at);
        }
        if let Some(all) = schema["allOf"].as_array() {
            for s in all {
                check_schema(doc, s, value, at)?;
            }
        }
        if let Some(any) = schema["oneOf"].as_array() {
            let matching = any
                .iter()
                .filter(|s| check_schema(doc, s, value, at).is_ok())
                .count();
            if matching != 1 {
                return Err(format!(
                    "{at}: {matching} alternatives of oneOf match {value}"
                ));
            }
        }
        let type_name = match value {
            V::Null => "null",
            V::Bool(_) => "boolean",
            V::Number(n) if n.is_u64() || n.is_i64() => "integer",
            V::Number(_) => "number",
            V::String(_) => "string",
            V::Array(_) => "array",
            V::Object(_) => "object",
        };
        let types: Vec<&str> = match &schema["type"] {
            V::String(t) => vec![t.as_str()],
            V::Array(ts) => ts.iter().filter_map(V::as_str).collect(),
            _ => vec![],
        };
        if !types.is_empty()
            && !types
                .iter()
                .any(|t| *t == type_name || (*t == "number" && type_name == "integer"))
        {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
        if let Some(values) = schema["enum"].as_array()
            && !values.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {values:?}"));
        }
        if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), value.as_f64())
            && n < min
        {
            return Err(format!("{at}: {n} < {min}"));
        }
        if let (Some(pattern), Some(text)) = (schema["pattern"].as_str(), value.as_str()) {
            // The only pattern used is a digest's.
            assert_eq!(pattern, "^sha256:[0-9a-f]{64}$");
            let hex = text.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{at}: {text} is not a digest"));
            }
        }
        if let V::Object(map) = value {
            for key in schema["required"].as_array().into_iter().flatten() {
                let key = key.as_str().unwrap();
                if !map.contains_key(key) {
                    return Err(format!("{at}: missing {key} in {value}"));
                }
            }
            if let Some(properties) = schema["properties"].as_object() {
                for (key, sub) in properties {
                    if let Some(v) = map.get(key) {
                        check_schema(doc, sub, v, &format!("{at}.{key}"))?;
                    }
                }
            }
        }
        if let (V::Array(items), Some(item_schema)) = (value, schema.get("items")) {
            for (i, item) in items.iter().enumerate() {
                check_schema(doc, item_schema, item, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn the_schema_check_catches_mismatches() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let event = serde_json::json!({"$ref": "#/components/schemas/Event"});
        let good = serde_json::json!({"seq": 1, "at_ms": 5, "service": null, "kind": "k",
            "message": "m", "actor": "a"});
        assert_eq!(check_schema(&doc, &event, &good, "$"), Ok(()));
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("kind");
        assert!(check_schema(&doc, &event, &missing, "$").is_err());
        let mut wrong = good.clone();
        wrong["seq"] = serde_json::json!("one");
        assert!(check_schema(&doc, &event, &wrong, "$").is_err());
        let outcome = serde_json::json!({"$ref": "#/components/schemas/Outcome"});
        let bad = serde_json::json!({"number": 1, "outcome": "fine", "detail": "", "at_ms": 1});
        assert!(check_schema(&doc, &outcome, &bad, "$").is_err());
    }

    #[tokio::test]
    async fn every_route_is_documented_and_answers_as_documented() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .map(|m| (m.to_uppercase(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut routed: Vec<(String, String)> = listed_routes()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_owned()))
            .collect();
        documented.sort();
        routed.sort();
        assert_eq!(
            documented, routed,
            "the router and the OpenAPI document differ"
        );

        let dir = tempfile::tempdir().unwrap();
        let (mut config, fake) = two_releases(dir.path());
        config.rootfs = Some(RootfsCache::new(dir.path().join("rootfs")));
        let instance = fake.list().unwrap()[0].id.clone();
        let addr = serve_with_clients(router(config)).await;
        for (method, path) in &routed {
            let concrete = path.replace("{name}", "web").replace("{id}", &instance);
            let operation = &doc["paths"][path.as_str()][method.to_lowercase()];
            if path == "/v1/events/stream" {
                continue; // never ends: the_event_stream_sends_new_events_and_overview_changes
            }
            let body = (path == "/v1/plan").then_some(PLAN_TOML);
            let reply = request(addr, method, &concrete, Some(TOKEN), body).await;
            let response = &operation["responses"][reply.status.to_string()];
            assert!(
                !response.is_null(),
                "{method} {path} answered {} which is not documented: {}",
                reply.status,
                reply.body
            );
            assert!(
                reply.status < 300,
                "{method} {path} answered {}: {}",
                reply.status,
                reply.body
            );
            let (content_type, media) = response["content"]
                .as_object()
                .unwrap()
                .iter()
                .next()
                .unwrap();
            assert!(
                reply
                    .head
                    .contains(&format!("content-type: {content_type}")),
                "{method} {path}: {}",
                reply.head
            );
            if content_type == "application/json" {
                let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
                check_schema(&doc, &media["schema"], &body, &format!("{method} {path}")).unwrap();
            }
            // Unknown names are documented 404s.
            if path.contains("{name}") && method == "GET" {
                let reply =
                    request(addr, method, &path.replace("{name}", "nope"), None, None).await;
                assert_eq!(reply.status, 404, "{path}");
                assert!(!operation["responses"]["404"].is_null(), "{path}");
            }
        }
    }
}
