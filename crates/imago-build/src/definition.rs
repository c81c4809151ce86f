//! The `imago.toml` definition: its serde/JSON-Schema types and the parser that turns TOML errors
//! into `file:line:column` messages with a hint.
//!
//! Values that later checks may reject (paths, globs, modes, owners, ports) keep their byte span
//! in the file, so that every error, including those found while walking the build context,
//! points at the line that caused it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_spanned::Spanned;

use crate::BuildError;

/// The whole `imago.toml`. Other tools add their own top-level tables (`service` for deploy);
/// the builder reads only `image` and leaves the rest alone.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "imago.toml")]
pub struct Definition {
    /// Images, by name: `[image.NAME]`. `imago build NAME` builds one, `imago build` all.
    #[serde(default)]
    pub image: BTreeMap<String, ImageDef>,
    /// Services, read by `imago plan` and `imago apply`; the builder ignores them.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub service: BTreeMap<String, toml::Value>,
    /// Where services run, read by `imago plan` and `imago apply`: `[target.NAME]`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub target: BTreeMap<String, toml::Value>,
}

/// One image: a base, layers in order, and the runtime configuration.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageDef {
    /// `"scratch"` (the default), an image in the store (`name:tag` or `name@sha256:...`), or an
    /// archive file: `"oci-archive:PATH"` / `"docker-archive:PATH"` (relative to imago.toml).
    /// The base is pinned by digest in the result.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub from: Option<Spanned<String>>,
    /// The build context, relative to imago.toml (default: the directory of imago.toml).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub context: Option<Spanned<String>>,
    /// Layer compression: `"gzip"` (default) or `"zstd"`.
    #[serde(default)]
    pub compression: Option<CompressionName>,
    /// `os/arch[/variant]`, e.g. `"linux/amd64"`. Default: the base image's, or linux and this
    /// machine's architecture for scratch.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub platform: Option<Spanned<String>>,
    /// Layers, in order: `[[image.NAME.layer]]`.
    #[serde(default, rename = "layer")]
    pub layers: Vec<LayerDef>,
    /// The runtime configuration of the image.
    #[serde(default)]
    pub config: ConfigDef,
    /// Extra manifest annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Registry repositories (`HOST[:PORT]/REPO[:TAG]`) `imago build` pushes the image to.
    #[serde(default)]
    pub push: Vec<String>,
    /// Build arguments and their defaults: `imago build --arg KEY=VALUE` overrides them. They
    /// are in the environment of every `run` step (and so in its cache key), never in the
    /// image's configuration.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CompressionName {
    Gzip,
    Zstd,
}

/// One layer: any mix of copies from the context, inline files, symlinks and directories.
/// Items that land on the same path: the later one in this order wins: dirs, copies, files,
/// symlinks (and within each kind, the later item).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LayerDef {
    /// A name for messages and the image history.
    #[serde(default)]
    pub name: Option<String>,
    /// Files or directories copied from the build context.
    #[serde(default)]
    pub copy: Vec<CopyDef>,
    /// Files with inline content.
    #[serde(default)]
    pub file: Vec<FileDef>,
    /// Symbolic links.
    #[serde(default)]
    pub symlink: Vec<SymlinkDef>,
    /// Empty directories.
    #[serde(default)]
    pub dir: Vec<DirDef>,
    /// A provisioning step instead of files: the command runs in a sandbox made from the base
    /// and every earlier layer, and the layer is what it changed. A list of strings is one
    /// command (`["/bin/sh", "-c", "make"]`), a string is run with `/bin/sh -c`, and a list of
    /// lists is several commands run in order in the same sandbox.
    #[serde(default)]
    #[schemars(with = "Option<RunCommand>")]
    pub run: Option<Spanned<RunCommand>>,
    /// Environment of the `run` step (added to the image's).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory of the `run` step (default: the image's, or `/`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub workdir: Option<Spanned<String>>,
    /// Numeric `"uid:gid"` or `"uid"` the `run` step runs as (default `"0:0"`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub user: Option<Spanned<String>>,
    /// `"none"` (default: own network namespace with only `lo`) or `"host"` (the host's
    /// network; the step is then reported as not hermetic).
    #[serde(default)]
    pub network: Option<StepNetwork>,
    /// Longest time the `run` step may take, e.g. `"10m"`, `"90s"`, `"1h"` (default `"30m"`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Spanned<String>>,
    /// Memory limit of the `run` step, e.g. `"512M"`, `"2G"` (default `"4G"`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub memory: Option<Spanned<String>>,
    /// Process limit of the `run` step (default 4096).
    #[serde(default)]
    pub pids: Option<u64>,
    /// Mounts of the `run` step; their contents are never part of the layer.
    #[serde(default)]
    pub mounts: Vec<StepMount>,
}

/// The command(s) of a `run` step.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RunCommand {
    /// Run with `/bin/sh -c`.
    Shell(String),
    /// One command and its arguments.
    Exec(Vec<String>),
    /// Several commands, run in order; the first that fails ends the step.
    Many(Vec<Vec<String>>),
}

impl RunCommand {
    /// The commands in order, each as program and arguments.
    pub fn commands(&self) -> Vec<Vec<String>> {
        match self {
            RunCommand::Shell(s) => vec![vec!["/bin/sh".into(), "-c".into(), s.clone()]],
            RunCommand::Exec(args) => vec![args.clone()],
            RunCommand::Many(list) => list.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepNetwork {
    #[default]
    None,
    Host,
}

/// A mount of a `run` step: `{ type = "bind", src = "DIR", dest = "/PATH" }` (a directory
/// of the build context, read-only; its content is part of the step's cache key),
/// `{ type = "cache", id = "NAME", dest = "/PATH" }` (a directory kept between builds under
/// `<home>/build-cache/mounts/NAME`) or `{ type = "tmpfs", dest = "/PATH" }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepMount {
    #[serde(rename = "type")]
    pub kind: MountKind,
    /// For `bind`: the directory, relative to the build context.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub src: Option<Spanned<String>>,
    /// For `cache`: the cache's name.
    #[serde(default)]
    pub id: Option<String>,
    /// Absolute path in the sandbox.
    #[schemars(with = "String")]
    pub dest: Spanned<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    Bind,
    Cache,
    Tmpfs,
}

/// Copies `src` to `dest`.
///
/// - `src` a file: copied to `dest`, or into it if `dest` ends in `/`.
/// - `src` a directory: its contents are copied into `dest`.
/// - `src` a glob (`*`, `?`, `[...]`, `{a,b}`, `**`): every matching file, keeping its path below
///   the glob's fixed leading directories, goes into the directory `dest`.
///
/// Symlinks are copied as symlinks, never followed.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyDef {
    /// Path or glob, relative to the build context.
    #[schemars(with = "String")]
    pub src: Spanned<String>,
    /// Absolute path in the image.
    #[schemars(with = "String")]
    pub dest: Spanned<String>,
    /// Globs (relative to `src`'s directory, or to the context for globs) of files to leave out.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub exclude: Vec<Spanned<String>>,
    /// `"uid:gid"` or `"uid"` (gid = uid). Default `"0:0"`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub owner: Option<Spanned<String>>,
    /// Octal permission bits for files, e.g. `"0644"`. Default: as found in the context.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub mode: Option<Spanned<String>>,
    /// Octal permission bits for directories. Default: as found in the context.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub dir_mode: Option<Spanned<String>>,
    /// Allows an absolute `src` or one that leaves the context through `..`. The build then
    /// depends on this machine's files, so it must be asked for explicitly.
    #[serde(default)]
    pub outside_context: bool,
}

/// A file with inline content.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileDef {
    /// Absolute path in the image.
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    pub content: String,
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub owner: Option<Spanned<String>>,
    /// Default `"0644"`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub mode: Option<Spanned<String>>,
}

/// A symbolic link (mode 0777).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SymlinkDef {
    /// Absolute path of the link in the image.
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    /// What the link points to, stored as written (relative or absolute).
    pub target: String,
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub owner: Option<Spanned<String>>,
}

/// An empty directory.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirDef {
    /// Absolute path in the image.
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub owner: Option<Spanned<String>>,
    /// Default `"0755"`; e.g. `"1777"` for /tmp.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub mode: Option<Spanned<String>>,
}

/// Runtime configuration. Unset fields keep the base image's values.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigDef {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Environment variables; added to (or replacing) the base image's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory.
    #[schemars(with = "Option<String>")]
    pub workdir: Option<Spanned<String>>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    /// Exposed ports: `"8080"`, `"8080/tcp"` or `"53/udp"`.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub ports: Vec<Spanned<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// e.g. `"SIGTERM"`.
    pub stop_signal: Option<String>,
    /// Absolute paths of volumes.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub volumes: Vec<Spanned<String>>,
}

/// A parsed definition file, with its text kept for turning spans into line and column.
#[derive(Debug)]
pub struct DefinitionFile {
    pub path: PathBuf,
    pub text: String,
    pub definition: Definition,
}

impl DefinitionFile {
    pub fn load(path: &Path) -> Result<DefinitionFile, BuildError> {
        let text = std::fs::read_to_string(path).map_err(|source| BuildError::Io {
            path: path.to_owned(),
            source,
        })?;
        DefinitionFile::parse(path, text)
    }

    pub fn parse(path: &Path, text: String) -> Result<DefinitionFile, BuildError> {
        match toml::from_str::<Definition>(&text) {
            Ok(definition) => Ok(DefinitionFile {
                path: path.to_owned(),
                text,
                definition,
            }),
            Err(e) => {
                let message = e.message().trim().to_owned();
                let hint = hint_for_toml_error(&message);
                Err(error_at(path, &text, e.span(), message, hint))
            }
        }
    }

    /// The directory that relative paths in the file are resolved against.
    pub fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// An error pointing at `span` in this file.
    pub fn error(&self, span: Range<usize>, message: impl Into<String>, hint: &str) -> BuildError {
        let hint = (!hint.is_empty()).then(|| hint.to_owned());
        error_at(&self.path, &self.text, Some(span), message.into(), hint)
    }
}

fn hint_for_toml_error(message: &str) -> Option<String> {
    const CONFIG_KEYS: [&str; 9] = [
        "entrypoint",
        "cmd",
        "env",
        "workdir",
        "user",
        "ports",
        "labels",
        "stop_signal",
        "volumes",
    ];
    if let Some(key) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
        && CONFIG_KEYS.contains(&key)
    {
        return Some(format!("`{key}` belongs in the [image.NAME.config] table"));
    }
    let hint = if message.starts_with("unknown field") {
        "check the spelling; `imago schema` prints every key the definition accepts"
    } else if message.starts_with("invalid type") || message.starts_with("wanted") {
        "`imago schema` gives the expected type of every key"
    } else if message.starts_with("missing field") {
        "add the key; `imago schema` lists the required ones"
    } else if message.starts_with("unknown variant") {
        "use one of the values listed above"
    } else {
        "see the TOML syntax at the position shown"
    };
    Some(hint.to_owned())
}

fn error_at(
    path: &Path,
    text: &str,
    span: Option<Range<usize>>,
    message: String,
    hint: Option<String>,
) -> BuildError {
    let (line, column) = line_column(text, span.map_or(0, |s| s.start));
    BuildError::Definition {
        file: path.to_owned(),
        line,
        column,
        message,
        hint,
    }
}

/// 1-based line and column (in characters) of byte `offset`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The JSON Schema of `imago.toml`, for editors.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Definition)).unwrap_or_default()
}

/// The JSON Schema of `imago.toml` with the `[service.NAME]` tables described by `service` (the
/// deployer's schema of one service; the builder does not know services).
pub fn json_schema_with_services(service: serde_json::Value) -> serde_json::Value {
    splice_table(json_schema(), "service", service)
}

/// [`json_schema_with_services`], with the `[target.NAME]` tables described by `target` too.
pub fn json_schema_with_services_and_targets(
    service: serde_json::Value,
    target: serde_json::Value,
) -> serde_json::Value {
    splice_table(json_schema_with_services(service), "target", target)
}

/// `schema` with the values of its top-level table `key` described by `table`'s schema.
fn splice_table(
    mut schema: serde_json::Value,
    key: &str,
    service: serde_json::Value,
) -> serde_json::Value {
    use serde_json::{Value, json};
    let Value::Object(mut service) = service else {
        return schema;
    };
    let service_defs = service.remove("$defs");
    service.remove("$schema");
    let name = service
        .remove("title")
        .and_then(|t| t.as_str().map(str::to_owned))
        .unwrap_or_else(|| "Service".to_owned());
    if let Some(root) = schema.as_object_mut() {
        let defs = root
            .entry("$defs")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(defs) = defs.as_object_mut() {
            if let Some(Value::Object(extra)) = service_defs {
                defs.extend(extra);
            }
            defs.insert(name.clone(), Value::Object(service));
        }
        if let Some(table) = root
            .get_mut("properties")
            .and_then(|p| p.get_mut(key))
            .and_then(Value::as_object_mut)
        {
            table.insert(
                "additionalProperties".to_owned(),
                json!({"$ref": format!("#/$defs/{name}")}),
            );
        }
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        DefinitionFile::parse(Path::new("imago.toml"), text.to_owned())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_key_points_at_its_line_and_column() {
        let err = parse_err("[image.web]\nfrom = \"scratch\"\n  colour = 1\n");
        assert!(
            err.starts_with("imago.toml:3:3: unknown field `colour`"),
            "{err}"
        );
        assert!(err.contains("hint:"), "{err}");
        let err = parse_err("[image.web]\nentrypoint = [\"/x\"]\n");
        assert!(
            err.contains("belongs in the [image.NAME.config] table"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        let err = parse_err("[image.web.config]\nentrypoint = \"/bin/sh\"\n");
        assert!(err.starts_with("imago.toml:2:14: invalid type"), "{err}");
    }

    #[test]
    fn other_top_level_tables_are_left_to_other_tools() {
        let file = DefinitionFile::parse(
            Path::new("imago.toml"),
            "[image.a]\n[service.web]\nimage = \"a\"\nreplicas = 2\n".to_owned(),
        )
        .unwrap();
        assert_eq!(file.definition.image.len(), 1);
        assert_eq!(file.definition.service.len(), 1);
        let err = parse_err("[imagez.a]\n");
        assert!(
            err.starts_with("imago.toml:1:2: unknown field `imagez`"),
            "{err}"
        );
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncé d", 7), (2, 4));
        assert_eq!(line_column("", 0), (1, 1));
    }

    #[test]
    fn service_schema_is_spliced_in() {
        let service = serde_json::json!({
            "$schema": "x", "title": "ServiceSpec", "type": "object",
            "properties": {"health": {"$ref": "#/$defs/HealthCheck"}},
            "$defs": {"HealthCheck": {"type": "object"}},
        });
        let schema = json_schema_with_services(service);
        assert_eq!(
            schema["properties"]["service"]["additionalProperties"]["$ref"],
            "#/$defs/ServiceSpec"
        );
        assert_eq!(schema["$defs"]["ServiceSpec"]["type"], "object");
        assert_eq!(schema["$defs"]["HealthCheck"]["type"], "object");
        assert!(schema["$defs"]["ServiceSpec"].get("$schema").is_none());
    }

    #[test]
    fn schema_names_the_keys() {
        let schema = json_schema().to_string();
        for key in ["entrypoint", "outside_context", "symlink", "stop_signal"] {
            assert!(schema.contains(key), "{key}");
        }
    }
}
