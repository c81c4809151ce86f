//! Health probes: one task per running instance writes its results to the [`HealthBoard`],
//! which the reconcile steps read as each instance's phase.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use imago_runtime::Instance;

use super::{Controller, Wake};
use crate::health::{HealthTracker, ProbeResult};
use crate::spec::Probe;
use crate::state::{Release, now_ms};

/// Health as probed for one instance.
#[derive(Debug, Clone, Default)]
pub(super) struct InstanceHealth {
    pub(super) tracker: HealthTracker,
    pub(super) ready_since_ms: Option<u64>,
}

/// Probe results shared between the probe tasks (writers) and the controller (reader).
#[derive(Debug, Clone, Default)]
pub struct HealthBoard {
    inner: Arc<Mutex<Board>>,
    pub(super) wake: Arc<Wake>,
}

#[derive(Debug, Default)]
struct Board {
    by_id: HashMap<String, InstanceHealth>,
    /// Probed instances without a verdict yet (neither healthy nor unhealthy), each under way
    /// for [`Wake`]'s pacing until it has one.
    awaited: HashSet<String>,
}

impl HealthBoard {
    fn lock(&self) -> MutexGuard<'_, Board> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn record(
        &self,
        id: &str,
        result: ProbeResult,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
        in_start_period: bool,
    ) {
        let mut board = self.lock();
        let entry = board.by_id.entry(id.to_owned()).or_default();
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
        let after = (entry.tracker.healthy, entry.tracker.unhealthy);
        let first_verdict = (after.0 || after.1) && board.awaited.remove(id);
        drop(board);
        let settled = first_verdict && self.wake.end(true);
        if after.1 && !before.1 {
            // The health gate's (and the endpoint's) to act on now.
            self.wake.nudge();
        } else if before != after && !settled {
            self.wake.hint();
        }
    }

    /// `id`'s probe starts: until its first verdict it is under way (see [`Wake::begin`]).
    fn awaiting(&self, id: &str) {
        let mut board = self.lock();
        let judged = board
            .by_id
            .get(id)
            .is_some_and(|h| h.tracker.healthy || h.tracker.unhealthy);
        let new = !judged && board.awaited.insert(id.to_owned());
        drop(board);
        if new {
            self.wake.begin();
        }
    }

    /// `id`'s probe ended: no verdict of it is awaited any more.
    pub(super) fn not_awaited(&self, id: &str) {
        let removed = self.lock().awaited.remove(id);
        if removed {
            // Its instance went: the pass that saw it acted on that already.
            self.wake.end(false);
        }
    }

    /// Takes over what an earlier controller recorded: `id` passes its checks since
    /// `since_ms`. Its probes then judge it as if no restart had happened (it stays ready
    /// until `unhealthy_threshold` checks fail in a row). Does nothing once `id` was probed.
    pub(super) fn seed_ready(&self, id: &str, since_ms: u64) {
        let mut board = self.lock();
        // Asked of every ready instance on every pass: no key is allocated once it is known.
        if board.by_id.contains_key(id) {
            return;
        }
        board
            .by_id
            .entry(id.to_owned())
            .or_insert_with(|| InstanceHealth {
                tracker: HealthTracker {
                    successes: 1,
                    healthy: true,
                    ..HealthTracker::default()
                },
                ready_since_ms: Some(since_ms),
            });
    }

    pub(super) fn get(&self, id: &str) -> Option<InstanceHealth> {
        self.lock().by_id.get(id).cloned()
    }

    pub(super) fn forget(&self, id: &str) {
        self.lock().by_id.remove(id);
        self.not_awaited(id);
    }
}

impl Controller {
    pub(super) fn ensure_probe(&mut self, instance: &Instance, release: &Release) {
        // Asked for every running instance on every pass: nothing is copied for one probed.
        if self.probes.contains_key(&instance.id) {
            return;
        }
        let Some(check) = release.spec.health.clone() else {
            return;
        };
        let Ok(probe) = check.probe(release.spec.instance_port()) else {
            return;
        };
        let ip = match instance.network {
            imago_runtime::NetworkMode::Private => instance.address.map(IpAddr::V4),
            imago_runtime::NetworkMode::Host => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let board = self.health.clone();
        board.awaiting(&instance.id);
        let slots = self.check_slots.clone();
        let id = instance.id.clone();
        let pid = instance.pid;
        let started = instance.started_ms.unwrap_or(instance.created_ms);
        let task = self.runtime.spawn(async move {
            let target = Target { probe, ip, pid };
            let mut passed_once = false;
            // The first check at once (a new instance should serve soon), the second after
            // half an interval plus this instance's own share of one: instances launched in
            // the same pass (hundreds in a wave) are then checked spread over the interval,
            // not all at the same instant every interval.
            let mut gap = check.interval / 2 + spread(&id, check.interval);
            loop {
                let tick = tokio::time::Instant::now() + gap;
                gap = check.interval;
                let result = target.check(&slots, check.timeout).await;
                let failed = matches!(result, ProbeResult::Unhealthy(_));
                passed_once |= !failed;
                let in_start_period =
                    now_ms().saturating_sub(started) < check.start_period.as_millis() as u64;
                board.record(
                    &id,
                    result,
                    check.healthy_threshold,
                    check.unhealthy_threshold,
                    in_start_period,
                );
                if failed && !passed_once && check.healthy_threshold == 1 {
                    // A new instance is usually probed before its program listens. Rather than
                    // wait a whole interval (up to a second per rollout wave), look again soon,
                    // doubling the pause: a success there counts at once, a failure does not
                    // count at all (failures are counted only at interval ticks, as before).
                    let mut pause = FIRST_RETRY;
                    while tokio::time::Instant::now() + pause < tick {
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                        let left = tick.saturating_duration_since(tokio::time::Instant::now());
                        let quick = target.check(&slots, check.timeout.min(left)).await;
                        if matches!(quick, ProbeResult::Healthy) {
                            passed_once = true;
                            board.record(&id, quick, 1, check.unhealthy_threshold, false);
                            break;
                        }
                    }
                }
                tokio::time::sleep_until(tick).await;
            }
        });
        self.probes.insert(instance.id.clone(), task);
    }
}

/// At most this many health checks are under way at once, whatever the number of instances; a
/// check waits for a slot before it is sent, and its timeout starts only then. A thousand
/// instances started in one wave are not all asked in the same millisecond.
pub(super) const CONCURRENT_CHECKS: usize = 64;

/// A check whose answer the controller was too starved to look at in time
/// ([`ProbeResult::Inconclusive`]) is asked again at once, up to this many times in a row; the
/// next such one counts as a failure, so an instance that hangs is found even on a controller
/// that stays starved.
const STARVED_RETRIES: u32 = 2;

/// This instance's share of `interval`, the same on every controller: where in the interval its
/// checks fall.
fn spread(id: &str, interval: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut hasher);
    let nanos = interval.as_nanos().max(1);
    Duration::from_nanos((u128::from(hasher.finish()) % nanos) as u64)
}

/// What one instance's probe asks, and where.
struct Target {
    probe: Probe,
    ip: Option<IpAddr>,
    pid: Option<i32>,
}

impl Target {
    /// One check, sent once a slot is free; an inconclusive one is asked again at once (see
    /// [`STARVED_RETRIES`]).
    async fn check(&self, slots: &tokio::sync::Semaphore, timeout: Duration) -> ProbeResult {
        let mut starved = 0;
        loop {
            let result = {
                // The semaphore is never closed: no slot only if it were.
                let _slot = slots.acquire().await.ok();
                self.once(timeout).await
            };
            match result {
                ProbeResult::Inconclusive(_) if starved < STARVED_RETRIES => starved += 1,
                ProbeResult::Inconclusive(reason) => {
                    return ProbeResult::Unhealthy(format!(
                        "{reason}; {} checks in a row could not tell, so this one counts as failed",
                        STARVED_RETRIES + 1
                    ));
                }
                other => return other,
            }
        }
    }

    async fn once(&self, timeout: Duration) -> ProbeResult {
        let probe_started = std::time::Instant::now();
        let result = match (&self.probe, self.ip) {
            (Probe::Http { path, port, status }, Some(ip)) => {
                crate::health::http(SocketAddr::new(ip, *port), path, *status, timeout).await
            }
            (Probe::Tcp { port }, Some(ip)) => {
                crate::health::tcp(SocketAddr::new(ip, *port), timeout).await
            }
            (Probe::Command { command }, _) => command_probe(self.pid, command, timeout).await,
            (_, None) => ProbeResult::Unhealthy("instance has no address".into()),
        };
        crate::metrics::live().observe_health_check(
            match self.probe {
                Probe::Http { .. } => "http",
                Probe::Tcp { .. } => "tcp",
                Probe::Command { .. } => "command",
            },
            match result {
                ProbeResult::Healthy => "healthy",
                ProbeResult::Unhealthy(_) => "unhealthy",
                ProbeResult::Inconclusive(_) => "inconclusive",
            },
            probe_started.elapsed(),
        );
        result
    }
}

/// The first extra look at a new instance that failed its first check (see `ensure_probe`).
const FIRST_RETRY: Duration = Duration::from_millis(10);

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
