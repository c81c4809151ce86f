//! Isolation probes from inside instances, as root: a static probe program (`isolation/probe.c`,
//! compiled here) runs in a real instance under each engine, host and private network, and tries
//! to escape or to see what it must not. Every check prints `ok` or `ESCAPE`; the test fails on
//! any `ESCAPE`, and on a probe that did not print its last line (so a probe that never ran, or
//! died half way, cannot pass).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{File, Imago, make_image};

/// The checks `probe.c` makes for a private-network instance with both limits set: a probe that
/// prints fewer skipped some.
const PRIVATE_CHECKS: usize = 67;
const PIDS_LIMIT: u64 = 48;
const MEMORY_LIMIT: u64 = 32 << 20;

/// The probe, compiled once per test process with the host's gcc, static.
fn probe_binary() -> &'static [u8] {
    static BINARY: OnceLock<Vec<u8>> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/isolation/probe.c");
        let out = dir.path().join("probe");
        let status = Command::new("gcc")
            .args(["-static", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(&source)
            .status()
            .expect("gcc must be installed (with the static libc, libc6-dev)");
        assert!(status.success(), "gcc failed on {}", source.display());
        std::fs::read(&out).unwrap()
    })
}

fn probe_image(imago: &Imago) -> String {
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static must be installed at /bin/busybox");
    // The probe is setuid root: run by a uid-1000 process under no-new-privileges it must stay
    // uid 1000.
    let files: Vec<File<'_>> = [
        ("bin/busybox", &busybox[..], 0o755),
        ("probe", probe_binary(), 0o4755),
    ]
    .into_iter()
    .map(|(path, content, mode)| File {
        path,
        content,
        mode,
    })
    .collect();
    make_image(&imago.store(), "probe:test", &files);
    "probe:test".to_owned()
}

/// `imago run -q --runtime RUNTIME --network NETWORK [flags] IMAGE -- program...`: the id.
fn run_instance(imago: &Imago, runtime: &str, network: &str, rest: &[&str]) -> String {
    let mut args = vec!["run", "-q", "--runtime", runtime, "--network", network];
    args.extend_from_slice(rest);
    imago.run(&args).ok().stdout().trim().to_owned()
}

fn wait_exited(imago: &Imago, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let json = imago.run(&["inspect-instance", "--json", id]).ok().json();
        if json["status"] == "exited" {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "instance {id} never exited: {json}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A host process whose command line holds `marker`, killed when dropped.
struct HostProcess(Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn probe(runtime: &str, network: &str) {
    let imago = Imago::new();
    let image = probe_image(&imago);
    let suffix = format!("{}-{}-{}", std::process::id(), runtime, network);

    // What the probe must not reach or see: a service on the host's loopback, a host process,
    // and a process of another instance (same engine, same network mode).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let host = HostProcess(
        Command::new("/bin/busybox")
            .args(["sh", "-c", "sleep 600; true"])
            .arg(format!("host-marker-{suffix}"))
            .spawn()
            .unwrap(),
    );
    let other_marker = format!("other-marker-{suffix}");
    let other = run_instance(
        &imago,
        runtime,
        network,
        &[
            &image,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "sleep 600; true",
            &other_marker,
        ],
    );

    let (pids, memory, port) = (
        PIDS_LIMIT.to_string(),
        MEMORY_LIMIT.to_string(),
        port.to_string(),
    );
    let self_marker = format!("probe-self-{suffix}");
    let id = run_instance(
        &imago,
        runtime,
        network,
        &[
            "--pids",
            &pids,
            "--memory",
            &memory,
            &image,
            "--",
            "/probe",
            "all",
            network,
            &self_marker,
            &suffix,
            &suffix,
            &port,
            &pids,
            &memory,
        ],
    );
    let done = wait_exited(&imago, &id);
    let logs = imago.run(&["logs", &id]).ok().stdout();
    // The other instance and the host process were there all along.
    let other_state = imago
        .run(&["inspect-instance", "--json", &other])
        .ok()
        .json();
    assert_eq!(other_state["status"], "running", "{other_state}");
    drop(host);
    drop(listener);

    let escapes: Vec<&str> = logs.lines().filter(|l| l.starts_with("ESCAPE")).collect();
    let checks = logs.lines().filter(|l| l.starts_with("ok ")).count() + escapes.len();
    let last = logs
        .lines()
        .rev()
        .find(|l| l.starts_with("probe-done"))
        .unwrap_or_else(|| panic!("the probe did not finish ({done}):\n{logs}"));
    assert_eq!(last, format!("probe-done {checks}"), "{logs}");
    let expected = if network == "private" {
        PRIVATE_CHECKS
    } else {
        PRIVATE_CHECKS - 2
    };
    assert_eq!(checks, expected, "checks skipped or added:\n{logs}");
    assert!(
        escapes.is_empty(),
        "{runtime}/{network}: the instance escaped or saw what it must not:\n{}\n\nfull output:\n{logs}",
        escapes.join("\n")
    );
    assert_eq!(done["exit_code"], 0, "{done}\n{logs}");

    imago.run(&["stop", "--time", "1", &other]).ok();
    imago.run(&["rm", &id, &other]).ok();
}

#[test]
fn embedded_private_network_instance_is_confined() {
    probe("embedded", "private");
}

#[test]
fn embedded_host_network_instance_is_confined() {
    probe("embedded", "host");
}

#[test]
fn runc_private_network_instance_is_confined() {
    probe("runc", "private");
}

#[test]
fn runc_host_network_instance_is_confined() {
    probe("runc", "host");
}

/// The v1 hierarchies the outer cgroup of the next test is made in: ones an unlimited instance
/// has no resources in, so only the launcher's own position decides whether it joins them.
const OUTER_HIERARCHIES: &[&str] = &["pids", "blkio", "cpu"];

/// Cgroups of the test's, removed (after their processes are gone) when dropped.
struct OuterCgroups(Vec<PathBuf>);

impl Drop for OuterCgroups {
    fn drop(&mut self) {
        for dir in &self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn cgroup_of(pid: i64, hierarchy: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(':').and_then(|(_, rest)| rest.split_once(':')))
        .find(|(ctrls, _)| ctrls.split(',').any(|c| c == hierarchy))
        .map(|(_, path)| path.to_owned())
        .unwrap_or_else(|| panic!("no {hierarchy} line in /proc/{pid}/cgroup:\n{text}"))
}

/// `imago run` launched from a non-root cgroup inside a private cgroup namespace (imago inside
/// a container, on a cgroup v1 host): `/proc/self/cgroup` says `/` everywhere, yet the launcher
/// is not in the root cgroup, so the instance must get cgroups of its own and never stay in the
/// launcher's (where the launcher's limits and accounting would apply to it).
#[test]
fn a_launcher_in_a_private_cgroup_namespace_never_keeps_its_instance_in_its_cgroups() {
    let imago = Imago::new();
    let image = probe_image(&imago);
    let outer_name = format!("imago-test-outer-{}", std::process::id());
    let mut outer = OuterCgroups(Vec::new());
    for hierarchy in OUTER_HIERARCHIES {
        let dir = PathBuf::from("/sys/fs/cgroup")
            .join(hierarchy)
            .join(&outer_name);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (a cgroup v1 host is needed)", dir.display()));
        outer.0.push(dir);
    }
    // The launcher moves itself into the outer cgroups, says what its new cgroup namespace shows
    // it (the premise: `/`), then runs `imago run`.
    let script = r#"for h in pids blkio cpu; do echo $$ > /sys/fs/cgroup/$h/$OUTER/cgroup.procs || exit 9; done
exec unshare -C sh -c 'cat /proc/self/cgroup >&2; exec "$@"' sh "$@""#;
    let out = Command::new("/bin/sh")
        .args(["-c", script, "sh", env!("CARGO_BIN_EXE_imago"), "--home"])
        .arg(&imago.home)
        .args(["run", "-q", &image, "--", "/bin/busybox", "sleep", "600"])
        .env("OUTER", &outer_name)
        .env_remove("IMAGO_HOME")
        .current_dir(imago.dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for hierarchy in OUTER_HIERARCHIES {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&format!(":{hierarchy}:/"))
                    && l.ends_with(":/")
                    && l.split(':')
                        .nth(1)
                        .is_some_and(|c| c.split(',').any(|c| c == *hierarchy))),
            "the launcher's cgroup namespace must show it at / in {hierarchy}:\n{stderr}"
        );
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let inspected = imago.run(&["inspect-instance", "--json", &id]).ok().json();
    let pid = inspected["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{inspected}"));
    let cgroups: Vec<String> = OUTER_HIERARCHIES
        .iter()
        .map(|h| cgroup_of(pid, h))
        .collect();
    // Stopped before the verdict, so that a failure leaves no instance in the outer cgroups.
    imago.run(&["stop", "--time", "1", &id]).ok();
    imago.run(&["rm", &id]).ok();
    drop(outer);
    for (hierarchy, cgroup) in OUTER_HIERARCHIES.iter().zip(&cgroups) {
        assert_eq!(
            *cgroup,
            format!("/imago/{id}"),
            "the instance must be in its own {hierarchy} cgroup, not its launcher's (/{outer_name})"
        );
    }
}

/// A cgroup join that fails (here: a real-time process cannot join a cpu cgroup without
/// real-time runtime, EINVAL) says what failed, in which cgroup file, and the errno.
#[test]
fn a_failed_cgroup_join_names_the_step_the_file_and_the_errno() {
    let imago = Imago::new();
    let image = probe_image(&imago);
    let out = Command::new("chrt")
        .args(["-f", "1", env!("CARGO_BIN_EXE_imago"), "--home"])
        .arg(&imago.home)
        .args([
            "run",
            "-q",
            "--cpus",
            "0.5",
            &image,
            "--",
            "/bin/busybox",
            "true",
        ])
        .env_remove("IMAGO_HOME")
        .current_dir(imago.dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the launch must fail: {stderr}");
    assert_eq!(
        stderr.matches("failed to start").count(),
        1,
        "said once: {stderr}"
    );
    for want in [
        "cannot move the container's init into its cgroups",
        "/sys/fs/cgroup/cpu",
        "/tasks",
        "os error 22",
    ] {
        assert!(stderr.contains(want), "{want:?} missing from:\n{stderr}");
    }
}
