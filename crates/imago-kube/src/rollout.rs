//! A Deployment's status judged as imago's rollout outcomes, the way `kubectl rollout status`
//! reads it: only once the controller has observed the applied generation, then the Progressing
//! condition, then the replica counts.

use k8s_openapi::api::apps::v1::Deployment;
use serde::Serialize;

use crate::render::LABEL_RELEASE;

/// The reason the deployment controller gives when a rollout made no progress in time.
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";

/// Where a release's rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum RolloutState {
    /// Still going; `waiting_for` says on what.
    InProgress { waiting_for: String },
    /// Every replica runs the release and is available.
    Complete,
    /// The engine gave up (`ProgressDeadlineExceeded`), or the Deployment was deleted or taken
    /// over by another release: imago rolls back.
    Failed { reason: String, message: String },
}

impl RolloutState {
    pub fn is_finished(&self) -> bool {
        !matches!(self, RolloutState::InProgress { .. })
    }
}

/// The counts behind a judgment, for progress lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutStatus {
    pub release: u64,
    pub generation: i64,
    pub observed_generation: i64,
    pub replicas: i32,
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
    #[serde(flatten)]
    pub state: RolloutState,
}

/// Judges `deployment` as the rollout of `release`, applied as `generation`.
pub fn judge(deployment: &Deployment, release: u64, generation: i64) -> RolloutStatus {
    let status = deployment.status.clone().unwrap_or_default();
    let spec = deployment.spec.as_ref();
    let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
    let observed_generation = status.observed_generation.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let live_release = spec
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.as_ref())
        .and_then(|l| l.get(LABEL_RELEASE))
        .and_then(|r| r.parse::<u64>().ok());
    let state = if live_release != Some(release) {
        RolloutState::Failed {
            reason: "Superseded".into(),
            message: match live_release {
                Some(other) => format!("the Deployment's pods are now release {other}"),
                None => "the Deployment's pods no longer carry an imago release".into(),
            },
        }
    } else if observed_generation < generation {
        RolloutState::InProgress {
            waiting_for: format!(
                "the deployment controller to observe generation {generation} (it has seen {observed_generation})"
            ),
        }
    } else if let Some(condition) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some(PROGRESS_DEADLINE_EXCEEDED)
    }) {
        RolloutState::Failed {
            reason: PROGRESS_DEADLINE_EXCEEDED.into(),
            message: condition.message.clone().unwrap_or_default(),
        }
    } else if updated < replicas {
        RolloutState::InProgress {
            waiting_for: format!("{updated} of {replicas} new replicas to be updated"),
        }
    } else if status.replicas.unwrap_or(0) > updated {
        RolloutState::InProgress {
            waiting_for: format!(
                "{} old replicas to terminate",
                status.replicas.unwrap_or(0) - updated
            ),
        }
    } else if available < updated {
        RolloutState::InProgress {
            waiting_for: format!("{available} of {updated} updated replicas to be available"),
        }
    } else {
        RolloutState::Complete
    };
    RolloutStatus {
        release,
        generation,
        observed_generation,
        replicas,
        updated,
        ready,
        available,
        state,
    }
}
