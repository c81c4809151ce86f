//! The controller's process lifecycle: its lock, starting it in the background, its pid file,
//! stopping it, and the serve loop. The CLI only parses arguments and reports.
//!
//! One controller runs per imago home: it holds `deploy/controller.lock` (flock) for its life,
//! so the lock's holder is the only truth about whether it runs (a pid file can be stale).
//! `deploy/controller.json` says its pid, start time and API address; a controller writes it
//! (whole, by rename) only once its set-up is done, so a command that started one waits for
//! that file to name its process before it says "started". The endpoints are served by the data
//! plane ([`crate::dataplane`]), a process of its own that the controller starts and that keeps
//! serving while no controller runs.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imago_runtime::{Engine, Provider, RootfsCache};
use serde::{Deserialize, Serialize};

use crate::controller::{Controller, ServicePass};
use crate::dataplane::{PlaneCommand, RemotePlane};
use crate::error::DeployError;
use crate::lock_holder::Holder;
use crate::state::StateDb;

/// How long starting or stopping a controller may take.
const START_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new controller's set-up (lock, API, data plane) may take before the command that
/// started it gives up waiting: the data plane alone may take 10 s to answer under load.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The kind of the event a controller records when it stops on its own (its set-up failed).
pub const EXITED_EVENT: &str = "controller-exited";

/// The deploy layer's files under an imago home.
#[derive(Debug, Clone)]
pub struct DeployHome {
    /// The imago home.
    pub root: PathBuf,
    /// `<home>/deploy`.
    pub dir: PathBuf,
}

impl DeployHome {
    pub fn new(root: impl AsRef<Path>) -> DeployHome {
        let root = root.as_ref();
        DeployHome {
            root: root.to_owned(),
            dir: root.join("deploy"),
        }
    }
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("state.db")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("controller.lock")
    }
    pub fn info_path(&self) -> PathBuf {
        self.dir.join("controller.json")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("controller.log")
    }
    pub fn dataplane_socket(&self) -> PathBuf {
        self.dir.join("dataplane.sock")
    }
    pub fn dataplane_lock_path(&self) -> PathBuf {
        self.dir.join("dataplane.lock")
    }
    pub fn dataplane_log_path(&self) -> PathBuf {
        self.dir.join("dataplane.log")
    }
    pub fn open_db(&self) -> Result<StateDb, DeployError> {
        StateDb::open(&self.db_path())
    }
    fn create(&self) -> Result<(), DeployError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| DeployError::Io {
            what: "cannot create",
            path: self.dir.clone(),
            source,
        })
    }
}

/// Takes an exclusive flock on `path` without waiting; `None` if another holds it.
pub fn try_lock(path: &Path) -> Result<Option<File>, DeployError> {
    let file = open_lock_file(path)?;
    flock_now(
        &file,
        path,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .map(|taken| taken.then_some(file))
}

fn open_lock_file(path: &Path) -> Result<File, DeployError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| DeployError::Io {
            what: "cannot open",
            path: path.to_owned(),
            source,
        })
}

/// `flock(operation)` without waiting: whether it was taken.
fn flock_now(
    file: &File,
    path: &Path,
    operation: rustix::fs::FlockOperation,
) -> Result<bool, DeployError> {
    match rustix::fs::flock(file, operation) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(DeployError::Io {
            what: "cannot lock",
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

/// Whether a controller holds the lock of `home` (a dying one included: see
/// [`controller_lock_holder`]). The probe takes the lock shared for a moment, so two probes at
/// once never take each other for a controller, and one never blocks a controller for longer
/// than its own retry.
pub fn controller_running(home: &DeployHome) -> Result<bool, DeployError> {
    Ok(controller_lock_holder(home)?.is_some())
}

/// The process that holds the controller lock of `home` exclusively, if any: a running
/// controller, or one that is exiting (killed, its files not closed yet).
pub fn controller_lock_holder(home: &DeployHome) -> Result<Option<Holder>, DeployError> {
    home.create()?;
    let path = home.lock_path();
    let file = open_lock_file(&path)?;
    if flock_now(
        &file,
        &path,
        rustix::fs::FlockOperation::NonBlockingLockShared,
    )? {
        return Ok(None);
    }
    crate::lock_holder::exclusive_holder(&file, &path)
        .map(Some)
        .map_err(|source| DeployError::Io {
            what: "cannot find the holder of",
            path,
            source,
        })
}

/// What `deploy/controller.json` says of the running controller, written once its set-up is
/// done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerInfo {
    pub pid: u32,
    pub api: String,
    /// The process's start time (field 22 of `/proc/PID/stat`): with the pid, it tells the
    /// file of a controller that just started from one a dead controller of a reused pid left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
}

/// The pids of this home's controller and data plane, if they run: the ports they hold are the
/// service endpoints themselves, no conflict. The data plane may serve them without a controller.
pub fn own_pids(home: &DeployHome) -> Vec<u32> {
    let mut ours = Vec::new();
    if let Some(info) = running_controller_info(home) {
        ours.push(info.pid);
    }
    if let Ok(Some(plane)) = crate::dataplane::status(home) {
        ours.push(plane.pid);
    }
    ours
}

/// Asks the running controller of `home`, if any, for a pass now rather than at its next
/// interval: `apply` and `rollback` call it once their release is recorded (a rollback's
/// first quarter second went to that wait). SIGURG, whose default action is to be ignored, so
/// that a controller of an older imago, which does not listen for it, is not killed by it.
/// Only a hint: the next interval's pass sees the release anyway.
pub fn nudge_controller(home: &DeployHome) {
    if let Some(info) = running_controller_info(home)
        && let Some(pid) = rustix::process::Pid::from_raw(info.pid as i32)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::URG);
    }
}

/// The file of the controller that runs for `home`, if one runs and the file is its own. A
/// controller writes it only once set up (seconds after it took the lock): until then the file
/// is a dead controller's, whose pid may now be another process's, which must neither be
/// signalled nor have its ports taken for imago's. A file without a start time (an imago before
/// it had one) is taken as it is.
fn running_controller_info(home: &DeployHome) -> Option<ControllerInfo> {
    if !controller_running(home).unwrap_or(false) {
        return None;
    }
    let info = read_info(home).ok()?;
    let own = match (i32::try_from(info.pid), info.start) {
        (Ok(pid), Some(start)) => imago_runtime::state::is_alive(pid, start),
        (Ok(_), None) => true,
        (Err(_), _) => false,
    };
    own.then_some(info)
}

pub fn read_info(home: &DeployHome) -> Result<ControllerInfo, DeployError> {
    let path = home.info_path();
    let bytes = std::fs::read(&path).map_err(|source| DeployError::Io {
        what: "cannot read",
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| DeployError::Io {
        what: "cannot parse",
        path,
        source: e.into(),
    })
}

/// The pid of the controller that runs for `home`, if any, once a controller that is exiting
/// (killed a moment ago: its lock is released only when the kernel has closed its files) is
/// gone. Without that wait, a command run right after a `kill -9` would take the dying
/// controller for a running one and start none.
pub fn running_controller(home: &DeployHome) -> Result<Option<u32>, DeployError> {
    let deadline = Instant::now() + START_STOP_TIMEOUT;
    loop {
        let late = Instant::now() > deadline;
        match controller_lock_holder(home)? {
            None => return Ok(None),
            Some(Holder::Running(pid)) => return Ok(Some(pid)),
            Some(Holder::Exiting(pid)) if late => {
                return Err(DeployError::ControllerDidNotStop { pid });
            }
            Some(Holder::Unknown) if late => {
                return Err(DeployError::ControllerRunning {
                    home: home.root.clone(),
                });
            }
            Some(Holder::Exiting(_) | Holder::Unknown) => std::thread::sleep(LOCK_POLL),
        }
    }
}

/// How often a wait for the controller lock looks again: a dying process closes its files
/// within milliseconds.
const LOCK_POLL: Duration = Duration::from_millis(5);

/// Starts `exe --home HOME serve --foreground SERVE_ARGS` in the background unless a controller
/// already runs for `home`, and waits until it has finished its set-up (API, data plane: it
/// writes `controller.json` naming its pid and start time). Returns the new controller's pid, or
/// `None` if one ran already (or another command started one at the same moment). A controller
/// that ends before its set-up is done is [`DeployError::ControllerDidNotStart`] with its reason
/// (its `controller-exited` event, else the last line it logged), never "started"; one that
/// has not finished it after [`SETUP_TIMEOUT`] is stopped, so that none runs that was said not
/// to have started.
pub fn ensure_controller(
    home: &DeployHome,
    exe: &Path,
    serve_args: &[String],
) -> Result<Option<u32>, DeployError> {
    ensure_controller_within(home, exe, serve_args, SETUP_TIMEOUT)
}

/// [`ensure_controller`], with `setup_timeout` for the set-up.
fn ensure_controller_within(
    home: &DeployHome,
    exe: &Path,
    serve_args: &[String],
    setup_timeout: Duration,
) -> Result<Option<u32>, DeployError> {
    if running_controller(home)?.is_some() {
        return Ok(None);
    }
    // Where its reason will be if it fails: events and log lines after these.
    let since = home
        .open_db()
        .and_then(|db| db.last_event_seq())
        .unwrap_or(0);
    let log_path = home.log_path();
    let logged = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { what, path, source }
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io("cannot open", &log_path))?;
    let log_err = log.try_clone().map_err(io("cannot open", &log_path))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--home")
        .arg(&home.root)
        .args(["serve", "--foreground"])
        .args(serve_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // Its own process group: a Ctrl-C on `imago apply` does not stop the controller.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .map_err(io("cannot start the controller", exe))?;
    let pid = child.id();
    // Our child until it is waited for: its pid cannot be reused meanwhile. Without its start
    // time a `controller.json` of a dead controller of the same pid would pass for its own.
    let start = child_start_time(pid);
    let deadline = Instant::now() + setup_timeout;
    // Not left to run as a controller that this command says did not start.
    fn give_up(
        child: &mut std::process::Child,
        log: PathBuf,
        reason: String,
    ) -> Result<Option<u32>, DeployError> {
        let _ = child.kill();
        let _ = child.wait();
        Err(DeployError::ControllerDidNotStart { log, reason })
    }
    loop {
        if let Ok(start) = start
            && let Ok(info) = read_info(home)
            && info.pid == pid
            && info.start == Some(start)
        {
            return Ok(Some(pid));
        }
        if let Some(status) = child
            .try_wait()
            .map_err(io("cannot wait for the controller", exe))?
        {
            // Ours gave up: another command's controller holds the lock, or it failed.
            if let Some(Holder::Running(_)) = controller_lock_holder(home)? {
                return Ok(None);
            }
            let reason = exit_reason(home, pid, since)
                .or_else(|| last_log_line(&log_path, logged))
                .unwrap_or_else(|| format!("it ended ({status}) without saying why"));
            return Err(DeployError::ControllerDidNotStart {
                log: log_path,
                reason,
            });
        }
        // Still running (one that exited at once, a zombie when it was read, ended above), but
        // nothing it writes could ever be told for its own: no use waiting out the set-up time.
        if let Err(unreadable) = &start {
            return give_up(
                &mut child,
                log_path,
                format!(
                    "cannot tell pid {pid} from an earlier controller of that pid, so it was \
                     stopped: {unreadable}"
                ),
            );
        }
        if Instant::now() > deadline {
            return give_up(
                &mut child,
                log_path,
                format!(
                    "pid {pid} had not finished its set-up after {} s and was stopped",
                    setup_timeout.as_secs_f64()
                ),
            );
        }
        std::thread::sleep(LOCK_POLL);
    }
}

/// The start time of the process `pid` (a child not yet waited for), or why it cannot be read.
fn child_start_time(pid: u32) -> Result<u64, String> {
    let stat = format!("/proc/{pid}/stat");
    i32::try_from(pid)
        .ok()
        .and_then(imago_runtime::state::process_start_time)
        .ok_or_else(|| match std::fs::read_to_string(&stat) {
            Err(e) => format!("cannot read its start time from {stat}: {e}"),
            Ok(_) => format!("no start time in {stat} (it has exited)"),
        })
}

/// The message of the event a controller that stops on its own records (see
/// [`record_exit`]) starts with this.
fn exit_prefix(pid: u32) -> String {
    format!("the controller (pid {pid}) stopped: ")
}

/// Records why this process, a controller, stops on its own (its set-up failed): `imago events`,
/// the console and the command that started it say so, not only its log. Best effort: the error
/// itself may be that the state database cannot be written.
pub fn record_exit(home: &DeployHome, error: &dyn std::fmt::Display) {
    if let Ok(db) = home.open_db() {
        let message = format!("{}{error}", exit_prefix(std::process::id()));
        let _ = db.event(None, EXITED_EVENT, &message, "controller");
    }
}

/// Why controller `pid` stopped, from the event it recorded after event `since`.
fn exit_reason(home: &DeployHome, pid: u32, since: u64) -> Option<String> {
    let prefix = exit_prefix(pid);
    home.open_db()
        .and_then(|db| db.events(None, since))
        .ok()?
        .into_iter()
        .rev()
        .filter(|e| e.kind == EXITED_EVENT)
        .find_map(|e| e.message.strip_prefix(&prefix).map(str::to_owned))
}

/// How much of the end of a controller's log [`last_log_line`] reads.
const LOG_TAIL: u64 = 64 * 1024;

/// The last non-empty line of `log` after its first `from` bytes, from the last [`LOG_TAIL`]
/// bytes at most: the log of a home grows with every controller that ever ran there.
fn last_log_line(log: &Path, from: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(from.max(len.saturating_sub(LOG_TAIL))))
        .ok()?;
    let mut tail = Vec::new();
    file.take(LOG_TAIL).read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// Stops the controller of `home` (SIGTERM) and waits for its lock to be free; returns its pid,
/// or `None` if none ran. Its instances and the data plane keep running.
pub fn stop_controller(home: &DeployHome) -> Result<Option<u32>, DeployError> {
    let Some(running) = running_controller(home)? else {
        return Ok(None);
    };
    let pid = i32::try_from(running)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| DeployError::Io {
            what: "bad pid of the lock holder of",
            path: home.lock_path(),
            source: std::io::ErrorKind::InvalidData.into(),
        })?;
    match rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
        // Ended by itself meanwhile.
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => {
            return Err(DeployError::Io {
                what: "cannot signal the controller of",
                path: home.root.clone(),
                source: e.into(),
            });
        }
    }
    let deadline = Instant::now() + START_STOP_TIMEOUT;
    while controller_running(home)? {
        if Instant::now() > deadline {
            return Err(DeployError::ControllerDidNotStop { pid: running });
        }
        std::thread::sleep(LOCK_POLL);
    }
    Ok(Some(running))
}

/// The lock of the one controller of a home, held for the controller's life.
pub struct ControllerLock {
    _file: File,
}

/// Takes the controller lock of `home`, or fails at once if a running controller holds it.
/// Probes (`controller_running`) hold it shared for a moment, and a killed controller holds it
/// until its files are closed: both are waited for, never taken for a controller.
pub fn lock_controller(home: &DeployHome) -> Result<ControllerLock, DeployError> {
    home.create()?;
    let deadline = Instant::now() + START_STOP_TIMEOUT;
    loop {
        if let Some(lock) = try_lock(&home.lock_path())? {
            return Ok(ControllerLock { _file: lock });
        }
        let running = matches!(controller_lock_holder(home)?, Some(Holder::Running(_)));
        if running || Instant::now() > deadline {
            return Err(DeployError::ControllerRunning {
                home: home.root.clone(),
            });
        }
        std::thread::sleep(LOCK_POLL);
    }
}

/// Writes `controller.json` whole (by rename): a reader sees the old file or the new one. Once
/// per controller, at its start: first removes what controllers killed between their write and
/// their rename left (their temporary file, named by their pid).
fn write_info(home: &DeployHome, info: &ControllerInfo) -> Result<(), DeployError> {
    let path = home.info_path();
    imago_runtime::state::remove_stale_temp_files(&path);
    imago_runtime::state::write_json_atomic(&path, info)
        .map_err(|e| DeployError::Runtime(e.to_string()))
}

/// How `imago serve --foreground` runs.
#[derive(Clone)]
pub struct ServeOptions {
    pub api: SocketAddr,
    pub interval: Duration,
    pub engine: Engine,
    pub kernel_balancing: bool,
    /// The imago executable, which runs the data plane (`__dataplane`).
    pub exe: PathBuf,
    /// The API refuses every action (403).
    pub read_only: bool,
    /// The image store, which the API's rollback checks for the image it restores.
    pub store: Option<imago_store::Store>,
    /// What plans a definition file for `POST /v1/plan` (the binary's `imago plan`).
    pub planner: Option<crate::api::Planner>,
}

/// What the serve loop has to say; the CLI prints it.
#[derive(Debug)]
pub enum Note {
    /// The HTTP API could not listen; the controller serves without it.
    NoApi { addr: SocketAddr, error: String },
    /// The data plane could not turn kernel balancing on.
    Warning(String),
    /// The controller runs.
    Running {
        pid: u32,
        api: String,
        dataplane: u32,
    },
    /// One pass's result for a service.
    Pass(ServicePass),
    /// A pass failed (the next one tries again).
    PassFailed(DeployError),
}

/// Runs the controller of `home` until the process is killed: API, data plane, reconcile loop.
pub fn run_controller(
    home: &DeployHome,
    _lock: ControllerLock,
    provider: Arc<dyn Provider>,
    rootfs: RootfsCache,
    options: ServeOptions,
    engines: Option<crate::controller::EngineFactory>,
    note: &mut dyn FnMut(Note),
) -> Result<std::convert::Infallible, DeployError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { what, path, source }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io(
            "cannot start a runtime for the controller of",
            &home.root,
        ))?;
    // Made on the first serve, whatever the address: write actions always need it.
    let token = crate::api::auth::ensure_token(&home.root)?;
    let api = match runtime.block_on(tokio::net::TcpListener::bind(options.api)) {
        Ok(listener) => {
            let addr = listener
                .local_addr()
                .map_err(io("cannot read the API address of", &home.root))?;
            let router = crate::api::router(crate::api::ApiConfig {
                db_path: home.db_path(),
                provider: provider.clone(),
                store: options.store.clone(),
                home: Some(home.clone()),
                rootfs: Some(rootfs.clone()),
                token: Some(token),
                token_for_reads: crate::api::needs_token_for_reads(addr),
                read_only: options.read_only,
                engines: engines.clone(),
                planner: options.planner.clone(),
            });
            runtime.spawn(async move {
                axum::serve(
                    listener,
                    router.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .await
            });
            addr.to_string()
        }
        Err(e) => {
            note(Note::NoApi {
                addr: options.api,
                error: e.to_string(),
            });
            String::new()
        }
    };
    let plane = RemotePlane::connect(
        PlaneCommand {
            exe: options.exe.clone(),
            home: home.clone(),
        },
        options.kernel_balancing,
    )?;
    if let Some(warning) = plane.warning() {
        note(Note::Warning(warning.to_owned()));
    }
    let dataplane = plane.adopted_status().pid;
    let mut controller = Controller::new(
        home.open_db()?,
        provider,
        runtime.handle().clone(),
        options.engine,
    )
    .with_rootfs_checks(rootfs, Duration::from_secs(2))
    .with_data_plane(Box::new(plane));
    if let Some(engines) = engines {
        controller = controller.with_cluster_engines(engines);
    }
    // Set up: now `ensure_controller` may say "started".
    write_info(
        home,
        &ControllerInfo {
            pid: std::process::id(),
            api: api.clone(),
            start: imago_runtime::state::own_start_time(),
        },
    )?;
    note(Note::Running {
        pid: std::process::id(),
        api,
        dataplane,
    });
    // `nudge_controller`: a pass at once when a release was recorded.
    let wake = controller.waker();
    if let Ok(mut nudges) = runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
            rustix::process::Signal::URG.as_raw(),
        ))
    }) {
        runtime.spawn(async move {
            while nudges.recv().await.is_some() {
                wake.nudge();
            }
        });
    }
    loop {
        let pass_started = Instant::now();
        let pass = controller.pass();
        crate::metrics::live().observe_pass(pass_started.elapsed());
        match pass {
            Ok(passes) => {
                for p in passes {
                    note(Note::Pass(p));
                }
            }
            Err(e) => note(Note::PassFailed(e)),
        }
        controller.wait_for_next_pass(options.interval);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A real process that has exited: its pid names nobody.
    fn dead_pid() -> u32 {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// `<dir>/controller.sh`: a controller that runs but never finishes its set-up.
    fn never_ready_controller(dir: &Path) -> PathBuf {
        let exe = dir.join("controller.sh");
        std::fs::write(&exe, "#!/bin/sh\nexec sleep 120\n").unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        exe
    }

    /// The process that `said` (an error of `ensure_controller`) names, if it still runs;
    /// killed, so that a failing test leaves none behind.
    fn still_running(said: &str) -> Option<i32> {
        let pid = said
            .split_once("pid ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .and_then(|pid| pid.parse::<i32>().ok())
            .filter(|&pid| imago_runtime::state::process_start_time(pid).is_some())?;
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
        Some(pid)
    }

    /// While a new controller sets up (it holds the lock, its `controller.json` is not written
    /// yet) the file is a dead controller's, whose pid another process may have now: that
    /// process is neither signalled by `nudge_controller` nor taken for imago's by `own_pids`
    /// (both go through `running_controller_info`).
    #[test]
    fn a_dead_controllers_file_names_no_process_of_this_home() {
        let tmp = tempfile::tempdir().unwrap();
        let home = DeployHome::new(tmp.path());
        let _lock = lock_controller(&home).unwrap();
        // Another process has the pid now: its start time is not the one the file says.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = other.id();
        let start = imago_runtime::state::process_start_time(pid as i32).unwrap();
        let write = |start: u64| {
            write_info(
                &home,
                &ControllerInfo {
                    pid,
                    api: "127.0.0.1:1".into(),
                    start: Some(start),
                },
            )
            .unwrap()
        };
        write(start + 1);
        assert!(!own_pids(&home).contains(&pid), "{:?}", own_pids(&home));
        assert!(running_controller_info(&home).is_none());
        // With its own start time the file is the running controller's.
        write(start);
        assert!(own_pids(&home).contains(&pid), "{:?}", own_pids(&home));
        other.kill().unwrap();
        other.wait().unwrap();
    }

    /// The reason a controller that failed its set-up logged is found at the end of a log
    /// that every controller of the home appended to, however long: here a sparse terabyte
    /// before it, which reading the whole log to find it could not even hold in memory.
    #[test]
    fn the_last_log_line_is_read_from_the_end_of_a_log_of_any_size() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("controller.log");
        let mut file = File::create(&log).unwrap();
        file.write_all(b"an earlier controller's reason\n").unwrap();
        file.set_len(1 << 40).unwrap();
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        let from = 1 << 40;
        assert_eq!(last_log_line(&log, from), None, "nothing logged since");
        file.write_all(b"starting\nError: the data plane did not start\n  \n")
            .unwrap();
        assert_eq!(
            last_log_line(&log, from).as_deref(),
            Some("Error: the data plane did not start")
        );
        // A short log, read from where the command started: nothing before it counts.
        let short = tmp.path().join("short.log");
        std::fs::write(&short, b"old reason\nnew reason\n\n").unwrap();
        assert_eq!(last_log_line(&short, 0).as_deref(), Some("new reason"));
        assert_eq!(last_log_line(&short, 11).as_deref(), Some("new reason"));
        assert_eq!(last_log_line(&short, 22), None);
        // A line longer than what is read: its end.
        let long = tmp.path().join("long.log");
        let line = "x".repeat(LOG_TAIL as usize * 2);
        std::fs::write(&long, format!("{line}y\n")).unwrap();
        let read = last_log_line(&long, 0).unwrap();
        assert!(
            read.ends_with("xy") && read.len() < line.len(),
            "{}",
            read.len()
        );
    }

    /// When the start time of the controller it spawned cannot be read (here /proc is hidden
    /// from the command), `ensure_controller` cannot tell that process's `controller.json` from
    /// one an earlier controller of the same pid left, and waited out its whole set-up time
    /// (60 s) to say so. It now fails at once, saying why, and stops the process. The command
    /// runs in a child (this test again, in its own mount namespace with a tmpfs over /proc,
    /// through `unshare`), with `IMAGO_TEST_HIDDEN_PROC_HOME` naming the home. Needs root.
    #[test]
    fn a_controller_whose_start_time_cannot_be_read_fails_at_once_with_the_reason() {
        const CHILD: &str = "IMAGO_TEST_HIDDEN_PROC_HOME";
        if let Some(root) = std::env::var_os(CHILD) {
            let root = PathBuf::from(root);
            let home = DeployHome::new(&root);
            let exe = root.join("controller.sh");
            let started = Instant::now();
            let result = ensure_controller(&home, &exe, &[]);
            let said = match result {
                Ok(pid) => format!("started {pid:?}"),
                Err(e) => e.to_string(),
            };
            std::fs::write(
                root.join("result"),
                format!("{}\n{said}", started.elapsed().as_millis()),
            )
            .unwrap();
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        never_ready_controller(tmp.path());
        let status = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs none /proc && exec \"$0\" \"$@\"")
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "daemon::tests::a_controller_whose_start_time_cannot_be_read_fails_at_once_with_the_reason",
                "--test-threads=1",
            ])
            .env(CHILD, tmp.path())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{status}");
        let result = std::fs::read_to_string(tmp.path().join("result")).unwrap();
        let (millis, said) = result.split_once('\n').unwrap();
        let still_runs = still_running(said);
        assert!(
            said.contains("did not start") && said.contains("/stat") && said.contains("start time"),
            "{said}"
        );
        let millis: u64 = millis.parse().unwrap();
        assert!(millis < 20_000, "took {millis} ms to say: {said}");
        assert_eq!(
            still_runs, None,
            "the controller it said did not start still runs"
        );
    }

    /// A controller that has not finished its set-up in time (here one that never does) is
    /// reported as not started, and stopped: it kept running, and became the controller
    /// after the command had said it did not start.
    #[test]
    fn a_controller_whose_set_up_takes_too_long_is_reported_and_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let home = DeployHome::new(tmp.path());
        let exe = never_ready_controller(tmp.path());
        let started = Instant::now();
        let err = ensure_controller_within(&home, &exe, &[], Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(20), "{err}");
        assert!(
            err.contains("did not start") && err.contains("set-up after 0.5 s"),
            "{err}"
        );
        assert_eq!(
            still_running(&err),
            None,
            "said not started, still runs: {err}"
        );
    }

    /// A controller killed between the write of its pid file and the rename left its temporary
    /// file beside it for good (one per pid that ever ran a controller there); the next
    /// controller removes those of dead writers when it writes its own.
    #[test]
    fn a_controller_removes_the_pid_files_that_killed_controllers_left_half_written() {
        let tmp = tempfile::tempdir().unwrap();
        let home = DeployHome::new(tmp.path());
        home.create().unwrap();
        let dead = dead_pid();
        let stale = [
            home.dir.join(format!(".controller.json.{dead}")),
            home.dir.join(format!(".controller.json.{dead}.3.tmp")),
        ];
        for file in &stale {
            std::fs::write(file, b"{\"pid\":").unwrap();
        }
        let info = ControllerInfo {
            pid: std::process::id(),
            api: "127.0.0.1:1".into(),
            start: imago_runtime::state::own_start_time(),
        };
        write_info(&home, &info).unwrap();
        let read = read_info(&home).unwrap();
        assert_eq!((read.pid, read.start), (info.pid, info.start));
        let names: Vec<String> = std::fs::read_dir(&home.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["controller.json".to_owned()]);
    }
}
