//! The shared harness for CLI tests: runs the built `imago` binary against a temporary home,
//! and builds small but real OCI images into a store for fixtures.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod registry;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use imago_layer::compression::{Compression, Compressor};
use imago_oci::{Digest, HashingWriter, Reference, media};
use imago_store::Store;

pub struct Imago {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
}

/// The result of one `imago` run.
pub struct Run {
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.output.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not json ({e}): {}\nstderr: {}",
                self.stdout(),
                self.stderr()
            )
        })
    }
    /// Asserts success and returns self.
    pub fn ok(self) -> Run {
        assert!(
            self.output.status.success(),
            "imago failed\nstdout: {}\nstderr: {}",
            self.stdout(),
            self.stderr()
        );
        self
    }
    /// Asserts failure and returns stderr.
    pub fn fails(self) -> String {
        assert!(
            !self.output.status.success(),
            "imago unexpectedly succeeded\nstdout: {}",
            self.stdout()
        );
        self.stderr()
    }
}

impl Imago {
    pub fn new() -> Imago {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        Imago { dir, home }
    }

    /// A home on tmpfs (/dev/shm, where there is one), whose fsyncs cost nothing: for tests
    /// that write hundreds of store entries and promise nothing about durability.
    pub fn in_memory() -> Imago {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return Imago::new();
        }
        let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
        let home = dir.path().join("home");
        Imago { dir, home }
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imago"));
        cmd.arg("--home")
            .arg(&self.home)
            .current_dir(self.dir.path());
        cmd.env_remove("IMAGO_HOME");
        // Every controller a test starts (`apply` starts one) gets its API on a free port, not
        // the default 7878 that every other test's controller would want too.
        cmd.env("IMAGO_API", "127.0.0.1:0");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run {
            output: self.cmd().args(args).output().expect("run imago"),
        }
    }

    /// The ids of the instances `ps` lists, sorted.
    pub fn instance_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .run(&["ps", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    }

    pub fn store(&self) -> Store {
        Store::open(&self.home.join("store")).expect("open store")
    }

    /// `imago history --json SERVICE`: the service's releases, oldest first.
    pub fn history(&self, service: &str) -> Vec<serde_json::Value> {
        self.run(&["history", "--json", service])
            .ok()
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `imago events SERVICE`, as text.
    pub fn events(&self, service: &str) -> String {
        self.run(&["events", service]).ok().stdout()
    }

    /// Waits until `ok`, failing after `timeout` with what [`Imago::diagnostics`] says (every
    /// event, not only one service's: a controller that stopped records `controller-exited`
    /// for no service).
    pub fn wait_for(&self, what: &str, timeout: std::time::Duration, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + timeout;
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} did not happen within {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// For a failure message: every event of the home, and the last lines of the controller's
    /// and the data plane's logs.
    pub fn diagnostics(&self) -> String {
        let events = self.run(&["events"]);
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.home.join("deploy").join(name))
                .unwrap_or_else(|e| format!("(cannot read: {e})"));
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "events:\n{}{}\ncontroller.log (last 40 lines):\n{}\ndataplane.log (last 40 lines):\n{}",
            events.stdout(),
            events.stderr(),
            tail("controller.log"),
            tail("dataplane.log")
        )
    }

    /// The pid of the running controller, asserting that one runs (`status` says so, and the
    /// process `deploy/controller.json` names is alive): `imago serve` returning is not proof of
    /// that, a controller whose set-up fails ends right after it.
    pub fn assert_controller_running(&self) -> u32 {
        let status = self.run(&["status", "--json"]).ok().json();
        assert_eq!(
            status["controller_running"],
            true,
            "no controller runs\n{}",
            self.diagnostics()
        );
        let info: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.home.join("deploy/controller.json")).unwrap(),
        )
        .unwrap();
        let pid = info["pid"].as_u64().unwrap();
        assert!(
            process_runs(&pid.to_string()),
            "controller {pid} of controller.json is not running\n{}",
            self.diagnostics()
        );
        pid as u32
    }

    /// SIGKILL to the running controller (its pid from `deploy/controller.json`); returns
    /// once it is dead (gone or a zombie: its locks are released), so that the next command
    /// does not meet a controller that is still exiting.
    pub fn kill_controller(&self) {
        let info: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.home.join("deploy/controller.json")).unwrap(),
        )
        .unwrap();
        let pid = info["pid"].as_u64().unwrap().to_string();
        assert!(
            Command::new("kill")
                .args(["-KILL", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if !process_runs(&pid) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "controller {pid} still alive 10 s after SIGKILL"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Whether process `pid` exists and is no zombie.
pub fn process_runs(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state is the field after the command name in parentheses.
    let state = stat
        .rsplit(") ")
        .next()
        .and_then(|rest| rest.chars().next());
    !stat.is_empty() && state != Some('Z')
}

/// One file of a fixture layer.
pub struct File<'a> {
    pub path: &'a str,
    pub content: &'a [u8],
    pub mode: u32,
}

pub fn file<'a>(path: &'a str, content: &'a [u8]) -> File<'a> {
    File {
        path,
        content,
        mode: 0o644,
    }
}

/// Writes a layer (gzip) of `files` into the store; returns (blob digest, size, diff_id).
pub fn put_layer(
    store: &Store,
    files: &[File<'_>],
    compression: Compression,
) -> (Digest, u64, Digest) {
    let mut blob = store.blob_writer().expect("blob writer");
    let diff_id = {
        let compressor = Compressor::new(compression, &mut blob).expect("compressor");
        let mut tar_hash = HashingWriter::new(compressor);
        {
            let mut builder = tar::Builder::new(&mut tar_hash);
            for f in files {
                let mut header = tar::Header::new_gnu();
                header.set_size(f.content.len() as u64);
                header.set_mode(f.mode);
                header.set_mtime(0);
                header.set_uid(0);
                header.set_gid(0);
                header.set_entry_type(tar::EntryType::Regular);
                builder
                    .append_data(&mut header, f.path, f.content)
                    .expect("append");
            }
            builder.finish().expect("finish tar");
        }
        let (diff_id, _, compressor) = tar_hash.finish();
        compressor.finish().expect("finish compression");
        diff_id
    };
    let (digest, size) = blob.commit().expect("commit");
    (digest, size, diff_id)
}

/// Builds a one-layer image of `files` and names it `name`; returns the manifest digest.
pub fn make_image(store: &Store, name: &str, files: &[File<'_>]) -> Digest {
    make_image_with(store, name, files, Compression::Gzip, &[])
}

pub fn make_image_with(
    store: &Store,
    name: &str,
    files: &[File<'_>],
    compression: Compression,
    labels: &[(&str, &str)],
) -> Digest {
    make_layered_image(store, name, &[files], compression, labels)
}

/// Builds an image with one layer per element of `layers`, applied in order.
pub fn make_layered_image(
    store: &Store,
    name: &str,
    layers: &[&[File<'_>]],
    compression: Compression,
    labels: &[(&str, &str)],
) -> Digest {
    let written: Vec<_> = layers
        .iter()
        .map(|files| put_layer(store, files, compression))
        .collect();
    let labels: HashMap<&str, &str> = labels.iter().copied().collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"], "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": written.iter().map(|w| w.2.to_string()).collect::<Vec<_>>()},
    });
    let (config_digest, config_size, _) = store.put_json(&config).expect("config");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest.to_string(), "size": config_size},
        "layers": written.iter().map(|(digest, size, _)| serde_json::json!(
            {"mediaType": compression.layer_media_type(), "digest": digest.to_string(), "size": size}
        )).collect::<Vec<_>>(),
    });
    let (digest, _, _) = store.put_json(&manifest).expect("manifest");
    store
        .tag(&name.parse::<Reference>().expect("reference"), &digest)
        .expect("tag");
    digest
}

/// Every file below `root` (relative path → content hash), for "nothing else changed" checks.
pub fn snapshot(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path.strip_prefix(root).expect("prefix").to_path_buf();
            if meta.is_dir() {
                out.push((rel, "dir".into()));
                walk(root, &path, out);
            } else if meta.file_type().is_symlink() {
                out.push((
                    rel,
                    format!(
                        "link:{}",
                        std::fs::read_link(&path).expect("link").display()
                    ),
                ));
            } else {
                out.push((
                    rel,
                    Digest::of(&std::fs::read(&path).expect("read")).to_string(),
                ));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

pub fn write_file(path: &Path, content: &[u8]) {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(content))
        .expect("write file");
}

/// A TCP port on 127.0.0.1 reserved for one test. A lock file per port (`flock`, released when
/// the lease is dropped or its process dies) keeps every concurrently running test, of any test
/// binary or checkout on this host, off the same port; a bind check skips ports something else
/// already holds. Ports come from 20000-29999, below the kernel's ephemeral range, so outgoing
/// connections never take them either.
pub struct PortLease {
    pub port: u16,
    _lock: std::fs::File,
}

pub fn lease_port() -> PortLease {
    let dir = std::env::temp_dir().join("imago-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    // Start at a different place in every process, so concurrent binaries rarely contend.
    let seed = (std::process::id() as u64).wrapping_mul(7919) % 10_000;
    for offset in 0..10_000u64 {
        let port = 20_000 + ((seed + offset) % 10_000) as u16;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return PortLease { port, _lock: lock };
        }
    }
    panic!("no free test port in 20000-29999");
}

/// Waits at least `min`, and until each of `counters` (a client's answers) has grown by `more`
/// since the call: that the clients asked during a phase of a test at any speed of the host,
/// where a fixed sleep only made it likely (a loaded host may not run a client for hundreds of
/// ms, and a curl process is slow to start there). With `more` = 2 after a rollout completed,
/// each client's last answer is from a request it sent after that. Fails after 120 s.
pub fn answered_again(
    counters: &[&std::sync::atomic::AtomicUsize],
    min: std::time::Duration,
    more: usize,
) {
    let started = std::time::Instant::now();
    let marks: Vec<usize> = counters
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    loop {
        let behind = counters
            .iter()
            .zip(&marks)
            .filter(|(c, mark)| c.load(std::sync::atomic::Ordering::Relaxed) < *mark + more)
            .count();
        if behind == 0 && started.elapsed() >= min {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "{behind} of {} clients had fewer than {more} answers in 120 s",
            counters.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Asserts that a client under load was answered 200 to every request (the first five other
/// answers are named) and kept asking (more than ten requests).
pub fn assert_all_answered(answers: &[Result<(u16, String), String>]) {
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok((200, _))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        answers.len() > 10,
        "the client kept asking ({})",
        answers.len()
    );
}

/// Every cgroup directory instance `id` may have: `imago/<id>` in each v1 hierarchy under
/// `/sys/fs/cgroup` and in the v2 tree.
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join("imago").join(id))
                .collect()
        })
        .unwrap_or_default();
    dirs.push(Path::new("/sys/fs/cgroup/imago").join(id));
    dirs
}

/// What is left on the host of instances `ids` of the home `home`: their directory, network
/// namespace, address lease, host veth (`iv-<id>`, cut to the kernel's 15 characters) or cgroup.
pub fn leftovers<'a>(home: &Path, ids: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let leases: Vec<String> = std::fs::read_dir("/run/imago/ipam")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| t.lines().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let links: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut left = Vec::new();
    for id in ids {
        if home.join("instances").join(id).exists() {
            left.push(format!("directory of {id}"));
        }
        if Path::new(&format!("/var/run/netns/imago-{id}")).exists() {
            left.push(format!("network namespace of {id}"));
        }
        if leases.contains(id) {
            left.push(format!("address lease of {id}"));
        }
        for link in &links {
            if link
                .strip_prefix("iv-")
                .is_some_and(|rest| !rest.is_empty() && id.starts_with(rest))
            {
                left.push(format!("veth {link} of {id}"));
            }
        }
        for dir in cgroup_dirs(id) {
            if dir.exists() {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
    }
    left
}

/// Runs `cmd` and returns what it did with the CPU time (user + system) that it and every
/// process it waited for spent, as a shell that runs it counts it (`times`, its children's
/// line). For budgets that a loaded host must not break: CI runs every test binary side by side
/// on 2 cores, which stretches any command's wall time but not the CPU it needs.
pub fn run_with_cpu_time(cmd: &mut Command) -> (Run, std::time::Duration) {
    let times = tempfile::NamedTempFile::new().unwrap();
    let mut sh = Command::new("sh");
    sh.args([
        "-c",
        "f=$1; shift; \"$@\"; s=$?; times >\"$f\"; exit $s",
        "sh",
    ])
    .arg(times.path())
    .arg(cmd.get_program())
    .args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        sh.current_dir(dir);
    }
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => sh.env(key, value),
            None => sh.env_remove(key),
        };
    }
    let run = Run {
        output: sh.output().expect("run sh"),
    };
    let text = std::fs::read_to_string(times.path()).unwrap();
    // "0m0.010000s 0m0.000000s" for the shell, then the same for its children.
    let children = text
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("times: {text:?}"));
    let cpu = children
        .split_whitespace()
        .map(|t| {
            let (minutes, seconds) = t.trim_end_matches('s').split_once('m').unwrap();
            std::time::Duration::from_secs(minutes.parse::<u64>().unwrap() * 60)
                + std::time::Duration::from_secs_f64(seconds.parse::<f64>().unwrap())
        })
        .sum();
    (run, cpu)
}
