//! Credentials (docker's config format, credential helpers) and `WWW-Authenticate` challenges.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::error::{RegistryError, Result};

/// A user name and password (or identity token). Debug never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", self.username, self.password))
        )
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Basic realm="x"` or `Bearer realm="https://a/token",service="s",scope="repository:r:pull"`.
/// Quoted values may contain commas (scopes like `pull,push` do).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

fn parse_params(mut s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        let Some(eq) = s.find('=') else {
            return out;
        };
        let key = s[..eq].trim().to_ascii_lowercase();
        s = &s[eq + 1..];
        let value;
        if let Some(quoted) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = &quoted[end.min(quoted.len())..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_owned();
            s = &s[end..];
        }
        out.insert(key, value);
    }
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The keys a registry may be stored under in a config file (docker.io has a legacy URL key).
fn keys_for(registry: &str) -> Vec<String> {
    let mut keys = vec![
        registry.to_owned(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    if registry == "docker.io" {
        keys.push("https://index.docker.io/v1/".to_owned());
        keys.push("index.docker.io".to_owned());
        keys.push("registry-1.docker.io".to_owned());
    }
    keys
}

fn read_config(path: &Path) -> Result<Option<ConfigFile>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| RegistryError::Credentials {
                    path: path.to_owned(),
                    reason: format!("not a valid config file: {e}"),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RegistryError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

fn entry_credentials(path: &Path, entry: &AuthEntry) -> Result<Option<Credentials>> {
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let bad = || RegistryError::Credentials {
            path: path.to_owned(),
            reason: "an `auth` entry is not base64 of USER:PASSWORD".into(),
        };
        let decoded = STANDARD.decode(auth.trim()).map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, pass) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials {
            username: user.to_owned(),
            password: pass.to_owned(),
        }));
    }
    if let Some(token) = &entry.identitytoken {
        return Ok(Some(Credentials {
            username: "<token>".into(),
            password: token.clone(),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

/// Where credentials are looked up, in order.
#[derive(Debug, Clone)]
pub struct CredentialSources {
    /// `$IMAGO_HOME/auth.json`, written by `imago login`.
    pub imago_auth: PathBuf,
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

impl CredentialSources {
    pub fn for_home(home: &Path) -> CredentialSources {
        let docker_config = std::env::var_os("DOCKER_CONFIG")
            .map(|d| PathBuf::from(d).join("config.json"))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
            });
        CredentialSources {
            imago_auth: home.join("auth.json"),
            docker_config,
        }
    }

    /// The credentials for `registry`, if any source has them.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>> {
        let paths = std::iter::once(&self.imago_auth).chain(self.docker_config.as_ref());
        for path in paths {
            let Some(config) = read_config(path)? else {
                continue;
            };
            for key in keys_for(registry) {
                if let Some(helper) = config.cred_helpers.get(&key) {
                    return helper_get(helper, registry);
                }
            }
            for key in keys_for(registry) {
                if let Some(entry) = config.auths.get(&key)
                    && let Some(c) = entry_credentials(path, entry)?
                {
                    return Ok(Some(c));
                }
            }
            if let Some(store) = &config.creds_store
                && let Some(c) = helper_get(store, registry)?
            {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

#[derive(Deserialize)]
struct HelperReply {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Runs `docker-credential-NAME get` with the server on stdin (the helper protocol).
fn helper_get(helper: &str, registry: &str) -> Result<Option<Credentials>> {
    let fail = |reason: String| RegistryError::CredentialHelper {
        helper: helper.to_owned(),
        reason,
    };
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(registry.as_bytes())
            .map_err(|e| fail(format!("write to {program}: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| fail(format!("wait for {program}: {e}")))?;
    if !output.status.success() {
        // The protocol's "not found" is a failure whose output says so.
        if String::from_utf8_lossy(&output.stdout).contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("exited with {}", output.status)));
    }
    // The reply holds the secret: its parse error must not quote it.
    let reply: HelperReply = serde_json::from_slice(&output.stdout)
        .map_err(|_| fail("the reply is not {\"Username\", \"Secret\"} json".into()))?;
    if reply.username == "<token>" || !reply.secret.is_empty() {
        Ok(Some(Credentials {
            username: reply.username,
            password: reply.secret,
        }))
    } else {
        Ok(None)
    }
}

/// Adds (`Some`) or removes (`None`) `registry` in the auths of the docker-format file `path`,
/// keeping its other content; written to a temp file with mode 0600 and renamed over it.
pub fn store_credentials(
    path: &Path,
    registry: &str,
    credentials: Option<&Credentials>,
) -> Result<bool> {
    let io = |action: &'static str, source: std::io::Error| RegistryError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut doc: serde_json::Value = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RegistryError::Credentials {
            path: path.to_owned(),
            reason: format!("not a valid config file: {e}"),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(io("read", e)),
    };
    let Some(object) = doc.as_object_mut() else {
        return Err(RegistryError::Credentials {
            path: path.to_owned(),
            reason: "not a json object".into(),
        });
    };
    let auths = object
        .entry("auths")
        .or_insert_with(|| serde_json::json!({}));
    let Some(auths) = auths.as_object_mut() else {
        return Err(RegistryError::Credentials {
            path: path.to_owned(),
            reason: "`auths` is not an object".into(),
        });
    };
    let changed = match credentials {
        Some(c) => {
            let auth = STANDARD.encode(format!("{}:{}", c.username, c.password));
            auths.insert(registry.to_owned(), serde_json::json!({ "auth": auth }));
            true
        }
        None => auths.remove(registry).is_some(),
    };
    let bytes = serde_json::to_vec_pretty(&doc)
        .map_err(|e| io("encode", std::io::Error::other(e.to_string())))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("create", e))?;
        file.write_all(&bytes).map_err(|e| io("write", e))?;
        file.write_all(b"\n").map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("rename into place", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_keep_commas_inside_quotes() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:team/web:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:team/web:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=https://a/t, service=s"#),
            Some(Challenge::Bearer {
                realm: "https://a/t".into(),
                service: Some("s".into()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=\"s\""), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn credentials_come_from_imago_then_docker_config_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let imago = dir.path().join("auth.json");
        let docker = dir.path().join("config.json");
        let sources = CredentialSources {
            imago_auth: imago.clone(),
            docker_config: Some(docker.clone()),
        };
        assert_eq!(sources.lookup("127.0.0.1:5000").unwrap(), None);
        std::fs::write(
            &docker,
            r#"{"auths": {"127.0.0.1:5000": {"auth": "YWxpY2U6czNjcmV0"}, "https://index.docker.io/v1/": {"username": "bob", "password": "pw"}}}"#,
        )
        .unwrap();
        let alice = sources.lookup("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!(
            (alice.username.as_str(), alice.password.as_str()),
            ("alice", "s3cret")
        );
        assert!(!format!("{alice:?}").contains("s3cret"));
        assert_eq!(
            sources.lookup("docker.io").unwrap().unwrap().username,
            "bob"
        );
        let carol = Credentials {
            username: "carol".into(),
            password: "pa:ss".into(),
        };
        assert!(store_credentials(&imago, "127.0.0.1:5000", Some(&carol)).unwrap());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&imago).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(sources.lookup("127.0.0.1:5000").unwrap(), Some(carol));
        assert!(store_credentials(&imago, "127.0.0.1:5000", None).unwrap());
        assert!(!store_credentials(&imago, "127.0.0.1:5000", None).unwrap());
        assert_eq!(
            sources.lookup("127.0.0.1:5000").unwrap().unwrap().username,
            "alice"
        );
    }

    #[test]
    fn a_broken_auth_entry_is_an_error_that_does_not_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        std::fs::write(&path, r#"{"auths": {"h:1": {"auth": "!!!secret!!!"}}}"#).unwrap();
        let sources = CredentialSources {
            imago_auth: path,
            docker_config: None,
        };
        let err = sources.lookup("h:1").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
