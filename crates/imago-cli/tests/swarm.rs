//! Services on a Docker Swarm target, against a real dockerd and swarm started by this test
//! binary (root, docker.io, docker-registry, busybox-static): apply, a rolling update under load
//! with no failed request, a failing release rolled back automatically, rollback on demand,
//! destroy, drift made by hand (`docker service update --image`, `docker service rm`), a
//! controller killed with SIGKILL in the middle of a rollout, and `ssh://` endpoints through an
//! sshd of the test's own.
//!
//! One dockerd (own data root, exec root, socket and pid file, `--iptables=false
//! --ip-forward=false`: the host's firewall and forwarding stay as they are), one single-node
//! swarm and one registry on 127.0.0.1 serve every test of this binary; each test has its own
//! imago home, service name and endpoint port. The last test to finish tears them down, and a
//! test that starts after that starts them again. The daemon has a bridge of its own name instead
//! of `docker0`, and its swarm listens on a leased port instead of 2377: tests run in parallel,
//! and a daemon tearing down once deleted `docker0` under the next one ("could not find bridge
//! docker0" in a task's error); a new daemon is also not started before the old one is gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use common::Imago;
use common::registry::{Fault, Proxy, Registry, RegistryOpts, require_tool, tool};

/// dockerd + swarm + registry, shared by the tests that are running.
struct Cluster {
    dir: tempfile::TempDir,
    socket: PathBuf,
    /// The daemon's TLS listener (`--tlsverify`): `tcp://127.0.0.1:PORT`.
    tls_endpoint: String,
    _tls_lease: common::PortLease,
    /// The daemon's default bridge, made by this test (dockerd's `--bridge`).
    bridge: String,
    /// The Linux bridges of this cluster's `docker_gwbridge` and of imago's task network
    /// ([`TASK_NETWORK`]), named by this test: dockerd would give every cluster on
    /// the host the same `docker_gwbridge`, and let a cluster tearing down delete it under the
    /// next one.
    gwbridge: String,
    task_bridge: String,
    _swarm_lease: common::PortLease,
    dockerd: Mutex<Child>,
    registry: Registry,
}

/// imago-swarm's `TASK_NETWORK`: the swarm-scoped network imago attaches tasks to.
const TASK_NETWORK: &str = "imago-tasks";

/// Shared by every test of this binary while it runs; held alone by the test whose promise is
/// timing under load (no failed request during a rolling update), so that no sibling test's
/// daemons, builds and controllers load the two cores while it measures.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum MachineGuard {
    Shared {
        _guard: std::sync::RwLockReadGuard<'static, ()>,
    },
    Alone {
        _guard: std::sync::RwLockWriteGuard<'static, ()>,
    },
}

fn share_machine() -> MachineGuard {
    MachineGuard::Shared {
        _guard: MACHINE.read().unwrap_or_else(|p| p.into_inner()),
    }
}

fn machine_alone() -> MachineGuard {
    MachineGuard::Alone {
        _guard: MACHINE.write().unwrap_or_else(|p| p.into_inner()),
    }
}

/// Held while a cluster starts or tears down, so that two never overlap.
static CLUSTER: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
/// How many clusters this process started: part of the bridge's name and subnet.
static GENERATION: AtomicUsize = AtomicUsize::new(0);

/// The running cluster, started if no test holds it.
fn cluster() -> Arc<Cluster> {
    let mut slot = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = slot.upgrade() {
        return c;
    }
    STARTING.set(true);
    let c = Arc::new(Cluster::start());
    STARTING.set(false);
    *slot = Arc::downgrade(&c);
    c
}

thread_local! {
    /// This thread holds `CLUSTER` to start a cluster: a start that fails drops the half-made
    /// cluster here, whose teardown must not wait for the lock.
    static STARTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Cluster {
    fn start() -> Cluster {
        require_tool("dockerd");
        require_tool("docker");
        let dir = tempfile::Builder::new()
            .prefix("imago-swarm-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("docker.sock");
        let tls = dir.path().join("tls");
        make_tls_files(&tls);
        let tls_lease = common::lease_port();
        let tls_endpoint = format!("tcp://127.0.0.1:{}", tls_lease.port);
        // A bridge of this cluster's own, on a subnet of its own (10.196.N.0/24; imago's
        // instances use 10.88.0.0/16, the two-node test 10.199.0.0/16).
        let generation = GENERATION.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() as usize;
        let bridge = format!("imsw{}g{generation}", pid % 1_000_000);
        let subnet = (pid * 7 + generation) % 250 + 1;
        tool("ip", &["link", "add", &bridge, "type", "bridge"]);
        tool(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.196.{subnet}.1/24"),
                "dev",
                &bridge,
            ],
        );
        tool("ip", &["link", "set", &bridge, "up"]);
        let gwbridge = format!("imswgw{}g{generation}", pid % 1_000_000);
        let task_bridge = format!("imswtk{}g{generation}", pid % 1_000_000);
        let swarm_lease = common::lease_port();
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .args(["--bridge", &bridge])
            .args(["-H", &tls_endpoint, "--tlsverify", "--tlscacert"])
            .arg(tls.join("ca.crt"))
            .arg("--tlscert")
            .arg(tls.join("server.crt"))
            .arg("--tlskey")
            .arg(tls.join("server.key"))
            .args(["--iptables=false", "--ip-forward=false", "--data-root"])
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd (scripts/setup installs docker.io)");
        let registry = Registry::start(RegistryOpts::plain());
        let cluster = Cluster {
            dir,
            socket,
            tls_endpoint,
            _tls_lease: tls_lease,
            bridge,
            gwbridge,
            task_bridge,
            _swarm_lease: swarm_lease,
            dockerd: Mutex::new(child),
            registry,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cluster.docker_ok(&["version"]) {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s; log: {}",
                cluster.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Made before `swarm init`, which would otherwise make `docker_gwbridge` with the name
        // every daemon gives it and a subnet of its own choosing.
        let bridge_name = |name: &str| format!("com.docker.network.bridge.name={name}");
        cluster.docker(&[
            "network",
            "create",
            "--subnet",
            &format!("10.195.{subnet}.0/24"),
            "--opt",
            &bridge_name(&cluster.gwbridge),
            "--opt",
            "com.docker.network.bridge.enable_icc=false",
            "docker_gwbridge",
        ]);
        let swarm_addr = format!("127.0.0.1:{}", cluster._swarm_lease.port);
        cluster.docker(&[
            "swarm",
            "init",
            "--advertise-addr",
            &swarm_addr,
            "--listen-addr",
            &swarm_addr,
        ]);
        // imago's task network, made as an operator may make it before the first apply: its
        // bridge and subnet are this cluster's own (imago would make a bridge named after the
        // network's id, on a subnet of the daemon's choosing).
        cluster.docker(&[
            "network",
            "create",
            "--config-only",
            "--subnet",
            &format!("10.194.{subnet}.0/24"),
            "--opt",
            &bridge_name(&cluster.task_bridge),
            "imago-tasks-config",
        ]);
        cluster.docker(&[
            "network",
            "create",
            "--driver",
            "bridge",
            "--scope",
            "swarm",
            "--config-from",
            "imago-tasks-config",
            TASK_NETWORK,
        ]);
        cluster
    }

    /// docker's `DOCKER_CERT_PATH`: `ca.pem`, `cert.pem`, `key.pem` of a client the daemon
    /// accepts.
    fn client_cert_dir(&self) -> PathBuf {
        self.dir.path().join("tls/client")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H").arg(self.host()).args(args);
        cmd
    }

    fn docker_ok(&self, args: &[&str]) -> bool {
        self.docker_cmd(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Runs `docker ARGS`, which must succeed; returns stdout.
    fn docker(&self, args: &[&str]) -> String {
        let out = self.docker_cmd(args).output().expect("run docker");
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker service inspect` of `service`, as JSON (`None` when it does not exist).
    fn service(&self, service: &str) -> Option<serde_json::Value> {
        let out = self
            .docker_cmd(&["service", "inspect", service])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone())
    }

    fn image_of(&self, service: &str) -> String {
        self.service(service).expect("service exists")["Spec"]["TaskTemplate"]["ContainerSpec"]
            ["Image"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // No cluster starts until this one is gone (see `cluster`).
        let _starting =
            (!STARTING.get()).then(|| CLUSTER.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = self.docker_cmd(&["swarm", "leave", "--force"]).output();
        let mut child = self.dockerd.lock().unwrap_or_else(|p| p.into_inner());
        // SIGTERM: dockerd unmounts and removes what it made below its own roots.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        // The bridges dockerd made on the host outlive it, and so do the network namespaces it
        // bind-mounted under its exec root (the swarm's ingress sandbox). Every bridge has a
        // name of this cluster's own.
        for link in [&self.gwbridge, &self.task_bridge, &self.bridge] {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        for netns in std::fs::read_dir(self.dir.path().join("exec/netns"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = Command::new("umount").arg(netns.path()).output();
        }
    }
}

/// A test CA, the daemon's certificate for 127.0.0.1 (`ca.crt`, `server.crt`, `server.key`)
/// and a client certificate in docker's layout (`client/{ca,cert,key}.pem`).
fn make_tls_files(dir: &Path) {
    std::fs::create_dir_all(dir.join("client")).unwrap();
    common::registry::make_certificates(dir);
    let p = |name: &str| dir.join(name).display().to_string();
    tool(
        "openssl",
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("client/key.pem"),
            "-out",
            &p("client.csr"),
            "-subj",
            "/CN=imago test client",
        ],
    );
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("client.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("client/cert.pem"),
            "-days",
            "2",
            "-extfile",
            &p("client.ext"),
        ],
    );
    std::fs::copy(dir.join("ca.crt"), dir.join("client/ca.pem")).unwrap();
}

/// Plain TCP on a leased loopback port, piped to a unix socket: a `tcp://` Docker endpoint
/// without TLS (dockerd itself warns about, and newer ones delay, an unauthenticated TCP
/// listener). Stops accepting when dropped.
struct Forwarder {
    port: u16,
    stop: Arc<AtomicBool>,
    _lease: common::PortLease,
}

impl Forwarder {
    fn start(socket: &Path) -> Forwarder {
        let lease = common::lease_port();
        let listener = std::net::TcpListener::bind(("127.0.0.1", lease.port)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (socket, stopped) = (socket.to_owned(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(daemon) = std::os::unix::net::UnixStream::connect(&socket) else {
                    continue;
                };
                let (mut c_in, mut d_out) =
                    (client.try_clone().unwrap(), daemon.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut d_out);
                    let _ = d_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut d_in, mut c_out) = (daemon, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut d_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Forwarder {
            port: lease.port,
            stop,
            _lease: lease,
        }
    }

    fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One test's service on the swarm target: a home, a copy of the web example renamed, with its
/// endpoint port leased; destroyed (and its controller stopped) however the test ends.
struct SwarmService {
    cluster: Arc<Cluster>,
    imago: Imago,
    dir: PathBuf,
    name: String,
    port: u16,
    _lease: common::PortLease,
    /// Last: released once the service is torn down.
    _machine: MachineGuard,
}

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/web");

impl SwarmService {
    // The cluster is held before the machine is waited for: a test that waits keeps it
    // running, or the test it waits for would tear it down and this one start another (about
    // 4 s each way under load, measured around each test that runs alone).
    fn new(name: &str) -> SwarmService {
        let cluster = cluster();
        SwarmService::with_machine(name, cluster, share_machine())
    }

    /// With no other test of this binary running meanwhile.
    fn alone(name: &str) -> SwarmService {
        let cluster = cluster();
        SwarmService::with_machine(name, cluster, machine_alone())
    }

    fn with_machine(name: &str, cluster: Arc<Cluster>, machine: MachineGuard) -> SwarmService {
        let imago = Imago::new();
        let dir = imago.dir.path().join("web");
        std::fs::create_dir_all(dir.join("www")).unwrap();
        let lease = common::lease_port();
        let s = SwarmService {
            cluster,
            imago,
            dir,
            name: name.to_owned(),
            port: lease.port,
            _lease: lease,
            _machine: machine,
        };
        s.set_version("1");
        s
    }

    fn file(&self) -> String {
        self.dir.join("imago.toml").display().to_string()
    }

    /// The web example as service NAME on target `swarm`, serving "version V".
    fn set_version(&self, version: &str) {
        std::fs::write(
            self.dir.join("www/index.html"),
            format!("<h1>version {version}</h1>\n"),
        )
        .unwrap();
        let original = std::fs::read_to_string(Path::new(EXAMPLE).join("imago.toml")).unwrap();
        let toml = original
            .replace("[service.web", &format!("[service.{}", self.name))
            .replace("port = 8088", &format!("port = {}", self.port))
            .replace(
                "target_port = 8080",
                &format!(
                    "target_port = 8080\ntarget = \"swarm\"\nenv = {{ VERSION = \"{version}\" }}"
                ),
            )
            + &format!(
                "\n[target.swarm]\nengine = \"swarm\"\nendpoint = \"{}\"\nregistry = \"{}/imago-test\"\n",
                self.cluster.host(),
                self.cluster.registry.host()
            );
        std::fs::write(self.dir.join("imago.toml"), toml).unwrap();
        std::fs::copy(
            Path::new(EXAMPLE).join("www/style.css"),
            self.dir.join("www/style.css"),
        )
        .unwrap();
    }

    fn edit(&self, from: &str, to: &str) {
        let path = self.dir.join("imago.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{from:?} not in the definition");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }

    fn apply(&self) -> common::Run {
        self.imago
            .run(&["apply", "--timeout", "120s", "-f", &self.file()])
    }

    fn history(&self) -> Vec<serde_json::Value> {
        self.imago.history(&self.name)
    }

    fn events(&self) -> String {
        self.imago.events(&self.name)
    }

    /// GET / through imago's endpoint.
    fn get(&self) -> std::io::Result<String> {
        get(self.port)
    }

    fn image(&self) -> String {
        self.cluster.image_of(&self.name)
    }

    fn label(&self, label: &str) -> String {
        self.cluster.service(&self.name).unwrap()["Spec"]["Labels"][label]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The digest the store gives the web image of the current definition.
    fn built_digest(&self) -> String {
        self.imago
            .run(&["build", "--json", "-f", &self.file(), "web"])
            .ok()
            .json()["images"][0]["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Stops the controller, changes the swarm service with `docker service update ARGS`, and
    /// returns what `imago drift --json` (which must fail) finds wrong in its spec.
    fn changed_by_hand(&self, args: &[&str]) -> Vec<String> {
        self.imago.run(&["serve", "--stop"]).ok();
        let mut update = vec!["service", "update", "--detach"];
        update.extend(args);
        update.push(&self.name);
        self.cluster.docker(&update);
        let drift = self.imago.run(&["drift", "--json"]);
        assert!(
            !drift.output.status.success(),
            "drift must fail the command"
        );
        let findings = drift.json().as_array().cloned().unwrap_or_default();
        let wrong_spec = findings.iter().filter(|f| f["kind"] == "wrong-spec");
        wrong_spec
            .filter_map(|f| Some(f["detail"].as_str()?.to_owned()))
            .collect()
    }

    fn wait_for(&self, what: &str, timeout: Duration, ok: impl FnMut() -> bool) {
        self.imago.wait_for(what, timeout, ok)
    }
}

impl Drop for SwarmService {
    fn drop(&mut self) {
        let _ = self.imago.cmd().args(["destroy", &self.name]).output();
        let _ = self.imago.cmd().args(["serve", "--stop"]).output();
        let _ = self
            .cluster
            .docker_cmd(&["service", "rm", &self.name])
            .output();
    }
}

/// GET `path` from the API of `imago`'s running controller (on loopback: no token), as JSON.
fn api_get(imago: &Imago, path: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(imago.home.join("deploy/controller.json")).unwrap())
            .unwrap();
    let mut stream = TcpStream::connect(info["api"].as_str().unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        head.split_whitespace().nth(1),
        Some("200"),
        "{path}: {response}"
    );
    serde_json::from_str(body).unwrap()
}

fn get(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.0 200") && !response.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad response: {response:?}")));
    }
    Ok(response)
}

/// Clients hammering an endpoint until stopped: (requests, failures with their errors).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[test]
fn apply_pins_the_digest_rolls_under_load_rolls_back_on_demand_and_destroys() {
    let s = SwarmService::alone("swweb");
    let applied = s.apply().ok();
    assert!(
        applied.stdout().contains("deployment complete (release 1"),
        "{}",
        applied.stdout()
    );
    // The swarm runs the digest imago built, from the target's registry; never a tag.
    let v1 = s.built_digest();
    let registry = s.cluster.registry.host();
    assert_eq!(s.image(), format!("{registry}/imago-test/web@{v1}"));
    assert_eq!(s.label("imago.release"), "1");
    assert_eq!(
        s.history()[0]["image_digest"].as_str(),
        Some(v1.as_str()),
        "the release records the digest"
    );
    let spec = s.cluster.service(&s.name).unwrap()["Spec"].clone();
    assert_eq!(spec["Mode"]["Replicated"]["Replicas"], 3);
    assert_eq!(spec["UpdateConfig"]["Order"], "start-first");
    assert_eq!(spec["TaskTemplate"]["ContainerSpec"]["ReadOnly"], true);
    assert_eq!(spec["EndpointSpec"]["Ports"][0]["PublishMode"], "host");
    assert!(s.get().unwrap().contains("version 1"));

    // A rolling update under load: no request fails.
    let load = Load::start(s.port, 4);
    std::thread::sleep(Duration::from_millis(300));
    s.set_version("2");
    let applied = s.apply().ok();
    assert!(
        applied.stdout().contains("deployment complete (release 2"),
        "{}",
        applied.stdout()
    );
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rolling update: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 50, "the load ran ({ok} requests)");
    assert!(s.get().unwrap().contains("version 2"));
    let v2 = s.built_digest();
    assert_ne!(v1, v2);
    assert_eq!(s.image(), format!("{registry}/imago-test/web@{v2}"));

    // Rollback on demand: image and configuration of release 1, as release 3.
    let rolled = s
        .imago
        .run(&["rollback", "--timeout", "120s", &s.name])
        .ok();
    assert!(rolled.stdout().contains("release 3"), "{}", rolled.stdout());
    s.wait_for("the rollback's completion", Duration::from_secs(60), || {
        s.history()
            .last()
            .is_some_and(|r| r["outcome"] == "complete" && r["number"] == 3)
    });
    assert_eq!(s.image(), format!("{registry}/imago-test/web@{v1}"));
    let env =
        s.cluster.service(&s.name).unwrap()["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"].clone();
    assert!(
        env.as_array().unwrap().iter().any(|e| e == "VERSION=1"),
        "the configuration rolls back with the image: {env}"
    );
    assert!(s.get().unwrap().contains("version 1"));

    // Destroy removes the swarm service; the history stays.
    s.imago.run(&["destroy", &s.name]).ok();
    assert!(
        s.cluster.service(&s.name).is_none(),
        "the swarm service is gone"
    );
    assert_eq!(s.history().len(), 3);
}

/// Issue 14: rolling updates under heavy load fail no request. When the swarm retires a task
/// (the new one of its slot passed its health check), it stops it: a task on the default bridge
/// got its stop signal at that very moment, while imago's endpoint, which learns of the
/// retirement from its next listing of the tasks, still sent it connections (5 s timeouts and
/// empty answers: the published port's proxy had no task behind it any more). A task on imago's
/// task network is taken out of service first and stopped 2 s later, which the endpoint's next
/// pass well beats.
#[test]
fn many_rolling_updates_under_heavy_load_fail_no_request() {
    // A controller whose passes come 1 s apart, as a loaded one's may: the endpoint learns of a
    // retired task up to a second after the swarm retired it.
    rolling_updates_fail_no_request("swstress", "1s", 5);
}

/// The 2 s between a swarm retiring a task and stopping it against a controller slower than
/// that: passes 5 s apart (a loaded controller's wait after a pass is twice the pass, up to 5 s;
/// one pass took over 2 s at load 50-77, and 124 of 65,442 requests failed in one 0.8 s burst).
/// The controller's watch of the service's tasks brings the next pass at once when a task it
/// routes is retired, whatever the interval and pacing; before it, the endpoint routed a retired
/// task for up to 5 s and every update lost requests.
#[test]
fn a_controller_slower_than_the_swarm_s_stop_delay_loses_no_request() {
    rolling_updates_fail_no_request("swslow", "5s", 2);
}

/// `updates` rolling updates of three tasks under 16 clients through imago's endpoint, the
/// controller passing every `interval`: no request fails.
fn rolling_updates_fail_no_request(name: &str, interval: &str, updates: usize) {
    let s = SwarmService::alone(name);
    s.imago.run(&["serve", "--interval", interval]).ok();
    updates_under_load_fail_no_request(&s, updates, |_| {});
}

/// `updates` rolling updates of `s` (its controller started) under 16 clients, `edit` making
/// each version's definition: no request fails.
fn updates_under_load_fail_no_request(
    s: &SwarmService,
    updates: usize,
    edit: impl Fn(&SwarmService),
) {
    edit(s);
    s.apply().ok();
    let network = s
        .cluster
        .docker(&["network", "inspect", "--format", "{{.Id}}", TASK_NETWORK]);
    let spec = s.cluster.service(&s.name).unwrap()["Spec"].clone();
    assert_eq!(
        spec["TaskTemplate"]["Networks"],
        serde_json::json!([{ "Target": network }]),
        "the tasks are on imago's task network, never the default bridge"
    );
    let load = Load::start(s.port, 16);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for version in 2..=updates + 1 {
        s.set_version(&version.to_string());
        edit(s);
        let applied = s.apply().ok();
        assert!(
            applied
                .stdout()
                .contains(&format!("deployment complete (release {version}")),
            "{}",
            applied.stdout()
        );
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during {updates} rolling updates ({took:?}): {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 500, "the load ran ({ok} requests in {took:?})");
    eprintln!("{updates} rolling updates under 16 clients in {took:?}: {ok} requests, none failed");
    assert!(
        s.get()
            .unwrap()
            .contains(&format!("version {}", updates + 1))
    );
}

/// A path the image declares as a VOLUME: each task gets a writable anonymous volume there
/// while its root stays read-only, and the volume is removed with the task.
#[test]
fn an_image_volume_is_writable_under_the_read_only_root_and_goes_with_the_task() {
    let s = SwarmService::new("swvolume");
    // Mode 1777 in the image: Docker gives a new volume the mode of the image's directory, and
    // the web image runs as nobody.
    s.edit(
        "dir = [{ path = \"/tmp\", mode = \"1777\" }]",
        "dir = [{ path = \"/tmp\", mode = \"1777\" }, { path = \"/data\", mode = \"1777\" }]",
    );
    s.edit(
        "stop_signal = \"SIGTERM\"",
        "stop_signal = \"SIGTERM\"\nvolumes = [\"/data\"]",
    );
    s.edit("replicas = 3", "replicas = 1");
    s.apply().ok();
    let containers = s.cluster.docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.swarm.service.name={}", s.name),
    ]);
    let container = containers.lines().collect::<Vec<_>>();
    assert_eq!(container.len(), 1, "one task: {containers:?}");
    let container = container[0];
    let exec = |script: &str| {
        s.cluster
            .docker_cmd(&["exec", container, "sh", "-c", script])
            .output()
            .unwrap()
    };
    // `read` and `echo` are the shell's own: the image has no `cat`.
    let wrote = exec("echo kept > /data/x && read v < /data/x && echo $v");
    assert!(
        wrote.status.success() && String::from_utf8_lossy(&wrote.stdout).trim() == "kept",
        "{wrote:?}"
    );
    let refused = exec("echo no > /rootfile");
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("Read-only file system"),
        "the root stays read-only: {refused:?}"
    );
    let inspected: serde_json::Value =
        serde_json::from_str(&s.cluster.docker(&["inspect", container])).unwrap();
    let mount = inspected[0]["Mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["Destination"] == "/data")
        .unwrap_or_else(|| panic!("no mount at /data: {}", inspected[0]["Mounts"]))
        .clone();
    assert_eq!(
        (&mount["Type"], &mount["RW"]),
        (&serde_json::json!("volume"), &serde_json::json!(true)),
        "{mount}"
    );
    let volume = mount["Name"].as_str().unwrap().to_owned();
    assert!(
        s.cluster
            .docker(&["volume", "ls", "-q"])
            .lines()
            .any(|v| v == volume)
    );
    s.imago.run(&["destroy", &s.name]).ok();
    s.wait_for(
        "the task's volume to be removed",
        Duration::from_secs(30),
        || {
            !s.cluster
                .docker(&["volume", "ls", "-q"])
                .lines()
                .any(|v| v == volume)
        },
    );
}

#[test]
fn a_failing_release_is_rolled_back_automatically_image_and_configuration_together() {
    let s = SwarmService::new("swfail");
    s.apply().ok();
    let registry = s.cluster.registry.host();
    let v1 = s.built_digest();
    // Release 2: a new page, and a health check that can never pass.
    s.set_version("2");
    s.edit("path = \"/\"", "path = \"/missing\"");
    s.edit("progress_deadline = \"30s\"", "progress_deadline = \"20s\"");
    let out = s.apply();
    let text = out.stdout();
    assert!(
        text.contains("release 2 failed and was rolled back to release 1"),
        "stdout: {text}\nstderr: {}",
        out.stderr()
    );
    assert!(
        !out.output.status.success(),
        "a failed apply exits non-zero"
    );
    let history = s.history();
    assert_eq!(history.len(), 3, "{history:?}");
    assert_eq!(history[1]["outcome"], "failed");
    assert_eq!(history[2]["rollback_of"], 1);
    assert_eq!(history[2]["outcome"], "complete");
    assert_eq!(s.image(), format!("{registry}/imago-test/web@{v1}"));
    assert_eq!(s.label("imago.release"), "3");
    let spec = s.cluster.service(&s.name).unwrap()["Spec"].clone();
    let test = spec["TaskTemplate"]["ContainerSpec"]["Healthcheck"]["Test"].to_string();
    assert!(
        test.contains("127.0.0.1:8080/\"") && !test.contains("missing"),
        "the health check rolled back with the image: {test}"
    );
    assert!(s.get().unwrap().contains("version 1"));
}

#[test]
fn changes_made_by_hand_are_drift_and_the_release_is_applied_again() {
    let s = SwarmService::new("swdrift");
    s.apply().ok();
    let registry = s.cluster.registry.host();
    let v1 = s.built_digest();
    let pinned = format!("{registry}/imago-test/web@{v1}");
    // With no controller running, someone points the service at another image by hand:
    // `imago drift` reports it.
    let findings = s.changed_by_hand(&[
        "--image",
        &format!("{registry}/imago-test/web@sha256:{}", "0".repeat(64)),
    ]);
    assert!(
        findings.iter().any(|f| f.starts_with("image: ")),
        "{findings:?}"
    );
    // The controller reports it and applies the release again.
    s.imago.run(&["serve"]).ok();
    s.wait_for("the drift report", Duration::from_secs(30), || {
        s.events().contains("changed out of band")
    });
    s.wait_for("the release's image again", Duration::from_secs(30), || {
        s.image() == pinned
    });
    assert!(s.events().contains("image: "), "{}", s.events());

    // Someone takes the tasks off imago's task network (they fall back on the node's default
    // bridge, whose tasks are stopped the moment they are retired) and changes the update's
    // parallelism: both are drift, reported by `imago drift` and put back by the controller.
    let task_network =
        s.cluster
            .docker(&["network", "inspect", "--format", "{{.Id}}", TASK_NETWORK]);
    let networks =
        || s.cluster.service(&s.name).unwrap()["Spec"]["TaskTemplate"]["Networks"].clone();
    assert_eq!(networks(), serde_json::json!([{ "Target": task_network }]));
    let details = s.changed_by_hand(&["--network-rm", TASK_NETWORK, "--update-parallelism", "3"]);
    assert_eq!(networks(), serde_json::Value::Null, "taken off by hand");
    assert!(
        details
            .iter()
            .any(|d| d == &format!("networks: [] != [\"{TASK_NETWORK}\"]")),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.starts_with("update_config: parallelism 3 ")),
        "{details:?}"
    );
    s.imago.run(&["serve"]).ok();
    s.wait_for("the task network again", Duration::from_secs(30), || {
        networks() == serde_json::json!([{ "Target": task_network }])
    });
    let events = s.events();
    assert!(
        events.contains(&format!("networks: [] != [\"{TASK_NETWORK}\"]")),
        "{events}"
    );
    let parallelism = &s.cluster.service(&s.name).unwrap()["Spec"]["UpdateConfig"]["Parallelism"];
    assert_eq!(parallelism, 1, "max_surge of the example");

    // Someone removes the service: it is re-created from the release.
    s.cluster.docker(&["service", "rm", &s.name]);
    s.wait_for("the re-created service", Duration::from_secs(30), || {
        s.cluster.service(&s.name).is_some()
    });
    assert!(s.events().contains("is missing"), "{}", s.events());
    assert_eq!(s.image(), pinned);
    s.wait_for("a serving endpoint", Duration::from_secs(60), || {
        s.get().is_ok_and(|r| r.contains("version 1"))
    });
    s.wait_for("no drift left", Duration::from_secs(60), || {
        s.imago.run(&["drift", "--json"]).output.status.success()
    });
}

#[test]
fn a_controller_killed_mid_rollout_is_restarted_and_records_the_outcome() {
    let s = SwarmService::new("swkill");
    s.apply().ok();
    s.set_version("2");
    // Slow the update down so that the kill lands in its middle.
    s.edit("min_ready = \"500ms\"", "min_ready = \"2s\"");
    s.imago.run(&["apply", "--no-wait", "-f", &s.file()]).ok();
    s.wait_for("the update to start", Duration::from_secs(30), || {
        s.label("imago.release") == "2"
    });
    s.imago.kill_controller();
    assert!(
        s.history()[1]["outcome"].is_null(),
        "the rollout was still under way when the controller died: {:?}",
        s.history()
    );
    // A new controller (apply starts one; the release is already recorded, so apply adds
    // none and waits for it) finds the update where the engine has it and completes it.
    let applied = s.apply().ok();
    assert!(
        applied.stdout().contains("(release 2)"),
        "{}",
        applied.stdout()
    );
    let history = s.history();
    assert_eq!(history.len(), 2, "no release was added: {history:?}");
    assert_eq!(history[1]["outcome"], "complete");
    let v2 = s.built_digest();
    assert!(s.image().ends_with(&v2));
    assert!(s.get().unwrap().contains("version 2"));
}

/// `imago plan --json` of the service's file: the plan of its one service.
fn plan_of(s: &SwarmService) -> serde_json::Value {
    s.imago
        .run(&["plan", "--json", "-f", &s.file()])
        .ok()
        .json()[0]
        .clone()
}

#[test]
fn plan_compares_with_the_live_service_and_status_lists_its_tasks() {
    let s = SwarmService::new("swplan");
    let first = plan_of(&s);
    assert_eq!(first["cluster"]["action"], "create", "{first}");
    assert_eq!(first["cluster"]["engine"], "swarm");
    s.apply().ok();
    let v1 = s.built_digest();
    let same = plan_of(&s);
    assert_eq!(same["action"], "no change", "{same}");
    assert_eq!(same["cluster"]["action"], "unchanged", "{same}");
    assert_eq!(same["cluster"]["live_release"], 1);

    // Status lists the tasks the swarm runs: release, image digest, node and address.
    let status = s.imago.run(&["status", "--json", &s.name]).ok().json();
    let tasks = status["services"][0]["tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let running: Vec<_> = tasks
        .iter()
        .filter(|t| t["phase"] == "running" && t["desired_running"] == true)
        .collect();
    assert_eq!(running.len(), 3, "{status}");
    for task in &running {
        assert_eq!(task["release"], 1, "{task}");
        assert_eq!(task["image_digest"].as_str(), Some(v1.as_str()), "{task}");
        assert_eq!(task["node"], "127.0.0.1", "{task}");
        assert!(
            task["address"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{task}"
        );
    }
    let human = s.imago.run(&["status", &s.name]).ok().stdout();
    assert_eq!(
        human
            .lines()
            .filter(|l| l.trim_start().starts_with("task "))
            .count(),
        3,
        "{human}"
    );

    // The controller's API lists the same tasks: /v1/status, /v1/services and
    // /v1/services/NAME.
    let cli_tasks = |service: &serde_json::Value| {
        let mut ids: Vec<String> = service["tasks"]
            .as_array()
            .unwrap_or_else(|| panic!("no tasks in {service}"))
            .iter()
            .filter(|t| t["phase"] == "running" && t["desired_running"] == true)
            .inspect(|t| assert_eq!(t["release"], 1, "{t}"))
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let expected = cli_tasks(&status["services"][0]);
    let api = api_get(&s.imago, "/v1/status");
    let ours = api["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|svc| svc["name"] == s.name.as_str())
        .unwrap_or_else(|| panic!("{} not in {api}", s.name))
        .clone();
    assert_eq!(cli_tasks(&ours), expected, "{api}");
    let listed = api_get(&s.imago, "/v1/services");
    assert_eq!(cli_tasks(&listed[0]), expected, "{listed}");
    let one = api_get(&s.imago, &format!("/v1/services/{}", s.name));
    assert_eq!(cli_tasks(&one), expected, "{one}");

    // The health check as an imago from before the exec allowance applied it: Docker's
    // timeout is the service's 1 s alone. The same check: no change (no controller runs to
    // put anything back). Any other timeout is drift.
    s.imago.run(&["serve", "--stop"]).ok();
    let live_timeout = || {
        s.cluster.docker(&[
            "service",
            "inspect",
            "--format",
            "{{.Spec.TaskTemplate.ContainerSpec.Healthcheck.Timeout}}",
            &s.name,
        ])
    };
    assert_eq!(live_timeout(), "6s", "the rendering: 1 s + 5 s");
    let timeout = |t: &str| {
        s.cluster.docker(&[
            "service",
            "update",
            "--detach",
            "--health-timeout",
            t,
            &s.name,
        ]);
        assert_eq!(live_timeout(), t);
        plan_of(&s)
    };
    let older = timeout("1s");
    assert_eq!(older["action"], "no change", "{older}");
    assert_eq!(older["cluster"]["action"], "unchanged", "{older}");
    let by_hand = timeout("2s");
    assert_eq!(by_hand["cluster"]["action"], "drifted", "{by_hand}");
    let fields = by_hand["cluster"]["fields"].to_string();
    assert!(fields.contains("timeout 2000000000 "), "{fields}");

    // The health check changed by hand (no controller to put it back): drift, in the plan and
    // in `imago drift`, which read the daemon's `Healthcheck`.
    s.cluster.docker(&[
        "service",
        "update",
        "--detach",
        "--health-cmd",
        "true",
        &s.name,
    ]);
    let drifted = plan_of(&s);
    assert_eq!(drifted["cluster"]["action"], "drifted", "{drifted}");
    let fields = drifted["cluster"]["fields"].to_string();
    assert!(
        fields.contains("health: ") && fields.contains("CMD-SHELL"),
        "{fields}"
    );
    let drift = s.imago.run(&["drift", "--json"]).json();
    assert!(
        drift
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["detail"].as_str().unwrap().starts_with("health: ")),
        "{drift}"
    );

    // A new version, not built yet: the plan cannot know the digest, and says so.
    s.set_version("2");
    let unbuilt = plan_of(&s);
    assert_eq!(unbuilt["cluster"]["action"], "update", "{unbuilt}");
    assert!(
        unbuilt["cluster"]["fields"]
            .to_string()
            .contains("digest not known yet")
    );
    // Built: an update, naming the fields it changes.
    s.built_digest();
    let update = plan_of(&s);
    assert_eq!(update["action"], "new release", "{update}");
    assert_eq!(update["cluster"]["action"], "update", "{update}");
    let fields = update["cluster"]["fields"].to_string();
    assert!(
        fields.contains("image: ") && fields.contains("env: ") && fields.contains("VERSION=2"),
        "{fields}"
    );
    let human = s.imago.run(&["plan", "-f", &s.file()]).ok().stdout();
    assert!(
        human.contains(&format!(
            "swarm service {} on target swarm: update (live: release 1)",
            s.name
        )),
        "{human}"
    );
}

#[test]
fn tcp_endpoints_in_plain_http_and_with_tls_drive_the_swarm() {
    // Held for the whole test: a temporary would end the cluster right here when no other test
    // holds it (one test at a time), and the service would get a new daemon the forwarder does
    // not reach.
    let shared = cluster();
    let forwarder = Forwarder::start(&shared.socket);
    let s = SwarmService::new("swtcp");
    let tls = s.cluster.tls_endpoint.clone();
    s.edit(
        &format!("endpoint = \"{}\"", s.cluster.host()),
        &format!("endpoint = \"{tls}\""),
    );
    // TLS, with the client certificate in DOCKER_CERT_PATH, as the docker CLI finds it.
    let with_tls = |args: &[&str]| {
        let mut cmd = s.imago.cmd();
        cmd.env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", s.cluster.client_cert_dir())
            .args(args);
        common::Run {
            output: cmd.output().unwrap(),
        }
    };
    let applied = with_tls(&["apply", "--timeout", "120s", "-f", &s.file()]).ok();
    assert!(
        applied.stdout().contains("deployment complete (release 1"),
        "{}",
        applied.stdout()
    );
    assert!(s.get().unwrap().contains("version 1"));
    assert_eq!(
        with_tls(&["plan", "--json", "-f", &s.file()]).ok().json()[0]["cluster"]["action"],
        "unchanged"
    );
    // Without the certificate the daemon's TLS port is no Docker API: a clear error.
    let refused = s.imago.run(&["plan", "-f", &s.file()]).fails();
    assert!(refused.contains(&tls), "{refused}");

    // Plain HTTP: the same service moved to a plain tcp:// endpoint (a new release). The
    // controller was started with TLS in its environment: a new one, without.
    s.imago.run(&["serve", "--stop"]).ok();
    s.edit(
        &format!("endpoint = \"{tls}\""),
        &format!("endpoint = \"{}\"", forwarder.endpoint()),
    );
    let moved = plan_of(&s);
    assert_eq!(moved["cluster"]["action"], "update", "{moved}");
    let applied = s.apply().ok();
    assert!(
        applied.stdout().contains("deployment complete (release 2"),
        "{}",
        applied.stdout()
    );
    let status = s.imago.run(&["status", "--json", &s.name]).ok().json();
    let tasks = status["services"][0]["tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        tasks
            .iter()
            .filter(|t| t["phase"] == "running" && t["release"] == 2)
            .count(),
        3,
        "{status}"
    );
    assert_eq!(s.label("imago.release"), "2");
}

/// An sshd of this test's own on 127.0.0.1 (its own host key, config, pid file and
/// authorized keys; no ForceCommand): the "remote host" of an `ssh://` endpoint is this host,
/// where `docker` reaches the cluster's daemon through `DOCKER_HOST`, set for every session by
/// the server (`SetEnv`). The client side is a directory with an `ssh` wrapper to put first on
/// PATH, which runs the real ssh with a config of the test's (key, known hosts), since ssh reads
/// `~/.ssh` from the password database, not from `$HOME`.
struct Sshd {
    dir: tempfile::TempDir,
    child: Child,
    _lease: common::PortLease,
    port: u16,
}

impl Sshd {
    fn start(cluster: &Cluster) -> Sshd {
        for program in ["sshd", "ssh", "ssh-keygen"] {
            require_tool(program);
        }
        let dir = tempfile::Builder::new()
            .prefix("imago-sshd-")
            .tempdir()
            .unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        for key in [
            "host_key",
            "other_host_key",
            "client_key",
            "no_docker_key",
            "stranger_key",
        ] {
            tool(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-C", key, "-f", &path(key)],
            );
        }
        let public = |key: &str| std::fs::read_to_string(path(&format!("{key}.pub"))).unwrap();
        // The second key's sessions find no docker: a PATH without it.
        std::fs::write(
            dir.path().join("authorized_keys"),
            format!(
                "{}environment=\"PATH=/nonexistent\" {}",
                public("client_key"),
                public("no_docker_key")
            ),
        )
        .unwrap();
        let lease = common::lease_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {pid}\n\
             AuthorizedKeysFile {keys}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPermitUserEnvironment yes\nSetEnv DOCKER_HOST={docker}\n",
            port = lease.port,
            host_key = path("host_key"),
            pid = path("sshd.pid"),
            keys = path("authorized_keys"),
            docker = cluster.host(),
        );
        std::fs::write(dir.path().join("sshd_config"), config).unwrap();
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let log = std::fs::File::create(dir.path().join("sshd.log")).unwrap();
        let sshd = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|p| p.join("sshd"))
            .find(|p| p.is_file())
            .unwrap();
        // sshd re-executes itself: it wants its absolute path.
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f", &path("sshd_config")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd (scripts/setup installs openssh-server)");
        let port = lease.port;
        let sshd = Sshd {
            dir,
            child,
            _lease: lease,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen within 30 s: {}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn endpoint(&self) -> String {
        format!("ssh://root@127.0.0.1:{}", self.port)
    }

    /// A directory with an `ssh` wrapper that logs in with `identity` and trusts the host key
    /// `trusted` (its public half) for this server, or no host key at all.
    fn client(&self, name: &str, identity: &str, trusted: Option<&str>) -> PathBuf {
        let bin = self.dir.path().join(name);
        std::fs::create_dir_all(&bin).unwrap();
        let known_hosts = bin.join("known_hosts");
        let known = trusted.map(|key| {
            let public =
                std::fs::read_to_string(self.dir.path().join(format!("{key}.pub"))).unwrap();
            let mut fields = public.split_whitespace();
            format!(
                "[127.0.0.1]:{} {} {}\n",
                self.port,
                fields.next().unwrap(),
                fields.next().unwrap()
            )
        });
        std::fs::write(&known_hosts, known.unwrap_or_default()).unwrap();
        let config = bin.join("ssh_config");
        std::fs::write(
            &config,
            format!(
                "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  IdentityAgent none\n  \
                 UserKnownHostsFile {}\n  GlobalKnownHostsFile /dev/null\n",
                self.dir.path().join(identity).display(),
                known_hosts.display()
            ),
        )
        .unwrap();
        let wrapper = bin.join("ssh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec /usr/bin/ssh -F {} \"$@\"\n",
                config.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    /// The processes the server runs for its sessions (sshd forks one or two per connection).
    fn sessions(&self) -> Vec<u32> {
        descendants(self.child.id())
    }

    /// The ssh clients on this host connected to this server, as (pid, parent pid).
    fn clients(&self) -> Vec<(u32, u32)> {
        let port = self.port.to_string();
        processes()
            .into_iter()
            .filter(|(_, _, args)| {
                args.first().is_some_and(|a| a.ends_with("ssh"))
                    && args.windows(2).any(|w| w[0] == "-p" && w[1] == port)
            })
            .map(|(pid, parent, _)| (pid, parent))
            .collect()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process: pid, parent pid, arguments.
fn processes() -> Vec<(u32, u32, Vec<String>)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `PID (COMM) STATE PPID ...`: COMM may hold spaces and parentheses.
            let parent = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let args = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args = args
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, parent, args))
        })
        .collect()
}

fn descendants(root: u32) -> Vec<u32> {
    let all = processes();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    found.split_off(1)
}

/// Waits for `left`, which returns what is still wrong (empty: done), up to 60 s: what is
/// left behind stays forever, while a loaded host (CI's 2 cores under every test binary) can
/// take many seconds to end processes that are on their way out.
fn settles<T: std::fmt::Debug>(what: &str, mut left: impl FnMut() -> Vec<T>) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let still = left();
        if still.is_empty() {
            // How long it took, for the log of a failing run (how near the deadline it is).
            eprintln!("{what}: settled in {:?}", started.elapsed());
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {still:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_ssh_endpoint_applies_reports_destroys_and_leaves_no_ssh_process_behind() {
    let (s, sshd) = ssh_service("swssh");
    let client = sshd.client("client", "client_key", Some("host_key"));
    let tmp = s.imago.dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let search = format!(
        "{}:{}",
        client.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let imago = |args: &[&str]| common::Run {
        output: s
            .imago
            .cmd()
            .env("PATH", &search)
            .env("TMPDIR", &tmp)
            .args(args)
            .output()
            .unwrap(),
    };
    let imago_exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_imago")).unwrap();
    let no_orphans = || {
        // An ssh client still running belongs to a live imago (the controller apply started),
        // never to a command that has exited.
        sshd.clients()
            .into_iter()
            .filter(|(_, parent)| {
                std::fs::read_link(format!("/proc/{parent}/exe"))
                    .ok()
                    .as_ref()
                    != Some(&imago_exe)
            })
            .collect::<Vec<_>>()
    };

    let applied = imago(&["apply", "--timeout", "120s", "-f", &s.file()]).ok();
    assert!(
        applied.stdout().contains("deployment complete (release 1"),
        "{}",
        applied.stdout()
    );
    assert!(s.get().unwrap().contains("version 1"));
    assert_eq!(
        s.image(),
        format!(
            "{}/imago-test/web@{}",
            s.cluster.registry.host(),
            s.built_digest()
        )
    );
    settles("ssh clients left by a finished command", no_orphans);
    let status = imago(&["status", "--json", &s.name]).ok().json();
    let tasks = status["services"][0]["tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        tasks
            .iter()
            .filter(|t| t["phase"] == "running" && t["release"] == 1)
            .count(),
        3,
        "{status}"
    );
    assert_eq!(
        imago(&["plan", "--json", "-f", &s.file()]).ok().json()[0]["cluster"]["action"],
        "unchanged"
    );
    settles("ssh clients left by a finished command", no_orphans);

    imago(&["destroy", &s.name]).ok();
    assert!(s.cluster.service(&s.name).is_none(), "the service is gone");
    let controller: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.imago.home.join("deploy/controller.json")).unwrap(),
    )
    .unwrap();
    let controller = controller["pid"].as_u64().unwrap();
    // `destroy` removed the swarm service itself; the controller learns of it at its next
    // pass, which drops the service's task watch, and the watch's ssh engine and tunnel
    // directory go with it. Until then the watch is live, and a SIGTERM would leave its
    // directory as it leaves the controller's own (CI, and here at load 30: "2 tunnel
    // directories" when the stop came before that pass). What must not happen is that the
    // watch's directory stays once the pass dropped it.
    settles(
        "the destroyed service's task watch's tunnel directory",
        || {
            let dirs: Vec<_> = std::fs::read_dir(&tmp)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .filter(|name| {
                    name.to_str()
                        .and_then(|n| n.split('-').nth(2))
                        .is_some_and(|pid| pid == controller.to_string())
                })
                .collect();
            if dirs.len() > 1 { dirs } else { Vec::new() }
        },
    );
    imago(&["serve", "--stop"]).ok();
    settles("the stopped controller", || {
        std::fs::read_to_string(format!("/proc/{controller}/stat"))
            .into_iter()
            .filter(|stat| !stat.contains(") Z "))
            .collect::<Vec<_>>()
    });
    settles("ssh clients after the controller stopped", || {
        sshd.clients()
    });
    settles("sshd sessions after the controller stopped", || {
        sshd.sessions()
    });
    // The controller ends on SIGTERM without dropping its engines: its socket directory is
    // left, and the next ssh:// engine made on the host removes it (its process is gone).
    let abandoned = std::fs::read_dir(&tmp).unwrap().count();
    assert!(
        abandoned <= 1,
        "{abandoned} tunnel directories after one controller"
    );
    imago(&["plan", "-f", &s.file()]).ok();
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let owners: Vec<_> = left
        .iter()
        .filter_map(|name| name.to_str()?.split('-').nth(2))
        .map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .map(|args| String::from_utf8_lossy(&args).replace('\0', " "))
        .collect();
    assert!(
        left.is_empty(),
        "left in TMPDIR: {left:?}, by processes {owners:?}"
    );
}

#[test]
fn an_ssh_endpoint_that_fails_is_named_with_what_ssh_said() {
    let _machine = share_machine();
    let shared = cluster();
    let sshd = Sshd::start(&shared);
    let imago = Imago::new();
    std::fs::create_dir_all(imago.dir.path().join("www")).unwrap();
    std::fs::write(imago.dir.path().join("www/index.html"), "x").unwrap();
    let file = imago.dir.path().join("imago.toml");
    let original = std::fs::read_to_string(Path::new(EXAMPLE).join("imago.toml")).unwrap();
    std::fs::write(
        &file,
        original.replace("target_port = 8080", "target_port = 8080\ntarget = \"far\"")
            + &format!(
                "\n[target.far]\nengine = \"swarm\"\nendpoint = \"{}\"\nregistry = \"{}/imago-test\"\n",
                sshd.endpoint(),
                shared.registry.host()
            ),
    )
    .unwrap();
    let file = file.display().to_string();
    let cases = [
        (
            "wrong-host-key",
            "client_key",
            Some("other_host_key"),
            "has changed",
        ),
        (
            "unknown-host-key",
            "client_key",
            None,
            "Host key verification failed",
        ),
        (
            "stranger",
            "stranger_key",
            Some("host_key"),
            "Permission denied",
        ),
        (
            "no-docker",
            "no_docker_key",
            Some("host_key"),
            "docker: command not found",
        ),
    ];
    for (name, identity, trusted, said) in cases {
        let client = sshd.client(name, identity, trusted);
        let search = format!(
            "{}:{}",
            client.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // Batch mode: nothing waits for a prompt, which would wait forever. Given 60 s (a
        // loaded host's ssh and docker start take seconds), then killed and failed.
        let mut plan = imago
            .cmd()
            .env("PATH", &search)
            .args(["plan", "-f", &file])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while plan.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let waited = plan.try_wait().unwrap().is_none();
        if waited {
            let _ = plan.kill();
        }
        let out = plan.wait_with_output().unwrap();
        assert!(
            !waited,
            "{name}: plan still running after 60 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let error = common::Run { output: out }.fails();
        eprintln!("{name}: {error}");
        assert!(error.contains(&sshd.endpoint()), "{name}: {error}");
        assert!(error.contains(said), "{name}: {error}");
        assert!(sshd.clients().is_empty(), "{name}: ssh left running");
    }
}

#[test]
fn a_push_cut_mid_blob_fails_apply_records_nothing_and_a_retry_succeeds() {
    let s = SwarmService::new("swcut");
    let upstream = s.cluster.registry.host();
    // Every blob upload is cut after 32 KiB of its body.
    let proxy = Proxy::start(
        &upstream,
        vec![
            Fault::cut("PATCH", "/blobs/uploads/", 32 * 1024).always(),
            Fault::cut("PUT", "/blobs/uploads/", 32 * 1024).always(),
        ],
    );
    // A repository of its own: blobs other tests pushed are not there already.
    s.edit(
        &format!("registry = \"{upstream}/imago-test\""),
        &format!("registry = \"{}/imago-cut\"", proxy.host()),
    );
    let apply = || {
        let mut cmd = s.imago.cmd();
        cmd.env("IMAGO_REGISTRY_RETRIES", "1")
            .env("IMAGO_REGISTRY_BACKOFF_MS", "20")
            .args(["apply", "--timeout", "120s", "-f", &s.file()]);
        common::Run {
            output: cmd.output().unwrap(),
        }
    };
    let failed = apply().fails();
    assert!(
        failed.contains(&proxy.host()) && failed.contains("service swcut"),
        "the error names the service and the registry: {failed}"
    );
    assert!(
        proxy.records().iter().any(|r| r.fault.is_some()),
        "no upload was cut:\n{}",
        proxy.summary()
    );
    let history = s.imago.run(&["history", &s.name]).fails();
    assert!(history.contains("has no release"), "{history}");
    assert!(
        s.cluster.service(&s.name).is_none(),
        "nothing reached the swarm"
    );

    // The registry is reachable again: the same apply succeeds, as release 1.
    proxy.set_faults(vec![]);
    let applied = apply().ok();
    assert!(
        applied.stdout().contains("deployment complete (release 1"),
        "{}",
        applied.stdout()
    );
    assert_eq!(s.history().len(), 1);
    assert!(
        s.image()
            .starts_with(&format!("{}/imago-cut/web@sha256:", proxy.host()))
    );
    assert!(s.get().unwrap().contains("version 1"));
}

/// Runs `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    tool("ip", args);
}

/// A swarm of two nodes of its own, each a dockerd in a network namespace this test makes
/// (`--bridge=none --iptables=false --ip-forward=false`, own data root, exec root, pid file and
/// socket): the manager and a worker joined to it over a veth pair between the namespaces, each
/// namespace linked to the host by a veth pair too. The registry listens on the host end of the
/// manager's link, which the worker reaches through its own (the host's address, no
/// forwarding). Everything is torn down when dropped, whatever the test did.
struct TwoNodes {
    /// One at a time in this process: namespaces, links and subnets are named after its id.
    _alone: std::sync::MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    /// Namespaces and host-side links, removed on drop.
    netns: Vec<String>,
    links: Vec<String>,
    /// The manager's, then the worker's daemon.
    daemons: Vec<(Child, PathBuf)>,
    registry: Option<Registry>,
}

impl TwoNodes {
    fn start() -> TwoNodes {
        for program in ["dockerd", "docker", "ip", "nsenter", "docker-registry"] {
            require_tool(program);
        }
        let dir = tempfile::Builder::new()
            .prefix("imago-2n-")
            .tempdir()
            .unwrap();
        let pid = std::process::id();
        // Subnets of this process's own: 10.199.B.0/24, B..B+2.
        let b = (pid % 80) * 3;
        let net = |i: u32, host: u32| format!("10.199.{}.{host}", b + i);
        static TWO_NODES: Mutex<()> = Mutex::new(());
        let mut nodes = TwoNodes {
            _alone: TWO_NODES.lock().unwrap_or_else(|p| p.into_inner()),
            dir,
            netns: Vec::new(),
            links: Vec::new(),
            daemons: Vec::new(),
            registry: None,
        };
        let (m, w) = (format!("imago-m-{pid}"), format!("imago-w-{pid}"));
        for ns in [&m, &w] {
            ip(&["netns", "add", ns]);
            nodes.netns.push(ns.clone());
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // host <-> manager (0), host <-> worker (1), manager <-> worker (2).
        let links = [
            (format!("ih{pid}m"), None, &m, 0),
            (format!("ih{pid}w"), None, &w, 1),
            (format!("im{pid}w"), Some(&m), &w, 2),
        ];
        for (name, left_ns, right_ns, i) in &links {
            let peer = format!("{name}p");
            ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
            nodes.links.push(name.clone());
            ip(&["link", "set", &peer, "netns", right_ns]);
            ip(&[
                "-n",
                right_ns,
                "addr",
                "add",
                &format!("{}/24", net(*i, 2)),
                "dev",
                &peer,
            ]);
            ip(&["-n", right_ns, "link", "set", &peer, "up"]);
            match left_ns {
                Some(ns) => {
                    ip(&["link", "set", name, "netns", ns]);
                    ip(&[
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &format!("{}/24", net(*i, 1)),
                        "dev",
                        name,
                    ]);
                    ip(&["-n", ns, "link", "set", name, "up"]);
                }
                None => {
                    ip(&["addr", "add", &format!("{}/24", net(*i, 1)), "dev", name]);
                    ip(&["link", "set", name, "up"]);
                }
            }
        }
        // Each node reaches the host's addresses through its own link.
        ip(&["-n", &m, "route", "add", "default", "via", &net(0, 1)]);
        ip(&["-n", &w, "route", "add", "default", "via", &net(1, 1)]);
        let registry = Registry::start(RegistryOpts {
            listen: Some(net(0, 1).parse().unwrap()),
            ..RegistryOpts::plain()
        });
        let registry_host = registry.host();
        nodes.registry = Some(registry);
        for (ns, name) in [(&m, "manager"), (&w, "worker")] {
            let root = nodes.dir.path().join(name);
            std::fs::create_dir_all(&root).unwrap();
            let socket = root.join("docker.sock");
            let log = std::fs::File::create(root.join("dockerd.log")).unwrap();
            let child = Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{ns}"))
                .args([
                    "dockerd",
                    "--bridge=none",
                    "--iptables=false",
                    "--ip-forward=false",
                    "--insecure-registry",
                    &registry_host,
                    "--data-root",
                ])
                .arg(root.join("data"))
                .arg("--exec-root")
                .arg(root.join("exec"))
                .arg("--pidfile")
                .arg(root.join("dockerd.pid"))
                .arg("-H")
                .arg(format!("unix://{}", socket.display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start dockerd in its namespace");
            nodes.daemons.push((child, socket));
        }
        for i in 0..2 {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !nodes
                .docker_cmd(i, &["version"])
                .output()
                .is_ok_and(|o| o.status.success())
            {
                assert!(
                    Instant::now() < deadline,
                    "dockerd {i} did not answer within 60 s: {}",
                    nodes.log(i)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        nodes.docker(0, &["swarm", "init", "--advertise-addr", &net(2, 1)]);
        let token = nodes.docker(0, &["swarm", "join-token", "-q", "worker"]);
        nodes.docker(
            1,
            &[
                "swarm",
                "join",
                "--token",
                &token,
                "--advertise-addr",
                &net(2, 2),
                &format!("{}:2377", net(2, 1)),
            ],
        );
        let ready = nodes.docker(0, &["node", "ls", "--format", "{{.Status}}"]);
        assert_eq!(
            ready.lines().filter(|l| *l == "Ready").count(),
            2,
            "{ready}"
        );
        nodes
    }

    fn log(&self, i: usize) -> String {
        let name = if i == 0 { "manager" } else { "worker" };
        std::fs::read_to_string(self.dir.path().join(name).join("dockerd.log")).unwrap_or_default()
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.daemons[0].1.display())
    }

    fn registry(&self) -> &Registry {
        self.registry.as_ref().unwrap()
    }

    fn docker_cmd(&self, node: usize, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.daemons[node].1.display()))
            .args(args);
        cmd
    }

    fn docker(&self, node: usize, args: &[&str]) -> String {
        let out = self.docker_cmd(node, args).output().expect("run docker");
        assert!(
            out.status.success(),
            "docker {args:?} on node {node} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The id of the swarm's [`TASK_NETWORK`], if it has one.
    fn task_network(&self) -> Option<String> {
        let out = self
            .docker_cmd(
                0,
                &["network", "inspect", "--format", "{{.Id}}", TASK_NETWORK],
            )
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Waits until the manager has no [`TASK_NETWORK`] any more: the swarm removes it at
    /// once, the manager's own copy goes once the tasks attached to it there have stopped.
    fn task_network_goes(&self, after: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.task_network().is_some() {
            assert!(
                Instant::now() < deadline,
                "{TASK_NETWORK} is still there 60 s after {after}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Node id -> images of the running tasks of `service` there.
    fn running_by_node(&self, service: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        let ids = self.docker(
            0,
            &[
                "service",
                "ps",
                "-q",
                "--no-trunc",
                "--filter",
                "desired-state=running",
                service,
            ],
        );
        let mut by_node = std::collections::BTreeMap::<String, Vec<String>>::new();
        for id in ids.lines() {
            let task = self.docker(
                0,
                &[
                    "inspect",
                    "--format",
                    "{{.Status.State}} {{.NodeID}} {{.Spec.ContainerSpec.Image}}",
                    id,
                ],
            );
            let fields: Vec<&str> = task.split(' ').collect();
            if fields[0] == "running" {
                by_node
                    .entry(fields[1].to_owned())
                    .or_default()
                    .push(fields[2].to_owned());
            }
        }
        by_node
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        // Worker first: a manager that leaves first leaves a worker with no swarm to leave.
        for i in (0..self.daemons.len()).rev() {
            let _ = self.docker_cmd(i, &["swarm", "leave", "--force"]).output();
        }
        for (child, _) in &mut self.daemons {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (child, _) in &mut self.daemons {
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.registry = None;
        // A namespace takes the links inside it along; the host ends go with their peers.
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
    }
}

#[test]
fn a_service_on_two_nodes_rolls_over_and_back_with_tasks_on_both() {
    let _machine = share_machine();
    let nodes = TwoNodes::start();
    let imago = Imago::new();
    let dir = imago.dir.path().join("two");
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let example = std::fs::read_to_string(Path::new(EXAMPLE).join("imago.toml")).unwrap();
    let images = &example[..example.find("[service.web]").unwrap()];
    let write = |version: &str| {
        std::fs::write(dir.join("www/index.html"), format!("version {version}\n")).unwrap();
        std::fs::write(
            dir.join("imago.toml"),
            format!(
                "{images}\n[service.sw2n]\nimage = \"web\"\nreplicas = 4\ntarget = \"two\"\n\
                 env = {{ VERSION = \"{version}\" }}\nstop_grace_period = \"1s\"\n\n\
                 [service.sw2n.health]\ntype = \"http\"\nport = 8080\npath = \"/\"\n\
                 interval = \"500ms\"\ntimeout = \"2s\"\n\n\
                 [service.sw2n.rollout]\nmax_surge = 2\nmax_unavailable = 0\nmin_ready = \"500ms\"\ndrain = \"1s\"\n\
                 progress_deadline = \"90s\"\n\n\
                 [target.two]\nengine = \"swarm\"\nendpoint = \"{}\"\nregistry = \"{}/imago-2n\"\n",
                nodes.endpoint(),
                nodes.registry().host()
            ),
        )
        .unwrap();
    };
    // imago pushes in plain HTTP to the registry's non-loopback address only when told to.
    std::fs::create_dir_all(&imago.home).unwrap();
    std::fs::write(
        imago.home.join("config.toml"),
        format!("insecure_registries = [\"{}\"]\n", nodes.registry().host()),
    )
    .unwrap();
    let file = dir.join("imago.toml").display().to_string();
    let apply = |what: &str| {
        let out = imago.run(&["apply", "--timeout", "180s", "-f", &file]).ok();
        assert!(out.stdout().contains(what), "{}", out.stdout());
    };
    let guard = StopController(&imago);
    write("1");
    apply("deployment complete (release 1");
    let v1 = nodes.running_by_node("sw2n");
    assert_eq!(v1.len(), 2, "tasks on both nodes: {v1:?}");
    assert_eq!(v1.values().map(Vec::len).sum::<usize>(), 4, "{v1:?}");
    let image_v1 = v1.values().next().unwrap()[0].clone();

    // Rolls over: every task on both nodes runs the new digest.
    write("2");
    apply("deployment complete (release 2");
    let v2 = nodes.running_by_node("sw2n");
    assert_eq!(v2.len(), 2, "tasks on both nodes: {v2:?}");
    let images: std::collections::BTreeSet<_> = v2.values().flatten().cloned().collect();
    assert_eq!(images.len(), 1, "{v2:?}");
    assert_ne!(
        images.first(),
        Some(&image_v1),
        "release 2 runs a new digest"
    );

    // Rolls back: release 3 runs release 1's digest on both nodes again.
    let rolled = imago.run(&["rollback", "--timeout", "180s", "sw2n"]).ok();
    assert!(rolled.stdout().contains("release 3"), "{}", rolled.stdout());
    let back = nodes.running_by_node("sw2n");
    assert_eq!(back.len(), 2, "tasks on both nodes: {back:?}");
    assert!(
        back.values().flatten().all(|i| *i == image_v1),
        "{back:?} != {image_v1}"
    );
    // The last service on imago's task network is gone: so is the network, which imago made.
    // The manager keeps its own copy until the tasks there have stopped, which the next
    // apply, at once, must not take for the swarm's.
    let first = nodes.task_network().expect("imago made its task network");
    imago.run(&["destroy", "sw2n"]).ok();

    // Placement: at most one replica per node puts the two replicas on both nodes; a
    // constraint to workers puts every replica on the worker.
    let placed = imago.dir.path().join("placed");
    std::fs::create_dir_all(&placed).unwrap();
    copy_www(&dir, &placed);
    let image_tables = &example[..example.find("[service.web]").unwrap()];
    std::fs::write(
        placed.join("imago.toml"),
        format!(
            "{image_tables}\n[service.sw2p]\nimage = \"web\"\nreplicas = 2\ntarget = \"two\"\n\
             [service.sw2p.placement]\nmax_replicas_per_node = 1\n\n\
             [service.sw2w]\nimage = \"web\"\nreplicas = 2\ntarget = \"two\"\n\
             [service.sw2w.placement]\nconstraints = [\"node.role==worker\"]\n\n\
             [target.two]\nengine = \"swarm\"\nendpoint = \"{}\"\nregistry = \"{}/imago-2n\"\n",
            nodes.endpoint(),
            nodes.registry().host()
        ),
    )
    .unwrap();
    let file = placed.join("imago.toml").display().to_string();
    let out = imago
        .run(&["apply", "--timeout", "180s", "-f", &file])
        .ok()
        .stdout();
    assert_eq!(out.matches("deployment complete").count(), 2, "{out}");
    let spread = nodes.running_by_node("sw2p");
    assert_eq!(spread.len(), 2, "one task on each node: {spread:?}");
    assert!(spread.values().all(|t| t.len() == 1), "{spread:?}");
    assert_eq!(
        nodes.docker(
            0,
            &[
                "service",
                "inspect",
                "--format",
                "{{.Spec.TaskTemplate.Placement.MaxReplicas}}",
                "sw2p"
            ]
        ),
        "1"
    );
    let worker = nodes.docker(1, &["info", "--format", "{{.Swarm.NodeID}}"]);
    let on_worker = nodes.running_by_node("sw2w");
    assert_eq!(
        on_worker.keys().collect::<Vec<_>>(),
        [&worker],
        "{on_worker:?}"
    );
    assert_eq!(on_worker[&worker].len(), 2, "{on_worker:?}");
    // Made again for them (the first was removed); kept while a service uses it, and gone
    // with the last.
    let network = nodes.task_network().expect("made again for sw2p and sw2w");
    assert_ne!(network, first, "{TASK_NETWORK} was removed with sw2n");
    imago.run(&["destroy", "sw2p"]).ok();
    assert_eq!(nodes.task_network(), Some(network), "sw2w still uses it");
    assert_eq!(nodes.running_by_node("sw2w").len(), 1, "sw2w runs on");
    imago.run(&["destroy", "sw2w"]).ok();
    nodes.task_network_goes("the last destroy");
    drop(guard);
}

/// The site files of a test project, for a second project of the same images.
fn copy_www(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("www")).unwrap();
    for entry in std::fs::read_dir(from.join("www")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join("www").join(entry.file_name())).unwrap();
    }
}

/// Stops the home's controller however the test ends (before the swarm goes away).
struct StopController<'a>(&'a Imago);

impl Drop for StopController<'_> {
    fn drop(&mut self) {
        let _ = self.0.cmd().args(["serve", "--stop"]).output();
    }
}

/// Service `name` on a swarm target whose endpoint is an sshd of its own (the same daemon,
/// reached over ssh).
fn ssh_service(name: &str) -> (SwarmService, Sshd) {
    let s = SwarmService::new(name);
    let sshd = Sshd::start(&s.cluster);
    s.edit(
        &format!("endpoint = \"{}\"", s.cluster.host()),
        &format!("endpoint = \"{}\"", sshd.endpoint()),
    );
    (s, sshd)
}

/// `PATH` with `bin` (an [`Sshd::client`]) first.
fn with_ssh_of(bin: &Path) -> String {
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// An engine that is done with an `ssh://` endpoint ends its ssh processes as a user's ssh
/// ends: the server is told goodbye ("disconnected by user") on every session it opened, none
/// is cut off as by SIGKILL (then the server logs only "Connection closed by").
#[test]
fn an_ssh_endpoint_ends_every_ssh_session_with_a_goodbye() {
    let (s, sshd) = ssh_service("swbye");
    let client = sshd.client("client", "client_key", Some("host_key"));
    let planned = common::Run {
        output: s
            .imago
            .cmd()
            .env("PATH", with_ssh_of(&client))
            .args(["plan", "--json", "-f", &s.file()])
            .output()
            .unwrap(),
    }
    .ok();
    assert_eq!(planned.json()[0]["cluster"]["action"], "create");
    settles("ssh clients after plan", || sshd.clients());
    settles("sshd sessions after plan", || sshd.sessions());
    // Each session the server accepted (the harness's readiness probe never logged in), by
    // the client's port, said goodbye.
    let log = sshd.log();
    let sessions: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("Accepted publickey for root from 127.0.0.1 port "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let cut: Vec<&&str> = sessions
        .iter()
        .filter(|port| {
            !log.contains(&format!(
                "Received disconnect from 127.0.0.1 port {port}:11: disconnected by user"
            ))
        })
        .collect();
    assert!(
        !sessions.is_empty() && cut.is_empty(),
        "cut: {cut:?}\n{log}"
    );
}

/// A ProxyCommand may leave a process behind that holds ssh's stderr open (here a `sleep`
/// it starts, for jumping through the same sshd with `ssh -W`): once ssh itself is gone,
/// nothing waits for that pipe to end, and the command finishes as soon as its work is done.
#[test]
fn an_ssh_endpoint_does_not_wait_for_what_a_proxy_command_leaves_holding_stderr() {
    let (s, sshd) = ssh_service("swproxy");
    let client = sshd.client("proxied", "client_key", Some("host_key"));
    let config = client.join("ssh_config");
    let lingering = client.join("lingering.pids");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += &format!(
        "  ProxyCommand sh -c 'sleep 300 </dev/null >/dev/null & echo $! >>{}; exec /usr/bin/ssh -F {} -o ProxyCommand=none -W %h:%p -p %p %h'\n",
        lingering.display(),
        config.display()
    );
    std::fs::write(&config, text).unwrap();
    let mut plan = s
        .imago
        .cmd()
        .env("PATH", with_ssh_of(&client))
        .args(["plan", "--json", "-f", &s.file()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let finished = loop {
        if plan.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(120) {
            break plan.try_wait().unwrap().is_some();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    if !finished {
        let _ = plan.kill();
    }
    let output = plan.wait_with_output().unwrap();
    for pid in std::fs::read_to_string(&lingering)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| rustix::process::Pid::from_raw(pid.parse().ok()?))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    // Finished within 120 s: well before the lingering `sleep 300` ends, however loaded the
    // host.
    assert!(
        finished,
        "plan still running after {took:?}, waiting on a pipe the ProxyCommand's process holds"
    );
    let planned = common::Run { output }.ok();
    assert_eq!(planned.json()[0]["cluster"]["action"], "create");
    settles("ssh clients after plan", || sshd.clients());
}

/// Two imagos on one swarm (two engines, as two controllers). First, one destroys the last
/// service on `imago-tasks`, whose task on the manager takes 10 s to stop: the manager keeps
/// its copy of the network meanwhile, and answers a look-up with it; the other applies a
/// service at once, which must not be attached to that copy (its task would never start).
/// Then each applies and destroys a service of its own, many times, at random moments: the
/// last destroy of a moment removes the network, an apply beside it makes it again; no apply
/// fails, no service is ever left naming a network that is gone, and once both are destroyed
/// the network is gone.
#[cfg(feature = "swarm")]
#[test]
fn the_task_network_goes_with_the_last_service_and_never_from_under_one() {
    use imago_deploy::cluster::{ClusterEngine, ClusterService};
    let _machine = share_machine();
    let nodes = TwoNodes::start();
    // An image on the manager alone: busybox, imported.
    let root = nodes.dir.path().join("bb");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sleep")).unwrap();
    let tar = nodes.dir.path().join("bb.tar");
    tool(
        "tar",
        &[
            "-C",
            &root.display().to_string(),
            "-cf",
            &tar.display().to_string(),
            ".",
        ],
    );
    let imported = nodes
        .docker_cmd(0, &["import", "-", "imago-bb:1"])
        .stdin(std::fs::File::open(&tar).unwrap())
        .output()
        .unwrap();
    assert!(imported.status.success(), "{imported:?}");
    let sleeper = |name: &str| ClusterService {
        service: name.to_owned(),
        release: 1,
        revision: "r".to_owned(),
        config_hash: "sha256:00".to_owned(),
        image: "imago-bb:1".to_owned(),
        spec: serde_json::from_value(serde_json::json!({
            "image": "bb", "replicas": 1, "command": ["sleep", "1000"],
            "stop_grace_period": "10s",
            "target": {"name": "two", "engine": "swarm", "registry": "127.0.0.1:1/none"},
            "placement": {"constraints": ["node.role==manager"]}
        }))
        .unwrap(),
        paused: false,
    };
    let running = |name: &str| {
        let states = nodes.docker(
            0,
            &[
                "service",
                "ps",
                "--format",
                "{{.CurrentState}} {{.Error}}",
                name,
            ],
        );
        states.starts_with("Running")
    };
    let wait_running = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !running(name) {
            assert!(
                Instant::now() < deadline,
                "{name} not running after 60 s: {}",
                nodes.docker(0, &["service", "ps", "--no-trunc", name])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut first = imago_swarm::SwarmEngine::connect(&nodes.endpoint()).unwrap();
    first.apply(&sleeper("netcopy-a")).unwrap();
    wait_running("netcopy-a");
    let copy = nodes.task_network().unwrap();
    assert!(first.destroy("netcopy-a").unwrap());
    // The swarm removed it; the manager still shows its copy while the task stops.
    assert_eq!(nodes.task_network().as_ref(), Some(&copy));
    let mut second = imago_swarm::SwarmEngine::connect(&nodes.endpoint()).unwrap();
    second.apply(&sleeper("netcopy-b")).unwrap();
    wait_running("netcopy-b");
    assert!(second.destroy("netcopy-b").unwrap());
    // Racing rounds. Both threads start a round together; the round's leader (alternating)
    // applies and destroys at once, the other waits a random part of 0..1.5x the time the
    // last round's leader took. So some rounds overlap (an apply beside a destroy that finds
    // the network unused, the race under test) and some do not (the leader's destroy is the
    // last and removes the network), whatever the load: a fixed pause of milliseconds left
    // the removals to the scheduler's luck (one in 25 rounds under CI's load).
    const ROUNDS: usize = 25;
    let removed = AtomicUsize::new(0);
    let overlapped = AtomicUsize::new(0);
    let leader_took_ms = std::sync::atomic::AtomicU64::new(500);
    let round_start = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        for (n, name) in ["netrace-a", "netrace-b"].into_iter().enumerate() {
            let (nodes, removed, overlapped, leader_took_ms, round_start) =
                (&nodes, &removed, &overlapped, &leader_took_ms, &round_start);
            scope.spawn(move || {
                let mut engine = imago_swarm::SwarmEngine::connect(&nodes.endpoint()).unwrap();
                // Tasks that no node may run: the service exists, nothing is pulled or started.
                let spec = serde_json::json!({
                    "image": "web", "replicas": 1,
                    "target": {"name": "two", "engine": "swarm", "registry": "127.0.0.1:1/none"},
                    "placement": {"constraints": ["node.labels.imago-none==1"]}
                });
                let desired = ClusterService {
                    service: name.to_owned(),
                    release: 1,
                    revision: format!("r{n}"),
                    config_hash: "sha256:00".to_owned(),
                    image: format!("127.0.0.1:1/none@sha256:{}", "0".repeat(64)),
                    spec: serde_json::from_value(spec).unwrap(),
                    paused: false,
                };
                let mut seed = u64::from(std::process::id()) * 7919 + n as u64 + 1;
                let mut random = move |below: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % below.max(1)
                };
                for round in 0..ROUNDS {
                    round_start.wait();
                    let leads = round % 2 == n;
                    if !leads {
                        let span = leader_took_ms.load(Ordering::SeqCst) * 3 / 2;
                        std::thread::sleep(Duration::from_millis(random(span)));
                    }
                    let started = Instant::now();
                    engine
                        .apply(&desired)
                        .unwrap_or_else(|e| panic!("{name}, round {round}: apply: {e}"));
                    let attached = nodes.docker(
                        0,
                        &[
                            "service",
                            "inspect",
                            "--format",
                            "{{range .Spec.TaskTemplate.Networks}}{{.Target}} {{end}}",
                            name,
                        ],
                    );
                    let attached: Vec<&str> = attached.split_whitespace().collect();
                    assert_eq!(attached.len(), 1, "{name}: {attached:?}");
                    // The network the service names exists, and is imago's task network.
                    let network = nodes.docker(
                        0,
                        &["network", "inspect", "--format", "{{.Name}}", attached[0]],
                    );
                    assert_eq!(network, TASK_NETWORK, "{name}, round {round}");
                    let had = nodes.task_network().is_some();
                    let other = ["netrace-a", "netrace-b"][1 - n];
                    let beside = !nodes
                        .docker(
                            0,
                            &["service", "ls", "-q", "--filter", &format!("name={other}")],
                        )
                        .is_empty();
                    assert!(
                        engine
                            .destroy(name)
                            .unwrap_or_else(|e| panic!("{name}, round {round}: destroy: {e}"))
                    );
                    if leads {
                        let took = started.elapsed().as_millis();
                        leader_took_ms
                            .store(u64::try_from(took).unwrap_or(u64::MAX), Ordering::SeqCst);
                    }
                    if beside {
                        overlapped.fetch_add(1, Ordering::SeqCst);
                    }
                    if had && nodes.task_network().is_none() {
                        removed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    // Gone from the swarm; the manager's copy goes once netcopy-b's task has stopped.
    nodes.task_network_goes("both services were destroyed");
    eprintln!(
        "{ROUNDS} rounds x 2: network removed {removed:?} times, {overlapped:?} destroys beside the other service"
    );
    // Removed and made again along the way, not only at the end; and destroys that ran
    // while the other service stood (the race).
    assert!(removed.load(Ordering::SeqCst) > 1, "removed {removed:?}");
    assert!(
        overlapped.load(Ordering::SeqCst) > 1,
        "overlapped {overlapped:?}"
    );
    // Gone from the swarm; the manager's copy goes once netcopy-b's task has stopped.
    nodes.task_network_goes("both services were destroyed");
    let services = nodes.docker(0, &["service", "ls", "-q"]);
    assert_eq!(services, "", "no service left");
}

/// Each pass of the service made slower than the swarm's 2 s stop delay: it waits 3.5 s
/// between its look at the tasks and its routing (`IMAGO_TEST_CLUSTER_PASS_DELAY_MS`, standing
/// for a pass made slow by a loaded host, many local instances or a slow engine), so every
/// retirement falls inside a pass that looked before it. Two rolling updates of three tasks
/// under 16 clients: no request fails. The controller's watch of the tasks takes a retired
/// task out of the endpoint's routes itself (and routes a new one), and the slow pass cannot
/// put it back. Before that the watch only brought the next pass sooner, and the retired task
/// stayed routed until a pass that looked after its retirement had routed: 3.5 to 7 s, past
/// its stop. A watch that only removed left the endpoint with nothing to route when the swarm
/// replaced every routed task within one slow pass (1,225 of 32,377 requests failed).
#[test]
fn a_pass_slower_than_the_swarm_s_stop_delay_routes_no_retired_task() {
    let s = SwarmService::alone("swslowpass");
    let serve = s
        .imago
        .cmd()
        .env("IMAGO_TEST_CLUSTER_PASS_DELAY_MS", "3500")
        .args(["serve", "--interval", "250ms"])
        .output()
        .unwrap();
    assert!(serve.status.success(), "{serve:?}");
    updates_under_load_fail_no_request(&s, 2, |_| {});
}
