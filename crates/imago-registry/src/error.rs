use std::path::PathBuf;

use imago_oci::Digest;
use imago_store::StoreError;

/// Everything that can go wrong talking to a registry. Messages name the registry, repository,
/// digest or reference and, for HTTP failures, the status; never a credential.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid registry reference {reference:?}: {reason}")]
    InvalidReference {
        reference: String,
        reason: &'static str,
    },
    #[error("{registry}/{repository}: {what}: HTTP {status}{detail}")]
    Http {
        registry: String,
        repository: String,
        what: String,
        status: u16,
        /// ": <registry's error message>" or empty.
        detail: String,
    },
    #[error("{registry}/{repository}: {what}: {message}")]
    Connection {
        registry: String,
        repository: String,
        what: String,
        message: String,
    },
    #[error("{action} to {registry}: unauthorized (HTTP {status})")]
    Unauthorized {
        action: &'static str,
        registry: String,
        status: u16,
    },
    #[error(
        "{registry}/{repository}: {what} {expected} does not match its content, which hashes to {actual}"
    )]
    DigestMismatch {
        registry: String,
        repository: String,
        what: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "{registry}/{repository}: blob {digest} has {actual} bytes, but its descriptor says {expected}"
    )]
    SizeMismatch {
        registry: String,
        repository: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{registry}/{repository}: {what} is too large: {size} bytes, more than the limit of {limit}"
    )]
    TooLarge {
        registry: String,
        repository: String,
        what: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "{reference}: docker schema 1 manifests are not supported (push the image again with a current client)"
    )]
    Schema1 { reference: String },
    #[error("{reference}: unsupported manifest media type {media_type:?}")]
    UnsupportedMediaType {
        reference: String,
        media_type: String,
    },
    #[error("{reference}: invalid manifest: {reason}")]
    InvalidManifest { reference: String, reason: String },
    #[error("{reference}: the index has no manifest for {platform}")]
    NoPlatform { reference: String, platform: String },
    #[error(
        "{reference}: index {index} lists {platform} ({digest}), whose image is not in the store: pull it with --all-platforms, or push one platform with --platform"
    )]
    PlatformMissing {
        reference: String,
        index: Digest,
        platform: String,
        digest: Digest,
    },
    #[error(
        "{registry}: plain http is allowed only for loopback hosts, `insecure_registries` or --insecure"
    )]
    PlainHttpRefused { registry: String },
    #[error("credentials in {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error("credential helper docker-credential-{helper}: {reason}")]
    CredentialHelper { helper: String, reason: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("http client: {0}")]
    Client(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
