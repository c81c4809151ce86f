//! End-to-end tests of the builder library: golden digest, perturbations, cache, errors and
//! interop with skopeo and umoci. They run as root in CI (owners in umoci's unpacked tree).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use imago_build::{BuildError, BuildOptions, BuiltImage, DefinitionFile, build_image};
use imago_store::Store;

/// A home (store + cache) and a context directory.
struct Harness {
    _tmp: tempfile::TempDir,
    home: PathBuf,
}

impl Harness {
    fn new() -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        Harness { _tmp: tmp, home }
    }

    fn store(&self) -> Store {
        Store::open(&self.home.join("store")).unwrap()
    }

    fn build_with(
        &self,
        dir: &Path,
        name: &str,
        cache: bool,
        check: bool,
    ) -> Result<BuiltImage, BuildError> {
        let file = DefinitionFile::load(&dir.join("imago.toml"))?;
        let options = BuildOptions {
            source_date_epoch: 1_700_000_000,
            cache_dir: cache.then(|| self.home.join("build-cache")),
            check,
            sandbox: None,
            args: Default::default(),
            no_cache_layers: Vec::new(),
        };
        build_image(&self.store(), &file, name, &options, &mut |_| {})
    }

    fn build(&self, dir: &Path, name: &str) -> BuiltImage {
        self.build_with(dir, name, true, false).unwrap()
    }
}

const DEFINITION: &str = r#"
[image.app]
platform = "linux/amd64"

[[image.app.layer]]
name = "content"
dir = [{ path = "/tmp", mode = "1777" }]
copy = [
  { src = "site", dest = "/srv/www/", mode = "0644", dir_mode = "0755" },
  { src = "bin/tool", dest = "/usr/local/bin/tool", mode = "0755", owner = "10:20" },
  { src = "site/**/*.txt", dest = "/txt/", mode = "0600", exclude = ["skip.txt"] },
]
file = [{ path = "/etc/motd", content = "hello\n" }]
symlink = [{ path = "/bin/tool", target = "/usr/local/bin/tool" }]

[[image.app.layer]]
name = "config files"
file = [{ path = "/etc/app.conf", content = "port = 8080\n", mode = "0640", owner = "0:100" }]

[image.app.config]
entrypoint = ["/bin/tool"]
cmd = ["--serve"]
env = { PATH = "/usr/local/bin:/bin", LANG = "C.UTF-8" }
workdir = "/srv/www"
user = "10:20"
ports = ["8080", "53/udp"]
labels = { "org.opencontainers.image.title" = "app" }
stop_signal = "SIGTERM"
volumes = ["/data"]

[service.app]
image = "app"
"#;

/// Files of the test context, in creation order.
const FILES: &[(&str, &str)] = &[
    ("site/index.html", "<h1>hi</h1>\n"),
    ("site/a/notes.txt", "notes\n"),
    ("site/a/skip.txt", "skip\n"),
    ("site/b/c/deep.txt", "deep\n"),
    ("site/ignored.log", "log\n"),
    ("bin/tool", "#!/bin/sh\necho tool\n"),
    (".imagoignore", "*.log\n"),
];

fn make_context(dir: &Path, reverse: bool, file_mode: u32, dir_mode: u32) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("imago.toml"), DEFINITION).unwrap();
    let mut files: Vec<_> = FILES.to_vec();
    if reverse {
        files.reverse();
    }
    for (path, content) in files {
        let p = dir.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(file_mode)).unwrap();
    }
    for d in ["site", "site/a", "site/b", "site/b/c", "bin"] {
        fs::set_permissions(dir.join(d), fs::Permissions::from_mode(dir_mode)).unwrap();
    }
}

/// Written in the test so that any change to the layer format, the JSON or a compressor shows.
const GOLDEN_MANIFEST: &str =
    "sha256:bb03d6d6cfe55885bf259672737d8f8860c791223081c8863849c39bda363a6d";

#[test]
fn golden_manifest_digest() {
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    make_context(&dir, false, 0o644, 0o755);
    let built = h.build(&dir, "app");
    assert_eq!(built.layers.len(), 2);
    assert_eq!(built.digest.to_string(), GOLDEN_MANIFEST);
}

#[test]
fn perturbations_give_identical_digests() {
    let h = Harness::new();
    let a = h._tmp.path().join("one/ctx");
    let b = h._tmp.path().join("two/deeper/other-name");
    make_context(&a, false, 0o644, 0o755);
    // Reverse creation order, other permission bits (as umask 077 would leave them; the
    // definition gives modes), random times.
    make_context(&b, true, 0o600, 0o700);
    for (i, (path, _)) in FILES.iter().enumerate() {
        let t = filetime::FileTime::from_unix_time(1_000_000 + (i as i64) * 7_777_777, 123);
        let t2 = filetime::FileTime::from_unix_time(2_000_000_000 - (i as i64) * 99_999, 0);
        filetime::set_file_times(b.join(path), t, t2).unwrap();
    }
    let one = h.build(&a, "app");
    let two = h.build_with(&b, "app", false, false).unwrap();
    let again = h.build_with(&b, "app", false, false).unwrap();
    for (x, y) in one.layers.iter().zip(&two.layers) {
        if x.digest != y.digest {
            let dump = |d: &imago_oci::Digest| {
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(format!("tar -tvzf {}", h.store().blob_path(d).display()))
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            eprintln!("A:\n{}\nB:\n{}", dump(&x.digest), dump(&y.digest));
        }
    }
    assert_eq!(one.digest, two.digest);
    assert_eq!(two.digest, again.digest);

    // TZ, LANG and LC_ALL are varied by crates/imago-cli/tests/build.rs, which runs the real
    // binary in another environment and compares digests.
}

#[test]
fn umask_changes_digest_only_when_modes_are_not_given() {
    let h = Harness::new();
    let ctx = h._tmp.path().join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("imago.toml"),
        "[image.x]\nplatform = \"linux/amd64\"\n[[image.x.layer]]\ncopy = [{ src = \"f\", dest = \"/f\" }]\n",
    )
    .unwrap();
    fs::write(ctx.join("f"), "x").unwrap();
    fs::set_permissions(ctx.join("f"), fs::Permissions::from_mode(0o644)).unwrap();
    let a = h.build(&ctx, "x");
    fs::set_permissions(ctx.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
    let b = h.build(&ctx, "x");
    // Modes as found are part of the input when the definition gives none.
    assert_ne!(a.digest, b.digest);
}

#[test]
fn noop_rebuild_uses_the_cache_and_content_change_is_seen() {
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    make_context(&dir, false, 0o644, 0o755);
    // Make every fingerprint old enough to be trusted.
    let old = filetime::FileTime::from_unix_time(1_600_000_000, 0);
    for (path, _) in FILES {
        filetime::set_file_times(dir.join(path), old, old).unwrap();
    }
    let first = h.build(&dir, "app");
    assert!(first.layers.iter().all(|l| !l.cached));
    let second = h.build(&dir, "app");
    assert_eq!(first.digest, second.digest);
    assert!(
        second.layers.iter().all(|l| l.cached),
        "{:?}",
        second.layers
    );

    // Same size, same mtime, different content: the change must still be built.
    let p = dir.join("bin/tool");
    let original = fs::read(&p).unwrap();
    let mut changed = original.clone();
    changed[10] ^= 0x20;
    fs::write(&p, &changed).unwrap();
    filetime::set_file_times(&p, old, old).unwrap();
    let third = h.build(&dir, "app");
    assert_ne!(third.digest, first.digest);
    assert!(
        !third.layers[0].cached,
        "layer with the changed file is rebuilt"
    );
    assert!(third.layers[1].cached, "the other layer is reused");

    // Putting the old content back returns the old digest.
    fs::write(&p, &original).unwrap();
    filetime::set_file_times(&p, old, old).unwrap();
    assert_eq!(h.build(&dir, "app").digest, first.digest);

    // Fresh files (racy timestamps) are verified by content and still hit the layer cache.
    let fresh = h._tmp.path().join("fresh");
    make_context(&fresh, false, 0o644, 0o755);
    let a = h.build(&fresh, "app");
    let b = h.build(&fresh, "app");
    assert_eq!(a.digest, b.digest);
    assert!(b.layers.iter().all(|l| l.cached));
}

#[test]
fn check_compares_with_the_stored_image() {
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    make_context(&dir, false, 0o644, 0o755);
    let built = h.build(&dir, "app");
    let checked = h.build_with(&dir, "app", true, true).unwrap();
    assert_eq!(checked.digest, built.digest);
    fs::write(dir.join("site/index.html"), "<h1>changed</h1>\n").unwrap();
    let err = h
        .build_with(&dir, "app", true, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 1 differs (different content)"), "{err}");
    assert!(err.contains("config differs"), "{err}");
    assert!(!err.contains("layer 2"), "{err}");
    // --check stored nothing: the name still points at the first build.
    let stored = h.store().resolve(&"app".parse().unwrap()).unwrap();
    assert_eq!(stored.digest, built.digest);
}

fn expect_error(toml: &str, files: &[&str], expected: &str) {
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    fs::create_dir_all(&dir).unwrap();
    for f in files {
        fs::create_dir_all(dir.join(f).parent().unwrap()).unwrap();
        fs::write(dir.join(f), "x").unwrap();
    }
    fs::write(dir.join("imago.toml"), toml).unwrap();
    let err = h
        .build_with(&dir, "x", true, false)
        .unwrap_err()
        .to_string();
    let err = err.replace(&dir.display().to_string(), "CTX");
    assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
    assert!(err.contains("hint:"), "{err}");
}

#[test]
fn definition_errors_name_file_line_and_column() {
    expect_error(
        "[image.x]\n[[image.x.layer]]\ncopy = [{ src = \"f\", dest = \"/f\", mod = \"0644\" }]\n",
        &["f"],
        "imago.toml:3:",
    );
    expect_error(
        "[image.x]\ncompression = 3\n",
        &[],
        "imago.toml:2:15: wanted string",
    );
    expect_error(
        "[image.x]\n[[image.x.layer]]\ncopy = [{ src = \"missing\", dest = \"/m\" }]\n",
        &[],
        "imago.toml:3:17: copy source CTX/missing cannot be read",
    );
    expect_error(
        "[image.x]\n[[image.x.layer]]\ncopy = [\n  { src = \"*.none\", dest = \"/m/\" },\n]\n",
        &["f"],
        "imago.toml:4:11: glob *.none matches no file",
    );
    expect_error(
        "[image.x]\n[[image.x.layer]]\nfile = [{ path = \"/../etc/x\", content = \"\" }]\n",
        &[],
        "imago.toml:3:18: destination /../etc/x is outside the image root",
    );
    expect_error(
        "[image.x]\n[[image.x.layer]]\ncopy = [{ src = \"../f\", dest = \"/f\" }]\n",
        &[],
        "imago.toml:3:17: copy source ../f is outside the build context",
    );
    expect_error(
        "[image.x]\n[[image.x.layer]]\ndir = [{ path = \"/d\", mode = \"999\" }]\n",
        &[],
        "imago.toml:3:30: invalid mode \"999\"",
    );
    expect_error(
        "[image.x]\n[image.x.config]\nports = [\"http\"]\n",
        &[],
        "imago.toml:3:10: invalid port \"http\"",
    );
    let cycle = "[image.x]\nfrom = \"y\"\n[image.y]\nfrom = \"x:latest\"\n";
    let file = DefinitionFile::parse(Path::new("imago.toml"), cycle.to_owned()).unwrap();
    let err = imago_build::build_order(&file, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("imago.toml:2:8: image x is built from itself through: x -> y"),
        "{err}"
    );
    expect_error(
        "[image.x]\nfrom = \"nothere:1\"\n",
        &[],
        "imago.toml:2:8: base image nothere:1 is not in the store",
    );
}

#[test]
fn builds_on_a_base_image_from_the_store() {
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("imago.toml"),
        r#"
[image.zbase]
from = "child"
[image.base]
platform = "linux/amd64"
[[image.base.layer]]
file = [{ path = "/etc/base", content = "base\n" }]
[image.base.config]
env = { A = "1", B = "2" }
cmd = ["/bin/sh"]

[image.child]
from = "base"
[[image.child.layer]]
file = [{ path = "/etc/child", content = "child\n" }]
[image.child.config]
env = { B = "3" }
"#,
    )
    .unwrap();
    let file = DefinitionFile::load(&dir.join("imago.toml")).unwrap();
    assert_eq!(
        imago_build::build_order(&file, &["child".to_owned()]).unwrap(),
        ["base", "child"]
    );
    assert_eq!(
        imago_build::build_order(&file, &[]).unwrap(),
        ["base", "child", "zbase"]
    );
    let base = h.build(&dir, "base");
    let child = h.build(&dir, "child");
    assert_eq!(child.layers.len(), 2);
    assert_eq!(child.layers[0].digest, base.layers[0].digest);
    assert_eq!(
        child.base.as_deref(),
        Some(format!("base@{}", base.digest).as_str())
    );
    let config: serde_json::Value = serde_json::from_slice(&child.config).unwrap();
    assert_eq!(config["config"]["Env"], serde_json::json!(["A=1", "B=3"]));
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(config["architecture"], "amd64");
    let manifest: serde_json::Value = serde_json::from_slice(&child.manifest).unwrap();
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.base.digest"],
        base.digest.to_string()
    );
}

/// Fails the test when `tool` is missing: the test is an interop check against that tool, so
/// passing without it would claim something nobody checked. `scripts/setup` installs them all.
fn require(tool: &str) {
    let found = if tool.starts_with('/') {
        Path::new(tool).exists()
    } else {
        Command::new(tool).arg("--version").output().is_ok()
    };
    assert!(found, "this test needs {tool}: run scripts/setup");
}

/// skopeo and umoci read the result, and the unpacked tree has exactly the defined files.
#[test]
fn skopeo_and_umoci_read_the_image() {
    require("skopeo");
    require("umoci");
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    make_context(&dir, false, 0o644, 0o755);
    let built = h.build(&dir, "app");
    let store = h.home.join("store");

    let out = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:app:latest", store.display())])
        .output()
        .unwrap();
    assert_success(&out);
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspect["Digest"], built.digest.to_string());
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);

    let bundle = h._tmp.path().join("bundle");
    umoci_unpack(&store, "app", &bundle);
    let rootfs = bundle.join("rootfs");
    let mut found = Vec::new();
    walk(&rootfs, &rootfs, &mut found);
    let expected: Vec<(&str, u32, u32, u32)> = vec![
        ("bin", 0o40755, 0, 0),
        ("bin/tool", 0o120777, 0, 0),
        ("etc", 0o40755, 0, 0),
        ("etc/app.conf", 0o100640, 0, 100),
        ("etc/motd", 0o100644, 0, 0),
        ("srv", 0o40755, 0, 0),
        ("srv/www", 0o40755, 0, 0),
        ("srv/www/a", 0o40755, 0, 0),
        ("srv/www/a/notes.txt", 0o100644, 0, 0),
        ("srv/www/a/skip.txt", 0o100644, 0, 0),
        ("srv/www/b", 0o40755, 0, 0),
        ("srv/www/b/c", 0o40755, 0, 0),
        ("srv/www/b/c/deep.txt", 0o100644, 0, 0),
        ("srv/www/index.html", 0o100644, 0, 0),
        ("tmp", 0o41777, 0, 0),
        ("txt", 0o40755, 0, 0),
        ("txt/a", 0o40755, 0, 0),
        ("txt/a/notes.txt", 0o100600, 0, 0),
        ("txt/b", 0o40755, 0, 0),
        ("txt/b/c", 0o40755, 0, 0),
        ("txt/b/c/deep.txt", 0o100600, 0, 0),
        ("usr", 0o40755, 0, 0),
        ("usr/local", 0o40755, 0, 0),
        ("usr/local/bin", 0o40755, 0, 0),
        ("usr/local/bin/tool", 0o100755, 10, 20),
    ];
    let found: Vec<(&str, u32, u32, u32)> = found
        .iter()
        .map(|(p, m, u, g)| (p.as_str(), *m, *u, *g))
        .collect();
    assert_eq!(found, expected);
    assert_eq!(
        fs::read_link(rootfs.join("bin/tool")).unwrap(),
        Path::new("/usr/local/bin/tool")
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/motd")).unwrap(),
        "hello\n"
    );
}

fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `umoci unpack` of `NAME:latest` from the store at `store` into `bundle`.
fn umoci_unpack(store: &Path, name: &str, bundle: &Path) {
    let out = Command::new("umoci")
        .args([
            "unpack",
            "--image",
            &format!("{}:{name}:latest", store.display()),
        ])
        .arg(bundle)
        .output()
        .unwrap();
    assert_success(&out);
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u32, u32, u32)>) {
    use std::os::unix::fs::MetadataExt;
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        out.push((rel, m.mode(), m.uid(), m.gid()));
        if m.is_dir() {
            walk(root, &p, out);
        }
    }
}

/// The README demo: examples/web builds, and the unpacked image serves its page with busybox
/// httpd (run chrooted into umoci's rootfs, on loopback).
#[test]
fn example_web_builds_and_serves_its_page() {
    require("/bin/busybox");
    require("umoci");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/web");
    let h = Harness::new();
    let built = h.build(&example, "web");
    assert_eq!(built.layers.len(), 2);
    let again = h.build(&example, "web");
    assert_eq!(built.digest, again.digest);
    let config: serde_json::Value = serde_json::from_slice(&built.config).unwrap();
    assert_eq!(
        config["config"]["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}})
    );

    let bundle = h._tmp.path().join("bundle");
    let store = h.home.join("store");
    umoci_unpack(&store, "web", &bundle);
    let rootfs = bundle.join("rootfs");
    // busybox httpd in inetd mode (`-i`) on the one connection the test accepts, on a port of
    // the kernel's choosing: no fixed port, which another test's server could hold (a port
    // from 20000-29999 here took, unleased, one that another test had leased), and nothing to
    // wait for before wget connects.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served_root = rootfs.clone();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let input =
            std::process::Stdio::from(std::os::fd::OwnedFd::from(conn.try_clone().unwrap()));
        let output = std::process::Stdio::from(std::os::fd::OwnedFd::from(conn));
        Command::new("chroot")
            .arg(&served_root)
            .args(["/bin/busybox", "httpd", "-i", "-h", "/www"])
            .stdin(input)
            .stdout(output)
            .status()
            .unwrap()
    });
    let out = Command::new("chroot")
        .arg(&rootfs)
        .args([
            "/bin/busybox",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wget: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    let served = server.join().unwrap();
    assert!(served.success(), "httpd -i: {served}");
    assert!(page.contains("Hello from imago"), "{page:?}");
}

/// `--output oci-archive:F` / `docker-archive:F`: skopeo reads both, and they are reproducible.
#[test]
fn archives_are_readable_and_reproducible() {
    use imago_build::archive::{ArchiveFormat, write_archive};
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    make_context(&dir, false, 0o644, 0o755);
    let built = h.build(&dir, "app");
    let store = h.store();
    for (format, prefix) in [
        (ArchiveFormat::Oci, "oci-archive"),
        (ArchiveFormat::Docker, "docker-archive"),
    ] {
        let a = h._tmp.path().join(format!("{prefix}-a.tar"));
        let b = h._tmp.path().join(format!("{prefix}-b.tar"));
        write_archive(&store, &built, "app:latest", format, &a).unwrap();
        write_archive(&store, &built, "app:latest", format, &b).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        require("skopeo");
        let out = Command::new("skopeo")
            .args(["inspect", "--config", &format!("{prefix}:{}", a.display())])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{prefix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/bin/tool"])
        );
        if format == ArchiveFormat::Oci {
            let out = Command::new("skopeo")
                .args(["inspect", &format!("{prefix}:{}", a.display())])
                .output()
                .unwrap();
            let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(inspect["Digest"], built.digest.to_string());
        }
    }
}

/// `from = "oci-archive:FILE"` and `"docker-archive:FILE"`: the base's layers are reused as they
/// are, and the result is reproducible.
#[test]
fn builds_on_archive_bases() {
    use imago_build::archive::{ArchiveFormat, write_archive};
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    make_context(&dir, false, 0o644, 0o755);
    let base = h.build(&dir, "app");
    let store = h.store();
    write_archive(
        &store,
        &base,
        "app:latest",
        ArchiveFormat::Oci,
        &dir.join("base-oci.tar"),
    )
    .unwrap();
    write_archive(
        &store,
        &base,
        "app:latest",
        ArchiveFormat::Docker,
        &dir.join("base-docker.tar"),
    )
    .unwrap();
    let child = |from: &str| {
        let other = h._tmp.path().join(format!("child-{}", from.len()));
        fs::create_dir_all(&other).unwrap();
        fs::copy(dir.join("base-oci.tar"), other.join("base-oci.tar")).unwrap();
        fs::copy(dir.join("base-docker.tar"), other.join("base-docker.tar")).unwrap();
        fs::write(
            other.join("imago.toml"),
            format!(
                "[image.child]\nfrom = \"{from}\"\n[[image.child.layer]]\nfile = [{{ path = \"/c\", content = \"c\" }}]\n"
            ),
        )
        .unwrap();
        // A fresh store each time: the archive is the only source of the base.
        let fresh = Harness::new();
        fresh.build(&other, "child")
    };
    for from in ["oci-archive:base-oci.tar", "docker-archive:base-docker.tar"] {
        let a = child(from);
        let b = child(from);
        assert_eq!(a.digest, b.digest, "{from}");
        assert_eq!(a.layers.len(), 3, "{from}");
        if from.starts_with("oci-archive:") {
            assert_eq!(a.layers[0].digest, base.layers[0].digest, "{from}");
        }
        // A docker archive carries uncompressed layers, and the store keeps them as they come
        // (as skopeo does): the blob differs from the gzip original, the content does not.
        assert_eq!(a.layers[0].diff_id, base.layers[0].diff_id, "{from}");
        assert_eq!(a.layers[1].diff_id, base.layers[1].diff_id, "{from}");
        let config: serde_json::Value = serde_json::from_slice(&a.config).unwrap();
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/bin/tool"])
        );
        if from.starts_with("oci") {
            assert_eq!(a.base, Some(format!("{from}@{}", base.digest)));
        }
    }
    expect_error(
        "[image.x]\nfrom = \"oci-archive:missing.tar\"\n",
        &[],
        "imago.toml:2:8: base archive CTX/missing.tar does not exist",
    );
}

/// Every file under `dir` with its content.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let content = fs::read(&path).unwrap();
                out.push((path, content));
            }
        }
    }
    out.sort();
    out
}

/// A base archive is imported without giving the store any name, read once and then found
/// through the build cache until it changes; `--check` reads it and writes nothing.
#[test]
fn archive_base_is_read_once_names_nothing_and_check_writes_nothing() {
    use imago_build::archive::{ArchiveFormat, write_archive};
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    make_context(&dir, false, 0o644, 0o755);
    let base = h.build(&dir, "app");
    let child_dir = h._tmp.path().join("child");
    fs::create_dir_all(&child_dir).unwrap();
    let archive = child_dir.join("base.tar");
    write_archive(
        &h.store(),
        &base,
        "app:latest",
        ArchiveFormat::Oci,
        &archive,
    )
    .unwrap();
    fs::write(
        child_dir.join("imago.toml"),
        "[image.child]\nfrom = \"oci-archive:base.tar\"\n[[image.child.layer]]\nfile = [{ path = \"/c\", content = \"c\" }]\n",
    )
    .unwrap();
    // An archive's fingerprint is trusted once its last change is older than the racy window.
    std::thread::sleep(std::time::Duration::from_nanos(
        imago_build::cache::RACY_WINDOW_NS as u64 + 100_000_000,
    ));

    let c = Harness::new();
    let build = |check: bool| {
        let file = DefinitionFile::load(&child_dir.join("imago.toml")).unwrap();
        let options = BuildOptions {
            source_date_epoch: 1_700_000_000,
            cache_dir: Some(c.home.join("build-cache")),
            check,
            sandbox: None,
            args: Default::default(),
            no_cache_layers: Vec::new(),
        };
        let mut reads = Vec::new();
        let built = build_image(&c.store(), &file, "child", &options, &mut |e| {
            if let imago_build::Event::BaseArchive { path, .. } = e {
                reads.push(path.to_owned());
            }
        })
        .unwrap();
        (built, reads.len())
    };
    let (first, reads) = build(false);
    assert_eq!(reads, 1);
    assert_eq!(
        first.base,
        Some(format!("oci-archive:base.tar@{}", base.digest))
    );
    let names: Vec<_> = c
        .store()
        .names()
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(
        names,
        [Some("child:latest".to_owned())],
        "only the built image is named"
    );

    let (second, reads) = build(false);
    assert_eq!(reads, 0, "a no-op rebuild read the archive again");
    assert_eq!(second.digest, first.digest);

    // gc takes the base's manifest and config (nothing names them): --check must still find
    // the base, from the archive, and write nothing anywhere in the home.
    c.store().gc(&[], false).unwrap();
    assert!(!c.store().has_blob(&base.digest));
    let before = tree(&c.home);
    let (checked, reads) = build(true);
    assert_eq!(reads, 1);
    assert_eq!(checked.digest, first.digest);
    assert_eq!(tree(&c.home), before, "--check wrote something");
    // A rebuild reads the archive again to bring the base back, and gives the same image.
    let (third, reads) = build(false);
    assert_eq!(reads, 1);
    assert_eq!(third.digest, first.digest);

    // A changed archive is read again and its new base is used.
    fs::write(dir.join("bin/tool"), "#!/bin/sh\necho CHANGED\n").unwrap();
    let new_base = h.build(&dir, "app");
    assert_ne!(new_base.digest, base.digest);
    write_archive(
        &h.store(),
        &new_base,
        "app:latest",
        ArchiveFormat::Oci,
        &archive,
    )
    .unwrap();
    let (fourth, reads) = build(false);
    assert_eq!(reads, 1);
    assert_eq!(
        fourth.base,
        Some(format!("oci-archive:base.tar@{}", new_base.digest))
    );
    assert_ne!(fourth.digest, first.digest);
    // A touch alone moves the fingerprint: read again, same image.
    let f = fs::File::options().write(true).open(&archive).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    let (fifth, reads) = build(false);
    assert_eq!(reads, 1);
    assert_eq!(fifth.digest, fourth.digest);
}

/// A no-op rebuild of files whose fingerprints are old enough to trust finds its layers by
/// fingerprint: it needs neither the per-file records nor any hashing.
#[test]
fn noop_rebuild_of_settled_files_needs_no_file_records() {
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    make_context(&dir, false, 0o644, 0o755);
    // A fingerprint is trusted once the file's last change (its ctime, which no call can set
    // back) is older than the racy window.
    std::thread::sleep(std::time::Duration::from_nanos(
        imago_build::cache::RACY_WINDOW_NS as u64 + 100_000_000,
    ));
    let first = h.build(&dir, "app");
    assert!(first.layers.iter().all(|l| !l.cached));
    fs::remove_file(h.home.join("build-cache/files.json")).unwrap();
    let second = h.build(&dir, "app");
    assert_eq!(second.digest, first.digest);
    assert!(
        second.layers.iter().all(|l| l.cached),
        "{:?}",
        second.layers
    );

    // A change moves the file's ctime, so its fingerprint no longer matches: rebuilt.
    fs::write(dir.join("bin/tool"), "#!/bin/sh\necho TOOL\n").unwrap();
    let third = h.build(&dir, "app");
    assert_ne!(third.digest, first.digest);
    assert!(!third.layers[0].cached);
    assert!(third.layers[1].cached);
}

const HARDLINK_DEFINITION: &str = r#"
[image.links]
[[image.links.layer]]
copy = [{ src = "tree", dest = "/data/" }]
"#;

/// A context with `tree/a/data` and `tree/b/link` as one file under two names, the link made
/// from `first` to the other (or two separate copies of the same content).
fn hardlink_context(dir: &Path, first: &str, linked: bool) {
    fs::create_dir_all(dir.join("tree/a")).unwrap();
    fs::create_dir_all(dir.join("tree/b")).unwrap();
    fs::write(dir.join("imago.toml"), HARDLINK_DEFINITION).unwrap();
    let other = if first == "a/data" {
        "b/link"
    } else {
        "a/data"
    };
    let content = "shared content\n".repeat(1000);
    fs::write(dir.join("tree").join(first), &content).unwrap();
    if linked {
        fs::hard_link(dir.join("tree").join(first), dir.join("tree").join(other)).unwrap();
    } else {
        fs::write(dir.join("tree").join(other), &content).unwrap();
    }
    for p in ["tree/a/data", "tree/b/link"] {
        fs::set_permissions(dir.join(p), fs::Permissions::from_mode(0o644)).unwrap();
    }
    for d in ["tree", "tree/a", "tree/b"] {
        fs::set_permissions(dir.join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// The entries of an image's only layer: (path, type, link name).
fn layer_entries(store: &Store, image: &BuiltImage) -> Vec<(String, tar::EntryType, String)> {
    use std::io::Read;
    let layer = &image.layers[0];
    let blob = store.read_blob(&layer.digest, Some(layer.size)).unwrap();
    let compression = imago_layer::Compression::from_media_type(&layer.media_type).unwrap();
    let mut tar_bytes = Vec::new();
    imago_layer::compression::decompress(compression, &blob[..])
        .unwrap()
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = e
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
                .unwrap_or_default();
            let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            (path, e.header().entry_type(), link)
        })
        .collect()
}

/// Hard links of the context are stored once: the first path in layer order as the file, the
/// other as a hard-link entry to it, whichever of the two was made first.
#[test]
fn hard_links_are_stored_once_whatever_the_order_they_were_made() {
    let h = Harness::new();
    let one = h._tmp.path().join("one");
    let other = h._tmp.path().join("other");
    let copies = h._tmp.path().join("copies");
    hardlink_context(&one, "a/data", true);
    hardlink_context(&other, "b/link", true);
    hardlink_context(&copies, "a/data", false);
    let a = h.build(&one, "links");
    let b = h.build(&other, "links");
    let c = h.build(&copies, "links");
    assert_eq!(
        a.digest, b.digest,
        "the order the link was made must not matter"
    );
    assert_ne!(a.digest, c.digest);
    assert!(a.layers[0].size < c.layers[0].size);

    let entries = layer_entries(&h.store(), &a);
    let files: Vec<_> = entries
        .iter()
        .filter(|(_, t, _)| *t != tar::EntryType::Directory)
        .cloned()
        .collect();
    assert_eq!(
        files,
        vec![
            (
                "data/a/data".to_string(),
                tar::EntryType::Regular,
                String::new()
            ),
            (
                "data/b/link".to_string(),
                tar::EntryType::Link,
                "data/a/data".to_string()
            ),
        ]
    );
    // Two copies of the same content stay two files.
    assert!(
        layer_entries(&h.store(), &c)
            .iter()
            .all(|(_, t, _)| *t != tar::EntryType::Link)
    );
}

/// A source copied twice is two files in the image, not one inode, even though both entries
/// come from the same inode of the context.
#[test]
fn a_file_copied_twice_is_not_a_hard_link() {
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("f"), "x\n").unwrap();
    fs::write(
        dir.join("imago.toml"),
        r#"
[image.twice]
[[image.twice.layer]]
copy = [{ src = "f", dest = "/one" }, { src = "f", dest = "/two" }]
"#,
    )
    .unwrap();
    let built = h.build(&dir, "twice");
    let entries = layer_entries(&h.store(), &built);
    assert_eq!(entries.len(), 2);
    assert!(
        entries
            .iter()
            .all(|(_, t, _)| *t == tar::EntryType::Regular)
    );
}

/// imago's own unpacker and umoci both give the two paths one inode.
#[test]
fn unpacked_hard_links_share_an_inode() {
    use std::os::unix::fs::MetadataExt;
    let h = Harness::new();
    let dir = h._tmp.path().join("ctx");
    hardlink_context(&dir, "b/link", true);
    let built = h.build(&dir, "links");
    let store = h.store();

    let target = h._tmp.path().join("imago-unpack");
    fs::create_dir(&target).unwrap();
    let image = store.load_image(&built.digest).unwrap();
    store.unpack(&image, &target, true).unwrap();
    let a = fs::metadata(target.join("data/a/data")).unwrap();
    let b = fs::metadata(target.join("data/b/link")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    assert_eq!(a.nlink(), 2);
    assert_eq!(
        fs::read_to_string(target.join("data/b/link")).unwrap(),
        "shared content\n".repeat(1000)
    );

    require("umoci");
    let bundle = h._tmp.path().join("bundle");
    umoci_unpack(&h.home.join("store"), "links", &bundle);
    let a = fs::metadata(bundle.join("rootfs/data/a/data")).unwrap();
    let b = fs::metadata(bundle.join("rootfs/data/b/link")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    assert_eq!(a.len(), b.len());
}
