//! The rollout's record and health gate: progress, completion, failure at the gate or the
//! progress deadline, and the automatic rollback.

use imago_runtime::Instance;

use super::{Controller, ServicePass};
use crate::error::DeployError;
use crate::rollout::{ObservedInstance, Phase, Step};
use crate::state::{Release, ReleaseOutcome, RolloutRow, now_ms};

impl Controller {
    /// The rollout record of `release`, made now unless it exists (a cluster service makes it
    /// before the engine is asked to change anything, so that every task of the rollout is
    /// younger than its start).
    pub(super) fn begin_rollout(
        &mut self,
        release: &Release,
        counts_json: String,
    ) -> Result<RolloutRow, DeployError> {
        let service = release.service.as_str();
        if let Some(row) = self.db.rollout(service)?
            && row.target_release == release.number
        {
            return Ok(row);
        }
        let now = now_ms();
        let row = RolloutRow {
            target_release: release.number,
            started_ms: now,
            last_progress_ms: now,
            counts_json,
        };
        self.db.put_rollout(service, &row)?;
        self.db.event(
            Some(service),
            "rollout",
            &format!("rollout of release {} started", release.number),
            &self.actor,
        )?;
        Ok(row)
    }

    /// Records progress, completion and failure of the desired release's rollout, and rolls back
    /// automatically when it fails.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn track_progress(
        &mut self,
        service: &str,
        release: &Release,
        step: &Step,
        observed: &[ObservedInstance],
        own: &[&Instance],
        has_outcome: bool,
        launching: bool,
        pass: &mut ServicePass,
    ) -> Result<(), DeployError> {
        if has_outcome {
            return Ok(());
        }
        let now = now_ms();
        let counts_json =
            serde_json::to_string(&step.counts).map_err(|source| DeployError::Encode {
                what: "counts",
                source,
            })?;
        let row = self.begin_rollout(release, counts_json.clone())?;
        if pass.complete {
            let took = now.saturating_sub(row.started_ms);
            self.db.record_outcome(
                service,
                release.number,
                ReleaseOutcome::Complete,
                &format!("deployment complete in {took} ms"),
                &self.actor,
            )?;
            self.db.clear_rollout(service)?;
            return Ok(());
        }
        // Health gate: a new instance that failed its checks, or died, fails the rollout.
        let failing = observed.iter().find(|o| {
            o.revision == release.revision
                && !o.draining
                && matches!(o.phase, Phase::Unhealthy | Phase::Exited)
        });
        let mut failure = failing.map(|o| {
            let instance = own.iter().find(|i| i.id == o.id);
            let why = match o.phase {
                Phase::Unhealthy => self
                    .health
                    .get(&o.id)
                    .and_then(|h| h.tracker.last_failure)
                    .unwrap_or_else(|| "health check failed".into()),
                _ => instance
                    .map(|i| describe_exit(i))
                    .unwrap_or_else(|| "exited".into()),
            };
            let logs = self.last_log_lines(&o.id, 5);
            format!(
                "instance {} of release {} failed its health gate: {why}{logs}",
                o.id, release.number
            )
        });
        if failure.is_none() {
            // Launches of the release under way are progress: the pass that waited for them
            // used to see the counts change when they returned.
            if counts_json != row.counts_json || launching {
                self.db.put_rollout(
                    service,
                    &RolloutRow {
                        last_progress_ms: now,
                        counts_json,
                        ..row
                    },
                )?;
            } else if now.saturating_sub(row.last_progress_ms)
                > release.spec.rollout.progress_deadline.as_millis() as u64
            {
                let last = observed
                    .iter()
                    .filter(|o| o.revision == release.revision)
                    .find_map(|o| self.health.get(&o.id).and_then(|h| h.tracker.last_failure));
                failure = Some(format!(
                    "release {} made no progress for {} (progress_deadline){}",
                    release.number,
                    humantime::format_duration(release.spec.rollout.progress_deadline),
                    last.map(|l| format!("; last health check failure: {l}"))
                        .unwrap_or_default()
                ));
            }
        }
        let Some(reason) = failure else { return Ok(()) };
        self.fail_rollout(service, release, reason, pass)
    }

    /// Records that `release`'s rollout failed for `reason` and, unless `auto_rollback` is off
    /// or there is nothing to go back to, the release that rolls back to the last completed one
    /// (image and configuration together), in one transaction.
    pub(super) fn fail_rollout(
        &mut self,
        service: &str,
        release: &Release,
        reason: String,
        pass: &mut ServicePass,
    ) -> Result<(), DeployError> {
        let rollback_to = match self.db.last_completed(service)? {
            Some(good)
                if release.spec.rollout.auto_rollback && good.revision != release.revision =>
            {
                Some(good)
            }
            _ => None,
        };
        let rollback = self.db.record_failure(
            service,
            release.number,
            &reason,
            rollback_to.as_ref(),
            &self.actor,
        )?;
        self.db.clear_rollout(service)?;
        pass.failed = Some(reason);
        match rollback {
            Some(rollback) => pass.rolled_back_to = rollback.rollback_of,
            None => self.db.event(
                Some(service),
                "rollback-skipped",
                if release.spec.rollout.auto_rollback {
                    "no earlier completed release to roll back to"
                } else {
                    "auto_rollback = false: holding the failed release"
                },
                &self.actor,
            )?,
        }
        Ok(())
    }

    fn last_log_lines(&self, id: &str, lines: usize) -> String {
        let Ok(bytes) = self.provider.logs(id) else {
            return String::new();
        };
        let text = String::from_utf8_lossy(&bytes);
        let tail: Vec<&str> = text
            .lines()
            .rev()
            .take(lines)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; last log lines:\n  {}", tail.join("\n  "))
        }
    }
}

pub(super) fn describe_exit(instance: &Instance) -> String {
    instance.describe_exit()
}
