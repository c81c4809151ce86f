//! Registry references the way docker reads them: `HOST[:PORT]/REPO[:TAG][@sha256:HEX]`, with
//! `debian` meaning `docker.io/library/debian:latest`.

use std::fmt;
use std::str::FromStr;

use imago_oci::Digest;

use crate::error::RegistryError;

pub use imago_oci::DOCKER_HUB;
/// Where docker.io's distribution API lives.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    /// `HOST[:PORT]` as written (docker.io for short names).
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

fn invalid(reference: &str, reason: &'static str) -> RegistryError {
    RegistryError::InvalidReference {
        reference: reference.to_owned(),
        reason,
    }
}

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
}

fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

pub use imago_oci::names_registry;

impl RegistryRef {
    /// `HOST[:PORT]/REPO` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tag, `latest` when neither tag nor digest is given.
    pub fn tag_or_default(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(t), _) => Some(t),
            (None, Some(_)) => None,
            (None, None) => Some("latest"),
        }
    }

    /// What the manifest endpoint is asked for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, self.tag_or_default()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_owned(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The host the distribution API is served from.
    pub fn api_host(&self) -> &str {
        api_host(&self.registry)
    }

    /// The same repository with another tag (and no digest).
    pub fn with_tag(&self, tag: &str) -> RegistryRef {
        RegistryRef {
            tag: Some(tag.to_owned()),
            digest: None,
            ..self.clone()
        }
    }

    /// Docker's short form: `debian:12` for `docker.io/library/debian:12`.
    pub fn short(&self) -> String {
        imago_oci::docker_short_name(&self.to_string()).to_owned()
    }
}

pub fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB || registry == "index.docker.io" {
        DOCKER_HUB_API
    } else {
        registry
    }
}

impl FromStr for RegistryRef {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<RegistryRef, RegistryError> {
        if s.is_empty() || s.len() > 512 {
            return Err(invalid(s, "empty or too long"));
        }
        let imago_oci::NameParts { name, tag, digest } =
            imago_oci::split_name(s).map_err(|e| match e {
                imago_oci::ReferenceError::Invalid { reason, .. } => invalid(s, reason),
            })?;
        if names_registry(name) {
            let host = name.split_once('/').map_or(name, |(host, _)| host);
            if !valid_host(host) {
                return Err(invalid(s, "invalid registry host"));
            }
        }
        let (registry, repository) = imago_oci::docker_name(name);
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(invalid(
                s,
                "a repository is lowercase letters, digits and . _ - separated by /",
            ));
        }
        Ok(RegistryRef {
            registry,
            repository,
            tag: tag.map(str::to_owned),
            digest,
        })
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => write!(f, ":{t}@{d}"),
            (Some(t), None) => write!(f, ":{t}"),
            (None, Some(d)) => write!(f, "@{d}"),
            (None, None) => write!(f, ":latest"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RegistryRef {
        s.parse().unwrap()
    }

    #[test]
    fn short_names_expand_like_docker() {
        assert_eq!(
            parse("debian").to_string(),
            "docker.io/library/debian:latest"
        );
        assert_eq!(
            parse("debian:12").to_string(),
            "docker.io/library/debian:12"
        );
        assert_eq!(parse("user/app:1").to_string(), "docker.io/user/app:1");
        assert_eq!(
            parse("docker.io/debian:12").to_string(),
            "docker.io/library/debian:12"
        );
        assert_eq!(parse("docker.io/library/debian:12").short(), "debian:12");
        assert_eq!(parse("debian").api_host(), "registry-1.docker.io");
    }

    #[test]
    fn hosts_ports_tags_and_digests() {
        let r = parse("127.0.0.1:5000/team/web:1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/web");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.manifest_reference(), "1");
        let r = parse("localhost:5000/web");
        assert_eq!(r.tag_or_default(), Some("latest"));
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = parse(&format!("127.0.0.1:5000/web@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), d);
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/web@{d}"));
        assert_eq!(parse("localhost/web").registry, "localhost");
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in [
            "",
            "Web",
            "127.0.0.1:5000/",
            "127.0.0.1:5000/web:",
            "127.0.0.1:5000/web@sha256:12",
            "host:port/web",
            "127.0.0.1:5000/web:/x",
        ] {
            assert!(bad.parse::<RegistryRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn registry_names_are_told_from_hub_names() {
        assert!(names_registry("127.0.0.1:5000/web"));
        assert!(names_registry("ghcr.io/x/y"));
        assert!(names_registry("localhost/web"));
        assert!(!names_registry("team/web"));
        assert!(!names_registry("web"));
    }
}
