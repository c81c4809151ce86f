//! What a `network = "private"` instance reaches, tried from inside real instances of both
//! engines (the README's "Isolation and hostile images" states the promise):
//! (a) another instance's address: yes, with its own source address;
//! (b) the host's services bound to 0.0.0.0, through the instance's gateway: yes, as in Docker;
//! (c) the host's 127.0.0.1 services: never, neither as 127.0.0.1 nor through the gateway;
//! (d) addresses beyond the host: yes, masqueraded. "Outside" is a network namespace this test
//!     creates and joins to the host by a veth pair; it has no route to the instances' range, so
//!     it can answer an instance only if the host rewrote the instance's source address.
//!
//! The client instance retries what must be reached (for up to 90 s: the server instance may
//! still be starting) and tries once what must not; a refusal counts only together with the
//! host's loopback listener having accepted nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{File, Imago, make_image};

const SERVER_PORT: &str = "8000";
const OUTSIDE_PORT: &str = "9003";

/// A host listener that answers every connection with `marker` and counts them.
struct HostListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostListener {
    fn new(addr: &str, marker: String) -> HostListener {
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, done) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(format!("{marker}\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HostListener {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// "Outside": a network namespace joined to the host by a veth pair (`host_ip`/30 on the host,
/// `outside_ip` inside), with a server answering `marker` on [`OUTSIDE_PORT`]. It knows its /30
/// only. Its names follow from `tag` alone, so that what a killed run left is removed first, and
/// a lock on them keeps two runs on one host from sharing the /30. Removed when dropped.
struct Outside {
    ns: String,
    veth: String,
    server: Child,
    _lock: std::fs::File,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Outside {
    fn new(tag: &str, host_ip: &str, outside_ip: &str, marker: &str) -> Outside {
        let lock = std::fs::File::create(format!("/run/imago-test-outside-{tag}.lock")).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
        // Not `imago-*`: the runtime's sweep takes namespaces of that name for its own.
        let ns = format!("imt-out-{tag}");
        let veth = format!("imt-out-{tag}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{outside_ip}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "/bin/busybox", "nc", "-ll", "-p"])
            .args([OUTSIDE_PORT, "-e", "/bin/busybox", "echo", marker])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Outside {
            ns,
            veth,
            server,
            _lock: lock,
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// The client's script: `$1` server instance address, `$2` host 0.0.0.0 port, `$3` host
/// 127.0.0.1 port, `$4` outside address, then the markers `$5` (server), `$6` (host), `$7`
/// (outside). Prints its gateway (its default route's), then one line per target:
/// `NAME reached: ...` or `NAME unreached: ...`, or `NAME tried: ...`.
const CLIENT: &str = r#"
b=/bin/busybox
try() { $b timeout 5 $b nc "$1" "$2" </dev/null 2>&1; }
until_reached() {
  end=$(( $($b date +%s) + 90 ))
  while :; do
    out=$(try "$2" "$3")
    case "$out" in *"$4"*) echo "$1 reached: $out"; return;; esac
    if [ "$($b date +%s)" -ge "$end" ]; then echo "$1 unreached: $out"; return; fi
    $b sleep 0.2
  done
}
gw=$($b ip route | $b awk '/^default/ { print $3 }')
echo "gateway $gw"
until_reached instance "$1" 8000 "$5"
until_reached host-any "$gw" "$2" "$6"
until_reached outside "$4" 9003 "$7"
echo "loopback tried: $(try 127.0.0.1 "$3")"
echo "gateway-loopback tried: $(try "$gw" "$3")"
echo client-done
"#;

fn busybox_image(imago: &Imago) -> String {
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static must be installed at /bin/busybox");
    make_image(
        &imago.store(),
        "netprobe:test",
        &[File {
            path: "bin/busybox",
            content: &busybox,
            mode: 0o755,
        }],
    );
    "netprobe:test".to_owned()
}

/// Removes instances when dropped, so that a failed assertion leaves none running.
struct Instances<'a>(&'a Imago, Vec<String>);

impl Drop for Instances<'_> {
    fn drop(&mut self) {
        for id in &self.1 {
            let _ = self.0.cmd().args(["rm", "-f", id]).output();
        }
    }
}

fn run_instance(imago: &Imago, runtime: &str, rest: &[&str]) -> String {
    let mut args = vec!["run", "-q", "--runtime", runtime, "--network", "private"];
    args.extend_from_slice(rest);
    imago.run(&args).ok().stdout().trim().to_owned()
}

fn reachability(runtime: &str, tag: &str, host_ip: &str, outside_ip: &str) {
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1",
        "private networks route through the host: net.ipv4.ip_forward must be 1 (scripts/test sets it)"
    );
    let imago = Imago::new();
    let image = busybox_image(&imago);
    let suffix = format!("{}-{runtime}", std::process::id());
    let (server_marker, any_marker, lo_marker, outside_marker) = (
        format!("server-{suffix}"),
        format!("host-any-{suffix}"),
        format!("host-lo-{suffix}"),
        format!("outside-{suffix}"),
    );
    let any = HostListener::new("0.0.0.0:0", any_marker.clone());
    let lo = HostListener::new("127.0.0.1:0", lo_marker.clone());
    let _outside = Outside::new(tag, host_ip, outside_ip, &outside_marker);

    let server = run_instance(
        &imago,
        runtime,
        &[
            &image,
            "--",
            "/bin/busybox",
            "nc",
            "-ll",
            "-p",
            SERVER_PORT,
            "-e",
            "/bin/busybox",
            "echo",
            &server_marker,
        ],
    );
    let mut instances = Instances(&imago, vec![server.clone()]);
    let server_state = imago
        .run(&["inspect-instance", "--json", &server])
        .ok()
        .json();
    let server_addr = server_state["address"].as_str().unwrap().to_owned();

    let (any_port, lo_port) = (any.port.to_string(), lo.port.to_string());
    let client = run_instance(
        &imago,
        runtime,
        &[
            &image,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            CLIENT,
            "client",
            &server_addr,
            &any_port,
            &lo_port,
            outside_ip,
            &server_marker,
            &any_marker,
            &outside_marker,
        ],
    );
    instances.1.push(client.clone());
    // The client gives up on each target after 90 s: it ends well within this.
    imago.wait_for(
        &format!("{runtime}: the exit of client instance {client}"),
        Duration::from_secs(600),
        || {
            imago
                .run(&["inspect-instance", "--json", &client])
                .ok()
                .json()["status"]
                == "exited"
        },
    );
    let done = imago
        .run(&["inspect-instance", "--json", &client])
        .ok()
        .json();
    let logs = imago.run(&["logs", &client]).ok().stdout();
    let client_state = imago
        .run(&["inspect-instance", "--json", &client])
        .ok()
        .json();
    assert!(
        logs.lines().any(|l| l == "client-done"),
        "{runtime}: the client did not finish ({done}):\n{logs}"
    );
    let line = |name: &str| {
        logs.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{runtime}: no line {name:?}:\n{logs}"))
            .to_owned()
    };
    // The gateway the client used is its host end, the address the README names.
    assert_eq!(
        line("gateway "),
        format!("gateway {}", client_state["host_address"].as_str().unwrap()),
        "{logs}"
    );
    // (a), (b), (d): reached, each with the answer of the right server.
    for (name, marker) in [
        ("instance ", &server_marker),
        ("host-any ", &any_marker),
        ("outside ", &outside_marker),
    ] {
        let l = line(name);
        assert!(
            l.starts_with(&format!("{name}reached: ")) && l.contains(marker.as_str()),
            "{runtime}: {name}must be reachable from a private instance: {l}\n{logs}"
        );
    }
    // (c): neither the instance's own 127.0.0.1 nor the gateway leads to the host's loopback.
    for name in ["loopback tried: ", "gateway-loopback tried: "] {
        let l = line(name);
        assert!(
            !l.contains(&lo_marker),
            "{runtime}: the host's 127.0.0.1 answered a private instance: {l}\n{logs}"
        );
    }
    assert_eq!(
        lo.accepted.load(Ordering::SeqCst),
        0,
        "{runtime}: the host's 127.0.0.1 listener accepted a connection:\n{logs}"
    );
    assert!(any.accepted.load(Ordering::SeqCst) >= 1);
    assert_eq!(done["exit_code"], 0, "{done}\n{logs}");

    imago.run(&["stop", "--time", "1", &server]).ok();
    imago.run(&["rm", &server, &client]).ok();
    instances.1.clear();
}

#[test]
fn embedded_private_instance_reaches_instances_host_and_outside_never_host_loopback() {
    reachability("embedded", "e", "198.51.100.1", "198.51.100.2");
}

#[test]
fn runc_private_instance_reaches_instances_host_and_outside_never_host_loopback() {
    reachability("runc", "r", "198.51.100.5", "198.51.100.6");
}
