//! The Docker Swarm engine: a release becomes a swarm service (image pinned by digest, labels
//! with the release number and configuration hash, `update_config` from the rollout settings),
//! created or updated through a manager's Docker API (bollard, API version negotiated: Debian's
//! daemon speaks 1.41), read back as the service's update status and its tasks, and removed.
//! It implements [`imago_spec::cluster::ClusterEngine`]; imago-deploy's controller decides.
//! Service specs are read as JSON (reqwest, same endpoint) and then into bollard's types, to
//! keep the health check that bollard's own reads lose (see `service_from_json`).
#![forbid(unsafe_code)]

mod render;
mod ssh;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use bollard::Docker;
use bollard::models::{
    NetworkCreateRequest, NetworkInspect, Service, ServiceSpec, ServiceUpdateStatusStateEnum, Task,
    TaskState,
};
use bollard::query_parameters::{
    InspectNetworkOptions, ListNodesOptions, ListTasksOptionsBuilder, UpdateServiceOptionsBuilder,
};
use imago_spec::cluster::{
    ClusterComparison, ClusterEngine, ClusterObservation, ClusterService, ClusterTask, EngineError,
    LABEL_CONFIG_HASH, LABEL_RELEASE, LABEL_REVISION, LABEL_SERVICE, TaskPhase, UpdateState,
};

pub use render::{TASK_NETWORK, differences, release_labels, render};

const ENGINE: &str = "swarm";

/// The label of a [`TASK_NETWORK`] that imago made (and so removes once no service uses it).
const TASK_NETWORK_LABEL: &str = "imago.purpose";

/// How many times `apply` makes [`TASK_NETWORK`] again when a concurrent destroy removed it
/// between its look and the daemon's use of it.
const APPLY_ATTEMPTS: u32 = 3;

/// How long `destroy` keeps asking the daemon to remove an unused [`TASK_NETWORK`] while it
/// answers that a task still uses it (the tasks of a service just removed, until the
/// orchestrator marks them for removal).
const NETWORK_REMOVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Client certificate files for a TLS Docker endpoint, in docker's `DOCKER_CERT_PATH` layout:
/// `ca.pem` (the CA that signed the daemon's certificate), `cert.pem` and `key.pem` (the
/// client's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerTls {
    pub cert_dir: PathBuf,
}

/// A swarm manager's Docker API, with a small runtime of its own: the controller is synchronous,
/// bollard is not. Call it from a thread that is not inside a tokio runtime.
pub struct SwarmEngine {
    endpoint: String,
    docker: Docker,
    /// Reads of service specs, as the daemon writes them (see [`service_from_json`]).
    raw: reqwest::Client,
    /// `http://docker` for a unix socket, else `http(s)://HOST:PORT`.
    raw_base: String,
    /// For an `ssh://` endpoint: the local socket both clients connect to, forwarded over ssh.
    /// Declared after the clients, which close their connections first when dropped.
    tunnel: Option<ssh::SshTunnel>,
    /// The id of [`TASK_NETWORK`] as this engine found or made it: not asked again until an
    /// apply fails or a destroy removes it.
    task_network: Option<String>,
    /// Network id -> name, as looked up for the comparison of live specs (ids do not change).
    network_names: HashMap<String, String>,
    runtime: tokio::runtime::Runtime,
}

impl Drop for SwarmEngine {
    fn drop(&mut self) {
        let runtime = &self.runtime;
        if let Some(tunnel) = &mut self.tunnel {
            if tokio::runtime::Handle::try_current().is_ok() {
                // A thread of a runtime (a worker, or `spawn_blocking`'s, as the API's) may
                // refuse `block_on`: the ssh processes are killed and reaped from a thread of
                // their own.
                std::thread::scope(|scope| {
                    scope.spawn(|| tunnel.close(runtime));
                });
            } else {
                tunnel.close(runtime);
            }
        }
    }
}

impl std::fmt::Debug for SwarmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmEngine")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// How long one Docker API call may take, in seconds.
const API_TIMEOUT_S: u64 = 60;

impl SwarmEngine {
    /// Connects to the Docker API at `endpoint` (`unix:///PATH`, `tcp://HOST:PORT` in plain
    /// HTTP, or `ssh://[USER@]HOST[:PORT]`) and negotiates the version.
    pub fn connect(endpoint: &str) -> Result<SwarmEngine, EngineError> {
        SwarmEngine::connect_with(endpoint, None)
    }

    /// As [`SwarmEngine::connect`]; with `tls`, a `tcp://HOST:PORT` endpoint is spoken to over
    /// TLS with the client certificate of `tls` (docker's `DOCKER_TLS_VERIFY` and
    /// `DOCKER_CERT_PATH`: the daemon's certificate must chain to `ca.pem`).
    pub fn connect_with(
        endpoint: &str,
        tls: Option<&DockerTls>,
    ) -> Result<SwarmEngine, EngineError> {
        let api = |message: String| EngineError::Api {
            engine: ENGINE,
            endpoint: endpoint.to_owned(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| api(format!("cannot start a runtime: {e}")))?;
        let version = bollard::API_DEFAULT_VERSION;
        let timeout = std::time::Duration::from_secs(API_TIMEOUT_S);
        let raw = reqwest::Client::builder().timeout(timeout);
        let mut tunnel = None;
        let (docker, raw, raw_base) = if endpoint.starts_with("ssh://") {
            if tls.is_some() {
                return Err(api("TLS applies to tcp:// endpoints only".to_owned()));
            }
            let destination = ssh::SshDestination::parse(endpoint).map_err(api)?;
            let started = ssh::SshTunnel::start(&destination, &runtime)
                .map_err(|e| api(format!("cannot make the local socket for ssh: {e}")))?;
            let socket = started.socket();
            tunnel = Some(started);
            let Some(path) = socket.to_str() else {
                return Err(api(format!("{}: not UTF-8", socket.display())));
            };
            (
                Docker::connect_with_unix(path, API_TIMEOUT_S, version),
                raw.unix_socket(socket.as_path()),
                "http://docker".to_owned(),
            )
        } else if let Some(path) = endpoint.strip_prefix("unix://") {
            if tls.is_some() {
                return Err(api("TLS applies to tcp:// endpoints only".to_owned()));
            }
            (
                Docker::connect_with_unix(path, API_TIMEOUT_S, version),
                raw.unix_socket(path),
                "http://docker".to_owned(),
            )
        } else if let Some(addr) = endpoint.strip_prefix("tcp://") {
            match tls {
                None => (
                    Docker::connect_with_http(addr, API_TIMEOUT_S, version),
                    raw,
                    format!("http://{addr}"),
                ),
                Some(tls) => {
                    let file = |name: &str| tls.cert_dir.join(name);
                    let read = |name: &str| {
                        std::fs::read(file(name))
                            .map_err(|e| api(format!("{}: {e}", file(name).display())))
                    };
                    let ca = reqwest::Certificate::from_pem(&read("ca.pem")?)
                        .map_err(|e| api(format!("{}: {e}", file("ca.pem").display())))?;
                    let mut identity = read("cert.pem")?;
                    identity.push(b'\n');
                    identity.extend(read("key.pem")?);
                    let identity = reqwest::Identity::from_pem(&identity).map_err(|e| {
                        api(format!(
                            "{} and {}: {e}",
                            file("cert.pem").display(),
                            file("key.pem").display()
                        ))
                    })?;
                    (
                        Docker::connect_with_ssl(
                            addr,
                            &file("key.pem"),
                            &file("cert.pem"),
                            &file("ca.pem"),
                            API_TIMEOUT_S,
                            version,
                        ),
                        raw.add_root_certificate(ca).identity(identity),
                        format!("https://{addr}"),
                    )
                }
            }
        } else {
            return Err(api(
                "only unix://, tcp:// and ssh:// Docker API endpoints are supported".to_owned(),
            ));
        };
        let docker = docker.map_err(|e| api(e.to_string()))?;
        let raw = raw
            .build()
            .map_err(|e| api(format!("cannot make an HTTP client: {e}")))?;
        let negotiated = runtime.block_on(docker.negotiate_version());
        let docker = match negotiated {
            Ok(docker) => docker,
            Err(e) => {
                let mut message = format!("cannot negotiate the API version: {e}");
                if let Some(tunnel) = &mut tunnel {
                    tunnel.close(&runtime);
                    message += &ssh_said(tunnel);
                }
                return Err(api(message));
            }
        };
        Ok(SwarmEngine {
            endpoint: endpoint.to_owned(),
            docker,
            raw,
            raw_base,
            tunnel,
            task_network: None,
            network_names: HashMap::new(),
            runtime,
        })
    }

    /// GET of `path` below the negotiated API version, as JSON; `None` on 404.
    fn get_json(&self, path: &str) -> Result<Option<serde_json::Value>, EngineError> {
        let version = self.docker.client_version();
        let url = format!(
            "{}/v{}.{}{path}",
            self.raw_base, version.major_version, version.minor_version
        );
        self.runtime.block_on(async {
            let response = self
                .raw
                .get(&url)
                .send()
                .await
                .map_err(|e| self.api(format!("GET {path}: {e}")))?;
            let status = response.status();
            let body = response
                .bytes()
                .await
                .map_err(|e| self.api(format!("GET {path}: {e}")))?;
            if status == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(self.api(format!(
                    "GET {path}: {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                )));
            }
            serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.api(format!("GET {path}: {e}")))
        })
    }

    /// Every service of the swarm, in one call.
    fn list_services(&self) -> Result<Vec<Service>, EngineError> {
        let listed = self.get_json("/services")?.unwrap_or_default();
        let serde_json::Value::Array(services) = listed else {
            return Err(self.api("GET /services: not a list"));
        };
        services
            .into_iter()
            .map(|s| service_from_json(s).map_err(|e| self.api(format!("GET /services: {e}"))))
            .collect()
    }

    fn api(&self, message: impl std::fmt::Display) -> EngineError {
        let ssh = self.tunnel.as_ref().map(ssh_said).unwrap_or_default();
        EngineError::Api {
            engine: ENGINE,
            endpoint: self.endpoint.clone(),
            message: format!("{message}{ssh}"),
        }
    }

    fn inspect(&self, service: &str) -> Result<Option<Service>, EngineError> {
        // A service name is `[a-zA-Z0-9][a-zA-Z0-9_.-]*`: nothing to escape in the path.
        self.get_json(&format!("/services/{service}"))?
            .map(service_from_json)
            .transpose()
            .map_err(|e| self.api(format!("inspect service {service}: {e}")))
    }

    /// The service, which must carry imago's label for `service`.
    fn ours(&self, service: &str) -> Result<Option<Service>, EngineError> {
        let Some(found) = self.inspect(service)? else {
            return Ok(None);
        };
        self.check_ours(service, &found)?;
        Ok(Some(found))
    }

    fn check_ours(&self, service: &str, found: &Service) -> Result<(), EngineError> {
        let label = found
            .spec
            .as_ref()
            .and_then(|s| s.labels.as_ref())
            .and_then(|l| l.get(LABEL_SERVICE));
        if label.map(String::as_str) != Some(service) {
            return Err(EngineError::NotOurs {
                engine: ENGINE,
                endpoint: self.endpoint.clone(),
                service: service.to_owned(),
            });
        }
        Ok(())
    }

    /// Node id -> address, for the tasks' published ports.
    fn node_addresses(&self) -> Result<HashMap<String, IpAddr>, EngineError> {
        let nodes = self
            .runtime
            .block_on(self.docker.list_nodes(None::<ListNodesOptions>))
            .map_err(|e| self.api(format!("list nodes: {e}")))?;
        Ok(nodes
            .into_iter()
            .filter_map(|n| {
                let addr = n.status?.addr?.parse().ok()?;
                Some((n.id?, addr))
            })
            .collect())
    }

    /// Makes [`TASK_NETWORK`] when the swarm lacks it: a bridge on each node, scoped to the
    /// swarm so that services can attach to it. One made beforehand (another driver, a subnet
    /// of the operator's choosing through `--config-from`) is used as it is.
    fn ensure_task_network(&mut self) -> Result<(), EngineError> {
        if self.task_network.is_some() {
            return Ok(());
        }
        if self.task_network_found()?.is_none() {
            // Not in the swarm: one of another scope is an error. (A node's copies of removed
            // ones, or one made by another imago since, have the scope `swarm`; several of
            // them make the name ambiguous, a 400.)
            let other = match self
                .runtime
                .block_on(self.docker.inspect_network(TASK_NETWORK, None))
            {
                Ok(network) => network.scope.filter(|scope| scope != "swarm"),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 400,
                    ..
                }) => None,
                Err(e) => return Err(self.api(format!("inspect network {TASK_NETWORK}: {e}"))),
            };
            if let Some(scope) = other {
                return Err(self.api(format!(
                    "network {TASK_NETWORK} has scope {scope}, not swarm: services cannot \
                     attach to it (remove it, or make it with --scope swarm)"
                )));
            }
            // Another imago may make it meanwhile (the swarm keeps network names unique):
            // what counts is what is there next.
            self.create_task_network()?;
        }
        // Gone again (another imago's destroy): the apply fails and is repeated.
        self.task_network = self.task_network_found()?.and_then(|n| n.id);
        Ok(())
    }

    /// Asks the swarm to make [`TASK_NETWORK`]: true when it did, false when the swarm has a
    /// network of that name already (which a network left on a node after the swarm removed
    /// it is not).
    fn create_task_network(&self) -> Result<bool, EngineError> {
        let request = NetworkCreateRequest {
            name: TASK_NETWORK.to_owned(),
            driver: Some("bridge".to_owned()),
            scope: Some("swarm".to_owned()),
            // Says who made it to whoever lists the swarm's networks, and to
            // `remove_task_network_if_unused`: only a network imago made is removed.
            labels: Some(HashMap::from([(
                TASK_NETWORK_LABEL.to_owned(),
                "tasks of imago services".to_owned(),
            )])),
            ..Default::default()
        };
        match self.runtime.block_on(self.docker.create_network(request)) {
            Ok(_) => Ok(true),
            // The daemon's look by name in the swarm.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(false),
            // The swarm's own refusal (a 500) when another imago made it at the same moment.
            Err(e) => match self.task_network_found()? {
                Some(_) => Ok(false),
                None => Err(self.api(format!("create network {TASK_NETWORK}: {e}"))),
            },
        }
    }

    /// Whether the swarm's [`TASK_NETWORK`] is the network `id`. A node keeps its copy of a
    /// network the swarm removed until the tasks attached to it there have stopped, and the
    /// daemon answers a look-up by name or id with that copy when the swarm has none of the
    /// name: so when the answer is `id`, the swarm is asked to make the network, which it
    /// refuses if it has one (then `id` is it); if it makes one, `id` was the node's copy.
    fn task_network_is(&self, id: Option<&str>) -> Result<bool, EngineError> {
        let named = |found: Option<NetworkInspect>| found.and_then(|n| n.id);
        if id.is_none() || named(self.task_network_found()?).as_deref() != id {
            return Ok(false);
        }
        if self.create_task_network()? {
            return Ok(false);
        }
        Ok(named(self.task_network_found()?).as_deref() == id)
    }

    /// Looks up the names of the networks `live`'s tasks attach to, for
    /// [`render::differences_named`]: the daemon keeps a network's id in the spec (`docker
    /// service update --network-add NAME` and imago's own `imago-tasks` alike). Each id is
    /// looked up once; one that names no network any more stays an id, which no rendering
    /// names.
    fn learn_network_names(&mut self, live: &ServiceSpec) -> Result<(), EngineError> {
        let attached = live
            .task_template
            .as_ref()
            .and_then(|t| t.networks.as_ref())
            .into_iter()
            .flatten();
        for id in attached.filter_map(|n| n.target.as_deref()) {
            if self.network_names.contains_key(id) {
                continue;
            }
            let name = match self.runtime.block_on(self.docker.inspect_network(id, None)) {
                Ok(found) => found.name.unwrap_or_else(|| id.to_owned()),
                // Deleted since: the id stays an id, and is not asked for again.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => id.to_owned(),
                Err(e) => return Err(self.api(format!("inspect network {id}: {e}"))),
            };
            self.network_names.insert(id.to_owned(), name);
        }
        Ok(())
    }

    /// [`render::differences_named`] of `live` from the rendering of `desired`.
    fn differences_from(
        &mut self,
        live: &Service,
        desired: &ClusterService,
    ) -> Result<Vec<String>, EngineError> {
        let empty = ServiceSpec::default();
        let live = live.spec.as_ref().unwrap_or(&empty);
        self.learn_network_names(live)?;
        Ok(render::differences_named(
            live,
            &render(desired)?,
            &self.network_names,
        ))
    }

    /// Removes [`TASK_NETWORK`] when imago made it (its label) and no service of the swarm
    /// attaches to it any more. Never from under a service: the daemon refuses to remove a
    /// network that a service's spec names (one transaction of the swarm's store), so a
    /// service created meanwhile keeps it; the listing before only spares that refusal, and
    /// a refusal while no service names it (tasks of a service just removed) is asked again
    /// for [`NETWORK_REMOVAL_WAIT`]. The network is removed by id: one made again since by
    /// another imago is not this one. A network made by the operator is left as made.
    fn remove_task_network_if_unused(&mut self) -> Result<(), EngineError> {
        let Some(network) = self.task_network_found()? else {
            self.task_network = None;
            return Ok(());
        };
        let ours = network
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(TASK_NETWORK_LABEL));
        let (Some(id), true) = (network.id, ours) else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + NETWORK_REMOVAL_WAIT;
        loop {
            let attached = self.list_services()?.iter().any(|service| {
                let networks = service
                    .spec
                    .as_ref()
                    .and_then(|s| s.task_template.as_ref())
                    .and_then(|t| t.networks.as_ref());
                networks.into_iter().flatten().any(|n| {
                    n.target
                        .as_deref()
                        .is_some_and(|t| t == id || t == TASK_NETWORK)
                })
            });
            if attached {
                return Ok(());
            }
            let removal = self.runtime.block_on(self.docker.remove_network(&id));
            let gone = match &removal {
                Ok(()) => true,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code,
                    message,
                }) => {
                    // A 500 "not found": only this node's copy of a network the swarm
                    // removed was left (see `task_network_is`).
                    *status_code == 404 || (*status_code == 500 && message.contains("not found"))
                }
                Err(_) => false,
            };
            if gone {
                self.task_network = None;
                self.network_names.remove(&id);
                return Ok(());
            }
            match removal {
                Ok(()) => return Ok(()),
                // In use (`FailedPrecondition`): by a service created since, which the next
                // listing shows, or by a task of one removed just now.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 400, ..
                }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 400, ..
                }) => return Ok(()),
                Err(e) => {
                    return Err(self.api(format!("remove network {TASK_NETWORK} ({id}): {e}")));
                }
            }
        }
    }

    /// Whether the stored spec of `service` names the swarm's [`TASK_NETWORK`] (by id, as
    /// the daemon keeps it); true when the service is gone (removed meanwhile: nothing to
    /// mend).
    fn names_task_network(&self, service: &str) -> Result<bool, EngineError> {
        let Some(live) = self.inspect(service)? else {
            return Ok(true);
        };
        let networks = live
            .spec
            .and_then(|s| s.task_template)
            .and_then(|t| t.networks)
            .unwrap_or_default();
        for target in networks.iter().filter_map(|n| n.target.as_deref()) {
            if self.task_network_is(Some(target))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Creates the service, or updates it to `spec`.
    fn create_or_update(&self, service: &str, spec: ServiceSpec) -> Result<(), EngineError> {
        match self.ours(service)? {
            None => {
                self.runtime
                    .block_on(self.docker.create_service(spec, None))
                    .map_err(|e| self.api(format!("create service {service}: {e}")))?;
            }
            Some(live) => {
                let version = live.version.and_then(|v| v.index).unwrap_or_default();
                let options = UpdateServiceOptionsBuilder::default()
                    .version(i32::try_from(version).unwrap_or(i32::MAX))
                    .build();
                self.runtime
                    .block_on(self.docker.update_service(service, spec, options, None))
                    .map_err(|e| self.api(format!("update service {service}: {e}")))?;
            }
        }
        Ok(())
    }

    /// [`TASK_NETWORK`] as the swarm has it now, `None` when there is no such network. With
    /// the scope `swarm` the daemon answers with the swarm's network of that name when there is
    /// one (else by name it could find its own copy of one the swarm removed beside it, and
    /// call the name ambiguous); when the swarm has none, with such a copy if it has one (see
    /// [`SwarmEngine::task_network_is`]), or that the name is ambiguous if it has several.
    fn task_network_found(&self) -> Result<Option<NetworkInspect>, EngineError> {
        let options = InspectNetworkOptions {
            scope: Some("swarm".to_owned()),
            ..Default::default()
        };
        match self
            .runtime
            .block_on(self.docker.inspect_network(TASK_NETWORK, Some(options)))
        {
            Ok(network) => Ok(Some(network)),
            // Ambiguous (400): only when the swarm has none and the node has several copies.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 400,
                ..
            }) => Ok(None),
            Err(e) => Err(self.api(format!("inspect network {TASK_NETWORK}: {e}"))),
        }
    }

    fn tasks(&self, service_id: &str) -> Result<Vec<Task>, EngineError> {
        let filters = HashMap::from([("service", vec![service_id])]);
        let options = ListTasksOptionsBuilder::default().filters(&filters).build();
        self.runtime
            .block_on(self.docker.list_tasks(Some(options)))
            .map_err(|e| self.api(format!("list tasks of {service_id}: {e}")))
    }
}

/// What ssh last wrote to stderr, as the end of an error message (empty if nothing).
fn ssh_said(tunnel: &ssh::SshTunnel) -> String {
    match tunnel.last_error() {
        said if said.is_empty() => String::new(),
        said => format!(" (ssh: {said})"),
    }
}

/// A service as the daemon writes it, read into bollard's types. Docker writes a container
/// spec's health check under `Healthcheck` (the name of the Go field, which has no JSON tag),
/// while the API's schema, and so bollard, says `HealthCheck`: serde would drop it, and a
/// changed health check would never show as drift. Docker reads either spelling (Go matches
/// JSON keys case-insensitively), so only reads need this.
fn service_from_json(mut service: serde_json::Value) -> Result<Service, serde_json::Error> {
    for spec in ["/Spec", "/PreviousSpec"] {
        if let Some(container) = service
            .pointer_mut(&format!("{spec}/TaskTemplate/ContainerSpec"))
            .and_then(serde_json::Value::as_object_mut)
            && let Some(health) = container.remove("Healthcheck")
        {
            container.insert("HealthCheck".to_owned(), health);
        }
    }
    serde_json::from_value(service)
}

fn labels_of(service: &Service) -> HashMap<String, String> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.labels.clone())
        .unwrap_or_default()
}

fn update_state(service: &Service) -> (UpdateState, String) {
    let Some(status) = &service.update_status else {
        return (UpdateState::None, String::new());
    };
    let state = match status.state {
        None | Some(ServiceUpdateStatusStateEnum::EMPTY) => UpdateState::None,
        Some(ServiceUpdateStatusStateEnum::UPDATING) => UpdateState::Updating,
        Some(ServiceUpdateStatusStateEnum::COMPLETED) => UpdateState::Completed,
        Some(ServiceUpdateStatusStateEnum::PAUSED) => UpdateState::Paused,
        Some(ServiceUpdateStatusStateEnum::ROLLBACK_STARTED) => UpdateState::RollbackStarted,
        Some(ServiceUpdateStatusStateEnum::ROLLBACK_PAUSED) => UpdateState::RollbackPaused,
        Some(ServiceUpdateStatusStateEnum::ROLLBACK_COMPLETED) => UpdateState::RollbackCompleted,
    };
    (state, status.message.clone().unwrap_or_default())
}

fn task_of(task: Task, nodes: &HashMap<String, IpAddr>) -> Option<ClusterTask> {
    let status = task.status.unwrap_or_default();
    let container = task.spec.and_then(|s| s.container_spec).unwrap_or_default();
    let phase = match status.state? {
        TaskState::RUNNING => TaskPhase::Running,
        TaskState::FAILED | TaskState::REJECTED | TaskState::ORPHANED => TaskPhase::Failed,
        TaskState::COMPLETE | TaskState::SHUTDOWN | TaskState::REMOVE => TaskPhase::Done,
        _ => TaskPhase::Starting,
    };
    let port = status
        .port_status
        .and_then(|p| p.ports)
        .and_then(|ports| ports.into_iter().find_map(|p| p.published_port))
        .and_then(|p| u16::try_from(p).ok());
    let address = match (task.node_id.as_ref().and_then(|n| nodes.get(n)), port) {
        (Some(ip), Some(port)) => Some(SocketAddr::new(*ip, port)),
        _ => None,
    };
    Some(ClusterTask {
        id: task.id?,
        revision: container
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_REVISION).cloned()),
        image: container.image.unwrap_or_default(),
        phase,
        desired_running: task.desired_state == Some(TaskState::RUNNING),
        error: status.err.filter(|e| !e.is_empty()),
        created_ms: task
            .created_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64),
        address,
    })
}

impl ClusterEngine for SwarmEngine {
    /// Against a concurrent destroy of the last service on [`TASK_NETWORK`] (another imago on
    /// the same swarm), which removes it: removed before the daemon resolved its name, the
    /// create or update fails, the network this engine saw is not the swarm's any more
    /// (missing, made again with another id, or only a node's copy left), and the apply is
    /// repeated with the network found or made again;
    /// removed after the daemon resolved the name but before it stored the service (the
    /// daemon's own window, hit in tests), the stored spec names a network that is gone, which
    /// the look after the apply finds, and the apply is repeated. Once the stored spec names a
    /// network that exists, the daemon refuses to remove it while the service names it.
    fn apply(&mut self, desired: &ClusterService) -> Result<(), EngineError> {
        let spec = render(desired)?;
        let attached = spec
            .task_template
            .as_ref()
            .and_then(|t| t.networks.as_ref())
            .is_some_and(|n| n.iter().any(|n| n.target.as_deref() == Some(TASK_NETWORK)));
        if !attached {
            return self.create_or_update(&desired.service, spec);
        }
        for attempt in 1..=APPLY_ATTEMPTS {
            self.ensure_task_network()?;
            let seen = self.task_network.clone();
            let last = attempt == APPLY_ATTEMPTS;
            match self.create_or_update(&desired.service, spec.clone()) {
                Ok(()) if self.names_task_network(&desired.service)? => return Ok(()),
                Ok(()) if last => {
                    return Err(self.api(format!(
                        "service {}: network {TASK_NETWORK} removed by another destroy at each of \
                         {APPLY_ATTEMPTS} attempts to apply it",
                        desired.service
                    )));
                }
                Ok(()) => {}
                // The network this engine saw is still there: the failure is another's.
                Err(e) if last || self.task_network_is(seen.as_deref())? => {
                    return Err(e);
                }
                Err(_) => {}
            }
            // Removed since this engine looked (and perhaps made again by another imago):
            // looked up, or made, again by the next attempt.
            self.task_network = None;
        }
        Ok(())
    }

    fn observe(
        &mut self,
        desired: &ClusterService,
    ) -> Result<Option<ClusterObservation>, EngineError> {
        let Some(live) = self.ours(&desired.service)? else {
            return Ok(None);
        };
        let (update, update_message) = update_state(&live);
        let labels = labels_of(&live);
        let release = labels.get(LABEL_RELEASE).and_then(|r| r.parse().ok());
        let revision = labels.get(LABEL_REVISION).cloned();
        let differences = if revision.as_deref() == Some(desired.revision.as_str()) {
            self.differences_from(&live, desired)?
        } else {
            Vec::new()
        };
        let nodes = self.node_addresses()?;
        let tasks = self
            .tasks(live.id.as_deref().unwrap_or(&desired.service))?
            .into_iter()
            .filter_map(|t| task_of(t, &nodes))
            .collect();
        Ok(Some(ClusterObservation {
            release,
            revision,
            differences,
            update,
            update_message,
            // A swarm update cannot be held by a client (pause is refused for swarm targets).
            held: false,
            tasks,
        }))
    }

    fn compare(
        &mut self,
        releases: &[ClusterService],
    ) -> Result<Vec<Option<ClusterComparison>>, EngineError> {
        let listed = self.list_services()?;
        let by_name: HashMap<&str, &Service> = listed
            .iter()
            .filter_map(|s| Some((s.spec.as_ref()?.name.as_deref()?, s)))
            .collect();
        releases
            .iter()
            .map(|desired| {
                let Some(live) = by_name.get(desired.service.as_str()) else {
                    return Ok(None);
                };
                self.check_ours(&desired.service, live)?;
                let labels = labels_of(live);
                Ok(Some(ClusterComparison {
                    release: labels.get(LABEL_RELEASE).and_then(|r| r.parse().ok()),
                    revision: labels.get(LABEL_REVISION).cloned(),
                    config_hash: labels.get(LABEL_CONFIG_HASH).cloned(),
                    differences: self.differences_from(live, desired)?,
                    update: update_state(live).0,
                }))
            })
            .collect()
    }

    /// Removes the service, then [`TASK_NETWORK`] if no service uses it any more (also when
    /// the service was gone already: a destroy interrupted between the two is finished by the
    /// next).
    fn destroy(&mut self, service: &str) -> Result<bool, EngineError> {
        let removed = match self.ours(service)? {
            None => false,
            Some(_) => match self.runtime.block_on(self.docker.delete_service(service)) {
                Ok(()) => true,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => false,
                Err(e) => return Err(self.api(format!("remove service {service}: {e}"))),
            },
        };
        self.remove_task_network_if_unused()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_health_check_as_the_daemon_spells_it_is_read() {
        // As `GET /v1.41/services/NAME` answers (dockerd 20.10): `Healthcheck`.
        let service = service_from_json(serde_json::json!({
            "ID": "x",
            "Spec": {"Name": "web", "TaskTemplate": {"ContainerSpec": {
                "Image": "r/web@sha256:11",
                "Healthcheck": {"Test": ["CMD", "true"], "Interval": 2000000000, "Retries": 3}
            }}}
        }))
        .unwrap();
        let health = service
            .spec
            .unwrap()
            .task_template
            .unwrap()
            .container_spec
            .unwrap();
        let health = health.health_check.expect("the health check is kept");
        assert_eq!(health.test.unwrap(), ["CMD", "true"]);
        assert_eq!(
            (health.interval, health.retries),
            (Some(2_000_000_000), Some(3))
        );
    }
}
