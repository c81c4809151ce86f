//! Drift detection for the rootfs cache: a manifest of every entry of an unpacked image (type,
//! mode, owner, size, mtime, link target, content hash), recorded when the image is unpacked, and
//! checks against it: a cheap metadata pass (no file is read) and a deep pass that re-hashes every
//! file. A modified cache is never repaired: it is set aside ("tainted") so that the next launch
//! unpacks the image afresh, and the instances that use it are replaced.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use imago_oci::{Digest, HashingReader};
use serde::{Deserialize, Serialize};

use crate::RuntimeError;
use crate::rootfs::RootfsCache;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i128,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
}

/// What `RootfsCache::verify` reports for an entry whose manifest was never recorded.
pub const NO_MANIFEST: &str = "/ has no recorded drift manifest, so it cannot be vouched for";

/// Path (relative, `/`-separated) -> entry.
pub type Manifest = BTreeMap<String, Entry>;

fn entry_of(path: &Path, meta: &fs::Metadata, hash: bool) -> Result<Entry, RuntimeError> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else {
        'o'
    };
    let link = if ft.is_symlink() {
        Some(
            fs::read_link(path)
                .map_err(RuntimeError::io("cannot read link", path))?
                .to_string_lossy()
                .into_owned(),
        )
    } else {
        None
    };
    let sha256 = if hash && ft.is_file() {
        let file = fs::File::open(path).map_err(RuntimeError::io("cannot open", path))?;
        let mut reader = HashingReader::new(file);
        let mut buf = vec![0u8; 1 << 16];
        while reader
            .read(&mut buf)
            .map_err(RuntimeError::io("cannot read", path))?
            > 0
        {}
        Some(reader.finish().0)
    } else {
        None
    };
    Ok(Entry {
        kind,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        size: if ft.is_file() { meta.size() } else { 0 },
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        link,
        sha256,
    })
}

/// Walks `root` (never following symlinks) into a manifest; `hash` adds content hashes.
pub fn scan(root: &Path, hash: bool) -> Result<Manifest, RuntimeError> {
    let mut out = Manifest::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = fs::read_dir(&dir).map_err(RuntimeError::io("cannot list", &dir))?;
        for entry in entries {
            let entry = entry.map_err(RuntimeError::io("cannot list", &dir))?;
            let path = entry.path();
            let meta =
                fs::symlink_metadata(&path).map_err(RuntimeError::io("cannot stat", &path))?;
            let rel_path = rel.join(entry.file_name());
            if meta.is_dir() {
                stack.push(rel_path.clone());
            }
            out.insert(
                rel_path.to_string_lossy().into_owned(),
                entry_of(&path, &meta, hash)?,
            );
        }
    }
    Ok(out)
}

/// The differences between `recorded` and `now`, in words; content is compared only where both
/// sides carry a hash.
pub fn compare(recorded: &Manifest, now: &Manifest) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, was) in recorded {
        match now.get(path) {
            None => problems.push(format!("/{path} was removed")),
            Some(is) => {
                if is.kind != was.kind || is.link != was.link {
                    problems.push(format!("/{path} was replaced"));
                } else if is.mode != was.mode || is.uid != was.uid || is.gid != was.gid {
                    problems.push(format!("/{path} changed owner or mode"));
                } else if is.size != was.size || (is.kind == 'f' && is.mtime_ns != was.mtime_ns) {
                    problems.push(format!("/{path} was modified"));
                } else if let (Some(a), Some(b)) = (&was.sha256, &is.sha256)
                    && a != b
                {
                    problems.push(format!(
                        "/{path} has different content (same size and mtime)"
                    ));
                }
            }
        }
    }
    for path in now.keys().filter(|p| !recorded.contains_key(*p)) {
        problems.push(format!("/{path} was added"));
    }
    problems
}

impl RootfsCache {
    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        let root = self.path(digest);
        let name = format!(".{}.manifest.json", digest.hex());
        root.parent()
            .map_or_else(|| PathBuf::from(&name), |p| p.join(&name))
    }

    /// Records `tree`, the verified unpack of `digest` not yet renamed into place, as the
    /// manifest of `digest`. Best effort: on failure no manifest is left for `digest` (an older
    /// one is removed), which the drift check reports, so the entry is never trusted unchecked.
    pub(crate) fn record_manifest_of(&self, digest: &Digest, tree: &Path) {
        let path = self.manifest_path(digest);
        let recorded = scan(tree, true).and_then(|manifest| {
            let bytes = serde_json::to_vec(&manifest)
                .map_err(|e| RuntimeError::InvalidSpec(e.to_string()))?;
            crate::state::write_atomic(&path, &bytes)
        });
        if recorded.is_err() {
            let _ = fs::remove_file(&path);
        }
    }

    /// Checks the cached rootfs of `digest` against its manifest: metadata only, or with `deep`
    /// every file's content too. Returns the differences (empty: intact). An entry without a
    /// manifest (its recording failed after the unpack) is reported as a problem: a baseline
    /// taken now would bless whatever changed since the unpack, so the entry is set aside and
    /// unpacked afresh instead.
    pub fn verify(&self, digest: &Digest, deep: bool) -> Result<Vec<String>, RuntimeError> {
        let root = self.path(digest);
        if !root.is_dir() {
            return Ok(Vec::new());
        }
        let path = self.manifest_path(digest);
        let recorded: Manifest = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| RuntimeError::Json {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(vec![NO_MANIFEST.to_string()]);
            }
            Err(e) => {
                return Err(RuntimeError::Io {
                    action: "cannot read",
                    path,
                    source: e,
                });
            }
        };
        Ok(compare(&recorded, &scan(&root, deep)?))
    }

    /// Sets a modified cache aside so the next launch unpacks the image afresh. Instances still
    /// running from it keep their (bind-mounted) tree until they are replaced.
    pub fn taint(&self, digest: &Digest) -> Result<PathBuf, RuntimeError> {
        let root = self.path(digest);
        // The manifest goes first: once the tree is moved, a new unpack of `digest` may record
        // its own manifest, which must not be removed.
        let _ = fs::remove_file(self.manifest_path(digest));
        let tainted = root.with_file_name(format!(
            ".tainted-{}-{}",
            digest.hex(),
            crate::state::now_ms()
        ));
        fs::rename(&root, &tainted).map_err(RuntimeError::io("cannot set aside", &root))?;
        Ok(tainted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_pass_sees_writes_and_deep_pass_sees_content_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(dir.path());
        let digest = Digest::of(b"image");
        let root = cache.path(&digest);
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/conf"), b"original").unwrap();
        std::os::unix::fs::symlink("etc/conf", root.join("link")).unwrap();
        cache.record_manifest_of(&digest, &root);
        assert!(cache.verify(&digest, true).unwrap().is_empty());

        // Same size, and the mtime put back: only the deep pass can tell.
        let mtime = fs::metadata(root.join("etc/conf"))
            .unwrap()
            .modified()
            .unwrap();
        fs::write(root.join("etc/conf"), b"tampered").unwrap();
        fs::File::options()
            .write(true)
            .open(root.join("etc/conf"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(cache.verify(&digest, false).unwrap().is_empty());
        let deep = cache.verify(&digest, true).unwrap();
        assert_eq!(
            deep,
            vec!["/etc/conf has different content (same size and mtime)".to_string()]
        );

        fs::write(root.join("etc/new"), b"x").unwrap();
        fs::write(root.join("etc/conf"), b"longer content").unwrap();
        let cheap = cache.verify(&digest, false).unwrap();
        assert!(
            cheap.contains(&"/etc/new was added".to_string()),
            "{cheap:?}"
        );
        assert!(
            cheap.contains(&"/etc/conf was modified".to_string()),
            "{cheap:?}"
        );

        let aside = cache.taint(&digest).unwrap();
        assert!(aside.is_dir() && !root.exists());
    }

    #[test]
    fn an_entry_without_a_manifest_is_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RootfsCache::new(dir.path());
        let digest = Digest::of(b"image");
        let root = cache.path(&digest);
        fs::create_dir_all(root.join("etc")).unwrap();
        assert_eq!(
            cache.verify(&digest, false).unwrap(),
            vec![NO_MANIFEST.to_string()]
        );
        // Reporting it must not record one on the way: the next check reports it again.
        assert_eq!(
            cache.verify(&digest, true).unwrap(),
            vec![NO_MANIFEST.to_string()]
        );
    }
}
