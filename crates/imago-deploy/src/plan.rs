//! `imago plan`: whether a service gets a new release, and what its rollout would do, wave by
//! wave, before anything runs. The waves come from the same [`next_step`] the controller uses,
//! run against a simulated world in which every launched instance becomes available one wave
//! later. A service on a cluster target is compared with its live service instead
//! ([`cluster_plan`]): create, update (which fields), unchanged or drifted.

use std::fmt;
use std::time::Duration;

use imago_oci::Digest;
use imago_runtime::Instance;
use serde::Serialize;

use crate::cluster::{ClusterComparison, ClusterService};
use crate::controller::{LABEL_SERVICE, cluster_service};
use crate::error::DeployError;
use crate::rollout::{ObservedInstance, Phase, RolloutInput, next_step};
use crate::spec::{Limits, ResolvedTarget, ServiceSpec, Strategy};
use crate::state::{Release, fingerprint, restarted_revision};

/// What applying a service would do to its releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    #[serde(rename = "first release")]
    FirstRelease,
    #[serde(rename = "new release")]
    NewRelease,
    #[serde(rename = "no change")]
    NoChange,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::FirstRelease => "first release",
            Action::NewRelease => "new release",
            Action::NoChange => "no change",
        })
    }
}

/// What `imago apply` would do to one service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePlan {
    pub service: String,
    pub action: Action,
    pub current_release: Option<u64>,
    pub current_digest: Option<Digest>,
    /// The image digest the new release would pin (unknown when the image needs a rebuild).
    pub digest: Option<Digest>,
    pub image_rebuild: bool,
    pub replicas: u32,
    pub instances_replaced: u32,
    /// The local rollout's waves (a cluster engine rolls out on its own: see `cluster`).
    pub rollout: Option<RolloutPlan>,
    /// For a service on a cluster target: what becomes of its live service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterPlan>,
}

/// What applying does to the live service on a cluster target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterAction {
    /// No live service: it is created.
    Create,
    /// The live service runs another revision: the engine rolls it over.
    Update,
    /// The live service is the release's rendering.
    Unchanged,
    /// The live service is labelled with the release, but fields were changed out of band: the
    /// controller applies the release again.
    Drifted,
}

impl fmt::Display for ClusterAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClusterAction::Create => "create",
            ClusterAction::Update => "update",
            ClusterAction::Unchanged => "unchanged",
            ClusterAction::Drifted => "drifted",
        })
    }
}

/// The cluster side of a [`ServicePlan`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterPlan {
    pub target: String,
    pub engine: String,
    pub action: ClusterAction,
    /// The release the live service's labels name.
    pub live_release: Option<u64>,
    /// The managed fields the update changes (update), or that were changed out of band and
    /// are put back (drifted), as `field: live != rendered`.
    pub fields: Vec<String>,
}

/// The engine input of the release `apply` would record for `spec` pinned to `digest` (its
/// number: the next one, or the current one when nothing changes), for comparison with the
/// live service.
pub fn proposed_cluster_service(
    name: &str,
    spec: &ServiceSpec,
    digest: &Digest,
    current: Option<&Release>,
    target: &ResolvedTarget,
) -> Result<ClusterService, DeployError> {
    let (config_hash, revision) = fingerprint(spec, digest)?;
    // Apply keeps the current restart generation (see `Release::restart`).
    let restart = current.map_or(0, |r| r.restart);
    let revision = restarted_revision(&revision, restart);
    let number = match current {
        Some(r) if r.revision == revision => r.number,
        Some(r) => r.number + 1,
        None => 1,
    };
    let release = Release {
        service: name.to_owned(),
        number,
        image_digest: digest.clone(),
        config_hash,
        revision,
        spec: spec.clone(),
        created_ms: 0,
        reason: String::new(),
        rollback_of: None,
        restart,
    };
    Ok(cluster_service(&release, target))
}

/// Judges the live service (`live`: compared with the proposed release, whose revision is
/// `revision`; `None` when the image must be rebuilt first and so has no digest yet).
pub fn cluster_plan(
    target: &ResolvedTarget,
    revision: Option<&str>,
    live: Option<&ClusterComparison>,
) -> ClusterPlan {
    let (action, fields) = match (live, revision) {
        (None, _) => (ClusterAction::Create, Vec::new()),
        (Some(_), None) => (
            ClusterAction::Update,
            vec!["image: rebuilt by apply, digest not known yet".to_owned()],
        ),
        (Some(live), Some(revision)) if live.revision.as_deref() == Some(revision) => {
            if live.differences.is_empty() {
                (ClusterAction::Unchanged, Vec::new())
            } else {
                (ClusterAction::Drifted, live.differences.clone())
            }
        }
        (Some(live), Some(_)) => (ClusterAction::Update, live.differences.clone()),
    };
    ClusterPlan {
        target: target.name.clone(),
        engine: target.spec.engine.to_string(),
        action,
        live_release: live.and_then(|l| l.release),
        fields,
    }
}

/// Plans applying `spec` (validated to `limits`) as service `name`, whose desired release is
/// `current`, pinned to `digest` (`None` when the image must be rebuilt first, which is
/// counted as a change), with `running` the instances the provider lists now.
pub fn plan_service(
    name: &str,
    spec: &ServiceSpec,
    limits: Limits,
    current: Option<&Release>,
    digest: Option<Digest>,
    running: &[Instance],
) -> Result<ServicePlan, DeployError> {
    let changed = match (current, &digest) {
        (Some(release), Some(digest)) => {
            restarted_revision(&fingerprint(spec, digest)?.1, release.restart) != release.revision
        }
        _ => true,
    };
    let live = running
        .iter()
        .filter(|i| i.labels.get(LABEL_SERVICE).map(String::as_str) == Some(name) && i.is_active())
        .count() as u32;
    Ok(ServicePlan {
        service: name.to_owned(),
        action: match (current, changed) {
            (None, _) => Action::FirstRelease,
            (Some(_), true) => Action::NewRelease,
            (Some(_), false) => Action::NoChange,
        },
        current_release: current.map(|r| r.number),
        current_digest: current.map(|r| r.image_digest.clone()),
        image_rebuild: digest.is_none(),
        digest,
        replicas: limits.replicas,
        instances_replaced: if changed { live } else { 0 },
        cluster: None,
        rollout: changed.then(|| {
            plan_rollout(
                limits,
                spec.rollout.strategy,
                live,
                wave_time(spec, live),
                spec.rollout.drain,
            )
        }),
    })
}

/// The expected time of one wave: launch, first healthy check, min_ready, then the retired
/// instance's stop (which frees the surge slot for the next wave) when there are instances to
/// retire.
fn wave_time(spec: &ServiceSpec, live: u32) -> Duration {
    spec.rollout.min_ready
        + spec
            .health
            .as_ref()
            .map_or(Duration::from_millis(100), |h| h.interval)
        + Duration::from_millis(50)
        + if live > 0 {
            spec.stop_grace_period
        } else {
            Duration::ZERO
        }
}

/// One wave: instances launched together, and what is retired once they are available.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wave {
    pub launch: u32,
    pub retire: u32,
    /// The fewest available instances at any moment of this wave.
    pub min_available: u32,
    /// The most instances alive at any moment of this wave.
    pub max_total: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutPlan {
    pub waves: Vec<Wave>,
    /// The fewest available instances during the whole rollout.
    pub min_available: u32,
    pub max_total: u32,
    /// waves x (launch + first health check + min_ready) + drain of the last retired instances.
    #[serde(with = "millis")]
    pub expected: Duration,
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// Plans replacing `current` running instances (all of another revision) with `limits.replicas`
/// new ones. `wave_time` is the expected launch + first healthy check + min_ready of one wave.
pub fn plan_rollout(
    limits: Limits,
    strategy: Strategy,
    current: u32,
    wave_time: Duration,
    drain: Duration,
) -> RolloutPlan {
    let mut world: Vec<ObservedInstance> = (0..current)
        .map(|i| ObservedInstance {
            id: format!("old-{i:06}"),
            revision: "current".into(),
            phase: Phase::Ready { since_ms: 0 },
            draining: false,
            drifted: false,
        })
        .collect();
    let mut waves = Vec::new();
    let mut next_id = 0u32;
    // A bound on passes: every useful pass launches or retires at least one instance.
    for _ in 0..(2 * (current + limits.replicas) + 4) {
        let step = next_step(RolloutInput {
            limits,
            strategy,
            min_ready: Duration::ZERO,
            now_ms: 0,
            target: "next",
            instances: &world,
        });
        if step.complete {
            break;
        }
        // Retired instances leave (after draining) during this wave; launched ones become
        // available at its end.
        world.retain(|i| !step.retire.contains(&i.id) && i.phase != Phase::Exited);
        let available_during = world
            .iter()
            .filter(|i| matches!(i.phase, Phase::Ready { .. }))
            .count() as u32;
        let total_during = world.len() as u32 + step.launch + step.retire.len() as u32;
        for _ in 0..step.launch {
            world.push(ObservedInstance {
                id: format!("new-{next_id:06}"),
                revision: "next".into(),
                phase: Phase::Ready { since_ms: 0 },
                draining: false,
                drifted: false,
            });
            next_id += 1;
        }
        if step.launch == 0 && step.retire.is_empty() {
            break;
        }
        match waves.last_mut() {
            // A pass that only retires finishes the previous wave.
            Some(last) if step.launch == 0 => {
                let last: &mut Wave = last;
                last.retire += step.retire.len() as u32;
                last.min_available = last.min_available.min(available_during);
            }
            _ => waves.push(Wave {
                launch: step.launch,
                retire: step.retire.len() as u32,
                min_available: available_during,
                max_total: total_during,
            }),
        }
    }
    let launching_waves = waves.iter().filter(|w| w.launch > 0).count() as u32;
    RolloutPlan {
        min_available: waves
            .iter()
            .map(|w| w.min_available)
            .min()
            .unwrap_or(current.min(limits.replicas)),
        max_total: waves.iter().map(|w| w.max_total).max().unwrap_or(current),
        expected: wave_time * launching_waves
            + if waves.iter().any(|w| w.retire > 0) {
                drain
            } else {
                Duration::ZERO
            },
        waves,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::instance_spec;
    use crate::state::StateDb;
    use imago_runtime::{Engine, Status};

    fn spec(json: serde_json::Value) -> ServiceSpec {
        serde_json::from_value(json).unwrap()
    }

    /// `replicas` running instances of `release`, plus one exited one (which is not live).
    fn instances_of(release: &Release, replicas: usize) -> Vec<Instance> {
        let wanted = instance_spec(release, Engine::Embedded).unwrap();
        let mut instances: Vec<Instance> = (0..=replicas)
            .map(|i| Instance::new(format!("{}-{i}", release.service), &wanted).unwrap())
            .collect();
        for (i, instance) in instances.iter_mut().enumerate() {
            instance.status = if i < replicas {
                Status::Running
            } else {
                Status::Exited
            };
        }
        instances
    }

    #[test]
    fn a_service_plan_says_whether_the_release_changes_and_how_it_rolls_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(&dir.path().join("state.db")).unwrap();
        let v1 = spec(serde_json::json!({
            "image": "web", "replicas": 2, "stop_grace_period": "1s",
            "rollout": {"max_surge": 1, "min_ready": "2s"},
        }));
        let limits = v1.validate("web").unwrap();
        let digest = Digest::of(b"v1");

        let first = plan_service("web", &v1, limits, None, Some(digest.clone()), &[]).unwrap();
        assert_eq!(first.action, Action::FirstRelease);
        assert_eq!((first.instances_replaced, first.image_rebuild), (0, false));
        let rollout = first.rollout.unwrap();
        assert_eq!(rollout.waves.len(), 1, "nothing to replace: all at once");
        // min_ready + the default 100 ms to the first check + 50 ms, and no stop.
        assert_eq!(rollout.expected, Duration::from_millis(2150));

        let (current, _) = db
            .record_release("web", &v1, &digest, "apply", None, "test")
            .unwrap();
        let mut running = instances_of(&current, 2);
        running.extend(instances_of(
            &db.record_release("api", &v1, &digest, "apply", None, "test")
                .unwrap()
                .0,
            3,
        ));
        let apply = |spec: &ServiceSpec, digest: Option<Digest>| {
            plan_service("web", spec, limits, Some(&current), digest, &running).unwrap()
        };
        let same = apply(&v1, Some(digest.clone()));
        assert_eq!(same.action, Action::NoChange);
        assert_eq!(same.current_release, Some(current.number));
        assert_eq!((same.instances_replaced, same.rollout), (0, None));

        let mut v2 = v1.clone();
        v2.env.insert("V".into(), "2".into());
        let changed = apply(&v2, Some(digest.clone()));
        assert_eq!(changed.action, Action::NewRelease);
        assert_eq!(
            changed.instances_replaced, 2,
            "the running instances of web only"
        );
        let rollout = changed.rollout.unwrap();
        assert_eq!(rollout.waves.len(), 2);
        // Two waves of (2 s + 100 ms + 50 ms + the 1 s stop), then the 2 s default drain.
        assert_eq!(rollout.expected, Duration::from_millis(2 * 3150 + 2000));

        let rebuild = apply(&v1, None);
        assert_eq!(
            rebuild.action,
            Action::NewRelease,
            "an unknown digest is a change"
        );
        assert!(rebuild.image_rebuild && rebuild.digest.is_none());
        assert_eq!(
            serde_json::to_value(&rebuild).unwrap()["action"],
            "new release",
            "the JSON of `imago plan`"
        );
    }

    #[test]
    fn a_cluster_plan_says_create_update_unchanged_or_drifted() {
        let target: ResolvedTarget = serde_json::from_value(serde_json::json!({
            "name": "prod", "engine": "swarm", "registry": "127.0.0.1:5000/t"
        }))
        .unwrap();
        let live = |revision: &str, differences: &[&str]| ClusterComparison {
            release: Some(4),
            revision: Some(revision.into()),
            config_hash: None,
            differences: differences.iter().map(|d| d.to_string()).collect(),
            update: crate::cluster::UpdateState::Completed,
        };
        let plan = |revision, l: Option<&ClusterComparison>| cluster_plan(&target, revision, l);
        assert_eq!(plan(Some("r5"), None).action, ClusterAction::Create);
        let unchanged = plan(Some("r4"), Some(&live("r4", &[])));
        assert_eq!(
            (unchanged.action, unchanged.live_release),
            (ClusterAction::Unchanged, Some(4))
        );
        let drifted = plan(Some("r4"), Some(&live("r4", &["image: a != b"])));
        assert_eq!(drifted.action, ClusterAction::Drifted);
        assert_eq!(drifted.fields, ["image: a != b"]);
        let update = plan(Some("r5"), Some(&live("r4", &["env: [] != [\"V=2\"]"])));
        assert_eq!(update.action, ClusterAction::Update);
        assert_eq!(update.fields, ["env: [] != [\"V=2\"]"]);
        assert_eq!(
            serde_json::to_value(&update).unwrap()["action"],
            "update",
            "the JSON of `imago plan`"
        );
        assert_eq!(
            plan(None, Some(&live("r4", &[]))).action,
            ClusterAction::Update
        );
    }

    #[test]
    fn three_replicas_with_one_surge_roll_in_three_waves_at_full_capacity() {
        let plan = plan_rollout(
            Limits {
                replicas: 3,
                max_surge: 1,
                max_unavailable: 0,
            },
            Strategy::Rolling,
            3,
            Duration::from_secs(2),
            Duration::from_secs(1),
        );
        assert_eq!(
            plan.waves.iter().map(|w| w.launch).collect::<Vec<_>>(),
            vec![1, 1, 1]
        );
        assert_eq!(plan.waves.iter().map(|w| w.retire).sum::<u32>(), 3);
        assert_eq!(plan.min_available, 3);
        assert_eq!(plan.max_total, 4);
        assert_eq!(plan.expected, Duration::from_secs(7));
    }

    #[test]
    fn max_unavailable_trades_capacity_for_speed() {
        let plan = plan_rollout(
            Limits {
                replicas: 4,
                max_surge: 0,
                max_unavailable: 2,
            },
            Strategy::Rolling,
            4,
            Duration::from_secs(1),
            Duration::ZERO,
        );
        assert_eq!(plan.min_available, 2);
        assert_eq!(plan.max_total, 4);
        assert_eq!(plan.waves.iter().filter(|w| w.launch > 0).count(), 2);
    }

    #[test]
    fn blue_green_is_one_wave_at_double_size() {
        let plan = plan_rollout(
            Limits {
                replicas: 3,
                max_surge: 0,
                max_unavailable: 0,
            },
            Strategy::BlueGreen,
            3,
            Duration::from_secs(1),
            Duration::ZERO,
        );
        assert_eq!(plan.waves[0].launch, 3);
        assert_eq!(plan.max_total, 6);
        assert_eq!(plan.min_available, 3);
    }

    #[test]
    fn a_first_deploy_launches_everything_at_once() {
        let plan = plan_rollout(
            Limits {
                replicas: 5,
                max_surge: 2,
                max_unavailable: 0,
            },
            Strategy::Rolling,
            0,
            Duration::from_secs(1),
            Duration::ZERO,
        );
        assert_eq!(plan.waves.len(), 1);
        assert_eq!(plan.waves[0].launch, 5);
        assert_eq!(plan.min_available, 0);
    }
}
