//! The one canonical JSON encoding for everything imago writes that gets a digest.
//!
//! Keys of every object are sorted byte-wise, no insignificant whitespace is written, and no
//! trailing newline follows. The sort is done here, explicitly, rather than relying on
//! `serde_json::Map` being a `BTreeMap`: another crate in the build could switch on serde_json's
//! `preserve_order` feature (cargo unifies features) and silently change the bytes. oci-spec keeps
//! labels and annotations in `HashMap`s, whose order changes from process to process; going through
//! `serde_json::Value` and sorting here removes that too.

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
#[error("cannot encode value as canonical json: {0}")]
pub struct CanonicalJsonError(#[from] serde_json::Error);

/// Serializes `value` to canonical JSON bytes.
pub fn to_canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalJsonError> {
    let value = serde_json::to_value(value)?;
    let mut out = Vec::with_capacity(512);
    write_value(&value, &mut out)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_value(item, out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn sorts_keys_at_every_depth_and_writes_no_whitespace() {
        let value = serde_json::json!({"b": 1, "a": {"z": [3, {"y": true, "x": null}], "c": "s"}});
        let bytes = to_canonical_json(&value).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"a":{"c":"s","z":[3,{"x":null,"y":true}]},"b":1}"#
        );
    }

    #[test]
    fn hashmap_order_does_not_change_the_bytes() {
        // Many HashMaps with different random seeds: every one must encode identically.
        let first = {
            let m: HashMap<String, u32> = (0..50).map(|i| (format!("key{i}"), i)).collect();
            to_canonical_json(&m).unwrap()
        };
        for _ in 0..20 {
            let m: HashMap<String, u32> = (0..50).rev().map(|i| (format!("key{i}"), i)).collect();
            assert_eq!(to_canonical_json(&m).unwrap(), first);
        }
    }

    #[test]
    fn escapes_strings_like_serde_json() {
        let bytes = to_canonical_json(&serde_json::json!({"k\"": "line\nbreak\u{1}"})).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"k\"":"line\nbreak\u0001"}"#
        );
    }
}
