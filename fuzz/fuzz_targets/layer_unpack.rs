//! The layer reader and unpacker: a fuzzed (possibly compressed) tar is applied twice to a root
//! that holds a lower layer with symlinks pointing out of it. Whatever the archive says, nothing
//! outside the root is created, changed or removed, and no device node appears inside it.
#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use imago_layer::compression::decompress_sniffed;
use imago_layer::unpack::{UnpackOptions, apply_layer};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static Path {
    if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    }
}

/// Everything under `dir` except `skip`, as path -> (type, mode, owner, size, mtime, content or
/// link target), without following symlinks.
fn snapshot(dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path == skip {
            continue;
        }
        let meta = fs::symlink_metadata(&path).unwrap();
        let what = if meta.file_type().is_symlink() {
            format!("link {:?}", fs::read_link(&path).unwrap())
        } else if meta.is_file() {
            format!("file {:?}", fs::read(&path).unwrap())
        } else {
            "other".to_owned()
        };
        out.insert(
            path.clone(),
            format!(
                "{what} mode {:o} owner {}:{} size {} mtime {}.{} ino {}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ino()
            ),
        );
        if meta.is_dir() {
            snapshot(&path, skip, out);
        }
    }
}

/// No device nodes under `dir`; directories made searchable and writable again so that the
/// scratch directory can be removed even when the unpacker runs without root.
fn check_and_open_up(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        assert!(
            !ft.is_char_device() && !ft.is_block_device(),
            "the layer created the device node {}",
            path.display()
        );
        if ft.is_dir() {
            check_and_open_up(&path);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let base = tempfile::Builder::new()
        .prefix("imago-fuzz-unpack-")
        .tempdir_in(scratch())
        .unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("sentinel"), b"outside the root").unwrap();
    fs::create_dir(outside.join("dir")).unwrap();
    // A lower layer: a directory, a file, and symlinks leading out (relative and absolute).
    fs::create_dir(root.join("lower")).unwrap();
    fs::write(root.join("lower/file"), b"lower").unwrap();
    symlink("../outside", root.join("up")).unwrap();
    symlink("../../outside/dir", root.join("lower/up2")).unwrap();
    symlink(&outside, root.join("abs")).unwrap();
    symlink(outside.join("sentinel"), root.join("abs-file")).unwrap();

    let mut before = BTreeMap::new();
    snapshot(base.path(), &root, &mut before);
    let options = UnpackOptions::default();
    for _ in 0..2 {
        let applied = decompress_sniffed(data)
            .map_err(|e| e.to_string())
            .and_then(|(_, tar)| apply_layer(tar, &root, &options).map_err(|e| e.to_string()));
        let mut after = BTreeMap::new();
        snapshot(base.path(), &root, &mut after);
        assert_eq!(
            before, after,
            "the layer changed something outside the root"
        );
        check_and_open_up(&root);
        if applied.is_err() {
            break;
        }
    }
});
