//! The local provider: instances are containers on this machine, each owned by its own
//! supervisor process, with all state under the imago home directory.
//!
//! Home layout owned by the runtime: `<home>/rootfs/<manifest-hex>` (shared read-only rootfs
//! cache), `<home>/instances/<id>/` (spec, state, bundle, logs), `<home>/runtime/{youki,runc}`
//! (engine state), `<home>/volumes/<name>` (named volumes). Host-wide names are derived from
//! the random instance id: the cgroup `/imago/<id>`, the network namespace `imago-<id>`, the
//! host veth `iv-<id>`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::bundle::{BundleContext, runtime_config, write_bundle};
use crate::network::{self, Ipam, Lease};
use crate::rootfs::{ImageSource, RootfsCache};
use crate::state::{Instance, InstanceDir, Status, is_alive, write_json_unsynced};
use crate::{Engine, InstanceSpec, NetworkMode, Provider, RuntimeError};

/// How long an instance may stay "created" (prepared, supervisor not yet reporting) before it is
/// considered abandoned by a launcher that died.
const STALE_CREATED_MS: u64 = 60_000;

/// The init instances run as PID 1 when their spec asks for one: Debian's statically linked
/// tini (package `tini`), which runs in any image since it needs no library of the image's.
pub const DEFAULT_INIT: &str = "/usr/bin/tini-static";

/// Paths under the imago home directory that belong to the runtime.
#[derive(Debug, Clone)]
pub struct Layout {
    pub home: PathBuf,
}

impl Layout {
    pub fn new(home: &Path) -> Layout {
        Layout {
            home: home.to_owned(),
        }
    }
    pub fn instances(&self) -> PathBuf {
        self.home.join("instances")
    }
    pub fn instance_dir(&self, id: &str) -> InstanceDir {
        InstanceDir::new(&self.instances(), id)
    }
    /// Instance directories being deleted: a removal first renames the directory here, so
    /// that a kill during the deletion leaves no half instance under `instances` (see
    /// [`LocalProvider::sweep_abandoned`]). When `instances` is another filesystem than this (a
    /// mount, or a symlink to another disk), [`Layout::instance_trash_inside`] instead.
    pub fn instance_trash(&self) -> PathBuf {
        self.home.join("trash").join("instances")
    }
    /// The trash inside `instances` itself, always the same filesystem as the instance
    /// directories: a dot-name, which no instance id has, skipped by listings and sweeps.
    pub fn instance_trash_inside(&self) -> PathBuf {
        self.instances().join(INSIDE_TRASH)
    }
    pub fn rootfs(&self) -> PathBuf {
        self.home.join("rootfs")
    }
    pub fn youki_root(&self) -> PathBuf {
        self.home.join("runtime").join("youki")
    }
    pub fn volumes(&self) -> PathBuf {
        self.home.join("volumes")
    }
    pub fn runc_root(&self) -> PathBuf {
        self.home.join("runtime").join("runc")
    }
    /// Compiled seccomp filters of the embedded engine (see [`crate::seccomp_cache`]).
    pub fn seccomp_cache(&self) -> PathBuf {
        self.home.join("runtime").join("seccomp")
    }
}

/// The cgroup of an instance, relative to each hierarchy's root.
pub fn cgroups_path(id: &str) -> String {
    format!("/imago/{id}")
}

/// How to start a supervisor: `program args... <home> <id>`.
#[derive(Debug, Clone)]
pub struct SupervisorCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// When the launching process is single-threaded, fork it into the supervisor instead
    /// (see [`crate::supervisor::fork_supervisor`]); `program` stays the fallback.
    pub fork_when_single_threaded: bool,
}

impl SupervisorCommand {
    /// The running executable's hidden `__supervise` subcommand (what the imago CLI uses).
    pub fn current_exe() -> Result<SupervisorCommand, RuntimeError> {
        let program =
            std::env::current_exe().map_err(RuntimeError::io("cannot locate", "/proc/self/exe"))?;
        Ok(SupervisorCommand {
            program,
            args: vec!["__supervise".into()],
            fork_when_single_threaded: true,
        })
    }
}

pub struct LocalProvider {
    layout: Layout,
    images: Box<dyn ImageSource>,
    supervisor: SupervisorCommand,
    ipam: Ipam,
    /// The static init bound into instances whose spec asks for one.
    init: PathBuf,
    /// See [`LocalProvider::with_netns_sweep_age`].
    netns_sweep_age: Duration,
    /// Supervisors this process started, reaped once they exit (they outlive us otherwise).
    children: Mutex<HashMap<String, Pid>>,
    /// When a launch last reaped `children` (see [`LAUNCH_REAP_SPACING`]).
    reaped_at: Mutex<Option<Instant>>,
    /// The records `list` parsed, by state file, with the stamp of the file each came from: a
    /// controller's pass over a thousand instances re-reads only the records that changed
    /// (every write replaces the file, so a changed record is a new file). Only a copy: the
    /// files stay the truth, each is looked at (stat) every time, and a new process starts empty.
    records: Mutex<HashMap<PathBuf, (RecordStamp, Instance)>>,
    /// A pidfd of each running instance's supervisor that `list` has seen alive, by pid and
    /// start time (see [`LocalProvider::supervisor_alive`]): its liveness is then one `poll`
    /// of the pidfd, not a read of `/proc/<pid>/stat` every listing. Forgotten once it is
    /// dead or no longer listed.
    watched: Mutex<HashMap<(i32, u64), std::os::fd::OwnedFd>>,
    /// The cgroup lock warm-up of launches from a multi-threaded process (`imago run` forks
    /// its own before it parses its command line).
    cgroup_warmup: crate::supervisor::SharedCgroupWarmup,
}

/// What identifies one version of a state file: records are replaced by rename, never written
/// in place, so a new version is a new inode (and its own change time and size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl RecordStamp {
    fn of(meta: &fs::Metadata) -> RecordStamp {
        use std::os::unix::fs::MetadataExt;
        RecordStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("home", &self.layout.home)
            .finish_non_exhaustive()
    }
}

impl LocalProvider {
    pub fn new(
        home: &Path,
        images: Box<dyn ImageSource>,
        supervisor: SupervisorCommand,
    ) -> LocalProvider {
        LocalProvider {
            layout: Layout::new(home),
            images,
            supervisor,
            ipam: Ipam::new(network::DEFAULT_IPAM_DIR),
            init: PathBuf::from(DEFAULT_INIT),
            netns_sweep_age: NETNS_SWEEP_AGE,
            children: Mutex::new(HashMap::new()),
            reaped_at: Mutex::new(None),
            records: Mutex::new(HashMap::new()),
            watched: Mutex::new(HashMap::new()),
            cgroup_warmup: crate::supervisor::SharedCgroupWarmup::default(),
        }
    }

    /// Uses another static init for instances that ask for one (see [`DEFAULT_INIT`]).
    pub fn with_init(mut self, path: impl Into<PathBuf>) -> LocalProvider {
        self.init = path.into();
        self
    }

    /// The init that instances asking for one run as PID 1.
    pub fn init(&self) -> &Path {
        &self.init
    }

    /// Uses another lease directory (tests, or several independent imago setups).
    pub fn with_ipam_dir(mut self, dir: impl Into<PathBuf>) -> LocalProvider {
        self.ipam = Ipam::new(dir);
        self
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn rootfs_cache(&self) -> RootfsCache {
        RootfsCache::new(self.layout.rootfs())
    }

    /// Paths of the retained log files, oldest first (for `logs -f`).
    pub fn log_paths(&self, id: &str) -> Result<Vec<PathBuf>, RuntimeError> {
        let dir = self.existing_dir(id)?;
        Ok(vec![dir.rotated_log(), dir.log()])
    }

    fn existing_dir(&self, id: &str) -> Result<InstanceDir, RuntimeError> {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(RuntimeError::NoSuchInstance(id.to_owned()));
        }
        let dir = self.layout.instance_dir(id);
        if !dir.state().exists() {
            return Err(RuntimeError::NoSuchInstance(id.to_owned()));
        }
        Ok(dir)
    }

    fn reap_children(&self) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children.retain(|_, pid| {
            matches!(
                waitpid(*pid, Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::StillAlive)
            )
        });
    }

    /// [`Self::reap_children`] at most once per [`LAUNCH_REAP_SPACING`]: it asks about every
    /// supervisor this process started, so doing it on every launch made a controller's N
    /// launches O(N^2) `waitpid` calls, all under the lock the launches share.
    fn reap_children_now_and_then(&self) {
        let mut at = self.reaped_at.lock().unwrap_or_else(|e| e.into_inner());
        if at.is_some_and(|t| t.elapsed() < LAUNCH_REAP_SPACING) {
            return;
        }
        *at = Some(Instant::now());
        drop(at);
        self.reap_children();
    }

    fn wait_child(&self, id: &str) {
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(pid) = child {
            let _ = waitpid(pid, None);
        }
    }

    fn launch_prepared(
        &self,
        spec: &InstanceSpec,
        id: &str,
        dir: &InstanceDir,
    ) -> Result<Option<Lease>, RuntimeError> {
        let image = self.images.image(&spec.image)?;
        let rootfs = self
            .rootfs_cache()
            .ensure(self.images.as_ref(), &spec.image, &image)?;
        let mut record = Instance::new(id.to_owned(), spec)?;
        record.ports = image
            .config
            .config()
            .as_ref()
            .and_then(|c| c.exposed_ports().clone())
            .unwrap_or_default();
        record.volumes = crate::volumes::prepare(
            spec,
            &image.config,
            &rootfs,
            &self.layout.volumes(),
            &dir.root,
        )?;
        let netns = network::netns_path(id);
        let cgroups = cgroups_path(id);
        let init = if spec.init {
            Some(checked_init(&self.init)?)
        } else {
            None
        };
        let ctx = BundleContext {
            id,
            rootfs: &rootfs,
            netns_path: (spec.network == NetworkMode::Private).then_some(netns.as_path()),
            cgroups_path: &cgroups,
            volumes: &record.volumes,
            init: init.as_deref(),
        };
        let mut config = runtime_config(spec, &image.config, &ctx)?;
        let precompiled = match spec.engine {
            Engine::Embedded => {
                crate::seccomp_cache::take_precompilable(&mut config, spec.seccomp.is_default())?
            }
            Engine::Runc => None,
        };
        if let Some(rules) = &precompiled {
            // Before config.json, whose annotation says the rules are here.
            let bundle = dir.bundle();
            fs::create_dir_all(&bundle).map_err(RuntimeError::io("cannot create", &bundle))?;
            crate::state::write_json_unsynced(
                &bundle.join(crate::seccomp_cache::BUNDLE_FILE),
                rules,
            )?;
        }
        write_bundle(&dir.bundle(), &config)?;
        // The network itself is set up once the supervisor runs (see `spawn_supervisor`); from
        // here on, a failed launch gives the address back through `record_launch_failure`.
        let lease = match spec.network {
            NetworkMode::Private => {
                // The lease names the state file that takes it over: until it exists, a launcher
                // killed here leaves a lease that `Ipam::reclaim_abandoned` can take back. A
                // relative path would be judged from another directory, so it never is.
                let state = std::path::absolute(dir.state()).unwrap_or_else(|_| dir.state());
                Some(self.ipam.allocate(id, &state)?)
            }
            NetworkMode::Host => None,
        };
        if let Some(lease) = &lease {
            record.address = Some(lease.instance);
            record.host_address = Some(lease.host);
        }
        if let Err(e) = dir.write_state_unsynced(&record) {
            if let Some(lease) = &lease {
                let _ = self.ipam.release(id, lease.host);
            }
            return Err(e);
        }
        Ok(lease)
    }

    /// Sets up the private network while the supervisor prepares the container, and tells it
    /// when the namespace exists (the engine joins it on create) and when it is configured
    /// (the program may start). Overlapping the two takes the network off the launch's
    /// critical path when a second CPU is free. Dropping `gate` unwritten (on failure) makes
    /// the supervisor abandon the launch.
    fn set_up_network(
        &self,
        id: &str,
        lease: &Lease,
        mut gate: fs::File,
    ) -> Result<(), RuntimeError> {
        let tell = |gate: &mut fs::File, step: u8| {
            // A supervisor that is gone already fails its handshake, which the caller reads.
            let _ = gate.write_all(&[step]);
        };
        let namespace = network::create_namespace(id)?;
        tell(&mut gate, crate::supervisor::GATE_NAMESPACE);
        namespace.configure(id, lease)?;
        tell(&mut gate, crate::supervisor::GATE_CONFIGURED);
        Ok(())
    }

    fn spawn_supervisor(
        &self,
        id: &str,
        dir: &InstanceDir,
        lease: Option<Lease>,
    ) -> Result<Instance, RuntimeError> {
        let forked = if self.supervisor.fork_when_single_threaded {
            // A multi-threaded launcher (the deploy controller) gets an error here and execs.
            crate::supervisor::fork_supervisor(&self.layout.home, id).ok()
        } else {
            None
        };
        let (pid, handshake, gate) = match forked {
            Some(started) => started,
            None => match self.exec_supervisor(id) {
                Ok(started) => started,
                Err(reason) => {
                    self.record_launch_failure(dir, &reason, false);
                    return Err(RuntimeError::StartFailed {
                        id: id.to_owned(),
                        reason,
                    });
                }
            },
        };
        let network = match &lease {
            Some(lease) => self.set_up_network(id, lease, gate),
            None => {
                // The supervisor of a host-network instance never reads it.
                drop(gate);
                Ok(())
            }
        };
        let line = read_handshake(handshake, pid);
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), pid);
        if let Err(e) = network {
            // The supervisor has answered (it read the closed gate and gave up): record the
            // launcher's reason and give back what remains of the network (the lease).
            self.record_launch_failure(dir, &e.to_string(), true);
            return Err(e);
        }
        let line = line.trim_end();
        if line.starts_with("ok") {
            return dir.read_state();
        }
        let reason = match line.strip_prefix("error ") {
            Some(msg) => msg.to_owned(),
            None => "the supervisor exited before starting the container".to_owned(),
        };
        self.record_launch_failure(dir, &reason, false);
        Err(RuntimeError::StartFailed {
            id: id.to_owned(),
            reason,
        })
    }

    /// Starts `program args... HOME ID` with its stdout as the handshake pipe and its stdin as
    /// the gate pipe.
    fn exec_supervisor(&self, id: &str) -> Result<(Pid, fs::File, fs::File), String> {
        let mut child = Command::new(&self.supervisor.program)
            .args(&self.supervisor.args)
            .arg(&self.layout.home)
            .arg(id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the supervisor {}: {e}",
                    self.supervisor.program.display()
                )
            })?;
        let pid = Pid::from_raw(child.id() as i32);
        // std does not reap on drop: the pid is waited for through `children`.
        let out = child
            .stdout
            .take()
            .ok_or_else(|| "the supervisor has no stdout pipe".to_owned())?;
        let gate = child
            .stdin
            .take()
            .ok_or_else(|| "the supervisor has no stdin pipe".to_owned())?;
        Ok((
            pid,
            fs::File::from(std::os::fd::OwnedFd::from(out)),
            fs::File::from(std::os::fd::OwnedFd::from(gate)),
        ))
    }

    /// Marks the instance failed (unless its supervisor already did and `ours` is false: the
    /// launcher's own reason wins over the supervisor's "the launcher gave up") and, since
    /// nothing runs, gives its network and address back at once.
    fn record_launch_failure(&self, dir: &InstanceDir, reason: &str, ours: bool) {
        if let Ok(mut rec) = dir.read_state() {
            if ours || rec.status != Status::Failed {
                rec.status = Status::Failed;
                rec.error = Some(reason.to_owned());
                rec.finished_ms = Some(crate::state::now_ms());
                let _ = dir.write_state(&rec);
            }
            self.release_network(&rec);
        }
    }

    fn release_network(&self, rec: &Instance) {
        if rec.network == NetworkMode::Private {
            network::teardown(&rec.id);
            if let Some(host) = rec.host_address {
                let _ = self.ipam.release(&rec.id, host);
            }
        }
    }

    /// The record, with `Lost` substituted when it claims to run but its supervisor is gone.
    fn load(&self, dir: &InstanceDir) -> Result<Instance, RuntimeError> {
        self.judge(dir, dir.read_state(), false)
    }

    /// `read` of `dir`'s record, or "no such instance" when the record is gone: someone else
    /// (a controller and `imago destroy` at the same time, each removing several at once)
    /// removed the instance since the caller found its directory.
    fn vanished(
        dir: &InstanceDir,
        read: Result<Instance, RuntimeError>,
    ) -> Result<Instance, RuntimeError> {
        match read {
            Err(RuntimeError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && !dir.state().exists() =>
            {
                let id = dir
                    .root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(RuntimeError::NoSuchInstance(id))
            }
            other => other,
        }
    }

    /// The record of `dir` as [`Self::load`] gives it, parsed again only when its file changed
    /// since `list` last parsed it (the liveness of its supervisor is looked at every time);
    /// `None` when `dir` has no record (`path`, its state file): a launch under way, or an
    /// instance removed since its directory was read. One `stat` of the record tells both.
    fn load_listed(
        &self,
        dir: &InstanceDir,
        path: &Path,
    ) -> Result<Option<Instance>, RuntimeError> {
        // The stamp is taken before the read: a record replaced in between is parsed again
        // next time, never kept under the stamp of a newer file.
        let stamp = match fs::metadata(path) {
            Ok(meta) => RecordStamp::of(&meta),
            // A file, not a directory, beside the instances (a note someone left there) has
            // no record either: listing took it for none before the one-stat listing, and one
            // such file must not fail every listing, and with it every controller pass.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None);
            }
            Err(_) => return self.load(dir).map(Some),
        };
        let cached = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .filter(|(seen, _)| *seen == stamp)
            .map(|(_, rec)| rec.clone());
        let read = match cached {
            Some(rec) => Ok(rec),
            None => {
                let read = dir.read_state();
                let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
                match &read {
                    Ok(rec) => records.insert(path.to_owned(), (stamp, rec.clone())),
                    Err(_) => records.remove(path),
                };
                drop(records);
                read
            }
        };
        self.judge(dir, read, true).map(Some)
    }

    /// Whether the supervisor `pid` that started at `start` lives, as [`is_alive`] says, but
    /// through a pidfd kept from the last time it was seen alive: a `poll` that says whether
    /// the process exited (a zombie has), instead of the kernel writing out its whole
    /// `/proc/<pid>/stat` and this process parsing it, every listing. The pidfd is opened
    /// before the start time is checked, so it is the recorded process's whenever the check
    /// passes (a pid reused before the open fails the check). Without pidfds (an old kernel,
    /// no descriptors left: at most a quarter of the open-files limit is kept), `/proc` each
    /// time.
    fn supervisor_alive(&self, pid: i32, start: u64) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = watched.get(&(pid, start)) {
            let exited = poll(
                &mut [PollFd::new(fd.as_fd(), PollFlags::POLLIN)],
                PollTimeout::ZERO,
            );
            match exited {
                Ok(0) => return true,
                Ok(_) => {
                    watched.remove(&(pid, start));
                    return false;
                }
                // Asked again through `/proc` below.
                Err(_) => {
                    watched.remove(&(pid, start));
                }
            }
        }
        let fd = rustix::process::Pid::from_raw(pid).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        let alive = is_alive(pid, start);
        if alive
            && let Some(fd) = fd
            && watched.len() < watch_limit()
        {
            watched.insert((pid, start), fd);
        }
        alive
    }

    fn judge(
        &self,
        dir: &InstanceDir,
        read: Result<Instance, RuntimeError>,
        listing: bool,
    ) -> Result<Instance, RuntimeError> {
        let mut rec = match Self::vanished(dir, read) {
            Ok(rec) => rec,
            Err(RuntimeError::Json { path, source }) => {
                // The launch path does not wait for the disk: after a power loss the record may
                // be empty or torn. Nothing of the instance survived the reboot, so it is lost;
                // its spec (written before the state) still says what it was, and `rm` cleans up.
                let spec: InstanceSpec = crate::state::read_json(&dir.spec())?;
                let id = dir
                    .root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut rec = Instance::new(id, &spec)?;
                rec.status = Status::Lost;
                rec.error = Some(format!("unreadable record {}: {source}", path.display()));
                return Ok(rec);
            }
            Err(e) => return Err(e),
        };
        // A launcher that died between preparing and starting the supervisor leaves "created".
        if rec.status == Status::Created
            && rec.supervisor_pid.is_none()
            && (crate::state::now_ms().saturating_sub(rec.created_ms) > STALE_CREATED_MS
                || launcher_alive(dir) == Some(false))
        {
            rec.status = Status::Lost;
        }
        if rec.status == Status::Running {
            let alive = match (rec.supervisor_pid, rec.supervisor_start) {
                (Some(pid), Some(start)) if listing => self.supervisor_alive(pid, start),
                (Some(pid), Some(start)) => is_alive(pid, start),
                _ => false,
            };
            if !alive {
                // Re-read: the supervisor may have written its final state just now.
                rec = Self::vanished(dir, dir.read_state())?;
                if rec.status == Status::Running {
                    rec.status = Status::Lost;
                }
            }
        }
        Ok(rec)
    }

    /// Whether the instance's engine still has state for its container.
    fn engine_knows(&self, rec: &Instance) -> bool {
        let root = match rec.engine {
            crate::Engine::Embedded => self.layout.youki_root(),
            crate::Engine::Runc => self.layout.runc_root(),
        };
        root.join(&rec.id).exists()
    }

    /// Kills and forgets the container of an instance whose supervisor died.
    fn clean_lost(&self, rec: &Instance) {
        if let Some(pid) = rec.pid {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        match rec.engine {
            crate::Engine::Embedded => {
                let root = self.layout.youki_root().join(&rec.id);
                if let Ok(mut c) = libcontainer::container::Container::load(root.clone()) {
                    let _ = c.delete(true);
                }
                let _ = fs::remove_dir_all(root);
            }
            crate::Engine::Runc => {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(self.layout.runc_root())
                    .args(["delete", "--force", &rec.id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        remove_cgroups(&rec.id);
    }
}

/// A stop looks at the record this soon after signalling, then twice as long after each look,
/// up to [`STOP_POLL_MAX`]: a controller stopping hundreds of instances at once (a rollout's
/// wave, a destroy) read every record every 5 ms, 200 reads a second per stop, which took the
/// CPU the stops themselves needed.
const STOP_POLL_FIRST: Duration = Duration::from_millis(5);
const STOP_POLL_MAX: Duration = Duration::from_millis(50);

/// Launches reap the exited supervisors of this process at most this often (`list`, once a
/// controller pass, reaps every time).
const LAUNCH_REAP_SPACING: Duration = Duration::from_secs(1);

/// How many supervisors' pidfds `list` keeps at most (see [`LocalProvider::supervisor_alive`]):
/// a quarter of this process's open-files limit.
fn watch_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(usize::MAX, |n| usize::try_from(n / 4).unwrap_or(usize::MAX))
    })
}

/// How often a launcher waiting for the handshake checks that its supervisor still lives.
const HANDSHAKE_LIVENESS_MS: u16 = 100;

/// Reads the supervisor's one handshake line (empty if it wrote none). The pipe's end of file
/// does not reliably say that the supervisor is gone: a container init that the embedded engine
/// cloned from a forked supervisor holds a copy of the write end until it execs, which it never
/// does if the supervisor died between create and start (killed while it waited for the gate,
/// say); the launcher would wait forever. So the wait also ends once the supervisor, this
/// process's child, has exited (seen without reaping it: `reap_children` does that), after
/// taking whatever it wrote.
fn read_handshake(handshake: fs::File, supervisor: Pid) -> String {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut handshake = handshake;
    let mut line = Vec::new();
    let mut chunk = [0u8; 512];
    let mut exited = false;
    while !line.contains(&b'\n') {
        let timeout = if exited {
            PollTimeout::ZERO
        } else {
            PollTimeout::from(HANDSHAKE_LIVENESS_MS)
        };
        let ready = poll(
            &mut [PollFd::new(handshake.as_fd(), PollFlags::POLLIN)],
            timeout,
        );
        match ready {
            Ok(0) if exited => break,
            Ok(0) => {
                // Only a seen exit counts: an error (no such child, as when the launcher
                // ignores SIGCHLD) must not cut short the wait for a live supervisor.
                exited = matches!(
                    nix::sys::wait::waitid(
                        nix::sys::wait::Id::Pid(supervisor),
                        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
                    ),
                    Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..))
                );
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
        match handshake.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&line);
    text.split('\n').next().unwrap_or_default().to_owned()
}

/// How long [`remove_cgroups`] waits for the instance's last processes to leave its cgroups.
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(5);

/// Removes the instance's cgroup directories in every hierarchy, if any are left: the v1
/// hierarchies under `/sys/fs/cgroup` of a hybrid host and the cgroup2 tree (wherever it is
/// mounted; all of `/sys/fs/cgroup` on a v2-only host). A process just killed (the init of a
/// lost container) is still in its cgroup until it has exited, and `rmdir` fails with EBUSY
/// until then: on a slow machine that outlives the engine's own retries, so this retries too,
/// for at most [`CGROUP_EMPTY_WAIT`].
pub(crate) fn remove_cgroups(id: &str) {
    let rel = cgroups_path(id);
    let rel = rel.trim_start_matches('/');
    let mut dirs: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
        .map(|rd| rd.flatten().map(|h| h.path().join(rel)).collect())
        .unwrap_or_default();
    dirs.push(Path::new("/sys/fs/cgroup").join(rel));
    dirs.extend(crate::supervisor::cgroup2_mount().map(|root| root.join(rel)));
    let deadline = Instant::now() + CGROUP_EMPTY_WAIT;
    for dir in dirs {
        while dir.is_dir() {
            match fs::remove_dir(&dir) {
                Err(e)
                    if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
    }
}

/// `path` made absolute, once it is known to be an executable regular file: a missing init
/// fails the launch before anything starts, naming the file, rather than as the engine's
/// mount or exec error from inside the container.
fn checked_init(path: &Path) -> Result<PathBuf, RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    let missing = |reason: String| RuntimeError::InitMissing {
        path: path.to_owned(),
        reason,
    };
    let meta = fs::metadata(path).map_err(|e| missing(e.to_string()))?;
    if !meta.is_file() {
        return Err(missing("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(missing("not executable".into()));
    }
    std::path::absolute(path).map_err(|e| missing(e.to_string()))
}

fn new_id() -> Result<String, RuntimeError> {
    let mut bytes = [0u8; 6];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(RuntimeError::io("cannot read", "/dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The name of [`Layout::instance_trash_inside`] under `instances`.
const INSIDE_TRASH: &str = ".trash";

/// How old an instance directory that names no launcher and holds no spec must be before the
/// sweep takes it (see [`LocalProvider::remove_abandoned_dirs`]).
pub const ABANDONED_DIR_AGE: Duration = Duration::from_secs(60);

/// Whether `path` was last modified more than `age` ago (not when that cannot be read).
fn older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}

/// Whether the process named in the instance directory's `launcher` file still lives; `None`
/// when no such file (an older imago, or no start time) says who launched it.
fn launcher_alive(dir: &InstanceDir) -> Option<bool> {
    let text = fs::read_to_string(dir.launcher()).ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(start))) = (fields.next(), fields.next()) else {
        return None;
    };
    Some(i32::try_from(pid).is_ok_and(|pid| is_alive(pid, start)))
}

/// What the name of an instance directory under way starts with, before it is renamed into
/// place (see [`LocalProvider::make_instance_dir`]): `.launching.<id>.<pid>.<start>`, naming its
/// launcher. A dot-name, which no listing shows.
const STAGING_PREFIX: &str = ".launching.";

/// What the name of a launch's marker starts with: `.launch.<id>.<pid>.<start>`, an empty file
/// made before the staging directory and removed once the directory is in place, and never
/// renamed. A directory listing that runs while an entry is renamed may return neither its old
/// nor its new name (seen on ext4: 96 of 3,387 listings beside 2,000 entries), so without it a
/// `launches_under_way` during the rename missed the launch and `destroy` left its instance.
const MARKER_PREFIX: &str = ".launch.";

/// A launch's marker file (see [`LocalProvider::make_instance_dir`]), removed when dropped: once
/// the instance's record exists, or when the launch failed and its directory is gone. One left
/// by a kill names a dead launcher: the sweep takes it.
struct LaunchMarker(Option<PathBuf>);

impl LaunchMarker {
    /// The record exists (or the launch is given up): the marker has served.
    fn done(self) {}
}

impl Drop for LaunchMarker {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The instance id and the launcher (pid, start time) that a staging directory's name
/// (`STAGING_PREFIX`) or a launch marker's (`MARKER_PREFIX`) names; `None` for any other name.
fn staged_launch(name: &str) -> Option<(&str, i32, u64)> {
    let rest = name
        .strip_prefix(STAGING_PREFIX)
        .or_else(|| name.strip_prefix(MARKER_PREFIX))?;
    let mut fields = rest.split('.');
    let id = fields.next().filter(|id| !id.is_empty())?;
    let pid = fields.next()?.parse().ok()?;
    let start = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some((id, pid, start))
}

/// The name an instance directory takes in the trash: `<id>.<pid>.<start>.<n>`, naming this
/// process (pid and start time) as its remover, so that the sweep leaves the deletions under
/// way alone and takes only what removers that died left (`<id>.<pid>.<n>` when the start time
/// cannot be read, as older imagos named them all).
fn trash_name(root: &Path) -> String {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique, whoever removes it: a second remover of the same instance finds it gone.
    static REMOVALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = REMOVALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let me = std::process::id();
    match crate::state::own_start_time() {
        Some(start) => format!("{name}.{me}.{start}.{n}"),
        None => format!("{name}.{me}.{n}"),
    }
}

/// The trash names of this process's deletions under way ([`LocalProvider::discard`]): its
/// other entries are deletions of its own that failed part-way, which its sweep takes again.
static DELETING: Mutex<std::collections::BTreeSet<String>> =
    Mutex::new(std::collections::BTreeSet::new());

/// Whether a trash entry's deletion is under way: a deletion of this process, or one whose
/// remover (named by [`trash_name`]) still runs; a name that says nobody is taken as a dead
/// remover's.
fn remover_alive(entry: &std::ffi::OsStr) -> bool {
    let name = entry.to_string_lossy();
    let fields: Vec<&str> = name.split('.').collect();
    let Some(pid) = fields.get(1).and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        return DELETING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name.as_ref());
    }
    match fields.len() {
        4 => fields[2]
            .parse::<u64>()
            .is_ok_and(|start| is_alive(pid, start)),
        3 => crate::state::process_start_time(pid).is_some(),
        _ => false,
    }
}

/// Renames `root` to `name` in `trash`, which it makes first if need be.
fn rename_into(root: &Path, trash: &Path, name: &str) -> std::io::Result<PathBuf> {
    fs::create_dir_all(trash)?;
    let doomed = trash.join(name);
    fs::rename(root, &doomed)?;
    Ok(doomed)
}

/// Deletes the entries of `trash` whose remover is dead; how many it deleted itself.
fn empty_trash_of_dead_removers(trash: &Path) -> usize {
    let Ok(entries) = fs::read_dir(trash) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| !remover_alive(&entry.file_name()))
        // Another sweep's deletion that finished first is not this one's.
        .filter(|entry| fs::remove_dir_all(entry.path()).is_ok())
        .count()
}

impl LocalProvider {
    /// Makes the directory of instance `id` with its `launcher` file (this process's pid and
    /// start time) already in it: made under a staging name that names this process
    /// ([`STAGING_PREFIX`]), the file written, then renamed into place in one step. A launcher
    /// killed at any point leaves either a staging directory whose name says it is dead or an
    /// instance directory whose `launcher` file does, both taken back at once by the sweep and
    /// never waited for by [`Self::launches_under_way`]. (A directory that names nobody, which
    /// waited [`ABANDONED_DIR_AGE`], is now only made without a start time, or by an older
    /// imago.)
    ///
    /// Returns the launch's marker ([`MARKER_PREFIX`]), made first and never renamed, which the
    /// launcher removes once the instance's record exists ([`LaunchMarker::done`]): a listing
    /// beside the rename may see neither the staging nor the final name, and one beside the
    /// marker's removal may miss the marker, but then the record existed before that listing
    /// ended (`destroy` lists the launches under way, then the instances).
    fn make_instance_dir(&self, id: &str, dir: &InstanceDir) -> Result<LaunchMarker, RuntimeError> {
        self.make_instance_dir_marked(id, dir, || {})
    }

    /// [`Self::make_instance_dir`], calling `marked` once the launch's marker exists (a test
    /// learns there from when on the launch must be listed as under way).
    fn make_instance_dir_marked(
        &self,
        id: &str,
        dir: &InstanceDir,
        marked: impl FnOnce(),
    ) -> Result<LaunchMarker, RuntimeError> {
        let Some(start) = crate::state::own_start_time() else {
            marked();
            return fs::create_dir_all(&dir.root)
                .map(|()| LaunchMarker(None))
                .map_err(RuntimeError::io("cannot create", &dir.root));
        };
        let me = std::process::id();
        let instances = self.layout.instances();
        fs::create_dir_all(&instances).map_err(RuntimeError::io("cannot create", &instances))?;
        let marker = LaunchMarker(Some(
            instances.join(format!("{MARKER_PREFIX}{id}.{me}.{start}")),
        ));
        if let Some(path) = &marker.0 {
            fs::File::create_new(path).map_err(RuntimeError::io("cannot create", path))?;
        }
        marked();
        // On an error the marker goes when dropped.
        self.stage_instance_dir(id, dir, me, start)?;
        Ok(marker)
    }

    /// [`Self::make_instance_dir`]'s staging directory, its `launcher` file and its rename.
    fn stage_instance_dir(
        &self,
        id: &str,
        dir: &InstanceDir,
        me: u32,
        start: u64,
    ) -> Result<(), RuntimeError> {
        let staging = self
            .layout
            .instances()
            .join(format!("{STAGING_PREFIX}{id}.{me}.{start}"));
        fs::create_dir_all(&staging).map_err(RuntimeError::io("cannot create", &staging))?;
        let launcher = staging.join("launcher");
        let made = fs::write(&launcher, format!("{me} {start}\n"))
            .map_err(RuntimeError::io("cannot write", &launcher))
            // Onto no existing directory: an instance directory is never empty (it holds its
            // `launcher` file, or its spec), so a taken id fails with ENOTEMPTY.
            .and_then(|()| {
                fs::rename(&staging, &dir.root)
                    .map_err(RuntimeError::io("cannot rename into place", &dir.root))
            });
        if made.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        made
    }

    /// Takes the instance directory `root` away in one step, a rename into the trash
    /// ([`Layout::instance_trash`], or [`Layout::instance_trash_inside`] when that is another
    /// filesystem than `root`: the rename fails with `EXDEV`), then deletes it: a kill at any
    /// point leaves the instance whole or gone from `instances`, never a directory with some of
    /// its files (its spec without its record, say), and what it leaves in the trash the sweep
    /// deletes. `NotFound` when `root` is gone already.
    fn discard(&self, root: &Path) -> std::io::Result<()> {
        let name = trash_name(root);
        let deleting = || DELETING.lock().unwrap_or_else(|p| p.into_inner());
        deleting().insert(name.clone());
        let renamed = match rename_into(root, &self.layout.instance_trash(), &name) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
                rename_into(root, &self.layout.instance_trash_inside(), &name)
            }
            renamed => renamed,
        };
        // Removed in effect. Whatever is left of it (a kill, a file that will not go) is the
        // sweep's.
        if let Ok(doomed) = &renamed {
            let _ = fs::remove_dir_all(doomed);
        }
        deleting().remove(&name);
        renamed.map(drop)
    }

    /// Deletes what removals that were killed midway (their process is gone) left in either
    /// trash; how many entries this call deleted. Deletions under way, of this process or
    /// another, are theirs: neither touched nor counted.
    pub fn empty_trash(&self) -> usize {
        empty_trash_of_dead_removers(&self.layout.instance_trash())
            + empty_trash_of_dead_removers(&self.layout.instance_trash_inside())
    }

    /// Removes the directories of launches whose launcher died before it wrote the instance's
    /// record (spec, bundle, anonymous volumes; nothing was started yet: the record is written
    /// before the supervisor exists). A directory is taken when its `launcher` file names a
    /// process that is gone, or when it names nobody and holds no spec yet and is older than
    /// [`ABANDONED_DIR_AGE`] (an older imago's launcher killed before it wrote either), so a
    /// launch under way, or one by an older imago (a spec, no such file), is never touched.
    /// Staging directories and launch markers ([`Self::make_instance_dir`]) whose name says
    /// their launcher is gone are taken too (each counts as one).
    pub fn remove_abandoned_dirs(&self) -> usize {
        self.sweep_instance_dirs(false).0
    }

    /// [`Self::remove_abandoned_dirs`], and with `temp_files` the temporary files that writers
    /// killed between their write and their rename left in the directories of instances with a
    /// record (`state::remove_stale_temp_files_in`): a stop's `stop-request`, a record written
    /// by a `list` or a supervisor. Those of an instance without a record go with its
    /// directory, and those of its bundle were written by its launcher before the record (a
    /// launch it cut short is removed whole). Returns the directories and the files removed.
    fn sweep_instance_dirs(&self, temp_files: bool) -> (usize, usize) {
        let Ok(entries) = fs::read_dir(self.layout.instances()) else {
            return (0, 0);
        };
        let mut removed = 0;
        let mut temp_removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // A launch killed before its directory was renamed into place (its staging
            // directory), or before it removed its marker (an empty file).
            if let Some((_, pid, start)) = staged_launch(&name) {
                if !is_alive(pid, start) {
                    let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                    let gone = if is_dir {
                        fs::remove_dir_all(entry.path())
                    } else {
                        fs::remove_file(entry.path())
                    };
                    // A marker counts as what its launch left, as its directory does.
                    if gone.is_ok() {
                        removed += 1;
                    }
                }
                continue;
            }
            // The trash (`INSIDE_TRASH`): no instance id starts with a dot.
            if name.starts_with('.') {
                continue;
            }
            let dir = InstanceDir { root: entry.path() };
            if dir.state().exists() {
                if temp_files {
                    temp_removed += crate::state::remove_stale_temp_files_in(&dir.root);
                }
                continue;
            }
            // The launcher is gone, so nothing writes the record any more. A directory that
            // names nobody and has no spec either is an older imago's launch killed between
            // making it and writing its `launcher` file (a launch now renames its directory into
            // place with the file in it), or one made without a start time: taken once it is
            // older than any launch.
            let abandoned = match launcher_alive(&dir) {
                Some(alive) => !alive,
                None => !dir.spec().exists() && older_than(&dir.root, ABANDONED_DIR_AGE),
            };
            if abandoned && !dir.state().exists() && self.discard(&dir.root).is_ok() {
                removed += 1;
            }
        }
        (removed, temp_removed)
    }

    /// The launches under way in this home, by any process, that no listing shows yet: the
    /// instance directories (staging ones too) without a record whose launcher still runs (or
    /// that name none and are younger than [`ABANDONED_DIR_AGE`]: an older imago's), by id,
    /// with the spec they launch once
    /// it is written. What one that destroys a service waits for: a launch of that service
    /// under way would leave an instance after it.
    pub fn launches_under_way(&self) -> Vec<(String, Option<InstanceSpec>)> {
        let Ok(entries) = fs::read_dir(self.layout.instances()) else {
            return Vec::new();
        };
        // By id: a launch may show as its marker and its directory in one listing.
        let mut launching: BTreeMap<String, Option<InstanceSpec>> = BTreeMap::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // A launch that is making its directory (its marker, its staging directory): no
            // spec yet.
            if let Some((id, pid, start)) = staged_launch(&name) {
                if is_alive(pid, start) {
                    launching.entry(id.to_owned()).or_insert(None);
                }
                continue;
            }
            if name.starts_with('.') {
                continue;
            }
            let dir = InstanceDir { root: entry.path() };
            if dir.state().exists() {
                continue;
            }
            let under_way = match launcher_alive(&dir) {
                Some(alive) => alive,
                None => !dir.spec().exists() && !older_than(&dir.root, ABANDONED_DIR_AGE),
            };
            if under_way && !dir.state().exists() {
                launching.insert(name, crate::state::read_json(&dir.spec()).ok());
            }
        }
        launching.into_iter().collect()
    }

    /// Takes back what no `rm` will ever name, in one pass over the instance directories, the
    /// network namespaces and the leases: the directories and addresses of launches killed
    /// before they wrote their record, and instance network namespaces that no process is in
    /// (older than a launch takes to put its container in one) and no instance of this home
    /// claims: left by cleanups that were killed, or by homes deleted with their instances
    /// (a test killed midway). Tearing down the namespace of another home's instance that
    /// exited and awaits its `rm` takes nothing from it (its `rm` finds it gone); addresses are
    /// left to their records. O(instances): call it once per controller pass at most, or once
    /// per command, never once per instance.
    pub fn sweep_abandoned(&self) -> Swept {
        let mut swept = Swept::default();
        for id in network::namespaces_without_processes(self.netns_sweep_age) {
            // This home's own instance (exited, not removed yet): its `rm` tears it down.
            if self.layout.instance_dir(&id).root.exists() {
                continue;
            }
            network::teardown(&id);
            swept.namespaces.push(id);
        }
        (swept.dirs, swept.temp_files) = self.sweep_instance_dirs(true);
        // The files written by rename outside the instances: the rootfs cache's drift
        // manifests, the seccomp filter cache and its record of passed load checks
        // (`seccomp.loads` beside it): one directory each.
        let filters = self.layout.seccomp_cache();
        for dir in [
            self.layout.rootfs(),
            filters.with_extension("loads"),
            filters,
        ] {
            swept.temp_files += crate::state::remove_stale_temp_files_in(&dir);
        }
        // Trees of unpacks killed midway, of digests no launch unpacks again, and of named
        // volumes' creations and removals killed midway.
        swept.temp_files += self.rootfs_cache().remove_killed_unpacks();
        swept.temp_files += crate::volumes::remove_killed_leftovers(&self.layout.volumes());
        swept.trash = self.empty_trash();
        // After the namespaces: a lease is abandoned only once its namespace is gone too.
        swept.leases = self.ipam.reclaim_abandoned().unwrap_or_default();
        swept
    }

    /// Sweeps network namespaces younger than [`NETNS_SWEEP_AGE`] too, down to `age` (tests).
    pub fn with_netns_sweep_age(mut self, age: Duration) -> LocalProvider {
        self.netns_sweep_age = age;
        self
    }
}

/// What [`LocalProvider::sweep_abandoned`] took back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Instance directories of launches killed before their record.
    pub dirs: usize,
    /// Address blocks of such launches.
    pub leases: Vec<u32>,
    /// Ids of the network namespaces torn down.
    pub namespaces: Vec<String>,
    /// Instance directories that removals killed midway left in the trash.
    pub trash: usize,
    /// Temporary files of writes whose writer was killed before its rename, and temporary
    /// trees of rootfs unpacks and of named volumes' creations and removals killed midway.
    pub temp_files: usize,
}

/// A network namespace younger than this is never swept: it may be a launch whose container
/// is not created yet (milliseconds), of a home this provider does not see.
pub const NETNS_SWEEP_AGE: Duration = Duration::from_secs(30);

impl Provider for LocalProvider {
    fn launch(&self, spec: &InstanceSpec) -> Result<Instance, RuntimeError> {
        spec.validate()?;
        // From the first launch of a wave to the end of its last: every cgroup move of every
        // engine in between finds the lock warm (see `supervisor::warm_cgroup_lock`). Only for
        // launches that take that lock: where the embedded engine's init joins its v1 cgroups
        // through `tasks` the warm-up only delays it (`launch_takes_the_cgroup_lock`).
        let takes_the_lock =
            crate::supervisor::launch_takes_the_cgroup_lock(spec.engine == Engine::Runc);
        let _warm = (takes_the_lock && !crate::supervisor::single_threaded())
            .then(|| self.cgroup_warmup.hold());
        self.reap_children_now_and_then();
        let id = new_id()?;
        let dir = self.layout.instance_dir(&id);
        let marker = self.make_instance_dir(&id, &dir)?;
        // Unsynced like everything on the launch path: the supervisor syncs once it runs.
        if let Err(e) = write_json_unsynced(&dir.spec(), spec) {
            let _ = self.discard(&dir.root);
            return Err(e);
        }
        let lease = match self.launch_prepared(spec, &id, &dir) {
            Ok(lease) => lease,
            Err(e) => {
                // Nothing was started: leave no trace of the instance.
                let _ = self.discard(&dir.root);
                return Err(e);
            }
        };
        // The "created" record exists: every listing shows the launch from now on.
        marker.done();
        self.spawn_supervisor(&id, &dir, lease)
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<Instance, RuntimeError> {
        let dir = self.existing_dir(id)?;
        let rec = self.load(&dir)?;
        if rec.status != Status::Running {
            return Ok(rec);
        }
        crate::state::write_atomic(
            &dir.stop_request(),
            grace.as_millis().to_string().as_bytes(),
        )?;
        if let Some(pid) = rec.supervisor_pid {
            match kill(Pid::from_raw(pid), Signal::SIGTERM) {
                // The supervisor exited between the read of its record and the signal (its
                // program ended, or another stop got there first): the record read below says
                // how it ended (exited, or lost if it died without a word).
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(RuntimeError::Supervisor {
                        id: id.to_owned(),
                        reason: format!("cannot signal supervisor {pid}: {e}"),
                    });
                }
            }
        }
        let deadline = Instant::now() + grace + Duration::from_secs(5);
        let mut pause = STOP_POLL_FIRST;
        loop {
            let rec = self.load(&dir)?;
            if rec.status != Status::Running {
                self.wait_child(id);
                return Ok(rec);
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::StopTimeout {
                    id: id.to_owned(),
                    secs: (grace + Duration::from_secs(5)).as_secs(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(STOP_POLL_MAX);
        }
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.existing_dir(id)?;
        let rec = self.load(&dir)?;
        match rec.status {
            Status::Running | Status::Created => {
                return Err(RuntimeError::WrongState {
                    id: id.to_owned(),
                    status: rec.status.to_string(),
                    reason: "stop it before removing it",
                });
            }
            Status::Lost => self.clean_lost(&rec),
            // A supervisor that died between the engine's create and start (killed while it
            // waited for the network gate, say) leaves the created container behind, its init
            // waiting for a start that never comes; the launcher recorded the launch as failed.
            Status::Failed if self.engine_knows(&rec) => self.clean_lost(&rec),
            Status::Exited | Status::Failed => remove_cgroups(id),
        }
        self.release_network(&rec);
        // What launches killed before their record left behind is not swept here: that reads
        // every instance directory and lease, which made a controller's removal of N instances
        // O(N^2). The owner of the provider calls `sweep_abandoned` now and then instead.
        self.wait_child(id);
        match self.discard(&dir.root) {
            Ok(()) => Ok(()),
            // Someone else (a controller and `imago destroy`, say) removed it at the same time.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.root.exists() => {
                Err(RuntimeError::NoSuchInstance(id.to_owned()))
            }
            Err(e) => Err(RuntimeError::Io {
                action: "cannot remove",
                path: dir.root.clone(),
                source: e,
            }),
        }
    }

    fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        // Not on every listing: it asks about every supervisor this process started, 1,000
        // `waitpid` calls a controller pass at 1,000 instances, and a supervisor that ended
        // unreaped (a zombie) is dead to the liveness check anyway.
        self.reap_children_now_and_then();
        let root = self.layout.instances();
        let entries = match fs::read_dir(&root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(RuntimeError::Io {
                    action: "cannot list",
                    path: root,
                    source: e,
                });
            }
        };
        let mut out = Vec::new();
        let mut listed = std::collections::HashSet::new();
        for entry in entries.flatten() {
            // No instance id starts with a dot: the trash, or a file some writer left.
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let dir = InstanceDir { root: entry.path() };
            let path = dir.state();
            match self.load_listed(&dir, &path) {
                Ok(Some(rec)) => out.push(rec),
                // No record yet, or removed while this listing ran: not listed.
                Ok(None) | Err(RuntimeError::NoSuchInstance(_)) => continue,
                Err(e) => return Err(e),
            }
            listed.insert(path);
        }
        // Removed instances' records are forgotten, and the pidfds of supervisors no longer
        // listed running.
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|path, _| listed.contains(path));
        let running: std::collections::HashSet<(i32, u64)> = out
            .iter()
            .filter(|rec| rec.status == Status::Running)
            .filter_map(|rec| Some((rec.supervisor_pid?, rec.supervisor_start?)))
            .collect();
        self.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, _| running.contains(key));
        out.sort_by(|a, b| {
            a.created_ms
                .cmp(&b.created_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    fn inspect(&self, id: &str) -> Result<Instance, RuntimeError> {
        let dir = self.existing_dir(id)?;
        self.load(&dir)
    }

    fn sweep(&self) {
        self.sweep_abandoned();
    }

    fn logs(&self, id: &str) -> Result<Vec<u8>, RuntimeError> {
        let mut out = Vec::new();
        for path in self.log_paths(id)? {
            match fs::read(&path) {
                Ok(bytes) => out.extend_from_slice(&bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(RuntimeError::Io {
                        action: "cannot read",
                        path,
                        source: e,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    struct NoImages;

    /// A provider of `home` (its leases in there too) that has no images.
    fn provider_without_images(home: &Path) -> LocalProvider {
        LocalProvider::new(
            home,
            Box::new(NoImages),
            SupervisorCommand::current_exe().unwrap(),
        )
        .with_ipam_dir(home.join("ipam"))
    }

    impl ImageSource for NoImages {
        fn image(
            &self,
            digest: &imago_oci::Digest,
        ) -> Result<crate::rootfs::ImageInfo, RuntimeError> {
            Err(RuntimeError::NoSuchInstance(digest.to_string()))
        }
        fn open_layer(
            &self,
            image: &imago_oci::Digest,
            _layer: &oci_spec::image::Descriptor,
        ) -> Result<Box<dyn Read + '_>, RuntimeError> {
            Err(RuntimeError::NoSuchInstance(image.to_string()))
        }
    }

    /// A home for listing tests: its provider, a spec and its instances directory.
    fn listing_home() -> (tempfile::TempDir, LocalProvider, InstanceSpec, PathBuf) {
        let home = tempfile::tempdir().unwrap();
        let provider = provider_without_images(home.path());
        let spec = InstanceSpec::new(imago_oci::Digest::of(b"image"));
        let instances = provider.layout().instances();
        (home, provider, spec, instances)
    }

    /// Writes the record (and spec) of instance `id`, running under supervisor `pid`, which
    /// started at `start`.
    fn write_running(instances: &Path, id: &str, spec: &InstanceSpec, pid: i32, start: u64) {
        let dir = InstanceDir::new(instances, id);
        fs::create_dir_all(&dir.root).unwrap();
        crate::state::write_json_atomic(&dir.spec(), spec).unwrap();
        let mut rec = Instance::new(id.to_owned(), spec).unwrap();
        rec.status = Status::Running;
        rec.supervisor_pid = Some(pid);
        rec.supervisor_start = Some(start);
        dir.write_state(&rec).unwrap();
    }

    /// Registers `pid` as the supervisor of `id` that this provider started.
    fn adopt(provider: &LocalProvider, id: String, pid: i32) {
        provider
            .children
            .lock()
            .unwrap()
            .insert(id, Pid::from_raw(pid));
    }

    /// `list` keeps the records it parsed, but the files stay the truth: a record replaced on
    /// disk (a new status, or a torn file after a crash) is what the next listing shows, a
    /// removed one is gone, and an unchanged one is the same as parsed afresh.
    #[test]
    fn listing_shows_every_change_of_the_records_on_disk() {
        let (_home, provider, spec, instances) = listing_home();
        let dirs: Vec<InstanceDir> = (0..150)
            .map(|n| {
                let dir = InstanceDir::new(&instances, &format!("i{n:03}"));
                fs::create_dir_all(&dir.root).unwrap();
                crate::state::write_json_atomic(&dir.spec(), &spec).unwrap();
                let mut rec = Instance::new(format!("i{n:03}"), &spec).unwrap();
                rec.status = Status::Exited;
                rec.exit_code = Some(0);
                rec.created_ms = n;
                dir.write_state(&rec).unwrap();
                dir
            })
            .collect();
        let first = provider.list().unwrap();
        assert_eq!(first.len(), 150);
        assert!(first.iter().all(|i| i.exit_code == Some(0)));
        assert_eq!(provider.list().unwrap().len(), 150, "the same from memory");

        let mut changed = dirs[7].read_state().unwrap();
        changed.exit_code = Some(3);
        dirs[7].write_state(&changed).unwrap();
        fs::write(dirs[8].state(), b"{\"torn").unwrap();
        fs::remove_dir_all(&dirs[9].root).unwrap();
        let listed = provider.list().unwrap();
        assert_eq!(listed.len(), 149);
        let by_id = |id: &str| listed.iter().find(|i| i.id == id);
        assert_eq!(by_id("i007").unwrap().exit_code, Some(3));
        assert_eq!(
            by_id("i008").unwrap().status,
            Status::Lost,
            "a torn record is lost"
        );
        assert!(by_id("i009").is_none());
        assert_eq!(by_id("i010").unwrap().exit_code, Some(0));
        assert_eq!(
            provider.records.lock().unwrap().len(),
            148,
            "removed records are forgotten"
        );
    }

    /// A supervisor that died is seen by the next listing even when nobody reaped it (`list`
    /// reaps this process's children at most once a second): its instance is lost at once, and
    /// a directory without a record (a launch under way) is never listed.
    #[test]
    fn a_dead_unreaped_supervisor_is_seen_by_the_next_listing() {
        let (_home, provider, spec, instances) = listing_home();
        fs::create_dir_all(InstanceDir::new(&instances, "launching").root).unwrap();
        // A stray file among the instance directories: no instance, and no failed listing.
        fs::write(instances.join("notes"), b"left here by someone").unwrap();
        // A live pid that is not the recorded process (its start time differs): a pid reused.
        let me = std::process::id() as i32;
        let start = crate::state::process_start_time(me).unwrap();
        write_running(&instances, "reused", &spec, me, start + 1);
        let mut children = Vec::new();
        for n in 0..3 {
            let child = Command::new("sleep").arg("600").spawn().unwrap();
            let pid = child.id() as i32;
            let id = format!("i{n}");
            let start = crate::state::process_start_time(pid).unwrap();
            write_running(&instances, &id, &spec, pid, start);
            adopt(&provider, id, pid);
            children.push(child);
        }
        let statuses = || -> Vec<(String, Status)> {
            let mut listed: Vec<(String, Status)> = provider
                .list()
                .unwrap()
                .into_iter()
                .map(|i| (i.id, i.status))
                .collect();
            listed.sort_by(|a, b| a.0.cmp(&b.0));
            listed
        };
        let running = |n: usize| (format!("i{n}"), Status::Running);
        let lost = |n: usize| (format!("i{n}"), Status::Lost);
        let reused = || ("reused".to_owned(), Status::Lost);
        for _ in 0..2 {
            assert_eq!(
                statuses(),
                vec![running(0), running(1), running(2), reused()]
            );
        }
        for (n, child) in children.iter_mut().enumerate() {
            // Killed and not waited for: a zombie until someone reaps it.
            child.kill().unwrap();
            let pid = child.id();
            let deadline = Instant::now() + Duration::from_secs(60);
            while fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
            {
                assert!(Instant::now() < deadline, "sleep {pid} never died");
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut want: Vec<_> = (0..3)
                .map(|m| if m <= n { lost(m) } else { running(m) })
                .collect();
            want.push(reused());
            assert_eq!(statuses(), want, "after killing {n}");
        }
        for mut child in children {
            let _ = child.wait();
        }
    }

    /// The cost of `list` at 1,000 running instances whose records did not change (a
    /// controller's pass between rollouts), and of its parts: `cargo test --release -p
    /// imago-runtime --lib list_of_a_thousand -- --ignored --nocapture`. Every instance's
    /// supervisor is one live child (each is looked at anyway), registered 1,000 times as a
    /// child of this provider, as a controller that launched them all has them.
    #[test]
    #[ignore = "a measurement: run by hand"]
    fn list_of_a_thousand_unchanged_instances_costs() {
        const N: usize = 1000;
        let (_home, provider, _, instances) = listing_home();
        let mut child = Command::new("sleep").arg("600").spawn().unwrap();
        let pid = child.id() as i32;
        let start = crate::state::process_start_time(pid).unwrap();
        let mut spec = InstanceSpec::new(imago_oci::Digest::of(b"image"));
        spec.labels.insert("imago.service".into(), "web".into());
        spec.labels
            .insert("imago.revision".into(), "0123456789abcdef".into());
        spec.env.insert("V".into(), "1".into());
        for n in 0..N {
            let id = format!("{n:016x}");
            write_running(&instances, &id, &spec, pid, start);
            adopt(&provider, id, pid);
        }
        assert_eq!(provider.list().unwrap().len(), N);
        let median = |f: &mut dyn FnMut()| {
            let mut times: Vec<Duration> = (0..31)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .collect();
            times.sort();
            times[times.len() / 2]
        };
        let list = median(&mut || {
            let listed = provider.list().unwrap();
            assert_eq!(listed.len(), N);
            assert!(listed.iter().all(|i| i.status == Status::Running));
        });
        let reap = median(&mut || provider.reap_children());
        let dirs: Vec<InstanceDir> = fs::read_dir(&instances)
            .unwrap()
            .flatten()
            .map(|e| InstanceDir { root: e.path() })
            .collect();
        let readdir = median(&mut || {
            assert_eq!(fs::read_dir(&instances).unwrap().flatten().count(), N);
        });
        let stat = median(&mut || {
            for dir in &dirs {
                assert!(fs::metadata(dir.state()).is_ok());
            }
        });
        let alive = median(&mut || {
            for _ in 0..N {
                assert!(is_alive(pid, start));
            }
        });
        let rec = dirs[0].read_state().unwrap();
        let clone = median(&mut || {
            for _ in 0..N {
                std::hint::black_box(rec.clone());
            }
        });
        child.kill().unwrap();
        child.wait().unwrap();
        eprintln!(
            "list of {N}: {list:?}; reap_children {reap:?}, read_dir {readdir:?}, one stat each {stat:?}, a /proc liveness check each {alive:?}, record clone each {clone:?} (medians of 31)"
        );
    }

    /// A tmpfs mounted at a directory for the life of the value (needs root).
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn at(path: &Path) -> Tmpfs {
            use nix::mount::{MsFlags, mount};
            fs::create_dir_all(path).unwrap();
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            Tmpfs(path.to_owned())
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Where a test home's instance directories are, against its trash.
    #[derive(Clone, Copy, Debug)]
    enum Place {
        /// `<home>/instances`, the same filesystem as `<home>/trash`.
        Home,
        /// A separate filesystem mounted at `<home>/instances`.
        Mount,
        /// `<home>/instances` a symlink to a directory on another filesystem.
        Symlink,
        /// `<home>/trash` a separate filesystem (the instances stay in the home's).
        TrashMount,
    }

    impl Place {
        /// Makes `home`'s `instances` (or trash) so; what is mounted stays until the mounts
        /// are dropped.
        fn prepare(self, home: &Path) -> Vec<Tmpfs> {
            match self {
                Place::Home => Vec::new(),
                Place::Mount => vec![Tmpfs::at(&home.join("instances"))],
                Place::Symlink => {
                    let disk = Tmpfs::at(&home.join("disk"));
                    fs::create_dir(disk.0.join("instances")).unwrap();
                    std::os::unix::fs::symlink(disk.0.join("instances"), home.join("instances"))
                        .unwrap();
                    vec![disk]
                }
                Place::TrashMount => vec![Tmpfs::at(&home.join("trash"))],
            }
        }
    }

    /// A removal killed (SIGKILL) at a random point leaves the instance whole or gone, never
    /// half-removed: a fresh provider lists it as it was, with every file, or not at all, and
    /// finds no directory without its record; its sweep empties the trash. The removal runs in
    /// a child process: this test binary again, running test `test` with the home in
    /// `IMAGO_TEST_REMOVE_HOME`. The instance directories are where `place` says: on another
    /// filesystem than the trash a rename into `<home>/trash` fails (EXDEV), and the removal
    /// failed there.
    fn a_removal_killed_at_random_points(test: &str, place: Place) {
        const CHILD: &str = "IMAGO_TEST_REMOVE_HOME";
        const FILES: usize = 6000;
        let provider_of = provider_without_images;
        if let Some(home) = std::env::var_os(CHILD) {
            let home = PathBuf::from(home);
            let provider = provider_of(&home);
            fs::write(home.join("removing"), b"").unwrap();
            provider.remove("big").unwrap();
            fs::write(home.join("removed"), b"").unwrap();
            return;
        }
        let spec = InstanceSpec::new(imago_oci::Digest::of(b"image"));
        let mut outcomes = Vec::new();
        for round in 0..8 {
            let home = tempfile::tempdir().unwrap();
            let _mounts = place.prepare(home.path());
            let provider = provider_of(home.path());
            let dir = provider.layout().instance_dir("big");
            let data = dir.root.join("data");
            fs::create_dir_all(&data).unwrap();
            crate::state::write_json_atomic(&dir.spec(), &spec).unwrap();
            let mut rec = Instance::new("big".into(), &spec).unwrap();
            rec.status = Status::Exited;
            rec.network = NetworkMode::Host;
            dir.write_state(&rec).unwrap();
            for n in 0..FILES {
                fs::write(data.join(n.to_string()), b"x").unwrap();
            }
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", test, "--test-threads=1"])
                .env(CHILD, home.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Odd rounds: from the spawn, mostly before the removal began.
            let deadline = Instant::now() + Duration::from_secs(30);
            while round % 2 == 0 && !home.path().join("removing").exists() {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: the child never began"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // A random point, from before the rename to well into the deletion.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            std::thread::sleep(Duration::from_micros(u64::from(nanos % 60_000)));
            let _ = child.kill();
            let status = child.wait().unwrap();
            // A child that ended by itself ended its removal: it succeeded, or it panicked.
            assert!(
                status.code() != Some(101),
                "round {round} ({place:?}): the removal failed"
            );

            let fresh = provider_of(home.path());
            let listed = fresh.list().unwrap();
            // The trash inside `instances` is no instance.
            let entries: Vec<PathBuf> = fs::read_dir(provider.layout().instances())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.file_name() != Some(std::ffi::OsStr::new(INSIDE_TRASH)))
                .collect();
            let whole = dir.root.exists();
            if whole {
                assert_eq!(entries, vec![dir.root.clone()], "round {round}");
                assert!(dir.spec().exists() && dir.state().exists(), "round {round}");
                assert_eq!(
                    fs::read_dir(&data).unwrap().count(),
                    FILES,
                    "round {round}: half-removed"
                );
                assert_eq!(listed.len(), 1, "round {round}");
                assert_eq!(listed[0].status, Status::Exited, "round {round}");
            } else {
                assert!(entries.is_empty(), "round {round}: {entries:?}");
                assert!(listed.is_empty(), "round {round}: {listed:?}");
            }
            let swept = fresh.sweep_abandoned();
            for trash in [
                fresh.layout().instance_trash(),
                fresh.layout().instance_trash_inside(),
            ] {
                assert_eq!(
                    fs::read_dir(&trash).map_or(0, |d| d.count()),
                    0,
                    "round {round}: the sweep left {}",
                    trash.display()
                );
            }
            assert_eq!(swept.dirs, 0, "round {round}: {swept:?}");
            if whole {
                fresh.remove("big").unwrap();
            }
            assert!(!dir.root.exists() && fresh.list().unwrap().is_empty());
            outcomes.push((whole, swept.trash));
        }
        eprintln!("{place:?}: (kept whole, swept from the trash) by round: {outcomes:?}");
        // Whatever is left in the trash after a finished removal went; none of it twice.
        assert!(
            outcomes.iter().all(|&(_, trash)| trash <= 1),
            "{outcomes:?}"
        );
    }

    #[test]
    fn a_removal_killed_at_any_point_leaves_the_instance_whole_or_gone() {
        a_removal_killed_at_random_points(
            "local::tests::a_removal_killed_at_any_point_leaves_the_instance_whole_or_gone",
            Place::Home,
        );
    }

    /// Needs root (mounts a tmpfs).
    #[test]
    fn removal_works_and_survives_kills_with_instances_on_a_separate_mount() {
        a_removal_killed_at_random_points(
            "local::tests::removal_works_and_survives_kills_with_instances_on_a_separate_mount",
            Place::Mount,
        );
    }

    /// Needs root (mounts a tmpfs).
    #[test]
    fn removal_works_and_survives_kills_with_instances_a_symlink_to_another_disk() {
        a_removal_killed_at_random_points(
            "local::tests::removal_works_and_survives_kills_with_instances_a_symlink_to_another_disk",
            Place::Symlink,
        );
    }

    /// Needs root (mounts a tmpfs).
    #[test]
    fn removal_works_and_survives_kills_with_the_trash_on_a_separate_mount() {
        a_removal_killed_at_random_points(
            "local::tests::removal_works_and_survives_kills_with_the_trash_on_a_separate_mount",
            Place::TrashMount,
        );
    }

    /// The sweep deletes from either trash what removers that died left there and says how
    /// many it deleted: not the deletions under way (of this process, or of another one that
    /// lives), which it counted as killed removals and deleted under them, and not the trash
    /// inside `instances`, which is no abandoned instance directory.
    #[test]
    fn the_sweep_takes_and_counts_only_what_dead_removers_left_in_the_trash() {
        let home = tempfile::tempdir().unwrap();
        let provider = provider_without_images(home.path());
        let sleep = || Command::new("sleep").arg("30").spawn().unwrap();
        let start_of = |pid: u32| crate::state::process_start_time(pid as i32).unwrap();
        let mut dead = sleep();
        let (dead_pid, dead_start) = (dead.id(), start_of(dead.id()));
        dead.kill().unwrap();
        dead.wait().unwrap();
        let mut live = sleep();
        let (live_pid, live_start) = (live.id(), start_of(live.id()));
        let me = std::process::id();
        let my_start = crate::state::own_start_time().unwrap();
        let trash = provider.layout().instance_trash();
        let inside = provider.layout().instance_trash_inside();
        let entries = [
            (trash.join(format!("a.{dead_pid}.{dead_start}.0")), false),
            (trash.join(format!("b.{live_pid}.{live_start}.1")), true),
            // An older imago's name, without the start time.
            (trash.join(format!("c.{dead_pid}.2")), false),
            (inside.join(format!("d.{dead_pid}.{dead_start}.3")), false),
            // A removal of this process under way.
            (inside.join(format!("e.{me}.{my_start}.4")), true),
            // One of this process that failed part-way (a file that would not go).
            (trash.join(format!("g.{me}.{my_start}.6")), false),
            // The pid of a live process, which started later than the remover named.
            (
                trash.join(format!("f.{live_pid}.{}.5", live_start - 1)),
                false,
            ),
        ];
        for (entry, _) in &entries {
            fs::create_dir_all(entry.join("data")).unwrap();
            fs::write(entry.join("data/file"), b"x").unwrap();
        }
        // Older than an abandoned launch directory may be.
        let old = std::time::SystemTime::now() - ABANDONED_DIR_AGE * 2;
        fs::File::open(&inside).unwrap().set_modified(old).unwrap();

        DELETING
            .lock()
            .unwrap()
            .insert(format!("e.{me}.{my_start}.4"));
        let swept = provider.sweep_abandoned();
        DELETING
            .lock()
            .unwrap()
            .remove(&format!("e.{me}.{my_start}.4"));
        live.kill().unwrap();
        live.wait().unwrap();
        for (entry, kept) in &entries {
            assert_eq!(entry.exists(), *kept, "{}", entry.display());
        }
        assert_eq!(swept.trash, 5, "{swept:?}");
        assert_eq!(swept.dirs, 0, "the trash is no instance: {swept:?}");
        assert!(inside.exists());
    }

    /// Writers killed (SIGKILL) at random points of their writes by rename leave temporary
    /// files beside what they wrote: an instance's record and stop request, a rootfs drift
    /// manifest, seccomp cache files. `list` never takes one for a record nor fails on one, and
    /// the sweep removes those of dead writers and only those: the records stay whole, and the
    /// temporary files of a live writer (this process) stay. The writer is this test binary
    /// again, writing in a loop into the home named by `IMAGO_TEST_RECORD_WRITER`.
    #[test]
    fn the_sweep_takes_what_killed_writers_left_and_listing_never_takes_it_for_a_record() {
        const CHILD: &str = "IMAGO_TEST_RECORD_WRITER";
        let padded = |id: &str| {
            let spec = InstanceSpec::new(imago_oci::Digest::of(b"image"));
            let mut rec = Instance::new(id.to_owned(), &spec).unwrap();
            rec.status = Status::Exited;
            rec.exit_code = Some(0);
            // Large, so that a kill lands inside a write most of the time.
            rec.labels.insert("pad".into(), "x".repeat(1 << 20));
            rec
        };
        if let Some(home) = std::env::var_os(CHILD) {
            let layout = Layout::new(Path::new(&home));
            let dir = layout.instance_dir("w");
            let mut bytes = serde_json::to_vec_pretty(&padded("w")).unwrap();
            bytes.push(b'\n');
            let manifest = layout.rootfs().join(".abc.manifest.json");
            let filter = layout.seccomp_cache().join("abc.bpf");
            for n in 0u64.. {
                crate::state::write_atomic(&dir.state(), &bytes).unwrap();
                crate::state::write_atomic(&dir.stop_request(), n.to_string().as_bytes()).unwrap();
                crate::state::write_atomic(&manifest, &bytes).unwrap();
                crate::state::write_atomic(&filter, &bytes).unwrap();
                fs::write(layout.home.join("written"), b"").unwrap();
            }
            return;
        }
        let dead_pid = || {
            let mut child = Command::new("true").spawn().unwrap();
            let pid = child.id();
            child.wait().unwrap();
            pid
        };
        let me = std::process::id();
        let mut left = Vec::new();
        for round in 0..6u64 {
            let home = tempfile::tempdir().unwrap();
            let provider = provider_without_images(home.path());
            let layout = provider.layout();
            let dir = layout.instance_dir("w");
            fs::create_dir_all(&dir.root).unwrap();
            dir.write_state(&padded("w")).unwrap();
            let dirs = [
                dir.root.clone(),
                layout.rootfs(),
                layout.seccomp_cache(),
                layout.seccomp_cache().with_extension("loads"),
            ];
            for d in &dirs {
                fs::create_dir_all(d).unwrap();
            }
            // A write of this process under way, and what dead writers left where no writer
            // of this test writes.
            let live = dir.root.join(format!(".state.json.{me}.999.tmp"));
            fs::write(&live, b"{").unwrap();
            let planted = [
                dirs[3].join(format!(".abc.{}.0.tmp", dead_pid())),
                layout
                    .instance_dir("w")
                    .root
                    .join(format!(".spec.json.{}.7.tmp", dead_pid())),
            ];
            for file in &planted {
                fs::write(file, b"{").unwrap();
            }
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "local::tests::the_sweep_takes_what_killed_writers_left_and_listing_never_takes_it_for_a_record",
                    "--test-threads=1",
                ])
                .env(CHILD, home.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !home.path().join("written").exists() {
                assert!(Instant::now() < deadline, "the writer never wrote");
                std::thread::sleep(Duration::from_millis(1));
            }
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            std::thread::sleep(Duration::from_micros(u64::from(nanos % 30_000) + round));
            child.kill().unwrap();
            child.wait().unwrap();
            let writer = i32::try_from(child.id()).unwrap();
            let of_writer = || -> Vec<PathBuf> {
                dirs.iter()
                    .flat_map(|d| fs::read_dir(d).unwrap().flatten())
                    .map(|e| e.path())
                    .filter(|p| {
                        let name = p.file_name().unwrap().to_string_lossy();
                        crate::state::temp_file_writer(&name).is_some_and(|w| w.pid == writer)
                    })
                    .collect()
            };
            let killed = of_writer().len();
            left.push(killed);

            let listed = provider.list().unwrap();
            assert_eq!(listed.len(), 1, "round {round}: {listed:?}");
            assert_eq!(
                listed[0].labels["pad"].len(),
                1 << 20,
                "round {round}: torn"
            );
            let swept = provider.sweep_abandoned();
            assert_eq!(of_writer(), Vec::<PathBuf>::new(), "round {round}");
            for file in &planted {
                assert!(!file.exists(), "round {round}: {} stayed", file.display());
            }
            assert!(
                live.exists(),
                "round {round}: a live writer's file was removed"
            );
            assert_eq!(swept.temp_files, killed + planted.len(), "round {round}");
            assert_eq!(swept.dirs, 0, "round {round}: the instance has its record");
            let listed = provider.list().unwrap();
            assert_eq!(listed.len(), 1, "round {round}");
            assert_eq!(listed[0].labels["pad"].len(), 1 << 20, "round {round}");
        }
        eprintln!("temporary files the killed writer left, by round: {left:?}");
    }

    /// What `destroy` waits for: the directories of launches whose launcher lives and that
    /// have no record yet, with their spec once written; not those of dead launchers (the
    /// sweep's), of recorded instances (listed) or the trash.
    /// A launch that is under way from before a listing of the launches under way until after
    /// it is in that listing, whatever step of making its directory it is at (the rename of its
    /// staging directory into place included: a listing beside a rename may see neither name,
    /// and `destroy` would then leave the launch's instance behind). The home is on the disk
    /// of the temporary directory (ext4 here, where a rename was missed), among 2,000 recorded
    /// instances.
    #[test]
    fn a_listing_never_misses_a_launch_that_is_under_way_throughout() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let home = tempfile::tempdir().unwrap();
        let provider = Arc::new(provider_without_images(home.path()));
        let spec = InstanceSpec::new(imago_oci::Digest::of(b"image"));
        for n in 0..2_000 {
            let dir = provider.layout().instance_dir(&format!("{n:012x}"));
            fs::create_dir_all(&dir.root).unwrap();
            dir.write_state(&Instance::new(format!("{n:012x}"), &spec).unwrap())
                .unwrap();
        }
        // Launch k is under way while `started` is k and `recorded` is k - 1: from when its
        // marker exists (a listing that began before is one that began before the launch).
        let started = Arc::new(AtomicU64::new(0));
        let recorded = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let maker = {
            let (provider, started, recorded, stop) = (
                provider.clone(),
                started.clone(),
                recorded.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let spec = InstanceSpec::new(imago_oci::Digest::of(b"image"));
                let mut k = 0;
                while !stop.load(Ordering::SeqCst) {
                    k += 1;
                    let id = format!("launch{k:06}");
                    let dir = provider.layout().instance_dir(&id);
                    let marker = provider
                        .make_instance_dir_marked(&id, &dir, || started.store(k, Ordering::SeqCst))
                        .unwrap();
                    // Under way a while after the rename too, so that listings that began
                    // before it (right after `started`) can end before the record.
                    std::thread::sleep(Duration::from_millis(10));
                    dir.write_state(&Instance::new(id.clone(), &spec).unwrap())
                        .unwrap();
                    // As `launch` does: the marker goes once the record exists.
                    marker.done();
                    recorded.store(k, Ordering::SeqCst);
                    fs::remove_dir_all(&dir.root).unwrap();
                }
                k
            })
        };
        let mut checked = 0;
        let mut missed = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while checked < 400 && std::time::Instant::now() < deadline {
            let before = (
                started.load(Ordering::SeqCst),
                recorded.load(Ordering::SeqCst),
            );
            let listed = provider.launches_under_way();
            let k = before.0;
            let id = format!("launch{k:06}");
            // Read before `after`: the maker removes the directory only after `recorded`.
            let recorded_now = provider.layout().instance_dir(&id).state().exists();
            let after = (
                started.load(Ordering::SeqCst),
                recorded.load(Ordering::SeqCst),
            );
            if before == after && before.1 < k {
                checked += 1;
                // Not listed as under way: then its record must have existed before the
                // listing ended (the marker went after it), so a listing of the instances made
                // next, as `destroy` makes it, shows it.
                if !listed.iter().any(|(listed, _)| *listed == id) && !recorded_now {
                    missed.push(id);
                }
            }
        }
        stop.store(true, Ordering::SeqCst);
        let made = maker.join().unwrap();
        assert!(
            checked >= 50,
            "only {checked} listings beside a launch ({made} launches)"
        );
        assert!(
            missed.is_empty(),
            "{} of {checked} listings missed the launch under way: {:?}",
            missed.len(),
            &missed[..missed.len().min(5)]
        );
    }

    #[test]
    fn launches_under_way_are_those_of_live_launchers_without_a_record() {
        let home = tempfile::tempdir().unwrap();
        let provider = provider_without_images(home.path());
        let spec = InstanceSpec::new(imago_oci::Digest::of(b"image"));
        let me = format!(
            "{} {}\n",
            std::process::id(),
            crate::state::own_start_time().unwrap()
        );
        let make = |id: &str, launcher: Option<&str>, with_spec: bool, record: bool| {
            let dir = provider.layout().instance_dir(id);
            fs::create_dir_all(&dir.root).unwrap();
            if let Some(launcher) = launcher {
                fs::write(dir.launcher(), launcher).unwrap();
            }
            if with_spec {
                crate::state::write_json_atomic(&dir.spec(), &spec).unwrap();
            }
            if record {
                dir.write_state(&Instance::new(id.into(), &spec).unwrap())
                    .unwrap();
            }
        };
        make("specless", Some(&me), false, false);
        make("specced", Some(&me), true, false);
        make("unnamed", None, false, false);
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        make("dead", Some(&format!("{} 1\n", gone.id())), true, false);
        make("recorded", Some(&me), true, true);
        fs::create_dir_all(provider.layout().instance_trash_inside().join("x.1.1.0")).unwrap();
        let mut under_way: Vec<(String, bool)> = provider
            .launches_under_way()
            .into_iter()
            .map(|(id, spec)| (id, spec.is_some()))
            .collect();
        under_way.sort();
        assert_eq!(
            under_way,
            vec![
                ("specced".into(), true),
                ("specless".into(), false),
                ("unnamed".into(), false)
            ]
        );
    }

    /// Set in a copy of this test binary that launches in a loop in the home it names, until
    /// killed (see `launchers_killed_at_any_point_are_never_waited_for_and_live_ones_kept`).
    const LAUNCHER_HOME: &str = "IMAGO_TEST_LAUNCHER_HOME";

    /// The launcher's side: real launches of an image this provider does not have, everything
    /// of a launch up to the image's lookup (its directory made, named, its spec written), then
    /// its directory discarded. It counts its launches in `launches.<pid>` (every tenth) and
    /// writes any other outcome than "no such image" to `error.<pid>`.
    fn launch_until_killed(home: &Path) -> ! {
        let provider = provider_without_images(home);
        let spec = InstanceSpec::new(imago_oci::Digest::of(b"image"));
        let me = std::process::id();
        for n in 1u64.. {
            match provider.launch(&spec) {
                Err(RuntimeError::NoSuchInstance(_)) => {}
                other => fs::write(home.join(format!("error.{me}")), format!("{other:?}")).unwrap(),
            }
            if n % 10 == 1 {
                crate::state::write_atomic(
                    &home.join(format!("launches.{me}")),
                    n.to_string().as_bytes(),
                )
                .unwrap();
            }
        }
        unreachable!()
    }

    /// Runs this test binary as a launcher in `home` ([`launch_until_killed`]); returns once it
    /// has launched.
    fn spawn_launcher(home: &Path) -> std::process::Child {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "local::tests::launchers_killed_at_any_point_are_never_waited_for_and_live_ones_kept",
                "--test-threads=1",
            ])
            .env(LAUNCHER_HOME, home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let launched = home.join(format!("launches.{}", child.id()));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !launched.exists() {
            assert!(Instant::now() < deadline, "the launcher never launched");
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    /// Regression: a launcher killed between making its instance directory and writing its
    /// `launcher` file left a directory that counted as a launch under way for
    /// `ABANDONED_DIR_AGE` (60 s), and `imago destroy` waited for it (47 s in tests/chaos.rs
    /// under 20 controller kills). Launchers killed (SIGKILL) at random points of real launches
    /// now leave nothing that `launches_under_way` counts, no directory that names nobody, and
    /// the sweep takes all they left at once; a live launcher's launches beside them, swept all
    /// the while, never lose their directory.
    #[test]
    fn launchers_killed_at_any_point_are_never_waited_for_and_live_ones_kept() {
        if let Some(home) = std::env::var_os(LAUNCHER_HOME) {
            launch_until_killed(Path::new(&home));
        }
        let home = tempfile::tempdir().unwrap();
        let provider = provider_without_images(home.path());
        let instances = provider.layout().instances();
        let mut live = spawn_launcher(home.path());
        let live_pid = i32::try_from(live.id()).unwrap();
        // The launcher (pid) an entry of `instances` names, if any: by its staging name or its
        // `launcher` file; `None` if it is gone meanwhile (a live launch discarded).
        let launcher_of = |name: &str| -> Option<Option<i32>> {
            if let Some((_, pid, _)) = staged_launch(name) {
                return Some(Some(pid));
            }
            let dir = instances.join(name);
            match fs::read_to_string(dir.join("launcher")) {
                Ok(text) => Some(text.split_whitespace().next().and_then(|p| p.parse().ok())),
                Err(_) if !dir.exists() => None,
                Err(e) => panic!("{name} names no launcher: {e}"),
            }
        };
        let rounds = 40;
        let mut left_by_round = Vec::new();
        for round in 0..rounds {
            let mut killed = spawn_launcher(home.path());
            let killed_pid = i32::try_from(killed.id()).unwrap();
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            std::thread::sleep(Duration::from_micros(u64::from(nanos % 5_000)));
            killed.kill().unwrap();
            killed.wait().unwrap();
            // What the killed launcher left: never a directory that names nobody.
            let mut left = Vec::new();
            for entry in fs::read_dir(&instances).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == INSIDE_TRASH {
                    continue;
                }
                match launcher_of(&name) {
                    Some(Some(pid)) if pid == killed_pid => left.push(name),
                    Some(Some(pid)) => assert_eq!(pid, live_pid, "round {round}: {name}"),
                    Some(None) => panic!("round {round}: {name} names nobody"),
                    None => {}
                }
            }
            // Never waited for.
            for (id, _) in provider.launches_under_way() {
                assert!(
                    !left.iter().any(|name| name.contains(&id)),
                    "round {round}: {id} of a dead launcher is under way"
                );
            }
            // Taken at once, and only they: a live launch is never taken.
            let swept = provider.remove_abandoned_dirs();
            assert_eq!(swept, left.len(), "round {round}: {left:?}");
            for name in &left {
                assert!(
                    !instances.join(name).exists(),
                    "round {round}: {name} stays"
                );
            }
            left_by_round.push(left.len());
        }
        let error = home.path().join(format!("error.{live_pid}"));
        assert!(
            !error.exists(),
            "a live launch failed: {}",
            fs::read_to_string(&error).unwrap_or_default()
        );
        live.kill().unwrap();
        live.wait().unwrap();
        provider.remove_abandoned_dirs();
        let rest: Vec<String> = fs::read_dir(&instances)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != INSIDE_TRASH)
            .collect();
        assert!(rest.is_empty(), "{rest:?}");
        let launches =
            fs::read_to_string(home.path().join(format!("launches.{live_pid}"))).unwrap();
        eprintln!(
            "directories left by killed launchers, by round: {left_by_round:?}; live launches: {launches}"
        );
    }

    /// `rm` of a lost instance kills its init and removes its cgroups at once; the init is in
    /// its cgroup until it has exited, which on a slow machine (the cgroup v2 VM of
    /// scripts/test) is later than the engine's own retries. Here a process that leaves 300 ms
    /// after the removal starts stands for it. Needs root.
    #[test]
    fn cgroups_are_removed_once_a_process_still_in_them_has_exited() {
        let id = format!("test-busy-{}", std::process::id());
        let root = crate::supervisor::cgroup2_mount().expect("a cgroup2 tree is mounted");
        let dir = root.join(cgroups_path(&id).trim_start_matches('/'));
        fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            child.kill().unwrap();
            child.wait().unwrap();
        });
        remove_cgroups(&id);
        let left = dir.exists();
        killer.join().unwrap();
        let _ = fs::remove_dir(&dir);
        assert!(!left, "{} is left", dir.display());
    }
}
