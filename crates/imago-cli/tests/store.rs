//! The image store through the CLI: names, references, inspect, verify, gc and bad blobs.

mod common;

use common::{Imago, file, make_image, make_image_with, make_layered_image, snapshot};
use imago_layer::compression::Compression;

#[test]
fn images_lists_names_with_short_digest_and_size() {
    let imago = Imago::new();
    let store = imago.store();
    let digest = make_image(&store, "web:v1", &[file("index.html", b"hello v1")]);
    make_image(&store, "api", &[file("api.txt", b"api")]);

    let json = imago.run(&["images", "--json"]).ok().json();
    let list = json.as_array().expect("array");
    assert_eq!(list.len(), 2);
    let web = list
        .iter()
        .find(|i| i["name"] == "web:v1")
        .expect("web:v1 listed");
    assert_eq!(web["digest"], digest.to_string());
    assert!(web["size"].as_u64().unwrap() > 100);
    assert_eq!(web["created"], "1970-01-01T00:00:00Z");

    let human = imago.run(&["images"]).ok().stdout();
    assert!(
        human.contains("web:v1") && human.contains(digest.short()),
        "{human}"
    );
    assert!(human.contains("api:latest"), "{human}");
}

#[test]
fn references_resolve_by_name_digest_and_unique_prefix() {
    let imago = Imago::new();
    let store = imago.store();
    let digest = make_image(&store, "web", &[file("a", b"a")]);
    for reference in [
        "web".to_string(),
        "web:latest".to_string(),
        digest.to_string(),
        format!("web@{digest}"),
        digest.hex()[..8].to_string(),
        format!("sha256:{}", &digest.hex()[..6]),
    ] {
        let json = imago.run(&["inspect", "--json", &reference]).ok().json();
        assert_eq!(json["digest"], digest.to_string(), "{reference}");
    }
    let err = imago.run(&["inspect", "nope"]).fails();
    assert!(err.contains("nope") && err.contains("not found"), "{err}");
}

#[test]
fn ambiguous_prefix_lists_every_candidate() {
    // About 300 images, each several atomic (fsynced) writes: 85 s of wall time for 2.5 s of
    // CPU on a busy shared disk, in memory a few seconds. Nothing here is about durability.
    let imago = Imago::in_memory();
    let store = imago.store();
    // Add images until two manifest digests share their first 4 hex characters (the shortest
    // prefix the CLI accepts); about 300 images by the birthday bound, deterministic content.
    let mut seen = std::collections::HashMap::new();
    let (a, b) = (0..5000)
        .find_map(|i| {
            let content = format!("content {i}");
            let d = make_image(&store, &format!("img{i}"), &[file("f", content.as_bytes())]);
            seen.insert(d.hex()[..4].to_string(), d.clone())
                .map(|other| (other, d))
        })
        .expect("a 4-hex-character collision among 5000 digests");
    let err = imago.run(&["inspect", &a.hex()[..4]]).fails();
    assert!(
        err.contains("ambiguous") && err.contains(a.hex()) && err.contains(b.hex()),
        "{err}"
    );
    let json = imago
        .run(&["inspect", "--json", &a.hex()[..12]])
        .ok()
        .json();
    assert_eq!(
        json["digest"],
        a.to_string(),
        "a longer prefix is unique again"
    );
}

#[test]
fn tag_and_rmi_change_names_only() {
    let imago = Imago::new();
    let store = imago.store();
    let digest = make_image(&store, "web:v1", &[file("a", b"a")]);
    imago.run(&["tag", "web:v1", "web:stable"]).ok();
    let names: Vec<String> = store
        .names()
        .unwrap()
        .into_iter()
        .filter_map(|n| n.name)
        .collect();
    assert_eq!(names, vec!["web:stable".to_string(), "web:v1".to_string()]);

    imago.run(&["rmi", "web:v1"]).ok();
    let json = imago.run(&["inspect", "--json", "web:stable"]).ok().json();
    assert_eq!(json["digest"], digest.to_string());
    assert!(store.has_blob(&digest), "rmi must not delete blobs");
    imago.run(&["inspect", "web:v1"]).fails();
    let err = imago.run(&["rmi", "web:v1"]).fails();
    assert!(err.contains("web:v1"), "{err}");
}

#[test]
fn gc_deletes_only_unreachable_blobs() {
    let imago = Imago::new();
    let store = imago.store();
    let keep = make_image(&store, "keep", &[file("k", b"keep")]);
    let drop = make_image(&store, "drop", &[file("d", b"drop")]);
    imago.run(&["rmi", "drop"]).ok();

    let dry = imago.run(&["gc", "--dry-run", "--json"]).ok().json();
    assert_eq!(
        dry["removed"].as_array().unwrap().len(),
        3,
        "manifest, config and layer of 'drop'"
    );
    assert!(store.has_blob(&drop), "dry run deletes nothing");

    let report = imago.run(&["gc", "--json"]).ok().json();
    assert_eq!(report["removed"].as_array().unwrap().len(), 3);
    assert!(!store.has_blob(&drop));
    assert!(store.has_blob(&keep));
    imago.run(&["verify"]).ok();
    imago.run(&["inspect", "keep"]).ok();
}

#[test]
fn verify_reports_flipped_truncated_and_missing_blobs_by_digest() {
    let imago = Imago::new();
    let store = imago.store();
    let digest = make_image(&store, "web", &[file("index.html", &[7u8; 5000])]);
    let image = store.resolve(&"web".parse().unwrap()).unwrap();
    let layer = image.layers().unwrap()[0].digest.clone();
    let config = image.config_digest.clone();
    imago.run(&["verify", "web"]).ok();

    // One flipped bit in the layer.
    let layer_path = store.blob_path(&layer);
    let mut bytes = std::fs::read(&layer_path).unwrap();
    bytes[20] ^= 0x10;
    std::fs::write(&layer_path, &bytes).unwrap();
    let run = imago.run(&["verify", "--json"]);
    let json = run.json();
    assert!(!run.output.status.success());
    let problems = json["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{json}");
    assert_eq!(problems[0]["digest"], layer.to_string());
    assert!(
        problems[0]["problem"]
            .as_str()
            .unwrap()
            .starts_with("corrupt")
    );

    // Truncated config, and the manifest itself missing from another image's point of view.
    let config_path = store.blob_path(&config);
    let config_bytes = std::fs::read(&config_path).unwrap();
    std::fs::write(&config_path, &config_bytes[..config_bytes.len() / 2]).unwrap();
    let err = imago.run(&["verify"]).fails();
    assert!(err.contains("2 corrupt or missing blobs"), "{err}");
    let out = imago.run(&["verify"]).stdout();
    assert!(
        out.contains(&config.to_string()) && out.contains("wrong size"),
        "{out}"
    );

    // Every read refuses the corrupt image too.
    let err = imago.run(&["inspect", "web"]).fails();
    assert!(err.contains(&config.to_string()), "{err}");
    let target = imago.dir.path().join("unpacked");
    let err = imago
        .run(&["unpack", "web", target.to_str().unwrap()])
        .fails();
    assert!(
        err.contains(&config.to_string()) || err.contains(&layer.to_string()),
        "{err}"
    );

    std::fs::remove_file(store.blob_path(&digest)).unwrap();
    let out = imago.run(&["verify"]).stdout();
    assert!(out.contains(&format!("{digest}: missing")), "{out}");
}

#[test]
fn unknown_media_type_is_refused_with_the_digest() {
    let imago = Imago::new();
    let store = imago.store();
    let (layer, size, diff_id) = common::put_layer(&store, &[file("a", b"a")], Compression::Gzip);
    let config = serde_json::json!({"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[diff_id.to_string()]}});
    let (config_digest, config_size, _) = store.put_json(&config).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.example.not-a-config", "digest": config_digest.to_string(), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": size}],
    });
    let (digest, _, _) = store.put_json(&manifest).unwrap();
    let err = imago.run(&["inspect", &digest.to_string()]).fails();
    assert!(
        err.contains("application/vnd.example.not-a-config")
            && err.contains(&config_digest.to_string()),
        "{err}"
    );

    let not_manifest = serde_json::json!({"mediaType": "text/plain", "hello": 1});
    let (digest, _, _) = store.put_json(&not_manifest).unwrap();
    let err = imago.run(&["inspect", &digest.to_string()]).fails();
    assert!(
        err.contains("text/plain") && err.contains(&digest.to_string()),
        "{err}"
    );

    let garbage = store.put_blob(b"{not json").unwrap();
    let err = imago.run(&["inspect", &garbage.to_string()]).fails();
    assert!(
        err.contains("not valid") && err.contains(&garbage.to_string()),
        "{err}"
    );
}

#[test]
fn zstd_and_uncompressed_layers_are_listed_with_their_media_types() {
    let imago = Imago::new();
    let store = imago.store();
    make_image_with(&store, "z", &[file("z", b"zstd")], Compression::Zstd, &[]);
    make_image_with(&store, "n", &[file("n", b"none")], Compression::None, &[]);
    let z = imago.run(&["inspect", "--json", "z"]).ok().json();
    assert_eq!(
        z["layers"][0]["media_type"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let n = imago.run(&["inspect", "--json", "n"]).ok().json();
    assert_eq!(
        n["layers"][0]["media_type"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(
        n["layers"][0]["diff_id"], n["layers"][0]["digest"],
        "an uncompressed layer's diff_id is its digest"
    );
}

#[test]
fn concurrent_tagging_from_many_processes_loses_no_name() {
    let imago = Imago::new();
    let store = imago.store();
    make_image(&store, "base", &[file("a", b"a")]);
    let children: Vec<_> = (0..16)
        .map(|i| {
            imago
                .cmd()
                .args(["tag", "base", &format!("copy:{i}")])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let names = store.names().unwrap();
    assert_eq!(names.len(), 17, "{names:?}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(imago.home.join("store/index.json")).unwrap())
            .unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 17);
}

#[test]
fn home_comes_from_flag_then_env_then_xdg() {
    let imago = Imago::new();
    let env_home = imago.dir.path().join("from-env");
    let xdg = imago.dir.path().join("xdg");
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(std::process::Command::new(env!("CARGO_BIN_EXE_imago"))
        .arg("images")
        .env("IMAGO_HOME", &env_home));
    assert!(env_home.join("store/oci-layout").is_file());
    run(std::process::Command::new(env!("CARGO_BIN_EXE_imago"))
        .arg("images")
        .env_remove("IMAGO_HOME")
        .env("XDG_DATA_HOME", &xdg));
    assert!(xdg.join("imago/store/index.json").is_file());
    run(imago.cmd().arg("images").env("IMAGO_HOME", &env_home));
    assert!(
        imago.home.join("store/oci-layout").is_file(),
        "--home wins over IMAGO_HOME"
    );
}

#[test]
fn unpack_applies_layers_in_order_with_whiteouts() {
    let imago = Imago::new();
    let store = imago.store();
    let lower: &[common::File<'_>] = &[
        file("etc/app.conf", b"v1"),
        file("etc/old", b"gone soon"),
        file("var/data", b"d"),
    ];
    let upper: &[common::File<'_>] = &[file("etc/app.conf", b"v2"), file("etc/.wh.old", b"")];
    make_layered_image(&store, "layered", &[lower, upper], Compression::Gzip, &[]);
    let target = imago.dir.path().join("rootfs");
    let json = imago
        .run(&["unpack", "--json", "layered", target.to_str().unwrap()])
        .ok()
        .json();
    assert_eq!(json["layers"], 2);
    assert_eq!(std::fs::read(target.join("etc/app.conf")).unwrap(), b"v2");
    assert!(
        !target.join("etc/old").exists(),
        "whiteout removed the lower file"
    );
    assert!(
        !target.join("etc/.wh.old").exists(),
        "whiteout markers are never written"
    );
    assert_eq!(std::fs::read(target.join("var/data")).unwrap(), b"d");

    let err = imago
        .run(&["unpack", "layered", target.to_str().unwrap()])
        .fails();
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn unpack_of_a_corrupt_layer_writes_nothing() {
    let imago = Imago::new();
    let store = imago.store();
    make_image(&store, "web", &[file("index.html", &[1u8; 4096])]);
    let image = store.resolve(&"web".parse().unwrap()).unwrap();
    let layer = &image.layers().unwrap()[0].digest;
    let path = store.blob_path(layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let target = imago.dir.path().join("rootfs");
    let err = imago
        .run(&["unpack", "web", target.to_str().unwrap()])
        .fails();
    assert!(
        err.contains(&layer.to_string()) && err.contains("corrupt"),
        "{err}"
    );
    assert!(
        snapshot(&target).is_empty(),
        "nothing unpacked from a corrupt blob"
    );
}

/// A config whose diff_ids are missing, unreadable or not what the layer unpacks to: `imago
/// unpack` refuses the image naming the layer, before it writes anything.
#[test]
fn unpack_refuses_layers_whose_diff_id_is_missing_invalid_or_wrong_and_writes_nothing() {
    let imago = Imago::new();
    let store = imago.store();
    let (layer, size, diff_id) = common::put_layer(
        &store,
        &[file("etc/app.conf", &[7u8; 100_000])],
        Compression::Gzip,
    );
    // Names an image of that one layer whose config lists `diff_ids`.
    let image = |name: &str, diff_ids: serde_json::Value| {
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (config_digest, config_size, _) = store.put_json(&config).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": imago_oci::media::OCI_MANIFEST,
            "config": {"mediaType": imago_oci::media::OCI_CONFIG,
                       "digest": config_digest.to_string(), "size": config_size},
            "layers": [{"mediaType": Compression::Gzip.layer_media_type(),
                        "digest": layer.to_string(), "size": size}],
        });
        let (digest, _, _) = store.put_json(&manifest).unwrap();
        store.tag(&name.parse().unwrap(), &digest).unwrap();
    };
    let wrong = imago_oci::Digest::of(b"something else");
    for (i, (diff_ids, expected)) in [
        (serde_json::json!([]), "has no valid diff_id"),
        (serde_json::json!(["sha256:nothex"]), "has no valid diff_id"),
        (
            serde_json::json!([wrong.to_string()]),
            "but the image config says",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("liar{i}");
        image(&name, diff_ids.clone());
        let target = imago.dir.path().join(&name);
        let err = imago
            .run(&["unpack", &name, target.to_str().unwrap()])
            .fails();
        assert!(
            err.contains(&layer.to_string()) && err.contains(expected),
            "{diff_ids}: {err}"
        );
        assert!(
            snapshot(&target).is_empty(),
            "{diff_ids}: something was written"
        );
    }
    // The same layer with its true diff_id unpacks.
    image("honest", serde_json::json!([diff_id.to_string()]));
    let target = imago.dir.path().join("rootfs-honest");
    imago
        .run(&["unpack", "honest", target.to_str().unwrap()])
        .ok();
    assert_eq!(
        std::fs::read(target.join("etc/app.conf")).unwrap(),
        vec![7u8; 100_000]
    );
}
