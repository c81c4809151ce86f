//! The build sandbox: one provisioning step (`run` layer of `imago build`) run in a throwaway
//! container whose root is an overlay of a read-only lower directory and a fresh upper one.
//!
//! The builder calls [`run_sandbox`], which hands the step to a helper process (the hidden
//! `__sandbox DIR` subcommand of the imago binary, see [`sandbox_main`]): libcontainer clone()s
//! its caller, so it must run in a single-threaded process, and the helper's own mount
//! namespace makes the overlay mount vanish with it whatever happens to the build. The helper
//! mounts the overlay, runs each command in its own container on the same root (in order; the
//! first failure ends the step), kills a step that outlives its timeout, and writes what
//! happened to `DIR/result.json`. The step's output goes to one pipe that the builder reads.
//!
//! Isolation: pid, ipc, uts, mount and (unless `host_network`) network namespaces, the
//! container's own cgroup with a memory and a pids limit, Docker's default capability set,
//! imago's default seccomp filter, no device but the standard ones. Nothing of the host is
//! visible except the mounts the step asks for.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::local::SupervisorCommand;
use crate::{Engine, RuntimeError, Seccomp};

/// Docker's (and runc's) default capability set: what a `run` step gets, no more.
pub const STEP_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

pub use imago_spec::step::{STANDARD_MOUNT_POINTS, SandboxMount, SandboxSpec, StepExit};

/// Runs the step through the helper `helper` (`program args... DIR`); every piece of output
/// (stdout and stderr interleaved, one line at a time) goes to `output` as it comes.
pub fn run_sandbox(
    helper: &SupervisorCommand,
    spec: &SandboxSpec,
    output: &mut dyn FnMut(&[u8]),
) -> Result<StepExit, RuntimeError> {
    let err = |reason: String| RuntimeError::Engine {
        id: spec.id.clone(),
        reason,
    };
    for path in [&spec.lower, &spec.dir] {
        let text = path.to_string_lossy();
        if text.contains([',', ':', '\n']) {
            return Err(err(format!(
                "path {text} cannot be given to overlayfs (it contains ',' or ':')"
            )));
        }
    }
    fs::create_dir_all(&spec.dir).map_err(RuntimeError::io("cannot create", &spec.dir))?;
    let spec_path = spec.dir.join("sandbox.json");
    crate::state::write_json_unsynced(&spec_path, spec)?;
    let result_path = spec.dir.join("result.json");
    let _ = fs::remove_file(&result_path);
    let (read, write) = std::io::pipe().map_err(|e| err(format!("cannot create a pipe: {e}")))?;
    let write2 = write
        .try_clone()
        .map_err(|e| err(format!("cannot duplicate a pipe: {e}")))?;
    let mut child = Command::new(&helper.program)
        .args(&helper.args)
        .arg(&spec.dir)
        .stdin(Stdio::null())
        .stdout(write)
        .stderr(write2)
        .spawn()
        .map_err(|e| err(format!("cannot start {}: {e}", helper.program.display())))?;
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => output(&line),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let status = child
        .wait()
        .map_err(|e| err(format!("cannot wait for the sandbox helper: {e}")))?;
    let text = fs::read(&result_path).map_err(|_| {
        err(format!(
            "the sandbox helper ended ({status}) without a result"
        ))
    })?;
    let result: Result<StepExit, String> =
        serde_json::from_slice(&text).map_err(|source| RuntimeError::Json {
            path: result_path.clone(),
            source,
        })?;
    result.map_err(err)
}

/// The helper's body (`imago __sandbox DIR`): runs the step described in `DIR/sandbox.json`
/// and writes `DIR/result.json`. Must be called in a fresh single-threaded process.
pub fn sandbox_main(dir: &Path) -> i32 {
    let result = match crate::state::read_json::<SandboxSpec>(&dir.join("sandbox.json")) {
        Ok(spec) => run_in_helper(&spec).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let code = i32::from(result.is_err());
    match crate::state::write_json_unsynced(&dir.join("result.json"), &result) {
        Ok(()) => code,
        Err(_) => 1,
    }
}

fn run_in_helper(spec: &SandboxSpec) -> Result<StepExit, RuntimeError> {
    let err = |reason: String| RuntimeError::Engine {
        id: spec.id.clone(),
        reason,
    };
    // A private mount namespace: the overlay is gone when this process is, whatever happens.
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| err(format!("cannot make a mount namespace: {e}")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| err(format!("cannot make mounts private: {e}")))?;
    // The engine's detached init must come back to this process, not to PID 1.
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| err(format!("cannot become a subreaper: {e}")))?;
    let upper = spec.upper();
    let work = spec.dir.join("work");
    let merged = spec.dir.join("merged");
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).map_err(RuntimeError::io("cannot create", d))?;
    }
    let options = format!(
        // Renamed directories and metadata-only changes are copied up whole: the upper
        // directory must hold complete files and directories to be turned into a layer.
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off",
        spec.lower.display(),
        upper.display(),
        work.display()
    );
    let overlay = !spec.copy_root
        && mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .is_ok();
    if !overlay {
        // The equivalent without overlayfs: a copy of the whole root (reflinked where the file
        // system can), compared in full with `lower` afterwards.
        let out = Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(spec.lower.join("."))
            .arg(&merged)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| err(format!("cannot run cp: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "cannot copy {} to {}: {}",
                spec.lower.display(),
                merged.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }

    let deadline = Instant::now() + Duration::from_millis(spec.timeout_ms);
    let mut last = StepExit {
        code: 0,
        command: 0,
        timed_out: false,
        copied: !overlay,
    };
    for (index, args) in spec.commands.iter().enumerate() {
        let id = format!("{}-{index}", spec.id);
        let bundle = spec.dir.join(format!("bundle-{index}"));
        let config = step_config(spec, &id, args, &merged)?;
        crate::bundle::write_bundle(&bundle, &config)?;
        let (code, timed_out) = match spec.engine {
            Engine::Embedded => run_embedded(spec, &id, &bundle, deadline)?,
            Engine::Runc => run_runc(spec, &id, &bundle, deadline)?,
        };
        last = StepExit {
            code,
            command: index,
            timed_out,
            copied: !overlay,
        };
        if code != 0 || timed_out {
            break;
        }
    }
    if overlay {
        let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
    }
    Ok(last)
}

/// The OCI runtime config of one command of the step.
fn step_config(
    spec: &SandboxSpec,
    id: &str,
    args: &[String],
    rootfs: &Path,
) -> Result<Value, RuntimeError> {
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if !spec.host_network {
        namespaces.push(json!({"type": "network"}));
    }
    let mut mounts = crate::bundle::default_mounts();
    let mut own: Vec<&SandboxMount> = spec.mounts.iter().collect();
    own.sort_by_key(|m| m.dest().split('/').filter(|p| !p.is_empty()).count());
    for m in own {
        mounts.push(match m {
            SandboxMount::Bind {
                source,
                dest,
                read_only,
            } => json!({
                "destination": dest, "type": "bind", "source": source,
                "options": ["rbind", "nosuid", "nodev", if *read_only { "ro" } else { "rw" }],
            }),
            SandboxMount::Tmpfs { dest } => json!({
                "destination": dest, "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            }),
        });
    }
    let caps = STEP_CAPABILITIES;
    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": spec.uid, "gid": spec.gid},
            "args": args,
            "env": spec.env,
            "cwd": spec.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024u64, "soft": 1024u64}],
            "noNewPrivileges": true,
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "imago-build",
        "mounts": mounts,
        "linux": {
            "cgroupsPath": format!("/imago-build/{id}"),
            "namespaces": namespaces,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": spec.memory_bytes, "swap": spec.memory_bytes},
                "pids": {"limit": spec.pids},
            },
            "maskedPaths": crate::bundle::MASKED_PATHS,
            "readonlyPaths": crate::bundle::READONLY_PATHS,
        },
    });
    if let Some(seccomp) = Seccomp::Default.oci_section(spec.engine)? {
        config["linux"]["seccomp"] = seccomp;
    }
    Ok(config)
}

/// Waits for `pid` (a child of this subreaper) until `deadline`; kills it then. Returns the
/// exit code (128 + signal) and whether it was killed for the deadline. Other children that
/// come back to this subreaper are reaped on the way.
fn wait_until(pid: Pid, deadline: Instant) -> (i32, bool) {
    let mut killed = false;
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return (code, killed),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => return (128 + sig as i32, killed),
            Ok(WaitStatus::StillAlive) => {
                if !killed && Instant::now() >= deadline {
                    // The init of a pid namespace: the kernel kills every other process of
                    // the step with it.
                    let _ = kill(pid, Signal::SIGKILL);
                    killed = true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(Errno::ECHILD) => return (137, killed),
            Ok(_) | Err(_) => {}
        }
    }
}

fn run_embedded(
    spec: &SandboxSpec,
    id: &str,
    bundle: &Path,
    deadline: Instant,
) -> Result<(i32, bool), RuntimeError> {
    let engine_err = |reason: String| RuntimeError::Engine {
        id: id.to_owned(),
        reason,
    };
    let root = spec.dir.join("youki");
    fs::create_dir_all(&root).map_err(RuntimeError::io("cannot create", &root))?;
    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| engine_err(format!("cannot duplicate stdout: {e}")))?;
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| engine_err(format!("cannot duplicate stderr: {e}")))?;
    let null = File::open("/dev/null").map_err(RuntimeError::io("cannot open", "/dev/null"))?;
    let mut container = ContainerBuilder::new(id.to_owned(), SyscallType::Linux)
        .with_root_path(&root)
        .map_err(|e| engine_err(e.to_string()))?
        .with_stdin(null)
        .with_stdout(stdout)
        .with_stderr(stderr)
        .validate_id()
        .map_err(|e| engine_err(e.to_string()))?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| engine_err(format!("cannot create the container: {e}")))?;
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        return Err(engine_err(format!("cannot start the container: {e}")));
    }
    let pid = container
        .pid()
        .ok_or_else(|| engine_err("the engine reported no pid".into()))?;
    let outcome = wait_until(pid, deadline);
    let _ = container.refresh_status();
    let _ = container.delete(true);
    Ok(outcome)
}

fn run_runc(
    spec: &SandboxSpec,
    id: &str,
    bundle: &Path,
    deadline: Instant,
) -> Result<(i32, bool), RuntimeError> {
    let engine_err = |reason: String| RuntimeError::Engine {
        id: id.to_owned(),
        reason,
    };
    let root = spec.dir.join("runc");
    let mut child = Command::new("runc")
        .arg("--root")
        .arg(&root)
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| engine_err(format!("cannot run runc: {e}")))?;
    // runc run stays in the foreground and exits with the container's status; at the deadline
    // the container is killed through runc, which then returns.
    let mut killed = false;
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                break status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1);
            }
            Ok(None) => {
                if !killed && Instant::now() >= deadline {
                    let _ = Command::new("runc")
                        .arg("--root")
                        .arg(&root)
                        .args(["kill", id, "KILL"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    killed = true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(engine_err(format!("cannot wait for runc: {e}"))),
        }
    };
    let _ = Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["delete", "--force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // Whatever the container left behind came back to this subreaper.
    while let Ok(status) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
    Ok((code, killed))
}
