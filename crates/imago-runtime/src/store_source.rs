//! Images from the imago store: manifests and configs read verified, layer blobs streamed through
//! the store's verifying reader.

use std::io::Read;

use imago_oci::Digest;
use imago_oci::spec::Descriptor;
use imago_store::{Store, StoreError};

use crate::{ImageInfo, ImageSource, RuntimeError};

#[derive(Debug)]
pub struct StoreImageSource {
    store: Store,
}

impl StoreImageSource {
    pub fn new(store: Store) -> StoreImageSource {
        StoreImageSource { store }
    }
}

impl ImageSource for StoreImageSource {
    fn image(&self, digest: &Digest) -> Result<ImageInfo, RuntimeError> {
        match self.store.load_image(digest) {
            Ok(resolved) => Ok(ImageInfo {
                config: resolved.config,
                layers: resolved.manifest.layers().clone(),
            }),
            Err(e @ (StoreError::MissingBlob { .. } | StoreError::NotFound(_))) => {
                Err(RuntimeError::ImageNotFound {
                    digest: digest.clone(),
                    reason: e.to_string(),
                })
            }
            Err(e) => Err(RuntimeError::InvalidImage {
                digest: digest.clone(),
                reason: e.to_string(),
            }),
        }
    }

    fn open_layer(
        &self,
        image: &Digest,
        layer: &Descriptor,
    ) -> Result<Box<dyn Read + '_>, RuntimeError> {
        let digest = Digest::try_from(layer.digest()).map_err(|e| RuntimeError::InvalidImage {
            digest: image.clone(),
            reason: format!("layer digest {}: {e}", layer.digest()),
        })?;
        let reader = self
            .store
            .open_blob(&digest, Some(layer.size()))
            .map_err(|e| RuntimeError::CorruptLayer {
                image: image.clone(),
                layer: digest.clone(),
                reason: e.to_string(),
            })?;
        Ok(Box::new(reader))
    }
}
