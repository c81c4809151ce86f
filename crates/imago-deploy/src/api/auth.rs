//! Who may use the API: the token in `$IMAGO_HOME/api-token`, the rule of when it is needed,
//! and a per-client limiter of failed attempts.
//!
//! A write action always needs the token; on an address beyond loopback every request does,
//! except the console's static files (they carry no data: the page asks for the token and
//! sends it with every request it makes). The token goes in `Authorization: Bearer`, never in a
//! cookie, so no other site can make a browser use it (no CSRF).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::DeployError;

/// Failed attempts a client may make per [`FAILURE_WINDOW`] before it is answered 429.
pub const MAX_FAILURES: u32 = 10;
/// The window over which failed attempts are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Clients the limiter remembers before it forgets those whose window is over.
const REMEMBERED_CLIENTS: usize = 4096;

/// The token file of an imago home.
pub fn token_path(home: &Path) -> PathBuf {
    home.join("api-token")
}

/// The API token of `home`, created on first use: 32 random bytes as hex, in a file of mode
/// 0600 that appears whole or not at all (written to a temporary file, then hard-linked into
/// place, which fails rather than replace a token another process made first).
pub fn ensure_token(home: &Path) -> Result<String, DeployError> {
    let path = token_path(home);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| DeployError::Io { what, path, source }
    };
    if let Some(token) = read_token(&path)? {
        return Ok(token);
    }
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(io("cannot read", Path::new("/dev/urandom")))?;
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    static ATTEMPT: AtomicU64 = AtomicU64::new(0);
    let attempt = ATTEMPT.fetch_add(1, Ordering::Relaxed);
    let tmp = home.join(format!(".api-token.{}.{attempt}.tmp", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("cannot create", &tmp))?;
    file.write_all(token.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(io("cannot write", &tmp))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(dir) = std::fs::File::open(home) {
                let _ = dir.sync_all();
            }
            Ok(token)
        }
        // Another serve made it first: theirs is the token.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_token(&path)?.ok_or_else(|| DeployError::Io {
                what: "empty token file",
                path: path.clone(),
                source: std::io::ErrorKind::InvalidData.into(),
            })
        }
        Err(e) => Err(io("cannot create", &path)(e)),
    }
}

fn read_token(path: &Path) -> Result<Option<String>, DeployError> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_owned())),
        Ok(_) => Err(DeployError::Io {
            what: "empty token file",
            path: path.to_owned(),
            source: std::io::ErrorKind::InvalidData.into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DeployError::Io {
            what: "cannot read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Whether `presented` is `expected`, in time that does not depend on where they differ.
pub fn token_matches(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Counts failed attempts per client address; a client over [`MAX_FAILURES`] in its window is
/// refused until the window ends, whatever it presents.
#[derive(Default)]
pub struct FailureLimiter {
    clients: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    /// How long `client` must still wait, if it is over its limit.
    pub fn blocked(&self, client: IpAddr) -> Option<Duration> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let (start, failures) = clients.get(&client)?;
        let left = FAILURE_WINDOW.checked_sub(start.elapsed())?;
        (*failures >= MAX_FAILURES).then_some(left)
    }

    /// Records one failed attempt of `client`.
    pub fn failed(&self, client: IpAddr) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= REMEMBERED_CLIENTS {
            clients.retain(|_, (start, _)| start.elapsed() < FAILURE_WINDOW);
        }
        let entry = clients.entry(client).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_token_is_made_once_with_mode_0600_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_token(dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(token_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ensure_token(dir.path()).unwrap(), first);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("api-token")]);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(ensure_token(other.path()).unwrap(), first);
    }

    #[test]
    fn concurrent_first_serves_agree_on_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ensure_token(dir.path()).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(tokens.iter().all(|t| t == &tokens[0]), "{tokens:?}");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
        assert!(!token_matches("abc", "abcd"));
        assert!(!token_matches("abc", ""));
    }

    #[test]
    fn a_client_is_blocked_after_too_many_failures_and_others_are_not() {
        let limiter = FailureLimiter::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..MAX_FAILURES - 1 {
            limiter.failed(a);
        }
        assert_eq!(limiter.blocked(a), None);
        limiter.failed(a);
        assert!(limiter.blocked(a).is_some());
        assert_eq!(limiter.blocked(b), None);
    }
}
