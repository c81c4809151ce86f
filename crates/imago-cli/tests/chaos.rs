//! Chaos: the controller killed with SIGKILL at random moments (several times per rollout,
//! during its own start-up and during destroy) while 16 clients use the service's endpoint
//! through a sequence of rolling, blue-green and canary (rolling, paused after its first new
//! instance) updates, a release that fails its health check and is rolled back automatically,
//! and a manual rollback. What is checked is what the user is promised, not how:
//! - no request fails (GET and POST, new connections and keep-alive);
//! - every answer comes from a release that was current or retiring when it was asked (never from
//!   the failing release, whose instances never become ready);
//! - the real instances (processes in their cgroups, not the controller's view) never number more
//!   than `replicas + max_surge` (twice `replicas` for blue-green), and never fewer ready ones
//!   (answering their health path) than `replicas - max_unavailable`;
//! - the end state is the last desired release with exactly `replicas` ready instances;
//! - after destroy nothing is left: processes, instance directories, address leases, veths,
//!   network namespaces, cgroups.
//!
//! The randomness is seeded (`CHAOS_SEED=N` replays the same choices; the timing of a loaded
//! machine still varies) and the seed is printed first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Imago;

const REPLICAS: usize = 3;
/// A good release's progress deadline: generous, so that a loaded machine fails none.
const GOOD_DEADLINE: &str = "90s";

/// xorshift64: small, seeded, enough for choosing delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// What one release of the service is made of.
#[derive(Clone)]
struct Version {
    /// What its pages and its POST handler answer: `version NAME`.
    name: &'static str,
    strategy: &'static str,
    /// Whether its image has the health path (a release without it never becomes ready).
    healthy: bool,
    progress_deadline: &'static str,
}

/// The service's definition directory and its endpoint port.
struct Service {
    imago: Imago,
    dir: PathBuf,
    port: u16,
    _lease: common::PortLease,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.imago.cmd().args(["destroy", "web"]).output();
        let _ = self.imago.cmd().args(["serve", "--stop"]).output();
    }
}

impl Service {
    fn new() -> Service {
        let imago = Imago::new();
        let dir = imago.dir.path().join("web");
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::create_dir_all(dir.join("cgi-bin")).unwrap();
        let lease = common::lease_port();
        Service {
            imago,
            dir,
            port: lease.port,
            _lease: lease,
        }
    }

    fn file(&self) -> String {
        self.dir.join("imago.toml").display().to_string()
    }

    /// Writes the definition and the site of `v`.
    fn write(&self, v: &Version) {
        let name = v.name;
        std::fs::write(
            self.dir.join("www/index.html"),
            format!("<h1>version {name}</h1>\n"),
        )
        .unwrap();
        let health = self.dir.join("www/health");
        if v.healthy {
            std::fs::write(&health, "ok\n").unwrap();
        } else {
            let _ = std::fs::remove_file(&health);
        }
        // busybox httpd runs it for a POST: it answers with the release and the request body.
        std::fs::write(
            self.dir.join("cgi-bin/post"),
            format!(
                "#!/bin/sh\necho 'Content-Type: text/plain'\necho\nread -r body\necho \"version {name} $body\"\n"
            ),
        )
        .unwrap();
        let port = self.port;
        let strategy = v.strategy;
        let deadline = v.progress_deadline;
        let toml = format!(
            r#"[image.web]

[[image.web.layer]]
name = "busybox"
copy = [
  {{ src = "/bin/busybox", dest = "/bin/busybox", mode = "0755", outside_context = true }},
]
symlink = [{{ path = "/bin/sh", target = "busybox" }}]
dir = [{{ path = "/tmp", mode = "1777" }}]
file = [
  {{ path = "/etc/passwd", content = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n" }},
  {{ path = "/etc/group", content = "root:x:0:\nnogroup:x:65534:\n" }},
]

[[image.web.layer]]
name = "site"
copy = [
  {{ src = "www", dest = "/www/", mode = "0644", dir_mode = "0755" }},
  {{ src = "cgi-bin", dest = "/www/cgi-bin/", mode = "0755", dir_mode = "0755" }},
]

[image.web.config]
entrypoint = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
user = "65534:65534"
workdir = "/www"
ports = ["8080/tcp"]
stop_signal = "SIGTERM"

[service.web]
image = "web"
replicas = {REPLICAS}
port = {port}
target_port = 8080
stop_grace_period = "1s"
env = {{ VERSION = "{name}" }}

[service.web.health]
type = "http"
path = "/health"
interval = "200ms"
timeout = "1s"
healthy_threshold = 1
unhealthy_threshold = 3

[service.web.rollout]
strategy = "{strategy}"
max_surge = 1
max_unavailable = 0
min_ready = "500ms"
progress_deadline = "{deadline}"
drain = "1s"
"#
        );
        std::fs::write(self.dir.join("imago.toml"), toml).unwrap();
    }

    fn status(&self) -> serde_json::Value {
        self.imago.run(&["status", "--json", "web"]).ok().json()
    }
}

/// The allowed answers over time: from `at_ms` on, the releases (by name) that are current or
/// retiring.
#[derive(Default)]
struct Timeline(Mutex<Vec<(u64, BTreeSet<&'static str>)>>);

impl Timeline {
    fn set(&self, names: &[&'static str]) {
        eprintln!("from {}: answers from {names:?}", now_ms());
        self.0
            .lock()
            .unwrap()
            .push((now_ms(), names.iter().copied().collect()));
    }

    /// The releases allowed at some moment of [from, to].
    fn allowed(&self, from: u64, to: u64) -> BTreeSet<&'static str> {
        let phases = self.0.lock().unwrap();
        let mut allowed = BTreeSet::new();
        for (i, (start, names)) in phases.iter().enumerate() {
            let end = phases.get(i + 1).map_or(u64::MAX, |p| p.0);
            if *start <= to && end >= from {
                allowed.extend(names.iter().copied());
            }
        }
        allowed
    }
}

/// One request: when it was sent and answered (ms), what it was, and the release that answered.
struct Answer {
    from: u64,
    to: u64,
    what: &'static str,
    result: Result<String, String>,
}

/// Reads one HTTP response from `reader`: (status, keeps the connection open, body).
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<(u16, bool, String), String> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read status: {e}"))?;
    if line.is_empty() {
        return Err("connection closed before an answer".into());
    }
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length = None;
    let mut close = line.starts_with("HTTP/1.0");
    loop {
        let mut header = String::new();
        reader
            .read_line(&mut header)
            .map_err(|e| format!("read header: {e}"))?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            reader
                .read_exact(&mut body)
                .map_err(|e| format!("read body: {e}"))?;
        }
        None => {
            close = true;
            reader
                .read_to_end(&mut body)
                .map_err(|e| format!("read body: {e}"))?;
        }
    }
    Ok((code, !close, String::from_utf8_lossy(&body).into_owned()))
}

/// A client of the endpoint: `post` sends POSTs to the CGI handler (each with its own body,
/// which must come back), else GETs; `keep_alive` asks HTTP/1.1 with keep-alive and reuses the
/// connection as long as the server keeps it (busybox httpd closes after every answer, so in
/// practice it reconnects), else one HTTP/1.0 connection per request.
fn client(
    port: u16,
    post: bool,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Answer>> {
    std::thread::spawn(move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut answers = Vec::new();
        let mut conn: Option<BufReader<TcpStream>> = None;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let from = now_ms();
            let body = format!("request-{n}");
            let result = (|| -> Result<String, String> {
                if conn.is_none() {
                    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .map_err(|e| format!("connect: {e}"))?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(|e| e.to_string())?;
                    conn = Some(BufReader::new(stream));
                }
                let reader = conn.as_mut().unwrap();
                let version = if keep_alive { "1.1" } else { "1.0" };
                let connection = if keep_alive { "keep-alive" } else { "close" };
                let request = if post {
                    format!(
                        "POST /cgi-bin/post HTTP/{version}\r\nHost: test\r\nConnection: {connection}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}\n",
                        body.len() + 1
                    )
                } else {
                    format!(
                        "GET / HTTP/{version}\r\nHost: test\r\nConnection: {connection}\r\n\r\n"
                    )
                };
                reader
                    .get_mut()
                    .write_all(request.as_bytes())
                    .map_err(|e| format!("send: {e}"))?;
                let (code, open, text) = read_response(reader)?;
                if !open || !keep_alive {
                    conn = None;
                }
                if code != 200 {
                    return Err(format!("status {code}: {text:?}"));
                }
                let release = text
                    .split("version ")
                    .nth(1)
                    .and_then(|t| t.split(['<', ' ', '\n']).next())
                    .ok_or_else(|| format!("no version in {text:?}"))?
                    .to_owned();
                if post && !text.contains(&body) {
                    return Err(format!("POST body {body:?} not echoed: {text:?}"));
                }
                Ok(release)
            })();
            if result.is_err() {
                conn = None;
            }
            answers.push(Answer {
                from,
                to: now_ms(),
                what: match (post, keep_alive) {
                    (false, false) => "GET",
                    (false, true) => "GET keep-alive",
                    (true, false) => "POST",
                    (true, true) => "POST keep-alive",
                },
                result,
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        answers
    })
}

/// Whether a process of instance `id` runs (its cgroup holds one).
fn instance_runs(id: &str) -> bool {
    common::cgroup_dirs(id).iter().any(|dir| {
        std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
    })
}

/// The names of the home's instance directories.
fn instance_dirs(home: &Path) -> BTreeSet<String> {
    std::fs::read_dir(home.join("instances"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// The address of instance `id`, from its record.
fn instance_address(home: &Path, id: &str) -> Option<String> {
    let text = std::fs::read(home.join("instances").join(id).join("state.json")).ok()?;
    let state: serde_json::Value = serde_json::from_slice(&text).ok()?;
    state["address"].as_str().map(str::to_owned)
}

/// GET `path` of an instance's own address (port 8080): (status, body), or None.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let addr = format!("{addr}:8080").parse::<SocketAddr>().ok()?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut reader = BufReader::new(stream);
    let request = format!("GET {path} HTTP/1.0\r\nHost: probe\r\n\r\n");
    reader.get_mut().write_all(request.as_bytes()).ok()?;
    let (code, _, body) = read_response(&mut reader).ok()?;
    Some((code, body))
}

/// Whether instance address `addr` answers its health path.
fn answers_health(addr: &str) -> bool {
    get(addr, "/health").is_some_and(|(code, _)| code == 200)
}

/// One sample of the real instances: those running, and those running that answer their
/// health path.
struct Sample {
    at: u64,
    running: BTreeSet<String>,
    ready: BTreeSet<String>,
}

fn sample(home: &Path, ever: &mut BTreeSet<String>) -> Sample {
    let at = now_ms();
    let dirs = instance_dirs(home);
    ever.extend(dirs.iter().cloned());
    let before: BTreeSet<String> = dirs.into_iter().filter(|id| instance_runs(id)).collect();
    let probes: Vec<_> = before
        .iter()
        .map(|id| {
            let id = id.clone();
            let addr = instance_address(home, &id);
            std::thread::spawn(move || (id, addr.is_some_and(|a| answers_health(&a))))
        })
        .collect();
    let answered: BTreeSet<String> = probes
        .into_iter()
        .filter_map(|p| p.join().ok())
        .filter(|(_, ok)| *ok)
        .map(|(id, _)| id)
        .collect();
    // Ready: answered, and still running once every probe is back.
    let ready = answered
        .into_iter()
        .filter(|id| instance_runs(id))
        .collect();
    Sample {
        at,
        running: before,
        ready,
    }
}

/// The capacity bounds over time: from `at_ms` on, (fewest ready, most running).
#[derive(Default)]
struct Bounds(Mutex<Vec<(u64, usize, usize)>>);

impl Bounds {
    fn set(&self, low: usize, high: usize) {
        self.0.lock().unwrap().push((now_ms(), low, high));
    }
    /// The loosest bounds in force at some moment of the `window` ms up to `at` (retired
    /// instances of the previous phase may still be stopping); None before the first.
    fn at(&self, at: u64, window: u64) -> Option<(usize, usize)> {
        let phases = self.0.lock().unwrap();
        let mut found: Option<(usize, usize)> = None;
        for (i, (from, low, high)) in phases.iter().enumerate() {
            let end = phases.get(i + 1).map_or(u64::MAX, |p| p.0);
            if *from <= at && end >= at.saturating_sub(window) {
                found = Some(found.map_or((*low, *high), |(l, h)| (l.min(*low), h.max(*high))));
            }
        }
        found
    }
}

/// Processes whose command line names `home` (controller, data plane, supervisors).
fn home_processes(home: &Path) -> Vec<String> {
    let home = home.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(&home) && common::process_runs(&pid))
                .then(|| format!("{pid}: {cmdline}"))
        })
        .collect()
}

/// The killer: while armed, kill -9 of the controller after a random delay (a quarter of them
/// within 300 ms, often during the restarted controller's start-up, the others 1-4 s), then a
/// restart after another random delay. Commands of the test take `lock` so that they meet a running
/// controller; destroy does not.
struct Killer {
    armed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    kills: Arc<AtomicUsize>,
    failure: Arc<Mutex<Option<String>>>,
    lock: Arc<Mutex<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Killer {
    fn start(home: PathBuf, seed: u64) -> Killer {
        let armed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let kills = Arc::new(AtomicUsize::new(0));
        let failure = Arc::new(Mutex::new(None));
        let lock = Arc::new(Mutex::new(()));
        let (a, s, k, f, l) = (
            armed.clone(),
            stop.clone(),
            kills.clone(),
            failure.clone(),
            lock.clone(),
        );
        let handle = std::thread::spawn(move || {
            let imago = Imago {
                dir: tempfile::tempdir().unwrap(),
                home,
            };
            let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1);
            while !s.load(Ordering::Relaxed) {
                // Mostly 1-4 s: a controller killed faster than it can launch an instance
                // of a loaded machine makes no progress at all (its launches die with it).
                let delay = if rng.below(4) == 0 {
                    rng.below(300)
                } else {
                    1000 + rng.below(3000)
                };
                std::thread::sleep(Duration::from_millis(delay));
                if !a.load(Ordering::Relaxed) {
                    continue;
                }
                let _guard = l.lock().unwrap();
                let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    kill_and_restart(&imago, &mut rng)
                }));
                match round {
                    Ok(n) => {
                        k.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let what = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        *f.lock().unwrap() = Some(what);
                        return;
                    }
                }
            }
        });
        Killer {
            armed,
            stop,
            kills,
            failure,
            lock,
            handle: Some(handle),
        }
    }

    /// A kill and restart now, from the test's thread; returns once a controller runs again.
    fn kill_now(&self, imago: &Imago, rng: &mut Rng) {
        let _guard = self.lock.lock().unwrap();
        let n = kill_and_restart(imago, rng);
        self.kills.fetch_add(n, Ordering::Relaxed);
    }

    fn arm(&self, on: bool) {
        self.armed.store(on, Ordering::Relaxed);
    }

    fn kills(&self) -> usize {
        self.kills.load(Ordering::Relaxed)
    }

    fn check(&self) {
        if let Some(f) = self.failure.lock().unwrap().as_ref() {
            panic!("a kill and restart of the controller failed: {f}");
        }
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.check();
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Kill -9 of the running controller, then, after a random pause, a new one; a third of the
/// time that one is killed too during its start-up (a random moment before its set-up is done or
/// soon after) and another is started. Returns the number of kills.
fn kill_and_restart(imago: &Imago, rng: &mut Rng) -> usize {
    imago.kill_controller();
    std::thread::sleep(Duration::from_millis(rng.below(400)));
    let mut kills = 1;
    if rng.below(3) == 0 {
        let mut starting = imago
            .cmd()
            .arg("serve")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(rng.below(300));
        let give_up = Instant::now() + Duration::from_secs(30);
        let mut killed = false;
        while !killed && Instant::now() < give_up {
            let controllers: Vec<u32> = home_processes(&imago.home)
                .iter()
                .filter(|p| p.contains(" serve --foreground"))
                .filter_map(|p| p.split(':').next()?.parse().ok())
                .collect();
            if !controllers.is_empty() && Instant::now() >= deadline {
                for pid in &controllers {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                killed = true;
            }
            if !killed && controllers.is_empty() && starting.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The `serve` that started it says it did not start, or that it did: either is true.
        let _ = starting.wait();
        kills += usize::from(killed);
    }
    imago.run(&["serve"]).ok();
    kills
}

/// The service's desired release number and the outcome of its rollout.
fn desired(s: &Service) -> (u64, String, Option<u64>) {
    let status = s.status();
    let svc = &status["services"][0];
    (
        svc["desired"]["number"].as_u64().unwrap_or(0),
        svc["outcome"]["outcome"].as_str().unwrap_or("").to_owned(),
        svc["desired"]["rollback_of"].as_u64(),
    )
}

#[test]
fn kill_9_of_the_controller_at_random_moments_of_every_kind_of_rollout_breaks_no_promise() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(now_ms);
    eprintln!("chaos seed {seed} (CHAOS_SEED={seed} to replay its choices)");
    let mut rng = Rng(seed | 1);
    let s = Service::new();
    let home = s.imago.home.clone();
    let timeline = Arc::new(Timeline::default());
    let bounds = Arc::new(Bounds::default());
    let mut killer = Killer::start(home.clone(), seed);

    // Start-up: the first release rolled out while the controller is killed, also while it
    // starts.
    let v1 = Version {
        name: "v1",
        strategy: "rolling",
        healthy: true,
        progress_deadline: GOOD_DEADLINE,
    };
    timeline.set(&["v1"]);
    s.write(&v1);
    bounds.set(0, REPLICAS + 1);
    {
        let _g = killer.lock.lock().unwrap();
        s.imago.run(&["apply", "--no-wait", "-f", &s.file()]).ok();
    }
    std::thread::sleep(Duration::from_millis(rng.below(1000)));
    killer.kill_now(&s.imago, &mut rng);
    killer.arm(true);
    let wait_complete = |what: &str, number: Option<u64>, killer: &Killer| {
        s.imago.wait_for(what, Duration::from_secs(150), || {
            killer.check();
            let _g = killer.lock.lock().unwrap();
            let (n, outcome, _) = desired(&s);
            outcome == "complete" && number.is_none_or(|want| n == want)
        });
    };
    wait_complete("release 1 to complete", Some(1), &killer);
    eprintln!("v1 complete, {} kills so far", killer.kills());

    // The sampler: real instances, every ~50 ms.
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (home, stop) = (home.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut ever = BTreeSet::new();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push(sample(&home, &mut ever));
                std::thread::sleep(Duration::from_millis(50));
            }
            (samples, ever)
        })
    };

    let stop_clients = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|i| client(s.port, i % 4 >= 2, i % 2 == 1, stop_clients.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // Rolling, blue-green, canary.
    let mut current = "v1";
    let mut number = 1;
    let mut numbers = BTreeMap::new();
    numbers.insert("v1", 1);
    for v in [
        Version {
            name: "v2",
            strategy: "rolling",
            healthy: true,
            progress_deadline: GOOD_DEADLINE,
        },
        Version {
            name: "v3",
            strategy: "blue-green",
            healthy: true,
            progress_deadline: GOOD_DEADLINE,
        },
        Version {
            name: "v4",
            strategy: "rolling",
            healthy: true,
            progress_deadline: GOOD_DEADLINE,
        },
    ] {
        let canary = v.name == "v4";
        timeline.set(&[current, v.name]);
        let high = if v.strategy == "blue-green" {
            2 * REPLICAS
        } else {
            REPLICAS + 1
        };
        bounds.set(REPLICAS, high);
        s.write(&v);
        number += 1;
        {
            let _g = killer.lock.lock().unwrap();
            s.imago.run(&["apply", "--no-wait", "-f", &s.file()]).ok();
        }
        // At least one kill in every rollout, early in it.
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        killer.kill_now(&s.imago, &mut rng);
        if canary {
            // The canary: paused once its first new instance serves, held, then resumed.
            s.imago
                .wait_for("the canary to serve", Duration::from_secs(120), || {
                    killer.check();
                    instance_dirs(&home).iter().any(|id| {
                        instance_address(&home, id)
                            .and_then(|a| get(&a, "/"))
                            .is_some_and(|(code, body)| code == 200 && body.contains("version v4"))
                    })
                });
            let (_, paused_at, _) = {
                let _g = killer.lock.lock().unwrap();
                s.imago.run(&["pause", "web"]).ok();
                desired(&s)
            };
            std::thread::sleep(Duration::from_millis(1500 + rng.below(1500)));
            let (n, outcome, _) = {
                let _g = killer.lock.lock().unwrap();
                desired(&s)
            };
            assert!(
                n == number && (paused_at == "complete" || outcome != "complete"),
                "a paused canary went on: release {n} {paused_at} then {outcome} (seed {seed})"
            );
            {
                let _g = killer.lock.lock().unwrap();
                s.imago.run(&["resume", "web"]).ok();
            }
        }
        wait_complete(
            &format!("release {number} ({})", v.name),
            Some(number),
            &killer,
        );
        numbers.insert(v.name, number);
        current = v.name;
        eprintln!("{} complete, {} kills so far", v.name, killer.kills());
    }

    // A release that never becomes ready: rolled back automatically to v4's.
    let bad = Version {
        name: "bad",
        strategy: "rolling",
        healthy: false,
        progress_deadline: "20s",
    };
    timeline.set(&["v4"]);
    // A rollback, automatic or manual, is a fast path: one wave of `replicas` new instances
    // (surge = replicas) beside the old ones.
    bounds.set(REPLICAS, 2 * REPLICAS);
    s.write(&bad);
    number += 1;
    {
        let _g = killer.lock.lock().unwrap();
        s.imago.run(&["apply", "--no-wait", "-f", &s.file()]).ok();
    }
    std::thread::sleep(Duration::from_millis(rng.below(1500)));
    killer.kill_now(&s.imago, &mut rng);
    number += 1;
    s.imago.wait_for(
        "the failing release to be rolled back",
        Duration::from_secs(150),
        || {
            killer.check();
            let _g = killer.lock.lock().unwrap();
            let (n, outcome, rollback_of) = desired(&s);
            n >= number && outcome == "complete" && rollback_of.is_some()
        },
    );
    {
        let _g = killer.lock.lock().unwrap();
        let (n, _, rollback_of) = desired(&s);
        assert_eq!(
            (n, rollback_of),
            (number, Some(numbers["v4"])),
            "release {} was rolled back to v4's (seed {seed})",
            number - 1
        );
    }

    // A manual rollback to v2's release.
    timeline.set(&["v4", "v2"]);
    bounds.set(REPLICAS, 2 * REPLICAS);
    number += 1;
    {
        let _g = killer.lock.lock().unwrap();
        s.imago
            .run(&[
                "rollback",
                "web",
                "--no-wait",
                "--to",
                &numbers["v2"].to_string(),
            ])
            .ok();
    }
    std::thread::sleep(Duration::from_millis(rng.below(1000)));
    killer.kill_now(&s.imago, &mut rng);
    wait_complete("the manual rollback", Some(number), &killer);
    killer.arm(false);
    {
        // No kill under way: the last one's restart is complete.
        let _g = killer.lock.lock().unwrap();
    }
    std::thread::sleep(Duration::from_millis(2500));

    // The end state, seen from outside the controller: exactly `replicas` instances run, all
    // ready, all of the desired release, and the endpoint answers with it.
    let final_ids: BTreeSet<String> = instance_dirs(&home)
        .into_iter()
        .filter(|id| instance_runs(id))
        .collect();
    let status = s.status();
    let digest = status["services"][0]["desired"]["image_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = s.imago.run(&["ps", "--all", "--json"]).ok().json();
    stop_clients.store(true, Ordering::Relaxed);
    let answers: Vec<Answer> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    sampling.store(true, Ordering::Relaxed);
    let (samples, mut ever) = sampler.join().unwrap();
    let kills_during_rollouts = killer.kills();

    assert_eq!(
        final_ids.len(),
        REPLICAS,
        "instances running at the end: {final_ids:?} (seed {seed})"
    );
    for id in &final_ids {
        let addr = instance_address(&home, id).unwrap();
        assert!(
            answers_health(&addr),
            "{id} at {addr} is not ready (seed {seed})"
        );
        assert!(
            get(&addr, "/").is_some_and(|(_, body)| body.contains("version v2")),
            "{id} does not serve v2's release (seed {seed})"
        );
    }
    assert_eq!(
        listed.as_array().unwrap().len(),
        REPLICAS,
        "ps --all: {listed} (seed {seed})"
    );
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["image"] == digest.as_str()),
        "every instance runs the desired image {digest}: {listed} (seed {seed})"
    );

    // No request failed, and every answer came from an allowed release.
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|a| {
            a.result
                .as_ref()
                .err()
                .map(|e| format!("{} at {}..{}: {e}", a.what, a.from, a.to))
        })
        .collect();
    let wrong: Vec<String> = answers
        .iter()
        .filter_map(|a| {
            let release = a.result.as_ref().ok()?;
            let allowed = timeline.allowed(a.from, a.to);
            (!allowed.contains(release.as_str())).then(|| {
                format!(
                    "{} at {}..{} answered by {release}, allowed {allowed:?}",
                    a.what, a.from, a.to
                )
            })
        })
        .collect();
    let kinds: BTreeMap<&str, usize> = answers.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.what).or_default() += 1;
        m
    });
    eprintln!(
        "{} answers {kinds:?}, {kills_during_rollouts} kills, {} samples",
        answers.len(),
        samples.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed (seed {seed}), first: {:#?}\n{}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(10)],
        s.imago.diagnostics()
    );
    assert!(
        wrong.is_empty(),
        "{} answers from a release neither current nor retiring (seed {seed}): {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert!(
        kinds.len() == 4 && kinds.values().all(|n| *n > 10),
        "every kind of client kept asking: {kinds:?}"
    );
    assert!(
        kills_during_rollouts >= 6,
        "only {kills_during_rollouts} kills (seed {seed})"
    );

    // Capacity: a violation counts when two samples in a row show it (one sample is not
    // atomic: an instance can stop and another start while it is taken).
    let mut violations = Vec::new();
    for pair in samples.windows(2) {
        let over = |x: &Sample| {
            let (low, high) = bounds.at(x.at, 5000)?;
            (x.ready.len() < low || x.running.len() > high).then(|| {
                format!(
                    "at {}: {} running {:?}, {} ready, bounds {low}..={high}",
                    x.at,
                    x.running.len(),
                    x.running,
                    x.ready.len()
                )
            })
        };
        if let (Some(a), Some(_)) = (over(&pair[0]), over(&pair[1])) {
            violations.push(a);
        }
    }
    assert!(
        violations.is_empty(),
        "capacity out of bounds (seed {seed}): {:#?}",
        &violations[..violations.len().min(10)]
    );

    // Destroy, with the controller killed during it (once at a random moment of its first
    // 300 ms, and by the killer).
    killer.arm(true);
    let destroy_started = Instant::now();
    let out = std::thread::scope(|scope| {
        let destroy = scope.spawn(|| s.imago.run(&["destroy", "web"]));
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        killer.kill_now(&s.imago, &mut rng);
        // What a slow destroy waits for: every 5 s, the instance directories and their files.
        let mut next = destroy_started + Duration::from_secs(5);
        while !destroy.is_finished() {
            if Instant::now() >= next {
                next += Duration::from_secs(5);
                for id in instance_dirs(&home) {
                    let dir = home.join("instances").join(&id);
                    let files: Vec<String> = std::fs::read_dir(&dir)
                        .map(|rd| {
                            rd.flatten()
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .collect()
                        })
                        .unwrap_or_default();
                    let state = std::fs::read_to_string(dir.join("state.json")).unwrap_or_default();
                    let launcher =
                        std::fs::read_to_string(dir.join("launcher")).unwrap_or_default();
                    eprintln!(
                        "destroy still running after {:?}: {id} files {files:?} launcher {launcher:?} state {state}",
                        destroy_started.elapsed()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        destroy.join().unwrap()
    });
    killer.arm(false);
    let destroy_took = destroy_started.elapsed();
    killer.finish();
    let kills = killer.kills();
    assert!(
        out.output.status.success(),
        "destroy failed (seed {seed}): {}",
        out.stderr()
    );
    ever.extend(instance_dirs(&home));
    // A launch killed before its record existed is only the sweep's to find (what is older
    // than 30 s, once per 30 s): the controller runs that long.
    s.imago.run(&["serve"]).ok();
    let mut left = common::leftovers(&home, &ever);
    let until = Instant::now() + Duration::from_secs(90);
    while !left.is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
        left = common::leftovers(&home, &ever);
    }
    s.imago.run(&["serve", "--stop"]).ok();
    // The data plane ends by itself once no controller is connected and it serves nothing.
    let mut processes = home_processes(&home);
    let until = Instant::now() + Duration::from_secs(20);
    while !processes.is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        processes = home_processes(&home);
    }
    eprintln!(
        "{kills} kills in all, {} instances ever; destroy took {destroy_took:?}",
        ever.len()
    );
    assert!(
        left.is_empty(),
        "left behind after destroy (seed {seed}): {left:#?}"
    );
    assert!(
        processes.is_empty(),
        "processes left after destroy and serve --stop (seed {seed}): {processes:#?}"
    );
}
