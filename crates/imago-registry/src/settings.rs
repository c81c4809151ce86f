//! How the client behaves: TLS roots per registry, where plain HTTP is allowed, retry budget.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{RegistryError, Result};

pub const DEFAULT_RETRIES: u32 = 5;
pub const DEFAULT_BACKOFF_MS: u64 = 200;
/// Blob transfers at once, per image.
pub const DEFAULT_PARALLEL: usize = 4;

#[derive(Debug, Clone)]
pub struct Settings {
    /// The imago home: `auth.json`, `certs.d/`, `config.toml`.
    pub home: PathBuf,
    /// `--insecure`: plain HTTP (and unverified TLS) for this command's registry.
    pub insecure: bool,
    /// Registries from `config.toml`'s `insecure_registries`.
    pub insecure_registries: Vec<String>,
    /// Directories holding `HOST[:PORT]/ca.crt`, searched in order.
    pub cert_dirs: Vec<PathBuf>,
    /// Retries after the first try of a request (429, 5xx, connection errors).
    pub retries: u32,
    /// The first retry waits this long, each next one twice as long (capped at 10 s).
    pub backoff: Duration,
    pub parallel: usize,
    /// `os/arch[/variant]` chosen from an index when pulling.
    pub platform: String,
    /// Pull the blobs of every platform of an index, not only `platform`'s.
    pub all_platforms: bool,
    /// Blobs up to this size go up in one request, larger ones in PATCH chunks of this size
    /// (each a point an upload can resume from): [`crate::push::CHUNK_SIZE`] unless a test
    /// wants smaller ones.
    pub chunk_size: u64,
}

impl Settings {
    /// Settings for the imago home `home`: `config.toml` there, `IMAGO_REGISTRY_RETRIES` and
    /// `IMAGO_REGISTRY_BACKOFF_MS` from the environment.
    pub fn load(home: &Path, insecure: bool) -> Result<Settings> {
        let config = home.join("config.toml");
        let insecure_registries = match std::fs::read_to_string(&config) {
            Ok(text) => parse_insecure(&config, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(RegistryError::Io {
                    action: "read",
                    path: config,
                    source,
                });
            }
        };
        let env_number = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse().ok());
        Ok(Settings {
            home: home.to_owned(),
            insecure,
            insecure_registries,
            cert_dirs: vec![home.join("certs.d"), PathBuf::from("/etc/docker/certs.d")],
            retries: env_number("IMAGO_REGISTRY_RETRIES")
                .map_or(DEFAULT_RETRIES, |n: u64| n.min(100) as u32),
            backoff: Duration::from_millis(
                env_number("IMAGO_REGISTRY_BACKOFF_MS").unwrap_or(DEFAULT_BACKOFF_MS),
            ),
            parallel: DEFAULT_PARALLEL,
            platform: "linux/amd64".to_owned(),
            all_platforms: false,
            chunk_size: crate::push::CHUNK_SIZE,
        })
    }

    /// May `registry` be reached over plain HTTP (or with unverified TLS)?
    pub fn plain_http_allowed(&self, registry: &str) -> bool {
        self.insecure || self.is_insecure_listed(registry) || is_loopback(registry)
    }

    pub fn is_insecure_listed(&self, registry: &str) -> bool {
        self.insecure || self.insecure_registries.iter().any(|r| r == registry)
    }

    /// The PEM files of extra CAs for `registry`: `ca.crt` and other `*.crt` files (docker's
    /// certs.d layout) under each cert dir.
    pub fn ca_files(&self, registry: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for dir in &self.cert_dirs {
            let Ok(entries) = std::fs::read_dir(dir.join(registry)) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "crt"))
                .collect();
            files.sort();
            out.extend(files);
        }
        out
    }

    /// The wait before retry `attempt` (0-based).
    pub fn backoff_for(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
        self.backoff
            .saturating_mul(factor)
            .min(Duration::from_secs(10))
    }
}

fn parse_insecure(path: &Path, text: &str) -> Result<Vec<String>> {
    let bad = |reason: String| RegistryError::Config {
        path: path.to_owned(),
        reason,
    };
    let value: toml::Table = text.parse().map_err(|e| bad(format!("{e}")))?;
    match value.get("insecure_registries") {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    bad("insecure_registries must be a list of HOST[:PORT] strings".into())
                })
            })
            .collect(),
        Some(_) => Err(bad(
            "insecure_registries must be a list of HOST[:PORT] strings".into(),
        )),
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> Settings {
        Settings {
            home: dir.to_owned(),
            insecure: false,
            insecure_registries: vec!["10.0.0.5:5000".into()],
            cert_dirs: vec![dir.join("certs.d"), dir.join("etc-certs.d")],
            retries: 5,
            backoff: Duration::from_millis(200),
            parallel: 4,
            platform: "linux/amd64".into(),
            all_platforms: false,
            chunk_size: crate::push::CHUNK_SIZE,
        }
    }

    #[test]
    fn plain_http_only_for_loopback_and_listed_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path());
        assert!(s.plain_http_allowed("127.0.0.1:5000"));
        assert!(s.plain_http_allowed("localhost:5000"));
        assert!(s.plain_http_allowed("[::1]:5000"));
        assert!(s.plain_http_allowed("10.0.0.5:5000"));
        assert!(!s.plain_http_allowed("10.0.0.5:5001"));
        assert!(!s.plain_http_allowed("registry.example:443"));
        assert!(!s.plain_http_allowed("127.example.com"));
        s.insecure = true;
        assert!(s.plain_http_allowed("registry.example:443"));
    }

    #[test]
    fn insecure_registries_come_from_config_toml() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "insecure_registries = [\"10.1.2.3:5000\"]\nother = 1\n",
        )
        .unwrap();
        let s = Settings::load(dir.path(), false).unwrap();
        assert_eq!(s.insecure_registries, vec!["10.1.2.3:5000".to_owned()]);
        std::fs::write(
            dir.path().join("config.toml"),
            "insecure_registries = \"x\"\n",
        )
        .unwrap();
        assert!(Settings::load(dir.path(), false).is_err());
    }

    #[test]
    fn ca_files_are_looked_up_per_host_and_port_in_every_certs_dir() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let own = dir.path().join("certs.d/reg.example:5443");
        let etc = dir.path().join("etc-certs.d/reg.example:5443");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(own.join("ca.crt"), "x").unwrap();
        std::fs::write(own.join("client.key"), "x").unwrap();
        std::fs::write(etc.join("extra.crt"), "x").unwrap();
        assert_eq!(
            s.ca_files("reg.example:5443"),
            vec![own.join("ca.crt"), etc.join("extra.crt")]
        );
        assert!(s.ca_files("reg.example").is_empty());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        assert_eq!(s.backoff_for(0), Duration::from_millis(200));
        assert_eq!(s.backoff_for(1), Duration::from_millis(400));
        assert_eq!(s.backoff_for(3), Duration::from_millis(1600));
        assert_eq!(s.backoff_for(40), Duration::from_secs(10));
    }
}
