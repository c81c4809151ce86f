//! `imago build` with registries: `from` a registry base (pulled once, cached by digest,
//! recorded in the base annotation; `--pull=missing|always|never`), and `push = [...]` /
//! `--push REPO` pushing what was built, printing `REPO@sha256:...`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::Imago;
use common::registry::{self, Proxy, Registry, RegistryOpts};

fn app_definition(base: &str, extra: &str) -> String {
    format!(
        r#"
[image.app]
from = "{base}"
{extra}
[[image.app.layer]]
file = [{{ path = "/etc/app.conf", content = "app\n" }}]
"#
    )
}

fn build(imago: &Imago, dir: &Path, args: &[&str]) -> common::Run {
    common::Run {
        output: registry::cmd(imago)
            .current_dir(dir)
            .arg("build")
            .args(args)
            .output()
            .unwrap(),
    }
}

/// The manifest annotations of `digest` in `imago`'s store.
fn annotations(imago: &Imago, digest: &str) -> serde_json::Value {
    let manifest: serde_json::Value =
        serde_json::from_slice(&registry::store_blob(imago, digest)).unwrap();
    manifest["annotations"].clone()
}

#[test]
fn a_registry_base_is_pulled_once_recorded_by_digest_and_pull_modes_hold() {
    let reg = Registry::start(RegistryOpts::plain());
    let proxy = Proxy::start(&reg.host(), vec![]);
    let builder = Imago::new();
    let base =
        registry::build_web_image(&builder, &builder.dir.path().join("base"), "base", "base\n");
    registry::run(
        &builder,
        &["push", &base, &format!("{}/base:1", reg.host())],
    )
    .ok();

    // A new home builds from the registry base through the proxy.
    let imago = Imago::new();
    let dir = imago.dir.path().join("app");
    std::fs::create_dir_all(&dir).unwrap();
    let from = format!("{}/base:1", proxy.host());
    std::fs::write(dir.join("imago.toml"), app_definition(&from, "")).unwrap();

    // --pull=never with nothing cached: a clear error naming the base.
    let err = build(&imago, &dir, &["--pull=never", "app"]).fails();
    assert!(
        err.contains(&from),
        "the error does not name the base {from}: {err}"
    );
    assert!(
        proxy.records().is_empty(),
        "--pull=never contacted the registry:\n{}",
        proxy.summary()
    );

    let out = build(&imago, &dir, &["app"]).ok();
    let app = out.stdout().trim().to_owned();
    assert!(
        out.stdout().contains(&base) || out.stderr().contains(&base),
        "the resolved base digest is not printed\nstdout: {}\nstderr: {}",
        out.stdout(),
        out.stderr()
    );
    let notes = annotations(&imago, &app);
    assert_eq!(
        notes["org.opencontainers.image.base.digest"],
        base.as_str(),
        "{notes}"
    );
    let fetched_blobs = proxy
        .records()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .count();
    assert!(fetched_blobs > 0, "{}", proxy.summary());

    // Cached by digest: --pull=missing and --pull=never fetch no blob again; the same image.
    for mode in ["--pull=missing", "--pull=never"] {
        proxy.clear();
        let again = build(&imago, &dir, &[mode, "app"]).ok();
        assert_eq!(again.stdout().trim(), app, "{mode}");
        let blobs: Vec<_> = proxy
            .records()
            .into_iter()
            .filter(|r| r.path.contains("/blobs/"))
            .collect();
        assert!(
            blobs.is_empty(),
            "{mode} fetched blobs again:\n{}",
            proxy.summary()
        );
    }
    if !proxy.records().is_empty() {
        panic!("--pull=never contacted the registry:\n{}", proxy.summary());
    }

    // --pull=always resolves the tag again: after a re-tag it builds on the new base.
    let other = registry::build_web_image(
        &builder,
        &builder.dir.path().join("base2"),
        "base",
        "base 2\n",
    );
    registry::run(
        &builder,
        &["push", &other, &format!("{}/base:1", reg.host())],
    )
    .ok();
    proxy.clear();
    let fresh = build(&imago, &dir, &["--pull=always", "app"]).ok();
    let app2 = fresh.stdout().trim().to_owned();
    assert_ne!(app2, app);
    assert_eq!(
        annotations(&imago, &app2)["org.opencontainers.image.base.digest"],
        other.as_str()
    );
    let manifest_gets = proxy
        .records()
        .iter()
        .filter(|r| r.path.contains("/manifests/1"))
        .count();
    assert!(manifest_gets >= 1, "{}", proxy.summary());
}

#[test]
fn push_in_the_definition_and_build_push_publish_what_was_built() {
    let reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    let dir = imago.dir.path().join("app");
    std::fs::create_dir_all(&dir).unwrap();
    let team = format!("{}/team/app", reg.host());
    std::fs::write(
        dir.join("imago.toml"),
        app_definition("scratch", &format!("push = [\"{team}\"]\n")),
    )
    .unwrap();
    let out = build(&imago, &dir, &["app"]).ok();
    let text = format!("{}{}", out.stdout(), out.stderr());
    let digest = text
        .split(|c: char| c.is_whitespace() || c == '@')
        .find(|w| w.starts_with("sha256:") && w.len() == 71)
        .unwrap_or_else(|| panic!("no digest printed: {text}"))
        .to_owned();
    assert!(
        text.contains(&format!("team/app@{digest}")),
        "build with push = [...] does not print REPO@DIGEST: {text}"
    );
    let (status, body) = reg.get(&format!("/v2/team/app/manifests/{digest}"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(registry::store_blob(&imago, &digest), body);

    let other = format!("{}/other/app", reg.host());
    let out = build(&imago, &dir, &["--push", &other, "app"]).ok();
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(text.contains(&format!("other/app@{digest}")), "{text}");
    let (status, _) = reg.get(&format!("/v2/other/app/manifests/{digest}"));
    assert_eq!(status, 200);
}

/// Names as docker reads them: an image stored under its full Docker Hub name
/// (`docker.io/library/base:1`, as a pull names it) is the `from = "base:1"` of a build and
/// of `docker.io/base:1`, without any registry traffic, and `imago images` shows it shortened.
#[test]
fn docker_hub_names_normalise_for_from_and_show_shortened() {
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "docker.io/library/base:1", &[10_000], 5);
    for from in ["base:1", "docker.io/base:1", "docker.io/library/base:1"] {
        let dir = imago.dir.path().join(from.replace(['/', ':'], "_"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("imago.toml"), app_definition(from, "")).unwrap();
        // --pull=missing: the base is found in the store under its full name, nothing pulled.
        let app = build(&imago, &dir, &["app"])
            .ok()
            .stdout()
            .trim()
            .to_owned();
        assert_eq!(
            annotations(&imago, &app)["org.opencontainers.image.base.digest"],
            digest.as_str(),
            "from = {from:?}"
        );
    }
    let listed = registry::run(&imago, &["images"]).ok().stdout();
    let line = listed
        .lines()
        .find(|l| l.contains(&digest["sha256:".len()..][..12]))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(line.starts_with("base:1 "), "not shown shortened: {listed}");
    let inspected = registry::run_json(&imago, &["inspect", "base:1"]);
    assert_eq!(inspected["digest"], digest.as_str());
}
