//! Real instances, as root, with both engines (embedded libcontainer and runc).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Harness, tree_digest};
use imago_runtime::{Engine, NetworkMode, Provider, RuntimeError, Seccomp, Status};

const GRACE: Duration = Duration::from_millis(500);

/// Generates one test per engine from `fn name(engine: Engine)`.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[test] fn $name() { super::$name(imago_runtime::Engine::Embedded) } )*
        }
        mod runc {
            $( #[test] fn $name() { super::$name(imago_runtime::Engine::Runc) } )*
        }
    };
}

both_engines!(
    echo_runs_and_exit_status_is_recorded,
    httpd_answers_on_the_instance_address,
    root_is_read_only_tmp_is_writable_cache_unchanged,
    memory_limit_kills_with_137,
    capabilities_are_dropped,
    survives_provider_and_is_seen_by_a_new_one,
    stop_and_rm_leave_nothing_behind,
    nonexistent_entrypoint_fails_clearly,
    host_network_works,
    volumes_are_the_only_writable_data_places,
    cpu_limit_is_enforced,
    pids_limit_is_enforced,
    launch_returns_once_the_program_runs,
    a_supervisor_not_told_the_network_is_ready_starts_nothing,
    rm_cleans_up_after_a_supervisor_killed_between_create_and_start,
    a_launch_whose_running_record_cannot_be_written_leaves_nothing_running,
    default_seccomp_refuses_namespaces_keyrings_ptrace_and_mounts,
    unconfined_instances_can_make_user_namespaces_again,
    ordinary_programs_work_under_the_default_filter,
    a_profile_file_replaces_the_default_filter,
    a_non_root_instance_can_write_tmp,
    an_init_stops_a_program_that_ignores_sigterm_at_once,
    an_init_reaps_orphans_that_the_program_never_waits_for,
    the_init_is_read_only_outside_the_image_and_passes_the_exit_status_on,
    an_instance_is_in_its_own_cgroup_wherever_it_is_limited_or_controlled,
);

fn echo_runs_and_exit_status_is_recorded(engine: Engine) {
    let h = Harness::new(engine);
    let mut spec = h.spec(&["sh", "-c", "echo hello $GREETING $EXTRA; exit 7"]);
    spec.env.insert("EXTRA".into(), "and-spec".into());
    spec.labels.insert("service".into(), "web".into());
    let inst = h.run_to_exit(&spec);
    assert_eq!(inst.status, Status::Exited);
    assert_eq!(inst.exit_code, Some(7));
    assert_eq!(inst.image, h.image);
    assert_eq!(inst.spec_hash, spec.spec_hash().unwrap());
    assert_eq!(inst.labels.get("service").map(String::as_str), Some("web"));
    assert_eq!(h.logs(&inst.id), "hello from-image and-spec\n");
    h.provider.remove(&inst.id).unwrap();
}

fn httpd_answers_on_the_instance_address(engine: Engine) {
    let h = Harness::new(engine);
    let inst = h
        .provider
        .launch(&h.spec(&["httpd", "-f", "-p", "80", "-h", "/www"]))
        .unwrap();
    assert_eq!(inst.status, Status::Running);
    assert_eq!(inst.ports, vec!["80/tcp".to_string()]);
    let addr = inst.address.expect("a private instance has an address");
    let body = http_get(&format!("{addr}:80"));
    assert!(body.contains("200 OK"), "{body}");
    assert!(body.contains("hello from imago"), "{body}");
    h.provider.stop(&inst.id, GRACE).unwrap();
    h.provider.remove(&inst.id).unwrap();
    // Its address is gone with its veth: a connect fails at once ("no route to host", the
    // range's unreachable route), it does not follow the host's default route.
    let started = std::time::Instant::now();
    let gone = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::new(addr.into(), 80),
        Duration::from_secs(3),
    );
    let err = gone.expect_err("the address of a removed instance answers");
    assert_eq!(
        err.raw_os_error(),
        Some(nix::libc::EHOSTUNREACH),
        "{err} after {:?}",
        started.elapsed()
    );
}

/// "Running" means the instance's own program was exec'd, not merely that the engine was told
/// to start it (the launch no longer waits for fsyncs, which used to hide the difference).
fn launch_returns_once_the_program_runs(engine: Engine) {
    let h = Harness::new(engine);
    let mut spec = h.spec(&["sleep", "1000"]);
    spec.network = NetworkMode::Host;
    let inst = h.provider.launch(&spec).unwrap();
    assert_eq!(inst.status, Status::Running);
    let pid = inst.pid.expect("a running instance has a pid");
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    // The command name after exec is the name of the file exec'd (`/bin/sleep`, a busybox link);
    // before, it is the engine's (`youki:[2:INIT]`, `runc:[2:INIT]`).
    assert_eq!(comm.trim_end(), "sleep", "pid {pid} has not exec'd yet");
    h.provider.stop(&inst.id, GRACE).unwrap();
    h.provider.remove(&inst.id).unwrap();
}

fn http_get(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)) {
            Ok(mut s) => {
                s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                    .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                return out;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect to {addr}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn root_is_read_only_tmp_is_writable_cache_unchanged(engine: Engine) {
    let h = Harness::new(engine);
    // The first launch unpacks the image; hash the cache entry right after it.
    let first = h.run_to_exit(&h.spec(&["true"]));
    let cache = h.provider.rootfs_cache().path(&h.image);
    let before = tree_digest(&cache);
    let inst = h.run_to_exit(&h.spec(&[
        "sh",
        "-c",
        "if touch /bin/x 2>/dev/null; then echo root=writable; else echo root=readonly; fi; \
         echo data > /tmp/f && cat /tmp/f; echo run > /run/r && cat /run/r",
    ]));
    assert_eq!(inst.exit_code, Some(0), "{}", h.logs(&inst.id));
    assert_eq!(h.logs(&inst.id), "root=readonly\ndata\nrun\n");
    assert_eq!(
        tree_digest(&cache),
        before,
        "the rootfs cache entry changed"
    );
    assert!(!cache.join("bin/x").exists());
    h.provider.remove(&first.id).unwrap();
    h.provider.remove(&inst.id).unwrap();
}

/// /tmp is the instance's own (a tmpfs, mode 1777) whatever user it runs as, under both
/// engines; the image has no /tmp of its own.
fn a_non_root_instance_can_write_tmp(engine: Engine) {
    let h = Harness::with_image(engine, |layout| {
        common::build_busybox_image_full(layout, &[], Some("1000:1000"), &[])
    });
    let inst = h.run_to_exit(&h.spec(&[
        "sh",
        "-c",
        "id -u; echo data > /tmp/f && cat /tmp/f; ls -ld /tmp | head -c 10; echo; \
         mkdir /tmp/d && echo made",
    ]));
    assert_eq!(
        h.logs(&inst.id),
        "1000\ndata\ndrwxrwxrwt\nmade\n",
        "exit {:?}",
        inst.exit_code
    );
    assert_eq!(inst.exit_code, Some(0));
    h.provider.remove(&inst.id).unwrap();
}

fn memory_limit_kills_with_137(engine: Engine) {
    let h = Harness::new(engine);
    let mut spec = h.spec(&[
        "sh",
        "-c",
        "a=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived",
    ]);
    spec.resources.memory_bytes = Some(32 << 20);
    // Filling 32 MiB through busybox's tr takes about a minute under qemu's TCG (the cgroup v2
    // phase of scripts/test); here it takes a second.
    let inst = h.provider.launch(&spec).unwrap();
    let inst = h.wait_exit(&inst.id, Duration::from_secs(180));
    assert_eq!(inst.exit_code, Some(137), "logs: {}", h.logs(&inst.id));
    assert!(inst.oom_killed);
    assert!(!h.logs(&inst.id).contains("survived"));
    h.provider.remove(&inst.id).unwrap();
}

fn capabilities_are_dropped(engine: Engine) {
    let h = Harness::new(engine);
    let inst = h.run_to_exit(&h.spec(&[
        "sh",
        "-c",
        "ip link add d0 type dummy 2>/dev/null; echo ip=$?; mount -t tmpfs none /tmp 2>/dev/null; echo mount=$?; \
         grep CapEff /proc/self/status || cat /proc/self/status | while read k v; do [ \"$k\" = CapEff: ] && echo $v; done",
    ]));
    let logs = h.logs(&inst.id);
    assert!(logs.contains("ip=1") || logs.contains("ip=2"), "{logs}");
    assert!(!logs.contains("mount=0"), "{logs}");
    h.provider.remove(&inst.id).unwrap();
}

fn survives_provider_and_is_seen_by_a_new_one(engine: Engine) {
    let h = Harness::new(engine);
    let inst = h.provider.launch(&h.spec(&["sleep", "1000"])).unwrap();
    let sup = inst.supervisor_pid.unwrap();
    // The supervisor runs in its own session, so the launcher's exit does not reach it.
    assert_ne!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(sup))).unwrap(),
        nix::unistd::getsid(None).unwrap()
    );
    let other = imago_runtime::LocalProvider::new(
        &h.home(),
        Box::new(h.layout()),
        common::supervisor_command(),
    );
    let seen = other.inspect(&inst.id).unwrap();
    assert_eq!(seen.status, Status::Running);
    assert_eq!(other.list().unwrap().len(), 1);
    let stopped = other.stop(&inst.id, GRACE).unwrap();
    assert_eq!(stopped.status, Status::Exited);
    assert!(stopped.stop_requested);
    assert_eq!(
        stopped.exit_code,
        Some(137),
        "sleep as pid 1 ignores SIGTERM, so it is killed"
    );
    other.remove(&inst.id).unwrap();
}

fn stop_and_rm_leave_nothing_behind(engine: Engine) {
    let h = Harness::new(engine);
    let inst = h
        .provider
        .launch(&h.spec(&["sh", "-c", "sleep 1000 & sleep 1000"]))
        .unwrap();
    let id = inst.id.clone();
    let pid = inst.pid.unwrap();
    let sup = inst.supervisor_pid.unwrap();
    let veth = format!("/sys/class/net/iv-{id}");
    let netns = format!("/var/run/netns/imago-{id}");
    assert!(Path::new(&veth).exists());
    assert!(Path::new(&netns).exists());
    assert!(
        !cgroup_dirs(&id).is_empty(),
        "the instance has cgroups while running"
    );
    assert!(!processes_in_cgroup(&id).is_empty());
    assert!(matches!(
        h.provider.remove(&id),
        Err(RuntimeError::WrongState { .. })
    ));
    h.provider.stop(&id, GRACE).unwrap();
    h.provider.remove(&id).unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "container init {pid} still exists"
    );
    assert!(
        !Path::new(&format!("/proc/{sup}")).exists(),
        "supervisor {sup} still exists"
    );
    assert!(
        processes_in_cgroup(&id).is_empty(),
        "processes left: {:?}",
        processes_in_cgroup(&id)
    );
    assert!(
        cgroup_dirs(&id).is_empty(),
        "cgroup dirs left: {:?}",
        cgroup_dirs(&id)
    );
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&id), "mounts left: {mountinfo}");
    assert!(!Path::new(&netns).exists(), "netns left");
    assert!(!Path::new(&veth).exists(), "veth left");
    assert!(!h.home().join("instances").join(&id).exists());
    assert!(!h.home().join("runtime/youki").join(&id).exists());
    assert!(!h.home().join("runtime/runc").join(&id).exists());
    let leases = fs::read_dir("/run/imago/ipam").unwrap();
    for l in leases.flatten() {
        // A lease file's first line names its instance.
        assert_ne!(
            fs::read_to_string(l.path())
                .unwrap_or_default()
                .lines()
                .next(),
            Some(id.as_str()),
            "address lease left"
        );
    }
    assert!(matches!(
        h.provider.inspect(&id),
        Err(RuntimeError::NoSuchInstance(_))
    ));
}

/// The supervisor waits for the launcher's word that the network namespace exists (before the
/// engine creates the container) and that it is configured (before the program starts). A
/// launcher that gives up at either point (here: a wrapper passes on 0 or 1 of its bytes) must
/// leave nothing running and nothing of the network behind.
fn a_supervisor_not_told_the_network_is_ready_starts_nothing(engine: Engine) {
    for (passed, gate) in [(0, "exec </dev/null; "), (1, "head -c 1 | ")] {
        let tmp = tempfile::tempdir().unwrap();
        let supervisor = common::supervisor_command();
        let ipam = tmp.path().join("ipam");
        let (provider, image) = shell_supervised(
            tmp.path(),
            vec![
                "-c".into(),
                format!("{gate}exec \"$0\" \"$@\"").into(),
                supervisor.program.into_os_string(),
            ],
        );
        let mut spec = imago_runtime::InstanceSpec::new(image);
        spec.engine = engine;
        spec.args = Some(vec!["sleep".into(), "1000".into()]);
        let err = provider.launch(&spec).unwrap_err();
        let what = if passed == 0 { "created" } else { "configured" };
        assert!(
            err.to_string()
                .contains(&format!("gave up before the network was {what}")),
            "{passed} byte(s) passed: {err}"
        );
        let list = provider.list().unwrap();
        assert_eq!(list.len(), 1);
        let id = list[0].id.clone();
        assert_eq!(list[0].status, Status::Failed);
        let left: Vec<String> = processes_in_cgroup(&id)
            .iter()
            .map(|p| fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default())
            .collect();
        assert!(
            left.is_empty(),
            "{passed} byte(s) passed: processes left: {left:?}"
        );
        assert!(
            cgroup_dirs(&id).is_empty(),
            "{passed} byte(s) passed: cgroup dirs left: {:?}",
            cgroup_dirs(&id)
        );
        assert!(!Path::new(&format!("/var/run/netns/imago-{id}")).exists());
        assert!(!Path::new(&format!("/sys/class/net/iv-{id}")).exists());
        assert_eq!(fs::read_dir(&ipam).unwrap().count(), 0, "lease left");
        provider.remove(&id).unwrap();
        let home = tmp.path().join("home");
        assert!(!home.join("runtime/youki").join(&id).exists());
        assert!(!home.join("runtime/runc").join(&id).exists());
    }
}

/// A supervisor killed while it waits for the network gate, its container created but not
/// started: the launch fails, and `rm` must take away the container the engine created (its
/// init waits for a start that never comes), not only the record.
fn rm_cleans_up_after_a_supervisor_killed_between_create_and_start(engine: Engine) {
    let tmp = tempfile::tempdir().unwrap();
    let supervisor = common::supervisor_command();
    // Once the launcher has the namespace, the real supervisor is told it exists (by the
    // wrapper, not the launcher), creates the container and waits for the second byte: it is
    // killed there.
    let (provider, image) = shell_supervised(
        tmp.path(),
        vec![
            "-c".into(),
            "while [ ! -e /var/run/netns/imago-$2 ]; do sleep 0.01; done; sleep 0.3; \
             (printf n; sleep 4) | \"$0\" \"$@\" & sleep 2; kill -9 $!"
                .into(),
            supervisor.program.into_os_string(),
        ],
    );
    let mut spec = imago_runtime::InstanceSpec::new(image);
    spec.engine = engine;
    spec.args = Some(vec!["sleep".into(), "1000".into()]);
    let err = provider.launch(&spec).unwrap_err();
    let id = failed_as_supervisor_gone(&provider, &err);
    assert!(
        !processes_in_cgroup(&id).is_empty(),
        "the container was not created: the test missed its point"
    );
    provider.remove(&id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_in_cgroup(&id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        processes_in_cgroup(&id).is_empty(),
        "the container's init is left"
    );
    assert!(
        cgroup_dirs(&id).is_empty(),
        "cgroup dirs left: {:?}",
        cgroup_dirs(&id)
    );
    let home = tmp.path().join("home");
    assert!(!home.join("runtime/youki").join(&id).exists());
    assert!(!home.join("runtime/runc").join(&id).exists());
}

/// A supervisor that dies before its handshake while another process still holds its stdout
/// (as the embedded engine's container init holds a forked supervisor's handshake pipe until it
/// execs) must not leave the launcher waiting for an end of file that never comes.
#[test]
fn a_launch_ends_when_its_supervisor_dies_though_the_handshake_pipe_stays_open() {
    let tmp = tempfile::tempdir().unwrap();
    let holder = tmp.path().join("holder.pid");
    // The "supervisor" leaves a process behind with its stdout and exits at once.
    let (provider, image) = shell_supervised(
        tmp.path(),
        vec![
            "-c".into(),
            format!("sleep 20 & echo $! > {}; exit 3", holder.display()).into(),
        ],
    );
    let mut spec = imago_runtime::InstanceSpec::new(image);
    spec.network = NetworkMode::Host;
    spec.args = Some(vec!["true".into()]);
    let started = Instant::now();
    let err = provider.launch(&spec).unwrap_err();
    let took = started.elapsed();
    if let Ok(pid) = fs::read_to_string(&holder) {
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    }
    // The holder keeps the pipe open for 20 s: a launch that waited for its end of file takes
    // that long, one that did not far less, however loaded the host.
    assert!(took < Duration::from_secs(15), "the launch waited {took:?}");
    let id = failed_as_supervisor_gone(&provider, &err);
    provider.remove(&id).unwrap();
}

/// Checks that `err` and the provider's one instance say the supervisor died during the
/// launch; returns the instance's id.
fn failed_as_supervisor_gone(
    provider: &imago_runtime::LocalProvider,
    err: &RuntimeError,
) -> String {
    assert!(
        err.to_string()
            .contains("the supervisor exited before starting the container"),
        "{err}"
    );
    let list = provider.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, Status::Failed);
    list[0].id.clone()
}

/// A provider under `dir` (home, image layout, address leases) whose supervisor is `/bin/sh`
/// with `args`, always exec'd; and the busybox image it can launch.
fn shell_supervised(
    dir: &Path,
    args: Vec<std::ffi::OsString>,
) -> (imago_runtime::LocalProvider, imago_oci::Digest) {
    let layout = common::LayoutSource {
        root: dir.join("layout"),
    };
    let (image, _) = common::build_busybox_image(&layout);
    let provider = imago_runtime::LocalProvider::new(
        &dir.join("home"),
        Box::new(layout),
        imago_runtime::SupervisorCommand {
            program: "/bin/sh".into(),
            args,
            fork_when_single_threaded: false,
        },
    )
    .with_ipam_dir(dir.join("ipam"));
    (provider, image)
}

/// The cgroup file systems mounted here, as (mount point, fstype, super options): v1
/// hierarchies (`cgroup`, one or more controllers each) and the cgroup2 tree (`cgroup2`), which
/// holds every controller on a v2-only host and none on a hybrid one.
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split(' ');
            let (fstype, _source, options) = (r.next()?, r.next()?, r.next()?);
            let point = left.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| {
                (
                    PathBuf::from(point.replace("\\040", " ")),
                    fstype.to_owned(),
                    options.to_owned(),
                )
            })
        })
        .collect()
}

/// The directory of instance `id`'s cgroup for `controller`: in the v1 hierarchy that has the
/// controller if there is one (a hybrid host), else in the cgroup2 tree (a v2-only host).
fn controller_dir(controller: &str, id: &str) -> PathBuf {
    let mounts = cgroup_mounts();
    let v1 = mounts.iter().find(|(_, fstype, options)| {
        fstype == "cgroup" && options.split(',').any(|o| o == controller)
    });
    let v2 = mounts.iter().find(|(_, fstype, _)| fstype == "cgroup2");
    let (root, _, _) = v1
        .or(v2)
        .unwrap_or_else(|| panic!("no cgroup hierarchy has {controller}: {mounts:?}"));
    root.join("imago").join(id)
}

/// Whether this host's cgroup controllers are on cgroup2 (no v1 hierarchy has `cpu`).
fn cgroup2_only() -> bool {
    !cgroup_mounts()
        .iter()
        .any(|(_, fstype, options)| fstype == "cgroup" && options.split(',').any(|o| o == "cpu"))
}

/// The instance's cgroup directories in every hierarchy, v1 or v2.
fn cgroup_dirs(id: &str) -> Vec<String> {
    cgroup_mounts()
        .iter()
        .map(|(root, _, _)| root.join("imago").join(id))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect()
}

fn processes_in_cgroup(id: &str) -> Vec<i32> {
    let needle = format!("/imago/{id}");
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if fs::read_to_string(e.path().join("cgroup"))
            .map(|c| c.contains(&needle))
            .unwrap_or(false)
        {
            out.push(pid);
        }
    }
    out
}

/// A cgroup v1 cgroup that the calling thread (only it: v1's `tasks` file moves one thread)
/// is moved into, so that what it spawns, a supervisor, starts there; the thread moved back to
/// the root by [`ThreadCgroup::leave`] or on drop, the directory removed on drop once empty.
struct ThreadCgroup {
    dir: PathBuf,
    root: PathBuf,
}

impl ThreadCgroup {
    /// In the v1 hierarchy of `controller`, if there is one (`None` on a v2-only host).
    fn enter(controller: &str, name: &str) -> Option<ThreadCgroup> {
        let (root, _, _) = cgroup_mounts().into_iter().find(|(_, fstype, options)| {
            fstype == "cgroup" && options.split(',').any(|o| o == controller)
        })?;
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("tasks"), nix::unistd::gettid().to_string()).unwrap();
        Some(ThreadCgroup { dir, root })
    }

    /// Moves the calling thread back to the root cgroup.
    fn leave(&self) {
        fs::write(self.root.join("tasks"), nix::unistd::gettid().to_string()).unwrap();
    }
}

impl Drop for ThreadCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.root.join("tasks"), nix::unistd::gettid().to_string());
        // A supervisor started in it leaves it when it exits.
        let deadline = Instant::now() + Duration::from_secs(20);
        while fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The engine may leave an instance in the root cgroup of a hierarchy that nothing of its spec
/// touches (the embedded engine does, to save the `cgroup.procs` writes: each takes the
/// kernel's global cgroup lock), but never in any other cgroup than its own `/imago/<id>`:
/// not in its launcher's, whose limits are not its own. It is in its own cgroup in every
/// hierarchy that holds a limit of its spec (cpu also with cpuacct, where its CPU time is
/// counted), and always in devices (its device rules), freezer (stopping all its processes)
/// and memory (its OOM kills are counted there, limited or not). Stop and rm still reach every
/// process and leave no cgroup behind.
fn an_instance_is_in_its_own_cgroup_wherever_it_is_limited_or_controlled(engine: Engine) {
    let h = Harness::new(engine);
    let mut limited = h.spec(&["sh", "-c", "sleep 1000 & sleep 1000"]);
    limited.resources.memory_bytes = Some(64 << 20);
    limited.resources.pids = Some(64);
    limited.resources.cpu_millis = Some(500);
    let plain = h.spec(&["sh", "-c", "sleep 1000 & sleep 1000"]);
    // The launcher in a blkio cgroup of its own: no spec limits blkio, yet the instances must
    // leave it.
    let name = format!("imago-test-launcher-{}-{:?}", std::process::id(), engine);
    let launcher = ThreadCgroup::enter("blkio", &name);
    let launched: Vec<_> = [(&plain, false), (&limited, true)]
        .into_iter()
        .map(|(spec, is_limited)| (h.provider.launch(spec).unwrap(), is_limited))
        .collect();
    if let Some(l) = &launcher {
        l.leave();
    }
    let v2_only = cgroup2_only();
    for (inst, is_limited) in &launched {
        let own = format!("/imago/{}", inst.id);
        let pid = inst.pid.unwrap();
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let mut must: Vec<&str> = vec!["devices", "freezer", "memory"];
        if launcher.is_some() {
            must.push("blkio");
        }
        if *is_limited {
            must.extend(["pids", "cpu", "cpuacct"]);
        }
        for line in cgroups.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            if controllers.is_empty() {
                // The cgroup2 tree: every controller on a v2-only host; none on a hybrid one,
                // where the embedded engine does not join it.
                if v2_only {
                    assert_eq!(path, own, "{}: {cgroups}", inst.id);
                }
                continue;
            }
            if controllers.starts_with("name=") {
                continue;
            }
            assert!(
                path == own || path == "/",
                "{} ({controllers}) is in {path}, neither its own cgroup nor the root: {cgroups}",
                inst.id
            );
            for c in controllers.split(',') {
                if must.contains(&c) {
                    assert_eq!(path, own, "{} ({c}): {cgroups}", inst.id);
                    must.retain(|m| *m != c);
                }
            }
        }
        if !v2_only {
            assert!(
                must.is_empty(),
                "{}: no hierarchy with {must:?} in {cgroups}",
                inst.id
            );
        }
    }
    for (inst, _) in &launched {
        h.provider.stop(&inst.id, GRACE).unwrap();
        h.provider.remove(&inst.id).unwrap();
        assert!(
            processes_in_cgroup(&inst.id).is_empty(),
            "processes left: {:?}",
            processes_in_cgroup(&inst.id)
        );
        assert!(
            cgroup_dirs(&inst.id).is_empty(),
            "cgroup dirs left: {:?}",
            cgroup_dirs(&inst.id)
        );
    }
    drop(launcher);
}

fn nonexistent_entrypoint_fails_clearly(engine: Engine) {
    let h = Harness::new(engine);
    let err = h
        .provider
        .launch(&h.spec(&["/bin/does-not-exist"]))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RuntimeError::StartFailed { .. }), "{text}");
    assert!(text.contains("does-not-exist"), "{text}");
    let list = h.provider.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, Status::Failed);
    assert!(
        list[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("does-not-exist")
    );
    h.provider.remove(&list[0].id).unwrap();
    assert!(!Path::new(&format!("/var/run/netns/imago-{}", list[0].id)).exists());
}

fn host_network_works(engine: Engine) {
    let h = Harness::new(engine);
    let mut spec = h.spec(&["sh", "-c", "ls /sys/class/net"]);
    spec.network = NetworkMode::Host;
    let inst = h.run_to_exit(&spec);
    assert_eq!(inst.exit_code, Some(0), "{}", h.logs(&inst.id));
    assert!(inst.address.is_none());
    let host_links = fs::read_dir("/sys/class/net").unwrap().count();
    assert!(
        h.logs(&inst.id).lines().count() >= host_links.min(2),
        "{}",
        h.logs(&inst.id)
    );
    h.provider.remove(&inst.id).unwrap();
}

// Engine-independent bad input: refused before anything is created.

#[test]
fn missing_image_is_refused() {
    let h = Harness::new(Engine::Embedded);
    let mut spec = h.spec(&["true"]);
    spec.image = imago_oci::Digest::of(b"no such image");
    let err = h.provider.launch(&spec).unwrap_err();
    assert!(matches!(err, RuntimeError::ImageNotFound { .. }), "{err}");
    assert!(err.to_string().contains(spec.image.hex()), "{err}");
    assert!(h.provider.list().unwrap().is_empty());
}

#[test]
fn corrupt_layer_blob_is_refused_before_launch() {
    let h = Harness::new(Engine::Embedded);
    let blob = h.layout().blob_path(&h.layer);
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&blob, bytes).unwrap();
    let err = h.provider.launch(&h.spec(&["true"])).unwrap_err();
    assert!(matches!(err, RuntimeError::CorruptLayer { .. }), "{err}");
    assert!(err.to_string().contains(h.layer.hex()), "{err}");
    assert!(h.provider.list().unwrap().is_empty());
    let cache = h.provider.rootfs_cache().path(&h.image);
    assert!(
        !cache.exists(),
        "a corrupt image must not enter the rootfs cache"
    );
    let leftovers: Vec<_> = fs::read_dir(h.home().join("rootfs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn invalid_limits_are_refused() {
    let h = Harness::new(Engine::Embedded);
    let mut spec = h.spec(&["true"]);
    spec.resources.memory_bytes = Some(1000);
    assert!(matches!(
        h.provider.launch(&spec),
        Err(RuntimeError::InvalidSpec(_))
    ));
    let mut spec = h.spec(&["true"]);
    spec.resources.cpu_millis = Some(0);
    assert!(matches!(
        h.provider.launch(&spec),
        Err(RuntimeError::InvalidSpec(_))
    ));
    let mut spec = h.spec(&["true"]);
    spec.resources.pids = Some(0);
    assert!(matches!(
        h.provider.launch(&spec),
        Err(RuntimeError::InvalidSpec(_))
    ));
    assert!(imago_runtime::parse_memory("lots").is_err());
    assert!(h.provider.list().unwrap().is_empty());
}

#[test]
fn a_failed_drift_manifest_record_does_not_fail_the_launch() {
    let h = Harness::new(Engine::Embedded);
    let cache = h.provider.rootfs_cache();
    // A directory where the manifest goes: recording it after the unpack fails.
    let manifest = h
        .home()
        .join("rootfs")
        .join(format!(".{}.manifest.json", h.image.hex()));
    fs::create_dir_all(&manifest).unwrap();
    let inst = h.run_to_exit(&h.spec(&["echo", "launched"]));
    assert_eq!(inst.exit_code, Some(0));
    assert_eq!(h.logs(&inst.id), "launched\n");
    assert!(cache.path(&h.image).is_dir());

    // With no manifest the drift check cannot vouch for the tree: it says so (and keeps
    // saying so) instead of recording whatever the tree holds now.
    fs::remove_dir(&manifest).unwrap();
    let no_manifest = vec![imago_runtime::rootfs_check::NO_MANIFEST.to_string()];
    assert_eq!(cache.verify(&h.image, false).unwrap(), no_manifest);
    assert_eq!(cache.verify(&h.image, true).unwrap(), no_manifest);

    // Set aside, the next launch unpacks afresh and records the manifest.
    cache.taint(&h.image).unwrap();
    let again = h.run_to_exit(&h.spec(&["true"]));
    assert_eq!(again.exit_code, Some(0));
    assert!(manifest.is_file());
    assert!(cache.verify(&h.image, true).unwrap().is_empty());
    for id in [inst.id, again.id] {
        h.provider.remove(&id).unwrap();
    }
}

#[test]
fn concurrent_first_launches_unpack_once() {
    let h = Harness::new(Engine::Embedded);
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| h.run_to_exit(&h.spec(&["true"])).id))
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let entries: Vec<_> = fs::read_dir(h.home().join("rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(entries, vec![h.image.hex().to_string()]);
    for id in ids {
        h.provider.remove(&id).unwrap();
    }
}

#[test]
fn killed_supervisor_shows_lost_and_rm_cleans_up() {
    let h = Harness::new(Engine::Embedded);
    let inst = h.provider.launch(&h.spec(&["sleep", "1000"])).unwrap();
    let (pid, sup) = (inst.pid.unwrap(), inst.supervisor_pid.unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.provider.inspect(&inst.id).unwrap().status != Status::Lost {
        assert!(Instant::now() < deadline, "never reported lost");
        std::thread::sleep(Duration::from_millis(10));
    }
    h.provider.remove(&inst.id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}/stat")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(Instant::now() < deadline, "container {pid} survived rm");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        cgroup_dirs(&inst.id).is_empty(),
        "{:?}",
        cgroup_dirs(&inst.id)
    );
    assert!(!Path::new(&format!("/var/run/netns/imago-{}", inst.id)).exists());
}

fn volumes_are_the_only_writable_data_places(engine: Engine) {
    use imago_runtime::VolumeKind;
    let h = Harness::with_image_volumes(engine, &["/data", "/www/"]);
    // The image declares /data (absent from its layers) and /www: with no explicit mount, each
    // gets an anonymous volume seeded from the image, and the shared tree is never written.
    let first = h.run_to_exit(&h.spec(&["true"]));
    let cache = h.provider.rootfs_cache().path(&h.image);
    assert!(
        cache.join("data").is_dir(),
        "declared volume path is created at unpack"
    );
    let before = tree_digest(&cache);
    let anon = h.run_to_exit(&h.spec(&[
        "sh",
        "-c",
        "echo anon > /data/f && cat /data/f && cat /www/index.html && echo new > /www/new && cat /www/new",
    ]));
    assert_eq!(anon.exit_code, Some(0), "{}", h.logs(&anon.id));
    assert_eq!(h.logs(&anon.id), "anon\nhello from imago\nnew\n");
    assert_eq!(anon.volumes.len(), 2, "{:?}", anon.volumes);
    assert!(anon.volumes.iter().all(|v| v.kind == VolumeKind::Anonymous));
    let anon_dirs: Vec<_> = anon.volumes.iter().map(|v| v.source.clone()).collect();
    assert_eq!(
        fs::read_to_string(anon_dirs[0].join("f")).unwrap(),
        "anon\n"
    );
    assert_eq!(
        tree_digest(&cache),
        before,
        "the rootfs cache entry changed"
    );
    h.provider.remove(&anon.id).unwrap();
    assert!(
        anon_dirs.iter().all(|d| !d.exists()),
        "anonymous volumes go away with the instance"
    );

    // A named volume outlives its instance and is shared; read-only mounts cannot be written.
    let mut writer = h.spec(&["sh", "-c", "echo one > /data/f"]);
    writer.volumes = vec!["state:/data".parse().unwrap()];
    let w = h.run_to_exit(&writer);
    assert_eq!(w.exit_code, Some(0), "{}", h.logs(&w.id));
    h.provider.remove(&w.id).unwrap();
    assert_eq!(
        fs::read_to_string(h.home().join("volumes/state/f")).unwrap(),
        "one\n"
    );
    let mut reader = h.spec(&[
        "sh",
        "-c",
        "cat /data/f; if echo two > /data/f 2>/dev/null; then echo ro=no; else echo ro=yes; fi; \
         ls /www/new 2>/dev/null || echo no-anon-leftover",
    ]);
    reader.volumes = vec!["state:/data:ro".parse().unwrap()];
    let r = h.run_to_exit(&reader);
    assert_eq!(
        h.logs(&r.id),
        "one\nsh: can't create /data/f: Read-only file system\nro=yes\nno-anon-leftover\n"
    );
    assert_eq!(r.volumes[0].kind, VolumeKind::Named);
    assert!(r.volumes[0].read_only);
    h.provider.remove(&r.id).unwrap();
    assert_eq!(
        fs::read_to_string(h.home().join("volumes/state/f")).unwrap(),
        "one\n"
    );

    // A host directory, bound read-only.
    let host = h.tmp.path().join("host-conf");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("app.conf"), "port=80\n").unwrap();
    let mut bound = h.spec(&["cat", "/www/app.conf"]);
    bound.volumes = vec![format!("{}:/www:ro", host.display()).parse().unwrap()];
    let b = h.run_to_exit(&bound);
    assert_eq!(h.logs(&b.id), "port=80\n");
    h.provider.remove(&b.id).unwrap();

    // A target the image lacks is refused before anything starts, and leaves no instance.
    let mut bad = h.spec(&["true"]);
    bad.volumes = vec!["state:/nope".parse().unwrap()];
    let err = h.provider.launch(&bad).unwrap_err().to_string();
    assert!(
        err.contains("/nope") && err.contains("does not exist"),
        "{err}"
    );
    let left: Vec<_> = h
        .provider
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(left, vec![first.id.clone()]);
    assert_eq!(
        tree_digest(&cache),
        before,
        "the rootfs cache entry changed"
    );
    h.provider.remove(&first.id).unwrap();
}

fn read_u64(path: &Path) -> u64 {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

fn cpu_stat(id: &str, key: &str) -> u64 {
    let path = controller_dir("cpu", id).join("cpu.stat");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {}: {text}", path.display()))
}

/// The CPU time the instance's processes used, in nanoseconds: `cpuacct.usage` on v1,
/// `usage_usec` of `cpu.stat` on v2 (where it is always there, with or without the cpu
/// controller).
fn cpu_usage_ns(id: &str) -> u64 {
    if cgroup2_only() {
        cpu_stat(id, "usage_usec ") * 1000
    } else {
        read_u64(&controller_dir("cpuacct", id).join("cpuacct.usage"))
    }
}

fn cpu_limit_is_enforced(engine: Engine) {
    let h = Harness::new(engine);
    let mut spec = h.spec(&["sh", "-c", "while :; do :; done"]);
    spec.resources.cpu_millis = Some(200);
    let inst = h.provider.launch(&spec).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (u0, t0) = (cpu_usage_ns(&inst.id), Instant::now());
    std::thread::sleep(Duration::from_millis(1500));
    let used = (cpu_usage_ns(&inst.id) - u0) as f64 / 1e9;
    let wall = t0.elapsed().as_secs_f64();
    // A busy loop would take a whole CPU (1.5 s); 0.2 CPUs allow 0.3 s, plus one period of slack.
    assert!(
        used / wall < 0.3,
        "used {used:.3} s of CPU in {wall:.3} s with a 0.2 CPU limit"
    );
    assert!(used > 0.01, "the busy loop did not run: {used} s");
    // On a loaded host the loop may not get 20 ms of a 100 ms period in the window above; it
    // must still be throttled once it does (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(20);
    while cpu_stat(&inst.id, "nr_throttled") == 0 {
        assert!(Instant::now() < deadline, "never throttled in 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    h.provider.stop(&inst.id, GRACE).unwrap();
    h.provider.remove(&inst.id).unwrap();
}

fn pids_limit_is_enforced(engine: Engine) {
    let h = Harness::new(engine);
    let mut spec = h.spec(&[
        "sh",
        "-c",
        // The inner shell forks until the limit refuses it (a failed fork ends a script), then
        // the outer one reports and waits.
        "sh -c 'for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 30 & done'; echo spawned; sleep 30",
    ]);
    spec.resources.pids = Some(6);
    let inst = h.provider.launch(&spec).unwrap();
    let dir = controller_dir("pids", &inst.id);
    assert_eq!(
        fs::read_to_string(dir.join("pids.max")).unwrap().trim(),
        "6"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.logs(&inst.id).contains("spawned") {
        assert!(Instant::now() < deadline, "logs: {}", h.logs(&inst.id));
        std::thread::sleep(Duration::from_millis(20));
    }
    let current = read_u64(&dir.join("pids.current"));
    assert!(current <= 6, "{current} processes with a limit of 6");
    let events = fs::read_to_string(dir.join("pids.events")).unwrap();
    let refused: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok())
        .unwrap();
    assert!(refused >= 1, "no fork was refused: {events}");
    assert!(
        h.logs(&inst.id).contains("can't fork"),
        "{}",
        h.logs(&inst.id)
    );
    h.provider.stop(&inst.id, GRACE).unwrap();
    h.provider.remove(&inst.id).unwrap();
}

#[test]
fn a_torn_record_after_power_loss_is_lost_not_fatal() {
    let h = Harness::new(Engine::Embedded);
    let done = h.run_to_exit(&h.spec(&["true"]));
    let other = h.run_to_exit(&h.spec(&["true"]));
    // What a crash can leave of a record renamed into place but never synced.
    let state = h.home().join("instances").join(&done.id).join("state.json");
    fs::write(&state, b"").unwrap();
    let list = h
        .provider
        .list()
        .expect("one torn record must not hide the others");
    assert_eq!(list.len(), 2);
    let torn = list.iter().find(|i| i.id == done.id).unwrap();
    assert_eq!(torn.status, Status::Lost);
    assert_eq!(torn.image, h.image);
    assert!(torn.error.as_deref().unwrap().contains("unreadable record"));
    h.provider.remove(&done.id).unwrap();
    assert!(!state.exists());
    h.provider.remove(&other.id).unwrap();
}

/// Set in a copy of this test binary that takes a lease and then dies or waits (see
/// `a_lease_of_a_launch_killed_before_its_record_is_reclaimed`): `<mode> <ipam> <id> <state>`.
const LEASE_HOLDER_ENV: &str = "IMAGO_TEST_LEASE_HOLDER";

/// Runs this test binary as a launcher that takes a lease for `id` (state file `state`) and
/// then is killed (`die`) or lives until killed (`wait`); returns once the lease exists.
fn lease_holder(mode: &str, ipam: &Path, id: &str, state: &Path) -> std::process::Child {
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_lease_of_a_launch_killed_before_its_record_is_reclaimed",
            "--exact",
            "--nocapture",
        ])
        .env(
            LEASE_HOLDER_ENV,
            format!("{mode} {} {id} {}", ipam.display(), state.display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lease_of(ipam, id).is_none() {
        assert!(Instant::now() < deadline, "{id} never took a lease");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// The block index of `id`'s lease in `ipam`, if it has one.
fn lease_of(ipam: &Path, id: &str) -> Option<u32> {
    fs::read_dir(ipam).ok()?.flatten().find_map(|e| {
        let text = fs::read_to_string(e.path()).ok()?;
        (text.lines().next() == Some(id)).then(|| e.file_name().to_str()?.parse().ok())?
    })
}

/// Regression: a launcher killed (kill -9) between taking an instance's address lease and
/// writing its record left the address leased forever: no record named it, so no `rm` ever
/// gave it back. Such a lease is now reclaimed (by `rm` of any instance, or by an allocation
/// that finds no free block), but never while its launcher lives nor once a record exists.
#[test]
fn a_lease_of_a_launch_killed_before_its_record_is_reclaimed() {
    if let Ok(role) = std::env::var(LEASE_HOLDER_ENV) {
        // The launcher's side, in a process of its own: the real allocation, then a real kill.
        let [mode, ipam, id, state] = role.splitn(4, ' ').collect::<Vec<_>>()[..] else {
            panic!("bad {LEASE_HOLDER_ENV}: {role}");
        };
        imago_runtime::network::Ipam::new(ipam)
            .allocate(id, Path::new(state))
            .unwrap();
        if mode == "wait" {
            std::thread::sleep(Duration::from_secs(60));
        }
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let ipam_dir = tmp.path().join("ipam");
    let ipam = imago_runtime::network::Ipam::new(&ipam_dir);
    let instances = tmp.path().join("home/instances");
    let state = |id: &str| instances.join(id).join("state.json");
    let wait_dead = |mut child: std::process::Child| {
        let status = child.wait().unwrap();
        assert!(!status.success(), "the launcher was to be killed");
    };

    // Killed before the record: abandoned. Killed after it: the record holds the lease.
    wait_dead(lease_holder("die", &ipam_dir, "killed", &state("killed")));
    fs::create_dir_all(instances.join("recorded")).unwrap();
    fs::write(state("recorded"), "{}").unwrap();
    wait_dead(lease_holder(
        "die",
        &ipam_dir,
        "recorded",
        &state("recorded"),
    ));
    // Still launching: its launcher lives.
    let mut launching = lease_holder("wait", &ipam_dir, "launching", &state("launching"));
    // A lease written by an older imago says nothing of its holder: kept.
    fs::write(ipam_dir.join("100"), "older").unwrap();

    let killed = lease_of(&ipam_dir, "killed").unwrap();
    assert_eq!(ipam.reclaim_abandoned().unwrap(), vec![killed]);
    assert_eq!(lease_of(&ipam_dir, "killed"), None);
    for kept in ["recorded", "launching", "older"] {
        assert!(lease_of(&ipam_dir, kept).is_some(), "{kept} lost its lease");
    }
    // The freed block is the next one given out.
    let reused = ipam.allocate("next", &state("next")).unwrap();
    assert_eq!(reused.index, killed);
    ipam.release("next", reused.host).unwrap();

    // The launching one is killed now; the provider's sweep reclaims its lease.
    let launching_index = lease_of(&ipam_dir, "launching").unwrap();
    launching.kill().unwrap();
    wait_dead(launching);
    let layout = common::LayoutSource {
        root: tmp.path().join("layout"),
    };
    let (image, _) = common::build_busybox_image(&layout);
    let provider = imago_runtime::LocalProvider::new(
        &tmp.path().join("home"),
        Box::new(layout),
        common::supervisor_command(),
    )
    .with_ipam_dir(&ipam_dir);
    let mut spec = imago_runtime::InstanceSpec::new(image);
    spec.network = NetworkMode::Host;
    spec.args = Some(vec!["true".into()]);
    let inst = provider.launch(&spec).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.inspect(&inst.id).unwrap().is_active() {
        assert!(
            Instant::now() < deadline,
            "instance {} never exited",
            inst.id
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(lease_of(&ipam_dir, "launching").is_some());
    provider.remove(&inst.id).unwrap();
    assert!(
        lease_of(&ipam_dir, "launching").is_some(),
        "rm read every lease"
    );
    assert_eq!(provider.sweep_abandoned().leases, vec![launching_index]);
    assert_eq!(
        lease_of(&ipam_dir, "launching"),
        None,
        "block {launching_index} is still leased"
    );
    assert!(lease_of(&ipam_dir, "recorded").is_some());
}

/// A provider under `dir` (see [`shell_supervised`]) whose real supervisor is exec'd by a shell
/// that first runs `before` (with `$IMAGO_TEST_INSTANCE` set to the instance's directory) and
/// that finds first in its PATH a `runc` which runs the real one and, once the real one's
/// `runc_step` (`create`, `start`) succeeded, the shell code `after_runc_step`.
fn wrapped_supervisor(
    dir: &Path,
    before: &str,
    runc_step: &str,
    after_runc_step: &str,
) -> (imago_runtime::LocalProvider, imago_oci::Digest) {
    let real_runc = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
        .expect("runc must be installed");
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("runc");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\n{} \"$@\" || exit $?\nfor a in \"$@\"; do [ \"$a\" = {runc_step} ] && {{ {after_runc_step}; }}; done\nexit 0\n",
            real_runc.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let supervisor = common::supervisor_command();
    shell_supervised(
        dir,
        vec![
            "-c".into(),
            format!(
                "export IMAGO_TEST_INSTANCE=\"$1/instances/$2\" PATH={}:$PATH; {before}; exec \"$0\" \"$@\"",
                bin.display()
            )
            .into(),
            supervisor.program.into_os_string(),
        ],
    )
}

/// The one instance directory under the provider home in `dir`.
fn only_instance(dir: &Path) -> (String, std::path::PathBuf) {
    let entries: Vec<_> = fs::read_dir(dir.join("home/instances"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(entries.len(), 1);
    (
        entries[0].file_name().to_string_lossy().into_owned(),
        entries[0].path(),
    )
}

/// Regression: the supervisor's write of the "running" record failed after the engine had
/// started the container; the launch was reported failed (and its network torn down) while
/// the container ran on, unowned, until `rm`. Now the supervisor stops it first. The instance
/// directory is made immutable (for the embedded engine before the supervisor starts, which
/// writes nothing there before that record; for runc right after `runc start`, since runc
/// writes its pid file there), so every write of the record fails, the launcher's too.
fn a_launch_whose_running_record_cannot_be_written_leaves_nothing_running(engine: Engine) {
    let tmp = tempfile::tempdir().unwrap();
    let freeze = "chattr +i \"$IMAGO_TEST_INSTANCE\"";
    let (provider, image) = match engine {
        Engine::Embedded => wrapped_supervisor(tmp.path(), freeze, "start", "true"),
        Engine::Runc => wrapped_supervisor(tmp.path(), "true", "start", freeze),
    };
    let mut spec = imago_runtime::InstanceSpec::new(image);
    spec.engine = engine;
    spec.args = Some(vec!["sleep".into(), "1000".into()]);
    let result = provider.launch(&spec);
    let (id, instance_dir) = only_instance(tmp.path());
    let unfrozen = std::process::Command::new("chattr")
        .arg("-i")
        .arg(&instance_dir)
        .status()
        .unwrap();
    assert!(unfrozen.success());
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("cannot record the instance as running, so it was stopped"),
        "{err}"
    );
    assert_no_container_left(&id, &tmp.path().join("home"));
    assert!(!Path::new(&format!("/var/run/netns/imago-{id}")).exists());
    assert_eq!(
        fs::read_dir(tmp.path().join("ipam")).unwrap().count(),
        0,
        "lease left"
    );
    // Nothing could be recorded: the record still says "created" (lost once stale), never
    // "running".
    assert_eq!(provider.inspect(&id).unwrap().status, Status::Created);
}

/// Regression: `runc create` succeeded but its pid file could not be read; the supervisor
/// returned the error and left the created container (its init waiting for a `start`) behind.
#[test]
fn a_runc_container_whose_pid_file_cannot_be_read_is_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let (provider, image) = wrapped_supervisor(
        tmp.path(),
        "true",
        "create",
        "rm \"$IMAGO_TEST_INSTANCE/container.pid\"",
    );
    let mut spec = imago_runtime::InstanceSpec::new(image);
    spec.engine = Engine::Runc;
    spec.network = NetworkMode::Host;
    spec.args = Some(vec!["sleep".into(), "1000".into()]);
    let err = provider.launch(&spec).unwrap_err().to_string();
    assert!(err.contains("container.pid"), "{err}");
    let list = provider.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, Status::Failed);
    let id = list[0].id.clone();
    assert_no_container_left(&id, &tmp.path().join("home"));
    provider.remove(&id).unwrap();
}

/// Asserts that nothing of instance `id`'s container is left: no process in its cgroups (not
/// even a zombie), no cgroup directory, no engine state under `home`.
fn assert_no_container_left(id: &str, home: &Path) {
    let left: Vec<String> = processes_in_cgroup(id)
        .iter()
        .map(|p| fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default())
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(cgroup_dirs(id).is_empty(), "cgroup dirs left");
    assert!(!home.join("runtime/youki").join(id).exists());
    assert!(!home.join("runtime/runc").join(id).exists());
}

/// Regression: a launcher killed (kill -9) after it made an instance's directory and before it
/// wrote the record left the directory (spec, bundle, anonymous volumes) forever: `list` skips
/// it and no `rm` names it. Each directory now says who launches it, and `rm` of any instance
/// removes those whose launcher is gone, never one whose launcher lives or that says nothing.
#[test]
fn the_directory_of_a_launch_killed_before_its_record_is_removed_by_the_sweep() {
    let h = common::Harness::new(Engine::Embedded);
    let mut spec = h.spec(&["true"]);
    spec.network = NetworkMode::Host;
    let done = h.run_to_exit(&spec);
    let instances = h.home().join("instances");
    let me = std::process::id();
    let my_start = imago_runtime::state::process_start_time(me as i32).unwrap();
    assert_eq!(
        fs::read_to_string(instances.join(&done.id).join("launcher")).unwrap(),
        format!("{me} {my_start}\n"),
        "a launch says who launches it"
    );
    // A launcher that is gone: a real process, killed.
    let mut gone = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let gone_pid = gone.id();
    let gone_start = imago_runtime::state::process_start_time(gone_pid as i32).unwrap();
    gone.kill().unwrap();
    gone.wait().unwrap();
    let orphan = |name: &str, launcher: Option<String>| {
        let dir = instances.join(name);
        fs::create_dir_all(dir.join("bundle")).unwrap();
        fs::write(dir.join("spec.json"), "{}").unwrap();
        if let Some(l) = launcher {
            fs::write(dir.join("launcher"), l).unwrap();
        }
        dir
    };
    let killed = orphan("killedlaunch", Some(format!("{gone_pid} {gone_start}\n")));
    let launching = orphan("livelaunch", Some(format!("{me} {my_start}\n")));
    let older = orphan("olderlaunch", None);
    assert!(h.provider.list().unwrap().iter().all(|i| i.id == done.id));
    h.provider.remove(&done.id).unwrap();
    // `rm` is O(1): it leaves the sweep of every directory to the sweep.
    assert!(killed.exists(), "rm swept the other instance directories");
    let swept = h.provider.sweep_abandoned();
    assert_eq!(swept.dirs, 1, "{swept:?}");
    assert!(
        !killed.exists(),
        "the killed launch's directory is still there"
    );
    assert!(launching.exists(), "a launch under way lost its directory");
    assert!(
        older.exists(),
        "a directory that names no launcher was removed"
    );
    // Regression: a launcher killed between making the directory and writing its `launcher`
    // file left a directory with nothing in it that no sweep ever took (seen after kill -9 of
    // a controller during a wave of launches). Taken once older than any launch; not before.
    let cut = instances.join("cutlaunch");
    fs::create_dir_all(&cut).unwrap();
    fs::write(cut.join("launcher"), "").unwrap();
    let fresh = instances.join("freshlaunch");
    fs::create_dir_all(&fresh).unwrap();
    let long_ago = std::time::SystemTime::now()
        - imago_runtime::local::ABANDONED_DIR_AGE
        - Duration::from_secs(1);
    for dir in [&cut, &older] {
        fs::File::open(dir)
            .unwrap()
            .set_times(fs::FileTimes::new().set_modified(long_ago))
            .unwrap();
    }
    let swept = h.provider.sweep_abandoned();
    assert_eq!(swept.dirs, 1, "{swept:?}");
    assert!(
        !cut.exists(),
        "an old directory that names nobody and has no spec stays"
    );
    assert!(
        fresh.exists(),
        "a launch that just made its directory lost it"
    );
    assert!(
        older.exists(),
        "a directory with a spec that names no launcher was removed"
    );
}

/// A launch whose launcher died after writing the record but before starting a supervisor is
/// "created" forever: it shows as lost, with its launch interrupted, as soon as the launcher is
/// gone (a restarted controller then relaunches it at once, not 60 s later), and never while the
/// launcher lives.
#[test]
fn a_created_instance_whose_launcher_died_is_lost_at_once() {
    let h = common::Harness::new(Engine::Embedded);
    let mut spec = h.spec(&["true"]);
    spec.network = NetworkMode::Host;
    let done = h.run_to_exit(&spec);
    let instances = h.home().join("instances");
    let mut gone = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let gone_pid = gone.id();
    let gone_start = imago_runtime::state::process_start_time(gone_pid as i32).unwrap();
    gone.kill().unwrap();
    gone.wait().unwrap();
    let me = std::process::id();
    let my_start = imago_runtime::state::process_start_time(me as i32).unwrap();
    let created = |name: &str, launcher: String| {
        let dir = instances.join(name);
        fs::create_dir_all(&dir).unwrap();
        let mut record: serde_json::Value =
            serde_json::from_slice(&fs::read(instances.join(&done.id).join("state.json")).unwrap())
                .unwrap();
        record["id"] = name.into();
        record["status"] = "created".into();
        record["created_ms"] = imago_runtime::state::now_ms().into();
        for field in [
            "pid",
            "supervisor_pid",
            "supervisor_start",
            "exit_code",
            "started_ms",
            "finished_ms",
        ] {
            record.as_object_mut().unwrap().remove(field);
        }
        fs::write(dir.join("state.json"), record.to_string()).unwrap();
        fs::copy(
            instances.join(&done.id).join("spec.json"),
            dir.join("spec.json"),
        )
        .unwrap();
        fs::write(dir.join("launcher"), launcher).unwrap();
    };
    created("killedlaunch", format!("{gone_pid} {gone_start}\n"));
    created("livelaunch", format!("{me} {my_start}\n"));
    let killed = h.provider.inspect("killedlaunch").unwrap();
    assert_eq!(killed.status, Status::Lost);
    assert!(killed.launch_interrupted());
    let live = h.provider.inspect("livelaunch").unwrap();
    assert_eq!(live.status, Status::Created, "a launch under way");
    h.provider.remove("killedlaunch").unwrap();
    fs::remove_dir_all(instances.join("livelaunch")).unwrap();
}

/// A static program that tries, each in a child of its own, what the default seccomp profile
/// refuses, and prints `NAME=ok` or `NAME=errno N` for each.
const PROBE_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, long r) {
    if (r < 0) printf("%s=errno %d\n", name, errno); else printf("%s=ok\n", name);
    fflush(stdout);
}

static long clone_newuser(void) {
    long r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (r == 0) _exit(0);
    if (r > 0) waitpid(r, NULL, 0);
    return r;
}

static long mount_in_userns(void) {
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0) return -1;
    return mount("none", "/tmp", "tmpfs", 0, NULL);
}

static long ptrace_other(void) {
    pid_t other = fork();
    if (other == 0) { pause(); _exit(0); }
    long r = ptrace(PTRACE_ATTACH, other, 0, 0);
    int e = errno;
    kill(other, SIGKILL);
    waitpid(other, NULL, 0);
    errno = e;
    return r;
}

#define TRY(name, expr) do { pid_t p = fork(); \
    if (p == 0) { report(name, (expr)); _exit(0); } waitpid(p, NULL, 0); } while (0)

int main(void) {
    TRY("unshare_user", unshare(CLONE_NEWUSER));
    TRY("clone_newuser", clone_newuser());
    TRY("clone3", syscall(SYS_clone3, NULL, 0));
    TRY("mount_in_userns", mount_in_userns());
    TRY("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* session */, 0));
    TRY("add_key", syscall(SYS_add_key, "user", "imago-probe", "x", 1, -3));
    TRY("ptrace_other", ptrace_other());
    return 0;
}
"#;

/// The probe, compiled static once per test process.
fn seccomp_probe() -> Vec<u8> {
    static PROBE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("probe.c"), PROBE_C).unwrap();
            let out = std::process::Command::new("gcc")
                .args(["-static", "-O1", "-o", "probe", "probe.c"])
                .current_dir(dir.path())
                .output()
                .expect("gcc (with a static libc) must be installed to build the seccomp probe");
            assert!(
                out.status.success(),
                "gcc: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            fs::read(dir.path().join("probe")).unwrap()
        })
        .clone()
}

/// A harness whose busybox image runs as nobody (65534:65534) and holds `/bin/probe`.
fn unprivileged_harness(engine: Engine) -> Harness {
    let probe = seccomp_probe();
    Harness::with_image(engine, move |layout| {
        common::build_busybox_image_full(
            layout,
            &[],
            Some("65534:65534"),
            &[("bin/probe", 0o755, probe)],
        )
    })
}

const PROBE_SCRIPT: &str = "id -u; grep Seccomp: /proc/self/status; probe; \
     unshare -r -m sh -c 'mount -t tmpfs none /tmp && echo mounted'; echo unshare_rm=$?; \
     unshare -U true; echo unshare_u=$?";

fn default_seccomp_refuses_namespaces_keyrings_ptrace_and_mounts(engine: Engine) {
    let h = unprivileged_harness(engine);
    let inst = h.run_to_exit(&h.spec(&["sh", "-c", PROBE_SCRIPT]));
    let logs = h.logs(&inst.id);
    assert_eq!(inst.exit_code, Some(0), "{logs}");
    assert!(logs.starts_with("65534\n"), "{logs}");
    assert!(logs.contains("Seccomp:\t2"), "no filter: {logs}");
    for refused in [
        "unshare_user",
        "clone_newuser",
        "mount_in_userns",
        "keyctl",
        "add_key",
        "ptrace_other",
    ] {
        assert!(
            logs.contains(&format!("{refused}=errno 1\n")),
            "{refused} was not refused with EPERM: {logs}"
        );
    }
    assert!(logs.contains("clone3=errno 38\n"), "{logs}");
    assert!(!logs.contains("mounted"), "{logs}");
    assert!(!logs.contains("unshare_rm=0"), "{logs}");
    assert!(!logs.contains("unshare_u=0"), "{logs}");
    h.provider.remove(&inst.id).unwrap();
}

fn unconfined_instances_can_make_user_namespaces_again(engine: Engine) {
    let h = unprivileged_harness(engine);
    let mut spec = h.spec(&["sh", "-c", PROBE_SCRIPT]);
    spec.seccomp = Seccomp::Unconfined;
    let inst = h.run_to_exit(&spec);
    let logs = h.logs(&inst.id);
    assert!(logs.contains("Seccomp:\t0"), "{logs}");
    for allowed in [
        "unshare_user=ok",
        "mount_in_userns=ok",
        "mounted",
        "unshare_u=0",
    ] {
        assert!(logs.contains(allowed), "{allowed} missing: {logs}");
    }
    h.provider.remove(&inst.id).unwrap();
}

fn ordinary_programs_work_under_the_default_filter(engine: Engine) {
    let h = unprivileged_harness(engine);
    let spec = h.spec(&[
        "sh",
        "-c",
        "echo ok; httpd -p 127.0.0.1:8080 -h /www && sleep 0.3 && \
         wget -q -O - http://127.0.0.1:8080/index.html; echo wget=$?; \
         ls / | head -c 0; sleep 0.01 & wait; echo done",
    ]);
    let inst = h.run_to_exit(&spec);
    let logs = h.logs(&inst.id);
    assert_eq!(inst.exit_code, Some(0), "{logs}");
    assert!(logs.starts_with("ok\n"), "{logs}");
    assert!(logs.ends_with("hello from imago\nwget=0\ndone\n"), "{logs}");
    h.provider.remove(&inst.id).unwrap();
}

fn a_profile_file_replaces_the_default_filter(engine: Engine) {
    let h = unprivileged_harness(engine);
    let profile = h.tmp.path().join("no-mkdir.json");
    fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}"#,
    )
    .unwrap();
    let mut spec = h.spec(&["sh", "-c", "mkdir /tmp/d; echo mkdir=$?; probe"]);
    spec.seccomp = Seccomp::load(&profile).unwrap();
    let inst = h.run_to_exit(&spec);
    let logs = h.logs(&inst.id);
    assert!(logs.contains("Permission denied"), "{logs}");
    assert!(logs.contains("mkdir=1"), "{logs}");
    assert!(logs.contains("unshare_user=ok"), "{logs}");
    h.provider.remove(&inst.id).unwrap();
}

/// Zombie children of host process `parent` (state `Z` in `/proc/PID/stat`).
fn zombies_of(parent: i32) -> Vec<i32> {
    children_of(parent)
        .into_iter()
        .filter(|(_, state)| state == "Z")
        .map(|(pid, _)| pid)
        .collect()
}

/// The command line of host process `pid`, its arguments separated by spaces.
fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .trim_end()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The children of host process `parent`: (pid, state from `/proc/PID/stat`).
fn children_of(parent: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": the command name may hold spaces, so split after ')'.
        let mut rest = stat.rsplit_once(')').unwrap().1.split_whitespace();
        let state = rest.next().unwrap();
        let ppid: i32 = rest.next().unwrap().parse().unwrap();
        if ppid == parent {
            out.push((pid, state.to_owned()));
        }
    }
    out
}

/// busybox httpd as PID 1 ignores SIGTERM (the kernel drops signals a namespace's init does
/// not handle), so without an init every stop waits out its whole grace and ends in SIGKILL.
/// Under the init, which passes SIGTERM on to it as an ordinary process, it stops at once.
fn an_init_stops_a_program_that_ignores_sigterm_at_once(engine: Engine) {
    let h = Harness::new(engine);
    // Without an init the stop takes the whole grace and ends in SIGKILL (137); with one it
    // ends by SIGTERM (143) before the grace runs out. A bound of 500 ms for "at once" was a
    // loaded host's to overrun; the grace is what tells the two apart, with the exit status.
    let grace = Duration::from_secs(3);
    let stop_time = |init: bool| {
        let mut spec = h.spec(&["httpd", "-f", "-p", "80", "-h", "/www"]);
        spec.init = init;
        let inst = h.provider.launch(&spec).unwrap();
        let addr = inst.address.expect("a private instance has an address");
        assert!(http_get(&format!("{addr}:80")).contains("200 OK"));
        let t0 = Instant::now();
        let stopped = h.provider.stop(&inst.id, grace).unwrap();
        let took = t0.elapsed();
        h.provider.remove(&inst.id).unwrap();
        (took, stopped.exit_code)
    };
    let (with_init, code) = stop_time(true);
    assert!(
        with_init < grace,
        "with init the stop took {with_init:?}, the whole grace"
    );
    // tini exits 128 + the signal that ended its child.
    assert_eq!(code, Some(143));
    let (without, code) = stop_time(false);
    assert!(
        without >= grace,
        "without init httpd was expected to ignore SIGTERM, but stopped in {without:?}"
    );
    assert_eq!(code, Some(137), "killed after its grace");
}

/// A program that never waits (here `sleep`, exec'd by the shell that orphaned a child) leaves
/// orphans it inherits as zombies when it is PID 1; under the init they are reaped.
fn an_init_reaps_orphans_that_the_program_never_waits_for(engine: Engine) {
    let h = Harness::new(engine);
    let zombies = |init: bool| {
        let mut spec = h.spec(&["sh", "-c", "(sleep 0.1 &); (sleep 0.1 &); exec sleep 1000"]);
        spec.network = NetworkMode::Host;
        spec.init = init;
        let inst = h.provider.launch(&spec).unwrap();
        let pid1 = inst.pid.unwrap();
        // Once the shell exec'd `sleep 1000` both orphans exist; they exit after 0.1 s. Waited
        // for by what the processes are, not by a fixed time, which a loaded host can overrun:
        // the init's children down to the program alone (the orphans reaped), or without one
        // two zombies beside it. What is found after 60 s is asserted below.
        let program = |pid: i32| cmdline(pid) == "sleep 1000";
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let exec_d = program(pid1) || children_of(pid1).iter().any(|(pid, _)| program(*pid));
            let orphans: Vec<(i32, String)> = children_of(pid1)
                .into_iter()
                .filter(|(pid, _)| !program(*pid))
                .collect();
            let settled = if init {
                orphans.is_empty()
            } else {
                orphans.len() >= 2 && orphans.iter().all(|(_, state)| state == "Z")
            };
            if exec_d && settled {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let found = zombies_of(pid1);
        h.provider.stop(&inst.id, GRACE).unwrap();
        h.provider.remove(&inst.id).unwrap();
        found
    };
    assert_eq!(zombies(true), Vec::<i32>::new(), "the init left zombies");
    assert_eq!(
        zombies(false).len(),
        2,
        "without an init the orphans should stay zombies (else this test proves nothing)"
    );
}

/// The init is the host's file, bound read-only on the instance's own /dev: PID 1 is the init,
/// nothing in the instance can change it, the image's shared root holds no trace of it, and
/// the program's exit status is the instance's.
fn the_init_is_read_only_outside_the_image_and_passes_the_exit_status_on(engine: Engine) {
    let h = Harness::new(engine);
    let mut spec = h.spec(&[
        "sh",
        "-c",
        "echo pid1=$(cat /proc/1/comm); echo x > /dev/init || echo refused; exit 7",
    ]);
    spec.network = NetworkMode::Host;
    spec.init = true;
    let inst = h.run_to_exit(&spec);
    assert_eq!(inst.status, Status::Exited);
    assert_eq!(inst.exit_code, Some(7));
    let logs = h.logs(&inst.id);
    assert!(logs.contains("pid1=init\n"), "{logs}");
    assert!(logs.contains("refused"), "the init was writable: {logs}");
    let cache = h.provider.rootfs_cache().path(&h.image);
    assert!(
        !cache.join("dev/init").exists(),
        "the init's mount point was made in the image's root"
    );
    let before = tree_digest(&cache);
    h.provider.remove(&inst.id).unwrap();
    assert_eq!(tree_digest(&cache), before);
}

/// An instance asking for an init on a host without one fails before anything starts, naming
/// the file; `init = false` needs none.
#[test]
fn a_missing_init_fails_the_launch_naming_the_file() {
    let h = Harness::new(Engine::Embedded);
    let provider = imago_runtime::LocalProvider::new(
        &h.home(),
        Box::new(h.layout()),
        common::supervisor_command(),
    )
    .with_init(h.tmp.path().join("no-such-init"));
    let mut spec = h.spec(&["true"]);
    spec.network = NetworkMode::Host;
    spec.init = true;
    let err = provider.launch(&spec).unwrap_err();
    assert!(
        matches!(&err, RuntimeError::InitMissing { path, .. } if path.ends_with("no-such-init")),
        "{err}"
    );
    assert!(err.to_string().contains("IMAGO_INIT"), "{err}");
    assert!(
        provider.list().unwrap().is_empty(),
        "a failed launch left an instance"
    );
    spec.init = false;
    let inst = provider.launch(&spec).unwrap();
    provider
        .remove(&h.wait_exit(&inst.id, Duration::from_secs(10)).id)
        .unwrap();
}

/// A network namespace that no process is in and no instance of the home claims (its record
/// was deleted with its home, or its cleanup was killed) is torn down by the sweep, with its
/// veth; a running instance's namespace is kept, and so is one of the home's own instances.
#[test]
fn the_sweep_tears_down_network_namespaces_no_instance_claims() {
    let h = Harness::new(Engine::Embedded);
    let ipam_dir = h.tmp.path().join("ipam");
    let provider = |home: &str| {
        imago_runtime::LocalProvider::new(
            &h.tmp.path().join(home),
            Box::new(h.layout()),
            common::supervisor_command(),
        )
        .with_ipam_dir(&ipam_dir)
    };
    let (gone_home, sweeper) = (provider("gone"), provider("home"));
    // The sweeper's own exited instance, and a running one.
    let exited = sweeper.launch(&h.spec(&["true"])).unwrap();
    let exited = wait_inactive(&sweeper, &exited.id);
    let running = sweeper.launch(&h.spec(&["sleep", "1000"])).unwrap();
    // Left behind: an instance that exited, whose home was then deleted with its record.
    let left = gone_home.launch(&h.spec(&["true"])).unwrap();
    // Only namespaces at least as old as this leftover are swept: other sessions' launches
    // under way on this host are never touched.
    let started = Instant::now();
    let left = wait_inactive(&gone_home, &left.id);
    let left_lease = left.host_address.unwrap();
    fs::remove_dir_all(h.tmp.path().join("gone")).unwrap();
    let netns = |id: &str| PathBuf::from(format!("/var/run/netns/imago-{id}"));
    let veth = |id: &str| PathBuf::from(format!("/sys/class/net/iv-{id}"));
    assert!(netns(&left.id).exists() && veth(&left.id).exists());
    let swept = provider("home")
        .with_netns_sweep_age(started.elapsed())
        .sweep_abandoned();
    assert!(swept.namespaces.contains(&left.id), "{swept:?}");
    assert!(
        !netns(&left.id).exists(),
        "the leftover namespace is still there"
    );
    assert!(!veth(&left.id).exists(), "the leftover veth is still there");
    assert!(
        netns(&running.id).exists(),
        "a running instance lost its namespace"
    );
    assert!(
        netns(&exited.id).exists(),
        "the home's own instance lost its namespace"
    );
    sweeper.stop(&running.id, GRACE).unwrap();
    sweeper.remove(&running.id).unwrap();
    sweeper.remove(&exited.id).unwrap();
    imago_runtime::network::Ipam::new(&ipam_dir)
        .release(&left.id, left_lease)
        .unwrap();
}

fn wait_inactive(provider: &imago_runtime::LocalProvider, id: &str) -> imago_runtime::Instance {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let i = provider.inspect(id).unwrap();
        if !i.is_active() {
            return i;
        }
        assert!(Instant::now() < deadline, "instance {id} never exited");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Users put the instance directories on a disk of their own (`<home>/instances` a symlink to
/// it, or a mount): there a removal's rename into `<home>/trash` fails (EXDEV), and `rm` of an
/// instance failed, leaving it listed. Here a real instance, with its network and an anonymous
/// volume, on a tmpfs: `rm` takes it, leaves nothing of it under `instances` (its trash
/// there empty) and its lease is given back; a launch that fails there leaves nothing either.
/// Needs root.
#[test]
fn instances_on_another_filesystem_are_launched_and_removed() {
    let disk = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        disk.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(disk.path());
    let h = Harness::with_image_volumes(Engine::Embedded, &["/data"]);
    fs::create_dir_all(h.home()).unwrap();
    fs::create_dir(disk.path().join("instances")).unwrap();
    std::os::unix::fs::symlink(disk.path().join("instances"), h.home().join("instances")).unwrap();

    let done = h.run_to_exit(&h.spec(&["sh", "-c", "echo kept > /data/f"]));
    assert_eq!(done.exit_code, Some(0), "{done:?}");
    let lease = done.address.expect("a bridged instance has an address");
    h.provider.remove(&done.id).unwrap();
    assert!(
        matches!(
            h.provider.inspect(&done.id),
            Err(RuntimeError::NoSuchInstance(_))
        ),
        "removed yet still there"
    );
    assert!(h.provider.list().unwrap().is_empty());
    let left = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let instances = disk.path().join("instances");
    assert!(
        left(&instances).iter().all(|n| n == ".trash"),
        "{:?}",
        left(&instances)
    );
    assert!(left(&instances.join(".trash")).is_empty());
    let leases: Vec<String> = fs::read_dir("/run/imago/ipam")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !leases.iter().any(|l| l.starts_with(&done.id)),
        "lease {lease} of {} kept",
        done.id
    );

    // A launch that fails at the program's exec keeps its failed record until its `rm`.
    let err = h
        .provider
        .launch(&h.spec(&["/no/such/program"]))
        .unwrap_err();
    let failed = h.provider.list().unwrap();
    assert_eq!(failed.len(), 1, "{err}");
    assert_eq!(failed[0].status, Status::Failed, "{err}");
    h.provider.remove(&failed[0].id).unwrap();
    let listed = h.provider.list().unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(
        left(&instances).iter().all(|n| n == ".trash"),
        "{:?}",
        left(&instances)
    );
}

/// Set in a copy of this test binary that launches real instances until it is killed (see
/// `launchers_killed_at_random_points_of_real_launches_are_never_waited_for`): the directory
/// of the harness (its `home`, `layout` and the spec to launch, `launch.json`).
const REAL_LAUNCHER_ENV: &str = "IMAGO_TEST_REAL_LAUNCHER";

/// Launchers killed (SIGKILL) at random points of real launches (the image's rootfs found, the
/// bundle written, the supervisor and the container started) leave no instance directory that
/// names nobody, nothing that `launches_under_way` (what `imago destroy` waits for) counts, and
/// what they left before their record is taken by the sweep at once, not 60 s later. (The unit
/// test in local.rs kills many more launches, cut short at the image's lookup, beside a live
/// launcher.)
#[test]
fn launchers_killed_at_random_points_of_real_launches_are_never_waited_for() {
    if let Ok(dir) = std::env::var(REAL_LAUNCHER_ENV) {
        let dir = PathBuf::from(dir);
        let provider = imago_runtime::LocalProvider::new(
            &dir.join("home"),
            Box::new(common::LayoutSource {
                root: dir.join("layout"),
            }),
            common::supervisor_command(),
        );
        let spec: imago_runtime::InstanceSpec =
            serde_json::from_slice(&fs::read(dir.join("launch.json")).unwrap()).unwrap();
        fs::write(dir.join(format!("ready.{}", std::process::id())), b"").unwrap();
        loop {
            let _ = provider.launch(&spec);
        }
    }
    let h = Harness::new(Engine::Embedded);
    let mut spec = h.spec(&["true"]);
    spec.network = NetworkMode::Host;
    // Unpacked here once: what is killed is a launch, not an unpack.
    let first = h.run_to_exit(&spec);
    h.provider.remove(&first.id).unwrap();
    let root = h.home().parent().unwrap().to_owned();
    fs::write(root.join("launch.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let instances = h.home().join("instances");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill points seed {seed}");
    let mut x = seed | 1;
    let mut left_by_round = Vec::new();
    for round in 0..12 {
        let mut launcher = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "launchers_killed_at_random_points_of_real_launches_are_never_waited_for",
                "--exact",
            ])
            .env(REAL_LAUNCHER_ENV, &root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = launcher.id().to_string();
        let ready = root.join(format!("ready.{pid}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "round {round}: no launcher");
            std::thread::sleep(Duration::from_millis(1));
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_micros(x % 500_000));
        launcher.kill().unwrap();
        launcher.wait().unwrap();

        // Everything in `instances` is the killed launcher's (the rounds before removed theirs)
        // and names it: by its staging or marker name or its `launcher` file.
        let mut left = Vec::new();
        for entry in fs::read_dir(&instances).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == ".trash" {
                continue;
            }
            // Its staging directory, or its marker (kept until the record exists).
            if let Some(rest) = name
                .strip_prefix(".launching.")
                .or_else(|| name.strip_prefix(".launch."))
            {
                assert_eq!(rest.split('.').nth(1), Some(pid.as_str()), "round {round}");
                left.push(name);
                continue;
            }
            let launcher = fs::read_to_string(entry.path().join("launcher"))
                .unwrap_or_else(|e| panic!("round {round}: {name} names no launcher: {e}"));
            assert_eq!(
                launcher.split_whitespace().next(),
                Some(pid.as_str()),
                "round {round}: {name}"
            );
            if !entry.path().join("state.json").exists() {
                left.push(name);
            }
        }
        let under_way = h.provider.launches_under_way();
        assert!(
            under_way.is_empty(),
            "round {round}: a dead launcher's launch is waited for: {under_way:?}"
        );
        assert_eq!(
            h.provider.remove_abandoned_dirs(),
            left.len(),
            "round {round}: {left:?}"
        );
        // Its recorded instances: stopped if their supervisor started them, and removed.
        for instance in h.provider.list().unwrap() {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let _ = h.provider.stop(&instance.id, GRACE);
                match h.provider.remove(&instance.id) {
                    Ok(()) | Err(RuntimeError::NoSuchInstance(_)) => break,
                    Err(e) => assert!(Instant::now() < deadline, "round {round}: {e}"),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let rest: Vec<String> = fs::read_dir(&instances)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != ".trash")
            .collect();
        assert!(rest.is_empty(), "round {round}: {rest:?}");
        left_by_round.push(left.len());
    }
    eprintln!("directories left before their record, by round: {left_by_round:?}");
}
