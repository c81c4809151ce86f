use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::Pid;
use pathrs::flags::OpenFlags;
use pathrs::procfs::{ProcfsBase, ProcfsHandle};
use procfs::process::MountInfo;
use procfs::{FromRead, ProcError, ProcessCGroups};

use super::blkio::{Blkio, V1BlkioStatsError};
use super::controller::Controller;
use super::controller_type::CONTROLLERS;
use super::cpu::{Cpu, V1CpuStatsError};
use super::cpuacct::{CpuAcct, V1CpuAcctStatsError};
use super::cpuset::{CpuSet, V1CpuSetControllerError};
use super::devices::Devices;
use super::freezer::{Freezer, V1FreezerControllerError};
use super::hugetlb::{HugeTlb, V1HugeTlbControllerError, V1HugeTlbStatsError};
use super::memory::{Memory, V1MemoryControllerError, V1MemoryStatsError};
use super::network_classifier::NetworkClassifier;
use super::network_priority::NetworkPriority;
use super::perf_event::PerfEvent;
use super::pids::Pids;
use super::util::V1MountPointError;
use super::{ControllerType as CtrlType, util};
use crate::common::{
    self, AnyCgroupManager, CGROUP_PROCS, CgroupManager, ControllerOpt, FreezerState,
    JoinSafelyError, PathBufExt, WrapIoResult, WrappedIoError,
};
use crate::stats::{PidStatsError, Stats, StatsProvider};

pub struct Manager {
    subsystems: HashMap<CtrlType, PathBuf>,
    /// (imago) The hierarchies in which the process that built the manager is in the root
    /// cgroup.
    at_root: HashSet<CtrlType>,
}

#[derive(thiserror::Error, Debug)]
pub enum V1ManagerError {
    #[error("io error: {0}")]
    WrappedIo(#[from] WrappedIoError),
    #[error("mount point error: {0}")]
    MountPoint(#[from] V1MountPointError),
    #[error("proc error: {0}")]
    Proc(#[from] ProcError),
    #[error("while joining paths: {0}")]
    JoinSafely(#[from] JoinSafelyError),
    #[error("cgroup {0} is required to fulfill the request, but is not supported by this system")]
    CGroupRequired(CtrlType),
    #[error("subsystem does not exist")]
    SubsystemDoesNotExist,
    #[error(transparent)]
    Pathrs(#[from] pathrs::error::Error),

    #[error(transparent)]
    BlkioController(WrappedIoError),
    #[error(transparent)]
    CpuController(WrappedIoError),
    #[error(transparent)]
    CpuAcctController(WrappedIoError),
    #[error(transparent)]
    CpuSetController(#[from] V1CpuSetControllerError),
    #[error(transparent)]
    FreezerController(#[from] V1FreezerControllerError),
    #[error(transparent)]
    HugeTlbController(#[from] V1HugeTlbControllerError),
    #[error(transparent)]
    MemoryController(#[from] V1MemoryControllerError),
    #[error(transparent)]
    PidsController(WrappedIoError),

    #[error(transparent)]
    BlkioStats(#[from] V1BlkioStatsError),
    #[error(transparent)]
    CpuStats(#[from] V1CpuStatsError),
    #[error(transparent)]
    CpuAcctStats(#[from] V1CpuAcctStatsError),
    #[error(transparent)]
    PidsStats(#[from] PidStatsError),
    #[error(transparent)]
    HugeTlbStats(#[from] V1HugeTlbStatsError),
    #[error(transparent)]
    MemoryStats(#[from] V1MemoryStatsError),
}

impl Manager {
    /// Constructs a new cgroup manager with cgroups_path being relative to the root of the subsystem
    ///
    /// (imago) `/proc/self/mountinfo` and `/proc/self/cgroup` are read once here, not once per
    /// subsystem as upstream 0.7.0 did (24 opens and parses of the two files per manager).
    pub fn new(cgroup_path: &Path) -> Result<Self, V1ManagerError> {
        let mounts = util::list_subsystem_mounts()?;
        let mount_points: Vec<PathBuf> = mounts.iter().map(|m| m.mount_point.clone()).collect();
        let own_cgroups = ProcessCGroups::from_read(ProcfsHandle::new()?.open(
            ProcfsBase::ProcSelf,
            "cgroup",
            OpenFlags::O_RDONLY | OpenFlags::O_CLOEXEC,
        )?)?;
        let mut subsystems = HashMap::new();
        let mut at_root = HashSet::new();
        for subsystem in CONTROLLERS {
            tracing::debug!("Get path for subsystem: {}", subsystem);
            let Some(mount_point) = util::find_subsystem_mount_point(subsystem, &mount_points)
            else {
                tracing::warn!("cgroup {} not supported on this system", subsystem);
                continue;
            };
            let name = subsystem.to_string();
            let Some(own) = own_cgroups.0.iter().find(|c| c.controllers.contains(&name)) else {
                tracing::warn!("cgroup {} not supported on this system", subsystem);
                continue;
            };
            let path = if cgroup_path.as_os_str().is_empty() {
                mount_point.join_safely(Path::new(&own.pathname))?
            } else {
                mount_point.join_safely(cgroup_path)?
            };
            if own.pathname == "/" && hierarchy_root(&mount_point, &mounts) {
                at_root.insert(*subsystem);
            }
            subsystems.insert(*subsystem, path);
        }

        Ok(Manager {
            subsystems,
            at_root,
        })
    }

    /// (imago) The hierarchies a new container's init joins (see
    /// [`CgroupManager::add_init_task`]): devices (its device rules; `get_all_pids` lists the
    /// container from it) and freezer (kill of all its processes, pause) always; memory always
    /// (the OOM kills of the container are counted in its own memory cgroup, limited or not);
    /// every hierarchy the resources set something in (and cpuacct with cpu, so that the CPU
    /// a limited container uses is counted apart); and every other hierarchy in which this
    /// process is not in the root cgroup, so that the container never stays in, and is never
    /// limited or counted with, its launcher's cgroup. Left out: a hierarchy the resources do
    /// not touch and whose root cgroup this process is in; there, the container's own empty
    /// cgroup would limit nothing, and each `cgroup.procs` write takes the kernel's global
    /// `cgroup_threadgroup_rwsem` (waiting an RCU grace period on a kernel without
    /// `favordynmods`).
    fn init_subsystems(
        &self,
        controller_opt: &ControllerOpt,
    ) -> Result<Vec<(&CtrlType, &PathBuf)>, V1ManagerError> {
        let required = self.get_required_controllers(controller_opt)?;
        let cpu = required.contains_key(&CtrlType::Cpu);
        Ok(self
            .subsystems
            .iter()
            .filter(|(ctrl_type, _)| {
                matches!(
                    ctrl_type,
                    CtrlType::Devices | CtrlType::Freezer | CtrlType::Memory
                ) || required.contains_key(ctrl_type)
                    || (cpu && **ctrl_type == CtrlType::CpuAcct)
                    || !self.at_root.contains(ctrl_type)
            })
            .collect())
    }

    fn add_task_to(
        pid: Pid,
        ctrl_type: &CtrlType,
        cgroup_path: &Path,
    ) -> Result<(), V1ManagerError> {
        match ctrl_type {
            CtrlType::Cpu => Cpu::add_task(pid, cgroup_path)?,
            CtrlType::CpuAcct => CpuAcct::add_task(pid, cgroup_path)?,
            CtrlType::CpuSet => CpuSet::add_task(pid, cgroup_path)?,
            CtrlType::Devices => Devices::add_task(pid, cgroup_path)?,
            CtrlType::HugeTlb => HugeTlb::add_task(pid, cgroup_path)?,
            CtrlType::Memory => Memory::add_task(pid, cgroup_path)?,
            CtrlType::Pids => Pids::add_task(pid, cgroup_path)?,
            CtrlType::PerfEvent => PerfEvent::add_task(pid, cgroup_path)?,
            CtrlType::Blkio => Blkio::add_task(pid, cgroup_path)?,
            CtrlType::NetworkPriority => NetworkPriority::add_task(pid, cgroup_path)?,
            CtrlType::NetworkClassifier => NetworkClassifier::add_task(pid, cgroup_path)?,
            CtrlType::Freezer => Freezer::add_task(pid, cgroup_path)?,
        }
        Ok(())
    }

    fn get_required_controllers(
        &self,
        controller_opt: &ControllerOpt,
    ) -> Result<HashMap<&CtrlType, &PathBuf>, V1ManagerError> {
        let mut required_controllers = HashMap::new();

        for controller in CONTROLLERS {
            let required = match controller {
                CtrlType::Cpu => Cpu::needs_to_handle(controller_opt).is_some(),
                CtrlType::CpuAcct => CpuAcct::needs_to_handle(controller_opt).is_some(),
                CtrlType::CpuSet => CpuSet::needs_to_handle(controller_opt).is_some(),
                CtrlType::Devices => Devices::needs_to_handle(controller_opt).is_some(),
                CtrlType::HugeTlb => HugeTlb::needs_to_handle(controller_opt).is_some(),
                CtrlType::Memory => Memory::needs_to_handle(controller_opt).is_some(),
                CtrlType::Pids => Pids::needs_to_handle(controller_opt).is_some(),
                CtrlType::PerfEvent => PerfEvent::needs_to_handle(controller_opt).is_some(),
                CtrlType::Blkio => Blkio::needs_to_handle(controller_opt).is_some(),
                CtrlType::NetworkPriority => {
                    NetworkPriority::needs_to_handle(controller_opt).is_some()
                }
                CtrlType::NetworkClassifier => {
                    NetworkClassifier::needs_to_handle(controller_opt).is_some()
                }
                CtrlType::Freezer => Freezer::needs_to_handle(controller_opt).is_some(),
            };

            if required {
                if let Some(subsystem_path) = self.subsystems.get(controller) {
                    required_controllers.insert(controller, subsystem_path);
                } else {
                    return Err(V1ManagerError::CGroupRequired(*controller));
                }
            }
        }

        Ok(required_controllers)
    }

    pub fn any(self) -> AnyCgroupManager {
        AnyCgroupManager::V1(self)
    }
}

/// (imago) Whether the cgroup at `mount_point`, which `/proc/self/cgroup` names `/` (the root
/// of this process's cgroup namespace), is the root cgroup of its hierarchy. In a private
/// cgroup namespace `/` is the launcher's own cgroup, wherever it is: taking it for the root
/// left new containers in the launcher's cgroup in every hierarchy their resources did not
/// touch (a container's imago launched inside another container on a v1 host). It is the root
/// when the mount shows the namespace root (mountinfo's `root` is `/`; a host mount seen from
/// a namespace below its root shows `/..`) and that cgroup has `release_agent`, a file the
/// kernel gives only the root cgroup of a v1 hierarchy. Unknown counts as not the root: the
/// container then joins a cgroup of its own there, which is always correct, only one write
/// slower.
fn hierarchy_root(mount_point: &Path, mounts: &[MountInfo]) -> bool {
    mounts
        .iter()
        .find(|m| m.mount_point == mount_point)
        .is_some_and(|m| m.root == "/")
        && mount_point.join("release_agent").exists()
}

/// (imago) The v1 `tasks` file of a cgroup: writing a thread id (`0`: the writer) moves that
/// one thread.
const CGROUP_TASKS: &str = "tasks";

/// (imago) Moves the calling thread, the only thread of its process, into the v1 cgroup
/// `cgroup_path` (created if missing) by writing `0` into its `tasks` file: for a
/// single-threaded process the same move as its pid written into `cgroup.procs`. The
/// difference is the kernel's locking: a `cgroup.procs` write (a whole thread group) takes the
/// global `cgroup_threadgroup_rwsem` for writing, and on a kernel without `favordynmods` the
/// first writer after a quiet moment waits a whole RCU grace period for it (5-20 ms measured
/// on this project's hosts, on the launch's critical path); moving `current` alone, which
/// cannot exit or exec under the writer, needs only `cgroup_mutex` on the kernels whose
/// `cgroup_procs_write_start` skips the global lock for it (6.18 here: 0.47 ms against 6.8 ms
/// for a first move, BENCHMARKS.md). A kernel that takes the lock for both files waits the
/// same, so this is never slower.
fn join_self(cgroup_path: &Path) -> Result<(), V1ManagerError> {
    fs::create_dir_all(cgroup_path).wrap_create_dir(cgroup_path)?;
    common::write_cgroup_file_str(cgroup_path.join(CGROUP_TASKS), "0")?;
    Ok(())
}

/// (imago) Whether this process has exactly one thread (so that moving the calling thread
/// moves the process); `false` if that cannot be told.
fn single_threaded() -> bool {
    match fs::read_dir("/proc/self/task") {
        Ok(rd) => rd.take(2).count() == 1,
        Err(_) => false,
    }
}

impl CgroupManager for Manager {
    type Error = V1ManagerError;

    fn get_all_pids(&self) -> Result<Vec<Pid>, Self::Error> {
        let devices = self.subsystems.get(&CtrlType::Devices);
        if let Some(p) = devices {
            Ok(common::get_all_pids(p)?)
        } else {
            Err(V1ManagerError::SubsystemDoesNotExist)
        }
    }

    fn add_task(&self, pid: Pid) -> Result<(), Self::Error> {
        for (ctrl_type, cgroup_path) in &self.subsystems {
            Self::add_task_to(pid, ctrl_type, cgroup_path)?;
        }

        Ok(())
    }

    fn add_init_task(&self, pid: Pid, controller_opt: &ControllerOpt) -> Result<(), Self::Error> {
        // (imago) Both callers (libcontainer's intermediate process and a directly cloned
        // init) add themselves, single-threaded: see `join_self`.
        let own = pid == nix::unistd::getpid() && single_threaded();
        // (imago) Hierarchies mounted together (`cpu,cpuacct`, `net_cls,net_prio`) are one
        // cgroup: joined once, not once per controller.
        let mut joined: Vec<&PathBuf> = Vec::new();
        for (ctrl_type, cgroup_path) in self.init_subsystems(controller_opt)? {
            if *ctrl_type != CtrlType::CpuSet {
                if joined.contains(&cgroup_path) {
                    continue;
                }
                joined.push(cgroup_path);
            }
            if own && *ctrl_type != CtrlType::CpuSet {
                join_self(cgroup_path)?;
            } else {
                Self::add_task_to(pid, ctrl_type, cgroup_path)?;
            }
        }

        Ok(())
    }

    fn apply(&self, controller_opt: &ControllerOpt) -> Result<(), Self::Error> {
        for (ctrl_type, cgroup_path) in self.get_required_controllers(controller_opt)? {
            match ctrl_type {
                CtrlType::Cpu => Cpu::apply(controller_opt, cgroup_path)?,
                CtrlType::CpuAcct => CpuAcct::apply(controller_opt, cgroup_path)?,
                CtrlType::CpuSet => CpuSet::apply(controller_opt, cgroup_path)?,
                CtrlType::Devices => Devices::apply(controller_opt, cgroup_path)?,
                CtrlType::HugeTlb => HugeTlb::apply(controller_opt, cgroup_path)?,
                CtrlType::Memory => Memory::apply(controller_opt, cgroup_path)?,
                CtrlType::Pids => Pids::apply(controller_opt, cgroup_path)?,
                CtrlType::PerfEvent => PerfEvent::apply(controller_opt, cgroup_path)?,
                CtrlType::Blkio => Blkio::apply(controller_opt, cgroup_path)?,
                CtrlType::NetworkPriority => NetworkPriority::apply(controller_opt, cgroup_path)?,
                CtrlType::NetworkClassifier => {
                    NetworkClassifier::apply(controller_opt, cgroup_path)?
                }
                CtrlType::Freezer => Freezer::apply(controller_opt, cgroup_path)?,
            }
        }

        Ok(())
    }

    fn remove(&self) -> Result<(), Self::Error> {
        for cgroup_path in self.subsystems.values() {
            if cgroup_path.exists() {
                tracing::debug!("remove cgroup {:?}", cgroup_path);
                let procs_path = cgroup_path.join(CGROUP_PROCS);
                let procs = fs::read_to_string(&procs_path).wrap_read(&procs_path)?;

                for line in procs.lines() {
                    let pid: i32 = line
                        .parse()
                        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))
                        .wrap_other(&procs_path)?;
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                }

                common::delete_with_retry(cgroup_path, 4, Duration::from_millis(100))?;
            }
        }

        Ok(())
    }

    fn freeze(&self, state: FreezerState) -> Result<(), Self::Error> {
        let controller_opt = ControllerOpt {
            resources: &Default::default(),
            freezer_state: Some(state),
            oom_score_adj: None,
            disable_oom_killer: false,
        };
        Ok(Freezer::apply(
            &controller_opt,
            self.subsystems
                .get(&CtrlType::Freezer)
                .ok_or(V1ManagerError::SubsystemDoesNotExist)?,
        )?)
    }

    fn stats(&self) -> Result<Stats, Self::Error> {
        let mut stats = Stats::default();

        for (ctrl_type, cgroup_path) in &self.subsystems {
            // (imago) A hierarchy the container's init did not join has no cgroup of it.
            if !cgroup_path.exists() {
                continue;
            }
            match ctrl_type {
                CtrlType::Cpu => stats.cpu.throttling = Cpu::stats(cgroup_path)?,
                CtrlType::CpuAcct => stats.cpu.usage = CpuAcct::stats(cgroup_path)?,
                CtrlType::Pids => stats.pids = Pids::stats(cgroup_path)?,
                CtrlType::HugeTlb => stats.hugetlb = HugeTlb::stats(cgroup_path)?,
                CtrlType::Blkio => stats.blkio = Blkio::stats(cgroup_path)?,
                CtrlType::Memory => stats.memory = Memory::stats(cgroup_path)?,
                _ => continue,
            }
        }

        Ok(stats)
    }
}
