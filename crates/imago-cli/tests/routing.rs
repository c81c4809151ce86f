//! Host-routed endpoints (issue 15): several services on one port by HTTP `Host`, TLS
//! terminated with certificates from files, real instances behind a real controller and data
//! plane, asked with curl (`--resolve`, `--cacert`) as a user would.
//!
//! Needs root (instances), busybox-static (the example image), curl and openssl.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Imago;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/web");

/// Two services of the example image, `shop` and `blog`, each serving its own directory, both
/// on 127.0.0.1:PORT by host name; with TLS, each with its own self-signed certificate.
struct Site {
    imago: Imago,
    dir: PathBuf,
    port: u16,
    tls: bool,
    _lease: common::PortLease,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.imago.cmd().args(["destroy", "shop", "blog"]).output();
        let _ = self.imago.cmd().args(["serve", "--stop"]).output();
    }
}

fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        found,
        "{tool} is needed by this test (apt-get install {tool}; scripts/setup installs it)"
    );
}

/// A self-signed certificate for `host` and `*.host` (P-256), written to NAME.pem / NAME.key.
fn make_cert(dir: &Path, name: &str, host: &str, organisation: &str) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-keyout"])
        .arg(dir.join(format!("{name}.key.new")))
        .arg("-out")
        .arg(dir.join(format!("{name}.pem.new")))
        .args(["-subj", &format!("/O={organisation}/CN={host}")])
        .args([
            "-addext",
            &format!("subjectAltName=DNS:{host},DNS:*.{host}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each file replaced by a rename, as a certificate renewal tool does.
    for ext in ["key", "pem"] {
        std::fs::rename(
            dir.join(format!("{name}.{ext}.new")),
            dir.join(format!("{name}.{ext}")),
        )
        .unwrap();
    }
}

impl Site {
    fn new(tls: bool) -> Site {
        need("curl");
        need("openssl");
        let imago = Imago::new();
        let dir = imago.dir.path().join("site");
        copy_dir(Path::new(EXAMPLE), &dir);
        let lease = common::lease_port();
        let site = Site {
            imago,
            dir,
            port: lease.port,
            tls,
            _lease: lease,
        };
        site.set_page("shop", "shop v1");
        site.set_page("blog", "blog v1");
        if tls {
            std::fs::create_dir_all(site.dir.join("certs")).unwrap();
            make_cert(&site.dir.join("certs"), "shop", "shop.example", "first");
            make_cert(&site.dir.join("certs"), "blog", "blog.example", "first");
        }
        site.write_definition();
        site
    }

    fn set_page(&self, service: &str, text: &str) {
        let www = self.dir.join("www").join(service);
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), format!("{text}\n")).unwrap();
    }

    fn write_definition(&self) {
        let example = std::fs::read_to_string(Path::new(EXAMPLE).join("imago.toml")).unwrap();
        let images = &example[..example.find("[service.web]").unwrap()];
        let mut text = images.to_owned();
        for service in ["shop", "blog"] {
            let tls = if self.tls {
                format!(
                    "tls = {{ cert = \"certs/{service}.pem\", key = \"certs/{service}.key\" }}\n"
                )
            } else {
                String::new()
            };
            text.push_str(&format!(
                r#"
[service.{service}]
image = "web"
replicas = 2
bind = "127.0.0.1:{port}"
hosts = ["{service}.example", "*.{service}.example"]
{tls}target_port = 8080
command = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www/{service}"]
stop_grace_period = "1s"

[service.{service}.health]
type = "http"
path = "/"
interval = "200ms"
timeout = "1s"
healthy_threshold = 1

[service.{service}.rollout]
max_surge = 1
max_unavailable = 0
min_ready = "300ms"
drain = "1s"
"#,
                port = self.port
            ));
        }
        std::fs::write(self.dir.join("imago.toml"), text).unwrap();
    }

    /// Health checks 500 ms apart instead of 200 ms: 16 busy clients on a loaded host slow the
    /// new instances' start, and three failed checks in a row fail a rollout's health gate.
    fn check_every_500ms(&self) {
        let path = self.dir.join("imago.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("interval = \"200ms\"", "interval = \"500ms\""),
        )
        .unwrap();
    }

    fn file(&self) -> String {
        self.dir.join("imago.toml").display().to_string()
    }

    fn apply(&self) -> common::Run {
        self.imago.run(&["apply", "-f", &self.file()])
    }

    fn cert(&self, service: &str) -> PathBuf {
        self.dir.join("certs").join(format!("{service}.pem"))
    }

    /// `curl` for `host` on the site's port, resolved to 127.0.0.1: (status, body).
    fn curl(&self, host: &str, cacert: Option<&Path>) -> Result<(u16, String), String> {
        curl(self.port, self.tls, host, cacert)
    }

    fn events(&self) -> String {
        self.imago.run(&["events"]).ok().stdout()
    }
}

fn curl(port: u16, tls: bool, host: &str, cacert: Option<&Path>) -> Result<(u16, String), String> {
    let scheme = if tls { "https" } else { "http" };
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")]);
    match cacert {
        Some(ca) => {
            cmd.arg("--cacert").arg(ca);
        }
        None if tls => {
            cmd.arg("-k");
        }
        None => {}
    }
    let out = cmd
        .arg(format!("{scheme}://{host}:{port}/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "curl {host}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code
        .trim()
        .parse()
        .map_err(|_| format!("no status: {text:?}"))?;
    Ok((code, body.to_owned()))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn two_services_share_one_port_by_host_name_and_an_unknown_host_gets_404() {
    let site = Site::new(false);
    site.apply().ok();
    assert_eq!(
        site.curl("shop.example", None).unwrap(),
        (200, "shop v1\n".into())
    );
    assert_eq!(
        site.curl("blog.example", None).unwrap(),
        (200, "blog v1\n".into())
    );
    // A wildcard takes one label in front of the name.
    assert_eq!(
        site.curl("www.shop.example", None).unwrap(),
        (200, "shop v1\n".into())
    );
    let (code, body) = site.curl("other.example", None).unwrap();
    assert_eq!(code, 404, "{body}");
    assert_eq!(body, "no service for host \"other.example\"\n");
    let events = site.events();
    assert!(
        events.contains("HTTP routed by host name (shop.example, *.shop.example)")
            && !events.contains("kernel balancing)"),
        "{events}"
    );
}

#[test]
fn a_third_service_on_a_host_routed_port_without_hosts_is_refused_at_plan_time() {
    let site = Site::new(false);
    let path = site.dir.join("imago.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{text}\n[service.plain]\nimage = \"web\"\nbind = \"127.0.0.1:{}\"\ntarget_port = 8080\n",
            site.port
        ),
    )
    .unwrap();
    let err = site.imago.run(&["plan", "-f", &site.file()]).fails();
    let address = format!("127.0.0.1:{}", site.port);
    assert!(
        err.contains("blog") && err.contains("plain") && err.contains(&address),
        "{err}"
    );
}

#[test]
fn tls_picks_each_services_certificate_by_sni_and_a_replaced_certificate_is_served() {
    let site = Site::new(true);
    site.apply().ok();
    // curl verifies the chain against each service's own certificate: SNI chose it.
    assert_eq!(
        site.curl("shop.example", Some(&site.cert("shop"))).unwrap(),
        (200, "shop v1\n".into())
    );
    assert_eq!(
        site.curl("blog.example", Some(&site.cert("blog"))).unwrap(),
        (200, "blog v1\n".into())
    );
    assert!(
        site.curl("blog.example", Some(&site.cert("shop"))).is_err(),
        "blog.example was served shop's certificate"
    );
    let (code, _) = site.curl("nowhere.example", None).unwrap();
    assert_eq!(code, 404);

    // Renewed on disk: the next handshakes get it, without an apply.
    let old = site.dir.join("old-shop.pem");
    std::fs::copy(site.cert("shop"), &old).unwrap();
    make_cert(&site.dir.join("certs"), "shop", "shop.example", "renewed");
    // Generous: only a certificate never served again exceeds it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if site.curl("shop.example", Some(&site.cert("shop"))).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        site.curl("shop.example", Some(&old)).is_err(),
        "the old certificate is still served"
    );

    // A certificate file that is not one fails the plan, naming the file.
    std::fs::write(site.cert("blog"), "garbage\n").unwrap();
    let err = site.imago.run(&["plan", "-f", &site.file()]).fails();
    assert!(
        err.contains(&site.cert("blog").display().to_string()),
        "{err}"
    );
}

#[test]
fn over_tls_one_connection_serves_request_after_request_though_the_instance_closes_its_own() {
    let site = Site::new(true);
    site.apply().ok();
    // curl reuses its connection for the same host: one connect for five requests. busybox
    // closes every connection after its answer; the router keeps the client's.
    let url = format!("https://shop.example:{}/", site.port);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(site.cert("shop"))
        .args([
            "--resolve",
            &format!("shop.example:{}:127.0.0.1", site.port),
        ])
        .args(["-w", "[%{http_code} %{num_connects}]\n"])
        .args([&url, &url, &url, &url, &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(
        answers,
        ["[200 1]", "[200 0]", "[200 0]", "[200 0]", "[200 0]"],
        "{text}"
    );
}

/// A client that asks `host` over and over with curl until finished.
struct Load {
    stop: Arc<AtomicBool>,
    /// How many answers (or failures) it has had so far.
    answered: Arc<AtomicUsize>,
    handle: std::thread::JoinHandle<Vec<Result<(u16, String), String>>>,
}

impl Load {
    fn start(site: &Site, host: &'static str, ca: PathBuf) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), answered.clone());
        let (port, tls) = (site.port, site.tls);
        let handle = std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                answers.push(curl(port, tls, host, Some(&ca)));
                count.fetch_add(1, Ordering::Relaxed);
            }
            answers
        });
        Load {
            stop,
            answered,
            handle,
        }
    }

    /// Every answer, in order, after asserting that each was a 200 and that there were many.
    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let answers = self.handle.join().unwrap();
        common::assert_all_answered(&answers);
        answers.into_iter().map(|a| a.unwrap().1).collect()
    }
}

#[test]
fn a_rolling_update_under_load_over_tls_fails_no_request() {
    let site = Site::new(true);
    site.apply().ok();
    let load = Load::start(&site, "shop.example", site.cert("shop"));
    common::answered_again(&[&load.answered], Duration::from_millis(300), 1);
    site.set_page("shop", "shop v2");
    let out = site.apply().ok().stdout();
    assert!(out.contains("deployment complete"), "{out}");
    common::answered_again(&[&load.answered], Duration::from_millis(300), 2);
    let answers = load.finish();
    assert_eq!(answers.first().unwrap(), "shop v1\n");
    assert_eq!(answers.last().unwrap(), "shop v2\n");
    // The other service on the port (rolled too: the image is shared) still answers.
    assert_eq!(
        site.curl("blog.example", Some(&site.cert("blog"))).unwrap(),
        (200, "blog v1\n".into())
    );
}

#[test]
fn a_controller_kill_9_under_tls_load_fails_no_request_and_the_next_one_rolls_out_through_the_same_port()
 {
    let site = Site::new(true);
    site.apply().ok();
    let shop = Load::start(&site, "shop.example", site.cert("shop"));
    let blog = Load::start(&site, "blog.example", site.cert("blog"));
    let both = [&*shop.answered, &*blog.answered];
    common::answered_again(&both, Duration::from_millis(300), 1);
    let info: serde_json::Value = serde_json::from_slice(
        &std::fs::read(site.imago.home.join("deploy/controller.json")).unwrap(),
    )
    .unwrap();
    let pid = info["pid"].as_i64().unwrap() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    // The data plane serves both hosts without a controller.
    common::answered_again(&both, Duration::from_millis(1000), 2);
    // The next controller adopts the data plane and rolls shop out on the same front.
    site.set_page("shop", "shop v2");
    let out = site.apply().ok().stdout();
    assert!(out.contains("deployment complete"), "{out}");
    common::answered_again(&both, Duration::from_millis(300), 2);
    let shop = shop.finish();
    let blog = blog.finish();
    assert_eq!(shop.first().unwrap(), "shop v1\n");
    assert_eq!(shop.last().unwrap(), "shop v2\n");
    assert!(
        blog.iter().all(|b| b == "blog v1\n"),
        "blog answered another page"
    );
}

/// The pid of the site's data plane process (`imago --home HOME __dataplane`), if one runs.
fn dataplane_pid(site: &Site) -> Option<i32> {
    let home = site.imago.home.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.contains(&home.as_bytes()) && args.contains(&b"__dataplane".as_slice())
        })
}

#[test]
fn a_data_plane_killed_with_sigkill_is_started_again_with_its_hosts_and_certificates() {
    let site = Site::new(true);
    site.apply().ok();
    let plane = dataplane_pid(&site).expect("a data plane process");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(plane).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    // The controller notices at its next pass and replays listen (hosts, TLS) and routes.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let shop = site.curl("shop.example", Some(&site.cert("shop")));
        let blog = site.curl("blog.example", Some(&site.cert("blog")));
        if shop.as_ref().is_ok_and(|a| a.0 == 200) && blog.as_ref().is_ok_and(|a| a.0 == 200) {
            assert_eq!(shop.unwrap().1, "shop v1\n");
            assert_eq!(blog.unwrap().1, "blog v1\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served again: {shop:?} {blog:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(dataplane_pid(&site).is_some_and(|p| p != plane));
    let (code, _) = site.curl("nowhere.example", None).unwrap();
    assert_eq!(code, 404);
}

#[test]
fn the_same_definition_applied_from_another_checkout_rolls_nothing_and_its_certificates_are_served()
{
    let site = Site::new(true);
    site.apply().ok();
    let before = site.imago.instance_ids();
    assert_eq!(before.len(), 4, "{before:?}");
    // The same files in another directory: the tls paths differ, nothing an instance sees does.
    let moved = site.imago.dir.path().join("checkout-2");
    copy_dir(&site.dir, &moved);
    let file = moved.join("imago.toml").display().to_string();
    let plan = site.imago.run(&["plan", "--json", "-f", &file]).ok().json();
    for service in plan.as_array().unwrap() {
        assert_eq!(service["action"], "no change", "{plan}");
    }
    site.imago.run(&["apply", "-f", &file]).ok();
    // The front reads the moved checkout's files from now on: a certificate renewed there is
    // served (and the old directory's is not).
    make_cert(&moved.join("certs"), "shop", "shop.example", "moved");
    let renewed = moved.join("certs/shop.pem");
    let deadline = Instant::now() + Duration::from_secs(60);
    while site.curl("shop.example", Some(&renewed)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the moved checkout's certificate was never served: {}",
            site.events()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(site.curl("shop.example", Some(&site.cert("shop"))).is_err());
    assert_eq!(
        site.curl("blog.example", Some(&moved.join("certs/blog.pem")))
            .unwrap(),
        (200, "blog v1\n".into())
    );
    assert_eq!(site.imago.instance_ids(), before, "instances were replaced");
    let events = site.events();
    assert!(events.contains("TLS files now"), "{events}");
}

/// `imago ARGS` with the open-files limit (soft and hard) at `limit`, as a shell or systemd
/// hands down: the controller and data plane it starts inherit it.
fn run_with_open_files(imago: &Imago, limit: u32, args: &[&str]) -> common::Run {
    let output = Command::new("prlimit")
        .arg(format!("--nofile={limit}:{limit}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_imago"))
        .arg("--home")
        .arg(&imago.home)
        .args(args)
        .current_dir(imago.dir.path())
        .env_remove("IMAGO_HOME")
        .env("IMAGO_API", "127.0.0.1:0")
        .output()
        .unwrap();
    common::Run { output }
}

/// A connection to `port` on 127.0.0.1 from the loopback address `from`.
fn connect_from(from: [u8; 4], port: u16) -> std::net::TcpStream {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let socket = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let local = std::net::SocketAddr::from((from, 0));
    rustix::net::bind(&socket, &local).unwrap();
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    rustix::net::connect(&socket, &server).unwrap();
    std::net::TcpStream::from(socket)
}

#[test]
fn idle_connections_by_the_thousand_keep_no_client_from_being_served() {
    need("prlimit");
    // This test's own client side needs a few thousand descriptors.
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )
    .unwrap();
    let site = Site::new(false);
    // The data plane gets 1024 open files, the common default limit.
    run_with_open_files(&site.imago, 1024, &["apply", "-f", &site.file()]).ok();
    let port = site.port;
    let asked_from = |from: [u8; 4]| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
            .args(["--interface", &std::net::Ipv4Addr::from(from).to_string()])
            .args(["--resolve", &format!("shop.example:{port}:127.0.0.1")])
            .arg(format!("http://shop.example:{port}/"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(asked_from([127, 0, 0, 1]).ends_with("\n200"));
    // One source opens more idle connections than the data plane has descriptors.
    let one: Vec<_> = (0..1100)
        .map(|_| connect_from([127, 0, 0, 1], port))
        .collect();
    let answer = asked_from([127, 0, 0, 2]);
    assert!(answer.ends_with("\n200"), "another source: {answer}");
    let answer = asked_from([127, 0, 0, 1]);
    assert!(answer.ends_with("\n200"), "the same source: {answer}");
    // And many sources, 60 idle connections each.
    let many: Vec<_> = (10..30u8)
        .flat_map(|last| (0..60).map(move |_| connect_from([127, 0, 0, last], port)))
        .collect();
    let answer = asked_from([127, 0, 0, 3]);
    assert!(answer.ends_with("\n200"), "after many sources: {answer}");
    drop((one, many));
}

/// A client on one keep-alive connection to a front, as a browser or an HTTP client library
/// keeps one: each request written, its response read off the wire by its own framing
/// (Content-Length or chunked).
struct KeepAlive {
    wire: std::io::BufReader<std::net::TcpStream>,
}

impl KeepAlive {
    fn open(port: u16) -> KeepAlive {
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        KeepAlive {
            wire: std::io::BufReader::new(stream),
        }
    }

    fn line(&mut self) -> Result<String, String> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.wire.read_line(&mut line) {
            Ok(0) => Err("connection closed".to_owned()),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// GET / for `host`: (status, body), or what went wrong on the wire.
    fn get(&mut self, host: &str) -> Result<(u16, String), String> {
        use std::io::Write;
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: keep-alive\r\n\r\n");
        self.wire
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let status_line = self.line()?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line: {status_line:?}"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            let field = self.line()?.to_ascii_lowercase();
            if field.is_empty() {
                break;
            }
            match field.split_once(':').map(|(n, v)| (n.trim(), v.trim())) {
                Some(("content-length", v)) => length = v.parse::<usize>().ok(),
                Some(("transfer-encoding", v)) => chunked = v == "chunked",
                Some(("connection", v)) => close = v == "close",
                _ => {}
            }
        }
        let body = self
            .body(chunked, length)
            .map_err(|e| format!("{CUT} {status} head: {e}"))?;
        if close {
            return Err(format!("{status}: the router closed the connection"));
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// A response body, framed by chunks or by its length.
    fn body(&mut self, chunked: bool, length: Option<usize>) -> Result<Vec<u8>, String> {
        use std::io::Read;
        let mut body = Vec::new();
        if chunked {
            loop {
                let size = usize::from_str_radix(&self.line()?, 16).map_err(|e| e.to_string())?;
                let mut chunk = vec![0; size + 2];
                self.wire
                    .read_exact(&mut chunk)
                    .map_err(|e| e.to_string())?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            let length = length.ok_or("neither Content-Length nor chunked")?;
            body.resize(length, 0);
            self.wire.read_exact(&mut body).map_err(|e| e.to_string())?;
        }
        Ok(body)
    }
}

/// How [`KeepAlive::get`] begins the error of a response whose body broke off after its head.
const CUT: &str = "body cut after a";

/// 16 clients on a keep-alive connection each, half asking shop.example and half blog.example
/// until `stop`: each one's answers, in order. A client stops at its first error, or, with
/// `reopen_after_cut`, goes on on a new connection after a response cut after its head, as a
/// browser does.
#[allow(clippy::type_complexity)]
fn keep_alive_clients(
    port: u16,
    stop: &Arc<AtomicBool>,
    answered: &[Arc<AtomicUsize>; 16],
    reopen_after_cut: bool,
) -> Vec<std::thread::JoinHandle<Vec<Result<(u16, String), String>>>> {
    (0..16)
        .map(|i| {
            let stop = stop.clone();
            let count = answered[i].clone();
            let host = if i % 2 == 0 {
                "shop.example"
            } else {
                "blog.example"
            };
            std::thread::spawn(move || {
                let mut client = KeepAlive::open(port);
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let answer = client.get(host);
                    let cut = matches!(&answer, Err(e) if e.starts_with(CUT));
                    let broken = answer.is_err();
                    answers.push(answer);
                    count.fetch_add(1, Ordering::Relaxed);
                    if cut && reopen_after_cut {
                        client = KeepAlive::open(port);
                    } else if broken {
                        // Asserted on when joined; it holds up no wait for answers meanwhile.
                        count.store(usize::MAX / 2, Ordering::Relaxed);
                        break;
                    }
                }
                answers
            })
        })
        .collect()
}

#[test]
fn one_keep_alive_connection_is_answered_by_each_hosts_service_and_goes_on_after_a_404() {
    let site = Site::new(false);
    site.apply().ok();
    let mut client = KeepAlive::open(site.port);
    for _ in 0..3 {
        assert_eq!(client.get("shop.example"), Ok((200, "shop v1\n".into())));
        assert_eq!(client.get("blog.example"), Ok((200, "blog v1\n".into())));
        let (code, body) = client.get("other.example").unwrap();
        assert_eq!(code, 404, "{body}");
        assert_eq!(
            client.get("www.blog.example"),
            Ok((200, "blog v1\n".into()))
        );
    }
}

#[test]
fn a_rolling_update_under_keep_alive_load_fails_no_request_and_removes_the_old_instances_while_clients_keep_their_connections()
 {
    let site = Site::new(false);
    site.check_every_500ms();
    site.apply().ok();
    let before = site.imago.instance_ids();
    let stop = Arc::new(AtomicBool::new(false));
    // 16 clients, each on one connection for the whole test: a broken one fails the test.
    let answered: [Arc<AtomicUsize>; 16] = Default::default();
    let counts: Vec<&AtomicUsize> = answered.iter().map(|c| &**c).collect();
    let clients = keep_alive_clients(site.port, &stop, &answered, false);
    common::answered_again(&counts, Duration::from_millis(500), 1);
    site.set_page("shop", "shop v2");
    site.set_page("blog", "blog v2");
    let out = site.apply().ok().stdout();
    assert!(out.contains("deployment complete"), "{out}");
    // Complete means retired and removed: not one old instance is left, while every client
    // still holds its connection (checked below: none broke).
    let after = site.imago.instance_ids();
    let left: Vec<_> = before.iter().filter(|id| after.contains(id)).collect();
    assert!(left.is_empty(), "old instances still listed: {left:?}");
    common::answered_again(&counts, Duration::from_millis(300), 2);
    stop.store(true, Ordering::Relaxed);
    for (i, client) in clients.into_iter().enumerate() {
        let answers = client.join().unwrap();
        common::assert_all_answered(&answers);
        let service = if i % 2 == 0 { "shop" } else { "blog" };
        let bodies: Vec<String> = answers.into_iter().map(|a| a.unwrap().1).collect();
        assert_eq!(bodies.first().unwrap(), &format!("{service} v1\n"));
        assert_eq!(
            bodies.last().unwrap(),
            &format!("{service} v2\n"),
            "client {i}"
        );
    }
}

/// The running instances of `service` that `ps` lists: (id, pid).
fn running(site: &Site, service: &str) -> Vec<(String, i32)> {
    let list = site.imago.run(&["ps", "--json"]).ok().json();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|i| i["labels"]["imago.service"] == service && i["status"] == "running")
        .filter_map(|i| Some((i["id"].as_str()?.to_owned(), i["pid"].as_i64()? as i32)))
        .collect()
}

fn kill_9(pid: i32) {
    // Gone already (a retired instance the controller stopped): nothing to kill.
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    );
}

/// Instances killed with SIGKILL while routed, under 16 keep-alive clients, before and during a
/// rolling update: the requests on their way to them when they die, and those picked for them and
/// connecting as they die (refused, or reset), go again to another instance; not one fails at
/// the router (a connection broken before a response head, a 502 or a 503). A response that an
/// instance was sending as it died (its head relayed already) breaks off, as behind any proxy:
/// counted and printed.
///
/// A killed instance's address stays routed until the controller sees it exit; meanwhile its
/// connects must fail (as on a host whose default route leads nowhere), not reach whatever the
/// default route leads to (this machine's answers every TCP connection with a 404): the runtime
/// holds an `unreachable` route for the instances' range, below their own /30 routes.
#[test]
fn instances_killed_under_keep_alive_load_before_and_during_a_rolling_update_fail_no_request() {
    let site = Site::new(false);
    // As in the rolling update under keep-alive load above: checks 500 ms apart, so a killed
    // instance stays routed for a while, and its connects are refused or reset meanwhile.
    site.check_every_500ms();
    site.apply().ok();
    let unreachable = Command::new("ip")
        .args(["route", "show", "type", "unreachable", "10.88.0.0/16"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&unreachable.stdout).contains("10.88.0.0/16"),
        "the runtime made no unreachable route for its range: {unreachable:?}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    // 16 clients on a connection each: busybox closes its connection after every answer, so
    // every request of theirs connects anew to an instance, round-robin, and the ones in
    // flight or connecting when an instance dies meet a refused or reset connection.
    let answered: [Arc<AtomicUsize>; 16] = Default::default();
    let counts: Vec<&AtomicUsize> = answered.iter().map(|c| &**c).collect();
    let clients = keep_alive_clients(site.port, &stop, &answered, true);
    common::answered_again(&counts, Duration::from_millis(500), 1);
    // One instance of each service killed while routed, under load; the controller replaces
    // it (same release) once it sees it exit, and its replacement gets ready.
    let mut victims = Vec::new();
    for service in ["shop", "blog"] {
        let (id, pid) = running(&site, service)[0].clone();
        kill_9(pid);
        victims.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ["shop", "blog"].iter().any(|service| {
        let now = running(&site, service);
        now.len() < 2 || now.iter().any(|(id, _)| victims.contains(id))
    }) {
        assert!(
            Instant::now() < deadline,
            "the killed instances were not replaced"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let before = site.imago.instance_ids();
    site.set_page("shop", "shop v2");
    site.set_page("blog", "blog v2");
    let rollout = {
        let (imago, file) = (site.imago.cmd(), site.file());
        std::thread::spawn(move || {
            let mut imago = imago;
            imago.args(["apply", "-f", &file]).output().unwrap()
        })
    };
    // During the rollout, once a new instance runs beside both old ones, one old one (still
    // routed: the other stays until a new one is ready, `max_unavailable = 0`) is killed too.
    let mut killed: Vec<&str> = Vec::new();
    while killed.len() < 2 && !rollout.is_finished() {
        for service in ["shop", "blog"] {
            let now = running(&site, service);
            let fresh = now.iter().any(|(id, _)| !before.contains(id));
            let old: Vec<_> = now.iter().filter(|(id, _)| before.contains(id)).collect();
            if !killed.contains(&service) && fresh && old.len() == 2 {
                kill_9(old[0].1);
                killed.push(service);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = rollout.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("deployment complete"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::answered_again(&counts, Duration::from_millis(300), 2);
    stop.store(true, Ordering::Relaxed);
    let mut cut = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let answers = client.join().unwrap();
        let service = if i % 2 == 0 { "shop" } else { "blog" };
        let pages = [format!("{service} v1\n"), format!("{service} v2\n")];
        assert!(
            answers.len() > 10,
            "client {i} asked {} times",
            answers.len()
        );
        let mut bodies = Vec::new();
        for (n, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok((200, body)) if pages.contains(&body) => bodies.push(body),
                // Killed as it answered: its response was on its way, head first, and no proxy
                // takes back a head it relayed.
                Err(e) if e.starts_with(CUT) => cut.push((i, n, e)),
                failed => panic!("client {i}, request {n}: {failed:?}"),
            }
        }
        assert_eq!(bodies.first().unwrap(), &pages[0]);
        assert_eq!(bodies.last().unwrap(), &pages[1], "client {i}");
    }
    eprintln!(
        "{} responses cut by a kill after their head: {:?}",
        cut.len(),
        &cut[..cut.len().min(3)]
    );
    assert_eq!(
        killed.len(),
        2,
        "no old instance was killed during the rollout"
    );
    // The instances killed under load made no 502 and no 503.
    let events = site.events();
    assert!(
        !events.contains("answered 502") && !events.contains("answered 503"),
        "{events}"
    );
}
