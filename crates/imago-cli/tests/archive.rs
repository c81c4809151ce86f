//! `imago import` / `imago export` against the real tools: images written by umoci and skopeo
//! import with the digests those tools give, exports are read by skopeo and unpacked by umoci,
//! and the store survives kill -9 and concurrent writers. Needs skopeo, umoci and busybox-static
//! (installed by .ci/run).
// Test helpers may panic: a failed setup is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use imago_oci::{Digest, HashingWriter};
use serde_json::Value;

mod common;

use common::Imago;

/// The shared harness's temp home, plus images built with the real tools.
struct Env {
    imago: Imago,
}

impl Env {
    fn new() -> Env {
        Env {
            imago: Imago::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.imago.dir.path().join(name)
    }

    fn home(&self) -> PathBuf {
        self.imago.home.clone()
    }

    fn imago_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.imago.cmd();
        cmd.args(args);
        cmd
    }

    /// Runs imago; returns the output whatever the exit status.
    fn imago_output(&self, args: &[&str]) -> Output {
        self.imago.run(args).output
    }

    /// Runs imago, which must succeed; returns its stdout.
    fn imago(&self, args: &[&str]) -> String {
        self.imago.run(args).ok().stdout()
    }

    fn imago_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        self.imago.run(&all).ok().json()
    }

    /// Builds a busybox image with umoci in the OCI layout `layout`, tagged `tag`; returns the
    /// manifest digest umoci gave it.
    fn busybox_image(&self, layout: &str, tag: &str) -> Digest {
        let layout_dir = self.path(layout);
        let image = format!("{}:{tag}", layout_dir.display());
        tool("umoci", &["init", "--layout", layout_dir.to_str().unwrap()]);
        tool("umoci", &["new", "--image", &image]);
        let bundle = self.path(&format!("{layout}-bundle"));
        tool(
            "umoci",
            &[
                "unpack",
                "--rootless",
                "--image",
                &image,
                bundle.to_str().unwrap(),
            ],
        );
        let rootfs = bundle.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::create_dir_all(rootfs.join("etc/app")).unwrap();
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "ls", "cat", "httpd"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        fs::write(rootfs.join("etc/app/config"), "port=8080\n").unwrap();
        let script = rootfs.join("bin/start");
        fs::write(&script, "#!/bin/sh\nexec httpd -f\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        tool(
            "umoci",
            &["repack", "--image", &image, bundle.to_str().unwrap()],
        );
        tool(
            "umoci",
            &[
                "config",
                "--image",
                &image,
                "--config.cmd",
                "/bin/start",
                "--config.env",
                "A=1",
            ],
        );
        index_digest(&layout_dir, tag)
    }
}

/// Runs an external tool, which must succeed; returns its stdout.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn skopeo_inspect(target: &str) -> Value {
    serde_json::from_str(&tool("skopeo", &["inspect", target])).unwrap()
}

fn skopeo_digest(target: &str) -> Digest {
    skopeo_inspect(target)["Digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The manifest digest an OCI layout's index.json records for `tag`.
fn index_digest(layout: &Path, tag: &str) -> Digest {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    entry["digest"].as_str().unwrap().parse().unwrap()
}

fn names(env: &Env) -> Vec<String> {
    let images = env.imago_json(&["images"]);
    images
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str().map(str::to_owned))
        .collect()
}

/// Every file, directory and link under `root` with its type, permission bits and content hash.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.mode() & 0o7777;
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {mode:o}")
            } else {
                format!("file {mode:o} {}", Digest::of(&fs::read(&path).unwrap()))
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn umoci_image_imports_with_the_same_manifest_digest() {
    let env = Env::new();
    let digest = env.busybox_image("layout", "v1");
    let archive = env.path("image.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:v1", env.path("layout").display()),
            &format!("oci-archive:{}:web:v1", archive.display()),
        ],
    );
    let report = env.imago_json(&["import", archive.to_str().unwrap()]);
    assert_eq!(report["format"], "oci");
    assert_eq!(report["images"][0]["digest"], digest.to_string());
    assert_eq!(report["images"][0]["names"][0], "web:v1");
    let inspect = env.imago_json(&["inspect", "web:v1"]);
    assert_eq!(inspect["digest"], digest.to_string());
    env.imago(&["verify"]);
}

#[test]
fn zstd_layers_from_skopeo_keep_their_digests() {
    let env = Env::new();
    env.busybox_image("layout", "v1");
    let source = format!("oci:{}:v1", env.path("layout").display());
    // (Uncompressed layers are covered by the store's tests: skopeo 1.9 labels the layers it
    // decompresses for an oci destination `tar+gzip`.)
    let variants: [(&str, &[&str]); 1] = [(
        "zstd",
        &["--dest-compress", "--dest-compress-format", "zstd"],
    )];
    for (name, flags) in variants {
        let archive = env.path(&format!("{name}.tar"));
        let target = format!("oci-archive:{}:{name}:1", archive.display());
        let mut args = vec!["copy"];
        args.extend_from_slice(flags);
        args.extend([source.as_str(), target.as_str()]);
        tool("skopeo", &args);
        let expected = skopeo_digest(&format!("oci-archive:{}", archive.display()));
        let report = env.imago_json(&["import", archive.to_str().unwrap()]);
        assert_eq!(
            report["images"][0]["digest"],
            expected.to_string(),
            "{name}"
        );
        let inspect = env.imago_json(&["inspect", &format!("{name}:1")]);
        let media_type = inspect["layers"][0]["media_type"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(media_type.ends_with("tar+zstd"), "{name}: {media_type}");
    }
    env.imago(&["verify"]);
}

#[test]
fn skopeo_reads_the_store_directly() {
    let env = Env::new();
    let digest = env.busybox_image("layout", "v1");
    let archive = env.path("image.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:v1", env.path("layout").display()),
            &format!("oci-archive:{}:web:v1", archive.display()),
        ],
    );
    env.imago(&["import", archive.to_str().unwrap()]);
    env.imago(&["tag", "web:v1", "other/name:2"]);
    let store = env.home().join("store");
    for name in ["web:v1", "other/name:2"] {
        let target = format!("oci:{}:{name}", store.display());
        assert_eq!(skopeo_digest(&target), digest, "{name}");
    }
}

#[test]
fn export_is_read_by_skopeo_and_unpacked_by_umoci_like_imago_unpack() {
    let env = Env::new();
    let digest = env.busybox_image("layout", "v1");
    let archive = env.path("image.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:v1", env.path("layout").display()),
            &format!("oci-archive:{}:web:v1", archive.display()),
        ],
    );
    env.imago(&["import", archive.to_str().unwrap()]);
    let exported = env.path("exported.tar");
    let report = env.imago_json(&["export", "web:v1", "-o", exported.to_str().unwrap()]);
    assert_eq!(report["digest"], digest.to_string());
    let inspected = skopeo_inspect(&format!("oci-archive:{}", exported.display()));
    assert_eq!(inspected["Digest"], digest.to_string());
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 1);

    // umoci reads the layout inside the archive.
    let layout = env.path("exported-layout");
    fs::create_dir_all(&layout).unwrap();
    tool(
        "tar",
        &[
            "-xf",
            exported.to_str().unwrap(),
            "-C",
            layout.to_str().unwrap(),
        ],
    );
    let bundle = env.path("umoci-bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:web:v1", layout.display()),
            bundle.to_str().unwrap(),
        ],
    );
    let ours = env.path("imago-rootfs");
    env.imago(&["unpack", "web:v1", ours.to_str().unwrap()]);
    let theirs = tree(&bundle.join("rootfs"));
    assert!(theirs.contains_key("bin/busybox"), "{theirs:?}");
    assert_eq!(tree(&ours), theirs);
}

#[test]
fn docker_archive_from_skopeo_imports_as_skopeo_converts_it() {
    let env = Env::new();
    env.busybox_image("layout", "v1");
    let docker = env.path("docker.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:v1", env.path("layout").display()),
            &format!("docker-archive:{}:test/web:v1", docker.display()),
        ],
    );
    let report = env.imago_json(&["import", docker.to_str().unwrap()]);
    assert_eq!(report["format"], "docker");
    assert_eq!(report["images"][0]["names"][0], "test/web:v1");
    let ours: Digest = report["images"][0]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // What skopeo makes of the same archive, keeping the layers as they are (without the flag
    // it gzips them with its own compressor, whose bytes no other implementation reproduces).
    let converted = env.path("converted");
    tool(
        "skopeo",
        &[
            "copy",
            "--dest-oci-accept-uncompressed-layers",
            &format!("docker-archive:{}", docker.display()),
            &format!("oci:{}:x", converted.display()),
        ],
    );
    let theirs = index_digest(&converted, "x");
    let their_manifest = fs::read_to_string(converted.join(theirs.layout_path())).unwrap();
    let our_manifest =
        fs::read_to_string(env.home().join("store").join(ours.layout_path())).unwrap();
    // skopeo 1.9 keeps the docker media type's "gzip" on these uncompressed layers; imago
    // writes the true media type. Everything else is byte for byte the same.
    assert!(their_manifest.contains("application/vnd.oci.image.layer.v1.tar+gzip"));
    let corrected = their_manifest.replace(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar",
    );
    assert_eq!(our_manifest, corrected);
    assert_eq!(ours, Digest::of(corrected.as_bytes()));

    // The config digest (the image ID) matches skopeo's default conversion too.
    let default = env.path("default");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("docker-archive:{}", docker.display()),
            &format!("oci:{}:x", default.display()),
        ],
    );
    let default_manifest: Value = serde_json::from_slice(
        &fs::read(default.join(index_digest(&default, "x").layout_path())).unwrap(),
    )
    .unwrap();
    let inspect = env.imago_json(&["inspect", "test/web:v1"]);
    assert_eq!(
        inspect["config_digest"],
        default_manifest["config"]["digest"]
    );
    env.imago(&["verify"]);
}

#[test]
fn docker_export_is_read_by_skopeo() {
    let env = Env::new();
    env.busybox_image("layout", "v1");
    let archive = env.path("image.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:v1", env.path("layout").display()),
            &format!("oci-archive:{}:web:v1", archive.display()),
        ],
    );
    env.imago(&["import", archive.to_str().unwrap()]);
    let exported = env.path("docker.tar");
    env.imago(&[
        "export",
        "web:v1",
        "-o",
        exported.to_str().unwrap(),
        "--format",
        "docker",
    ]);
    let inspected = skopeo_inspect(&format!("docker-archive:{}", exported.display()));
    let layers = inspected["Layers"].as_array().unwrap();
    let imago = env.imago_json(&["inspect", "web:v1"]);
    // docker archives carry uncompressed layers: skopeo sees them by their diff_ids.
    assert_eq!(layers[0], imago["layers"][0]["diff_id"]);
    // And it converts back into an image imago imports.
    let out = env.imago_json(&["import", exported.to_str().unwrap(), "--name", "back:1"]);
    assert_eq!(out["images"][0]["names"][0], "back:1");
}

#[test]
fn damaged_archive_fails_naming_the_digest_and_names_nothing() {
    let env = Env::new();
    env.busybox_image("layout", "v1");
    let layout = env.path("layout");
    // Flip one bit in the layer blob of a copy of the layout, then archive it.
    let manifest: Value = serde_json::from_slice(
        &fs::read(layout.join(index_digest(&layout, "v1").layout_path())).unwrap(),
    )
    .unwrap();
    let layer: Digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let blob = layout.join(layer.layout_path());
    let mut bytes = fs::read(&blob).unwrap();
    bytes[100] ^= 0x10;
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&blob, bytes).unwrap();
    let archive = env.path("damaged.tar");
    tool(
        "tar",
        &[
            "-cf",
            archive.to_str().unwrap(),
            "-C",
            layout.to_str().unwrap(),
            ".",
        ],
    );
    let out = env.imago_output(&["--json", "import", archive.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&layer.to_string()), "{stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["error"].as_str().unwrap().contains(&layer.to_string()));
    assert!(names(&env).is_empty());
    env.imago(&["verify"]);
}

/// Writes an OCI archive whose single layer is `size` bytes of incompressible data; returns the
/// manifest digest.
fn big_archive(path: &Path, size: u64) -> Digest {
    let scratch = path.with_extension("layer");
    let mut layer =
        HashingWriter::new(std::io::BufWriter::new(fs::File::create(&scratch).unwrap()));
    {
        let mut tar = tar::Builder::new(&mut layer);
        let mut header = tar::Header::new_ustar();
        header.set_path("big.bin").unwrap();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append(
            &header,
            XorShift {
                state: 0x9e37_79b9_7f4a_7c15,
            }
            .take(size),
        )
        .unwrap();
        tar.finish().unwrap();
    }
    let (layer_digest, layer_size, w) = layer.finish();
    drop(w);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]},
    }))
    .unwrap();
    let config_digest = Digest::of(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest.to_string(), "size": layer_size}],
    }))
    .unwrap();
    let manifest_digest = Digest::of(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest.to_string(),
        "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "big:1"}}]}))
    .unwrap();
    let mut out = tar::Builder::new(std::io::BufWriter::new(fs::File::create(path).unwrap()));
    let mut add = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.append_data(&mut header, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add(&config_digest.layout_path(), &config);
    add(&manifest_digest.layout_path(), &manifest);
    // index.json before the layer: a kill in the middle of the layer must still name nothing.
    add("index.json", &index);
    out.append_path_with_name(&scratch, layer_digest.layout_path())
        .unwrap();
    out.finish().unwrap();
    fs::remove_file(&scratch).unwrap();
    manifest_digest
}

struct XorShift {
    state: u64,
}

impl Read for XorShift {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
        Ok(buf.len())
    }
}

fn tmp_bytes(store: &Path) -> u64 {
    fs::read_dir(store.join(".imago/tmp"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn kill_9_in_the_middle_of_an_import_leaves_the_store_valid() {
    let env = Env::new();
    let archive = env.path("big.tar");
    let digest = big_archive(&archive, 768 << 20);
    // Something already named, which must survive.
    env.busybox_image("layout", "v1");
    let small = env.path("small.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:v1", env.path("layout").display()),
            &format!("oci-archive:{}:web:v1", small.display()),
        ],
    );
    env.imago(&["import", small.to_str().unwrap()]);
    let before = fs::read(env.home().join("store/index.json")).unwrap();

    let store = env.home().join("store");
    let mut child = env
        .imago_cmd(&["import", archive.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the layer is half-way into its temp file, then kill -9.
    let deadline = Instant::now() + Duration::from_secs(120);
    while tmp_bytes(&store) < 64 << 20 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "import finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "import never started writing");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert_eq!(
        fs::read(store.join("index.json")).unwrap(),
        before,
        "index.json changed"
    );
    assert_eq!(names(&env), ["web:v1"]);
    // Blobs that were complete before the kill (here the manifest, which precedes the layer in
    // the archive) may be in the store, whole and unnamed, until gc.
    // Every blob that is visible is whole: verify re-hashes every blob in the store.
    env.imago(&["verify"]);
    assert!(
        tmp_bytes(&store) > 0,
        "the killed import left no temp file to clean"
    );
    let gc = env.imago_json(&["gc"]);
    assert!(gc["stale_temp_files"].as_u64().unwrap() >= 1, "{gc}");
    assert_eq!(tmp_bytes(&store), 0);
    assert_eq!(fs::read_dir(store.join(".imago/tmp")).unwrap().count(), 0);
    assert!(
        !store.join(digest.layout_path()).exists(),
        "gc kept the unnamed manifest"
    );
    assert_eq!(names(&env), ["web:v1"]);
    env.imago(&["verify"]);
    // And the import works when it is not interrupted.
    env.imago(&["import", archive.to_str().unwrap()]);
    assert_eq!(names(&env), ["big:1", "web:v1"]);
}

#[test]
fn concurrent_tags_and_imports_lose_no_entry() {
    let env = Env::new();
    env.busybox_image("layout", "v1");
    let archive = env.path("image.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:v1", env.path("layout").display()),
            &format!("oci-archive:{}:web:v1", archive.display()),
        ],
    );
    env.imago(&["import", archive.to_str().unwrap()]);
    const ROUNDS: usize = 15;
    let tagger = {
        let home = env.home();
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                let status = Command::new(env!("CARGO_BIN_EXE_imago"))
                    .arg("--home")
                    .arg(&home)
                    .args(["--quiet", "tag", "web:v1", &format!("tagged:{i}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap();
                assert!(status.success());
            }
        })
    };
    for i in 0..ROUNDS {
        let out = env.imago_output(&[
            "--quiet",
            "import",
            archive.to_str().unwrap(),
            "--name",
            &format!("imported:{i}"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tagger.join().unwrap();
    let all = names(&env);
    for i in 0..ROUNDS {
        assert!(
            all.contains(&format!("tagged:{i}")),
            "lost tagged:{i}: {all:?}"
        );
        assert!(
            all.contains(&format!("imported:{i}")),
            "lost imported:{i}: {all:?}"
        );
    }
    assert_eq!(all.len(), 2 * ROUNDS + 1);
    // index.json is still a valid layout for other tools.
    let store = env.home().join("store");
    skopeo_inspect(&format!("oci:{}:tagged:{}", store.display(), ROUNDS - 1));
    let mut index = String::new();
    fs::File::open(store.join("index.json"))
        .unwrap()
        .read_to_string(&mut index)
        .unwrap();
    let _: Value = serde_json::from_str(&index).unwrap();
    let _ = std::io::stdout().flush();
}

/// A private Docker daemon (own data root, socket and containerd) for the test's lifetime.
struct Dockerd {
    child: std::process::Child,
    socket: String,
}

impl Dockerd {
    fn start(dir: &Path) -> Dockerd {
        let socket = format!("unix://{}", dir.join("docker.sock").display());
        let log = fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args([
                "-H",
                &socket,
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dockerd (apt-get install docker.io): {e}"));
        let dockerd = Dockerd { child, socket };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !dockerd.docker(&["info"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up: {}",
                fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        dockerd
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .env("DOCKER_HOST", &self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM, so that dockerd also stops the containerd it started.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

#[test]
fn docker_loads_the_docker_export_and_its_save_imports_back() {
    let env = Env::new();
    env.busybox_image("layout", "v1");
    let archive = env.path("image.tar");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:v1", env.path("layout").display()),
            &format!("oci-archive:{}:web:v1", archive.display()),
        ],
    );
    env.imago(&["import", archive.to_str().unwrap()]);
    let exported = env.path("docker.tar");
    env.imago(&[
        "export",
        "web:v1",
        "-o",
        exported.to_str().unwrap(),
        "--format",
        "docker",
    ]);
    let docker_dir = env.path("docker");
    fs::create_dir_all(&docker_dir).unwrap();
    let docker = Dockerd::start(&docker_dir);
    let loaded = docker.ok(&["load", "-i", exported.to_str().unwrap()]);
    assert!(loaded.contains("web:v1"), "{loaded}");
    let image: Value = serde_json::from_str(&docker.ok(&["image", "inspect", "web:v1"])).unwrap();
    let inspect = env.imago_json(&["inspect", "web:v1"]);
    // Docker's image ID is the config digest; its layers are the diff_ids.
    assert_eq!(image[0]["Id"], inspect["config_digest"]);
    assert_eq!(
        image[0]["RootFS"]["Layers"][0],
        inspect["layers"][0]["diff_id"]
    );

    let saved = env.path("saved.tar");
    docker.ok(&["save", "web:v1", "-o", saved.to_str().unwrap()]);
    let report = env.imago_json(&["import", saved.to_str().unwrap(), "--name", "saved:1"]);
    assert_eq!(report["format"], "docker");
    let back = env.imago_json(&["inspect", "saved:1"]);
    assert_eq!(
        back["layers"][0]["diff_id"],
        inspect["layers"][0]["diff_id"]
    );
}
