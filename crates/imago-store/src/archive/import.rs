//! `Store::import_archive`: one streaming pass over the archive, then checks, then names.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path};

use imago_layer::compression::{Compression, decompress, decompress_sniffed};
use imago_oci::spec::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use imago_oci::{ANNOTATION_REF_NAME, Digest, HashingWriter, Reference, media};
use serde::{Deserialize, Serialize};

use super::{ArchiveError, ArchiveFormat, archive_error, docker};
use crate::blob::unwrap_store_error;
use crate::error::{Result, StoreError};
use crate::image::{ResolvedImage, resolve_image_with};
use crate::index::{digest_to_oci, manifest_media_type, ref_name};
use crate::layout::Store;

/// JSON documents (index, manifests list, docker configs) are read into memory; anything larger
/// than this is not a real one.
const JSON_LIMIT: u64 = 16 << 20;
const COPY_BUFFER: usize = 1 << 20;
/// containerd and Docker 25+ put the full image name here and only the tag into ref.name.
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// How to import.
#[derive(Default)]
pub struct ImportOptions<'a> {
    /// Name the (single) image this instead of the names recorded in the archive.
    pub name: Option<Reference>,
    /// Called with the number of archive bytes read so far, for progress bars.
    pub progress: Option<&'a dyn Fn(u64)>,
    /// Store and check the blobs but leave `index.json` alone (not even a digest-only entry),
    /// for a caller that names what it makes from them: a build on an archive base must not
    /// give the user names they never asked for. Until that caller names something that
    /// reaches the blobs, it holds [`Store::write_guard`] to keep gc off them.
    pub unnamed: bool,
}

impl std::fmt::Debug for ImportOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportOptions")
            .field("name", &self.name)
            .field("unnamed", &self.unnamed)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportedImage {
    /// The manifest (or index) digest the image has in the store.
    pub digest: Digest,
    pub media_type: String,
    /// `name:tag`s given to it; empty if the archive named it nothing (it is then listed by
    /// digest only).
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub format: ArchiveFormat,
    pub images: Vec<ImportedImage>,
    /// Blob files written from archive entries (new to the store, or replacing a damaged copy).
    pub blobs_written: usize,
    /// Blobs the store already had intact (their archive copies were still hashed and checked).
    pub blobs_present: usize,
    /// Bytes of the archive file read.
    pub archive_bytes: u64,
}

/// An image read from an archive by [`Store::read_archive`], which stores nothing.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    /// The manifest (or index) digest the image would have in the store.
    pub digest: Digest,
    /// Its manifest and config (for an index, those of the image [`Store::load_image`] picks).
    pub image: ResolvedImage,
    /// The config's bytes, as hashed.
    pub config: Vec<u8>,
}

/// Where the blobs of an import go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Into the store, then names into `index.json`.
    Named,
    /// Into the store, no names.
    Unnamed,
    /// Nowhere: every entry is hashed and checked as an import would, and the JSON documents
    /// among the blobs are held in memory ([`Held`]), so `imago build --check` can learn an
    /// archive base without changing the store.
    Dry,
}

/// A blob a dry import found in the archive and did not store.
struct Held {
    size: u64,
    /// The bytes of blobs that look like JSON documents (manifests, configs, indexes).
    bytes: Option<Vec<u8>>,
    compression: Compression,
}

/// The blobs an import brought: in the store, or for a dry import also in `held`.
struct Blobs {
    mode: Mode,
    held: HashMap<Digest, Held>,
}

/// What one pass over the tar found.
#[derive(Default)]
struct Scan {
    /// Small JSON and marker files, by normalized path.
    documents: HashMap<String, Vec<u8>>,
    /// Every other regular file, stored as a blob, by normalized path.
    files: HashMap<String, (Digest, u64)>,
    /// Symbolic and hard links: normalized path -> normalized target.
    links: HashMap<String, String>,
    blobs_written: usize,
    blobs_present: usize,
}

impl Scan {
    fn resolve(&self, path: &str) -> String {
        let mut current = normalize_relative(path).unwrap_or_else(|| path.to_owned());
        // A bounded walk: link cycles end here and show up as a missing file.
        for _ in 0..16 {
            match self.links.get(&current) {
                Some(target) => current = target.clone(),
                None => break,
            }
        }
        current
    }
}

/// An image found in the archive, checked and ready to be named.
struct Found {
    digest: Digest,
    size: u64,
    media_type: String,
    names: Vec<String>,
}

impl Store {
    /// Imports every image of the OCI or docker archive at `path` (see the module docs).
    pub fn import_archive(&self, path: &Path, options: &ImportOptions<'_>) -> Result<ImportReport> {
        let mode = if options.unnamed {
            Mode::Unnamed
        } else {
            Mode::Named
        };
        let file = File::open(path).map_err(|e| archive_error(path, ArchiveError::Read(e)))?;
        self.import_from(file, options, mode)
            .map(|(report, _)| report)
            .map_err(|e| archive_error(path, e))
    }

    /// Reads every image of the archive at `path` with all the checks of an import, but
    /// writes nothing: no blob, no name, no temporary file.
    pub fn read_archive(&self, path: &Path) -> Result<Vec<ArchiveImage>> {
        let file = File::open(path).map_err(|e| archive_error(path, ArchiveError::Read(e)))?;
        let (report, blobs) = self
            .import_from(file, &ImportOptions::default(), Mode::Dry)
            .map_err(|e| archive_error(path, e))?;
        report
            .images
            .into_iter()
            .map(|found| {
                let (image, config) =
                    resolve_image_with(&found.digest, &|digest: &Digest, size: Option<u64>| {
                        blobs.read(self, digest, size)
                    })?;
                Ok(ArchiveImage {
                    digest: found.digest,
                    image,
                    config,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(|e| archive_error(path, ArchiveError::entry("(image)", e)))
    }

    fn import_from(
        &self,
        file: File,
        options: &ImportOptions<'_>,
        mode: Mode,
    ) -> std::result::Result<(ImportReport, Blobs), ArchiveError> {
        // One guard for the whole import: blobs committed early stay safe from a concurrent gc
        // until the names that reach them are written. A dry import writes nothing to guard.
        let _guard = match mode {
            Mode::Dry => None,
            Mode::Named | Mode::Unnamed => Some(
                self.write_guard()
                    .map_err(|e| ArchiveError::entry("(store)", e))?,
            ),
        };
        let mut blobs = Blobs {
            mode,
            held: HashMap::new(),
        };
        let mut counted = ProgressReader {
            inner: file,
            count: 0,
            progress: options.progress,
        };
        let scan = {
            let (_, stream) = decompress_sniffed(&mut counted).map_err(ArchiveError::Read)?;
            self.scan(stream, &mut blobs)?
        };
        let (format, found) = if scan.documents.contains_key("index.json") {
            (ArchiveFormat::Oci, self.check_oci(&scan, &blobs)?)
        } else if scan.documents.contains_key("manifest.json") {
            (
                ArchiveFormat::Docker,
                self.convert_docker(&scan, &mut blobs)?,
            )
        } else {
            return Err(ArchiveError::UnknownFormat);
        };
        if found.is_empty() {
            return Err(ArchiveError::Empty);
        }
        let found = apply_name_override(found, options.name.as_ref())?;
        if mode == Mode::Named {
            self.name_all(&found)?;
        }
        let report = ImportReport {
            format,
            images: found
                .into_iter()
                .map(|f| ImportedImage {
                    digest: f.digest,
                    media_type: f.media_type,
                    names: f.names,
                })
                .collect(),
            blobs_written: scan.blobs_written,
            blobs_present: scan.blobs_present,
            archive_bytes: counted.count,
        };
        Ok((report, blobs))
    }

    /// Reads the tar once: documents into memory, everything else into blobs.
    fn scan(
        &self,
        stream: impl Read,
        blobs: &mut Blobs,
    ) -> std::result::Result<Scan, ArchiveError> {
        // Long names and PAX headers are read into memory by the tar crate: bounded here.
        let mut archive = tar::Archive::new(imago_layer::tar_limits::ExtensionLimit::new(stream));
        let mut scan = Scan::default();
        let mut buffer = vec![0u8; COPY_BUFFER];
        for entry in archive.entries().map_err(ArchiveError::Read)? {
            let mut entry = entry.map_err(ArchiveError::Read)?;
            let raw_path = entry.path().map_err(ArchiveError::Read)?.into_owned();
            let display = raw_path.display().to_string();
            let Some(path) = normalize(&raw_path) else {
                return Err(ArchiveError::UnsafePath { entry: display });
            };
            let kind = entry.header().entry_type();
            if kind.is_dir() || path.is_empty() {
                continue;
            }
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let joined = if kind.is_symlink() {
                    match path.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target,
                    }
                } else {
                    target
                };
                let Some(target) = normalize_relative(&joined) else {
                    return Err(ArchiveError::UnsafePath { entry: display });
                };
                scan.links.insert(path, target);
                continue;
            }
            if !(kind.is_file() || kind.is_contiguous()) {
                // pax/gnu metadata entries are consumed by the tar reader; anything else here
                // (devices, fifos) has no place in an image archive.
                return Err(ArchiveError::Invalid(format!(
                    "entry {path} is neither a file, a directory nor a link"
                )));
            }
            let size = entry.size();
            if is_document(&path) {
                if size > JSON_LIMIT {
                    return Err(ArchiveError::TooLarge {
                        entry: path,
                        size,
                        limit: JSON_LIMIT,
                    });
                }
                let mut bytes = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut bytes)
                    .map_err(|e| ArchiveError::entry(&path, io_error(e, &path)))?;
                scan.documents.insert(path, bytes);
            } else if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                let expected = Digest::from_hex(hex).map_err(|_| {
                    ArchiveError::Invalid(format!("entry {path} is not named by a sha256 digest"))
                })?;
                let size = self.store_named_blob(
                    &path,
                    &expected,
                    size,
                    &mut entry,
                    &mut buffer,
                    &mut scan,
                    blobs,
                )?;
                scan.files.insert(path, (expected, size));
            } else if path.starts_with("blobs/") {
                return Err(ArchiveError::Invalid(format!(
                    "entry {path}: only sha256 blobs are supported"
                )));
            } else {
                // A docker archive's layer (or an unknown extra file): stored uncompressed, as
                // containers/image serves docker archive layers.
                let (_, mut stream) = decompress_sniffed(&mut entry)
                    .map_err(|e| ArchiveError::entry(&path, io_error(e, &path)))?;
                if blobs.mode == Mode::Dry {
                    let mut sink = HashingWriter::new(io::sink());
                    copy(&mut stream, &mut sink, &mut buffer)
                        .map_err(|e| ArchiveError::entry(&path, io_error(e, &path)))?;
                    let (digest, size, _) = sink.finish();
                    blobs.held.insert(
                        digest.clone(),
                        Held {
                            size,
                            bytes: None,
                            compression: Compression::None,
                        },
                    );
                    scan.files.insert(path, (digest, size));
                    continue;
                }
                let mut writer = self
                    .blob_writer()
                    .map_err(|e| ArchiveError::entry(&path, e))?;
                copy(&mut stream, &mut writer, &mut buffer)
                    .map_err(|e| ArchiveError::entry(&path, io_error(e, &path)))?;
                let (digest, size) = writer.commit().map_err(|e| ArchiveError::entry(&path, e))?;
                scan.blobs_written += 1;
                scan.files.insert(path, (digest, size));
            }
        }
        Ok(scan)
    }

    /// Stores a `blobs/sha256/<hex>` entry, refusing it unless it hashes to `<hex>`. A blob the
    /// store already has intact is only hashed; a damaged copy is replaced, so that re-importing
    /// an image repairs what `imago verify` found. A dry import holds what it needs instead.
    #[allow(clippy::too_many_arguments)]
    fn store_named_blob(
        &self,
        path: &str,
        expected: &Digest,
        entry_size: u64,
        entry: &mut impl Read,
        buffer: &mut [u8],
        scan: &mut Scan,
        blobs: &mut Blobs,
    ) -> std::result::Result<u64, ArchiveError> {
        let mismatch = |actual: Digest| ArchiveError::DigestMismatch {
            entry: path.to_owned(),
            expected: expected.clone(),
            actual,
        };
        // A dry read holds every blob it reads: verifying a stored copy as well would only read
        // it a second time (the archive's entry is hashed either way).
        if blobs.mode == Mode::Dry {
            let (actual, held) = hold(entry, entry_size, buffer)
                .map_err(|e| ArchiveError::entry(path, io_error(e, path)))?;
            if actual != *expected {
                return Err(mismatch(actual));
            }
            let size = held.size;
            blobs.held.insert(actual, held);
            return Ok(size);
        }
        if self.verify_blob(expected, Some(entry_size)).is_ok() {
            let mut sink = HashingWriter::new(io::sink());
            copy(entry, &mut sink, buffer)
                .map_err(|e| ArchiveError::entry(path, io_error(e, path)))?;
            let (actual, size, _) = sink.finish();
            if actual != *expected {
                return Err(mismatch(actual));
            }
            scan.blobs_present += 1;
            return Ok(size);
        }
        let mut writer = self
            .blob_writer()
            .map_err(|e| ArchiveError::entry(path, e))?;
        copy(entry, &mut writer, buffer)
            .map_err(|e| ArchiveError::entry(path, io_error(e, path)))?;
        match writer.commit_expecting(expected) {
            Ok((_, size)) => {
                scan.blobs_written += 1;
                Ok(size)
            }
            Err(StoreError::UnexpectedDigest { actual, .. }) => Err(mismatch(actual)),
            Err(e) => Err(ArchiveError::entry(path, e)),
        }
    }

    /// Checks every image `index.json` lists: manifests, configs and layers present with the
    /// sizes and media types their descriptors promise.
    fn check_oci(
        &self,
        scan: &Scan,
        blobs: &Blobs,
    ) -> std::result::Result<Vec<Found>, ArchiveError> {
        if let Some(layout) = scan.documents.get("oci-layout") {
            let value: serde_json::Value =
                serde_json::from_slice(layout).map_err(|source| ArchiveError::InvalidJson {
                    entry: "oci-layout".into(),
                    what: "oci-layout",
                    cause: source,
                })?;
            if value.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
                return Err(ArchiveError::Invalid(
                    "oci-layout: imageLayoutVersion is not 1.0.0".into(),
                ));
            }
        }
        let bytes = scan
            .documents
            .get("index.json")
            .map(Vec::as_slice)
            .unwrap_or_default();
        let index: ImageIndex =
            serde_json::from_slice(bytes).map_err(|source| ArchiveError::InvalidJson {
                entry: "index.json".into(),
                what: "image index",
                cause: source,
            })?;
        let docker_names = docker_repo_tags(scan);
        let mut found = Vec::new();
        for descriptor in index.manifests() {
            let digest = parse_digest(descriptor, "index.json")?;
            let media_type = descriptor.media_type().to_string();
            if !(media::is_image_manifest(&media_type) || media::is_index(&media_type)) {
                return Err(ArchiveError::WrongMediaType {
                    what: "index.json entry",
                    digest,
                    found: media_type,
                    expected: media::OCI_MANIFEST.into(),
                });
            }
            self.check_manifest(blobs, &digest, descriptor.size(), &media_type, "index.json")?;
            let mut names = Vec::new();
            let annotations = descriptor.annotations().clone().unwrap_or_default();
            let recorded = match (
                annotations.get(ANNOTATION_REF_NAME),
                annotations.get(ANNOTATION_CONTAINERD_NAME),
            ) {
                (_, Some(full)) => Some(full.clone()),
                (Some(name), None) => Some(name.clone()),
                (None, None) => None,
            };
            if let Some(name) = recorded {
                names.push(parse_name(&name)?);
            } else if let Some(tags) = docker_names.get(&digest) {
                for tag in tags {
                    names.push(parse_name(tag)?);
                }
            }
            match found.iter_mut().find(|f: &&mut Found| f.digest == digest) {
                Some(existing) => existing.names.extend(names),
                None => found.push(Found {
                    digest,
                    size: descriptor.size(),
                    media_type,
                    names,
                }),
            }
        }
        Ok(found)
    }

    fn check_manifest(
        &self,
        blobs: &Blobs,
        digest: &Digest,
        size: u64,
        declared: &str,
        referrer: &str,
    ) -> std::result::Result<(), ArchiveError> {
        let bytes = self.read_checked(blobs, digest, size, referrer)?;
        let entry = digest.layout_path();
        let actual = manifest_media_type(digest, &bytes).map_err(|e| match e {
            StoreError::InvalidJson { source, .. } => ArchiveError::InvalidJson {
                entry: entry.clone(),
                what: "manifest",
                cause: source,
            },
            other => ArchiveError::entry(&entry, other),
        })?;
        if actual != declared {
            return Err(ArchiveError::WrongMediaType {
                what: "manifest",
                digest: digest.clone(),
                found: actual,
                expected: declared.to_owned(),
            });
        }
        let invalid_json = |what| {
            let entry = entry.clone();
            move |source| ArchiveError::InvalidJson {
                entry,
                what,
                cause: source,
            }
        };
        if media::is_index(&actual) {
            let index: ImageIndex =
                serde_json::from_slice(&bytes).map_err(invalid_json("image index"))?;
            let referrer = format!("index {digest}");
            let mut present = 0;
            for child in index.manifests() {
                let child_digest = parse_digest(child, &referrer)?;
                // Indexes often list platforms whose images were not copied along.
                if blobs.held.contains_key(&child_digest) || self.has_blob(&child_digest) {
                    let child_type = child.media_type().to_string();
                    self.check_manifest(
                        blobs,
                        &child_digest,
                        child.size(),
                        &child_type,
                        &referrer,
                    )?;
                    present += 1;
                }
            }
            if present == 0 {
                return Err(ArchiveError::Invalid(format!(
                    "index {digest} lists no manifest that the archive holds"
                )));
            }
            return Ok(());
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(invalid_json("image manifest"))?;
        let referrer = format!("manifest {digest}");
        let config = manifest.config();
        let config_digest = parse_digest(config, &referrer)?;
        let config_type = config.media_type().to_string();
        if config_type != media::OCI_CONFIG && config_type != media::DOCKER_CONFIG {
            return Err(ArchiveError::WrongMediaType {
                what: "config",
                digest: config_digest,
                found: config_type,
                expected: media::OCI_CONFIG.into(),
            });
        }
        let config_bytes = self.read_checked(
            blobs,
            &config_digest,
            config.size(),
            &format!("config of {digest}"),
        )?;
        let parsed: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|source| ArchiveError::InvalidJson {
                entry: config_digest.layout_path(),
                what: "image config",
                cause: source,
            })?;
        let diff_ids = parsed.rootfs().diff_ids().len();
        if diff_ids != manifest.layers().len() {
            return Err(ArchiveError::Invalid(format!(
                "manifest {digest} has {} layers, but its config {config_digest} lists {diff_ids} diff_ids",
                manifest.layers().len()
            )));
        }
        for layer in manifest.layers() {
            let layer_digest = parse_digest(layer, &referrer)?;
            let layer_type = layer.media_type().to_string();
            if media::layer_compression(&layer_type).is_none() {
                return Err(ArchiveError::WrongMediaType {
                    what: "layer",
                    digest: layer_digest,
                    found: layer_type,
                    expected: media::OCI_LAYER_GZIP.into(),
                });
            }
            self.check_size(
                blobs,
                &layer_digest,
                layer.size(),
                &format!("layer of {digest}"),
            )?;
        }
        Ok(())
    }

    /// The blob must be in the store (written by this import or before), or held by a dry
    /// import, with `size` bytes.
    fn check_size(
        &self,
        blobs: &Blobs,
        digest: &Digest,
        size: u64,
        referrer: &str,
    ) -> std::result::Result<(), ArchiveError> {
        let path = self.blob_path(digest);
        let actual = match blobs.held.get(digest) {
            Some(held) => Ok(held.size),
            None => fs::metadata(&path).map(|m| m.len()),
        };
        let actual = match actual {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ArchiveError::MissingBlob {
                    digest: digest.clone(),
                    referrer: referrer.to_owned(),
                });
            }
            Err(e) => {
                return Err(ArchiveError::entry(
                    &digest.layout_path(),
                    io_error(e, &digest.layout_path()),
                ));
            }
        };
        if actual != size {
            return Err(ArchiveError::SizeMismatch {
                digest: digest.clone(),
                referrer: referrer.to_owned(),
                expected: size,
                actual,
            });
        }
        Ok(())
    }

    fn read_checked(
        &self,
        blobs: &Blobs,
        digest: &Digest,
        size: u64,
        referrer: &str,
    ) -> std::result::Result<Vec<u8>, ArchiveError> {
        self.check_size(blobs, digest, size, referrer)?;
        blobs
            .read(self, digest, Some(size))
            .map_err(|e| ArchiveError::entry(&digest.layout_path(), e))
    }

    /// Turns each `manifest.json` item into an OCI image the way skopeo does (see [`docker`]).
    fn convert_docker(
        &self,
        scan: &Scan,
        blobs: &mut Blobs,
    ) -> std::result::Result<Vec<Found>, ArchiveError> {
        let bytes = scan
            .documents
            .get("manifest.json")
            .map(Vec::as_slice)
            .unwrap_or_default();
        let items: Vec<DockerManifestItem> =
            serde_json::from_slice(bytes).map_err(|source| ArchiveError::InvalidJson {
                entry: "manifest.json".into(),
                what: "docker manifest",
                cause: source,
            })?;
        let mut found: Vec<Found> = Vec::new();
        for item in items {
            let config_path = scan.resolve(&item.config);
            let config_bytes = match (
                scan.documents.get(&config_path),
                scan.files.get(&config_path),
            ) {
                (Some(bytes), _) => bytes.clone(),
                (None, Some((digest, size))) => blobs
                    .read(self, digest, Some(*size))
                    .map_err(|e| ArchiveError::entry(&config_path, e))?,
                (None, None) => {
                    return Err(ArchiveError::MissingFile {
                        entry: item.config.clone(),
                        referrer: "manifest.json".into(),
                    });
                }
            };
            let config: serde_json::Value =
                serde_json::from_slice(&config_bytes).map_err(|source| {
                    ArchiveError::InvalidJson {
                        entry: config_path.clone(),
                        what: "docker image config",
                        cause: source,
                    }
                })?;
            let diff_ids: Vec<String> = config
                .pointer("/rootfs/diff_ids")
                .and_then(|d| d.as_array())
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().unwrap_or_default().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            if diff_ids.len() != item.layers.len() {
                return Err(ArchiveError::Invalid(format!(
                    "manifest.json lists {} layers, but the config {config_path} lists {} diff_ids",
                    item.layers.len(),
                    diff_ids.len()
                )));
            }
            let mut layers = Vec::with_capacity(item.layers.len());
            for (layer_path, diff_id) in item.layers.iter().zip(&diff_ids) {
                let resolved = scan.resolve(layer_path);
                let Some((digest, size)) = scan.files.get(&resolved) else {
                    return Err(ArchiveError::MissingFile {
                        entry: layer_path.clone(),
                        referrer: "manifest.json".into(),
                    });
                };
                let (digest, size) = self.uncompressed(blobs, &resolved, digest, *size)?;
                if digest.to_string() != *diff_id {
                    return Err(ArchiveError::DiffIdMismatch {
                        entry: layer_path.clone(),
                        config: config_path.clone(),
                        expected: diff_id.clone(),
                        actual: digest,
                    });
                }
                layers.push((digest, size));
            }
            let oci_config = docker::convert_config(&config_bytes).map_err(|reason| {
                ArchiveError::Invalid(format!("docker image config {config_path}: {reason}"))
            })?;
            let config_size = oci_config.len() as u64;
            let config_digest = blobs
                .put(self, oci_config)
                .map_err(|e| ArchiveError::entry(&config_path, e))?;
            let manifest = docker::oci_manifest(&(config_digest, config_size), &layers);
            let manifest_size = manifest.len() as u64;
            let digest = blobs
                .put(self, manifest)
                .map_err(|e| ArchiveError::entry("manifest.json", e))?;
            let mut names = Vec::new();
            for tag in item.repo_tags.unwrap_or_default() {
                names.push(parse_name(&tag)?);
            }
            match found.iter_mut().find(|f| f.digest == digest) {
                Some(existing) => existing.names.extend(names),
                None => found.push(Found {
                    digest,
                    size: manifest_size,
                    media_type: media::OCI_MANIFEST.into(),
                    names,
                }),
            }
        }
        Ok(found)
    }

    /// A docker layer stored under its own digest (`blobs/sha256/..` in Docker 25+ archives) may
    /// be compressed; skopeo serves it decompressed, so store that too.
    fn uncompressed(
        &self,
        blobs: &Blobs,
        entry: &str,
        digest: &Digest,
        size: u64,
    ) -> std::result::Result<(Digest, u64), ArchiveError> {
        if let Some(held) = blobs.held.get(digest) {
            if held.compression == Compression::None {
                return Ok((digest.clone(), size));
            }
            // Its uncompressed digest would need a second pass over bytes a dry import did not
            // keep; this layout (a docker archive of compressed blobs without an index.json)
            // is rare enough to ask for a real import instead.
            return Err(ArchiveError::Invalid(format!(
                "layer {entry} is compressed: it cannot be read without storing the archive"
            )));
        }
        let mut blob = self
            .open_blob(digest, Some(size))
            .map_err(|e| ArchiveError::entry(entry, e))?;
        let mut magic = [0u8; 4];
        let n = read_prefix(&mut blob, &mut magic)
            .map_err(|e| ArchiveError::entry(entry, io_error(e, entry)))?;
        let compression = Compression::sniff(&magic[..n]);
        if compression == Compression::None {
            return Ok((digest.clone(), size));
        }
        let blob = self
            .open_blob(digest, Some(size))
            .map_err(|e| ArchiveError::entry(entry, e))?;
        let mut buffer = vec![0u8; COPY_BUFFER];
        if blobs.mode == Mode::Dry {
            let mut sink = HashingWriter::new(io::sink());
            let copied = decompress(compression, blob)
                .and_then(|mut stream| copy(&mut stream, &mut sink, &mut buffer));
            if let Err(e) = copied {
                return Err(ArchiveError::entry(entry, self.blame_blob(digest, size, e)));
            }
            let (digest, size, _) = sink.finish();
            return Ok((digest, size));
        }
        let mut writer = self
            .blob_writer()
            .map_err(|e| ArchiveError::entry(entry, e))?;
        let copied = decompress(compression, blob)
            .and_then(|mut stream| copy(&mut stream, &mut writer, &mut buffer));
        if let Err(e) = copied {
            return Err(ArchiveError::entry(entry, self.blame_blob(digest, size, e)));
        }
        writer.commit().map_err(|e| ArchiveError::entry(entry, e))
    }

    /// Writes all names in one replacement of `index.json`: all of them or none.
    fn name_all(&self, found: &[Found]) -> std::result::Result<(), ArchiveError> {
        let mut descriptors = Vec::new();
        for image in found {
            let oci_digest =
                digest_to_oci(&image.digest).map_err(|e| ArchiveError::entry("index.json", e))?;
            let base = Descriptor::new(
                MediaType::from(image.media_type.as_str()),
                image.size,
                oci_digest,
            );
            if image.names.is_empty() {
                descriptors.push((None, base));
                continue;
            }
            for name in &image.names {
                let mut d = base.clone();
                let mut annotations = HashMap::new();
                annotations.insert(ANNOTATION_REF_NAME.to_owned(), name.clone());
                d.set_annotations(Some(annotations));
                descriptors.push((Some(name.clone()), d));
            }
        }
        self.update_index(|manifests| {
            for (name, descriptor) in descriptors {
                match name {
                    Some(name) => {
                        manifests.retain(|d| ref_name(d).as_deref() != Some(name.as_str()));
                        manifests.push(descriptor);
                    }
                    None => {
                        let already = manifests
                            .iter()
                            .any(|d| ref_name(d).is_none() && d.digest() == descriptor.digest());
                        if !already {
                            manifests.push(descriptor);
                        }
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| ArchiveError::entry("index.json", e))
    }
}

impl Blobs {
    /// A verified read: bytes a dry import held (hashed as they were read from the archive),
    /// else the store's.
    fn read(&self, store: &Store, digest: &Digest, size: Option<u64>) -> Result<Vec<u8>> {
        let Some(held) = self.held.get(digest) else {
            return store.read_blob(digest, size);
        };
        if let Some(expected) = size
            && expected != held.size
        {
            return Err(StoreError::SizeMismatch {
                digest: digest.clone(),
                path: store.blob_path(digest),
                expected,
                actual: held.size,
            });
        }
        held.bytes.clone().ok_or_else(|| StoreError::InvalidJson {
            digest: digest.clone(),
            what: "document",
            source: <serde_json::Error as serde::de::Error>::custom(
                "the blob does not start like a json object",
            ),
        })
    }

    /// Stores a document this import made (a converted docker config or manifest).
    fn put(&mut self, store: &Store, bytes: Vec<u8>) -> Result<Digest> {
        if self.mode != Mode::Dry {
            return store.put_blob(&bytes);
        }
        let digest = Digest::of(&bytes);
        self.held.insert(
            digest.clone(),
            Held {
                size: bytes.len() as u64,
                bytes: Some(bytes),
                compression: Compression::None,
            },
        );
        Ok(digest)
    }
}

/// Hashes a blob entry for a dry import, keeping its bytes if it looks like a JSON document
/// (the only blobs an image is read from) and its compression (for docker layers).
fn hold(entry: &mut impl Read, size: u64, buffer: &mut [u8]) -> io::Result<(Digest, Held)> {
    let mut hasher = HashingWriter::new(io::sink());
    let n = read_prefix(entry, buffer)?;
    let prefix = &buffer[..n];
    let compression = Compression::sniff(prefix);
    let json = prefix.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let mut kept = (json && size <= JSON_LIMIT).then(|| prefix.to_vec());
    hasher.write_all(prefix)?;
    loop {
        let n = match entry.read(buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.write_all(&buffer[..n])?;
        if let Some(kept) = kept.as_mut() {
            kept.extend_from_slice(&buffer[..n]);
        }
    }
    let (digest, size, _) = hasher.finish();
    Ok((
        digest,
        Held {
            size,
            bytes: kept,
            compression,
        },
    ))
}

#[derive(Deserialize)]
struct DockerManifestItem {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Docker 25+ archives are OCI layouts with a `manifest.json` beside; its RepoTags name images
/// whose index entries carry no name.
fn docker_repo_tags(scan: &Scan) -> BTreeMap<Digest, Vec<String>> {
    let mut out = BTreeMap::new();
    let Some(bytes) = scan.documents.get("manifest.json") else {
        return out;
    };
    let Ok(items) = serde_json::from_slice::<Vec<serde_json::Value>>(bytes) else {
        return out;
    };
    for item in items {
        let digest = item
            .get("Config")
            .and_then(|c| c.as_str())
            .and_then(|c| c.strip_prefix("blobs/sha256/"))
            .and_then(|hex| Digest::from_hex(hex).ok());
        let tags: Vec<String> = item
            .get("RepoTags")
            .and_then(|t| t.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(d) = digest {
            out.insert(d, tags);
        }
    }
    out
}

fn apply_name_override(
    mut found: Vec<Found>,
    name: Option<&Reference>,
) -> std::result::Result<Vec<Found>, ArchiveError> {
    let Some(reference) = name else {
        return Ok(found);
    };
    if found.len() != 1 {
        return Err(ArchiveError::NameNeedsOneImage(found.len()));
    }
    let Some(name) = reference.ref_name() else {
        return Err(ArchiveError::Invalid(format!(
            "{reference} is not a NAME[:TAG]"
        )));
    };
    found[0].names = vec![name];
    Ok(found)
}

/// `name[:tag]` as the store records it (`name:tag`, tag defaulting to latest). Docker Hub
/// names are shortened the way `docker images` shows them (skopeo writes
/// `docker.io/library/busybox:latest` where `docker save` writes `busybox:latest`).
fn parse_name(text: &str) -> std::result::Result<String, ArchiveError> {
    let familiar = text
        .strip_prefix("docker.io/library/")
        .or_else(|| text.strip_prefix("docker.io/"))
        .unwrap_or(text);
    let reference: Reference = familiar
        .parse()
        .map_err(|source| ArchiveError::InvalidName {
            name: text.to_owned(),
            cause: source,
        })?;
    match &reference {
        Reference::Name { digest: None, .. } => Ok(reference.ref_name().unwrap_or_default()),
        _ => Err(ArchiveError::Invalid(format!(
            "image name {text:?} is not NAME[:TAG]"
        ))),
    }
}

fn parse_digest(d: &Descriptor, referrer: &str) -> std::result::Result<Digest, ArchiveError> {
    Digest::try_from(d.digest())
        .map_err(|e| ArchiveError::Invalid(format!("{referrer} refers to an invalid digest: {e}")))
}

/// Documents are read into memory; everything else is a blob.
fn is_document(path: &str) -> bool {
    if path.starts_with("blobs/") {
        return false;
    }
    let file_name = path.rsplit('/').next().unwrap_or(path);
    matches!(
        path,
        "index.json" | "oci-layout" | "manifest.json" | "repositories"
    ) || file_name.ends_with(".json")
        || file_name == "json"
        || file_name == "VERSION"
}

/// The entry path as `a/b/c`, or `None` if it is absolute or climbs out with `..`.
fn normalize(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(p) => parts.push(p.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// Like [`normalize`] for link targets, where `..` may climb back inside the archive.
fn normalize_relative(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    if path.starts_with('/') {
        return None;
    }
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

fn io_error(e: io::Error, entry: &str) -> StoreError {
    unwrap_store_error(e, Path::new(entry))
}

fn read_prefix(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// `io::copy` with a large buffer: fewer, larger hash updates and writes.
fn copy(reader: &mut impl Read, writer: &mut impl Write, buffer: &mut [u8]) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let n = match reader.read(buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buffer[..n])?;
        total += n as u64;
    }
}

struct ProgressReader<'a, R> {
    inner: R,
    count: u64,
    progress: Option<&'a dyn Fn(u64)>,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if let Some(progress) = self.progress {
            progress(self.count);
        }
        Ok(n)
    }
}
