//! A service's `volumes` entries: `NAME:/path` or `/host/path:/path`, optionally `:ro`/`:rw`.
//! The same rules as the runtime's `VolumeMount` (which checks again at launch), kept here so
//! that a file is refused when it is read, naming the service.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// One volume mount as written in `imago.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub source: VolumeSource,
    /// Absolute path inside the instance.
    pub target: String,
    pub read_only: bool,
}

/// Where a volume's data lives on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A named volume of the home, shared by every instance naming it.
    Named { name: String },
    /// An existing directory or file of the host, bound as it is.
    Host { path: PathBuf },
}

/// Paths a volume may not cover: the kernel's and the runtime's own file systems.
const RESERVED_TARGETS: &[&str] = &["/proc", "/sys", "/dev"];

impl VolumeMount {
    /// Checks the mount's shape; whether the target exists in the image is checked at launch.
    pub fn validate(&self) -> Result<(), String> {
        let target = Path::new(&self.target);
        if !self.target.starts_with('/')
            || target
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            || self.target.contains("//")
            || self.target.contains('\0')
        {
            return Err(format!(
                "volume target {:?} must be a normalized absolute path",
                self.target
            ));
        }
        if self.target == "/" {
            return Err("a volume cannot be mounted at / (the root is the image)".into());
        }
        if let Some(reserved) = RESERVED_TARGETS
            .iter()
            .find(|r| target.starts_with(Path::new(r)))
        {
            return Err(format!(
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
                    return Err(format!(
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
fn validate_volume_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid volume name {name:?} (letters, digits, '_', '.', '-'; starting with a letter or digit; at most 64)"
        ))
    }
}

impl FromStr for VolumeMount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, read_only) = match parts.as_slice() {
            [source, target] => (*source, *target, false),
            [source, target, "ro"] => (*source, *target, true),
            [source, target, "rw"] => (*source, *target, false),
            _ => {
                return Err(format!(
                    "invalid volume {s:?} (expected NAME:/path or /host/path:/path, optionally :ro or :rw)"
                ));
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
