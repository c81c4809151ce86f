//! The per-instance record in `<home>/instances/<id>/`, written atomically (temp, fsync, rename).

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use imago_oci::Digest;
use serde::{Deserialize, Serialize};

use crate::volumes::MountedVolume;
use crate::{Engine, InstanceSpec, NetworkMode, RuntimeError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Prepared, the supervisor has not started the container yet.
    Created,
    Running,
    /// The container's process ended; `exit_code` says how.
    Exited,
    /// The container never started; `error` says why.
    Failed,
    /// The record says running but its supervisor is gone (killed, or the machine rebooted).
    Lost,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Exited => "exited",
            Status::Failed => "failed",
            Status::Lost => "lost",
        })
    }
}

/// What is known about one instance; the same shape for every provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub image: Digest,
    pub spec_hash: Digest,
    pub status: Status,
    pub engine: Engine,
    pub network: NetworkMode,
    /// The instance's own address (private network only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// The host's end of the veth pair (private network only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address: Option<Ipv4Addr>,
    /// TCP/UDP ports the image declares (`ExposedPorts`), e.g. `80/tcp`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Every volume mounted into the instance, including anonymous ones for the image's
    /// declared volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<MountedVolume>,
    /// The container's init process, as seen from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_pid: Option<i32>,
    /// Start time of the supervisor in clock ticks since boot (guards against pid reuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_start: Option<u64>,
    /// Exit code, or 128 + signal number when killed by a signal (137 = SIGKILL, e.g. OOM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub oom_killed: bool,
    #[serde(default)]
    pub stop_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Instance {
    pub fn new(id: String, spec: &InstanceSpec) -> Result<Instance, RuntimeError> {
        Ok(Instance {
            id,
            name: spec.name.clone(),
            image: spec.image.clone(),
            spec_hash: spec.spec_hash()?,
            status: Status::Created,
            engine: spec.engine,
            network: spec.network,
            address: None,
            host_address: None,
            ports: Vec::new(),
            volumes: Vec::new(),
            pid: None,
            supervisor_pid: None,
            supervisor_start: None,
            exit_code: None,
            oom_killed: false,
            stop_requested: false,
            error: None,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            labels: spec.labels.clone(),
        })
    }

    pub fn is_active(&self) -> bool {
        matches!(self.status, Status::Created | Status::Running)
    }

    /// Whether the launch never got to start the instance because its launcher died (a
    /// controller killed mid-launch): the supervisor waiting on the launcher's gate gave up, or
    /// no supervisor was ever started. Nothing of what the instance runs was at fault. (A
    /// launcher that gives up on its own records its reason instead, which wins.)
    pub fn launch_interrupted(&self) -> bool {
        self.started_ms.is_none()
            && match self.status {
                Status::Failed => self
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains(crate::supervisor::LAUNCHER_GAVE_UP)),
                Status::Lost => self.supervisor_pid.is_none(),
                _ => false,
            }
    }

    /// The status in a few characters, the same wherever it is shown (`ps`, the deployer's
    /// events): `exited(CODE)`, marked `,oom` when the kernel OOM-killed a process of the
    /// instance. That need not be its init: a process filling a tmpfs past the memory limit is
    /// killed while the init goes on and exits 0, and `oom_killed` must not be hidden then.
    pub fn status_text(&self) -> String {
        let oom = if self.oom_killed { ",oom" } else { "" };
        match (self.status, self.exit_code) {
            (Status::Exited, Some(code)) => format!("exited({code}{oom})"),
            (status, _) if self.oom_killed => format!("{status}(oom)"),
            (status, _) => status.to_string(),
        }
    }

    /// How the instance ended, in words, consistent with [`Instance::status_text`].
    pub fn describe_exit(&self) -> String {
        match (self.status, self.exit_code, &self.error) {
            (Status::Failed, _, Some(e)) => format!("failed to start: {e}"),
            (_, Some(137), _) if self.oom_killed => {
                "was killed for exceeding its memory limit (exit 137)".into()
            }
            (_, Some(code), _) if self.oom_killed => format!(
                "exited with status {code} after the kernel killed one of its processes for exceeding the memory limit"
            ),
            (_, None, _) if self.oom_killed => {
                "had a process killed for exceeding its memory limit".into()
            }
            (Status::Lost, _, _) => "lost its supervisor".into(),
            (_, Some(code), _) => format!("exited with status {code}"),
            _ => "exited".into(),
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Paths of one instance's directory.
#[derive(Debug, Clone)]
pub struct InstanceDir {
    pub root: PathBuf,
}

impl InstanceDir {
    pub fn new(instances: &Path, id: &str) -> InstanceDir {
        InstanceDir {
            root: instances.join(id),
        }
    }
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }
    /// `<pid> <start time>` of the process launching the instance: see
    /// `LocalProvider::remove_abandoned_dirs`.
    pub fn launcher(&self) -> PathBuf {
        self.root.join("launcher")
    }
    pub fn spec(&self) -> PathBuf {
        self.root.join("spec.json")
    }
    /// The OCI bundle directory (holds `config.json`; the root is the shared rootfs cache entry).
    pub fn bundle(&self) -> PathBuf {
        self.root.join("bundle")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("output.log")
    }
    pub fn rotated_log(&self) -> PathBuf {
        self.root.join("output.log.1")
    }
    pub fn stop_request(&self) -> PathBuf {
        self.root.join("stop-request")
    }

    pub fn read_state(&self) -> Result<Instance, RuntimeError> {
        read_json(&self.state())
    }

    pub fn write_state(&self, instance: &Instance) -> Result<(), RuntimeError> {
        write_json_atomic(&self.state(), instance)
    }

    /// Like [`InstanceDir::write_state`] but without waiting for the disk: for the launch path,
    /// where [`InstanceDir::sync`] follows once the container runs.
    pub fn write_state_unsynced(&self, instance: &Instance) -> Result<(), RuntimeError> {
        write_json_unsynced(&self.state(), instance)
    }

    /// Makes everything the launch wrote unsynced durable: the records, the bundle and the
    /// directory entries that name them.
    pub fn sync(&self) -> Result<(), RuntimeError> {
        let bundle = self.bundle();
        let parent = self.root.parent().unwrap_or(Path::new("."));
        for path in [
            self.spec(),
            self.state(),
            bundle.join("config.json"),
            bundle,
            self.root.clone(),
            parent.to_owned(),
        ] {
            match fs::File::open(&path) {
                Ok(f) => f
                    .sync_all()
                    .map_err(RuntimeError::io("cannot fsync", &path))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(RuntimeError::Io {
                        action: "cannot open",
                        path,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RuntimeError> {
    let bytes = fs::read(path).map_err(RuntimeError::io("cannot read", path))?;
    serde_json::from_slice(&bytes).map_err(|source| RuntimeError::Json {
        path: path.to_owned(),
        source,
    })
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), RuntimeError> {
    write_atomic(path, &json_bytes(path, value)?)
}

/// [`write_json_atomic`] without the fsync: readers still never see a mix, but the content may
/// not survive a crash until [`InstanceDir::sync`] ran. Only for the launch path, where each
/// fsync costs a disk round trip (and a wakeup) while the user waits: a crash at that point kills
/// the instance anyway, and the supervisor syncs right after the container started.
pub fn write_json_unsynced<T: Serialize>(path: &Path, value: &T) -> Result<(), RuntimeError> {
    replace_file(path, &json_bytes(path, value)?, false)
}

fn json_bytes<T: Serialize>(path: &Path, value: &T) -> Result<Vec<u8>, RuntimeError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| RuntimeError::Json {
        path: path.to_owned(),
        source,
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Writes `bytes` to `path` so that readers see either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    replace_file(path, bytes, true)
}

fn replace_file(path: &Path, bytes: &[u8], fsync: bool) -> Result<(), RuntimeError> {
    let tmp = temp_path(path);
    let written = write_new(&tmp, bytes, fsync).and_then(|()| fs::rename(&tmp, path));
    written.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        RuntimeError::Io {
            action: "cannot write",
            path: path.to_owned(),
            source,
        }
    })
}

/// Where [`write_atomic`] writes `path`'s next content before it renames it into place:
/// `.<name>.<pid>-<start>.<n>.tmp` beside it, naming the writer (its pid and start time), so
/// that what a writer killed in between leaves is told from a write under way
/// ([`remove_stale_temp_files`]), even once its pid is reused. `.<name>.<pid>.<n>.tmp` (as older
/// imagos named them all) when the start time cannot be read.
fn temp_path(path: &Path) -> PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let me = std::process::id();
    let writer = match own_start_time() {
        Some(start) => format!("{me}-{start}"),
        None => me.to_string(),
    };
    path.with_file_name(format!(".{name}.{writer}.{n}.tmp"))
}

/// The writer a temporary file's name names: its pid, and its start time unless an older
/// imago (or a writer that could not read it) named it by its pid alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Writer {
    pub pid: i32,
    pub start: Option<u64>,
}

impl Writer {
    /// `<pid>-<start>` or `<pid>`, as [`temp_path`] writes it.
    fn parse(text: &str) -> Option<Writer> {
        let (pid, start) = match text.split_once('-') {
            Some((pid, start)) => (pid, Some(start.parse().ok()?)),
            None => (text, None),
        };
        let pid = pid.parse::<i32>().ok().filter(|pid| *pid > 0)?;
        Some(Writer { pid, start })
    }

    /// Whether the writer is gone: by its pid and start time (a reused pid is another
    /// process), or by its pid alone when the name says no start time.
    pub fn is_dead(self) -> bool {
        match self.start {
            Some(start) => !is_alive(self.pid, start),
            None => process_start_time(self.pid).is_none(),
        }
    }
}

/// Creates `tmp` (owner only: a spec may hold secrets) with `bytes`. A file there already was
/// left by a dead writer of this pid (an older imago's name; no live writer has this name):
/// replaced.
fn write_new(tmp: &Path, bytes: &[u8], fsync: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let create = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
    };
    let mut file = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            fs::remove_file(tmp)?;
            create()?
        }
        file => file?,
    };
    file.write_all(bytes)?;
    if fsync {
        file.sync_all()?;
    }
    Ok(())
}

/// Removes the temporary files of [`write_atomic`] of `path` (and the `.<name>.<pid>` of
/// older writers) whose writer is dead: a writer killed between its write and its rename
/// leaves one. Those of live processes, this one included, may be writes under way: kept.
/// How many it removed.
pub fn remove_stale_temp_files(path: &Path) -> usize {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return 0;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    remove_temp_files_of_dead_writers(dir, |entry_name| {
        entry_name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('.').next())
            .and_then(Writer::parse)
    })
}

/// Removes every temporary file of [`write_atomic`] in `dir` (of any record there) whose
/// writer is dead: what writers killed between their write and their rename left beside the
/// records. One read of the directory, and a look at `/proc` per writer of a temporary file
/// only. How many it removed.
pub fn remove_stale_temp_files_in(dir: &Path) -> usize {
    remove_temp_files_of_dead_writers(dir, temp_file_writer)
}

/// The writer named by `name` if it is a temporary file of [`write_atomic`]
/// (`.<record>.<pid>-<start>.<n>.tmp`, or an older imago's `.<record>.<pid>.<n>.tmp`, see
/// [`temp_path`]); never a record's own name, which does not start with a dot.
pub fn temp_file_writer(name: &str) -> Option<Writer> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = rest.rsplitn(3, '.');
    let n = parts.next()?;
    let writer = parts.next()?;
    let record = parts.next()?;
    if record.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Writer::parse(writer)
}

/// Removes the entries of `dir` for which `writer` names a writer that is dead.
fn remove_temp_files_of_dead_writers(dir: &Path, writer: impl Fn(&str) -> Option<Writer>) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    // A writer killed once leaves at most one file per record it was writing: looked up once.
    let mut dead: std::collections::HashMap<Writer, bool> = std::collections::HashMap::new();
    entries
        .flatten()
        .filter(|entry| {
            let entry_name = entry.file_name();
            let Some(writer) = writer(&entry_name.to_string_lossy()) else {
                return false;
            };
            *dead.entry(writer).or_insert_with(|| writer.is_dead())
                && fs::remove_file(entry.path()).is_ok()
        })
        .count()
}

/// [`process_start_time`] of this process, read once per process (a launch names its launcher
/// twice: in the instance's directory and in its address lease). Keyed by pid, so a forked
/// child reads its own.
pub fn own_start_time() -> Option<u64> {
    static OWN: std::sync::OnceLock<(u32, Option<u64>)> = std::sync::OnceLock::new();
    let me = std::process::id();
    let read = || process_start_time(i32::try_from(me).ok()?);
    match OWN.get() {
        Some((pid, start)) if *pid == me => *start,
        Some(_) => read(),
        None => OWN.get_or_init(|| (me, read())).1,
    }
}

/// Whether `pid` is still the process that started at `start` (not gone, nor a reused pid).
pub fn is_alive(pid: i32, start: u64) -> bool {
    process_start_time(pid) == Some(start)
}

/// The start time (field 22 of `/proc/<pid>/stat`) of a live process, `None` if it is gone.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is index 19. A zombie is as good as gone.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The names in `dir`, sorted.
    fn sorted_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A real process that has exited: its pid and start time name nobody.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// A writer killed (SIGKILL) at a random point of `write_atomic` leaves the old content or
    /// the new, and at most its temporary file, named by its pid, which
    /// `remove_stale_temp_files` removes once the writer is dead; the temporary files of live
    /// writers and other files stay. The writer is this test binary again, writing in a loop
    /// to the file named by `IMAGO_TEST_WRITE_FILE`.
    #[test]
    fn a_writer_killed_at_any_point_leaves_a_whole_file_and_a_temp_file_the_sweep_removes() {
        const CHILD: &str = "IMAGO_TEST_WRITE_FILE";
        let content = |n: u8| vec![n; 1 << 20];
        if let Some(path) = std::env::var_os(CHILD) {
            let path = PathBuf::from(path);
            for n in 1.. {
                write_atomic(&path, &content(n)).unwrap();
                fs::write(path.with_extension("written"), b"").unwrap();
            }
            return;
        }
        let mut left = Vec::new();
        for round in 0..6 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("controller.json");
            write_atomic(&path, &content(0)).unwrap();
            // Those of a live writer (this process) and other files stay.
            let live = dir
                .path()
                .join(format!(".controller.json.{}.999.tmp", std::process::id()));
            let other = dir.path().join(format!(".other.json.{}.0.tmp", dead_pid()));
            fs::write(&live, b"").unwrap();
            fs::write(&other, b"").unwrap();
            // What an older imago's controller left.
            fs::write(
                dir.path().join(format!(".controller.json.{}", dead_pid())),
                b"{",
            )
            .unwrap();
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "state::tests::a_writer_killed_at_any_point_leaves_a_whole_file_and_a_temp_file_the_sweep_removes",
                    "--test-threads=1",
                ])
                .env(CHILD, &path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !path.with_extension("written").exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the writer never wrote"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            std::thread::sleep(std::time::Duration::from_micros(u64::from(
                nanos % 20_000 + round,
            )));
            child.kill().unwrap();
            child.wait().unwrap();

            let bytes = fs::read(&path).unwrap();
            assert_eq!(bytes.len(), 1 << 20, "round {round}: torn");
            assert!(bytes.iter().all(|b| *b == bytes[0]), "round {round}: mixed");
            let removed = remove_stale_temp_files(&path);
            left.push(removed);
            let names = sorted_names(dir.path());
            let mut expected = vec![
                live.file_name().unwrap().to_string_lossy().into_owned(),
                other.file_name().unwrap().to_string_lossy().into_owned(),
                "controller.json".to_owned(),
                "controller.written".to_owned(),
            ];
            expected.sort();
            assert_eq!(names, expected, "round {round}");
            assert!(removed >= 1, "round {round}: the older imago's file");
        }
        eprintln!("temporary files removed by round: {left:?}");
    }

    /// Regression: the sweep judged a temporary file's writer by its pid alone, so the file of
    /// a dead writer whose pid a live process took since stayed forever. Names carry the
    /// writer's start time now, and are judged by pid and start time; an older imago's names
    /// (the pid alone) by the pid, as before.
    #[test]
    fn temp_files_are_judged_by_their_writers_pid_and_start_time() {
        let real = |command: &str| {
            std::process::Command::new(command)
                .arg("60")
                .spawn()
                .unwrap()
        };
        let start_of = |child: &std::process::Child| {
            let pid = i32::try_from(child.id()).unwrap();
            (pid, process_start_time(pid).unwrap())
        };
        let mut live = real("sleep");
        let (live_pid, live_start) = start_of(&live);
        let mut gone = real("sleep");
        let (dead_pid, dead_start) = start_of(&gone);
        gone.kill().unwrap();
        gone.wait().unwrap();
        assert_eq!(process_start_time(dead_pid), None);
        let me = i32::try_from(std::process::id()).unwrap();
        let my_start = own_start_time().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        // This process names its own writes by its pid and start time.
        let mine = temp_path(&path);
        let mine = mine.file_name().unwrap().to_string_lossy().into_owned();
        let writer = |pid, start| Some(Writer { pid, start });
        assert_eq!(temp_file_writer(&mine), writer(me, Some(my_start)));
        assert_eq!(
            temp_file_writer(&format!(".state.json.{live_pid}.7.tmp")),
            writer(live_pid, None)
        );
        let kept = [
            mine,
            format!(".state.json.{live_pid}-{live_start}.0.tmp"),
            // An older imago's name of a live writer.
            format!(".state.json.{live_pid}.1.tmp"),
            format!(".state.json.{live_pid}"),
            "state.json".to_owned(),
            // Not a temporary file of a write by rename.
            format!(".state.json.{live_pid}-x.2.tmp"),
        ];
        let gone_by_path = [
            format!(".state.json.{dead_pid}-{dead_start}.0.tmp"),
            // The live process's pid, but another start time: a dead writer's reused pid.
            format!(".state.json.{live_pid}-{}.3.tmp", live_start + 1),
            format!(".state.json.{dead_pid}.1.tmp"),
            format!(".state.json.{dead_pid}"),
        ];
        let gone_in_dir = [
            format!(".spec.json.{live_pid}-{}.0.tmp", live_start - 1),
            format!(".config.json.{dead_pid}-{dead_start}.4.tmp"),
        ];
        for name in kept.iter().chain(&gone_by_path).chain(&gone_in_dir) {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        let left = || sorted_names(dir.path());
        assert_eq!(remove_stale_temp_files(&path), gone_by_path.len());
        let mut expected: Vec<String> = kept.iter().chain(&gone_in_dir).cloned().collect();
        expected.sort();
        assert_eq!(left(), expected);
        assert_eq!(remove_stale_temp_files_in(dir.path()), gone_in_dir.len());
        let mut expected = kept.to_vec();
        expected.sort();
        assert_eq!(left(), expected);
        // Once the live writer is gone, its files go too (but the record and the odd name).
        live.kill().unwrap();
        live.wait().unwrap();
        assert_eq!(remove_stale_temp_files(&path), 3);
        assert_eq!(left().len(), 3, "{:?}", left());
    }

    #[test]
    fn only_a_launch_cut_short_by_its_launcher_counts_as_interrupted() {
        let spec = crate::InstanceSpec::new(imago_oci::Digest::of(b"image"));
        let record = |status: Status, error: Option<String>, started: bool| {
            let mut i = Instance::new("i".into(), &spec).unwrap();
            i.status = status;
            i.error = error;
            i.started_ms = started.then_some(1);
            i
        };
        let gave_up = Some(format!(
            "instance i: supervisor: {} before the network was created",
            crate::supervisor::LAUNCHER_GAVE_UP
        ));
        assert!(record(Status::Failed, gave_up.clone(), false).launch_interrupted());
        // No supervisor ever ran: its launcher died before starting one.
        assert!(record(Status::Lost, None, false).launch_interrupted());
        // The release's own failures.
        assert!(
            !record(Status::Failed, Some("exec: no such file".into()), false).launch_interrupted()
        );
        assert!(!record(Status::Exited, None, true).launch_interrupted());
        assert!(!record(Status::Lost, None, true).launch_interrupted());
        assert!(!record(Status::Running, None, true).launch_interrupted());
        let mut supervised = record(Status::Lost, None, false);
        supervised.supervisor_pid = Some(1);
        assert!(
            !supervised.launch_interrupted(),
            "its supervisor died, not its launcher"
        );
    }
}
