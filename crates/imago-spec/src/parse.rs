//! Reading the `[service.*]` tables out of a whole `imago.toml`. The builder owns the rest of
//! the file; the caller hands over its text.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::{ResolvedTarget, ServiceSpec, SpecError, TargetRef, TargetSpec};

/// `[service.*]` tables read with their spans, so errors point at the file, line and column.
#[derive(Deserialize)]
struct ServiceTables {
    #[serde(default)]
    service: BTreeMap<String, ServiceSpec>,
    #[serde(default)]
    target: BTreeMap<String, toml::Spanned<TargetSpec>>,
    #[serde(flatten)]
    _rest: BTreeMap<String, toml::Value>,
}

/// The `target` key of each service with its span (a second, small read of the same text: the
/// spec keeps no spans).
#[derive(Deserialize)]
struct TargetNames {
    #[serde(default)]
    service: BTreeMap<String, TargetName>,
    #[serde(flatten)]
    _rest: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
struct TargetName {
    #[serde(default)]
    target: Option<toml::Spanned<String>>,
    #[serde(flatten)]
    _rest: BTreeMap<String, toml::Value>,
}

/// The services of the definition file at `path` (whose content is `text`), limited to `only`
/// unless it is empty. A file without services, or a name in `only` that the file does not
/// define, is an error: plan and apply would otherwise silently do nothing. A seccomp profile
/// file is not read here (see `imago_deploy::services::parse_services`).
pub fn parse_services(
    path: &Path,
    text: &str,
    only: &[String],
) -> Result<BTreeMap<String, ServiceSpec>, SpecError> {
    parse_services_for(path, text, only, None)
}

/// [`parse_services`], with every service's `target` resolved to its `[target.NAME]` table
/// (what a release keeps); `target`, when given (`--target NAME`), replaces the one each
/// service names. An unknown or invalid target is an error at its line and column.
pub fn parse_services_for(
    path: &Path,
    text: &str,
    only: &[String],
    target: Option<&str>,
) -> Result<BTreeMap<String, ServiceSpec>, SpecError> {
    let table_error = |e: toml::de::Error| {
        let (line, column) = e.span().map_or((0, 0), |s| line_column(text, s.start));
        SpecError::ServiceTable {
            path: path.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    };
    let tables: ServiceTables = toml::from_str(text).map_err(table_error)?;
    let names: TargetNames = toml::from_str(text).map_err(table_error)?;
    let mut specs = tables.service;
    for (name, table) in &tables.target {
        table.get_ref().validate().map_err(|reason| {
            let (line, column) = line_column(text, table.span().start);
            SpecError::InvalidTarget {
                path: path.to_owned(),
                line,
                column,
                name: name.clone(),
                reason,
            }
        })?;
    }
    let defined = || {
        let names: Vec<&str> = tables.target.keys().map(String::as_str).collect();
        if names.is_empty() {
            "none ([target.NAME] tables)".to_owned()
        } else {
            names.join(", ")
        }
    };
    for (service, spec) in &mut specs {
        let written = names.service.get(service).and_then(|t| t.target.as_ref());
        let (wanted, span) = match (target, written) {
            (Some(t), _) => (t.to_owned(), None),
            (None, Some(w)) => (w.get_ref().clone(), Some(w.span())),
            (None, None) => continue,
        };
        let (line, column) = span.map_or((0, 0), |s| line_column(text, s.start));
        let Some(table) = tables.target.get(&wanted) else {
            return Err(SpecError::UnknownTarget {
                path: path.to_owned(),
                line,
                column,
                name: wanted,
                defined: defined(),
            });
        };
        spec.target = Some(TargetRef::Resolved(ResolvedTarget {
            name: wanted,
            spec: table.get_ref().clone(),
        }));
    }
    if specs.is_empty() {
        return Err(SpecError::NoServices {
            path: path.to_owned(),
        });
    }
    if let Some(missing) = only.iter().find(|name| !specs.contains_key(*name)) {
        return Err(SpecError::UnknownService {
            path: path.to_owned(),
            service: missing.clone(),
            defined: specs.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    if !only.is_empty() {
        specs.retain(|name, _| only.contains(name));
    }
    Ok(specs)
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count());
    (before.matches('\n').count() + 1, column + 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncé d", 7), (2, 4));
        assert_eq!(line_column("", 0), (1, 1));
        assert_eq!(
            line_column("ab", 99),
            (1, 3),
            "an offset past the end is the end"
        );
    }

    /// The image's declared volumes are imago's record of the image, not a key of the file.
    #[test]
    fn image_volumes_cannot_be_written_in_the_file() {
        let text = "[service.web]\nimage = \"web\"\nimage_volumes = [\"/data\"]\n";
        let err = parse_services(Path::new("imago.toml"), text, &[]).unwrap_err();
        assert!(
            matches!(&err, SpecError::ServiceTable { line: 3, message, .. }
                if message.contains("unknown field `image_volumes`")),
            "{err}"
        );
    }

    /// A mistyped key is answered with the keys a user may write, never with a field that only
    /// imago records.
    #[test]
    fn a_mistyped_key_is_told_the_keys_of_the_file_and_no_internal_one() {
        let text = "[service.web]\nimage = \"web\"\nreplica = 2\n";
        let err = parse_services(Path::new("imago.toml"), text, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown field `replica`") && err.contains("`replicas`"),
            "{err}"
        );
        assert!(!err.contains("image_volumes"), "{err}");
    }
}
