//! Image references as users type them: `name`, `name:tag`, `name@sha256:<hex>`,
//! `sha256:<hex>`, and a unique prefix of a digest.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, SHA256_HEX_LEN};

/// The tag used when a reference names no tag.
pub const DEFAULT_TAG: &str = "latest";
/// A digest prefix must be at least this long to be looked up (like git's short hashes).
pub const MIN_PREFIX_LEN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `sha256:<64 hex>`: one exact manifest.
    Digest(Digest),
    /// `sha256:<hex>` shorter than a full digest.
    DigestPrefix(String),
    /// `name`, `name:tag` or `name@sha256:<hex>`.
    Name {
        name: String,
        tag: Option<String>,
        digest: Option<Digest>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid {
        reference: String,
        reason: &'static str,
    },
}

const NAME_RULE: &str =
    "a name is lowercase letters, digits and . _ - separated by /, and not sha256";
const TAG_RULE: &str = "a tag is up to 128 letters, digits, _ . and -";

fn invalid(reference: &str, reason: &'static str) -> ReferenceError {
    ReferenceError::Invalid {
        reference: reference.to_owned(),
        reason,
    }
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn valid_name_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
}

fn valid_name(name: &str) -> bool {
    // `sha256:TAG` reads as a digest (prefix), so an image called `sha256` could never be named
    // with its tag.
    if name.len() > 255 || name == "sha256" {
        return false;
    }
    let mut parts = name.split('/');
    let Some(first) = parts.next() else {
        return false;
    };
    // The first component may be a registry host with a port: `localhost:5000/app`.
    let first_ok = match first.split_once(':') {
        Some((host, port)) => {
            name.contains('/')
                && valid_name_component(host)
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
        }
        None => valid_name_component(first),
    };
    first_ok && parts.all(valid_name_component)
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && (tag.as_bytes()[0].is_ascii_alphanumeric() || tag.as_bytes()[0] == b'_')
}

impl Reference {
    /// A `name:tag` reference, validated. Name and tag are checked apart: joined and parsed, a
    /// tag with a `/` would turn into a registry port of the name.
    pub fn named(name: &str, tag: &str) -> Result<Reference, ReferenceError> {
        let text = format!("{name}:{tag}");
        if !valid_name(name) {
            return Err(invalid(&text, NAME_RULE));
        }
        if !valid_tag(tag) {
            return Err(invalid(&text, TAG_RULE));
        }
        Ok(Reference::Name {
            name: name.to_owned(),
            tag: Some(tag.to_owned()),
            digest: None,
        })
    }

    /// The tag, defaulting to `latest` for names without one; `None` for digest references.
    pub fn tag(&self) -> Option<&str> {
        match self {
            Reference::Name { tag, digest, .. } => match (tag, digest) {
                (Some(t), _) => Some(t),
                (None, Some(_)) => None,
                (None, None) => Some(DEFAULT_TAG),
            },
            _ => None,
        }
    }

    /// `name:tag` as recorded in an OCI layout's `org.opencontainers.image.ref.name`.
    pub fn ref_name(&self) -> Option<String> {
        match self {
            Reference::Name { name, .. } => self.tag().map(|t| format!("{name}:{t}")),
            _ => None,
        }
    }

    /// The same reference with its name as docker normalises it (`debian:12` is
    /// `docker.io/library/debian:12`), when that differs from the name as written.
    pub fn docker_normalized(&self) -> Option<Reference> {
        let Reference::Name { name, tag, digest } = self else {
            return None;
        };
        let (registry, repository) = docker_name(name);
        let full = format!("{registry}/{repository}");
        (full != *name && valid_name(&full)).then(|| Reference::Name {
            name: full,
            tag: tag.clone(),
            digest: digest.clone(),
        })
    }

    /// If the reference could also be read as a digest prefix (a bare hex string like `3f9a2c`,
    /// or `sha256:3f9a`), that prefix.
    pub fn digest_prefix(&self) -> Option<&str> {
        match self {
            Reference::DigestPrefix(p) => Some(p),
            Reference::Name {
                name,
                tag: None,
                digest: None,
            } if name.len() >= MIN_PREFIX_LEN && name.len() <= SHA256_HEX_LEN && is_hex(name) => {
                Some(name)
            }
            _ => None,
        }
    }
}

/// Where docker looks for a name without a registry host.
pub const DOCKER_HUB: &str = "docker.io";

/// True when the first component of `name` names a registry host (`x.y`, `x:port`,
/// `localhost`), which is how docker tells `host/repo` from `user/repo` on Docker Hub.
pub fn names_registry(name: &str) -> bool {
    match name.split_once('/') {
        Some((first, _)) => first.contains('.') || first.contains(':') || first == "localhost",
        None => false,
    }
}

/// A name (no tag or digest) as docker normalises it, as (registry, repository):
/// `debian` and `docker.io/debian` are `docker.io`, `library/debian`; `user/app` is
/// `docker.io`, `user/app`; `index.docker.io` is `docker.io`; other hosts stay as written.
pub fn docker_name(name: &str) -> (String, String) {
    let (registry, repository) = match name.split_once('/') {
        Some((host, repo)) if names_registry(name) => (host, repo),
        _ => (DOCKER_HUB, name),
    };
    let registry = if registry == "index.docker.io" {
        DOCKER_HUB
    } else {
        registry
    };
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_owned()
    };
    (registry.to_owned(), repository)
}

/// The shortest form docker shows for a full name: `debian` for `docker.io/library/debian`,
/// `user/app` for `docker.io/user/app`; other names as they are.
pub fn docker_short_name(name: &str) -> &str {
    name.strip_prefix("docker.io/library/")
        .filter(|rest| !rest.contains('/'))
        .or_else(|| name.strip_prefix("docker.io/"))
        .unwrap_or(name)
}

/// `NAME[:TAG][@sha256:HEX]` taken apart: tag and digest checked, the name as written, for the
/// caller's own rules (a store name here, a registry host and repository in imago-registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameParts<'a> {
    pub name: &'a str,
    pub tag: Option<&'a str>,
    pub digest: Option<Digest>,
}

/// Splits `s` into [`NameParts`]. The one place that reads `@digest` and `:tag`: a tag follows
/// the last `:` unless a `/` comes after it (then that `:` was a registry port).
pub fn split_name(s: &str) -> Result<NameParts<'_>, ReferenceError> {
    let (rest, digest) = match s.split_once('@') {
        Some((rest, d)) => (
            rest,
            Some(
                d.parse::<Digest>()
                    .map_err(|_| invalid(s, "the part after @ must be sha256:<64 hex>"))?,
            ),
        ),
        None => (s, None),
    };
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if tag.is_some_and(|t| !valid_tag(t)) {
        return Err(invalid(s, TAG_RULE));
    }
    Ok(NameParts { name, tag, digest })
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(invalid(s, "empty reference"));
        }
        if let Some(hex) = s.strip_prefix("sha256:") {
            if !is_hex(hex) {
                return Err(invalid(s, "a digest is sha256: followed by lowercase hex"));
            }
            if hex.len() == SHA256_HEX_LEN {
                return Ok(Reference::Digest(
                    Digest::from_hex(hex).map_err(|_| invalid(s, "bad digest"))?,
                ));
            }
            if hex.len() > SHA256_HEX_LEN {
                return Err(invalid(s, "a sha256 digest has 64 hex characters"));
            }
            if hex.len() < MIN_PREFIX_LEN {
                return Err(invalid(
                    s,
                    "a digest prefix needs at least 4 hex characters",
                ));
            }
            return Ok(Reference::DigestPrefix(hex.to_owned()));
        }
        let NameParts { name, tag, digest } = split_name(s)?;
        if !valid_name(name) {
            return Err(invalid(s, NAME_RULE));
        }
        Ok(Reference::Name {
            name: name.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Digest(d) => write!(f, "{d}"),
            Reference::DigestPrefix(p) => write!(f, "sha256:{p}"),
            Reference::Name { name, tag, digest } => {
                write!(f, "{name}")?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                if let Some(d) = digest {
                    write!(f, "@{d}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Reference {
        s.parse().unwrap()
    }

    #[test]
    fn name_defaults_to_latest() {
        let r = parse("web");
        assert_eq!(r.ref_name().as_deref(), Some("web:latest"));
        assert_eq!(parse("web:v2").ref_name().as_deref(), Some("web:v2"));
        assert_eq!(
            parse("library/busy-box.x:1.0_rc").ref_name().as_deref(),
            Some("library/busy-box.x:1.0_rc")
        );
    }

    #[test]
    fn names_normalise_and_shorten_like_docker() {
        for written in [
            "debian:12",
            "docker.io/debian:12",
            "docker.io/library/debian:12",
            "index.docker.io/library/debian:12",
        ] {
            assert_eq!(
                parse(written)
                    .docker_normalized()
                    .unwrap_or_else(|| parse(written))
                    .ref_name()
                    .as_deref(),
                Some("docker.io/library/debian:12"),
                "{written}"
            );
        }
        assert_eq!(
            parse("docker.io/library/debian").docker_normalized(),
            None,
            "already full"
        );
        assert_eq!(
            parse("docker.io/library/debian").ref_name().as_deref(),
            Some("docker.io/library/debian:latest")
        );
        assert_eq!(
            parse("user/app:1").docker_normalized().unwrap().to_string(),
            "docker.io/user/app:1"
        );
        assert_eq!(parse("127.0.0.1:5000/web:1").docker_normalized(), None);
        assert_eq!(parse("localhost/web").docker_normalized(), None);
        let pinned = format!("debian@sha256:{}", "a".repeat(64));
        assert_eq!(
            parse(&pinned).docker_normalized().unwrap().to_string(),
            format!("docker.io/library/debian@sha256:{}", "a".repeat(64))
        );
        assert_eq!(docker_short_name("docker.io/library/debian"), "debian");
        assert_eq!(docker_short_name("docker.io/user/app"), "user/app");
        assert_eq!(docker_short_name("docker.io/library/a/b"), "library/a/b");
        assert_eq!(docker_short_name("ghcr.io/x/y"), "ghcr.io/x/y");
        assert_eq!(docker_short_name("web"), "web");
        assert!(names_registry("127.0.0.1:5000/web"));
        assert!(names_registry("localhost/web"));
        assert!(!names_registry("team/web"));
        assert!(!names_registry("web"));
    }

    #[test]
    fn registry_port_is_not_a_tag() {
        let r = parse("localhost:5000/app");
        assert_eq!(r.ref_name().as_deref(), Some("localhost:5000/app:latest"));
        assert_eq!(parse("localhost:5000/app:v1").tag(), Some("v1"));
    }

    #[test]
    fn digests_and_prefixes() {
        let full = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(parse(&full), Reference::Digest(_)));
        assert_eq!(parse("sha256:abcd").digest_prefix(), Some("abcd"));
        assert_eq!(parse("abcd12").digest_prefix(), Some("abcd12"));
        assert_eq!(parse("abcd12:latest").digest_prefix(), None);
        assert_eq!(parse("web").digest_prefix(), None);
        let pinned = parse(&format!("web@{full}"));
        assert!(matches!(
            pinned,
            Reference::Name {
                digest: Some(_),
                ..
            }
        ));
        assert_eq!(pinned.tag(), None);
    }

    #[test]
    fn rejects_bad_references_with_a_reason() {
        for bad in [
            "",
            "Web",
            "web:",
            "web:-x",
            "sha256:xyz",
            "sha256:ab",
            "web@sha256:12",
            "/web",
            "web/",
            "a//b",
        ] {
            let err = bad.parse::<Reference>().unwrap_err();
            assert!(
                err.to_string().contains("invalid image reference"),
                "{bad}: {err}"
            );
        }
    }

    /// Found by the `reference` fuzz target: `named` joined name and tag and parsed the result,
    /// so a tag with a `/` became part of the name (`web:5000/x` with no tag).
    #[test]
    fn named_keeps_name_and_tag_apart() {
        for (name, tag) in [("s", "2/a4"), ("w", "/bbv"), ("web", ""), ("Web", "v1")] {
            let err = Reference::named(name, tag).unwrap_err();
            assert!(err.to_string().contains("invalid image reference"), "{err}");
        }
        assert_eq!(
            Reference::named("localhost:5000/app", "v1").unwrap(),
            parse("localhost:5000/app:v1")
        );
    }

    /// Found by the `reference` fuzz target: `sha256` parsed as a name, but its `name:tag`
    /// (`sha256:latest`) reads as a digest, and `named("sha256", "abcd")` gave a digest prefix.
    #[test]
    fn sha256_is_no_name() {
        assert!("sha256".parse::<Reference>().is_err());
        assert!(Reference::named("sha256", "abcd").is_err());
        assert!(Reference::named("sha256", "latest").is_err());
        assert_eq!(
            parse("sha256/app").ref_name().as_deref(),
            Some("sha256/app:latest")
        );
    }

    /// Found by the `reference` fuzz target: a registry with an empty port (`w:/app`) passed.
    #[test]
    fn registry_port_is_not_empty() {
        assert!("w:/app".parse::<Reference>().is_err());
        assert!("w:/app:v1".parse::<Reference>().is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["web", "web:v1", "localhost:5000/a/b:c", "sha256:abcd"] {
            assert_eq!(parse(s).to_string(), s);
        }
    }
}
