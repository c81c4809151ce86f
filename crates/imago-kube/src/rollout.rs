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
    let paused = spec.and_then(|s| s.paused) == Some(true);
    let done =
        updated >= replicas && status.replicas.unwrap_or(0) <= updated && available >= updated;
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
    } else if paused && !done {
        // The deployment controller neither rolls nor checks the progress deadline of a
        // paused Deployment: nothing moves until it is resumed.
        RolloutState::InProgress {
            waiting_for: format!(
                "the rollout to be resumed (spec.paused; {updated} of {replicas} replicas updated)"
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn deployment(release: u64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": 2},
            "spec": {"replicas": 3, "selector": {},
                "template": {"metadata": {"labels": {"imago.dev/release": release.to_string()}}}},
            "status": status,
        }))
        .unwrap()
    }

    fn state(release: u64, status: serde_json::Value) -> RolloutState {
        judge(&deployment(release, status), 5, 2).state
    }

    #[test]
    fn nothing_counts_before_the_controller_observed_the_applied_generation() {
        // Counts of the previous generation that would look complete.
        let stale = json!({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3,
            "availableReplicas": 3});
        assert!(matches!(state(5, stale), RolloutState::InProgress { .. }));
    }

    #[test]
    fn old_replicas_and_unavailable_ones_keep_a_rollout_going() {
        let old = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 3,
            "availableReplicas": 4});
        assert_eq!(
            state(5, old),
            RolloutState::InProgress {
                waiting_for: "1 old replicas to terminate".into()
            }
        );
        let unavailable = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3,
            "availableReplicas": 2});
        assert!(matches!(
            state(5, unavailable),
            RolloutState::InProgress { .. }
        ));
        let done = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3,
            "availableReplicas": 3});
        assert_eq!(state(5, done), RolloutState::Complete);
    }

    #[test]
    fn the_progress_deadline_and_another_release_fail_a_rollout() {
        let stuck = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded", "message": "timed out"}]});
        assert_eq!(
            state(5, stuck),
            RolloutState::Failed {
                reason: PROGRESS_DEADLINE_EXCEEDED.into(),
                message: "timed out".into()
            }
        );
        let done = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3,
            "availableReplicas": 3});
        assert!(
            matches!(state(6, done), RolloutState::Failed { reason, .. } if reason == "Superseded"),
            "release 6's pods are not release 5's rollout"
        );
    }

    /// `spec.paused`: a rollout that waits, never one that failed, whatever the condition says;
    /// one whose counts are done is complete.
    #[test]
    fn a_paused_deployment_waits_to_be_resumed() {
        let paused = |status: serde_json::Value| {
            let mut d = deployment(5, status);
            d.spec.as_mut().unwrap().paused = Some(true);
            judge(&d, 5, 2).state
        };
        let midway = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1,
            "availableReplicas": 3, "conditions": [{"type": "Progressing", "status": "Unknown",
                "reason": "DeploymentPaused", "message": "Deployment is paused"}]});
        assert_eq!(
            paused(midway),
            RolloutState::InProgress {
                waiting_for: "the rollout to be resumed (spec.paused; 1 of 3 replicas updated)"
                    .into()
            }
        );
        let stale_deadline = json!({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded", "message": "timed out"}]});
        assert!(matches!(
            paused(stale_deadline),
            RolloutState::InProgress { .. }
        ));
        let done = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3,
            "availableReplicas": 3});
        assert_eq!(paused(done), RolloutState::Complete);
    }
}
