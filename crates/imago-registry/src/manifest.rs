//! The parts of manifests and indexes the client needs, read without re-serialising anything:
//! the bytes stored and pushed are always the bytes received or built.

use imago_oci::{Digest, media};
use serde::Deserialize;

use crate::error::{RegistryError, Result};

/// Manifests and indexes larger than this are refused before being read.
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// A config is read into memory by the store: refused above this.
pub const MAX_CONFIG_SIZE: u64 = 64 << 20;
/// No layer is this large; a descriptor that says so is refused before any transfer.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;

pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

#[derive(Deserialize)]
struct Document {
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Debug, Clone)]
pub enum Parsed {
    Image {
        media_type: String,
        config: (Digest, u64),
        layers: Vec<(Digest, u64)>,
    },
    Index {
        media_type: String,
        manifests: Vec<Descriptor>,
    },
}

impl Parsed {
    pub fn media_type(&self) -> &str {
        match self {
            Parsed::Image { media_type, .. } | Parsed::Index { media_type, .. } => media_type,
        }
    }

    /// Config and layers, config first.
    pub fn blobs(&self) -> Vec<(Digest, u64)> {
        match self {
            Parsed::Image { config, layers, .. } => std::iter::once(config.clone())
                .chain(layers.iter().cloned())
                .collect(),
            Parsed::Index { .. } => Vec::new(),
        }
    }
}

fn invalid(reference: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::InvalidManifest {
        reference: reference.to_owned(),
        reason: reason.into(),
    }
}

fn descriptor_digest(reference: &str, d: &Descriptor) -> Result<Digest> {
    d.digest
        .parse()
        .map_err(|_| invalid(reference, format!("unsupported digest {:?}", d.digest)))
}

/// Parses a manifest or index, refusing schema 1, unknown media types and absurd sizes.
/// `content_type` is the response's, used when the document declares no `mediaType`.
pub fn parse(reference: &str, bytes: &[u8], content_type: Option<&str>) -> Result<Parsed> {
    let doc: Document =
        serde_json::from_slice(bytes).map_err(|e| invalid(reference, e.to_string()))?;
    let content_type = content_type.map(|c| c.split(';').next().unwrap_or("").trim());
    if doc.schema_version == Some(1)
        || content_type
            .is_some_and(|c| c.starts_with("application/vnd.docker.distribution.manifest.v1"))
    {
        return Err(RegistryError::Schema1 {
            reference: reference.to_owned(),
        });
    }
    let media_type = match (&doc.media_type, content_type) {
        (Some(m), _) => m.clone(),
        (None, _) if doc.manifests.is_some() => media::OCI_INDEX.to_owned(),
        (None, _) if doc.config.is_some() => media::OCI_MANIFEST.to_owned(),
        (None, Some(c)) => c.to_owned(),
        (None, None) => String::new(),
    };
    if media::is_index(&media_type) {
        let manifests = doc
            .manifests
            .ok_or_else(|| invalid(reference, "an index without manifests"))?;
        for m in &manifests {
            descriptor_digest(reference, m)?;
            if m.size > MAX_MANIFEST_SIZE {
                return Err(invalid(
                    reference,
                    format!("manifest {} claims a size of {} bytes", m.digest, m.size),
                ));
            }
        }
        return Ok(Parsed::Index {
            media_type,
            manifests,
        });
    }
    if !media::is_image_manifest(&media_type) {
        return Err(RegistryError::UnsupportedMediaType {
            reference: reference.to_owned(),
            media_type,
        });
    }
    let config = doc
        .config
        .ok_or_else(|| invalid(reference, "a manifest without config"))?;
    if config.size > MAX_CONFIG_SIZE {
        return Err(invalid(
            reference,
            format!(
                "config {} claims a size of {} bytes (limit {MAX_CONFIG_SIZE})",
                config.digest, config.size
            ),
        ));
    }
    let layers = doc.layers.unwrap_or_default();
    let mut parsed_layers = Vec::with_capacity(layers.len().min(1024));
    for l in &layers {
        if l.size > MAX_BLOB_SIZE {
            return Err(invalid(
                reference,
                format!(
                    "layer {} claims a size of {} bytes (limit {MAX_BLOB_SIZE})",
                    l.digest, l.size
                ),
            ));
        }
        parsed_layers.push((descriptor_digest(reference, l)?, l.size));
    }
    Ok(Parsed::Image {
        media_type,
        config: (descriptor_digest(reference, &config)?, config.size),
        layers: parsed_layers,
    })
}

/// The entry of an index for `platform` (`os/arch[/variant]`).
pub fn select_platform<'a>(manifests: &'a [Descriptor], platform: &str) -> Option<&'a Descriptor> {
    let mut parts = platform.split('/');
    let os = parts.next().unwrap_or("linux");
    let arch = parts.next().unwrap_or("amd64");
    let variant = parts.next();
    let candidates = manifests.iter().filter(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == os && p.architecture == arch)
    });
    let mut first = None;
    for m in candidates {
        let v = m.platform.as_ref().and_then(|p| p.variant.as_deref());
        match (variant, v) {
            (Some(want), Some(have)) if want == have => return Some(m),
            (Some(_), _) => {}
            (None, _) => return Some(m),
        }
        first.get_or_insert(m);
    }
    if variant.is_some() { None } else { first }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn index_platform_selection() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"arm","variant":"v7"}}}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"arm","variant":"v6"}}}}]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let Parsed::Index { manifests, .. } = parse("r", index.as_bytes(), None).unwrap() else {
            panic!("not an index");
        };
        assert_eq!(
            select_platform(&manifests, "linux/amd64").unwrap().digest,
            d('b')
        );
        assert_eq!(
            select_platform(&manifests, "linux/arm64").unwrap().digest,
            d('a')
        );
        assert_eq!(
            select_platform(&manifests, "linux/arm/v6").unwrap().digest,
            d('e')
        );
        assert_eq!(
            select_platform(&manifests, "linux/arm").unwrap().digest,
            d('c')
        );
        assert!(select_platform(&manifests, "linux/s390x").is_none());
        assert!(select_platform(&manifests, "linux/arm/v5").is_none());
    }

    #[test]
    fn schema1_and_unknown_types_are_refused() {
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"1","fsLayers":[]}"#;
        assert!(matches!(
            parse("r", s1, None),
            Err(RegistryError::Schema1 { .. })
        ));
        assert!(matches!(
            parse(
                "r",
                br#"{"name":"x"}"#,
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws")
            ),
            Err(RegistryError::Schema1 { .. })
        ));
        assert!(matches!(
            parse(
                "r",
                br#"{"schemaVersion":2,"mediaType":"text/plain"}"#,
                None
            ),
            Err(RegistryError::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn docker_manifests_are_accepted_and_absurd_sizes_refused() {
        let ok = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{}","size":5}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{}","size":7}}]}}"#,
            d('a'),
            d('b')
        );
        let parsed = parse("r", ok.as_bytes(), None).unwrap();
        assert_eq!(parsed.blobs().len(), 2);
        let absurd = ok.replace("\"size\":7", "\"size\":18446744073709551615");
        let err = parse("r", absurd.as_bytes(), None).unwrap_err().to_string();
        assert!(
            err.contains("a size of 18446744073709551615 bytes"),
            "{err}"
        );
        let negative = ok.replace("\"size\":7", "\"size\":-7");
        assert!(parse("r", negative.as_bytes(), None).is_err());
        let big_config = ok.replace("\"size\":5", "\"size\":100000000000");
        assert!(parse("r", big_config.as_bytes(), None).is_err());
    }
}
