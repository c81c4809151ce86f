//! `Store::export`: an image as an OCI archive or a docker archive, every blob verified on the
//! way out.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use imago_layer::compression::{Compression, decompress};
use imago_oci::{ANNOTATION_REF_NAME, Digest, HashingWriter, Reference, media, to_canonical_json};
use serde::Serialize;

use crate::blob::unwrap_store_error;
use crate::error::{IoContext, Result, StoreError};
use crate::image::ResolvedImage;
use crate::index::manifest_media_type;
use crate::layout::{Store, sync_parent, tempfile_in};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// A tar of an OCI image layout (`skopeo ... oci-archive:FILE`).
    #[default]
    Oci,
    /// `docker save` format with uncompressed layers (`docker load`).
    Docker,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub digest: Digest,
    pub format: ExportFormat,
    pub path: PathBuf,
    /// Size of the written archive.
    pub bytes: u64,
    pub blobs: usize,
}

/// Removes the temporary output unless the export completed.
struct PartialFile {
    path: PathBuf,
    done: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Store {
    /// Writes `image` to `path` as an archive. The archive names the image `name` (if given).
    /// The file appears only when complete: it is written beside `path` and renamed; on any error
    /// (a corrupt blob names its digest) nothing is left at `path`.
    pub fn export(
        &self,
        image: &ResolvedImage,
        name: Option<&Reference>,
        format: ExportFormat,
        path: &Path,
    ) -> Result<ExportReport> {
        let wrap = |source| StoreError::Export {
            path: path.to_path_buf(),
            cause: Box::new(source),
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into());
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp_path = dir.join(format!(".{file_name}.imago-{}.tmp", std::process::id()));
        let file = File::create(&tmp_path)
            .ctx("create", &tmp_path)
            .map_err(wrap)?;
        let mut partial = PartialFile {
            path: tmp_path.clone(),
            done: false,
        };
        let (bytes, blobs, writer) = self
            .export_to_writer(image, name, format, BufWriter::with_capacity(1 << 20, file))
            .map_err(wrap)?;
        let file = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("write", &tmp_path)
            .map_err(wrap)?;
        file.sync_all().ctx("fsync", &tmp_path).map_err(wrap)?;
        fs::rename(&tmp_path, path)
            .ctx("rename into place", path)
            .map_err(wrap)?;
        partial.done = true;
        sync_parent(&tmp_path).map_err(wrap)?;
        Ok(ExportReport {
            digest: image.digest.clone(),
            format,
            path: path.to_path_buf(),
            bytes,
            blobs,
        })
    }

    /// Writes the archive to `writer`; returns the bytes and blobs written and the writer. On
    /// error the writer holds a partial archive that the caller must discard.
    pub fn export_to_writer<W: Write>(
        &self,
        image: &ResolvedImage,
        name: Option<&Reference>,
        format: ExportFormat,
        writer: W,
    ) -> Result<(u64, usize, W)> {
        let counting = HashingWriter::new(writer);
        let mut tar = tar::Builder::new(counting);
        let blobs = match format {
            ExportFormat::Oci => self.write_oci(image, name, &mut tar)?,
            ExportFormat::Docker => self.write_docker(image, name, &mut tar)?,
        };
        let counting = tar.into_inner().ctx("write", "archive")?;
        let (_, bytes, writer) = counting.finish();
        Ok((bytes, blobs, writer))
    }

    fn write_oci<W: Write>(
        &self,
        image: &ResolvedImage,
        name: Option<&Reference>,
        tar: &mut tar::Builder<W>,
    ) -> Result<usize> {
        let manifest_bytes = self.read_blob(&image.digest, Some(image.manifest_size))?;
        let media_type = manifest_media_type(&image.digest, &manifest_bytes)?;
        let mut descriptor = serde_json::json!({
            "mediaType": media_type,
            "digest": image.digest.to_string(),
            "size": image.manifest_size,
        });
        if let Some(ref_name) = name.and_then(Reference::ref_name) {
            descriptor["annotations"] = serde_json::json!({ ANNOTATION_REF_NAME: ref_name });
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": [descriptor],
        });
        append_bytes(tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        append_bytes(tar, "index.json", &to_canonical_json(&index)?)?;
        append_dir(tar, "blobs/")?;
        append_dir(tar, "blobs/sha256/")?;
        append_bytes(tar, &image.digest.layout_path(), &manifest_bytes)?;
        let mut written = BTreeSet::from([image.digest.clone()]);
        let mut blobs = vec![(image.config_digest.clone(), image.manifest.config().size())];
        for layer in image.layers()? {
            blobs.push((layer.digest, layer.size));
        }
        for (digest, size) in blobs {
            if written.insert(digest.clone()) {
                let mut blob = self.open_blob(&digest, Some(size))?;
                append_reader(tar, &digest.layout_path(), size, &mut blob)
                    .map_err(|e| unwrap_store_error(e, &self.blob_path(&digest)))?;
            }
        }
        Ok(written.len())
    }

    fn write_docker<W: Write>(
        &self,
        image: &ResolvedImage,
        name: Option<&Reference>,
        tar: &mut tar::Builder<W>,
    ) -> Result<usize> {
        let config_bytes =
            self.read_blob(&image.config_digest, Some(image.manifest.config().size()))?;
        let config_file = format!("{}.json", image.config_digest.hex());
        append_bytes(tar, &config_file, &config_bytes)?;
        let mut layer_files = Vec::new();
        let mut written = BTreeSet::new();
        for layer in image.layers()? {
            let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
                StoreError::UnsupportedLayer {
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                }
            })?;
            let blob_path = self.blob_path(&layer.digest);
            // docker load wants uncompressed layer tars with their size in the header, so a
            // compressed layer is decompressed into a temp file first (never into memory).
            let (diff_id, size, mut source): (Digest, u64, Box<dyn Read>) = match compression {
                Compression::None => (
                    layer.digest.clone(),
                    layer.size,
                    Box::new(self.open_blob(&layer.digest, Some(layer.size))?),
                ),
                _ => {
                    let (tmp_path, tmp) = tempfile_in(&self.tmp_dir())?;
                    let _cleanup = PartialFile {
                        path: tmp_path.clone(),
                        done: false,
                    };
                    let mut blob = self.open_blob(&layer.digest, Some(layer.size))?;
                    let mut hashed = HashingWriter::new(BufWriter::with_capacity(1 << 20, tmp));
                    let copied = decompress(compression, &mut blob)
                        .and_then(|mut stream| io::copy(&mut stream, &mut hashed));
                    if let Err(e) = copied {
                        return Err(self.blame_blob(&layer.digest, layer.size, e));
                    }
                    // The decompressor may stop before the blob's end: read and verify the rest.
                    blob.finish()?;
                    let (diff_id, size, buffered) = hashed.finish();
                    let mut tmp = buffered
                        .into_inner()
                        .map_err(|e| e.into_error())
                        .ctx("write", &tmp_path)?;
                    tmp.rewind().ctx("seek", &tmp_path)?;
                    // The open handle keeps the data after the temp file's name is removed.
                    (diff_id, size, Box::new(tmp))
                }
            };
            if let Some(expected) = &layer.diff_id
                && *expected != diff_id
            {
                return Err(StoreError::DiffIdMismatch {
                    digest: layer.digest.clone(),
                    expected: expected.clone(),
                    actual: diff_id,
                });
            }
            let file = format!("{}/layer.tar", diff_id.hex());
            if written.insert(diff_id.clone()) {
                append_dir(tar, &format!("{}/", diff_id.hex()))?;
                append_reader(tar, &file, size, &mut source)
                    .map_err(|e| unwrap_store_error(e, &blob_path))?;
            }
            layer_files.push(file);
        }
        let repo_tags: Vec<String> = name.and_then(Reference::ref_name).into_iter().collect();
        let manifest = serde_json::json!([{
            "Config": config_file,
            "RepoTags": repo_tags,
            "Layers": layer_files,
        }]);
        append_bytes(tar, "manifest.json", &to_canonical_json(&manifest)?)?;
        Ok(written.len() + 1)
    }
}

impl Store {
    /// A decompressor fails on a corrupt blob before the digest check at its end could: if the
    /// blob is damaged, report that (by digest) rather than the decompressor's complaint.
    pub(crate) fn blame_blob(&self, digest: &Digest, size: u64, error: io::Error) -> StoreError {
        match self.verify_blob(digest, Some(size)) {
            Err(blob_error) => blob_error,
            Ok(_) => unwrap_store_error(error, &self.blob_path(digest)),
        }
    }
}

fn header(path: &str, size: u64, kind: tar::EntryType) -> Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header
        .set_path(path)
        .ctx("set path in archive header", path)?;
    header.set_size(size);
    header.set_entry_type(kind);
    header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    Ok(header)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> Result<()> {
    let header = header(path, 0, tar::EntryType::Directory)?;
    tar.append(&header, io::empty()).ctx("write", path)
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> Result<()> {
    let header = header(path, bytes.len() as u64, tar::EntryType::Regular)?;
    tar.append(&header, bytes).ctx("write", path)
}

/// Appends exactly `size` bytes of `source`; a short source is an error, not a padded entry.
fn append_reader<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    source: &mut dyn Read,
) -> io::Result<()> {
    let header = header(path, size, tar::EntryType::Regular).map_err(io::Error::other)?;
    let mut exact = ExactReader {
        inner: source,
        remaining: size,
    };
    tar.append(&header, &mut exact)?;
    // Reaching the end lets a VerifiedReader check the digest before the entry counts as done.
    let mut probe = [0u8; 1];
    if exact.inner.read(&mut probe)? != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: more data than the {size} bytes expected"),
        ));
    }
    Ok(())
}

struct ExactReader<'a> {
    inner: &'a mut dyn Read,
    remaining: u64,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.remaining as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} bytes missing", self.remaining),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}
