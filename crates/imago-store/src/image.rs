//! Resolving references to images and reading their manifests and configs.

use std::collections::{BTreeSet, HashMap};

use imago_oci::spec::{Arch, ImageConfiguration, ImageIndex, ImageManifest, Os};
use imago_oci::{Digest, Reference, media};
use serde::{Deserialize, Serialize};

use crate::error::parse_json;
use crate::error::{Result, StoreError};
use crate::index::{descriptor_digest, manifest_media_type};
use crate::layout::Store;

/// One image, read and verified: its manifest and config.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The manifest digest: the image's identity.
    pub digest: Digest,
    /// The manifest size in bytes.
    pub manifest_size: u64,
    pub manifest: ImageManifest,
    pub config_digest: Digest,
    pub config: ImageConfiguration,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub diff_id: Option<Digest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub name: Option<String>,
    pub digest: Digest,
    /// Manifest + config + layer blob sizes.
    pub size: u64,
    pub created: Option<String>,
}

impl ResolvedImage {
    /// Manifest, config and layer bytes together. The sizes come from the manifest, which
    /// anyone may have written: a sum past `u64::MAX` is an error naming the manifest.
    pub fn total_size(&self) -> Result<u64> {
        let layers = self.manifest.layers().iter().map(|l| l.size());
        sum_sizes(
            &self.digest,
            [self.manifest_size, self.manifest.config().size()]
                .into_iter()
                .chain(layers),
        )
    }

    pub fn layers(&self) -> Result<Vec<LayerInfo>> {
        let diff_ids = self.config.rootfs().diff_ids();
        self.manifest
            .layers()
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                Ok(LayerInfo {
                    digest: descriptor_digest(layer, &format!("manifest {}", self.digest))?,
                    media_type: layer.media_type().to_string(),
                    size: layer.size(),
                    diff_id: diff_ids.get(i).and_then(|d| d.parse().ok()),
                })
            })
            .collect()
    }
}

impl Store {
    /// Finds the image `reference` names. Names win over digest prefixes; a bare hex string that
    /// is no name is tried as a digest prefix, which must be unique.
    pub fn resolve(&self, reference: &Reference) -> Result<ResolvedImage> {
        let digest = self.resolve_digest(reference)?;
        self.load_image(&digest)
    }

    /// Like [`Store::resolve`] but only finds the manifest digest.
    pub fn resolve_digest(&self, reference: &Reference) -> Result<Digest> {
        match reference {
            Reference::Digest(d) => self.existing(d, reference),
            Reference::Name {
                digest: Some(d), ..
            } => self.existing(d, reference),
            Reference::Name { .. } => {
                let entries = self.names()?;
                // As written first, then as docker reads it: `debian:12` finds the image
                // pulled and named `docker.io/library/debian:12`.
                let names = std::iter::once(reference.ref_name())
                    .chain(std::iter::once(
                        reference.docker_normalized().and_then(|r| r.ref_name()),
                    ))
                    .flatten();
                for name in names {
                    if let Some(entry) = entries
                        .iter()
                        .find(|e| e.name.as_deref() == Some(name.as_str()))
                    {
                        return Ok(entry.digest.clone());
                    }
                }
                match reference.digest_prefix() {
                    Some(prefix) => self.resolve_prefix(prefix, &entries),
                    None => Err(StoreError::NotFound(reference.to_string())),
                }
            }
            Reference::DigestPrefix(prefix) => self.resolve_prefix(prefix, &self.names()?),
        }
    }

    fn existing(&self, digest: &Digest, reference: &Reference) -> Result<Digest> {
        if self.has_blob(digest) {
            Ok(digest.clone())
        } else {
            Err(StoreError::NotFound(reference.to_string()))
        }
    }

    fn resolve_prefix(&self, prefix: &str, entries: &[crate::NamedManifest]) -> Result<Digest> {
        let candidates: BTreeSet<Digest> = entries
            .iter()
            .filter(|e| e.digest.hex().starts_with(prefix))
            .map(|e| e.digest.clone())
            .collect();
        let mut candidates: Vec<Digest> = candidates.into_iter().collect();
        match candidates.len() {
            0 => Err(StoreError::NotFound(prefix.to_owned())),
            1 => Ok(candidates.remove(0)),
            _ => Err(StoreError::AmbiguousPrefix {
                prefix: prefix.to_owned(),
                candidates,
            }),
        }
    }

    /// Reads and verifies the manifest `digest` (following an index to its linux/amd64 image)
    /// and its config.
    pub fn load_image(&self, digest: &Digest) -> Result<ResolvedImage> {
        self.load_image_with_config(digest).map(|(image, _)| image)
    }

    /// [`Store::load_image`], and the bytes of the image's config, read and verified once.
    pub fn load_image_with_config(&self, digest: &Digest) -> Result<(ResolvedImage, Vec<u8>)> {
        resolve_image_with(digest, &|d: &Digest, size: Option<u64>| {
            self.read_blob(d, size)
        })
    }

    /// One summary per name in the store (unnamed entries too), in `index.json` order.
    ///
    /// This is the hot path of `imago images`, so it reads only what a summary needs: each
    /// manifest and config is still read whole and verified, but decoded into small structs
    /// instead of oci-spec's full types, and each distinct manifest and config is read once.
    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        let mut manifests: HashMap<Digest, (u64, Option<String>)> = HashMap::new();
        let mut configs: HashMap<Digest, Option<String>> = HashMap::new();
        let mut out = Vec::new();
        for entry in self.names()? {
            let (size, created) = match manifests.get(&entry.digest) {
                Some(v) => v.clone(),
                None => {
                    let v = self.summarize(&entry.digest, &mut configs)?;
                    manifests.insert(entry.digest.clone(), v.clone());
                    v
                }
            };
            out.push(ImageSummary {
                name: entry.name,
                digest: entry.digest,
                size,
                created,
            });
        }
        Ok(out)
    }

    /// Total size and creation time of the image `digest`, following an index to its
    /// linux/amd64 image as [`Store::load_image`] does.
    fn summarize(
        &self,
        digest: &Digest,
        configs: &mut HashMap<Digest, Option<String>>,
    ) -> Result<(u64, Option<String>)> {
        let bytes = self.read_blob(digest, None)?;
        let doc: SummaryManifest = parse_json(digest, "manifest", &bytes)?;
        let media_type = match (&doc.media_type, &doc.manifests, &doc.config) {
            (Some(m), _, _) => m.clone(),
            (None, Some(_), _) => media::OCI_INDEX.to_owned(),
            (None, None, Some(_)) => media::OCI_MANIFEST.to_owned(),
            (None, None, None) => "(none)".to_owned(),
        };
        if media::is_index(&media_type) {
            let children = host_platform_first(doc.manifests.unwrap_or_default(), |m| {
                m.platform
                    .as_ref()
                    .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
            });
            for chosen in children {
                match self.summarize(&chosen.digest(&format!("index {digest}"))?, configs) {
                    Err(StoreError::MissingBlob { .. }) => continue,
                    other => return other,
                }
            }
            return Err(StoreError::NoMatchingPlatform {
                digest: digest.clone(),
            });
        }
        if !media::is_image_manifest(&media_type) {
            return Err(StoreError::WrongMediaType {
                digest: digest.clone(),
                found: media_type,
                expected: media::OCI_MANIFEST,
            });
        }
        let Some(config) = doc.config else {
            return Err(StoreError::InvalidLayout {
                path: self.blob_path(digest),
                reason: format!("manifest {digest} has no config"),
            });
        };
        let config_digest = config.digest(&format!("manifest {digest}"))?;
        if config.media_type != media::OCI_CONFIG && config.media_type != media::DOCKER_CONFIG {
            return Err(StoreError::WrongMediaType {
                digest: config_digest,
                found: config.media_type,
                expected: media::OCI_CONFIG,
            });
        }
        let created = match configs.get(&config_digest) {
            Some(created) => created.clone(),
            None => {
                let config_bytes = self.read_blob(&config_digest, Some(config.size))?;
                let parsed: SummaryConfig =
                    parse_json(&config_digest, "image config", &config_bytes)?;
                configs.insert(config_digest, parsed.created.clone());
                parsed.created
            }
        };
        let size = sum_sizes(
            digest,
            [bytes.len() as u64, config.size]
                .into_iter()
                .chain(doc.layers.iter().map(|l| l.size)),
        )?;
        Ok((size, created))
    }
}

/// The sum of the blob sizes of manifest `digest`, or an error naming it if it overflows.
fn sum_sizes(digest: &Digest, sizes: impl IntoIterator<Item = u64>) -> Result<u64> {
    sizes
        .into_iter()
        .try_fold(0u64, u64::checked_add)
        .ok_or_else(|| StoreError::SizeOverflow {
            digest: digest.clone(),
        })
}

/// The parts of a manifest or index that a summary needs.
#[derive(Deserialize)]
struct SummaryManifest {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    config: Option<SummaryDescriptor>,
    #[serde(default)]
    layers: Vec<SummaryDescriptor>,
    manifests: Option<Vec<SummaryDescriptor>>,
}

#[derive(Deserialize)]
struct SummaryDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    platform: Option<SummaryPlatform>,
}

impl SummaryDescriptor {
    fn digest(&self, context: &str) -> Result<Digest> {
        self.digest.parse().map_err(|_| StoreError::InvalidDigest {
            context: context.to_owned(),
            value: self.digest.clone(),
        })
    }
}

#[derive(Deserialize)]
struct SummaryPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize)]
struct SummaryConfig {
    created: Option<String>,
}

/// A verified read of a whole blob: digest, and the size its descriptor gives if any.
pub(crate) type ReadBlob<'a> = dyn Fn(&Digest, Option<u64>) -> Result<Vec<u8>> + 'a;

/// [`Store::load_image`] over any source of verified blob reads (the store, or what a dry
/// archive import held); also returns the config's bytes.
/// The children of an index in the order it is followed: the host's platform (linux/amd64, or
/// an entry without platform) first, then the others as listed. The first whose image the store
/// holds is the index's image, so an index pulled for another platform resolves to it.
pub(crate) fn host_platform_first<T>(children: Vec<T>, is_host: impl Fn(&T) -> bool) -> Vec<T> {
    let (mut host, other): (Vec<T>, Vec<T>) = children.into_iter().partition(|c| is_host(c));
    host.extend(other);
    host
}

pub(crate) fn resolve_image_with(
    digest: &Digest,
    read: &ReadBlob<'_>,
) -> Result<(ResolvedImage, Vec<u8>)> {
    let bytes = read(digest, None)?;
    let media_type = manifest_media_type(digest, &bytes)?;
    if media::is_index(&media_type) {
        let index: ImageIndex = parse_json(digest, "index", &bytes)?;
        let children = host_platform_first(index.manifests().iter().collect(), |m| {
            m.platform()
                .as_ref()
                .is_none_or(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
        });
        for chosen in children {
            let child = descriptor_digest(chosen, &format!("index {digest}"))?;
            match resolve_image_with(&child, read) {
                // A platform whose image is not here (pulled for another `--platform`, or
                // kept for its manifest only): the next one.
                Err(StoreError::MissingBlob { .. }) => continue,
                other => return other,
            }
        }
        return Err(StoreError::NoMatchingPlatform {
            digest: digest.clone(),
        });
    }
    let manifest: ImageManifest = parse_json(digest, "manifest", &bytes)?;
    let config_descriptor = manifest.config();
    let config_media_type = config_descriptor.media_type().to_string();
    let config_digest = descriptor_digest(config_descriptor, &format!("manifest {digest}"))?;
    if config_media_type != media::OCI_CONFIG && config_media_type != media::DOCKER_CONFIG {
        return Err(StoreError::WrongMediaType {
            digest: config_digest,
            found: config_media_type,
            expected: media::OCI_CONFIG,
        });
    }
    let config_bytes = read(&config_digest, Some(config_descriptor.size()))?;
    let config: ImageConfiguration = parse_json(&config_digest, "image config", &config_bytes)?;
    Ok((
        ResolvedImage {
            digest: digest.clone(),
            manifest_size: bytes.len() as u64,
            manifest,
            config_digest,
            config,
        },
        config_bytes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest whose layer sizes add up past `u64::MAX` (the store reads no layer to
    /// list or inspect an image, so nothing else refuses it): an error naming the manifest,
    /// for `imago inspect` and for `imago images`, not a panic or a wrapped-around size.
    #[test]
    fn blob_sizes_that_overflow_are_an_error_naming_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [Digest::of(b"l").to_string()]},
        });
        let (config_digest, config_size, _) = store.put_json(&config).unwrap();
        let layer = |size: u64| {
            serde_json::json!({
                "mediaType": media::OCI_LAYER_GZIP, "digest": Digest::of(b"l").to_string(),
                "size": size,
            })
        };
        let manifest = |sizes: &[u64]| {
            serde_json::json!({
                "schemaVersion": 2, "mediaType": media::OCI_MANIFEST,
                "config": {"mediaType": media::OCI_CONFIG, "digest": config_digest.to_string(),
                           "size": config_size},
                "layers": sizes.iter().map(|s| layer(*s)).collect::<Vec<_>>(),
            })
        };
        let (fine, fine_size, _) = store.put_json(&manifest(&[10, 20])).unwrap();
        let (huge, _, _) = store
            .put_json(&manifest(&[u64::MAX / 2, u64::MAX / 2]))
            .unwrap();
        assert_eq!(
            store.load_image(&fine).unwrap().total_size().unwrap(),
            fine_size + config_size + 30
        );
        let err = store.load_image(&huge).unwrap().total_size().unwrap_err();
        assert!(matches!(err, StoreError::SizeOverflow { .. }), "{err:?}");
        assert!(err.to_string().contains(&huge.to_string()), "{err}");
        store
            .tag(&"fine:1".parse::<Reference>().unwrap(), &fine)
            .unwrap();
        assert_eq!(store.images().unwrap().len(), 1);
        store
            .tag(&"huge:1".parse::<Reference>().unwrap(), &huge)
            .unwrap();
        let err = store.images().unwrap_err();
        assert!(err.to_string().contains(&huge.to_string()), "{err}");
    }
}
