//! The rollout engine's decision: one pure function from desired state plus observed instances
//! to the next step. It holds no state of its own, so a restarted controller recomputes exactly
//! the step it would have taken (the discipline of the Kubernetes Deployment controller).

use std::time::Duration;

use serde::Serialize;

use crate::spec::{Limits, Strategy};

/// What an instance is doing, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Launched, not yet passing its health check.
    Starting,
    /// Running since before this controller started, and not yet judged by its probes: it may
    /// be serving. Never retired to make room and never counted available until probed; it
    /// receives traffic only when no probed instance is ready.
    Unprobed,
    /// Passing its health check since `since_ms` (milliseconds on the controller's clock).
    Ready { since_ms: u64 },
    /// Failed its health check `unhealthy_threshold` times in a row.
    Unhealthy,
    /// Its process is gone.
    Exited,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedInstance {
    pub id: String,
    /// The revision it runs: the hash of image digest + full service configuration. Instances of
    /// two releases with the same revision are interchangeable, which makes a rollback to a
    /// release whose instances still run immediate.
    pub revision: String,
    pub phase: Phase,
    /// Taken out of the endpoint and waiting for its connections to finish before it is stopped.
    pub draining: bool,
    /// Runs something other than what its revision says (another spec, a modified root
    /// filesystem): replaced like an instance of an old revision, but part of no blue or green
    /// set, so it never decides where blue-green traffic goes.
    pub drifted: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct RolloutInput<'a> {
    pub limits: Limits,
    pub strategy: Strategy,
    pub min_ready: Duration,
    pub now_ms: u64,
    /// The revision of the desired release.
    pub target: &'a str,
    pub instances: &'a [ObservedInstance],
}

/// Instance counts; a change in any of them between passes is progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Non-draining instances of the target revision that are not unhealthy.
    pub updated: u32,
    /// Non-draining instances of other revisions.
    pub old: u32,
    /// Instances that count as available (ready for at least min_ready), any revision.
    pub available: u32,
    /// Every live instance, draining ones included.
    pub total: u32,
}

/// The next step. The controller performs it, observes again and asks again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Step {
    /// New instances of the target revision to launch now.
    pub launch: u32,
    /// Instances to take out of the endpoint, drain and stop.
    pub retire: Vec<String>,
    /// Exited instances to clean up (and replace, through `launch`).
    pub remove_dead: Vec<String>,
    /// Instances the service endpoint should send new connections to.
    pub route_to: Vec<String>,
    pub counts: Counts,
    /// Every instance runs the target, is available, and nothing is left to drain.
    pub complete: bool,
    /// Complete but for exited instances still to clean up (`remove_dead`): the controller
    /// completes a rollout whose only dead instances are ones it has long failed to remove.
    pub complete_but_dead: bool,
}

fn is_available(phase: Phase, min_ready: Duration, now_ms: u64) -> bool {
    match phase {
        Phase::Ready { since_ms } => {
            now_ms.saturating_sub(since_ms) >= min_ready.as_millis() as u64
        }
        _ => false,
    }
}

/// Instances not yet probed by this controller, to route to when no probed one is ready: they
/// were running before it started, so most likely serving, and refusing every connection until
/// the first probes return would be worse.
fn unprobed(instances: &[ObservedInstance], retire: &[String]) -> Vec<String> {
    instances
        .iter()
        .filter(|i| !i.draining && i.phase == Phase::Unprobed && !retire.contains(&i.id))
        .map(|i| i.id.clone())
        .collect()
}

/// Decides the next step of a rollout (or of keeping a settled service as it should be: the
/// same function replaces dead and unhealthy instances when nothing is being rolled out).
pub fn next_step(input: RolloutInput<'_>) -> Step {
    let RolloutInput {
        limits,
        strategy,
        min_ready,
        now_ms,
        target,
        instances,
    } = input;
    let replicas = limits.replicas;
    let mut step = Step::default();
    let available = |i: &ObservedInstance| is_available(i.phase, min_ready, now_ms);

    let mut new_ok: Vec<&ObservedInstance> = Vec::new();
    let mut old: Vec<&ObservedInstance> = Vec::new();
    let mut total = 0u32;
    for instance in instances {
        if instance.phase == Phase::Exited {
            step.remove_dead.push(instance.id.clone());
            continue;
        }
        total += 1;
        if instance.draining {
            continue;
        }
        if instance.phase == Phase::Unhealthy {
            // Replace, don't repair: an unhealthy instance of any revision goes; it serves
            // nothing, so retiring it never lowers availability.
            step.retire.push(instance.id.clone());
            continue;
        }
        if instance.revision == target {
            new_ok.push(instance);
        } else {
            old.push(instance);
        }
    }
    let available_new = new_ok.iter().filter(|i| available(i)).count() as u32;
    let available_old = old.iter().filter(|i| available(i)).count() as u32;
    let updated = new_ok.len() as u32;

    match strategy {
        Strategy::Rolling => {
            // Scale up within the surge budget. Instances being drained still occupy capacity.
            let ceiling = replicas + limits.max_surge;
            let want = replicas.saturating_sub(updated);
            step.launch = want.min(ceiling.saturating_sub(total));

            // Scale down old (and surplus new) instances while keeping replicas - max_unavailable
            // available. Not-available ones go first: they cost no availability.
            let floor = replicas.saturating_sub(limits.max_unavailable);
            let mut budget = (available_new + available_old).saturating_sub(floor);
            // Only an instance that never passed a check serves nothing and costs no capacity.
            // One that passes but has not been ready for min_ready yet (as every instance
            // seems right after a controller restart) serves traffic, and one not yet probed by
            // this controller may: both wait until they count as available.
            let mut old_starting: Vec<&ObservedInstance> = old
                .iter()
                .copied()
                .filter(|i| i.phase == Phase::Starting)
                .collect();
            let mut old_available: Vec<&ObservedInstance> =
                old.iter().copied().filter(|i| available(i)).collect();
            // Oldest-ready first among available ones is not knowable here; keep a stable order.
            old_starting.sort_by(|a, b| a.id.cmp(&b.id));
            old_available.sort_by(|a, b| a.id.cmp(&b.id));
            // A starting old instance may be retired freely only while new ones are on their
            // way; otherwise it is the service's capacity-in-waiting.
            if updated > 0 || step.launch > 0 {
                for i in old_starting {
                    step.retire.push(i.id.clone());
                }
            }
            for i in old_available {
                if budget == 0 {
                    break;
                }
                step.retire.push(i.id.clone());
                budget -= 1;
            }
            if updated > replicas {
                let mut surplus: Vec<_> = new_ok.clone();
                surplus.sort_by_key(|i| (available(i), i.id.clone()));
                for i in surplus.into_iter().take((updated - replicas) as usize) {
                    if available(i) {
                        if budget == 0 {
                            break;
                        }
                        budget -= 1;
                    } else if i.phase != Phase::Starting {
                        // Serving (or maybe serving) without counting yet: wait until it does.
                        continue;
                    }
                    step.retire.push(i.id.clone());
                }
            }
            step.route_to = instances
                .iter()
                .filter(|i| {
                    !i.draining
                        && matches!(i.phase, Phase::Ready { .. })
                        && !step.retire.contains(&i.id)
                })
                .map(|i| i.id.clone())
                .collect();
            if step.route_to.is_empty() {
                step.route_to = unprobed(instances, &step.retire);
            }
        }
        Strategy::BlueGreen => {
            step.launch = replicas.saturating_sub(updated);
            let green_ready = available_new >= replicas;
            if green_ready {
                for i in &old {
                    step.retire.push(i.id.clone());
                }
                if updated > replicas {
                    let mut surplus: Vec<_> = new_ok.clone();
                    surplus.sort_by_key(|i| (available(i), i.id.clone()));
                    for i in surplus.into_iter().take((updated - replicas) as usize) {
                        step.retire.push(i.id.clone());
                    }
                }
            }
            // Traffic stays entirely on blue until green is fully available, then switches at once.
            let blue_serving = old
                .iter()
                .any(|i| !i.drifted && matches!(i.phase, Phase::Ready { .. } | Phase::Unprobed));
            let serve_new = green_ready || !blue_serving;
            let routable = |i: &&ObservedInstance| {
                !i.draining
                    && matches!(i.phase, Phase::Ready { .. })
                    && !step.retire.contains(&i.id)
            };
            step.route_to = instances
                .iter()
                .filter(routable)
                .filter(|i| !i.drifted && (i.revision == target) == serve_new)
                .map(|i| i.id.clone())
                .collect();
            if step.route_to.is_empty() {
                // Drifted instances serve only when nothing else can.
                step.route_to = instances
                    .iter()
                    .filter(routable)
                    .map(|i| i.id.clone())
                    .collect();
            }
            if step.route_to.is_empty() {
                step.route_to = unprobed(instances, &step.retire);
            }
        }
    }
    step.counts = Counts {
        updated,
        old: old.len() as u32,
        available: available_new + available_old,
        total,
    };
    let draining = instances
        .iter()
        .any(|i| i.draining && i.phase != Phase::Exited);
    step.complete_but_dead = step.launch == 0
        && step.retire.is_empty()
        && old.is_empty()
        && !draining
        && updated == replicas
        && available_new == replicas;
    step.complete = step.complete_but_dead && step.remove_dead.is_empty();
    step
}

/// The step of a paused rollout: `step` with nothing launched and nothing retired. The
/// instances it would have retired stay as they are, and those among them that are ready keep
/// their connections (the endpoint routes to them as before); dead ones are still cleaned up,
/// since nothing could serve from them anyway.
pub fn paused(mut step: Step, instances: &[ObservedInstance]) -> Step {
    step.launch = 0;
    for id in std::mem::take(&mut step.retire) {
        let serving = instances.iter().any(|i| {
            i.id == id && !i.draining && matches!(i.phase, Phase::Ready { .. }) && !i.drifted
        });
        if serving && !step.route_to.contains(&id) {
            step.route_to.push(id);
        }
    }
    step.complete = false;
    step.complete_but_dead = false;
    step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_rollout_launches_and_retires_nothing_and_keeps_serving_what_runs() {
        let mut world = vec![
            ready("old0", "v1"),
            ready("old1", "v1"),
            ready("new0", "v2"),
        ];
        let input = |world: &[ObservedInstance]| {
            next_step(RolloutInput {
                limits: limits(2, 1, 0),
                strategy: Strategy::Rolling,
                min_ready: Duration::ZERO,
                now_ms: 1000,
                target: "v2",
                instances: world,
            })
        };
        let step = input(&world);
        assert!(
            !step.retire.is_empty() || step.launch > 0,
            "the rollout moves unpaused"
        );
        let held = paused(step, &world);
        assert_eq!((held.launch, held.retire.len()), (0, 0));
        let mut routed = held.route_to.clone();
        routed.sort();
        assert_eq!(routed, ["new0", "old0", "old1"]);
        // A dead instance is still removed, and not replaced while paused.
        world[0].phase = Phase::Exited;
        let held = paused(input(&world), &world);
        assert_eq!(held.remove_dead, ["old0"]);
        assert_eq!(held.launch, 0);
        assert!(!held.complete);
    }

    fn limits(replicas: u32, max_surge: u32, max_unavailable: u32) -> Limits {
        Limits {
            replicas,
            max_surge,
            max_unavailable,
        }
    }

    fn ready(id: &str, revision: &str) -> ObservedInstance {
        ObservedInstance {
            id: id.into(),
            revision: revision.into(),
            phase: Phase::Ready { since_ms: 0 },
            draining: false,
            drifted: false,
        }
    }

    /// Drives a whole rollout against a simulated world in which a launched instance becomes
    /// ready one pass later and a retired instance is gone one pass later. Checks the bounds at
    /// every pass and returns the number of passes.
    fn simulate(l: Limits, strategy: Strategy, initial_old: u32) -> u32 {
        let mut world: Vec<ObservedInstance> = (0..initial_old)
            .map(|i| ready(&format!("old{i}"), "v1"))
            .collect();
        let mut next_id = 0;
        for pass in 1..=200 {
            let step = next_step(RolloutInput {
                limits: l,
                strategy,
                min_ready: Duration::ZERO,
                now_ms: 1000,
                target: "v2",
                instances: &world,
            });
            if step.complete {
                return pass;
            }
            // Apply: draining instances from the previous pass are gone; retired ones drain.
            world.retain(|i| !i.draining);
            for id in &step.retire {
                if let Some(i) = world.iter_mut().find(|i| &i.id == id) {
                    i.draining = true;
                }
            }
            for i in world.iter_mut() {
                if i.phase == Phase::Starting {
                    i.phase = Phase::Ready { since_ms: 0 };
                }
            }
            for _ in 0..step.launch {
                world.push(ObservedInstance {
                    id: format!("new{next_id}"),
                    revision: "v2".into(),
                    phase: Phase::Starting,
                    draining: false,
                    drifted: false,
                });
                next_id += 1;
            }
            let live = world.len() as u32;
            assert!(
                live <= l.replicas
                    + l.max_surge.max(if strategy == Strategy::BlueGreen {
                        l.replicas
                    } else {
                        0
                    }),
                "pass {pass}: {live} instances exceed replicas + surge ({l:?})"
            );
            let available = world
                .iter()
                .filter(|i| !i.draining && matches!(i.phase, Phase::Ready { .. }))
                .count() as u32;
            if initial_old >= l.replicas {
                assert!(
                    available >= l.replicas - l.max_unavailable.min(l.replicas),
                    "pass {pass}: only {available} available ({l:?})"
                );
            }
        }
        panic!("rollout did not complete in 200 passes ({l:?}, {strategy:?})");
    }

    /// A small seeded generator (xorshift64*): thousands of random cases, each reproducible
    /// from the seed a failure prints, without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
        }
    }

    #[test]
    fn for_any_instance_states_no_step_takes_availability_below_the_floor_or_retires_serving_capacity()
     {
        for seed in 1..20_000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let l = limits(
                1 + rng.below(8) as u32,
                rng.below(4) as u32,
                rng.below(4) as u32,
            );
            let min_ready_ms = rng.below(3) * 1000;
            let now_ms = 10_000;
            let world: Vec<ObservedInstance> = (0..rng.below(14))
                .map(|n| ObservedInstance {
                    id: format!("i{n}"),
                    revision: ["v1", "v2", "drifted"][rng.below(3) as usize].into(),
                    phase: match rng.below(5) {
                        0 => Phase::Starting,
                        1 => Phase::Unprobed,
                        2 => Phase::Unhealthy,
                        3 => Phase::Exited,
                        _ => Phase::Ready {
                            since_ms: now_ms - rng.below(3000),
                        },
                    },
                    draining: rng.below(5) == 0,
                    drifted: false,
                })
                .collect();
            let input = RolloutInput {
                limits: l,
                strategy: Strategy::Rolling,
                min_ready: Duration::from_millis(min_ready_ms),
                now_ms,
                target: "v2",
                instances: &world,
            };
            let step = next_step(input);
            let available = |i: &ObservedInstance| {
                !i.draining && is_available(i.phase, input.min_ready, now_ms)
            };
            let before = world.iter().filter(|i| available(i)).count() as u32;
            let after = world
                .iter()
                .filter(|i| available(i) && !step.retire.contains(&i.id))
                .count() as u32;
            let floor = l.replicas.saturating_sub(l.max_unavailable);
            let case = format!("seed {seed}: {l:?}, min_ready {min_ready_ms} ms, {world:#?}");
            assert!(
                after >= floor.min(before),
                "{after} available after the step, floor {floor}: {case}"
            );
            for id in &step.retire {
                let i = world.iter().find(|i| &i.id == id).unwrap();
                assert!(!i.draining, "retired twice: {id}: {case}");
                assert!(
                    available(i) || matches!(i.phase, Phase::Starting | Phase::Unhealthy),
                    "{id} serves (or may) without counting yet, and was retired: {case}"
                );
            }
            let total = world.iter().filter(|i| i.phase != Phase::Exited).count() as u32;
            assert!(
                total + step.launch <= total.max(l.replicas + l.max_surge),
                "{total} + {} launched exceeds replicas + surge: {case}",
                step.launch
            );
        }
    }

    /// An instance of the simulated world.
    struct Simulated {
        id: String,
        revision: &'static str,
        /// When its checks truly start passing.
        ready_at: u64,
        /// When the controller retired it; it is gone a pass later.
        retired_at: Option<u64>,
        /// What the current controller run knows: `None` not probed by it yet, `Some(None)`
        /// probed and not ready, `Some(Some(since))` ready since.
        seen: Option<Option<u64>>,
    }

    /// Drives a rolling update against a world where instances take random times to become
    /// ready and the controller restarts at random passes, losing every probe result. With
    /// `persisted`, a restarted controller still knows since when each instance was ready (the
    /// state database keeps it); without, it sees instances it has not probed yet, then ready
    /// since its first probe. At every pass the instances truly serving never drop below
    /// replicas - max_unavailable, the total never exceeds replicas + max_surge, and the
    /// rollout completes.
    fn simulate_with_restarts(seed: u64, persisted: bool) {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let replicas = 1 + rng.below(6) as u32;
        let l = limits(replicas, rng.below(3) as u32, rng.below(2) as u32);
        let l = if l.max_surge == 0 && l.max_unavailable == 0 {
            limits(replicas, 1, 0)
        } else {
            l
        };
        let min_ready = Duration::from_millis(rng.below(4) * 100);
        let floor = replicas - l.max_unavailable.min(replicas);
        let mut world: Vec<Simulated> = (0..replicas)
            .map(|n| Simulated {
                id: format!("old{n}"),
                revision: "v1",
                ready_at: 0,
                retired_at: None,
                seen: Some(Some(0)),
            })
            .collect();
        let mut next_id = 0;
        let case = format!("seed {seed}, persisted {persisted}: {l:?}, min_ready {min_ready:?}");
        for pass in 1..=400u64 {
            let now = 1000 + pass * 100;
            world.retain(|i| i.retired_at.is_none_or(|at| at + 100 >= now));
            if rng.below(5) == 0 {
                for i in world.iter_mut() {
                    i.seen = match i.seen {
                        Some(Some(since)) if persisted => Some(Some(since)),
                        _ => None,
                    };
                }
            }
            let observed: Vec<ObservedInstance> = world
                .iter()
                .map(|i| ObservedInstance {
                    id: i.id.clone(),
                    revision: i.revision.into(),
                    phase: match i.seen {
                        None => Phase::Unprobed,
                        Some(None) => Phase::Starting,
                        Some(Some(since_ms)) => Phase::Ready { since_ms },
                    },
                    draining: i.retired_at.is_some(),
                    drifted: false,
                })
                .collect();
            let step = next_step(RolloutInput {
                limits: l,
                strategy: Strategy::Rolling,
                min_ready,
                now_ms: now,
                target: "v2",
                instances: &observed,
            });
            if step.complete {
                return;
            }
            for i in world.iter_mut() {
                if step.retire.contains(&i.id) && i.retired_at.is_none() {
                    i.retired_at = Some(now);
                }
            }
            for _ in 0..step.launch {
                world.push(Simulated {
                    id: format!("new{next_id}"),
                    revision: "v2",
                    ready_at: now + 100 * rng.below(5),
                    retired_at: None,
                    seen: Some(None),
                });
                next_id += 1;
            }
            let serving = world
                .iter()
                .filter(|i| i.retired_at.is_none() && i.ready_at <= now)
                .count() as u32;
            assert!(
                serving >= floor,
                "pass {pass}: only {serving} instances serve, floor {floor} ({case})"
            );
            assert!(
                world.len() as u32 <= replicas + l.max_surge,
                "pass {pass}: {} instances ({case})",
                world.len()
            );
            // The probes between passes.
            for i in world.iter_mut() {
                i.seen = Some(match i.seen {
                    Some(Some(since)) => Some(since),
                    _ => (i.ready_at <= now).then_some(now),
                });
            }
        }
        panic!("the rollout did not complete in 400 passes ({case})");
    }

    #[test]
    fn rolling_updates_with_controller_restarts_at_any_pass_keep_the_floor_and_complete() {
        for seed in 1..2_000 {
            simulate_with_restarts(seed, true);
            simulate_with_restarts(seed, false);
        }
    }

    #[test]
    fn rolling_update_respects_surge_and_unavailability_and_completes() {
        for (r, s, u) in [
            (3, 1, 0),
            (3, 0, 1),
            (10, 3, 0),
            (10, 2, 2),
            (1, 1, 0),
            (1, 0, 1),
            (5, 5, 5),
        ] {
            simulate(limits(r, s, u), Strategy::Rolling, r);
        }
    }

    #[test]
    fn blue_green_switches_only_when_all_new_are_available() {
        let l = limits(3, 0, 0);
        let mut world = vec![ready("b1", "v1"), ready("b2", "v1"), ready("b3", "v1")];
        world.push(ObservedInstance {
            id: "g1".into(),
            revision: "v2".into(),
            phase: Phase::Starting,
            draining: false,
            drifted: false,
        });
        world.push(ready("g2", "v2"));
        world.push(ready("g3", "v2"));
        let input = RolloutInput {
            limits: l,
            strategy: Strategy::BlueGreen,
            min_ready: Duration::ZERO,
            now_ms: 5,
            target: "v2",
            instances: &world,
        };
        let step = next_step(input);
        assert!(step.retire.is_empty(), "blue stays until green is complete");
        assert_eq!(step.route_to, vec!["b1", "b2", "b3"]);
        let mut world = world.clone();
        world[3].phase = Phase::Ready { since_ms: 5 };
        let step = next_step(RolloutInput {
            limits: l,
            strategy: Strategy::BlueGreen,
            min_ready: Duration::ZERO,
            now_ms: 5,
            target: "v2",
            instances: &world,
        });
        assert_eq!(step.retire, vec!["b1", "b2", "b3"]);
        assert_eq!(
            step.route_to,
            vec!["g1", "g2", "g3"],
            "traffic switches at once"
        );
        // launch, become ready, switch + retire blue, blue drained, complete.
        assert_eq!(simulate(l, Strategy::BlueGreen, 3), 5);
    }

    #[test]
    fn blue_green_keeps_serving_the_current_set_while_a_drifted_instance_is_replaced() {
        let l = limits(3, 0, 0);
        let mut world = vec![ready("a", "v1"), ready("b", "v1"), ready("c", "drifted-c")];
        world[2].drifted = true;
        let input = RolloutInput {
            limits: l,
            strategy: Strategy::BlueGreen,
            min_ready: Duration::ZERO,
            now_ms: 5,
            target: "v1",
            instances: &world,
        };
        let step = next_step(input);
        assert_eq!(step.launch, 1);
        assert!(step.retire.is_empty(), "c serves capacity until replaced");
        assert_eq!(
            step.route_to,
            vec!["a", "b"],
            "the settled set keeps its traffic; the drifted instance is no blue set"
        );
        let mut world = world.clone();
        world.push(ready("d", "v1"));
        let step = next_step(RolloutInput {
            instances: &world,
            ..input
        });
        assert_eq!(step.retire, vec!["c"]);
        assert_eq!(step.route_to, vec!["a", "b", "d"]);

        // Only drifted instances are ready: they keep serving rather than nothing.
        let mut world = vec![ready("x", "drifted-x"), ready("y", "drifted-y")];
        for i in &mut world {
            i.drifted = true;
        }
        let step = next_step(RolloutInput {
            instances: &world,
            ..input
        });
        assert_eq!(step.route_to, vec!["x", "y"]);
        assert_eq!(step.launch, 3);
    }

    #[test]
    fn min_ready_holds_back_retirement() {
        let world = vec![
            ready("old", "v1"),
            ObservedInstance {
                id: "new".into(),
                revision: "v2".into(),
                phase: Phase::Ready { since_ms: 900 },
                draining: false,
                drifted: false,
            },
        ];
        let input = RolloutInput {
            limits: limits(1, 1, 0),
            strategy: Strategy::Rolling,
            min_ready: Duration::from_secs(1),
            now_ms: 1000,
            target: "v2",
            instances: &world,
        };
        assert!(
            next_step(input).retire.is_empty(),
            "new has been ready 100ms of 1s"
        );
        let step = next_step(RolloutInput {
            now_ms: 1900,
            ..input
        });
        assert_eq!(step.retire, vec!["old"]);
    }

    #[test]
    fn dead_and_unhealthy_instances_are_replaced_not_repaired() {
        let mut world = vec![ready("a", "v1"), ready("b", "v1"), ready("c", "v1")];
        world[1].phase = Phase::Exited;
        world[2].phase = Phase::Unhealthy;
        let step = next_step(RolloutInput {
            limits: limits(3, 1, 0),
            strategy: Strategy::Rolling,
            min_ready: Duration::ZERO,
            now_ms: 0,
            target: "v1",
            instances: &world,
        });
        assert_eq!(step.remove_dead, vec!["b"]);
        assert_eq!(step.retire, vec!["c"]);
        assert_eq!(
            step.launch, 2,
            "3 replicas, 1 healthy left; c still occupies capacity while it drains: 2 + 1 surge"
        );
        assert_eq!(step.route_to, vec!["a"]);
        assert!(!step.complete);
    }

    #[test]
    fn a_settled_service_is_complete_and_does_nothing() {
        let world = vec![ready("a", "v1"), ready("b", "v1")];
        let step = next_step(RolloutInput {
            limits: limits(2, 1, 0),
            strategy: Strategy::Rolling,
            min_ready: Duration::ZERO,
            now_ms: 0,
            target: "v1",
            instances: &world,
        });
        assert!(step.complete);
        assert_eq!(step.launch, 0);
        assert!(step.retire.is_empty());
    }

    #[test]
    fn scaling_down_retires_surplus_within_the_availability_floor() {
        let world: Vec<_> = (0..5).map(|i| ready(&format!("i{i}"), "v1")).collect();
        let step = next_step(RolloutInput {
            limits: limits(3, 1, 0),
            strategy: Strategy::Rolling,
            min_ready: Duration::ZERO,
            now_ms: 0,
            target: "v1",
            instances: &world,
        });
        assert_eq!(step.retire.len(), 2);
    }

    #[test]
    fn ten_thousand_instances_take_one_fast_pass() {
        let world: Vec<_> = (0..10_000)
            .map(|i| ready(&format!("i{i:05}"), if i % 2 == 0 { "v1" } else { "v2" }))
            .collect();
        let step = next_step(RolloutInput {
            limits: limits(10_000, 2_500, 0),
            strategy: Strategy::Rolling,
            min_ready: Duration::ZERO,
            now_ms: 0,
            target: "v2",
            instances: &world,
        });
        assert_eq!(step.counts.updated, 5_000);
        assert_eq!(step.launch, 2_500);
    }
}
