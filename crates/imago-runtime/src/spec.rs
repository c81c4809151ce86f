//! What an instance runs: the image digest plus everything that configures it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use imago_oci::{Digest, to_canonical_json};
use serde::{Deserialize, Serialize};

use crate::{RuntimeError, Seccomp};

/// The engine is plain data of imago-spec's, shared with the builder's steps.
pub use imago_spec::step::Engine;

/// The full description of one instance. Its [`InstanceSpec::spec_hash`] is recorded with the
/// instance, so later code can tell exactly what each instance runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Manifest digest of the image.
    pub image: Digest,
    /// A human-friendly name (not unique, not an identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Replaces the image's entrypoint (when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's cmd (when set), like `docker run IMAGE ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Added to (and overriding) the image's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub network: NetworkMode,
    /// Free-form labels, e.g. `service` and `release` set by the deployer.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub engine: Engine,
    /// Volumes mounted into the instance: with /tmp and /run, the only writable places.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// The syscall filter; the default one is left out of the hash's JSON, so specs written
    /// before filters existed keep their hashes.
    #[serde(default, skip_serializing_if = "Seccomp::is_default")]
    pub seccomp: Seccomp,
    /// Runs a tiny init (tini, from the host, bind-mounted read-only) as PID 1 with the
    /// instance's program as its child, as `docker run --init`: it forwards signals (a program
    /// that ignores SIGTERM as PID 1 stops at once instead of waiting out its grace) and reaps
    /// orphaned zombies. Left out of the hash's JSON when off, so older specs keep their hashes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
}

impl InstanceSpec {
    pub fn new(image: Digest) -> InstanceSpec {
        InstanceSpec {
            image,
            name: None,
            entrypoint: None,
            args: None,
            env: BTreeMap::new(),
            resources: Resources::default(),
            network: NetworkMode::default(),
            labels: BTreeMap::new(),
            engine: Engine::default(),
            volumes: Vec::new(),
            seccomp: Seccomp::default(),
            init: false,
        }
    }

    /// sha256 of the canonical JSON of the whole spec.
    pub fn spec_hash(&self) -> Result<Digest, RuntimeError> {
        Ok(Digest::of(&to_canonical_json(self)?))
    }

    /// Rejects limits and names that could never work, before anything is created.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let r = &self.resources;
        if let Some(m) = r.memory_bytes
            && m < MIN_MEMORY_BYTES
        {
            return Err(RuntimeError::InvalidSpec(format!(
                "memory limit {m} bytes is below the minimum of {MIN_MEMORY_BYTES} bytes"
            )));
        }
        if let Some(c) = r.cpu_millis
            && (c == 0 || c > 1024 * 1000)
        {
            return Err(RuntimeError::InvalidSpec(format!(
                "cpu limit {c} millicpus is out of range (1..=1024000)"
            )));
        }
        if r.pids == Some(0) {
            return Err(RuntimeError::InvalidSpec(
                "pids limit must be at least 1".into(),
            ));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(RuntimeError::InvalidSpec(format!(
                    "invalid environment variable name {key:?}"
                )));
            }
        }
        if let Some(args) = &self.args
            && args.iter().any(|a| a.contains('\0'))
        {
            return Err(RuntimeError::InvalidSpec(
                "argument contains a NUL byte".into(),
            ));
        }
        if matches!(&self.entrypoint, Some(e) if e.is_empty()) {
            return Err(RuntimeError::InvalidSpec(
                "entrypoint override is empty".into(),
            ));
        }
        let mut targets = std::collections::BTreeSet::new();
        for volume in &self.volumes {
            volume.validate()?;
            if !targets.insert(volume.target.as_str()) {
                return Err(RuntimeError::InvalidSpec(format!(
                    "two volumes are mounted at {}",
                    volume.target
                )));
            }
        }
        Ok(())
    }
}

/// Volume mounts are imago-spec's type: `imago.toml` is checked by exactly the rules a launch
/// applies (`InstanceSpec::validate` checks them again).
pub use imago_spec::{VolumeMount, VolumeSource};

/// Volume names: a letter or digit, then letters, digits, `_`, `.` or `-`, at most 64 in all.
pub fn validate_volume_name(name: &str) -> Result<(), RuntimeError> {
    Ok(imago_spec::validate_volume_name(name)?)
}

/// The smallest memory limit accepted: below this even a static busybox cannot start.
pub const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU quota in thousandths of a CPU (`--cpus 0.5` = 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Own network namespace, connected to the host by a veth pair.
    #[default]
    Private,
    /// The host's network namespace.
    Host,
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkMode::Private => "private",
            NetworkMode::Host => "host",
        })
    }
}

impl FromStr for NetworkMode {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "private" => Ok(NetworkMode::Private),
            "host" => Ok(NetworkMode::Host),
            other => Err(RuntimeError::InvalidSpec(format!(
                "unknown network mode {other:?} (expected host or private)"
            ))),
        }
    }
}

/// Parses a memory size like `64M`, `1G`, `512k` or a plain byte count.
pub fn parse_memory(s: &str) -> Result<u64, RuntimeError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => {
                    return Err(RuntimeError::InvalidSpec(format!(
                        "invalid memory size {s:?}"
                    )));
                }
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| RuntimeError::InvalidSpec(format!("invalid memory size {s:?}")))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| RuntimeError::InvalidSpec(format!("invalid memory size {s:?}")))
}

/// Parses a CPU count like `0.5` or `2` into millicpus.
pub fn parse_cpus(s: &str) -> Result<u64, RuntimeError> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| RuntimeError::InvalidSpec(format!("invalid cpu count {s:?}")))?;
    if !v.is_finite() || v <= 0.0 || v > 1024.0 {
        return Err(RuntimeError::InvalidSpec(format!(
            "invalid cpu count {s:?}"
        )));
    }
    let millis = (v * 1000.0).round() as u64;
    if millis == 0 {
        return Err(RuntimeError::InvalidSpec(format!(
            "cpu count {s:?} is below 0.001"
        )));
    }
    Ok(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_hash_is_stable_and_sensitive() {
        let d = Digest::of(b"image");
        let mut a = InstanceSpec::new(d.clone());
        a.labels.insert("service".into(), "web".into());
        a.env.insert("B".into(), "2".into());
        a.env.insert("A".into(), "1".into());
        let b = a.clone();
        assert_eq!(a.spec_hash().unwrap(), b.spec_hash().unwrap());
        let mut c = a.clone();
        c.resources.memory_bytes = Some(64 << 20);
        assert_ne!(a.spec_hash().unwrap(), c.spec_hash().unwrap());
    }

    #[test]
    fn parses_and_checks_volumes() {
        let v: VolumeMount = "data:/var/lib/data".parse().unwrap();
        assert_eq!(
            v.source,
            VolumeSource::Named {
                name: "data".into()
            }
        );
        assert_eq!(v.target, "/var/lib/data");
        assert!(!v.read_only);
        assert_eq!(v.to_string(), "data:/var/lib/data");
        let v: VolumeMount = "/srv/conf:/etc/app/:ro".parse().unwrap();
        assert_eq!(
            v.source,
            VolumeSource::Host {
                path: "/srv/conf".into()
            }
        );
        assert_eq!((v.target.as_str(), v.read_only), ("/etc/app", true));
        assert_eq!(v.to_string(), "/srv/conf:/etc/app:ro");
        for bad in [
            "data",
            "data:relative",
            "data:/",
            "data:/proc/x",
            "data:/dev",
            "data:/a/../b",
            "data:/a:rx",
            "-x:/a",
            "a/b:/a",
            "/a/../b:/a",
            "",
        ] {
            assert!(bad.parse::<VolumeMount>().is_err(), "{bad:?} was accepted");
        }
        let mut spec = InstanceSpec::new(Digest::of(b"x"));
        let plain_hash = spec.spec_hash().unwrap();
        spec.volumes = vec!["a:/data".parse().unwrap(), "b:/data".parse().unwrap()];
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("two volumes are mounted at /data"), "{err}");
        spec.volumes.pop();
        assert_ne!(spec.spec_hash().unwrap(), plain_hash);
        spec.volumes.clear();
        assert_eq!(
            spec.spec_hash().unwrap(),
            plain_hash,
            "no volumes must hash like before volumes existed"
        );
    }

    #[test]
    fn parses_limits() {
        assert_eq!(parse_memory("64M").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("4096").unwrap(), 4096);
        assert!(parse_memory("-1").is_err());
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("0").is_err());
        assert_eq!(parse_cpus("0.5").unwrap(), 500);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("abc").is_err());
        let mut s = InstanceSpec::new(Digest::of(b"x"));
        s.resources.memory_bytes = Some(1024);
        assert!(s.validate().is_err());
        s.resources.memory_bytes = None;
        s.resources.pids = Some(0);
        assert!(s.validate().is_err());
    }
}
