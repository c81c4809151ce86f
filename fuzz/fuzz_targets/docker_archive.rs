//! Image archives (docker and OCI) as `imago import` and archive bases read them. A dry read
//! writes nothing to the store; an archive a dry read accepts imports, to the same images, and
//! every imported image loads.
#![no_main]

use std::fs;
use std::path::Path;

use imago_store::Store;
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static Path {
    if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    }
}

/// Every path under `dir`, for checking that a dry read created nothing.
fn listing(dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        out.push(path.display().to_string());
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            listing(&path, out);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::Builder::new()
        .prefix("imago-fuzz-archive-")
        .tempdir_in(scratch())
        .unwrap();
    let archive = dir.path().join("image.tar");
    fs::write(&archive, data).unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let index_before = fs::read(dir.path().join("store/index.json")).unwrap();
    let mut before = Vec::new();
    listing(dir.path(), &mut before);

    let read = store.read_archive(&archive);
    let mut after = Vec::new();
    listing(dir.path(), &mut after);
    assert_eq!(before, after, "a dry archive read wrote to the store");
    assert_eq!(
        index_before,
        fs::read(dir.path().join("store/index.json")).unwrap()
    );
    let Ok(images) = read else {
        return;
    };
    let report = store
        .import_archive(&archive, &Default::default())
        .unwrap_or_else(|e| panic!("a dry read accepts the archive, the import fails: {e}"));
    let dry: Vec<_> = images.iter().map(|i| i.digest.clone()).collect();
    let imported: Vec<_> = report.images.iter().map(|i| i.digest.clone()).collect();
    assert_eq!(dry, imported);
    for image in &images {
        let loaded = store
            .load_image(&image.digest)
            .unwrap_or_else(|e| panic!("imported image {} does not load: {e}", image.digest));
        assert_eq!(loaded.config_digest, image.image.config_digest);
        assert!(store.verify(Some(&[image.digest.clone()])).unwrap().is_ok());
    }
});
