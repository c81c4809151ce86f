//! The pure core of imago: content digests, OCI image types, image references and the one
//! canonical JSON encoding used for everything that gets a digest.
//!
//! This crate performs no I/O beyond the `Read`/`Write` values handed to it, never reads the clock
//! and never looks at the environment, so every function here is deterministic.
#![forbid(unsafe_code)]

pub mod canonical;
pub mod digest;
pub mod media;
pub mod reference;

pub use canonical::{CanonicalJsonError, to_canonical_json};
pub use digest::{Digest, DigestError, HashingReader, HashingWriter, Sha256};
pub use reference::{
    DOCKER_HUB, NameParts, Reference, ReferenceError, docker_name, docker_short_name,
    names_registry, split_name,
};

/// Re-exported OCI image-spec types (manifest, index, config, descriptor).
pub use oci_spec::image as spec;

/// The annotation that names a manifest inside an OCI image layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation holding an image's creation time.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
