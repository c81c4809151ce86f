//! The content-addressed image store.
//!
//! On disk the store is a standard OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`) that skopeo and umoci read without help; imago's own bookkeeping lives in
//! a hidden `.imago/` directory beside it (locks and temporary files).
//!
//! Invariants:
//! - a blob file only ever appears under its digest by an atomic rename of a complete, fsynced
//!   temporary file whose content was hashed while it was written;
//! - every read streams the blob through SHA-256 and checks size and digest before the content is
//!   trusted;
//! - `index.json` is only replaced whole (lock, write temp, fsync, rename), never edited in place;
//! - gc holds the gc lock exclusively; every writer holds it shared for as long as it has blobs
//!   that no name reaches yet.
#![forbid(unsafe_code)]

mod archive;
mod blob;
mod error;
mod gc;
mod image;
mod index;
mod layout;
mod unpack;
mod verify;

pub use archive::{
    ArchiveError, ArchiveFormat, ArchiveImage, ExportFormat, ExportReport, ImportOptions,
    ImportReport, ImportedImage,
};
pub use blob::{BlobWriter, VerifiedReader};
pub use error::{Result, StoreError};
pub use gc::{GcReport, GcRoots};
pub use image::{ImageSummary, LayerInfo, ResolvedImage};
pub use index::NamedManifest;
pub use layout::{Store, WriteGuard};
pub use unpack::UnpackReport;
pub use verify::{BlobProblem, VerifyReport};
