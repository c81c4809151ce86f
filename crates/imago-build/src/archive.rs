//! Writing a built image as a single file: `oci-archive` (a tar of an OCI image layout) or
//! `docker-archive` (the `docker save` format). The store's exporter does the work (atomic,
//! fixed tar headers, docker layers uncompressed as `docker load` wants them), so `--output`
//! and `imago export` always give the same bytes for the same image.

use std::path::Path;

use imago_store::{ExportFormat, Store};

use crate::BuildError;
use crate::build::BuiltImage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    Oci,
    Docker,
}

/// Writes `image` (already in `store`) to `path`, tagged `reference` (`name:tag`).
pub fn write_archive(
    store: &Store,
    image: &BuiltImage,
    reference: &str,
    format: ArchiveFormat,
    path: &Path,
) -> Result<(), BuildError> {
    let resolved = store.load_image(&image.digest)?;
    let name: imago_oci::Reference = reference.parse()?;
    let format = match format {
        ArchiveFormat::Oci => ExportFormat::Oci,
        ArchiveFormat::Docker => ExportFormat::Docker,
    };
    store.export(&resolved, Some(&name), format, path)?;
    Ok(())
}
