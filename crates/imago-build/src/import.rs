//! Reading a base image from an archive file (`from = "oci-archive:FILE"` or
//! `"docker-archive:FILE"`) into the store, through the store's own streaming, verifying
//! importer (the same one `imago import` uses), so both give an archive the same digest.

use std::path::{Path, PathBuf};

use imago_oci::Digest;
use imago_store::{ImportOptions, Store};

use crate::BuildError;
use crate::archive::ArchiveFormat;

/// Imports the archive at `path` and returns the manifest digest of its one image.
pub fn import_archive(
    store: &Store,
    path: &Path,
    _format: ArchiveFormat,
) -> Result<Digest, BuildError> {
    let report = store.import_archive(
        path,
        &ImportOptions {
            name: None,
            progress: None,
        },
    )?;
    match report.images.as_slice() {
        [one] => Ok(one.digest.clone()),
        images => Err(BuildError::Import {
            path: path.to_owned(),
            message: format!(
                "a base archive must hold exactly one image, this one holds {}",
                images.len()
            ),
        }),
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
