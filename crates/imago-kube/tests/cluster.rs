//! Apply, rollout watching, rollback, drift and delete through kube-rs against a scripted API
//! server (tests/support/apiserver.rs): no real API server can be installed here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use imago_kube::{
    Drift, KubeEngine, KubeError, KubeTarget, PinnedImage, ReleaseInput, RenderedRelease,
    RolloutState, RolloutStatus, render,
};
use imago_oci::Digest;
use serde_json::json;
use support::apiserver::FakeApiServer;

const NAMESPACE: &str = "shop";
const TICK: Duration = Duration::from_millis(20);
const LIMIT: Duration = Duration::from_secs(20);

fn spec(toml: &str) -> imago_spec::ServiceSpec {
    let text = format!("[service.web]\n{toml}");
    imago_spec::parse_services(Path::new("imago.toml"), &text, &[])
        .unwrap()
        .remove("web")
        .unwrap()
}

fn image(version: &str) -> PinnedImage {
    PinnedImage {
        repository: "registry.test:5000/team/web".into(),
        digest: Digest::of(version.as_bytes()),
    }
}

fn release(number: u64, spec_toml: &str, image: &PinnedImage) -> RenderedRelease {
    let spec = spec(spec_toml);
    let config_hash = Digest::of(spec_toml.as_bytes());
    render(&ReleaseInput {
        service: "web",
        spec: &spec,
        release: number,
        revision: &Digest::of(format!("{}\n{config_hash}", image.digest).as_bytes()).hex()[..16],
        config_hash: &config_hash,
        image,
        image_volumes: &[],
        namespace: NAMESPACE,
        paused: false,
    })
    .unwrap()
}

const WEB: &str = "image = \"web\"\nreplicas = 3\nport = 8080\n";

async fn connect(server: &FakeApiServer, dir: &Path) -> KubeEngine {
    KubeEngine::connect(&KubeTarget {
        kubeconfig: Some(server.write_kubeconfig(dir)),
        context: Some("scripted".into()),
        namespace: NAMESPACE.into(),
    })
    .await
    .unwrap()
}

/// Applies and watches one release; returns every status the watch reported.
async fn roll(engine: &KubeEngine, rendered: &RenderedRelease) -> Vec<RolloutStatus> {
    let applied = engine.apply(rendered).await.unwrap();
    assert_eq!(applied.release, rendered.release);
    let mut seen = Vec::new();
    let last = engine
        .watch_rollout(&applied, LIMIT, &mut |s| seen.push(s.clone()))
        .await
        .unwrap();
    assert_eq!(
        seen.last(),
        Some(&last),
        "the final status was reported too"
    );
    seen
}

fn image_of(server: &FakeApiServer) -> String {
    let live = server.object("deployments", NAMESPACE, "web").unwrap();
    live["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn is_watch(request: &support::apiserver::Seen) -> bool {
    request.query.get("watch").map(String::as_str) == Some("true")
}

/// The GETs of the Deployment itself (a re-list, as opposed to a resumed watch).
fn deployment_gets(server: &FakeApiServer) -> usize {
    server
        .seen()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/deployments/web"))
        .count()
}

#[tokio::test]
async fn apply_rolls_out_to_complete_with_server_side_apply() {
    let server = FakeApiServer::start(TICK).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    let v1 = image("v1");
    let seen = roll(&engine, &release(1, WEB, &v1)).await;

    let last = seen.last().unwrap();
    assert_eq!(last.state, RolloutState::Complete, "{seen:#?}");
    assert_eq!((last.updated, last.available, last.replicas), (3, 3, 3));
    assert!(
        seen.iter()
            .any(|s| matches!(s.state, RolloutState::InProgress { .. })),
        "the watch followed the rollout, not just its end: {seen:#?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].updated <= w[1].updated),
        "updated replicas never go back within one rollout: {seen:#?}"
    );
    assert_eq!(image_of(&server), v1.reference());
    assert!(image_of(&server).contains("@sha256:"));

    let requests = server.seen();
    let patches: Vec<_> = requests.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(
        patches.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
        [
            "/api/v1/namespaces/shop/services/web",
            "/apis/apps/v1/namespaces/shop/deployments/web"
        ],
        "the Service first, then the Deployment"
    );
    for patch in &patches {
        assert_eq!(patch.content_type, "application/apply-patch+yaml");
        assert_eq!(
            patch.query.get("fieldManager").map(String::as_str),
            Some("imago")
        );
        assert_eq!(patch.query.get("force").map(String::as_str), Some("true"));
    }
    assert!(
        requests
            .iter()
            .all(|r| r.authorization == "Bearer test-token"),
        "the kubeconfig's user is used"
    );
    let live = server.object("deployments", NAMESPACE, "web").unwrap();
    assert_eq!(
        live["spec"]["template"]["metadata"]["labels"]["imago.dev/release"],
        json!("1")
    );
}

#[tokio::test]
async fn a_failing_rollout_is_failed_and_rollback_reapplies_the_last_complete_release() {
    let server = FakeApiServer::start(TICK).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    let good = release(1, WEB, &image("v1"));
    assert_eq!(
        roll(&engine, &good).await.last().unwrap().state,
        RolloutState::Complete
    );

    let broken_image = image("v2-crashes");
    server.break_image(&broken_image.reference());
    let broken = release(2, WEB, &broken_image);
    let seen = roll(&engine, &broken).await;
    match &seen.last().unwrap().state {
        RolloutState::Failed { reason, message } => {
            assert_eq!(reason, "ProgressDeadlineExceeded");
            assert!(message.contains("timed out progressing"), "{message}");
        }
        other => panic!("expected a failed rollout, got {other:?}"),
    }
    assert_eq!(image_of(&server), broken_image.reference());

    let applied = engine.rollback(&good).await.unwrap();
    assert_eq!(applied.generation, 3, "the rollback is a new generation");
    let last = engine
        .watch_rollout(&applied, LIMIT, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(last.state, RolloutState::Complete);
    assert_eq!(image_of(&server), image("v1").reference());
    let live = server.object("deployments", NAMESPACE, "web").unwrap();
    assert_eq!(
        live["spec"]["template"]["metadata"]["labels"]["imago.dev/release"],
        json!("1"),
        "image and configuration went back together"
    );
    assert_eq!(engine.drift(&good).await.unwrap(), vec![]);
    let adopted = engine.live_release("web").await.unwrap().unwrap();
    assert_eq!((adopted.release, adopted.generation), (1, 3));
    assert_eq!(adopted.status.state, RolloutState::Complete);
}

/// The drift left once `rendered` is applied again and rolled out.
async fn drift_once_applied_again(engine: &KubeEngine, rendered: &RenderedRelease) -> Vec<Drift> {
    let applied = engine.apply(rendered).await.unwrap();
    engine
        .watch_rollout(&applied, LIMIT, &mut |_| {})
        .await
        .unwrap();
    engine.drift(rendered).await.unwrap()
}

#[tokio::test]
async fn a_hand_made_change_is_drift_until_the_release_is_applied_again() {
    let server = FakeApiServer::start(TICK).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    let rendered = release(
        1,
        &format!("{WEB}env = {{ MODE = \"prod\" }}\n"),
        &image("v1"),
    );
    roll(&engine, &rendered).await;
    assert_eq!(
        engine.drift(&rendered).await.unwrap(),
        vec![],
        "server defaults are not drift"
    );

    // `kubectl set image` and `kubectl set env` by hand.
    server.edit("deployments", NAMESPACE, "web", |d| {
        let container = &mut d["spec"]["template"]["spec"]["containers"][0];
        container["image"] = json!("registry.test:5000/team/web:hotfix");
        container["env"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "DEBUG", "value": "1"}));
    });
    server.edit("services", NAMESPACE, "web", |s| {
        s["spec"]["ports"][0]["port"] = json!(9999);
    });
    let drift = engine.drift(&rendered).await.unwrap();
    let paths: Vec<&str> = drift
        .iter()
        .map(|d| match d {
            Drift::Changed { path, .. } => path.as_str(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        paths,
        [
            "spec.template.spec.containers[web].env[DEBUG]",
            "spec.template.spec.containers[web].image",
            "spec.ports[main].port"
        ],
        "{drift:#?}"
    );
    assert!(drift.contains(&Drift::Changed {
        object: "Deployment shop/web".into(),
        path: "spec.template.spec.containers[web].image".into(),
        expected: format!("\"{}\"", image("v1").reference()),
        live: "\"registry.test:5000/team/web:hotfix\"".into(),
    }));

    // Replaced, not repaired: the release's objects go on again.
    // The hand-added env var is another manager's field on a real server; the scripted one
    // replaces the object whole, which is what the comparison must then find.
    assert_eq!(drift_once_applied_again(&engine, &rendered).await, vec![]);

    // Network settings imago leaves at their defaults, so that the rendering does not carry
    // them (`kubectl patch`): the pod put on its node's network, its port bound on the node,
    // the Service given an external address.
    server.edit("deployments", NAMESPACE, "web", |d| {
        let pod = &mut d["spec"]["template"]["spec"];
        pod["hostNetwork"] = json!(true);
        pod["containers"][0]["ports"][0]["hostPort"] = json!(8080);
    });
    server.edit("services", NAMESPACE, "web", |s| {
        s["spec"]["externalIPs"] = json!(["192.0.2.7"]);
    });
    let mut found: Vec<String> = engine
        .drift(&rendered)
        .await
        .unwrap()
        .into_iter()
        .map(|d| match d {
            Drift::Changed {
                object, path, live, ..
            } => format!("{object} {path} = {live}"),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "Deployment shop/web spec.template.spec.containers[web].ports[main].hostPort = 8080",
            "Deployment shop/web spec.template.spec.hostNetwork = true",
            "Service shop/web spec.externalIPs = [\"192.0.2.7\"]",
        ]
    );
    assert_eq!(drift_once_applied_again(&engine, &rendered).await, vec![]);

    engine.delete("web").await.unwrap();
    assert_eq!(
        engine.drift(&rendered).await.unwrap(),
        vec![
            Drift::Missing {
                object: "Deployment shop/web".into()
            },
            Drift::Missing {
                object: "Service shop/web".into()
            }
        ]
    );
}

#[tokio::test]
async fn the_watch_resumes_from_the_last_version_after_the_server_drops_it() {
    let server = FakeApiServer::start(TICK).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    server.drop_next_watches(3);
    let seen = roll(&engine, &release(1, WEB, &image("v1"))).await;
    assert_eq!(
        seen.last().unwrap().state,
        RolloutState::Complete,
        "{seen:#?}"
    );

    let requests = server.seen();
    let watches: Vec<u64> = requests
        .iter()
        .filter(|r| is_watch(r))
        .map(|r| r.query["resourceVersion"].parse().unwrap())
        .collect();
    assert!(
        watches.len() >= 4,
        "three dropped watches, then one that lasted: {watches:?}"
    );
    assert!(
        watches.windows(2).all(|w| w[0] < w[1]),
        "each watch resumed after the last event it saw: {watches:?}"
    );
    assert_eq!(
        deployment_gets(&server),
        2,
        "apply's ownership check and the watch's first GET; then resumed, not re-listed"
    );
}

#[tokio::test]
async fn a_watch_that_keeps_breaking_is_an_error_naming_the_deployment() {
    let server = FakeApiServer::start(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    let applied = engine.apply(&release(1, WEB, &image("v1"))).await.unwrap();
    server.break_every_watch();
    let err = engine
        .watch_rollout(&applied, LIMIT, &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("watch Deployment shop/web"),
        "{err}"
    );
    let watches = server.seen().iter().filter(|r| is_watch(r)).count();
    assert_eq!(watches, 5, "five tries, then the error");
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_starts_over_from_a_fresh_get() {
    let server = FakeApiServer::start(Duration::from_millis(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    let applied = engine.apply(&release(1, WEB, &image("v1"))).await.unwrap();
    // The first GET sees the applied version; by the time the watch asks for it, it is gone.
    server.compact();
    let last = engine
        .watch_rollout(&applied, LIMIT, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(last.state, RolloutState::Complete);
    let gets = deployment_gets(&server);
    // One by apply's ownership check, one to start the watch, then the fresh one.
    assert!(gets >= 3, "410 Gone led to a fresh GET, got {gets}");
}

#[tokio::test]
async fn volumes_need_their_claim_and_a_dropped_port_removes_the_service() {
    let server = FakeApiServer::start(TICK).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    let with_volume = release(
        1,
        &format!("{WEB}volumes = [\"data:/srv\"]\n"),
        &image("v1"),
    );
    let err = engine.apply(&with_volume).await.unwrap_err();
    assert!(matches!(err, KubeError::MissingVolumeClaim { .. }), "{err}");
    assert!(err.to_string().contains("shop/data"), "{err}");
    assert!(
        server.object("deployments", NAMESPACE, "web").is_none(),
        "nothing applied"
    );
    server.add_claim(NAMESPACE, "data");
    roll(&engine, &with_volume).await;
    assert!(server.object("services", NAMESPACE, "web").is_some());

    let without_port = release(2, "image = \"web\"\nreplicas = 3\n", &image("v1"));
    assert!(without_port.endpoint.is_none());
    roll(&engine, &without_port).await;
    assert!(server.object("services", NAMESPACE, "web").is_none());
    assert_eq!(engine.drift(&without_port).await.unwrap(), vec![]);
}

#[tokio::test]
async fn delete_removes_only_what_imago_manages() {
    let server = FakeApiServer::start(TICK).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    roll(&engine, &release(1, WEB, &image("v1"))).await;
    server.edit("services", NAMESPACE, "web", |s| {
        s["metadata"]["labels"]["app.kubernetes.io/managed-by"] = json!("someone-else");
    });
    let deleted = engine.delete("web").await.unwrap();
    assert_eq!(deleted, ["Deployment shop/web"]);
    assert!(server.object("deployments", NAMESPACE, "web").is_none());
    assert!(server.object("services", NAMESPACE, "web").is_some());
    assert_eq!(engine.delete("web").await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn apply_refuses_to_take_over_an_object_imago_did_not_create() {
    let server = FakeApiServer::start(TICK).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = connect(&server, dir.path()).await;
    roll(&engine, &release(1, WEB, &image("v1"))).await;
    // Someone else's Deployment of the same name (labels not imago's): a forced apply would
    // take over its fields, so imago refuses and leaves it as it is.
    server.edit("deployments", NAMESPACE, "web", |d| {
        d["metadata"]["labels"] = json!({"app": "theirs"});
    });
    let err = engine
        .apply(&release(2, WEB, &image("v2")))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, KubeError::NotOurs { object } if object == "Deployment shop/web"),
        "{err}"
    );
    assert_eq!(image_of(&server), image("v1").reference(), "untouched");
}

#[tokio::test]
async fn a_kubeconfig_that_cannot_be_read_is_named() {
    let err = KubeEngine::connect(&KubeTarget {
        kubeconfig: Some("/nonexistent/kubeconfig".into()),
        context: None,
        namespace: NAMESPACE.into(),
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
}

/// The engine as the controller drives it: a release applied `paused` holds the Deployment
/// (`spec.paused: true`, applied by imago's field manager), observe says `Held` (never a
/// failure, and no drift), the deployment controller moves no pod however long it stands, and
/// the same release applied unpaused clears the field and completes.
#[test]
fn a_paused_release_holds_the_deployment_until_applied_unpaused() {
    use imago_kube::KubeCluster;
    use imago_spec::cluster::{ClusterEngine, ClusterService, UpdateState};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(FakeApiServer::start(Duration::from_millis(50)));
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = KubeCluster::connect(&KubeTarget {
        kubeconfig: Some(server.write_kubeconfig(dir.path())),
        context: Some("scripted".into()),
        namespace: NAMESPACE.into(),
    })
    .unwrap();
    let desired = |number: u64, version: &str, paused: bool| {
        let digest = Digest::of(version.as_bytes());
        ClusterService {
            service: "web".into(),
            release: number,
            revision: digest.hex()[..16].to_owned(),
            config_hash: Digest::of(WEB.as_bytes()).to_string(),
            image: format!("registry.test:5000/team/web@{digest}"),
            spec: spec(WEB),
            paused,
        }
    };
    let wait_for =
        |cluster: &mut KubeCluster,
         d: &ClusterService,
         what: &str,
         ok: &dyn Fn(&imago_spec::cluster::ClusterObservation) -> bool| {
            let start = std::time::Instant::now();
            loop {
                let observed = cluster.observe(d).unwrap().unwrap();
                if ok(&observed) {
                    return observed;
                }
                assert!(start.elapsed() < LIMIT, "{what}: {observed:#?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
    let v1 = desired(1, "v1", false);
    cluster.apply(&v1).unwrap();
    wait_for(&mut cluster, &v1, "release 1 complete", &|o| {
        o.update == UpdateState::Completed
    });
    let v2 = desired(2, "v2", false);
    cluster.apply(&v2).unwrap();
    wait_for(&mut cluster, &v2, "a first pod of release 2", &|o| {
        o.tasks
            .iter()
            .any(|t| t.revision.as_deref() == Some(v2.revision.as_str()))
    });
    let held = desired(2, "v2", true);
    cluster.apply(&held).unwrap();
    let live = server.object("deployments", NAMESPACE, "web").unwrap();
    assert_eq!(live["spec"]["paused"], true);
    let observed = wait_for(&mut cluster, &held, "the pause observed", &|o| {
        o.update == UpdateState::Held
    });
    assert!(!observed.update.failed());
    assert_eq!(
        observed.differences,
        Vec::<String>::new(),
        "a held release is no drift"
    );
    // Many ticks, and past any deadline the server would apply: nothing moves.
    std::thread::sleep(Duration::from_millis(200));
    let pods = |server: &FakeApiServer| {
        let mut names: Vec<String> = server
            .pods(NAMESPACE, "web")
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    let before = pods(&server);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(pods(&server), before, "a paused Deployment's pods changed");
    let observed = cluster.observe(&held).unwrap().unwrap();
    assert_eq!(observed.update, UpdateState::Held, "{observed:#?}");
    assert!(
        observed
            .tasks
            .iter()
            .any(|t| t.revision.as_deref() != Some(v2.revision.as_str())),
        "held mid-rollout, with old pods left: {observed:#?}"
    );
    let patches = server
        .seen()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect::<Vec<_>>();
    assert!(
        patches
            .iter()
            .all(|r| r.query.get("fieldManager").map(String::as_str) == Some("imago")),
        "{patches:#?}"
    );

    cluster.apply(&v2).unwrap();
    let live = server.object("deployments", NAMESPACE, "web").unwrap();
    assert!(live["spec"].get("paused").is_none(), "{live:#}");
    wait_for(&mut cluster, &v2, "release 2 complete once resumed", &|o| {
        o.update == UpdateState::Completed
            && o.tasks
                .iter()
                .all(|t| t.revision.as_deref() == Some(v2.revision.as_str()))
    });
    drop(cluster);
    drop(server);
}
