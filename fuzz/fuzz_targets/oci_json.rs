//! Manifest, index and config JSON as the store reads them. The input is up to four documents
//! separated by `\n----\n`: an image config, a manifest, optionally an index, optionally the
//! store's own `index.json`. `@CONFIG@`/`@CONFIG_SIZE@` in the manifest and
//! `@MANIFEST@`/`@MANIFEST_SIZE@` in the index become the digest and size of the document before,
//! so the fuzzer can reach past the digest checks. Properties: `images()` (the fast summary
//! parser) accepts every image `load_image` (oci-spec's full types) accepts and agrees with it
//! on size and creation time; nothing panics on any `index.json`.
#![no_main]

use std::fs;
use std::path::Path;

use imago_oci::Reference;
use imago_store::Store;
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static Path {
    if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    }
}

fn substitute(doc: &[u8], name: &str, digest: &str, size: usize) -> Vec<u8> {
    let text = String::from_utf8_lossy(doc);
    text.replace(&format!("@{name}_SIZE@"), &size.to_string())
        .replace(&format!("@{name}@"), digest)
        .into_bytes()
}

fuzz_target!(|data: &[u8]| {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut rest = data;
    while parts.len() < 3 {
        match rest.windows(6).position(|w| w == b"\n----\n") {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 6..];
            }
            None => break,
        }
    }
    parts.push(rest);
    if parts.len() < 2 {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("imago-fuzz-json-")
        .tempdir_in(scratch())
        .unwrap();
    let store = Store::open(dir.path()).unwrap();
    let config = store.put_blob(parts[0]).unwrap();
    let manifest_bytes = substitute(parts[1], "CONFIG", &config.to_string(), parts[0].len());
    let manifest = store.put_blob(&manifest_bytes).unwrap();
    let top = match parts.get(2) {
        Some(index) => {
            let index = substitute(
                index,
                "MANIFEST",
                &manifest.to_string(),
                manifest_bytes.len(),
            );
            store.put_blob(&index).unwrap()
        }
        None => manifest,
    };

    let loaded = store.load_image(&top);
    if let Ok(image) = &loaded {
        let _ = image.layers();
        let _ = image.total_size();
    }
    let name: Reference = "fuzz:latest".parse().unwrap();
    if store.tag(&name, &top).is_ok() {
        let images = store.images();
        if let Ok(image) = &loaded {
            match (images, image.total_size()) {
                (Ok(images), Ok(total)) => {
                    let summary = images
                        .iter()
                        .find(|s| s.name.as_deref() == Some("fuzz:latest"))
                        .unwrap();
                    assert_eq!(summary.digest, top);
                    assert_eq!(summary.size, total, "sizes of {top} disagree");
                    assert_eq!(
                        summary.created.as_deref(),
                        image.config.created().as_deref(),
                        "creation times of {top} disagree"
                    );
                }
                // Sizes past u64::MAX: both refuse, naming the manifest.
                (Err(e), Err(overflow)) => {
                    assert!(
                        matches!(overflow, imago_store::StoreError::SizeOverflow { .. }),
                        "{overflow}"
                    );
                    assert!(e.to_string().contains(&top.to_string()), "{e}");
                }
                (Err(e), Ok(_)) => panic!("load_image reads {top}, images() fails: {e}"),
                (Ok(_), Err(e)) => panic!("images() lists {top}, its total size fails: {e}"),
            }
        }
        let resolved = store.resolve(&name);
        assert_eq!(resolved.is_ok(), loaded.is_ok());
    }
    if let Some(index_json) = parts.get(3) {
        fs::write(dir.path().join("index.json"), index_json).unwrap();
        if let Ok(names) = store.names() {
            for entry in names {
                let _ = store.load_image(&entry.digest);
            }
        }
        let _ = store.images();
        let _ = store.resolve(&name);
        let _ = store.resolve(&"sha256:abcd".parse().unwrap());
    }
});
