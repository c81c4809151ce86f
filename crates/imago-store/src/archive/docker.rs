//! Converting a docker archive's image to OCI exactly as `skopeo copy docker-archive:X oci:Y`
//! (containers/image) does, so that both give the same config digest, layer digests and
//! manifest bytes.
//!
//! containers/image decodes the docker config into the image-spec `v1.Image` Go struct and
//! encodes it again with `encoding/json` (see `manifestSchema2.OCIConfig` and
//! `convertToManifestOCI1`): unknown docker fields (`container_config`, `docker_version`, ...)
//! are dropped, keys come out in struct field order with `omitempty` rules, strings are
//! HTML-escaped and timestamps are re-formatted as RFC 3339 with trimmed nanoseconds. The
//! manifest is encoded from its Go struct the same way. These bytes are NOT imago's canonical
//! JSON: interop with skopeo's digests is the point of this conversion. The field order and
//! rules were checked against skopeo 1.9.3 (image-spec 1.1.0-rc2) byte for byte.
//!
//! Layers are stored uncompressed (a docker archive's layers are tars; compressed ones are
//! decompressed, as containers/image serves them), so a layer's digest is its diff_id.

use serde_json::{Map, Value};

use imago_oci::{Digest, media};

/// Why a docker config cannot be decoded the way Go would decode it.
pub(crate) type ConvertError = String;

/// Re-encodes a docker image config as containers/image's OCI config bytes.
pub(crate) fn convert_config(bytes: &[u8]) -> Result<Vec<u8>, ConvertError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let empty = Map::new();
    let image = match &value {
        Value::Object(map) => map,
        Value::Null => &empty,
        _ => return Err("the config is not a json object".into()),
    };
    let mut out = GoObject::default();
    out.time("created", field(image, "created"), false)?;
    out.string("author", field(image, "author"), true)?;
    out.string("architecture", field(image, "architecture"), false)?;
    out.string("variant", field(image, "variant"), true)?;
    out.string("os", field(image, "os"), false)?;
    out.string("os.version", field(image, "os.version"), true)?;
    out.strings("os.features", field(image, "os.features"), Omit::Empty)?;
    out.raw("config", &image_config(field(image, "config"))?);
    out.raw("rootfs", &rootfs(field(image, "rootfs"))?);
    out.array_of_objects("history", field(image, "history"), history)?;
    Ok(out.finish().into_bytes())
}

/// The OCI manifest containers/image writes for a converted docker image.
pub(crate) fn oci_manifest(config: &(Digest, u64), layers: &[(Digest, u64)]) -> Vec<u8> {
    let descriptor = |media_type: &str, (digest, size): &(Digest, u64)| {
        format!(r#"{{"mediaType":"{media_type}","digest":"{digest}","size":{size}}}"#)
    };
    let layers: Vec<String> = layers
        .iter()
        .map(|l| descriptor(media::OCI_LAYER_TAR, l))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{},"layers":[{}]}}"#,
        media::OCI_MANIFEST,
        descriptor(media::OCI_CONFIG, config),
        layers.join(",")
    )
    .into_bytes()
}

fn image_config(value: Option<&Value>) -> Result<String, ConvertError> {
    let empty = Map::new();
    let config = object(value, "config")?.unwrap_or(&empty);
    let mut out = GoObject::default();
    out.string("User", field(config, "User"), true)?;
    out.set_map("ExposedPorts", field(config, "ExposedPorts"))?;
    out.strings("Env", field(config, "Env"), Omit::Empty)?;
    out.strings("Entrypoint", field(config, "Entrypoint"), Omit::Empty)?;
    out.strings("Cmd", field(config, "Cmd"), Omit::Empty)?;
    out.set_map("Volumes", field(config, "Volumes"))?;
    out.string("WorkingDir", field(config, "WorkingDir"), true)?;
    out.string_map("Labels", field(config, "Labels"))?;
    out.string("StopSignal", field(config, "StopSignal"), true)?;
    out.bool("ArgsEscaped", field(config, "ArgsEscaped"))?;
    Ok(out.finish())
}

fn rootfs(value: Option<&Value>) -> Result<String, ConvertError> {
    let empty = Map::new();
    let rootfs = object(value, "rootfs")?.unwrap_or(&empty);
    let mut out = GoObject::default();
    out.string("type", field(rootfs, "type"), false)?;
    out.strings("diff_ids", field(rootfs, "diff_ids"), Omit::NullIfAbsent)?;
    Ok(out.finish())
}

fn history(entry: &Map<String, Value>) -> Result<String, ConvertError> {
    let mut out = GoObject::default();
    out.time("created", field(entry, "created"), true)?;
    out.string("created_by", field(entry, "created_by"), true)?;
    out.string("author", field(entry, "author"), true)?;
    out.string("comment", field(entry, "comment"), true)?;
    out.bool("empty_layer", field(entry, "empty_layer"))?;
    Ok(out.finish())
}

/// Go's decoder matches keys exactly first, then case-insensitively.
fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn object<'a>(
    value: Option<&'a Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, ConvertError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(format!("field {name} is not an object")),
    }
}

#[derive(PartialEq)]
enum Omit {
    /// `omitempty` on a slice: nil and empty slices are left out.
    Empty,
    /// No `omitempty`: a nil slice is written as `null`.
    NullIfAbsent,
}

/// An object written in Go struct field order.
#[derive(Default)]
struct GoObject {
    fields: Vec<String>,
}

impl GoObject {
    fn raw(&mut self, key: &str, value: &str) {
        self.fields.push(format!("{}:{value}", go_string(key)));
    }

    fn finish(self) -> String {
        format!("{{{}}}", self.fields.join(","))
    }

    fn string(&mut self, key: &str, value: Option<&Value>, omit_empty: bool) -> Result<(), String> {
        let s = match value {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(format!("field {key} is not a string")),
        };
        if !(omit_empty && s.is_empty()) {
            self.raw(key, &go_string(s));
        }
        Ok(())
    }

    fn bool(&mut self, key: &str, value: Option<&Value>) -> Result<(), String> {
        match value {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
            Some(Value::Bool(true)) => {
                self.raw(key, "true");
                Ok(())
            }
            Some(_) => Err(format!("field {key} is not a boolean")),
        }
    }

    fn strings(&mut self, key: &str, value: Option<&Value>, omit: Omit) -> Result<(), String> {
        let items = match value {
            None | Some(Value::Null) => {
                if omit == Omit::NullIfAbsent {
                    self.raw(key, "null");
                }
                return Ok(());
            }
            Some(Value::Array(items)) => items,
            Some(_) => return Err(format!("field {key} is not an array")),
        };
        if items.is_empty() && omit == Omit::Empty {
            return Ok(());
        }
        let mut encoded = Vec::with_capacity(items.len());
        for item in items {
            encoded.push(match item {
                Value::String(s) => go_string(s),
                Value::Null => go_string(""),
                _ => return Err(format!("field {key} has an item that is not a string")),
            });
        }
        self.raw(key, &format!("[{}]", encoded.join(",")));
        Ok(())
    }

    /// A `map[string]struct{}` with `omitempty`.
    fn set_map(&mut self, key: &str, value: Option<&Value>) -> Result<(), String> {
        let Some(map) = object(value, key)? else {
            return Ok(());
        };
        if map.is_empty() {
            return Ok(());
        }
        let mut keys = Vec::with_capacity(map.len());
        for (k, v) in sorted(map) {
            if !matches!(v, Value::Object(_) | Value::Null) {
                return Err(format!("field {key}.{k} is not an object"));
            }
            keys.push(format!("{}:{{}}", go_string(k)));
        }
        self.raw(key, &format!("{{{}}}", keys.join(",")));
        Ok(())
    }

    /// A `map[string]string` with `omitempty`.
    fn string_map(&mut self, key: &str, value: Option<&Value>) -> Result<(), String> {
        let Some(map) = object(value, key)? else {
            return Ok(());
        };
        if map.is_empty() {
            return Ok(());
        }
        let mut entries = Vec::with_capacity(map.len());
        for (k, v) in sorted(map) {
            let v = match v {
                Value::String(s) => s.as_str(),
                Value::Null => "",
                _ => return Err(format!("field {key}.{k} is not a string")),
            };
            entries.push(format!("{}:{}", go_string(k), go_string(v)));
        }
        self.raw(key, &format!("{{{}}}", entries.join(",")));
        Ok(())
    }

    /// A `*time.Time` (with `omitempty`) or a `time.Time`.
    fn time(&mut self, key: &str, value: Option<&Value>, _omit_empty: bool) -> Result<(), String> {
        match value {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) => {
                let t = go_time(s).ok_or_else(|| format!("field {key} is not an RFC 3339 time"))?;
                self.raw(key, &go_string(&t));
                Ok(())
            }
            Some(_) => Err(format!("field {key} is not a time string")),
        }
    }

    fn array_of_objects(
        &mut self,
        key: &str,
        value: Option<&Value>,
        encode: fn(&Map<String, Value>) -> Result<String, String>,
    ) -> Result<(), String> {
        let items = match value {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(items)) if items.is_empty() => return Ok(()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(format!("field {key} is not an array")),
        };
        let empty = Map::new();
        let mut encoded = Vec::with_capacity(items.len());
        for item in items {
            let map = object(Some(item), key)?.unwrap_or(&empty);
            encoded.push(encode(map)?);
        }
        self.raw(key, &format!("[{}]", encoded.join(",")));
        Ok(())
    }
}

/// Go sorts map keys by their bytes when encoding.
fn sorted(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    entries
}

/// A string as Go's `encoding/json` writes it (HTML-safe escaping, as in Go 1.19).
fn go_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An RFC 3339 time as Go's `time.Time` re-encodes it: nanoseconds with trailing zeros trimmed,
/// a zero offset written as `Z`, other offsets kept.
fn go_time(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.len() < 20 || b[10] != b'T' {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    let ok = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !ok {
        return None;
    }
    let mut rest = &s[19..];
    let mut fraction = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let end = after_dot
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after_dot.len());
        if end == 0 {
            return None;
        }
        fraction = &after_dot[..end.min(9)];
        rest = &after_dot[end..];
    }
    let offset = match rest {
        "Z" | "+00:00" | "-00:00" => "Z",
        o if o.len() == 6
            && matches!(o.as_bytes()[0], b'+' | b'-')
            && o.as_bytes()[3] == b':'
            && o[1..3]
                .bytes()
                .chain(o[4..6].bytes())
                .all(|c| c.is_ascii_digit()) =>
        {
            o
        }
        _ => return None,
    };
    let fraction = fraction.trim_end_matches('0');
    let dot = if fraction.is_empty() { "" } else { "." };
    Some(format!("{}{dot}{fraction}{offset}", &s[..19]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output of skopeo 1.9.3 `copy docker-archive:X oci:Y` for this docker config.
    #[test]
    fn config_conversion_matches_skopeo_byte_for_byte() {
        let input = r#"{"zzz":1,"container_config":{"Hostname":"x"},"docker_version":"20","history":[{"comment":"c","empty_layer":false,"author":"h","created_by":"sh -c x","created":"2020-01-01T00:00:00.500000000+00:00"},{"created":"2020-01-01T01:00:00+02:00","empty_layer":true}],"rootfs":{"diff_ids":["sha256:b14df17d9915c5d29a288a5ea9356c80deae697e262fd06dbca9db064e9b7d92"],"type":"layers"},"config":{"Labels":{"b":"2","a":"1\u2028"},"StopSignal":"SIGTERM","ArgsEscaped":true,"WorkingDir":"/w","Volumes":{"/v":{}},"Cmd":["c"],"Entrypoint":["e"],"Env":["A=1"],"ExposedPorts":{"80/tcp":{}},"User":"u","Hostname":"h","OnBuild":null},"os.features":["f"],"os.version":"1","os":"linux","variant":"v8","architecture":"amd64","author":"me","created":"2021-06-01T10:00:00.120Z"}"#;
        let expected = r#"{"created":"2021-06-01T10:00:00.12Z","author":"me","architecture":"amd64","variant":"v8","os":"linux","os.version":"1","os.features":["f"],"config":{"User":"u","ExposedPorts":{"80/tcp":{}},"Env":["A=1"],"Entrypoint":["e"],"Cmd":["c"],"Volumes":{"/v":{}},"WorkingDir":"/w","Labels":{"a":"1\u2028","b":"2"},"StopSignal":"SIGTERM","ArgsEscaped":true},"rootfs":{"type":"layers","diff_ids":["sha256:b14df17d9915c5d29a288a5ea9356c80deae697e262fd06dbca9db064e9b7d92"]},"history":[{"created":"2020-01-01T00:00:00.5Z","created_by":"sh -c x","author":"h","comment":"c"},{"created":"2020-01-01T01:00:00+02:00","empty_layer":true}]}"#;
        let out = convert_config(input.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn empty_fields_follow_go_omitempty() {
        let input = r#"{"architecture":"amd64","os":"linux","history":[],"config":{"Env":[],"Labels":{}},"rootfs":{"type":"layers","diff_ids":["sha256:b14df17d9915c5d29a288a5ea9356c80deae697e262fd06dbca9db064e9b7d92"]}}"#;
        let expected = r#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:b14df17d9915c5d29a288a5ea9356c80deae697e262fd06dbca9db064e9b7d92"]}}"#;
        let out = convert_config(input.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        let out = convert_config(br#"{"labels":{"x":"<a&b>"}, "config":{"labels":{"x":"<a&b>"}}}"#)
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"architecture":"","os":"","config":{"Labels":{"x":"\u003ca\u0026b\u003e"}},"rootfs":{"type":"","diff_ids":null}}"#
        );
    }

    #[test]
    fn wrong_types_are_errors_as_in_go() {
        assert!(convert_config(br#"{"os":1}"#).is_err());
        assert!(convert_config(br#"{"config":{"Env":"x"}}"#).is_err());
        assert!(convert_config(br#"{"created":"yesterday"}"#).is_err());
        assert!(convert_config(b"[1]").is_err());
    }
}
