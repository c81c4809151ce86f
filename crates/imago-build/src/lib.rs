//! The reproducible image builder: `imago.toml` definitions in, OCI images in the store out.
//!
//! Code map: [`definition`] parses the file (with spans for errors) and publishes its JSON
//! Schema; [`plan`] walks the build context into sorted layer entries; [`cache`] remembers input
//! fingerprints and built layers; [`build`] writes layers, config and manifest; [`archive`]
//! exports a built image as an oci-archive or docker-archive file.
//!
//! Invariants: the same definition and the same input bytes give the same manifest digest
//! whatever the directory, file order, timestamps, umask, locale, time zone or host users; the
//! only time that enters an image is the `source_date_epoch` the caller passes in. The cache only
//! ever decides whether work can be skipped, never what the result is. Nothing is printed: the
//! caller gets [`build::Event`]s and results.
#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod archive;
pub mod build;
pub mod cache;
pub mod definition;
pub mod import;
pub mod plan;
pub mod step;
pub mod work;

pub use build::{BuildOptions, BuiltImage, BuiltLayer, Event, build_image, build_order};
pub use definition::{
    DefinitionFile, json_schema, json_schema_with_services, json_schema_with_services_and_targets,
};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{}:{line}:{column}: {message}{}", file.display(), hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    Definition {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
        hint: Option<String>,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Ignore { path: PathBuf, message: String },
    #[error("no image {name} in {}; it defines: {}", file.display(), if defined.is_empty() { "none".to_owned() } else { defined.join(", ") })]
    UnknownImage {
        name: String,
        file: PathBuf,
        defined: Vec<String>,
    },
    #[error("image {image}, layer {layer}: {source}")]
    Layer {
        image: String,
        layer: String,
        source: imago_layer::writer::WriterError,
    },
    #[error(transparent)]
    Store(#[from] imago_store::StoreError),
    #[error(transparent)]
    Reference(#[from] imago_oci::ReferenceError),
    #[error(transparent)]
    Json(#[from] imago_oci::CanonicalJsonError),
    #[error("check failed for {image}: {}", differences.join("; "))]
    CheckMismatch {
        image: String,
        differences: Vec<String>,
    },
    #[error("importing {}: {message}", path.display())]
    Import { path: PathBuf, message: String },
    #[error("image {image}, layer {layer}: {message}")]
    Step {
        image: String,
        layer: String,
        message: String,
    },
    #[error("image {image}, layer {layer}: the step {}; last lines of its output:\n{}", if *timed_out { "was killed at its timeout".to_owned() } else { format!("failed with exit code {code}") }, last_lines.join("\n"))]
    StepFailed {
        image: String,
        layer: String,
        code: i32,
        timed_out: bool,
        last_lines: Vec<String>,
    },
    #[error("internal error: {0}")]
    Internal(String),
}
