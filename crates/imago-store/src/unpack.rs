//! Unpacking an image's layers into a directory, verified.

use std::io;
use std::path::Path;

use imago_layer::compression::{Compression, decompress};
use imago_layer::unpack::{ApplyStats, UnpackOptions, apply_layer};
use imago_oci::{Digest, HashingReader};
use serde::Serialize;

use crate::blob::{VerifiedReader, unwrap_store_error};
use crate::error::{Result, StoreError};
use crate::image::{LayerInfo, ResolvedImage};
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
    /// config's diff_id; a layer without a valid diff_id is refused. With `verify_first`, all
    /// layer blobs are re-hashed and decompressed to check their diff_ids before anything is
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
        // A layer without a diff_id to check against would be applied unverified: its
        // compressed bytes match their digest, but nothing says what they unpack to.
        if let Some(layer) = layers.iter().find(|l| l.diff_id.is_none()) {
            return Err(StoreError::MissingDiffId {
                image: image.digest.clone(),
                config: image.config_digest.clone(),
                digest: layer.digest.clone(),
            });
        }
        if verify_first {
            // Blob digests and diff_ids both: a layer whose content is not what the config
            // says is found before anything is written, not after it was applied.
            for layer in &layers {
                self.read_layer(layer, None)?;
            }
        }
        let options = UnpackOptions::default();
        let mut report = UnpackReport::default();
        for layer in &layers {
            let stats = self.read_layer(layer, Some((target, &options)))?;
            report.entries += stats.entries;
            report.bytes += stats.bytes;
            report.whiteouts += stats.whiteouts;
            report.layers += 1;
        }
        Ok(report)
    }

    /// Reads one layer to its end, applying it to `apply`'s target if given, and checks its
    /// blob digest and its diff_id.
    fn read_layer(
        &self,
        layer: &LayerInfo,
        apply: Option<(&Path, &UnpackOptions)>,
    ) -> Result<ApplyStats> {
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            StoreError::UnsupportedLayer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            }
        })?;
        let mut blob = self.open_blob(&layer.digest, Some(layer.size))?;
        let path = self.blob_path(&layer.digest);
        let outcome = read_stream(compression, &mut blob, &path, layer, apply);
        // The decompressor may stop at the end of its stream: read (and verify) the rest. A
        // blob that is not what its digest says is the error to report, whatever the decoder
        // made of its bytes.
        blob.finish()?;
        let (stats, diff_id) = outcome?;
        if let Some(expected) = &layer.diff_id {
            check_diff_id(&layer.digest, expected, &diff_id)?;
        }
        Ok(stats)
    }
}

/// Decompresses a layer blob to its end, applying it if asked; returns the stats and diff_id.
fn read_stream(
    compression: Compression,
    blob: &mut VerifiedReader,
    path: &Path,
    layer: &LayerInfo,
    apply: Option<(&Path, &UnpackOptions)>,
) -> Result<(ApplyStats, Digest)> {
    let stream = decompress(compression, blob).map_err(|e| unwrap_store_error(e, path))?;
    let mut hashed = HashingReader::new(stream);
    let stats = match apply {
        Some((target, options)) => apply_layer(&mut hashed, target, options).map_err(|source| {
            // A verification failure surfaces as an io error inside the unpacker; prefer the
            // blob problem, which names the digest.
            StoreError::Layer {
                digest: layer.digest.clone(),
                source,
            }
        })?,
        None => ApplyStats::default(),
    };
    io::copy(&mut hashed, &mut io::sink()).map_err(|e| unwrap_store_error(e, path))?;
    Ok((stats, hashed.finish().0))
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
