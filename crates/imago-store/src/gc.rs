//! Garbage collection: delete blobs that no root reaches.

use std::collections::BTreeSet;
use std::fs;

use imago_oci::spec::{ImageIndex, ImageManifest};
use imago_oci::{Digest, media};
use serde::Serialize;

use crate::error::parse_json;
use crate::error::{IoContext, Result, StoreError};
use crate::index::{descriptor_digest, manifest_media_type};
use crate::layout::Store;

/// A source of manifest digests that gc must keep besides the store's names, such as the images
/// of retained deployment releases.
pub trait GcRoots {
    /// What these roots are, for reports ("retained releases").
    fn describe(&self) -> String;
    fn roots(&self) -> std::result::Result<Vec<Digest>, Box<dyn std::error::Error + Send + Sync>>;
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Blobs deleted (or that would be, with dry_run) and their sizes.
    pub removed: Vec<(Digest, u64)>,
    pub freed_bytes: u64,
    /// Blobs kept because a root reaches them.
    pub kept: usize,
    /// Leftover temporary files of interrupted writes that were removed.
    pub stale_temp_files: usize,
}

/// One blob a manifest refers to, found by walking from a root.
#[derive(Debug, Clone)]
pub(crate) struct BlobRef {
    pub digest: Digest,
    pub size: Option<u64>,
    /// Who refers to it, for messages ("config of sha256:..").
    pub referrer: String,
    /// An index entry the store may lack: an index pulled or imported for one platform keeps
    /// listing the others. Kept by gc when present, not a problem for verify when absent.
    pub optional: bool,
}

impl Store {
    /// Every blob reachable from the manifest or index `root` (itself included).
    pub(crate) fn reachable_from(
        &self,
        root: &Digest,
        root_size: Option<u64>,
    ) -> Result<Vec<BlobRef>> {
        let mut out = vec![BlobRef {
            digest: root.clone(),
            size: root_size,
            referrer: "name".into(),
            optional: false,
        }];
        let bytes = self.read_blob(root, root_size)?;
        let media_type = manifest_media_type(root, &bytes)?;
        if media::is_index(&media_type) {
            let index: ImageIndex = parse_json(root, "index", &bytes)?;
            for child in index.manifests() {
                let digest = descriptor_digest(child, &format!("index {root}"))?;
                if self.has_blob(&digest) {
                    let mut image = self.reachable_from(&digest, Some(child.size()))?;
                    // A platform pulled for its manifest alone (so that the index can be pushed
                    // again as it was): without its config, none of its blobs is expected.
                    if image
                        .get(1)
                        .is_some_and(|config| !self.has_blob(&config.digest))
                    {
                        for blob in image.iter_mut().skip(1) {
                            blob.optional = true;
                        }
                    }
                    out.extend(image);
                } else {
                    // Indexes from other tools often list platforms whose images were not copied.
                    out.push(BlobRef {
                        digest,
                        size: Some(child.size()),
                        referrer: format!("index {root}"),
                        optional: true,
                    });
                }
            }
            return Ok(out);
        }
        let manifest: ImageManifest = parse_json(root, "manifest", &bytes)?;
        let config = manifest.config();
        out.push(BlobRef {
            digest: descriptor_digest(config, &format!("manifest {root}"))?,
            size: Some(config.size()),
            referrer: format!("config of {root}"),
            optional: false,
        });
        for layer in manifest.layers() {
            out.push(BlobRef {
                digest: descriptor_digest(layer, &format!("manifest {root}"))?,
                size: Some(layer.size()),
                referrer: format!("layer of {root}"),
                optional: false,
            });
        }
        Ok(out)
    }

    /// Deletes every blob that neither a name in `index.json` nor any of `extra_roots` reaches,
    /// and leftovers of interrupted writes. Waits for running writers to finish first.
    pub fn gc(&self, extra_roots: &[&dyn GcRoots], dry_run: bool) -> Result<GcReport> {
        let _gc = self.gc_lock()?;
        let _index = self.lock_index()?;
        let mut roots: Vec<(Digest, Option<u64>)> = self
            .names()?
            .into_iter()
            .map(|e| (e.digest, Some(e.size)))
            .collect();
        for source in extra_roots {
            let digests = source.roots().map_err(|e| {
                StoreError::GcUnsafe(format!("cannot read roots of {}: {e}", source.describe()))
            })?;
            roots.extend(digests.into_iter().map(|d| (d, None)));
        }
        let mut reachable = BTreeSet::new();
        for (root, size) in &roots {
            if !self.has_blob(root) {
                return Err(StoreError::GcUnsafe(format!(
                    "root manifest {root} is missing"
                )));
            }
            let blobs = self
                .reachable_from(root, *size)
                .map_err(|e| StoreError::GcUnsafe(e.to_string()))?;
            reachable.extend(blobs.into_iter().map(|b| b.digest));
        }
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        let dir = self.blobs_dir();
        for entry in fs::read_dir(&dir).ctx("list", &dir)? {
            let entry = entry.ctx("list", &dir)?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            else {
                continue;
            };
            if reachable.contains(&digest) {
                report.kept += 1;
                continue;
            }
            let size = entry.metadata().ctx("stat", entry.path())?.len();
            if !dry_run {
                fs::remove_file(entry.path()).ctx("remove", entry.path())?;
            }
            report.freed_bytes += size;
            report.removed.push((digest, size));
        }
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).ctx("list", &tmp)? {
            let entry = entry.ctx("list", &tmp)?;
            if !dry_run {
                let path = entry.path();
                if path.is_dir() {
                    fs::remove_dir_all(&path).ctx("remove", &path)?;
                } else {
                    fs::remove_file(&path).ctx("remove", &path)?;
                }
            }
            report.stale_temp_files += 1;
        }
        report.removed.sort();
        Ok(report)
    }
}
