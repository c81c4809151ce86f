//! Unpacking an image's layers into a directory, verified.

use std::io;
use std::path::Path;

use imago_layer::compression::{Compression, decompress};
use imago_layer::unpack::{UnpackOptions, apply_layer};
use imago_oci::{Digest, HashingReader};
use serde::Serialize;

use crate::blob::unwrap_store_error;
use crate::error::{Result, StoreError};
use crate::image::ResolvedImage;
use crate::layout::Store;

#[derive(Debug, Clone, Default, Serialize)]
pub struct UnpackReport {
    pub layers: usize,
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

impl Store {
    /// Applies the layers of `image` in order into `target` (which must exist).
    ///
    /// Every layer blob is checked against its digest and every uncompressed stream against the
    /// config's diff_id. With `verify_first`, all layer blobs are re-hashed before anything is
    /// written, for targets that are used directly; without it, the caller must unpack into a
    /// scratch directory and discard it on error, because a corrupt layer is only detected at
    /// its end.
    pub fn unpack(
        &self,
        image: &ResolvedImage,
        target: &Path,
        verify_first: bool,
    ) -> Result<UnpackReport> {
        let layers = image.layers()?;
        if verify_first {
            for layer in &layers {
                self.verify_blob(&layer.digest, Some(layer.size))?;
            }
        }
        let options = UnpackOptions::default();
        let mut report = UnpackReport::default();
        for layer in &layers {
            let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
                StoreError::UnsupportedLayer {
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                }
            })?;
            let mut blob = self.open_blob(&layer.digest, Some(layer.size))?;
            let path = self.blob_path(&layer.digest);
            let diff_id = {
                let stream =
                    decompress(compression, &mut blob).map_err(|e| unwrap_store_error(e, &path))?;
                let mut hashed = HashingReader::new(stream);
                let stats = apply_layer(&mut hashed, target, &options).map_err(|source| {
                    // A verification failure surfaces as an io error inside the unpacker; prefer
                    // the blob problem, which names the digest.
                    StoreError::Layer {
                        digest: layer.digest.clone(),
                        source,
                    }
                })?;
                io::copy(&mut hashed, &mut io::sink()).map_err(|e| unwrap_store_error(e, &path))?;
                report.entries += stats.entries;
                report.bytes += stats.bytes;
                report.whiteouts += stats.whiteouts;
                hashed.finish().0
            };
            // The decompressor may stop at the end of its stream: read (and verify) the rest.
            blob.finish()?;
            if let Some(expected) = &layer.diff_id {
                check_diff_id(&layer.digest, expected, &diff_id)?;
            }
            report.layers += 1;
        }
        Ok(report)
    }
}

fn check_diff_id(digest: &Digest, expected: &Digest, actual: &Digest) -> Result<()> {
    if expected != actual {
        return Err(StoreError::DiffIdMismatch {
            digest: digest.clone(),
            expected: expected.clone(),
            actual: actual.clone(),
        });
    }
    Ok(())
}
