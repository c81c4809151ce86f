//! The Docker Swarm engine: a release becomes a swarm service (image pinned by digest, labels
//! with the release number and configuration hash, `update_config` from the rollout settings),
//! created or updated through a manager's Docker API (bollard, API version negotiated: Debian's
//! daemon speaks 1.41), read back as the service's update status and its tasks, and removed.
//! It implements [`imago_spec::cluster::ClusterEngine`]; imago-deploy's controller decides.
#![forbid(unsafe_code)]

mod render;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use bollard::Docker;
use bollard::models::{Service, ServiceUpdateStatusStateEnum, Task, TaskState};
use bollard::query_parameters::{
    InspectServiceOptionsBuilder, ListNodesOptions, ListTasksOptionsBuilder,
    UpdateServiceOptionsBuilder,
};
use imago_spec::cluster::{
    ClusterEngine, ClusterObservation, ClusterService, ClusterTask, EngineError, LABEL_RELEASE,
    LABEL_REVISION, LABEL_SERVICE, TaskPhase, UpdateState,
};

pub use render::{differences, release_labels, render};

const ENGINE: &str = "swarm";

/// A swarm manager's Docker API, with a small runtime of its own: the controller is synchronous,
/// bollard is not. Call it from a thread that is not inside a tokio runtime.
pub struct SwarmEngine {
    endpoint: String,
    docker: Docker,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for SwarmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmEngine")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl SwarmEngine {
    /// Connects to the Docker API at `endpoint` (`unix:///PATH`) and negotiates the version.
    pub fn connect(endpoint: &str) -> Result<SwarmEngine, EngineError> {
        let api = |message: String| EngineError::Api {
            engine: ENGINE,
            endpoint: endpoint.to_owned(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| api(format!("cannot start a runtime: {e}")))?;
        let path = endpoint
            .strip_prefix("unix://")
            .ok_or_else(|| api("only unix:// endpoints are supported".to_owned()))?;
        let docker = runtime.block_on(async {
            let docker = Docker::connect_with_unix(path, 60, bollard::API_DEFAULT_VERSION)
                .map_err(|e| api(e.to_string()))?;
            docker
                .negotiate_version()
                .await
                .map_err(|e| api(format!("cannot negotiate the API version: {e}")))
        })?;
        Ok(SwarmEngine {
            endpoint: endpoint.to_owned(),
            docker,
            runtime,
        })
    }

    fn api(&self, message: impl std::fmt::Display) -> EngineError {
        EngineError::Api {
            engine: ENGINE,
            endpoint: self.endpoint.clone(),
            message: message.to_string(),
        }
    }

    fn inspect(&self, service: &str) -> Result<Option<Service>, EngineError> {
        let options = InspectServiceOptionsBuilder::default().build();
        match self
            .runtime
            .block_on(self.docker.inspect_service(service, Some(options)))
        {
            Ok(found) => Ok(Some(found)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.api(format!("inspect service {service}: {e}"))),
        }
    }

    /// The service, which must carry imago's label for `service`.
    fn ours(&self, service: &str) -> Result<Option<Service>, EngineError> {
        let Some(found) = self.inspect(service)? else {
            return Ok(None);
        };
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
        Ok(Some(found))
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

    fn tasks(&self, service_id: &str) -> Result<Vec<Task>, EngineError> {
        let filters = HashMap::from([("service", vec![service_id])]);
        let options = ListTasksOptionsBuilder::default().filters(&filters).build();
        self.runtime
            .block_on(self.docker.list_tasks(Some(options)))
            .map_err(|e| self.api(format!("list tasks of {service_id}: {e}")))
    }
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
    fn apply(&mut self, desired: &ClusterService) -> Result<(), EngineError> {
        let spec = render(desired)?;
        match self.ours(&desired.service)? {
            None => {
                self.runtime
                    .block_on(self.docker.create_service(spec, None))
                    .map_err(|e| self.api(format!("create service {}: {e}", desired.service)))?;
            }
            Some(live) => {
                let version = live.version.and_then(|v| v.index).unwrap_or_default();
                let options = UpdateServiceOptionsBuilder::default()
                    .version(i32::try_from(version).unwrap_or(i32::MAX))
                    .build();
                self.runtime
                    .block_on(
                        self.docker
                            .update_service(&desired.service, spec, options, None),
                    )
                    .map_err(|e| self.api(format!("update service {}: {e}", desired.service)))?;
            }
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
        let live_spec = live.spec.clone().unwrap_or_default();
        let labels = live_spec.labels.clone().unwrap_or_default();
        let release = labels.get(LABEL_RELEASE).and_then(|r| r.parse().ok());
        let revision = labels.get(LABEL_REVISION).cloned();
        let differences = if revision.as_deref() == Some(desired.revision.as_str()) {
            differences(&live_spec, &render(desired)?)
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
            tasks,
        }))
    }

    fn destroy(&mut self, service: &str) -> Result<bool, EngineError> {
        if self.ours(service)?.is_none() {
            return Ok(false);
        }
        match self.runtime.block_on(self.docker.delete_service(service)) {
            Ok(()) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(self.api(format!("remove service {service}: {e}"))),
        }
    }
}
