//! The seccomp filter of an instance: the `linux.seccomp` section of its OCI runtime config,
//! which both engines install just before they exec the instance's program.
//!
//! The default profile follows Docker's and containerd's default for a container without
//! `CAP_SYS_ADMIN` (imago never grants it, see [`crate::bundle::CAPABILITIES`]): every syscall not
//! listed fails with EPERM; namespaces cannot be made (`unshare`, `setns`, `clone` with a
//! `CLONE_NEW*` flag, `clone3`, which is answered ENOSYS so that libc falls back to `clone`),
//! nothing can be mounted, and the kernel keyring, BPF, perf, module, clock, swap, reboot and
//! accounting syscalls are out of reach. Two deliberate differences: Docker allows `ptrace`
//! and `process_vm_readv/writev` on kernels from 4.8 on; imago does not, so an instance's
//! processes cannot read or steer each other (the kernel would let a process trace a sibling
//! of the same user). And the filter leaves out the x32 ABI (see `ARCHITECTURES`).
//! `unconfined` or a profile file of the service turns the filter off or replaces it.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxSeccomp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{Engine, RuntimeError};

/// Which seccomp filter an instance runs under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// imago's default profile ([`default_profile`]).
    #[default]
    Default,
    /// No filter at all.
    Unconfined,
    /// A profile of the user's, in the OCI runtime spec's `linux.seccomp` form. The instance
    /// spec carries the profile itself, not the file's path, so that its hash changes with it.
    Profile(Box<LinuxSeccomp>),
}

/// The keys the OCI `linux.seccomp` form defines, at each level. Anything else is refused
/// rather than ignored: Docker's profile format adds `includes`/`excludes` conditions that,
/// silently dropped, would allow `mount` and `unshare` unconditionally.
const PROFILE_KEYS: &[&str] = &[
    "defaultAction",
    "defaultErrnoRet",
    "architectures",
    "flags",
    "listenerPath",
    "listenerMetadata",
    "syscalls",
];
const SYSCALL_KEYS: &[&str] = &["names", "action", "errnoRet", "args"];
const ARG_KEYS: &[&str] = &["index", "value", "valueTwo", "op"];

impl Seccomp {
    pub fn is_default(&self) -> bool {
        matches!(self, Seccomp::Default)
    }

    /// A setting as written on the command line or in `imago.toml`: `default`, `unconfined`,
    /// or the path of a profile file (relative paths are taken from `base`).
    pub fn from_setting(setting: &str, base: &Path) -> Result<Seccomp, RuntimeError> {
        match setting {
            "default" => Ok(Seccomp::Default),
            "unconfined" => Ok(Seccomp::Unconfined),
            "" => Err(RuntimeError::InvalidSpec(
                "empty seccomp setting (expected default, unconfined or a profile file)".into(),
            )),
            path => Seccomp::load(&base.join(path)),
        }
    }

    /// Reads a profile file: JSON in the OCI runtime spec's `linux.seccomp` form.
    pub fn load(path: &Path) -> Result<Seccomp, RuntimeError> {
        let bad = |reason: String| RuntimeError::SeccompProfile {
            path: path.to_owned(),
            reason,
        };
        let text = fs::read(path).map_err(RuntimeError::io("cannot read", path))?;
        let value: Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        Seccomp::from_profile(value).map_err(bad)
    }

    /// A profile in the OCI runtime spec's `linux.seccomp` form, given inline (in `imago.toml`
    /// or a stored release). Keys the form does not have are refused, as in a file.
    pub fn from_profile(value: Value) -> Result<Seccomp, String> {
        check_keys(&value)?;
        let profile: LinuxSeccomp = serde_json::from_value(value).map_err(|e| e.to_string())?;
        Ok(Seccomp::Profile(Box::new(profile)))
    }

    /// The `linux.seccomp` section of the runtime config for `engine`; `None` for no filter.
    pub fn oci_section(&self, engine: Engine) -> Result<Option<Value>, RuntimeError> {
        let mut section = match self {
            Seccomp::Default => default_profile(),
            Seccomp::Unconfined => return Ok(None),
            Seccomp::Profile(profile) => {
                serde_json::to_value(profile).map_err(|source| RuntimeError::Json {
                    path: PathBuf::from("linux.seccomp"),
                    source,
                })?
            }
        };
        if engine == Engine::Embedded {
            swap_masked_operands(&mut section);
        }
        Ok(Some(section))
    }
}

/// For `SCMP_CMP_MASKED_EQ` the OCI runtime spec and runc take `value` as the mask and
/// `valueTwo` as what the masked argument must equal; libcontainer 0.7 hands them to
/// libseccomp the other way round, which turns `clone`'s namespace-flag check into "any
/// flags". Swapping the two for the embedded engine makes both engines install one filter.
pub(crate) fn swap_masked_operands(section: &mut Value) {
    let rules = section.get_mut("syscalls").and_then(Value::as_array_mut);
    for rule in rules.into_iter().flatten() {
        let args = rule.get_mut("args").and_then(Value::as_array_mut);
        for arg in args.into_iter().flatten() {
            if arg.get("op").and_then(Value::as_str) == Some("SCMP_CMP_MASKED_EQ")
                && let Some(arg) = arg.as_object_mut()
            {
                let mask = arg.remove("value").unwrap_or(json!(0));
                let datum = arg.remove("valueTwo").unwrap_or(json!(0));
                arg.insert("value".into(), datum);
                arg.insert("valueTwo".into(), mask);
            }
        }
    }
}

/// Refuses keys the OCI form does not have (naming where they are).
fn check_keys(profile: &Value) -> Result<(), String> {
    let object = profile
        .as_object()
        .ok_or("expected a JSON object with defaultAction and syscalls")?;
    let unknown = |at: &str, key: &str| {
        let hint = if matches!(key, "archMap" | "includes" | "excludes") {
            " (Docker's profile format is not supported: write architectures and plain syscall rules, as in the OCI runtime spec)"
        } else {
            ""
        };
        format!("unknown field {key:?} {at}{hint}")
    };
    if let Some(key) = object.keys().find(|k| !PROFILE_KEYS.contains(&k.as_str())) {
        return Err(unknown("at the top level", key));
    }
    let syscalls = object.get("syscalls").and_then(Value::as_array);
    for (i, rule) in syscalls.into_iter().flatten().enumerate() {
        let Some(rule) = rule.as_object() else {
            continue;
        };
        if let Some(key) = rule.keys().find(|k| !SYSCALL_KEYS.contains(&k.as_str())) {
            return Err(unknown(&format!("in syscalls[{i}]"), key));
        }
        let args = rule.get("args").and_then(Value::as_array);
        for (j, arg) in args.into_iter().flatten().enumerate() {
            if let Some(key) = arg
                .as_object()
                .and_then(|a| a.keys().find(|k| !ARG_KEYS.contains(&k.as_str())))
            {
                return Err(unknown(&format!("in syscalls[{i}].args[{j}]"), key));
            }
        }
    }
    Ok(())
}

/// EPERM: what a refused syscall returns, as in Docker.
const EPERM: u32 = 1;
/// ENOSYS for `clone3`: its flags are in memory a filter cannot read, so it is refused in a
/// way that makes glibc and musl fall back to `clone`, whose flags are checked.
const ENOSYS: u32 = 38;

/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
/// CLONE_NEWPID | CLONE_NEWNET`: a `clone` with any of them set is refused.
const CLONE_NAMESPACE_FLAGS: u64 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

/// `personality` values allowed: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and
/// 0xffffffff (query the current one).
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// `AF_VSOCK`: the one socket family refused.
const AF_VSOCK: u64 = 40;

/// The architectures the filter covers: the native one and the 32-bit one a program of this
/// machine could use (its calls go through another syscall table). Unlike Docker, not x32:
/// libseccomp builds the x86_64 rules a second time for it, which doubled the filter's cost
/// per launch (BENCHMARKS.md), and kernels leave the x32 ABI off unless booted with
/// `syscall.x32=y`; an x32 call meets the filter's bad-architecture action instead.
#[cfg(target_arch = "x86_64")]
const ARCHITECTURES: &[&str] = &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"];
#[cfg(target_arch = "aarch64")]
const ARCHITECTURES: &[&str] = &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCHITECTURES: &[&str] = &["SCMP_ARCH_NATIVE"];

/// Syscalls only some architectures have.
#[cfg(target_arch = "x86_64")]
const ARCH_SYSCALLS: &[&str] = &["arch_prctl", "modify_ldt"];
#[cfg(target_arch = "aarch64")]
const ARCH_SYSCALLS: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "breakpoint",
    "cacheflush",
    "set_tls",
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH_SYSCALLS: &[&str] = &[];

/// Allowed without conditions: Docker's unconditional list (names a kernel or libseccomp does
/// not know are skipped by both engines).
const ALLOWED: &str = "\
    accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32 \
    clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64 \
    clock_nanosleep clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 \
    dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait \
    epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 \
    fadvise64_64 fallocate fanotify_mark fchdir fchmod fchmodat fchown fchown32 fchownat fcntl \
    fcntl64 fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstat64 \
    fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex futex_time64 futex_waitv \
    futimesat getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32 \
    getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority \
    getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage \
    getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr \
    inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy \
    io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit \
    io_uring_enter io_uring_register io_uring_setup ipc kill landlock_add_rule \
    landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat listen \
    listxattr llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise membarrier \
    memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 \
    mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend \
    mq_timedsend_time64 mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall \
    munmap name_to_handle_at nanosleep newfstatat _newselect open openat openat2 pause pidfd_open \
    pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl \
    pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev \
    pwritev2 read readahead readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 \
    recvmsg remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq \
    rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend \
    rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr \
    sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler \
    sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity sched_setattr \
    sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop \
    semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32 setfsuid \
    setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority setregid \
    setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit \
    set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32 setxattr \
    shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask sigreturn \
    socketcall socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync \
    sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun \
    timer_gettime timer_gettime64 timer_settime timer_settime64 timerfd_create timerfd_gettime \
    timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate truncate64 ugetrlimit \
    umask uname unlink unlinkat utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid \
    waitpid write writev";

/// imago's default profile, as the `linux.seccomp` section of an OCI runtime config.
pub fn default_profile() -> Value {
    let allow_all: Vec<&str> = ALLOWED
        .split_whitespace()
        .chain(ARCH_SYSCALLS.iter().copied())
        .collect();
    let mut syscalls = vec![json!({"names": allow_all, "action": "SCMP_ACT_ALLOW"})];
    syscalls.push(json!({
        "names": ["socket"],
        "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}],
    }));
    for personality in PERSONALITIES {
        syscalls.push(json!({
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": personality, "op": "SCMP_CMP_EQ"}],
        }));
    }
    // s390 passes clone's flags second; the architectures above all pass them first.
    syscalls.push(json!({
        "names": ["clone"],
        "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0,
                  "op": "SCMP_CMP_MASKED_EQ"}],
    }));
    syscalls.push(json!({
        "names": ["clone3"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": ENOSYS,
    }));
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": ARCHITECTURES,
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn default_profile_is_valid_oci_and_refuses_what_makes_namespaces() {
        let profile: LinuxSeccomp = serde_json::from_value(default_profile()).unwrap();
        let allowed: Vec<&str> = profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| {
                s.args().is_none()
                    && s.action() == oci_spec::runtime::LinuxSeccompAction::ScmpActAllow
            })
            .flat_map(|s| s.names().iter().map(String::as_str))
            .collect();
        for refused in [
            "unshare",
            "setns",
            "mount",
            "umount2",
            "keyctl",
            "add_key",
            "request_key",
            "ptrace",
            "process_vm_readv",
            "bpf",
            "perf_event_open",
            "clone",
            "clone3",
            "init_module",
            "reboot",
            "chroot",
            "pivot_root",
            "open_by_handle_at",
            "socket",
            "personality",
        ] {
            assert!(
                !allowed.contains(&refused),
                "{refused} is allowed unconditionally"
            );
        }
        for needed in [
            "read",
            "execve",
            "fork",
            "wait4",
            "accept4",
            "sendfile",
            "epoll_wait",
        ] {
            assert!(allowed.contains(&needed), "{needed} is not allowed");
        }
        assert_eq!(profile.default_errno_ret(), Some(1));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            profile.architectures().as_deref(),
            Some(
                &[
                    oci_spec::runtime::Arch::ScmpArchX86_64,
                    oci_spec::runtime::Arch::ScmpArchX86
                ][..]
            )
        );
    }

    #[test]
    fn settings_and_profile_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Seccomp::from_setting("default", dir.path()).unwrap(),
            Seccomp::Default
        );
        assert_eq!(
            Seccomp::from_setting("unconfined", dir.path()).unwrap(),
            Seccomp::Unconfined
        );
        assert_eq!(Seccomp::Unconfined.oci_section(Engine::Runc).unwrap(), None);
        fs::write(
            dir.path().join("p.json"),
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        let loaded = Seccomp::from_setting("p.json", dir.path()).unwrap();
        let section = loaded.oci_section(Engine::Runc).unwrap().unwrap();
        assert_eq!(section["syscalls"][0]["names"][0], "mkdir");

        let missing = Seccomp::from_setting("nope.json", dir.path())
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.json"), "{missing}");
        for (body, expected) in [
            ("{", "not JSON"),
            (r#"{"syscalls": []}"#, "defaultAction"),
            (r#"{"defaultAction": "SCMP_ACT_NOPE"}"#, "SCMP_ACT_NOPE"),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "archMap": []}"#,
                "Docker's profile format",
            ),
            (
                r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}}]}"#,
                "\"includes\" in syscalls[0]",
            ),
        ] {
            let path = dir.path().join("bad.json");
            fs::write(&path, body).unwrap();
            let err = Seccomp::from_setting("bad.json", dir.path())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&path.display().to_string()) && err.contains(expected),
                "{body}: {err}"
            );
        }
    }
}
