//! Image archives: importing and exporting tar files of images.
//!
//! Two formats are understood:
//! - an OCI archive: a tar of an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/..`),
//!   as `skopeo copy ... oci-archive:FILE` writes it. Blobs keep their bytes and digests, so an
//!   image keeps its manifest digest;
//! - a docker archive: `manifest.json` naming a config file and uncompressed layer tars, as
//!   `docker save` and `skopeo copy ... docker-archive:FILE` write it. It is converted to an OCI
//!   image the way `skopeo copy docker-archive:X oci:Y` converts it (see [`docker`]).
//!
//! The archive itself may be uncompressed, gzip or zstd. Import reads it once, front to back:
//! every file is streamed through SHA-256 into a blob writer (no layer is ever held in memory)
//! and nothing gets a name until every manifest, config and layer has been checked, so a failed
//! or killed import leaves at most unnamed, complete blobs (and temp files) for gc.

mod docker;
mod export;
mod import;

use std::io;
use std::path::PathBuf;

use imago_oci::{Digest, ReferenceError};
use serde::Serialize;

use crate::error::StoreError;

pub use export::{ExportFormat, ExportReport};
pub use import::{ArchiveImage, ImportOptions, ImportReport, ImportedImage};

/// Which kind of archive an import found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveFormat {
    Oci,
    Docker,
}

/// What is wrong with an archive. Wrapped in [`StoreError::Archive`] with the archive's path.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot read the archive: {0}")]
    Read(io::Error),
    #[error("entry {entry}: {cause}")]
    Entry {
        entry: String,
        cause: Box<StoreError>,
    },
    #[error("entry {entry} has an unsafe path (absolute or with ..)")]
    UnsafePath { entry: String },
    #[error("entry {entry} is {size} bytes, more than the {limit} bytes allowed for a json file")]
    TooLarge {
        entry: String,
        size: u64,
        limit: u64,
    },
    #[error("entry {entry} hashes to {actual}, not to the digest {expected} its name promises")]
    DigestMismatch {
        entry: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("entry {entry} is not valid {what} json: {cause}")]
    InvalidJson {
        entry: String,
        what: &'static str,
        cause: serde_json::Error,
    },
    #[error("{what} {digest} has media type {found}, expected {expected}")]
    WrongMediaType {
        what: &'static str,
        digest: Digest,
        found: String,
        expected: String,
    },
    #[error("blob {digest} ({referrer}) is neither in the archive nor in the store")]
    MissingBlob { digest: Digest, referrer: String },
    #[error("blob {digest} ({referrer}) has {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        digest: Digest,
        referrer: String,
        expected: u64,
        actual: u64,
    },
    #[error("file {entry} named in {referrer} is not in the archive")]
    MissingFile { entry: String, referrer: String },
    #[error("layer {entry} hashes to {actual}, but the config {config} lists diff_id {expected}")]
    DiffIdMismatch {
        entry: String,
        config: String,
        expected: String,
        actual: Digest,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("invalid image name {name:?}: {cause}")]
    InvalidName { name: String, cause: ReferenceError },
    #[error(
        "neither an oci archive (no index.json) nor a docker archive (no manifest.json) at its top level"
    )]
    UnknownFormat,
    #[error("the archive holds no image")]
    Empty,
    #[error("the archive holds {0} images; a --name override needs exactly one")]
    NameNeedsOneImage(usize),
}

impl ArchiveError {
    pub(crate) fn entry(entry: &str, source: StoreError) -> ArchiveError {
        ArchiveError::Entry {
            entry: entry.to_owned(),
            cause: Box::new(source),
        }
    }
}

/// Wraps an [`ArchiveError`] with the archive's path.
pub(crate) fn archive_error(path: &std::path::Path, source: ArchiveError) -> StoreError {
    StoreError::Archive {
        path: PathBuf::from(path),
        cause: Box::new(source),
    }
}
