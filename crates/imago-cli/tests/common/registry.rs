//! The registry harness: a real registry (Debian's `docker-registry`, CNCF distribution 2.8) on a
//! leased loopback port, optionally behind htpasswd and TLS with a test CA; a recording,
//! fault-injecting HTTP/1.1 proxy in front of it; and builders of test images (an imago-built
//! busybox image, random-bytes images of given layer sizes).
//!
//! The proxy is plain threads over `std::net` with a tiny HTTP/1.1 parser: it must see and cut
//! bytes at exact offsets of a body, which a full HTTP stack hides, and it costs no compile time.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imago_layer::compression::Compression;
use imago_oci::Digest;

use super::{File, Imago, PortLease, lease_port};

/// Fails (never skips) when a tool the registry tests need is missing.
pub fn require_tool(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed (scripts/setup installs it); the registry tests need it"
    );
}

/// Runs a program, which must succeed; returns its stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The registry

#[derive(Clone, Debug, Default)]
pub struct RegistryOpts {
    /// htpasswd (bcrypt) with this one user and password.
    pub auth: Option<(String, String)>,
    /// HTTPS with a certificate for IP:127.0.0.1 signed by a test CA (`Registry::ca_cert`).
    pub tls: bool,
    /// The address to listen on instead of 127.0.0.1 (one of a network namespace link the
    /// test made, for nodes in that namespace).
    pub listen: Option<std::net::IpAddr>,
}

impl RegistryOpts {
    pub fn plain() -> RegistryOpts {
        RegistryOpts::default()
    }
    pub fn secure(user: &str, password: &str) -> RegistryOpts {
        RegistryOpts {
            auth: Some((user.into(), password.into())),
            tls: true,
            listen: None,
        }
    }
}

/// A `docker-registry` on 127.0.0.1 with its own storage; killed (SIGKILL) when dropped.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub opts: RegistryOpts,
    lease: PortLease,
    child: Option<Child>,
}

impl Registry {
    pub fn start(opts: RegistryOpts) -> Registry {
        require_tool("docker-registry");
        let dir = tempfile::tempdir().expect("registry tempdir");
        fs::create_dir_all(dir.path().join("storage")).unwrap();
        if opts.tls {
            make_certificates(dir.path());
        }
        if let Some((user, password)) = &opts.auth {
            require_tool("htpasswd");
            let line = tool("htpasswd", &["-Bbn", user, password]);
            fs::write(
                dir.path().join("htpasswd"),
                line.trim_end().to_owned() + "\n",
            )
            .unwrap();
        }
        let mut registry = Registry {
            dir,
            port: 0,
            opts,
            lease: lease_port(),
            child: None,
        };
        // A leased port was free when leased, but something that takes ports without a lease
        // can bind it before docker-registry does (AddrInUse, as the proxy met once in CI):
        // the registry needs no particular port, so it takes another lease.
        for attempt in 1.. {
            registry.port = registry.lease.port;
            registry.write_config();
            // A log of this attempt only: the reason read below is this attempt's.
            let _ = fs::remove_file(registry.log());
            match registry.spawn_once() {
                Ok(()) => break,
                Err(log) if attempt < 20 && log.contains("address already in use") => {
                    registry.lease = lease_port();
                }
                Err(log) => panic!("docker-registry exited at start:\n{log}"),
            }
        }
        registry
    }

    fn write_config(&self) {
        let dir = self.dir.path();
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}:{port}\n  secret: imago-test-secret\n",
            storage = dir.join("storage").display(),
            addr = self
                .opts
                .listen
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
            port = self.port,
        );
        if self.opts.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            ));
        }
        if self.opts.auth.is_some() {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: imago-test\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        fs::write(dir.join("config.yml"), config).unwrap();
    }

    fn spawn(&mut self) {
        if let Err(log) = self.spawn_once() {
            panic!("docker-registry exited at start:\n{log}");
        }
    }

    /// Starts docker-registry and waits until it answers; its log if it exited at start.
    fn spawn_once(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls `/v2/` until it answers (200, or 401 behind auth); the log if the registry exited.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "({status}) {}",
                    fs::read_to_string(self.log()).unwrap_or_default()
                ));
            }
            if let Ok((status, _)) = self.try_get("/v2/", false)
                && (status == 200 || status == 401)
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry on {} not ready after 60 s:\n{}",
                self.host(),
                fs::read_to_string(self.log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:PORT` (or the address it listens on), the name of the registry in references.
    pub fn host(&self) -> String {
        let addr = self
            .opts
            .listen
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
        format!("{addr}:{}", self.port)
    }

    pub fn url(&self) -> String {
        let scheme = if self.opts.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// The test CA's certificate (TLS only).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A directory holding only `ca.crt`, for skopeo's `--cert-dir` and docker's certs.d.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The registry's own output (access log included), across restarts.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Puts the test CA where imago looks for it: `$IMAGO_HOME/certs.d/HOST:PORT/ca.crt`.
    pub fn install_ca(&self, imago_home: &Path) {
        let dir = imago_home.join("certs.d").join(self.host());
        fs::create_dir_all(&dir).unwrap();
        fs::copy(self.ca_cert(), dir.join("ca.crt")).unwrap();
    }

    /// SIGKILL, as a crash would; the storage stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A request with curl (credentials and CA as configured): (status, body).
    fn try_get(&self, path: &str, auth: bool) -> Result<(u16, Vec<u8>), String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"]);
        cmd.args([
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json",
        ]);
        if self.opts.tls {
            cmd.arg("--cacert").arg(self.ca_cert());
        }
        if auth && let Some((user, password)) = &self.opts.auth {
            cmd.arg("-u").arg(format!("{user}:{password}"));
        }
        cmd.arg(format!("{}{path}", self.url()));
        let out = cmd.output().map_err(|e| format!("curl: {e}"))?;
        let mut body = out.stdout;
        let pos = body
            .iter()
            .rposition(|&b| b == b'\n')
            .ok_or("no status from curl")?;
        let status: u16 = String::from_utf8_lossy(&body[pos + 1..])
            .trim()
            .parse()
            .map_err(|e| format!("status: {e}"))?;
        body.truncate(pos);
        if status == 0 {
            return Err("no connection".into());
        }
        Ok((status, body))
    }

    /// GET `path` (e.g. `/v2/web/manifests/1`) with the registry's credentials: (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.try_get(path, true).unwrap()
    }

    /// The raw manifest (or index) bytes of `repo:tag` or `repo@digest`, straight from the
    /// registry; panics unless it answers 200.
    pub fn manifest(&self, repo: &str, reference: &str) -> Vec<u8> {
        let (status, body) = self.get(&format!("/v2/{repo}/manifests/{reference}"));
        assert_eq!(
            status,
            200,
            "manifest {repo}:{reference}: {}",
            String::from_utf8_lossy(&body)
        );
        body
    }

    /// The digest of the manifest bytes `repo:tag` names in the registry.
    pub fn manifest_digest(&self, repo: &str, tag: &str) -> String {
        Digest::of(&self.manifest(repo, tag)).to_string()
    }

    /// A blob's bytes, straight from the registry.
    pub fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let (status, body) = self.get(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(status, 200, "blob {repo}@{digest}");
        body
    }

    /// Flags for skopeo reading from this registry (`--src-...`) or writing to it (`--dest-...`).
    pub fn skopeo_flags(&self, side: &str) -> Vec<String> {
        let mut flags = Vec::new();
        if self.opts.tls {
            self.ensure_cert_dir();
            flags.push(format!("--{side}cert-dir={}", self.cert_dir().display()));
        } else {
            flags.push(format!("--{side}tls-verify=false"));
        }
        if let Some((user, password)) = &self.opts.auth {
            flags.push(format!("--{side}creds={user}:{password}"));
        }
        flags
    }

    fn ensure_cert_dir(&self) {
        let dir = self.cert_dir();
        if !dir.join("ca.crt").exists() {
            fs::create_dir_all(&dir).unwrap();
            fs::copy(self.ca_cert(), dir.join("ca.crt")).unwrap();
        }
    }

    /// `skopeo copy --all --preserve-digests SRC DEST` with this registry's flags on the
    /// side(s) that name it.
    pub fn skopeo_copy(&self, src: &str, dest: &str) {
        self.skopeo_copy_with(src, dest, &["--preserve-digests"]);
    }

    /// `skopeo copy --format FORMAT` (`v2s2`: Docker schema 2; digests change by design).
    pub fn skopeo_copy_format(&self, src: &str, dest: &str, format: &str) {
        self.skopeo_copy_with(src, dest, &["--format", format]);
    }

    fn skopeo_copy_with(&self, src: &str, dest: &str, extra: &[&str]) {
        require_tool("skopeo");
        let mut args: Vec<String> = vec!["copy".into(), "--all".into(), "--quiet".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        if src.starts_with("docker://") {
            args.extend(self.skopeo_flags("src-"));
        }
        if dest.starts_with("docker://") {
            args.extend(self.skopeo_flags("dest-"));
        }
        args.push(src.into());
        args.push(dest.into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tool("skopeo", &args);
    }

    /// `skopeo inspect --raw` of `docker://HOST/REFERENCE`: the manifest bytes skopeo reads.
    pub fn skopeo_raw(&self, reference: &str) -> Vec<u8> {
        require_tool("skopeo");
        let mut args: Vec<String> = vec!["inspect".into(), "--raw".into()];
        for flag in self.skopeo_flags("") {
            args.push(flag);
        }
        args.push(format!("docker://{}/{reference}", self.host()));
        let out = Command::new("skopeo").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "skopeo inspect --raw {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Every file below the storage directory (path → size), for "nothing half-written" checks.
    pub fn storage_files(&self) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let meta = fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    walk(root, &path, out);
                } else {
                    out.push((path.strip_prefix(root).unwrap().to_path_buf(), meta.len()));
                }
            }
        }
        walk(&self.storage(), &self.storage(), &mut out);
        out.sort();
        out
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test CA and a server certificate for IP:127.0.0.1 signed by it (P-256 keys: fast to make).
pub fn make_certificates(dir: &Path) {
    require_tool("openssl");
    let p = |name: &str| dir.join(name).display().to_string();
    tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-days",
            "2",
            "-subj",
            "/CN=imago test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
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
            &p("server.key"),
            "-out",
            &p("server.csr"),
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.crt"),
            "-days",
            "2",
            "-extfile",
            &p("server.ext"),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// The recording, fault-injecting proxy

/// What the proxy does to a matching request instead of (or while) forwarding it.
#[derive(Clone, Debug)]
pub enum Action {
    /// Answer this status without forwarding (the request body is read and dropped), with
    /// `Retry-After: N` seconds when given.
    Status {
        status: u16,
        retry_after: Option<u32>,
    },
    /// Forward, but cut the connection after `after` bytes of the blob body: the request body
    /// for PATCH/PUT/POST, the response body otherwise.
    Cut { after: u64 },
    /// Forward, but serve the response body with its first byte flipped (same length).
    Corrupt,
    /// Answer this canned response without forwarding.
    Serve {
        status: u16,
        headers: Vec<(String, String)>,
        body: Arc<Vec<u8>>,
    },
}

/// One fault: requests whose method matches (any when `None`) and whose path contains `path`
/// are counted (1-based); matches `from..from + times` get `action`.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: Option<String>,
    pub path: String,
    pub from: usize,
    pub times: usize,
    /// Only requests whose body may be longer than this (declared length, or chunked) count.
    pub body_over: Option<u64>,
    pub action: Action,
}

impl Fault {
    fn new(method: &str, path: &str, action: Action) -> Fault {
        Fault {
            method: (!method.is_empty() && method != "*").then(|| method.to_ascii_uppercase()),
            path: path.into(),
            from: 1,
            times: 1,
            body_over: None,
            action,
        }
    }
    /// Answer `status` to matching requests (method "" or "*" for any).
    pub fn status(method: &str, path: &str, status: u16) -> Fault {
        Fault::new(
            method,
            path,
            Action::Status {
                status,
                retry_after: None,
            },
        )
    }
    /// 429 with `Retry-After: seconds`.
    pub fn too_many(method: &str, path: &str, seconds: u32) -> Fault {
        Fault::new(
            method,
            path,
            Action::Status {
                status: 429,
                retry_after: Some(seconds),
            },
        )
    }
    /// For uploads only requests with a body longer than `after` count: a small blob's
    /// request never uses up the fault meant for a big one.
    pub fn cut(method: &str, path: &str, after: u64) -> Fault {
        let mut fault = Fault::new(method, path, Action::Cut { after });
        if matches!(fault.method.as_deref(), Some("PATCH" | "PUT" | "POST")) {
            fault.body_over = Some(after);
        }
        fault
    }
    pub fn corrupt(method: &str, path: &str) -> Fault {
        Fault::new(method, path, Action::Corrupt)
    }
    pub fn serve(
        method: &str,
        path: &str,
        status: u16,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Fault {
        Fault::new(
            method,
            path,
            Action::Serve {
                status,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: Arc::new(body),
            },
        )
    }
    /// The first matching request to fault (1-based).
    pub fn nth(mut self, n: usize) -> Fault {
        self.from = n;
        self
    }
    /// How many consecutive matching requests, from `nth`, get the fault.
    pub fn times(mut self, n: usize) -> Fault {
        self.times = n;
        self
    }
    /// Every matching request from `nth` on.
    pub fn always(self) -> Fault {
        self.times(usize::MAX)
    }

    fn matches(&self, method: &str, path: &str, body: Option<u64>) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && path.contains(&self.path)
            && match (self.body_over, body) {
                (Some(over), Some(len)) => len > over,
                _ => true,
            }
    }
}

/// One request that went through the proxy.
#[derive(Clone, Debug)]
pub struct Record {
    pub method: String,
    pub path: String,
    /// The status the client saw (0 when the connection was cut before a status).
    pub status: u16,
    /// Request body bytes received from the client.
    pub up: u64,
    /// Response body bytes sent to the client.
    pub down: u64,
    /// The fault applied, if any.
    pub fault: Option<String>,
}

struct ProxyState {
    faults: Mutex<Vec<(Fault, usize)>>,
    records: Mutex<Vec<Record>>,
    stop: AtomicBool,
    token: Option<TokenAuth>,
    own: String,
}

/// The bearer-token flow of registries like Docker Hub, played by the proxy: every `/v2/`
/// request without `Authorization: Bearer TOKEN` gets 401 with `WWW-Authenticate: Bearer
/// realm="http://PROXY/token",service="imago-test",scope="repository:REPO:pull,push"`, and
/// `GET /token` hands out the token: to anyone (`credentials: None`, anonymous tokens) or only
/// with Basic credentials.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    pub credentials: Option<(String, String)>,
}

pub const TEST_TOKEN: &str = "imago-test-token-0f1e2d";

/// Standard base64 (with padding), for comparing a Basic header.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An HTTP/1.1 proxy on a leased loopback port in front of a plain-HTTP registry. Clients talk
/// to it as if it were the registry (`Proxy::host`); the `Host` header passes unchanged, so the
/// registry's upload `Location`s point back at the proxy.
pub struct Proxy {
    pub port: u16,
    _lease: PortLease,
    upstream: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    /// `upstream` is `HOST:PORT` of a plain-HTTP registry.
    pub fn start(upstream: &str, faults: Vec<Fault>) -> Proxy {
        Proxy::start_with(upstream, faults, None)
    }

    /// A proxy that also plays a token server (see `TokenAuth`).
    pub fn with_token_auth(upstream: &str, token: TokenAuth) -> Proxy {
        Proxy::start_with(upstream, vec![], Some(token))
    }

    fn start_with(upstream: &str, faults: Vec<Fault>, token: Option<TokenAuth>) -> Proxy {
        // A leased port was free when leased, but something that takes ports without a lease
        // can bind it before this does (seen once in CI: AddrInUse): the proxy needs no
        // particular port, so it takes another lease.
        let (lease, listener) = (0..20)
            .find_map(|_| {
                let lease = lease_port();
                match TcpListener::bind(("127.0.0.1", lease.port)) {
                    Ok(listener) => Some((lease, listener)),
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => None,
                    Err(e) => panic!("bind proxy on {}: {e}", lease.port),
                }
            })
            .expect("bind proxy: 20 leased ports were taken meanwhile");
        let state = Arc::new(ProxyState {
            faults: Mutex::new(faults.into_iter().map(|f| (f, 0)).collect()),
            records: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            token,
            own: format!("127.0.0.1:{}", lease.port),
        });
        let accept_state = state.clone();
        let upstream_addr = upstream.to_owned();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if accept_state.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let state = accept_state.clone();
                let upstream = upstream_addr.clone();
                std::thread::spawn(move || {
                    let _ = serve_connection(conn, &upstream, &state);
                });
            }
        });
        Proxy {
            port: lease.port,
            _lease: lease,
            upstream: upstream.to_owned(),
            state,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Replaces the fault policy (counts start again).
    pub fn set_faults(&self, faults: Vec<Fault>) {
        *self.state.faults.lock().unwrap() = faults.into_iter().map(|f| (f, 0)).collect();
    }

    /// Every request so far, in the order they completed.
    pub fn records(&self) -> Vec<Record> {
        self.state.records.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.state.records.lock().unwrap().clear();
    }

    /// Waits until no request has been recorded for 300 ms (at most 10 s): a request is
    /// recorded after its answer was relayed, so a client that has finished may be ahead of
    /// the proxy threads' records on a loaded host.
    pub fn settle(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut seen = self.records().len();
        let mut quiet_since = std::time::Instant::now();
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.records().len();
            if now != seen {
                seen = now;
                quiet_since = std::time::Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(300) {
                return;
            }
        }
    }

    /// Request body bytes of every blob upload (PATCH/PUT/POST under `/blobs/uploads/`).
    pub fn blob_bytes_uploaded(&self) -> u64 {
        self.records()
            .iter()
            .filter(|r| r.path.contains("/blobs/uploads/"))
            .map(|r| r.up)
            .sum()
    }

    /// A readable list of the requests, for assertion messages.
    pub fn summary(&self) -> String {
        self.records()
            .iter()
            .map(|r| {
                format!(
                    "{} {} -> {} up {} down {}{}\n",
                    r.method,
                    r.path,
                    r.status,
                    r.up,
                    r.down,
                    r.fault
                        .as_ref()
                        .map(|f| format!(" [{f}]"))
                        .unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn framing(&self, default: Framing) -> Framing {
        if self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked
        } else if let Some(len) = self.header("content-length") {
            Framing::Length(len.trim().parse().unwrap_or(0))
        } else {
            default
        }
    }
    fn write_to(
        &self,
        out: &mut impl Write,
        drop: &[&str],
        extra: &[(&str, String)],
    ) -> std::io::Result<()> {
        let mut text = format!("{}\r\n", self.start);
        for (k, v) in &self.headers {
            if !drop.iter().any(|d| k.eq_ignore_ascii_case(d)) {
                text.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        for (k, v) in extra {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        out.write_all(text.as_bytes())?;
        out.flush()
    }
}

/// Reads a request or response head; `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut start = String::new();
    loop {
        start.clear();
        if r.read_line(&mut start)? == 0 {
            return Ok(None);
        }
        if !start.trim().is_empty() {
            break;
        }
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof in head",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok(Some(Head {
        start: start.trim_end().to_owned(),
        headers,
    }))
}

/// Copies a body with `framing` from `r` to `w` (raw framing kept), counting data bytes. With
/// `limit`, stops after that many data bytes and returns `cut = true`. With `corrupt`, the first
/// data byte is flipped. `w = None` reads and drops.
fn copy_body(
    r: &mut impl BufRead,
    mut w: Option<&mut TcpStream>,
    framing: Framing,
    limit: Option<u64>,
    corrupt: bool,
) -> std::io::Result<(u64, bool)> {
    let mut count = 0u64;
    let mut flipped = !corrupt;
    let mut buf = vec![0u8; 64 * 1024];
    // Copies up to `n` data bytes (None: until EOF); returns false when cut.
    let mut data = |r: &mut dyn BufRead,
                    w: &mut Option<&mut TcpStream>,
                    n: Option<u64>,
                    count: &mut u64|
     -> std::io::Result<bool> {
        let mut left = n;
        loop {
            if left == Some(0) {
                return Ok(true);
            }
            let mut want = buf.len() as u64;
            if let Some(l) = left {
                want = want.min(l);
            }
            if let Some(limit) = limit {
                if *count >= limit {
                    return Ok(false);
                }
                want = want.min(limit - *count);
            }
            let got = r.read(&mut buf[..want as usize])?;
            if got == 0 {
                if left.is_some() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "eof in body",
                    ));
                }
                return Ok(true);
            }
            if !flipped {
                buf[0] ^= 0xff;
                flipped = true;
            }
            if let Some(w) = w.as_mut() {
                w.write_all(&buf[..got])?;
            }
            *count += got as u64;
            if let Some(l) = left.as_mut() {
                *l -= got as u64;
            }
        }
    };
    match framing {
        Framing::None => Ok((0, false)),
        Framing::Length(n) => {
            let whole = data(r, &mut w, Some(n), &mut count)?;
            Ok((count, !whole))
        }
        Framing::UntilClose => {
            let whole = data(r, &mut w, None, &mut count)?;
            Ok((count, !whole))
        }
        Framing::Chunked => loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "eof in chunk size",
                ));
            }
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if let Some(w) = w.as_mut() {
                w.write_all(line.as_bytes())?;
            }
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t)?;
                    if let Some(w) = w.as_mut() {
                        w.write_all(t.as_bytes())?;
                    }
                    if t.trim().is_empty() {
                        break;
                    }
                }
                return Ok((count, false));
            }
            if !data(r, &mut w, Some(size), &mut count)? {
                return Ok((count, true));
            }
            let mut crlf = String::new();
            r.read_line(&mut crlf)?;
            if let Some(w) = w.as_mut() {
                w.write_all(crlf.as_bytes())?;
            }
        },
    }
}

type Answer = (u16, Vec<(String, String)>, String);

/// The token flow's own answer to a request, if it is not to be forwarded: the token endpoint,
/// or 401 for a `/v2/` request without the token.
fn token_answer(token: &TokenAuth, own: &str, path: &str, head: &Head) -> Option<Answer> {
    if path.starts_with("/token") {
        let allowed = match &token.credentials {
            None => true,
            Some((user, password)) => {
                head.header("authorization")
                    == Some(&format!(
                        "Basic {}",
                        base64(format!("{user}:{password}").as_bytes())
                    ))
            }
        };
        return Some(if allowed {
            (
                200,
                vec![],
                format!(
                    "{{\"token\":\"{TEST_TOKEN}\",\"access_token\":\"{TEST_TOKEN}\",\"expires_in\":300}}"
                ),
            )
        } else {
            (
                401,
                vec![],
                "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"bad credentials\"}]}".into(),
            )
        });
    }
    if head.header("authorization") == Some(&format!("Bearer {TEST_TOKEN}")) {
        return None;
    }
    let mut challenge = format!("Bearer realm=\"http://{own}/token\",service=\"imago-test\"");
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    if let Some(end) = ["/blobs/", "/manifests/", "/tags/"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
    {
        challenge.push_str(&format!(",scope=\"repository:{}:pull,push\"", &rest[..end]));
    }
    Some((
        401,
        vec![("WWW-Authenticate".into(), challenge)],
        "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}".into(),
    ))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a response the proxy makes up itself; returns the body bytes sent (none to a HEAD).
fn answer_canned(
    to: &mut TcpStream,
    method: &str,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
) -> std::io::Result<u64> {
    let mut text = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if close {
        text.push_str("Connection: close\r\n");
    }
    text.push_str("\r\n");
    to.write_all(text.as_bytes())?;
    if method == "HEAD" {
        return Ok(0);
    }
    to.write_all(body)?;
    Ok(body.len() as u64)
}

fn serve_connection(client: TcpStream, upstream: &str, state: &ProxyState) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut client_w = client.try_clone()?;
    let mut client_r = BufReader::new(client);
    loop {
        let Some(head) = read_head(&mut client_r)? else {
            return Ok(());
        };
        let mut parts = head.start.split_whitespace();
        let method = parts.next().unwrap_or("").to_ascii_uppercase();
        let path = parts.next().unwrap_or("").to_owned();
        let body_framing = head.framing(Framing::None);
        let client_close = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));

        if let Some(token) = &state.token
            && let Some(answer) = token_answer(token, &state.own, &path, &head)
        {
            let (up, _) = copy_body(&mut client_r, None, body_framing, None, false)?;
            let (status, mut headers, body) = answer;
            headers.push(("Content-Type".into(), "application/json".into()));
            let down = answer_canned(
                &mut client_w,
                &method,
                status,
                &headers,
                body.as_bytes(),
                false,
            )?;
            state.records.lock().unwrap().push(Record {
                method: method.clone(),
                path: path.clone(),
                status,
                up,
                down,
                fault: Some("token auth".into()),
            });
            if client_close {
                return Ok(());
            }
            continue;
        }
        let declared = match body_framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
            Framing::None | Framing::UntilClose => Some(0),
        };
        let action = {
            let mut faults = state.faults.lock().unwrap();
            // A fault counts only the requests it saw: one that an earlier fault answered never
            // reached it (counting those made `nth` depend on the other faults' timing).
            let mut chosen = None;
            for (fault, seen) in faults.iter_mut() {
                if fault.matches(&method, &path, declared) {
                    *seen += 1;
                    if *seen >= fault.from && *seen - fault.from < fault.times {
                        chosen = Some(fault.action.clone());
                        break;
                    }
                }
            }
            chosen
        };
        let mut record = Record {
            method: method.clone(),
            path: path.clone(),
            status: 0,
            up: 0,
            down: 0,
            fault: action
                .as_ref()
                .map(|a| format!("{a:?}").chars().take(60).collect()),
        };
        let push = |record: Record| state.records.lock().unwrap().push(record);

        // Answered without forwarding: the injected status or the canned response.
        let canned = match &action {
            Some(Action::Status {
                status,
                retry_after,
            }) => {
                let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
                if let Some(s) = retry_after {
                    headers.push(("Retry-After".into(), s.to_string()));
                }
                let body = format!(
                    "{{\"errors\":[{{\"code\":\"UNKNOWN\",\"message\":\"injected {status}\"}}]}}"
                );
                Some((*status, headers, Arc::new(body.into_bytes())))
            }
            Some(Action::Serve {
                status,
                headers,
                body,
            }) => Some((*status, headers.clone(), body.clone())),
            _ => None,
        };
        if let Some((status, headers, body)) = canned {
            let (up, _) = copy_body(&mut client_r, None, body_framing, None, false)?;
            record.up = up;
            record.status = status;
            record.down =
                answer_canned(&mut client_w, &method, status, &headers, &body, true).unwrap_or(0);
            push(record);
            let _ = client_w.shutdown(Shutdown::Both);
            return Ok(());
        }

        let is_upload = matches!(method.as_str(), "PATCH" | "PUT" | "POST");
        let cut = match action {
            Some(Action::Cut { after }) => Some(after),
            _ => None,
        };
        let corrupt = matches!(action, Some(Action::Corrupt));

        // One upstream connection per request: the response is then framed by length, chunks
        // or the close, and a cut never leaves a half-used upstream connection behind.
        let mut up_w = match TcpStream::connect(upstream) {
            Ok(s) => s,
            Err(_) => {
                record.status = 502;
                push(record);
                let _ = client_w.write_all(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                let _ = client_w.shutdown(Shutdown::Both);
                return Ok(());
            }
        };
        up_w.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut up_r = BufReader::new(up_w.try_clone()?);
        head.write_to(
            &mut up_w,
            &["connection", "keep-alive", "proxy-connection"],
            &[("Connection", "close".into())],
        )?;
        let (up, cut_up) = copy_body(
            &mut client_r,
            Some(&mut up_w),
            body_framing,
            if is_upload { cut } else { None },
            false,
        )?;
        record.up = up;
        if cut_up {
            push(record);
            let _ = up_w.shutdown(Shutdown::Both);
            let _ = client_w.shutdown(Shutdown::Both);
            return Ok(());
        }
        let Some(resp) = read_head(&mut up_r)? else {
            push(record);
            let _ = client_w.shutdown(Shutdown::Both);
            return Ok(());
        };
        let status: u16 = resp
            .start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        record.status = status;
        let resp_framing = if method == "HEAD" || status == 204 || status == 304 || status < 200 {
            Framing::None
        } else {
            resp.framing(Framing::UntilClose)
        };
        let close_after = client_close || resp_framing == Framing::UntilClose;
        resp.write_to(
            &mut client_w,
            &["connection", "keep-alive"],
            &[(
                "Connection",
                if close_after { "close" } else { "keep-alive" }.into(),
            )],
        )?;
        let (down, cut_down) = copy_body(
            &mut up_r,
            Some(&mut client_w),
            resp_framing,
            if is_upload { None } else { cut },
            corrupt,
        )?;
        record.down = down;
        push(record);
        client_w.flush()?;
        if cut_down || close_after {
            let _ = client_w.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test images

/// An `imago.toml` for image `name`: busybox-static, `/www/index.html` = `page`, busybox httpd
/// on 8080 as in examples/web, `[service.NAME]` only when `service` is given (its TOML body).
pub fn web_definition(name: &str, extra: &str) -> String {
    format!(
        r#"
[image.{name}]
platform = "linux/amd64"

[[image.{name}.layer]]
name = "busybox"
copy = [
  {{ src = "/bin/busybox", dest = "/bin/busybox", mode = "0755", outside_context = true }},
]
symlink = [
  {{ path = "/bin/sh", target = "busybox" }},
  {{ path = "/bin/cat", target = "busybox" }},
  {{ path = "/bin/httpd", target = "busybox" }},
]
dir = [{{ path = "/tmp", mode = "1777" }}]
file = [
  {{ path = "/etc/passwd", content = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n" }},
]

[[image.{name}.layer]]
name = "site"
copy = [{{ src = "www", dest = "/www/", mode = "0644", dir_mode = "0755" }}]

[image.{name}.config]
entrypoint = ["/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
workdir = "/www"
ports = ["8080/tcp"]
{extra}
"#
    )
}

/// Builds the busybox web image `name` (page `page`) with `imago build` in `imago`'s home, in
/// the directory `dir` (created); returns its manifest digest.
pub fn build_web_image(imago: &Imago, dir: &Path, name: &str, page: &str) -> String {
    require_tool("busybox");
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    fs::create_dir_all(dir.join("www")).unwrap();
    fs::write(dir.join("www/index.html"), page).unwrap();
    fs::write(dir.join("imago.toml"), web_definition(name, "")).unwrap();
    let out = imago
        .cmd()
        .current_dir(dir)
        .args(["build", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imago build {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(digest.starts_with("sha256:"), "build printed {digest:?}");
    digest
}

/// Deterministic pseudo-random bytes (xorshift64*), incompressible like real binaries.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub const MB: u64 = 1_000_000;

/// An image named `name` in `imago`'s store with one uncompressed layer per size, each holding
/// one file of random bytes (`seed` makes images differ); returns the manifest digest.
pub fn random_image(imago: &Imago, name: &str, layer_sizes: &[u64], seed: u64) -> String {
    let store = imago.store();
    let contents: Vec<Vec<u8>> = layer_sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| random_bytes(size as usize, seed.wrapping_add(i as u64 * 7919)))
        .collect();
    let paths: Vec<String> = (0..layer_sizes.len())
        .map(|i| format!("data/layer{i}.bin"))
        .collect();
    let layers: Vec<Vec<File<'_>>> = contents
        .iter()
        .zip(&paths)
        .map(|(content, path)| vec![super::file(path, content)])
        .collect();
    let layers: Vec<&[File<'_>]> = layers.iter().map(Vec::as_slice).collect();
    super::make_layered_image(&store, name, &layers, Compression::None, &[]).to_string()
}

/// Writes image `reference` of `imago`'s store as an OCI layout directory `dir` (via
/// `imago export`), for skopeo's `oci:DIR:TAG`; the tag inside is what the archive names.
pub fn export_oci_layout(imago: &Imago, reference: &str, dir: &Path) {
    let archive = dir.with_extension("tar");
    imago
        .run(&["export", "-o", archive.to_str().unwrap(), reference])
        .ok();
    fs::create_dir_all(dir).unwrap();
    tool(
        "tar",
        &[
            "-xf",
            archive.to_str().unwrap(),
            "-C",
            dir.to_str().unwrap(),
        ],
    );
    let _ = fs::remove_file(archive);
}

// ---------------------------------------------------------------------------------------------
// Running imago against registries

/// `imago` for registry tests: `DOCKER_CONFIG` points at an empty directory of the test (the
/// host's `~/.docker` never leaks in) and retries back off 20 ms, so fault tests stay fast.
pub fn cmd(imago: &Imago) -> Command {
    let docker_config = imago.dir.path().join("docker-config");
    fs::create_dir_all(&docker_config).unwrap();
    let mut cmd = imago.cmd();
    cmd.env("DOCKER_CONFIG", &docker_config)
        .env("IMAGO_REGISTRY_BACKOFF_MS", "20")
        .env_remove("IMAGO_REGISTRY_RETRIES");
    cmd
}

pub fn run(imago: &Imago, args: &[&str]) -> super::Run {
    super::Run {
        output: cmd(imago).args(args).output().expect("run imago"),
    }
}

/// `imago --json ARGS`, which must succeed.
pub fn run_json(imago: &Imago, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    run(imago, &all).ok().json()
}

/// The digests of every blob in the store.
pub fn store_blobs(imago: &Imago) -> std::collections::BTreeSet<String> {
    let dir = imago.home.join("store/blobs/sha256");
    fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

/// A blob's bytes from the store.
pub fn store_blob(imago: &Imago, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    fs::read(imago.home.join("store/blobs/sha256").join(hex))
        .unwrap_or_else(|e| panic!("blob {digest} not in the store: {e}"))
}

/// Files left in the store's temp directory (a half-written blob would be one).
pub fn store_temp_files(imago: &Imago) -> Vec<PathBuf> {
    fs::read_dir(imago.home.join("store/.imago/tmp"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The names in the store (`imago images`).
pub fn store_names(imago: &Imago) -> Vec<String> {
    run_json(imago, &["images"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// `imago verify` of the whole store finds no problem.
pub fn assert_store_valid(imago: &Imago) {
    let report = run_json(imago, &["verify"]);
    assert_eq!(
        report["problems"],
        serde_json::json!([]),
        "imago verify: {report}"
    );
}

/// Every blob a manifest (bytes) refers to: config first, then the layers.
pub fn manifest_blobs(manifest: &[u8]) -> Vec<(String, u64)> {
    let doc: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    std::iter::once(&doc["config"])
        .chain(doc["layers"].as_array().into_iter().flatten())
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_owned(),
                d["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until `check` holds, polling every 50 ms; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
