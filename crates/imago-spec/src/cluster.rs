//! The seam between imago's deployment logic and a cluster engine (Docker Swarm, Kubernetes).
//!
//! It lives here, in the crate of the service types, because both sides depend on those types
//! and on nothing else of imago: imago-deploy's controller drives a [`ClusterEngine`], and each
//! engine crate (imago-swarm, imago-kube) implements it, so no dependency points upward
//! and the controller's logic is tested with a fake engine. An engine renders, applies, reads
//! back and removes; every decision (is the rollout complete, has it failed, roll back, is this
//! drift) is imago's, made in the controller from what [`ClusterEngine::observe`] reports.

use std::net::SocketAddr;

use crate::ServiceSpec;

/// The labels a rendered service and its tasks carry.
pub const LABEL_SERVICE: &str = "imago.service";
pub const LABEL_RELEASE: &str = "imago.release";
pub const LABEL_REVISION: &str = "imago.revision";
pub const LABEL_CONFIG_HASH: &str = "imago.config-hash";

/// A release as an engine gets it: everything it renders from, image pinned by digest.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterService {
    pub service: String,
    pub release: u64,
    /// Digest + configuration: tasks with equal revisions are interchangeable.
    pub revision: String,
    pub config_hash: String,
    /// `REGISTRY/REPOSITORY@sha256:...`: never a tag.
    pub image: String,
    pub spec: ServiceSpec,
    /// The service's rollouts are paused (`imago pause`, recorded in imago's database): an
    /// engine that can hold its own update renders it held (Kubernetes: the Deployment's
    /// `spec.paused`). Not part of the release: pausing changes neither revision nor hash.
    pub paused: bool,
}

/// How the engine's own update of the service stands (Docker's `UpdateStatus.State`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateState {
    /// No update since the service was created.
    None,
    Updating,
    Completed,
    Paused,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
    /// The engine gave up on the update without reverting it (Kubernetes: the Deployment's
    /// `Progressing` condition with reason `ProgressDeadlineExceeded`).
    Failed,
    /// The update is held because imago asked (`imago pause`; Kubernetes: the Deployment's
    /// `spec.paused`): not a failure, and no progress is expected until it is resumed.
    Held,
}

impl UpdateState {
    /// The engine stopped or reverted the update on its own: imago's rollout has failed.
    pub fn failed(self) -> bool {
        matches!(
            self,
            UpdateState::Paused
                | UpdateState::RollbackStarted
                | UpdateState::RollbackPaused
                | UpdateState::RollbackCompleted
                | UpdateState::Failed
        )
    }
}

/// Where a task (a replica) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    /// Scheduled, pulling, or started and not yet healthy.
    Starting,
    /// Running, and healthy if the service has a health check.
    Running,
    /// Failed, rejected or orphaned: it will not become ready.
    Failed,
    /// Shut down or completed as the engine wanted.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTask {
    pub id: String,
    /// The revision label of the spec it runs.
    pub revision: Option<String>,
    /// The image reference of its spec.
    pub image: String,
    pub phase: TaskPhase,
    /// The engine still wants it running (false: it is being retired).
    pub desired_running: bool,
    /// Why it failed, as the engine says.
    pub error: Option<String>,
    /// When the engine created it (ms since the epoch), if it says.
    pub created_ms: Option<u64>,
    /// Where it serves the service's port (its node's address and published port).
    pub address: Option<SocketAddr>,
}

/// What an engine reports of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterObservation {
    /// The release and revision labels of the live service spec.
    pub release: Option<u64>,
    pub revision: Option<String>,
    /// Fields imago manages whose live value differs from the rendering of the release the
    /// service's labels name (changed out of band), as `field: live != rendered`.
    pub differences: Vec<String>,
    pub update: UpdateState,
    pub update_message: String,
    /// Whether the live service is held by the engine (a Kubernetes Deployment's
    /// `spec.paused`), whatever its update state: a paused Deployment whose rollout is done
    /// reads `Completed`, and only this says it is still held.
    pub held: bool,
    pub tasks: Vec<ClusterTask>,
}

/// A live service compared with a release, from one listing of every service of the engine
/// (what `imago plan` needs: cheap, however many services there are).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterComparison {
    /// The labels of the live service: the release it runs, as imago applied it.
    pub release: Option<u64>,
    pub revision: Option<String>,
    pub config_hash: Option<String>,
    /// Fields imago manages whose live value differs from the rendering of the release it was
    /// compared with, whatever release the labels name, as `field: live != rendered`.
    pub differences: Vec<String>,
    pub update: UpdateState,
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{engine} at {endpoint}: {message}")]
    Api {
        engine: &'static str,
        endpoint: String,
        message: String,
    },
    #[error("{engine} at {endpoint}: service {service} exists and was not created by imago")]
    NotOurs {
        engine: &'static str,
        endpoint: String,
        service: String,
    },
    #[error("service {service}: {reason}")]
    Render { service: String, reason: String },
}

/// A cluster engine as imago drives it. Calls block; an implementation keeps its own client.
pub trait ClusterEngine: Send {
    /// Creates the service, or updates it to `desired` (a rolling update by the engine).
    fn apply(&mut self, desired: &ClusterService) -> Result<(), EngineError>;
    /// The live service and its tasks, compared with `desired` when its labels name the same
    /// release; `None` when the service does not exist.
    fn observe(
        &mut self,
        desired: &ClusterService,
    ) -> Result<Option<ClusterObservation>, EngineError>;
    /// Removes the service; false when it did not exist.
    fn destroy(&mut self, service: &str) -> Result<bool, EngineError>;

    /// Each of `releases` compared with the live service of its name (`None`: there is none).
    /// An engine answers from one listing of its services, however many are asked about (a
    /// plan over 50 services is one API call, not 50). The same service may be asked about
    /// twice, for two releases. This default asks [`ClusterEngine::observe`] once per release,
    /// which only compares fields when the live labels name that release's revision.
    fn compare(
        &mut self,
        releases: &[ClusterService],
    ) -> Result<Vec<Option<ClusterComparison>>, EngineError> {
        releases
            .iter()
            .map(|r| {
                Ok(self.observe(r)?.map(|o| ClusterComparison {
                    release: o.release,
                    revision: o.revision,
                    config_hash: None,
                    differences: o.differences,
                    update: o.update,
                }))
            })
            .collect()
    }
}
