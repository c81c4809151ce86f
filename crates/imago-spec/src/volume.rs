//! A service's `volumes` entries: `NAME:/path` or `/host/path:/path`, optionally `:ro`/`:rw`.
//! This is the one definition: the runtime re-exports it (and checks again at launch), so a file
//! is refused when it is read, naming the service, by exactly the rules the launch applies.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A volume mount that breaks a rule; the message names the mount and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VolumeError(pub String);

/// One volume mount, written `SOURCE:TARGET[:ro|:rw]` in `imago.toml` and on the command line.
/// Its serialized form is part of every instance record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    #[serde(flatten)]
    pub source: VolumeSource,
    /// Absolute path inside the instance.
    pub target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// Where a volume's data lives on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum VolumeSource {
    /// `<home>/volumes/<name>`: outlives instances and is shared by every instance naming it.
    Named { name: String },
    /// An existing directory or file of the host, bound as it is.
    Host { path: PathBuf },
}

/// Paths a volume may not cover: the kernel's and the runtime's own file systems.
const RESERVED_TARGETS: &[&str] = &["/proc", "/sys", "/dev"];

impl VolumeMount {
    /// Checks the mount's shape; whether the target exists in the image is checked at launch.
    pub fn validate(&self) -> Result<(), VolumeError> {
        let bad = |reason: String| Err(VolumeError(reason));
        let target = Path::new(&self.target);
        if !self.target.starts_with('/')
            || target
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            || self.target.contains("//")
            || self.target.contains('\0')
        {
            return bad(format!(
                "volume target {:?} must be a normalized absolute path",
                self.target
            ));
        }
        if self.target == "/" {
            return bad("a volume cannot be mounted at / (the root is the image)".into());
        }
        if let Some(reserved) = RESERVED_TARGETS
            .iter()
            .find(|r| target.starts_with(Path::new(r)))
        {
            return bad(format!(
                "volume target {} is inside {reserved}, which the runtime owns",
                self.target
            ));
        }
        match &self.source {
            VolumeSource::Named { name } => validate_volume_name(name),
            VolumeSource::Host { path } => {
                if !path.is_absolute()
                    || path
                        .components()
                        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
                {
                    return bad(format!(
                        "host path {} must be a normalized absolute path",
                        path.display()
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Volume names: a letter or digit, then letters, digits, `_`, `.` or `-`, at most 64 in all.
pub fn validate_volume_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(VolumeError(format!(
            "invalid volume name {name:?} (letters, digits, '_', '.', '-'; starting with a letter or digit; at most 64)"
        )))
    }
}

impl FromStr for VolumeMount {
    type Err = VolumeError;
    /// `NAME:/target`, `/host/path:/target`, each optionally followed by `:ro` or `:rw`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, read_only) = match parts.as_slice() {
            [source, target] => (*source, *target, false),
            [source, target, "ro"] => (*source, *target, true),
            [source, target, "rw"] => (*source, *target, false),
            _ => {
                return Err(VolumeError(format!(
                    "invalid volume {s:?} (expected NAME:/path or /host/path:/path, optionally :ro or :rw)"
                )));
            }
        };
        let source = if source.starts_with('/') {
            VolumeSource::Host {
                path: PathBuf::from(source),
            }
        } else {
            VolumeSource::Named {
                name: source.to_owned(),
            }
        };
        let mount = VolumeMount {
            source,
            target: target.trim_end_matches('/').to_owned(),
            read_only,
        };
        mount.validate()?;
        Ok(mount)
    }
}

impl fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            VolumeSource::Named { name } => write!(f, "{name}:{}", self.target)?,
            VolumeSource::Host { path } => write!(f, "{}:{}", path.display(), self.target)?,
        }
        if self.read_only {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}
