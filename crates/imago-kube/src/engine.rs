//! The Kubernetes engine behind imago-spec's [`ClusterEngine`] trait, which imago-deploy's
//! controller drives: apply renders the release and applies it server-side, observe reads the
//! Deployment's status and its pods back as imago's update state and tasks (and the drift of
//! the live objects from the rendering), destroy deletes. Every decision stays the
//! controller's.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use imago_oci::Digest;
use imago_spec::cluster::{
    ClusterEngine, ClusterObservation, ClusterService, ClusterTask, EngineError, TaskPhase,
    UpdateState,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;

use crate::cluster::is_managed;
use crate::render::{LABEL_RELEASE, LABEL_REVISION, PORT_NAME};
use crate::rollout::{PROGRESS_DEADLINE_EXCEEDED, RolloutState, judge};
use crate::{Drift, KubeEngine, KubeError, KubeTarget, PinnedImage, ReleaseInput, RenderedRelease};

const ENGINE: &str = "kubernetes";

/// The namespace of a target that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

impl KubeTarget {
    /// A `[target.NAME]` table's `endpoint` (`PATH#CONTEXT`, `PATH`, `#CONTEXT`; none: the
    /// default kubeconfig and its current context) and `namespace` (none: `default`).
    pub fn from_endpoint(endpoint: Option<&str>, namespace: Option<&str>) -> KubeTarget {
        let (path, context) = match endpoint {
            Some(text) => match text.rsplit_once('#') {
                Some((path, context)) => (path, Some(context)),
                None => (text, None),
            },
            None => ("", None),
        };
        KubeTarget {
            kubeconfig: (!path.is_empty()).then(|| PathBuf::from(path)),
            context: context.filter(|c| !c.is_empty()).map(str::to_owned),
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        }
    }

    /// How errors name the cluster: `kubeconfig PATH (context C), namespace N`.
    pub fn describe(&self) -> String {
        let file = self.kubeconfig.as_ref().map_or_else(
            || "the default kubeconfig".to_owned(),
            |p| format!("kubeconfig {}", p.display()),
        );
        let context = self
            .context
            .as_deref()
            .map(|c| format!(" (context {c})"))
            .unwrap_or_default();
        format!("{file}{context}, namespace {}", self.namespace)
    }
}

/// Renders `desired` for `namespace`: the objects apply sends and drift compares with.
pub fn render_service(
    desired: &ClusterService,
    namespace: &str,
) -> Result<RenderedRelease, KubeError> {
    let invalid = |key: &str, reason: String| KubeError::InvalidValue {
        service: desired.service.clone(),
        key: key.to_owned(),
        reason,
    };
    let (repository, digest) = desired.image.rsplit_once('@').ok_or_else(|| {
        invalid(
            "image",
            format!("{} is not pinned by digest", desired.image),
        )
    })?;
    let digest: Digest = digest
        .parse()
        .map_err(|e| invalid("image", format!("{}: {e}", desired.image)))?;
    let config_hash: Digest = desired.config_hash.parse().map_err(|e| {
        invalid(
            "configuration hash",
            format!("{}: {e}", desired.config_hash),
        )
    })?;
    crate::render(&ReleaseInput {
        service: &desired.service,
        spec: &desired.spec,
        release: desired.release,
        revision: &desired.revision,
        config_hash: &config_hash,
        image: &PinnedImage {
            repository: repository.to_owned(),
            digest,
        },
        // Recorded in the release by apply from the image of its digest: a rollback or a
        // restarted controller renders the same emptyDirs without reading the image again.
        image_volumes: &desired.spec.image_volumes,
        namespace,
        paused: desired.paused,
    })
}

/// One cluster and namespace, with a small runtime of its own: the controller is synchronous,
/// kube-rs is not. Call it from a thread that is not inside a tokio runtime.
#[derive(Debug)]
pub struct KubeCluster {
    target: KubeTarget,
    engine: KubeEngine,
    runtime: tokio::runtime::Runtime,
}

impl KubeCluster {
    /// Reads the kubeconfig and makes a client; no request is sent yet.
    pub fn connect(target: &KubeTarget) -> Result<KubeCluster, EngineError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| EngineError::Api {
                engine: ENGINE,
                endpoint: target.describe(),
                message: format!("cannot start a runtime: {e}"),
            })?;
        // The client spawns its connection tasks: it is made inside the runtime it runs on.
        let engine = runtime
            .block_on(KubeEngine::connect(target))
            .map_err(|e| engine_error(target, e))?;
        Ok(KubeCluster {
            target: target.clone(),
            engine,
            runtime,
        })
    }

    fn error(&self, e: KubeError) -> EngineError {
        engine_error(&self.target, e)
    }

    /// The Deployment of `service`, which must carry imago's labels.
    fn ours(&self, service: &str) -> Result<Option<Deployment>, EngineError> {
        let live = self
            .runtime
            .block_on(self.engine.deployment(service))
            .map_err(|e| self.error(e))?;
        match live {
            Some(d) if !is_managed(&d) => Err(EngineError::NotOurs {
                engine: ENGINE,
                endpoint: self.target.describe(),
                service: service.to_owned(),
            }),
            other => Ok(other),
        }
    }
}

/// A library error as the controller gets it: rendering refusals name the key, the rest the
/// cluster and the whole chain of causes.
fn engine_error(target: &KubeTarget, e: KubeError) -> EngineError {
    match e {
        KubeError::Unsupported {
            service,
            key,
            reason,
        } => EngineError::Render {
            service,
            reason: format!("{key} cannot be honoured by kubernetes: {reason}"),
        },
        KubeError::InvalidValue {
            service,
            key,
            reason,
        } => EngineError::Render {
            service,
            reason: format!("{key} {reason}"),
        },
        other => {
            let mut message = other.to_string();
            let mut source = std::error::Error::source(&other);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !message.contains(&text) {
                    message.push_str(": ");
                    message.push_str(&text);
                }
                source = cause.source();
            }
            EngineError::Api {
                engine: ENGINE,
                endpoint: target.describe(),
                message,
            }
        }
    }
}

fn template_label<'a>(deployment: &'a Deployment, label: &str) -> Option<&'a String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.as_ref())
        .and_then(|l| l.get(label))
}

/// The Deployment's status as imago's update state, judged for the release its pod template
/// carries.
fn update_state(deployment: &Deployment, release: u64) -> (UpdateState, String) {
    let generation = deployment.metadata.generation.unwrap_or(0);
    let held = deployment.spec.as_ref().and_then(|s| s.paused) == Some(true);
    match judge(deployment, release, generation).state {
        RolloutState::Complete => (UpdateState::Completed, String::new()),
        // Held whatever the counts: the gate still completes a rollout that was done.
        RolloutState::InProgress { waiting_for } if held => (UpdateState::Held, waiting_for),
        _ if held => (
            UpdateState::Held,
            "the Deployment is paused (spec.paused)".into(),
        ),
        RolloutState::InProgress { waiting_for } => {
            (UpdateState::Updating, format!("waiting for {waiting_for}"))
        }
        RolloutState::Failed { reason, message } if reason == PROGRESS_DEADLINE_EXCEEDED => {
            (UpdateState::Failed, format!("{reason}: {message}"))
        }
        // Only a template without imago's release label is judged "Superseded" here: the
        // controller re-applies it as drift, the update itself has not failed.
        RolloutState::Failed { reason, message } => {
            (UpdateState::Updating, format!("{reason}: {message}"))
        }
    }
}

/// A pod as a task: its phase (running counts only when the pod is Ready, which its readiness
/// probe decides), revision label, image, and pod IP with the container's port.
fn task_of(pod: Pod, service: &str) -> Option<ClusterTask> {
    let meta = pod.metadata;
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let container = spec
        .containers
        .iter()
        .find(|c| c.name == service)
        .or_else(|| spec.containers.first());
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let phase = match status.phase.as_deref() {
        Some("Running") if ready => TaskPhase::Running,
        Some("Failed") => TaskPhase::Failed,
        Some("Succeeded") => TaskPhase::Done,
        _ => TaskPhase::Starting,
    };
    // Why a container is not running, as the kubelet says (`CrashLoopBackOff: ...`,
    // `ErrImagePull: ...`); the ordinary waiting reasons of a starting pod say nothing.
    let container_error = status.container_statuses.iter().flatten().find_map(|c| {
        let state = c.state.as_ref()?;
        if let Some(waiting) = &state.waiting {
            let reason = waiting.reason.as_deref()?;
            if matches!(reason, "ContainerCreating" | "PodInitializing") {
                return None;
            }
            return Some(format!(
                "{reason}: {}",
                waiting.message.as_deref().unwrap_or_default()
            ));
        }
        let terminated = state.terminated.as_ref()?;
        (terminated.exit_code != 0).then(|| {
            format!(
                "{} (exit code {})",
                terminated.reason.as_deref().unwrap_or("terminated"),
                terminated.exit_code
            )
        })
    });
    let pod_error = status.reason.as_ref().map(|reason| {
        format!(
            "{reason}: {}",
            status.message.as_deref().unwrap_or_default()
        )
    });
    let port = container
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some(PORT_NAME)))
        .and_then(|p| u16::try_from(p.container_port).ok());
    let address = match (status.pod_ip.as_deref().map(str::parse::<IpAddr>), port) {
        (Some(Ok(ip)), Some(port)) => Some(SocketAddr::new(ip, port)),
        _ => None,
    };
    Some(ClusterTask {
        id: meta.name?,
        revision: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_REVISION).cloned()),
        image: container.and_then(|c| c.image.clone()).unwrap_or_default(),
        phase,
        // A pod being deleted (old ReplicaSet scaled down) is on its way out.
        desired_running: meta.deletion_timestamp.is_none() && phase != TaskPhase::Done,
        error: container_error.or(pod_error),
        created_ms: meta
            .creation_timestamp
            .and_then(|t| u64::try_from(t.0.as_millisecond()).ok()),
        address,
    })
}

/// A drift finding as one line: `Deployment shop/web spec.replicas: 5 != 3` (live first).
fn difference_text(drift: &Drift) -> String {
    match drift {
        Drift::Missing { object } => format!("{object} is missing"),
        Drift::Unexpected { object } => format!("{object} exists, but the release has none"),
        Drift::Changed {
            object,
            path,
            expected,
            live,
        } => format!("{object} {path}: {live} != {expected}"),
    }
}

impl ClusterEngine for KubeCluster {
    fn apply(&mut self, desired: &ClusterService) -> Result<(), EngineError> {
        let rendered =
            render_service(desired, &self.target.namespace).map_err(|e| self.error(e))?;
        self.runtime
            .block_on(self.engine.apply(&rendered))
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    fn observe(
        &mut self,
        desired: &ClusterService,
    ) -> Result<Option<ClusterObservation>, EngineError> {
        let Some(live) = self.ours(&desired.service)? else {
            return Ok(None);
        };
        let release = template_label(&live, LABEL_RELEASE).and_then(|r| r.parse::<u64>().ok());
        let revision = template_label(&live, LABEL_REVISION).cloned();
        let (update, update_message) = update_state(&live, release.unwrap_or(0));
        let held = live.spec.as_ref().and_then(|s| s.paused) == Some(true);
        let differences = if revision.as_deref() == Some(desired.revision.as_str()) {
            let rendered =
                render_service(desired, &self.target.namespace).map_err(|e| self.error(e))?;
            self.runtime
                .block_on(self.engine.drift(&rendered))
                .map_err(|e| self.error(e))?
                .iter()
                .map(difference_text)
                .collect()
        } else {
            Vec::new()
        };
        let tasks = self
            .runtime
            .block_on(self.engine.pods(&desired.service))
            .map_err(|e| self.error(e))?
            .into_iter()
            .filter_map(|pod| task_of(pod, &desired.service))
            .collect();
        Ok(Some(ClusterObservation {
            release,
            revision,
            differences,
            update,
            update_message,
            held,
            tasks,
        }))
    }

    fn destroy(&mut self, service: &str) -> Result<bool, EngineError> {
        let deleted = self
            .runtime
            .block_on(self.engine.delete(service))
            .map_err(|e| self.error(e))?;
        Ok(!deleted.is_empty())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn an_endpoint_names_the_kubeconfig_and_its_context() {
        let both = KubeTarget::from_endpoint(Some("/etc/kube/config#prod"), Some("shop"));
        assert_eq!(
            (
                both.kubeconfig.unwrap(),
                both.context.unwrap(),
                both.namespace
            ),
            (
                PathBuf::from("/etc/kube/config"),
                "prod".into(),
                "shop".into()
            )
        );
        let context_only = KubeTarget::from_endpoint(Some("#prod"), None);
        assert_eq!(context_only.kubeconfig, None);
        assert_eq!(context_only.context.as_deref(), Some("prod"));
        assert_eq!(context_only.namespace, DEFAULT_NAMESPACE);
        let none = KubeTarget::from_endpoint(None, None);
        assert_eq!((none.kubeconfig, none.context), (None, None));
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1-abc", "labels": {"imago.dev/revision": "00ff"},
                "creationTimestamp": "2026-12-03T10:00:00Z"},
            "spec": {"containers": [{"name": "web", "image": "r/web@sha256:1",
                "ports": [{"name": "main", "containerPort": 8080}]}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_counts_as_running_only_when_ready_and_says_why_it_is_not() {
        let ready = task_of(
            pod(json!({"phase": "Running", "podIP": "10.1.2.3",
                "conditions": [{"type": "Ready", "status": "True"}]})),
            "web",
        )
        .unwrap();
        assert_eq!(ready.phase, TaskPhase::Running);
        assert_eq!(ready.revision.as_deref(), Some("00ff"));
        assert_eq!(ready.address, Some("10.1.2.3:8080".parse().unwrap()));
        assert_eq!(ready.created_ms, Some(1_796_292_000_000));
        let crashing = task_of(
            pod(json!({"phase": "Running", "podIP": "10.1.2.3",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": "web", "image": "", "imageID": "", "ready": false,
                    "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff",
                    "message": "back-off 40s"}}}]})),
            "web",
        )
        .unwrap();
        assert_eq!(crashing.phase, TaskPhase::Starting);
        assert_eq!(
            crashing.error.as_deref(),
            Some("CrashLoopBackOff: back-off 40s")
        );
        let evicted = task_of(
            pod(json!({"phase": "Failed", "reason": "Evicted", "message": "low memory"})),
            "web",
        )
        .unwrap();
        assert_eq!(evicted.phase, TaskPhase::Failed);
        assert_eq!(evicted.error.as_deref(), Some("Evicted: low memory"));
    }

    #[test]
    fn the_progress_deadline_is_a_failed_update() {
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": 2},
            "spec": {"replicas": 2, "selector": {},
                "template": {"metadata": {"labels": {"imago.dev/release": "4"}}}},
            "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1,
                "conditions": [{"type": "Progressing", "status": "False",
                    "reason": "ProgressDeadlineExceeded", "message": "timed out"}]},
        }))
        .unwrap();
        let (state, message) = update_state(&deployment, 4);
        assert_eq!(state, UpdateState::Failed);
        assert!(state.failed());
        assert_eq!(message, "ProgressDeadlineExceeded: timed out");
    }
}
