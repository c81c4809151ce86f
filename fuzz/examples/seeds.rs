//! Writes the seed inputs of every fuzz target into `fuzz/corpus/TARGET/`: real images built by
//! the builder (their layers, manifests and configs, exported as docker and OCI archives),
//! hand-made hostile layers, definitions and references; fuzzing and `-merge` grow and trim the
//! corpora from there. Run: `cargo +nightly run --manifest-path fuzz/Cargo.toml --example seeds`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use imago_build::{BuildOptions, DefinitionFile, build_image};
use imago_layer::Compression;
use imago_layer::compression::decompress;
use imago_layer::writer::{LayerWriter, Meta};
use imago_oci::Reference;
use imago_store::{ExportFormat, Store};

const DEFINITION: &str = r#"
[image.base]
compression = "zstd"
[[image.base.layer]]
name = "etc"
dir = [{ path = "/tmp", mode = "1777" }]
file = [
  { path = "/etc/passwd", content = "root:x:0:0:root:/root:/bin/sh\n" },
  { path = "/etc/group", content = "root:x:0:\n", owner = "0:0", mode = "0644" },
]
symlink = [{ path = "/bin/sh", target = "busybox" }]
[image.base.config]
entrypoint = ["/bin/sh"]
env = ["PATH=/bin"]
ports = ["8080/tcp"]

[image.web]
from = "base"
[[image.web.layer]]
name = "site"
copy = [{ src = "www", dest = "/www/", mode = "0644", dir_mode = "0755" }, { src = "*.txt", dest = "/txt/" }]
file = [{ path = "/www/.wh.old", content = "" }]
[image.web.config]
entrypoint = ["/bin/sh", "-c", "httpd"]
user = "65534:65534"
workdir = "/www"
ports = ["8080/tcp"]
stop_signal = "SIGTERM"
labels = { "org.opencontainers.image.title" = "seed" }
volumes = ["/data"]

[service.web]
image = "web"
replicas = 2
port = 8088
target_port = 8080
[service.web.health]
type = "http"
path = "/"
interval = "200ms"
"#;

fn main() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = fuzz.join("corpus");
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    fs::create_dir_all(ctx.join("www/img")).unwrap();
    fs::write(ctx.join("www/index.html"), b"<h1>hello</h1>\n").unwrap();
    fs::write(ctx.join("www/img/a.svg"), b"<svg/>\n").unwrap();
    fs::write(ctx.join("notes.txt"), b"notes\n").unwrap();
    std::os::unix::fs::hard_link(ctx.join("notes.txt"), ctx.join("same.txt")).unwrap();
    let toml = ctx.join("imago.toml");
    fs::write(&toml, DEFINITION).unwrap();
    let file = DefinitionFile::load(&toml).unwrap();
    let store = Store::open(&work.path().join("store")).unwrap();
    let options = BuildOptions {
        source_date_epoch: 0,
        cache_dir: None,
        check: false,
    };
    let mut built = Vec::new();
    for name in ["base", "web"] {
        built.push(build_image(&store, &file, name, &options, &mut |_| {}).unwrap());
    }

    // imago_toml: this definition, the example and the docs' snippets.
    let dir = target(&seeds, "imago_toml");
    fs::write(dir.join("seed.toml"), DEFINITION).unwrap();
    let example = fuzz.join("../examples/web/imago.toml");
    fs::copy(&example, dir.join("example-web.toml")).unwrap();
    let docs = fs::read_to_string(fuzz.join("../docs/imago-toml.md")).unwrap();
    for (i, block) in docs.split("```toml").skip(1).enumerate() {
        let block = block.split("```").next().unwrap_or_default();
        fs::write(dir.join(format!("docs-{i}.toml")), block).unwrap();
    }

    // layer_unpack: the built layers as stored (gzip, zstd) and uncompressed, and hand-made ones.
    let dir = target(&seeds, "layer_unpack");
    for image in &built {
        for (i, layer) in image.layers.iter().enumerate() {
            let blob = store.read_blob(&layer.digest, None).unwrap();
            let compression = Compression::from_media_type(&layer.media_type).unwrap();
            let mut tar = Vec::new();
            decompress(compression, &blob[..])
                .unwrap()
                .read_to_end(&mut tar)
                .unwrap();
            fs::write(dir.join(format!("{}-{i}.tar", image.name)), &tar).unwrap();
            fs::write(
                dir.join(format!("{}-{i}.{:?}", image.name, compression)),
                &blob,
            )
            .unwrap();
        }
    }
    fs::write(dir.join("writer-whiteouts.tar"), writer_layer()).unwrap();
    for (name, tar) in hostile_layers() {
        fs::write(dir.join(format!("{name}.tar")), tar).unwrap();
    }

    // oci_json: config, manifest with placeholders, index, the store's index.json.
    let dir = target(&seeds, "oci_json");
    let index_json = fs::read(store.root().join("index.json")).unwrap();
    for image in &built {
        let config = String::from_utf8(image.config.clone()).unwrap();
        let manifest = String::from_utf8(image.manifest.clone())
            .unwrap()
            .replace(&image.config_digest.to_string(), "@CONFIG@")
            .replace(
                &format!("\"size\":{}", image.config.len()),
                "\"size\":@CONFIG_SIZE@",
            );
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@MANIFEST@","size":@MANIFEST_SIZE@,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        fs::write(
            dir.join(format!("{}-manifest", image.name)),
            format!("{config}\n----\n{manifest}"),
        )
        .unwrap();
        fs::write(
            dir.join(format!("{}-index", image.name)),
            format!(
                "{config}\n----\n{manifest}\n----\n{index}\n----\n{}",
                String::from_utf8_lossy(&index_json)
            ),
        )
        .unwrap();
    }

    // docker_archive: the web image exported in both formats.
    let dir = target(&seeds, "docker_archive");
    let web = store.load_image(&built[1].digest).unwrap();
    let name: Reference = "web:latest".parse().unwrap();
    store
        .export(
            &web,
            Some(&name),
            ExportFormat::Docker,
            &dir.join("web-docker.tar"),
        )
        .unwrap();
    store
        .export(
            &web,
            Some(&name),
            ExportFormat::Oci,
            &dir.join("web-oci.tar"),
        )
        .unwrap();
    let base = store.load_image(&built[0].digest).unwrap();
    store
        .export(
            &base,
            None,
            ExportFormat::Docker,
            &dir.join("base-docker.tar"),
        )
        .unwrap();

    // reference
    let dir = target(&seeds, "reference");
    let digest = built[1].digest.to_string();
    for (i, text) in [
        "web".to_owned(),
        "web:v1".to_owned(),
        "localhost:5000/team/app:1.0_rc".to_owned(),
        digest.clone(),
        format!("web@{digest}"),
        format!("web:v2@{digest}"),
        "sha256:abcd".to_owned(),
        "3f9a2c".to_owned(),
        "web\0v1".to_owned(),
        "a.b-c/d_e\0_tag".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        fs::write(dir.join(format!("ref-{i}")), text).unwrap();
    }
}

fn target(seeds: &Path, name: &str) -> PathBuf {
    let dir = seeds.join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A layer from the layer writer with whiteouts, an opaque directory and a hard link.
fn writer_layer() -> Vec<u8> {
    let meta = |mode| Meta {
        mode,
        uid: 0,
        gid: 0,
    };
    let mut w = LayerWriter::new(Vec::new(), Compression::None, 0).unwrap();
    w.add_dir(b"lower", meta(0o755)).unwrap();
    w.add_file(b"lower/.wh..wh..opq", meta(0o644), 0, &b""[..])
        .unwrap();
    w.add_file(b"lower/.wh.file", meta(0o644), 0, &b""[..])
        .unwrap();
    w.add_file(b"lower/new", meta(0o4755), 5, &b"hello"[..])
        .unwrap();
    w.add_hardlink(b"lower/new2", b"lower/new", meta(0o4755))
        .unwrap();
    w.add_symlink(b"lower/sym", b"../up", 0, 0).unwrap();
    let (_, bytes) = w.finish().unwrap();
    bytes
}

/// Layers that try to leave the root: through the lower layer's symlinks, `..`, absolute paths,
/// their own symlinks, hard links and device nodes.
fn hostile_layers() -> Vec<(&'static str, Vec<u8>)> {
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, data).unwrap();
    };
    let link = |b: &mut tar::Builder<Vec<u8>>, kind, path: &str, target: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, path, target).unwrap();
    };
    let raw_name = |b: &mut tar::Builder<Vec<u8>>, path: &[u8], kind| {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
    };
    let mut out = Vec::new();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "up/sentinel", b"x");
    file(&mut b, "abs/new", b"x");
    file(&mut b, "lower/up2/new", b"x");
    out.push(("through-lower-symlinks", b.into_inner().unwrap()));
    let mut b = tar::Builder::new(Vec::new());
    link(&mut b, tar::EntryType::Symlink, "esc", "../outside");
    file(&mut b, "esc/new", b"x");
    link(
        &mut b,
        tar::EntryType::Symlink,
        "esc2",
        "lower/../../outside",
    );
    link(&mut b, tar::EntryType::Link, "hard", "abs-file");
    link(&mut b, tar::EntryType::Link, "hard2", "up/sentinel");
    out.push(("own-symlinks-and-links", b.into_inner().unwrap()));
    let raw: [(&'static str, &[u8], tar::EntryType); 7] = [
        ("dotdot", b"../outside/new", tar::EntryType::Regular),
        ("absolute", b"/outside/new", tar::EntryType::Regular),
        ("root-entry", b"./", tar::EntryType::Directory),
        ("char-device", b"dev", tar::EntryType::Char),
        ("fifo", b"fifo", tar::EntryType::Fifo),
        ("whiteout", b"lower/.wh.file", tar::EntryType::Regular),
        ("whiteout-symlink", b".wh.up", tar::EntryType::Regular),
    ];
    for (name, path, kind) in raw {
        let mut b = tar::Builder::new(Vec::new());
        raw_name(&mut b, path, kind);
        out.push((name, b.into_inner().unwrap()));
    }
    out
}
