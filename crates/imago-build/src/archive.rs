//! Writing a built image as a single file: `oci-archive` (a tar of an OCI image layout) or
//! `docker-archive` (the `docker save` format). Tar headers are as fixed as the layers' own, so
//! the same image always gives the same archive bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use imago_oci::{Digest, media, to_canonical_json};
use imago_store::Store;
use serde_json::json;

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
    mtime: u64,
) -> Result<(), BuildError> {
    let err = |source| BuildError::Archive {
        path: path.to_owned(),
        source,
    };
    let file = File::create(path).map_err(err)?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let mut out = Out {
        store,
        tar: &mut tar,
        mtime,
        path,
    };
    match format {
        ArchiveFormat::Oci => {
            out.bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            let index = json!({
                "schemaVersion": 2,
                "mediaType": media::OCI_INDEX,
                "manifests": [{
                    "mediaType": media::OCI_MANIFEST,
                    "digest": image.digest.to_string(),
                    "size": image.manifest_size,
                    "annotations": {imago_oci::ANNOTATION_REF_NAME: reference},
                }],
            });
            out.bytes("index.json", &to_canonical_json(&index)?)?;
            out.dir("blobs/")?;
            out.dir("blobs/sha256/")?;
            // Sorted and unique, like the rest of the archive.
            let mut blobs: Vec<(Digest, Option<&[u8]>, u64)> = vec![
                (
                    image.digest.clone(),
                    Some(&image.manifest),
                    image.manifest_size,
                ),
                (
                    image.config_digest.clone(),
                    Some(&image.config),
                    image.config.len() as u64,
                ),
            ];
            for l in &image.layers {
                blobs.push((l.digest.clone(), None, l.size));
            }
            blobs.sort_by(|a, b| a.0.cmp(&b.0));
            blobs.dedup_by(|a, b| a.0 == b.0);
            for (digest, bytes, size) in blobs {
                let name = format!("blobs/sha256/{}", digest.hex());
                match bytes {
                    Some(b) => out.bytes(&name, b)?,
                    None => out.blob(&name, &digest, size)?,
                }
            }
        }
        ArchiveFormat::Docker => {
            let config_name = format!("{}.json", image.config_digest.hex());
            let layer_names: Vec<String> = image
                .layers
                .iter()
                .map(|l| format!("{}.tar", l.digest.hex()))
                .collect();
            let manifest = json!([{
                "Config": config_name,
                "RepoTags": [reference],
                "Layers": layer_names,
            }]);
            out.bytes(&config_name, &image.config)?;
            let mut written = std::collections::BTreeSet::new();
            for (l, name) in image.layers.iter().zip(&layer_names) {
                if written.insert(name.clone()) {
                    out.blob(name, &l.digest, l.size)?;
                }
            }
            out.bytes("manifest.json", &to_canonical_json(&manifest)?)?;
        }
    }
    let writer = tar.into_inner().map_err(err)?;
    let file = writer.into_inner().map_err(|e| err(e.into_error()))?;
    file.sync_all().map_err(err)
}

struct Out<'a, W: Write> {
    store: &'a Store,
    tar: &'a mut tar::Builder<W>,
    mtime: u64,
    path: &'a Path,
}

impl<W: Write> Out<'_, W> {
    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(self.mtime);
        h.set_size(size);
        h
    }

    fn err(&self, source: std::io::Error) -> BuildError {
        BuildError::Archive {
            path: self.path.to_owned(),
            source,
        }
    }

    fn dir(&mut self, name: &str) -> Result<(), BuildError> {
        let mut h = self.header(tar::EntryType::Directory, 0o755, 0);
        self.tar
            .append_data(&mut h, name, std::io::empty())
            .map_err(|e| self.err(e))
    }

    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), BuildError> {
        let mut h = self.header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
        self.tar
            .append_data(&mut h, name, bytes)
            .map_err(|e| self.err(e))
    }

    fn blob(&mut self, name: &str, digest: &Digest, size: u64) -> Result<(), BuildError> {
        let mut reader = self.store.open_blob(digest, Some(size))?;
        let mut h = self.header(tar::EntryType::Regular, 0o644, size);
        self.tar
            .append_data(&mut h, name, &mut reader)
            .map_err(|e| self.err(e))
    }
}
