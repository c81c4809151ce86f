//! `imago plan`: what a rollout would do, wave by wave, before anything runs. The waves come from
//! the same [`next_step`] the controller uses, run against a simulated world in which every
//! launched instance becomes available one wave later.

use std::time::Duration;

use serde::Serialize;

use crate::rollout::{ObservedInstance, Phase, RolloutInput, next_step};
use crate::spec::{Limits, Strategy};

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
