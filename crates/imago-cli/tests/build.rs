//! `imago build` and `imago schema`, run as the built binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
use std::time::Instant;

use common::Imago;

const DEFINITION: &str = r#"
[image.hello]
platform = "linux/amd64"
[[image.hello.layer]]
copy = [{ src = "site", dest = "/www/", mode = "0644", dir_mode = "0755" }]
file = [{ path = "/etc/motd", content = "hi\n" }]
[image.hello.config]
cmd = ["/bin/sh"]

[image.other]
platform = "linux/amd64"
compression = "zstd"
[[image.other.layer]]
file = [{ path = "/other", content = "other\n", mode = "0600" }]

[service.hello]
image = "hello"
"#;

fn context(imago: &Imago) -> std::path::PathBuf {
    let dir = imago.dir.path().join("ctx");
    fs::create_dir_all(dir.join("site/css")).unwrap();
    fs::write(dir.join("imago.toml"), DEFINITION).unwrap();
    fs::write(dir.join("site/index.html"), "<p>hi</p>\n").unwrap();
    fs::write(dir.join("site/css/a.css"), "p {}\n").unwrap();
    dir
}

#[test]
fn build_prints_digests_tags_and_json() {
    let imago = Imago::new();
    let dir = context(&imago);
    let run = imago
        .cmd()
        .current_dir(&dir)
        .args(["build", "--json", "--tag", "v1"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let images = doc["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["name"], "hello");
    assert_eq!(
        images[0]["tags"],
        serde_json::json!(["hello:latest", "hello:v1"])
    );
    assert_eq!(
        images[1]["layers"][0]["media_type"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let digest = images[0]["digest"].as_str().unwrap().to_owned();

    // Human output: one digest per line, for scripts; the same digests from another directory.
    let copy = imago.dir.path().join("elsewhere/ctx2");
    fs::create_dir_all(copy.join("site/css")).unwrap();
    for f in ["imago.toml", "site/css/a.css", "site/index.html"] {
        fs::copy(dir.join(f), copy.join(f)).unwrap();
    }
    let out = imago
        .cmd()
        .args(["build", "-f"])
        .arg(copy.join("imago.toml"))
        .arg("hello")
        .env("TZ", "Asia/Kathmandu")
        .env("LANG", "tr_TR.UTF-8")
        .env("LC_ALL", "tr_TR.UTF-8")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);

    let inspect = imago.run(&["inspect", "--json", "hello:v1"]).ok().json();
    assert_eq!(inspect["digest"], digest.as_str());
}

#[test]
fn check_passes_then_names_the_difference() {
    let imago = Imago::new();
    let dir = context(&imago);
    let build = |args: &[&str]| imago.cmd().current_dir(&dir).args(args).output().unwrap();
    assert!(build(&["build", "hello"]).status.success());
    let ok = build(&["build", "--check", "hello"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    fs::write(dir.join("site/css/a.css"), "p { color: red }\n").unwrap();
    let bad = build(&["build", "--check", "hello"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("check failed for hello: layer 1 differs"),
        "{err}"
    );
}

#[test]
fn source_date_epoch_changes_created_and_mtimes() {
    let imago = Imago::new();
    let dir = context(&imago);
    let digest = |epoch: &str| {
        let out = imago
            .cmd()
            .current_dir(&dir)
            .args(["build", "--no-cache", "hello"])
            .env("SOURCE_DATE_EPOCH", epoch)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let a = digest("1700000000");
    assert_eq!(a, digest("1700000000"));
    assert_ne!(a, digest("1700000001"));
    let inspect = imago.run(&["inspect", "--json", "hello"]).ok().json();
    assert_eq!(inspect["config"]["created"], "2023-11-14T22:13:21Z");
}

#[test]
fn definition_errors_exit_nonzero_with_position_and_hint() {
    let imago = Imago::new();
    let dir = imago.dir.path().join("bad");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("imago.toml"),
        "[image.x]\n[[image.x.layer]]\ncopy = [{ src = \"nope.txt\", dest = \"/n\" }]\n",
    )
    .unwrap();
    let out = imago.cmd().current_dir(&dir).arg("build").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("imago.toml:3:17: copy source"), "{err}");
    assert!(err.contains("hint:"), "{err}");
    let out = imago
        .cmd()
        .current_dir(&dir)
        .args(["build", "nosuch"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image nosuch"));
}

#[test]
fn output_archive_and_schema() {
    let imago = Imago::new();
    let dir = context(&imago);
    let archive = imago.dir.path().join("hello.tar");
    let out = imago
        .cmd()
        .current_dir(&dir)
        .args(["build", "hello", "--output"])
        .arg(format!("oci-archive:{}", archive.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(archive.metadata().unwrap().len() > 1024);

    let schema = imago.run(&["schema"]).ok().json();
    assert_eq!(schema["title"], "imago.toml");
    assert!(schema.to_string().contains("outside_context"));
    // Services are described too, strictly (unknown keys are errors in imago.toml as well).
    assert_eq!(
        schema["properties"]["service"]["additionalProperties"]["$ref"],
        "#/$defs/ServiceSpec"
    );
    let service = &schema["$defs"]["ServiceSpec"];
    assert_eq!(service["additionalProperties"], false);
    for key in [
        "image",
        "replicas",
        "volumes",
        "seccomp",
        "health",
        "rollout",
        "stop_grace_period",
    ] {
        assert!(service["properties"].get(key).is_some(), "{key}: {service}");
    }
    assert_eq!(
        schema["$defs"]["RolloutSettings"]["additionalProperties"],
        false
    );
}

/// A no-op rebuild decides from the cache: no layer is written again. The 150 ms budget is for
/// release builds of a 10,000-file context (benches/); here the check is that it is cached and
/// quick even in a debug build.
#[test]
fn noop_rebuild_is_cached() {
    let imago = Imago::new();
    let dir = context(&imago);
    let build = || {
        let out = imago
            .cmd()
            .current_dir(&dir)
            .args(["build", "--json", "hello"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = build();
    let start = Instant::now();
    let second = build();
    let elapsed = start.elapsed();
    assert_eq!(first["images"][0]["digest"], second["images"][0]["digest"]);
    assert_eq!(second["images"][0]["layers"][0]["cached"], true);
    assert!(elapsed.as_secs() < 5, "{elapsed:?}");
    assert!(Path::new(&imago.home.join("build-cache/files.json")).exists());
}
