//! `index.json`: the names of the store. Tags are pointers; replacing the file is atomic.

use std::collections::HashMap;
use std::fs;

use imago_oci::spec::{Descriptor, ImageIndex, MediaType};
use imago_oci::{ANNOTATION_REF_NAME, Digest, Reference, media, to_canonical_json};

use serde::Deserialize;

use crate::error::parse_json;
use crate::error::{IoContext, Result, StoreError};
use crate::layout::Store;

#[derive(Deserialize)]
struct NamesIndex {
    manifests: Vec<NamesDescriptor>,
}

#[derive(Deserialize)]
struct NamesDescriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    annotations: Option<HashMap<String, String>>,
}

/// One entry of `index.json`.
#[derive(Debug, Clone)]
pub struct NamedManifest {
    /// `name:tag` from the `org.opencontainers.image.ref.name` annotation, if any.
    pub name: Option<String>,
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

pub(crate) fn descriptor_digest(d: &Descriptor, context: &str) -> Result<Digest> {
    Digest::try_from(d.digest()).map_err(|_| StoreError::InvalidDigest {
        context: context.to_owned(),
        value: d.digest().to_string(),
    })
}

impl Store {
    pub(crate) fn read_index(&self) -> Result<ImageIndex> {
        let path = self.index_path();
        let bytes = fs::read(&path).ctx("read", &path)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::InvalidLayout {
            path: path.clone(),
            reason: format!("index.json is not a valid image index: {e}"),
        })
    }

    /// Every entry of `index.json`, in file order.
    pub fn names(&self) -> Result<Vec<NamedManifest>> {
        // Decoded into a small struct rather than oci-spec's ImageIndex: every command that
        // resolves a name comes here, and with 1,000 names oci-spec's per-descriptor validation
        // and maps were most of the cost of `imago images`.
        let path = self.index_path();
        let bytes = fs::read(&path).ctx("read", &path)?;
        let index: NamesIndex =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::InvalidLayout {
                path: path.clone(),
                reason: format!("index.json is not a valid image index: {e}"),
            })?;
        index
            .manifests
            .into_iter()
            .map(|d| {
                let digest = d.digest.parse().map_err(|_| StoreError::InvalidDigest {
                    context: "index.json".to_owned(),
                    value: d.digest.clone(),
                })?;
                Ok(NamedManifest {
                    name: d
                        .annotations
                        .and_then(|mut a| a.remove(ANNOTATION_REF_NAME)),
                    digest,
                    size: d.size,
                    media_type: d.media_type,
                })
            })
            .collect()
    }

    /// Runs `change` on the manifest list under the index lock and atomically replaces
    /// `index.json` with the result. Entries are kept sorted by name so that the file is the same
    /// whatever order the changes came in.
    pub(crate) fn update_index<T>(
        &self,
        change: impl FnOnce(&mut Vec<Descriptor>) -> Result<T>,
    ) -> Result<T> {
        let _lock = self.lock_index()?;
        let mut index = self.read_index()?;
        let mut manifests = index.manifests().clone();
        let out = change(&mut manifests)?;
        manifests.sort_by(|a, b| {
            ref_name(a)
                .cmp(&ref_name(b))
                .then_with(|| a.digest().to_string().cmp(&b.digest().to_string()))
        });
        index.set_manifests(manifests);
        let bytes = to_canonical_json(&index)?;
        self.write_atomic(&self.index_path(), &bytes)?;
        Ok(out)
    }

    /// Points `reference` (`name:tag`) at the manifest `digest`, which must be in the store.
    /// Replaces whatever the name pointed at before.
    pub fn tag(&self, reference: &Reference, digest: &Digest) -> Result<()> {
        // A name pinned to a digest (`NAME@sha256:...`) names nothing new: refuse it rather than
        // silently tagging NAME:latest.
        let name = reference
            .ref_name()
            .filter(|_| matches!(reference, Reference::Name { digest: None, .. }))
            .ok_or_else(|| StoreError::InvalidTag(reference.to_string()))?;
        self.put_name(name, digest)
    }

    /// Names the manifest `digest` by `NAME@DIGEST` (a registry image pulled by digest), so that
    /// it is listed and kept like a tagged one. Resolving `NAME@DIGEST` goes by the digest anyway.
    pub fn name_pinned(&self, name: &str, digest: &Digest) -> Result<()> {
        let pinned = format!("{name}@{digest}");
        match pinned.parse::<Reference>()? {
            Reference::Name { tag: None, .. } => self.put_name(pinned, digest),
            _ => Err(StoreError::InvalidTag(pinned)),
        }
    }

    fn put_name(&self, name: String, digest: &Digest) -> Result<()> {
        let bytes = self.read_blob(digest, None)?;
        let media_type = manifest_media_type(digest, &bytes)?;
        let mut annotations = HashMap::new();
        annotations.insert(ANNOTATION_REF_NAME.to_owned(), name.clone());
        let mut descriptor = Descriptor::new(
            MediaType::from(media_type.as_str()),
            bytes.len() as u64,
            digest_to_oci(digest)?,
        );
        descriptor.set_annotations(Some(annotations));
        self.update_index(|manifests| {
            manifests.retain(|d| ref_name(d).as_deref() != Some(name.as_str()));
            manifests.push(descriptor);
            Ok(())
        })
    }

    /// Removes the name `reference`; the blobs stay until gc. Returns the digest it pointed at.
    pub fn untag(&self, reference: &Reference) -> Result<Digest> {
        let name = reference
            .ref_name()
            .ok_or_else(|| StoreError::NotFound(reference.to_string()))?;
        self.update_index(|manifests| {
            let position = manifests
                .iter()
                .position(|d| ref_name(d).as_deref() == Some(name.as_str()))
                .ok_or_else(|| StoreError::NotFound(name.clone()))?;
            let removed = manifests.remove(position);
            descriptor_digest(&removed, "index.json")
        })
    }
}

pub(crate) fn ref_name(d: &Descriptor) -> Option<String> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_REF_NAME))
        .cloned()
}

pub(crate) fn digest_to_oci(d: &Digest) -> Result<imago_oci::spec::Digest> {
    d.to_oci().map_err(|_| StoreError::InvalidDigest {
        context: "digest".into(),
        value: d.to_string(),
    })
}

/// The media type a manifest or index document declares (or implies, for documents without the
/// optional `mediaType` field).
pub(crate) fn manifest_media_type(digest: &Digest, bytes: &[u8]) -> Result<String> {
    let value: serde_json::Value = parse_json(digest, "manifest", bytes)?;
    let declared = value.get("mediaType").and_then(|m| m.as_str());
    match declared {
        Some(m) if media::is_image_manifest(m) || media::is_index(m) => Ok(m.to_owned()),
        Some(m) => Err(StoreError::WrongMediaType {
            digest: digest.clone(),
            found: m.to_owned(),
            expected: media::OCI_MANIFEST,
        }),
        None if value.get("manifests").is_some() => Ok(media::OCI_INDEX.to_owned()),
        None if value.get("config").is_some() => Ok(media::OCI_MANIFEST.to_owned()),
        None => Err(StoreError::WrongMediaType {
            digest: digest.clone(),
            found: "(none)".into(),
            expected: media::OCI_MANIFEST,
        }),
    }
}
