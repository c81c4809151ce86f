use std::io;
use std::path::PathBuf;

use imago_oci::{CanonicalJsonError, Digest, ReferenceError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("blob {digest} is missing (expected at {path})")]
    MissingBlob { digest: Digest, path: PathBuf },
    #[error("blob {digest} at {path} is corrupt: its content hashes to {actual}")]
    CorruptBlob {
        digest: Digest,
        path: PathBuf,
        actual: Digest,
    },
    #[error("blob {digest} at {path} has {actual} bytes, but {expected} were expected")]
    SizeMismatch {
        digest: Digest,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("written content hashes to {actual}, but {expected} was expected")]
    UnexpectedDigest { expected: Digest, actual: Digest },
    #[error("blob {digest} is not valid {what} json: {source}")]
    InvalidJson {
        digest: Digest,
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("blob {digest} has media type {found}, expected {expected}")]
    WrongMediaType {
        digest: Digest,
        found: String,
        expected: &'static str,
    },
    #[error("{path} is not a valid oci image layout: {reason}")]
    InvalidLayout { path: PathBuf, reason: String },
    #[error("image {0} not found in the store")]
    NotFound(String),
    #[error("invalid tag {0:?}: expected NAME[:TAG]")]
    InvalidTag(String),
    #[error("digest prefix {prefix} is ambiguous; it matches: {}", candidates.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    AmbiguousPrefix {
        prefix: String,
        candidates: Vec<Digest>,
    },
    #[error(
        "index {digest}: the store holds the image of none of its platforms (linux/amd64 is looked for first)"
    )]
    NoMatchingPlatform { digest: Digest },
    #[error("gc refused: {0}; run `imago verify` and re-import the damaged image first")]
    GcUnsafe(String),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Json(#[from] CanonicalJsonError),
    #[error("invalid digest in {context}: {value}")]
    InvalidDigest { context: String, value: String },
    #[error("layer {digest}: {source}")]
    Layer {
        digest: Digest,
        source: imago_layer::unpack::UnpackError,
    },
    #[error("layer {digest} has media type {media_type}, which imago cannot apply")]
    UnsupportedLayer { digest: Digest, media_type: String },
    // The wrapped errors are part of the message, not a `source`: error reporters that walk
    // the chain would otherwise print them twice.
    #[error("archive {path}: {cause}")]
    Archive {
        path: PathBuf,
        cause: Box<crate::archive::ArchiveError>,
    },
    #[error("cannot export to {path}: {cause}")]
    Export {
        path: PathBuf,
        cause: Box<StoreError>,
    },
    #[error("manifest {digest}: its blob sizes add up to more than 2^64 bytes")]
    SizeOverflow { digest: Digest },
    #[error("image {image}: layer {digest} has no valid diff_id in config {config}")]
    MissingDiffId {
        image: Digest,
        config: Digest,
        digest: Digest,
    },
    #[error("layer {digest} unpacks to diff_id {actual}, but the image config says {expected}")]
    DiffIdMismatch {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            action,
            path: path.into(),
            source,
        })
    }
}

/// Parses the JSON blob `digest` (a `what`: manifest, index, image config), naming the blob in
/// the error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    digest: &Digest,
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::InvalidJson {
        digest: digest.clone(),
        what,
        source,
    })
}
