//! Reading a base image from an archive file (`from = "oci-archive:FILE"` or
//! `"docker-archive:FILE"`) into the store.
//!
//! The archive is streamed once: every blob goes straight into the store through a verifying
//! blob writer, so memory stays flat whatever the image size. An OCI archive keeps its manifest
//! digest; a docker archive gets an OCI manifest written for it (canonical JSON, layer media types
//! taken from each blob's magic bytes), so the same archive always gives the same digest.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use imago_layer::Compression;
use imago_oci::{Digest, media, to_canonical_json};
use imago_store::Store;
use serde_json::{Value, json};

use crate::BuildError;
use crate::archive::ArchiveFormat;

/// JSON documents inside an archive are small; a bigger one is not an archive we understand.
const MAX_JSON: u64 = 16 << 20;

fn bad(path: &Path, message: impl Into<String>) -> BuildError {
    BuildError::Import {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Imports the archive at `path` and returns the manifest digest of its image.
pub fn import_archive(
    store: &Store,
    path: &Path,
    format: ArchiveFormat,
) -> Result<Digest, BuildError> {
    let io_err = |source| BuildError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    // name in the archive -> (digest, size) of what was stored
    let mut stored: BTreeMap<String, (Digest, u64)> = BTreeMap::new();
    let mut documents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_owned();
        let is_document = matches!(name.as_str(), "index.json" | "manifest.json" | "oci-layout");
        if is_document {
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_JSON)
                .read_to_end(&mut bytes)
                .map_err(io_err)?;
            documents.insert(name, bytes);
            continue;
        }
        let expected =
            match format {
                ArchiveFormat::Oci => match name.strip_prefix("blobs/sha256/") {
                    Some(hex) => Some(Digest::from_hex(hex).map_err(|_| {
                        bad(path, format!("blob name {name} is not a sha256 digest"))
                    })?),
                    None => continue,
                },
                ArchiveFormat::Docker => None,
            };
        if let Some(d) = &expected
            && store.has_blob(d)
        {
            stored.insert(name, (d.clone(), entry.header().size().map_err(io_err)?));
            continue;
        }
        let mut writer = store.blob_writer()?;
        io::copy(&mut entry, &mut writer).map_err(io_err)?;
        let (digest, size) = match &expected {
            Some(d) => writer.commit_expecting(d)?,
            None => writer.commit()?,
        };
        stored.insert(name, (digest, size));
    }

    match format {
        ArchiveFormat::Oci => {
            let index = documents
                .get("index.json")
                .ok_or_else(|| bad(path, "no index.json: not an oci-archive"))?;
            let index: Value =
                serde_json::from_slice(index).map_err(|e| bad(path, format!("index.json: {e}")))?;
            let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
            let chosen = match manifests.as_slice() {
                [one] => one.clone(),
                [] => return Err(bad(path, "index.json lists no image")),
                many => {
                    let names: Vec<String> = many
                        .iter()
                        .filter_map(|m| {
                            m["annotations"][imago_oci::ANNOTATION_REF_NAME]
                                .as_str()
                                .map(str::to_owned)
                        })
                        .collect();
                    return Err(bad(
                        path,
                        format!(
                            "the archive holds {} images ({}); imago reads archives of one image",
                            many.len(),
                            names.join(", ")
                        ),
                    ));
                }
            };
            let digest: Digest = chosen["digest"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|e| bad(path, format!("index.json: {e}")))?;
            Ok(digest)
        }
        ArchiveFormat::Docker => {
            let manifest = documents
                .get("manifest.json")
                .ok_or_else(|| bad(path, "no manifest.json: not a docker-archive"))?;
            let manifest: Value = serde_json::from_slice(manifest)
                .map_err(|e| bad(path, format!("manifest.json: {e}")))?;
            let images = manifest.as_array().cloned().unwrap_or_default();
            let [image] = images.as_slice() else {
                return Err(bad(
                    path,
                    format!(
                        "manifest.json lists {} images; imago reads archives of one image",
                        images.len()
                    ),
                ));
            };
            let lookup = |name: &str| {
                stored
                    .get(name.trim_start_matches("./"))
                    .cloned()
                    .ok_or_else(|| {
                        bad(
                            path,
                            format!("manifest.json names {name}, which is not in the archive"),
                        )
                    })
            };
            let (config_digest, config_size) =
                lookup(image["Config"].as_str().unwrap_or_default())?;
            let mut layers = Vec::new();
            for layer in image["Layers"].as_array().cloned().unwrap_or_default() {
                let (digest, size) = lookup(layer.as_str().unwrap_or_default())?;
                let mut magic = [0u8; 4];
                let mut reader = store.open_blob(&digest, Some(size))?;
                let n = read_prefix(&mut reader, &mut magic).map_err(io_err)?;
                let media_type = Compression::sniff(&magic[..n]).layer_media_type();
                layers.push(
                    json!({"mediaType": media_type, "digest": digest.to_string(), "size": size}),
                );
            }
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": media::OCI_MANIFEST,
                "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest.to_string(), "size": config_size},
                "layers": layers,
            });
            Ok(store.put_blob(&to_canonical_json(&manifest)?)?)
        }
    }
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

/// `oci-archive:PATH` / `docker-archive:PATH`, if `text` names an archive.
pub fn parse_archive_base(text: &str) -> Option<(ArchiveFormat, PathBuf)> {
    if let Some(p) = text.strip_prefix("oci-archive:") {
        return Some((ArchiveFormat::Oci, PathBuf::from(p)));
    }
    text.strip_prefix("docker-archive:")
        .map(|p| (ArchiveFormat::Docker, PathBuf::from(p)))
}
