//! Launches in the background: a pass starts the launches a rollout step asks for and moves on;
//! later passes count the launches still under way as instances of their revision (against
//! `max_surge` and the desired count, never as available) and pick up what has finished.
//!
//! Launching a wave of hundreds of instances takes seconds under load; while it did so inside
//! the pass, nothing else happened for the service: no retired instance was stopped, no health
//! judgment acted on, no new apply, rollback or pause taken up. Nothing here is needed by a
//! restarted controller: a launch its predecessor's death cut short is `launch_interrupted` on
//! disk and removed, and one that finished is a listed instance of its revision.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use imago_runtime::{Instance, InstanceSpec, Provider, RuntimeError};

use super::Wake;
use crate::rollout::{ObservedInstance, Phase};
use crate::state::now_ms;

/// At most this many launches of one revision run at once (each on its own thread, mostly
/// waiting for its supervisor process).
pub(super) const PARALLEL_LAUNCHES: usize = 8;

/// A finished launch wakes the loop at most this often: each pass lists every instance
/// (hundreds of milliseconds at 1,000 of them), and a wave of 250 launches finishing one by one
/// must not turn into 250 back-to-back passes on a 2-core host.
const NUDGE_SPACING: Duration = Duration::from_millis(200);

/// Stands in for a launch under way in the rollout's view; never a real instance's id (those
/// are hex), so nothing is ever retired, routed or removed by it.
const PENDING_PREFIX: &str = "(launching ";

/// Whether `id` stands for a launch under way (see [`Launches::pending_instances`]).
pub(super) fn is_pending(id: &str) -> bool {
    id.starts_with(PENDING_PREFIX)
}

/// The launches of one revision of one service.
struct Launcher {
    service: String,
    revision: String,
    release_number: u64,
    queue: Arc<Queue>,
}

/// Shared between the controller and the launcher's worker threads.
struct Queue {
    state: Mutex<QueueState>,
    spec: InstanceSpec,
    provider: Arc<dyn Provider>,
    wake: Arc<Wake>,
}

#[derive(Default)]
struct QueueState {
    /// Launches asked for and not started yet.
    to_start: usize,
    /// Launches started whose `launch` has not returned.
    in_flight: usize,
    /// Worker threads alive.
    workers: usize,
    /// Returned launches not yet taken by a pass.
    done: Vec<Result<Instance, RuntimeError>>,
    /// A launch failed since launches were last asked for.
    failed: bool,
    last_nudge: Option<Instant>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One worker: launches until nothing is left to start. After a failure nothing more is
    /// started (one that fails will likely fail again: the next pass asks anew).
    fn work(self: Arc<Queue>) {
        loop {
            {
                let mut state = self.lock();
                if state.to_start == 0 {
                    state.workers -= 1;
                    let well = !state.failed;
                    drop(state);
                    // The last worker of the last launches under way settles the wait: the
                    // rollout waits for the pass that takes them. Else its results were
                    // hinted (and a failed launch is asked for again at the paced rate).
                    self.wake.end(well);
                    return;
                }
                state.to_start -= 1;
                state.in_flight += 1;
            }
            let result = self.provider.launch(&self.spec);
            let mut state = self.lock();
            state.in_flight -= 1;
            if result.is_err() {
                state.to_start = 0;
                state.failed = true;
            }
            state.done.push(result);
            // Its probe starts when a pass takes it: soon, but not one pass per launch.
            spaced_hint(&self.wake, &mut state.last_nudge);
        }
    }
}

/// Hints the loop now, or (hinted less than [`NUDGE_SPACING`] ago, as `last` says) when the
/// spacing is up: what finished beside the loop is taken soon, but not one pass each (and
/// not within the pacing gap: see [`Wake::hint`]).
pub(super) fn spaced_hint(wake: &Wake, last: &mut Option<Instant>) {
    let now = Instant::now();
    match *last {
        Some(at) if now.duration_since(at) < NUDGE_SPACING => {
            let due = at + NUDGE_SPACING - now;
            wake.hint_at(now_ms() + due.as_millis() as u64 + 1);
        }
        _ => {
            *last = Some(now);
            wake.hint();
        }
    }
}

/// A returned launch, with the service, revision and release it was for.
pub(super) struct Finished {
    pub service: String,
    pub revision: String,
    pub release_number: u64,
    pub result: Result<Instance, RuntimeError>,
}

/// Every launch this controller has under way.
#[derive(Default)]
pub(super) struct Launches {
    launchers: Vec<Launcher>,
    /// Launches under way when the pass took the finished ones, by service and revision: what
    /// the pass counts. A live count read later would miss a launch that returned after the
    /// listing (not listed, no longer under way) and let the pass launch beyond the surge.
    counted: Vec<(String, String, usize)>,
}

impl Launches {
    /// Starts `count` launches of `spec` (revision `revision` of release `release_number` of
    /// `service`) beside the loop, up to [`PARALLEL_LAUNCHES`] at a time per revision.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        &mut self,
        provider: &Arc<dyn Provider>,
        wake: &Arc<Wake>,
        service: &str,
        revision: &str,
        release_number: u64,
        spec: &InstanceSpec,
        count: usize,
    ) {
        if count == 0 {
            return;
        }
        let position = self
            .launchers
            .iter()
            .position(|l| l.service == service && l.revision == revision);
        let launcher = match position {
            Some(i) => &mut self.launchers[i],
            None => {
                self.launchers.push(Launcher {
                    service: service.to_owned(),
                    revision: revision.to_owned(),
                    release_number,
                    queue: Arc::new(Queue {
                        state: Mutex::new(QueueState::default()),
                        spec: spec.clone(),
                        provider: provider.clone(),
                        wake: wake.clone(),
                    }),
                });
                let last = self.launchers.len() - 1;
                &mut self.launchers[last]
            }
        };
        launcher.release_number = release_number;
        let mut state = launcher.queue.lock();
        state.to_start += count;
        state.failed = false;
        let new_workers = state
            .to_start
            .min(PARALLEL_LAUNCHES.saturating_sub(state.workers));
        state.workers += new_workers;
        drop(state);
        for _ in 0..new_workers {
            wake.begin();
            let queue = launcher.queue.clone();
            let spawned = std::thread::Builder::new()
                .name("imago-launch".into())
                .spawn(move || queue.work());
            if spawned.is_err() {
                // No thread to be had (a tasks limit): the launches wait in the queue for the
                // workers there are, or for the next pass that asks, instead of the controller
                // dying on a panic.
                launcher.queue.lock().workers -= 1;
                wake.end(false);
            }
        }
    }

    /// Takes the launches that returned, and forgets launchers with nothing left under way.
    /// Called before the instances are listed, so a launch is always either counted as under
    /// way or (once taken) in the listing: counted twice at worst, for a moment, never missed.
    pub(super) fn take_finished(&mut self) -> Vec<Finished> {
        let mut taken = Vec::new();
        let counted = &mut self.counted;
        counted.clear();
        self.launchers.retain(|launcher| {
            let mut state = launcher.queue.lock();
            for result in std::mem::take(&mut state.done) {
                taken.push(Finished {
                    service: launcher.service.clone(),
                    revision: launcher.revision.clone(),
                    release_number: launcher.release_number,
                    result,
                });
            }
            let under_way = state.to_start + state.in_flight;
            if under_way > 0 {
                counted.push((
                    launcher.service.clone(),
                    launcher.revision.clone(),
                    under_way,
                ));
            }
            under_way > 0
        });
        taken
    }

    /// Starts no more launches of `service` other than of `revision` (its desired one): those
    /// already under way finish, and are retired as they are taken.
    pub(super) fn abandon_other_revisions(&mut self, service: &str, revision: Option<&str>) {
        for launcher in &self.launchers {
            if launcher.service == service && Some(launcher.revision.as_str()) != revision {
                launcher.queue.lock().to_start = 0;
            }
        }
    }

    /// Starts no more launches of `service` at all (paused, or its release failed): those
    /// already running finish and are taken as usual; the ones still queued are dropped, and a
    /// later pass asks again for what the rollout then needs.
    pub(super) fn hold(&mut self, service: &str) {
        for launcher in &self.launchers {
            if launcher.service == service {
                launcher.queue.lock().to_start = 0;
            }
        }
    }

    /// Launches of `service` under way when this pass took the finished ones, by revision.
    pub(super) fn under_way(&self, service: &str) -> Vec<(String, usize)> {
        self.counted
            .iter()
            .filter(|(s, _, _)| s == service)
            .map(|(_, revision, n)| (revision.clone(), *n))
            .collect()
    }

    /// Launches of `service` under way, as instances of their revision that are starting: they
    /// count against the surge and the desired count, never as available.
    pub(super) fn pending_instances(&self, service: &str) -> Vec<ObservedInstance> {
        let mut out = Vec::new();
        for (revision, count) in self.under_way(service) {
            for n in 0..count {
                out.push(ObservedInstance {
                    id: format!("{PENDING_PREFIX}{revision} #{n})"),
                    revision: revision.clone(),
                    phase: Phase::Starting,
                    draining: false,
                    drifted: false,
                });
            }
        }
        out
    }

    /// Waits (up to `limit`) until no launch is under way: tests that step the controller pass
    /// by pass, and want each pass to see what the previous one launched.
    #[cfg(test)]
    pub(super) fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let idle = self.launchers.iter().all(|l| {
                let state = l.queue.lock();
                state.to_start + state.in_flight == 0
            });
            if idle {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
