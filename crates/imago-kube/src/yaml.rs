//! `imago render`'s YAML: every object as one document, keys sorted at every level, so that the
//! same release always prints the same bytes (GitOps repositories diff them).

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::KubeError;
use crate::render::RenderedRelease;

/// The release's objects as a YAML stream: the Deployment, then the Service if there is one.
pub fn render_yaml(rendered: &RenderedRelease) -> Result<String, KubeError> {
    let mut documents = vec![to_value(rendered, &rendered.deployment)?];
    if let Some(endpoint) = &rendered.endpoint {
        documents.push(to_value(rendered, endpoint)?);
    }
    let mut out = String::new();
    for document in &documents {
        let text =
            serde_saphyr::to_string_with_options(&Sorted(document), options()).map_err(|e| {
                KubeError::Yaml {
                    service: rendered.service.clone(),
                    reason: e.to_string(),
                }
            })?;
        out.push_str("---\n");
        out.push_str(text.strip_prefix("---\n").unwrap_or(&text));
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Plain or quoted scalars only: a long image reference folded over lines (`>-`) is valid
/// YAML but unreadable in a review.
fn options() -> serde_saphyr::SerializerOptions {
    serde_saphyr::ser_options! { prefer_block_scalars: false }
}

fn to_value<T: Serialize>(rendered: &RenderedRelease, object: &T) -> Result<Value, KubeError> {
    serde_json::to_value(object).map_err(|source| KubeError::Encode {
        service: rendered.service.clone(),
        source,
    })
}

/// A JSON value serialized with its object keys in byte order, whatever order the map keeps
/// (serde_json's `preserve_order` may be switched on by any crate in the build).
struct Sorted<'a>(&'a Value);

impl Serialize for Sorted<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let mut out = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    out.serialize_entry(key, &Sorted(value))?;
                }
                out.end()
            }
            Value::Array(items) => {
                let mut out = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    out.serialize_element(&Sorted(item))?;
                }
                out.end()
            }
            scalar => scalar.serialize(serializer),
        }
    }
}
