//! `imago.toml`: the builder's definition parser and layer planner. Every definition error
//! points at a line and column inside the text; a definition that parses builds (into a scratch store, from a small scratch context) the same image twice.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use imago_build::import::parse_archive_base;
use imago_build::plan::{Context, plan_layer};
use imago_build::{BuildError, BuildOptions, DefinitionFile, build_image, build_order};
use imago_store::Store;
use libfuzzer_sys::fuzz_target;

/// A build context shared by every input: a few files, a subdirectory and a symlink. Made once
/// per user and kept (a fuzzer process ends with exit(), so nothing would remove a per-process
/// one): built in a temporary directory and renamed into place, so parallel processes agree.
fn context() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let uid = std::fs::metadata("/proc/self").map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.uid()
        });
        let dir = scratch().join(format!("imago-fuzz-toml-context-{uid}"));
        if dir.is_dir() {
            return dir;
        }
        let tmp = tempfile::Builder::new()
            .prefix("imago-fuzz-toml-")
            .tempdir_in(scratch())
            .unwrap()
            .keep();
        fs::write(tmp.join("a.txt"), b"a\n").unwrap();
        fs::create_dir(tmp.join("sub")).unwrap();
        fs::write(tmp.join("sub/b.conf"), b"b\n").unwrap();
        fs::write(tmp.join(".imagoignore"), b"*.tmp\n").unwrap();
        fs::write(tmp.join("x.tmp"), b"ignored\n").unwrap();
        std::os::unix::fs::symlink("a.txt", tmp.join("link")).unwrap();
        if fs::rename(&tmp, &dir).is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        dir
    })
}

fn scratch() -> &'static Path {
    if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    }
}

/// A definition error must point inside the text: line 1..=lines+1, column >= 1.
fn check_position(error: &BuildError, text: &str) {
    if let BuildError::Definition { line, column, .. } = error {
        let lines = text.matches('\n').count() + 1;
        assert!(
            *line >= 1 && *line <= lines && *column >= 1,
            "{error} points outside the {lines} lines of the text"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = context().join("imago.toml");
    let mut file = match DefinitionFile::parse(&path, text.to_owned()) {
        Ok(file) => file,
        Err(e) => {
            check_position(&e, text);
            return;
        }
    };
    // Nothing may read outside the scratch context: no other context, no archive base (its
    // path could be /dev/zero), no copy from outside.
    for image in file.definition.image.values_mut() {
        image.context = None;
        if image
            .from
            .as_ref()
            .is_some_and(|f| parse_archive_base(f.get_ref()).is_some())
        {
            image.from = None;
        }
        for layer in &mut image.layers {
            layer.copy.retain(|c| !c.outside_context);
        }
    }
    let ctx = Context::open(context()).unwrap();
    for image in file.definition.image.values() {
        for layer in &image.layers {
            match plan_layer(&file, &ctx, layer) {
                Ok(plan) => {
                    for path in plan.entries.keys() {
                        let shown = String::from_utf8_lossy(path);
                        assert!(
                            !path.is_empty()
                                && path.first() != Some(&b'/')
                                && path
                                    .split(|b| *b == b'/')
                                    .all(|c| !c.is_empty() && c != b"." && c != b".."),
                            "layer path {shown:?} is not a clean relative path"
                        );
                    }
                }
                Err(e) => check_position(&e, text),
            }
        }
    }
    let Ok(order) = build_order(&file, &[]) else {
        return;
    };
    let store_dir = tempfile::Builder::new()
        .prefix("imago-fuzz-store-")
        .tempdir_in(scratch())
        .unwrap();
    let store = Store::open(store_dir.path()).unwrap();
    for name in order.iter().take(4) {
        let options = BuildOptions {
            source_date_epoch: 0,
            cache_dir: None,
            check: false,
            // `run` steps are not run here: a definition with one fails with a step error.
            sandbox: None,
            args: Default::default(),
            no_cache_layers: Vec::new(),
        };
        match build_image(&store, &file, name, &options, &mut |_| {}) {
            Ok(built) => {
                let check = BuildOptions {
                    check: true,
                    ..options.clone()
                };
                let again = build_image(&store, &file, name, &check, &mut |_| {})
                    .unwrap_or_else(|e| panic!("image {name} built once, then not again: {e}"));
                assert_eq!(
                    built.digest, again.digest,
                    "image {name} is not reproducible"
                );
                store.load_image(&built.digest).unwrap();
            }
            Err(e) => check_position(&e, text),
        }
    }
});
