//! Reading a base image from an archive file (`from = "oci-archive:FILE"` or
//! `"docker-archive:FILE"`) through the store's own streaming, verifying importer (the same one
//! `imago import` uses), so both give an archive the same digest.
//!
//! The import names nothing: the archive's own names are not the user's to get from a build
//! (the built image reaches the base's layers, which keeps them from gc). The build cache
//! remembers which manifest an archive gave, keyed on its canonical path and stat fingerprint,
//! so a no-op rebuild does not read the archive again. `--check` reads the archive without
//! storing anything and without the cache.

use std::fs;
use std::path::{Path, PathBuf};

use imago_oci::Digest;
use imago_store::{ImportOptions, ResolvedImage, Store};

use crate::BuildError;
use crate::archive::ArchiveFormat;
use crate::cache::Cache;
use crate::plan::Stamp;

/// A base image from an archive: its manifest and config, and the config's bytes.
#[derive(Debug)]
pub struct ArchiveBase {
    pub image: ResolvedImage,
    pub config: Vec<u8>,
}

/// The one image of the archive at `path`. With `check`, nothing is written (no blob, no name,
/// no cache record); otherwise its blobs are in the store when this returns, and the caller
/// holds the store's write guard until it names an image that reaches them. `reading` is
/// called before the archive is read (not when the cache answers).
pub fn archive_base(
    store: &Store,
    cache: &Cache,
    path: &Path,
    check: bool,
    reading: &mut dyn FnMut(),
) -> Result<ArchiveBase, BuildError> {
    if check {
        reading();
        let mut images = store.read_archive(path)?;
        return match images.len() {
            1 => {
                let one = images.remove(0);
                Ok(ArchiveBase {
                    image: one.image,
                    config: one.config,
                })
            }
            n => Err(one_image(path, n)),
        };
    }
    let io = |source| BuildError::Io {
        path: path.to_owned(),
        source,
    };
    let canonical = fs::canonicalize(path).map_err(io)?;
    // Taken before the archive is read: a change while it is read moves the ctime, so the
    // record made from this read never matches the changed file.
    let stamp = Stamp::of(&fs::metadata(&canonical).map_err(io)?);
    if let Some(digest) = cache.archive(&canonical, &stamp)
        && let Some(base) = stored_base(store, &digest)
    {
        return Ok(base);
    }
    reading();
    let report = store.import_archive(
        path,
        &ImportOptions {
            unnamed: true,
            ..ImportOptions::default()
        },
    )?;
    let digest = match report.images.as_slice() {
        [one] => one.digest.clone(),
        images => return Err(one_image(path, images.len())),
    };
    let (image, config) = store.load_image_with_config(&digest)?;
    cache.record_archive(&canonical, stamp, &digest);
    Ok(ArchiveBase { image, config })
}

/// The base the cache names, if the store still has all of it: gc removes the base's
/// manifest and config (no name reaches them), and a lost layer must come back from the
/// archive before an image refers to it. Manifest and config are read verified; layers are
/// only checked for presence and size, as an import finds them.
fn stored_base(store: &Store, digest: &Digest) -> Option<ArchiveBase> {
    let (image, config) = store.load_image_with_config(digest).ok()?;
    for layer in image.layers().ok()? {
        let size = fs::metadata(store.blob_path(&layer.digest)).ok()?.len();
        if size != layer.size {
            return None;
        }
    }
    Some(ArchiveBase { image, config })
}

fn one_image(path: &Path, count: usize) -> BuildError {
    BuildError::Import {
        path: path.to_owned(),
        message: format!("a base archive must hold exactly one image, this one holds {count}"),
    }
}

/// `oci-archive:PATH` / `docker-archive:PATH`, if `text` names an archive.
pub fn parse_archive_base(text: &str) -> Option<(ArchiveFormat, PathBuf)> {
    if let Some(p) = text.strip_prefix("oci-archive:") {
        return Some((ArchiveFormat::Oci, PathBuf::from(p)));
    }
    text.strip_prefix("docker-archive:")
        .map(|p| (ArchiveFormat::Docker, PathBuf::from(p)))
}
