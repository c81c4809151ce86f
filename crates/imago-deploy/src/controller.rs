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
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use imago_runtime::balancer::ConnectBalancer;
use imago_runtime::{Engine, Instance, InstanceSpec, Provider, Status};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::drift::SpecJudge;
use crate::error::DeployError;
use crate::health::{HealthTracker, ProbeResult};
use crate::proxy::Routes;
use crate::rollout::{Counts, ObservedInstance, Phase, RolloutInput, Step, next_step};
use crate::spec::{Probe, Strategy};
use crate::state::{Release, RolloutRow, StateDb, now_ms};

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
    instance.network = spec.network;
    instance.seccomp = crate::spec::SeccompSetting::seccomp(spec.seccomp.as_ref())
        .map_err(|r| bad("seccomp", r))?;
    instance.engine = engine;
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

/// Health as probed for one instance.
#[derive(Debug, Clone, Default)]
struct InstanceHealth {
    tracker: HealthTracker,
    ready_since_ms: Option<u64>,
}

/// Lets the loop between passes end early when something a pass would act on has happened
/// (a health check flipped, a stop finished) or a known moment arrives (an instance's
/// min_ready elapses), instead of always sleeping a whole interval: every wave of a rollout
/// waits on several such moments. Only a hint: the pass still decides from observed state.
#[derive(Debug, Default)]
pub struct Wake {
    state: Mutex<WakeState>,
    signal: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct WakeState {
    nudged: bool,
    /// Unix ms of the earliest known moment a pass should run.
    at_ms: Option<u64>,
}

impl Wake {
    fn lock(&self) -> MutexGuard<'_, WakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Something changed: run the next pass now.
    pub fn nudge(&self) {
        self.lock().nudged = true;
        self.signal.notify_all();
    }

    /// Run a pass no later than `at_ms`.
    fn at(&self, at_ms: u64) {
        let mut state = self.lock();
        state.at_ms = Some(state.at_ms.map_or(at_ms, |t| t.min(at_ms)));
    }

    /// Waits up to `timeout`, or until nudged or a registered moment arrives. The interval is
    /// measured on the monotonic clock: whole wall-clock milliseconds ended it up to 1 ms early
    /// (and a clock step could end it at once).
    pub fn wait(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let mut remaining = deadline.saturating_duration_since(std::time::Instant::now());
            if let Some(at) = state.at_ms {
                // Unix milliseconds, truncated: waiting the difference never ends before `at`.
                remaining = remaining.min(Duration::from_millis(at.saturating_sub(now_ms())));
            }
            if state.nudged || remaining.is_zero() {
                state.nudged = false;
                state.at_ms = None;
                return;
            }
            state = self
                .signal
                .wait_timeout(state, remaining)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Probe results shared between the probe tasks (writers) and the controller (reader).
#[derive(Debug, Clone, Default)]
pub struct HealthBoard {
    inner: Arc<Mutex<HashMap<String, InstanceHealth>>>,
    wake: Arc<Wake>,
}

impl HealthBoard {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, InstanceHealth>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(
        &self,
        id: &str,
        result: ProbeResult,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
        in_start_period: bool,
    ) {
        let mut board = self.lock();
        let entry = board.entry(id.to_owned()).or_default();
        let before = (entry.tracker.healthy, entry.tracker.unhealthy);
        entry.tracker.record(
            result,
            healthy_threshold,
            unhealthy_threshold,
            in_start_period,
        );
        if entry.tracker.healthy && !before.0 {
            entry.ready_since_ms = Some(now_ms());
        }
        if !entry.tracker.healthy {
            entry.ready_since_ms = None;
        }
        let changed = before != (entry.tracker.healthy, entry.tracker.unhealthy);
        drop(board);
        if changed {
            self.wake.nudge();
        }
    }

    fn get(&self, id: &str) -> Option<InstanceHealth> {
        self.lock().get(id).cloned()
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// A service's endpoint as the controller keeps it.
pub struct Endpoint {
    pub port: u16,
    pub routes: Routes,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// What one pass did for one service; the controller's log and the tests read it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServicePass {
    pub service: String,
    pub release: Option<u64>,
    pub launched: Vec<String>,
    pub retired: Vec<String>,
    pub stopped: Vec<String>,
    pub removed_dead: Vec<String>,
    pub drift: Vec<String>,
    pub routed: Vec<String>,
    pub counts: Counts,
    pub complete: bool,
    pub failed: Option<String>,
    pub rolled_back_to: Option<u64>,
}

/// A stop running beside the reconcile loop.
struct StopTask {
    thread: std::thread::JoinHandle<()>,
    /// Set when the provider's stop returned.
    ended: Arc<std::sync::OnceLock<std::time::Instant>>,
}

pub struct Controller {
    db: StateDb,
    provider: Arc<dyn Provider>,
    runtime: tokio::runtime::Handle,
    health: HealthBoard,
    probes: HashMap<String, JoinHandle<()>>,
    endpoints: BTreeMap<String, Endpoint>,
    /// Routes of endpoints closed (the service stopped publishing a port) while connections
    /// were still open on them: drains keep counting those connections until they end.
    closed_routes: BTreeMap<String, Routes>,
    engine: Engine,
    actor: String,
    /// Endpoint addresses are bound on this IP.
    bind: IpAddr,
    /// Unknown instances already reported, so the event log is not flooded.
    reported_unknown: BTreeSet<String>,
    /// Instances whose passing health check was already recorded as an event (again after a
    /// restart, which is harmless: the event says what was observed).
    announced_ready: BTreeSet<String>,
    /// Instances whose drift was already recorded as an event: a drifted instance may serve for
    /// many passes until its replacement is ready, and one event says it.
    announced_drift: BTreeSet<String>,
    /// Stops started by this controller (each takes up to the instance's grace period).
    stopping: HashMap<String, StopTask>,
    /// When this pass listed the instances: a stop that ended after it may not show yet.
    listed_at: std::time::Instant,
    /// The rootfs cache to check for modifications, and how often.
    rootfs: Option<(imago_runtime::RootfsCache, Duration)>,
    last_rootfs_check: Option<std::time::Instant>,
    /// Images whose unpacked tree was found modified, and when: instances created before that
    /// run from the modified tree. Read from the database each pass (`imago drift` records
    /// there too).
    tainted: HashMap<imago_oci::Digest, u64>,
    /// Modified images whose tree could not be set aside, already reported.
    set_aside_failed: BTreeSet<imago_oci::Digest>,
    /// Connect-time balancing in the kernel for clients on this host (they then connect to a
    /// routed instance directly, without the proxy hop); `None` leaves every connection to the
    /// endpoint proxy. Dropped, it detaches from the kernel.
    balancer: Option<ConnectBalancer>,
    /// Backend addresses the balancer routes or that still drain, gathered over one pass: the
    /// peer-address rewrite of any other is forgotten at the end of the pass.
    balanced_peers: BTreeSet<SocketAddrV4>,
}

impl Controller {
    /// Sleeps until the next pass is due: at most `interval`, less when something changed.
    pub fn wait_for_next_pass(&self, interval: Duration) {
        self.health.wake.wait(interval);
    }

    pub fn new(
        db: StateDb,
        provider: Arc<dyn Provider>,
        runtime: tokio::runtime::Handle,
        engine: Engine,
    ) -> Controller {
        Controller {
            db,
            provider,
            runtime,
            health: HealthBoard::default(),
            probes: HashMap::new(),
            endpoints: BTreeMap::new(),
            closed_routes: BTreeMap::new(),
            engine,
            actor: "controller".into(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            reported_unknown: BTreeSet::new(),
            announced_ready: BTreeSet::new(),
            announced_drift: BTreeSet::new(),
            stopping: HashMap::new(),
            listed_at: std::time::Instant::now(),
            rootfs: None,
            last_rootfs_check: None,
            tainted: HashMap::new(),
            set_aside_failed: BTreeSet::new(),
            balancer: None,
            balanced_peers: BTreeSet::new(),
        }
    }

    /// Balances the endpoints' new connections from clients on this host in the kernel
    /// ([`ConnectBalancer`]): they reach a routed instance directly. The endpoint proxy keeps
    /// listening and takes every connection the kernel does not balance (from other network
    /// namespaces, to IPv6 targets, or to services with more than
    /// [`imago_runtime::balancer::MAX_BACKENDS`] routed instances), and drains count the
    /// balanced connections from the kernel's socket table.
    pub fn with_kernel_balancing(mut self, balancer: ConnectBalancer) -> Controller {
        self.balancer = Some(balancer);
        self
    }

    /// Whether the kernel balances this host's connections (see [`Self::with_kernel_balancing`]).
    pub fn kernel_balancing(&self) -> bool {
        self.balancer.is_some()
    }

    /// The address clients on this host use for an endpoint on `port`, if the kernel can balance
    /// it: the bind address, or loopback for the wildcard.
    fn balanced_address(&self, port: u16) -> Option<SocketAddrV4> {
        match self.bind {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
            }
            IpAddr::V4(ip) => Some(SocketAddrV4::new(ip, port)),
            IpAddr::V6(_) => None,
        }
    }

    /// Points the kernel's balancing of `service`'s endpoint at `targets`. A kernel error turns
    /// kernel balancing off for good (every connection then goes through the proxy, which is
    /// always right), rather than leave a stale backend list in the kernel.
    fn balance(
        &mut self,
        service: &str,
        port: u16,
        targets: &[(String, SocketAddr)],
    ) -> Result<(), DeployError> {
        let (Some(balancer), Some(address)) = (&self.balancer, self.balanced_address(port)) else {
            return Ok(());
        };
        let backends: Vec<SocketAddrV4> = targets
            .iter()
            .filter_map(|(_, a)| match a {
                SocketAddr::V4(a) => Some(*a),
                SocketAddr::V6(_) => None,
            })
            .collect();
        // A target the kernel cannot reach (IPv6) must not lose its share: leave it to the proxy.
        let backends = if backends.len() == targets.len() {
            backends
        } else {
            Vec::new()
        };
        self.balanced_peers.extend(backends.iter().copied());
        if let Err(e) = balancer.set(address, &backends) {
            self.kernel_balancing_failed(Some(service), &e)?;
        }
        Ok(())
    }

    /// Stops the kernel's balancing of an endpoint port that is closing.
    fn unbalance(&mut self, service: &str, port: u16) -> Result<(), DeployError> {
        let (Some(balancer), Some(address)) = (&self.balancer, self.balanced_address(port)) else {
            return Ok(());
        };
        if let Err(e) = balancer.remove(address) {
            self.kernel_balancing_failed(Some(service), &e)?;
        }
        Ok(())
    }

    fn kernel_balancing_failed(
        &mut self,
        service: Option<&str>,
        e: &imago_runtime::balancer::BalancerError,
    ) -> Result<(), DeployError> {
        self.balancer = None;
        self.db.event(
            service,
            "endpoint",
            &format!("kernel balancing turned off after an error ({e}): every connection now goes through the endpoint proxies"),
            &self.actor,
        )
    }

    /// Open connections to draining instances that the kernel balanced (counted from the host's
    /// socket table, so they include the proxy's own connections to them). An instance whose
    /// count cannot be read counts as open: its drain then ends at its deadline.
    fn kernel_open_connections(
        &self,
        addresses: &BTreeMap<String, SocketAddrV4>,
    ) -> HashMap<String, usize> {
        if self.balancer.is_none() || addresses.is_empty() {
            return HashMap::new();
        }
        let addrs: Vec<SocketAddrV4> = addresses.values().copied().collect();
        match imago_runtime::balancer::open_connections(&addrs) {
            Ok(counts) => addresses.keys().cloned().zip(counts).collect(),
            Err(_) => addresses.keys().map(|id| (id.clone(), 1)).collect(),
        }
    }

    /// Checks the unpacked images of running instances for modifications every `every`
    /// (a metadata pass; `imago drift --deep` hashes contents).
    pub fn with_rootfs_checks(
        mut self,
        cache: imago_runtime::RootfsCache,
        every: Duration,
    ) -> Controller {
        self.rootfs = Some((cache, every));
        self
    }

    fn check_rootfs(&mut self, instances: &[Instance]) -> Result<(), DeployError> {
        let Some((cache, every)) = &self.rootfs else {
            return Ok(());
        };
        if self.last_rootfs_check.is_some_and(|t| t.elapsed() < *every) {
            return Ok(());
        }
        self.last_rootfs_check = Some(std::time::Instant::now());
        let digests: BTreeSet<&imago_oci::Digest> = instances
            .iter()
            .filter(|i| i.is_active() && i.labels.contains_key(LABEL_SERVICE))
            .map(|i| &i.image)
            .collect();
        let mut failed = Vec::new();
        for digest in digests {
            let problems = cache
                .verify(digest, false)
                .map_err(|e| DeployError::Runtime(e.to_string()))?;
            if problems.is_empty() {
                continue;
            }
            // A tree that cannot be moved must not stop the reconciling of every service: its
            // instances are replaced anyway (the taint is recorded first). Said once.
            match set_aside_modified(cache, &self.db, digest, false, &self.actor) {
                Ok(_) => {
                    self.set_aside_failed.remove(digest);
                }
                Err(e) => failed.push((digest.clone(), e)),
            }
        }
        for (digest, e) in failed {
            if self.set_aside_failed.insert(digest.clone()) {
                self.db.event(
                    None,
                    "drift",
                    &format!("cannot set the modified unpacked image {digest} aside: {e}; retrying every check"),
                    &self.actor,
                )?;
            }
        }
        Ok(())
    }

    pub fn db(&self) -> &StateDb {
        &self.db
    }

    pub fn endpoint(&self, service: &str) -> Option<&Endpoint> {
        self.endpoints.get(service)
    }

    /// One reconcile pass over every service.
    pub fn pass(&mut self) -> Result<Vec<ServicePass>, DeployError> {
        self.listed_at = std::time::Instant::now();
        let instances = self
            .provider
            .list()
            .map_err(|e| DeployError::Runtime(e.to_string()))?;
        let draining = self.db.draining()?;
        self.check_rootfs(&instances)?;
        self.tainted = self.db.tainted()?;
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
        let mut passes = Vec::new();
        for (service, destroyed) in &services {
            let own: Vec<&Instance> = instances
                .iter()
                .filter(|i| {
                    i.labels.get(LABEL_SERVICE).map(String::as_str) == Some(service.as_str())
                })
                .collect();
            let pass = if *destroyed {
                self.tear_down(service, &own)?
            } else {
                self.reconcile(service, &own, &draining)?
            };
            passes.push(pass);
        }
        // Instances launched in this pass were not listed at its start, but are live: aborting
        // their first probe would only waste it.
        let live: BTreeSet<&str> = instances
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
        if let Some(Err(e)) = self.balancer.as_ref().map(|b| b.keep_peers(&peers)) {
            self.kernel_balancing_failed(None, &e)?;
        }
        self.probes.retain(|id, task| {
            let keep = live.contains(id.as_str());
            if !keep {
                task.abort();
            }
            keep
        });
        self.announced_ready.retain(|id| live.contains(id.as_str()));
        self.announced_drift.retain(|id| live.contains(id.as_str()));
        // Stops of instances someone else removed meanwhile (`imago destroy`) are over.
        let listed: BTreeSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        self.stopping.retain(|id, _| listed.contains(id.as_str()));
        Ok(passes)
    }

    fn report_unknown(
        &mut self,
        instances: &[Instance],
        known: &BTreeSet<&str>,
        destroyed: &BTreeSet<&str>,
    ) -> Result<(), DeployError> {
        for instance in instances.iter().filter(|i| i.is_active()) {
            let label = instance.labels.get(LABEL_SERVICE);
            let unknown = match label {
                None => true,
                Some(service) => {
                    !known.contains(service.as_str()) && !destroyed.contains(service.as_str())
                }
            };
            if unknown && self.reported_unknown.insert(instance.id.clone()) {
                let what = match label {
                    None => "was not launched by a deployment".to_string(),
                    Some(s) => format!("claims service {s}, which is not deployed"),
                };
                self.db.event(
                    None,
                    "drift",
                    &format!(
                        "unknown instance {} ({}) {what}",
                        instance.id, instance.image
                    ),
                    &self.actor,
                )?;
            }
        }
        Ok(())
    }

    /// Stops every instance of a destroyed service and closes its endpoint. Stops run beside the
    /// loop (each takes up to the instance's grace period), so a pass never waits for one; a
    /// later pass removes what has exited. Only the database says the service is destroyed, so a
    /// restarted controller finishes a tear-down it did not start.
    fn tear_down(&mut self, service: &str, own: &[&Instance]) -> Result<ServicePass, DeployError> {
        let mut pass = ServicePass {
            service: service.to_owned(),
            ..ServicePass::default()
        };
        if let Some(closed) = self.endpoints.remove(service) {
            self.unbalance(service, closed.port)?;
        }
        for instance in own {
            if self.stop_pending(&instance.id) {
                // Its stop is under way: nothing to look up or decide until it ends.
                continue;
            }
            if instance.is_active() {
                let grace = stop_grace(&self.db, service, instance)?;
                self.stop_in_background(&instance.id, grace);
                continue;
            }
            self.stopping.remove(&instance.id);
            // `imago destroy` may be removing the same instances right now: a failure here is
            // retried on the next pass, and must not hold up the other services.
            match self.remove_instance(&instance.id) {
                Ok(()) => pass.stopped.push(instance.id.clone()),
                Err(e) => self.db.event(
                    Some(service),
                    "destroy",
                    &format!("cannot remove {} yet: {e}", instance.id),
                    &self.actor,
                )?,
            }
        }
        Ok(pass)
    }

    /// Starts stopping `id` on a side thread unless a stop of it is still in progress. A stop
    /// that ended without the instance exiting (it raced a launcher, say) is simply started
    /// again by a later pass.
    fn stop_in_background(&mut self, id: &str, grace: Duration) {
        if self.stop_pending(id) {
            return;
        }
        let provider = self.provider.clone();
        let stop_id = id.to_owned();
        let wake = self.health.wake.clone();
        let ended = Arc::new(std::sync::OnceLock::new());
        let ended_at = ended.clone();
        let thread = std::thread::spawn(move || {
            let _ = provider.stop(&stop_id, grace);
            let _ = ended_at.set(std::time::Instant::now());
            wake.nudge();
        });
        self.stopping
            .insert(id.to_owned(), StopTask { thread, ended });
    }

    /// Whether a stop of `id` is still running, or ended after this pass listed the instances
    /// (the listing may then still show the instance running, and a second stop would be
    /// started for nothing). A stop whose thread ended without an end time panicked: it is
    /// over, and the instance may be stopped again.
    fn stop_pending(&self, id: &str) -> bool {
        self.stopping.get(id).is_some_and(|task| {
            !task.thread.is_finished()
                || task
                    .ended
                    .get()
                    .is_some_and(|ended| *ended >= self.listed_at)
        })
    }

    /// Records a drift event for `id`, once per instance (per controller run).
    fn announce_drift(
        &mut self,
        service: &str,
        id: &str,
        message: &str,
    ) -> Result<(), DeployError> {
        if self.announced_drift.insert(id.to_owned()) {
            self.db
                .event(Some(service), "drift", message, &self.actor)?;
        }
        Ok(())
    }

    fn remove_instance(&mut self, id: &str) -> Result<(), DeployError> {
        match self.provider.remove(id) {
            Ok(()) | Err(imago_runtime::RuntimeError::NoSuchInstance(_)) => {}
            Err(e) => return Err(DeployError::Runtime(e.to_string())),
        }
        self.health.forget(id);
        if let Some(task) = self.probes.remove(id) {
            task.abort();
        }
        self.db.mark_removed(id)
    }

    fn reconcile(
        &mut self,
        service: &str,
        own: &[&Instance],
        draining: &BTreeMap<String, u64>,
    ) -> Result<ServicePass, DeployError> {
        let mut pass = ServicePass {
            service: service.to_owned(),
            ..ServicePass::default()
        };
        let Some(release) = self.db.desired(service)? else {
            return Ok(pass);
        };
        pass.release = Some(release.number);
        let mut limits = release.spec.validate(service)?;
        // The rollback fast path: a release that restores a known-good one replaces everything in
        // one health-gated wave (surge = replicas) with no min_ready wait. The old release's
        // instances keep serving until the restored ones pass their checks.
        let fast_path = release.rollback_of.is_some();
        if fast_path {
            limits.max_surge = limits.max_surge.max(limits.replicas);
        }
        let expected = instance_spec(&release, self.engine)?;
        let now = now_ms();
        self.ensure_endpoint(service, &release)?;

        // Observe. Each instance is judged by the health check of the release it runs.
        let by_id: HashMap<&str, &Instance> = own.iter().map(|i| (i.id.as_str(), *i)).collect();
        let mut releases: HashMap<String, Option<Release>> = HashMap::new();
        releases.insert(release.revision.clone(), Some(release.clone()));
        for instance in own {
            let label = instance
                .labels
                .get(LABEL_REVISION)
                .map(String::as_str)
                .unwrap_or_default();
            if !releases.contains_key(label) {
                let found = self.db.release_with_revision(service, label)?;
                releases.insert(label.to_owned(), found);
            }
        }
        let mut observed = Vec::with_capacity(own.len());
        let mut judge = SpecJudge::new(release.clone());
        for instance in own {
            let revision = instance
                .labels
                .get(LABEL_REVISION)
                .cloned()
                .unwrap_or_default();
            let own_release: &Release = releases
                .get(&revision)
                .and_then(Option::as_ref)
                .unwrap_or(&release);
            let mut revision_seen = revision.clone();
            let mut drifted = false;
            if let Some(when) = self.tainted.get(&instance.image)
                && instance.created_ms <= *when
                && instance.is_active()
            {
                // Its root filesystem was modified after unpacking: replace it.
                revision_seen = format!("modified-{}", instance.id);
                drifted = true;
                if !draining.contains_key(&instance.id) {
                    let message = format!(
                        "instance {} runs from a modified copy of {}: replacing it",
                        instance.id, instance.image
                    );
                    self.announce_drift(service, &instance.id, &message)?;
                    pass.drift.push(message);
                }
            } else if revision == release.revision
                && instance.is_active()
                && let Some(wrong) = judge.judge(instance)?
            {
                // Labelled as the desired revision but running something else: drift.
                revision_seen = format!("drifted-{}", instance.id);
                drifted = true;
                let message = format!(
                    "instance {} runs {} with spec {}, but release {} wants {} with spec {}: replacing it",
                    instance.id,
                    wrong.image,
                    wrong.spec_hash,
                    wrong.release,
                    wrong.wanted_image,
                    wrong.wanted_spec_hash
                );
                if !draining.contains_key(&instance.id) {
                    self.announce_drift(service, &instance.id, &message)?;
                    pass.drift.push(message);
                }
            }
            let phase = match instance.status {
                Status::Exited | Status::Failed | Status::Lost => Phase::Exited,
                Status::Created | Status::Running => self.phase_of(instance, own_release),
            };
            if matches!(phase, Phase::Ready { .. })
                && own_release.spec.health.is_some()
                && !draining.contains_key(&instance.id)
                && self.announced_ready.insert(instance.id.clone())
            {
                // Recorded before the endpoint can route to it, so the log shows that every
                // instance that served passed its check first.
                self.db.event(
                    Some(service),
                    "ready",
                    &format!(
                        "instance {} (release {}) passes its health check",
                        instance.id, own_release.number
                    ),
                    &self.actor,
                )?;
            }
            observed.push(ObservedInstance {
                id: instance.id.clone(),
                revision: revision_seen,
                phase,
                draining: draining.contains_key(&instance.id),
                drifted,
            });
            if instance.status == Status::Running && !draining.contains_key(&instance.id) {
                self.ensure_probe(instance, own_release);
            }
        }
        let outcome = self.db.outcome_of(service, release.number)?;
        let failed_already = outcome.as_ref().is_some_and(|o| o.outcome == "failed");
        let min_ready = if fast_path {
            Duration::ZERO
        } else {
            release.spec.rollout.min_ready
        };
        // The next pass should come when a ready instance becomes available.
        let min_ready_ms = min_ready.as_millis() as u64;
        if let Some(at) = observed
            .iter()
            .filter_map(|o| match o.phase {
                Phase::Ready { since_ms } => Some(since_ms.saturating_add(min_ready_ms)),
                _ => None,
            })
            .filter(|at| *at > now)
            .min()
        {
            self.health.wake.at(at);
        }
        let mut step = next_step(RolloutInput {
            limits,
            strategy: release.spec.rollout.strategy,
            min_ready,
            now_ms: now,
            target: &release.revision,
            instances: &observed,
        });
        if failed_already {
            // A failed release that could not be rolled back: hold still, keep serving what runs.
            step.launch = 0;
            step.retire.retain(|id| {
                observed.iter().any(|o| {
                    &o.id == id && o.phase == Phase::Unhealthy && o.revision == release.revision
                })
            });
        }

        // Act: clean up the dead (replace, don't repair).
        for id in &step.remove_dead {
            if draining.contains_key(id) {
                // A retired instance that finished stopping: the drain loop below records it.
                continue;
            }
            let instance = by_id.get(id.as_str()).copied();
            let detail = instance.map(describe_exit).unwrap_or_default();
            let message = format!("instance {id} {detail}: removing it");
            self.db
                .event(Some(service), "drift", &message, &self.actor)?;
            pass.drift.push(message);
            self.remove_instance(id)?;
            pass.removed_dead.push(id.clone());
        }
        if release.spec.rollout.strategy == Strategy::BlueGreen {
            let old_set: Vec<&str> = step
                .retire
                .iter()
                .filter(|id| !draining.contains_key(*id))
                .filter(|id| {
                    observed.iter().any(|o| {
                        &o.id == *id
                            && o.revision != release.revision
                            && o.phase != Phase::Unhealthy
                    })
                })
                .map(String::as_str)
                .collect();
            if !old_set.is_empty() {
                self.db.event(
                    Some(service),
                    "switch",
                    &format!(
                        "blue-green: all traffic switches to release {} ({}); draining the old set ({})",
                        release.number,
                        step.route_to.join(", "),
                        old_set.join(", ")
                    ),
                    &self.actor,
                )?;
            }
        }
        // Retire: out of the endpoint now, stopped once drained.
        let deadline = now + release.spec.rollout.drain.as_millis() as u64;
        for id in &step.retire {
            if draining.contains_key(id) {
                continue;
            }
            let revision = by_id
                .get(id.as_str())
                .and_then(|i| i.labels.get(LABEL_REVISION).cloned())
                .unwrap_or_default();
            let release_no = releases
                .get(&revision)
                .and_then(Option::as_ref)
                .map_or(0, |r| r.number);
            self.db
                .mark_draining(id, service, release_no, &revision, deadline)?;
            if let Some(health) = self.health.get(id).filter(|h| h.tracker.unhealthy) {
                let why = health.tracker.last_failure.unwrap_or_default();
                self.db.event(
                    Some(service),
                    "unhealthy",
                    &format!("instance {id} is unhealthy ({why}): replacing it"),
                    &self.actor,
                )?;
            } else {
                self.db.event(
                    Some(service),
                    "retire",
                    &format!("instance {id} (release {release_no}) retired: draining"),
                    &self.actor,
                )?;
            }
            pass.retired.push(id.clone());
        }
        // Stop what has drained (or ran out of drain time). Stopping takes up to the grace
        // period, so it runs beside the loop; the instance still counts (it still holds its
        // resources) until it has exited and is removed.
        // Connections the kernel balanced to a draining instance bypass the proxy's counts: they
        // are counted from the host's socket table, one dump for all of them.
        let mut drain_addresses = BTreeMap::new();
        for id in draining.keys() {
            let Some(instance) = by_id.get(id.as_str()).copied() else {
                continue;
            };
            let own_release = instance
                .labels
                .get(LABEL_REVISION)
                .and_then(|r| releases.get(r))
                .and_then(Option::as_ref)
                .unwrap_or(&release);
            if let Some(SocketAddr::V4(addr)) = self.address_of(instance, own_release) {
                drain_addresses.insert(id.clone(), addr);
            }
        }
        let kernel_open = self.kernel_open_connections(&drain_addresses);
        self.balanced_peers
            .extend(drain_addresses.values().copied());
        for (id, drain_deadline) in draining {
            let Some(instance) = by_id.get(id.as_str()).copied() else {
                // Not this service's, or already gone (stopped just before a crash).
                continue;
            };
            if !instance.is_active() {
                self.stopping.remove(id);
                self.remove_instance(id)?;
                self.db.event(
                    Some(service),
                    "stop",
                    &format!("instance {id} drained and stopped"),
                    &self.actor,
                )?;
                pass.stopped.push(id.clone());
                continue;
            }
            let routes = self
                .endpoints
                .get(service)
                .map(|e| &e.routes)
                .or_else(|| self.closed_routes.get(service));
            let open = routes.map_or(0, |r| r.active_connections(id))
                + kernel_open.get(id).copied().unwrap_or(0);
            if open == 0 || now >= *drain_deadline {
                // The grace period the instance was launched with, not the new release's.
                let grace = instance
                    .labels
                    .get(LABEL_REVISION)
                    .and_then(|r| releases.get(r))
                    .and_then(Option::as_ref)
                    .map_or(release.spec.stop_grace_period, |r| r.spec.stop_grace_period);
                self.stop_in_background(id, grace);
            }
        }
        // Launch.
        for _ in 0..step.launch {
            match self.provider.launch(&expected) {
                Ok(instance) => {
                    self.db.event(
                        Some(service),
                        "launch",
                        &format!(
                            "instance {} launched for release {} ({})",
                            instance.id, release.number, release.image_digest
                        ),
                        &self.actor,
                    )?;
                    self.ensure_probe(&instance, &release);
                    pass.launched.push(instance.id);
                }
                Err(e) => {
                    self.db.event(
                        Some(service),
                        "launch-failed",
                        &format!("launch for release {} failed: {e}", release.number),
                        &self.actor,
                    )?;
                    break;
                }
            }
        }
        // Route.
        let targets: Vec<(String, SocketAddr)> = step
            .route_to
            .iter()
            .filter_map(|id| by_id.get(id.as_str()).copied())
            .filter_map(|i| self.address_of(i, &release).map(|a| (i.id.clone(), a)))
            .collect();
        if let Some(endpoint) = self.endpoints.get(service) {
            endpoint.routes.set(&targets);
            let port = endpoint.port;
            self.balance(service, port, &targets)?;
        }
        pass.routed = targets.into_iter().map(|(id, _)| id).collect();
        pass.counts = step.counts;
        pass.complete = step.complete && pass.launched.is_empty();
        self.track_progress(
            service,
            &release,
            &step,
            &observed,
            own,
            outcome.is_some(),
            &mut pass,
        )?;
        Ok(pass)
    }

    fn phase_of(&self, instance: &Instance, release: &Release) -> Phase {
        let started = instance.started_ms.unwrap_or(instance.created_ms);
        if release.spec.health.is_none() {
            // Without a health check, a running process is ready.
            return Phase::Ready { since_ms: started };
        }
        match self.health.get(&instance.id) {
            Some(h) if h.tracker.unhealthy => Phase::Unhealthy,
            Some(h) if h.tracker.healthy => Phase::Ready {
                since_ms: h.ready_since_ms.unwrap_or(started),
            },
            _ => Phase::Starting,
        }
    }

    fn address_of(&self, instance: &Instance, release: &Release) -> Option<SocketAddr> {
        let port = release.spec.instance_port()?;
        let ip = match instance.network {
            imago_runtime::NetworkMode::Private => IpAddr::V4(instance.address?),
            imago_runtime::NetworkMode::Host => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        Some(SocketAddr::new(ip, port))
    }

    fn ensure_endpoint(&mut self, service: &str, release: &Release) -> Result<(), DeployError> {
        self.closed_routes
            .retain(|_, routes| routes.open_connections() > 0);
        let Some(port) = release.spec.port else {
            if let Some(closed) = self.endpoints.remove(service) {
                self.unbalance(service, closed.port)?;
                self.closed_routes
                    .insert(service.to_owned(), closed.routes.clone());
            }
            return Ok(());
        };
        if self.endpoints.get(service).is_some_and(|e| e.port == port) {
            return Ok(());
        }
        if let Some(old_port) = self.endpoints.get(service).map(|e| e.port) {
            self.unbalance(service, old_port)?;
        }
        let addr = SocketAddr::new(self.bind, port);
        let listeners = crate::proxy::bind(addr, crate::proxy::default_threads()).map_err(|e| {
            DeployError::InvalidService {
                service: service.to_owned(),
                field: "port".into(),
                reason: format!("cannot listen on {addr}: {e}"),
            }
        })?;
        // A new port keeps the service's routes: connections still open on the old port (its
        // threads relay them to their end) keep counting for drains.
        let routes = self
            .endpoints
            .get(service)
            .map(|e| e.routes.clone())
            .or_else(|| self.closed_routes.remove(service))
            .unwrap_or_default();
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        crate::proxy::spawn(listeners, routes.clone(), rx).map_err(|e| {
            DeployError::InvalidService {
                service: service.to_owned(),
                field: "port".into(),
                reason: format!("cannot start the endpoint on {addr}: {e}"),
            }
        })?;
        self.db.event(
            Some(service),
            "endpoint",
            &match self.balanced_address(port).filter(|_| self.balancer.is_some()) {
                Some(local) => format!(
                    "service endpoint listening on {addr}; clients on this host that connect to {local} reach an instance directly (kernel balancing)"
                ),
                None => format!("service endpoint listening on {addr}"),
            },
            &self.actor,
        )?;
        self.endpoints.insert(
            service.to_owned(),
            Endpoint {
                port,
                routes,
                shutdown,
            },
        );
        Ok(())
    }

    fn ensure_probe(&mut self, instance: &Instance, release: &Release) {
        let Some(check) = release.spec.health.clone() else {
            return;
        };
        if self.probes.contains_key(&instance.id) {
            return;
        }
        let Ok(probe) = check.probe(release.spec.instance_port()) else {
            return;
        };
        let ip = match instance.network {
            imago_runtime::NetworkMode::Private => instance.address.map(IpAddr::V4),
            imago_runtime::NetworkMode::Host => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let board = self.health.clone();
        let id = instance.id.clone();
        let pid = instance.pid;
        let started = instance.started_ms.unwrap_or(instance.created_ms);
        let task = self.runtime.spawn(async move {
            loop {
                let result = match (&probe, ip) {
                    (Probe::Http { path, port, status }, Some(ip)) => {
                        crate::health::http(
                            SocketAddr::new(ip, *port),
                            path,
                            *status,
                            check.timeout,
                        )
                        .await
                    }
                    (Probe::Tcp { port }, Some(ip)) => {
                        crate::health::tcp(SocketAddr::new(ip, *port), check.timeout).await
                    }
                    (Probe::Command { command }, _) => {
                        command_probe(pid, command, check.timeout).await
                    }
                    (_, None) => ProbeResult::Unhealthy("instance has no address".into()),
                };
                let in_start_period =
                    now_ms().saturating_sub(started) < check.start_period.as_millis() as u64;
                board.record(
                    &id,
                    result,
                    check.healthy_threshold,
                    check.unhealthy_threshold,
                    in_start_period,
                );
                tokio::time::sleep(check.interval).await;
            }
        });
        self.probes.insert(instance.id.clone(), task);
    }

    /// Records progress, completion and failure of the desired release's rollout, and rolls back
    /// automatically when it fails.
    #[allow(clippy::too_many_arguments)]
    fn track_progress(
        &mut self,
        service: &str,
        release: &Release,
        step: &Step,
        observed: &[ObservedInstance],
        own: &[&Instance],
        has_outcome: bool,
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
        let row = match self.db.rollout(service)? {
            Some(row) if row.target_release == release.number => row,
            _ => {
                let row = RolloutRow {
                    target_release: release.number,
                    started_ms: now,
                    last_progress_ms: now,
                    counts_json: counts_json.clone(),
                };
                self.db.put_rollout(service, &row)?;
                self.db.event(
                    Some(service),
                    "rollout",
                    &format!("rollout of release {} started", release.number),
                    &self.actor,
                )?;
                row
            }
        };
        if pass.complete {
            let took = now.saturating_sub(row.started_ms);
            self.db.record_outcome(
                service,
                release.number,
                "complete",
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
            if counts_json != row.counts_json {
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

/// Sets the modified unpacked tree of `digest` aside and records it, so that every instance
/// created from it is replaced: by the running controller, a restarted one, or the next one
/// when `imago drift` found it. Returns the event's message.
pub fn set_aside_modified(
    cache: &imago_runtime::RootfsCache,
    db: &StateDb,
    digest: &imago_oci::Digest,
    deep: bool,
    actor: &str,
) -> Result<Option<String>, DeployError> {
    let runtime = |e: imago_runtime::RuntimeError| DeployError::Runtime(e.to_string());
    // Checked again under the entry's lock: the controller and `imago drift` may both have
    // found the old tree modified, and the first to set it aside may already have had a fresh,
    // intact tree unpacked in its place, which the second must leave alone.
    let _entry = cache.lock_entry(digest).map_err(runtime)?;
    let problems = cache.verify(digest, deep).map_err(runtime)?;
    if problems.is_empty() {
        return Ok(None);
    }
    let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
    let message = format!(
        "the unpacked image {digest} was modified ({}{}): setting it aside and replacing its instances",
        shown.join(", "),
        if problems.len() > 5 {
            format!(", and {} more", problems.len() - 5)
        } else {
            String::new()
        }
    );
    // Recorded before the tree is moved, so a crash in between still replaces the instances
    // (and the next check finds the tree again); and again after, so an instance launched
    // from the modified tree in between is replaced too.
    db.record_taint(digest, now_ms())?;
    cache.taint(digest).map_err(runtime)?;
    db.record_taint(digest, now_ms())?;
    db.event(None, "drift", &message, actor)?;
    Ok(Some(message))
}

fn describe_exit(instance: &Instance) -> String {
    instance.describe_exit()
}

/// Kills a probe's process group when dropped while armed: nsenter forks the command into the
/// instance's PID namespace and only waits for it, so killing nsenter alone (a timeout, or the
/// probe task aborted when its instance goes) would leave the command running in the instance.
struct ProbeGroup(Option<rustix::process::Pid>);

impl ProbeGroup {
    fn kill(&mut self) {
        if let Some(group) = self.0.take() {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }

    /// After nsenter was reaped its pid (the group's id) may be reused: never signal it then.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProbeGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Who the instance's process is: what a command check runs as.
struct Identity {
    uid: u32,
    gid: u32,
    env: Vec<(String, String)>,
}

/// The real uid, gid and environment of the instance's process, from /proc (None once it is gone).
fn instance_identity(pid: i32) -> Option<Identity> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let id_of = |key: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (uid, gid) = (id_of("Uid:")?, id_of("Gid:")?);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let env = environ
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let text = String::from_utf8_lossy(entry);
            let (k, v) = text.split_once('=')?;
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect();
    Some(Identity { uid, gid, env })
}

/// Runs `command` inside the instance (a health probe, never a repair): in its mount, UTS, IPC,
/// network and PID namespaces and under its root directory, so it sees the image's files and the
/// instance's own network, not the host's.
async fn command_probe(pid: Option<i32>, command: &[String], timeout: Duration) -> ProbeResult {
    let Some(pid) = pid else {
        return ProbeResult::Unhealthy(format!(
            "command {command:?} cannot run: the instance has no process"
        ));
    };
    // As the instance's own process: its user and group and its environment, like an exec probe
    // in Kubernetes; never the controller's.
    let identity = instance_identity(pid);
    let mut cmd = tokio::process::Command::new("nsenter");
    cmd.arg("--target").arg(pid.to_string()).args([
        "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd",
    ]);
    if let Some(who) = &identity {
        cmd.arg(format!("--setgid={}", who.gid))
            .arg(format!("--setuid={}", who.uid));
    }
    cmd.arg("--").args(command);
    cmd.env_clear();
    match identity {
        Some(who) if who.env.iter().any(|(k, _)| k == "PATH") => {
            cmd.envs(who.env);
        }
        other => {
            cmd.envs(other.map(|who| who.env).unwrap_or_default());
            cmd.env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            );
        }
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd.process_group(0);
    cmd.kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return ProbeResult::Unhealthy(format!("cannot run command probe: {e}")),
    };
    // Declared after `child`, so an aborted probe drops it first: the group is killed while
    // nsenter is not reaped yet.
    let mut group = ProbeGroup(
        child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32)),
    );
    let mut stderr = child.stderr.take();
    let run = async {
        let mut err = Vec::new();
        let read = async {
            if let Some(stderr) = stderr.as_mut() {
                let _ = tokio::io::AsyncReadExt::read_to_end(stderr, &mut err).await;
            }
        };
        let (status, ()) = tokio::join!(child.wait(), read);
        status.map(|status| (status, err))
    };
    let shown = command.join(" ");
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok((status, err))) => {
            group.disarm();
            if status.success() {
                ProbeResult::Healthy
            } else {
                ProbeResult::Unhealthy(format!(
                    "command {shown:?} exited with {status}: {}",
                    String::from_utf8_lossy(&err).trim()
                ))
            }
        }
        Ok(Err(e)) => {
            group.kill();
            ProbeResult::Unhealthy(format!("cannot run command probe: {e}"))
        }
        Err(_) => {
            group.kill();
            let _ = child.kill().await;
            ProbeResult::Unhealthy(format!("command {shown:?} timed out after {timeout:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ServiceSpec;
    use imago_oci::Digest;
    use imago_runtime::FakeProvider;

    struct Harness {
        _dir: tempfile::TempDir,
        runtime: tokio::runtime::Runtime,
        fake: Arc<FakeProvider>,
        controller: Controller,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("state.db")).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
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
                self.controller.pass().unwrap();
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
        fn restart(&mut self, provider: Arc<dyn Provider>) {
            let db = StateDb::open(&self._dir.path().join("state.db")).unwrap();
            self.controller = Controller::new(
                db,
                provider,
                self.runtime.handle().clone(),
                Engine::Embedded,
            );
        }

        /// Runs passes until `service` completes; returns the passes.
        fn converge(&mut self, service: &str, max: usize) -> Vec<ServicePass> {
            let mut passes = Vec::new();
            for _ in 0..max {
                let pass = self
                    .controller
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
        let outcome = h.controller.db.outcome_of("web", 1).unwrap().unwrap();
        assert_eq!(outcome.outcome, "complete");
        // A settled service stays put.
        let pass = h.controller.pass().unwrap().remove(0);
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
            let pass = h.controller.pass().unwrap().remove(0);
            peak = peak.max(h.running("web").len());
            if pass.complete {
                break;
            }
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
        assert_eq!(
            h.controller
                .db
                .outcome_of("web", 2)
                .unwrap()
                .unwrap()
                .outcome,
            "complete"
        );
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
        let pass = h.controller.pass().unwrap().remove(0);
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
            let pass = h.controller.pass().unwrap().remove(0);
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
            let pass = h.controller.pass().unwrap().remove(0);
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
            let pass = h.controller.pass().unwrap().remove(0);
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
            .record_outcome("web", first.number, "complete", "", "test")
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
        let pass = h.controller.pass().unwrap().remove(0);
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
        h.controller.pass().unwrap();
        h.controller.pass().unwrap();
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

    /// A provider whose stops take as long as the grace period, as with a process that ignores
    /// SIGTERM: what the controller must never wait for inside a pass. Records each grace.
    struct SlowStops(Arc<FakeProvider>, Mutex<Vec<Duration>>);

    impl SlowStops {
        fn new(fake: &Arc<FakeProvider>) -> Arc<SlowStops> {
            Arc::new(SlowStops(fake.clone(), Mutex::default()))
        }
    }

    impl Provider for SlowStops {
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
            self.0.launch(spec)
        }
        fn stop(&self, id: &str, grace: Duration) -> Result<Instance, imago_runtime::RuntimeError> {
            self.1.lock().unwrap().push(grace);
            std::thread::sleep(grace);
            self.0.stop(id, grace)
        }
        fn remove(&self, id: &str) -> Result<(), imago_runtime::RuntimeError> {
            self.0.remove(id)
        }
        fn list(&self) -> Result<Vec<Instance>, imago_runtime::RuntimeError> {
            self.0.list()
        }
        fn inspect(&self, id: &str) -> Result<Instance, imago_runtime::RuntimeError> {
            self.0.inspect(id)
        }
        fn logs(&self, id: &str) -> Result<Vec<u8>, imago_runtime::RuntimeError> {
            self.0.logs(id)
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
        use std::io::{Read, Write};
        // The "instance": a host-network backend that keeps every connection open until the
        // client closes it.
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_port = backend.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in backend.incoming() {
                let Ok(mut stream) = stream else { break };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while stream.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                });
            }
        });
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
        let routes = h.controller.endpoint("web").unwrap().routes.clone();
        for _ in 0..200 {
            if routes.active_connections(&old) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(routes.active_connections(&old), 1);

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
        let routes = h.controller.endpoint("web").unwrap().routes.clone();
        assert_eq!(
            routes.open_connections(),
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

    impl Provider for StopsEndingAfterTheListing {
        fn launch(&self, spec: &InstanceSpec) -> Result<Instance, imago_runtime::RuntimeError> {
            self.fake.launch(spec)
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
        fn remove(&self, id: &str) -> Result<(), imago_runtime::RuntimeError> {
            self.fake.remove(id)
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
        fn inspect(&self, id: &str) -> Result<Instance, imago_runtime::RuntimeError> {
            self.fake.inspect(id)
        }
        fn logs(&self, id: &str) -> Result<Vec<u8>, imago_runtime::RuntimeError> {
            self.fake.logs(id)
        }
    }

    #[test]
    fn a_stop_that_ended_after_the_listing_is_not_started_again() {
        let mut h = harness();
        let provider = Arc::new(StopsEndingAfterTheListing {
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
            let passes = h.controller.pass().unwrap();
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
        let provider = Arc::new(StopsEndingAfterTheListing {
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
        h.restart(SlowStops::new(&h.fake));
        h.controller.db.destroy("web", "test").unwrap();

        let started = std::time::Instant::now();
        let first = h.controller.pass().unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "the pass does not wait for stops of 1 s each (took {:?})",
            started.elapsed()
        );
        assert_eq!(h.running("web").len(), 2, "stops are still in progress");
        assert!(first.iter().any(|p| p.service == "web"));

        // A controller killed in the middle of the tear-down: a new one over the same database
        // finishes it from what it observes.
        h.restart(SlowStops::new(&h.fake));
        let mut stopped = BTreeSet::new();
        for _ in 0..250 {
            let passes = h.controller.pass().unwrap();
            let web = passes.iter().find(|p| p.service == "web").unwrap();
            stopped.extend(web.stopped.iter().cloned());
            let left = h
                .fake
                .list()
                .unwrap()
                .iter()
                .any(|i| i.labels.get(LABEL_SERVICE).map(String::as_str) == Some("web"));
            if !left {
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
        h.controller.pass().unwrap();
        h.controller.pass().unwrap();
        // A new controller over the same database and instances: no memory of the old one.
        h.restart(h.fake.clone());
        let passes = h.converge("web", 30);
        assert!(passes.last().unwrap().complete);
        let running = h.running("web");
        assert_eq!(running.len(), 4);
        assert!(running.iter().all(|i| i.image == Digest::of(b"v2")));
        assert_eq!(h.fake.list().unwrap().len(), 4, "no orphaned instance");
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
}
