//! Services on a Kubernetes target, end to end through the `imago` binary and its controller,
//! against the scripted API server of imago-kube's tests (no API server can be installed
//! here; see docs/kubernetes.md): apply to a complete release, a rollout the server drives to
//! ProgressDeadlineExceeded rolled back automatically, rollback on demand, drift made by hand
//! and replaced, destroy, a controller killed with SIGKILL mid-rollout, and `imago render`.
//! Images are pushed to a docker-registry on 127.0.0.1, as apply does for every cluster target.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../imago-kube/tests/support/apiserver.rs"]
mod apiserver;
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use apiserver::FakeApiServer;
use common::Imago;
use common::registry::{Registry, RegistryOpts};
use serde_json::Value;

const NAMESPACE: &str = "shop";

/// One test's cluster: the scripted API server (on a runtime of its own, in this process), a
/// registry, and an imago home with a definition whose service runs on target `k8s`.
struct KubeService {
    server: FakeApiServer,
    registry: Registry,
    imago: Imago,
    dir: PathBuf,
    name: String,
    kubeconfig: PathBuf,
    _runtime: tokio::runtime::Runtime,
}

impl KubeService {
    /// The fake deployment controller moves one step every `tick`.
    fn new(name: &str, tick: Duration) -> KubeService {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime.block_on(FakeApiServer::start(tick));
        let imago = Imago::new();
        let dir = imago.dir.path().join("def");
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = server.write_kubeconfig(imago.dir.path());
        let s = KubeService {
            server,
            registry: Registry::start(RegistryOpts::plain()),
            imago,
            dir,
            name: name.to_owned(),
            kubeconfig,
            _runtime: runtime,
        };
        s.set_version("1");
        s
    }

    fn file(&self) -> String {
        self.dir.join("imago.toml").display().to_string()
    }

    /// The definition: an image whose page says "version V", and service NAME (3 replicas,
    /// rolling one at a time) on the kubernetes target, with VERSION=V in its environment.
    fn set_version(&self, version: &str) {
        let toml = definition(
            &self.name,
            version,
            &format!("{}#scripted", self.kubeconfig.display()),
            &self.registry.host(),
        );
        std::fs::write(self.dir.join("imago.toml"), toml).unwrap();
    }

    fn apply(&self) -> common::Run {
        self.imago
            .run(&["apply", "--timeout", "60s", "-f", &self.file()])
    }

    fn history(&self) -> Vec<Value> {
        self.imago.history(&self.name)
    }

    fn events(&self) -> String {
        self.imago.events(&self.name)
    }

    fn deployment(&self) -> Option<Value> {
        self.server.object("deployments", NAMESPACE, &self.name)
    }

    fn container(&self) -> Value {
        self.deployment().expect("the Deployment exists")["spec"]["template"]["spec"]["containers"]
            [0]
        .clone()
    }

    fn image(&self) -> String {
        self.container()["image"].as_str().unwrap().to_owned()
    }

    fn env(&self, name: &str) -> String {
        let env = self.container()["env"].clone();
        env.as_array()
            .and_then(|vars| vars.iter().find(|v| v["name"] == name))
            .and_then(|v| v["value"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    /// The image-declared volumes of the pod template: (mount path, whether its volume is an
    /// emptyDir), sorted by path.
    fn empty_dirs(&self) -> Vec<(String, bool)> {
        let deployment = self.deployment().expect("the Deployment exists");
        let pod = &deployment["spec"]["template"]["spec"];
        let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
        let mut out: Vec<(String, bool)> = self.container()["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let volume = volumes.iter().find(|v| v["name"] == m["name"]);
                (
                    m["mountPath"].as_str().unwrap_or_default().to_owned(),
                    volume.is_some_and(|v| v["emptyDir"].is_object()),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn template_label(&self, label: &str) -> String {
        self.deployment().expect("the Deployment exists")["spec"]["template"]["metadata"]["labels"]
            [label]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// `REGISTRY/imago-test/web@DIGEST` of the image the current definition builds.
    fn pinned(&self) -> String {
        let digest = self
            .imago
            .run(&["build", "--json", "-f", &self.file(), "web"])
            .ok()
            .json()["images"][0]["digest"]
            .as_str()
            .unwrap()
            .to_owned();
        format!("{}/imago-test/web@{digest}", self.registry.host())
    }

    fn wait_for(&self, what: &str, timeout: Duration, ok: impl FnMut() -> bool) {
        self.imago.wait_for(what, timeout, ok);
    }

    /// Release 2 ("version 2"), whose pods never get ready when `broken`: the server's
    /// deployment controller reports ProgressDeadlineExceeded after `deadline_ticks` ticks
    /// without progress.
    fn set_version_2(&self, broken: bool, deadline_ticks: u32) {
        self.set_version("2");
        if broken {
            self.server.break_image(&self.pinned());
        }
        self.server.set_deadline_ticks(deadline_ticks);
    }

    /// Records release 2 without waiting, and waits until the cluster's rollout of it began.
    fn start_release_2(&self) {
        self.imago
            .run(&["apply", "--no-wait", "-f", &self.file()])
            .ok();
        self.wait_for("the update to start", Duration::from_secs(30), || {
            self.template_label("imago.dev/release") == "2"
        });
    }
}

impl Drop for KubeService {
    fn drop(&mut self) {
        let _ = self.imago.cmd().args(["serve", "--stop"]).output();
    }
}

/// The definition file of service `name` on a kubernetes target at `endpoint`.
fn definition(name: &str, version: &str, endpoint: &str, registry: &str) -> String {
    format!(
        r#"[image.web]

[[image.web.layer]]
name = "site"
file = [{{ path = "/www/index.html", content = "version {version}\n" }}]

[image.web.config]
entrypoint = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
ports = ["8080/tcp"]
volumes = ["/data", "/cache-v{version}/"]

[service.{name}]
image = "web"
replicas = 3
target_port = 8080
target = "k8s"
env = {{ VERSION = "{version}" }}
stop_grace_period = "1s"

[service.{name}.health]
type = "http"
path = "/"
interval = "1s"
timeout = "1s"
healthy_threshold = 1
unhealthy_threshold = 3

[service.{name}.rollout]
strategy = "rolling"
max_surge = 1
max_unavailable = 0
min_ready = "1s"
progress_deadline = "30s"

[target.k8s]
engine = "kubernetes"
endpoint = "{endpoint}"
namespace = "{NAMESPACE}"
registry = "{registry}/imago-test"
"#
    )
}

#[test]
fn apply_completes_rolls_back_on_demand_and_destroys() {
    let s = KubeService::new("kweb", Duration::from_millis(50));
    let applied = s.apply().ok();
    assert!(
        applied.stdout().contains("deployment complete (release 1"),
        "{}",
        applied.stdout()
    );
    // The pods run the digest imago built, from the target's registry; never a tag.
    let v1 = s.pinned();
    assert_eq!(s.image(), v1);
    assert_eq!(s.template_label("imago.dev/release"), "1");
    assert_eq!(s.env("VERSION"), "1");
    // The image declares /data and /cache-v1/: the root is read-only, so each gets an
    // emptyDir, as each local instance gets an anonymous volume there.
    let volumes_v1 = vec![("/cache-v1".to_owned(), true), ("/data".to_owned(), true)];
    assert_eq!(s.empty_dirs(), volumes_v1);
    let pods = s.server.pods(NAMESPACE, &s.name);
    assert_eq!(pods.len(), 3, "{pods:#?}");
    assert!(
        pods.iter()
            .all(|p| p["status"]["conditions"][0]["status"] == "True"),
        "complete means every pod of the release is ready: {pods:#?}"
    );
    let history = s.history();
    assert_eq!(history[0]["outcome"], "complete");
    assert!(
        v1.ends_with(history[0]["image_digest"].as_str().unwrap()),
        "the release records the digest the pods run"
    );
    // Server-side apply under imago's field manager, of both objects.
    let applies: Vec<_> = s
        .server
        .seen()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert!(
        applies.iter().all(|r| {
            r.content_type == "application/apply-patch+yaml"
                && r.query.get("fieldManager").map(String::as_str) == Some("imago")
                && r.query.get("force").map(String::as_str) == Some("true")
        }),
        "{applies:#?}"
    );
    assert!(
        s.server.object("services", NAMESPACE, &s.name).is_some(),
        "the target port is served by a Service"
    );

    s.set_version("2");
    let applied = s.apply().ok();
    assert!(
        applied.stdout().contains("deployment complete (release 2"),
        "{}",
        applied.stdout()
    );
    let v2 = s.pinned();
    assert_ne!(v1, v2);
    assert_eq!(s.image(), v2);
    assert_eq!(s.env("VERSION"), "2");
    assert_eq!(
        s.empty_dirs(),
        vec![("/cache-v2".to_owned(), true), ("/data".to_owned(), true)]
    );

    // Rollback on demand: image and configuration of release 1, as release 3, by a new
    // controller (the old one killed): the volumes come from the release, as recorded.
    s.imago.kill_controller();
    let rolled = s.imago.run(&["rollback", "--timeout", "60s", &s.name]).ok();
    assert!(rolled.stdout().contains("release 3"), "{}", rolled.stdout());
    s.wait_for("the rollback's completion", Duration::from_secs(30), || {
        s.history()
            .last()
            .is_some_and(|r| r["outcome"] == "complete" && r["number"] == 3)
    });
    assert_eq!(s.image(), v1);
    assert_eq!(s.env("VERSION"), "1", "the configuration rolls back too");
    assert_eq!(s.template_label("imago.dev/release"), "3");
    assert_eq!(
        s.empty_dirs(),
        volumes_v1,
        "the image's volumes roll back with it"
    );

    // Destroy deletes the Deployment (its pods follow) and the Service; the history stays.
    s.imago.run(&["destroy", &s.name]).ok();
    s.wait_for("the objects' deletion", Duration::from_secs(30), || {
        s.deployment().is_none()
    });
    assert!(s.server.object("services", NAMESPACE, &s.name).is_none());
    assert!(s.server.pods(NAMESPACE, &s.name).is_empty());
    assert_eq!(s.history().len(), 3);
}

#[test]
fn a_rollout_past_its_progress_deadline_is_rolled_back_automatically() {
    let s = KubeService::new("kfail", Duration::from_millis(50));
    s.apply().ok();
    let v1 = s.pinned();
    s.set_version_2(true, 10);
    let out = s.apply();
    let text = out.stdout();
    assert!(
        text.contains("release 2 failed and was rolled back to release 1"),
        "stdout: {text}\nstderr: {}",
        out.stderr()
    );
    assert!(text.contains("ProgressDeadlineExceeded"), "{text}");
    assert!(
        !out.output.status.success(),
        "a failed apply exits non-zero"
    );
    let history = s.history();
    assert_eq!(history.len(), 3, "{history:?}");
    assert_eq!(history[1]["outcome"], "failed");
    assert_eq!(history[2]["rollback_of"], 1);
    assert_eq!(history[2]["outcome"], "complete");
    // Image, its declared volumes and configuration went back together, as a new generation.
    assert_eq!(s.image(), v1);
    assert_eq!(
        s.empty_dirs(),
        vec![("/cache-v1".to_owned(), true), ("/data".to_owned(), true)]
    );
    assert_eq!(s.env("VERSION"), "1");
    assert_eq!(s.template_label("imago.dev/release"), "3");
    // Release 3 has release 1's revision: pods of either are interchangeable, and none of
    // release 2's is left.
    let pods = s.server.pods(NAMESPACE, &s.name);
    assert!(
        pods.len() >= 3
            && pods
                .iter()
                .all(|p| p["spec"]["containers"][0]["image"] == v1),
        "{pods:#?}"
    );
}

#[test]
fn changes_made_by_hand_are_drift_and_the_release_is_applied_again() {
    let s = KubeService::new("kdrift", Duration::from_millis(50));
    s.apply().ok();
    let pinned = s.pinned();
    // With no controller running, someone edits the Deployment: `imago drift` reports it.
    s.imago.run(&["serve", "--stop"]).ok();
    let other = format!(
        "{}/imago-test/web@sha256:{}",
        s.registry.host(),
        "0".repeat(64)
    );
    s.server
        .edit("deployments", NAMESPACE, &s.name, |deployment| {
            deployment["spec"]["template"]["spec"]["containers"][0]["image"] = other.clone().into();
            deployment["spec"]["replicas"] = 5.into();
        });
    let drift = s.imago.run(&["drift", "--json"]);
    assert!(
        !drift.output.status.success(),
        "drift must fail the command"
    );
    let findings = drift.json();
    let details: Vec<&str> = findings
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "wrong-spec")
        .filter_map(|f| f["detail"].as_str())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains(".image: ") && d.contains(&other)),
        "{findings}"
    );
    assert!(
        details.iter().any(|d| d.contains("spec.replicas: 5 != 3")),
        "{findings}"
    );
    // The controller reports it and applies the release again.
    s.imago.run(&["serve"]).ok();
    s.wait_for("the drift report", Duration::from_secs(30), || {
        s.events().contains("changed out of band")
    });
    s.wait_for("the release's image again", Duration::from_secs(30), || {
        s.image() == pinned
    });
    assert_eq!(s.deployment().unwrap()["spec"]["replicas"], 3);
    // Someone deletes the Deployment: it is re-created from the release.
    s.server.remove("deployments", NAMESPACE, &s.name);
    s.wait_for("the re-created Deployment", Duration::from_secs(30), || {
        s.deployment().is_some()
    });
    assert!(s.events().contains("is missing"), "{}", s.events());
    assert_eq!(s.image(), pinned);
    s.wait_for("no drift left", Duration::from_secs(30), || {
        s.imago.run(&["drift", "--json"]).output.status.success()
    });
}

#[test]
fn a_controller_killed_mid_rollout_is_restarted_and_the_rollout_finishes() {
    // Slow ticks: a rollout of three pods takes about nine of them.
    let s = KubeService::new("kkill", Duration::from_millis(400));
    s.apply().ok();
    s.set_version_2(false, 8);
    s.start_release_2();
    s.imago.kill_controller();
    assert!(
        s.history()[1]["outcome"].is_null(),
        "the rollout was still under way when the controller died: {:?}",
        s.history()
    );
    // A new controller (apply starts one; the release is recorded, so apply adds none and
    // waits for it) finds the rollout where the cluster has it and completes it.
    let applied = s.apply().ok();
    assert!(
        applied.stdout().contains("(release 2"),
        "{}",
        applied.stdout()
    );
    let history = s.history();
    assert_eq!(history.len(), 2, "no release was added: {history:?}");
    assert_eq!(history[1]["outcome"], "complete");
    assert_eq!(s.image(), s.pinned());
}

/// `imago pause` mid-rollout holds the Deployment (`spec.paused`, applied server-side by
/// imago): the deployment controller moves no pod, and imago neither completes nor fails the
/// release though its progress_deadline passes, also after its controller is killed and
/// another one started; `imago resume` lets the rollout go on to completion.
#[test]
fn a_paused_rollout_is_held_through_a_controller_restart_and_completes_once_resumed() {
    let s = KubeService::new("kpause", Duration::from_millis(400));
    s.apply().ok();
    s.set_version_2(false, 8);
    // Release 2 gives up after 3 s without progress, unless it is held.
    let text = std::fs::read_to_string(s.file())
        .unwrap()
        .replace("progress_deadline = \"30s\"", "progress_deadline = \"3s\"");
    std::fs::write(s.file(), text).unwrap();
    s.start_release_2();
    let paused = s.imago.run(&["--json", "pause", &s.name]).ok().json();
    assert_eq!(paused["paused"], true);
    s.wait_for(
        "spec.paused on the Deployment",
        Duration::from_secs(60),
        || s.deployment().unwrap()["spec"]["paused"] == true,
    );
    let applies = s
        .server
        .seen()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.contains("/deployments/"))
        .collect::<Vec<_>>();
    assert!(
        applies
            .iter()
            .all(|r| r.query.get("fieldManager").map(String::as_str) == Some("imago")),
        "{applies:#?}"
    );
    let pod_names = || {
        let mut names: Vec<String> = s
            .server
            .pods(NAMESPACE, &s.name)
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    // Once the fake controller has seen the pause (its status says so), nothing moves. Waited
    // for, not slept: a loaded host can delay its 400 ms tick by seconds.
    s.wait_for(
        "the Deployment's status to say it is paused",
        Duration::from_secs(60),
        || s.deployment().unwrap()["status"]["conditions"][0]["reason"] == "DeploymentPaused",
    );
    let held = pod_names();
    let held_for = |seconds: u64| {
        std::thread::sleep(Duration::from_secs(seconds));
        assert_eq!(pod_names(), held, "a paused Deployment's pods changed");
        assert!(
            s.history()[1]["outcome"].is_null(),
            "release 2 was judged while paused: {:?}\n{}",
            s.history(),
            s.imago.diagnostics()
        );
        assert_eq!(s.deployment().unwrap()["spec"]["paused"], true);
    };
    held_for(4);
    let releases: Vec<Value> = s
        .server
        .pods(NAMESPACE, &s.name)
        .iter()
        .map(|p| p["metadata"]["labels"]["imago.dev/release"].clone())
        .collect();
    assert!(
        releases.contains(&Value::from("1")),
        "the pause came mid-rollout, with pods of release 1 left: {releases:?}"
    );
    // A controller killed while paused: the next one keeps the Deployment held. It must
    // really run (and keep running) for the hold to say anything: with no controller at all
    // nothing would move either.
    let killed = s.imago.assert_controller_running();
    s.imago.kill_controller();
    s.imago.run(&["serve"]).ok();
    let restarted = s.imago.assert_controller_running();
    assert_ne!(restarted, killed);
    held_for(4);
    assert_eq!(s.imago.assert_controller_running(), restarted);
    let status = s.imago.run(&["status", "--json"]).ok().json();
    assert!(
        status["services"][0]["paused"]["actor"].is_string(),
        "{status}"
    );
    assert!(s.events().contains("(paused)"), "{}", s.events());
    assert!(
        !s.events().contains("changed out of band"),
        "a pause is no drift: {}",
        s.events()
    );

    s.imago.run(&["resume", &s.name]).ok();
    s.wait_for("release 2's completion", Duration::from_secs(30), || {
        s.history()[1]["outcome"] == "complete"
    });
    assert!(s.deployment().unwrap()["spec"].get("paused").is_none());
    assert_eq!(s.image(), s.pinned());
    assert_eq!(s.history().len(), 2, "no rollback: {:?}", s.history());
}

#[test]
fn a_controller_killed_mid_failing_rollout_is_restarted_and_rolls_back() {
    let s = KubeService::new("kkillfail", Duration::from_millis(100));
    s.apply().ok();
    let v1 = s.pinned();
    s.set_version_2(true, 20);
    s.start_release_2();
    s.imago.kill_controller();
    // The new controller meets the deadline the cluster reports and rolls back.
    s.imago.run(&["serve"]).ok();
    s.wait_for("the rollback's completion", Duration::from_secs(30), || {
        s.history()
            .last()
            .is_some_and(|r| r["outcome"] == "complete" && r["rollback_of"] == 1)
    });
    let history = s.history();
    assert_eq!(history[1]["outcome"], "failed", "{history:?}");
    assert_eq!(s.image(), v1);
    assert_eq!(s.env("VERSION"), "1");
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

#[test]
fn render_prints_the_objects_byte_stable_and_plan_refuses_what_kubernetes_cannot_honour() {
    let imago = Imago::new();
    let file = imago.dir.path().join("imago.toml");
    // A fixed endpoint and registry: the target is part of the release's configuration, so
    // the golden file's hashes depend on them. render never contacts the cluster.
    std::fs::write(
        &file,
        definition("web", "1", "/etc/kube/config#prod", "registry.test:5000"),
    )
    .unwrap();
    let file = file.display().to_string();
    // The image is built (reproducibly: the golden file holds its digest) and stored, so
    // render reads the volumes it declares; an image that is not stored cannot be rendered.
    let digest = imago
        .run(&["build", "--json", "-f", &file, "web"])
        .ok()
        .json()["images"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let render = |args: &[&str]| {
        let mut all = vec!["render", "--target", "k8s", "-f", &file];
        all.extend_from_slice(args);
        imago.run(&all).ok().output.stdout
    };
    let absent = format!("sha256:{}", "ab".repeat(32));
    let err = imago
        .run(&[
            "render",
            "--target",
            "k8s",
            "-f",
            &file,
            &format!("--image=web=registry.test:5000/team/web@{absent}"),
        ])
        .fails();
    assert!(
        err.contains(&format!("image {absent} is not in the store")),
        "{err}"
    );
    let pinned = format!("--image=web=registry.test:5000/team/web@{digest}");
    let first = render(&[&pinned]);
    assert_eq!(first, render(&[&pinned]), "the same file, the same bytes");
    let text = String::from_utf8(first).unwrap();
    let path = golden("render-kube.yaml");
    if std::env::var_os("IMAGO_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (IMAGO_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(expected == text, "{} differs:\n{text}", path.display());
    for path in ["/data", "/cache-v1"] {
        assert!(text.contains(&format!("mountPath: {path}\n")), "{text}");
    }
    assert_eq!(text.matches("emptyDir: {}").count(), 2, "{text}");

    // Without --image the digest is the one the image builds to, in the target's registry.
    let built = imago
        .run(&["build", "--json", "-f", &file, "web"])
        .ok()
        .json()["images"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let text = String::from_utf8(render(&[])).unwrap();
    assert!(
        text.contains(&format!("image: registry.test:5000/imago-test/web@{built}")),
        "{text}"
    );
    let json = imago
        .run(&["render", "--json", "--target", "k8s", "-f", &file])
        .ok()
        .json();
    assert_eq!(json["services"][0]["objects"][0]["kind"], "Deployment");
    assert_eq!(json["services"][0]["objects"][1]["kind"], "Service");

    // A swarm target prints the service spec imago-swarm would create, as JSON.
    let swarm = imago.dir.path().join("swarm.toml");
    std::fs::write(
        &swarm,
        definition(
            "web",
            "1",
            "unix:///nowhere/docker.sock",
            "registry.test:5000",
        )
        .replace("engine = \"kubernetes\"", "engine = \"swarm\"")
        .replace(&format!("namespace = \"{NAMESPACE}\"\n"), "")
        .replace("stop_grace_period = \"1s\"", "stop_grace_period = \"3s\""),
    )
    .unwrap();
    let swarm = swarm.display().to_string();
    let out = imago
        .run(&["render", "--target", "k8s", "-f", &swarm, &pinned])
        .ok();
    let spec: Value = serde_json::from_slice(&out.output.stdout).unwrap();
    assert_eq!(
        spec["TaskTemplate"]["ContainerSpec"]["Image"],
        format!("registry.test:5000/team/web@{digest}")
    );
    assert_eq!(spec["Labels"]["imago.service"], "web");

    // A key Kubernetes cannot honour is an error at plan time, naming the key and engine.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("min_ready = \"1s\"", "min_ready = \"500ms\"");
    std::fs::write(&file, text).unwrap();
    let err = imago.run(&["plan", "-f", &file]).fails();
    assert!(
        err.contains("rollout.min_ready cannot be honoured by kubernetes"),
        "{err}"
    );
    let err = imago
        .run(&["render", "--target", "nowhere", "-f", &file])
        .fails();
    assert!(err.contains("no service of"), "{err}");
}
