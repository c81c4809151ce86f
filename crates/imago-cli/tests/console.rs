//! The console in a real browser (headless Chromium from Debian, driven by selenium through
//! chromedriver: `scripts/setup` installs them) during a real rolling update of the web example
//! and a rollback made from the page. The browser's side is `console_browser.py`; this side owns
//! the deployment. Needs root, busybox-static and the browser: it fails, never skips, without.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Imago;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/web");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console_browser.py");
/// Debian's python has Debian's selenium; a python earlier in PATH (pyenv) may not.
const PYTHON: &str = "/usr/bin/python3";

/// The web example with its own endpoint port, `VERSION` in its environment, and each wave
/// held for 2 s (`min_ready`; 8 s for the release the browser watches), so that the browser
/// sees the rollout while it happens.
struct Web {
    imago: Imago,
    file: PathBuf,
    port: u16,
    _lease: common::PortLease,
}

impl Web {
    fn new() -> Web {
        let imago = Imago::new();
        let dir = imago.dir.path().join("web");
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::copy(
            Path::new(EXAMPLE).join("www/index.html"),
            dir.join("www/index.html"),
        )
        .unwrap();
        let lease = common::lease_port();
        let web = Web {
            file: dir.join("imago.toml"),
            port: lease.port,
            imago,
            _lease: lease,
        };
        web.set_version("1");
        web
    }

    fn set_version(&self, version: &str) {
        self.set_version_held(version, "2s");
    }

    /// [`Web::set_version`] with each wave held for `min_ready`.
    fn set_version_held(&self, version: &str, min_ready: &str) {
        let example = std::fs::read_to_string(Path::new(EXAMPLE).join("imago.toml")).unwrap();
        let text = example
            .replace("port = 8088", &format!("port = {}", self.port))
            .replace(
                "target_port = 8080",
                &format!("target_port = 8080\nenv = {{ VERSION = \"{version}\" }}"),
            )
            .replace(
                "min_ready = \"500ms\"",
                &format!("min_ready = \"{min_ready}\""),
            );
        assert!(
            text.contains(&format!("min_ready = \"{min_ready}\"")),
            "the example changed"
        );
        std::fs::write(&self.file, text).unwrap();
    }

    /// `imago apply`; with `wait`, until the rollout ends.
    fn apply(&self, wait: bool) {
        let file = self.file.display().to_string();
        let mut args = vec!["apply", "-f", &file];
        if !wait {
            args.push("--no-wait");
        }
        self.imago.run(&args).ok();
    }

    fn wait_complete(&self, release: u64) {
        self.imago.wait_for(
            &format!("release {release} to complete"),
            Duration::from_secs(90),
            || {
                let status = self.imago.run(&["status", "--json", "web"]).ok().json();
                let service = &status["services"][0];
                service["desired"]["number"] == release
                    && service["outcome"]["outcome"] == "complete"
            },
        );
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.imago.cmd().args(["destroy", "web"]).output();
        let _ = self.imago.cmd().args(["serve", "--stop"]).output();
    }
}

/// The browser process, killed if the test fails before it ends.
struct Browser(std::process::Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_console_shows_a_rollout_live_and_rolls_back_from_the_page_in_a_real_browser() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver", PYTHON] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: run scripts/setup (chromium, chromium-driver, python3-selenium)"
        );
    }
    let web = Web::new();
    web.apply(true);
    web.wait_complete(1);
    let controller: serde_json::Value = serde_json::from_slice(
        &std::fs::read(web.imago.home.join("deploy/controller.json")).unwrap(),
    )
    .unwrap();
    let url = format!("http://{}", controller["api"].as_str().unwrap());
    let token = std::fs::read_to_string(web.imago.home.join("api-token")).unwrap();

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let mut browser = Browser(
        Command::new(PYTHON)
            .arg(SCRIPT)
            .arg(&url)
            .arg(token.trim())
            .arg(&shots)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut said = BufReader::new(browser.0.stdout.take().unwrap()).lines();
    let mut next_line = || said.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(next_line(), "ready", "the browser did not load the console");

    // Each wave held for 8 s: the browser must see "1 / 3" on the overview and then the
    // rollout partly done on the service page, with page loads, waits and screenshots in
    // between. With 2 s waves a browser at load 50 found release 2 complete already ("the
    // rollout never showed as partly done"); now that state lasts 16 s or more.
    web.set_version_held("2", "8s");
    // Without waiting: the browser watches the rollout while it happens.
    web.apply(false);
    writeln!(browser.0.stdin.as_mut().unwrap(), "applied").unwrap();
    assert_eq!(
        next_line(),
        "ok",
        "the browser's checks failed (its stderr above)"
    );
    assert!(browser.0.wait().unwrap().success());

    // What the browser saw is what the controller recorded: release 3 restores release 1 and
    // completed; release 4 restarts it, same image and configuration.
    web.wait_complete(4);
    let history = web.imago.history("web");
    assert_eq!(history[2]["rollback_of"], 1, "{history:?}");
    assert_eq!(history[2]["spec"]["env"]["VERSION"], "1", "{history:?}");
    assert_eq!(history[3]["restart"], 1, "{history:?}");
    assert_eq!(history[3]["config_hash"], history[2]["config_hash"]);
    let events = web.imago.events("web");
    assert!(
        events.contains("rollouts paused") && events.contains("rollouts resumed"),
        "{events}"
    );
    for shot in [
        "overview-rollout.png",
        "service-rollout.png",
        "overview-390x844.png",
        "service-rollout-390x844.png",
    ] {
        let bytes = std::fs::read(shots.join(shot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{shot} is no PNG");
    }
}

/// `imago pause` holds a rollout (nothing launched or retired) through a controller killed with
/// SIGKILL and started again; `imago resume` lets it complete; `imago restart` replaces every
/// instance with new ones of the same release, and an unchanged apply afterwards changes
/// nothing.
#[test]
fn pause_holds_a_rollout_through_a_controller_restart_and_restart_replaces_every_instance() {
    let web = Web::new();
    web.apply(true);
    web.wait_complete(1);
    let paused = web.imago.run(&["--json", "pause", "web"]).ok().json();
    assert_eq!(
        (paused["paused"].clone(), paused["changed"].clone()),
        (true.into(), true.into())
    );
    let v1 = web.imago.instance_ids();
    web.set_version("2");
    web.apply(false);
    let hold = |seconds: u64| {
        let until = std::time::Instant::now() + Duration::from_secs(seconds);
        while std::time::Instant::now() < until {
            assert_eq!(
                web.imago.instance_ids(),
                v1,
                "a paused rollout changed the instances"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    hold(3);
    let status = web.imago.run(&["status", "--json", "web"]).ok().json();
    assert_eq!(status["services"][0]["desired"]["number"], 2);
    assert!(
        status["services"][0]["paused"]["actor"].is_string(),
        "{status}"
    );
    assert!(
        web.imago
            .run(&["status", "web"])
            .ok()
            .stdout()
            .contains("paused by")
    );
    web.imago.kill_controller();
    web.imago.run(&["serve"]).ok();
    hold(3);
    let resumed = web.imago.run(&["--json", "resume", "web"]).ok().json();
    assert_eq!(resumed["changed"], true);
    web.wait_complete(2);

    let before = web.imago.instance_ids();
    let restarted = web.imago.run(&["--json", "restart", "web"]).ok().json();
    assert_eq!(restarted[0]["release"], 3, "{restarted}");
    assert_eq!(restarted[0]["outcome"], "complete", "{restarted}");
    let after = web.imago.instance_ids();
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "{before:?} {after:?}"
    );
    let history = web.imago.history("web");
    assert_eq!(history[2]["restart"], 1);
    assert_eq!(history[2]["config_hash"], history[1]["config_hash"]);
    assert_eq!(history[2]["image_digest"], history[1]["image_digest"]);
    // The definition applied again: no new release, no new instance.
    web.apply(true);
    assert_eq!(web.imago.history("web").len(), 3);
    assert_eq!(web.imago.instance_ids(), after);
    let drift = web.imago.run(&["drift", "--json"]);
    assert!(drift.output.status.success(), "{}", drift.stdout());
}

/// One HTTP/1.0 request to the controller's API: (status, body).
fn api_request(imago: &Imago, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Read;
    let controller: serde_json::Value =
        serde_json::from_slice(&std::fs::read(imago.home.join("deploy/controller.json")).unwrap())
            .unwrap();
    let token = std::fs::read_to_string(imago.home.join("api-token")).unwrap();
    let mut stream = std::net::TcpStream::connect(controller["api"].as_str().unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/toml\r\nContent-Length: {}\r\n\r\n{body}",
        token.trim(),
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// `POST /v1/plan` answers exactly what `imago plan --json` prints for the same file.
#[test]
fn the_api_plans_a_definition_file_as_imago_plan_does() {
    let web = Web::new();
    web.apply(true);
    web.set_version("2");
    let printed = web
        .imago
        .run(&["--json", "plan", "-f", &web.file.display().to_string()])
        .ok()
        .json();
    assert_eq!(printed[0]["action"], "new release", "{printed}");
    let text = std::fs::read_to_string(&web.file).unwrap();
    let dir = web.file.parent().unwrap().display().to_string();
    let (status, body) = api_request(&web.imago, "POST", &format!("/v1/plan?dir={dir}"), &text);
    assert_eq!(status, 200, "{body}");
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served, printed);
    // An error is the one `imago plan` gives, naming the file.
    let (status, body) = api_request(
        &web.imago,
        "POST",
        &format!("/v1/plan?dir={dir}"),
        &text.replace("replicas = 3", "replicas = \"three\""),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("imago.toml"), "{body}");
    assert_eq!(
        web.imago.history("web").len(),
        1,
        "planning recorded a release"
    );
}
