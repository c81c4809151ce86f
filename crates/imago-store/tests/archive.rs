//! Store-level tests of archive import and export, on archives built here byte by byte so that
//! every kind of damage can be made precisely. Interop with skopeo and umoci is tested at the
//! CLI level (crates/imago-cli/tests/archive.rs).
// Test helpers may panic: a failed setup is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use imago_layer::compression::{Compression, Compressor};
use imago_oci::{Digest, Reference, media};
use imago_store::{ArchiveFormat, ExportFormat, ImportOptions, Store, StoreError};
use serde_json::json;

/// A tiny layer tar holding one file.
fn layer_tar(file: &str, content: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_path(file).unwrap();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder.append(&header, content).unwrap();
    builder.into_inner().unwrap()
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    let mut w = Compressor::new(c, Vec::new()).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

/// The files of an OCI archive, in the order they are written, editable before writing.
struct OciArchive {
    entries: Vec<(String, Vec<u8>)>,
    manifest: Digest,
    config: Digest,
    layers: Vec<Digest>,
}

impl OciArchive {
    fn new(layers: &[Compression]) -> OciArchive {
        Self::with(layers, |_, _| {})
    }

    /// Builds an image with one layer per entry of `layers`; `edit` may change the manifest and
    /// config JSON before they are hashed.
    fn with(
        layers: &[Compression],
        edit: impl Fn(&mut serde_json::Value, &mut serde_json::Value),
    ) -> OciArchive {
        let mut entries = Vec::new();
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        let mut layer_digests = Vec::new();
        for (i, c) in layers.iter().enumerate() {
            let tar = layer_tar(
                &format!("file{i}"),
                format!("content {i}").repeat(100).as_bytes(),
            );
            diff_ids.push(Digest::of(&tar).to_string());
            let blob = compress(*c, &tar);
            let digest = Digest::of(&blob);
            descriptors.push(json!({"mediaType": c.layer_media_type(), "digest": digest.to_string(), "size": blob.len()}));
            entries.push((digest.layout_path(), blob));
            layer_digests.push(digest);
        }
        let mut config = json!({
            "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let mut manifest =
            json!({"schemaVersion": 2, "mediaType": media::OCI_MANIFEST, "layers": descriptors});
        edit(&mut manifest, &mut config);
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = Digest::of(&config_bytes);
        if manifest.get("config").is_none() {
            manifest["config"] = json!({"mediaType": media::OCI_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len()});
        }
        entries.push((config_digest.layout_path(), config_bytes));
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = Digest::of(&manifest_bytes);
        entries.push((manifest_digest.layout_path(), manifest_bytes.clone()));
        let index = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": media::OCI_MANIFEST, "digest": manifest_digest.to_string(), "size": manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "test/app:1"}}]});
        entries.push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
        entries.push((
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ));
        OciArchive {
            entries,
            manifest: manifest_digest,
            config: config_digest,
            layers: layer_digests,
        }
    }

    fn entry_mut(&mut self, path: &str) -> &mut Vec<u8> {
        &mut self.entries.iter_mut().find(|(p, _)| p == path).unwrap().1
    }

    fn write(&self, path: &Path, compression: Compression) {
        write_tar(&self.entries, path, compression);
    }
}

fn write_tar(entries: &[(String, Vec<u8>)], path: &Path, compression: Compression) {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, &data[..]).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    fs::write(path, compress(compression, &tar)).unwrap();
}

fn setup() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

fn archive_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("image.tar")
}

/// Nothing got a name and no temp file is left.
fn assert_nothing_named(store: &Store) {
    assert!(store.names().unwrap().is_empty(), "a name was written");
    let tmp = store.root().join(".imago/tmp");
    assert_eq!(
        fs::read_dir(tmp).unwrap().count(),
        0,
        "temp files left behind"
    );
}

fn import_err(store: &Store, path: &Path) -> String {
    let err = store
        .import_archive(path, &ImportOptions::default())
        .unwrap_err();
    assert!(matches!(err, StoreError::Archive { .. }), "{err}");
    err.to_string()
}

#[test]
fn gzip_zstd_and_uncompressed_layers_import_with_their_digest() {
    let (dir, store) = setup();
    let archive = OciArchive::new(&[Compression::Gzip, Compression::Zstd, Compression::None]);
    archive.write(&archive_path(&dir), Compression::None);
    let report = store
        .import_archive(&archive_path(&dir), &ImportOptions::default())
        .unwrap();
    assert_eq!(report.format, ArchiveFormat::Oci);
    assert_eq!(report.images.len(), 1);
    assert_eq!(report.images[0].digest, archive.manifest);
    assert_eq!(report.images[0].names, ["test/app:1"]);
    let image = store.resolve(&"test/app:1".parse().unwrap()).unwrap();
    assert_eq!(image.digest, archive.manifest);
    assert_eq!(image.config_digest, archive.config);
    assert!(store.verify(None).unwrap().is_ok());
    // Importing again finds every blob present and changes nothing.
    let again = store
        .import_archive(&archive_path(&dir), &ImportOptions::default())
        .unwrap();
    assert_eq!(again.blobs_written, 0);
    assert_eq!(store.names().unwrap().len(), 1);
}

#[test]
fn compressed_archives_are_read() {
    for c in [Compression::Gzip, Compression::Zstd] {
        let (dir, store) = setup();
        let archive = OciArchive::new(&[Compression::Gzip]);
        archive.write(&archive_path(&dir), c);
        let report = store
            .import_archive(&archive_path(&dir), &ImportOptions::default())
            .unwrap();
        assert_eq!(report.images[0].digest, archive.manifest, "{c:?}");
    }
}

#[test]
fn name_override_replaces_archive_names() {
    let (dir, store) = setup();
    OciArchive::new(&[Compression::Gzip]).write(&archive_path(&dir), Compression::None);
    let options = ImportOptions {
        name: Some("mine:v2".parse().unwrap()),
        progress: None,
        unnamed: false,
    };
    let report = store.import_archive(&archive_path(&dir), &options).unwrap();
    assert_eq!(report.images[0].names, ["mine:v2"]);
    let names: Vec<_> = store
        .names()
        .unwrap()
        .into_iter()
        .filter_map(|n| n.name)
        .collect();
    assert_eq!(names, ["mine:v2"]);
}

#[test]
fn a_tag_must_be_a_plain_name_and_a_refused_one_changes_nothing() {
    let (dir, store) = setup();
    OciArchive::new(&[Compression::Gzip]).write(&archive_path(&dir), Compression::None);
    let options = ImportOptions {
        name: Some("mine:v1".parse().unwrap()),
        progress: None,
        unnamed: false,
    };
    let digest = store
        .import_archive(&archive_path(&dir), &options)
        .unwrap()
        .images[0]
        .digest
        .clone();
    for bad in [format!("other@{digest}"), digest.to_string()] {
        let reference: Reference = bad.parse().unwrap();
        let err = store.tag(&reference, &digest).unwrap_err();
        assert!(matches!(err, StoreError::InvalidTag(_)), "{bad}: {err}");
        assert!(err.to_string().contains("NAME[:TAG]"), "{err}");
    }
    store.tag(&"other:v2".parse().unwrap(), &digest).unwrap();
    let mut names: Vec<_> = store
        .names()
        .unwrap()
        .into_iter()
        .filter_map(|n| n.name)
        .collect();
    names.sort();
    assert_eq!(names, ["mine:v1", "other:v2"]);
}

#[test]
fn flipped_bit_in_a_layer_is_refused_by_digest() {
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::Gzip]);
    let layer = archive.layers[0].clone();
    archive.entry_mut(&layer.layout_path())[40] ^= 0x04;
    archive.write(&archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(msg.contains(&layer.to_string()), "{msg}");
    assert_nothing_named(&store);
    assert!(!store.has_blob(&layer));
}

#[test]
fn truncated_blob_is_refused_by_digest() {
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::Gzip]);
    let layer = archive.layers[0].clone();
    archive.entry_mut(&layer.layout_path()).truncate(10);
    archive.write(&archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(msg.contains(&layer.to_string()), "{msg}");
    assert_nothing_named(&store);
}

#[test]
fn truncated_archive_is_an_error_and_names_nothing() {
    let (dir, store) = setup();
    let archive = OciArchive::new(&[Compression::None]);
    archive.write(&archive_path(&dir), Compression::None);
    let bytes = fs::read(archive_path(&dir)).unwrap();
    fs::write(archive_path(&dir), &bytes[..bytes.len() / 2]).unwrap();
    import_err(&store, &archive_path(&dir));
    assert_nothing_named(&store);
}

#[test]
fn missing_blob_is_named() {
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::Gzip, Compression::Gzip]);
    let layer = archive.layers[1].clone();
    archive.entries.retain(|(p, _)| *p != layer.layout_path());
    archive.write(&archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(
        msg.contains(&layer.to_string()) && msg.contains("neither in the archive nor in the store"),
        "{msg}"
    );
    assert_nothing_named(&store);
}

#[test]
fn manifest_layer_digest_that_matches_no_blob_is_refused() {
    let (dir, store) = setup();
    let bogus = Digest::of(b"not a layer");
    let archive = OciArchive::with(&[Compression::Gzip], |manifest, _| {
        manifest["layers"][0]["digest"] = json!(bogus.to_string());
    });
    archive.write(&archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(msg.contains(&bogus.to_string()), "{msg}");
    assert_nothing_named(&store);
}

#[test]
fn descriptor_size_that_does_not_match_the_blob_is_refused() {
    let (dir, store) = setup();
    let archive = OciArchive::with(&[Compression::Gzip], |manifest, _| {
        let size = manifest["layers"][0]["size"].as_u64().unwrap();
        manifest["layers"][0]["size"] = json!(size + 1);
    });
    archive.write(&archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(
        msg.contains(&archive.layers[0].to_string()) && msg.contains("bytes"),
        "{msg}"
    );
    assert_nothing_named(&store);
}

#[test]
fn wrong_media_types_are_refused() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 3] = [
        ("layer", |m| {
            m["layers"][0]["mediaType"] = json!("application/vnd.example.thing")
        }),
        ("manifest", |m| {
            m["mediaType"] = json!("application/vnd.oci.image.config.v1+json")
        }),
        (
            "config",
            |m| m["config"] = json!({"mediaType": "text/plain", "digest": Digest::of(b"x").to_string(), "size": 1}),
        ),
    ];
    for (what, edit) in cases {
        let (dir, store) = setup();
        let archive = OciArchive::with(&[Compression::Gzip], |m, _| edit(m));
        archive.write(&archive_path(&dir), Compression::None);
        let msg = import_err(&store, &archive_path(&dir));
        assert!(msg.contains("media type"), "{what}: {msg}");
        assert_nothing_named(&store);
    }
}

#[test]
fn malformed_json_is_refused_naming_the_file() {
    // index.json
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::Gzip]);
    *archive.entry_mut("index.json") = b"{\"schemaVersion\": 2, \"manifests\": [".to_vec();
    archive.write(&archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(msg.contains("index.json") && msg.contains("json"), "{msg}");
    assert_nothing_named(&store);

    // a manifest blob that is correctly named by its digest but is not JSON
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::Gzip]);
    let garbage = b"{not json".to_vec();
    let garbage_digest = Digest::of(&garbage);
    archive
        .entries
        .push((garbage_digest.layout_path(), garbage.clone()));
    *archive.entry_mut("index.json") = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{
        "mediaType": media::OCI_MANIFEST, "digest": garbage_digest.to_string(), "size": garbage.len(),
        "annotations": {"org.opencontainers.image.ref.name": "bad:1"}}]})).unwrap();
    archive.write(&archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(
        msg.contains(garbage_digest.hex()) && msg.contains("json"),
        "{msg}"
    );
    assert_nothing_named(&store);

    // a config that is not JSON
    let (dir, store) = setup();
    let archive = OciArchive::with(&[Compression::Gzip], |_, config| {
        *config = json!("just a string")
    });
    archive.write(&archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(msg.contains(archive.config.hex()), "{msg}");
    assert_nothing_named(&store);
}

#[test]
fn unsafe_entry_paths_and_unknown_archives_are_refused() {
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::Gzip]);
    archive.entries.push(("../escape".into(), b"x".to_vec()));
    // tar::Builder refuses `..` itself, so write the name into the header by hand.
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in &archive.entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, &data[..]).unwrap();
    }
    fs::write(archive_path(&dir), builder.into_inner().unwrap()).unwrap();
    let msg = import_err(&store, &archive_path(&dir));
    assert!(msg.contains("../escape") && msg.contains("unsafe"), "{msg}");
    assert_nothing_named(&store);

    write_tar(
        &[("hello.txt".into(), b"hi".to_vec())],
        &archive_path(&dir),
        Compression::None,
    );
    let msg = import_err(&store, &archive_path(&dir));
    assert!(msg.contains("neither an oci archive"), "{msg}");
}

/// A docker archive as `docker save` writes it: config, one directory per layer, manifest.json.
fn docker_archive(
    layer_compression: Compression,
    diff_id_override: Option<String>,
) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let tar = layer_tar("etc/hostname", b"docker\n");
    let diff_id = diff_id_override.unwrap_or_else(|| Digest::of(&tar).to_string());
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00.000000000Z",
        "docker_version": "20.10", "container_config": {"Hostname": "abc"},
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let config_name = format!("{}.json", Digest::of(&config).hex());
    let manifest = json!([{"Config": config_name, "RepoTags": ["docker.io/library/app:3"], "Layers": ["abc/layer.tar"]}]);
    let entries = vec![
        ("abc/VERSION".into(), b"1.0".to_vec()),
        ("abc/layer.tar".into(), compress(layer_compression, &tar)),
        (config_name, config),
        (
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        ),
    ];
    (entries, tar)
}

#[test]
fn docker_archives_import_with_uncompressed_layers() {
    for c in [Compression::None, Compression::Gzip] {
        let (dir, store) = setup();
        let (entries, tar) = docker_archive(c, None);
        write_tar(&entries, &archive_path(&dir), Compression::None);
        let report = store
            .import_archive(&archive_path(&dir), &ImportOptions::default())
            .unwrap();
        assert_eq!(report.format, ArchiveFormat::Docker);
        assert_eq!(report.images[0].names, ["app:3"]);
        let image = store.resolve(&"app:3".parse().unwrap()).unwrap();
        let layers = image.layers().unwrap();
        assert_eq!(
            layers[0].digest,
            Digest::of(&tar),
            "{c:?}: layers are stored uncompressed"
        );
        assert_eq!(layers[0].media_type, media::OCI_LAYER_TAR);
        let config = store.read_blob(&image.config_digest, None).unwrap();
        let config = String::from_utf8(config).unwrap();
        assert!(config.starts_with(r#"{"created":"2024-01-01T00:00:00Z","architecture":"amd64","os":"linux","config":{"Env""#), "{config}");
        assert!(!config.contains("docker_version"), "{config}");
        assert!(store.verify(None).unwrap().is_ok());
    }
}

#[test]
fn docker_layer_that_does_not_match_its_diff_id_is_refused() {
    let (dir, store) = setup();
    let wrong = Digest::of(b"other").to_string();
    let (entries, _) = docker_archive(Compression::None, Some(wrong.clone()));
    write_tar(&entries, &archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(
        msg.contains(&wrong) && msg.contains("abc/layer.tar"),
        "{msg}"
    );
    assert_nothing_named(&store);
}

#[test]
fn docker_manifest_naming_a_missing_layer_is_refused() {
    let (dir, store) = setup();
    let (mut entries, _) = docker_archive(Compression::None, None);
    entries.retain(|(p, _)| p != "abc/layer.tar");
    write_tar(&entries, &archive_path(&dir), Compression::None);
    let msg = import_err(&store, &archive_path(&dir));
    assert!(
        msg.contains("abc/layer.tar") && msg.contains("not in the archive"),
        "{msg}"
    );
    assert_nothing_named(&store);
}

#[test]
fn export_then_import_round_trips_in_both_formats() {
    let (dir, store) = setup();
    let archive = OciArchive::new(&[Compression::Gzip, Compression::Zstd]);
    archive.write(&archive_path(&dir), Compression::None);
    store
        .import_archive(&archive_path(&dir), &ImportOptions::default())
        .unwrap();
    let reference: Reference = "test/app:1".parse().unwrap();
    let image = store.resolve(&reference).unwrap();

    let oci = dir.path().join("out-oci.tar");
    let report = store
        .export(&image, Some(&reference), ExportFormat::Oci, &oci)
        .unwrap();
    assert_eq!(report.bytes, fs::metadata(&oci).unwrap().len());
    let other = Store::open(&dir.path().join("other")).unwrap();
    let back = other
        .import_archive(&oci, &ImportOptions::default())
        .unwrap();
    assert_eq!(back.images[0].digest, archive.manifest);
    assert_eq!(back.images[0].names, ["test/app:1"]);

    let docker = dir.path().join("out-docker.tar");
    store
        .export(&image, Some(&reference), ExportFormat::Docker, &docker)
        .unwrap();
    let third = Store::open(&dir.path().join("third")).unwrap();
    let back = third
        .import_archive(&docker, &ImportOptions::default())
        .unwrap();
    assert_eq!(back.format, ArchiveFormat::Docker);
    let converted = third.resolve(&reference).unwrap();
    // Same content: the docker archive carried uncompressed layers whose digests are the diff_ids.
    let diff_ids: Vec<_> = image
        .layers()
        .unwrap()
        .into_iter()
        .map(|l| l.diff_id.unwrap())
        .collect();
    let layers: Vec<_> = converted
        .layers()
        .unwrap()
        .into_iter()
        .map(|l| l.digest)
        .collect();
    assert_eq!(layers, diff_ids);
}

#[test]
fn export_of_a_corrupt_blob_fails_by_digest_and_leaves_no_file() {
    for format in [ExportFormat::Oci, ExportFormat::Docker] {
        let (dir, store) = setup();
        let archive = OciArchive::new(&[Compression::Gzip]);
        archive.write(&archive_path(&dir), Compression::None);
        store
            .import_archive(&archive_path(&dir), &ImportOptions::default())
            .unwrap();
        let image = store.resolve(&"test/app:1".parse().unwrap()).unwrap();
        let layer = &archive.layers[0];
        let blob = store.blob_path(layer);
        let mut bytes = fs::read(&blob).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x80;
        fs::write(&blob, bytes).unwrap();
        let out = dir.path().join("out.tar");
        let err = store.export(&image, None, format, &out).unwrap_err();
        assert!(
            err.to_string().contains(&layer.to_string()),
            "{format:?}: {err}"
        );
        assert!(!out.exists(), "{format:?}: partial output left");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !leftovers
                .iter()
                .any(|n| n.to_string_lossy().contains("imago")),
            "{format:?}: temp output left: {leftovers:?}"
        );
        assert_eq!(
            fs::read_dir(store.root().join(".imago/tmp"))
                .unwrap()
                .count(),
            0
        );
    }
}

/// Docker 25+ `docker save` writes an OCI layout plus `manifest.json`, with only the tag in
/// `org.opencontainers.image.ref.name` and the full name in `io.containerd.image.name`: it is
/// imported as the OCI layout it is (keeping Docker's manifest digest) under the full name.
#[test]
fn docker_25_archives_keep_their_oci_digest_and_full_name() {
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::None]);
    let index = json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": [{
        "mediaType": media::OCI_MANIFEST, "digest": archive.manifest.to_string(),
        "size": archive.entries.iter().find(|(p, _)| *p == archive.manifest.layout_path()).unwrap().1.len(),
        "annotations": {
            "io.containerd.image.name": "docker.io/library/busybox:1.36",
            "org.opencontainers.image.ref.name": "1.36"}}]});
    *archive.entry_mut("index.json") = serde_json::to_vec(&index).unwrap();
    let docker_manifest = json!([{
        "Config": archive.config.layout_path(),
        "RepoTags": ["busybox:1.36"],
        "Layers": [archive.layers[0].layout_path()]}]);
    archive.entries.push((
        "manifest.json".into(),
        serde_json::to_vec(&docker_manifest).unwrap(),
    ));
    archive.write(&archive_path(&dir), Compression::None);
    let report = store
        .import_archive(&archive_path(&dir), &ImportOptions::default())
        .unwrap();
    assert_eq!(report.format, ArchiveFormat::Oci);
    assert_eq!(report.images[0].digest, archive.manifest);
    assert_eq!(report.images[0].names, ["busybox:1.36"]);
}

/// `imago verify` says to re-import a damaged image: that must repair the damaged blob.
#[test]
fn reimport_repairs_a_damaged_blob() {
    let (dir, store) = setup();
    let archive = OciArchive::new(&[Compression::Gzip]);
    archive.write(&archive_path(&dir), Compression::None);
    store
        .import_archive(&archive_path(&dir), &ImportOptions::default())
        .unwrap();
    let blob = store.blob_path(&archive.layers[0]);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[20] ^= 0x01;
    fs::write(&blob, bytes).unwrap();
    assert!(!store.verify(None).unwrap().is_ok());
    let report = store
        .import_archive(&archive_path(&dir), &ImportOptions::default())
        .unwrap();
    assert_eq!(report.blobs_written, 1);
    assert!(store.verify(None).unwrap().is_ok());
}

#[test]
fn unnamed_images_are_kept_by_digest_and_a_name_override_needs_one_image() {
    let (dir, store) = setup();
    let first = OciArchive::new(&[Compression::Gzip]);
    let second = OciArchive::new(&[Compression::Zstd]);
    let mut entries = first.entries.clone();
    entries.retain(|(p, _)| p != "index.json");
    entries.extend(
        second
            .entries
            .iter()
            .filter(|(p, _)| p.starts_with("blobs/"))
            .cloned(),
    );
    let descriptor = |archive: &OciArchive| {
        let size = archive
            .entries
            .iter()
            .find(|(p, _)| *p == archive.manifest.layout_path())
            .unwrap()
            .1
            .len();
        json!({"mediaType": media::OCI_MANIFEST, "digest": archive.manifest.to_string(), "size": size})
    };
    let index = json!({"schemaVersion": 2, "manifests": [descriptor(&first), descriptor(&second)]});
    entries.push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
    write_tar(&entries, &archive_path(&dir), Compression::None);

    let options = ImportOptions {
        name: Some("one:1".parse().unwrap()),
        progress: None,
        unnamed: false,
    };
    let err = store
        .import_archive(&archive_path(&dir), &options)
        .unwrap_err();
    assert!(err.to_string().contains("2 images"), "{err}");
    assert!(store.names().unwrap().is_empty());

    let report = store
        .import_archive(&archive_path(&dir), &ImportOptions::default())
        .unwrap();
    assert_eq!(report.images.len(), 2);
    assert!(report.images.iter().all(|i| i.names.is_empty()));
    let names = store.names().unwrap();
    assert_eq!(names.len(), 2);
    assert!(names.iter().all(|n| n.name.is_none()));
    // Listed, resolvable by digest, and kept by gc.
    assert_eq!(store.images().unwrap().len(), 2);
    store
        .resolve(&second.manifest.to_string().parse().unwrap())
        .unwrap();
    store.gc(&[], false).unwrap();
    assert!(store.verify(None).unwrap().is_ok());
    // Importing again adds no duplicate entries.
    store
        .import_archive(&archive_path(&dir), &ImportOptions::default())
        .unwrap();
    assert_eq!(store.names().unwrap().len(), 2);
}

/// Every file under the store with its content: what an operation that must write nothing is
/// compared by.
fn store_files(store: &Store) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                let content = fs::read(&path).unwrap();
                out.push((path, content));
            }
        }
    }
    let mut out = Vec::new();
    walk(store.root(), &mut out);
    out.sort();
    out
}

/// A build on an archive base imports it unnamed: the blobs are stored and checked, but
/// `index.json` is not touched, not even with a digest-only entry.
#[test]
fn unnamed_import_stores_the_image_and_writes_no_name() {
    let (dir, store) = setup();
    let archive = OciArchive::new(&[Compression::Gzip, Compression::Zstd]);
    archive.write(&archive_path(&dir), Compression::None);
    let index_before = fs::read(store.root().join("index.json")).unwrap();
    let options = ImportOptions {
        unnamed: true,
        ..ImportOptions::default()
    };
    let report = store.import_archive(&archive_path(&dir), &options).unwrap();
    assert_eq!(report.images[0].digest, archive.manifest);
    assert_eq!(
        fs::read(store.root().join("index.json")).unwrap(),
        index_before
    );
    assert!(store.names().unwrap().is_empty());
    let image = store.load_image(&archive.manifest).unwrap();
    assert_eq!(image.config_digest, archive.config);
    for layer in &archive.layers {
        assert!(store.verify_blob(layer, None).is_ok(), "{layer}");
    }

    // Unnamed or not, a blob that does not hash to its name is refused and not stored.
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::Gzip]);
    let layer = archive.layers[0].clone();
    archive.entry_mut(&layer.layout_path())[40] ^= 0x04;
    archive.write(&archive_path(&dir), Compression::None);
    let err = store
        .import_archive(&archive_path(&dir), &options)
        .unwrap_err();
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
    assert!(!store.has_blob(&layer));
    assert_nothing_named(&store);
}

/// `read_archive` (what `imago build --check` reads an archive base with) finds what an import
/// finds, with the same checks, and writes nothing at all.
#[test]
fn read_archive_matches_an_import_and_writes_nothing() {
    let oci = |dir: &tempfile::TempDir| {
        OciArchive::new(&[Compression::Gzip, Compression::Zstd, Compression::None])
            .write(&archive_path(dir), Compression::Gzip);
    };
    let docker = |dir: &tempfile::TempDir| {
        let (entries, _) = docker_archive(Compression::Gzip, None);
        write_tar(&entries, &archive_path(dir), Compression::None);
    };
    let writers: [&dyn Fn(&tempfile::TempDir); 2] = [&oci, &docker];
    for write in writers {
        let (dir, store) = setup();
        write(&dir);
        let before = store_files(&store);
        let read = store.read_archive(&archive_path(&dir)).unwrap();
        assert_eq!(store_files(&store), before, "read_archive wrote something");
        assert_eq!(read.len(), 1);

        let report = store
            .import_archive(&archive_path(&dir), &ImportOptions::default())
            .unwrap();
        assert_eq!(read[0].digest, report.images[0].digest);
        let stored = store.load_image(&report.images[0].digest).unwrap();
        assert_eq!(read[0].image.digest, stored.digest);
        assert_eq!(read[0].image.config_digest, stored.config_digest);
        assert_eq!(
            read[0].config,
            store.read_blob(&stored.config_digest, None).unwrap()
        );
        assert_eq!(
            read[0].image.layers().unwrap().len(),
            stored.layers().unwrap().len()
        );
    }

    // The checks are those of an import: a flipped bit is refused by digest.
    let (dir, store) = setup();
    let mut archive = OciArchive::new(&[Compression::Gzip]);
    let layer = archive.layers[0].clone();
    archive.entry_mut(&layer.layout_path())[40] ^= 0x04;
    archive.write(&archive_path(&dir), Compression::None);
    let before = store_files(&store);
    let err = store.read_archive(&archive_path(&dir)).unwrap_err();
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
    assert_eq!(store_files(&store), before);
}

/// A compressed archive whose GNU long-name record claims 2 GiB of zeros (a few hundred KB of
/// zstd): the tar crate would read the whole record into memory; the import refuses it at its
/// header, names nothing and leaves no temp file.
#[test]
fn long_name_bomb_in_a_compressed_archive_is_refused_at_its_header() {
    let (dir, store) = setup();
    let archive = OciArchive::new(&[Compression::Gzip]);
    let plain = dir.path().join("plain.tar");
    archive.write(&plain, Compression::None);
    let mut tar = fs::read(&plain).unwrap();
    // Replace the end-of-archive blocks by the bomb's header; zeros follow.
    tar.truncate(tar.len() - 1024);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_path("././@LongLink").unwrap();
    h.set_size(2 << 30);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    let file = fs::File::create(archive_path(&dir)).unwrap();
    let mut encoder = Compressor::new(Compression::Zstd, file).unwrap();
    encoder.write_all(&tar).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(2 << 10) + 1 {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.finish().unwrap();
    let err = import_err(&store, &archive_path(&dir));
    assert!(
        err.contains("GNU long name record") && err.contains("1048576"),
        "{err}"
    );
    assert_nothing_named(&store);
}
