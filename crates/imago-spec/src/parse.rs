//! Reading the `[service.*]` tables out of a whole `imago.toml`. The builder owns the rest of
//! the file; the caller hands over its text.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::{ServiceSpec, SpecError};

/// `[service.*]` tables read with their spans, so errors point at the file, line and column.
#[derive(Deserialize)]
struct ServiceTables {
    #[serde(default)]
    service: BTreeMap<String, ServiceSpec>,
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
    let tables: ServiceTables = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((0, 0), |s| line_column(text, s.start));
        SpecError::ServiceTable {
            path: path.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    let mut specs = tables.service;
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
}
