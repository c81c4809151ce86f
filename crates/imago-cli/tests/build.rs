//! `imago build` and `imago schema`, run as the built binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;

use common::Imago;
use imago_oci::Digest;

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
    // The CPU time the build spent, not its wall time, which a loaded host stretches at will.
    let build = || {
        let (run, cpu) = common::run_with_cpu_time(
            imago
                .cmd()
                .current_dir(&dir)
                .args(["build", "--json", "hello"]),
        );
        (run.ok().json(), cpu)
    };
    let (first, _) = build();
    let (second, cpu) = build();
    assert_eq!(first["images"][0]["digest"], second["images"][0]["digest"]);
    assert_eq!(second["images"][0]["layers"][0]["cached"], true);
    assert!(cpu.as_secs() < 5, "{cpu:?} of CPU");
    assert!(Path::new(&imago.home.join("build-cache/files.json")).exists());
}

// ---------------------------------------------------------------------------------------------
// Reproducibility matrix: one definition, built by the real binary under varied conditions.

/// Everything the layer writer and the config encoder handle: copies with and without modes,
/// files, symlinks, a hard link of the context, env/labels/annotations (kept in hash maps by
/// oci-spec), a zstd image and an image on another image of the file.
const MATRIX: &str = r##"
[image.base]
platform = "linux/amd64"
[[image.base.layer]]
copy = [{ src = "site", dest = "/www/", mode = "0644", dir_mode = "0755" }]
file = [{ path = "/etc/motd", content = "hi\n" }, { path = "/usr/bin/tool", content = "#!/bin/sh\n", mode = "4755" }]
symlink = [{ path = "/www/current", target = "index.html" }]
[image.base.config]
cmd = ["/bin/sh"]
env = { B = "2", A = "1", PATH = "/usr/bin:/bin" }
labels = { "z.last" = "z", "a.first" = "a", "m.middle" = "m" }

[image.app]
platform = "linux/amd64"
from = "base"
compression = "zstd"
[[image.app.layer]]
copy = [{ src = "data", dest = "/data/" }]
[image.app.config]
entrypoint = ["/usr/bin/tool"]
workdir = "/data"
user = "1000:1000"
ports = ["8080", "53/udp", "443/tcp"]
volumes = ["/data/v", "/cache"]
"##;

/// The context's files in creation order.
const MATRIX_FILES: &[(&str, &str)] = &[
    ("site/index.html", "<p>hi</p>\n"),
    ("site/css/a.css", "p {}\n"),
    ("site/css/b.css", "q {}\n"),
    ("site/img/z/deep.txt", "deep\n"),
    ("data/one", "1\n"),
    ("data/two/three", "3\n"),
    ("data/exec", "#!/bin/sh\n"),
];

/// The digests every build of MATRIX must give, written here so that a change of any of them
/// (layer format, JSON, compressor) fails instead of passing as long as all builds agree.
const MATRIX_GOLDEN: [(&str, &str); 2] = [
    (
        "app",
        "sha256:96d68622d3b7e3a67be0c5756196edcbd290d5bab58ff367fb804a599ad2caa5",
    ),
    (
        "base",
        "sha256:ac29db661495f02cb73af35ba3b524fb4e99ff109b15b384c7927d075dcdd87c",
    ),
];

/// Makes the context under `dir`: files in order (reversed if asked), the modes that copies
/// without a `mode` take as found set explicitly (so that the umask of whoever made them does
/// not count, as the definition asks), `data/link` a hard link of `data/one`.
fn matrix_context(dir: &Path, reverse: bool, mtime_seed: i64, owner: Option<(u32, u32)>) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("imago.toml"), MATRIX).unwrap();
    let ordered: Vec<_> = if reverse {
        MATRIX_FILES.iter().rev().collect()
    } else {
        MATRIX_FILES.iter().collect()
    };
    for (path, content) in ordered {
        let file = dir.join(path);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        common::write_file(&file, content.as_bytes());
    }
    fs::hard_link(dir.join("data/one"), dir.join("data/link")).unwrap();
    for d in ["data", "data/two"] {
        fs::set_permissions(dir.join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    for (path, _) in MATRIX_FILES.iter().filter(|(p, _)| p.starts_with("data/")) {
        let mode = if path.ends_with("exec") { 0o755 } else { 0o644 };
        fs::set_permissions(dir.join(path), fs::Permissions::from_mode(mode)).unwrap();
    }
    for (i, (path, _)) in MATRIX_FILES.iter().enumerate() {
        let secs = mtime_seed + (i as i64) * 7_777_777;
        let t =
            std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, (i as u32) * 1_000_003);
        fs::File::open(dir.join(path))
            .unwrap()
            .set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
            .unwrap();
    }
    if let Some((uid, gid)) = owner {
        let status = std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Builds MATRIX with `prefix` (`sh -c` text ending in `exec` and the program that runs imago:
/// umask, user) and `env`, returning the digests
/// by image name from `--json`.
fn matrix_build(
    home: &Path,
    cwd: &Path,
    file: &Path,
    prefix: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{prefix} \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_imago"))
        .arg("--home")
        .arg(home)
        .args(["build", "--json", "-f"])
        .arg(file)
        .args(extra)
        .current_dir(cwd)
        .env_remove("IMAGO_HOME")
        .env_remove("SOURCE_DATE_EPOCH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(doc["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect())
}

/// The same definition and files give the golden digests whatever the umask, TZ, LANG, HOME,
/// working directory, context path, file creation order, mtimes and owners, cold or warm store,
/// with or without the cache, in parallel builds of one home, and run by another user.
#[test]
fn reproducibility_matrix_gives_the_golden_digests() {
    use std::os::unix::fs::PermissionsExt;
    let imago = Imago::new();
    let root = imago.dir.path();
    // Another user must reach the contexts and its home.
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    let golden: std::collections::BTreeMap<String, String> = MATRIX_GOLDEN
        .iter()
        .map(|(n, d)| (n.to_string(), d.to_string()))
        .collect();
    let plain = root.join("a/ctx");
    matrix_context(&plain, false, 1_000_000, None);
    let odd = root.join("b/deeper/other name");
    matrix_context(&odd, true, 2_000_000_000, Some((4321, 8765)));
    let elsewhere = root.join("cwd");
    fs::create_dir_all(&elsewhere).unwrap();
    let base_env = [("TZ", "UTC"), ("LANG", "C"), ("HOME", "/root")];
    let odd_env = [
        ("TZ", "Pacific/Chatham"),
        ("LANG", "tr_TR.UTF-8"),
        ("LC_ALL", "tr_TR.UTF-8"),
        ("HOME", "/nonexistent"),
    ];
    let cold = |name: &str| root.join("homes").join(name);
    let mut results: Vec<(String, std::collections::BTreeMap<String, String>)> = Vec::new();
    let mut record = |what: &str, r: Result<_, String>| match r {
        Ok(d) => results.push((what.to_owned(), d)),
        Err(e) => panic!("{what}: build failed: {e}"),
    };

    let warm = cold("warm");
    let file = plain.join("imago.toml");
    record(
        "baseline, cold",
        matrix_build(&warm, &plain, &file, "umask 022; exec", &base_env, &[]),
    );
    record(
        "baseline, warm",
        matrix_build(&warm, &plain, &file, "umask 022; exec", &base_env, &[]),
    );
    record(
        "warm, --no-cache, other env",
        matrix_build(
            &warm,
            &elsewhere,
            &file,
            "umask 077; exec",
            &odd_env,
            &["--no-cache"],
        ),
    );
    let odd_file = odd.join("imago.toml");
    record(
        "other context (reverse order, mtimes, owner), umask 077, other env and cwd, cold",
        matrix_build(
            &cold("odd"),
            &elsewhere,
            &odd_file,
            "umask 077; exec",
            &odd_env,
            &[],
        ),
    );
    record(
        "other context into the warm store",
        matrix_build(&warm, &odd, &odd_file, "umask 002; exec", &base_env, &[]),
    );

    // Parallel builds of the same images into one cold home.
    let shared = cold("parallel");
    let parallel: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (shared, ctx) = (&shared, if i % 2 == 0 { &plain } else { &odd });
                let file = ctx.join("imago.toml");
                let env = if i % 2 == 0 {
                    &base_env[..]
                } else {
                    &odd_env[..]
                };
                s.spawn(move || matrix_build(shared, ctx, &file, "umask 027; exec", env, &[]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in parallel.into_iter().enumerate() {
        record(&format!("parallel build {i}"), r);
    }

    // Another user (nobody), with a home of its own, from the context a third user owns.
    let nobody_home = cold("nobody");
    fs::create_dir_all(&nobody_home).unwrap();
    let status = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&nobody_home)
        .status()
        .unwrap();
    assert!(status.success());
    for dir in [root.join("homes"), root.join("b"), root.join("b/deeper")] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    record(
        "another user",
        matrix_build(
            &nobody_home,
            &elsewhere,
            &odd_file,
            "umask 077; exec setpriv --reuid 65534 --regid 65534 --clear-groups",
            &odd_env,
            &[],
        ),
    );

    // The other user's build did write as that user.
    let owner = std::os::unix::fs::MetadataExt::uid(
        &fs::metadata(nobody_home.join("store/index.json")).unwrap(),
    );
    assert_eq!(owner, 65534);
    assert_eq!(results.len(), 10);
    let differing: Vec<_> = results.iter().filter(|(_, d)| *d != golden).collect();
    assert!(
        differing.is_empty(),
        "builds whose digests differ from the golden {golden:?}:\n{differing:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bases whose config does not describe their layers.

/// Writes an oci-archive of a one-layer image (busybox, `sh` and `cat`, `/who` holding `who`)
/// whose config claims `claimed` as the layer's diff_id, or the true one. Returns the layer
/// blob's digest and the true diff_id.
fn busybox_archive(path: &Path, who: &str, claimed: Option<&Digest>) -> (Digest, Digest) {
    use imago_layer::compression::{Compression, Compressor};
    let mut layer = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        if kind == tar::EntryType::Symlink {
            h.set_link_name(link).unwrap();
        }
        layer.append_data(&mut h, name, data).unwrap();
    };
    add("bin/", tar::EntryType::Directory, 0o755, b"", "");
    add(
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        &fs::read("/bin/busybox").unwrap(),
        "",
    );
    for applet in ["sh", "cat"] {
        add(
            &format!("bin/{applet}"),
            tar::EntryType::Symlink,
            0o777,
            b"",
            "busybox",
        );
    }
    add(
        "who",
        tar::EntryType::Regular,
        0o644,
        format!("{who}\n").as_bytes(),
        "",
    );
    let tar = layer.into_inner().unwrap();
    let diff_id = Digest::of(&tar);
    let mut gz = Compressor::new(Compression::Gzip, Vec::new()).unwrap();
    gz.write_all(&tar).unwrap();
    let blob = gz.finish().unwrap();
    let layer_digest = Digest::of(&blob);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [claimed.unwrap_or(&diff_id).to_string()]},
    })
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::of(config.as_bytes()).to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest.to_string(), "size": blob.len()}],
    })
    .to_string();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": Digest::of(manifest.as_bytes()).to_string(),
                       "size": manifest.len()}],
    })
    .to_string();
    let mut archive = tar::Builder::new(fs::File::create(path).unwrap());
    let mut put = |name: String, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        archive.append_data(&mut h, name, data).unwrap();
    };
    put("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
    put("index.json".into(), index.as_bytes());
    for data in [&blob[..], config.as_bytes(), manifest.as_bytes()] {
        put(format!("blobs/sha256/{}", Digest::of(data).hex()), data);
    }
    archive.into_inner().unwrap();
    (layer_digest, diff_id)
}

/// A step's root is unpacked once per chain of diff_ids and shared by every build whose parents
/// claim that chain. A base whose layer does not unpack to the diff_id its config claims is
/// refused before its step runs, naming the layer, and leaves no root behind: else an honest
/// base claiming the same diff_id would have its steps run on the liar's files.
#[test]
fn a_base_whose_layer_is_not_its_diff_id_runs_no_step_and_poisons_no_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs build steps in containers: it needs root"
    );
    let imago = Imago::new();
    let dir = imago.dir.path();
    let (_, honest_id) = busybox_archive(&dir.join("honest.tar"), "honest", None);
    let (liar_layer, _) = busybox_archive(&dir.join("liar.tar"), "liar", Some(&honest_id));
    fs::write(
        dir.join("imago.toml"),
        r#"[image.onliar]
from = "oci-archive:liar.tar"
[[image.onliar.layer]]
name = "look"
run = "cat /who > /seen"

[image.onhonest]
from = "oci-archive:honest.tar"
[[image.onhonest.layer]]
name = "look"
run = "cat /who > /seen"
"#,
    )
    .unwrap();
    let err = imago.run(&["build", "onliar"]).fails();
    assert!(
        err.contains(&liar_layer.to_string()) && err.contains("diff_id"),
        "{err}"
    );
    let chains: Vec<String> = fs::read_dir(imago.home.join("build-work/chains"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    assert!(chains.is_empty(), "left behind: {chains:?}");

    imago.run(&["build", "onhonest"]).ok();
    let image = imago
        .store()
        .resolve(&"onhonest".parse::<imago_oci::Reference>().unwrap())
        .unwrap();
    let layers = image.layers().unwrap();
    let step = layers.last().unwrap();
    let blob = fs::read(imago.store().blob_path(&step.digest)).unwrap();
    let (_, stream) = imago_layer::compression::decompress_sniffed(&blob[..]).unwrap();
    let mut seen = String::new();
    for entry in tar::Archive::new(stream).entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some("seen") {
            std::io::Read::read_to_string(&mut entry, &mut seen).unwrap();
        }
    }
    assert_eq!(seen, "honest\n");
}
