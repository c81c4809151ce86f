//! Services whose image is a registry reference (real instances: root, busybox-static, the
//! embedded runtime): an empty home deploys from the definition and the registry alone, the
//! release records the digest (never the tag), a re-tag in the registry changes nothing running
//! until the next apply, a second empty home gets the same digests (the disaster-recovery path),
//! and gc keeps a pulled image that a retained release pins.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::Imago;
use common::registry::{self, Registry, RegistryOpts};

/// A home deploying `[service.web] image = IMAGE` on a leased endpoint port; the service is
/// destroyed and the controller stopped however the test ends.
struct Host {
    imago: Imago,
    file: PathBuf,
    port: u16,
    lease: Option<common::PortLease>,
}

impl Host {
    fn new(image: &str) -> Host {
        Host::with_port(image, common::lease_port())
    }

    fn with_port(image: &str, lease: common::PortLease) -> Host {
        let imago = Imago::new();
        let file = imago.dir.path().join("imago.toml");
        std::fs::write(&file, definition(image, lease.port)).unwrap();
        Host {
            imago,
            file,
            port: lease.port,
            lease: Some(lease),
        }
    }

    fn run(&self, args: &[&str]) -> common::Run {
        registry::run(&self.imago, args)
    }

    fn apply(&self) -> common::Run {
        self.run(&["apply", "-f", self.file.to_str().unwrap()])
    }

    fn plan(&self) -> serde_json::Value {
        registry::run_json(&self.imago, &["plan", "-f", self.file.to_str().unwrap()])
    }

    fn history(&self) -> Vec<serde_json::Value> {
        registry::run_json(&self.imago, &["history", "web"])
            .as_array()
            .unwrap()
            .clone()
    }

    /// The image digests of the running instances.
    fn running(&self) -> Vec<String> {
        registry::run_json(&self.imago, &["ps"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["status"] == "running")
            .map(|i| i["image"].as_str().unwrap().to_owned())
            .collect()
    }

    fn page(&self) -> String {
        http_get(self.port)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.imago.cmd().args(["destroy", "web"]).output();
        let _ = self.imago.cmd().args(["serve", "--stop"]).output();
    }
}

fn definition(image: &str, port: u16) -> String {
    format!(
        r#"
[service.web]
image = "{image}"
replicas = 1
port = {port}
target_port = 8080
stop_grace_period = "1s"

[service.web.health]
type = "http"
path = "/"
interval = "200ms"
timeout = "1s"
healthy_threshold = 1
unhealthy_threshold = 3

[service.web.rollout]
strategy = "rolling"
max_surge = 1
max_unavailable = 0
min_ready = "200ms"
progress_deadline = "30s"
drain = "200ms"
"#
    )
}

fn http_get(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// A registry holding `web:1` (page v1) and `web:2` (page v2), built and pushed by a builder
/// home; returns (registry, digest of v1, digest of v2).
fn registry_with_two_versions() -> (Registry, String, String) {
    let reg = Registry::start(RegistryOpts::plain());
    let builder = Imago::new();
    let v1 =
        registry::build_web_image(&builder, &builder.dir.path().join("v1"), "web", "page v1\n");
    registry::run(&builder, &["push", &v1, &format!("{}/web:1", reg.host())]).ok();
    let v2 =
        registry::build_web_image(&builder, &builder.dir.path().join("v2"), "web", "page v2\n");
    registry::run(&builder, &["push", &v2, &format!("{}/web:2", reg.host())]).ok();
    assert_ne!(v1, v2);
    (reg, v1, v2)
}

#[test]
fn a_service_from_a_registry_deploys_on_empty_homes_pins_the_digest_and_ignores_retags() {
    let (reg, v1, v2) = registry_with_two_versions();
    let image = format!("{}/web:1", reg.host());

    // An empty home: plan resolves the tag, apply pulls and deploys, the release pins v1.
    let first = Host::new(&image);
    let plan = first.plan();
    assert_eq!(plan[0]["digest"], v1.as_str(), "{plan}");
    // Plan read the manifest and nothing else: the store is still empty.
    let stored = registry::store_blobs(&first.imago);
    assert!(stored.is_empty(), "plan pulled {stored:?}");
    first.apply().ok();
    assert_eq!(first.page(), "page v1\n");
    assert_eq!(first.running(), vec![v1.clone()]);
    let history = first.history();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["image_digest"], v1.as_str(), "{history:?}");
    let recorded = serde_json::to_string(&history).unwrap();
    assert!(
        !recorded.contains("web:1"),
        "the release records the tag, not only the digest: {recorded}"
    );
    // The same definition applied again changes nothing.
    let plan = first.plan();
    assert_ne!(plan[0]["action"], "first release", "{plan}");
    assert_eq!(plan[0]["digest"], v1.as_str(), "{plan}");

    // Disaster recovery: another empty home, the same file, the same registry: same digests.
    // (The first host gives its endpoint port back first: both are on this machine.)
    let instances_first = first.running();
    let definition_first = std::fs::read(&first.file).unwrap();
    let mut first = first;
    let lease = first.lease.take().unwrap();
    drop(first);
    let second = Host::with_port(&image, lease);
    assert_eq!(std::fs::read(&second.file).unwrap(), definition_first);
    second.apply().ok();
    assert_eq!(second.running(), instances_first);
    assert_eq!(second.history()[0]["image_digest"], v1.as_str());
    assert_eq!(second.page(), "page v1\n");

    // Re-tag :1 to v2 in the registry: the running release does not move...
    reg.skopeo_copy(
        &format!("docker://{}/web:2", reg.host()),
        &format!("docker://{}/web:1", reg.host()),
    );
    assert_eq!(reg.manifest_digest("web", "1"), v2);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(second.running(), vec![v1.clone()]);
    assert_eq!(second.page(), "page v1\n");
    assert_eq!(second.history().len(), 1);
    // ...until plan shows the new digest and the next apply rolls it out.
    let plan = second.plan();
    assert_eq!(plan[0]["digest"], v2.as_str(), "{plan}");
    assert_eq!(plan[0]["current_digest"], v1.as_str(), "{plan}");
    let v2_hex = v2.trim_start_matches("sha256:");
    assert!(
        !registry::store_blobs(&second.imago)
            .iter()
            .any(|b| b.contains(v2_hex)),
        "plan pulled the new image"
    );
    second.apply().ok();
    assert_eq!(second.page(), "page v2\n");
    assert_eq!(second.running(), vec![v2.clone()]);
    let history = second.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["image_digest"], v2.as_str());
}

#[test]
fn gc_keeps_a_pulled_image_that_a_retained_release_pins() {
    let (mut reg, v1, v2) = registry_with_two_versions();
    let host = Host::new(&format!("{}/web:1", reg.host()));
    host.apply().ok();
    std::fs::write(
        &host.file,
        definition(&format!("{}/web:2", reg.host()), host.port),
    )
    .unwrap();
    host.apply().ok();
    assert_eq!(host.page(), "page v2\n");

    // Drop every name, collect: release 1's pulled image stays, blobs and all.
    let names = registry::store_names(&host.imago);
    for name in &names {
        host.run(&["rmi", name]).ok();
    }
    host.run(&["gc"]).ok();
    host.run(&["verify", &v1]).ok();
    host.run(&["verify", &v2]).ok();

    // Without the registry, rolling back to release 1 works from the store alone.
    reg.kill();
    let out = host.run(&["rollback", "web", "--to", "1"]).ok().stdout();
    assert!(out.contains("deployment complete"), "{out}");
    assert_eq!(host.page(), "page v1\n");
    assert_eq!(host.running(), vec![v1]);
}
