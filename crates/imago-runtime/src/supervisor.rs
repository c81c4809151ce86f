//! The per-instance supervisor: a small, single-threaded process (the hidden `__supervise`
//! subcommand of the imago binary) that owns one container from start to exit.
//!
//! It detaches (setsid), becomes a child subreaper so the container's init is re-parented to it,
//! starts the container with the embedded engine or `runc`, tells its launcher "ok" or the error
//! over its stdout pipe (for a private network it first waits, on its stdin pipe, for the
//! launcher to create the network namespace and then to configure it: see [`GATE_NAMESPACE`]), then copies the container's output into a rotating log file, forwards a
//! stop request (SIGTERM, SIGKILL after the grace period) and records the exit status atomically.
//! It must never run inside a multi-threaded runtime: libcontainer clone()s the calling process.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::local::Layout;
use crate::state::{Instance, InstanceDir, Status, now_ms, process_start_time};
use crate::{Engine, NetworkMode, RuntimeError};

/// The supervisor's command name (comm), at most 15 bytes.
pub const SUPERVISOR_NAME: &std::ffi::CStr = c"imago-supervise";

/// Written by the launcher on the supervisor's gate pipe (its stdin) once the instance's network
/// namespace exists: the engine may create the container in it.
pub const GATE_NAMESPACE: u8 = b'n';
/// Written next, once the namespace is configured: the engine may start the program. The
/// launcher closing the pipe instead means its network set-up failed: the launch is abandoned.
pub const GATE_CONFIGURED: u8 = b'g';

/// Whether this process has exactly one thread, so that fork() copies all of it.
pub fn single_threaded() -> bool {
    // /proc/self/task lists every thread; status would need a parse for the same answer.
    match fs::read_dir("/proc/self/task") {
        Ok(rd) => rd.take(2).count() == 1,
        Err(_) => false,
    }
}

/// Starts the supervisor of `id` by forking this process instead of exec'ing a program: it saves
/// the exec of the (large) imago binary, its dynamic loading and its startup. Returns the child's
/// pid, the read end of its handshake pipe and the write end of its gate pipe (see
/// [`GATE_NAMESPACE`]; dropping it unwritten abandons a private-network launch). The caller must be single-threaded
/// ([`single_threaded`]); otherwise (or if this fails) it uses a [`crate::SupervisorCommand`].
pub fn fork_supervisor(home: &Path, id: &str) -> Result<(Pid, File, File), RuntimeError> {
    let err = |reason: String| RuntimeError::Supervisor {
        id: id.to_owned(),
        reason,
    };
    if !single_threaded() {
        return Err(err("the launcher is multi-threaded".into()));
    }
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| err(format!("cannot create the handshake pipe: {e}")))?;
    let (gate_read, gate_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| err(format!("cannot create the gate pipe: {e}")))?;
    // Opened before the fork so that the child only rearranges descriptors.
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(RuntimeError::io("cannot open", "/dev/null"))?;
    match fork_single_threaded().map_err(|e| err(format!("cannot fork: {e}")))? {
        nix::unistd::ForkResult::Parent { child } => {
            Ok((child, File::from(read), File::from(gate_write)))
        }
        nix::unistd::ForkResult::Child => {
            drop(read);
            drop(gate_write);
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                forked_supervisor(home, id, gate_read, write, null)
            }))
            .unwrap_or(101);
            // Never return into the launcher's stack (no destructor of its state runs). Like the
            // exec'd supervisor, exit through std: its only cleanup is flushing std's stdout
            // buffer, which now goes to /dev/null; imago registers no atexit handlers.
            std::process::exit(code)
        }
    }
}

/// A child forked at the top of a launch (see [`warm_cgroup_lock`]); stopped and reaped by
/// [`CgroupLockWarmup::finish`] or on drop.
#[derive(Debug)]
pub struct CgroupLockWarmup {
    child: Option<Pid>,
}

/// How often the warm-up child writes into its `cgroup.procs`: well under one RCU grace period
/// here (5.2-21.9 ms measured, BENCHMARKS.md), so the kernel's `rcu_sync` of the cgroup lock
/// never falls back to idle between two writes.
pub const CGROUP_WARMUP_INTERVAL: Duration = Duration::from_millis(3);

/// How long the warm-up child keeps writing if nobody stops it (its launcher killed with -9):
/// longer than any launch on a loaded host, short enough that a leftover costs nothing.
pub const CGROUP_WARMUP_LIMIT: Duration = Duration::from_secs(2);

/// Forks a child that writes `0` into its own cgroup's `cgroup.procs` every
/// [`CGROUP_WARMUP_INTERVAL`] until [`CgroupLockWarmup::finish`] stops it: a move to where it
/// already is, which still takes the kernel's `cgroup_threadgroup_rwsem` for writing. Without
/// the cgroup `favordynmods` tuning (`scripts/tune-launch`) the first writer after a quiet moment
/// waits for an RCU grace period (5.8-10 ms measured here, see BENCHMARKS.md), and a writer
/// arriving within one grace period after the previous one left does not: the `rcu_sync` in
/// front of that lock stays "passed" for a grace period after its last writer. One write at the
/// top of the launch (what this did first) covers only a quick launch: in a slow one (a loaded
/// host) the engine's writes, one per v1 hierarchy, come more than a grace period later, the
/// lock has gone idle again and they wait anyway (14-24 ms per launch measured). Kept warm by
/// repeated writes, every `cgroup.procs` write of the launch finds it passed. Only a hint: it does nothing in a
/// multi-threaded process (fork would be unsound), and every failure is ignored.
pub fn warm_cgroup_lock() -> CgroupLockWarmup {
    if !single_threaded() {
        return CgroupLockWarmup { child: None };
    }
    let launcher = nix::unistd::getpid();
    match fork_single_threaded() {
        Ok(nix::unistd::ForkResult::Parent { child }) => CgroupLockWarmup { child: Some(child) },
        Ok(nix::unistd::ForkResult::Child) => {
            let wrote =
                std::panic::catch_unwind(|| keep_cgroup_lock_warm(launcher)).unwrap_or(false);
            // Never return into the launcher's stack; nothing was printed yet, so std's exit
            // flushes nothing.
            std::process::exit(if wrote { 0 } else { 1 })
        }
        Err(_) => CgroupLockWarmup { child: None },
    }
}

/// Writes `0` into the `cgroup.procs` of this process's cgroup2 cgroup (the `0::` line of
/// `/proc/self/cgroup`) every [`CGROUP_WARMUP_INTERVAL`] for at most [`CGROUP_WARMUP_LIMIT`];
/// returns at once with `false` if the first write fails (no cgroup2 tree, not root) or
/// `launcher` is gone already, with
/// `true` at the limit. Normally it is killed before that by [`CgroupLockWarmup::finish`].
fn keep_cgroup_lock_warm(launcher: Pid) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    // Dies with its launcher (a kill -9 of `imago run` leaves nothing writing), and holds none
    // of its standard descriptors: `$(imago run ...)` reads the launcher's stdout to EOF.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid() != launcher {
        // It died before the line above took effect.
        return false;
    }
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for target in 0..=2 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), target);
        }
    }
    let Some(procs) = own_cgroup2_procs() else {
        return false;
    };
    let until = Instant::now() + CGROUP_WARMUP_LIMIT;
    loop {
        if procs.write_all_at(b"0", 0).is_err() {
            return false;
        }
        if Instant::now() >= until {
            return true;
        }
        std::thread::sleep(CGROUP_WARMUP_INTERVAL);
    }
}

/// Whether the cgroup moves of a launch take the kernel's global `cgroup_threadgroup_rwsem`
/// for writing, which is what [`warm_cgroup_lock`] is for: `runc` (its engine writes the
/// init's pid into every `cgroup.procs`) or a host with only the cgroup2 tree (libcgroups'
/// cgroup2 manager writes `cgroup.procs` too). Not the embedded engine on a host with v1
/// hierarchies (hybrid or legacy): its init joins them by writing `0` into their `tasks`
/// files, which takes only `cgroup_mutex` (vendored libcgroups, `join_self`). There the
/// warm-up is worse than useless: each of its writes that finds the lock's `rcu_sync` idle
/// waits a whole grace period while holding `cgroup_mutex`, and the init's `mkdir` of its
/// cgroups and its `tasks` writes wait for that mutex (traced: the init asleep 10-30 ms on a
/// busy host until the warm-up's write returned). `true` when the layout cannot be told.
pub fn launch_takes_the_cgroup_lock(runc: bool) -> bool {
    runc || cgroup2_only()
}

/// Whether `/sys/fs/cgroup` is the cgroup2 tree itself (no v1 hierarchies); `true` if that
/// cannot be told.
fn cgroup2_only() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(true)
}

/// This process's cgroup2 `cgroup.procs` (the `0::` line of `/proc/self/cgroup`), open for
/// writing; `None` without a cgroup2 tree or as a user who may not write it.
fn own_cgroup2_procs() -> Option<File> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = cgroup2_mount()?;
    File::options()
        .write(true)
        .open(root.join(own.trim_start_matches('/')).join("cgroup.procs"))
        .ok()
}

/// The warm-up of [`warm_cgroup_lock`] for a multi-threaded launcher (the deploy controller,
/// whose launches of a wave run side by side), where forking is unsound: one thread of its own,
/// running while at least one launch holds a [`SharedWarmupGuard`]. Its writes of `0` move the
/// whole launcher to the cgroup it is in, which takes the same global lock for writing; the
/// engine's writes are the supervisors' (other processes), and the lock is global.
#[derive(Debug, Default)]
pub struct SharedCgroupWarmup {
    state: std::sync::Mutex<SharedWarmupState>,
}

#[derive(Debug, Default)]
struct SharedWarmupState {
    holders: usize,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Keeps a [`SharedCgroupWarmup`] running until dropped.
#[derive(Debug)]
pub struct SharedWarmupGuard<'a> {
    shared: &'a SharedCgroupWarmup,
}

impl SharedCgroupWarmup {
    /// Starts the thread if no launch holds it yet. Only a hint: without a writable cgroup2
    /// `cgroup.procs` the thread ends at once, and every failure is ignored.
    pub fn hold(&self) -> SharedWarmupGuard<'_> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.holders += 1;
        if state.holders == 1 {
            if let Some(old) = state.thread.take() {
                // Told to stop by the last guard; it ends within one interval.
                let _ = old.join();
            }
            let stop = Arc::new(AtomicBool::new(false));
            state.stop = stop.clone();
            state.thread = std::thread::Builder::new()
                .name("cgroup-warmup".into())
                .spawn(move || {
                    let Some(procs) = own_cgroup2_procs() else {
                        return;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        if std::os::unix::fs::FileExt::write_all_at(&procs, b"0", 0).is_err() {
                            return;
                        }
                        std::thread::sleep(CGROUP_WARMUP_INTERVAL);
                    }
                })
                .ok();
        }
        SharedWarmupGuard { shared: self }
    }

    /// Whether the thread runs (it has not ended on its own).
    pub fn running(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for SharedWarmupGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        state.holders -= 1;
        if state.holders == 0 {
            // Not joined here: the launch that dropped its guard need not wait out a sleep.
            state.stop.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for SharedCgroupWarmup {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        state.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = state.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where the cgroup2 tree is mounted, the root of the tree as this process sees it (from
/// `/proc/self/mountinfo`): `/sys/fs/cgroup/unified` on a hybrid host like this one,
/// `/sys/fs/cgroup` on a pure v2 one.
pub(crate) fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        let mut fields = left.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(point.replace("\\040", " ")))
    })
}

impl CgroupLockWarmup {
    /// The forked child, if there is one not reaped yet.
    pub fn pid(&self) -> Option<Pid> {
        self.child
    }

    /// Stops the child (call this when the launch is done: the engine has made its last
    /// `cgroup.procs` write) and reaps it; whether its writes into `cgroup.procs` succeeded,
    /// `None` if no child was forked.
    pub fn finish(mut self) -> Option<bool> {
        self.reap()
    }

    fn reap(&mut self) -> Option<bool> {
        let child = self.child.take()?;
        // SIGKILL, not SIGTERM: the child has nothing to clean up, and it must not depend on
        // what the launcher did with SIGTERM's disposition before forking it.
        let _ = kill(child, Signal::SIGKILL);
        loop {
            match waitpid(child, None) {
                // Killed while still writing (the usual end), or ended at its limit.
                Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => return Some(true),
                Ok(WaitStatus::Exited(_, code)) => return Some(code == 0),
                Err(Errno::EINTR) => continue,
                _ => return Some(false),
            }
        }
    }
}

impl Drop for CgroupLockWarmup {
    fn drop(&mut self) {
        // A launch that failed early: still no zombie.
        let _ = self.reap();
    }
}

/// fork(2) if this process is single-threaded; `ENOTSUP` (and no fork) if it is not, or if
/// that cannot be told. The check is made here, not left to the caller, so that this is a
/// safe function: nothing a caller does can make the fork unsound.
#[allow(unsafe_code)]
pub(crate) fn fork_single_threaded() -> nix::Result<nix::unistd::ForkResult> {
    if !single_threaded() {
        return Err(Errno::ENOTSUP);
    }
    // SAFETY: fork is unsound in a multi-threaded process because the child gets only the
    // calling thread while locks (allocator, stdio) may be held by threads that vanish. This
    // process has one thread (checked just above; only this thread could have started another
    // since, and it did not), so the child is a complete copy with no lock held by anyone else.
    unsafe { nix::unistd::fork() }
}

/// The forked child: the same descriptors as an exec'd supervisor (stdin the gate pipe, stdout
/// the handshake pipe, stderr /dev/null, nothing else), then [`supervise`].
fn forked_supervisor(home: &Path, id: &str, gate: OwnedFd, handshake: OwnedFd, null: File) -> i32 {
    use std::os::fd::AsRawFd;
    // The launcher's stdout may be a pipe its caller reads to EOF (`$(imago run ...)`): no
    // copy of it, nor of any other launcher descriptor, may stay open here.
    for target in 0..=2 {
        if nix::unistd::dup2(null.as_raw_fd(), target).is_err() {
            return 1;
        }
    }
    drop(null);
    let keep = [handshake.as_raw_fd(), gate.as_raw_fd()];
    let open: Vec<i32> = match fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect(),
        Err(_) => return 1,
    };
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
    let mut handshake = File::from(handshake);
    supervise(home, id, &mut File::from(gate), &mut handshake)
}

/// Each log file is rotated when it would grow past this; one rotated file is kept.
pub const LOG_MAX_BYTES: u64 = 1 << 20;
/// Grace period when the stop request does not say otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Runs the supervisor of instance `id` under `home`; returns the process exit code.
/// `gate` is read only for a private network (see [`GATE_NAMESPACE`]); `handshake` is the
/// launcher's pipe: it receives exactly one line, `ok <pid>` or `error <text>`.
pub fn supervise(home: &Path, id: &str, gate: &mut dyn Read, handshake: &mut dyn Write) -> i32 {
    // A new session: the launcher's terminal and process group no longer reach us.
    let _ = nix::unistd::setsid();
    // One name in `ps` whether it was exec'd or forked from the launcher (whose argv it keeps).
    let _ = nix::sys::prctl::set_name(SUPERVISOR_NAME);
    let layout = Layout::new(home);
    let dir = layout.instance_dir(id);
    let mut record = match dir.read_state() {
        Ok(r) => r,
        Err(e) => {
            tell(handshake, &format!("error {e}"));
            return 1;
        }
    };
    match start(&layout, &dir, &mut record, gate) {
        Ok(mut running) => {
            // Before "ok": from then on the launcher (or anyone) may ask us to stop, and an
            // unhandled SIGTERM would kill the supervisor and leave the container orphaned.
            let signals = Signals::register();
            tell(handshake, &format!("ok {}", running.pid));
            if let Some(check) = running.load_check.take() {
                check.record();
            }
            // The launch wrote its records unsynced so that nobody waited for the disk; make
            // them durable now. A failure leaves them in the page cache, readable until a crash,
            // and there is nobody left to tell.
            let _ = dir.sync();
            let code = running.run(&dir, &mut record, &signals);
            running.cleanup();
            // If this write fails there is nobody left to tell: the record keeps saying
            // "running" and is reported as lost once this process has exited.
            match dir.write_state(&record) {
                Ok(()) => code,
                Err(_) => 1,
            }
        }
        Err(e) => {
            // The launcher says "instance ID failed to start: " itself, and so does the record's
            // status: an engine's failure carries only its reason (it was said twice).
            let reason = match e {
                RuntimeError::StartFailed { reason, .. } => reason,
                other => other.to_string(),
            };
            record.status = Status::Failed;
            record.error = Some(reason.clone());
            record.finished_ms = Some(now_ms());
            let _ = dir.write_state(&record);
            tell(handshake, &format!("error {reason}"));
            1
        }
    }
}

/// Writes `line` and its newline to the launcher's handshake pipe in one `write(2)`: the
/// launcher wakes at the first byte and reads until the newline, so a line written in pieces
/// (as `writeln!` on a `File` does: one write per formatted piece) costs it a wake-up per
/// piece and, on a busy host, a wait for this process to be scheduled again in between.
fn tell(handshake: &mut dyn Write, line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    let _ = handshake.write_all(&bytes);
    let _ = handshake.flush();
}

enum EngineHandle {
    Embedded(Box<Container>),
    Runc { root: PathBuf, id: String },
}

struct Running {
    pid: Pid,
    engine: EngineHandle,
    log_pipe: OwnedFd,
    /// Where the kernel counts OOM kills in the instance's memory cgroup, found while it runs.
    oom_files: Vec<PathBuf>,
    /// The seccomp filter's check at create passed: recorded after "ok", off the launch's path.
    load_check: Option<crate::seccomp_cache::LoadCheck>,
}

/// How a supervisor's error begins when its launcher died (or closed the gate) mid-launch:
/// see [`crate::Instance::launch_interrupted`].
pub const LAUNCHER_GAVE_UP: &str = "the launcher gave up";

/// Waits for the launcher's `step` on the gate (only for a private network).
fn pass_gate(
    gate: &mut dyn Read,
    record: &Instance,
    step: u8,
    what: &str,
) -> Result<(), RuntimeError> {
    if record.network != NetworkMode::Private {
        return Ok(());
    }
    let mut byte = [0u8; 1];
    match gate.read(&mut byte) {
        Ok(1) if byte[0] == step => Ok(()),
        _ => Err(RuntimeError::Supervisor {
            id: record.id.clone(),
            reason: format!("{LAUNCHER_GAVE_UP} before the network was {what}"),
        }),
    }
}

fn start(
    layout: &Layout,
    dir: &InstanceDir,
    record: &mut Instance,
    gate: &mut dyn Read,
) -> Result<Running, RuntimeError> {
    let id = record.id.clone();
    let sup_err = |reason: String| RuntimeError::Supervisor {
        id: id.clone(),
        reason,
    };
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| sup_err(format!("cannot become a subreaper: {e}")))?;
    let (log_r, log_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| sup_err(format!("cannot create the log pipe: {e}")))?;
    let log_w2 = log_w
        .try_clone()
        .map_err(|e| sup_err(format!("cannot duplicate the log pipe: {e}")))?;
    let null = File::open("/dev/null").map_err(RuntimeError::io("cannot open", "/dev/null"))?;
    let bundle = dir.bundle();
    let engine_err = |reason: String| RuntimeError::StartFailed {
        id: id.clone(),
        reason,
    };

    // The engine joins the namespace when it creates the container; the program must find it
    // configured when it starts. The launcher does both while the engine works.
    pass_gate(gate, record, GATE_NAMESPACE, "created")?;
    let mut load_check = None;
    let (pid, engine) = match record.engine {
        Engine::Embedded => {
            let root = layout.youki_root();
            fs::create_dir_all(&root).map_err(RuntimeError::io("cannot create", &root))?;
            let seccomp = crate::seccomp_cache::bundle_filter(
                &bundle,
                &crate::seccomp_cache::FilterCache::new(layout.seccomp_cache()),
            )?;
            load_check = seccomp
                .as_ref()
                .and_then(crate::seccomp_cache::PrecompiledSeccomp::load_check);
            let mut builder = ContainerBuilder::new(id.clone(), SyscallType::Linux);
            if let Some(executor) = seccomp {
                builder = builder.with_executor(executor);
            }
            let builder = builder
                .with_root_path(&root)
                .map_err(|e| engine_err(e.to_string()))?
                .with_stdin(null)
                .with_stdout(log_w)
                .with_stderr(log_w2)
                .validate_id()
                .map_err(|e| engine_err(e.to_string()))?;
            let mut container = match builder
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
            {
                Ok(c) => c,
                Err(e) => {
                    delete_embedded_leftovers(&root, &id);
                    return Err(engine_err(error_chain(&e)));
                }
            };
            if let Err(e) = pass_gate(gate, record, GATE_CONFIGURED, "configured") {
                let _ = container.delete(true);
                reap_killed_init(container.pid());
                // The engine's delete gives up on the cgroups while the killed init is still
                // in them (a loaded host runs its exit late); reaped now, they are empty.
                crate::local::remove_cgroups(&id);
                return Err(e);
            }
            if let Err(e) = container.start() {
                let _ = container.delete(true);
                return Err(engine_err(error_chain(&e)));
            }
            let pid = container
                .pid()
                .ok_or_else(|| engine_err("the engine reported no pid".into()))?;
            (pid, EngineHandle::Embedded(Box::new(container)))
        }
        Engine::Runc => {
            let root = layout.runc_root();
            let pid_file = dir.root.join("container.pid");
            let out = Command::new("runc")
                .arg("--root")
                .arg(&root)
                .arg("create")
                .arg("--bundle")
                .arg(&bundle)
                .arg("--pid-file")
                .arg(&pid_file)
                .arg(&id)
                .stdin(null)
                .stdout(Stdio::from(log_w))
                .stderr(Stdio::from(log_w2))
                .status()
                .map_err(|e| engine_err(format!("cannot run runc: {e}")))?;
            if !out.success() {
                let msg = drain_nonblocking(&log_r);
                let _ = runc(&root, &["delete", "--force", &id]);
                return Err(engine_err(format!(
                    "runc create failed: {}",
                    runc_message(&msg)
                )));
            }
            let pid = match read_pid_file(&pid_file) {
                Ok(pid) => pid,
                Err(reason) => {
                    // runc created the container (its init waits for `start`): without its pid
                    // it is of no use, and nobody else would ever delete it.
                    let _ = runc(&root, &["delete", "--force", &id]);
                    reap_inherited();
                    return Err(engine_err(reason));
                }
            };
            if let Err(e) = pass_gate(gate, record, GATE_CONFIGURED, "configured") {
                let _ = runc(&root, &["delete", "--force", &id]);
                reap_killed_init(Some(pid));
                crate::local::remove_cgroups(&id);
                return Err(e);
            }
            if let Err(e) = runc(&root, &["start", &id]) {
                let _ = runc(&root, &["delete", "--force", &id]);
                return Err(engine_err(format!("runc start failed: {e}")));
            }
            (
                pid,
                EngineHandle::Runc {
                    root,
                    id: id.clone(),
                },
            )
        }
    };
    // "Running" must mean the instance's own program runs, not that the engine was asked to
    // start it: both engines return from start once they have told their init to exec.
    wait_for_exec(pid);
    record.status = Status::Running;
    record.pid = Some(pid.as_raw());
    let me = std::process::id() as i32;
    record.supervisor_pid = Some(me);
    record.supervisor_start = process_start_time(me);
    record.started_ms = Some(now_ms());
    let mut running = Running {
        pid,
        engine,
        log_pipe: log_r,
        oom_files: instance_oom_files(pid, &crate::local::cgroups_path(&id)),
        load_check,
    };
    if let Err(e) = dir.write_state_unsynced(record) {
        // Without a record naming its pid and supervisor the instance would run unowned (no
        // stop reaches it) while the launcher reports the launch failed: stop it, so that the
        // failure is the whole truth.
        running.cleanup();
        reap_killed_init(Some(pid));
        return Err(sup_err(format!(
            "cannot record the instance as running, so it was stopped: {e}"
        )));
    }
    Ok(running)
}

/// The pid runc wrote to `path` (`--pid-file`).
fn read_pid_file(path: &Path) -> Result<Pid, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map(Pid::from_raw)
        .map_err(|_| format!("bad pid file {}: {:?}", path.display(), text))
}

/// Reaps the children this subreaper inherited from a container just deleted whose init's pid
/// is not known (so [`reap_killed_init`] cannot be used), waiting at most [`EXEC_WAIT`] for
/// them to die: a zombie would stay in the instance's cgroup once this process exits. At this
/// point the supervisor has no other children.
fn reap_inherited() {
    let deadline = Instant::now() + EXEC_WAIT;
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
    }
}

/// Waits for the init of a container deleted before it started: this subreaper inherited it,
/// and it would stay a zombie (in the instance's cgroup) once this process exits.
fn reap_killed_init(pid: Option<Pid>) {
    if let Some(pid) = pid {
        // Already killed by the engine's delete; again in case that failed, so the wait ends.
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
}

/// Names the engines give their container init until it execs the instance's program.
const ENGINE_INIT_NAMES: &[&str] = &["youki:[2:INIT]", "runc:[2:INIT]"];
/// Longest wait for the exec; it normally follows the engine's start within a millisecond.
const EXEC_WAIT: Duration = Duration::from_secs(2);

/// Waits until the container's init has exec'd (its command name is no longer the engine's),
/// has exited (the run loop records how), or [`EXEC_WAIT`] passed.
fn wait_for_exec(pid: Pid) {
    let comm = format!("/proc/{pid}/comm");
    let deadline = Instant::now() + EXEC_WAIT;
    loop {
        let name = match fs::read_to_string(&comm) {
            Ok(name) => name,
            Err(_) => return,
        };
        if !ENGINE_INIT_NAMES.contains(&name.trim_end())
            || process_start_time(pid.as_raw()).is_none()
            || Instant::now() > deadline
        {
            return;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn runc(root: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run runc: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(runc_message(&out.stderr))
    }
}

/// runc logs `time=... level=error msg="..."`; keep the message.
fn runc_message(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    match line.find("msg=") {
        Some(i) => line[i + 4..].trim_matches('"').to_owned(),
        None => line.to_owned(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

fn delete_embedded_leftovers(root: &Path, id: &str) {
    if let Ok(mut c) = Container::load(root.join(id)) {
        let _ = c.delete(true);
    }
    let _ = fs::remove_dir_all(root.join(id));
}

fn drain_nonblocking(fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    if fcntl(fd_raw(fd), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_err() {
        return out;
    }
    let mut file = File::from(match fd.try_clone() {
        Ok(f) => f,
        Err(_) => return out,
    });
    let mut buf = [0u8; 65536];
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn fd_raw(fd: &OwnedFd) -> std::os::fd::RawFd {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// Signals the supervisor handles by setting flags that its run loop reads.
struct Signals {
    /// SIGTERM or SIGINT: stop the container.
    stop: Arc<AtomicBool>,
}

impl Signals {
    fn register() -> Signals {
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
        }
        // Only to interrupt poll() promptly when a child exits.
        let wake = Arc::new(AtomicBool::new(false));
        let _ = signal_hook::flag::register(signal_hook::consts::SIGCHLD, wake);
        Signals { stop }
    }
}

impl Running {
    /// Copies output and handles stop requests until the container's init exits; returns the
    /// supervisor's exit code and leaves the final state in `record`.
    fn run(&mut self, dir: &InstanceDir, record: &mut Instance, signals: &Signals) -> i32 {
        let stop = &signals.stop;

        let mut log = LogWriter::open(dir.log(), dir.rotated_log());
        let mut pipe = match self.log_pipe.try_clone() {
            Ok(fd) => Some(File::from(fd)),
            Err(_) => None,
        };
        let mut stop_deadline: Option<Instant> = None;
        let mut killed = false;
        let mut buf = vec![0u8; 64 * 1024];
        let exit_code = loop {
            if let Some(code) = self.reap() {
                break code;
            }
            if stop.load(Ordering::Relaxed) && stop_deadline.is_none() {
                let grace = fs::read_to_string(dir.stop_request())
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_GRACE);
                record.stop_requested = true;
                let _ = dir.write_state(record);
                let _ = kill(self.pid, Signal::SIGTERM);
                stop_deadline = Some(Instant::now() + grace);
            }
            let mut timeout = 200u16;
            if let Some(deadline) = stop_deadline {
                let now = Instant::now();
                if now >= deadline {
                    if !killed {
                        let _ = kill(self.pid, Signal::SIGKILL);
                        killed = true;
                    }
                } else {
                    timeout = timeout.min((deadline - now).as_millis().min(200) as u16 + 1);
                }
            }
            match pipe.as_mut() {
                Some(p) => {
                    let mut fds = [PollFd::new(p.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::from(timeout)) {
                        Ok(n) if n > 0 => match p.read(&mut buf) {
                            Ok(0) => pipe = None,
                            Ok(n) => log.write(&buf[..n]),
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => pipe = None,
                        },
                        _ => {}
                    }
                }
                None => {
                    // Output closed (or failed) but the process lives on: just wait for signals.
                    let mut none: [PollFd; 0] = [];
                    let _ = poll(&mut none, PollTimeout::from(timeout));
                }
            }
        };
        if let Some(p) = pipe.as_ref() {
            let rest = drain_nonblocking(&match p.try_clone() {
                Ok(f) => OwnedFd::from(f),
                Err(_) => return self.finish(record, exit_code),
            });
            log.write(&rest);
        }
        self.finish(record, exit_code)
    }

    fn finish(&mut self, record: &mut Instance, exit_code: i32) -> i32 {
        record.oom_killed = oom_killed(&self.oom_files);
        record.status = Status::Exited;
        record.exit_code = Some(exit_code);
        record.finished_ms = Some(now_ms());
        0
    }

    /// Reaps every exited child; returns the container init's exit code once it is among them.
    fn reap(&self) -> Option<i32> {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == self.pid => return Some(code),
                Ok(WaitStatus::Signaled(p, sig, _)) if p == self.pid => {
                    return Some(128 + sig as i32);
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return None,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Releases what the engine holds for the container (its state and cgroups).
    fn cleanup(&mut self) {
        match &mut self.engine {
            EngineHandle::Embedded(c) => {
                let _ = c.refresh_status();
                let _ = c.delete(true);
            }
            EngineHandle::Runc { root, id } => {
                let _ = runc(root, &["delete", "--force", id]);
            }
        }
    }
}

/// The files where the kernel counts OOM kills in the cgroups of the running process `pid`:
/// its cgroups as `/proc/PID/cgroup` names them, under the cgroup file systems this process has
/// mounted (`/proc/self/mountinfo`), wherever they are. If the process is already gone, the
/// engine's `cgroups_path` in each hierarchy.
fn instance_oom_files(pid: Pid, cgroups_path: &str) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|_| format!("0::{cgroups_path}\n1:memory:{cgroups_path}\n"));
    oom_files(&cgroups, &mountinfo)
}

/// For each cgroup of `proc_cgroup` (`ID:CONTROLLERS:PATH` lines) with a memory controller
/// mounted in `mountinfo`: cgroup2's `memory.events`, v1's `memory.oom_control`. A path is
/// taken relative to the root of the mount (which is not `/` inside a cgroup namespace or for
/// a bind mount of a subtree); a cgroup outside a mount's root is not under that mount.
fn oom_files(proc_cgroup: &str, mountinfo: &str) -> Vec<PathBuf> {
    // (root, mount point, fstype, super options) of every cgroup file system.
    let mounts: Vec<(&str, PathBuf, &str, &str)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let options = right.nth(1).unwrap_or("");
            let mut left = left.split(' ');
            let root = left.nth(3)?;
            let point = PathBuf::from(left.next()?.replace("\\040", " "));
            matches!(fstype, "cgroup" | "cgroup2").then_some((root, point, fstype, options))
        })
        .collect();
    let mut files = Vec::new();
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (fstype, file) = if controllers.is_empty() {
            ("cgroup2", "memory.events")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("cgroup", "memory.oom_control")
        } else {
            continue;
        };
        for (root, point, _, _) in mounts.iter().filter(|(_, _, t, options)| {
            *t == fstype && (fstype == "cgroup2" || options.split(',').any(|o| o == "memory"))
        }) {
            let Ok(rel) = Path::new(path).strip_prefix(root) else {
                continue;
            };
            let candidate = point.join(rel).join(file);
            if !files.contains(&candidate) {
                files.push(candidate);
            }
        }
    }
    files
}

/// Whether the kernel OOM-killed something in the instance's memory cgroup: an `oom_kill`
/// count above 0 in one of `files` (see [`oom_files`]).
fn oom_killed(files: &[PathBuf]) -> bool {
    files.iter().any(|p| {
        fs::read_to_string(p)
            .map(|s| {
                s.lines().any(|l| {
                    let mut it = l.split_whitespace();
                    it.next() == Some("oom_kill")
                        && it.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) > 0
                })
            })
            .unwrap_or(false)
    })
}

/// Appends to `output.log`, moving it to `output.log.1` when it would exceed [`LOG_MAX_BYTES`].
struct LogWriter {
    path: PathBuf,
    rotated: PathBuf,
    file: Option<File>,
    size: u64,
}

impl LogWriter {
    fn open(path: PathBuf, rotated: PathBuf) -> LogWriter {
        let file = File::options().create(true).append(true).open(&path).ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0);
        LogWriter {
            path,
            rotated,
            file,
            size,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.size > 0 && self.size + bytes.len() as u64 > LOG_MAX_BYTES {
            let _ = fs::rename(&self.path, &self.rotated);
            self.file = File::options()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)
                .ok();
            self.size = 0;
        }
        if let Some(f) = self.file.as_mut()
            && f.write_all(bytes).is_ok()
        {
            self.size += bytes.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OOM count is found wherever the cgroup file systems are mounted and whatever cgroup
    /// the process is in: a cgroup2 tree mounted at a temporary directory, seen from a cgroup
    /// namespace (its root is not the mount's), next to a v1 memory controller mounted with
    /// another one, and a cgroup outside a mount's root, which is not looked for under it.
    #[test]
    fn oom_kills_are_read_from_the_cgroups_the_process_is_in_under_any_mount_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (v2, v1) = (dir.path().join("cg2"), dir.path().join("cg1 mem"));
        let mountinfo = format!(
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
             40 31 0:40 /ns {} rw - cgroup2 cgroup2 rw,nsdelegate\n\
             41 31 0:41 / {} rw - cgroup cgroup rw,cpu,memory\n\
             42 31 0:42 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n",
            v2.display(),
            v1.display().to_string().replace(' ', "\\040"),
        );
        let cgroups = "0::/ns/svc/web-1\n5:pids:/elsewhere\n4:memory,cpu:/svc/web-1\n";
        let files = oom_files(cgroups, &mountinfo);
        assert_eq!(
            files,
            [
                v2.join("svc/web-1/memory.events"),
                v1.join("svc/web-1/memory.oom_control")
            ]
        );
        for file in &files {
            fs::create_dir_all(file.parent().unwrap()).unwrap();
        }
        fs::write(&files[0], "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n").unwrap();
        fs::write(&files[1], "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n").unwrap();
        assert!(!oom_killed(&files));
        fs::write(&files[0], "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert!(oom_killed(&files));
        assert!(
            oom_files("0::/other/web-1\n", &mountinfo).is_empty(),
            "a cgroup outside the namespace root"
        );
        // On this host, for this very process (whose memory cgroup need not be the root): the
        // file named is the kernel's own.
        let me = instance_oom_files(Pid::this(), "/imago/none");
        assert!(!me.is_empty(), "no memory cgroup found for this process");
        // (A root cgroup2 has no memory.events.)
        let in_root = fs::read_to_string("/proc/self/cgroup")
            .unwrap()
            .lines()
            .all(|l| l.ends_with(":/"));
        assert!(in_root || me.iter().any(|f| f.is_file()), "{me:?}");
    }

    #[test]
    fn log_rotates_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, rotated) = (
            dir.path().join("output.log"),
            dir.path().join("output.log.1"),
        );
        let mut log = LogWriter::open(path.clone(), rotated.clone());
        let chunk = vec![b'a'; (LOG_MAX_BYTES / 2) as usize];
        log.write(&chunk);
        log.write(&chunk);
        assert!(!rotated.exists());
        log.write(b"b");
        assert_eq!(fs::read(&rotated).unwrap().len() as u64, LOG_MAX_BYTES);
        assert_eq!(fs::read(&path).unwrap(), b"b");
        log.write(&chunk);
        log.write(&chunk);
        assert_eq!(
            fs::read(&rotated).unwrap().len() as u64,
            LOG_MAX_BYTES / 2 + 1
        );
    }

    #[test]
    fn a_multi_threaded_process_is_never_forked() {
        // libtest runs this test on a thread of its own: the process has at least two.
        assert!(!single_threaded());
        match fork_single_threaded() {
            Err(e) => assert_eq!(e, Errno::ENOTSUP),
            Ok(nix::unistd::ForkResult::Child) => std::process::exit(0),
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                let _ = waitpid(child, None);
                panic!("a multi-threaded process was forked");
            }
        }
    }

    #[test]
    fn runc_error_message_is_extracted() {
        let line = b"time=\"2026\" level=error msg=\"runc create failed: unable to start container process: exec: \\\"/x\\\": no such file\"\n";
        assert!(runc_message(line).starts_with("runc create failed"));
    }
}
