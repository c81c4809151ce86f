//! The rendering of example services, checked byte for byte against tests/golden/*.yaml
//! (`IMAGO_UPDATE_GOLDEN=1` rewrites them), and the keys Kubernetes cannot honour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use imago_kube::{KubeError, PinnedImage, ReleaseInput, RenderedRelease, render, render_yaml};
use imago_oci::Digest;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check_golden(name: &str, actual: &str) {
    let path = golden(name);
    if std::env::var_os("IMAGO_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (IMAGO_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{} differs from the rendering:\n{actual}",
        path.display()
    );
}

fn render_service(
    name: &str,
    toml: &str,
    image_volumes: &[String],
) -> Result<RenderedRelease, KubeError> {
    let text = format!("[service.{name}]\n{toml}");
    let spec = imago_spec::parse_services(Path::new("imago.toml"), &text, &[])
        .unwrap()
        .remove(name)
        .unwrap();
    let image = PinnedImage {
        repository: format!("registry.example:5000/team/{name}"),
        digest: Digest::of(format!("{name} image").as_bytes()),
    };
    let config_hash = Digest::of(toml.as_bytes());
    render(&ReleaseInput {
        service: name,
        spec: &spec,
        release: 7,
        revision: &config_hash.hex()[..16],
        config_hash: &config_hash,
        image: &image,
        image_volumes,
        namespace: "shop",
        paused: false,
    })
}

const WEB: &str = r#"
image = "web"
replicas = 3
port = 80
target_port = 8080
command = ["/bin/web", "--listen", ":8080"]
env = { MODE = "prod", RETRIES = "3", EMPTY = "", YES = "true" }
resources = { memory = "64M", cpus = 0.5 }
volumes = ["data:/srv/data", "/etc/ssl/certs:/etc/ssl/certs:ro"]
stop_grace_period = "10s"

[service.web.health]
type = "http"
path = "/healthz"
interval = "2s"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 3
start_period = "10s"

[service.web.rollout]
max_surge = "50%"
max_unavailable = 1
min_ready = "5s"
progress_deadline = "2m"
drain = "3s"
"#;

const WORKER: &str = r#"
image = "worker"
replicas = 4
command = ["/bin/worker"]
network = "host"
seccomp = "unconfined"
resources = { memory = "1G", cpus = 2 }

[service.worker.health]
type = "command"
command = ["/bin/worker", "--check"]

[service.worker.rollout]
max_surge = 0
max_unavailable = "25%"
drain = "0s"
"#;

const EDGE: &str = r#"
image = "edge"
replicas = 2
port = 443

[service.edge.health]
type = "tcp"
"#;

#[test]
fn example_services_render_as_their_golden_files() {
    let web = render_service("web", WEB, &["/var/cache/web/".into(), "/srv/data".into()]).unwrap();
    check_golden("web.yaml", &render_yaml(&web).unwrap());
    assert_eq!(web.volume_claims, ["data"]);
    let worker = render_service("worker", WORKER, &[]).unwrap();
    assert!(worker.endpoint.is_none(), "no port, no Service");
    check_golden("worker.yaml", &render_yaml(&worker).unwrap());
    let edge = render_service("edge", EDGE, &[]).unwrap();
    check_golden("edge.yaml", &render_yaml(&edge).unwrap());
}

#[test]
fn rendering_is_byte_stable_and_the_yaml_reads_back_as_the_objects() {
    let first = render_service("web", WEB, &["/var/cache/web".into()]).unwrap();
    let second = render_service("web", WEB, &["/var/cache/web".into()]).unwrap();
    assert_eq!(render_yaml(&first).unwrap(), render_yaml(&second).unwrap());

    let yaml = render_yaml(&first).unwrap();
    let documents: Vec<&str> = yaml.split("---\n").filter(|d| !d.is_empty()).collect();
    assert_eq!(documents.len(), 2);
    let read: Vec<serde_json::Value> = documents
        .iter()
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    assert_eq!(read[0], serde_json::to_value(&first.deployment).unwrap());
    assert_eq!(
        read[1],
        serde_json::to_value(first.endpoint.as_ref().unwrap()).unwrap()
    );
    assert_eq!(read[0]["kind"], "Deployment");
    assert_eq!(
        read[0]["spec"]["template"]["metadata"]["labels"]["imago.dev/release"],
        "7"
    );

    // What a release keeps for a later rollback reads back as the same objects.
    let kept = serde_json::to_string(&first).unwrap();
    let back: RenderedRelease = serde_json::from_str(&kept).unwrap();
    assert_eq!(back, first);
}

/// Placement as a swarm's, in the objects Kubernetes schedules by: required node affinity for
/// constraints, pod anti-affinity on the hostname for one replica per node, a soft topology
/// spread for a spread preference.
#[test]
fn placement_maps_to_node_affinity_anti_affinity_and_topology_spread() {
    let rendered = render_service(
        "web",
        "image = \"web\"\nreplicas = 2\n[service.web.placement]\n\
         constraints = [\"node.labels.zone==a\", \"node.hostname!=n1\", \"node.platform.os==linux\"]\n\
         max_replicas_per_node = 1\nspread = [\"node.labels.rack\"]\n",
        &[],
    )
    .unwrap();
    let pod =
        serde_json::to_value(&rendered.deployment).unwrap()["spec"]["template"]["spec"].clone();
    let affinity = &pod["affinity"];
    assert_eq!(
        affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        serde_json::json!([{"matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a"]},
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]},
            {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}
        ]}]),
        "{pod}"
    );
    let anti = &affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname", "{pod}");
    assert_eq!(
        anti["labelSelector"]["matchLabels"],
        serde_json::to_value(&rendered.deployment).unwrap()["spec"]["selector"]["matchLabels"],
    );
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "rack", "{pod}");
    assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway", "{pod}");
    assert_eq!(spread["maxSkew"], 1, "{pod}");
    // Without placement, none of it.
    let plain = render_service("web", "image = \"web\"\n", &[]).unwrap();
    let pod = serde_json::to_value(&plain.deployment).unwrap()["spec"]["template"]["spec"].clone();
    assert!(pod.get("affinity").is_none() && pod.get("topologySpreadConstraints").is_none());
}

#[test]
fn keys_kubernetes_cannot_honour_are_refused_by_name() {
    let cases: &[(&str, &str)] = &[
        ("web", "image = \"web\"\nresources = { pids = 100 }\n"),
        (
            "web",
            "image = \"web\"\n[service.web.rollout]\nstrategy = \"blue-green\"\n",
        ),
        ("web", "image = \"web\"\nseccomp = \"profiles/web.json\"\n"),
        (
            "web",
            "image = \"web\"\nport = 80\n[service.web.health]\ntype = \"http\"\nstatus = 204\n",
        ),
        (
            "web",
            "image = \"web\"\nport = 80\n[service.web.health]\ntype = \"tcp\"\ninterval = \"500ms\"\n",
        ),
        (
            "web",
            "image = \"web\"\n[service.web.rollout]\nmin_ready = \"1m\"\nprogress_deadline = \"30s\"\n",
        ),
        ("web", "image = \"web\"\nresources = { cpus = 0.0001 }\n"),
        ("web", "image = \"web\"\nvolumes = [\"Data_1:/srv\"]\n"),
        ("Web_1", "image = \"web\"\n"),
        (
            "web",
            "image = \"web\"\n[service.web.placement]\nconstraints = [\"node.role==worker\"]\n",
        ),
        (
            "web",
            "image = \"web\"\n[service.web.placement]\nmax_replicas_per_node = 2\n",
        ),
    ];
    let mut report = String::new();
    for (name, toml) in cases {
        let err = render_service(name, toml, &[]).unwrap_err();
        assert!(matches!(err, KubeError::Unsupported { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("cannot be honoured by kubernetes"), "{text}");
        report.push_str(&text);
        report.push('\n');
    }
    check_golden("refused.txt", &report);
}

/// A pod that publishes a port keeps serving at least the stop margin after its deletion,
/// `drain = "0s"` too: Kubernetes sends it SIGTERM while its endpoints still route to it. A
/// longer drain is kept as written; a pod without a port (no endpoint) gets no margin.
#[test]
fn a_pod_with_a_port_keeps_serving_the_stop_margin_whatever_the_drain() {
    let stop = |toml: &str| {
        let rendered = render_service("api", toml, &[]).unwrap();
        let pod = rendered.deployment.spec.unwrap().template.spec.unwrap();
        let sleep = pod.containers[0]
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map(|s| s.seconds);
        (sleep, pod.termination_grace_period_seconds)
    };
    let margin = i64::from(imago_kube::STOP_MARGIN_SECONDS);
    assert!(margin >= 1);
    let service = |port: &str, drain: &str| {
        format!(
            "image = \"api\"\n{port}stop_grace_period = \"3s\"\n[service.api.rollout]\ndrain = \"{drain}\"\n"
        )
    };
    assert_eq!(
        stop(&service("port = 8080\n", "0s")),
        (Some(margin), Some(margin + 3)),
        "drain 0 with a port"
    );
    assert_eq!(
        stop(&service("port = 8080\n", "5s")),
        (Some(5), Some(8)),
        "a longer drain is kept"
    );
    assert_eq!(
        stop(&service("", "0s")),
        (None, Some(3)),
        "no port, no endpoint, no margin"
    );
}
