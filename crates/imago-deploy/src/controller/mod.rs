//! The controller: the reconcile loop that makes what runs match what was released.
//!
//! Each pass, for each service, it reads the desired release from the state database, observes the
//! service's instances through the [`Provider`] and their health from the probe board, asks the
//! pure [`next_step`] what to do, and does it: clean up dead instances, launch new ones, take
//! retired ones out of the endpoint, stop them once drained, and route the endpoint to the ready
//! ones. Nothing is kept in memory that a restarted controller could not rebuild: instances carry
//! their service, release and revision as labels, draining is recorded in the database, and
//! health is simply probed again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use imago_runtime::balancer::ConnectBalancer;
use imago_runtime::{Engine, Instance, InstanceSpec, Provider};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::dataplane::{DataPlane, LocalPlane};
use crate::error::DeployError;
use crate::rollout::Counts;
use crate::state::{Release, StateDb, now_ms};

mod cluster;
mod launches;
mod probes;
mod progress;
mod reconcile;
mod set_aside;
mod shared_plane;
mod stops;
#[cfg(test)]
mod test_support;

pub use cluster::{EngineFactory, cluster_image, cluster_service};
pub use probes::HealthBoard;
pub use set_aside::set_aside_modified;

pub const LABEL_SERVICE: &str = "imago.service";
/// The revision (digest + configuration) an instance runs. Release numbers are deliberately not
/// part of an instance: a rollback release with the same revision adopts the running instances.
pub const LABEL_REVISION: &str = "imago.revision";

/// How long an instance of a destroyed service gets between SIGTERM and SIGKILL when the release
/// it runs is no longer known (otherwise: that release's `stop_grace_period`).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long `instance` of `service` gets between SIGTERM and SIGKILL: the `stop_grace_period`
/// of the release its revision belongs to, else [`STOP_GRACE`]. The controller's tear-down and
/// `imago destroy` both stop with it.
pub fn stop_grace(
    db: &StateDb,
    service: &str,
    instance: &Instance,
) -> Result<Duration, DeployError> {
    let Some(revision) = instance.labels.get(LABEL_REVISION) else {
        return Ok(STOP_GRACE);
    };
    Ok(db
        .release_with_revision(service, revision)?
        .map_or(STOP_GRACE, |r| r.spec.stop_grace_period))
}

/// The instance spec a release's instances run.
pub fn instance_spec(release: &Release, engine: Engine) -> Result<InstanceSpec, DeployError> {
    let spec = &release.spec;
    let bad = |field: &str, reason: String| DeployError::InvalidService {
        service: release.service.clone(),
        field: field.to_owned(),
        reason,
    };
    let mut instance = InstanceSpec::new(release.image_digest.clone());
    instance.name = Some(format!(
        "{}-{}",
        release.service,
        &release.revision[..8.min(release.revision.len())]
    ));
    if let Some(command) = &spec.command {
        instance.entrypoint = Some(command.clone());
        instance.args = Some(Vec::new());
    }
    instance.env = spec.env.clone();
    if let Some(memory) = &spec.resources.memory {
        instance.resources.memory_bytes = Some(
            imago_runtime::parse_memory(memory)
                .map_err(|e| bad("resources.memory", e.to_string()))?,
        );
    }
    if let Some(cpus) = spec.resources.cpus {
        instance.resources.cpu_millis = Some((cpus * 1000.0).round() as u64);
    }
    instance.resources.pids = spec.resources.pids.map(u64::from);
    instance.volumes = spec.volume_mounts().map_err(|r| bad("volumes", r))?;
    instance.network = crate::spec::runtime_network(spec.network);
    instance.seccomp =
        crate::spec::runtime_seccomp(spec.seccomp.as_ref()).map_err(|r| bad("seccomp", r))?;
    instance.engine = engine;
    instance.init = spec.init.unwrap_or(true);
    instance
        .labels
        .insert(LABEL_SERVICE.into(), release.service.clone());
    instance
        .labels
        .insert(LABEL_REVISION.into(), release.revision.clone());
    instance
        .validate()
        .map_err(|e| bad("resources", e.to_string()))?;
    Ok(instance)
}

/// After a pass, the next waits at least this many times as long as the pass took (see
/// [`Controller::wait_for_next_pass`]): while launches, stops or first checks are under way,
/// the controller's passes take at most a third of the time.
pub const PASS_GAP_FACTOR: u32 = 2;

/// An environment variable that replaces [`PASS_GAP_FACTOR`] for the controllers this process
/// makes (as [`Controller::with_pass_gap_factor`] does): for comparing pacings at real
/// instances (BENCHMARKS.md), where the daemon makes the controller.
pub const PASS_GAP_FACTOR_ENV: &str = "IMAGO_PASS_GAP_FACTOR";

/// The longest wait [`PASS_GAP_FACTOR`] imposes: a pass slowed to seconds by an overloaded
/// host still reacts within this much of its end.
pub const PASS_GAP_MAX: Duration = Duration::from_secs(5);

/// How often the controller has the provider take back what no removal names (directories,
/// addresses and network namespaces of launches and cleanups that were killed midway).
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Times the parts of a pass into the `imago_controller_pass_part_duration_seconds` histogram,
/// so a slow pass at many instances says where its time went.
pub(super) struct PartClock(std::time::Instant);

impl PartClock {
    pub(super) fn start() -> PartClock {
        PartClock(std::time::Instant::now())
    }

    /// Counts the time since the last lap (or the start) to `part`.
    pub(super) fn lap(&mut self, part: &'static str) {
        let now = std::time::Instant::now();
        crate::metrics::live().observe_pass_part(part, now.duration_since(self.0));
        self.0 = now;
    }
}

/// Lets the loop between passes end early when something a pass would act on has happened
/// (a health check flipped, a stop finished) or a known moment arrives (an instance's
/// min_ready elapses), instead of always sleeping a whole interval: every wave of a rollout
/// waits on several such moments. Only a hint: the pass still decides from observed state.
///
/// Within the pacing gap after a pass ([`Controller::wait_for_next_pass`]) the wait ends at
/// once only for a [`Wake::nudge`], what the next pass must act on now (an `apply` or
/// `rollback`, through the daemon's SIGURG; a check that failed, for the health gate and the
/// endpoint; an automatic rollback), or once nothing is under way beside the loop: when the
/// last launch worker, stop or new instance's first check ended well ([`Wake::begin`],
/// [`Wake::end`]), or a known moment arrives then, the rollout waits for nothing but a pass.
/// A [`Wake::hint`] (what comes once per instance: a launch or a stop that returned, a first
/// check that passed) ends the wait only once the gap is over: pacing keeps passes from taking
/// the CPU the rollout's launches, stops and checks need, and a launch or stop that failed is
/// retried at the paced rate.
#[derive(Debug, Default)]
pub struct Wake {
    state: Mutex<WakeState>,
    signal: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct WakeState {
    /// A pass is due, paced ([`Wake::hint`]).
    hinted: bool,
    /// Unix ms of a paced hint to come (see [`Wake::hint_at`]).
    hint_at_ms: Option<u64>,
    /// A pass is due now ([`Wake::nudge`]).
    nudged: bool,
    /// Unix ms of the earliest known moment a pass should run (see [`Wake::at`]).
    at_ms: Option<u64>,
    /// Launch workers, stops and first checks of new instances under way.
    under_way: usize,
    /// The last of them ended well: a pass is due now, unless something began since.
    settled: bool,
}

impl Wake {
    fn lock(&self) -> MutexGuard<'_, WakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Something changed that the next pass must act on now: run it at once, pacing or not.
    pub fn nudge(&self) {
        self.lock().nudged = true;
        self.signal.notify_all();
    }

    /// Something changed that a pass will take up: run the next one as soon as the pacing
    /// allows.
    pub(super) fn hint(&self) {
        self.lock().hinted = true;
        self.signal.notify_all();
    }

    /// [`Wake::hint`] at `at_ms` (Unix ms).
    pub(super) fn hint_at(&self, at_ms: u64) {
        let mut state = self.lock();
        state.hint_at_ms = Some(state.hint_at_ms.map_or(at_ms, |t| t.min(at_ms)));
        drop(state);
        // A wait under way counts its time anew (it may end before its timeout now).
        self.signal.notify_all();
    }

    /// Run a pass no later than `at_ms`: at that moment if nothing is under way, else as a
    /// hint.
    fn at(&self, at_ms: u64) {
        let mut state = self.lock();
        state.at_ms = Some(state.at_ms.map_or(at_ms, |t| t.min(at_ms)));
        drop(state);
        self.signal.notify_all();
    }

    /// Something a rollout waits for started beside the loop (a launch worker, a stop, a new
    /// instance's probe before its first verdict); [`Wake::end`] once it ended.
    pub(super) fn begin(&self) {
        let mut state = self.lock();
        state.under_way += 1;
        // What settled before is not settled any more: an end that came just before this
        // begin (a worker of the last launches ending as the next are asked for) must not end
        // the wait once these end, well or not.
        state.settled = false;
    }

    /// What [`Wake::begin`] announced ended, `well` or not (a launch or stop that failed is
    /// retried by a paced pass). Whether that settled it: nothing else is under way and it
    /// ended well, so the next pass is due at once (unless something began again meanwhile:
    /// the pass that ran then may have started the next wave). Else the caller hints as it
    /// sees fit.
    pub(super) fn end(&self, well: bool) -> bool {
        let mut state = self.lock();
        state.under_way = state.under_way.saturating_sub(1);
        let settled = well && state.under_way == 0;
        if settled {
            state.settled = true;
            drop(state);
            self.signal.notify_all();
        }
        settled
    }

    /// Waits up to `timeout`, or until nudged, hinted or a registered moment arrives. The
    /// interval is measured on the monotonic clock: whole wall-clock milliseconds ended it up
    /// to 1 ms early (and a clock step could end it at once).
    pub fn wait(&self, timeout: Duration) {
        let now = std::time::Instant::now();
        self.wait_paced(now + timeout, now);
    }

    /// Waits until `deadline`, or until nudged or settled (see [`Wake`]); a hint or a
    /// registered moment ends the wait too, but not before `earliest` (the end of the pacing
    /// gap) while something is under way.
    fn wait_paced(&self, deadline: std::time::Instant, earliest: std::time::Instant) {
        let earliest = earliest.min(deadline);
        let mut state = self.lock();
        loop {
            let now = std::time::Instant::now();
            let now_unix = now_ms();
            let mut remaining = deadline.saturating_duration_since(now);
            for at in [state.at_ms, state.hint_at_ms].into_iter().flatten() {
                // Unix milliseconds, truncated: waiting the difference never ends before `at`.
                remaining = remaining.min(Duration::from_millis(at.saturating_sub(now_unix)));
            }
            let moment = state.at_ms.is_some_and(|at| at <= now_unix);
            let at_once = state.nudged || (state.under_way == 0 && (state.settled || moment));
            let paced = state.hinted || remaining.is_zero();
            let hold = earliest.saturating_duration_since(now);
            if at_once || (paced && hold.is_zero()) {
                *state = WakeState {
                    under_way: state.under_way,
                    ..WakeState::default()
                };
                return;
            }
            if paced {
                // Due, but within the gap: taken up when the gap is over (or at once, above).
                remaining = hold;
            }
            state = self
                .signal
                .wait_timeout(state, remaining)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A service's endpoint as the controller keeps it (the data plane serves it).
pub struct Endpoint {
    /// Where it listens: `bind`, or 127.0.0.1:`port`.
    pub addrs: Vec<SocketAddr>,
    /// Host names and TLS of a host-routed endpoint.
    pub routing: crate::router::Routing,
}

/// What one pass did for one service; the controller's log and the tests read it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServicePass {
    pub service: String,
    pub release: Option<u64>,
    /// Instances whose launch finished since the last pass, of the desired release: probed
    /// from now on.
    pub launched: Vec<String>,
    /// Launches under way (started by this pass or an earlier one) at the end of the pass.
    pub launching: usize,
    pub retired: Vec<String>,
    pub stopped: Vec<String>,
    pub removed_dead: Vec<String>,
    pub drift: Vec<String>,
    pub routed: Vec<String>,
    pub counts: Counts,
    pub complete: bool,
    pub failed: Option<String>,
    pub rolled_back_to: Option<u64>,
    /// Why this pass could not reconcile the service (also recorded: see
    /// [`StateDb::service_fault`]).
    pub fault: Option<String>,
}

pub struct Controller {
    db: StateDb,
    provider: Arc<dyn Provider>,
    runtime: tokio::runtime::Handle,
    health: HealthBoard,
    probes: HashMap<String, JoinHandle<()>>,
    /// Slots for health checks under way (see [`probes::CONCURRENT_CHECKS`]).
    check_slots: Arc<tokio::sync::Semaphore>,
    /// When this controller started: an instance created before it and not yet judged by its
    /// probes is [`crate::rollout::Phase::Unprobed`], not starting.
    started_ms: u64,
    /// Since when instances pass their health checks, as recorded in the database (read on the
    /// first pass, then kept in step with what the probes find).
    readiness: Option<HashMap<String, u64>>,
    endpoints: BTreeMap<String, Endpoint>,
    engine: Engine,
    actor: String,
    /// Unknown instances already reported, so the event log is not flooded.
    reported_unknown: BTreeSet<String>,
    /// Instances whose passing health check was already recorded as an event (again after a
    /// restart, which is harmless: the event says what was observed).
    announced_ready: BTreeSet<String>,
    /// Instances whose drift was already recorded as an event: a drifted instance may serve for
    /// many passes until its replacement is ready, and one event says it.
    announced_drift: BTreeSet<String>,
    /// Stops and removals running beside the loop ([`stops`]).
    stops: stops::Stops,
    /// Per service, the instances whose removal this pass took (see [`ServicePass::stopped`]).
    stopped_now: HashMap<String, Vec<String>>,
    /// When the provider last swept what killed launches and cleanups left (see
    /// [`SWEEP_INTERVAL`]); `None` until the first pass.
    swept_at: Option<std::time::Instant>,
    /// The rootfs cache to check for modifications, and how often.
    rootfs: Option<(imago_runtime::RootfsCache, Duration)>,
    last_rootfs_check: Option<std::time::Instant>,
    /// Images whose unpacked tree was found modified, and when: instances created before that
    /// run from the modified tree. Read from the database each pass (`imago drift` records
    /// there too).
    tainted: HashMap<imago_oci::Digest, u64>,
    /// Modified images whose tree could not be set aside, already reported.
    set_aside_failed: BTreeSet<imago_oci::Digest>,
    /// What serves the endpoints: proxies, connection counts, and the kernel's connect-time
    /// balancing for clients on this host (they then connect to a routed instance directly).
    /// In this process ([`LocalPlane`]), or a process that outlives the controller. Shared
    /// with the task watches of cluster services, which take retired tasks out of the routes.
    plane: shared_plane::SharedPlane,
    /// Services the data plane serves (also those it served before this controller started),
    /// so a service that stops publishing or is destroyed gets its endpoint closed.
    plane_services: BTreeSet<String>,
    /// Routes the data plane had when this controller adopted it, per service: an instance
    /// stays routed until this controller's own health check has judged it (or retires it),
    /// so a restart does not take ready instances out of the endpoint.
    adopted_routes: BTreeMap<String, Vec<(String, SocketAddr)>>,
    /// Backend addresses the balancer routes or that still drain, gathered over one pass: the
    /// peer-address rewrite of any other is forgotten at the end of the pass.
    balanced_peers: BTreeSet<SocketAddrV4>,
    /// Services on cluster targets: their engines ([`Controller::with_cluster_engines`]).
    cluster: cluster::ClusterState,
    /// Launches running beside the loop ([`launches`]).
    launches: launches::Launches,
    /// Per service, the instances whose launch this pass took (see [`ServicePass::launched`]).
    launched_now: HashMap<String, Vec<String>>,
    /// When the last pass ended and how long it took (see [`Controller::wait_for_next_pass`]).
    last_pass: Option<(std::time::Instant, Duration)>,
    /// See [`Controller::with_pass_gap_factor`].
    pass_gap_factor: u32,
}

impl Controller {
    /// What ends the wait between passes early (see [`Wake`]).
    pub fn waker(&self) -> Arc<Wake> {
        self.health.wake.clone()
    }

    /// Sleeps until the next pass is due: at most `interval` after the last pass ended, less
    /// when something changed.
    ///
    /// The wait after a pass lasts at least [`PASS_GAP_FACTOR`] times that pass (at most
    /// [`PASS_GAP_MAX`]), counted from its end, even when that is longer than `interval`: a
    /// pass lists and judges every instance, and both the interval (250 ms by default) and the
    /// news that comes once per instance ([`Wake::hint`]: each health check that passes,
    /// launches and stops that return) came sooner than a pass over 1,000 instances took, so
    /// passes ran back to back for a whole rollover (208 passes of 737 ms in 154.5 s, release
    /// build) and took the CPU the rollout's own launches and stops needed. The controller's
    /// share of the time now stays bounded whatever the number of instances and events.
    /// Within the gap, a [`Wake::nudge`] (what must be acted on at once) ends the wait, and so
    /// does any news once nothing is under way beside the loop (see [`Wake`]): pacing then
    /// would only make the rollout wait.
    pub fn wait_for_next_pass(&self, interval: Duration) {
        let Some((ended, took)) = self.last_pass else {
            return self.health.wake.wait(interval);
        };
        let gap = took.saturating_mul(self.pass_gap_factor).min(PASS_GAP_MAX);
        self.health
            .wake
            .wait_paced(ended + interval.max(gap), ended + gap);
    }

    /// Paces passes by `factor` instead of [`PASS_GAP_FACTOR`] (0: no pacing, as before it);
    /// for comparing the two.
    pub fn with_pass_gap_factor(mut self, factor: u32) -> Controller {
        self.pass_gap_factor = factor;
        self
    }

    pub fn new(
        db: StateDb,
        provider: Arc<dyn Provider>,
        runtime: tokio::runtime::Handle,
        engine: Engine,
    ) -> Controller {
        let health = HealthBoard::default();
        Controller {
            db,
            stops: stops::Stops::new(provider.clone(), health.wake.clone()),
            stopped_now: HashMap::new(),
            provider,
            runtime,
            health,
            probes: HashMap::new(),
            check_slots: Arc::new(tokio::sync::Semaphore::new(probes::CONCURRENT_CHECKS)),
            started_ms: now_ms(),
            readiness: None,
            endpoints: BTreeMap::new(),
            engine,
            actor: "controller".into(),
            reported_unknown: BTreeSet::new(),
            announced_ready: BTreeSet::new(),
            announced_drift: BTreeSet::new(),
            swept_at: None,
            rootfs: None,
            last_rootfs_check: None,
            tainted: HashMap::new(),
            set_aside_failed: BTreeSet::new(),
            plane: shared_plane::SharedPlane::new(Box::new(LocalPlane::new(None))),
            plane_services: BTreeSet::new(),
            adopted_routes: BTreeMap::new(),
            balanced_peers: BTreeSet::new(),
            cluster: cluster::ClusterState::default(),
            launches: launches::Launches::default(),
            launched_now: HashMap::new(),
            last_pass: None,
            pass_gap_factor: std::env::var(PASS_GAP_FACTOR_ENV)
                .ok()
                .and_then(|f| f.parse().ok())
                .unwrap_or(PASS_GAP_FACTOR),
        }
    }

    /// Serves the endpoints with `plane` (a data plane process, which may already serve them:
    /// its endpoints and routes are adopted).
    pub fn with_data_plane(mut self, plane: Box<dyn DataPlane>) -> Controller {
        let adopted = plane.adopted();
        self.plane_services = adopted.iter().map(|e| e.service.clone()).collect();
        self.adopted_routes = adopted
            .into_iter()
            .filter(|e| !e.addrs.is_empty())
            .map(|e| (e.service, e.routed))
            .collect();
        self.plane = shared_plane::SharedPlane::new(plane);
        self
    }

    /// Open connections the endpoint proxy relays to instance `id` of `service`.
    pub fn proxied_connections(&mut self, service: &str, id: &str) -> usize {
        self.plane
            .lock()
            .connections(service, &[id.to_owned()])
            .ok()
            .and_then(|c| c.first().copied())
            .unwrap_or(0)
    }

    /// Balances the endpoints' new connections from clients on this host in the kernel
    /// ([`ConnectBalancer`]): they reach a routed instance directly. The endpoint proxy keeps
    /// listening and takes every connection the kernel does not balance (from other network
    /// namespaces, to IPv6 targets, or to services with more than
    /// [`imago_runtime::balancer::MAX_BACKENDS`] routed instances), and drains count the
    /// balanced connections from the kernel's socket table.
    pub fn with_kernel_balancing(mut self, balancer: ConnectBalancer) -> Controller {
        self.plane = shared_plane::SharedPlane::new(Box::new(LocalPlane::new(Some(balancer))));
        self
    }

    /// Whether the kernel balances this host's connections (see [`Self::with_kernel_balancing`]).
    pub fn kernel_balancing(&self) -> bool {
        self.plane.lock().kernel_balancing()
    }

    /// Points `service`'s endpoint at `targets`, and at the instances it routed when this
    /// controller adopted the data plane that this controller has not judged yet (among
    /// `eligible`: live, not retired). A cluster service's pass says when it began to look at
    /// the engine (`seen`): a task its watch has since found retired stays out
    /// ([`shared_plane::SharedPlane::route_seen`]). Returns what is routed.
    fn route(
        &mut self,
        service: &str,
        mut targets: Vec<(String, SocketAddr)>,
        eligible: &BTreeSet<String>,
        seen: Option<std::time::Instant>,
    ) -> Result<Vec<(String, SocketAddr)>, DeployError> {
        if !self.endpoints.contains_key(service) {
            return Ok(targets);
        }
        if let Some(mut adopted) = self.adopted_routes.remove(service) {
            let health = &self.health;
            // A set, not a scan of the targets per adopted route: both are every instance.
            let judged: std::collections::HashSet<&str> =
                targets.iter().map(|(t, _)| t.as_str()).collect();
            adopted.retain(|(id, _)| {
                eligible.contains(id)
                    && !judged.contains(id.as_str())
                    && health
                        .get(id)
                        .is_none_or(|h| !h.tracker.healthy && !h.tracker.unhealthy)
            });
            if !adopted.is_empty() {
                targets.extend(adopted.iter().cloned());
                self.adopted_routes.insert(service.to_owned(), adopted);
            }
        }
        let targets = self.plane.route_seen(service, targets, seen)?;
        if self.plane.lock().kernel_balancing() {
            self.balanced_peers
                .extend(targets.iter().filter_map(|(_, a)| match a {
                    SocketAddr::V4(a) => Some(*a),
                    SocketAddr::V6(_) => None,
                }));
        }
        self.record_kernel_failures()?;
        Ok(targets)
    }

    /// Closes `service`'s endpoint in the data plane, if it serves one. Forgotten only once the
    /// data plane has closed it: a close that failed is asked again by the next pass, and the
    /// tear-down stops (and removes, giving their address leases back) nothing before.
    fn close_endpoint(&mut self, service: &str) -> Result<(), DeployError> {
        self.endpoints.remove(service);
        self.adopted_routes.remove(service);
        if self.plane_services.contains(service) {
            self.plane.close(service)?;
            self.plane_services.remove(service);
        }
        self.record_kernel_failures()
    }

    /// Records why the data plane turned kernel balancing off (every connection then goes
    /// through the proxy, which is always right, rather than a stale backend list in the kernel).
    fn record_kernel_failures(&mut self) -> Result<(), DeployError> {
        for failure in self.plane.lock().take_kernel_failures() {
            self.db.event(None, "endpoint", &failure, &self.actor)?;
        }
        Ok(())
    }

    /// Open connections to draining instances that the kernel balanced (counted from the host's
    /// socket table, so they include the proxy's own connections to them) or forwarded for
    /// remote clients of `service`'s public addresses (counted from the conntrack table:
    /// translated flows only). An instance whose count cannot be read counts as open: its drain
    /// then ends at its deadline.
    fn kernel_open_connections(
        &self,
        service: &str,
        addresses: &BTreeMap<String, SocketAddrV4>,
    ) -> HashMap<String, usize> {
        if addresses.is_empty() {
            return HashMap::new();
        }
        // The conntrack table holds every flow of the host (Docker's too, and a busy endpoint's
        // closed ones for two minutes): it is read only for a service that remote clients reach.
        let public = self.endpoints.get(service).is_some_and(|e| {
            e.addrs
                .iter()
                .any(|a| matches!(a, SocketAddr::V4(a) if !a.ip().is_loopback()))
        });
        let addrs: Vec<SocketAddrV4> = addresses.values().copied().collect();
        let balanced = if self.plane.lock().kernel_balancing() {
            imago_runtime::balancer::open_connections(&addrs)
        } else {
            Ok(vec![0; addrs.len()])
        };
        // Forwarded flows outlive a data plane that stopped forwarding: counted whether or not
        // it forwards now.
        let forwarded = if public {
            imago_runtime::forward::forwarded_connections(&addrs)
        } else {
            Ok(vec![0; addrs.len()])
        };
        match (balanced, forwarded) {
            (Ok(balanced), Ok(forwarded)) => addresses
                .keys()
                .cloned()
                .zip(balanced.iter().zip(&forwarded).map(|(b, f)| b + f))
                .collect(),
            _ => addresses.keys().map(|id| (id.clone(), 1)).collect(),
        }
    }

    pub fn db(&self) -> &StateDb {
        &self.db
    }

    pub fn endpoint(&self, service: &str) -> Option<&Endpoint> {
        self.endpoints.get(service)
    }

    /// One reconcile pass over every service.
    pub fn pass(&mut self) -> Result<Vec<ServicePass>, DeployError> {
        let started = std::time::Instant::now();
        let result = self.pass_over_services();
        // To the end of the pass, not to the wait after it: whatever the caller does in
        // between (the daemon logs every pass) is not the pass.
        let ended = std::time::Instant::now();
        self.last_pass = Some((ended, ended.duration_since(started)));
        if let Ok(passes) = &result
            && passes.iter().any(|p| p.rolled_back_to.is_some())
        {
            // The rollback is recorded; the next pass launches it, without the pacing gap.
            self.health.wake.nudge();
        }
        result
    }

    fn pass_over_services(&mut self) -> Result<Vec<ServicePass>, DeployError> {
        let mut clock = PartClock::start();
        // The sweep reads every instance directory, lease and network namespace: once per
        // interval, not per pass and never per removed instance.
        if self
            .swept_at
            .is_none_or(|at| at.elapsed() >= SWEEP_INTERVAL)
        {
            self.provider.sweep();
            self.swept_at = Some(std::time::Instant::now());
            clock.lap("sweep");
        }
        // Before the listing: a launch is then either still under way (and counted as such) or
        // in the listing, never neither.
        self.take_launches()?;
        clock.lap("take_launches");
        self.take_stops()?;
        clock.lap("take_stops");
        let instances = self
            .provider
            .list()
            .map_err(|e| DeployError::Runtime(e.to_string()))?;
        clock.lap("list");
        self.check_rootfs(&instances)?;
        clock.lap("rootfs_check");
        let draining = self.db.draining()?;
        self.tainted = self.db.tainted()?;
        if self.readiness.is_none() {
            self.readiness = Some(self.db.readiness()?);
        }
        let services = self.db.all_services()?;
        let known: BTreeSet<&str> = services
            .iter()
            .filter(|(_, destroyed)| !destroyed)
            .map(|(n, _)| n.as_str())
            .collect();
        let destroyed: BTreeSet<&str> = services
            .iter()
            .filter(|(_, d)| *d)
            .map(|(n, _)| n.as_str())
            .collect();
        self.report_unknown(&instances, &known, &destroyed)?;
        clock.lap("database");
        let mut passes = Vec::new();
        for (service, destroyed) in &services {
            let own: Vec<&Instance> = instances
                .iter()
                .filter(|i| {
                    i.labels.get(LABEL_SERVICE).map(String::as_str) == Some(service.as_str())
                })
                .collect();
            let result = self.reconcile_service(service, *destroyed, &own, &draining);
            // One service's fault (a port another process holds, a runtime error on one of
            // its instances) is that service's: recorded, shown, retried, and never a reason
            // to leave the other services unreconciled.
            let pass = match result {
                Ok(pass) => {
                    if self.db.clear_fault(service)? {
                        self.db
                            .event(Some(service), "fault", "reconciled again", &self.actor)?;
                    }
                    pass
                }
                Err(e) => {
                    let reason = e.to_string();
                    if self.db.set_fault(service, &reason)? {
                        self.db.event(
                            Some(service),
                            "fault",
                            &format!("cannot reconcile: {reason}; retrying every pass"),
                            &self.actor,
                        )?;
                    }
                    ServicePass {
                        service: service.clone(),
                        fault: Some(reason),
                        ..ServicePass::default()
                    }
                }
            };
            passes.push(pass);
        }
        clock.lap("services");
        // Instances launched in this pass were not listed at its start, but are live: aborting
        // their first probe would only waste it.
        let live: std::collections::HashSet<&str> = instances
            .iter()
            .filter(|i| i.is_active())
            .map(|i| i.id.as_str())
            .chain(
                passes
                    .iter()
                    .flat_map(|p| p.launched.iter().map(String::as_str)),
            )
            .collect();
        // Forget the peer-address rewrite of backends no longer routed or draining.
        let peers = std::mem::take(&mut self.balanced_peers);
        self.plane.lock().keep_peers(&peers)?;
        self.record_kernel_failures()?;
        self.probes.retain(|id, task| {
            let keep = live.contains(id.as_str());
            if !keep {
                task.abort();
                self.health.not_awaited(id);
            }
            keep
        });
        self.announced_ready.retain(|id| live.contains(id.as_str()));
        self.announced_drift.retain(|id| live.contains(id.as_str()));
        // The listed ids as a set, built once and only when something asks: a scan of the
        // listing per failed removal was O(instances x failures) every pass.
        let listed: std::collections::HashSet<&str> =
            if self.stops.failures.is_empty() && draining.is_empty() {
                std::collections::HashSet::new()
            } else {
                instances.iter().map(|i| i.id.as_str()).collect()
            };
        // A failed removal of an instance someone else removed since is nothing to retry.
        self.stops.failures.retain(|id| listed.contains(id));
        // A retired instance that is gone without this controller having taken its removal
        // (its predecessor was killed between the removal and recording it, or `imago destroy`
        // removed it) is no longer draining.
        // In one batch: `imago destroy` removing a thousand of them made a thousand commits,
        // each waiting for the disk.
        if !draining.is_empty() {
            let gone: Vec<&String> = draining
                .keys()
                .filter(|id| !listed.contains(id.as_str()) && !self.stops.is_pending(id))
                .collect();
            if !gone.is_empty() {
                self.batched(|c| gone.iter().try_for_each(|id| c.db.mark_removed(id)))?;
            }
        }
        clock.lap("finish");
        Ok(passes)
    }

    /// One service's pass: on this host, or through its cluster target's engine.
    fn reconcile_service(
        &mut self,
        service: &str,
        destroyed: bool,
        own: &[&Instance],
        draining: &BTreeMap<String, u64>,
    ) -> Result<ServicePass, DeployError> {
        if destroyed {
            let last = self.db.history(service)?.pop();
            return match last.as_ref().and_then(|r| r.spec.cluster_target()) {
                Some(target) => self.tear_down_cluster(service, &target.clone()),
                None => self.tear_down(service, own),
            };
        }
        let desired = self.db.desired(service)?;
        match desired
            .as_ref()
            .and_then(|r| Some((r, r.spec.cluster_target()?.clone())))
        {
            Some((release, target)) => self.reconcile_cluster(release, &target),
            None => self.reconcile(service, own, draining),
        }
    }

    fn ensure_endpoint(&mut self, service: &str, release: &Release) -> Result<(), DeployError> {
        let addrs =
            release
                .spec
                .endpoint_addresses()
                .map_err(|reason| DeployError::InvalidService {
                    service: service.to_owned(),
                    field: "bind".into(),
                    reason,
                })?;
        if addrs.is_empty() {
            return self.close_endpoint(service);
        }
        let routing = crate::router::Routing::of(&release.spec);
        if self
            .endpoints
            .get(service)
            .is_some_and(|e| e.addrs == addrs && e.routing == routing)
        {
            return Ok(());
        }
        // A new address keeps the service's routes in the data plane: connections still open
        // on the old one (relayed to their end) keep counting for drains.
        let listening = self.plane.lock().listen(service, &addrs, &routing)?;
        self.plane_services.insert(service.to_owned());
        self.record_kernel_failures()?;
        let mut kernel = match listening.balanced {
            Some(local) => format!(
                "; clients on this host that connect to {local} reach an instance directly (kernel balancing)"
            ),
            None => String::new(),
        };
        if listening.forwarding {
            kernel.push_str(
                "; remote clients are forwarded to an instance by the kernel (nftables DNAT)",
            );
        }
        if !routing.is_plain() {
            let hosts = if routing.hosts.is_empty() {
                "every host".to_owned()
            } else {
                routing.hosts.join(", ")
            };
            let tls = if routing.tls.is_some() {
                ", TLS terminated here"
            } else {
                ""
            };
            kernel.push_str(&format!(
                "; HTTP routed by host name ({hosts}){tls}: every client goes through the proxy"
            ));
        }
        let addr = addrs
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let message = if listening.adopted {
            format!("service endpoint on {addr} kept serving without a controller: adopted{kernel}")
        } else {
            format!("service endpoint listening on {addr}{kernel}")
        };
        self.db
            .event(Some(service), "endpoint", &message, &self.actor)?;
        self.endpoints
            .insert(service.to_owned(), Endpoint { addrs, routing });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ServiceSpec;
    use crate::state::ReleaseOutcome;
    use imago_oci::Digest;
    use imago_runtime::{FakeProvider, Status};

    struct Harness {
        _dir: tempfile::TempDir,
        runtime: tokio::runtime::Runtime,
        fake: Arc<FakeProvider>,
        controller: Controller,
    }

    fn harness() -> Harness {
        let (dir, db, runtime) = super::test_support::db_and_runtime();
        let fake = Arc::new(FakeProvider::new());
        let controller =
            Controller::new(db, fake.clone(), runtime.handle().clone(), Engine::Embedded);
        Harness {
            _dir: dir,
            runtime,
            fake,
            controller,
        }
    }

    fn spec(json: serde_json::Value) -> ServiceSpec {
        serde_json::from_value(json).unwrap()
    }

    impl Harness {
        /// One pass, then what it launched taken at once (the next pass would take it): each
        /// pass of these tests sees the instances the previous one launched, as when launches
        /// ran inside the pass. The tests of background launches step `controller.pass()`.
        fn pass(&mut self) -> Result<Vec<ServicePass>, DeployError> {
            let mut passes = self.controller.pass()?;
            assert!(
                self.controller.launches.wait_idle(Duration::from_secs(30)),
                "launches still under way after 30 s"
            );
            self.controller.take_launches()?;
            for pass in &mut passes {
                if let Some(ids) = self.controller.launched_now.remove(&pass.service) {
                    pass.launched.extend(ids);
                    pass.launching = 0;
                    pass.complete = false;
                }
            }
            Ok(passes)
        }

        /// What release `number` of `service` ended as; it must have ended.
        fn outcome(&self, service: &str, number: u64) -> ReleaseOutcome {
            let recorded = self.controller.db.outcome_of(service, number).unwrap();
            recorded.unwrap().outcome
        }

        fn release(&mut self, service: &str, spec: &ServiceSpec, image: &[u8]) -> Release {
            self.controller
                .db
                .record_release(service, spec, &Digest::of(image), "apply", None, "test")
                .unwrap()
                .0
        }

        /// Passes for a while: the retired `old` instance of "web" must keep running while
        /// `client` is connected to it, and be stopped and replaced once it closes.
        fn assert_drain_holds_until_closed(&mut self, old: &str, client: std::net::TcpStream) {
            for _ in 0..20 {
                self.pass().unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(
                self.running("web").iter().any(|i| i.id == old),
                "the old instance was stopped while a connection to it was open"
            );
            drop(client);
            assert!(self.converge("web", 200).last().unwrap().complete);
            assert!(self.running("web").iter().all(|i| i.id != old));
        }

        /// Replaces the controller by a new one over the same database: no memory of the old.
        /// A new controller over the same database and instances, as after a kill -9 of the
        /// old one together with its in-process data plane.
        fn restart(&mut self, provider: Arc<dyn Provider>) {
            let ports: Vec<u16> = self
                .controller
                .endpoints
                .values()
                .flat_map(|e| e.addrs.iter().map(SocketAddr::port))
                .collect();
            let db = StateDb::open(&self._dir.path().join("state.db")).unwrap();
            let new = Controller::new(
                db,
                provider,
                self.runtime.handle().clone(),
                Engine::Embedded,
            );
            drop(std::mem::replace(&mut self.controller, new));
            // A dead process's listening sockets are gone at once; the old in-process plane's
            // proxy threads close theirs a moment after the drop. Until they have, the new
            // controller would find its endpoint's port held (by no process: a flaky fault).
            for port in ports {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the old controller's endpoint on port {port} never closed"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }

        /// Runs passes until `service` completes; returns the passes.
        fn converge(&mut self, service: &str, max: usize) -> Vec<ServicePass> {
            let mut passes = Vec::new();
            for _ in 0..max {
                let pass = self
                    .pass()
                    .unwrap()
                    .into_iter()
                    .find(|p| p.service == service)
                    .unwrap();
                let done = pass.complete || pass.failed.is_some();
                passes.push(pass);
                if done {
                    return passes;
                }
                // Stops run on side threads: give them a moment on a busy machine.
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("{service} did not converge in {max} passes: {passes:#?}");
        }

        fn running(&self, service: &str) -> Vec<Instance> {
            self.fake
                .list()
                .unwrap()
                .into_iter()
                .filter(|i| {
                    i.status == Status::Running
                        && i.labels.get(LABEL_SERVICE).map(String::as_str) == Some(service)
                })
                .collect()
        }
    }

    #[test]
    fn first_deploy_launches_all_replicas_and_completes() {
        let mut h = harness();
        let web = spec(serde_json::json!({"image": "web", "replicas": 3}));
        h.release("web", &web, b"v1");
        let passes = h.converge("web", 5);
        assert_eq!(passes[0].launched.len(), 3);
        assert!(passes.last().unwrap().complete);
        assert_eq!(h.running("web").len(), 3);
        assert_eq!(h.outcome("web", 1), ReleaseOutcome::Complete);
        // A settled service stays put.
        let pass = h.pass().unwrap().remove(0);
        assert!(pass.launched.is_empty() && pass.retired.is_empty());
    }

    #[test]
    fn rolling_update_replaces_every_instance_within_surge() {
        let mut h = harness();
        let v1 = spec(
            serde_json::json!({"image": "web", "replicas": 3, "rollout": {"max_surge": 1, "max_unavailable": 0, "drain": "0s"}}),
        );
        h.release("web", &v1, b"v1");
        h.converge("web", 5);
        let old: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        let release2 = h.release("web", &v1, b"v2");
        let mut peak = 0;
        for _ in 0..30 {
            let pass = h.pass().unwrap().remove(0);
            peak = peak.max(h.running("web").len());
            if pass.complete {
                break;
            }
            // Stops run on side threads: give them a moment on a busy machine.
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            peak <= 4,
            "never more than replicas + max_surge running (saw {peak})"
        );
        let now: Vec<Instance> = h.running("web");
        assert_eq!(now.len(), 3);
        assert!(
            now.iter()
                .all(|i| i.image == release2.image_digest && !old.contains(&i.id))
        );
        assert!(
            h.fake.list().unwrap().iter().all(|i| !old.contains(&i.id)),
            "old instances are removed, not left stopped"
        );
        assert_eq!(h.outcome("web", 2), ReleaseOutcome::Complete);
    }

    #[test]
    fn a_dead_instance_is_replaced_and_reported() {
        let mut h = harness();
        h.release(
            "web",
            &spec(serde_json::json!({"image": "web", "replicas": 2})),
            b"v1",
        );
        h.converge("web", 5);
        let victim = h.running("web")[0].id.clone();
        h.fake.exit(&victim, 137).unwrap();
        let pass = h.pass().unwrap().remove(0);
        assert_eq!(pass.removed_dead, vec![victim.clone()]);
        assert_eq!(pass.launched.len(), 1);
        assert_eq!(h.running("web").len(), 2);
        let drift: Vec<String> = h
            .controller
            .db
            .events(Some("web"), 0)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "drift")
            .map(|e| e.message)
            .collect();
        assert!(
            drift
                .iter()
                .any(|m| m.contains(&victim) && m.contains("137")),
            "{drift:?}"
        );
    }

    #[test]
    fn an_instance_running_the_wrong_spec_is_replaced() {
        let mut h = harness();
        let web = spec(serde_json::json!({"image": "web", "replicas": 1}));
        let release = h.release("web", &web, b"v1");
        h.converge("web", 5);
        // Someone launches an instance that claims the release but runs other settings.
        let mut rogue = instance_spec(&release, Engine::Embedded).unwrap();
        rogue.env.insert("DEBUG".into(), "1".into());
        let rogue = h.fake.launch(&rogue).unwrap();
        let mut saw_drift = false;
        for _ in 0..200 {
            let pass = h.pass().unwrap().remove(0);
            saw_drift |= pass.drift.iter().any(|d| d.contains(&rogue.id));
            if h.fake.inspect(&rogue.id).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(saw_drift);
        assert!(
            h.fake.inspect(&rogue.id).is_err(),
            "the drifted instance was removed"
        );
        assert_eq!(h.running("web").len(), 1);
    }

    #[test]
    fn a_failing_release_rolls_back_to_the_last_completed_one() {
        let mut h = harness();
        let good = spec(serde_json::json!({"image": "web", "replicas": 2, "env": {"V": "2"}}));
        h.release("web", &good, b"v2");
        h.converge("web", 5);
        let good_ids: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        // v3's health check can never pass: the fake instances have no process to enter.
        let bad = spec(
            serde_json::json!({"image": "web", "replicas": 2, "env": {"V": "3"},
            "health": {"type": "command", "command": ["/bin/false"], "interval": "10ms", "unhealthy_threshold": 1},
            "rollout": {"max_surge": 1, "max_unavailable": 0, "progress_deadline": "30s"}}),
        );
        h.release("web", &bad, b"v3");
        let mut failed = None;
        for _ in 0..200 {
            let pass = h.pass().unwrap().remove(0);
            if let Some(reason) = pass.failed {
                failed = Some((reason, pass.rolled_back_to));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (reason, rolled_back_to) = failed.expect("the rollout failed");
        assert!(
            reason.contains("health gate") && reason.contains("/bin/false"),
            "{reason}"
        );
        assert_eq!(rolled_back_to, Some(1));
        let desired = h.controller.db.desired("web").unwrap().unwrap();
        assert_eq!(desired.number, 3);
        assert_eq!(desired.rollback_of, Some(1));
        assert_eq!(
            desired.spec.env.get("V").map(String::as_str),
            Some("2"),
            "image and configuration roll back together"
        );
        let passes = h.converge("web", 10);
        assert!(passes.last().unwrap().complete);
        let now: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        assert_eq!(
            now, good_ids,
            "the fast path: release 1's instances kept serving and are the rollback"
        );
        let _ = h.runtime.handle();
    }

    #[test]
    fn a_rollout_without_progress_fails_at_its_deadline_and_rolls_back() {
        let mut h = harness();
        h.release(
            "web",
            &spec(serde_json::json!({"image": "web", "replicas": 1})),
            b"v1",
        );
        h.converge("web", 5);
        // Failures in the start period do not count: the new instance stays "starting".
        let stuck = spec(serde_json::json!({"image": "web", "replicas": 1,
            "health": {"type": "command", "command": ["/bin/true"], "interval": "10ms", "start_period": "1h"},
            "rollout": {"max_surge": 1, "max_unavailable": 0, "progress_deadline": "300ms"}}));
        h.release("web", &stuck, b"v2");
        let started = std::time::Instant::now();
        let mut failed = None;
        while started.elapsed() < Duration::from_secs(10) {
            let pass = h.pass().unwrap().remove(0);
            if let Some(reason) = pass.failed {
                failed = Some((reason, pass.rolled_back_to));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (reason, rolled_back_to) = failed.expect("the rollout failed at its deadline");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "not before the deadline"
        );
        assert!(
            reason.contains(
                "made no progress for 300ms (progress_deadline); last health check failure: "
            ),
            "{reason}"
        );
        assert_eq!(rolled_back_to, Some(1));
        assert!(h.converge("web", 20).last().unwrap().complete);
        assert!(
            h.running("web")
                .iter()
                .all(|i| i.image == Digest::of(b"v1"))
        );
    }

    #[test]
    fn a_rollback_release_takes_the_fast_path_in_one_wave() {
        let mut h = harness();
        let v = spec(serde_json::json!({"image": "web", "replicas": 3,
            "rollout": {"max_surge": 1, "max_unavailable": 0, "min_ready": "1h", "drain": "0s"}}));
        let first = h.release("web", &v, b"v1");
        // Mark release 1 complete without waiting an hour of min_ready.
        h.controller
            .db
            .record_outcome("web", first.number, ReleaseOutcome::Complete, "", "test")
            .unwrap();
        h.release("web", &v, b"v2");
        h.controller
            .db
            .record_release(
                "web",
                &first.spec,
                &first.image_digest,
                "rollback to release 1",
                Some(1),
                "test",
            )
            .unwrap();
        let pass = h.pass().unwrap().remove(0);
        assert_eq!(
            pass.launched.len(),
            3,
            "all replicas in one wave, not one at a time"
        );
        let passes = h.converge("web", 20);
        assert!(
            passes.last().unwrap().complete,
            "no min_ready wait on the fast path"
        );
    }

    #[test]
    fn unknown_instances_are_reported_once() {
        let mut h = harness();
        h.release("web", &spec(serde_json::json!({"image": "web"})), b"v1");
        let stray = h
            .fake
            .launch(&InstanceSpec::new(Digest::of(b"stray")))
            .unwrap();
        h.pass().unwrap();
        h.pass().unwrap();
        let reports: Vec<_> = h
            .controller
            .db
            .events(None, 0)
            .unwrap()
            .into_iter()
            .filter(|e| e.message.contains(&stray.id))
            .collect();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(reports[0].message.contains("not launched by a deployment"));
        assert!(
            h.fake.inspect(&stray.id).is_ok(),
            "imago never stops what it does not own"
        );
    }

    /// The fake provider with some of its calls changed: a test's provider implements only
    /// what it changes (every call defaults to the fake's own), and [`Altered`] makes it a
    /// [`Provider`].
    trait Alter: Send + Sync + 'static {
        fn fake(&self) -> &FakeProvider;
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
            self.fake().launch(spec)
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, imago_runtime::RuntimeError> {
            self.fake().stop(id, grace)
        }
        fn remove(&self, id: &str) -> Result<(), imago_runtime::RuntimeError> {
            self.fake().remove(id)
        }
        fn list(&self) -> Result<Vec<Instance>, imago_runtime::RuntimeError> {
            self.fake().list()
        }
    }

    /// An [`Alter`] as a provider; derefs to it, so a test reads its fields and calls its
    /// methods through the `Arc` it handed the controller.
    struct Altered<A> {
        alter: A,
    }

    impl<A: Alter> Altered<A> {
        fn new(alter: A) -> Arc<Altered<A>> {
            Arc::new(Altered { alter })
        }
    }

    impl<A> std::ops::Deref for Altered<A> {
        type Target = A;
        fn deref(&self) -> &A {
            &self.alter
        }
    }

    impl<A: Alter> Provider for Altered<A> {
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
            self.alter.launch(spec)
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, imago_runtime::RuntimeError> {
            self.alter.stop(id, grace)
        }
        fn remove(&self, id: &str) -> Result<(), imago_runtime::RuntimeError> {
            self.alter.remove(id)
        }
        fn list(&self) -> Result<Vec<Instance>, imago_runtime::RuntimeError> {
            self.alter.list()
        }
        fn inspect(&self, id: &str) -> Result<Instance, imago_runtime::RuntimeError> {
            self.alter.fake().inspect(id)
        }
        fn logs(&self, id: &str) -> Result<Vec<u8>, imago_runtime::RuntimeError> {
            self.alter.fake().logs(id)
        }
    }

    /// A provider whose stops take as long as the grace period, as with a process that ignores
    /// SIGTERM: what the controller must never wait for inside a pass. Records each grace.
    /// Its launches take the third field's time (a real launch waits for its supervisor).
    /// The fake provider with stops that wait out their grace (and launches `.2` each). `.3`:
    /// the controller using it was "killed" (see [`SlowStops::die`]). `.4`: stops wait, not
    /// their grace, but until that kill (at most [`STALL_LIMIT`]), so that they are under way
    /// after a pass however long the pass takes.
    struct SlowStops(
        Arc<FakeProvider>,
        Mutex<Vec<Duration>>,
        Duration,
        std::sync::atomic::AtomicBool,
        bool,
    );

    impl SlowStops {
        fn new(fake: &Arc<FakeProvider>) -> Arc<Altered<SlowStops>> {
            Altered::new(SlowStops(
                fake.clone(),
                Mutex::default(),
                Duration::ZERO,
                Default::default(),
                false,
            ))
        }

        /// Stops that last until [`SlowStops::die`] (or [`STALL_LIMIT`], then they stop).
        fn held_until_killed(fake: &Arc<FakeProvider>) -> Arc<Altered<SlowStops>> {
            Altered::new(SlowStops(
                fake.clone(),
                Mutex::default(),
                Duration::ZERO,
                Default::default(),
                true,
            ))
        }

        /// What a kill -9 does to the stops of the controller using this provider: the ones
        /// still waiting out their grace never reach the instance. (The harness's old
        /// controller lives on in-process; without this its stop threads would finish the
        /// tear-down a restarted controller is meant to finish, depending on timing.)
        fn die(&self) {
            self.3.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Alter for SlowStops {
        fn fake(&self) -> &FakeProvider {
            &self.0
        }
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
            std::thread::sleep(self.2);
            self.0.launch(spec)
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, imago_runtime::RuntimeError> {
            self.1.lock().unwrap().push(grace);
            if self.4 {
                let held = std::time::Instant::now();
                while !self.3.load(std::sync::atomic::Ordering::SeqCst)
                    && held.elapsed() < STALL_LIMIT
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
            } else {
                std::thread::sleep(grace);
            }
            if self.3.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(imago_runtime::RuntimeError::Supervisor {
                    id: id.to_owned(),
                    reason: "the controller that asked for this stop was killed".to_owned(),
                });
            }
            self.0.stop(id, grace)
        }
    }

    /// A free port on 127.0.0.1 (released again at once).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn connections_open_on_an_old_port_still_hold_the_drain_of_their_instance() {
        use std::io::Write;
        // The "instance": a host-network backend that keeps every connection open until the
        // client closes it.
        let backend_port = crate::dataplane::tests::holding_backend();
        let mut h = harness();
        let service = |port: u16, version: &str| {
            spec(
                serde_json::json!({"image": "web", "replicas": 1, "network": "host",
                "port": port, "target_port": backend_port, "env": {"V": version},
                "stop_grace_period": "0s", "rollout": {"drain": "30s"}}),
            )
        };
        let old_port = free_port();
        h.release("web", &service(old_port, "1"), b"v1");
        h.converge("web", 5);
        let old = h.running("web")[0].id.clone();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", old_port)).unwrap();
        client.write_all(b"hello").unwrap();
        for _ in 0..200 {
            if h.controller.proxied_connections("web", &old) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(h.controller.proxied_connections("web", &old), 1);

        // Release 2 publishes another port: the old endpoint closes, its connection lives on.
        h.release("web", &service(free_port(), "2"), b"v1");
        h.assert_drain_holds_until_closed(&old, client);
    }

    #[test]
    fn connections_the_kernel_balanced_hold_the_drain_of_their_instance() {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicUsize, Ordering};
        // The "instance": a host-network backend that counts connections and keeps each open
        // until the client closes it.
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = accepted.clone();
        std::thread::spawn(move || {
            for stream in backend.incoming() {
                let Ok(mut stream) = stream else { break };
                seen.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while stream.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                });
            }
        });
        let mut h = harness();
        h.controller = std::mem::replace(&mut h.controller, {
            let db = StateDb::open(&h._dir.path().join("state.db")).unwrap();
            Controller::new(
                db,
                h.fake.clone(),
                h.runtime.handle().clone(),
                Engine::Embedded,
            )
        })
        .with_kernel_balancing(ConnectBalancer::attach().unwrap());
        assert!(h.controller.kernel_balancing());
        let port = free_port();
        let service = |version: &str| {
            spec(
                serde_json::json!({"image": "web", "replicas": 1, "network": "host",
                "port": port, "target_port": backend_addr.port(), "env": {"V": version},
                "stop_grace_period": "0s", "rollout": {"drain": "30s"}}),
            )
        };
        h.release("web", &service("1"), b"v1");
        h.converge("web", 5);
        let old = h.running("web")[0].id.clone();
        let endpoint = SocketAddr::from(([127, 0, 0, 1], port));
        let mut client = std::net::TcpStream::connect(endpoint).unwrap();
        client.write_all(b"hello").unwrap();
        // Straight to the backend, past the proxy, and the client still sees the endpoint.
        assert_eq!(client.peer_addr().unwrap(), endpoint);
        for _ in 0..200 {
            if accepted.load(Ordering::SeqCst) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(
            h.controller.proxied_connections("web", &old),
            0,
            "the connection went through the proxy"
        );

        // Release 2 retires the old instance: it drains while the balanced connection is open.
        h.release("web", &service("2"), b"v1");
        h.assert_drain_holds_until_closed(&old, client);
    }

    #[test]
    fn a_retired_instance_stops_with_the_grace_period_it_was_launched_with() {
        let mut h = harness();
        let slow = SlowStops::new(&h.fake);
        h.restart(slow.clone());
        let v1 = spec(
            serde_json::json!({"image": "web", "replicas": 1, "stop_grace_period": "50ms",
            "rollout": {"drain": "0s"}}),
        );
        h.release("web", &v1, b"v1");
        h.converge("web", 5);
        let v2 = spec(
            serde_json::json!({"image": "web", "replicas": 1, "stop_grace_period": "2s",
            "rollout": {"drain": "0s"}}),
        );
        h.release("web", &v2, b"v2");
        assert!(h.converge("web", 100).last().unwrap().complete);
        assert_eq!(
            *slow.1.lock().unwrap(),
            vec![Duration::from_millis(50)],
            "release 1's instance was stopped with release 1's grace period"
        );
    }

    /// A provider whose stop of an instance ends only while the controller lists the instances,
    /// after the listing was taken: the listing still shows the instance running although its
    /// stop is over, as happens when a stop ends during a pass. Counts the stops; with
    /// `panic_next`, the next stop panics instead (a bug in a provider).
    #[derive(Default)]
    struct StopsEndingAfterTheListing {
        fake: Arc<FakeProvider>,
        stops: Mutex<usize>,
        panic_next: std::sync::atomic::AtomicBool,
        /// (a stop is waiting, it may go on)
        gate: Mutex<(bool, bool)>,
        turn: std::sync::Condvar,
    }

    impl Alter for StopsEndingAfterTheListing {
        fn fake(&self) -> &FakeProvider {
            &self.fake
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, imago_runtime::RuntimeError> {
            *self.stops.lock().unwrap() += 1;
            if self
                .panic_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                panic!("the provider failed to stop {id}");
            }
            let mut gate = self.gate.lock().unwrap();
            gate.0 = true;
            while !gate.1 {
                gate = self.turn.wait(gate).unwrap();
            }
            *gate = (false, false);
            drop(gate);
            self.fake.stop(id, grace)
        }
        fn list(&self) -> Result<Vec<Instance>, imago_runtime::RuntimeError> {
            let listed = self.fake.list();
            let mut gate = self.gate.lock().unwrap();
            if gate.0 {
                gate.1 = true;
                self.turn.notify_all();
                drop(gate);
                // Long enough for the stop's thread to end before the pass decides anything.
                std::thread::sleep(Duration::from_millis(200));
            }
            listed
        }
    }

    #[test]
    fn a_stop_that_ended_after_the_listing_is_not_started_again() {
        let mut h = harness();
        let provider = Altered::new(StopsEndingAfterTheListing {
            fake: h.fake.clone(),
            ..Default::default()
        });
        h.restart(provider.clone());
        roll_out_v1_then_v2(&mut h);
        assert_eq!(
            *provider.stops.lock().unwrap(),
            1,
            "release 1's instance was stopped once"
        );
    }

    /// Release 1 with one instance, then release 2 replacing it (no drain time).
    fn roll_out_v1_then_v2(h: &mut Harness) {
        let v1 =
            spec(serde_json::json!({"image": "web", "replicas": 1, "rollout": {"drain": "0s"}}));
        h.release("web", &v1, b"v1");
        h.converge("web", 5);
        let v2 =
            spec(serde_json::json!({"image": "web", "replicas": 1, "rollout": {"drain": "0s"}}));
        h.release("web", &v2, b"v2");
        // Bounded by time, not passes: a panicking stop thread prints (and, with
        // RUST_BACKTRACE, symbolizes) its backtrace before it counts as finished, which takes
        // far more than 100 passes on a loaded machine.
        let started = std::time::Instant::now();
        loop {
            let passes = h.pass().unwrap();
            if passes.iter().any(|p| p.service == "web" && p.complete) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "web did not converge in 30 s: {passes:#?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_stop_whose_thread_panicked_is_started_again() {
        let mut h = harness();
        let provider = Altered::new(StopsEndingAfterTheListing {
            fake: h.fake.clone(),
            panic_next: true.into(),
            ..Default::default()
        });
        h.restart(provider.clone());
        // The first stop (of release 1's instance) panics: it never ended, so it is not
        // pending either, and a later pass stops the instance again.
        roll_out_v1_then_v2(&mut h);
        assert_eq!(*provider.stops.lock().unwrap(), 2);
        assert_eq!(h.running("web").len(), 1);
    }

    #[test]
    fn stop_grace_is_that_of_the_instance_s_release_else_the_default() {
        let mut h = harness();
        let web = spec(serde_json::json!({"image": "web", "stop_grace_period": "50ms"}));
        let release = h.release("web", &web, b"v1");
        let spec = instance_spec(&release, Engine::Embedded).unwrap();
        let labelled = Instance::new("a".into(), &spec).unwrap();
        let db = &h.controller.db;
        assert_eq!(
            stop_grace(db, "web", &labelled).unwrap(),
            Duration::from_millis(50)
        );
        assert_eq!(stop_grace(db, "api", &labelled).unwrap(), STOP_GRACE);
        let plain = imago_runtime::InstanceSpec::new(Digest::of(b"v1"));
        let unlabelled = Instance::new("b".into(), &plain).unwrap();
        assert_eq!(stop_grace(db, "web", &unlabelled).unwrap(), STOP_GRACE);
    }

    #[test]
    fn destroy_stops_everything_of_the_service() {
        let mut h = harness();
        h.release(
            "web",
            &spec(serde_json::json!({"image": "web", "replicas": 2, "stop_grace_period": "1s"})),
            b"v1",
        );
        h.release(
            "api",
            &spec(serde_json::json!({"image": "api", "replicas": 1})),
            b"a1",
        );
        h.converge("web", 5);
        // Stops that do not end before the kill below: one the pass waited for would end (after
        // STALL_LIMIT) before the pass does, however slow the machine.
        let first_stops = SlowStops::held_until_killed(&h.fake);
        h.restart(first_stops.clone());
        h.controller.db.destroy("web", "test").unwrap();

        let started = std::time::Instant::now();
        let first = h.pass().unwrap();
        let took = started.elapsed();
        assert_eq!(
            h.running("web").len(),
            2,
            "the pass returned ({took:?}) with the stops still in progress: it does not wait for them"
        );
        assert!(first.iter().any(|p| p.service == "web"));

        // A controller killed in the middle of the tear-down: a new one over the same database
        // finishes it from what it observes.
        first_stops.die();
        h.restart(SlowStops::new(&h.fake));
        let mut stopped = BTreeSet::new();
        // Stops of 1 s each on side threads: a deadline far beyond them at any load. The loop
        // ends once nothing of web is left and both stops were reported: a stop that ends after
        // a pass took what had finished is reported by the next pass, though its instance is
        // gone from the listing already.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let passes = h.pass().unwrap();
            let web = passes.iter().find(|p| p.service == "web").unwrap();
            stopped.extend(web.stopped.iter().cloned());
            let left = h
                .fake
                .list()
                .unwrap()
                .iter()
                .any(|i| i.labels.get(LABEL_SERVICE).map(String::as_str) == Some("web"));
            if !left && stopped.len() >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(stopped.len(), 2, "both instances were stopped and removed");
        assert!(
            h.fake
                .list()
                .unwrap()
                .iter()
                .all(|i| i.labels.get(LABEL_SERVICE).map(String::as_str) == Some("api")),
            "nothing of web is left, and api is untouched"
        );
        assert_eq!(h.running("api").len(), 1);
    }

    #[test]
    fn a_restarted_controller_continues_where_the_last_one_stood() {
        let mut h = harness();
        let v = spec(
            serde_json::json!({"image": "web", "replicas": 4, "rollout": {"max_surge": 1, "max_unavailable": 0, "drain": "0s"}}),
        );
        h.release("web", &v, b"v1");
        h.converge("web", 5);
        h.release("web", &v, b"v2");
        h.pass().unwrap();
        h.pass().unwrap();
        // A new controller over the same database and instances: no memory of the old one.
        h.restart(h.fake.clone());
        let passes = h.converge("web", 30);
        assert!(passes.last().unwrap().complete);
        let running = h.running("web");
        assert_eq!(running.len(), 4);
        assert!(running.iter().all(|i| i.image == Digest::of(b"v2")));
        assert_eq!(h.fake.list().unwrap().len(), 4, "no orphaned instance");
    }

    /// A paused rollout launches and retires nothing, pass after pass and in a restarted
    /// controller, and goes on from where it stood once resumed.
    #[test]
    fn a_paused_rollout_holds_through_a_controller_restart_until_resumed() {
        let mut h = harness();
        let v = spec(
            serde_json::json!({"image": "web", "replicas": 3, "rollout": {"max_surge": 1, "max_unavailable": 0, "drain": "0s"}}),
        );
        h.release("web", &v, b"v1");
        h.converge("web", 5);
        h.release("web", &v, b"v2");
        h.pass().unwrap();
        crate::actions::set_paused(h.controller.db(), "web", true, "test").unwrap();
        let ids = |h: &Harness| {
            let mut ids: Vec<String> = h.running("web").into_iter().map(|i| i.id).collect();
            ids.sort();
            ids
        };
        let held = ids(&h);
        let hold = |h: &mut Harness| {
            for _ in 0..10 {
                let pass = h.pass().unwrap().pop().unwrap();
                assert!(
                    pass.launched.is_empty() && pass.retired.is_empty(),
                    "{pass:#?}"
                );
                assert!(!pass.complete);
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(ids(h), held, "a paused rollout changed the instances");
        };
        hold(&mut h);
        h.restart(h.fake.clone());
        hold(&mut h);
        let status =
            crate::status::service_status(h.controller.db(), "web", &h.fake.list().unwrap())
                .unwrap();
        assert_eq!(status.paused.unwrap().actor, "test");
        crate::actions::set_paused(h.controller.db(), "web", false, "test").unwrap();
        assert!(h.converge("web", 40).last().unwrap().complete);
        assert!(
            h.running("web")
                .iter()
                .all(|i| i.image == Digest::of(b"v2"))
        );
    }

    /// A restart replaces every instance with new ones of the same image and configuration:
    /// a new revision, the same configuration hash; an unchanged apply afterwards is no change.
    #[test]
    fn a_restart_replaces_every_instance_and_an_unchanged_apply_keeps_them() {
        let mut h = harness();
        let v =
            spec(serde_json::json!({"image": "web", "replicas": 2, "rollout": {"drain": "0s"}}));
        let first = h.release("web", &v, b"v1");
        h.converge("web", 5);
        let before: Vec<String> = h.running("web").into_iter().map(|i| i.id).collect();
        let restarted = crate::actions::restart(&mut h.controller.db, "web", "test").unwrap();
        assert_eq!(restarted.restart, 1);
        assert_eq!(restarted.config_hash, first.config_hash);
        assert_eq!(restarted.image_digest, first.image_digest);
        assert_ne!(restarted.revision, first.revision);
        assert!(h.converge("web", 40).last().unwrap().complete);
        let after = h.running("web");
        assert_eq!(after.len(), 2);
        assert!(
            after.iter().all(|i| !before.contains(&i.id)),
            "an old instance survived"
        );
        assert!(
            after
                .iter()
                .all(|i| i.labels.get(LABEL_REVISION) == Some(&restarted.revision))
        );
        // The same definition applied again: the release stays, so do the instances.
        let (again, new) = h
            .controller
            .db
            .record_release("web", &v, &Digest::of(b"v1"), "apply", None, "test")
            .unwrap();
        assert!(
            !new,
            "an unchanged apply after a restart made release {}",
            again.number
        );
        // Drift judges the restarted instances as the release's own.
        let findings = crate::drift::check(
            &h.controller.db,
            &h.fake.list().unwrap(),
            &imago_runtime::RootfsCache::new(h._dir.path().join("rootfs")),
            false,
            "test",
        )
        .unwrap()
        .findings;
        assert!(findings.is_empty(), "{findings:?}");
    }

    /// A TCP listener that accepts and drops every connection: what the tcp health checks of
    /// fake instances on the host network probe.
    fn healthy_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        port
    }

    /// The launches of one pass run side by side: 16 launches of 100 ms each take well under
    /// their 1.6 s sum, and every one of them is recorded.
    #[test]
    fn the_launches_of_a_pass_run_side_by_side() {
        /// Launches that each wait until as many as the launch workers are under way at
        /// once (at most 30 s from the first launch): run one after another, the first would
        /// wait out the limit alone. Counts, not a clock: a loaded host slows every launch alike.
        struct Together {
            fake: Arc<FakeProvider>,
            in_flight: std::sync::atomic::AtomicUsize,
            peak: std::sync::atomic::AtomicUsize,
            first: std::sync::OnceLock<std::time::Instant>,
        }
        impl Alter for Together {
            fn fake(&self) -> &FakeProvider {
                &self.fake
            }
            fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
                use std::sync::atomic::Ordering::SeqCst;
                let now = self.in_flight.fetch_add(1, SeqCst) + 1;
                self.peak.fetch_max(now, SeqCst);
                let first = *self.first.get_or_init(std::time::Instant::now);
                while self.peak.load(SeqCst) < launches::PARALLEL_LAUNCHES
                    && first.elapsed() < Duration::from_secs(30)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                self.in_flight.fetch_sub(1, SeqCst);
                self.fake.launch(spec)
            }
        }
        let mut h = harness();
        let together = Altered::new(Together {
            fake: h.fake.clone(),
            in_flight: Default::default(),
            peak: Default::default(),
            first: Default::default(),
        });
        h.restart(together.clone());
        let web = spec(serde_json::json!({"image": "web", "replicas": 16}));
        h.release("web", &web, b"v1");
        let started = std::time::Instant::now();
        let pass = h.pass().unwrap().remove(0);
        assert_eq!(pass.launched.len(), 16, "{pass:?}");
        let peak = together.peak.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            peak,
            launches::PARALLEL_LAUNCHES,
            "at most {peak} launches at once (the pass took {:?})",
            started.elapsed()
        );
        assert_eq!(h.running("web").len(), 16);
    }

    /// A new instance is usually probed before its program listens; it is looked at again
    /// within milliseconds, not a whole interval later (each rollout wave waited for that), and
    /// those early failures do not count against it.
    #[test]
    fn a_new_instance_is_ready_soon_after_it_listens_not_an_interval_later() {
        let mut h = harness();
        let port = free_port();
        let web = spec(serde_json::json!({
            "image": "web", "replicas": 1, "network": "host",
            "health": {"type": "tcp", "port": port, "interval": "20s", "unhealthy_threshold": 2},
        }));
        h.release("web", &web, b"v1");
        let started = std::time::Instant::now();
        let first = h.pass().unwrap().remove(0);
        assert_eq!(first.launched.len(), 1);
        let listener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        loop {
            let pass = h.pass().unwrap().remove(0);
            assert!(pass.failed.is_none(), "{pass:?}");
            assert!(pass.retired.is_empty(), "early failures counted: {pass:?}");
            if pass.complete {
                break;
            }
            // Half the interval: a loaded host's delays stay far below it, and a look only at
            // the next interval cannot be ready before it.
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "not ready within 10 s of a 20 s interval: {pass:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(listener);
    }

    /// An HTTP server for the checks of many fake instances on the host network: answers 200
    /// after `hold`, counts the most requests it had in hand at once, and refuses every
    /// connection once `stop` is set (its listener is closed), as a dead instance does.
    struct CountingServer {
        port: u16,
        most: Arc<std::sync::atomic::AtomicUsize>,
        stop: Arc<std::sync::atomic::AtomicBool>,
    }

    impl CountingServer {
        fn start(hold: Duration) -> CountingServer {
            use std::io::{Read, Write};
            use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let port = listener.local_addr().unwrap().port();
            let most = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let in_hand = Arc::new(AtomicUsize::new(0));
            let (most_seen, stopped) = (most.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    };
                    let (in_hand, most_seen) = (in_hand.clone(), most_seen.clone());
                    std::thread::spawn(move || {
                        conn.set_nonblocking(false).unwrap();
                        let mut buf = [0u8; 512];
                        let _ = conn.read(&mut buf);
                        let now = in_hand.fetch_add(1, Ordering::SeqCst) + 1;
                        most_seen.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(hold);
                        in_hand.fetch_sub(1, Ordering::SeqCst);
                        let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
                    });
                }
            });
            CountingServer { port, most, stop }
        }
    }

    /// 200 instances launched in one pass: their checks run at most `CONCURRENT_CHECKS` at a
    /// time, and once the instances die (connections refused) every one of them is found
    /// unhealthy within an interval plus the timeout.
    #[test]
    fn checks_of_many_instances_are_bounded_and_a_dead_instance_is_found_within_interval_and_timeout()
     {
        use std::sync::atomic::Ordering;
        let mut h = harness();
        let server = CountingServer::start(Duration::from_millis(20));
        // A timeout a loaded host's check of a 20 ms answer always meets (300 ms was missed at
        // load 50: with a threshold of 1, one slow answer failed the release's health gate).
        let (interval, timeout) = (Duration::from_millis(1000), Duration::from_millis(1000));
        let web = spec(serde_json::json!({
            "image": "web", "replicas": 200, "network": "host",
            "health": {"type": "http", "port": server.port, "path": "/", "interval": "1s",
                       "timeout": "1s", "unhealthy_threshold": 1, "start_period": "30s"},
        }));
        h.release("web", &web, b"v1");
        let last = h.converge("web", 2000).pop().unwrap();
        assert!(last.complete, "{last:?}");
        // Past every instance's first, spread-out gap: all checks now come once an interval.
        std::thread::sleep(interval * 2);
        let most = server.most.load(Ordering::SeqCst);
        assert!(
            most <= probes::CONCURRENT_CHECKS && most > 1,
            "{most} checks were in hand at once"
        );
        let ids: Vec<String> = h.running("web").into_iter().map(|i| i.id).collect();
        assert_eq!(ids.len(), 200);
        server.stop.store(true, Ordering::SeqCst);
        let died = std::time::Instant::now();
        // A loaded test host gets half a second more. (The start period only spares the
        // launch on a loaded test host: a failure of an instance that was healthy counts.)
        let bound = interval + timeout + Duration::from_millis(500);
        loop {
            let healthy: Vec<&String> = ids
                .iter()
                .filter(|id| !h.controller.health.get(id).unwrap().tracker.unhealthy)
                .collect();
            if healthy.is_empty() {
                break;
            }
            assert!(
                died.elapsed() < bound,
                "{} of 200 dead instances not found unhealthy within {bound:?}",
                healthy.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A restarted controller takes over 150 running instances from their records and the
    /// database: nothing launched, retired or stopped, every one of them still available and
    /// routed, no new rollout.
    #[test]
    fn a_restarted_controller_takes_over_150_instances_as_they_stand() {
        let mut h = harness();
        let port = healthy_port();
        let web = spec(serde_json::json!({
            "image": "web", "replicas": 150, "network": "host",
            "port": free_port(), "target_port": port,
            "health": {"type": "tcp", "port": port, "interval": "100ms"},
        }));
        h.release("web", &web, b"v1");
        assert!(h.converge("web", 2000).last().unwrap().complete);
        let before: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        h.restart(h.fake.clone());
        for round in 0..20 {
            let pass = h.pass().unwrap().remove(0);
            assert!(
                pass.launched.is_empty() && pass.retired.is_empty() && pass.stopped.is_empty(),
                "pass {round} after the restart changed something: {pass:?}"
            );
            assert_eq!(pass.counts.available, 150, "pass {round}: {pass:?}");
            assert_eq!(pass.routed.len(), 150, "pass {round}: {pass:?}");
            assert!(pass.complete, "pass {round}: {pass:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let after: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn a_controller_restarted_mid_rollout_keeps_every_serving_instance_and_their_min_ready() {
        let mut h = harness();
        let port = healthy_port();
        let endpoint = free_port();
        let web = |image: &str| {
            spec(serde_json::json!({
                "image": image, "replicas": 3, "network": "host",
                "port": endpoint, "target_port": port,
                "health": {"type": "tcp", "port": port, "interval": "20ms"},
                "rollout": {"max_surge": 1, "max_unavailable": 0, "min_ready": "300ms", "drain": "0s"}
            }))
        };
        h.release("web", &web("web"), b"v1");
        h.converge("web", 1000);
        h.release("web", &web("web"), b"v2");
        h.pass().unwrap();
        // A new controller, as after `imago serve --stop` + `imago apply`, or a kill -9.
        h.restart(h.fake.clone());
        let mut passes = 0;
        loop {
            let pass = h.pass().unwrap().remove(0);
            if passes == 0 {
                assert!(
                    pass.retired.is_empty(),
                    "nothing retired before probing: {pass:?}"
                );
                assert_eq!(
                    pass.counts.available, 3,
                    "instances ready for min_ready before the restart still count: {pass:?}"
                );
            }
            assert!(
                pass.routed.len() >= 3,
                "traffic kept replicas - max_unavailable instances: {pass:?}"
            );
            passes += 1;
            if pass.complete {
                break;
            }
            assert!(passes < 1000, "no completion: {pass:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let running = h.running("web");
        assert_eq!(running.len(), 3);
        assert!(running.iter().all(|i| i.image == Digest::of(b"v2")));
    }

    #[test]
    fn a_launch_interrupted_by_the_controller_s_death_is_relaunched_and_fails_no_release() {
        let mut h = harness();
        let web =
            spec(serde_json::json!({"image": "web", "replicas": 2, "rollout": {"drain": "0s"}}));
        h.release("web", &web, b"v1");
        h.converge("web", 10);
        h.release("web", &web, b"v2");
        // What a controller killed during a launch leaves: the supervisor gave up waiting.
        h.fake.fail_next_launch(&format!(
            "instance x: supervisor: {} before the network was created",
            imago_runtime::supervisor::LAUNCHER_GAVE_UP
        ));
        h.pass().unwrap();
        h.restart(h.fake.clone());
        let passes = h.converge("web", 100);
        let last = passes.last().unwrap();
        assert!(last.complete && last.failed.is_none(), "{passes:#?}");
        assert_eq!(h.outcome("web", 2), ReleaseOutcome::Complete);
        assert_eq!(
            h.controller.db.desired("web").unwrap().unwrap().number,
            2,
            "no rollback release"
        );
        let events = h.controller.db.events(Some("web"), 0).unwrap();
        assert!(
            events.iter().any(|e| e.kind == "launch-interrupted"),
            "{events:#?}"
        );
        assert_eq!(
            h.fake.list().unwrap().len(),
            2,
            "the interrupted one is gone"
        );
    }

    #[test]
    fn a_service_whose_port_is_taken_stalls_no_other_service_and_says_why() {
        let mut h = harness();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port_a = taken.local_addr().unwrap().port();
        let a = spec(serde_json::json!({"image": "a", "port": port_a, "target_port": 80}));
        let b = spec(serde_json::json!({"image": "b", "port": free_port(), "target_port": 80}));
        h.release("a", &a, b"a1");
        h.release("b", &b, b"b1");
        let passes = h.converge("b", 10);
        assert!(passes.last().unwrap().complete);
        for _ in 0..3 {
            let passes = h.pass().unwrap();
            let a_pass = passes.iter().find(|p| p.service == "a").unwrap();
            assert!(a_pass.fault.is_some(), "{a_pass:?}");
        }
        let (reason, _) = h.controller.db.service_fault("a").unwrap().unwrap();
        assert!(reason.contains(&format!("{port_a}")), "{reason}");
        let faults = |h: &Harness| {
            h.controller
                .db
                .events(Some("a"), 0)
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == "fault")
                .count()
        };
        assert_eq!(faults(&h), 1, "one event per fault, not one per pass");
        drop(taken);
        assert!(h.converge("a", 10).last().unwrap().complete);
        assert!(h.controller.db.service_fault("a").unwrap().is_none());
        assert_eq!(faults(&h), 2, "and one when it is over");
    }

    #[test]
    fn instances_get_the_service_volumes_and_a_volume_change_is_a_new_spec() {
        let mut h = harness();
        let with = spec(serde_json::json!({"image": "web", "volumes": ["data:/srv/data:ro"]}));
        let release = h.release("web", &with, b"v1");
        let instance = instance_spec(&release, Engine::Embedded).unwrap();
        assert_eq!(instance.volumes.len(), 1);
        assert_eq!(instance.volumes[0].to_string(), "data:/srv/data:ro");
        let without = spec(serde_json::json!({"image": "web"}));
        let plain = h.release("web", &without, b"v1");
        assert_ne!(plain.revision, release.revision);
        assert_ne!(
            instance_spec(&plain, Engine::Embedded)
                .unwrap()
                .spec_hash()
                .unwrap(),
            instance.spec_hash().unwrap()
        );
    }

    #[test]
    fn the_wait_between_passes_ends_on_a_nudge_or_a_known_moment() {
        let wake = Arc::new(Wake::default());
        let start = std::time::Instant::now();
        wake.wait(Duration::from_millis(50));
        assert!(
            start.elapsed() >= Duration::from_millis(50),
            "a plain wait lasts the interval"
        );

        let nudger = wake.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            nudger.nudge();
        });
        let start = std::time::Instant::now();
        wake.wait(Duration::from_secs(10));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a nudge ends the wait"
        );
        t.join().unwrap();

        wake.at(now_ms() + 40);
        let start = std::time::Instant::now();
        wake.wait(Duration::from_secs(10));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(30) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        // The moment is consumed: the next wait lasts its interval again, never less (short
        // intervals show a rounding to whole milliseconds at once).
        let start = std::time::Instant::now();
        wake.wait(Duration::from_millis(50));
        assert!(start.elapsed() >= Duration::from_millis(50));
        for _ in 0..50 {
            let start = std::time::Instant::now();
            wake.wait(Duration::from_micros(2500));
            let waited = start.elapsed();
            assert!(waited >= Duration::from_micros(2500), "{waited:?}");
        }
    }

    // ---- launches beside the loop ------------------------------------------------------------

    /// A provider whose launches wait until the test lets them through (a launch path slowed
    /// by load: seconds a wave at 1,000 instances), and which records the most instances alive
    /// at any moment it sees: those not exited, plus launches under way.
    struct GatedProvider {
        fake: Arc<FakeProvider>,
        gate: std::sync::Mutex<Gate>,
        opened: std::sync::Condvar,
    }

    #[derive(Default)]
    struct Gate {
        /// Launches that may still go through; `usize::MAX` while the gate is open.
        passes: usize,
        in_flight: usize,
        peak: usize,
        /// A launch waited [`STALL_LIMIT`] at the closed gate and went through: whatever was
        /// waiting for it (a pass that must not) returned only then.
        gave_up: bool,
    }

    /// How long a launch waits at a closed gate before it goes through anyway. Far longer than
    /// any pass at any load: a pass that waits for a stalled launch ends the test with a failure
    /// (see [`GatedProvider::assert_still_stalled`]) instead of hanging it.
    const STALL_LIMIT: Duration = Duration::from_secs(60);

    impl GatedProvider {
        fn new(fake: Arc<FakeProvider>) -> Arc<Altered<GatedProvider>> {
            Altered::new(GatedProvider {
                fake,
                gate: std::sync::Mutex::new(Gate {
                    passes: usize::MAX,
                    ..Gate::default()
                }),
                opened: std::sync::Condvar::new(),
            })
        }

        fn alive(&self) -> usize {
            self.fake
                .list()
                .unwrap()
                .iter()
                .filter(|i| matches!(i.status, Status::Running | Status::Created))
                .count()
        }

        fn close(&self) {
            self.gate.lock().unwrap().passes = 0;
        }

        /// Lets `n` more launches through (`usize::MAX`: all from now on).
        fn let_through(&self, n: usize) {
            let mut gate = self.gate.lock().unwrap();
            gate.passes = gate.passes.saturating_add(n);
            self.opened.notify_all();
        }

        fn in_flight(&self) -> usize {
            self.gate.lock().unwrap().in_flight
        }

        /// The pass that just returned (in `took`) did not wait for a stalled launch: none has
        /// gone through by giving up. Counts, not clocks: a pass slowed by load to seconds
        /// still passes, one that waits for the launches fails after [`STALL_LIMIT`].
        fn assert_still_stalled(&self, took: Duration, pass: &ServicePass) {
            assert!(
                !self.gate.lock().unwrap().gave_up,
                "a pass waited for the stalled launches (it took {took:?}): {pass:?}"
            );
        }

        /// Records the instances alive now (with the launches under way) in the peak.
        fn observe_peak(&self) -> usize {
            let mut gate = self.gate.lock().unwrap();
            let alive = self.alive() + gate.in_flight;
            gate.peak = gate.peak.max(alive);
            gate.peak
        }
    }

    impl Alter for GatedProvider {
        fn fake(&self) -> &FakeProvider {
            &self.fake
        }
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
            let mut gate = self.gate.lock().unwrap();
            gate.in_flight += 1;
            gate.peak = gate.peak.max(self.alive() + gate.in_flight);
            let stalled = std::time::Instant::now();
            while gate.passes == 0 {
                let Some(left) = STALL_LIMIT.checked_sub(stalled.elapsed()) else {
                    gate.gave_up = true;
                    break;
                };
                gate = self.opened.wait_timeout(gate, left).unwrap().0;
            }
            if gate.passes != 0 && gate.passes != usize::MAX {
                gate.passes -= 1;
            }
            // Under the gate's lock: the launched instance is never seen both listed and in
            // flight by `observe_peak`.
            let launched = self.fake.launch(spec);
            gate.in_flight -= 1;
            launched
        }
    }

    fn gated_harness() -> (Harness, Arc<Altered<GatedProvider>>) {
        let mut h = harness();
        let gated = GatedProvider::new(h.fake.clone());
        h.restart(gated.clone());
        (h, gated)
    }

    /// Runs `controller.pass()` (launches left in the background) and returns "web"'s pass
    /// and how long it took.
    fn timed_pass(h: &mut Harness) -> (ServicePass, Duration) {
        let started = std::time::Instant::now();
        let pass = h
            .controller
            .pass()
            .unwrap()
            .into_iter()
            .find(|p| p.service == "web")
            .unwrap();
        (pass, started.elapsed())
    }

    /// Passes until "web" completes (launches left in the background: each pass takes what
    /// finished), checking the peak of instances alive after each; returns the passes.
    fn converge_in_background(
        h: &mut Harness,
        gated: &GatedProvider,
        ceiling: usize,
    ) -> Vec<ServicePass> {
        let mut passes = Vec::new();
        for _ in 0..2000 {
            let (pass, _) = timed_pass(h);
            let peak = gated.observe_peak();
            assert!(peak <= ceiling, "{peak} instances alive, ceiling {ceiling}");
            let done = pass.complete || pass.failed.is_some();
            passes.push(pass);
            if done {
                return passes;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("web did not converge: {:#?}", passes.last());
    }

    #[test]
    fn a_pass_with_a_stalled_wave_under_way_returns_and_still_cleans_up_and_pauses() {
        let (mut h, gated) = gated_harness();
        let v1 = spec(serde_json::json!({
            "image": "web", "replicas": 4,
            "rollout": {"max_surge": 2, "max_unavailable": 0, "drain": "0s"}
        }));
        h.release("web", &v1, b"v1");
        converge_in_background(&mut h, &gated, 6);
        let old: Vec<String> = h.running("web").into_iter().map(|i| i.id).collect();
        assert_eq!(old.len(), 4);

        // The launch path stalls (as under load): the wave's launches do not return.
        gated.close();
        h.release("web", &v1, b"v2");
        let (first, took) = timed_pass(&mut h);
        assert_eq!(first.launching, 2, "a wave of max_surge starts: {first:?}");
        gated.assert_still_stalled(took, &first);
        eprintln!("the pass that started a stalled wave took {took:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while gated.in_flight() < 2 {
            assert!(std::time::Instant::now() < deadline, "the wave never began");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Meanwhile an old instance dies: the next pass cleans it up at once, and launches no
        // replacement beyond the surge (the two launches under way already fill it).
        h.fake.exit(&old[0], 137).unwrap();
        let (pass, took) = timed_pass(&mut h);
        gated.assert_still_stalled(took, &pass);
        assert_eq!(pass.removed_dead, vec![old[0].clone()], "{pass:?}");
        // 3 old instances + 2 launches under way: the ceiling allows one more, the 4 replicas
        // of v2 are 2 short.
        assert_eq!(pass.launching, 3, "{pass:?}");
        // The third launch is running (at the gate) before the pause, not still queued: a
        // pause drops what is queued (see the next test), and a loaded machine may take long
        // to hand it to a worker.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while gated.in_flight() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the third launch never began"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(gated.observe_peak(), 6);
        // A pause during the wave holds it: what is under way finishes, nothing new starts.
        h.controller.db.pause("web", "test").unwrap();
        for _ in 0..5 {
            let (pass, took) = timed_pass(&mut h);
            gated.assert_still_stalled(took, &pass);
            assert_eq!(pass.launching, 3, "{pass:?}");
            assert!(pass.retired.is_empty(), "{pass:?}");
        }
        gated.let_through(usize::MAX);
        assert!(h.controller.launches.wait_idle(Duration::from_secs(10)));
        let (pass, _) = timed_pass(&mut h);
        assert_eq!(
            pass.launched.len(),
            3,
            "the wave's results are taken: {pass:?}"
        );
        assert_eq!(pass.launching, 0, "paused: nothing new starts: {pass:?}");
        let (pass, _) = timed_pass(&mut h);
        assert!(pass.launched.is_empty() && pass.launching == 0 && pass.retired.is_empty());
        h.controller.db.resume("web", "test").unwrap();
        converge_in_background(&mut h, &gated, 6);
        let now = h.running("web");
        assert_eq!(now.len(), 4);
        assert!(now.iter().all(|i| !old.contains(&i.id)));
        assert_eq!(h.outcome("web", 2), ReleaseOutcome::Complete);
    }

    /// A wave wider than the launch workers: a pause lets the launches already running finish
    /// and drops the ones still queued (they started anyway before, up to the whole surge).
    #[test]
    fn a_pause_drops_the_launches_a_wide_wave_still_has_queued() {
        let workers = launches::PARALLEL_LAUNCHES;
        let (mut h, gated) = gated_harness();
        let v1 = spec(serde_json::json!({
            "image": "web", "replicas": 20,
            "rollout": {"max_surge": 20, "max_unavailable": 0, "drain": "0s"}
        }));
        h.release("web", &v1, b"v1");
        converge_in_background(&mut h, &gated, 40);
        gated.close();
        h.release("web", &v1, b"v2");
        let (first, _) = timed_pass(&mut h);
        assert_eq!(first.launching, 20, "{first:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while gated.in_flight() < workers {
            assert!(std::time::Instant::now() < deadline, "the wave never began");
            std::thread::sleep(Duration::from_millis(1));
        }
        h.controller.db.pause("web", "test").unwrap();
        timed_pass(&mut h);
        gated.let_through(usize::MAX);
        assert!(h.controller.launches.wait_idle(Duration::from_secs(10)));
        let (pass, _) = timed_pass(&mut h);
        assert_eq!(pass.launched.len(), workers, "only those running: {pass:?}");
        assert_eq!(pass.launching, 0, "{pass:?}");
        assert_eq!(h.running("web").len(), 20 + workers);
        h.controller.db.resume("web", "test").unwrap();
        converge_in_background(&mut h, &gated, 40);
        assert_eq!(h.running("web").len(), 20);
    }

    /// Launches return one at a time, at random passes: at no moment the provider sees (each
    /// launch's start, each pass's end) are more than replicas + max_surge instances alive,
    /// launches under way included, and the rollout completes.
    #[test]
    fn background_launches_never_exceed_the_surge_at_any_moment() {
        let (mut h, gated) = gated_harness();
        let v1 = spec(serde_json::json!({
            "image": "web", "replicas": 5,
            "rollout": {"max_surge": 2, "max_unavailable": 1, "drain": "0s"}
        }));
        h.release("web", &v1, b"v1");
        converge_in_background(&mut h, &gated, 7);
        gated.close();
        h.release("web", &v1, b"v2");
        let mut x: u64 = now_ms() | 1;
        eprintln!("seed {x}");
        let mut passes = 0;
        loop {
            let (pass, took) = timed_pass(&mut h);
            gated.assert_still_stalled(took, &pass);
            let peak = gated.observe_peak();
            assert!(peak <= 7, "{peak} alive: {pass:?}");
            if pass.complete {
                break;
            }
            passes += 1;
            assert!(passes < 5000, "no convergence: {pass:?}");
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                gated.let_through(1);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(gated.observe_peak() <= 7);
        let now = h.running("web");
        assert_eq!(now.len(), 5);
    }

    /// A rollback during a wave: the abandoned release's launches start no more, and those
    /// under way are retired (draining) by the pass that first lists them, never probed; the
    /// rollback completes with none of them left.
    #[test]
    fn a_rollback_during_a_wave_retires_the_abandoned_launches_unrouted() {
        let (mut h, gated) = gated_harness();
        let v1 = spec(serde_json::json!({
            "image": "web", "replicas": 3,
            "rollout": {"max_surge": 3, "max_unavailable": 0, "drain": "0s"}
        }));
        h.release("web", &v1, b"v1");
        converge_in_background(&mut h, &gated, 6);
        let old: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        gated.close();
        h.release("web", &v1, b"v2");
        let (pass, _) = timed_pass(&mut h);
        assert_eq!(pass.launching, 3);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while gated.in_flight() < 3 {
            assert!(std::time::Instant::now() < deadline, "the wave never began");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (rollback, _) = h
            .controller
            .db
            .record_release("web", &v1, &Digest::of(b"v1"), "rollback", Some(1), "test")
            .unwrap();
        let (pass, took) = timed_pass(&mut h);
        gated.assert_still_stalled(took, &pass);
        assert!(
            !pass.complete,
            "launches of release 2 still under way: {pass:?}"
        );
        gated.let_through(usize::MAX);
        // After every pass, every launch of release 2 that had returned before it is retired
        // (draining, or its stop ended during the pass, which took the retired instance off
        // the draining list): none is ever a candidate for routing. (One returning during the
        // pass is still counted as under way, and judged by the next.)
        let v2 = Digest::of(b"v2");
        let mut passes = Vec::new();
        for _ in 0..2000 {
            let before = h.fake.list().unwrap();
            let (pass, _) = timed_pass(&mut h);
            assert!(gated.observe_peak() <= 6);
            let draining = h.controller.db.draining().unwrap();
            for i in before {
                assert!(
                    i.image != v2
                        || i.status != Status::Running
                        || draining.contains_key(&i.id)
                        || pass.stopped.contains(&i.id),
                    "{} of the abandoned release is listed and not retired: {pass:?}",
                    i.id
                );
                assert!(
                    i.image != v2 || !pass.routed.contains(&i.id),
                    "{} of the abandoned release is routed: {pass:?}",
                    i.id
                );
            }
            let done = pass.complete;
            passes.push(pass);
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(passes.last().is_some_and(|p| p.complete), "{passes:#?}");
        let abandoned: Vec<String> = h
            .controller
            .db
            .events(Some("web"), 0)
            .unwrap()
            .into_iter()
            .filter(|e| e.message.contains("no longer desired"))
            .filter_map(|e| e.message.split(' ').nth(1).map(str::to_owned))
            .collect();
        assert_eq!(
            abandoned.len(),
            3,
            "every launch under way was retired: {:#?} {passes:#?}",
            h.controller.db.events(Some("web"), 0).unwrap()
        );
        for pass in &passes {
            assert!(
                pass.launched.is_empty(),
                "no launch for the rollback: {pass:?}"
            );
        }
        let listed: Vec<String> = h.fake.list().unwrap().into_iter().map(|i| i.id).collect();
        assert!(
            abandoned.iter().all(|id| !listed.contains(id)),
            "the abandoned launches are removed: {listed:?}"
        );
        assert_eq!(
            h.running("web")
                .into_iter()
                .map(|i| i.id)
                .collect::<BTreeSet<_>>(),
            old
        );
        assert_eq!(h.outcome("web", rollback.number), ReleaseOutcome::Complete);
    }

    /// A provider whose stops and removals wait at a gate (a stop waiting out a grace period,
    /// a removal waiting on the kernel under load) until let through one at a time, or until
    /// `HELD_AT_MOST` has passed. `kill` makes every stop and removal waiting or to come fail
    /// without effect, as the threads of a controller killed with SIGKILL never finish theirs.
    /// Counts, per instance, the stops and removals that reached the fake.
    struct HeldStops {
        fake: Arc<FakeProvider>,
        gate: std::sync::Mutex<HeldGate>,
        opened: std::sync::Condvar,
    }

    #[derive(Default)]
    struct HeldGate {
        passes: usize,
        waiting: usize,
        killed: bool,
        stops: BTreeMap<String, usize>,
        removals: BTreeMap<String, usize>,
    }

    /// Long enough that a pass waiting for a held removal shows, short enough that a test of
    /// the old code (removals inside the pass) fails instead of hanging.
    const HELD_AT_MOST: Duration = Duration::from_secs(3);

    impl HeldStops {
        fn new(fake: &Arc<FakeProvider>, passes: usize) -> Arc<Altered<HeldStops>> {
            Altered::new(HeldStops {
                fake: fake.clone(),
                gate: std::sync::Mutex::new(HeldGate {
                    passes,
                    ..HeldGate::default()
                }),
                opened: std::sync::Condvar::new(),
            })
        }

        fn let_through(&self, n: usize) {
            self.gate.lock().unwrap().passes += n;
            self.opened.notify_all();
        }

        fn kill(&self) {
            self.gate.lock().unwrap().killed = true;
            self.opened.notify_all();
        }

        fn waiting(&self) -> usize {
            self.gate.lock().unwrap().waiting
        }

        /// Waits at the gate; false if killed meanwhile.
        fn pass_gate(&self) -> bool {
            let deadline = std::time::Instant::now() + HELD_AT_MOST;
            let mut gate = self.gate.lock().unwrap();
            gate.waiting += 1;
            while gate.passes == 0 && !gate.killed {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                gate = self.opened.wait_timeout(gate, left).unwrap().0;
            }
            gate.waiting -= 1;
            if gate.killed {
                return false;
            }
            gate.passes = gate.passes.saturating_sub(1);
            true
        }
    }

    impl Alter for HeldStops {
        fn fake(&self) -> &FakeProvider {
            &self.fake
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, imago_runtime::RuntimeError> {
            if !self.pass_gate() {
                return Err(imago_runtime::RuntimeError::StopTimeout {
                    id: id.to_owned(),
                    secs: 0,
                });
            }
            // Counted once it took effect: a test that waits for the count sees the exit.
            let stopped = self.fake.stop(id, grace);
            *self
                .gate
                .lock()
                .unwrap()
                .stops
                .entry(id.to_owned())
                .or_default() += 1;
            stopped
        }
        fn remove(&self, id: &str) -> Result<(), imago_runtime::RuntimeError> {
            if !self.pass_gate() {
                return Err(imago_runtime::RuntimeError::StopTimeout {
                    id: id.to_owned(),
                    secs: 0,
                });
            }
            let removed = self.fake.remove(id);
            if removed.is_ok() {
                *self
                    .gate
                    .lock()
                    .unwrap()
                    .removals
                    .entry(id.to_owned())
                    .or_default() += 1;
            }
            removed
        }
    }

    fn alive(fake: &FakeProvider, service: &str) -> usize {
        fake.list()
            .unwrap()
            .iter()
            .filter(|i| {
                i.is_active() && i.labels.get(LABEL_SERVICE).map(String::as_str) == Some(service)
            })
            .count()
    }

    /// "web" with `replicas` of release 1 over a [`HeldStops`] provider whose gate is closed,
    /// then release 2 recorded (drain 0 s, max_unavailable 0); returns release 1's instances.
    fn rolling_update_with_held_stops(
        replicas: u32,
        max_surge: u32,
    ) -> (Harness, Arc<Altered<HeldStops>>, BTreeSet<String>) {
        let mut h = harness();
        let held = HeldStops::new(&h.fake, 0);
        h.restart(held.clone());
        let v1 = spec(serde_json::json!({
            "image": "web", "replicas": replicas,
            "rollout": {"max_surge": max_surge, "max_unavailable": 0, "drain": "0s"}
        }));
        h.release("web", &v1, b"v1");
        h.converge("web", 10);
        let old: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        h.release("web", &v1, b"v2");
        (h, held, old)
    }

    /// Stops and removals that take long (held at a gate, let through one at a time at random
    /// passes) hold up no pass, and an instance being stopped still counts: at no pass's end
    /// are more than replicas + max_surge instances alive. Each old instance is stopped once
    /// and removed once, and none is left draining.
    #[test]
    fn stops_and_removals_run_beside_the_pass_and_count_against_the_surge() {
        let (mut h, held, old) = rolling_update_with_held_stops(4, 2);
        let mut x: u64 = now_ms() | 1;
        eprintln!("seed {x}");
        let mut most_held = 0;
        for round in 0.. {
            let started = std::time::Instant::now();
            let pass = h.pass().unwrap().remove(0);
            let took = started.elapsed();
            // A pass that waited for a stop it started would wait at the gate until the test
            // lets it through (never during a pass) or HELD_AT_MOST: the gate's hold, not a
            // guess at how long a pass takes on a loaded host, is what shows a wait.
            assert!(took < HELD_AT_MOST, "pass {round} took {took:?}");
            let alive = alive(&h.fake, "web");
            assert!(alive <= 6, "{alive} alive after pass {round}: {pass:?}");
            most_held = most_held.max(held.waiting());
            if pass.complete {
                break;
            }
            assert!(round < 5000, "no convergence: {pass:?}");
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Only what waits is let through: passes saved up would let a whole wave by.
            if x.is_multiple_of(3) && held.waiting() > 0 {
                held.let_through(1);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(most_held >= 2, "stops were never under way during a pass");
        let listed: Vec<String> = h.fake.list().unwrap().into_iter().map(|i| i.id).collect();
        assert!(old.iter().all(|id| !listed.contains(id)), "{listed:?}");
        assert_eq!(h.running("web").len(), 4);
        let gate = held.gate.lock().unwrap();
        for id in &old {
            assert_eq!(gate.stops.get(id), Some(&1), "stops of {id}");
            assert_eq!(gate.removals.get(id), Some(&1), "removals of {id}");
        }
        assert!(h.controller.db.draining().unwrap().is_empty());
    }

    /// The controller is killed (its stop threads never finish) after 0 to 6 of the stops and
    /// removals of a wave's three retired instances got through: a new controller over the same
    /// database stops only what still runs, once, removes the rest, and leaves nothing
    /// listed or draining.
    #[test]
    fn a_controller_killed_while_stops_are_under_way_finishes_them_after_restart() {
        for through in 0..=6 {
            let (mut h, held, old) = rolling_update_with_held_stops(3, 3);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while held.waiting() < 3 {
                assert!(std::time::Instant::now() < deadline, "no stops under way");
                h.pass().unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            held.let_through(through);
            // Let the calls let through reach the fake (a stop's removal then waits).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let gate = held.gate.lock().unwrap();
                let reached: usize =
                    gate.stops.values().sum::<usize>() + gate.removals.values().sum::<usize>();
                let settled = reached == through && gate.passes == 0;
                drop(gate);
                if settled {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{through}: stuck");
                std::thread::sleep(Duration::from_millis(1));
            }
            held.kill();
            let running_at_kill: BTreeSet<String> = h
                .fake
                .list()
                .unwrap()
                .into_iter()
                .filter(|i| old.contains(&i.id) && i.is_active())
                .map(|i| i.id)
                .collect();
            let after = HeldStops::new(&h.fake, usize::MAX);
            h.restart(after.clone());
            assert!(
                h.converge("web", 500).last().unwrap().complete,
                "{through}: not complete"
            );
            let listed: Vec<String> = h.fake.list().unwrap().into_iter().map(|i| i.id).collect();
            assert!(
                old.iter().all(|id| !listed.contains(id)),
                "{through}: left listed: {listed:?}"
            );
            assert!(
                h.controller.db.draining().unwrap().is_empty(),
                "{through}: left draining: {:?}",
                h.controller.db.draining().unwrap()
            );
            let gate = after.gate.lock().unwrap();
            let stopped_again: BTreeSet<String> = gate.stops.keys().cloned().collect();
            assert_eq!(
                stopped_again, running_at_kill,
                "{through}: the new controller stops exactly what still ran"
            );
            assert!(
                gate.stops.values().all(|n| *n == 1),
                "{through}: {:?}",
                gate.stops
            );
            assert_eq!(h.running("web").len(), 3);
        }
    }

    /// A provider whose removals fail while the flag is set (a cgroup the kernel keeps busy,
    /// say), counted; the last field goes into the error, to change it.
    struct FailingRemovals(
        Arc<FakeProvider>,
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicBool,
        std::sync::atomic::AtomicU64,
    );

    impl Alter for FailingRemovals {
        fn fake(&self) -> &FakeProvider {
            &self.0
        }
        fn remove(&self, id: &str) -> Result<(), imago_runtime::RuntimeError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.2.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(imago_runtime::RuntimeError::StopTimeout {
                    id: id.to_owned(),
                    secs: self.3.load(std::sync::atomic::Ordering::SeqCst),
                });
            }
            self.0.remove(id)
        }
    }

    /// Service web (1 replica, surge 1, no drain, `progress_deadline`) at release 1, then a
    /// controller whose removals fail, and release 2 recorded: the instance it retires cannot be
    /// removed.
    fn rollout_with_failing_removals(
        progress_deadline: &str,
    ) -> (Harness, Arc<Altered<FailingRemovals>>) {
        let mut h = harness();
        let v1 = spec(serde_json::json!({
            "image": "web", "replicas": 1,
            "rollout": {"max_surge": 1, "max_unavailable": 0, "drain": "0s",
                        "progress_deadline": progress_deadline}
        }));
        h.release("web", &v1, b"v1");
        h.converge("web", 10);
        let failing = Altered::new(FailingRemovals(
            h.fake.clone(),
            0.into(),
            true.into(),
            0.into(),
        ));
        h.restart(failing.clone());
        h.release("web", &v1, b"v2");
        (h, failing)
    }

    /// Lets the removals work: release 2 completes within `passes` passes, one instance left.
    fn completes_once_removals_work(h: &mut Harness, failing: &FailingRemovals, passes: usize) {
        failing.2.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(h.converge("web", passes).last().unwrap().complete);
        assert_eq!(
            h.controller
                .db
                .outcome_of("web", 2)
                .unwrap()
                .unwrap()
                .outcome,
            ReleaseOutcome::Complete
        );
        assert_eq!(h.fake.list().unwrap().len(), 1);
    }

    /// A removal that keeps failing is retried pass after pass and reported; removals under
    /// way in the background are progress, so the release is not failed (and rolled back) at
    /// its progress deadline for it, and completes once the removal works.
    #[test]
    fn a_removal_that_keeps_failing_is_retried_and_fails_no_release() {
        use std::sync::atomic::Ordering;
        let (mut h, failing) = rollout_with_failing_removals("300ms");
        // A slow run must not outlast FAILED_REMOVAL_HOLD (10 s): the release would complete
        // before the removal works, which the end of this test does not expect.
        h.controller.stops.failures.hold = Duration::from_secs(600);
        // 1 s at least (past the progress deadline three times over) and until the removal was
        // retried, however slow the passes are (60 s at most).
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(1) || failing.1.load(Ordering::SeqCst) < 2 {
            assert!(started.elapsed() < Duration::from_secs(60), "never retried");
            let pass = h.pass().unwrap().remove(0);
            assert!(pass.failed.is_none(), "{pass:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let events = h.controller.db.events(Some("web"), 0).unwrap();
        assert!(
            events.iter().any(|e| e.kind == "remove-failed"),
            "{events:#?}"
        );
        completes_once_removals_work(&mut h, &failing, 500);
    }

    /// An instance whose removal keeps failing is said once per distinct error, not once a
    /// pass (four events a second, for as long as it lasted), and its removal is retried after
    /// a growing delay, not every pass; meanwhile its rollout is not complete. Another error is
    /// said again, and once the removal works the release completes.
    #[test]
    fn a_removal_that_keeps_failing_is_said_once_per_error_and_retried_with_backoff() {
        use std::sync::atomic::Ordering;
        let (mut h, failing) = rollout_with_failing_removals("10m");
        // Past FAILED_REMOVAL_HOLD (10 s, another test's promise) the release would complete
        // with the removal still failing: a slow run of this test must not get there.
        h.controller.stops.failures.hold = Duration::from_secs(600);
        let said = |h: &Harness| -> Vec<String> {
            h.controller
                .db
                .events(Some("web"), 0)
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == "remove-failed")
                .map(|e| e.message)
                .collect()
        };
        // 2 s and 20 passes at least, however slow the passes are.
        let mut passes = 0;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(2) || passes < 20 {
            let pass = h.pass().unwrap().remove(0);
            assert!(
                !pass.complete,
                "complete while what it retired is not removed: {pass:?}"
            );
            passes += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        let elapsed = started.elapsed();
        let attempts = failing.1.load(Ordering::SeqCst);
        // Delays doubling from 100 ms: the n-th try comes 100 ms * (2^(n-1) - 1) after the
        // first at the earliest, so at most 2 + log2(elapsed / 100 ms + 1) tries in `elapsed`
        // (6 in 2 s); a retry every pass would make one a pass.
        let most = 2 + (elapsed.as_millis() / 100 + 1).ilog2() as usize;
        assert!(
            (2..=most).contains(&attempts),
            "retried after a growing delay: {attempts} removals in {passes} passes, {elapsed:?}"
        );
        assert_eq!(said(&h).len(), 1, "{:#?}", said(&h));

        // Another error: said once more.
        failing.3.store(7, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while said(&h).len() < 2 {
            assert!(std::time::Instant::now() < deadline, "{:#?}", said(&h));
            h.pass().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..50 {
            h.pass().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let messages = said(&h);
        assert_eq!(messages.len(), 2, "{messages:#?}");
        assert_ne!(messages[0], messages[1]);

        // The retry may be 3 s away by now.
        completes_once_removals_work(&mut h, &failing, 5000);
        assert_eq!(said(&h).len(), 2);
    }

    /// A removal that never works holds its rollout back only for a while: the release
    /// completes (it was running forever, its progress refreshed by the retries), the
    /// `remove-failed` event stands, the retries go on, and the instance is removed once its
    /// removal works.
    #[test]
    fn a_removal_that_never_works_does_not_keep_its_rollout_running() {
        use std::sync::atomic::Ordering;
        let (mut h, failing) = rollout_with_failing_removals("10m");
        h.controller.stops.failures.hold = Duration::from_millis(600);
        let started = std::time::Instant::now();
        let completed = loop {
            let pass = h.pass().unwrap().remove(0);
            assert!(pass.failed.is_none(), "{pass:?}");
            if pass.complete {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "still not complete: {pass:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            completed >= Duration::from_millis(600),
            "completed before the hold was over: {completed:?}"
        );
        let outcome = h.controller.db.outcome_of("web", 2).unwrap().unwrap();
        assert_eq!(outcome.outcome, ReleaseOutcome::Complete);
        assert_eq!(
            h.fake.list().unwrap().len(),
            2,
            "the retired one is not removed"
        );
        let events = h.controller.db.events(Some("web"), 0).unwrap();
        assert!(
            events.iter().any(|e| e.kind == "remove-failed"),
            "{events:#?}"
        );

        let attempts = failing.1.load(Ordering::SeqCst);
        failing.2.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.fake.list().unwrap().len() > 1 {
            assert!(std::time::Instant::now() < deadline, "never removed");
            h.pass().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            failing.1.load(Ordering::SeqCst) > attempts,
            "retried after completing"
        );
    }

    // ---- scale: what a pass costs at many instances -----------------------------------------

    /// A provider whose listing takes time in proportion to the instances it lists, as a real
    /// one's does (it looks at every record: 0.1-1 ms each on a loaded host), and counts its
    /// listings; its launches take `per_launch` each (a real one waits for its supervisor),
    /// and it records when launches were under way.
    struct CostlyListing {
        fake: Arc<FakeProvider>,
        per_instance: Duration,
        per_launch: Duration,
        listings: std::sync::atomic::AtomicUsize,
        launching: Mutex<Busy>,
    }

    /// Spans of time in which something was under way.
    #[derive(Default)]
    struct Busy {
        under_way: usize,
        since: Option<std::time::Instant>,
        spans: Vec<Span>,
    }

    type Span = (std::time::Instant, std::time::Instant);

    impl CostlyListing {
        fn new(
            fake: &Arc<FakeProvider>,
            per_instance: Duration,
            per_launch: Duration,
        ) -> Arc<Altered<CostlyListing>> {
            Altered::new(CostlyListing {
                fake: fake.clone(),
                per_instance,
                per_launch,
                listings: 0.into(),
                launching: Mutex::default(),
            })
        }

        fn listings(&self) -> usize {
            self.listings.load(std::sync::atomic::Ordering::SeqCst)
        }

        /// The spans in which launches were under way.
        fn launch_spans(&self) -> Vec<Span> {
            self.launching.lock().unwrap().spans.clone()
        }
    }

    impl Alter for CostlyListing {
        fn fake(&self) -> &FakeProvider {
            &self.fake
        }
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
            {
                let mut busy = self.launching.lock().unwrap();
                busy.under_way += 1;
                busy.since.get_or_insert_with(std::time::Instant::now);
            }
            std::thread::sleep(self.per_launch);
            let launched = self.fake.launch(spec);
            let mut busy = self.launching.lock().unwrap();
            busy.under_way -= 1;
            if busy.under_way == 0
                && let Some(since) = busy.since.take()
            {
                busy.spans.push((since, std::time::Instant::now()));
            }
            launched
        }
        fn list(&self) -> Result<Vec<Instance>, imago_runtime::RuntimeError> {
            self.listings
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let listed = self.fake.list()?;
            std::thread::sleep(self.per_instance * listed.len() as u32);
            Ok(listed)
        }
    }

    /// How a run of the daemon's loop went.
    struct Run {
        took: Duration,
        /// When each pass ran.
        passes: Vec<Span>,
        /// How long each wait after a pass lasted, from the end of the pass.
        waits: Vec<Duration>,
        /// Each pass's outcome for "web".
        seen: Vec<ServicePass>,
    }

    impl Run {
        fn in_passes(&self) -> Duration {
            self.passes.iter().map(|(a, b)| *b - *a).sum()
        }

        /// The time in passes that fell within `spans`.
        fn in_passes_during(&self, spans: &[Span]) -> Duration {
            let mut total = Duration::ZERO;
            for (pass_start, pass_end) in &self.passes {
                for (start, end) in spans {
                    let (from, to) = ((*pass_start).max(*start), (*pass_end).min(*end));
                    total += to.saturating_duration_since(from);
                }
            }
            total
        }
    }

    /// Runs "web" as the daemon does (a pass, then `wait_for_next_pass` with its default
    /// interval) until its rollout completes (`failed`: a failure is expected on the way).
    fn run_like_the_daemon(h: &mut Harness, limit: Duration, failed: bool) -> Run {
        let started = std::time::Instant::now();
        let mut run = Run {
            took: Duration::ZERO,
            passes: Vec::new(),
            waits: Vec::new(),
            seen: Vec::new(),
        };
        loop {
            let pass_started = std::time::Instant::now();
            let (pass, _) = timed_pass(h);
            let pass_ended = std::time::Instant::now();
            run.passes.push((pass_started, pass_ended));
            assert!(failed || pass.failed.is_none(), "{pass:?}");
            let complete = pass.complete;
            run.seen.push(pass);
            if complete {
                run.took = started.elapsed();
                return run;
            }
            assert!(
                started.elapsed() < limit,
                "not complete after {limit:?} ({} passes): {:?}",
                run.passes.len(),
                run.seen.last()
            );
            // The daemon's default interval (`imago serve --interval`).
            h.controller.wait_for_next_pass(Duration::from_millis(250));
            run.waits.push(pass_ended.elapsed());
        }
    }

    /// Service "web": 1,000 instances on the host network, checked every second, rolled 25% at
    /// a time; release 1 applied under the daemon's loop.
    fn a_thousand_instances(h: &mut Harness) -> ServiceSpec {
        let port = healthy_port();
        let web = spec(serde_json::json!({
            "image": "web", "replicas": 1000, "network": "host",
            "health": {"type": "tcp", "port": port, "interval": "1s"},
            "rollout": {"max_surge": "25%", "max_unavailable": 0, "drain": "0s"},
        }));
        h.release("web", &web, b"v1");
        run_like_the_daemon(h, Duration::from_secs(120), false);
        web
    }

    /// Every instance of "web" runs `image`, 1,000 of them.
    fn all_replaced_by(h: &Harness, image: &[u8]) {
        let left = h
            .fake
            .list()
            .unwrap()
            .into_iter()
            .filter(|i| i.image != Digest::of(image))
            .count();
        assert_eq!(left, 0, "{left} old instances left");
        assert_eq!(h.running("web").len(), 1000);
    }

    /// At 1,000 instances a pass took longer than the daemon's interval (250 ms), and the news
    /// that ends the wait early (every health check that flips, launches and stops that
    /// return) comes hundreds of times a wave: passes ran back to back for a whole rollover and
    /// took the CPU the rollout's own launches needed. Under the daemon's loop and interval, a
    /// rollover of 1,000 instances whose listing costs what a loaded host's does (200 us an
    /// instance) and whose launches take 40 ms each (8 at a time) spends at most about a third
    /// of the time its launches are under way in passes (with `PASS_GAP_FACTOR` 0, the loop
    /// before pacing: nearly all of it).
    #[test]
    fn a_thousand_instance_rollover_spends_a_bounded_share_of_its_launches_in_passes() {
        let mut h = harness();
        let costly = CostlyListing::new(
            &h.fake,
            Duration::from_micros(200),
            Duration::from_millis(40),
        );
        h.restart(costly.clone());
        let web = a_thousand_instances(&mut h);
        let launched_before = costly.launch_spans().len();
        h.release("web", &web, b"v2");
        let listed = costly.listings();
        let run = run_like_the_daemon(&mut h, Duration::from_secs(120), false);
        let listings = costly.listings() - listed;
        let launching: Vec<Span> = costly.launch_spans().split_off(launched_before);
        let launch_time: Duration = launching.iter().map(|(a, b)| *b - *a).sum();
        let share = run.in_passes_during(&launching).as_secs_f64() / launch_time.as_secs_f64();
        eprintln!(
            "rollover of 1,000: {:?}, {} passes ({listings} listings) taking {:?}; launches under way {launch_time:?}, {:.0}% of it in passes",
            run.took,
            run.passes.len(),
            run.in_passes(),
            share * 100.0
        );
        assert_eq!(listings, run.passes.len(), "one listing a pass");
        assert!(
            launch_time > Duration::from_secs(2),
            "the waves' launches took {launch_time:?}"
        );
        // A third, and some slack for the pass that starts a wave's launches.
        let ceiling = 0.45;
        assert!(
            share <= ceiling,
            "passes took {:.0}% of the time launches were under way ({} passes in {:?})",
            share * 100.0,
            run.passes.len(),
            run.took
        );
        all_replaced_by(&h, b"v2");
    }

    /// Pacing holds back the passes that would only look again while launches, stops and
    /// checks are under way; once the last of them returned, the rollover waits for nothing but
    /// a pass, and that pass comes at once. With free launches, stops and checks (the fake
    /// provider) and a listing of 200 us an instance, a rollover of 1,000 instances took
    /// 10-11 s paced against 4.3 s unpaced: every pass waited twice the last pass first, so
    /// about two thirds of the rollover went in waiting for nothing (twice its passes).
    /// Measured against its own passes (the load of a shared host changes within seconds), it
    /// now waits at most as long as its passes take: 5-47% of that in runs at load 6-24, the
    /// rest of the waiting being for health checks slowed by the load.
    #[test]
    fn a_rollover_waiting_only_for_passes_is_not_slowed_by_pacing() {
        let mut h = harness();
        let costly = CostlyListing::new(&h.fake, Duration::from_micros(200), Duration::ZERO);
        h.restart(costly.clone());
        let web = a_thousand_instances(&mut h);
        h.release("web", &web, b"v2");
        let run = run_like_the_daemon(&mut h, Duration::from_secs(120), false);
        all_replaced_by(&h, b"v2");
        let waiting = run.took.saturating_sub(run.in_passes());
        eprintln!(
            "rollover of 1,000: {:?}, {} passes taking {:?}, waiting {waiting:?}",
            run.took,
            run.passes.len(),
            run.in_passes(),
        );
        assert!(
            waiting <= run.in_passes(),
            "waited {waiting:?} of {:?} ({} passes)",
            run.took,
            run.passes.len()
        );
    }

    /// Within the pacing gap after a slow pass, a nudge (an `apply` or `rollback` through
    /// SIGURG, a failed check, an automatic rollback) starts the next pass at once: it waited
    /// out the gap, up to 5 s. News that comes once per instance waits out the gap while
    /// something is under way beside the loop, and no longer once nothing is. The gap counts
    /// from the end of the pass, not from the wait: what the daemon does in between (it logs
    /// every pass) is neither the pass nor added to the gap.
    #[test]
    fn within_the_pacing_gap_a_nudge_starts_the_next_pass_at_once() {
        let mut h = harness();
        let costly = CostlyListing::new(&h.fake, Duration::from_millis(300), Duration::ZERO);
        h.restart(costly.clone());
        let web = spec(serde_json::json!({"image": "web", "replicas": 1}));
        h.release("web", &web, b"v1");
        assert!(h.converge("web", 20).last().unwrap().complete);
        // Something under way beside the loop (a stop, say) until the third case ends it.
        h.controller.waker().begin();
        // What comes, how long the daemon logs before it waits, whether the pass is at once.
        type Case = (&'static str, fn(&Wake), Duration, bool);
        let cases: [Case; 7] = [
            ("a nudge", Wake::nudge, Duration::ZERO, true),
            // 200 ms of logging before the wait count towards the gap.
            ("a hint", Wake::hint, Duration::from_millis(200), false),
            (
                "the end of what was under way",
                |w| {
                    w.end(true);
                },
                Duration::ZERO,
                true,
            ),
            (
                "a known moment with nothing under way",
                |w| {
                    w.at(now_ms());
                },
                Duration::ZERO,
                true,
            ),
            (
                "a hint with nothing under way",
                Wake::hint,
                Duration::ZERO,
                false,
            ),
            (
                "something under way that failed",
                |w| {
                    w.begin();
                    w.end(false);
                },
                Duration::ZERO,
                false,
            ),
            (
                "no news (beyond the interval)",
                |_| {},
                Duration::ZERO,
                false,
            ),
        ];
        for (what, news, logging, at_once) in cases {
            h.controller.pass().unwrap();
            let (ended, took) = h.controller.last_pass.unwrap();
            assert!(took >= Duration::from_millis(300), "{took:?}");
            let wake = h.controller.waker();
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                news(&wake);
            });
            std::thread::sleep(logging);
            h.controller.wait_for_next_pass(Duration::from_millis(250));
            let waited = ended.elapsed();
            sender.join().unwrap();
            let gap = took * PASS_GAP_FACTOR;
            // At once: before the gap a pass of this length sets would have ended (the news
            // comes 50 ms after the pass; the gap is at least 600 ms and grows with the pass
            // on a loaded host, where a fixed 250 ms was missed by the wake-up alone).
            assert!(
                if at_once {
                    waited < gap
                } else {
                    waited >= gap && waited < gap + Duration::from_millis(200)
                },
                "{what} 50 ms after a pass of {took:?}: the next started {waited:?} after it"
            );
        }
    }

    /// A provider whose listing takes 200 ms and whose launches all fail.
    struct FailingLaunches(Arc<FakeProvider>);

    impl Alter for FailingLaunches {
        fn fake(&self) -> &FakeProvider {
            &self.0
        }
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
            Err(imago_runtime::RuntimeError::Supervisor {
                id: spec.labels[LABEL_REVISION].clone(),
                reason: "no supervisor to be had".to_owned(),
            })
        }
        fn list(&self) -> Result<Vec<Instance>, imago_runtime::RuntimeError> {
            std::thread::sleep(Duration::from_millis(200));
            self.0.list()
        }
    }

    /// A launch that keeps failing ends what was under way, but not well: the pass that asks
    /// for it again is paced like any other, never run back to back with the failures (the
    /// last launch worker's end would otherwise start the next pass at once, every time).
    #[test]
    fn a_launch_that_keeps_failing_is_asked_for_again_at_the_paced_rate() {
        let mut h = harness();
        h.restart(Altered::new(FailingLaunches(h.fake.clone())));
        let web = spec(serde_json::json!({"image": "web", "replicas": 2}));
        h.release("web", &web, b"v1");
        let mut waits = Vec::new();
        for _ in 0..4 {
            h.controller.pass().unwrap();
            let (ended, took) = h.controller.last_pass.unwrap();
            h.controller.wait_for_next_pass(Duration::from_millis(250));
            waits.push((ended.elapsed(), took));
        }
        let events = h.controller.db.events(Some("web"), 0).unwrap();
        let failed = events.iter().filter(|e| e.kind == "launch-failed").count();
        assert!(failed >= 2, "{events:#?}");
        for (waited, took) in waits {
            assert!(
                waited >= (took * PASS_GAP_FACTOR).max(Duration::from_millis(250)),
                "the next pass came {waited:?} after a pass of {took:?}"
            );
        }
    }

    /// A release whose new instance fails its health gate is rolled back without waiting for
    /// the pacing: the failed check, the rollback and every step after it start their pass at
    /// once, though each pass takes 300 ms (a gap of 600 ms or more each, before).
    #[test]
    fn an_automatic_rollback_is_not_held_back_by_the_pacing() {
        let mut h = harness();
        let costly = CostlyListing::new(&h.fake, Duration::from_millis(300), Duration::ZERO);
        h.restart(costly.clone());
        let good = spec(serde_json::json!({"image": "web", "replicas": 1}));
        h.release("web", &good, b"v1");
        run_like_the_daemon(&mut h, Duration::from_secs(30), false);
        let good_ids: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        // Its check can never pass: the fake instances have no process to enter.
        let bad = spec(serde_json::json!({"image": "web", "replicas": 1,
            "health": {"type": "command", "command": ["/bin/false"], "interval": "1s", "unhealthy_threshold": 1},
            "rollout": {"max_surge": 1, "max_unavailable": 0}}));
        h.release("web", &bad, b"v2");
        let started = std::time::Instant::now();
        let run = run_like_the_daemon(&mut h, Duration::from_secs(30), true);
        let took = started.elapsed();
        let failed = run.seen.iter().find(|p| p.failed.is_some()).unwrap();
        assert_eq!(failed.rolled_back_to, Some(1), "{failed:?}");
        let now: BTreeSet<String> = h.running("web").into_iter().map(|i| i.id).collect();
        assert_eq!(now, good_ids);
        let slowest = run.waits.iter().max().unwrap();
        assert!(
            *slowest < Duration::from_millis(250),
            "{} passes taking {:?} in {took:?}; waits {:?}",
            run.passes.len(),
            run.in_passes(),
            run.waits
        );
    }

    /// Retired instances that someone else removed (`imago destroy`, or a predecessor killed
    /// between a removal and recording it) are marked removed by the next pass in one commit:
    /// one each made a thousand commits, each waiting for the disk.
    #[test]
    fn a_thousand_retired_instances_removed_by_someone_else_cost_one_commit() {
        let mut h = harness();
        let web = spec(serde_json::json!({"image": "web", "replicas": 1000}));
        h.release("web", &web, b"v1");
        assert!(h.converge("web", 50).last().unwrap().complete);
        let running = h.running("web");
        assert_eq!(running.len(), 1000);
        let db = &h.controller.db;
        assert!(db.begin_batch().unwrap());
        for instance in &running {
            let revision = &instance.labels[LABEL_REVISION];
            db.mark_draining(&instance.id, "web", 1, revision, now_ms() + 3_600_000)
                .unwrap();
        }
        db.end_batch(true).unwrap();
        for instance in &running {
            h.fake.stop(&instance.id, Duration::ZERO).unwrap();
            h.fake.remove(&instance.id).unwrap();
        }
        let commits = h.controller.db.count_commits();
        h.controller.pass().unwrap();
        let commits = commits.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            h.controller.db.draining().unwrap().is_empty(),
            "still draining"
        );
        assert!(commits <= 5, "one pass made {commits} commits");
    }
}
