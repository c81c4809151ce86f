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

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use imago_runtime::{Provider, RuntimeError};

use super::Wake;
use super::launches::{PARALLEL_LAUNCHES, spaced_nudge};

/// At most this many removals run at once (as many stops as there are instances to stop: a
/// stop waits out the program's grace period, a removal works the kernel).
const PARALLEL_REMOVALS: usize = PARALLEL_LAUNCHES;

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
        let mut state = self.lock();
        state.done.push(stopped);
        spaced_nudge(&self.wake, &mut state.last_nudge);
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
        }
    }

    /// Whether `id` is handed over and its result not taken yet.
    pub(super) fn is_pending(&self, id: &str) -> bool {
        self.pending.contains_key(id)
    }

    /// Whether any instance of `service` is still being stopped or removed.
    pub(super) fn any_pending(&self, service: &str) -> bool {
        self.pending.values().any(|s| s == service)
    }

    /// Stops `id` of `service` beside the loop (`grace`: between SIGTERM and SIGKILL; `None`
    /// for one that no longer runs), then removes it. Does nothing while it is handed over
    /// already, so no instance is stopped twice by this controller.
    pub(super) fn start(
        &mut self,
        service: &str,
        id: &str,
        grace: Option<Duration>,
        reason: Reason,
    ) {
        if self.is_pending(id) {
            return;
        }
        let shared = self.shared.clone();
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
                });
            });
        // No thread to be had (a tasks limit): a later pass hands it over again.
        if spawned.is_ok() {
            self.pending.insert(id.to_owned(), service.to_owned());
        }
    }

    /// Takes the stops that returned. Called before the instances are listed, so an instance
    /// is either still handed over or (its result taken) listed as it really is.
    pub(super) fn take_finished(&mut self) -> Vec<Stopped> {
        let done = std::mem::take(&mut self.shared.lock().done);
        for stopped in &done {
            self.pending.remove(&stopped.id);
        }
        done
    }
}
