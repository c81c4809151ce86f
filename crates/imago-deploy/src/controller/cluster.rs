//! Services whose target is a cluster engine (Docker Swarm; Kubernetes later): the engine runs
//! the tasks and performs the rolling update, imago records, gates and rolls back.
//!
//! Each pass reads the live service through the [`ClusterEngine`]: a service that is missing,
//! labelled with another release, or whose managed fields were changed by hand is (re)applied
//! from the desired release; then imago's own gate judges the rollout: complete when every task
//! of the release's revision runs (healthy, when it has a health check) and no task of another
//! revision is left; failed when a task of the new revision fails, when the engine pauses or
//! rolls back the update, or at `progress_deadline`. A failure rolls back image and
//! configuration together, as a new release, exactly as for local services. Nothing is kept in
//! memory that a restarted controller could not rebuild: the release and revision are labels
//! of the live service and its tasks, the rollout's start and progress are in the database.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use imago_spec::cluster::{
    ClusterEngine, ClusterObservation, ClusterService, EngineError, TaskPhase, UpdateState,
};

use super::shared_plane::SharedPlane;
use super::{Controller, ServicePass, Wake};
use crate::error::DeployError;
use crate::spec::ResolvedTarget;
use crate::state::{Release, ReleaseOutcome, RolloutRow, now_ms};

/// How soon the gate looks again when every new task runs and only the engine's own update
/// (its monitor period) is left to finish.
const ENGINE_DONE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Makes the engine of a target (the binary links the engines; imago-deploy knows only the
/// trait). Shared by the controller and its API (`/v1/status` lists cluster tasks).
pub type EngineFactory = std::sync::Arc<
    dyn Fn(&ResolvedTarget) -> Result<Box<dyn ClusterEngine>, EngineError> + Send + Sync,
>;

/// The engine input of `release`: its image pinned by digest in the target's registry.
pub fn cluster_service(release: &Release, target: &ResolvedTarget) -> ClusterService {
    ClusterService {
        service: release.service.clone(),
        release: release.number,
        revision: release.revision.clone(),
        config_hash: release.config_hash.to_string(),
        image: cluster_image(release, target),
        spec: release.spec.clone(),
        paused: false,
    }
}

/// `REGISTRY/REPOSITORY@DIGEST` of a release on a cluster target.
pub fn cluster_image(release: &Release, target: &ResolvedTarget) -> String {
    format!(
        "{}/{}@{}",
        target.spec.registry.as_deref().unwrap_or_default(),
        release.spec.cluster_repository(&release.service),
        release.image_digest
    )
}

/// The key engines are kept under: one client per engine and endpoint.
fn engine_key(target: &ResolvedTarget) -> String {
    format!(
        "{}:{}",
        target.spec.engine,
        target.spec.endpoint.as_deref().unwrap_or_default()
    )
}

impl Controller {
    /// Drives cluster services with engines made by `factory`.
    pub fn with_cluster_engines(mut self, factory: EngineFactory) -> Controller {
        self.cluster.factory = Some(factory);
        self
    }

    fn engine_for(
        &mut self,
        service: &str,
        target: &ResolvedTarget,
    ) -> Result<&mut Box<dyn ClusterEngine>, DeployError> {
        let key = engine_key(target);
        if !self.cluster.engines.contains_key(&key) {
            let factory = self
                .cluster
                .factory
                .as_ref()
                .ok_or_else(|| DeployError::NoEngine {
                    service: service.to_owned(),
                    target: target.name.clone(),
                    engine: target.spec.engine.as_str(),
                })?;
            let engine = factory(target)?;
            self.cluster.engines.insert(key.clone(), engine);
        }
        self.cluster
            .engines
            .get_mut(&key)
            .ok_or_else(|| DeployError::Runtime("engine vanished".into()))
    }

    /// One pass for a service on a cluster target.
    pub(super) fn reconcile_cluster(
        &mut self,
        release: &Release,
        target: &ResolvedTarget,
    ) -> Result<ServicePass, DeployError> {
        let service = release.service.as_str();
        let mut pass = ServicePass {
            service: service.to_owned(),
            release: Some(release.number),
            ..ServicePass::default()
        };
        let mut desired = cluster_service(release, target);
        // A pause is the database's (`imago pause`), applied to the engine on every apply; an
        // engine that cannot hold a rollout never gets one recorded (`actions::set_paused`).
        desired.paused = target.spec.engine.holds_rollouts() && self.db.paused(service)?.is_some();
        let has_outcome = self.db.outcome_of(service, release.number)?.is_some();
        // When this pass began to look: a task its watch finds retired after that stays out of
        // the routes however long the pass takes to route.
        let seen = Instant::now();
        let observed = self.engine_for(service, target)?.observe(&desired)?;
        if let Some(delay) = test_pass_delay() {
            std::thread::sleep(delay);
        }
        let reapply = match &observed {
            None => {
                if has_outcome || self.cluster.applied.contains(service) {
                    Some(format!(
                        "{} service {service} is missing: re-creating it from release {}",
                        target.spec.engine, release.number
                    ))
                } else {
                    let what = format!(
                        "creating {} service {service} on target {} ({})",
                        target.spec.engine, target.name, desired.image
                    );
                    self.start_engine_change(release, target, &desired, &what)?;
                    // What was observed is from before the change: the gate judges next pass.
                    return Ok(pass);
                }
            }
            Some(o) if o.revision.as_deref() != Some(release.revision.as_str()) => {
                if has_outcome {
                    Some(format!(
                        "{} service {service} runs release {} (revision {}), not release {}: re-applying release {}",
                        target.spec.engine,
                        o.release.map_or("?".into(), |r| r.to_string()),
                        o.revision.as_deref().unwrap_or("none"),
                        release.number,
                        release.number
                    ))
                } else {
                    let what = format!(
                        "updating {} service {service} to release {} ({})",
                        target.spec.engine, release.number, desired.image
                    );
                    self.start_engine_change(release, target, &desired, &what)?;
                    return Ok(pass);
                }
            }
            // Paused or resumed since the engine was last told: not drift, the operator's
            // request. Before the differences: the held field is one of them until applied.
            // The live flag, not the update state: a held Deployment whose rollout is done
            // reads `Completed`, and comparing with that re-applied it on every pass and never
            // resumed it.
            Some(o) if desired.paused != o.held => {
                let what = if desired.paused {
                    format!(
                        "holding the {} update of service {service} at release {} (paused)",
                        target.spec.engine, release.number
                    )
                } else {
                    format!(
                        "letting the {} update of service {service} go on (resumed)",
                        target.spec.engine
                    )
                };
                self.db
                    .event(Some(service), "rollout", &what, &self.actor)?;
                self.apply_cluster(target, &desired)?;
                return Ok(pass);
            }
            Some(o) if !o.differences.is_empty() => Some(format!(
                "{} service {service} was changed out of band ({}): re-applying release {}",
                target.spec.engine,
                o.differences.join("; "),
                release.number
            )),
            Some(_) => None,
        };
        let Some(message) = reapply else {
            self.cluster.reapplied.remove(service);
            return self.judge_cluster(release, target, &desired, (observed, seen), pass);
        };
        // The same drift right after re-applying: the engine does not keep what imago renders
        // (or reads it back differently). Said once as the service's fault, never a loop of
        // updates.
        if self.cluster.reapplied.get(service) == Some(&message) {
            return Err(DeployError::Runtime(format!(
                "{message}, but re-applying did not change it"
            )));
        }
        self.cluster
            .reapplied
            .insert(service.to_owned(), message.clone());
        self.db
            .event(Some(service), "drift", &message, &self.actor)?;
        pass.drift.push(message);
        self.apply_cluster(target, &desired)?;
        Ok(pass)
    }

    /// Routing and the gate, for a service whose live spec is the release's.
    fn judge_cluster(
        &mut self,
        release: &Release,
        target: &ResolvedTarget,
        desired: &ClusterService,
        (observed, seen): (Option<ClusterObservation>, Instant),
        mut pass: ServicePass,
    ) -> Result<ServicePass, DeployError> {
        let service = release.service.as_str();
        let has_outcome = self.db.outcome_of(service, release.number)?.is_some();
        let Some(observed) = observed else {
            return Ok(pass);
        };
        self.report_task_drift(service, release, desired, &observed, has_outcome)?;
        self.route_tasks(service, release, target, desired, (&observed, seen))?;
        if has_outcome {
            return Ok(pass);
        }
        self.gate_cluster(service, release, &observed, &mut pass)?;
        Ok(pass)
    }

    /// Starts the rollout of `release` on the engine: its rollout record first, the event, then
    /// the engine's change.
    fn start_engine_change(
        &mut self,
        release: &Release,
        target: &ResolvedTarget,
        desired: &ClusterService,
        what: &str,
    ) -> Result<(), DeployError> {
        self.begin_rollout(release, String::new())?;
        self.db
            .event(Some(release.service.as_str()), "rollout", what, &self.actor)?;
        self.apply_cluster(target, desired)
    }

    fn apply_cluster(
        &mut self,
        target: &ResolvedTarget,
        desired: &ClusterService,
    ) -> Result<(), DeployError> {
        self.engine_for(&desired.service, target)?.apply(desired)?;
        self.cluster.applied.insert(desired.service.clone());
        Ok(())
    }

    /// Tasks the engine keeps running on an image that is not the release's, once its own
    /// update is over: reported once each (the engine replaces them as its spec says).
    fn report_task_drift(
        &mut self,
        service: &str,
        release: &Release,
        desired: &ClusterService,
        observed: &ClusterObservation,
        settled: bool,
    ) -> Result<(), DeployError> {
        if !settled {
            return Ok(());
        }
        for task in observed.tasks.iter().filter(|t| {
            t.desired_running && t.phase == TaskPhase::Running && t.image != desired.image
        }) {
            if self.announced_drift.insert(task.id.clone()) {
                self.db.event(
                    Some(service),
                    "drift",
                    &format!(
                        "task {} runs {}, not release {}'s {}",
                        task.id, task.image, release.number, desired.image
                    ),
                    &self.actor,
                )?;
            }
        }
        Ok(())
    }

    /// Points the service's endpoint (if it publishes one) at the running tasks' addresses, as
    /// seen in a look that began at `seen` (less those its watch found retired since).
    fn route_tasks(
        &mut self,
        service: &str,
        release: &Release,
        target: &ResolvedTarget,
        desired: &ClusterService,
        (observed, seen): (&ClusterObservation, Instant),
    ) -> Result<(), DeployError> {
        if release
            .spec
            .endpoint_addresses()
            .unwrap_or_default()
            .is_empty()
        {
            self.cluster.watches.remove(service);
            return self.close_endpoint(service);
        }
        self.ensure_endpoint(service, release)?;
        let targets = routable(observed);
        let eligible: BTreeSet<String> = targets.iter().map(|(id, _)| id.clone()).collect();
        let routed = self.route(service, targets, &eligible, Some(seen))?;
        let routed = routed.into_iter().map(|(id, _)| id).collect();
        self.watch_tasks(service, release, target, desired, &routed)?;
        Ok(())
    }

    /// Keeps a [`TaskWatch`] on `service` beside the loop, told what the endpoint now routes.
    fn watch_tasks(
        &mut self,
        service: &str,
        release: &Release,
        target: &ResolvedTarget,
        desired: &ClusterService,
        routed: &BTreeSet<String>,
    ) -> Result<(), DeployError> {
        let desired = desired.clone();
        let rolling = self.db.outcome_of(service, release.number)?.is_none();
        let key = engine_key(target);
        if let Some(watch) = self.cluster.watches.get(service) {
            if watch.engine_key == key {
                watch.tell(desired, routed.clone(), rolling);
                return Ok(());
            }
            // The service moved to another endpoint: a watch of the old one would see none
            // of the new one's retirements. Dropping it ends its thread.
            self.cluster.watches.remove(service);
        }
        let Some(factory) = self.cluster.factory.clone() else {
            return Ok(());
        };
        let watch = TaskWatch::start(
            factory,
            target.clone(),
            desired,
            routed.clone(),
            rolling,
            (self.health.wake.clone(), self.plane.clone()),
        );
        self.cluster.watches.insert(service.to_owned(), watch);
        Ok(())
    }

    /// imago's gate over the engine's rolling update.
    fn gate_cluster(
        &mut self,
        service: &str,
        release: &Release,
        observed: &ClusterObservation,
        pass: &mut ServicePass,
    ) -> Result<(), DeployError> {
        let now = now_ms();
        let row = self.begin_rollout(release, String::new())?;
        let ours = |t: &&imago_spec::cluster::ClusterTask| {
            t.revision.as_deref() == Some(release.revision.as_str())
        };
        let running_new = observed
            .tasks
            .iter()
            .filter(ours)
            .filter(|t| t.desired_running && t.phase == TaskPhase::Running)
            .count();
        let old_left = observed
            .tasks
            .iter()
            .filter(|t| !ours(t))
            .filter(|t| matches!(t.phase, TaskPhase::Running | TaskPhase::Starting))
            .count();
        // Old tasks the engine still wants: while one is left, the update is not over. One it
        // retires is routed no more (`route_tasks`) and only waits out its stop grace period.
        let old_wanted = observed
            .tasks
            .iter()
            .filter(|t| !ours(t) && t.desired_running)
            .filter(|t| matches!(t.phase, TaskPhase::Running | TaskPhase::Starting))
            .count();
        // The engine says its update is over once the last new task has passed its monitor
        // period (`min_ready`), without waiting for retired tasks to exit. Without an update
        // of its own to say so (a service just created), every old task must have exited.
        let engine_done = observed.update == UpdateState::Completed && old_wanted == 0;
        let replicas = release.spec.replicas as usize;
        let live = |t: &&imago_spec::cluster::ClusterTask| {
            matches!(t.phase, TaskPhase::Running | TaskPhase::Starting)
        };
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        pass.counts.updated = count(observed.tasks.iter().filter(ours).filter(live).count());
        pass.counts.old = count(old_left);
        pass.counts.available = count(
            observed
                .tasks
                .iter()
                .filter(|t| t.phase == TaskPhase::Running)
                .count(),
        );
        pass.counts.total = count(observed.tasks.iter().filter(live).count());
        if running_new >= replicas && (old_left == 0 || engine_done) && !observed.update.failed() {
            pass.complete = true;
            let took = now.saturating_sub(row.started_ms);
            self.db.record_outcome(
                service,
                release.number,
                ReleaseOutcome::Complete,
                &format!("deployment complete in {took} ms ({running_new} tasks running)"),
                &self.actor,
            )?;
            self.db.clear_rollout(service)?;
            return Ok(());
        }
        // Held at the operator's request: the engine makes no progress, so neither a stalled
        // count nor `progress_deadline` means failure (resuming restarts the deadline), and a
        // task that fails meanwhile is judged once the rollout goes on again.
        if observed.update == UpdateState::Held {
            return Ok(());
        }
        // A task of this release that failed since the rollout began (the engine restarts it,
        // but the release did not pass its gate), the engine giving up on the update, or no
        // progress within the deadline: the rollout failed.
        let failed_task = observed.tasks.iter().filter(ours).find(|t| {
            t.phase == TaskPhase::Failed && t.created_ms.is_none_or(|c| c >= row.started_ms)
        });
        let mut failure = failed_task.map(|t| {
            format!(
                "task {} of release {} failed its health gate: {}",
                t.id,
                release.number,
                t.error.as_deref().unwrap_or("failed")
            )
        });
        if failure.is_none() && observed.update.failed() {
            failure = Some(format!(
                "the engine stopped the update of release {} ({:?}): {}",
                release.number, observed.update, observed.update_message
            ));
        }
        if failure.is_none() {
            let counts = format!("{running_new}/{replicas}/{old_left}");
            if counts != row.counts_json {
                self.db.put_rollout(
                    service,
                    &RolloutRow {
                        last_progress_ms: now,
                        counts_json: counts,
                        ..row
                    },
                )?;
            } else if now.saturating_sub(row.last_progress_ms)
                > release.spec.rollout.progress_deadline.as_millis() as u64
            {
                failure = Some(format!(
                    "release {} made no progress for {} (progress_deadline): {running_new} of {replicas} tasks running",
                    release.number,
                    humantime::format_duration(release.spec.rollout.progress_deadline),
                ));
            }
        }
        let Some(reason) = failure else {
            if running_new >= replicas && old_wanted == 0 {
                // Only the engine's monitor period is left: look again soon, not at the next
                // interval, so that its end is seen within tens of milliseconds.
                self.health
                    .wake
                    .at(now + ENGINE_DONE_POLL.as_millis() as u64);
            }
            return Ok(());
        };
        self.fail_rollout(service, release, reason, pass)
    }

    /// Removes the cluster service of a destroyed service once per controller (again after a
    /// restart: only the database says it is destroyed).
    pub(super) fn tear_down_cluster(
        &mut self,
        service: &str,
        target: &ResolvedTarget,
    ) -> Result<ServicePass, DeployError> {
        let pass = ServicePass {
            service: service.to_owned(),
            ..ServicePass::default()
        };
        self.close_endpoint(service)?;
        self.cluster.watches.remove(service);
        if self.cluster.torn_down.contains(service) {
            return Ok(pass);
        }
        if self.engine_for(service, target)?.destroy(service)? {
            self.db.event(
                Some(service),
                "destroy",
                &format!("{} service {service} removed", target.spec.engine),
                &self.actor,
            )?;
        }
        self.cluster.torn_down.insert(service.to_owned());
        self.cluster.applied.remove(service);
        Ok(pass)
    }
}

/// The controller's cluster side: how to make engines, the engines made, and what this
/// controller did (only to word its events; the database and the engine say the rest).
#[derive(Default)]
pub(super) struct ClusterState {
    factory: Option<EngineFactory>,
    engines: BTreeMap<String, Box<dyn ClusterEngine>>,
    /// Services this controller applied: a missing one is then drift, not a first create.
    applied: BTreeSet<String>,
    torn_down: BTreeSet<String>,
    /// The drift each service was last re-applied for.
    reapplied: BTreeMap<String, String>,
    /// Per routed service, the watch that ends the wait between passes when its tasks change.
    watches: BTreeMap<String, TaskWatch>,
}

/// The tasks of an observation that the endpoint routes: running ones the engine still wants,
/// at their published address.
fn routable(observed: &ClusterObservation) -> Vec<(String, SocketAddr)> {
    observed
        .tasks
        .iter()
        .filter(|t| t.desired_running && t.phase == TaskPhase::Running)
        .filter_map(|t| Some((t.id.clone(), t.address?)))
        .collect()
}

/// `IMAGO_TEST_CLUSTER_PASS_DELAY_MS`, for tests only: how long each pass of a cluster service
/// waits between its look at the engine and its routing, to stand for a pass made slow by
/// load (many local instances, a loaded host, a slow engine). Read once per process: the
/// controller's environment does not change, and a pass need not scan it.
fn test_pass_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("IMAGO_TEST_CLUSTER_PASS_DELAY_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
    })
}

/// How often a [`TaskWatch`] lists the tasks while a rollout of its service is under way, and
/// otherwise (the engine also retires tasks on its own: a node drained, a task that failed).
const WATCH_ROLLING: Duration = Duration::from_millis(100);
const WATCH_SETTLED: Duration = Duration::from_secs(1);

/// Lists one routed cluster service's tasks beside the loop, through an engine of its own,
/// routes the endpoint to the routable ones the moment they differ from the routed ones (a task
/// not wanted running by the engine, or not running, out; a new running one in), and nudges
/// the controller.
///
/// A swarm stops a retired task 2 s after it retires it (`defaultGossipConvergeDelay`). When
/// the endpoint learned of the retirement from a pass only, passes came `interval` apart, and
/// a loaded controller's are paced to twice their own length (up to 5 s): with a pass of 0.8 s
/// the retired task was routed 2.4 s after its retirement and the requests sent to it in the
/// last 0.4 s failed. A nudge made the next pass come at once, but a pass that itself took
/// longer than 2 s (a loaded host, many local instances, a slow engine) still routed what it
/// had seen before the retirement. The watch's routing does not wait for any pass, and a pass
/// that looked before it cannot undo it ([`SharedPlane::route_seen`]). It adds new tasks too:
/// a watch that only removed left the endpoint with nothing to route when the engine replaced
/// every routed task within one slow pass. It keeps nothing a restart needs.
struct TaskWatch {
    shared: Arc<WatchShared>,
    /// The data plane it routes, and the service.
    plane: SharedPlane,
    service: String,
    /// The endpoint it watches ([`engine_key`]).
    engine_key: String,
    /// Disconnected once the thread has ended and dropped its engine (`None`: no thread).
    ended: Option<mpsc::Receiver<()>>,
}

/// How long dropping a [`TaskWatch`] waits for its thread to drop its engine: an ssh engine's
/// tunnel directory goes with it, and a controller stopped by SIGTERM right after a destroy
/// must not leave it behind. Bounded, as a pass waits: a look stuck on its engine's timeout is
/// left to end on its own.
const WATCH_END_WAIT: Duration = Duration::from_secs(5);

struct WatchShared {
    stop: AtomicBool,
    /// The service as rendered, what the endpoint routes, whether a rollout is under way.
    told: Mutex<(ClusterService, BTreeSet<String>, bool)>,
    /// Wakes the thread between looks when it is told to stop.
    stopping: Condvar,
}

impl TaskWatch {
    fn start(
        factory: EngineFactory,
        target: ResolvedTarget,
        desired: ClusterService,
        routed: BTreeSet<String>,
        rolling: bool,
        (wake, plane): (Arc<Wake>, SharedPlane),
    ) -> TaskWatch {
        let service = desired.service.clone();
        let shared = Arc::new(WatchShared {
            stop: AtomicBool::new(false),
            told: Mutex::new((desired, routed, rolling)),
            stopping: Condvar::new(),
        });
        let watched = shared.clone();
        let engine_key = engine_key(&target);
        let name = format!("task-watch-{}", target.name);
        let (end, ended) = mpsc::channel::<()>();
        let watched_plane = plane.clone();
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            // Dropped after `watch` returned, so after its engine.
            let _end = end;
            watch(&factory, &target, &watched, (&wake, &watched_plane));
        });
        let ended = match spawned {
            Ok(_) => Some(ended),
            Err(_) => {
                // No thread: the passes alone route, as they did before the watch.
                shared.stop.store(true, Ordering::Relaxed);
                None
            }
        };
        TaskWatch {
            shared,
            plane,
            service,
            engine_key,
            ended,
        }
    }

    fn tell(&self, desired: ClusterService, routed: BTreeSet<String>, rolling: bool) {
        *self.shared.lock() = (desired, routed, rolling);
    }
}

impl Drop for TaskWatch {
    fn drop(&mut self) {
        {
            // Under the lock, so the thread is either before its wait (and sees the flag) or
            // in it (and is woken).
            let _told = self.shared.lock();
            self.shared.stop.store(true, Ordering::Relaxed);
            self.shared.stopping.notify_all();
        }
        if let Some(ended) = self.ended.take() {
            let _ = ended.recv_timeout(WATCH_END_WAIT);
        }
        self.plane.unwatch(&self.service);
    }
}

impl WatchShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, (ClusterService, BTreeSet<String>, bool)> {
        self.told.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The watch's thread: ends when its [`TaskWatch`] is dropped.
fn watch(
    factory: &EngineFactory,
    target: &ResolvedTarget,
    shared: &WatchShared,
    (wake, plane): (&Wake, &SharedPlane),
) {
    let mut engine = None;
    // What the last nudge was for: one nudge per change, not one per listing until the pass
    // has routed it.
    let mut nudged: Option<BTreeSet<String>> = None;
    loop {
        let (desired, routed) = {
            let told = shared.lock();
            let between = if told.2 { WATCH_ROLLING } else { WATCH_SETTLED };
            let (told, _) = shared
                .stopping
                .wait_timeout_while(told, between, |_| !shared.stop.load(Ordering::Relaxed))
                .unwrap_or_else(|p| p.into_inner());
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            (told.0.clone(), told.1.clone())
        };
        if engine.is_none() {
            engine = factory(target).ok();
        }
        let Some(e) = engine.as_mut() else {
            continue;
        };
        let looking = e.observe(&desired);
        let looked = Instant::now();
        let observed = match looking {
            Ok(Some(observed)) => observed,
            // The service is not there (removed by hand, until the pass applies it again):
            // the engine is fine, keep it (an ssh endpoint would open a tunnel per look).
            Ok(None) => continue,
            Err(_) => {
                // The pass reports the engine's errors; a new engine next time.
                engine = None;
                continue;
            }
        };
        let targets = routable(&observed);
        let now: BTreeSet<String> = targets.iter().map(|(id, _)| id.clone()).collect();
        // A failed route is the data plane's to report, on the pass's next call.
        let _ = plane.route_looked(&desired.service, looked, targets);
        if now != routed && nudged.as_ref() != Some(&now) {
            wake.nudge();
            nudged = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use imago_oci::Digest;
    use imago_runtime::{Engine, FakeProvider};
    use imago_spec::cluster::ClusterTask;

    use super::*;
    use crate::spec::ServiceSpec;
    use crate::state::StateDb;

    /// A swarm in memory: the applied spec, its tasks (the test moves them), what was applied.
    #[derive(Default)]
    struct FakeSwarm {
        live: Option<ClusterService>,
        /// Set to make the live spec differ from the rendering (a hand-made change).
        hand_made: Vec<String>,
        update: Option<UpdateState>,
        tasks: Vec<ClusterTask>,
        applied: Vec<u64>,
    }

    struct FakeEngine(Arc<Mutex<FakeSwarm>>);

    impl ClusterEngine for FakeEngine {
        fn apply(&mut self, desired: &ClusterService) -> Result<(), EngineError> {
            let mut swarm = self.0.lock().unwrap();
            swarm.live = Some(desired.clone());
            swarm.hand_made.clear();
            swarm.update = Some(if desired.paused {
                UpdateState::Held
            } else {
                UpdateState::Updating
            });
            swarm.applied.push(desired.release);
            Ok(())
        }
        fn observe(
            &mut self,
            desired: &ClusterService,
        ) -> Result<Option<ClusterObservation>, EngineError> {
            let swarm = self.0.lock().unwrap();
            Ok(swarm.live.as_ref().map(|live| ClusterObservation {
                release: Some(live.release),
                revision: Some(live.revision.clone()),
                differences: if live.revision == desired.revision {
                    swarm.hand_made.clone()
                } else {
                    Vec::new()
                },
                update: swarm.update.unwrap_or(UpdateState::None),
                update_message: String::new(),
                held: live.paused,
                tasks: swarm.tasks.clone(),
            }))
        }
        fn destroy(&mut self, _service: &str) -> Result<bool, EngineError> {
            Ok(self.0.lock().unwrap().live.take().is_some())
        }
    }

    fn task(id: &str, revision: &str, phase: TaskPhase) -> ClusterTask {
        ClusterTask {
            id: id.into(),
            revision: Some(revision.into()),
            image: String::new(),
            phase,
            desired_running: phase != TaskPhase::Done,
            error: (phase == TaskPhase::Failed).then(|| "unhealthy container".into()),
            created_ms: Some(now_ms() + 1),
            address: None,
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        _runtime: tokio::runtime::Runtime,
        swarm: Arc<Mutex<FakeSwarm>>,
        controller: Controller,
    }

    fn harness() -> Harness {
        let (dir, db, runtime) = super::super::test_support::db_and_runtime();
        let swarm = Arc::new(Mutex::new(FakeSwarm::default()));
        let shared = swarm.clone();
        let controller = Controller::new(
            db,
            Arc::new(FakeProvider::new()),
            runtime.handle().clone(),
            Engine::Embedded,
        )
        .with_cluster_engines(Arc::new(move |_| {
            Ok(Box::new(FakeEngine(shared.clone())) as Box<dyn ClusterEngine>)
        }));
        Harness {
            _dir: dir,
            _runtime: runtime,
            swarm,
            controller,
        }
    }

    fn swarm_spec(version: &str) -> ServiceSpec {
        serde_json::from_value(serde_json::json!({
            "image": "web", "replicas": 2, "env": {"V": version},
            "target": {"name": "prod", "engine": "swarm", "registry": "127.0.0.1:5000/t"}
        }))
        .unwrap()
    }

    impl Harness {
        fn release(&mut self, version: &str) -> Release {
            self.controller
                .db
                .record_release(
                    "web",
                    &swarm_spec(version),
                    &Digest::of(version.as_bytes()),
                    "apply",
                    None,
                    "test",
                )
                .unwrap()
                .0
        }

        fn pass(&mut self) -> ServicePass {
            self.controller.pass().unwrap().pop().unwrap()
        }

        /// What release `number` of "web" ended as; it must have ended.
        fn outcome(&self, number: u64) -> ReleaseOutcome {
            let recorded = self.controller.db.outcome_of("web", number).unwrap();
            recorded.unwrap().outcome
        }

        /// The swarm runs `replicas` healthy tasks of `revision` and nothing else.
        fn converged(&self, revision: &str) {
            let mut swarm = self.swarm.lock().unwrap();
            swarm.tasks = vec![
                task("a", revision, TaskPhase::Running),
                task("b", revision, TaskPhase::Running),
            ];
            swarm.update = Some(UpdateState::Completed);
        }
    }

    #[test]
    fn a_release_is_applied_once_and_completes_when_every_task_of_it_runs() {
        let mut h = harness();
        let r1 = h.release("1");
        assert!(!h.pass().complete, "just applied: nothing judged yet");
        assert_eq!(h.swarm.lock().unwrap().applied, vec![1]);
        assert_eq!(
            h.swarm.lock().unwrap().live.as_ref().unwrap().image,
            format!("127.0.0.1:5000/t/web@{}", r1.image_digest)
        );
        h.swarm.lock().unwrap().tasks = vec![task("a", &r1.revision, TaskPhase::Running)];
        assert!(!h.pass().complete, "one of two tasks runs");
        h.converged(&r1.revision);
        assert!(h.pass().complete);
        assert_eq!(h.outcome(1), ReleaseOutcome::Complete);
        h.pass();
        assert_eq!(h.swarm.lock().unwrap().applied, vec![1], "applied once");
    }

    /// The engine's update is over (its monitor period passed) while a retired old task still
    /// waits out its stop grace period: complete then, not after that task's exit. An old task
    /// the engine still wants, or an update still running, keeps the gate closed.
    #[test]
    fn a_release_completes_when_the_engine_is_done_without_waiting_for_retired_tasks_to_exit() {
        let mut h = harness();
        let r1 = h.release("1");
        h.pass();
        h.converged(&r1.revision);
        assert!(h.pass().complete);
        let r2 = h.release("2");
        h.pass();
        let retiring = || ClusterTask {
            desired_running: false,
            ..task("old", &r1.revision, TaskPhase::Running)
        };
        {
            let mut swarm = h.swarm.lock().unwrap();
            swarm.tasks = vec![
                task("a2", &r2.revision, TaskPhase::Running),
                task("b2", &r2.revision, TaskPhase::Running),
                retiring(),
            ];
            swarm.update = Some(UpdateState::Updating);
        }
        assert!(
            !h.pass().complete,
            "the engine's monitor period is not over"
        );
        {
            let mut swarm = h.swarm.lock().unwrap();
            swarm.update = Some(UpdateState::Completed);
            swarm.tasks[2] = task("old", &r1.revision, TaskPhase::Running);
        }
        assert!(!h.pass().complete, "an old task the engine still wants");
        h.swarm.lock().unwrap().tasks[2] = retiring();
        let pass = h.pass();
        assert!(pass.complete);
        assert_eq!(pass.counts.old, 1, "the retired task is still there");
        assert_eq!(h.outcome(2), ReleaseOutcome::Complete);
    }

    #[test]
    fn a_failing_task_fails_the_release_and_the_last_complete_one_is_applied_again() {
        let mut h = harness();
        let r1 = h.release("1");
        h.pass();
        h.converged(&r1.revision);
        h.pass();
        let r2 = h.release("2");
        h.pass();
        {
            let mut swarm = h.swarm.lock().unwrap();
            swarm.tasks.push(task("c", &r2.revision, TaskPhase::Failed));
        }
        let failed = h.pass();
        assert!(
            failed
                .failed
                .as_deref()
                .unwrap()
                .contains("unhealthy container"),
            "{failed:?}"
        );
        assert_eq!(failed.rolled_back_to, Some(1));
        h.pass();
        let swarm = h.swarm.lock().unwrap();
        assert_eq!(swarm.applied, vec![1, 2, 3]);
        let live = swarm.live.as_ref().unwrap();
        assert_eq!(
            (live.revision.as_str(), live.spec.env["V"].as_str()),
            (r1.revision.as_str(), "1"),
            "image and configuration roll back together"
        );
    }

    #[test]
    fn the_engine_pausing_the_update_fails_the_release() {
        let mut h = harness();
        let r1 = h.release("1");
        h.pass();
        h.converged(&r1.revision);
        h.pass();
        h.release("2");
        h.pass();
        h.swarm.lock().unwrap().update = Some(UpdateState::Paused);
        let failed = h.pass();
        assert!(failed.failed.unwrap().contains("Paused"));
    }

    #[test]
    fn hand_made_changes_and_a_missing_service_are_drift_and_the_release_is_applied_again() {
        let mut h = harness();
        let r1 = h.release("1");
        h.pass();
        h.converged(&r1.revision);
        h.pass();
        h.swarm.lock().unwrap().hand_made = vec!["image: x != y".into()];
        let drift = h.pass();
        assert!(drift.drift[0].contains("changed out of band (image: x != y)"));
        assert_eq!(h.swarm.lock().unwrap().applied, vec![1, 1]);
        h.swarm.lock().unwrap().live = None;
        let missing = h.pass();
        assert!(missing.drift[0].contains("is missing"), "{missing:?}");
        assert_eq!(h.swarm.lock().unwrap().applied, vec![1, 1, 1]);
        let events = h.controller.db.events(Some("web"), 0).unwrap();
        assert_eq!(events.iter().filter(|e| e.kind == "drift").count(), 2);
    }

    #[test]
    fn a_restarted_controller_applies_a_release_recorded_but_never_applied() {
        let mut h = harness();
        let r1 = h.release("1");
        h.pass();
        h.converged(&r1.revision);
        h.pass();
        // The release is recorded, and the controller dies before the engine hears of it: the
        // next one (no memory) finds the swarm on release 1 and applies release 2.
        h.release("2");
        let db = StateDb::open(&h._dir.path().join("state.db")).unwrap();
        let shared = h.swarm.clone();
        h.controller = Controller::new(
            db,
            Arc::new(FakeProvider::new()),
            h._runtime.handle().clone(),
            Engine::Embedded,
        )
        .with_cluster_engines(Arc::new(move |_| {
            Ok(Box::new(FakeEngine(shared.clone())) as Box<dyn ClusterEngine>)
        }));
        let pass = h.pass();
        assert!(pass.drift.is_empty(), "a pending release is no drift");
        assert_eq!(h.swarm.lock().unwrap().applied, vec![1, 2]);
    }

    /// `imago pause` of a service on a kubernetes target mid-rollout: the engine is told to
    /// hold (not drift), the gate neither completes nor fails it however long it stands (its
    /// `progress_deadline` is long past), a restarted controller keeps it held, and resuming
    /// lets the engine go on and the release complete.
    #[test]
    fn a_paused_kubernetes_rollout_is_held_through_a_restart_and_completes_once_resumed() {
        let mut h = harness();
        let kube = |version: &str| -> ServiceSpec {
            serde_json::from_value(serde_json::json!({
                "image": "web", "replicas": 2, "env": {"V": version},
                "rollout": {"min_ready": "0s", "progress_deadline": "50ms"},
                "target": {"name": "k8s", "engine": "kubernetes", "registry": "127.0.0.1:5000/t"}
            }))
            .unwrap()
        };
        let record = |h: &mut Harness, version: &str| {
            h.controller
                .db
                .record_release(
                    "web",
                    &kube(version),
                    &Digest::of(version.as_bytes()),
                    "apply",
                    None,
                    "test",
                )
                .unwrap()
                .0
        };
        let r1 = record(&mut h, "1");
        h.pass();
        h.converged(&r1.revision);
        assert!(h.pass().complete);
        let r2 = record(&mut h, "2");
        h.pass();
        h.swarm.lock().unwrap().tasks = vec![
            task("a2", &r2.revision, TaskPhase::Running),
            task("b", &r1.revision, TaskPhase::Running),
        ];
        h.pass();
        crate::actions::set_paused(&h.controller.db, "web", true, "test").unwrap();
        let held = h.pass();
        assert!(held.drift.is_empty(), "a pause is no drift: {held:?}");
        {
            let swarm = h.swarm.lock().unwrap();
            assert!(
                swarm.live.as_ref().unwrap().paused,
                "the engine is told to hold"
            );
            assert_eq!(swarm.applied, vec![1, 2, 2]);
        }
        let restart = |h: &mut Harness| {
            let db = StateDb::open(&h._dir.path().join("state.db")).unwrap();
            let shared = h.swarm.clone();
            h.controller = Controller::new(
                db,
                Arc::new(FakeProvider::new()),
                h._runtime.handle().clone(),
                Engine::Embedded,
            )
            .with_cluster_engines(Arc::new(move |_| {
                Ok(Box::new(FakeEngine(shared.clone())) as Box<dyn ClusterEngine>)
            }));
        };
        for round in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(80));
            if round == 1 {
                restart(&mut h);
            }
            let pass = h.pass();
            assert!(!pass.complete && pass.failed.is_none(), "{pass:?}");
        }
        assert_eq!(h.controller.db.outcome_of("web", 2).unwrap(), None);
        assert_eq!(
            h.swarm.lock().unwrap().applied,
            vec![1, 2, 2],
            "held, not re-applied"
        );
        crate::actions::set_paused(&h.controller.db, "web", false, "test").unwrap();
        h.pass();
        {
            let swarm = h.swarm.lock().unwrap();
            assert!(!swarm.live.as_ref().unwrap().paused, "the engine goes on");
            assert_eq!(swarm.applied, vec![1, 2, 2, 2]);
        }
        h.converged(&r2.revision);
        assert!(h.pass().complete);
        let events = h.controller.db.events(Some("web"), 0).unwrap();
        assert!(events.iter().any(|e| e.message.contains("(paused)")));
        assert!(events.iter().any(|e| e.message.contains("(resumed)")));
        assert!(!events.iter().any(|e| e.kind == "drift"));
    }

    #[test]
    fn a_pause_of_a_done_rollout_is_applied_once_and_a_resume_lifts_it() {
        // Kubernetes reports a held Deployment whose rollout is done as complete, not held:
        // the controller must go by the live pause flag, or it re-applies every pass (and
        // skips routing the pods) and never lifts the pause on resume.
        let mut h = harness();
        let kube: ServiceSpec = serde_json::from_value(serde_json::json!({
            "image": "web", "replicas": 2,
            "rollout": {"min_ready": "0s"},
            "target": {"name": "k8s", "engine": "kubernetes", "registry": "127.0.0.1:5000/t"}
        }))
        .unwrap();
        let (r1, _) = h
            .controller
            .db
            .record_release("web", &kube, &Digest::of(b"1"), "apply", None, "test")
            .unwrap();
        h.pass();
        h.converged(&r1.revision);
        assert!(h.pass().complete);
        crate::actions::set_paused(&h.controller.db, "web", true, "test").unwrap();
        h.pass();
        {
            let mut swarm = h.swarm.lock().unwrap();
            assert!(
                swarm.live.as_ref().unwrap().paused,
                "the engine is told to hold"
            );
            swarm.update = Some(UpdateState::Completed);
        }
        for _ in 0..3 {
            h.pass();
        }
        assert_eq!(
            h.swarm.lock().unwrap().applied,
            vec![1, 1],
            "held once, not every pass"
        );
        crate::actions::set_paused(&h.controller.db, "web", false, "test").unwrap();
        h.pass();
        h.pass();
        let swarm = h.swarm.lock().unwrap();
        assert!(
            !swarm.live.as_ref().unwrap().paused,
            "resumed: the hold is lifted"
        );
        assert_eq!(swarm.applied, vec![1, 1, 1]);
    }

    #[test]
    fn a_destroyed_service_is_removed_from_the_engine() {
        let mut h = harness();
        h.release("1");
        h.pass();
        h.controller.db.destroy("web", "test").unwrap();
        h.pass();
        assert!(h.swarm.lock().unwrap().live.is_none());
    }

    /// An engine that says when it is dropped (an ssh engine's tunnel directory goes then).
    struct DropFlagEngine(FakeEngine, Arc<std::sync::atomic::AtomicBool>);

    impl ClusterEngine for DropFlagEngine {
        fn apply(&mut self, desired: &ClusterService) -> Result<(), EngineError> {
            self.0.apply(desired)
        }
        fn observe(
            &mut self,
            desired: &ClusterService,
        ) -> Result<Option<ClusterObservation>, EngineError> {
            self.0.observe(desired)
        }
        fn destroy(&mut self, service: &str) -> Result<bool, EngineError> {
            self.0.destroy(service)
        }
    }

    impl Drop for DropFlagEngine {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_dropped_task_watch_has_dropped_its_engine_when_the_drop_returns() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let mut h = harness();
        let release = h.release("1");
        let target: ResolvedTarget = serde_json::from_value(serde_json::json!({
            "name": "prod", "engine": "swarm", "registry": "127.0.0.1:5000/t"
        }))
        .unwrap();
        let desired = cluster_service(&release, &target);
        for rolling in [false, true] {
            let dropped = Arc::new(AtomicBool::new(false));
            let made = Arc::new(AtomicUsize::new(0));
            let (flag, count, swarm) = (dropped.clone(), made.clone(), h.swarm.clone());
            let factory: EngineFactory = Arc::new(move |_| {
                count.fetch_add(1, Ordering::SeqCst);
                Ok(
                    Box::new(DropFlagEngine(FakeEngine(swarm.clone()), flag.clone()))
                        as Box<dyn ClusterEngine>,
                )
            });
            let watch = TaskWatch::start(
                factory,
                target.clone(),
                desired.clone(),
                BTreeSet::new(),
                rolling,
                (h.controller.health.wake.clone(), h.controller.plane.clone()),
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while made.load(Ordering::SeqCst) == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the watch made no engine"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            // Mid-wait between looks (1 s when settled): the drop wakes the thread and waits
            // for it, so nothing it holds outlives the watch.
            std::thread::sleep(Duration::from_millis(30));
            let started = std::time::Instant::now();
            drop(watch);
            assert!(
                dropped.load(Ordering::SeqCst),
                "rolling {rolling}: the engine outlived its watch"
            );
            assert!(
                started.elapsed() < WATCH_END_WAIT,
                "rolling {rolling}: the drop waited out its bound ({:?})",
                started.elapsed()
            );
            assert_eq!(made.load(Ordering::SeqCst), 1, "one engine per watch");
        }
    }
}
