//! Push and pull against a real registry (Debian's docker-registry on 127.0.0.1): bit-identical
//! round trips into empty homes, pull by digest verifies, pull by tag prints the digest, a
//! multi-arch index survives a pull and a push unchanged, and a second push uploads nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Imago;
use common::registry::{self, Fault, Proxy, Registry, RegistryOpts};
use imago_oci::Digest;
use imago_store::Store;

#[test]
fn push_then_pull_into_an_empty_home_gives_the_same_manifest_and_blob_bytes() {
    let reg = Registry::start(RegistryOpts::plain());
    let builder = Imago::new();
    let built = registry::build_web_image(&builder, &builder.dir.path().join("ctx"), "web", "v1\n");
    let target = format!("{}/team/web:1", reg.host());

    let pushed = registry::run_json(&builder, &["push", "web:latest", &target]);
    assert_eq!(pushed["digest"], built.as_str(), "{pushed}");
    assert_eq!(pushed["reference"], target.as_str(), "{pushed}");
    let manifest = reg.manifest("team/web", "1");
    assert_eq!(Digest::of(&manifest).to_string(), built);
    assert_eq!(
        manifest,
        registry::store_blob(&builder, &built),
        "the registry holds other manifest bytes than the store"
    );
    let blobs = registry::manifest_blobs(&manifest);
    assert_eq!(pushed["blobs_uploaded"], blobs.len(), "{pushed}");
    let total: u64 = blobs.iter().map(|b| b.1).sum();
    assert_eq!(pushed["bytes_uploaded"], total, "{pushed}");
    for (digest, _) in &blobs {
        assert_eq!(
            reg.blob("team/web", digest),
            registry::store_blob(&builder, digest),
            "blob {digest} differs in the registry"
        );
    }

    // An empty home pulls by tag: same digest, every blob byte for byte, a valid store.
    let host = Imago::new();
    let pulled = registry::run_json(&host, &["pull", &target]);
    assert_eq!(pulled["digest"], built.as_str(), "{pulled}");
    assert_eq!(pulled["reference"], target.as_str(), "{pulled}");
    assert_eq!(pulled["blobs_fetched"], blobs.len(), "{pulled}");
    assert_eq!(pulled["bytes_fetched"], total, "{pulled}");
    assert_eq!(registry::store_blob(&host, &built), manifest);
    for (digest, _) in &blobs {
        assert_eq!(
            registry::store_blob(&host, digest),
            registry::store_blob(&builder, digest),
            "pulled blob {digest} differs"
        );
    }
    registry::assert_store_valid(&host);
    assert!(registry::store_temp_files(&host).is_empty());
    // The pulled image is named by its full reference and usable by it.
    let names = registry::store_names(&host);
    assert!(names.iter().any(|n| n == &target), "{names:?}");
    let inspect = registry::run_json(&host, &["inspect", &target]);
    assert_eq!(inspect["digest"], built.as_str());

    // Pull by tag, human output: the digest it resolved is printed.
    let other = Imago::new();
    let out = registry::run(&other, &["pull", &target]).ok();
    assert!(
        out.stdout().contains(&built) || out.stderr().contains(&built),
        "pull by tag does not print the digest {built}\nstdout: {}\nstderr: {}",
        out.stdout(),
        out.stderr()
    );

    // Pull by digest into another empty home.
    let by_digest = Imago::new();
    let reference = format!("{}/team/web@{built}", reg.host());
    let pulled = registry::run_json(&by_digest, &["pull", &reference]);
    assert_eq!(pulled["digest"], built.as_str(), "{pulled}");
    registry::assert_store_valid(&by_digest);
    assert_eq!(registry::store_blob(&by_digest, &built), manifest);
}

#[test]
fn pull_by_digest_refuses_a_manifest_that_does_not_hash_to_it_and_stores_nothing() {
    let reg = Registry::start(RegistryOpts::plain());
    let builder = Imago::new();
    let v1 = registry::build_web_image(&builder, &builder.dir.path().join("a"), "web", "v1\n");
    let v2 = registry::build_web_image(&builder, &builder.dir.path().join("b"), "web", "v2\n");
    registry::run(&builder, &["push", &v2, &format!("{}/web:2", reg.host())]).ok();
    // The proxy answers the manifest of v2 when v1 is asked for by digest.
    let v2_manifest = reg.manifest("web", "2");
    let proxy = Proxy::start(
        &reg.host(),
        vec![
            Fault::serve(
                "",
                &format!("/manifests/{v1}"),
                200,
                &[
                    ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
                    ("Docker-Content-Digest", &v1),
                ],
                v2_manifest,
            )
            .always(),
        ],
    );
    let host = Imago::new();
    let err = registry::run(&host, &["pull", &format!("{}/web@{v1}", proxy.host())]).fails();
    assert!(err.contains(&v1), "the error does not name {v1}: {err}");
    assert!(
        !registry::store_blobs(&host).contains(&v2),
        "the mismatching manifest was stored"
    );
    assert!(registry::store_temp_files(&host).is_empty());
}

/// A two-platform index (linux/amd64, linux/arm64) of random layers, in `imago`'s store under
/// `name`; returns (index digest, amd64 manifest digest, arm64 manifest digest).
fn make_index(imago: &Imago, name: &str) -> (String, String, String) {
    let store: Store = imago.store();
    let amd64 = registry::random_image(imago, "tmp-amd64:1", &[200_000], 11);
    let arm64_manifest = {
        let (layer, size, diff_id) = common::put_layer(
            &store,
            &[common::file(
                "arm.bin",
                &registry::random_bytes(150_000, 12),
            )],
            imago_layer::compression::Compression::Gzip,
        );
        let config = serde_json::json!({
            "architecture": "arm64", "os": "linux", "created": "1970-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
        });
        let (config_digest, config_size, _) = store.put_json(&config).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": size}],
        });
        store.put_json(&manifest).unwrap()
    };
    let amd64_size = registry::store_blob(imago, &amd64).len();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64, "size": amd64_size,
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64_manifest.0.to_string(), "size": arm64_manifest.1,
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        ],
    });
    let (index_digest, _, _) = store.put_json(&index).unwrap();
    store.tag(&name.parse().unwrap(), &index_digest).unwrap();
    (
        index_digest.to_string(),
        amd64,
        arm64_manifest.0.to_string(),
    )
}

#[test]
fn a_pulled_multi_arch_index_is_kept_and_pushes_back_with_the_same_index_digest() {
    let reg = Registry::start(RegistryOpts::plain());
    let maker = Imago::new();
    let (index, amd64, arm64) = make_index(&maker, "multi:1");
    // skopeo puts the index into the registry: imago's pull is tested on its own.
    // The layout is written by hand around the store's blobs: it must hold the index itself.
    let layout = maker.dir.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    for blob in registry::store_blobs(&maker) {
        std::fs::write(
            layout
                .join("blobs/sha256")
                .join(blob.strip_prefix("sha256:").unwrap()),
            registry::store_blob(&maker, &blob),
        )
        .unwrap();
    }
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index_size = registry::store_blob(&maker, &index).len();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index, "size": index_size,
            "annotations": {"org.opencontainers.image.ref.name": "multi:1"}}]}))
        .unwrap(),
    )
    .unwrap();
    reg.skopeo_copy(
        &format!("oci:{}:multi:1", layout.display()),
        &format!("docker://{}/multi:1", reg.host()),
    );
    assert_eq!(reg.manifest_digest("multi", "1"), index);

    let host = Imago::new();
    let source = format!("{}/multi:1", reg.host());
    let pulled = registry::run_json(&host, &["pull", &source]);
    assert_eq!(
        pulled["digest"],
        index.as_str(),
        "pull by tag must print the digest the tag resolved to (the index): {pulled}"
    );
    let blobs = registry::store_blobs(&host);
    assert!(blobs.contains(&index), "the index is not kept");
    assert!(
        blobs.contains(&amd64),
        "the linux/amd64 manifest is missing"
    );
    for (digest, _) in registry::manifest_blobs(&registry::store_blob(&host, &amd64)) {
        assert!(blobs.contains(&digest), "amd64 blob {digest} missing");
    }
    registry::assert_store_valid(&host);

    // Pushing the pulled reference to another repository gives the same index digest.
    let copy = format!("{}/copy/multi:1", reg.host());
    let pushed = registry::run_json(&host, &["push", &source, &copy]);
    assert_eq!(pushed["digest"], index.as_str(), "{pushed}");
    assert_eq!(reg.manifest_digest("copy/multi", "1"), index);
    assert_eq!(reg.manifest_digest("copy/multi", &amd64), amd64);
    assert_eq!(reg.manifest_digest("copy/multi", &arm64), arm64);

    // --platform picks the other manifest.
    let arm = Imago::new();
    registry::run_json(&arm, &["pull", "--platform", "linux/arm64", &source]);
    let blobs = registry::store_blobs(&arm);
    assert!(
        blobs.contains(&arm64),
        "--platform linux/arm64 did not fetch its manifest"
    );
    for (digest, _) in registry::manifest_blobs(&registry::store_blob(&arm, &arm64)) {
        assert!(blobs.contains(&digest), "arm64 blob {digest} missing");
    }
    // Every platform's manifest is kept, the other platform's blobs are not fetched, the store
    // is valid, and the stored index resolves to the platform pulled (not to linux/amd64).
    assert!(blobs.contains(&amd64), "the amd64 manifest is not kept");
    let amd64_layer = &registry::manifest_blobs(&registry::store_blob(&arm, &amd64))[1].0;
    assert!(!blobs.contains(amd64_layer), "amd64 blobs were fetched");
    registry::assert_store_valid(&arm);
    let inspected = registry::run_json(&arm, &["inspect", &source]);
    assert_eq!(inspected["digest"], arm64.as_str(), "{inspected}");

    // A home holding one platform cannot push the index to a registry that lacks the other:
    // a clear error naming the platform and the ways out; or it pushes one platform.
    let other = Registry::start(RegistryOpts::plain());
    let err = registry::run(
        &host,
        &["push", &source, &format!("{}/multi:1", other.host())],
    )
    .fails();
    for part in [
        "linux/arm64/v8",
        arm64.as_str(),
        "--all-platforms",
        "--platform",
    ] {
        assert!(err.contains(part), "the error does not name {part}: {err}");
    }
    let single = registry::run_json(
        &host,
        &[
            "push",
            "--platform",
            "linux/amd64",
            &source,
            &format!("{}/single:1", other.host()),
        ],
    );
    assert_eq!(single["digest"], amd64.as_str(), "{single}");
    assert_eq!(other.manifest_digest("single", "1"), amd64);

    // --all-platforms fetches every platform's blobs, and the index then goes anywhere as it is.
    let all = Imago::new();
    registry::run_json(&all, &["pull", "--all-platforms", &source]);
    let blobs = registry::store_blobs(&all);
    for image in [&amd64, &arm64] {
        for (digest, _) in registry::manifest_blobs(&registry::store_blob(&all, image)) {
            assert!(blobs.contains(&digest), "blob {digest} of {image} missing");
        }
    }
    registry::assert_store_valid(&all);
    let pushed = registry::run_json(
        &all,
        &["push", &source, &format!("{}/multi:1", other.host())],
    );
    assert_eq!(pushed["digest"], index.as_str(), "{pushed}");
    assert_eq!(
        other.manifest("multi", "1"),
        registry::store_blob(&maker, &index),
        "the index bytes changed on the way"
    );
}

#[test]
fn a_second_push_uploads_no_blob_one_manifest_request_plus_heads() {
    let reg = Registry::start(RegistryOpts::plain());
    let proxy = Proxy::start(&reg.host(), vec![]);
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "five:1", &[50_000; 5], 21);
    let target = format!("{}/team/five:1", proxy.host());
    let first = registry::run_json(&imago, &["push", "five:1", &target]);
    assert_eq!(first["blobs_uploaded"], 6, "{first}");
    assert!(
        proxy.blob_bytes_uploaded() >= 250_000,
        "{}",
        proxy.summary()
    );

    proxy.clear();
    let second = registry::run_json(&imago, &["push", "five:1", &target]);
    assert_eq!(second["digest"], digest.as_str());
    assert_eq!(second["blobs_uploaded"], 0, "{second}");
    assert_eq!(second["bytes_uploaded"], 0, "{second}");
    assert_eq!(second["blobs_skipped"], 6, "{second}");
    proxy.settle();
    let records = proxy.records();
    assert_eq!(proxy.blob_bytes_uploaded(), 0, "{}", proxy.summary());
    let manifest_requests = records
        .iter()
        .filter(|r| r.path.contains("/manifests/"))
        .count();
    assert_eq!(manifest_requests, 1, "{}", proxy.summary());
    let others: Vec<_> = records
        .iter()
        .filter(|r| {
            !r.path.contains("/manifests/")
                && r.method != "HEAD"
                && !(r.path == "/v2/" && r.method == "GET")
        })
        .collect();
    assert!(
        others.is_empty(),
        "a no-op push sent more than HEADs:\n{}",
        proxy.summary()
    );
    assert!(
        records.iter().filter(|r| r.path == "/v2/").count() <= 1,
        "{}",
        proxy.summary()
    );

    // Human output names REPO@sha256:...
    let out = registry::run(&imago, &["push", "five:1", &target]).ok();
    let expected = format!("team/five@{digest}");
    assert!(
        out.stdout().contains(&expected) || out.stderr().contains(&expected),
        "push does not print {expected}\nstdout: {}\nstderr: {}",
        out.stdout(),
        out.stderr()
    );
    assert_eq!(reg.manifest_digest("team/five", "1"), digest);
}

#[test]
fn pushing_to_another_repository_of_the_registry_mounts_blobs_instead_of_uploading() {
    let reg = Registry::start(RegistryOpts::plain());
    let proxy = Proxy::start(&reg.host(), vec![]);
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "mnt:1", &[400_000, 300_000], 22);
    registry::run_json(
        &imago,
        &["push", "mnt:1", &format!("{}/team/a:1", proxy.host())],
    );
    proxy.clear();
    let pushed = registry::run_json(
        &imago,
        &["push", "mnt:1", &format!("{}/team/b:1", proxy.host())],
    );
    assert_eq!(pushed["digest"], digest.as_str());
    assert_eq!(pushed["bytes_uploaded"], 0, "{pushed}\n{}", proxy.summary());
    assert_eq!(proxy.blob_bytes_uploaded(), 0, "{}", proxy.summary());
    assert!(
        proxy
            .records()
            .iter()
            .any(|r| r.method == "POST" && r.path.contains("mount=") && r.status == 201),
        "no cross-repository mount:\n{}",
        proxy.summary()
    );
    let manifest = reg.manifest("team/b", "1");
    assert_eq!(Digest::of(&manifest).to_string(), digest);
    for (blob, _) in registry::manifest_blobs(&manifest) {
        assert_eq!(Digest::of(&reg.blob("team/b", &blob)).to_string(), blob);
    }
}

#[test]
fn a_docker_schema_1_manifest_is_refused_with_a_clear_error() {
    let reg = Registry::start(RegistryOpts::plain());
    let schema1 = br#"{"schemaVersion":1,"name":"old","tag":"1","architecture":"amd64","fsLayers":[],"history":[],"signatures":[]}"#.to_vec();
    let digest = Digest::of(&schema1).to_string();
    let proxy = Proxy::start(
        &reg.host(),
        vec![
            Fault::serve(
                "",
                "/v2/old/manifests/",
                200,
                &[
                    (
                        "Content-Type",
                        "application/vnd.docker.distribution.manifest.v1+prettyjws",
                    ),
                    ("Docker-Content-Digest", &digest),
                ],
                schema1,
            )
            .always(),
        ],
    );
    let host = Imago::new();
    let err = registry::run(&host, &["pull", &format!("{}/old:1", proxy.host())]).fails();
    let lower = err.to_lowercase();
    assert!(
        lower.contains("schema 1")
            || lower.contains("schema1")
            || lower.contains("schemaversion 1"),
        "the error does not say schema 1: {err}"
    );
    assert!(registry::store_names(&host).is_empty());
}
