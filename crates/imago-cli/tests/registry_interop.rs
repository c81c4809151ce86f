//! imago and the other registry clients agree: skopeo pulls what imago pushed and imago pulls
//! what skopeo pushed (OCI and Docker schema 2), with the same digests; a Docker daemon pulls
//! and runs what imago pushed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::Imago;
use common::registry::{self, Registry, RegistryOpts};
use imago_oci::Digest;

/// The manifest digest an OCI layout's index.json names for `tag`.
fn layout_digest(layout: &Path, tag: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {index}"))["digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn skopeo_pulls_what_imago_pushed_and_imago_pulls_what_skopeo_pushed() {
    let reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    let built = registry::build_web_image(&imago, &imago.dir.path().join("ctx"), "web", "v1\n");
    registry::run(&imago, &["push", "web", &format!("{}/web:1", reg.host())]).ok();

    // skopeo reads it: the same manifest bytes, and it copies out intact (skopeo verifies).
    assert_eq!(
        Digest::of(&reg.skopeo_raw("web:1")).to_string(),
        built,
        "skopeo sees another manifest"
    );
    let out = imago.dir.path().join("from-imago");
    reg.skopeo_copy(
        &format!("docker://{}/web:1", reg.host()),
        &format!("oci:{}:web", out.display()),
    );
    assert_eq!(layout_digest(&out, "web"), built);

    // skopeo pushes an image imago never saw (another home's, as an OCI layout).
    let other = Imago::new();
    let other_digest = registry::random_image(&other, "rand:1", &[300_000, 100_000], 31);
    let layout = other.dir.path().join("layout");
    registry::export_oci_layout(&other, "rand:1", &layout);
    reg.skopeo_copy(
        &format!("oci:{}:rand:1", layout.display()),
        &format!("docker://{}/rand:1", reg.host()),
    );
    assert_eq!(reg.manifest_digest("rand", "1"), other_digest);
    let host = Imago::new();
    let pulled = registry::run_json(&host, &["pull", &format!("{}/rand:1", reg.host())]);
    assert_eq!(pulled["digest"], other_digest.as_str(), "{pulled}");
    registry::assert_store_valid(&host);

    // A Docker schema 2 manifest (skopeo converts to it) is taken as it is: its digest is kept,
    // and pushing it back gives the same digest.
    reg.skopeo_copy_format(
        &format!("oci:{}:web", out.display()),
        &format!("docker://{}/docker-web:1", reg.host()),
        "v2s2",
    );
    let docker_manifest = reg.manifest("docker-web", "1");
    let doc: serde_json::Value = serde_json::from_slice(&docker_manifest).unwrap();
    assert_eq!(
        doc["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let docker_digest = Digest::of(&docker_manifest).to_string();
    assert_ne!(docker_digest, built);
    let pulled = registry::run_json(&host, &["pull", &format!("{}/docker-web:1", reg.host())]);
    assert_eq!(pulled["digest"], docker_digest.as_str(), "{pulled}");
    assert_eq!(registry::store_blob(&host, &docker_digest), docker_manifest);
    let pushed = registry::run_json(
        &host,
        &[
            "push",
            &format!("{}/docker-web:1", reg.host()),
            &format!("{}/docker-web-copy:1", reg.host()),
        ],
    );
    assert_eq!(pushed["digest"], docker_digest.as_str(), "{pushed}");
    assert_eq!(reg.manifest_digest("docker-web-copy", "1"), docker_digest);
}

/// A Docker daemon of the test's own: own data root, exec root and socket, no iptables, no
/// bridge, no ip_forward change. SIGTERM (then SIGKILL to its process group) when dropped.
struct Dockerd {
    dir: tempfile::TempDir,
    child: Child,
}

impl Dockerd {
    fn start() -> Dockerd {
        registry::require_tool("dockerd");
        registry::require_tool("docker");
        // A short path: the socket path and containerd's below it must fit sockaddr_un.
        let dir = tempfile::Builder::new()
            .prefix("imago-dkr")
            .tempdir_in("/tmp")
            .unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::create_dir_all(p("data")).unwrap();
        std::fs::create_dir_all(p("exec")).unwrap();
        let log = std::fs::File::create(p("dockerd.log")).unwrap();
        let mut cmd = Command::new("dockerd");
        cmd.arg("--iptables=false")
            .arg("--ip-forward=false")
            .arg("--ip-masq=false")
            .arg("--bridge=none")
            .arg(format!("--data-root={}", p("data").display()))
            .arg(format!("--exec-root={}", p("exec").display()))
            .arg(format!("--pidfile={}", p("dockerd.pid").display()))
            .arg(format!("-H=unix://{}", p("docker.sock").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("start dockerd");
        let d = Dockerd { dir, child };
        registry::wait_for("dockerd to answer", Duration::from_secs(60), || {
            d.docker(&["version"]).status.success()
        });
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.path().join("client"))
            .output()
            .unwrap()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever is left of the daemon's group (its containerd and shims).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("data"))
            .status();
    }
}

#[test]
fn a_docker_daemon_pulls_and_runs_what_imago_pushed() {
    let reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    let built = registry::build_web_image(
        &imago,
        &imago.dir.path().join("ctx"),
        "web",
        "served by busybox\n",
    );
    let reference = format!("{}/web:1", reg.host());
    registry::run(&imago, &["push", "web", &reference]).ok();

    let docker = Dockerd::start();
    // 127.0.0.0/8 is an insecure registry for docker by default: plain HTTP works.
    let pull = docker.docker(&["pull", &reference]);
    assert!(
        pull.status.success(),
        "docker pull: {}",
        String::from_utf8_lossy(&pull.stderr)
    );
    let stdout = String::from_utf8_lossy(&pull.stdout);
    assert!(
        stdout.contains(&built),
        "docker pull saw another digest: {stdout}"
    );
    let run = docker.docker(&[
        "run",
        "--rm",
        "--network=none",
        "--entrypoint=/bin/busybox",
        &reference,
        "cat",
        "/www/index.html",
    ]);
    assert!(
        run.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "served by busybox\n");
}
