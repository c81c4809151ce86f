//! Stops and removals in the background: a pass hands a drained (or destroyed) instance over
//! and moves on; a later pass takes the result and records the instance as removed.
//!
//! At 1,000 instances, removing what a wave had stopped (cgroups, network namespace, lease,
//! directory: mostly waiting on the kernel) took about 4 s of every pass of a rollover, 8 at a
//! time inside the pass. While an instance is handed over it is listed by the provider (running
//! while it stops, exited while it is removed), so the rollout counts it as it counts any
//! listed instance: a stopping one against `max_surge`. Nothing here is needed by a restarted
//! controller: a retired instance stays `draining` in the database until its removal is taken,
//! so the next controller stops (if it still runs) and removes it again from what it lists.
//!
//! A removal that fails is retried with a doubling delay ([`Failures`]), and its error is said
//! (an event) once, and again only when it changes: an instance that can never be removed made
//! one event per pass, four a second, for as long as the controller ran.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use imago_runtime::{Provider, RuntimeError};

use super::Wake;
use super::launches::{PARALLEL_LAUNCHES, spaced_hint};

/// At most this many removals run at once (as many stops as there are instances to stop: a
/// stop waits out the program's grace period, a removal works the kernel).
const PARALLEL_REMOVALS: usize = PARALLEL_LAUNCHES;

/// The first retry of a failed removal waits this long; each further one twice as long as the
/// one before, up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// How long a removal that keeps failing holds its rollout back (not complete, and progress
/// for the deadline) from its first failure. A short failure (a cgroup still busy while its
/// last processes exit) is waited out, so a completed release has removed what it retired;
/// one that lasts is not: the release completes, the `remove-failed` event stands and the
/// retries go on. Without the bound a removal that never works kept the rollout running (and
/// its progress fresh) for as long as the controller ran.
pub(super) const FAILED_REMOVAL_HOLD: Duration = Duration::from_secs(10);

/// The removals that failed, by instance: when to try again and what was said. Only this
/// controller's memory of its own retries: a restarted controller tries at once, and says the
/// error once more.
pub(super) struct Failures {
    by_id: HashMap<String, Failure>,
    /// [`FAILED_REMOVAL_HOLD`]; shorter in tests.
    pub(super) hold: Duration,
}

impl Default for Failures {
    fn default() -> Failures {
        Failures {
            by_id: HashMap::new(),
            hold: FAILED_REMOVAL_HOLD,
        }
    }
}

struct Failure {
    /// The service of an instance handed over to [`Stops`]: its retries count as a stop under
    /// way (progress, and a rollout not complete yet). `None` for the pass's own removals.
    service: Option<String>,
    error: String,
    attempts: u32,
    retry_at: Instant,
    /// When its first failure was taken (see [`FAILED_REMOVAL_HOLD`]).
    first_failed: Instant,
}

impl Failures {
    /// Whether a removal of `id` failed and its next try is not due yet.
    pub(super) fn waiting(&self, id: &str) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|f| Instant::now() < f.retry_at)
    }

    /// Whether a removal of `id` failed before (its error already said).
    pub(super) fn known(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// Records that removing `id` (of `service`, when handed over) failed with `error`, and
    /// when to try again; whether the error is to be said (the first failure, or another error
    /// than the last one).
    pub(super) fn failed(&mut self, id: &str, service: Option<&str>, error: &str) -> bool {
        let failure = self.by_id.entry(id.to_owned()).or_insert_with(|| Failure {
            service: service.map(str::to_owned),
            error: String::new(),
            attempts: 0,
            retry_at: Instant::now(),
            first_failed: Instant::now(),
        });
        // The pass's own removal of a dead instance may have failed first: once the instance
        // is handed over as retired by its service, its failures hold that rollout back.
        if let Some(service) = service
            && failure.service.as_deref() != Some(service)
        {
            failure.service = Some(service.to_owned());
        }
        let new = failure.attempts == 0 || failure.error != error;
        failure.attempts = failure.attempts.saturating_add(1);
        failure.error = error.to_owned();
        let doublings = failure.attempts.saturating_sub(1).min(16);
        let delay = FIRST_RETRY_DELAY
            .saturating_mul(1 << doublings)
            .min(MAX_RETRY_DELAY);
        failure.retry_at = Instant::now() + delay;
        new
    }

    /// Whether a failed removal of an instance handed over by `service` still holds its rollout
    /// back (failed for less than [`FAILED_REMOVAL_HOLD`]).
    fn holding(&self, service: &str) -> bool {
        self.by_id
            .values()
            .any(|f| f.service.as_deref() == Some(service) && f.first_failed.elapsed() < self.hold)
    }

    /// Whether removing `id` has failed for [`FAILED_REMOVAL_HOLD`] or longer: it holds its
    /// rollout back no more.
    pub(super) fn given_up_holding(&self, id: &str) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|f| f.first_failed.elapsed() >= self.hold)
    }

    /// `id` is gone: nothing more to retry or say.
    pub(super) fn succeeded(&mut self, id: &str) {
        self.by_id.remove(id);
    }

    /// Whether no failed removal is remembered.
    pub(super) fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Forgets the failures of the instances for which `listed` is false.
    pub(super) fn retain(&mut self, listed: impl Fn(&str) -> bool) {
        if !self.by_id.is_empty() {
            self.by_id.retain(|id, _| listed(id));
        }
    }
}

/// Why an instance is stopped: what its end is recorded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    /// Retired by a rollout, drained.
    Drained,
    /// Its service was destroyed.
    Destroyed,
}

/// A stop (and removal) that returned.
pub(super) struct Stopped {
    pub id: String,
    pub service: String,
    pub reason: Reason,
    /// `Ok` once the instance is gone (removed now, or by someone else before); else why not.
    pub result: Result<(), String>,
    /// A failure whose error was said already (see [`Failures`]): not to be said again.
    pub repeated: bool,
}

struct Shared {
    state: Mutex<SharedState>,
    /// Signalled when a removal slot frees up.
    slot_freed: Condvar,
    provider: Arc<dyn Provider>,
    wake: Arc<Wake>,
}

#[derive(Default)]
struct SharedState {
    removing: usize,
    done: Vec<Stopped>,
    last_nudge: Option<Instant>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops `id` (when `grace` is given: it may still run) and removes it.
    fn stop_and_remove(&self, id: &str, grace: Option<Duration>) -> Result<(), RuntimeError> {
        if let Some(grace) = grace {
            match self.provider.stop(id, grace) {
                Ok(_) => {}
                Err(RuntimeError::NoSuchInstance(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let _slot = self.removal_slot();
        match self.provider.remove(id) {
            Ok(()) | Err(RuntimeError::NoSuchInstance(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits for one of the [`PARALLEL_REMOVALS`] slots; it is free again when the guard is
    /// dropped (also by a panicking provider).
    fn removal_slot(&self) -> RemovalSlot<'_> {
        let mut state = self.lock();
        while state.removing >= PARALLEL_REMOVALS {
            state = self
                .slot_freed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        state.removing += 1;
        RemovalSlot(self)
    }

    fn finish(&self, stopped: Stopped) {
        let well = stopped.result.is_ok();
        let mut state = self.lock();
        state.done.push(stopped);
        // The last of what was under way beside the loop: the rollout waits for a pass now.
        if !self.wake.end(well) {
            spaced_hint(&self.wake, &mut state.last_nudge);
        }
    }
}

struct RemovalSlot<'a>(&'a Shared);

impl Drop for RemovalSlot<'_> {
    fn drop(&mut self) {
        self.0.lock().removing -= 1;
        self.0.slot_freed.notify_one();
    }
}

/// Every stop this controller has under way.
pub(super) struct Stops {
    shared: Arc<Shared>,
    /// Instances handed over whose result no pass has taken yet, with their service: nothing
    /// else is done to them meanwhile (a second stop, a removal in the pass).
    pending: HashMap<String, String>,
    /// Removals that failed (these and the pass's own of dead instances): retried later.
    pub(super) failures: Failures,
}

impl Stops {
    pub(super) fn new(provider: Arc<dyn Provider>, wake: Arc<Wake>) -> Stops {
        Stops {
            shared: Arc::new(Shared {
                state: Mutex::new(SharedState::default()),
                slot_freed: Condvar::new(),
                provider,
                wake,
            }),
            pending: HashMap::new(),
            failures: Failures::default(),
        }
    }

    /// Whether `id` is handed over and its result not taken yet.
    pub(super) fn is_pending(&self, id: &str) -> bool {
        self.pending.contains_key(id)
    }

    /// Whether any instance of `service` is still being stopped or removed (a failed removal
    /// waiting for its retry included, for at most [`FAILED_REMOVAL_HOLD`]).
    pub(super) fn any_pending(&self, service: &str) -> bool {
        self.pending.values().any(|s| s == service) || self.failures.holding(service)
    }

    /// Stops `id` of `service` beside the loop (`grace`: between SIGTERM and SIGKILL; `None`
    /// for one that no longer runs), then removes it. Does nothing while it is handed over
    /// already, so no instance is stopped twice by this controller, nor while a failed removal
    /// of it waits for its retry.
    pub(super) fn start(
        &mut self,
        service: &str,
        id: &str,
        grace: Option<Duration>,
        reason: Reason,
    ) {
        if self.is_pending(id) || self.failures.waiting(id) {
            return;
        }
        let shared = self.shared.clone();
        shared.wake.begin();
        let stop_id = id.to_owned();
        let stop_service = service.to_owned();
        let spawned = std::thread::Builder::new()
            .name("imago-stop".into())
            .spawn(move || {
                // A provider that panics ends this stop like one that failed: the instance is
                // handed over again by a later pass, never left pending for good.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    shared.stop_and_remove(&stop_id, grace)
                }));
                let result = match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("the provider panicked".to_owned()),
                };
                shared.finish(Stopped {
                    id: stop_id,
                    service: stop_service,
                    reason,
                    result,
                    repeated: false,
                });
            });
        // No thread to be had (a tasks limit): a later pass hands it over again.
        if spawned.is_ok() {
            self.pending.insert(id.to_owned(), service.to_owned());
        } else {
            self.shared.wake.end(false);
        }
    }

    /// Takes the stops that returned. Called before the instances are listed, so an instance
    /// is either still handed over or (its result taken) listed as it really is.
    pub(super) fn take_finished(&mut self) -> Vec<Stopped> {
        let mut done = std::mem::take(&mut self.shared.lock().done);
        for stopped in &mut done {
            self.pending.remove(&stopped.id);
            match &stopped.result {
                Ok(()) => self.failures.succeeded(&stopped.id),
                Err(e) => {
                    stopped.repeated =
                        !self.failures.failed(&stopped.id, Some(&stopped.service), e);
                }
            }
        }
        done
    }
}
